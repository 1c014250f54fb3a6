"""The feature cache: backbone hidden states + RFSQ tokens of every demo frame, memory-mapped on disk.

Layout of ``data/cache/{backbone}_{suite}/`` (one row per demo frame, episodes contiguous)::

    hidden.npy    float16 | float32 [N, D]   backbone hidden state of the frame's observation
    tokens.npy    uint8 [N, 8, 128]          RFSQ codes of the 8-step action chunk starting at the frame
                                             (layers view: [layer, p = t * 16 + d], rsd.tokenizer.layout)
    actions.npy   float32 [N, 8, 7]          that action chunk (rsd.data.chunks.action_chunks, raw units)
    episode.npy   int32 [N]                  episode index (manifest["episodes"][i])
    task.npy      int16 [N]                  LIBERO task id
    frame.npy     int32 [N]                  step within the episode
    split.npy     uint8 [N]                  0 train / 1 val, by episode (rsd.data.splits.is_validation_episode)
    start_states.npy float64 [E, S]          the scene each episode started from (rsd.data.heldout)
    manifest.json                            identity (backbone, tokenizer, suite), feature definition and
                                             transform parameters, tasks, episodes, normalization stats

Observations are restored from the demos' stored MuJoCo ``states`` with one env per task (physics only
unless the backbone needs images): ``env.regenerate_obs_from_state(state)``. A cache is written into a
temporary folder and renamed when complete, so an interrupted build never looks finished. A cache folder
holds one backbone and one tokenizer: building into a folder whose manifest differs raises
``CacheMismatchError``.

The pipeline builds it (``rsd.prepare``, step ``cache``; alone: ``python -m rsd.prepare prepare.until=cache``).
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd import PROJECT_ROOT
from rsd.data.action_chunks import demo_files, task_ids_for_files
from rsd.data.chunks import action_chunks
from rsd.data.heldout import START_STATES_FILE, episode_origin, write_start_states
from rsd.data.libero_hdf5 import DemoSchemaError, read_demo_file
from rsd.data.splits import is_validation_episode
from rsd.envs.libero_env import get_task, make_env
from rsd.models.backbones import Backbone
from rsd.models.backbones.sim_state import describe_task
from rsd.tokenizer.layout import codes_to_layers
from rsd.tokenizer.rfsq import RFSQTokenizer
from rsd.utils.artifacts import file_sha256
from rsd.utils.json_safe import json_default
from rsd.utils.progress import progress_bar

log = logging.getLogger(__name__)

CACHE_FORMAT = "rsd.feature_cache"
CACHE_VERSION = 1
MANIFEST = "manifest.json"
#: array name -> (dtype or None for "float16|float32", trailing shape or None for "[N, D]")
ARRAYS: dict[str, tuple[str | None, tuple[int, ...] | None]] = {
    "hidden": (None, None),
    "tokens": ("uint8", (8, 128)),
    "actions": ("float32", (8, 7)),
    "episode": ("int32", ()),
    "task": ("int16", ()),
    "frame": ("int32", ()),
    "split": ("uint8", ()),
}
REQUIRED_ARRAYS = ("hidden", "tokens", "actions", "episode", "task", "split")


class CacheError(RuntimeError):
    """A feature cache is missing, incomplete or corrupt (the message says what to do)."""


class CacheMismatchError(CacheError):
    """A cache was built with another backbone, tokenizer or suite than the one requested."""


# ---------------------------------------------------------------------------------------------- identity
def cache_identity(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The fields two caches must share to be mixed or reused: backbone, hidden dim, tokenizer, suite."""
    return {
        "format_version": manifest.get("version"),
        "backbone_id": (manifest.get("backbone") or {}).get("id"),
        "hidden_dim": (manifest.get("backbone") or {}).get("hidden_dim"),
        "tokenizer": (manifest.get("tokenizer") or {}).get("identity"),
        "suite": manifest.get("suite"),
    }


def _identity_diff(have: Mapping[str, Any], want: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    return {k: (have.get(k), v) for k, v in want.items() if v is not None and have.get(k) != v}


def check_identity(manifest: Mapping[str, Any], cache_dir: str | os.PathLike, *, backbone_id: str | None = None,
                   hidden_dim: int | None = None, tokenizer: str | None = None, suite: str | None = None) -> None:
    """Raise ``CacheMismatchError`` when the manifest's identity differs from what is asked for."""
    want = {"backbone_id": backbone_id, "hidden_dim": hidden_dim, "tokenizer": tokenizer, "suite": suite}
    diff = _identity_diff(cache_identity(manifest), want)
    if diff:
        detail = "; ".join(f"{k}: cache has {a!r}, requested {b!r}" for k, (a, b) in diff.items())
        raise CacheMismatchError(
            f"feature cache {cache_dir} does not match ({detail}). A cache holds one backbone and one tokenizer "
            f"and caches are never mixed: use another cache_dir, or delete {cache_dir} to rebuild it.")


# ---------------------------------------------------------------------------------------------- read/write
def write_cache(cache_dir: str | os.PathLike, hidden: np.ndarray, tokens: np.ndarray, actions: np.ndarray,
                episode: np.ndarray, task: np.ndarray, split: np.ndarray, manifest: Mapping[str, Any],
                frame: np.ndarray | None = None, overwrite: bool = False) -> Path:
    """Write a complete cache from in-memory arrays (small caches, tests); fills the manifest's array info.

    ``tokens`` may be codes ``[N, 8, 16, 8]`` or the layers view ``[N, 8, 128]``. The folder is written
    atomically; an existing folder with a different identity raises ``CacheMismatchError``.
    """
    cache_dir = Path(cache_dir)
    tokens = np.asarray(tokens)
    if tokens.ndim == 4:
        tokens = tokens.transpose(0, 3, 1, 2).reshape(tokens.shape[0], tokens.shape[3], -1)
    n = int(np.asarray(hidden).shape[0])
    if frame is None:
        frame = np.zeros(n, dtype=np.int32)
        ep = np.asarray(episode)
        for e in np.unique(ep):
            idx = np.nonzero(ep == e)[0]
            frame[idx] = np.arange(idx.shape[0])
    hidden = np.asarray(hidden)
    arrays = {
        "hidden": hidden if hidden.dtype in (np.float16, np.float32) else hidden.astype(np.float32),
        "tokens": tokens.astype(np.uint8), "actions": np.asarray(actions, dtype=np.float32),
        "episode": np.asarray(episode, dtype=np.int32), "task": np.asarray(task, dtype=np.int16),
        "frame": np.asarray(frame, dtype=np.int32), "split": np.asarray(split, dtype=np.uint8),
    }
    with _atomic_dir(cache_dir, dict(manifest), overwrite) as tmp:
        for name, arr in arrays.items():
            np.save(tmp / f"{name}.npy", arr)
        _write_manifest(tmp, manifest, arrays)
    return cache_dir


def _write_manifest(folder: Path, manifest: Mapping[str, Any], arrays: Mapping[str, np.ndarray]) -> dict:
    out = dict(manifest)
    out.setdefault("format", CACHE_FORMAT)
    out.setdefault("version", CACHE_VERSION)
    out.setdefault("created", _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"))
    out["num_frames"] = int(arrays["hidden"].shape[0])
    out["arrays"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in arrays.items()}
    split = np.asarray(arrays["split"])
    out["num_train_frames"] = int((split == 0).sum())
    out["num_val_frames"] = int((split == 1).sum())
    episode = np.asarray(arrays["episode"])
    out["num_episodes"] = int(np.unique(episode).shape[0])
    out["num_val_episodes"] = int(np.unique(episode[split == 1]).shape[0])
    out["num_train_episodes"] = out["num_episodes"] - out["num_val_episodes"]
    (folder / MANIFEST).write_text(json.dumps(out, indent=1, default=json_default))
    return out


@contextlib.contextmanager
def _atomic_dir(cache_dir: Path, manifest: Mapping[str, Any], overwrite: bool) -> Iterator[Path]:
    """Yield a temporary sibling folder; rename it to ``cache_dir`` when the block succeeds."""
    if cache_dir.exists():
        if (cache_dir / MANIFEST).is_file() and not overwrite:
            check_identity(read_manifest(cache_dir), cache_dir, **{
                k: v for k, v in cache_identity(manifest).items() if k != "format_version"})
            raise CacheError(f"feature cache {cache_dir} already exists (same backbone and tokenizer); "
                             "pass overwrite=True to rebuild it")
        if not overwrite and any(cache_dir.iterdir()):
            raise CacheError(f"{cache_dir} exists but is not a complete feature cache (no {MANIFEST}); "
                             "delete it or pass overwrite=True")
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir.with_name(f".{cache_dir.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if cache_dir.exists():
            shutil.rmtree(cache_dir)
        os.replace(tmp, cache_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def cache_complete(cache_dir: str | os.PathLike) -> bool:
    cache_dir = Path(cache_dir)
    return (cache_dir / MANIFEST).is_file() and all((cache_dir / f"{a}.npy").is_file() for a in REQUIRED_ARRAYS)


def read_manifest(cache_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        raise CacheError(f"no feature cache at {cache_dir} ({MANIFEST} missing). Build it with "
                         "`python -m rsd.prepare prepare.until=cache`.")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise CacheError(f"{path} is not valid JSON ({err}); the cache is corrupt: delete {cache_dir} "
                         "and rebuild it") from err
    if not isinstance(manifest, dict) or manifest.get("format") != CACHE_FORMAT:
        raise CacheError(f"{path} is not an rsd feature-cache manifest (format {manifest.get('format')!r})")
    if manifest.get("version") != CACHE_VERSION:
        raise CacheError(f"feature cache {cache_dir} has version {manifest.get('version')}, this code reads "
                         f"version {CACHE_VERSION}: rebuild it")
    return manifest


def open_cache(cache_dir: str | os.PathLike, mmap: bool = True) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """``(manifest, arrays)`` with every array memory-mapped and checked against the manifest."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    arrays: dict[str, np.ndarray] = {}
    for name in ARRAYS:
        path = cache_dir / f"{name}.npy"
        if not path.is_file():
            if name in REQUIRED_ARRAYS:
                raise CacheError(f"feature cache {cache_dir} is incomplete: {path.name} is missing; rebuild it")
            continue
        try:
            arrays[name] = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError) as err:
            raise CacheError(f"feature cache {cache_dir}: {path.name} is truncated or corrupt ({err}); "
                             "delete the folder and rebuild it") from err
    n = int(manifest.get("num_frames", -1))
    d = int((manifest.get("backbone") or {}).get("hidden_dim", -1))
    for name, arr in arrays.items():
        dtype, trailing = ARRAYS[name]
        expect = (n, d) if trailing is None else (n, *trailing)
        if tuple(arr.shape) != expect:
            raise CacheError(f"feature cache {cache_dir}: {name}.npy has shape {tuple(arr.shape)}, the manifest "
                             f"says {expect}; the cache is corrupt or was mixed: rebuild it")
        if dtype is not None and str(arr.dtype) != dtype:
            raise CacheError(f"feature cache {cache_dir}: {name}.npy has dtype {arr.dtype}, expected {dtype}")
        if dtype is None and arr.dtype not in (np.float16, np.float32):
            raise CacheError(f"feature cache {cache_dir}: hidden.npy has dtype {arr.dtype}, expected float16/32")
    return manifest, arrays


# ---------------------------------------------------------------------------------------------- building
def _read_demos(path: Path) -> list[tuple[str, np.ndarray, np.ndarray, dict[str, Any]]]:
    """``[(demo_key, states [T, S], actions [T, 7], origin)]`` of a LIBERO HDF5 file (official or generated
    schema); ``origin`` as :func:`rsd.data.heldout.episode_origin`."""
    try:
        demo_file = read_demo_file(path, load_images=False)
    except DemoSchemaError as err:
        raise CacheError(f"demo file {path} is invalid: {err}") from err
    out = []
    for ep in demo_file.episodes:
        if ep.states.ndim != 2 or ep.states.shape[0] != ep.actions.shape[0] or not ep.num_samples:
            raise CacheError(f"{path}:data/{ep.name}: states {ep.states.shape} and actions {ep.actions.shape} "
                             "must be [T, S] and [T, 7] with the same T >= 1 (the cache restores observations "
                             "from the stored MuJoCo states)")
        out.append((ep.name, ep.states, ep.actions.astype(np.float32), episode_origin(ep)))
    return out


def _tokenizer_info(tokenizer, path: Path) -> dict[str, Any]:
    return {
        "identity": tokenizer.identity(),
        "path": str(path),
        "sha256": file_sha256(path, 16),
        "config": dict(getattr(tokenizer, "config", {})),
        "action_normalizer": tokenizer.normalizer.stats() if hasattr(tokenizer, "normalizer") else None,
    }


def build_cache(suite: str, cache_dir: str | os.PathLike, tokenizer_path: str | os.PathLike,
                demos_dir: str | os.PathLike, backbone: Backbone, *, overwrite: bool = False,
                hidden_dtype: str = "float16", max_demos_per_task: int | None = None,
                val_fraction: float = 0.1, split_seed: int = 0, batch_size: int = 2048,
                progress: bool = True) -> Path:
    """Build ``cache_dir`` from the suite's demos, a built backbone (``rsd.models.backbones.backbone_from_config``;
    a fitted backbone such as ``sim_state`` is fitted here, in place) and a tokenizer file. Returns the cache
    folder. Refuses to overwrite a cache of another backbone/tokenizer.
    """
    t_start = time.time()
    cache_dir, demos_dir, tokenizer_path = Path(cache_dir), Path(demos_dir), Path(tokenizer_path)
    if hidden_dtype not in ("float16", "float32"):
        raise ValueError(f"hidden_dtype must be float16 or float32, got {hidden_dtype}")
    tokenizer = RFSQTokenizer.load(tokenizer_path)
    bb = backbone
    requested = {"backbone_id": bb.backbone_id, "hidden_dim": bb.hidden_dim,
                 "tokenizer": tokenizer.identity(), "suite": suite}
    if (cache_dir / MANIFEST).is_file():
        check_identity(read_manifest(cache_dir), cache_dir, **requested)
        if not overwrite:
            log.info("feature cache %s already built (same backbone and tokenizer)", cache_dir)
            return cache_dir
    elif cache_dir.exists() and any(cache_dir.iterdir()) and not overwrite:
        raise CacheError(f"{cache_dir} exists but is not a complete feature cache (no {MANIFEST}); delete it "
                         "or pass overwrite=True")

    files = demo_files(demos_dir, suite)
    if not files:
        raise CacheError(f"no demos in {demos_dir / suite} (*_demo.hdf5): collect them with "
                         f"`python -m rsd.data.collect suite={suite}` or run with build_missing=true")
    task_ids = task_ids_for_files(suite, files)
    fits = hasattr(bb, "raw_features") and hasattr(bb, "fit")

    # ---- pass 1: restore every frame's observation; raw features (or hidden states directly)
    feats: list[np.ndarray] = []
    actions_all, episode_all, task_all, frame_all, split_all = [], [], [], [], []
    episodes, tasks = [], []
    total_frames = 0
    for path, task_id in zip(files, task_ids, strict=True):
        demos = _read_demos(path)[:max_demos_per_task] if max_demos_per_task else _read_demos(path)
        total_frames += sum(len(d[2]) for d in demos)
        tasks.append((path, task_id, demos))
    bar = progress_bar(range(total_frames), total=total_frames, desc=f"cache {suite}: observations",
                       enabled=progress)
    bar_update = getattr(bar, "update", lambda n: None)
    task_records = []
    start_scenes: list[np.ndarray] = []
    for path, task_id, demos in tasks:
        spec = get_task(suite, task_id)
        env = make_env(spec, images=bb.needs_images)
        try:
            env.reset()
            obs0 = env.regenerate_obs_from_state(demos[0][1][0])
            objects = describe_task(env, obs0)
            if hasattr(bb, "set_task_objects"):
                bb.set_task_objects(spec.language, objects["objects"], objects["interest"])
            n_frames = 0
            for demo_key, states, actions, origin in demos:
                key = f"{suite}/{task_id}/{demo_key}"
                is_val = is_validation_episode(key, val_fraction, split_seed)
                ep_feats = []
                obs_batch = []
                for t, state in enumerate(states):
                    obs = env.regenerate_obs_from_state(state)
                    obs["timestep"] = t
                    if fits:
                        ep_feats.append(bb.raw_features(obs, spec.language))
                    else:
                        obs_batch.append(obs)
                        if len(obs_batch) == 32 or t == len(states) - 1:
                            ep_feats.append(bb.encode(obs_batch, [spec.language] * len(obs_batch))
                                            .float().cpu().numpy().astype(hidden_dtype))
                            obs_batch = []
                bar_update(len(states))
                ep_idx = len(episodes)
                feats.append(np.stack(ep_feats) if fits else np.concatenate(ep_feats))
                T = len(actions)
                actions_all.append(action_chunks(actions))
                episode_all.append(np.full(T, ep_idx, dtype=np.int32))
                task_all.append(np.full(T, task_id, dtype=np.int16))
                frame_all.append(np.arange(T, dtype=np.int32))
                split_all.append(np.full(T, int(is_val), dtype=np.uint8))
                episodes.append({"key": key, "task_id": int(task_id), "demo": demo_key, "file": path.name,
                                 "start": int(sum(len(a) for a in actions_all[:-1])), "length": int(T),
                                 "split": "val" if is_val else "train",
                                 **{k: v for k, v in origin.items() if k != "scene"}})
                start_scenes.append(origin["scene"])
                n_frames += T
            task_records.append({"task_id": int(task_id), "name": spec.name, "language": spec.language,
                                 "demo_file": path.name, "episodes": len(demos), "frames": n_frames,
                                 "objects": objects["objects"], "interest": objects["interest"]})
        finally:
            with contextlib.suppress(Exception):
                env.close()
    if hasattr(bar, "close"):
        bar.close()
    split = np.concatenate(split_all)
    if not (split == 0).any() or not (split == 1).any():
        raise CacheError(f"the episode split left {(split == 0).sum()} train / {(split == 1).sum()} val frames; "
                         "need more episodes or another val_fraction")

    # ---- statistics (training episodes only) and the transform to hidden states
    feats_all = np.concatenate(feats)
    del feats
    if fits:
        bb.fit(feats_all[split == 0])
    chunks = np.concatenate(actions_all)
    n = chunks.shape[0]
    manifest = {
        "format": CACHE_FORMAT, "version": CACHE_VERSION,
        "backbone": {"name": bb.name, "id": bb.backbone_id, "hidden_dim": bb.hidden_dim,
                     "needs_images": bb.needs_images, "feature_definition": bb.feature_definition,
                     "config": bb.config()},
        "suite": suite,
        "tasks": task_records,
        "episodes": episodes,
        "start_states": {"file": START_STATES_FILE, "definition": "per episode, the scene it started from "
                         "(flattened MuJoCo state before the warm-up steps; rsd.data.heldout)",
                         "sources": {s: sum(e["init_source"] == s for e in episodes)
                                     for s in sorted({e["init_source"] for e in episodes})}},
        "split": {"rule": "rsd.data.splits.is_validation_episode('{suite}/{task_id}/{demo}')",
                  "val_fraction": val_fraction, "seed": split_seed},
        "normalization": {
            "features": ({"mean": bb.config().get("mean"), "std": bb.config().get("std"),
                          "names": list(getattr(bb, "feature_names", []))} if fits else None),
            "actions": (tokenizer.normalizer.stats() if hasattr(tokenizer, "normalizer") else None),
        },
        "tokenizer": _tokenizer_info(tokenizer, tokenizer_path),
        "layout": {"tokens": "[N, 8 layers, 128 positions], p = t * 16 + d (rsd.tokenizer.layout)",
                   "actions": "[N, 8, 7] raw action chunk starting at the frame (hold-padded at the end)"},
        "demos_dir": str(demos_dir),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    with _atomic_dir(cache_dir, manifest, overwrite=True) as tmp:
        hidden = np.lib.format.open_memmap(tmp / "hidden.npy", mode="w+", dtype=hidden_dtype,
                                           shape=(n, bb.hidden_dim))
        tokens = np.lib.format.open_memmap(tmp / "tokens.npy", mode="w+", dtype=np.uint8, shape=(n, 8, 128))
        steps = range(0, n, batch_size)
        for i in progress_bar(steps, total=len(steps), desc=f"cache {suite}: hidden + tokens", enabled=progress):
            j = min(i + batch_size, n)
            if fits:
                hidden[i:j] = bb.transform(feats_all[i:j]).numpy().astype(hidden_dtype)
            else:
                hidden[i:j] = feats_all[i:j]
            codes = tokenizer.encode(torch.from_numpy(chunks[i:j]))
            tokens[i:j] = codes_to_layers(codes).numpy().astype(np.uint8)
        if not np.isfinite(np.asarray(hidden[: min(n, 4096)], dtype=np.float32)).all():
            raise CacheError("hidden states are not finite (float16 overflow?); use hidden_dtype=float32")
        hidden.flush()
        tokens.flush()
        small = {"actions": chunks.astype(np.float32), "episode": np.concatenate(episode_all),
                 "task": np.concatenate(task_all), "frame": np.concatenate(frame_all), "split": split}
        for name, arr in small.items():
            np.save(tmp / f"{name}.npy", arr)
        write_start_states(tmp, episodes, start_scenes)
        manifest["build_seconds"] = round(time.time() - t_start, 1)
        _write_manifest(tmp, manifest, {"hidden": hidden, "tokens": tokens, **small})
        del hidden, tokens
    log.info("feature cache %s: %d frames, %d episodes (%.0f s)", cache_dir, n, len(episodes),
             time.time() - t_start)
    return cache_dir


# ---------------------------------------------------------------------------------------------- defaults
def _plain(cfg: Any) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return {k: (_plain(v) if isinstance(v, Mapping) else v) for k, v in dict(cfg).items()}


def _resolve(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path if path.is_absolute() else PROJECT_ROOT / path
