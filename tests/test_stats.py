"""Statistics of success rates (rsd.analysis.stats) and where they show: summary, tasks.md, W&B metrics.

Known answers are computed here independently of scipy: the Wilson interval from its textbook formula
(z from the standard library's normal distribution), the exact McNemar p-value from binomial counts.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import pytest

from rsd.analysis.stats import (
    ALPHA,
    episode_key,
    mcnemar_exact,
    paired_comparison,
    paired_table,
    success_stats,
    wilson_interval,
)
from rsd.eval.summary import (
    fmt_rate,
    format_guide_summary,
    significance,
    summarize,
    task_table,
    task_table_markdown,
)
from rsd.eval.wandb_log import flat_metrics

SUITE = "libero_spatial"


def textbook_wilson(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson (1927): (p + z^2/2n -+ z sqrt(p(1-p)/n + z^2/4n^2)) / (1 + z^2/n)."""
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = k / n
    centre = p + z * z / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return (centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n)


def exact_two_sided(b: int, c: int) -> float:
    """Two-sided exact binomial p at 1/2 by enumeration: twice the smaller tail, at most 1."""
    n = b + c
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize("k,n", [(8, 10), (0, 10), (10, 10), (1, 2), (40, 50), (400, 500)])
def test_wilson_interval_matches_the_textbook_formula(k, n):
    lo, hi = wilson_interval(k, n)
    exp_lo, exp_hi = textbook_wilson(k, n)
    assert lo == pytest.approx(exp_lo, abs=1e-9) and hi == pytest.approx(exp_hi, abs=1e-9)
    assert 0.0 <= lo <= k / n <= hi <= 1.0


def test_wilson_interval_known_values_and_edges():
    lo, hi = wilson_interval(8, 10)
    assert (round(lo, 4), round(hi, 4)) == (0.4902, 0.9433)  # the usual table value for 8/10
    # the design notes' rule of thumb: 500 episodes at 80 % give about +-3.5 points, 100 about +-8
    lo, hi = wilson_interval(400, 500)
    assert 0.03 < (hi - lo) / 2 < 0.04
    lo, hi = wilson_interval(80, 100)
    assert 0.07 < (hi - lo) / 2 < 0.09
    assert wilson_interval(0, 0) is None
    assert success_stats(0, 0) == {"success_rate": None, "success_ci_low": None, "success_ci_high": None}
    with pytest.raises(ValueError):
        wilson_interval(11, 10)
    assert success_stats(8, 10)["success_rate"] == 0.8


@pytest.mark.parametrize("b,c", [(0, 6), (6, 0), (1, 5), (3, 4), (2, 9), (1, 0)])
def test_mcnemar_exact_against_enumeration(b, c):
    assert mcnemar_exact(b, c) == pytest.approx(exact_two_sided(b, c), rel=1e-12)


def test_mcnemar_known_cases():
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)  # 2 * 0.5**6
    assert mcnemar_exact(0, 0) == 1.0  # no discordant pair: nothing to tell the two apart
    assert mcnemar_exact(1, 5) == pytest.approx(2 * (1 + 6) / 64)


def _rec(task, trial, mode, success, init_index=None, suite=SUITE):
    return {"suite": suite, "task_id": task, "trial": trial, "init_index": trial if init_index is None else init_index,
            "mode": mode, "success": success, "steps": 10, "wall_time_s": 1.0, "inference_times_ms": [1.0],
            "num_inferences": 1, "engine_stats": {}, "error": None, "task_name": f"t{task}",
            "instruction": f"do task {task}", "video": None}


def test_pairing_by_task_and_init_state_ignores_unpaired_episodes():
    a = [_rec(0, 0, "a", True), _rec(0, 1, "a", True), _rec(1, 0, "a", False), _rec(2, 0, "a", True),
         _rec(0, 7, "a", True)]  # (2, 0) and (0, 7): no partner in b
    b = [_rec(0, 0, "b", True), _rec(0, 1, "b", False), _rec(1, 0, "b", True), _rec(3, 3, "b", False),
         _rec(1, 9, "b", False, suite="libero_goal")]  # another suite is another init state
    t = paired_table(a, b)
    assert t == {"pairs": 3, "both": 1, "only_a": 1, "only_b": 1, "neither": 0, "unpaired_a": 2, "unpaired_b": 2}
    # the init state, not the trial number, decides the pair
    assert episode_key(_rec(0, 5, "a", True, init_index=2)) == (SUITE, 0, 2)
    assert paired_table([_rec(0, 5, "a", True, init_index=2)], [_rec(0, 2, "b", False)])["only_a"] == 1
    assert paired_comparison(a[:1], [_rec(4, 0, "b", True)]) is None


def test_paired_comparison_numbers():
    # 10 shared init states: both succeed on 2, only b on 6, neither on 2; a has 3 more episodes that are ignored
    a = [_rec(0, i, "a", i < 2) for i in range(10)] + [_rec(5, i, "a", True) for i in range(3)]
    b = [_rec(0, i, "b", i < 8) for i in range(10)]
    p = paired_comparison(a, b)
    assert (p["pairs"], p["both"], p["only_a"], p["only_b"], p["neither"]) == (10, 2, 0, 6, 2)
    assert p["a_success_rate"] == pytest.approx(0.2) and p["b_success_rate"] == pytest.approx(0.8)
    assert (p["b_success_ci_low"], p["b_success_ci_high"]) == pytest.approx(textbook_wilson(8, 10))
    assert p["diff"] == pytest.approx(-0.6)
    assert p["mcnemar_p"] == pytest.approx(0.03125) and p["significant"] and p["mcnemar_p"] < ALPHA
    assert significance(p["mcnemar_p"]).startswith("significant difference")
    assert significance(0.05).startswith("no significant difference")  # p >= 0.05 is not significant


def _both_modes(spec_success: list[bool], base_success: list[bool]) -> list[dict]:
    recs = [_rec(i % 2, i // 2, "speculative", s) for i, s in enumerate(spec_success)]
    return recs + [_rec(i % 2, i // 2, "baseline", s) for i, s in enumerate(base_success)]


def test_summary_text_and_tasks_md_show_intervals_and_the_paired_table():
    # 10 init states (2 tasks x 5): baseline succeeds on all, speculative on 4: 6 discordant pairs, p = 0.03125
    s = summarize(_both_modes([True] * 4 + [False] * 6, [True] * 10), suite=SUITE)
    spec = s["modes"]["speculative"]
    assert (spec["success_ci_low"], spec["success_ci_high"]) == pytest.approx(textbook_wilson(4, 10))
    c = s["comparison"]
    assert (c["both_success"], c["only_speculative"], c["only_baseline"], c["neither"]) == (4, 0, 6, 0)
    assert c["mcnemar_p"] == pytest.approx(0.03125) and c["significant"] is True
    lo, hi = textbook_wilson(4, 10)
    text = format_guide_summary(s)
    assert f"Success Rate: 40.0% (95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%)" in text
    assert "Difference: -60.0 points, significant difference (exact McNemar p = 0.031)" in text
    assert "both succeed | only speculative | only baseline | neither" in text
    assert "   4 |                0 |             6 |       0" in text
    md = task_table_markdown(s)
    lo0, hi0 = textbook_wilson(2, 5)  # task 0: speculative succeeds on init states 0, 1 (records 0, 2)
    assert f"| 0 | do task 0 | 2/5 (40%) [{100 * lo0:.0f}, {100 * hi0:.0f}] | 5/5 (100%)" in md
    assert "| Paired episodes | Both succeed | Only speculative | Only baseline | Neither | McNemar p (exact) |" in md
    assert "| 10 | 4 | 0 | 6 | 0 | 0.031 | significant difference |" in md
    # a small difference on few episodes is labelled as such
    s2 = summarize(_both_modes([True] * 9 + [False], [True] * 8 + [False] * 2), suite=SUITE)
    assert s2["comparison"]["mcnemar_p"] == pytest.approx(1.0)
    assert "Difference: +10.0 points, no significant difference (exact McNemar p = 1.000)" in format_guide_summary(s2)
    assert "| 10 | 8 | 1 | 0 | 1 | 1.000 | no significant difference |" in task_table_markdown(s2)


def test_one_task_table_feeds_markdown_wandb_and_compare():
    s = summarize(_both_modes([True, False, True, True], [True, True, False, False]), suite=SUITE)
    rows = task_table(s, label="run")
    assert [(r["mode"], r["task_id"], r["successes"], r["episodes"]) for r in rows] == [
        ("speculative", 0, 2, 2), ("baseline", 0, 1, 2), ("speculative", 1, 1, 2), ("baseline", 1, 1, 2)]
    assert (rows[1]["success_ci_low"], rows[1]["success_ci_high"]) == pytest.approx(textbook_wilson(1, 2))
    metrics = flat_metrics(s)
    assert metrics["baseline/task_00/success_ci_low"] == pytest.approx(textbook_wilson(1, 2)[0])
    assert metrics["speculative/success_ci_high"] == pytest.approx(textbook_wilson(3, 4)[1])
    assert metrics["comparison/only_speculative"] == 2 and metrics["comparison/only_baseline"] == 1
    assert metrics["comparison/mcnemar_p"] == pytest.approx(exact_two_sided(2, 1))
    assert fmt_rate(0.75, 0.301, 0.954) == "75.0% [30.1, 95.4]" and fmt_rate(None, None, None) == "n/a"
