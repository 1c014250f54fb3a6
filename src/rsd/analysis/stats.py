"""Statistics of closed-loop success: Wilson intervals and exact McNemar tests on paired episodes.

Why this module exists: a success rate measured on n episodes is an estimate. At 80 % success the 95 %
interval is about +-8 points on 100 episodes and +-3.5 points on 500, so a rate shown without its interval
invites reading noise as an effect (docs: the "Statistics" section of the design notes).

- :func:`wilson_interval`: the 95 % Wilson score interval of k successes in n episodes. Wilson rather than
  the normal approximation because it stays inside [0, 1] and keeps its coverage near 0 % and 100 %,
  where policies often are on single tasks.
- :func:`paired_table` / :func:`mcnemar_exact` / :func:`paired_comparison`: two decoding modes (or two
  runs) evaluated from the same init states are paired samples. The simulator is deterministic, so the
  episodes both succeed on (or both fail) say nothing about the difference; only the discordant pairs do.
  The exact McNemar test is the two-sided binomial test of the discordant pairs against 1/2; it is exact,
  so it is valid for the small counts (a few discordant pairs) these comparisons usually have.

All numbers come from ``scipy.stats.binomtest``; nothing here re-derives a formula.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

#: confidence level of every interval the evaluation reports
CONFIDENCE = 0.95
#: a paired difference with ``p >= ALPHA`` is reported as "no significant difference"
ALPHA = 0.05


def wilson_interval(successes: int, episodes: int, confidence: float = CONFIDENCE) -> tuple[float, float] | None:
    """``(low, high)`` of the Wilson score interval of ``successes`` in ``episodes``; None without episodes."""
    from scipy.stats import binomtest

    k, n = int(successes), int(episodes)
    if n <= 0:
        return None
    if not 0 <= k <= n:
        raise ValueError(f"{k} successes in {n} episodes")
    ci = binomtest(k, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def success_stats(successes: int, episodes: int) -> dict[str, float | None]:
    """``success_rate`` with its interval as ``success_ci_low`` / ``success_ci_high`` (None without episodes).

    Flat scalar keys, so the summary's JSON, the W&B metrics and the comparison tables carry them as they are.
    """
    ci = wilson_interval(successes, episodes)
    return {"success_rate": successes / episodes if episodes else None,
            "success_ci_low": ci[0] if ci else None, "success_ci_high": ci[1] if ci else None}


def episode_key(rec: Mapping[str, Any]) -> tuple:
    """What makes two episodes a pair: the same suite, task and init state (``init_index``, else ``trial``)."""
    init = rec.get("init_index")
    return (rec.get("suite"), int(rec["task_id"]), int(rec["trial"] if init is None else init))


def pair_records(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]
                 ) -> tuple[list[tuple[Mapping[str, Any], Mapping[str, Any]]], int, int]:
    """``(pairs, unpaired_a, unpaired_b)``: the episodes of ``a`` and ``b`` that share an init state, in
    ``a``'s order, and how many of each side have no partner (they are left out of every paired number)."""
    by_a = {episode_key(r): r for r in a}
    by_b = {episode_key(r): r for r in b}
    pairs = [(ra, by_b[k]) for k, ra in by_a.items() if k in by_b]
    return pairs, len(by_a) - len(pairs), len(by_b) - len(pairs)


def paired_table(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    """The paired outcomes of two sets of episode records: ``both`` succeed, ``only_a``, ``only_b``,
    ``neither``, over ``pairs`` shared init states; ``unpaired_a`` / ``unpaired_b`` are not counted."""
    pairs, unpaired_a, unpaired_b = pair_records(a, b)
    sa = [(bool(ra.get("success")), bool(rb.get("success"))) for ra, rb in pairs]
    return {"pairs": len(sa), "both": sum(x and y for x, y in sa), "only_a": sum(x and not y for x, y in sa),
            "only_b": sum(y and not x for x, y in sa), "neither": sum(not x and not y for x, y in sa),
            "unpaired_a": unpaired_a, "unpaired_b": unpaired_b}


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of ``only_a`` of the ``only_a + only_b`` discordant
    pairs against 1/2. Without discordant pairs the two sides agree everywhere: p = 1."""
    from scipy.stats import binomtest

    n = int(only_a) + int(only_b)
    return 1.0 if n == 0 else float(binomtest(int(only_a), n, 0.5).pvalue)


def paired_comparison(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]]) -> dict[str, Any] | None:
    """Everything a paired comparison of ``a`` against ``b`` reports, or None when no init state is shared.

    Rates and intervals are over the paired episodes only, so they match the table they come with.
    """
    t = paired_table(a, b)
    n = t["pairs"]
    if n == 0:
        return None
    sa, sb = success_stats(t["both"] + t["only_a"], n), success_stats(t["both"] + t["only_b"], n)
    p = mcnemar_exact(t["only_a"], t["only_b"])
    return {**t, **{f"a_{k}": v for k, v in sa.items()}, **{f"b_{k}": v for k, v in sb.items()},
            "diff": (t["only_a"] - t["only_b"]) / n, "mcnemar_p": p, "significant": p < ALPHA}
