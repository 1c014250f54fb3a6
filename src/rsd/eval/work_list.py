"""The work list of an evaluation: every ``(task, trial, mode)`` episode it asks for, in order."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsd.policies.base import EVAL_MODES


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
