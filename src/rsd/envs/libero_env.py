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
