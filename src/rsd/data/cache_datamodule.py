"""``FeatureCacheDataModule``: batches of (hidden state, RFSQ tokens, action chunk) from a feature cache.

The cache's arrays are memory-mapped (``np.load(mmap_mode="r")``); a batch is gathered with one sorted
fancy-index per array (``Dataset.__getitems__``), not one Python call per sample. Batches are dicts:

- ``hidden``  float32 ``[B, D]``
- ``tokens``  long ``[B, 8, 128]`` (all ground-truth layers, layers view)
- ``targets`` long ``[B, num_target_layers, 128]`` the draft's targets: ground-truth coarse layers
  (``targets: ground_truth``) or the main model's greedy tokens read from ``distill_tokens.npy``
  (``targets: distill``; ``[N, >=num_target_layers, 128]`` uint8, written by the pipeline's ``distill`` step); with ``targets: distill_soft`` also the main model's greedy tokens
- ``soft_targets`` float32 ``[B, num_target_layers, 128, 7]`` (``targets: distill_soft`` only): the main
  model's distribution over each coarse layer's tokens given its own greedy prefix, memory-mapped from
  ``distill_probs.npy`` (``python -m rsd.prepare.distill --soft``); ``targets`` are then its greedy tokens, so
  ``val/accuracy`` is agreement with the main model and ``val/gt_accuracy`` agreement with the demos
- ``actions`` float32 ``[B, 8, 7]``
- ``index``   long ``[B]`` frame index into the cache

``prepare_data()`` checks that the cache exists (the pipeline, ``rsd.prepare``, builds it with its demos and
tokenizer before fitting); ``setup()`` checks the manifest against the tokenizer it is told about and the
expected backbone / hidden size, and fails with a clear message on a mismatched or corrupt cache.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsd.data.cache import (
    CacheError,
    CacheMismatchError,
    _plain,
    _resolve,
    cache_complete,
    check_identity,
    open_cache,
)
from rsd.models.backbones import requested_backbone_id
from rsd.tokenizer.layout import NUM_LEVELS
from rsd.tokenizer.rfsq import RFSQTokenizer
from rsd.utils.artifacts import artifact_ref, read_artifact

log = logging.getLogger(__name__)

TARGETS = ("ground_truth", "distill", "distill_soft")


class CacheDataset(Dataset):
    """Rows ``indices`` of a memory-mapped cache; ``__getitems__`` gathers a whole batch at once."""

    def __init__(self, arrays: Mapping[str, np.ndarray], indices: np.ndarray, num_target_layers: int = 3,
                 distill: np.ndarray | None = None, soft: np.ndarray | None = None) -> None:
        self.hidden = arrays["hidden"]
        self.tokens = arrays["tokens"]
        self.actions = arrays["actions"]
        self.indices = np.asarray(indices, dtype=np.int64)
        self.num_target_layers = num_target_layers
        self.distill = distill
        self.soft = soft

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __getitems__(self, positions: list[int]) -> dict[str, torch.Tensor]:
        # Rows are read in sorted order (sequential pages when the cache is not in the page cache) and the
        # batch is returned sorted: the sampler's shuffling already randomises which rows form a batch.
        rows = np.sort(self.indices[np.asarray(positions, dtype=np.int64)])
        hidden = _convert(np.ascontiguousarray(self.hidden[rows]), torch.float32)
        tokens = _convert(np.ascontiguousarray(self.tokens[rows]), torch.long)
        actions = torch.from_numpy(np.ascontiguousarray(self.actions[rows]))
        if self.distill is not None:
            targets = _convert(np.ascontiguousarray(self.distill[rows][:, : self.num_target_layers]), torch.long)
        else:
            targets = tokens[:, : self.num_target_layers]
        batch = {"hidden": hidden, "tokens": tokens, "targets": targets, "actions": actions,
                 "index": torch.from_numpy(rows)}
        if self.soft is not None:
            batch["soft_targets"] = _convert(np.ascontiguousarray(self.soft[rows][:, : self.num_target_layers]),
                                             torch.float32)
        return batch

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.__getitems__([i])
        return {k: v[0] for k, v in batch.items()}


def _convert(arr: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    """``arr`` -> tensor of ``dtype``, converted in chunks below torch's parallel grain size (32768).

    One big ``.float()`` / ``.long()`` is split over the intra-op thread pool, which on a small shared
    CPU waits for busy threads (8 ms for a 512 x 4096 batch on 2 loaded cores vs ~1 ms in chunks).
    """
    src = torch.from_numpy(arr)
    if src.dtype == dtype:
        return src
    out = torch.empty(src.shape, dtype=dtype)
    row = max(1, int(np.prod(src.shape[1:])))
    step = max(1, 32768 // row)
    for i in range(0, src.shape[0], step):
        out[i:i + step].copy_(src[i:i + step])
    return out


def _identity_collate(batch: Any) -> Any:
    return batch


class FeatureCacheDataModule(L.LightningDataModule):
    """Train/val batches from ``cache_dir`` (split by episode, as recorded in ``split.npy``)."""

    def __init__(self, cache_dir: str, batch_size: int = 512, val_batch_size: int | None = None,
                 num_workers: int = 0, targets: str = "ground_truth", distill_tokens: str | None = None,
                 distill_probs: str | None = None,
                 num_target_layers: int = 3, tokenizer_path: str | None = None,
                 tokenizer_identity: str | None = None, backbone: Mapping[str, Any] | None = None,
                 suite: str | None = None, pin_memory: bool = False, max_train_frames: int | None = None) -> None:
        super().__init__()
        if targets not in TARGETS:
            raise ValueError(f"targets must be one of {TARGETS}, got {targets!r}")
        self.cache_dir = _resolve(cache_dir)
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.targets = targets
        self.distill_tokens = distill_tokens
        self.distill_probs = distill_probs
        self.num_target_layers = num_target_layers
        self.tokenizer_path = tokenizer_path
        self.tokenizer_identity = tokenizer_identity
        self.backbone_cfg = _plain(backbone) if backbone else None
        self.suite = suite
        self.pin_memory = pin_memory
        self.max_train_frames = max_train_frames
        self.distill_source: dict[str, Any] | None = None
        self.manifest: dict[str, Any] | None = None
        self.arrays: dict[str, np.ndarray] | None = None
        self.train_set: CacheDataset | None = None
        self.val_set: CacheDataset | None = None

    # ------------------------------------------------------------------ building / checking
    def prepare_data(self) -> None:
        """Check that the cache exists (the pipeline, ``rsd.prepare``, builds it before fitting)."""
        if cache_complete(self.cache_dir):
            return
        raise CacheError(f"no feature cache at {self.cache_dir}. `python train.py experiment=draft_proj` builds it "
                         "(its pipeline, conf/prepare), or build it alone with `python -m rsd.prepare "
                         "prepare.until=cache`.")

    def _expected_tokenizer(self) -> str | None:
        if self.tokenizer_identity:
            return self.tokenizer_identity
        if not self.tokenizer_path:
            return None
        path = _resolve(self.tokenizer_path)
        if not path.is_file():
            log.warning("tokenizer %s not found: cannot check the cache's tokenizer identity", path)
            return None

        return RFSQTokenizer.load(path).identity()

    def setup(self, stage: str | None = None) -> None:
        if self.arrays is not None:
            return
        if not cache_complete(self.cache_dir):
            raise CacheError(f"no complete feature cache at {self.cache_dir} (manifest.json and the .npy files). "
                             "Build it with `python -m rsd.prepare prepare.until=cache`.")
        manifest, arrays = open_cache(self.cache_dir)
        bb = self.backbone_cfg or {}
        if bb.get("name") and bb["name"] != manifest["backbone"]["name"]:
            raise CacheMismatchError(f"feature cache {self.cache_dir} holds backbone {manifest['backbone']['name']}"
                                     f", the run asks for {bb['name']}: use the matching data.cache_dir")
        check_identity(manifest, self.cache_dir, suite=self.suite, tokenizer=self._expected_tokenizer(),
                       hidden_dim=bb.get("hidden_dim"),
                       backbone_id=requested_backbone_id(bb) if bb.get("name") else None)
        split = np.asarray(arrays["split"])
        train_idx, val_idx = np.nonzero(split == 0)[0], np.nonzero(split == 1)[0]
        if not len(train_idx) or not len(val_idx):
            raise CacheError(f"feature cache {self.cache_dir} has {len(train_idx)} train / {len(val_idx)} val "
                             "frames; both splits are needed")
        if self.max_train_frames:
            train_idx = train_idx[: int(self.max_train_frames)]
        distill = soft = None
        if self.targets in ("distill", "distill_soft"):
            path = Path(self.distill_tokens) if self.distill_tokens else self.cache_dir / "distill_tokens.npy"
            path = _resolve(path)
            if not path.is_file():
                raise CacheError(
                    f"targets=distill needs the main model's greedy tokens in {path} ([N, >=3, 128] uint8, one "
                    "row per cache frame); it is missing. Write it with `python -m rsd.prepare.distill --main "
                    f"logs/main_head/runs/<time>/main_decoder.pt --cache-dir {self.cache_dir}` or use "
                    "data.targets=ground_truth.")
            distill = np.load(path, mmap_mode="r")
            n = manifest["num_frames"]
            if distill.ndim != 3 or distill.shape[0] != n or distill.shape[1] < self.num_target_layers \
                    or distill.shape[2] != arrays["tokens"].shape[2]:
                raise CacheError(f"{path} has shape {distill.shape}, expected [{n}, >={self.num_target_layers}, "
                                 f"{arrays['tokens'].shape[2]}]: it was made for another cache")
            sidecar = path.with_suffix(".json")
            self.distill_source = json.loads(sidecar.read_text()).get("main") if sidecar.is_file() else None
            log.info("distillation targets %s from main model %s", path, self.distill_source or "(not recorded)")
        if self.targets == "distill_soft":
            soft = self._open_soft_targets(manifest, arrays)
        self.manifest, self.arrays = manifest, arrays
        self.train_set = CacheDataset(arrays, train_idx, self.num_target_layers, distill, soft)
        self.val_set = CacheDataset(arrays, val_idx, self.num_target_layers, distill, soft)
        log.info("feature cache %s: %d train / %d val frames, backbone %s, tokenizer %s", self.cache_dir,
                 len(train_idx), len(val_idx), manifest["backbone"]["id"], manifest["tokenizer"]["identity"])

    def _open_soft_targets(self, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        """Memory-map ``distill_probs.npy`` after checking it (and its sidecar) against this cache and against
        the greedy tokens' main model; sets ``distill_source`` to the main model it records."""
        path = _resolve(Path(self.distill_probs) if self.distill_probs else self.cache_dir / "distill_probs.npy")
        write = (f"`python -m rsd.prepare.distill --soft --main logs/main_head/runs/<time>/main_decoder.pt "
                 f"--cache-dir {self.cache_dir}`")
        if not path.is_file():
            raise CacheError(f"targets=distill_soft needs the main model's coarse-layer distributions in {path} "
                             f"(float16 [N, {self.num_target_layers}, 128, 7]); it is missing. Write it with {write} "
                             "or use data.targets=distill / ground_truth.")
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            raise CacheError(f"{sidecar} is missing: without it nothing says which main model {path} imitates or "
                             f"which cache it was made for. Rewrite both with {write}.")
        try:
            info = json.loads(sidecar.read_text())
        except json.JSONDecodeError as err:
            raise CacheError(f"{sidecar} is corrupt ({err}); rewrite it with {write}") from err
        soft = np.load(path, mmap_mode="r")
        n, p = int(manifest["num_frames"]), int(arrays["tokens"].shape[2])
        if soft.ndim != 4 or soft.shape[0] != n or soft.shape[1] < self.num_target_layers or soft.shape[2] != p \
                or soft.shape[3] != NUM_LEVELS or int(info.get("num_frames", -1)) != n:
            raise CacheError(f"{path} has shape {soft.shape} (sidecar: {info.get('num_frames')} frames), expected "
                             f"[{n}, >={self.num_target_layers}, {p}, {NUM_LEVELS}]: it was made for another cache; "
                             f"rewrite it with {write}")
        made_for = info.get("cache") or {}
        for key, have in (("backbone_id", manifest["backbone"]["id"]), ("tokenizer", manifest["tokenizer"]["identity"]),
                          ("created", manifest.get("created"))):
            if made_for.get(key) is not None and have is not None and made_for[key] != have:
                raise CacheError(f"{path} was made for a cache with {key}={made_for[key]!r}, this one has {have!r}; "
                                 f"rewrite it with {write}")
        main = info.get("main") or {}
        if not main:
            raise CacheError(f"{sidecar} does not name the main model; rewrite it with {write}")
        greedy_sha = (self.distill_source or {}).get("sha256")
        if greedy_sha and main.get("sha256") and greedy_sha != main["sha256"]:
            raise CacheError(f"the greedy tokens come from main model {self.distill_source}, {path} from {main}: "
                             f"targets and soft targets must come from one main model; rewrite both with {write}")
        self.distill_source = main
        log.info("soft distillation targets %s from main model %s", path, main)
        return soft

    # ------------------------------------------------------------------ info for the model / export
    @property
    def hidden_dim(self) -> int:
        if self.manifest is None:
            self.setup()
        return int(self.manifest["backbone"]["hidden_dim"])  # type: ignore[index]

    def cache_identity(self) -> dict[str, Any]:
        """What a draft checkpoint records about the data it was trained on."""
        if self.manifest is None:
            self.setup()
        m = self.manifest or {}
        return {"backbone_id": m["backbone"]["id"], "backbone_name": m["backbone"]["name"],
                "hidden_dim": int(m["backbone"]["hidden_dim"]), "tokenizer": m["tokenizer"]["identity"],
                "suite": m["suite"], "cache_dir": str(self.cache_dir), "num_frames": m["num_frames"],
                "targets": self.targets, "distill_source": self.distill_source, "backbone_config": m["backbone"].get("config"),
                "feature_definition": m["backbone"].get("feature_definition"), "created": m.get("created"),
                # identity by content (rsd.utils.artifacts): a cache rebuilt at the same path is another cache
                "content_hash": (read_artifact(self.cache_dir) or {}).get("content_hash"),
                "distill": (artifact_ref(Path(self.distill_probs or self.distill_tokens).parent)
                            if self.targets != "ground_truth" and (self.distill_probs or self.distill_tokens)
                            else None)}

    # ------------------------------------------------------------------ loaders
    def _loader(self, dataset: CacheDataset | None, shuffle: bool, batch_size: int) -> DataLoader:
        if dataset is None:
            self.setup()
            return self._loader(self.train_set if shuffle else self.val_set, shuffle, batch_size)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers,
                          collate_fn=_identity_collate, pin_memory=self.pin_memory, drop_last=False,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
