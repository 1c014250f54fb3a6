"""The W&B run of an evaluation: metrics, per-task and per-episode tables, videos (offline without an account)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.eval.summary import (
    SUMMARY_JSON,
    SUMMARY_TXT,
    TASK_COLUMNS,
    TASKS_MD,
    format_guide_summary,
    heldout_line,
    mean_or_none,
    task_table,
)
from rsd.utils.wandb_setup import resolve_wandb_mode

log = logging.getLogger(__name__)


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
    for row in task_table(summary):  # per task: the rate, its interval and the counts behind them
        for key in ("success_rate", "success_ci_low", "success_ci_high", "successes", "episodes"):
            if isinstance(row[key], int | float):
                out[f"{row['mode']}/task_{row['task_id']:02d}/{key}"] = row[key]
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

    os.environ.setdefault("WANDB_SILENT", "true")
    import wandb

    out_dir = Path(out_dir)
    mode = resolve_wandb_mode(mode)
    heldout = (summary.get("heldout") or {}).get("status")
    tags = list(tags or []) + ([] if heldout in (None, "held_out", "no_training_data") else ["NOT-HELD-OUT"])
    run = wandb.init(project=project, name=name or out_dir.name, group=group, tags=tags, notes=heldout_line(summary),
                     job_type="eval", dir=str(out_dir), mode=mode, config=dict(config or {}),
                     reinit="create_new")  # never finishes a run the caller has open
    try:
        metrics = flat_metrics(summary)
        run.summary.update({**metrics, "heldout": heldout or "unknown"})
        per_task = wandb.Table(columns=TASK_COLUMNS[1:], data=[[r[c] for c in TASK_COLUMNS[1:]]
                                                                for r in task_table(summary)])
        cols = ["task_id", "trial", "init_index", "mode", "success", "steps", "wall_time_s", "num_inferences",
                "avg_inference_ms", "error", "video"]
        episodes = wandb.Table(columns=cols, data=[
            [r["task_id"], r["trial"], r.get("init_index"), r["mode"], bool(r.get("success")), r.get("steps"),
             r.get("wall_time_s"), r.get("num_inferences"), mean_or_none(r.get("inference_times_ms") or []),
             r.get("error"), r.get("video")] for r in records])
        payload: dict[str, Any] = {"eval/per_task": per_task, "eval/episodes": episodes}
        cmp_ = summary.get("comparison")
        if cmp_:  # the paired table of mode=both with its exact McNemar p-value
            cols = ["paired_episodes", "both_success", "only_speculative", "only_baseline", "neither", "mcnemar_p",
                    "significant"]
            payload["eval/paired"] = wandb.Table(columns=cols, data=[[cmp_[c] for c in cols]])
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
