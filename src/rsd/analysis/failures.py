"""Failure modes of an evaluation, per task, from its episode records: ``python -m rsd.analysis.failures <run>``.

Each record of a rollout carries ``markers`` (``rsd.eval.rollout.GoalMarkers``: object poses read from the
simulator along the episode). A failed episode is put in the first class whose rule holds:

============================  ==========================================================================
class                         rule (``LIFT_CM`` = 3 cm, ``NEAR_CM`` = 5 cm)
============================  ==========================================================================
``error``                     the episode raised (its error is recorded)
``wrong object``              another object rose >= LIFT_CM while the goal object never did
``never closed``              the goal object never rose >= LIFT_CM and the gripper never closed
``missed grasp``              the goal object never rose >= LIFT_CM although the gripper closed
``held at timeout, over``     still lifted at the end, within NEAR_CM (xy) of the target
``held at timeout, away``     still lifted at the end, farther than NEAR_CM from the target
``released on target``        was lifted, ended on the table within NEAR_CM of the target, goal not met
``dropped off target``        was lifted, ended down farther than NEAR_CM from the target
============================  ==========================================================================

Records without markers (runs before they were recorded) are counted as ``no markers``. The classes come from
positions only: "dropped" and "placed beside the plate" look the same; a video (``video=N``) tells them apart.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.analysis.sequential import read_records

LIFT_CM = 3.0
NEAR_CM = 5.0
CLASSES = ("error", "wrong object", "never closed", "missed grasp", "held at timeout, over",
           "held at timeout, away", "released on target", "dropped off target", "no markers")


def failure_class(rec: Mapping[str, Any]) -> str | None:
    """The failure class of one episode record (None for a success); see the module docstring."""
    if rec.get("success"):
        return None
    if rec.get("error"):
        return "error"
    m = rec.get("markers") or {}
    if m.get("lift_max_cm") is None:
        return "no markers"
    lifted = m["lift_max_cm"] >= LIFT_CM
    if not lifted:
        if (m.get("other_lift_max_cm") or 0.0) >= LIFT_CM:
            return "wrong object"
        return "never closed" if m.get("gripper_closes", 0) == 0 else "missed grasp"
    near = m.get("end_dist_cm") is not None and m["end_dist_cm"] < NEAR_CM
    if (m.get("end_lift_cm") or 0.0) >= LIFT_CM:
        return "held at timeout, over" if near else "held at timeout, away"
    return "released on target" if near else "dropped off target"


def failure_table(records: Iterable[Mapping[str, Any]], mode: str | None = None) -> dict[str, Any]:
    """``{"tasks": {task_id: {"episodes", "successes", class: count, ...}}, "total": {...}}`` for one mode
    (``None``: the only mode in the records; several modes need a choice)."""
    records = list(records)
    modes = sorted({r["mode"] for r in records})
    if mode is None:
        if len(modes) > 1:
            raise ValueError(f"records hold modes {modes}: pass one")
        mode = modes[0] if modes else None
    latest = {(r["task_id"], r["trial"]): r for r in records if r["mode"] == mode}  # the last record wins
    tasks: dict[int, Counter] = {}
    for (task_id, _), rec in sorted(latest.items()):
        row = tasks.setdefault(int(task_id), Counter())
        row["episodes"] += 1
        cls = failure_class(rec)
        row["successes" if cls is None else cls] += 1
    total = sum(tasks.values(), Counter())
    return {"mode": mode, "tasks": {t: dict(c) for t, c in tasks.items()}, "total": dict(total)}


def format_markdown(table: Mapping[str, Any], task_names: Mapping[int, str] | None = None) -> str:
    """The table as Markdown: one row per task, one column per failure class that occurs."""
    used = [c for c in CLASSES if table["total"].get(c)]
    head = ["task", "successes", *used]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows = [*table["tasks"].items(), ("all", table["total"])]
    for task_id, row in rows:
        name = f"{task_id}" + (f" {task_names[task_id]}" if task_names and task_id in task_names else "")
        cells = [name, f"{row.get('successes', 0)}/{row.get('episodes', 0)}", *(str(row.get(c, 0)) for c in used)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.analysis.failures", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="an evaluation folder (episodes.jsonl[.gz]) or a records file")
    parser.add_argument("--mode", default=None, help="the mode to classify when the run holds several")
    parser.add_argument("--out", default=None, help="also write the Markdown table to this file")
    args = parser.parse_args(argv)
    table = failure_table(read_records(Path(args.run)), args.mode)
    text = f"Failure classes of {args.run} (mode {table['mode']}; rules: rsd.analysis.failures)\n\n" \
        + format_markdown(table)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
