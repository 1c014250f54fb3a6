"""Where episodes start: generated selection scenes (drawn once, shared by workers and later runs) and the
held-out check of the start states against the policy's training data."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.heldout import SAME_SCENE_TOL, TrainStatesError, nearest_scene, overlaps
from rsd.envs.libero_env import (
    generate_scenes,
    get_init_states,
    get_task,
)
from rsd.utils.progress import progress_bar

log = logging.getLogger(__name__)

SCENES_FILE = "init_states.npz"  # init_source=generated: the scenes every worker reads (task_<id>: [N, S], seed_base)


def check_held_out(suite: str, task_ids: Sequence[int], trials: Sequence[int], training: Mapping[str, Any],
                   allow_train_states: bool = False, scenes: Mapping[int, np.ndarray] | None = None) -> dict:
    """Are the evaluation's init states held out from the training data of the policy it evaluates?

    ``training``: what the policy was trained on (``rsd.policies.registry.policy_training_data``: every factory
    says): ``learned``, ``data`` (refs of caches and demo sets, checked by content hash) and ``untraceable``
    (models whose training data cannot be named). ``scenes``: the start scenes by task when they are not the
    official init states (generated). Overlapping or unverifiable states raise
    :class:`rsd.data.heldout.TrainStatesError` unless ``allow_train_states``; the verdict is returned for the
    summary's first line.
    """
    pairs = [(int(t), int(i)) for t in task_ids for i in trials]
    if not training.get("learned", True):
        return {"status": "no_training_data", "overlapping_episodes": 0, "allow_train_states": bool(allow_train_states),
                "line": f"Init states: the policy learned nothing ({training.get('reason', 'no model')})"}
    data = list(training.get("data") or [])
    found, unknown = overlaps(suite, pairs, data, scenes) if data else ([], [])
    unknown = list(training.get("untraceable") or []) + unknown
    if not data and not unknown:
        unknown = ["the policy names no training data"]
    verdict = {"training_data": data, "overlapping_episodes": len(found), "overlaps": found[:20],
               "unverifiable": unknown, "allow_train_states": bool(allow_train_states)}
    if not found and not unknown:
        return {**verdict, "status": "held_out", "line": f"Init states: held out ({len(pairs)} (task, trial) "
                f"pairs checked against the start scenes of {len(data)} training artifact(s), by content hash)"}
    what = (f"{len(found)} of {len(pairs)} evaluation init states are start scenes of the training data "
            f"(e.g. {found[0]['reason']})" if found else
            f"the training data's start scenes cannot be checked ({'; '.join(unknown)})")
    if not allow_train_states:
        raise TrainStatesError(f"refusing to report a success rate: {what}. Evaluating on states the policy "
                               "was trained from is replay, not generalization. Train with the pipeline "
                               "(`make train`: demos from new scenes, every artifact hashed), or pass "
                               "allow_train_states=true to evaluate anyway (every summary then says so).")
    return {**verdict, "status": "not_held_out" if found else "unverified",
            "line": f"WARNING: NOT A HELD-OUT EVALUATION (allow_train_states=true): {what}"}


def _read_scenes(path: Path | None, seed_base: int) -> dict[int, np.ndarray]:
    """Scenes by task from a scenes file drawn with ``seed_base`` (a file of another seed gives none)."""
    if path is None or not path.is_file():
        return {}
    with np.load(path) as f:
        if "seed_base" not in f.files or int(f["seed_base"]) != int(seed_base):
            return {}
        return {int(k.split("_")[1]): f[k] for k in f.files if k.startswith("task_")}


def _write_scenes(path: Path, scenes: Mapping[int, np.ndarray], seed_base: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.npz")
    np.savez(tmp, seed_base=np.int64(seed_base), **{f"task_{t}": v for t, v in sorted(scenes.items())})
    os.replace(tmp, path)


def load_or_generate_scenes(path: Path, suite: str, task_ids: Sequence[int], count: int, seed_base: int,
                            progress: bool = True, shared: Path | None = None) -> dict[int, np.ndarray]:
    """The generated start scenes of an evaluation (``SCENES_FILE``; drawn on the first call, read on resume).

    Drawing takes ~1-3 s a scene (LIBERO rebuilds the model at every reset), so scenes drawn once are also kept
    in ``shared`` (e.g. ``data/eval_scenes/<suite>_seed<N>.npz``) and copied from there by later evaluations
    with the same seed: the same scenes either way, since scene i depends only on (task, seed, i).
    Every scene is checked against the task's official init states: a selection set must not contain the
    states results are reported on (same-scene rule of ``rsd.data.heldout``)."""
    scenes = _read_scenes(path, seed_base)
    for t, v in _read_scenes(shared, seed_base).items():
        if len(v) > len(scenes.get(t, ())):
            scenes[t] = v
    todo = [t for t in task_ids if t not in scenes or len(scenes[t]) < count]
    if todo:
        bar = progress_bar(total=len(todo), desc="generating scenes", unit="task", enabled=progress)
        for t in todo:
            scenes[t] = generate_scenes(get_task(suite, t), count, seed_base)
            official = get_init_states(suite, t)
            for i, scene in enumerate(scenes[t]):
                j, gap = nearest_scene(scene, official)
                if gap < SAME_SCENE_TOL:
                    raise ValueError(f"generated scene {i} of task {t} (seed base {seed_base}) is official init "
                                     f"state {j} (gap {gap:.1e}); choose another scene_seed")
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if shared is not None:
            _write_scenes(shared, {**_read_scenes(shared, seed_base), **{t: scenes[t] for t in todo}}, seed_base)
    chosen = {t: scenes[t][:count] for t in task_ids}
    _write_scenes(path, chosen, seed_base)
    return chosen
