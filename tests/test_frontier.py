"""Operating points (rsd.analysis.frontier): evaluations joined with benchmark rows, paired against the baseline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rsd.analysis.compare import EvalFolder
from rsd.analysis.frontier import (
    best_point,
    eval_settings,
    match_row,
    operating_points,
    write_operating_points,
)
from rsd.analysis.report import main as report_main

FIELDS = {"name", "settings", "depth", "episodes", "successes", "wilson_95", "paired_vs_8_layer_baseline",
          "decode_ms_per_chunk", "baseline_8_layer_ms_per_chunk", "same_depth_baseline_ms_per_chunk",
          "speedup_vs_8_layer_baseline", "speedup_vs_same_depth_baseline", "main_calls_per_chunk_cache_frames",
          "main_calls_per_chunk_closed_loop", "acceptance_cache_frames", "acceptance_closed_loop",
          "drafted_layers_per_chunk_cache_frames", "drafted_layers_per_chunk_closed_loop", "benchmark_run",
          "machine", "meets_success_criterion", "success_rate"}


def _records(mode: str, outcomes: list[bool]) -> list[dict]:
    return [{"suite": "libero_spatial", "task_id": i // 10, "trial": i % 10, "mode": mode, "success": s,
             "steps": 10, "inference_times_ms": [1.0], "engine_stats": {}, "error": None}
            for i, s in enumerate(outcomes)]


def _bench_row(mode: str, speedup: float, depth: int = 8, epsilon: float | None = None) -> dict:
    return {"settings": {"mode": mode, "delta": None, "tau": None, "epsilon": epsilon, "depth": depth,
                         "early_exit": None}, "total_ms": 40.0 / speedup, "speedup": speedup,
            "speedup_vs_ref": 1.0, "main_calls_per_chunk": 8.0 / speedup, "acceptance": 0.5, "mean_depth": depth}


def _folder(tmp: Path, name: str, policy: dict, records: list[dict]) -> EvalFolder:
    return EvalFolder(path=tmp / name, label=name, summary={}, records=records, policy=policy)


def test_settings_and_matching() -> None:
    pol = {"acceptance": "epsilon", "epsilon": 0.1, "depth": 3, "delta": 1}
    assert eval_settings(pol, "speculative") == {"mode": "epsilon", "delta": None, "tau": None, "epsilon": 0.1,
                                                 "depth": 3, "early_exit": None}
    assert eval_settings(pol, "baseline")["mode"] == "baseline" and eval_settings(pol, "baseline")["depth"] == 3
    rows = [_bench_row("baseline", 1.0), _bench_row("baseline", 2.6, depth=3), _bench_row("epsilon", 3.5, 3, 0.1)]
    assert match_row(eval_settings(pol, "speculative"), rows) is rows[2]
    assert match_row(eval_settings(pol, "baseline"), rows) is rows[1]
    assert match_row(eval_settings({"acceptance": "strict"}, "speculative"), rows) is None


def test_points_pair_with_the_baseline_and_pick_the_best(tmp_path: Path) -> None:
    base = [True] * 80 + [False] * 20
    fast_ok = base.copy()
    fast_ok[0] = False  # one point below the baseline, far inside the noise
    fast_bad = [False] * 30 + base[30:]  # 30 fewer successes: a real loss
    baseline = _folder(tmp_path, "base", {"acceptance": "strict"}, _records("baseline", base))
    ok = _folder(tmp_path, "ok", {"acceptance": "epsilon", "epsilon": 0.1, "depth": 3},
                 _records("speculative", fast_ok))
    bad = _folder(tmp_path, "bad", {"acceptance": "relaxed", "delta": 3}, _records("speculative", fast_bad))
    rows = [_bench_row("baseline", 1.0), _bench_row("epsilon", 3.5, 3, 0.1),
            {**_bench_row("relaxed", 5.0), "settings": {**_bench_row("relaxed", 5.0)["settings"], "delta": 3}}]
    points = operating_points([baseline, ok, bad], baseline, {"rows": rows, "machine": "test"})
    by = {p["name"]: p for p in points}
    assert set(by) == {"baseline", "eps=0.1@D3", "delta=3"}
    assert all(FIELDS <= set(p) for p in points)
    assert by["eps=0.1@D3"]["paired_vs_8_layer_baseline"]["only_b"] == 1
    assert by["eps=0.1@D3"]["meets_success_criterion"]
    assert by["delta=3"]["paired_vs_8_layer_baseline"]["mcnemar_p"] < 0.05
    assert not by["delta=3"]["meets_success_criterion"]  # 5x faster but worse: not chosen
    assert best_point(points)["name"] == "eps=0.1@D3"
    lo, hi = by["baseline"]["wilson_95"]
    assert lo < 0.8 < hi


def test_report_cli_writes_operating_points(tmp_path: Path) -> None:
    from rsd.eval.runner import EPISODES_FILE
    from rsd.eval.summary import summarize, write_summary

    def write(name: str, policy: dict, recs: list[dict]) -> Path:
        d = tmp_path / name
        d.mkdir()
        (d / EPISODES_FILE).write_text("".join(json.dumps(r) + "\n" for r in recs))
        write_summary(d, summarize(recs, suite="libero_spatial", extra={"policy": policy}))
        return d

    base = write("base", {"factory": "engine", "acceptance": "strict"}, _records("baseline", [True, False] * 10))
    spec = write("spec", {"factory": "engine", "acceptance": "epsilon", "epsilon": 0.2},
                 _records("speculative", [True, False] * 10))
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"machine": "test", "rows": [_bench_row("baseline", 1.0),
                                                             _bench_row("epsilon", 1.4, epsilon=0.2)]}))
    out = tmp_path / "out"
    assert report_main([str(base), str(spec), "--out", str(out), "--benchmark", str(bench),
                        "--baseline", str(base)]) == 0
    data = json.loads((out / "operating_points.json").read_text())
    assert data["best"] == "eps=0.2" and (out / "frontier.png").stat().st_size > 1000
    assert all(FIELDS <= set(p) for p in data["points"])
    assert report_main([str(base), "--out", str(out), "--benchmark", str(bench)]) == 2


def test_write_refuses_a_baseline_without_baseline_episodes(tmp_path: Path) -> None:
    spec = _folder(tmp_path, "s", {"acceptance": "strict"}, _records("speculative", [True]))
    bench = tmp_path / "b.json"
    bench.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="no baseline-mode episodes"):
        write_operating_points([spec], spec, bench, tmp_path / "o")


def test_speedups_come_from_the_ms_columns_of_one_run_and_acceptance_from_counts(tmp_path: Path) -> None:
    """Issue 20: speedups are ratios of the total ms shown (not a copied field), acceptance is accepted /
    drafted layers from the counts, closed-loop and cache-frame figures stay apart, the closed-loop main
    calls come from ``main_steps_per_inference`` (what summaries write), and the JSON is strict."""
    base = _folder(tmp_path, "base", {"acceptance": "strict"}, _records("baseline", [True, False] * 5))
    summary = {"modes": {"speculative": {"engine": {
        "inferences": 10, "main_steps_per_inference": 5.5, "acceptance_rate": 0.99,
        "totals": {"accepted_layers": 6, "drafted_layers": 20}}}}}
    spec = EvalFolder(path=tmp_path / "spec", label="spec", summary=summary, policy={"acceptance": "epsilon",
                      "epsilon": 0.2}, records=_records("speculative", [True, False] * 5))
    rows = [{**_bench_row("baseline", 1.0), "total_ms": 100.0, "speedup": 7.0, "mode": "baseline",
             "reference": "baseline", "acceptance": float("nan")},
            {**_bench_row("epsilon", 1.0, epsilon=0.2), "total_ms": 80.0, "speedup": 9.9, "mode": "epsilon_0.2",
             "reference": "baseline", "acceptance": 0.9, "accepted_layers": 45, "drafted_layers": 60,
             "chunks": 20}]
    points = {p["name"]: p for p in operating_points([base, spec], base, {"rows": rows, "run_id": "r1"})}
    eps = points["eps=0.2"]
    assert eps["speedup_vs_8_layer_baseline"] == pytest.approx(100.0 / 80.0)  # not the row's 9.9
    assert eps["baseline_8_layer_ms_per_chunk"] == 100.0 and eps["decode_ms_per_chunk"] == 80.0
    assert eps["acceptance_cache_frames"] == pytest.approx(45 / 60) and eps["drafted_layers_per_chunk_cache_frames"] == 3
    assert eps["acceptance_closed_loop"] == pytest.approx(6 / 20) and eps["drafted_layers_per_chunk_closed_loop"] == 2
    assert eps["main_calls_per_chunk_closed_loop"] == 5.5 and eps["benchmark_run"] == "r1"
    assert points["baseline"]["acceptance_cache_frames"] is None  # NaN in the row: null, not NaN
    bench = tmp_path / "bench.json"
    bench.write_text(json.dumps({"rows": rows, "run_id": "r1"}))  # json writes the NaN: a legacy file
    paths = write_operating_points([base, spec], base, bench, tmp_path / "out")
    text = paths["json"].read_text()
    assert "NaN" not in text
    json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in operating_points.json"))
    assert "| 80.00 | 100.00 | 1.25x |" in paths["md"].read_text()


def test_a_benchmark_file_of_several_runs_is_refused(tmp_path: Path) -> None:
    base = _folder(tmp_path, "base", {"acceptance": "strict"}, _records("baseline", [True]))
    rows = [{**_bench_row("baseline", 1.0), "run_id": "a"}, {**_bench_row("baseline", 2.0, depth=2), "run_id": "b"}]
    with pytest.raises(ValueError, match="one table must be one run"):
        operating_points([base], base, {"rows": rows})
    with pytest.raises(ValueError, match="merges several runs"):
        operating_points([base], base, {"rows": rows[:1], "merged_from": ["x.json", "y.json"]})


def test_an_epsilon_run_is_named_by_its_epsilon_not_by_the_default_delta() -> None:
    from rsd.analysis.compare import threshold_of

    assert threshold_of({"acceptance": "epsilon", "epsilon": 0.2, "delta": 1}) == (0.2, "epsilon eps=0.2")
    assert threshold_of({"acceptance": "relaxed", "delta": 2, "epsilon": None}) == (2.0, "relaxed delta=2")
    assert threshold_of({"acceptance": "strict", "delta": 1}) == (0.0, "strict")
