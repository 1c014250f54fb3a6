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
- ``sequential=true`` (``stop=``): the work list is trial-major and no episode starts once the stop rule decided.

The pieces: ``rsd.eval.work_list``, ``rsd.eval.start_states``, ``rsd.eval.workers``, ``rsd.eval.episode_log``;
this module puts them together (and re-exports their public names).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.envs.libero_env import (
    INIT_SOURCES,
    MAX_STEPS,
    get_init_states,
    num_tasks,
)
from rsd.eval.episode_log import EPISODES_FILE, EpisodeLog, load_records
from rsd.eval.shard import select_shard, write_shard_file
from rsd.eval.start_states import SCENES_FILE, check_held_out, load_or_generate_scenes
from rsd.eval.work_list import Job, build_jobs, parse_modes, parse_trials, parse_video, record_key
from rsd.eval.workers import PolicyBuildError, run_inline, run_pool
from rsd.policies.registry import policy_training_data, spec_identity
from rsd.utils.json_safe import clean_json, json_default
from rsd.utils.progress import progress_bar

log = logging.getLogger(__name__)

RUN_FILE = "eval_run.json"
HELDOUT_FILE = "heldout.json"  # the held-out verdict of the run, written before its first episode

# the pieces, importable from here as before (rsd.eval.runner is the evaluation's one entry)
__all__ = ["EPISODES_FILE", "HELDOUT_FILE", "RUN_FILE", "SCENES_FILE", "EpisodeLog", "EvalRun", "Job",
           "PolicyBuildError", "build_jobs", "check_held_out", "load_records", "record_key", "run_evaluation"]


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


def _check_run_identity(out_dir: Path, identity: dict, force: bool, write: bool = True) -> None:
    path = out_dir / RUN_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if old != identity and not force:
            raise ValueError(
                f"{out_dir} holds episodes of a different evaluation:\n  before: {old}\n  now:    {identity}\n"
                "Use another out_dir, or resume_check=false to append anyway.")
    if write:
        path.write_text(json.dumps(identity, indent=2, default=json_default) + "\n")


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
    (out_dir / HELDOUT_FILE).write_text(json.dumps(clean_json(heldout), indent=1, default=json_default) + "\n")
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
                run_inline(todo, policy_spec, out_dir, max_steps, on_record, scenes_file, stopped)
            else:
                threads = threads_per_worker or max(1, (os.cpu_count() or 1) // min(workers, len(todo)))
                run_pool(todo, policy_spec, out_dir, max_steps, on_record, min(workers, len(todo)), threads,
                          max_worker_restarts if max_worker_restarts is not None else 2 * workers + 2,
                          scenes_file, stopped, keep_task=order == "task")
        finally:
            if bar is not None:
                bar.close()

    final = {record_key(r): r for r in list(by_key.values()) + new_records}
    records = [final[j.key] for j in jobs if j.key in final]
    return EvalRun(out_dir=out_dir, records=records, total=len(jobs), new=len(new_records), skipped=skipped,
                   max_steps=identity["max_steps"], heldout=heldout)
