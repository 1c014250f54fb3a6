"""One LIBERO episode under the OpenVLA / OpenVLA-OFT evaluation protocol.

Protocol (the README's "Evaluation"; start of an episode: ``rsd.envs.libero_env.reset_to_init_state``):

1. ``env.seed(0)``, ``env.reset()``, ``obs = env.set_init_state(init_states[i])`` for trial ``i``;
2. ``NUM_WARMUP_STEPS`` no-op steps ``[0, 0, 0, 0, 0, 0, -1]`` (objects settle; not counted);
3. query the policy for a chunk, execute all its steps open loop (gripper binarized to -1/+1), query
   again, until the env reports ``done`` (= success) or ``max_steps`` policy steps were taken.
   Before each query ``obs["timestep"]`` is set to the policy steps taken so far (warm-up excluded),
   the frame index the feature cache records for demonstrations.

An exception anywhere in the episode is caught and returned in ``error`` with what was measured so far
(``success`` is then False): the caller records it and goes on with the next episode.
"""

from __future__ import annotations

import hashlib
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from numbers import Number
from typing import Any

import numpy as np

from rsd.envs.expert import parse_goal
from rsd.envs.libero_env import MAX_STEPS, NUM_WARMUP_STEPS, TaskSpec, reset_to_init_state


@dataclass
class EpisodeResult:
    success: bool = False
    steps: int = 0  # policy steps executed (warm-up excluded)
    wall_time_s: float = 0.0  # whole episode incl. reset, warm-up and inference
    inference_times_ms: list[float] = field(default_factory=list)  # one per policy query (chunk)
    engine_stats: dict[str, Any] = field(default_factory=dict)  # per-chunk stats summed over the episode
    action_digest: str | None = None  # hash of the executed actions (lossless modes give equal digests)
    error: str | None = None
    traceback: str | None = None
    frames: list[np.ndarray] | None = None  # agentview RGB (upright), only when recorded
    peak_rss_mb: float | None = None  # peak resident memory of the process during the episode
    peak_cuda_mb: float | None = None  # torch.cuda.max_memory_allocated during the episode (CUDA only)
    markers: dict[str, Any] = field(default_factory=dict)  # how far the episode got (GoalMarkers), for failure modes

    def to_record(self) -> dict:
        rec = asdict(self)
        rec.pop("frames")
        rec["num_inferences"] = len(self.inference_times_ms)
        return rec


def binarize_gripper(action: np.ndarray) -> np.ndarray:
    """-1 (open) / +1 (close): ``+1`` where the gripper command is > 0, else ``-1``."""
    action = np.array(action, dtype=np.float64, copy=True)
    action[..., -1] = np.where(action[..., -1] > 0, 1.0, -1.0)
    return action


def check_chunk(actions: Any) -> np.ndarray:
    """A policy's output as ``[T, 7]`` float64; fails loudly on a wrong shape or non-finite values."""
    arr = np.asarray(actions, dtype=np.float64)
    if arr.ndim == 1:
        arr = arr[None]
    if arr.ndim != 2 or arr.shape[1] != 7 or arr.shape[0] == 0:
        raise ValueError(f"policy returned actions of shape {np.shape(actions)}; expected [T, 7] with T >= 1")
    if not np.all(np.isfinite(arr)):
        raise ValueError("policy returned non-finite actions")
    return arr


def accumulate_stats(total: dict[str, Any], stats: dict[str, Any] | None) -> None:
    """Add one inference's numeric stats into ``total`` (numbers summed, equal-length lists summed
    elementwise, other values kept from the last inference)."""
    for key, value in (stats or {}).items():
        if isinstance(value, bool):
            value = int(value)
        if isinstance(value, Number):
            total[key] = total.get(key, 0) + float(value)
        elif isinstance(value, list | tuple | np.ndarray) and all(isinstance(v, Number) for v in value):
            value = [float(v) for v in value]
            prev = total.get(key)
            total[key] = [a + b for a, b in zip(prev, value, strict=True)] if isinstance(prev, list) and len(
                prev) == len(value) else value
        else:
            total[key] = value if not hasattr(value, "item") else value.item()


def reset_memory_peaks() -> None:
    """Start a new peak-memory window: Linux resets VmHWM on ``5 > /proc/self/clear_refs``; CUDA peak stats."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:  # not Linux / not allowed: the peak is then the process's lifetime peak
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()


def memory_peaks() -> tuple[float | None, float | None]:
    """``(peak RSS MB since reset_memory_peaks, peak CUDA MB allocated or None)``."""
    rss = None
    try:
        with open("/proc/self/status") as f:
            rss = next(float(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20)
    torch = sys.modules.get("torch")
    cuda = None
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        cuda = torch.cuda.max_memory_allocated() / 2**20
    return rss, cuda


class GoalMarkers:
    """How far an episode got towards its goal ``(Pred obj target)``, from the object poses in the observations
    (privileged state; every policy gets the same markers), so failures can be told apart without videos:
    was the goal object lifted, was another object lifted instead, how close did it get to the target, where
    was it at the end, how often did the gripper close. Distances in cm; ``lift`` = rise of the object above
    its height at the episode's first observation."""

    def __init__(self, task: TaskSpec, obs: dict) -> None:
        _, obj, target = parse_goal(task.bddl_file)
        names = [k[:-4] for k in obs if k.endswith("_pos") and not k.startswith("robot0_") and "_to_" not in k]
        self.obj = obj if obj in names else None
        # a region target (basket_1_contain_region) is measured at its object (basket_1)
        self.target = next((n for n in sorted(names, key=len, reverse=True) if target.startswith(n)), None)
        self.others = [n for n in names if n not in (self.obj, self.target)]
        self.start = {n: np.asarray(obs[f"{n}_pos"], dtype=np.float64).copy() for n in names}
        self.lift_max = 0.0
        self.other_lift_max = 0.0
        self.dist_min = float("inf")
        self.closes = 0
        self._gripper = -1.0
        self.update(obs)

    def _dist_xy(self, obs: dict) -> float:
        if self.obj is None or self.target is None:
            return float("nan")
        return float(np.linalg.norm(np.asarray(obs[f"{self.obj}_pos"])[:2] - np.asarray(obs[f"{self.target}_pos"])[:2]))

    def _lift(self, obs: dict, name: str) -> float:
        return float(obs[f"{name}_pos"][2] - self.start[name][2])

    def update(self, obs: dict, gripper: float | None = None) -> None:
        if self.obj is not None:
            self.lift_max = max(self.lift_max, self._lift(obs, self.obj))
            self.dist_min = min(self.dist_min, self._dist_xy(obs))
        if self.others:
            self.other_lift_max = max(self.other_lift_max, max(self._lift(obs, n) for n in self.others))
        if gripper is not None:
            self.closes += int(gripper > 0 and self._gripper <= 0)
            self._gripper = gripper
        self._last = obs

    def to_dict(self) -> dict[str, Any]:
        cm = 100.0
        end_lift = self._lift(self._last, self.obj) if self.obj is not None else float("nan")
        return {"object": self.obj, "target": self.target, "lift_max_cm": round(self.lift_max * cm, 2),
                "other_lift_max_cm": round(self.other_lift_max * cm, 2),
                "dist_min_cm": round(self.dist_min * cm, 2), "end_lift_cm": round(end_lift * cm, 2),
                "end_dist_cm": round(self._dist_xy(self._last) * cm, 2), "gripper_closes": int(self.closes)}


def run_episode(env: Any, policy: Any, task: TaskSpec, init_state: np.ndarray, mode: str = "speculative",
                trial: int = 0, max_steps: int | None = None, num_warmup_steps: int = NUM_WARMUP_STEPS,
                record_frames: bool = False, camera: str = "agentview") -> EpisodeResult:
    """Run one episode of ``task`` from ``init_state`` with ``policy`` (see the module docstring)."""
    max_steps = MAX_STEPS[task.suite] if max_steps is None else int(max_steps)
    res = EpisodeResult(frames=[] if record_frames else None)
    reset_memory_peaks()
    t0 = time.perf_counter()

    def grab(obs: dict) -> None:
        if record_frames:
            key = f"{camera}_image"
            if key not in obs:
                raise KeyError(f"video needs '{key}' in the observations (env built without cameras?)")
            res.frames.append(np.ascontiguousarray(obs[key][::-1, ::-1]))

    try:
        if hasattr(policy, "bind_env"):
            policy.bind_env(env)
        policy.reset(task, mode, trial)
        obs = reset_to_init_state(env, init_state, num_warmup_steps, seed=0)
        grab(obs)
        markers = GoalMarkers(task, obs)
        done = False
        digest = hashlib.sha1()
        while res.steps < max_steps and not done:
            obs["timestep"] = res.steps  # policy steps since the episode start (what the feature cache stores)
            t = time.perf_counter()
            out = policy.act(obs, task.language)
            actions, stats = out if isinstance(out, tuple) else (out, {})
            res.inference_times_ms.append((time.perf_counter() - t) * 1e3)
            accumulate_stats(res.engine_stats, stats)
            for action in binarize_gripper(check_chunk(actions)):
                digest.update(action.tobytes())
                res.action_digest = digest.hexdigest()[:16]
                obs, _, done, _ = env.step(action)
                res.steps += 1
                grab(obs)
                markers.update(obs, float(action[-1]))
                if done or res.steps >= max_steps:
                    break
        res.success = bool(done)
        res.markers = markers.to_dict()
    except Exception as exc:  # recorded by the caller, never counted as a success
        res.success = False
        res.error = f"{type(exc).__name__}: {exc}"
        res.traceback = traceback.format_exc(limit=8)
    res.wall_time_s = time.perf_counter() - t0
    res.peak_rss_mb, res.peak_cuda_mb = memory_peaks()
    return res


def write_video(path: str, frames: list[np.ndarray], fps: int = 20) -> str:
    """mp4 (H.264 via imageio-ffmpeg); LIBERO runs at 20 Hz, so ``fps=20`` is real time."""
    import imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=1) as writer:
        for frame in frames:
            writer.append_data(np.asarray(frame, dtype=np.uint8))
    return path
