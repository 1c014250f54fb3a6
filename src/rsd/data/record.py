"""Recording scripted-expert episodes as demonstrations (the arrays LIBERO's HDF5 files hold).

Episode protocol (:func:`run_expert_episode`): ``rsd.envs.libero_env.reset_to_init_state`` (reset, the
start scene, ``NUM_WARMUP_STEPS`` no-op steps that are **not recorded**), then the expert
(``rsd.envs.expert``) acts for at most ``MAX_STEPS[suite]`` recorded steps, stopping at the first step
where the env reports ``done`` (success). Recorded arrays start at the state after the warm-up, so
``episode.init_state == episode.states[0]`` (LIBERO's convention).

Replay: the same sequence (reset, the start scene, 10 no-ops, the recorded actions) reproduces the
recorded states and the success exactly (tested). ``set_init_state(states[0])`` restores the physical
state but not the controllers' internal state (the gripper's command integrator, the OSC orientation
goal), so an open-loop replay started there drifts, as LIBERO's own playback warns.

Noise injection (DART, Laskey et al. 2017; ``action_noise``): the env executes the expert's action plus
Gaussian noise on the arm's six dimensions (never the gripper), while ``actions`` keeps the expert's own
action for the state it saw. The demos then visit the states a slightly wrong policy drifts into, labelled
with the expert's correction. Such an episode replays with ``executed_actions`` (kept per demo), not
``actions``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from rsd.data.libero_hdf5 import Episode
from rsd.envs.expert import ExpertConfig, make_expert
from rsd.envs.libero_env import MAX_STEPS, TaskSpec, reset_to_init_state


@dataclass
class ExpertRollout:
    """One expert episode as recorded (arrays have one row per recorded step)."""

    init_state_index: int | None
    init_state: np.ndarray  # state the recording starts from (after the warm-up) == states[0]
    actions: np.ndarray  # [T, 7]
    states: np.ndarray  # [T, state_dim]: flattened MuJoCo state before each action
    robot_states: np.ndarray  # [T, 9]: gripper qpos (2), eef pos (3), eef quat (4)
    rewards: np.ndarray  # [T]
    dones: np.ndarray  # [T]
    obs: dict[str, np.ndarray]  # ee_pos, ee_ori, ee_states, gripper_states, joint_states (+ images)
    success: bool
    num_steps: int
    seconds: float
    log: list[str] = field(default_factory=list)
    error: str | None = None
    executed_actions: np.ndarray | None = None  # [T, 7] what the env executed, when noise was injected

    def to_episode(self):
        """This rollout as a :class:`rsd.data.libero_hdf5.Episode` (for ``write_demo_file``)."""
        return Episode(
            actions=self.actions,
            states=self.states,
            obs=dict(self.obs),
            robot_states=self.robot_states,
            rewards=self.rewards,
            dones=self.dones,
            init_state=self.init_state,
            init_state_index=self.init_state_index,
        )


def _obs_record(obs: dict, images: bool) -> dict[str, np.ndarray]:
    import robosuite.utils.transform_utils as T

    ee_pos = np.asarray(obs["robot0_eef_pos"], dtype=np.float64)
    ee_ori = np.asarray(T.quat2axisangle(obs["robot0_eef_quat"]), dtype=np.float64)
    rec = {
        "ee_pos": ee_pos,
        "ee_ori": ee_ori,
        "ee_states": np.concatenate([ee_pos, ee_ori]),
        "gripper_states": np.asarray(obs["robot0_gripper_qpos"], dtype=np.float64),
        "joint_states": np.asarray(obs["robot0_joint_pos"], dtype=np.float64),
    }
    if images:
        rec["agentview_rgb"] = np.asarray(obs["agentview_image"], dtype=np.uint8)
        rec["eye_in_hand_rgb"] = np.asarray(obs["robot0_eye_in_hand_image"], dtype=np.uint8)
    return rec


def noise_scales(action_noise: float) -> np.ndarray:
    """Per-dimension noise std for ``action_noise`` (position dims; rotation gets half; gripper none)."""
    if not (math.isfinite(action_noise) and 0.0 <= action_noise <= 1.0):
        raise ValueError(f"action_noise must be in [0, 1] (std in action units), got {action_noise}")
    return np.array([1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.0]) * float(action_noise)


def run_expert_episode(
    env,
    task: TaskSpec,
    init_state: np.ndarray,
    init_state_index: int | None = None,
    max_steps: int | None = None,
    images: bool = False,
    config: ExpertConfig | None = None,
    reset: bool = True,
    action_noise: float = 0.0,
    noise_seed: int = 0,
) -> ExpertRollout:
    """Run the expert from one fixed init state and record the episode (see the module docstring).

    ``env`` is a LIBERO env from :func:`rsd.envs.libero_env.make_env` (with cameras if ``images``).
    ``action_noise`` > 0 executes noisy actions (DART, module docstring) drawn from ``noise_seed``.
    Exceptions inside the episode are caught and returned in ``error`` (``success`` is then False).
    """
    scales = noise_scales(action_noise)
    rng = np.random.default_rng(noise_seed)
    executed: list[np.ndarray] = []
    t0 = time.perf_counter()
    max_steps = MAX_STEPS[task.suite] if max_steps is None else max_steps
    rec: dict[str, list] = {k: [] for k in ("actions", "states", "robot_states", "rewards", "dones")}
    obs_rec: dict[str, list] = {}
    success = False
    error = None
    expert = None
    start_state = np.asarray(init_state, dtype=np.float64)
    try:
        obs = reset_to_init_state(env, init_state, reset=reset)
        start_state = env.sim.get_state().flatten().copy()
        expert = make_expert(env, task, config)
        for _ in range(max_steps):
            state = env.sim.get_state().flatten().copy()
            action = expert.act(obs)
            for k, v in _obs_record(obs, images).items():
                obs_rec.setdefault(k, []).append(v)
            rec["states"].append(state)
            rec["robot_states"].append(
                np.concatenate([obs["robot0_gripper_qpos"], obs["robot0_eef_pos"], obs["robot0_eef_quat"]])
            )
            rec["actions"].append(action)
            if action_noise > 0:
                action = np.clip(action + scales * rng.standard_normal(7), -1.0, 1.0)
                executed.append(action)
            obs, reward, done, _ = env.step(action)
            rec["rewards"].append(float(reward))
            rec["dones"].append(bool(done))
            if done:
                success = True
                break
    except Exception as exc:  # recorded, not swallowed silently
        error = f"{type(exc).__name__}: {exc}"
    n = len(rec["actions"])
    state_dim = start_state.shape[0]
    return ExpertRollout(
        init_state_index=init_state_index,
        init_state=start_state,
        actions=np.asarray(rec["actions"], dtype=np.float64).reshape(n, 7),
        states=np.asarray(rec["states"], dtype=np.float64).reshape(n, state_dim),
        robot_states=np.asarray(rec["robot_states"], dtype=np.float64).reshape(n, 9),
        rewards=np.asarray(rec["rewards"], dtype=np.float64),
        dones=np.asarray(rec["dones"], dtype=np.uint8),
        obs={k: np.stack(v) for k, v in obs_rec.items()},
        success=success,
        num_steps=n,
        seconds=time.perf_counter() - t0,
        log=list(expert.log) if expert is not None else [],
        error=error,
        executed_actions=np.asarray(executed, dtype=np.float64).reshape(len(executed), 7) if action_noise > 0
        else None,
    )
