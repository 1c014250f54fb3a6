"""Sequential paired comparison (rsd.analysis.sequential): anytime-valid under H0, early under an effect."""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from rsd import PROJECT_ROOT
from rsd.analysis.sequential import (
    PairedStop,
    SequentialMcNemar,
    confidence_sequence,
    log_e_value,
    main,
    replay,
    replay_dirs,
)
from rsd.analysis.verify import verify
from rsd.eval.runner import build_jobs, load_records

ALPHA = 0.05
RUNS = 2000
MAX_PAIRS = 500  # a 500-episode evaluation per mode
#: Monte-Carlo tolerance: 3 binomial standard errors of a rate of alpha over RUNS runs (~0.015)
TOL = 3 * math.sqrt(ALPHA * (1 - ALPHA) / RUNS)


def _simulate(p_only_a: float, p_only_b: float, runs: int, seed: int) -> np.ndarray:
    """``[runs, MAX_PAIRS]`` pair outcomes: 0 both, 1 only A, 2 only B, 3 neither."""
    rng = np.random.default_rng(seed)
    p_both = (1 - p_only_a - p_only_b) * 0.6
    return rng.choice(4, size=(runs, MAX_PAIRS), p=[p_both, p_only_a, p_only_b, 1 - p_both - p_only_a - p_only_b])


def _run(outcomes: np.ndarray) -> tuple[bool, str | None, int | None]:
    test = SequentialMcNemar(alpha=ALPHA)
    for o in outcomes:
        d = test.update(o in (0, 1), o in (0, 2))
        if d.decided:
            return True, d.winner, d.decided_at
    return False, None, None


def test_false_decision_rate_stays_below_alpha_under_h0_with_a_look_after_every_pair() -> None:
    sims = _simulate(0.15, 0.15, RUNS, seed=20)  # no difference, 30 % discordant pairs
    decided = [_run(s)[0] for s in sims]
    rate = float(np.mean(decided))
    assert rate <= ALPHA + TOL, (rate, TOL)


def test_stopping_at_the_first_fixed_n_mcnemar_p_below_alpha_is_not_valid() -> None:
    """What the design notes forbid: looking at the exact McNemar p after every pair inflates the error."""
    from scipy.stats import binom

    sims = _simulate(0.15, 0.15, 500, seed=21)
    only_a, disc = np.cumsum(sims == 1, axis=1), np.cumsum((sims == 1) | (sims == 2), axis=1)
    n = np.maximum(disc, 1)
    p = np.minimum(1.0, 2 * np.minimum(binom.cdf(only_a, n, 0.5), binom.sf(only_a - 1, n, 0.5)))
    naive = float(np.mean(((p < ALPHA) & (disc > 0)).any(axis=1)))
    assert naive > 2 * ALPHA  # about 0.25-0.35: many looks, many chances


def test_decides_early_and_for_the_right_side_under_a_clear_effect() -> None:
    sims = _simulate(0.20, 0.05, 200, seed=22)  # A wins 4 of 5 discordant pairs
    res = [_run(s) for s in sims]
    assert np.mean([r[0] for r in res]) > 0.95
    assert all(r[1] == "A" for r in res if r[0])
    assert np.median([r[2] for r in res if r[0]]) < 150  # far fewer than 500 pairs


def test_e_value_interval_and_api() -> None:
    t = SequentialMcNemar(alpha=0.05)
    assert not t.decided and t.n == 0 and t.e_value == 1.0 and t.interval == (0.0, 1.0)
    t.update(True, True)
    t.update(False, False)
    assert t.e_value == 1.0 and t.n == 2  # concordant pairs change nothing
    # the mixture with a uniform prior: E = B(k+1, n-k+1) * 2^n = 2^n / ((n+1) C(n,k))
    for _ in range(6):
        d = t.update(True, False)
    assert t.e_value == pytest.approx(2 ** 6 / 7)
    assert not d.decided
    lo, hi = t.interval
    assert 0.5 < hi <= 1.0 and lo < 0.5  # 1/2 still inside: not decided
    while not t.decided:
        t.update(True, False)
    assert t.decided and t.state().winner == "A" and t.state().decided_at == t.n
    assert t.e_value >= 20 and t.interval[0] > 0.5  # the interval excludes 1/2 once decided
    first = t.state()
    for _ in range(20):
        t.update(False, True)  # later pairs do not undo the frozen decision
    assert t.state() == first
    with pytest.raises(ValueError):
        SequentialMcNemar(alpha=1.5)


def test_confidence_sequence_covers_the_truth_uniformly_over_time() -> None:
    rng = np.random.default_rng(5)
    p_true, misses = 0.7, 0
    for _ in range(300):
        x = rng.random(300) < p_true
        k = np.cumsum(x)
        for n in (10, 30, 100, 300):  # a few looks suffice to check; the bound is over all of them
            if not confidence_sequence(int(k[n - 1]), n)[0] <= p_true <= confidence_sequence(int(k[n - 1]), n)[1]:
                misses += 1
                break
    assert misses / 300 <= 0.05 + 3 * math.sqrt(0.05 * 0.95 / 300)
    lo, hi = confidence_sequence(70, 100)
    assert lo < 0.7 < hi and log_e_value(70, 100, lo) == pytest.approx(math.log(20), abs=1e-6)


def _write(path: Path, recs: list[dict]) -> None:
    path.mkdir(parents=True, exist_ok=True)
    with gzip.open(path / "episodes.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)


def test_replay_of_committed_records_says_where_it_would_have_stopped(tmp_path: Path, capsys) -> None:
    rng = np.random.default_rng(3)
    recs = []
    for i in range(200):
        a = bool(rng.random() < 0.8)
        b = a if rng.random() < 0.6 else (not a and rng.random() < 0.2)
        recs += [{"suite": "s", "task_id": i // 50, "trial": i % 50, "mode": m, "success": s}
                 for m, s in (("speculative", a), ("baseline", b))]
    _write(tmp_path / "both", recs)
    res = replay_dirs(tmp_path / "both")
    assert res["pairs_total"] == 200 and res["decided"] and res["winner"] == "A"
    assert res["pairs_used"] == res["decided_at_pair"] < 200 and res["episodes_used"] == 2 * res["pairs_used"]
    spec = [r for r in recs if r["mode"] == "speculative"]
    assert replay(spec, [r for r in recs if r["mode"] == "baseline"])["decided_at_pair"] == res["decided_at_pair"]
    assert main([str(tmp_path / "both")]) == 0
    assert f"decided at pair {res['decided_at_pair']} of 200" in capsys.readouterr().out
    same = [{**r, "mode": "baseline"} for r in spec]
    undecided = replay(spec, same)
    assert not undecided["decided"] and undecided["pairs_used"] == 200 and undecided["e_value"] == 1.0


# ---------------------------------------------------------------------------------- stop of a running evaluation
def _rec(task: int, trial: int, mode: str, success: bool) -> dict:
    return {"suite": "libero_spatial", "task_id": task, "trial": trial, "mode": mode, "success": success}


def _outcome(task: int, trial: int, mode: str) -> bool:
    """Speculative always succeeds; the baseline succeeds on even trials of task 0 only (some concordant pairs)."""
    return mode == "speculative" or (task == 0 and trial % 2 == 0)


def test_trial_major_work_list() -> None:
    jobs = build_jobs("libero_spatial", [0, 1], [0, 1], ["speculative", "baseline"], order="trial")
    assert [(j.task_id, j.trial, j.mode) for j in jobs][:4] == [
        (0, 0, "speculative"), (0, 0, "baseline"), (1, 0, "speculative"), (1, 0, "baseline")]
    with pytest.raises(ValueError, match="order"):
        build_jobs("libero_spatial", [0], [0], ["baseline"], order="random")


def test_paired_stop_counts_pairs_in_work_list_order_whatever_the_arrival() -> None:
    jobs = build_jobs("libero_spatial", [0, 1, 2], list(range(10)), ["speculative", "baseline"], order="trial")
    keys = [j.key for j in jobs]
    reference = SequentialMcNemar(alpha=ALPHA)
    expected = None
    for j in jobs[::2]:  # the pairs in work-list order, straight into the test
        d = reference.update(_outcome(j.task_id, j.trial, "speculative"), _outcome(j.task_id, j.trial, "baseline"))
        if d.decided:
            expected = d.decided_at
            break
    assert expected is not None and expected < len(jobs) // 2
    rng = np.random.default_rng(0)
    for _ in range(5):  # workers finish in any order: the decision is the same
        stop = PairedStop("speculative", "baseline", alpha=ALPHA)
        stop.set_order(keys)
        for i in rng.permutation(len(jobs)):
            j = jobs[i]
            stop.add(_rec(j.task_id, j.trial, j.mode, _outcome(j.task_id, j.trial, j.mode)))
        s = stop.summary()
        assert stop.done and s["decided_at_pair"] == expected and s["pairs_used"] == expected
        assert s["winner"] == "A" and s["episodes_used"] == 2 * expected and s["pairs_total"] == 30
    early = PairedStop("speculative", "baseline", alpha=ALPHA)
    early.set_order(keys)
    for j in jobs[1:]:  # the first pair's speculative episode is missing: nothing counts yet
        early.add(_rec(j.task_id, j.trial, j.mode, _outcome(j.task_id, j.trial, j.mode)))
    assert not early.done and early.summary()["pairs_used"] == 0
    with pytest.raises(ValueError, match="mode=both"):
        PairedStop("speculative", "baseline").set_order([k for k in keys if k[3] == "baseline"])


@pytest.mark.sim
def test_evaluate_sequential_stops_once_decided_and_resumes_decided(tmp_path: Path) -> None:
    """A harness policy whose speculative mode is the expert and whose baseline fails: with alpha 0.25 the
    test decides at pair 5 (2^5 / 6 >= 4), i.e. after trials 0-2 of task 0 and 0-1 of task 1 (trial-major)."""
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
               WANDB_SILENT="true")
    cmd = [sys.executable, str(PROJECT_ROOT / "evaluate.py"), f"out_dir={out}", "tasks=[0,1]", "trials=10",
           "mode=both", "sequential=true", "sequential_alpha=0.25", "workers=2", "progress=false", "wandb=false",
           "policy.factory=harness_policies:make_mode_split_policy"]
    first = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "Decided at pair 5 of 20 (10 of 40 episodes): speculative better" in first.stdout, first.stdout[-2000:]
    seq = json.loads((out / "summary.json").read_text())["sequential"]
    assert seq["decided"] and seq["decided_at_pair"] == 5 and seq["winner"] == "A" and seq["only_a"] == 5
    recs = load_records(out)
    keys = {(r["task_id"], r["trial"], r["mode"]) for r in recs}
    needed = {(t, i, m) for t, i in [(0, 0), (1, 0), (0, 1), (1, 1), (0, 2)] for m in ("speculative", "baseline")}
    assert needed <= keys and len(recs) <= 12  # at most one episode per other worker ran past the decision
    assert all(r["success"] == (r["mode"] == "speculative") for r in recs)
    again = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["new_episodes"] == 0 and summary["sequential"]["decided_at_pair"] == 5
    # the verifier replays the decision from the records (a harness policy loads no artifact: provenance
    # lines are expected, none about the sequential test)
    assert not [f for f in verify([out]).failures if ": sequential" in f]
    summary["sequential"]["decided_at_pair"] = 4
    (out / "summary.json").write_text(json.dumps(summary))
    report = verify([out])
    assert not report.ok and any("sequential.decided_at_pair" in f for f in report.failures), report.failures


def test_replay_in_trial_major_order() -> None:
    """The replay of a sequential=true run sorts pairs trial-major: A's recorded (task-major) order differs."""
    a = [_rec(t, i, "speculative", True) for t in range(2) for i in range(6)]
    b = [_rec(t, i, "baseline", t == 0) for t in range(2) for i in range(6)]  # task 0: concordant
    recorded = replay(a, b, alpha=0.25)
    trial = replay(a, b, alpha=0.25, order="trial")
    assert recorded["decided_at_pair"] == 6 + 5  # 6 concordant pairs of task 0 first, then 5 discordant
    assert trial["decided_at_pair"] == 10  # alternating tasks: the 5th discordant pair is pair 10
    with pytest.raises(ValueError, match="order"):
        replay(a, b, order="shuffled")
