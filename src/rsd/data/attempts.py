"""One scripted-expert attempt, run in a collection worker: its start scene, the episode, the part files.

A worker builds an env per task once and reuses it; every attempt writes ``init_XXX.json`` (and, when it
succeeded, ``init_XXX.npz``) under the task's ``.parts`` folder, so an interrupted collection resumes
(``rsd.data.collect``). A generated scene that coincides with an official init state is rejected there.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.heldout import SAME_SCENE_TOL, nearest_scene
from rsd.data.libero_hdf5 import Episode
from rsd.data.record import run_expert_episode
from rsd.envs.libero_env import get_init_states, get_task, make_env, scene_seed_for, seeded_reset

#: the worker's env (one task at a time), reused across that task's attempts
_ENV_CACHE: dict[str, Any] = {}


def worker_init() -> None:
    """One thread per worker process: the simulator workers share the machine's cores."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(var, "1")


def close_cached_env() -> None:
    env = _ENV_CACHE.pop("env", None)
    _ENV_CACHE.clear()
    if env is not None:
        try:
            env.close()
        except Exception:  # noqa: BLE001 - closing a dead env must not stop the collection
            pass


def _get_env(suite: str, task_id: int, images: bool, resolution: int):
    key = (suite, task_id, images, resolution)
    if _ENV_CACHE.get("key") != key:
        close_cached_env()
        task = get_task(suite, task_id)
        _ENV_CACHE.update(
            key=key,
            task=task,
            env=make_env(task, images=images, resolution=resolution),
            init_states=get_init_states(suite, task_id),
        )
    return _ENV_CACHE["env"], _ENV_CACHE["task"], _ENV_CACHE["init_states"]


def part_paths(parts_dir: Path, init_index: int) -> tuple[Path, Path]:
    return parts_dir / f"init_{init_index:03d}.json", parts_dir / f"init_{init_index:03d}.npz"


def _scene(env, init_states: np.ndarray, init_source: str, task_id: int, index: int, seed_base: int
           ) -> tuple[np.ndarray, dict[str, Any]]:
    """The start scene of attempt ``index`` and what to record about it (see the module docstring)."""
    if init_source == "official":
        return np.asarray(init_states[index], dtype=np.float64), {"init_source": "official",
                                                                   "official_index": int(index)}
    seed = scene_seed_for(seed_base, task_id, index)
    seeded_reset(env, seed)
    scene = env.sim.get_state().flatten().copy()
    nearest, dist = nearest_scene(scene, init_states)
    return scene, {"init_source": "generated", "scene_seed": seed, "nearest_official": nearest,
                   "official_distance": round(dist, 6)}


def run_attempt(
    suite: str, task_id: int, init_index: int, images: bool, resolution: int, parts_dir: str,
    init_source: str = "generated", seed_base: int = 100_000, action_noise: float = 0.0,
) -> dict[str, Any]:
    """Run the expert from attempt ``init_index``'s scene (in a worker); save the episode if it succeeded.

    ``init_source=official``: the task's fixed init state ``init_index``; ``generated``: a new scene from
    seed :func:`scene_seed_for`, rejected (``rejected`` set, no episode) when it coincides with an
    official init state. ``action_noise`` > 0 injects DART noise (``rsd.data.record``), seeded by the scene's
seed (``official``: by the state's index). Returns the attempt record (also written as ``init_XXX.json`` in ``parts_dir``).
    """
    parts = Path(parts_dir)
    parts.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        env, task, init_states = _get_env(suite, task_id, images, resolution)
        scene, origin = _scene(env, init_states, init_source, task_id, init_index, seed_base)
        base = {"task_id": task_id, "init_index": init_index, **origin}
        if origin.get("official_distance", np.inf) < SAME_SCENE_TOL:
            record = {**base, "success": False, "rejected": True, "num_steps": 0,
                      "seconds": round(time.perf_counter() - t0, 3), "error": None,
                      "log": [f"scene coincides with official init state {origin['nearest_official']}"]}
            part_paths(parts, init_index)[0].write_text(json.dumps(record))
            return record
        official_index = origin.get("official_index")
        # a generated scene was just reset into; resetting again would re-sample it
        noise_seed = origin.get("scene_seed", init_index)
        roll = run_expert_episode(env, task, scene, official_index, images=images,
                                  reset=init_source == "official", action_noise=action_noise,
                                  noise_seed=noise_seed)
        record = {
            **base,
            "success": bool(roll.success),
            "num_steps": int(roll.num_steps),
            "seconds": round(time.perf_counter() - t0, 3),
            "error": roll.error,
            "log": roll.log[-12:],
            "action_noise": float(action_noise),
        }
        if roll.success:
            _, npz = part_paths(parts, init_index)
            arrays = {
                "actions": roll.actions,
                "states": roll.states,
                "robot_states": roll.robot_states,
                "rewards": roll.rewards,
                "dones": roll.dones,
                "init_state": roll.init_state,
                "scene_state": scene,
            }
            if roll.executed_actions is not None:
                arrays["executed_actions"] = roll.executed_actions
            arrays.update({f"obs/{k}": v for k, v in roll.obs.items()})
            tmp = npz.with_name(npz.stem + ".tmp.npz")
            (np.savez_compressed if images else np.savez)(tmp, **arrays)
            os.replace(tmp, npz)
    except Exception as exc:  # noqa: BLE001 - a broken env is recorded, the collection goes on
        close_cached_env()
        record = {
            "task_id": task_id,
            "init_index": init_index,
            "success": False,
            "num_steps": 0,
            "seconds": round(time.perf_counter() - t0, 3),
            "error": f"{type(exc).__name__}: {exc}",
            "log": [],
        }
    js, _ = part_paths(parts, init_index)
    js.write_text(json.dumps(record))
    return record


def load_part(parts_dir: Path, init_index: int, record: dict[str, Any]) -> Episode:
    _, npz = part_paths(parts_dir, init_index)
    with np.load(npz) as z:
        obs = {k[len("obs/") :]: z[k] for k in z.files if k.startswith("obs/")}
        attrs: dict[str, Any] = {"rsd_init_source": record.get("init_source", "official"),
                                 "rsd_scene_state": z["scene_state"] if "scene_state" in z.files
                                 else z["init_state"]}
        if record.get("init_source") == "generated":
            attrs.update(rsd_scene_seed=int(record["scene_seed"]),
                         rsd_official_distance=float(record["official_distance"]))
        if "executed_actions" in z.files:  # DART: replay needs what the env executed
            attrs.update(rsd_action_noise=float(record.get("action_noise", 0.0)),
                         rsd_executed_actions=z["executed_actions"])
        return Episode(
            actions=z["actions"],
            states=z["states"],
            obs=obs,
            robot_states=z["robot_states"],
            rewards=z["rewards"],
            dones=z["dones"],
            init_state=z["init_state"],
            init_state_index=init_index if record.get("init_source", "official") == "official" else None,
            attrs=attrs,
        )
