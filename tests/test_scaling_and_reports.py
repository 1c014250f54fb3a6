"""Comparing runs and scaling out: compare notebook, guide report, DDP on 2 CPU processes, sharded
evaluation + merge, determinism of evaluations.

The simulator tests run a tiny evaluation (1 task, 3 trials, both modes, 8 steps) with
``harness_policies.StatsPolicy`` (no-op actions, deterministic engine statistics) in this process and, for the
shards, through ``evaluate.py -m shard=0/2,1/2`` (workers import it by name: ``PYTHONPATH`` has ``tests/``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from rsd import PROJECT_ROOT
from rsd.analysis import compare, notebook, plots
from rsd.analysis.report import build_report
from rsd.analysis.report import main as report_cli
from rsd.eval.merge import MergeError, merge_shards, stable_view
from rsd.eval.merge import main as merge_cli
from rsd.eval.runner import EPISODES_FILE, HELDOUT_FILE, RUN_FILE, EpisodeLog, Job, load_records, record_key
from rsd.eval.shard import parse_shard, select_shard, shard_dirname
from rsd.eval.summary import summarize, write_summary

TESTS_DIR = Path(__file__).resolve().parent
SUITE = "libero_spatial"


# --------------------------------------------------------------------------------------------------
# Fixture folders: evaluations and training runs as the harness / Lightning's CSVLogger write them


def _ep(task, trial, mode, success, times, rss=None, cuda=None, **engine):
    return {"suite": SUITE, "task_id": task, "trial": trial, "init_index": trial, "mode": mode,
            "success": success, "steps": 100 if success else 220, "wall_time_s": 3.0,
            "inference_times_ms": times, "num_inferences": len(times), "engine_stats": engine,
            "action_digest": None, "error": None, "traceback": None, "task_name": f"task_{task}",
            "instruction": f"do task {task}", "video": None, "peak_rss_mb": rss, "peak_cuda_mb": cuda}


def _write_eval(folder: Path, records: list[dict], policy: dict) -> Path:
    folder.mkdir(parents=True)
    EpisodeLog(folder / EPISODES_FILE).rewrite(records)
    (folder / RUN_FILE).write_text(json.dumps({"suite": SUITE, "max_steps": 220, "policy": policy}))
    (folder / HELDOUT_FILE).write_text(json.dumps({"status": "no_training_data", "allow_train_states": False,
                                                   "overlapping_episodes": 0}))
    write_summary(folder, summarize(records, suite=SUITE, extra={"out_dir": str(folder), "policy": policy}))
    return folder


def _spec_stats(accepted: int):
    # per episode: 2 chunks; per chunk backbone 5, draft 2, main 10, decode 1 ms; 6 layers drafted
    return dict(backbone_ms=10.0, draft_ms=4.0, main_ms=20.0, decode_ms=2.0, drafted_layers=6,
                accepted_layers=accepted, main_steps=16 - accepted)


def make_fixture_logs(root: Path) -> Path:
    """``root/logs`` with 3 evaluations (strict both-mode, relaxed delta 1 and 2) and 2 training runs."""
    logs = root / "logs"
    policy = {"factory": "engine", "suite": SUITE, "acceptance": "strict", "delta": 1, "tau": None}
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    # strict: speculative 3/4 success, 25 ms, acceptance 3/6; baseline 2/4, 50 ms; RSS peaks 1100 vs 1000 MB
    strict = [_ep(t, i, "speculative", (t, i) != (1, 1), [20.0, 30.0], rss=[1000, 1100, 1050, 1020][k],
                  **_spec_stats(3)) for k, (t, i) in enumerate(pairs)]
    strict += [_ep(t, i, "baseline", i == 0, [50.0, 50.0], rss=1000.0, backbone_ms=10.0, main_ms=80.0,
                   decode_ms=2.0, main_steps=16) for t, i in pairs]
    _write_eval(logs / "eval/runs/strict", strict, policy)
    d1 = [_ep(t, i, "speculative", (t, i) != (0, 1), [22.0, 24.0], rss=1200.0, cuda=2000.0, **_spec_stats(4))
          for t, i in pairs]
    _write_eval(logs / "eval/runs/relaxed_d1", d1, {**policy, "acceptance": "relaxed", "delta": 1})
    d2 = [_ep(t, i, "speculative", i == 1, [20.0, 20.0], rss=1200.0, cuda=2100.0, **_spec_stats(5))
          for t, i in pairs]
    _write_eval(logs / "eval/runs/relaxed_d2", d2, {**policy, "acceptance": "relaxed", "delta": 2})
    # training runs: Lightning CSV rows are sparse (one row per logging call)
    rows = []
    for epoch in range(3):
        rows.append({"epoch": epoch, "step": 10 * epoch + 5, "train/loss_step": 2.0 - 0.1 * epoch})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "val/accuracy": 0.3 + 0.1 * epoch,
                     **{f"val/token_acc_L{k}": 0.5 + 0.1 * epoch - 0.1 * k for k in range(3)},
                     **{f"val/exact_L{k}": 0.2 + 0.1 * epoch - 0.05 * k for k in range(3)}})
    run = logs / "draft_proj/runs/2024-01-01_00-00-00/csv"
    run.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    rows = [{"epoch": e, "step": e, **{f"val/acc_L{k}": 0.9 - 0.1 * k + 0.01 * e for k in range(8)},
             **{f"val/exact_L{k}": 0.5 - 0.05 * k for k in range(8)}, "val/exact_all": 0.1} for e in range(2)]
    run = logs / "main_head/runs/2024-01-02_00-00-00/csv"
    run.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(run / "metrics.csv", index=False)
    return logs


@pytest.fixture(scope="module")
def fixture_logs(tmp_path_factory) -> Path:
    return make_fixture_logs(tmp_path_factory.mktemp("fixture"))


# --------------------------------------------------------------------------------------------------
# Report, comparison tables, notebook


def test_report_markdown_has_the_guide_numbers(fixture_logs, tmp_path):
    runs = fixture_logs / "eval/runs"
    code = report_cli([str(runs / "strict"), str(runs / "relaxed_d1"), str(runs / "relaxed_d2"),
                       "--out", str(tmp_path / "report")])
    assert code == 0
    md = (tmp_path / "report/report.md").read_text()
    # strict, same folder (mode=both): its own baseline, paired by task and init state
    assert "## strict vs baseline\n" in md
    assert "Episodes: 4 speculative, 4 baseline (same folder), acceptance: strict." in md
    # success rates with their 95 % Wilson interval (3/4: 30.1-95.4 %, 2/4: 15.0-85.0 %); the difference
    # with the exact McNemar verdict: 1 discordant pair of 4 -> p = 1
    for line in ("| Metric | Baseline | Speculative (RSD) | Improvement |",
                 "| Success Rate | 50.0% [15.0, 85.0] | 75.0% [30.1, 95.4] | +25.0 pts, no significant difference "
                 "(exact McNemar p = 1.000) |",
                 "| Inference Time | 50.0 ms | 25.0 ms | 2.00x faster (-50.0%) |",
                 "| Draft Acceptance | n/a | 50.0% | - |",
                 "| Peak Memory (RSS) | 1,000 MB | 1,100 MB | +10.0% |"):
        assert line in md, line
    strict = md.split("## strict vs baseline\n")[1].split("## ")[0]
    assert "| Paired episodes | Both succeed | Only speculative | Only baseline | Neither | McNemar p (exact) | " \
           "Verdict |" in strict
    assert "| 4 | 2 | 1 | 0 | 1 | 1.000 | no significant difference |" in strict
    # relaxed runs are compared with the strict folder's baseline (same init states, so still paired);
    # GPU memory only on the speculative side
    assert "## relaxed_d1 vs baseline of strict" in md
    # ... but their times come from other runs: no ratio of ms measured in different processes
    assert "| Inference Time | 50.0 ms | 23.0 ms | not compared (different runs) |" in md
    assert "| Draft Acceptance | n/a | 66.7% | - |" in md
    assert "| Peak Memory (GPU) | n/a | 2,000 MB | n/a |" in md
    assert "| Draft Acceptance | n/a | 83.3% | - |" in md  # relaxed_d2
    d2 = md.split("## relaxed_d2 vs baseline of strict")[1].split("## ")[0]
    assert "| 4 | 0 | 2 | 2 | 0 | 1.000 | no significant difference |" in d2  # succeeds where the baseline fails
    assert "| strict | baseline | baseline | 4 | 50.0% [15.0, 85.0] | 50.0 ms | n/a | n/a | 40.0 ms | 1,000 MB | n/a |" \
        in md
    # the acceptance sweep: strict first, then relaxed by delta, each paired with the baseline
    sweep = md.split("## Acceptance sweep")[1].split("## All runs")[0]
    rows = [line for line in sweep.splitlines() if line.startswith("| ") and "Acceptance rule" not in line]
    assert rows == [
        "| strict | strict | 4 | 50.0% | 1.50 | 75.0% [30.1, 95.4] | 2 / 1 / 0 / 1 | 1.000 (no significant difference)"
        " | 25.0 ms | 2.00x faster (-50.0%) |",
        "| relaxed delta=1 | relaxed_d1 | 4 | 66.7% | 2.00 | 75.0% [30.1, 95.4] | 2 / 1 / 0 / 1 | 1.000 (no significant "
        "difference) | 23.0 ms | not compared (different runs) |",
        "| relaxed delta=2 | relaxed_d2 | 4 | 83.3% | 2.50 | 50.0% [15.0, 85.0] | 0 / 2 / 2 / 0 | 1.000 (no significant "
        "difference) | 20.0 ms | not compared (different runs) |"]
    for name in ("report.png", "sweep.png"):
        png = tmp_path / "report" / name
        assert png.stat().st_size > 10_000 and png.read_bytes()[:4] == b"\x89PNG"
    data = json.loads((tmp_path / "report/report.json").read_text())
    assert [c["label"] for c in data["comparisons"]] == ["strict", "relaxed_d1", "relaxed_d2"]
    assert data["comparisons"][0]["speculative"]["acceptance_rate"] == pytest.approx(0.5)
    paired = data["comparisons"][0]["paired"]
    assert (paired["pairs"], paired["only_a"], paired["only_b"], paired["mcnemar_p"]) == (4, 1, 0, 1.0)
    assert data["runs"][0]["success_ci_low"] == pytest.approx(0.3006, abs=1e-4)  # Wilson 3/4
    # a folder above evaluations is expanded; a folder without any is refused
    assert len(json.loads(build_report([runs], tmp_path / "r2")["json"].read_text())["runs"]) == 4
    assert report_cli([str(tmp_path / "nothing"), "--out", str(tmp_path / "r3")]) == 2


def test_compare_tables_training_metrics_and_wandb_rows(fixture_logs, monkeypatch):
    runs = compare.load_local(fixture_logs)
    assert runs.source == "local" and len(runs.folders) == 3
    ev = runs.evals.set_index(["label", "mode"])
    strict = ev.loc[("eval/runs/strict", "speculative")]
    assert strict["avg_draft_ms"] == pytest.approx(2.0) and strict["avg_main_ms"] == pytest.approx(10.0)
    assert strict["avg_backbone_ms"] == pytest.approx(5.0) and strict["avg_decode_ms"] == pytest.approx(1.0)
    assert strict["threshold_label"] == "strict" and strict["peak_rss_mb"] == 1100
    assert ev.loc[("eval/runs/relaxed_d2", "speculative")]["threshold"] == 2.0
    assert ev.loc[("eval/runs/strict", "baseline")]["acceptance_rate"] is None or \
        pd.isna(ev.loc[("eval/runs/strict", "baseline")]["acceptance_rate"])
    tasks = runs.tasks[(runs.tasks["label"] == "eval/runs/strict") & (runs.tasks["mode"] == "baseline")]
    assert tasks["success_rate"].tolist() == [0.5, 0.5]
    draft = runs.train["draft_proj/runs/2024-01-01_00-00-00"]
    assert draft["epoch"].tolist() == [0, 1, 2]  # sparse CSV rows -> one row per epoch
    assert draft["val/exact_L1"].tolist() == pytest.approx([0.15, 0.25, 0.35])
    assert draft["train/loss_step"].tolist() == pytest.approx([2.0, 1.9, 1.8])
    assert set(compare.layer_columns(draft)) == {"token_acc", "exact"}
    assert [layer for layer, _ in compare.layer_columns(runs.train["main_head/runs/2024-01-02_00-00-00"])["acc"]] \
        == list(range(8))
    # the figures draw the fixture's numbers
    import matplotlib.pyplot as plt

    fig = plots.plot_layer_curves(runs.train)
    axes = {a.get_title(): a for a in fig.axes}
    assert set(axes) == {"val/exact_L*", "val/token_acc_L*", "val/acc_L*"}
    assert len(axes["val/acc_L*"].lines) == 8 and len(axes["val/token_acc_L*"].lines) == 3
    assert len(axes["val/exact_L*"].lines) == 3 + 8  # the draft's 3 layers and the main head's 8
    assert list(axes["val/acc_L*"].lines[2].get_ydata()) == pytest.approx([0.7, 0.71])  # 0.9 - 0.1 k + 0.01 e
    assert list(axes["val/token_acc_L*"].lines[1].get_ydata()) == pytest.approx([0.4, 0.5, 0.6])
    plt.close(fig)
    fig = plots.plot_latency_breakdown(runs.evals)
    (ax,) = fig.axes
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    totals = {}
    for patch in ax.patches:  # stacked bars: backbone + draft + main + decode per run
        x = round(patch.get_x() + patch.get_width() / 2)
        totals[ticks[x]] = totals.get(ticks[x], 0.0) + patch.get_height()
    # per chunk: speculative 5 + 2 + 10 + 1 ms; baseline 5 + 0 + 40 + 1 ms
    assert totals == pytest.approx({"relaxed delta=1": 18.0, "relaxed delta=2": 18.0, "strict": 18.0,
                                    "baseline": 46.0})
    plt.close(fig)
    fig = plots.plot_success_per_task(runs.tasks)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1"]
    plt.close(fig)
    assert plots.plot_layer_curves({}) is None

    # W&B: only with an API key and a mode that is not offline; its rows have the local rows' shape
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not compare.wandb_online("online")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert compare.wandb_online("online") and not compare.wandb_online("offline")
    assert compare.load_runs(fixture_logs, wandb_mode="offline").source == "local"

    class FakeRun:
        name, id, url = "eval-run", "abc", "https://example.invalid/run"
        config = {"suite": SUITE, "policy": {"acceptance": "relaxed", "delta": 2, "tau": None}}
        summary = {"speculative/success_rate": 0.8, "speculative/episodes": 10, "speculative/avg_inference_ms": 30.0,
                   "speculative/engine/acceptance_rate": 0.7, "speculative/engine/avg_draft_ms": 3.0,
                   "speculative/task_00/success_rate": 0.8, "baseline/success_rate": 0.9}

    ev, tasks = compare.wandb_eval_rows([FakeRun()])
    row = ev.set_index("mode").loc["speculative"]
    assert row["acceptance_rate"] == 0.7 and row["avg_draft_ms"] == 3.0 and row["threshold_label"] == "relaxed delta=2"
    assert list(ev.columns) == compare.EVAL_COLUMNS and tasks["success_rate"].tolist() == [0.8]


def test_plots_draw_intervals_as_error_bars_and_name_runs_by_rule(fixture_logs):
    import matplotlib.pyplot as plt
    from matplotlib.container import ErrorbarContainer

    from rsd.analysis.report import comparisons, plot
    from rsd.analysis.stats import wilson_interval

    runs = compare.load_local(fixture_logs)
    ev = runs.evals
    strict = ev[(ev["label"] == "eval/runs/strict") & (ev["mode"] == "speculative")].iloc[0]
    assert (strict["success_ci_low"], strict["success_ci_high"]) == pytest.approx(wilson_interval(3, 4))
    assert {"success_ci_low", "success_ci_high"} <= set(runs.tasks.columns)
    assert runs.tasks["success_ci_high"].notna().all()
    # short names: the acceptance rule, "baseline"; clashing names get the run's folder name, then a counter
    assert compare.short_labels(ev) == ["relaxed delta=1", "relaxed delta=2", "strict", "baseline"]
    clash = [{"mode": "baseline", "label": "a/x"}, {"mode": "baseline", "label": "b/y"},
             {"mode": "speculative", "threshold_label": "strict", "label": "s"},
             {"mode": "speculative", "threshold_label": "strict", "label": "s"}]
    assert compare.short_labels(clash) == ["baseline (x)", "baseline (y)", "strict #1", "strict #2"]

    fig = plots.plot_acceptance_vs_success(ev)
    ax1, ax2 = fig.axes
    ticks = [t.get_text() for t in ax1.get_xticklabels()]
    assert ticks == ["strict", "relaxed delta=1", "relaxed delta=2"]  # sorted by rule, no paths
    assert not ax2.texts and not ax1.texts  # no annotations printed over the points
    assert sorted(t.get_text() for t in ax2.get_legend().get_texts()) == sorted(ticks)
    bars = [c for c in ax1.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 1 and bars[0].has_yerr
    # the error bar of "strict" spans its Wilson interval
    segs = bars[0].lines[2][0].get_segments()
    assert [float(segs[0][0][1]), float(segs[0][1][1])] == pytest.approx(list(wilson_interval(3, 4)))
    assert sum(isinstance(c, ErrorbarContainer) for c in ax2.containers) == 3
    plt.close(fig)

    rows = ev.to_dict("records")
    fig = plot(comparisons(rows, compare.records_by_run(runs.folders)), rows, "t")
    success_ax = next(a for a in fig.axes if a.get_title().startswith("success rate"))
    assert [t.get_text() for t in success_ax.get_xticklabels()] == compare.short_labels(ev)
    assert any(isinstance(c, ErrorbarContainer) for c in success_ax.containers)
    plt.close(fig)
    fig = plots.plot_success_per_task(runs.tasks)
    assert any(isinstance(c, ErrorbarContainer) for c in fig.axes[0].containers)
    plt.close(fig)

    class FakeRun:  # W&B rows: the interval is recomputed from the logged counts
        name, id, url = "eval-run", "abc", "https://example.invalid/run"
        config = {"suite": SUITE, "policy": {"acceptance": "strict"}}
        summary = {"speculative/success_rate": 0.8, "speculative/successes": 8, "speculative/episodes": 10,
                   "speculative/task_00/success_rate": 0.8, "speculative/task_00/successes": 8,
                   "speculative/task_00/episodes": 10, "speculative/task_00/success_ci_low": 0.49}

    wev, wtasks = compare.wandb_eval_rows([FakeRun()])
    assert (wev["success_ci_low"].iloc[0], wev["success_ci_high"].iloc[0]) == pytest.approx(wilson_interval(8, 10))
    assert wtasks[["successes", "episodes", "success_ci_low"]].iloc[0].tolist() == [8, 10, 0.49]


def test_notebook_executes_on_local_folders(fixture_logs, tmp_path):
    pytest.importorskip("nbclient", reason="pip install nbclient nbformat ipykernel (see requirements.txt)")
    figs = tmp_path / "figs"
    nb = notebook.execute_notebook(PROJECT_ROOT / "notebooks/compare_runs.ipynb",
                                  {"log_dir": str(fixture_logs), "figures_dir": str(figs), "wandb_mode": "offline"},
                                  out_path=tmp_path / "executed.ipynb", timeout=300)
    assert sorted(p.name for p in figs.glob("*.png")) == [
        "acceptance_vs_success.png", "latency_breakdown.png", "layer_curves.png", "success_per_task.png"]
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    assert "source: local" in text and "3 training runs" not in text and "2 training runs" in text
    assert "+25.0 pts" in text  # the guide table of the strict evaluation
    assert "75.0% [30.1, 95.4]" in text  # success with its interval
    assert "| 4 | 2 | 1 | 0 | 1 | 1.000 | no significant difference |" in text  # the paired table
    assert "image/png" in text


# --------------------------------------------------------------------------------------------------
# Shards and merge (no simulator)


def test_shards_split_pairs_round_robin():
    jobs = [Job(SUITE, t, i, m) for t in (0, 3) for i in range(5) for m in ("speculative", "baseline")]
    parts = [select_shard(jobs, f"{k}/3") for k in range(3)]
    keys = [[j.key for j in p] for p, _ in parts]
    assert sorted(k for ks in keys for k in ks) == sorted(j.key for j in jobs)  # a partition
    assert sum(len(ks) for ks in keys) == len(jobs)
    for part, _ in parts:  # the modes of an init state stay together, in work-list order
        pairs = {(j.task_id, j.trial) for j in part}
        assert len(part) == 2 * len(pairs) and part == [j for j in jobs if (j.task_id, j.trial) in pairs]
    # round-robin over the sorted (task, trial) pairs: pair k -> shard k % 3
    assert [(j.task_id, j.trial) for j in parts[0][0] if j.mode == "baseline"] == [(0, 0), (0, 3), (3, 1), (3, 4)]
    assert parts[1][1]["shard"] == "1/3" and parts[1][1]["total_jobs"] == 20
    assert select_shard(list(reversed(jobs)), "1/3")[0] == list(reversed(parts[1][0]))  # order-independent
    assert parse_shard("2/4") == (2, 4) and parse_shard(None) is None and parse_shard([1, 2]) == (1, 2)
    assert shard_dirname("0/4") == "shard_0_of_4"
    for bad in ("4/4", "1", "a/b", "-1/2"):
        with pytest.raises(ValueError):
            parse_shard(bad)


def _shard_folder(root: Path, index: int, count: int, jobs: list[Job], policy: dict, **rec_kw) -> Path:
    from rsd.eval.shard import write_shard_file

    mine, info = select_shard(jobs, f"{index}/{count}")
    folder = root / shard_dirname(info["shard"])
    recs = [_ep(j.task_id, j.trial, j.mode, j.trial % 2 == 0, [10.0], **rec_kw) for j in mine]
    _write_eval(folder, recs, policy)
    write_shard_file(folder, info)
    return folder


def test_merge_reports_missing_and_duplicates_and_refuses_other_policies(tmp_path, capsys):
    jobs = [Job(SUITE, 0, i, m) for i in range(4) for m in ("speculative", "baseline")]
    policy = {"factory": "noop", "chunk_len": 8}
    s0 = _shard_folder(tmp_path / "a", 0, 2, jobs, policy)
    s1 = _shard_folder(tmp_path / "a", 1, 2, jobs, policy)
    full = merge_shards([tmp_path / "a"], tmp_path / "merged")  # the parent folder holds the shards
    rep = full["report"]
    assert rep["complete"] and rep["shards"] == ["0/2", "1/2"] and not rep["duplicates"]
    assert [record_key(r) for r in load_records(tmp_path / "merged")] == [j.key for j in jobs]  # work-list order
    merged_summary = json.loads((tmp_path / "merged/summary.json").read_text())
    assert merged_summary["modes"]["speculative"]["successes"] == 2 and merged_summary["complete"]
    assert json.loads((tmp_path / "merged" / HELDOUT_FILE).read_text())["status"] == "no_training_data"  # kept
    assert json.loads((tmp_path / "merged" / RUN_FILE).read_text()) == {"suite": SUITE, "max_steps": 220,
                                                                          "policy": policy}
    # one shard only: the other shard and its episodes are reported missing; --strict fails
    assert merge_cli([str(s0), "--out", str(tmp_path / "half"), "--quiet", "--strict"]) == 1
    out = capsys.readouterr().out
    assert "missing shards: 1/2" in out and "missing episodes (4): task 0 trial 1 speculative" in out
    # the same shard twice: duplicates, not conflicting; a changed outcome is a conflict
    dup = merge_shards([s0, s1, s0], None)["report"]
    assert len(dup["duplicates"]) == 0  # the same folder given twice counts once
    copy = tmp_path / "copy"
    _shard_folder(copy, 0, 2, jobs, policy)
    rep = merge_shards([s0, s1, copy / "shard_0_of_2"], None)["report"]
    assert len(rep["duplicates"]) == 4 and rep["conflicting_duplicates"] == 0 and rep["complete"]
    recs = load_records(copy / "shard_0_of_2")
    recs[0]["success"] = not recs[0]["success"]
    EpisodeLog(copy / "shard_0_of_2" / EPISODES_FILE).rewrite(recs)
    assert merge_shards([s0, s1, copy / "shard_0_of_2"], None)["report"]["conflicting_duplicates"] == 1
    # another policy or another split is refused
    other = _shard_folder(tmp_path / "b", 1, 2, jobs, {"factory": "noop", "chunk_len": 4})
    with pytest.raises(MergeError, match="policy"):
        merge_shards([s0, other], None)
    assert merge_cli([str(s0), str(other), "--out", str(tmp_path / "x")]) == 2
    three = _shard_folder(tmp_path / "c", 1, 3, jobs, policy)
    with pytest.raises(MergeError, match="another split"):
        merge_shards([s0, three], None)
    # stable views drop wall-clock, memory and folder values only
    assert stable_view({"a": 1, "avg_inference_ms": 2.0, "wall_time_s": 1, "peak_rss_mb": 3, "out_dir": "x",
                        "engine": {"avg_draft_ms": 1, "acceptance_rate": 0.5}}) == {"a": 1, "engine": {
                            "acceptance_rate": 0.5}}


def test_rollout_records_peak_memory():
    from rsd.eval.rollout import EpisodeResult, memory_peaks, reset_memory_peaks

    reset_memory_peaks()
    rss, cuda = memory_peaks()
    assert rss is not None and rss > 10 and cuda is None  # CPU torch
    rec = EpisodeResult(peak_rss_mb=rss).to_record()
    assert rec["peak_rss_mb"] == rss and "peak_cuda_mb" in rec


def test_slurm_launcher_config():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore

    cfg = yaml.safe_load((PROJECT_ROOT / "conf/hydra/launcher/slurm.yaml").read_text())
    assert cfg["defaults"] == ["submitit_slurm"]
    try:
        import hydra_plugins.hydra_submitit_launcher  # noqa: F401
    except ImportError:  # the plugin is optional (docs/scaling.md): stand in for its registered config
        ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm", node={
            "_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
            **{k: None for k in ("timeout_min", "nodes", "tasks_per_node", "gpus_per_node", "cpus_per_task",
                                 "mem_gb", "partition", "account", "qos", "constraint", "array_parallelism",
                                 "max_num_timeout", "setup", "submitit_folder", "name")},
            "additional_parameters": {}})
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        c = compose(config_name="eval", overrides=["hydra/launcher=slurm", "shard=0/4"], return_hydra_config=True)
    launcher = c.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.timeout_min == 240
    assert launcher.tasks_per_node == 1 and launcher.partition is None and "MUJOCO_GL" in launcher.setup[0]


# --------------------------------------------------------------------------------------------------
# DDP: 2 CPU processes through train.py + Hydra


def test_ddp_two_cpu_processes_sync_metrics_and_write_one_process_checkpoints(tmp_path):
    import lightning as L
    import torch
    from factories import TOKENIZER_ID, D, make_tiny_cache
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from margins import LOGIT_MARGIN, top2_gap

    from rsd.models.checkpoint import load_draft_checkpoint

    cache = make_tiny_cache(tmp_path / "cache")  # 6 train / 2 val episodes of 24 frames
    common = ["experiment=draft_proj_gt", f"data.cache_dir={cache}", f"data.tokenizer_identity={TOKENIZER_ID}",
              f"backbone.hidden_dim={D}", "data.batch_size=32", "prepare.until=null",
              "model.net.hidden_dim=64", "model.net.feedforward_dim=128", "model.net.num_heads=4", "model.net.dropout=0.0",
              "model.lr=0",  # weights stay at their (seeded) init: the logged metrics are checkable here
              "logger=csv", "~callbacks.progress_bar", "~callbacks.lr_monitor"]
    run = tmp_path / "run"
    cmd = [sys.executable, str(PROJECT_ROOT / "train.py"), *common, f"paths.log_dir={tmp_path / 'logs'}",
           f"hydra.run.dir={run}", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2",
           "trainer.max_epochs=1", "+trainer.num_sanity_val_steps=0"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "LOCAL_RANK", "WORLD_SIZE",
                                                                      "NODE_RANK", "SLURM_"))}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in proc.stdout + proc.stderr  # really two processes

    # the same model and validation data in one process
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[*common, f"paths.output_dir={tmp_path / 'one'}"])
    L.seed_everything(cfg.seed, workers=True)
    dm, model = instantiate(cfg.data), instantiate(cfg.model)
    dm.setup("fit")
    model.eval()
    with torch.no_grad():
        batches = [(model(b["hidden"]), b["targets"][:, :3]) for b in dm.val_dataloader()]
    acc = torch.cat([(logits.argmax(-1) == t).float().mean(-1).mean(-1) for logits, t in batches])
    assert len(acc) == 48
    # two processes batch the validation frames differently: random-weight logits round differently by
    # batch shape, so a near-tie token (margins.py) may flip; each flip moves the accuracy by 1 / 18432
    near_ties = sum(int((top2_gap(logits) <= LOGIT_MARGIN).sum()) for logits, _ in batches)
    tol = near_ties / (48 * 3 * 128) + 1e-6
    metrics = compare.load_train_metrics(run)
    logged = float(metrics["val/accuracy"].iloc[-1])
    # synced over both ranks = the whole validation set; rank 0 alone would have seen every other frame
    assert logged == pytest.approx(float(acc.mean()), abs=tol)
    assert abs(float(acc[0::2].mean()) - float(acc.mean())) > 1e-4
    # checkpoints: written once (rank 0), the plain LightningModule's keys, no DDP "module." prefix
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    state = model.state_dict()
    assert set(ckpt["state_dict"]) == set(state)
    assert all(torch.equal(ckpt["state_dict"][k], v) for k, v in state.items())
    assert ckpt["epoch"] == 0 and ckpt["global_step"] == 3  # 144 train frames / 2 ranks / batch 32
    exported, info = load_draft_checkpoint(run / "best_draft_with_projection.pt")
    assert info["model_config"] == model.model_config() and info["cache_manifest"]["tokenizer"] == TOKENIZER_ID
    assert info["val_accuracy"] == pytest.approx(float(acc.mean()), abs=tol)
    assert all(torch.equal(exported.state_dict()[k[len("model."):]], v) for k, v in state.items()
               if k.startswith("model."))


# --------------------------------------------------------------------------------------------------
# Simulator: sharded evaluation == unsharded, and determinism




EVAL_ARGS = [f"suite={SUITE}", "tasks=[0]", "trials=3", "mode=both", "workers=0", "max_steps=8", "progress=false",
             "wandb=false", "policy.factory=harness_policies:make_stats_policy", "policy.chunk_len=4"]


def _evaluate_in_process(out_dir: Path) -> dict:
    from hydra import compose, initialize_config_dir

    import rsd.evaluate as entry

    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="eval", overrides=[*EVAL_ARGS, f"out_dir={out_dir}"])
    return entry.evaluate(cfg)


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sim")
    a = _evaluate_in_process(root / "a")
    b = _evaluate_in_process(root / "b")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS_DIR), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "evaluate.py"), "-m", "shard=0/2,1/2", *EVAL_ARGS,
                           f"out_dir={root / 'shards'}", f"hydra.sweep.dir={root / 'sweep'}"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return {"root": root, "a": a, "b": b}


@pytest.mark.sim
def test_same_seed_and_inputs_give_the_same_evaluation_json(sim_runs):
    root = sim_runs["root"]
    sa = json.loads((root / "a/summary.json").read_text())
    sb = json.loads((root / "b/summary.json").read_text())
    assert sa["out_dir"] != sb["out_dir"] and sa["episodes"] == 6
    assert stable_view(sa) == stable_view(sb)
    eng = sa["modes"]["speculative"]["engine"]
    # chunks at steps 0 and 4 of trials 0, 1, 2 accept 0+0, 1+1, 2+2 of 3 drafted layers
    assert eng["inferences"] == 6 and eng["acceptance_rate"] == pytest.approx(6 / 18)
    ra, rb = load_records(root / "a"), load_records(root / "b")
    assert [stable_view(r) for r in ra] == [stable_view(r) for r in rb]
    assert all(r["peak_rss_mb"] > 0 and r["action_digest"] for r in ra)


@pytest.mark.sim
def test_mode_both_prints_the_paired_table_and_mcnemar_p(sim_runs):
    from rsd.analysis.stats import paired_table

    root = sim_runs["root"]
    summary = json.loads((root / "a/summary.json").read_text())
    recs = load_records(root / "a")
    table = paired_table([r for r in recs if r["mode"] == "speculative"], [r for r in recs if r["mode"] == "baseline"])
    c = summary["comparison"]
    assert table["pairs"] == c["paired_episodes"] == 3 and table["unpaired_a"] == table["unpaired_b"] == 0
    assert (c["both_success"], c["only_speculative"], c["only_baseline"], c["neither"]) == \
        (table["both"], table["only_a"], table["only_b"], table["neither"])
    assert c["mcnemar_p"] == 1.0 and c["significant"] is False  # no-op actions: no discordant pair
    text = (root / "a/summary.txt").read_text()
    assert "SPECULATIVE vs BASELINE (paired: same task and init state)" in text
    assert "both succeed | only speculative | only baseline | neither" in text
    assert "no significant difference (exact McNemar p = 1.000)" in text
    assert "(95% Wilson interval 0.0-56.1%)" in text  # 0 of 3
    assert "McNemar p (exact)" in (root / "a/tasks.md").read_text()


@pytest.mark.sim
def test_sharded_evaluation_merges_into_the_unsharded_one(sim_runs, tmp_path):
    from rsd.eval.runner import run_evaluation

    root = sim_runs["root"]
    shards = root / "shards"
    assert sorted(p.name for p in shards.iterdir()) == ["shard_0_of_2", "shard_1_of_2"]
    s0 = json.loads((shards / "shard_0_of_2/summary.json").read_text())
    assert s0["shard"] == "0/2" and s0["episodes"] == 4 and s0["complete"]  # pairs (0,0), (0,2)
    assert {(r["trial"]) for r in load_records(shards / "shard_1_of_2")} == {1}
    assert merge_cli([str(shards), "--out", str(tmp_path / "merged"), "--quiet", "--strict"]) == 0
    merged = json.loads((tmp_path / "merged/summary.json").read_text())
    unsharded = json.loads((root / "a/summary.json").read_text())
    keys = ("suite", "episodes", "tasks", "trials_per_task", "modes", "per_task", "comparison", "errors",
            "num_errors", "policy", "complete", "work_list_episodes", "max_steps")
    assert {k: stable_view(merged[k]) for k in keys} == {k: stable_view(unsharded[k]) for k in keys}
    assert [stable_view(r) for r in load_records(tmp_path / "merged")] == \
        [stable_view(r) for r in load_records(root / "a")]
    # a merge of one shard resumes as the unsharded evaluation: only the other shard's episodes run
    assert merge_cli([str(shards / "shard_0_of_2"), "--out", str(tmp_path / "half"), "--quiet"]) == 0
    policy = json.loads((tmp_path / "half" / RUN_FILE).read_text())["policy"]
    run = run_evaluation(SUITE, policy, tmp_path / "half", tasks=[0], trials=3, mode="both", workers=0,
                         max_steps=8, progress=False)
    assert (run.skipped, run.new) == (4, 2)
    assert [stable_view(r) for r in run.records] == [stable_view(r) for r in load_records(root / "a")]
