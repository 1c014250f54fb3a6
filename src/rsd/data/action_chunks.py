"""Action chunks of a suite's demonstrations, split by episode: the RFSQ tokenizer's training data.

Reads ``{demos_dir}/{suite}/*_demo.hdf5`` (official LIBERO schema: ``data/demo_i/actions`` ``[T, 7]``),
builds every 8-step chunk of every episode with ``rsd.data.chunks.action_chunks`` and sends whole
episodes to train or validation with ``rsd.data.splits.is_validation_episode("{suite}/{task_id}/{demo}")``,
the split every stage shares. The normalizer statistics come from the training episodes only.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

import h5py
import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsd.data.chunks import action_chunks
from rsd.data.splits import is_validation_episode
from rsd.envs.libero_setup import configure_libero
from rsd.tokenizer.layout import CHUNK_LEN
from rsd.tokenizer.normalizer import ActionNormalizer

log = logging.getLogger(__name__)


class DemosNotFoundError(FileNotFoundError):
    """No demonstration files for the suite; the message says how to collect them."""


@dataclass(frozen=True)
class Episode:
    key: str  # "{suite}/{task_id}/{demo_key}", the split key
    file: str
    task_id: int
    demo: str
    actions: np.ndarray  # [T, 7] float32


def _demo_sort_key(name: str) -> tuple:
    m = re.search(r"(\d+)$", name)
    return (int(m.group(1)) if m else -1, name)


def demo_files(demos_dir: str | Path, suite: str) -> list[Path]:
    return sorted(Path(demos_dir, suite).glob("*_demo.hdf5"))


def task_ids_for_files(suite: str, files: list[Path]) -> list[int]:
    """The LIBERO task index of each ``{task_name}_demo.hdf5``.

    Order of preference: a ``task_id`` attribute on the file's ``data`` group; the task's position in
    the LIBERO benchmark (matched by name, so sorted file order does not matter); the file's position
    among the sorted files (only when neither is available, e.g. synthetic test data).
    """
    ids: list[int | None] = []
    for path in files:
        with h5py.File(path, "r") as f:
            tid = f["data"].attrs.get("task_id") if "data" in f else None
        ids.append(None if tid is None else int(tid))
    if all(i is not None for i in ids):
        return ids  # type: ignore[return-value]
    names = {}
    try:
        configure_libero()
        from libero.libero import benchmark  # optional dependency, importable only after configure_libero()

        bench = benchmark.get_benchmark_dict()[suite]()
        names = {bench.get_task(i).name: i for i in range(bench.n_tasks)}
    except Exception as err:  # noqa: BLE001 - LIBERO is optional for reading demos
        log.info("LIBERO benchmark not available for task ids (%s); using file order", err)
    out = []
    for pos, (path, tid) in enumerate(zip(files, ids, strict=True)):
        name = path.name[: -len("_demo.hdf5")]
        out.append(tid if tid is not None else names.get(name, pos))
    return out


def read_episodes(demos_dir: str | Path, suite: str) -> list[Episode]:
    files = demo_files(demos_dir, suite)
    episodes = []
    for path, task_id in zip(files, task_ids_for_files(suite, files), strict=True):
        with h5py.File(path, "r") as f:
            if "data" not in f:
                raise ValueError(f"{path} has no 'data' group: not a LIBERO demo file")
            for demo in sorted(f["data"].keys(), key=_demo_sort_key):
                actions = np.asarray(f["data"][demo]["actions"], dtype=np.float32)
                if actions.ndim != 2 or actions.shape[0] == 0:
                    raise ValueError(f"{path}:data/{demo}/actions has shape {actions.shape}, expected [T, 7]")
                episodes.append(Episode(f"{suite}/{task_id}/{demo}", str(path), task_id, demo, actions))
    return episodes


class _ChunkDataset(Dataset):
    """In-memory chunks; fetched a whole batch at a time (``__getitems__``)."""

    def __init__(self, chunks: torch.Tensor) -> None:
        self.chunks = chunks

    def __len__(self) -> int:
        return self.chunks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.chunks[i]

    def __getitems__(self, idx: list[int]) -> torch.Tensor:
        return self.chunks[torch.as_tensor(idx)]


def _as_batch(batch: torch.Tensor) -> torch.Tensor:
    return batch


class ActionChunkDataModule(L.LightningDataModule):
    """Raw action chunks ``[B, 8, 7]`` of a suite's demos; ``train_actions`` fits the normalizer.

    ``prepare_data`` raises ``DemosNotFoundError`` saying what to run when there are no demos (the
    pipeline's ``demos`` step, ``rsd.prepare``, collects them before fitting).
    """

    def __init__(self, suite: str = "libero_spatial", demos_dir: str = "data/demos", chunk_len: int = CHUNK_LEN,
                 batch_size: int = 512, num_workers: int = 0, val_fraction: float = 0.1, split_seed: int = 0,
                 gripper_dim: int | None = 6) -> None:
        super().__init__()
        self.save_hyperparameters(logger=False)
        self.suite = suite
        self.demos_dir = Path(demos_dir)
        self.chunk_len = chunk_len
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.val_fraction = val_fraction
        self.split_seed = split_seed
        self.gripper_dim = gripper_dim
        self.train_chunks: torch.Tensor | None = None
        self.val_chunks: torch.Tensor | None = None
        self.train_actions: np.ndarray | None = None
        self.train_keys: list[str] = []
        self.val_keys: list[str] = []
        self._normalizer: ActionNormalizer | None = None

    def prepare_data(self) -> None:
        """Check that demos exist (the pipeline's ``demos`` step collects them before fitting)."""
        if not demo_files(self.demos_dir, self.suite):
            raise DemosNotFoundError(
                f"No demonstrations in {self.demos_dir / self.suite} (expected *_demo.hdf5). Collect them "
                f"first: `python -m rsd.prepare prepare.until=demos` (`python train.py experiment=rfsq` does it "
                "with its default prepare.until=demos).")

    def setup(self, stage: str | None = None) -> None:
        if self.train_chunks is not None:
            return
        episodes = read_episodes(self.demos_dir, self.suite)
        if not episodes:
            raise DemosNotFoundError(
                f"No demonstrations in {self.demos_dir / self.suite}. Collect them first: "
                f"`python -m rsd.data.collect suite={self.suite}`.")
        train, val = [], []
        for ep in episodes:
            (val if is_validation_episode(ep.key, self.val_fraction, self.split_seed) else train).append(ep)
        if not train or not val:
            raise ValueError(f"episode split of {len(episodes)} episodes left train={len(train)} "
                             f"val={len(val)}; need more episodes or another val_fraction")
        self.train_keys = [ep.key for ep in train]
        self.val_keys = [ep.key for ep in val]
        self.train_actions = np.concatenate([ep.actions for ep in train])
        self.train_chunks = torch.from_numpy(np.concatenate([action_chunks(ep.actions, self.chunk_len)
                                                             for ep in train]))
        self.val_chunks = torch.from_numpy(np.concatenate([action_chunks(ep.actions, self.chunk_len)
                                                           for ep in val]))
        log.info("%s: %d train episodes (%d chunks), %d val episodes (%d chunks)", self.suite, len(train),
                 len(self.train_chunks), len(val), len(self.val_chunks))

    @property
    def normalizer(self) -> ActionNormalizer:
        """q01/q99 normalizer fitted on the training episodes' actions."""
        if self._normalizer is None:
            if self.train_actions is None:
                self.setup("fit")
            skip = () if self.gripper_dim is None else (self.gripper_dim,)
            self._normalizer = ActionNormalizer(self.train_actions.shape[-1], skip_dims=skip).fit(
                self.train_actions)
        return self._normalizer

    def summary(self) -> dict:
        """Plain-python description of the data (stored in the tokenizer file's metadata)."""
        return {
            "suite": self.suite,
            "demos_dir": str(self.demos_dir),
            "chunk_len": self.chunk_len,
            "val_fraction": self.val_fraction,
            "split_seed": self.split_seed,
            "train_episodes": len(self.train_keys),
            "val_episodes": len(self.val_keys),
            "train_chunks": 0 if self.train_chunks is None else int(self.train_chunks.shape[0]),
            "val_chunks": 0 if self.val_chunks is None else int(self.val_chunks.shape[0]),
            "val_episode_keys": list(self.val_keys),
        }

    def _loader(self, chunks: torch.Tensor, shuffle: bool) -> DataLoader:
        return DataLoader(_ChunkDataset(chunks), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers, collate_fn=_as_batch, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_chunks, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_chunks, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
