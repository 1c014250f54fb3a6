"""Episode workers: one policy and an env per task in each process (spawn); the pool that feeds them jobs,
replaces a worker that dies and stops starting episodes when told."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import socket
import time
import traceback
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any

import numpy as np

from rsd.envs.libero_env import (
    MAX_STEPS,
    TaskSpec,
    get_init_states,
    get_task,
    make_env,
)
from rsd.envs.libero_setup import configure_libero
from rsd.eval.rollout import EpisodeResult, run_episode, write_video
from rsd.eval.work_list import Job
from rsd.policies.registry import build_policy

log = logging.getLogger(__name__)

MAX_TASK_ENVS = 10  # a worker keeps the envs of this many tasks (one suite's; libero_90 switches)
VIDEO_DIR = "videos"


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


def run_inline(todo: list[Job], policy_spec: dict, out_dir: Path, max_steps: int | None, on_record,
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


def run_pool(todo: list[Job], policy_spec: dict, out_dir: Path, max_steps: int | None, on_record,
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
