"""Collect scripted-expert demonstrations in LIBERO and write them in the official HDF5 schema.

    python -m rsd.data.collect suite=libero_spatial demos_per_task=50
    python -m rsd.data.collect tasks=[0,3] demos_per_task=5 images=true out_dir=/tmp/demos

Held out by default (``init_source=generated``): attempt i of task t starts from a *new* initial scene,
drawn from the task's own placement distribution by ``env.seed(scene_seed + 1000 * t + i)`` and
``env.reset()`` (``rsd.envs.libero_env.seeded_reset``: the same scene whatever the worker ran before); a scene
that coincides with one of the task's official init states (max |state diff| below
:data:`rsd.data.heldout.SAME_SCENE_TOL`) is rejected, because the official states are reserved for evaluation.
Every demo records its seed and scene state (``rsd_scene_seed``, ``rsd_scene_state``, ``rsd_init_source``).
``init_source=official`` records from the fixed init states 0, 1, 2, ... instead (replay data, not held out;
the files say so in ``rsd_init_source`` and ``rsd_heldout_warning``).
After the scene is set: the 10 warm-up no-ops, then the expert (see :mod:`rsd.envs.expert`). Attempts
continue until ``demos_per_task`` episodes succeeded or ``max_attempts`` (official: the 50 init states)
are exhausted; only successful episodes are kept. Episodes run in parallel worker processes (spawn), each of which builds an
env per task once and reuses it. Every attempt is recorded under ``{out_dir}/{suite}/.parts/`` while a
task runs, so an interrupted collection resumes where it stopped; the parts are deleted once the task's
``{task_name}_demo.hdf5`` is written. A per-task table (attempts, successes, success rate, mean length)
is printed and saved as ``collect_summary.json`` / ``collect_summary.md`` next to the files. Tasks whose
file already holds enough demos are skipped, so a rerun is fast.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import numpy as np

from rsd import PROJECT_ROOT
from rsd.data.attempts import close_cached_env, load_part, part_paths, run_attempt, worker_init
from rsd.data.collect_summary import SUMMARY_JSON, build_summary, format_table, write_summary
from rsd.data.libero_hdf5 import (
    IMAGE_OBS_KEYS,
    DemoSchemaError,
    demo_path,
    summarize_demo_file,
    write_demo_file,
)
from rsd.data.record import noise_scales
from rsd.envs.expert import SUPPORTED_SUITES
from rsd.envs.libero_env import get_init_states, get_task, num_tasks
from rsd.utils.config import CONFIG_DIR  # registers the ${rsd_root:} resolver
from rsd.utils.progress import progress_bar

log = logging.getLogger(__name__)

INIT_SOURCES = ("generated", "official")
#: Attempts per task when ``max_attempts`` is null and scenes are generated: failures and rejections
#: are rare (the expert solves ~99 %), so twice the demos is plenty.
GENERATED_ATTEMPT_FACTOR = 2

DEFAULT_OUT_DIR = PROJECT_ROOT / "data" / "demos"


class _TaskRun:
    """Bookkeeping of one task: which init states were tried, which succeeded."""

    def __init__(self, suite: str, task_id: int, name: str, n_init: int, demos: int, max_attempts: int | None,
                 parts_dir: Path, images: bool, init_source: str = "generated", seed_base: int = 100_000,
                 action_noise: float = 0.0):
        self.suite, self.task_id, self.name = suite, task_id, name
        if init_source == "official":
            self.limit = n_init if max_attempts is None else min(n_init, int(max_attempts))
        else:
            self.limit = GENERATED_ATTEMPT_FACTOR * demos if max_attempts is None else int(max_attempts)
        self.demos = demos
        self.parts_dir = parts_dir
        self.images = images
        self.origin = {"init_source": init_source, "seed_base": int(seed_base), "action_noise": float(action_noise)}
        self.records: dict[int, dict] = {}
        self.pending: set[int] = set()
        self._resume()

    def _resume(self) -> None:
        meta = self.parts_dir / "meta.json"
        if meta.exists():
            try:
                old = json.loads(meta.read_text())
                same = old.get("images") == self.images and all(
                    old.get(k, {"init_source": "official", "action_noise": 0.0}.get(k)) == v
                    for k, v in self.origin.items())
            except ValueError:
                same = False
            if not same:
                shutil.rmtree(self.parts_dir, ignore_errors=True)
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        meta.write_text(json.dumps({"images": self.images, "suite": self.suite, "task_id": self.task_id,
                                    **self.origin}))
        for js in sorted(self.parts_dir.glob("init_*.json")):
            try:
                rec = json.loads(js.read_text())
            except ValueError:
                continue
            i = int(rec["init_index"])
            if rec.get("error") and not rec.get("success"):
                continue  # rerun attempts that crashed
            if rec.get("success") and not part_paths(self.parts_dir, i)[1].exists():
                continue
            self.records[i] = rec

    @property
    def successes(self) -> int:
        return sum(1 for r in self.records.values() if r["success"])

    def _next_free(self) -> int:
        i = 0
        while i in self.records or i in self.pending:
            i += 1
        return i

    def done(self) -> bool:
        if self.pending:
            return False
        return self.successes >= self.demos or self._next_free() >= self.limit

    def next_jobs(self) -> Iterator[int]:
        """Init states to try now: enough for the missing demos, assuming the pending ones succeed."""
        while self.successes + len(self.pending) < self.demos:
            i = self._next_free()
            if i >= self.limit:
                return
            self.pending.add(i)
            yield i

    def result(self) -> tuple[list[int], dict[str, Any]]:
        """Kept init indices (first ``demos`` successes in init-state order) and the task's statistics."""
        kept, attempted = [], []
        for i in sorted(self.records):
            if len(kept) >= self.demos:
                break
            attempted.append(i)
            if self.records[i]["success"]:
                kept.append(i)
        rejected = [r for i in attempted if (r := self.records[i]).get("rejected")]
        recs = [self.records[i] for i in attempted if not self.records[i].get("rejected")]
        lengths = [r["num_steps"] for r in recs if r["success"]]
        stats = {
            "task_id": self.task_id,
            "name": self.name,
            "attempts": len(recs),
            "init_source": self.origin["init_source"],
            "rejected_scenes": len(rejected),
            "successes": len(kept),
            "success_rate": round(len(kept) / len(recs), 4) if recs else 0.0,
            "mean_episode_length": round(float(np.mean(lengths)), 1) if lengths else None,
            "failed_init_states": [r["init_index"] for r in recs if not r["success"]],
            "errors": {str(r["init_index"]): r["error"] for r in recs if r.get("error")},
            "init_states_exhausted": len(kept) < self.demos,
            "kept_attempts": kept,
            "mean_attempt_seconds": round(float(np.mean([r["seconds"] for r in recs])), 2) if recs else None,
        }
        return kept, stats


def _existing_stats(path: Path, demos_per_task: int, images: bool, init_source: str = "generated",
                    action_noise: float = 0.0) -> dict[str, Any] | None:
    """Stats of an existing file that already satisfies the request (None: collect again).

    A file from the other init source never does (files written before the option are official)."""
    try:
        info = summarize_demo_file(path, require_images=images)
    except DemoSchemaError:
        return None
    import h5py

    with h5py.File(path, "r") as f:
        attrs = dict(f["data"].attrs)
    stats = json.loads(attrs["rsd_collect_stats"]) if "rsd_collect_stats" in attrs else None
    if str(attrs.get("rsd_init_source", "official")) != init_source:
        log.info("%s was recorded from %s init states, %s requested: collecting again", path.name,
                 attrs.get("rsd_init_source", "official"), init_source)
        return None
    if float(attrs.get("rsd_action_noise", 0.0)) != float(action_noise):
        log.info("%s was recorded with action noise %s, %s requested: collecting again", path.name,
                 attrs.get("rsd_action_noise", 0.0), action_noise)
        return None
    enough = info["num_demos"] >= demos_per_task
    if not enough and stats is not None:
        enough = bool(stats.get("init_states_exhausted")) and int(attrs.get("rsd_demos_requested", 0)) >= demos_per_task
    if not enough:
        return None
    out = dict(stats) if stats else {"successes": info["num_demos"]}
    out.update(skipped=True, file=str(path))
    return out


def collect_suite(
    suite: str = "libero_spatial",
    demos_per_task: int = 50,
    tasks: Sequence[int] | None = None,
    images: bool = False,
    workers: int = 2,
    out_dir: str | os.PathLike | None = None,
    max_attempts: int | None = None,
    resolution: int = 256,
    overwrite: bool = False,
    progress: bool = True,
    init_source: str = "generated",
    scene_seed: int = 100_000,
    action_noise: float = 0.0,
    task_demos: Mapping[int, int] | None = None,
) -> dict[str, Any]:
    """Collect expert demos for ``tasks`` of ``suite`` (all when None) into ``{out_dir}/{suite}/``.

    ``init_source``: ``generated`` (new scenes, held out from the official init states; the default) or
    ``official`` (the fixed init states, which evaluation uses: such data is not held out).
    ``action_noise``: std of the DART noise the env executes on top of the expert's action (``rsd.data.record``;
    0 = none); the demos keep the expert's own actions as labels.
    ``task_demos``: demos wanted for some tasks instead of ``demos_per_task`` (``{task_id: n}``), to put more data
    where a policy fails most.

    Returns the summary (also saved as ``collect_summary.json`` / ``.md`` in that folder): per task
    ``task_id, name, attempts, successes, success_rate, mean_episode_length, failed_init_states, file``
    plus totals and the wall time.
    """
    if suite not in SUPPORTED_SUITES:
        raise ValueError(f"the scripted expert supports {SUPPORTED_SUITES}, not {suite!r}")
    if init_source not in INIT_SOURCES:
        raise ValueError(f"init_source must be one of {INIT_SOURCES}, got {init_source!r}")
    noise_scales(action_noise)  # validates before any env starts
    if init_source == "official":
        log.warning("collecting from the OFFICIAL init states: evaluation uses these states, so a policy "
                    "trained on these demos cannot be evaluated held out on them")
    t_start = time.time()
    out_root = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    suite_dir = out_root / suite
    suite_dir.mkdir(parents=True, exist_ok=True)
    task_ids = list(range(num_tasks(suite))) if tasks is None else [int(t) for t in tasks]
    wanted = demos_wanted(task_ids, demos_per_task, task_demos, num_tasks(suite))

    stats_by_task: dict[int, dict] = {}
    runs: dict[int, _TaskRun] = {}
    for tid in task_ids:
        task = get_task(suite, tid)
        path = demo_path(out_root, suite, task.name)
        if path.exists() and not overwrite:
            existing = _existing_stats(path, wanted[tid], images, init_source, action_noise)
            if existing is not None:
                existing.setdefault("task_id", tid)
                existing.setdefault("name", task.name)
                stats_by_task[tid] = existing
                log.info("task %d: %s already has enough demos, skipped", tid, path.name)
                continue
        n_init = len(get_init_states(suite, tid))
        runs[tid] = _TaskRun(suite, tid, task.name, n_init, wanted[tid], max_attempts,
                             suite_dir / ".parts" / task.name, images, init_source, scene_seed, action_noise)

    def finish(run: _TaskRun) -> None:
        kept, stats = run.result()
        task = get_task(suite, run.task_id)
        path = demo_path(out_root, suite, task.name)
        if kept:
            write_demo_file(
                path, task, (load_part(run.parts_dir, i, run.records[i]) for i in kept), images=images,
                resolution=resolution, extra_attrs=_file_attrs(init_source, scene_seed, run.demos, stats, action_noise),
            )
            stats["file"] = str(path)
            shutil.rmtree(run.parts_dir, ignore_errors=True)
        else:
            stats["file"] = None
        stats["skipped"] = False
        stats_by_task[run.task_id] = stats

    bar = progress_bar(total=sum(min(r.limit, r.demos) for r in runs.values()), desc="expert episodes",
                       enabled=progress)
    for r in runs.values():  # attempts recorded by an interrupted run
        if bar is not None and r.records:
            bar.update(len(r.records))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):  # inherited by workers
        os.environ.setdefault(var, "1")

    def jobs() -> Iterator[tuple[_TaskRun, int]]:
        for run in runs.values():
            for i in run.next_jobs():
                yield run, i

    try:
        if workers <= 0:
            for run in runs.values():
                while not run.done():
                    for i in list(run.next_jobs()):
                        rec = run_attempt(suite, run.task_id, i, images, resolution, str(run.parts_dir),
                                          init_source, scene_seed, action_noise)
                        run.pending.discard(i)
                        run.records[i] = rec
                        _tick(bar, run)
                finish(run)
        else:
            import multiprocessing as mp

            ctx = mp.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=worker_init) as pool:
                futures: dict[Future, tuple[_TaskRun, int]] = {}

                def submit_all() -> None:
                    for run, i in jobs():
                        fut = pool.submit(run_attempt, suite, run.task_id, i, images, resolution,
                                          str(run.parts_dir), init_source, scene_seed, action_noise)
                        futures[fut] = (run, i)

                submit_all()
                finished: set[int] = set()
                for run in runs.values():
                    if run.done():
                        finish(run)
                        finished.add(run.task_id)
                while futures:
                    done, _ = wait(list(futures), return_when=FIRST_COMPLETED)
                    for fut in done:
                        run, i = futures.pop(fut)
                        run.pending.discard(i)
                        run.records[i] = fut.result()
                        _tick(bar, run)
                        if run.done() and run.task_id not in finished:
                            finish(run)
                            finished.add(run.task_id)
                    submit_all()
                for run in runs.values():
                    if run.task_id not in finished:
                        finish(run)
    finally:
        if bar is not None:
            bar.close()
        close_cached_env()

    rows = [stats_by_task[t] for t in task_ids if t in stats_by_task]
    summary = build_summary(suite, demos_per_task, images, workers, rows, time.time() - t_start, suite_dir)
    if runs or not (suite_dir / SUMMARY_JSON).exists():  # a rerun that only skipped keeps the last record
        write_summary(summary, suite_dir)
    print(format_table(summary))
    return summary


def demos_wanted(task_ids: Sequence[int], demos_per_task: int, task_demos: Mapping[int, int] | None,
                 n_tasks: int) -> dict[int, int]:
    """Demos to collect per task: ``demos_per_task``, or ``task_demos[t]`` where given (checked: known task ids,
    counts >= 1)."""
    extra = {int(t): int(n) for t, n in (task_demos or {}).items()}
    bad = {t: n for t, n in extra.items() if not 0 <= t < n_tasks or n < 1}
    if bad:
        raise ValueError(f"task_demos {bad}: task ids must be in 0..{n_tasks - 1} and counts >= 1")
    return {t: extra.get(t, int(demos_per_task)) for t in task_ids}


def _file_attrs(init_source: str, scene_seed: int, demos_per_task: int, stats: dict[str, Any],
                action_noise: float = 0.0) -> dict[str, Any]:
    """The ``data`` attributes that say where a file's demos started from and how they were driven."""
    attrs: dict[str, Any] = {
        "rsd_generator": "rsd.envs.expert.BowlPlaceExpert (privileged-state scripted expert)",
        "rsd_warmup_steps": 10,
        "rsd_init_source": init_source,
        "rsd_action_noise": float(action_noise),
        "rsd_demos_requested": int(demos_per_task),
        "rsd_collect_stats": stats,
    }
    if init_source == "generated":
        attrs["rsd_recording"] = ("env.seed(rsd_scene_seed), env.reset() by rsd.envs.libero_env.seeded_reset "
                                  "(a new scene from the task's placement distribution, recorded as rsd_scene_state, "
                                  "rejected if it coincides with an official init state), then 10 unrecorded no-op "
                                  "warm-up steps; init_state == states[0]")
        attrs["rsd_scene_seed_base"] = int(scene_seed)
    else:
        attrs["rsd_recording"] = ("after reset, set_init_state(init_states[init_state_index]) and 10 unrecorded "
                                  "no-op warm-up steps; init_state == states[0]")
        attrs["rsd_heldout_warning"] = ("recorded from the official init states that LIBERO evaluations use: "
                                        "evaluating a policy trained on these demos on those states is replay")
    return attrs


def _tick(bar, run: _TaskRun) -> None:
    if bar is not None:
        bar.total = max(bar.total, bar.n + 1)
        bar.update(1)
        bar.set_postfix_str(f"task {run.task_id}: {run.successes} ok", refresh=False)


def main() -> None:
    import hydra
    from omegaconf import OmegaConf

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="collect")
    def _run(cfg) -> None:
        c = OmegaConf.to_container(cfg, resolve=True)
        tasks = c.get("tasks")
        if isinstance(tasks, int):
            tasks = [tasks]
        collect_suite(
            suite=c["suite"],
            demos_per_task=int(c["demos_per_task"]),
            tasks=tasks,
            images=bool(c.get("images", False)),
            workers=int(c.get("workers", 2)),
            out_dir=c.get("out_dir") or DEFAULT_OUT_DIR,
            max_attempts=c.get("max_attempts"),
            resolution=int(c.get("resolution", 256)),
            overwrite=bool(c.get("overwrite", False)),
            progress=bool(c.get("progress", True)),
            init_source=str(c.get("init_source", "generated")),
            scene_seed=int(c.get("scene_seed", 100_000)),
            action_noise=float(c.get("action_noise", 0.0)),
            task_demos=c.get("task_demos"),
        )

    _run()


if __name__ == "__main__":
    main()


__all__ = ["collect_suite", "run_attempt", "format_table", "IMAGE_OBS_KEYS"]
