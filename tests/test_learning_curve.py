"""The learning curve (rsd.analysis.learning_curve): successes recomputed from records, paired with the point before."""

from __future__ import annotations

import gzip
import json

import pytest

from rsd.analysis.learning_curve import main, write_curve


def write_records(folder, successes: list[bool], mode: str = "baseline", gz: bool = False) -> None:
    folder.mkdir(parents=True)
    lines = [json.dumps({"suite": "libero_spatial", "task_id": i % 2, "trial": i // 2, "init_index": i // 2,
                         "mode": mode, "success": s}) for i, s in enumerate(successes)]
    path = folder / ("episodes.jsonl.gz" if gz else "episodes.jsonl")
    with (gzip.open(path, "wt") if gz else open(path, "w")) as f:
        f.write("\n".join(lines) + "\n")


def test_curve_recomputes_points_sorts_by_minutes_and_pairs_neighbours(tmp_path, capsys):
    write_records(tmp_path / "long", [True] * 18 + [False] * 2, gz=True)
    write_records(tmp_path / "short", [True] * 10 + [False] * 10)
    spec = {"title": "toy", "points": [
        {"label": "e10", "eval_dir": "long", "train_minutes": 26.0, "note": "from the run's log"},
        {"label": "e2", "eval_dir": str(tmp_path / "short"), "train_minutes": 5.0}]}
    (tmp_path / "curve.json").write_text(json.dumps(spec))
    assert main([str(tmp_path / "curve.json")]) == 0
    md = (tmp_path / "learning_curve.md").read_text()
    rows = [line for line in md.splitlines() if line.startswith("| e")]
    assert rows[0].startswith("| e2 | 5.0 | 10/20 | 50.0 % [29.9, 70.1]")
    assert rows[1].startswith("| e10 | 26.0 | 18/20 | 90.0 % [69.9, 97.2]")
    # the first 10 pairs succeed in both; of the other 10 only the long run succeeds in 8
    assert "only this 8 / only previous 0 of 20, McNemar p = 0.0078" in rows[1]
    assert "- e10: from the run's log" in md
    assert (tmp_path / "learning_curve.png").stat().st_size > 1000
    assert "learning_curve.md" in capsys.readouterr().out


def test_curve_refuses_incomplete_points_and_mixed_modes(tmp_path):
    write_records(tmp_path / "a", [True, False])
    (tmp_path / "bad.json").write_text(json.dumps({"points": [{"label": "x", "eval_dir": "a"}]}))
    with pytest.raises(ValueError, match="train_minutes"):
        write_curve(tmp_path / "bad.json")
    both = tmp_path / "both"
    write_records(both, [True, True])
    with open(both / "episodes.jsonl", "a") as f:
        f.write(json.dumps({"suite": "libero_spatial", "task_id": 0, "trial": 0, "mode": "speculative",
                            "success": False}) + "\n")
    (tmp_path / "mixed.json").write_text(json.dumps({"points": [{"label": "x", "eval_dir": "both",
                                                                 "train_minutes": 1}]}))
    with pytest.raises(ValueError, match="modes"):
        write_curve(tmp_path / "mixed.json")
    (tmp_path / "one.json").write_text(json.dumps({"points": [{"label": "x", "eval_dir": "both", "train_minutes": 1,
                                                               "mode": "speculative"}]}))
    write_curve(tmp_path / "one.json")
    assert "| x | 1.0 | 0/1 |" in (tmp_path / "learning_curve.md").read_text()
    (tmp_path / "none.json").write_text(json.dumps({"points": [{"label": "x", "eval_dir": "both", "train_minutes": 1,
                                                                "mode": "relaxed"}]}))
    with pytest.raises(ValueError, match="no episodes of mode 'relaxed'"):
        write_curve(tmp_path / "none.json")
