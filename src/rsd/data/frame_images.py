"""Camera images of every feature-cache frame, for main models that read images themselves (``main=vla_llm``).

The feature cache stores hidden states, not images. :func:`render_frame_images` restores every frame from
the demos' MuJoCo states (as the cache builder does) and writes ``{images_dir}/images.npy`` (uint8
``[N, H, W, 3]``, as LIBERO renders them; the backbone flips and resizes) with a small ``manifest.json``
tying it to the cache; :class:`VLAFrameDataModule` batches images, instructions and RFSQ tokens, split by
episode as the cache is.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsd.data.action_chunks import demo_files
from rsd.data.cache import _read_demos, open_cache
from rsd.envs.libero_env import get_task, make_env

IMAGES_FORMAT = "rsd.vla_frame_images"


def render_frame_images(cache_dir: str | Path, images_dir: str | Path, image_key: str = "agentview_image",
                        demos_dir: str | Path | None = None) -> Path:
    """Restore every frame of a feature cache from its demos' stored states and save the camera image.

    Frame ``i`` of ``images.npy`` is frame ``i`` of the cache (same episode order). Needs LIBERO with a
    renderer (the images are rendered, never substituted).
    """
    manifest, arrays = open_cache(cache_dir)
    n = int(manifest["num_frames"]) if "num_frames" in manifest else int(arrays["tokens"].shape[0])
    demos_dir = Path(demos_dir or manifest["demos_dir"])
    files = {p.name: p for p in demo_files(demos_dir, manifest["suite"])}
    images_dir = Path(images_dir)
    images_dir.mkdir(parents=True, exist_ok=True)
    out = None
    by_task: dict[int, list[dict]] = {}
    for ep in manifest["episodes"]:
        by_task.setdefault(int(ep["task_id"]), []).append(ep)
    for task_id, episodes in by_task.items():
        env = make_env(get_task(manifest["suite"], task_id), images=True)
        try:
            env.reset()
            for ep in episodes:
                if ep["file"] not in files:
                    raise FileNotFoundError(f"demo file {ep['file']} of the cache is not in {demos_dir}")
                states = {d[0]: d[1] for d in _read_demos(files[ep["file"]])}[ep["demo"]]
                for t in range(int(ep["length"])):
                    img = np.asarray(env.regenerate_obs_from_state(states[t])[image_key])
                    if out is None:
                        out = np.lib.format.open_memmap(images_dir / "images.tmp.npy", mode="w+", dtype=np.uint8,
                                                        shape=(n, *img.shape))
                    out[int(ep["start"]) + t] = img
        finally:
            with contextlib.suppress(Exception):
                env.close()
    if out is None:
        raise RuntimeError(f"the cache {cache_dir} has no frames")
    out.flush()
    del out
    (images_dir / "images.tmp.npy").replace(images_dir / "images.npy")
    info = {"format": IMAGES_FORMAT, "cache_dir": str(cache_dir), "cache_created": manifest.get("created"),
            "num_frames": n, "image_key": image_key, "backbone_id": manifest["backbone"]["id"]}
    (images_dir / "manifest.json").write_text(json.dumps(info, indent=2))
    return images_dir / "images.npy"


class FrameDataset(Dataset):
    """Frames ``indices`` of the cache: ``{"image": uint8 [H, W, 3], "instruction": str, "tokens": [8, 128]}``."""

    def __init__(self, images: np.ndarray, tokens: np.ndarray, instructions: list[str], indices: np.ndarray) -> None:
        self.images, self.tokens, self.instructions, self.indices = images, tokens, instructions, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        j = int(self.indices[i])
        return {"image": torch.from_numpy(np.array(self.images[j])), "instruction": self.instructions[j],
                "tokens": torch.from_numpy(np.asarray(self.tokens[j], dtype=np.int64))}


class VLAFrameDataModule(L.LightningDataModule):
    """Images + instructions + RFSQ tokens of every cached demo frame, split by episode as the cache is."""

    def __init__(self, cache_dir: str, images_dir: str | None = None, image_key: str = "agentview_image",
                 batch_size: int = 16, val_batch_size: int | None = None, num_workers: int = 0,
                 render_if_missing: bool = True, max_train_frames: int | None = None) -> None:
        super().__init__()
        self.cache_dir = Path(cache_dir)
        self.images_dir = Path(images_dir) if images_dir else self.cache_dir.with_name(self.cache_dir.name + "_images")
        self.image_key = image_key
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = int(num_workers)
        self.render_if_missing = bool(render_if_missing)
        self.max_train_frames = max_train_frames
        self.manifest: dict | None = None

    def prepare_data(self) -> None:
        if not (self.images_dir / "images.npy").is_file():
            if not self.render_if_missing:
                raise FileNotFoundError(f"no frame images in {self.images_dir}: run rsd.data.frame_images."
                                        "render_frame_images or set data.render_if_missing=true")
            render_frame_images(self.cache_dir, self.images_dir, self.image_key)

    def setup(self, stage: str | None = None) -> None:
        if self.manifest is not None:
            return
        self.prepare_data()
        manifest, arrays = open_cache(self.cache_dir)
        info = json.loads((self.images_dir / "manifest.json").read_text())
        images = np.load(self.images_dir / "images.npy", mmap_mode="r")
        n = arrays["tokens"].shape[0]
        if images.shape[0] != n or info.get("cache_created") != manifest.get("created"):
            raise ValueError(f"frame images {self.images_dir} ({images.shape[0]} frames, cache created "
                             f"{info.get('cache_created')}) do not belong to the cache {self.cache_dir} ({n} frames, "
                             f"created {manifest.get('created')}): delete them to re-render")
        language = {int(t["task_id"]): t["language"] for t in manifest["tasks"]}
        instructions = [language[int(t)] for t in np.asarray(arrays["task"])]
        split = np.asarray(arrays["split"])
        train_idx, val_idx = np.flatnonzero(split == 0), np.flatnonzero(split == 1)
        if self.max_train_frames:
            train_idx = train_idx[: int(self.max_train_frames)]
        self.train_set = FrameDataset(images, arrays["tokens"], instructions, train_idx)
        self.val_set = FrameDataset(images, arrays["tokens"], instructions, val_idx)
        self.manifest = manifest

    @property
    def hidden_dim(self) -> int:
        self.setup()
        return int(self.manifest["backbone"]["hidden_dim"])  # type: ignore[index]

    def cache_identity(self) -> dict[str, Any]:
        self.setup()
        m = self.manifest or {}
        return {"backbone_id": m["backbone"]["id"], "backbone_name": m["backbone"]["name"],
                "hidden_dim": int(m["backbone"]["hidden_dim"]), "tokenizer": m["tokenizer"]["identity"],
                "suite": m["suite"], "cache_dir": str(self.cache_dir), "images_dir": str(self.images_dir),
                "num_frames": m["num_frames"], "backbone_config": m["backbone"].get("config")}

    def _loader(self, ds: Dataset, shuffle: bool, batch_size: int) -> DataLoader:
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, True, self.batch_size)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set, False, self.val_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self.val_dataloader()
