"""Run many LIBERO episodes: work list, worker processes, JSONL log with resume, error capture.

- The work list is every ``(task, trial, mode)`` of the request, in that order; trial ``i`` starts from
  the task's fixed init state ``i`` (``init_source="official"``, the protocol) or from generated scene ``i``
  (``init_source="generated"``: ``rsd.envs.libero_env.generate_scenes`` with ``scene_seed``, drawn once by the
  main process into ``<out_dir>/init_states.npz``; a selection set apart from the official states, which are
  checked not to be among them). ``mode=both`` puts the speculative and the baseline episode of the
  same init state next to each other.
- Every finished episode is appended to ``<out_dir>/episodes.jsonl`` at once (one JSON object a line,
  flushed and fsynced by the main process only). A rerun with the same ``out_dir`` loads the file and
  skips the episodes already there, so an interrupted evaluation loses at most the episodes that were
  running. A half-written last line (a kill during the write) is dropped and its episode rerun.
- An episode that raises is recorded with its error and traceback (``success: false``); a worker process
  that dies (segfault, OOM kill) has its running episode recorded as an error and is replaced.
- ``workers=N`` starts N processes with the *spawn* context; each builds its policy once (from the
  picklable policy spec) and its env once per task. ``workers=0`` runs everything in this process.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

from rsd.data.heldout import SAME_SCENE_TOL, TrainStatesError, nearest_scene, overlaps
from rsd.envs.libero_env import (
    INIT_SOURCES,
    MAX_STEPS,
    TaskSpec,
    generate_scenes,
    get_init_states,
    get_task,
    make_env,
    num_tasks,
)
from rsd.envs.libero_setup import configure_libero
from rsd.eval.rollout import EpisodeResult, run_episode, write_video
from rsd.eval.shard import select_shard, write_shard_file
from rsd.policies.base import EVAL_MODES
from rsd.policies.registry import build_policy, policy_training_data, spec_identity
from rsd.utils.progress import progress_bar

log = logging.getLogger(__name__)

EPISODES_FILE = "episodes.jsonl"
RUN_FILE = "eval_run.json"
SCENES_FILE = "init_states.npz"  # init_source=generated: the scenes every worker reads (task_<id>: [N, S], seed_base)
HELDOUT_FILE = "heldout.json"  # the held-out verdict of the run, written before its first episode
MAX_TASK_ENVS = 10  # a worker keeps the envs of this many tasks (one suite's; libero_90 switches)
VIDEO_DIR = "videos"


# --------------------------------------------------------------------------------------------------
# Work list


@dataclass(frozen=True)
class Job:
    suite: str
    task_id: int
    trial: int
    mode: str
    video: bool = False

    @property
    def init_index(self) -> int:
        return self.trial  # trial i starts from the task's fixed init state i

    @property
    def key(self) -> tuple:
        return (self.suite, self.task_id, self.trial, self.mode)


def record_key(rec: Mapping[str, Any]) -> tuple:
    return (rec["suite"], int(rec["task_id"]), int(rec["trial"]), rec["mode"])


def parse_modes(mode: str | Sequence[str]) -> list[str]:
    """``speculative`` | ``baseline`` | ``both`` (or a list) -> the modes to run, in order."""
    modes = list(EVAL_MODES) if mode == "both" else ([mode] if isinstance(mode, str) else list(mode))
    bad = [m for m in modes if m not in EVAL_MODES]
    if bad or not modes:
        raise ValueError(f"mode must be one of {EVAL_MODES} or 'both', got {mode!r}")
    return modes


def parse_trials(trials: int | Sequence[int]) -> list[int]:
    """``trials=N`` -> trials 0..N-1; a list picks trials (init state indices) explicitly."""
    if isinstance(trials, int):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        return list(range(trials))
    out = sorted({int(t) for t in trials})
    if not out or out[0] < 0:
        raise ValueError(f"bad trial list {trials!r}")
    return out


def parse_video(video: Any, trials: Sequence[int]) -> set[int]:
    """Which trials get an mp4: ``null``/``false``/``0`` none, ``N`` the first N trials of every task,
    a list those trials, ``all``/``true`` every trial."""
    if video is None or video is False or video == 0:
        return set()
    if video is True or video == "all":
        return set(trials)
    if isinstance(video, int):
        return set(list(trials)[:video])
    return {int(v) for v in video}


#: Work-list orders: ``task`` = every trial of task 0, then of task 1, ... (each worker keeps one env);
#: ``trial`` = trial 0 of every task, then trial 1, ... (a sequential comparison that stops early has then seen
#: every task about equally often).
JOB_ORDERS = ("task", "trial")


def build_jobs(suite: str, task_ids: Iterable[int], trials: Sequence[int], modes: Sequence[str],
               video_trials: set[int] | None = None, order: str = "task") -> list[Job]:
    if order not in JOB_ORDERS:
        raise ValueError(f"order must be one of {JOB_ORDERS}, got {order!r}")
    video_trials = video_trials or set()
    task_ids = list(task_ids)
    if order == "trial":
        return [Job(suite, int(t), int(i), m, i in video_trials) for i in trials for t in task_ids for m in modes]
    return [Job(suite, int(t), int(i), m, i in video_trials) for t in task_ids for i in trials for m in modes]


# --------------------------------------------------------------------------------------------------
# JSONL episode log


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def _clean(value: Any) -> Any:
    """NaN/inf -> None so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    return value


class EpisodeLog:
    """Append-only JSONL file of episode records (the only writer is the main process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> tuple[list[dict], int]:
        """``(records, number of unreadable lines)``; a truncated last line counts as unreadable."""
        if not self.path.exists():
            return [], 0
        records, bad = [], 0
        with self.path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    record_key(rec)
                    records.append(rec)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    bad += 1
                    log.warning("%s:%d: unreadable record dropped (interrupted write?)", self.path, lineno)
        return records, bad

    def rewrite(self, records: Sequence[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(_clean(rec), default=_json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, rec: dict) -> None:
        line = json.dumps(_clean(rec), default=_json_default) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def load_records(path: str | Path) -> list[dict]:
    """The episode records of a JSONL file (or of ``<dir>/episodes.jsonl``); last record per key wins."""
    path = Path(path)
    if path.is_dir():
        path = path / EPISODES_FILE
    records, _ = EpisodeLog(path).read()
    return list({record_key(r): r for r in records}.values())


# --------------------------------------------------------------------------------------------------
# Episode execution (same code in worker processes and inline)


class PolicyBuildError(RuntimeError):
    """The policy could not be built: every episode would fail the same way, so the run stops."""


def make_video_env(task: TaskSpec, camera: str = "agentview", resolution: int = 256):
    """A LIBERO env that renders only ``camera`` (for video of a state-based policy's episodes)."""
    configure_libero()
    from libero.libero.envs import OffScreenRenderEnv  # after configure_libero: its import reads the config

    env = OffScreenRenderEnv(bddl_file_name=task.bddl_file, camera_names=[camera],
                             camera_heights=resolution, camera_widths=resolution)
    env.seed(0)
    return env


@dataclass
class EpisodeWorker:
    """Builds the policy once and an env once per task; runs jobs into records."""

    policy_spec: dict
    out_dir: str
    max_steps: int | None = None
    video_fps: int = 20
    worker_id: int = 0
    scenes_file: str | None = None  # generated start scenes (SCENES_FILE) instead of the official init states
    policy: Any = None
    _task_id: tuple | None = None
    _task: TaskSpec | None = None
    _init_states: np.ndarray | None = None
    _tasks: dict = field(default_factory=dict)  # (suite, task_id) -> (TaskSpec, init states)
    _envs: dict = field(default_factory=dict)  # (suite, task_id, kind) -> env, the last MAX_TASK_ENVS tasks'

    def _ensure_policy(self) -> Any:
        if self.policy is None:
            try:
                self.policy = build_policy(self.policy_spec)
            except Exception as exc:
                raise PolicyBuildError(
                    f"building the policy {self.policy_spec.get('factory')!r} failed: "
                    f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=10)}") from exc
        return self.policy

    def _set_task(self, suite: str, task_id: int) -> None:
        """Make ``task_id`` current. Its envs are kept while the worker runs other tasks (a trial-major work list
        switches task every episode; a seeded reset does not depend on what an env ran before), up to the last
        :data:`MAX_TASK_ENVS` tasks."""
        key = (suite, task_id)
        if self._task_id == key:
            return
        self._task_id = None
        if key not in self._tasks:
            task = get_task(suite, task_id)
            if self.scenes_file:
                with np.load(self.scenes_file) as scenes:
                    states = scenes[f"task_{task_id}"]
            else:
                states = get_init_states(suite, task_id)
            self._tasks[key] = (task, states)
        self._task, self._init_states = self._tasks[key]
        self._task_id = key
        kept = list(dict.fromkeys(k[:2] for k in self._envs))
        if key in kept:
            kept.remove(key)
        for old in kept[: max(0, len(kept) - (MAX_TASK_ENVS - 1))]:  # the tasks used longest ago go
            self._close_task_envs(old)

    def _close_task_envs(self, task_key: tuple) -> None:
        for k in [k for k in self._envs if k[:2] == task_key]:
            env = self._envs.pop(k)
            try:
                env.close()
            except Exception:  # a broken env must not stop the run
                log.debug("env.close failed", exc_info=True)

    def _env(self, images: bool, video: bool) -> Any:
        kind = "images" if images else ("video" if video else "physics")
        key = (*self._task_id, kind)
        env = self._envs.pop(key, None)  # re-inserted: the dict's order is the order of last use
        if env is None:
            env = make_video_env(self._task) if kind == "video" else make_env(self._task, images)
        self._envs[key] = env
        return env

    def close_envs(self) -> None:
        for env in self._envs.values():
            try:
                env.close()
            except Exception:  # a broken env must not stop the run
                log.debug("env.close failed", exc_info=True)
        self._envs.clear()

    def close(self) -> None:
        self.close_envs()

    def run(self, job: Job) -> dict:
        policy = self._ensure_policy()
        t0 = time.perf_counter()
        max_steps = MAX_STEPS[job.suite] if self.max_steps is None else int(self.max_steps)
        task_name = instruction = None
        video_path = None
        try:
            self._set_task(job.suite, job.task_id)
            task_name, instruction = self._task.name, self._task.language
            if job.init_index >= len(self._init_states):
                raise IndexError(f"trial {job.trial}: task has only {len(self._init_states)} init states")
            images = bool(getattr(policy, "needs_images", False))
            env = self._env(images, job.video)
            res = run_episode(env, policy, self._task, self._init_states[job.init_index], mode=job.mode,
                              trial=job.trial,
                              max_steps=max_steps, record_frames=job.video)
            if res.error is not None:
                self.close_envs()  # the env may be in a bad state: the next episode rebuilds it
            if job.video and res.frames:
                name = f"{job.suite}_task{job.task_id:02d}_trial{job.trial:02d}_{job.mode}_" \
                       f"{'success' if res.success else 'failure'}.mp4"
                (Path(self.out_dir) / VIDEO_DIR).mkdir(parents=True, exist_ok=True)
                write_video(str(Path(self.out_dir) / VIDEO_DIR / name), res.frames, fps=self.video_fps)
                video_path = f"{VIDEO_DIR}/{name}"
        except Exception as exc:  # env build / init state / video failures
            self.close_envs()
            res = EpisodeResult(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc(limit=8),
                                wall_time_s=time.perf_counter() - t0)
        return make_record(job, res.to_record(), task_name=task_name, instruction=instruction,
                           max_steps=max_steps, video=video_path, worker=self.worker_id)


def make_record(job: Job, result: Mapping[str, Any], **extra: Any) -> dict:
    rec = {"suite": job.suite, "task_id": job.task_id, "trial": job.trial, "init_index": job.init_index,
           "mode": job.mode}
    rec.update(result)
    rec.update(extra)
    rec.update(pid=os.getpid(), host=socket.gethostname(),
               finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))  # noqa: UP017
    return rec


def error_record(job: Job, message: str, max_steps: int | None, worker: int | None = None) -> dict:
    return make_record(job, EpisodeResult(error=message).to_record(), task_name=None, instruction=None,
                       max_steps=MAX_STEPS[job.suite] if max_steps is None else max_steps, video=None,
                       worker=worker)


def _worker_main(worker_id: int, conn: Any, policy_spec: dict, out_dir: str, max_steps: int | None,
                 threads: int | None, scenes_file: str | None = None) -> None:
    """Worker process: receive jobs over ``conn``, send back ``("done", record)`` / ``("fatal", msg)``."""
    if threads:
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
            os.environ[var] = str(threads)
    worker = EpisodeWorker(policy_spec, out_dir, max_steps, worker_id=worker_id, scenes_file=scenes_file)
    try:
        while True:
            try:
                job = conn.recv()
            except (EOFError, OSError):  # the main process is gone
                break
            if job is None:
                break
            try:
                rec = worker.run(job)
            except PolicyBuildError as exc:
                conn.send(("fatal", str(exc)))
                break
            conn.send(("done", rec))
    except (KeyboardInterrupt, BrokenPipeError, EOFError):  # interrupted, or the main process is gone
        pass
    finally:
        worker.close()
        conn.close()


# --------------------------------------------------------------------------------------------------
# The evaluation


@dataclass
class EvalRun:
    """What one call evaluated: every record of the requested work list (old and new)."""

    out_dir: Path
    records: list[dict]  # in work-list order; fewer than ``total`` when stopped by ``max_episodes``
    total: int  # episodes in the work list
    new: int  # episodes run by this call
    skipped: int  # episodes found in the log (resume)
    max_steps: int
    heldout: dict | None = None  # check_held_out's verdict on the work list's init states


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


def _check_run_identity(out_dir: Path, identity: dict, force: bool, write: bool = True) -> None:
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity and not force:
            raise ValueError(
                f"{out_dir} holds episodes of a different evaluation:\n  before: {old}\n  now:    {identity}\n"
                "Use another out_dir, or resume_check=false to append anyway.")
    if write:
        path.write_text(json.dumps(identity, indent=2, default=_json_default) + "\n")


def run_evaluation(suite: str, policy_spec: Mapping[str, Any], out_dir: str | Path,
                   tasks: Sequence[int] | None = None, trials: int | Sequence[int] = 50,
                   mode: str | Sequence[str] = "speculative", workers: int = 1, max_steps: int | None = None,
                   video: Any = None, retry_errors: bool = False, max_episodes: int | None = None,
                   progress: bool = True, threads_per_worker: int | None = None, resume_check: bool = True,
                   max_worker_restarts: int | None = None, shard: str | Sequence[int] | None = None,
                   allow_train_states: bool = False, init_source: str = "official",
                   scene_seed: int = 900_000, scenes_dir: str | Path | None = None, order: str = "task",
                   stop: Any = None) -> EvalRun:
    """Run (or resume) an evaluation; see the module docstring. Returns all records of the work list.
    ``shard="i/n"`` runs only part i of n of the work list (``rsd.eval.shard``; merge: ``rsd.eval.merge``).
    The init states must be held out from the policy's training data (:func:`check_held_out`, for every
    policy factory) unless ``allow_train_states``. ``order``: :data:`JOB_ORDERS`. ``stop``: an early-stop
    rule (``set_order(keys)``, ``add(record)``, ``done``; e.g. ``rsd.analysis.sequential.PairedStop``) that sees
    every record, old and new; once ``done``, no new episode starts."""
    if suite not in MAX_STEPS:
        raise ValueError(f"unknown suite {suite!r}; one of {sorted(MAX_STEPS)}")
    out_dir = Path(out_dir)
    policy_spec = dict(policy_spec)
    n_tasks = num_tasks(suite)
    task_ids = list(range(n_tasks)) if tasks is None else [int(t) for t in tasks]
    bad = [t for t in task_ids if not 0 <= t < n_tasks]
    if bad:
        raise ValueError(f"{suite} has tasks 0..{n_tasks - 1}; got {bad}")
    trial_list = parse_trials(trials)
    if init_source not in INIT_SOURCES:
        raise ValueError(f"init_source must be one of {INIT_SOURCES}, got {init_source!r}")
    n_init = (min(len(get_init_states(suite, t)) for t in task_ids) if task_ids else 0) \
        if init_source == "official" else 1000
    if trial_list and trial_list[-1] >= n_init:
        raise ValueError(f"trial {trial_list[-1]} needs init state {trial_list[-1]}, but {suite} tasks have "
                         f"{n_init} init states (trials=N allows N <= {n_init})")
    modes = parse_modes(mode)
    jobs = build_jobs(suite, task_ids, trial_list, modes, parse_video(video, trial_list), order)
    shard_info = None
    if shard is not None:  # one part of an evaluation spread over processes / machines
        if stop is not None:
            raise ValueError("an early-stop rule needs the whole work list in one run: not with shard")
        jobs, shard_info = select_shard(jobs, shard)

    identity = {"suite": suite, "max_steps": MAX_STEPS[suite] if max_steps is None else int(max_steps),
                "policy": spec_identity(policy_spec)}
    if init_source != "official":  # runs of the official states keep the identity they always had
        identity.update(init_source=init_source, scene_seed=int(scene_seed))
    if shard_info:
        identity["shard"] = shard_info["shard"]
    scenes_file = None
    scenes = None
    if init_source == "generated":
        _check_run_identity(out_dir, identity, force=not resume_check, write=False)  # before drawing scenes
        out_dir.mkdir(parents=True, exist_ok=True)
        shared = Path(scenes_dir) / f"{suite}_seed{int(scene_seed)}.npz" if scenes_dir else None
        scenes = load_or_generate_scenes(out_dir / SCENES_FILE, suite, task_ids,
                                         (trial_list[-1] + 1) if trial_list else 0, int(scene_seed), progress,
                                         shared)
        scenes_file = str(out_dir / SCENES_FILE)
    heldout = check_held_out(suite, task_ids, trial_list, policy_training_data(policy_spec), allow_train_states,
                             scenes)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_run_identity(out_dir, identity, force=not resume_check)
    (out_dir / HELDOUT_FILE).write_text(json.dumps(_clean(heldout), indent=1, default=_json_default) + "\n")
    if shard_info:
        write_shard_file(out_dir, shard_info)

    episode_log = EpisodeLog(out_dir / EPISODES_FILE)
    old, bad_lines = episode_log.read()
    by_key = {record_key(r): r for r in old}
    dropped_errors = 0
    if retry_errors:
        wanted = {j.key for j in jobs}
        for k in [k for k, r in by_key.items() if r.get("error") and k in wanted]:
            del by_key[k]
            dropped_errors += 1
    if bad_lines or dropped_errors or len(by_key) != len(old):
        episode_log.rewrite(list(by_key.values()))
    todo = [j for j in jobs if j.key not in by_key]
    skipped = len(jobs) - len(todo)
    if skipped:
        log.info("Resuming in %s: %d of %d episodes already done%s", out_dir, skipped, len(jobs),
                 f" ({dropped_errors} errored episodes rerun)" if dropped_errors else "")
    if stop is not None:
        stop.set_order([j.key for j in jobs])
        for j in jobs:
            if j.key in by_key:
                stop.add(by_key[j.key])
        if stop.done:
            log.info("The sequential comparison was decided by the episodes already in %s", out_dir)
            todo = []
    if max_episodes is not None:
        todo = todo[: max(0, int(max_episodes))]

    new_records: list[dict] = []
    if todo:
        bar = progress_bar(total=len(todo), desc=suite, unit="ep", enabled=progress)

        def on_record(rec: dict) -> None:
            episode_log.append(rec)
            new_records.append(rec)
            if stop is not None:
                stop.add(rec)
            if bar is not None:
                bar.update(1)
                ok = sum(bool(r["success"]) for r in new_records)
                errs = sum(bool(r.get("error")) for r in new_records)
                bar.set_postfix(success=f"{ok}/{len(new_records)}", errors=errs)
            if rec.get("error"):
                log.warning("task %s trial %s %s: error: %s", rec["task_id"], rec["trial"], rec["mode"],
                            rec["error"])

        stopped = (lambda: stop.done) if stop is not None else (lambda: False)
        try:
            if workers <= 0:
                _run_inline(todo, policy_spec, out_dir, max_steps, on_record, scenes_file, stopped)
            else:
                threads = threads_per_worker or max(1, (os.cpu_count() or 1) // min(workers, len(todo)))
                _run_pool(todo, policy_spec, out_dir, max_steps, on_record, min(workers, len(todo)), threads,
                          max_worker_restarts if max_worker_restarts is not None else 2 * workers + 2,
                          scenes_file, stopped, keep_task=order == "task")
        finally:
            if bar is not None:
                bar.close()

    final = {record_key(r): r for r in list(by_key.values()) + new_records}
    records = [final[j.key] for j in jobs if j.key in final]
    return EvalRun(out_dir=out_dir, records=records, total=len(jobs), new=len(new_records), skipped=skipped,
                   max_steps=identity["max_steps"], heldout=heldout)


def _run_inline(todo: list[Job], policy_spec: dict, out_dir: Path, max_steps: int | None, on_record,
                scenes_file: str | None = None, stopped=lambda: False) -> None:
    worker = EpisodeWorker(policy_spec, str(out_dir), max_steps, scenes_file=scenes_file)
    try:
        for job in todo:
            if stopped():
                break
            try:
                rec = worker.run(job)
            except PolicyBuildError as exc:
                raise RuntimeError(str(exc)) from exc
            on_record(rec)
    finally:
        worker.close()


def _next_job(pending: deque, last: tuple | None, keep_task: bool = True) -> Job | None:
    """The first pending job of the worker's current task (its env is built), else the first pending;
    ``keep_task=False``: the first pending (the work list's order is kept)."""
    if not pending:
        return None
    if keep_task and last is not None:
        for i, job in enumerate(pending):
            if (job.suite, job.task_id) == last:
                del pending[i]
                return job
    return pending.popleft()


def _run_pool(todo: list[Job], policy_spec: dict, out_dir: Path, max_steps: int | None, on_record,
              workers: int, threads: int, max_restarts: int, scenes_file: str | None = None,
              stopped=lambda: False, keep_task: bool = True) -> None:
    ctx = mp.get_context("spawn")
    pending = deque(todo)
    procs: dict[int, Any] = {}  # wid -> Process
    conns: dict[int, Any] = {}  # wid -> Connection
    running: dict[int, Job] = {}  # wid -> job in flight
    last_task: dict[int, tuple] = {}
    next_wid = 0
    restarts = 0

    def start_worker() -> int:
        nonlocal next_wid
        wid = next_wid
        next_wid += 1
        parent_conn, child_conn = ctx.Pipe(duplex=True)
        p = ctx.Process(target=_worker_main, name=f"rsd-eval-{wid}", daemon=True,
                        args=(wid, child_conn, policy_spec, str(out_dir), max_steps, threads, scenes_file))
        p.start()
        child_conn.close()
        procs[wid], conns[wid] = p, parent_conn
        return wid

    def dispatch(wid: int) -> None:
        job = None if stopped() else _next_job(pending, last_task.get(wid), keep_task)
        if job is None:
            conns[wid].send(None)
            return
        running[wid] = job
        last_task[wid] = (job.suite, job.task_id)
        conns[wid].send(job)

    def retire(wid: int) -> None:
        conns.pop(wid).close()
        procs.pop(wid).join(timeout=5)

    clean = False
    try:
        for _ in range(workers):
            dispatch(start_worker())
        while procs:
            ready = wait(list(conns.values()) + [p.sentinel for p in procs.values()], timeout=5.0)
            for wid in list(procs):
                conn, proc = conns[wid], procs[wid]
                msg = None
                if conn in ready or proc.sentinel in ready:
                    try:
                        if conn.poll():
                            msg = conn.recv()
                    except (EOFError, OSError):  # the worker died: reap it below
                        proc.join(timeout=5)
                if msg is not None:
                    kind, payload = msg
                    if kind == "fatal":
                        raise RuntimeError(payload)
                    running.pop(wid, None)
                    on_record(payload)
                    dispatch(wid)
                    continue
                if proc.is_alive():
                    continue
                proc.join()
                job = running.pop(wid, None)
                retire(wid)
                if job is not None:
                    on_record(error_record(job, f"WorkerDied: worker process exited with code {proc.exitcode} "
                                                f"during the episode", max_steps, worker=wid))
                if pending and not stopped() and (job is not None or proc.exitcode != 0):  # replace a dead worker
                    restarts += 1
                    if restarts > max_restarts:
                        raise RuntimeError(f"worker processes died {restarts} times; giving up "
                                           f"(last exit code {proc.exitcode})")
                    dispatch(start_worker())
        clean = True
    finally:
        # normal end: nothing is left; interrupt/fatal error: stop the workers now (their running
        # episodes are not recorded and will be rerun on resume)
        for p in procs.values():
            if p.is_alive() and not clean:
                p.terminate()
        for p in procs.values():
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        for c in conns.values():
            c.close()
