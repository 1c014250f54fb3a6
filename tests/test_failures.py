"""Failure classes of episode records (rsd.analysis.failures): each rule, the table and its Markdown."""

from __future__ import annotations

import json

import pytest

from rsd.analysis.failures import failure_class, failure_table, format_markdown, main


def rec(task: int, trial: int, success: bool = False, error: str | None = None, mode: str = "baseline", **m):
    markers = {"lift_max_cm": 0.0, "other_lift_max_cm": 0.0, "end_lift_cm": 0.0, "end_dist_cm": 20.0,
               "gripper_closes": 0, **m}
    return {"suite": "libero_spatial", "task_id": task, "trial": trial, "mode": mode, "success": success,
            "error": error, "markers": markers}


@pytest.mark.parametrize(("record", "expected"), [
    (rec(0, 0, success=True), None),
    (rec(0, 0, error="ValueError: x"), "error"),
    (rec(0, 0, other_lift_max_cm=4.0), "wrong object"),
    (rec(0, 0), "never closed"),
    (rec(0, 0, gripper_closes=2), "missed grasp"),
    (rec(0, 0, lift_max_cm=10, end_lift_cm=9, end_dist_cm=2, gripper_closes=1), "held at timeout, over"),
    (rec(0, 0, lift_max_cm=10, end_lift_cm=9, end_dist_cm=12, gripper_closes=1), "held at timeout, away"),
    (rec(0, 0, lift_max_cm=10, end_lift_cm=0.5, end_dist_cm=2, gripper_closes=1), "released on target"),
    (rec(0, 0, lift_max_cm=10, end_lift_cm=0.5, end_dist_cm=12, gripper_closes=1), "dropped off target"),
    ({"task_id": 0, "trial": 0, "mode": "baseline", "success": False}, "no markers"),
])
def test_each_rule(record, expected):
    assert failure_class(record) == expected


def test_table_counts_the_last_record_per_episode_and_one_mode(tmp_path, capsys):
    records = [rec(0, 0), rec(0, 0, success=True), rec(0, 1, gripper_closes=1), rec(1, 0),
               rec(1, 0, mode="speculative", success=True)]
    with pytest.raises(ValueError, match="modes"):
        failure_table(records)
    table = failure_table(records, mode="baseline")
    assert table["tasks"] == {0: {"episodes": 2, "successes": 1, "missed grasp": 1},
                              1: {"episodes": 1, "never closed": 1}}
    assert table["total"] == {"episodes": 3, "successes": 1, "missed grasp": 1, "never closed": 1}
    md = format_markdown(table)
    assert "| task | successes | never closed | missed grasp |" in md and "| all | 1/3 | 1 | 1 |" in md
    path = tmp_path / "episodes.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records[:4]))
    assert main([str(tmp_path), "--out", str(tmp_path / "f.md")]) == 0
    assert "| 0 | 1/2 | 0 | 1 |" in (tmp_path / "f.md").read_text() and "Failure classes" in capsys.readouterr().out
