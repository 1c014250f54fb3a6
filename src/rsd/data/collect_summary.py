"""The collection's per-task table: built from the tasks' statistics, printed, and saved beside the demos
(``collect_summary.json`` / ``collect_summary.md``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SUMMARY_JSON = "collect_summary.json"
SUMMARY_MD = "collect_summary.md"


def build_summary(suite: str, demos_per_task: int, images: bool, workers: int, rows: list[dict], wall: float,
             suite_dir: Path) -> dict[str, Any]:
    attempts = sum(int(r.get("attempts") or 0) for r in rows)
    successes = sum(int(r.get("successes") or 0) for r in rows)
    return {
        "suite": suite,
        "demos_per_task": demos_per_task,
        "images": images,
        "init_source": rows[0].get("init_source", "official") if rows else None,
        "workers": workers,
        "out_dir": str(suite_dir),
        "wall_time_s": round(wall, 1),
        "attempts": attempts,
        "successes": successes,
        "success_rate": round(successes / attempts, 4) if attempts else None,
        "tasks": rows,
    }


def format_table(summary: dict[str, Any]) -> str:
    """The per-task table as Markdown."""
    lines = [
        f"Scripted-expert collection: {summary['suite']}, {summary['demos_per_task']} demos/task, "
        f"images={summary['images']}, workers={summary['workers']}, init states: "
        f"{summary.get('init_source', 'official')}, wall time {summary['wall_time_s']:.0f} s",
        "",
        "| task | name | attempts | successes | success rate | mean length | note |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for r in summary["tasks"]:
        rate = r.get("success_rate")
        mean = r.get("mean_episode_length")
        note = "existing file" if r.get("skipped") else ""
        if r.get("failed_init_states"):
            what = "failed attempts" if r.get("init_source") == "generated" else "failed init states"
            note = (note + "; " if note else "") + what + " " + ",".join(map(str, r["failed_init_states"]))
        if r.get("rejected_scenes"):
            note = (note + "; " if note else "") + f"{r['rejected_scenes']} scenes rejected (= an official state)"
        lines.append(
            f"| {r.get('task_id')} | {r.get('name')} | {r.get('attempts', '-')} | {r.get('successes', '-')} | "
            f"{'-' if rate is None else f'{100 * rate:.1f} %'} | {'-' if mean is None else mean} | {note} |"
        )
    rate = summary.get("success_rate")
    lines.append(
        f"| all | | {summary['attempts']} | {summary['successes']} | "
        f"{'-' if rate is None else f'{100 * rate:.1f} %'} | | |"
    )
    return "\n".join(lines)


def write_summary(summary: dict[str, Any], suite_dir: Path) -> None:
    (suite_dir / SUMMARY_JSON).write_text(json.dumps(summary, indent=1))
    (suite_dir / SUMMARY_MD).write_text(format_table(summary) + "\n")
    parts = suite_dir / ".parts"
    if parts.is_dir() and not any(parts.iterdir()):
        parts.rmdir()
