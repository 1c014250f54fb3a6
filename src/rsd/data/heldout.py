"""Which initial scenes a model was trained from, so an evaluation can prove its init states are held out.

LIBERO evaluations start trial i of a task from the task's fixed (official) init state i. Demonstrations
start from other scenes (``rsd.data.collect``, ``init_source=generated``); every demo file records its start
scene and the feature cache keeps them (``start_states.npy`` plus per-episode ``init_source`` /
``init_state_index`` / ``scene_seed`` in the manifest). :func:`overlaps` compares an evaluation's (task, trial)
list with the scenes of every training artifact (caches and demo sets, named by content hash): an official
index recorded by a demo, or a recorded scene that is the same scene as the official state, is an overlap.

Same scene (:func:`scene_gaps`): a scene is a flattened MuJoCo state ``[time, qpos, qvel]``. Two scenes are
compared on the dimensions where the task's 50 official states differ from one another (robot joint noise
and object placements; the rest is the same in every official state and says nothing), by the
:data:`SAME_SCENE_QUANTILE` quantile of the per-dimension absolute gaps. A robust statistic, because a state
recorded after the protocol's 10 warm-up no-ops from official state i differs from it by up to ~1e-2 in
some dimensions (the arm moves, objects settle) while most placement coordinates stay within ~1e-5; a new
scene, or another official state, differs by >= ~2.5e-4 in all but one or two of them (measured on
libero_spatial tasks 1, 5 and libero_object task 3; ``tests/data/test_heldout.py`` checks it in the simulator).
A single max-abs threshold catches only exact restores. Against training scenes, the dimensions are narrowed to
those in which the training scenes vary too (:func:`comparison_dims`): generated scenes share the robot's rest
joints exactly, which made every generated evaluation scene "the same" as every generated training scene.
Dimensions that repeat another one in every scene (stacked objects) count once (:func:`distinct_dims`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.libero_hdf5 import read_demo_file
from rsd.envs.libero_env import get_init_states

#: Quantile of the per-dimension gaps (over the informative dimensions) that decides "same scene".
SAME_SCENE_QUANTILE = 0.25
#: Scenes whose gap quantile is below this are the same scene (warm-up of official state i: <= ~4e-5;
#: new scenes and other official states: >= ~2.5e-4).
SAME_SCENE_TOL = 1e-4

START_STATES_FILE = "start_states.npy"


class TrainStatesError(RuntimeError):
    """An evaluation would report success on init states its models were trained from."""


def informative_dims(official: np.ndarray) -> np.ndarray:
    """Indices (time excluded) of the dimensions in which a task's official states ``[N, S]`` differ."""
    official = np.asarray(official, dtype=np.float64)
    spread = official[:, 1:].max(axis=0) - official[:, 1:].min(axis=0)
    return np.nonzero(spread > 1e-9)[0] + 1


def comparison_dims(official: np.ndarray, training: np.ndarray) -> np.ndarray:
    """The dimensions two scenes are compared on: where the task's official states differ, narrowed to those in
    which the training scenes differ among themselves too (when at least 3 do). Scenes drawn by ``env.reset()``
    all share the robot's rest joints (the official states add joint noise), so on those dimensions any two
    generated scenes agree exactly; counting them would call every generated scene the same as every other."""
    official = np.asarray(official, dtype=np.float64)
    dims = informative_dims(official)
    training = np.atleast_2d(np.asarray(training, dtype=np.float64))
    scenes = official
    if len(training) > 1 and training.shape[1] == official.shape[1]:
        varies = training[:, dims].max(axis=0) - training[:, dims].min(axis=0) > 1e-9
        if varies.sum() >= 3:
            dims, scenes = dims[varies], np.concatenate([official, training])
    return distinct_dims(scenes, dims)


def distinct_dims(scenes: np.ndarray, dims: np.ndarray) -> np.ndarray:
    """``dims`` without those that move in lockstep with an earlier one in every scene (an object placed on
    another, e.g. a bowl on a ramekin, repeats its x and y): counted twice, one object landing near its
    place in another scene would pass for half of the scene being the same."""
    values = np.asarray(scenes, dtype=np.float64)[:, dims]
    keep: list[int] = []
    for j in range(len(dims)):
        if not any(np.ptp(values[:, j] - values[:, k]) < 1e-9 for k in keep):
            keep.append(j)
    return np.asarray(dims)[keep]


def scene_gaps(scene: np.ndarray, others: np.ndarray, dims: np.ndarray | None = None) -> np.ndarray:
    """The :data:`SAME_SCENE_QUANTILE` quantile of ``|scene - other|`` over ``dims`` (default: every dimension but
    time) for each row of ``others`` ``[N, S]``. A scene of another length is refused (another task or model)."""
    scene = np.asarray(scene, dtype=np.float64).reshape(-1)
    others = np.atleast_2d(np.asarray(others, dtype=np.float64))
    if others.shape[1] != scene.shape[0]:
        raise ValueError(f"a scene of {scene.shape[0]} values cannot be compared with states of {others.shape[1]} "
                         "(another task, robot or simulator version)")
    dims = np.arange(1, scene.shape[0]) if dims is None or not len(dims) else np.asarray(dims)
    return np.quantile(np.abs(others[:, dims] - scene[None, dims]), SAME_SCENE_QUANTILE, axis=1)


def nearest_scene(scene: np.ndarray, official: np.ndarray) -> tuple[int, float]:
    """Index of the official state nearest to ``scene`` and its gap (see :func:`scene_gaps`)."""
    official = np.atleast_2d(official)
    d = scene_gaps(scene, official, informative_dims(official) if len(official) > 1 else None)
    i = int(np.argmin(d))
    return i, float(d[i])


def episode_origin(ep) -> dict[str, Any]:
    """Where a demo episode started: ``init_source`` (generated | official | unknown), ``init_state_index``,
    ``scene_seed`` and ``scene`` (its start scene)."""
    attrs = ep.attrs or {}
    source = attrs.get("rsd_init_source")
    if source is None:  # files written before the option were recorded from the official states
        source = "official" if ep.init_state_index is not None else "unknown"
    scene = attrs.get("rsd_scene_state")
    return {"init_source": str(source),
            "init_state_index": ep.init_state_index,
            "scene_seed": None if attrs.get("rsd_scene_seed") is None else int(attrs["rsd_scene_seed"]),
            "scene": np.asarray(ep.init_state if scene is None else scene, dtype=np.float64)}


@dataclass
class TrainingScenes:
    """The start scenes of one training artifact's episodes, by task."""

    source: str  # what they come from (path)
    task_ids: np.ndarray  # [E]
    official_index: np.ndarray  # [E], -1 where the episode did not start from an official state
    states: np.ndarray | None  # [E, S] start scenes, None for caches built before they were recorded
    sources: list[str]

    def overlaps(self, task_id: int, trial: int, official: np.ndarray, scene: np.ndarray | None = None
                 ) -> str | None:
        """Why (task_id, trial) is not held out from these scenes (``official``: the task's states), or None.
        ``scene``: the trial's start scene when it is not official state ``trial`` (a generated scene)."""
        mine = self.task_ids == task_id
        what = f"official init state {trial}" if scene is None else f"evaluation scene {trial}"
        if scene is None and np.any(mine & (self.official_index == trial)):
            return f"a training demo of task {task_id} started from official init state {trial}"
        if self.states is not None and mine.any():
            start = official[trial] if scene is None else scene
            gap = scene_gaps(start, self.states[mine], comparison_dims(official, self.states[mine])).min()
            if gap < SAME_SCENE_TOL:
                return (f"a training demo of task {task_id} started from {what} (gap "
                        f"{gap:.1e}, the {SAME_SCENE_QUANTILE:.0%} quantile over the placement dimensions)")
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
        source=str(cache_dir),
        task_ids=np.array([int(e["task_id"]) for e in episodes], dtype=np.int64),
        official_index=np.array([-1 if e.get("init_state_index") is None else int(e["init_state_index"])
                                 for e in episodes], dtype=np.int64),
        states=states,
        sources=[str(e.get("init_source", "unknown")) for e in episodes],
    )


def demo_scenes(demos_dir: str | os.PathLike) -> TrainingScenes:
    """The start scenes recorded in a folder of LIBERO demo files (``*_demo.hdf5``; the task from the file's
    ``rsd_task_id`` / ``task_id`` attribute: a file without one cannot be matched and is refused)."""
    task_ids, index, states, sources = [], [], [], []
    for path in sorted(Path(demos_dir).glob("*_demo.hdf5")):
        demo_file = read_demo_file(path, load_images=False)
        task_id = demo_file.attrs.get("rsd_task_id", demo_file.attrs.get("task_id"))
        if task_id is None:
            raise ValueError(f"{path} does not record its task id (rsd_task_id): its scenes cannot be matched")
        for ep in demo_file.episodes:
            origin = episode_origin(ep)
            task_ids.append(int(task_id))
            index.append(-1 if origin["init_state_index"] is None else int(origin["init_state_index"]))
            states.append(origin["scene"])
            sources.append(origin["init_source"])
    return TrainingScenes(source=str(demos_dir), task_ids=np.array(task_ids, dtype=np.int64),
                          official_index=np.array(index, dtype=np.int64),
                          states=np.stack(states) if states else None, sources=sources)


def overlaps(suite: str, pairs: Iterable[tuple[int, int]], training: Iterable[Mapping[str, Any]],
             eval_scenes: Mapping[int, np.ndarray] | None = None) -> tuple[list[dict[str, Any]], list[str]]:
    """``(overlapping, unknown)``: evaluation (task, trial) pairs that a training artifact started from, and
    artifacts that cannot tell. ``training``: refs ``{"kind": "cache" | "demos", "path", "content_hash"}`` whose
    content was already checked against the hash (``rsd.policies.lineage``). ``eval_scenes``: the evaluation's start
    scenes by task (``[trials, S]``) when they are generated rather than the official init states."""
    scenes, unknown = [], []
    for ref in {r["content_hash"]: r for r in training}.values():
        path = Path(ref["path"])
        try:
            s = training_scenes(path) if ref["kind"] == "cache" else demo_scenes(path)
        except (OSError, ValueError, KeyError) as err:
            unknown.append(f"{ref['kind']} {path} ({err})")
            continue
        if "unknown" in s.sources:  # e.g. LIBERO's own files: their first state is not a scene we can match
            n = s.sources.count("unknown")
            unknown.append(f"{ref['kind']} {path} ({n} episode(s) record no start scene origin" +
                           (", built before start scenes were recorded)" if s.states is None else ")"))
        scenes.append(s)
    found: list[dict[str, Any]] = []
    official: dict[int, np.ndarray] = {}
    for task_id, trial in pairs:
        if task_id not in official:
            official[task_id] = get_init_states(suite, task_id)
        for s in scenes:
            why = s.overlaps(task_id, trial, official[task_id],
                             None if eval_scenes is None else eval_scenes[task_id][trial])
            if why:
                found.append({"task_id": int(task_id), "trial": int(trial), "source": s.source, "reason": why})
                break
    return found, unknown
