"""Aggregate episode records into the evaluation's results: summary, per-task table, files, W&B.

- :func:`summarize` turns the JSONL records into one dict (per mode: episodes, successes, success rate,
  errors, inference time, engine statistics; per task; speculative-vs-baseline comparison on the same
  init states when both modes ran).
- :func:`format_guide_summary` prints it in the original integration guide's form; :func:`task_table`
  (rich) and :func:`task_table_markdown` give the per-task success table.
- :func:`write_summary` writes ``summary.json``, ``summary.txt`` and ``tasks.md``; :func:`log_to_wandb`
  sends the same metrics, both tables and the videos to a Weights & Biases run.

Errored episodes count as failures in the success rate (an episode that crashed did not succeed) and are
reported separately (``errors``, ``success_rate_no_errors``), never hidden.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsd.eval.policy import MODES

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
TASKS_MD = "tasks.md"


def _mean(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a) / float(b) if a is not None and b else None


def engine_summary(records: Sequence[Mapping[str, Any]]) -> dict:
    """Engine statistics of a set of episodes: totals, per-inference means, acceptance."""
    totals: dict[str, Any] = {}
    inferences = 0
    for rec in records:
        inferences += int(rec.get("num_inferences", len(rec.get("inference_times_ms") or [])))
        for key, value in (rec.get("engine_stats") or {}).items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int | float):
                totals[key] = totals.get(key, 0.0) + float(value)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                prev = totals.get(key)
                totals[key] = ([a + b for a, b in zip(prev, value, strict=True)]
                               if isinstance(prev, list) and len(prev) == len(value) else list(value))
    out: dict[str, Any] = {"inferences": inferences, "totals": totals}
    for key, value in totals.items():
        if key.endswith("_ms") and isinstance(value, float):
            out[f"avg_{key}"] = _ratio(value, inferences)
    out["acceptance_rate"] = _ratio(totals.get("accepted_layers"), totals.get("drafted_layers"))
    out["mean_accepted_layers"] = _ratio(totals.get("accepted_layers"), inferences) \
        if "accepted_layers" in totals else None
    out["main_steps_per_inference"] = _ratio(totals.get("main_steps"), inferences) \
        if "main_steps" in totals else None
    out["main_steps_saved_per_inference"] = _ratio(totals.get("main_steps_saved"), inferences) \
        if "main_steps_saved" in totals else None
    acc, dra = totals.get("accepted_per_layer"), totals.get("drafted_per_layer")
    if isinstance(acc, list) and isinstance(dra, list) and len(acc) == len(dra):
        out["acceptance_per_layer"] = [_ratio(a, d) for a, d in zip(acc, dra, strict=True)]
    return out


def mode_summary(records: Sequence[Mapping[str, Any]]) -> dict:
    n = len(records)
    successes = sum(bool(r.get("success")) for r in records)
    errors = sum(bool(r.get("error")) for r in records)
    times = [float(t) for r in records for t in (r.get("inference_times_ms") or [])]
    ok_steps = [int(r["steps"]) for r in records if r.get("success")]
    return {
        "episodes": n,
        "successes": successes,
        "success_rate": _ratio(successes, n),
        "errors": errors,
        "success_rate_no_errors": _ratio(successes, n - errors),
        "avg_inference_ms": _mean(times),
        "p50_inference_ms": _pct(times, 50),
        "p95_inference_ms": _pct(times, 95),
        "avg_steps_success": _mean(ok_steps),
        "avg_episode_s": _mean([float(r.get("wall_time_s") or 0.0) for r in records]),
        "engine": engine_summary(records),
    }


def compare_modes(records: Sequence[Mapping[str, Any]], summary_modes: Mapping[str, dict]) -> dict | None:
    """Speculative vs baseline on the init states both ran (paired by task and trial)."""
    if not all(m in summary_modes for m in MODES):
        return None
    by = {(r["task_id"], r["trial"], r["mode"]): r for r in records}
    pairs = [(by[(t, i, "speculative")], by[(t, i, "baseline")])
             for (t, i, m) in by if m == "speculative" and (t, i, "baseline") in by]
    if not pairs:
        return None
    spec_rate = _ratio(sum(bool(s["success"]) for s, _ in pairs), len(pairs))
    base_rate = _ratio(sum(bool(b["success"]) for _, b in pairs), len(pairs))
    spec_t = [float(t) for s, _ in pairs for t in s.get("inference_times_ms") or []]
    base_t = [float(t) for _, b in pairs for t in b.get("inference_times_ms") or []]
    spec_eng = engine_summary([s for s, _ in pairs])
    base_eng = engine_summary([b for _, b in pairs])
    out = {
        "paired_episodes": len(pairs),
        "speculative_success_rate": spec_rate,
        "baseline_success_rate": base_rate,
        "success_rate_diff": spec_rate - base_rate,  # speculative minus baseline
        "both_success": sum(bool(s["success"]) and bool(b["success"]) for s, b in pairs),
        "only_speculative": sum(bool(s["success"]) and not b["success"] for s, b in pairs),
        "only_baseline": sum(not s["success"] and bool(b["success"]) for s, b in pairs),
        "neither": sum(not s["success"] and not b["success"] for s, b in pairs),
        "speculative_avg_inference_ms": _mean(spec_t),
        "baseline_avg_inference_ms": _mean(base_t),
        "speedup": _ratio(_mean(base_t), _mean(spec_t)),  # baseline time / speculative time
        # strict speculative decoding is lossless: the executed actions should be identical
        "identical_actions": sum(bool(s.get("action_digest")) and s.get("action_digest") == b.get("action_digest")
                                 for s, b in pairs),
    }
    for key in ("avg_engine_ms", "avg_main_ms"):
        if spec_eng.get(key) and base_eng.get(key):
            out[f"speedup_{key[4:-3]}"] = base_eng[key] / spec_eng[key]
    return out


def summarize(records: Sequence[Mapping[str, Any]], suite: str | None = None, extra: Mapping | None = None) -> dict:
    """Everything the evaluation reports, computed from the episode records alone."""
    records = list(records)
    suites = sorted({r["suite"] for r in records})
    modes = [m for m in MODES if any(r["mode"] == m for r in records)]
    modes += sorted({r["mode"] for r in records} - set(modes))
    per_mode = {m: mode_summary([r for r in records if r["mode"] == m]) for m in modes}
    tasks = sorted({int(r["task_id"]) for r in records})
    per_task = []
    for t in tasks:
        recs = [r for r in records if int(r["task_id"]) == t]
        named = next((r for r in recs if r.get("task_name")), {})
        row = {"task_id": t, "task_name": named.get("task_name"), "instruction": named.get("instruction"),
               "modes": {}}
        for m in modes:
            mr = [r for r in recs if r["mode"] == m]
            if mr:
                s = sum(bool(r.get("success")) for r in mr)
                row["modes"][m] = {"episodes": len(mr), "successes": s, "success_rate": s / len(mr),
                                   "errors": sum(bool(r.get("error")) for r in mr)}
        per_task.append(row)
    errors = [{"task_id": r["task_id"], "trial": r["trial"], "mode": r["mode"], "error": r["error"]}
              for r in records if r.get("error")]
    out = {
        "suite": suite or (suites[0] if len(suites) == 1 else ",".join(suites)),
        "episodes": len(records),
        "tasks": tasks,
        "trials_per_task": max((sum(1 for r in records if r["task_id"] == t and r["mode"] == m)
                                for t in tasks for m in modes), default=0),
        "modes": per_mode,
        "per_task": per_task,
        "comparison": compare_modes(records, per_mode),
        "errors": errors[:100],
        "num_errors": len(errors),
    }
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------------------------------
# Text, tables


def _fmt_ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.1f} ms"


def _fmt_pct(x: float | None) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:.1f}%"


def format_guide_summary(summary: Mapping[str, Any]) -> str:
    """The original guide's summary block, once per mode, then the comparison when both ran."""
    bar = "=" * 60
    lines = []
    for mode, s in summary["modes"].items():
        eng = s["engine"]
        lines += [
            bar, f"EVALUATION COMPLETE ({mode})", bar,
            f"   Task Suite: {summary['suite']}",
            f"   Total Episodes: {s['episodes']}",
            f"   Total Successes: {s['successes']}",
            f"   Success Rate: {_fmt_pct(s['success_rate'])}",
            f"   Avg Inference Time: {_fmt_ms(s['avg_inference_ms'])}",
            f"   Speculative Decoding: {mode == 'speculative'}",
        ]
        if s["errors"]:
            lines.append(f"   Errors: {s['errors']} episodes raised (counted as failures; "
                         f"success rate without them {_fmt_pct(s['success_rate_no_errors'])})")
        lines += [
            "   RSD Engine Statistics:",
            f"     Total Inferences: {eng['inferences']}",
            f"     Avg Draft Time: {_fmt_ms(eng.get('avg_draft_ms'))}",
            f"     Avg Main Time: {_fmt_ms(eng.get('avg_main_ms'))}",
            f"     Acceptance Rate: {_fmt_pct(eng.get('acceptance_rate'))}",
        ]
        if eng.get("mean_accepted_layers") is not None:
            lines.append(f"     Mean Accepted Layers / Chunk: {eng['mean_accepted_layers']:.2f}")
        if eng.get("main_steps_per_inference") is not None:
            lines.append(f"     Main Steps / Chunk: {eng['main_steps_per_inference']:.2f}")
        lines.append(bar)
    cmp_ = summary.get("comparison")
    if cmp_:
        speedup = "n/a" if cmp_["speedup"] is None else f"{cmp_['speedup']:.2f}x"
        lines += [
            "SPECULATIVE vs BASELINE (same init states)",
            f"   Paired Episodes: {cmp_['paired_episodes']}",
            f"   Success Rate: {_fmt_pct(cmp_['speculative_success_rate'])} vs "
            f"{_fmt_pct(cmp_['baseline_success_rate'])} "
            f"(difference {100 * cmp_['success_rate_diff']:+.1f} points; only speculative "
            f"{cmp_['only_speculative']}, only baseline {cmp_['only_baseline']})",
            f"   Avg Inference Time: {_fmt_ms(cmp_['speculative_avg_inference_ms'])} vs "
            f"{_fmt_ms(cmp_['baseline_avg_inference_ms'])}",
            f"   Speedup (baseline / speculative inference time): {speedup}",
            f"   Identical Action Sequences: {cmp_['identical_actions']} of {cmp_['paired_episodes']}",
            bar,
        ]
    return "\n".join(lines)


def _cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "-"
    cell = f"{m['successes']}/{m['episodes']} ({100 * m['success_rate']:.0f}%)"
    return cell + (f", {m['errors']} err" if m["errors"] else "")


def _table_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    modes = list(summary["modes"])
    header = ["task", "instruction"] + modes
    rows = [[str(row["task_id"]), row.get("instruction") or row.get("task_name") or ""]
            + [_cell(row["modes"].get(m)) for m in modes] for row in summary["per_task"]]
    rows.append(["all", ""] + [_cell(summary["modes"][m]) for m in modes])
    return header, rows


def task_table(summary: Mapping[str, Any]):
    """A rich Table of per-task successes."""
    from rich.table import Table

    header, rows = _table_rows(summary)
    table = Table(title=f"{summary['suite']}: successes per task")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right", overflow="fold")
    for r in rows:
        table.add_row(*r, end_section=r[0] == "all")
    return table


def task_table_markdown(summary: Mapping[str, Any]) -> str:
    header, rows = _table_rows(summary)
    lines = [f"# {summary['suite']}: successes per task", "",
             "| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / SUMMARY_JSON, "txt": out_dir / SUMMARY_TXT, "md": out_dir / TASKS_MD}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["txt"].write_text(format_guide_summary(summary) + "\n")
    paths["md"].write_text(task_table_markdown(summary))
    return paths


def print_summary(summary: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(format_guide_summary(summary), highlight=False)
    console.print(task_table(summary))


# --------------------------------------------------------------------------------------------------
# Weights & Biases


def flat_metrics(summary: Mapping[str, Any]) -> dict[str, float]:
    """Scalar metrics as ``<mode>/<name>`` (and ``comparison/<name>``) for W&B."""
    out: dict[str, float] = {}
    for mode, s in summary["modes"].items():
        for key, value in s.items():
            if isinstance(value, int | float) and value is not None:
                out[f"{mode}/{key}"] = value
        for key, value in s["engine"].items():
            if isinstance(value, int | float):
                out[f"{mode}/engine/{key}"] = value
        for row in summary["per_task"]:
            if mode in row["modes"]:
                out[f"{mode}/task_{row['task_id']:02d}/success_rate"] = row["modes"][mode]["success_rate"]
    for key, value in (summary.get("comparison") or {}).items():
        if isinstance(value, int | float) and value is not None:
            out[f"comparison/{key}"] = value
    return out


def log_to_wandb(summary: Mapping[str, Any], records: Sequence[Mapping[str, Any]], out_dir: str | Path,
                 config: Mapping | None = None, project: str = "rsd", name: str | None = None,
                 group: str | None = None, tags: Sequence[str] | None = None, mode: str | None = None,
                 max_videos: int = 50) -> str | None:
    """One W&B run with the metrics, the per-task and per-episode tables and the videos.

    ``mode`` null = online with an API key and network, offline otherwise (never prompts). Returns the
    run's folder (offline runs are uploaded later with ``wandb sync <folder>``).
    """
    import os

    from rsd.utils.wandb_setup import resolve_wandb_mode

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    out_dir = Path(out_dir)
    mode = resolve_wandb_mode(mode)
    run = wandb.init(project=project, name=name or out_dir.name, group=group, tags=list(tags or []),
                     job_type="eval", dir=str(out_dir), mode=mode, config=dict(config or {}),
                     reinit="create_new")  # never finishes a run the caller has open
    try:
        metrics = flat_metrics(summary)
        run.summary.update(metrics)
        header, rows = _table_rows(summary)
        per_task = wandb.Table(columns=header, data=rows)
        cols = ["task_id", "trial", "init_index", "mode", "success", "steps", "wall_time_s", "num_inferences",
                "avg_inference_ms", "error", "video"]
        episodes = wandb.Table(columns=cols, data=[
            [r["task_id"], r["trial"], r.get("init_index"), r["mode"], bool(r.get("success")), r.get("steps"),
             r.get("wall_time_s"), r.get("num_inferences"), _mean(r.get("inference_times_ms") or []),
             r.get("error"), r.get("video")] for r in records])
        payload: dict[str, Any] = {"eval/per_task": per_task, "eval/episodes": episodes}
        payload.update({f"eval/{k}": v for k, v in metrics.items()})
        videos = [r for r in records if r.get("video") and (out_dir / r["video"]).exists()][:max_videos]
        for r in videos:
            key = f"videos/task{r['task_id']:02d}_trial{r['trial']:02d}_{r['mode']}"
            caption = f"task {r['task_id']} trial {r['trial']} {r['mode']}: " \
                      f"{'success' if r.get('success') else 'failure'}"
            payload[key] = wandb.Video(str(out_dir / r["video"]), format="mp4", caption=caption)
        run.log(payload)
        run.summary["summary_text"] = format_guide_summary(summary)
        for fname in (SUMMARY_JSON, SUMMARY_TXT, TASKS_MD):
            if (out_dir / fname).exists():
                run.save(str(out_dir / fname), base_path=str(out_dir), policy="now")
        run_dir = run.dir
    finally:
        run.finish()
    if mode == "offline":
        log.info("W&B offline run written; upload with: wandb sync %s", Path(run_dir).parent)
    return run_dir
