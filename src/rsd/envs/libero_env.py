"""LIBERO environments built the way the official OpenVLA evaluation builds them."""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from rsd.envs.libero_setup import configure_libero

#: Max policy steps per suite (OpenVLA / OpenVLA-OFT LIBERO evaluation protocol).
MAX_STEPS = {
    "libero_spatial": 220,
    "libero_object": 280,
    "libero_goal": 300,
    "libero_10": 520,
    "libero_90": 400,
}
NUM_WARMUP_STEPS = 10
NOOP_ACTION = np.array([0, 0, 0, 0, 0, 0, -1], dtype=np.float64)


@dataclass(frozen=True)
class TaskSpec:
    suite: str
    task_id: int
    name: str
    language: str
    bddl_file: str


def get_task(suite: str, task_id: int) -> TaskSpec:
    configure_libero()
    from libero.libero import benchmark, get_libero_path

    bench = benchmark.get_benchmark_dict()[suite]()
    task = bench.get_task(task_id)
    bddl = os.path.join(get_libero_path("bddl_files"), task.problem_folder, task.bddl_file)
    return TaskSpec(suite, task_id, task.name, task.language, bddl)


def num_tasks(suite: str) -> int:
    configure_libero()
    from libero.libero import benchmark

    return benchmark.get_benchmark_dict()[suite]().n_tasks


def get_init_states(suite: str, task_id: int) -> np.ndarray:
    """The task's fixed init states, ``[50, state_dim]`` float64 (trial i starts from state i)."""
    configure_libero()
    from libero.libero import benchmark

    return np.asarray(benchmark.get_benchmark_dict()[suite]().get_task_init_states(task_id))


def make_env(task: TaskSpec, images: bool = False, resolution: int = 256):
    """Build the task's env. Without images the renderer is off (physics only, ~10x faster)."""
    configure_libero()
    from libero.libero.envs import OffScreenRenderEnv

    kwargs = dict(bddl_file_name=task.bddl_file, camera_heights=resolution, camera_widths=resolution)
    if not images:
        kwargs.update(has_offscreen_renderer=False, use_camera_obs=False)
    env = OffScreenRenderEnv(**kwargs)
    env.seed(0)
    return env


def reset_to_init_state(env, init_state: np.ndarray | None, num_warmup_steps: int = NUM_WARMUP_STEPS,
                        reset: bool = True, seed: int | None = None) -> dict:
    """Start an episode the way the evaluation protocol does; returns the first observation.

    ``env.seed(seed)`` (when given), ``env.reset()`` (unless ``reset=False``, e.g. right after a seeded reset
    that drew the scene), ``env.set_init_state(init_state)`` (skipped when None: keep the reset's scene),
    then ``num_warmup_steps`` no-ops ``[0, 0, 0, 0, 0, 0, -1]`` while the dropped objects settle (not part
    of the episode). The evaluation rollout, the demo recorder and the replay check all start here, so
    their episodes begin from the same state.
    """
    if seed is not None:
        env.seed(seed)
    obs = env.reset() if reset else None
    if init_state is not None:
        obs = env.set_init_state(np.asarray(init_state, dtype=np.float64))
    for _ in range(num_warmup_steps):
        obs, _, _, _ = env.step(NOOP_ACTION)
    return obs
