"""Which initial scenes a model was trained from, so an evaluation can prove its init states are held out.

LIBERO evaluations start trial i of a task from the task's fixed (official) init state i. Demonstrations
start from other scenes (``rsd.data.collect``, ``init_source=generated``), and the feature cache records
every episode's start scene (``start_states.npy`` plus per-episode ``init_source`` / ``init_state_index``
/ ``scene_seed`` in the manifest). :func:`overlaps` compares an evaluation's (task, trial) list with those
records: an official index recorded by a demo, or a recorded scene within :data:`SAME_SCENE_TOL` of the
official state, is an overlap.

A scene is a flattened MuJoCo state ``[time, qpos, qvel]``; two scenes are compared on everything but
the time (the max absolute difference, in metres / radians / their rates).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

#: Scenes closer than this (max |difference| over qpos and qvel) count as the same scene. Resampled
#: LIBERO placements differ by centimetres; the same state restored differs by float rounding only.
SAME_SCENE_TOL = 1e-3

START_STATES_FILE = "start_states.npy"


class TrainStatesError(RuntimeError):
    """An evaluation would report success on init states its models were trained from."""


def scene_distances(scene: np.ndarray, others: np.ndarray) -> np.ndarray:
    """Max absolute difference between ``scene`` ``[S]`` and each row of ``others`` ``[N, S]`` (time ignored)."""
    scene = np.asarray(scene, dtype=np.float64).reshape(-1)
    others = np.asarray(others, dtype=np.float64).reshape(-1, scene.shape[0])
    return np.abs(others[:, 1:] - scene[None, 1:]).max(axis=1)


def nearest_scene(scene: np.ndarray, others: np.ndarray) -> tuple[int, float]:
    """Index of the row of ``others`` nearest to ``scene`` and its distance (see :func:`scene_distances`)."""
    d = scene_distances(scene, others)
    i = int(np.argmin(d))
    return i, float(d[i])


@dataclass
class TrainingScenes:
    """The start scenes of one cache's episodes, by task."""

    cache_dir: str
    task_ids: np.ndarray  # [E]
    official_index: np.ndarray  # [E], -1 where the episode did not start from an official state
    states: np.ndarray | None  # [E, S] start scenes, None for caches built before they were recorded
    sources: list[str]

    def overlaps(self, task_id: int, trial: int, official_state: np.ndarray) -> str | None:
        """Why (task_id, trial) is not held out from these scenes, or None when it is."""
        mine = self.task_ids == task_id
        if np.any(mine & (self.official_index == trial)):
            return f"a training demo of task {task_id} started from official init state {trial}"
        if self.states is not None and mine.any():
            d = scene_distances(official_state, self.states[mine]).min()
            if d < SAME_SCENE_TOL:
                return f"a training demo of task {task_id} started {d:.1e} from official init state {trial}"
        return None


def write_start_states(folder: Path, episodes: Sequence[Mapping[str, Any]], states: Sequence[np.ndarray]) -> Path:
    """Save the episodes' start scenes next to a cache's arrays (called while the cache is built)."""
    path = Path(folder) / START_STATES_FILE
    np.save(path, np.stack([np.asarray(s, dtype=np.float64) for s in states]))
    return path


def training_scenes(cache_dir: str | os.PathLike) -> TrainingScenes:
    """The start scenes recorded by a feature cache (manifest ``episodes`` + ``start_states.npy``)."""
    manifest = json.loads((Path(cache_dir) / "manifest.json").read_text())
    episodes = manifest.get("episodes") or []
    path = Path(cache_dir) / START_STATES_FILE
    states = np.load(path) if path.is_file() else None
    return TrainingScenes(
        cache_dir=str(cache_dir),
        task_ids=np.array([int(e["task_id"]) for e in episodes], dtype=np.int64),
        official_index=np.array([-1 if e.get("init_state_index") is None else int(e["init_state_index"])
                                 for e in episodes], dtype=np.int64),
        states=states,
        sources=[str(e.get("init_source", "unknown")) for e in episodes],
    )


def overlaps(suite: str, pairs: Iterable[tuple[int, int]], cache_dirs: Iterable[str | os.PathLike]
             ) -> tuple[list[dict[str, Any]], list[str]]:
    """``(overlapping, unknown)``: evaluation (task, trial) pairs that a training cache started from, and
    caches that cannot tell (built before start scenes were recorded, or missing)."""
    from rsd.envs.libero_env import get_init_states

    scenes, unknown = [], []
    for cache_dir in dict.fromkeys(str(c) for c in cache_dirs if c):
        if not (Path(cache_dir) / "manifest.json").is_file():
            unknown.append(f"{cache_dir} (no manifest)")
            continue
        s = training_scenes(cache_dir)
        if "unknown" in s.sources:  # e.g. LIBERO's own files: their first state is not a scene we can match
            n = s.sources.count("unknown")
            unknown.append(f"{cache_dir} ({n} episode(s) record no start scene origin" +
                           (", built before start scenes were recorded)" if s.states is None else ")"))
        scenes.append(s)
    found: list[dict[str, Any]] = []
    init_cache: dict[int, np.ndarray] = {}
    for task_id, trial in pairs:
        if task_id not in init_cache:
            init_cache[task_id] = get_init_states(suite, task_id)
        for s in scenes:
            why = s.overlaps(task_id, trial, init_cache[task_id][trial])
            if why:
                found.append({"task_id": int(task_id), "trial": int(trial), "cache": s.cache_dir, "reason": why})
                break
    return found, unknown
