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
#: Where an evaluation's episodes start: the suite's official init states (the protocol; results are reported
#: on these) or new scenes drawn from the task's placement distribution (a selection set; generate_scenes).
INIT_SOURCES = ("official", "generated")
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


def _property_samplers_per_load(samplers: list) -> int:
    """How many entries of LIBERO's ``object_property_initializers`` one model load adds: the list is that
    sequence repeated once per load, so its shortest period (by sampler type and name)."""
    keys = [(type(s).__name__, getattr(s, "name", None)) for s in samplers]
    for n in range(1, len(keys) + 1):
        if len(keys) % n == 0 and all(keys[i] == keys[i % n] for i in range(len(keys))):
            return n
    return 0


def seeded_reset(env, seed: int | None):
    """``env.seed(seed)`` (when given) and ``env.reset()``, drawing the scene a fresh env draws for that seed,
    whatever this env did before; returns the reset's observation.

    Why: at every (hard) reset LIBERO's ``_add_placement_initializer`` appends the articulated objects'
    samplers (``OpenCloseSampler``, ``TurnOnOffSampler``: the wooden cabinet, the stove) to
    ``object_property_initializers`` again and never clears the list, and ``_reset_internal`` runs all of them
    before placing the fixtures and objects: each reset draws one more random number per such object, so the
    same seed placed the fixtures (and every object after them) by the env's reset count. Cutting the list
    back to one load's samplers before the reset makes every reset draw like a fresh env's first one.
    """
    inner = getattr(env, "env", env)
    samplers = getattr(inner, "object_property_initializers", None)
    if isinstance(samplers, list):
        del samplers[_property_samplers_per_load(samplers):]
    if seed is not None:
        env.seed(seed)
    return env.reset()


def reset_to_init_state(env, init_state: np.ndarray | None, num_warmup_steps: int = NUM_WARMUP_STEPS,
                        reset: bool = True, seed: int | None = None) -> dict:
    """Start an episode the way the evaluation protocol does; returns the first observation.

    ``env.seed(seed)`` (when given), ``env.reset()`` (unless ``reset=False``, e.g. right after a seeded reset
    that drew the scene), ``env.set_init_state(init_state)`` (skipped when None: keep the reset's scene),
    then ``num_warmup_steps`` no-ops ``[0, 0, 0, 0, 0, 0, -1]`` while the dropped objects settle (not part
    of the episode). The evaluation rollout, the demo recorder and the replay check all start here, so
    their episodes begin from the same state.
    """
    if reset:
        obs = seeded_reset(env, seed)
    else:
        obs = None
        if seed is not None:
            env.seed(seed)
    if init_state is not None:
        obs = env.set_init_state(np.asarray(init_state, dtype=np.float64))
    for _ in range(num_warmup_steps):
        obs, _, _, _ = env.step(NOOP_ACTION)
    return obs


def scene_seed_for(seed_base: int, task_id: int, index: int) -> int:
    """The NumPy seed of generated scene ``index`` of ``task_id`` (disjoint across tasks up to 1000 scenes)."""
    return int(seed_base) + 1000 * int(task_id) + int(index)


def generate_scenes(task: TaskSpec, count: int, seed_base: int) -> np.ndarray:
    """``[count, S]`` new start scenes of ``task``: scene ``i`` is the state after ``env.seed(scene_seed_for(
    seed_base, task, i))`` and ``env.reset()`` (the task's own placement distribution) by :func:`seeded_reset`,
    so scene ``i`` depends only on (task, seed, i). Used for evaluation states apart from the official ones
    (a selection set)."""
    if not 0 <= count <= 1000:
        raise ValueError(f"generated scenes per task must be in 0..1000 (seeds are 1000 apart), got {count}")
    env = make_env(task)
    try:
        scenes = []
        for i in range(count):
            seeded_reset(env, scene_seed_for(seed_base, task.task_id, i))
            scenes.append(env.sim.get_state().flatten().copy())
    finally:
        env.close()
    return np.stack(scenes) if scenes else np.zeros((0, 0))
