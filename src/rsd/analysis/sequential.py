"""Sequential paired comparison that may stop early: a mixture SPRT on the discordant pairs.

Two decoding modes A and B run on the same init states give pairs of outcomes. Pairs where both succeed
or both fail say nothing about the difference; among the discordant pairs, let ``p = P(only A succeeds |
the pair is discordant)``. "No difference" is ``H0: p = 1/2`` (the exact McNemar test of
:mod:`rsd.analysis.stats` tests the same null at a fixed sample size).

**The test.** After ``n`` discordant pairs of which ``k`` favour A, the e-value is the beta-binomial
mixture likelihood ratio (a mixture sequential probability ratio test, Robbins 1970)::

    E_n = integral p^k (1-p)^(n-k) dBeta(p; a, b) / (1/2)^n = B(a + k, b + n - k) / B(a, b) * 2^n

with a symmetric prior ``a = b`` (default 1: uniform), so it grows for effects in either direction.
Under H0, ``E_n`` is a non-negative martingale with ``E_0 = 1`` (in the discordant pairs; concordant pairs
leave it unchanged), so by Ville's inequality ``P_H0(E_n >= 1/alpha for some n) <= alpha``.

**Guarantee.** Stopping the evaluation at the first pair where ``E_n >= 1/alpha`` and declaring the mode
with more "only" wins better is wrong with probability at most ``alpha`` under H0, *whatever* the stopping
rule: checking after every episode, stopping at a budget, or stopping for any other reason (an
anytime-valid test). The interval :attr:`SequentialMcNemar.interval` is a ``1 - alpha`` confidence
sequence for ``p``: the set of ``p0`` whose mixture e-value ``B(a+k, b+n-k) / B(a, b) / (p0^k (1-p0)^(n-k))``
is below ``1/alpha``; with probability ``>= 1 - alpha`` it holds the true ``p`` at every ``n`` at once,
so it stays valid at a data-dependent stop. It excludes 1/2 exactly when the test has decided. The
guarantee assumes the pairs are exchangeable given the modes (independent episodes, as with fixed init
states and a deterministic simulator) and needs no assumption on how often pairs are discordant.

What it does *not* give: a decision "no difference". Without a decision by the budget, the comparison
is undecided; the interval says which effects are still compatible with the data. Stopping when a
fixed-n McNemar p-value first dips below 0.05 is *not* valid (its false-decision rate grows with the
number of looks; ``tests/test_sequential.py`` shows it).

Use: ``SequentialMcNemar(alpha=0.05).update(a_success, b_success)`` after each pair (the runner's
``mode=both sequential=true`` calls this, one pair per init state once both modes have run it), or
:func:`replay` / ``python -m rsd.analysis.sequential <eval dir> [<other eval dir>]`` on committed
``episodes.jsonl`` records: at which pair it would have stopped.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rsd.analysis.stats import pair_records

ALPHA = 0.05


def log_beta(x: float, y: float) -> float:
    return math.lgamma(x) + math.lgamma(y) - math.lgamma(x + y)


def log_mixture(k: int, n: int, a: float = 1.0, b: float = 1.0) -> float:
    """log of the beta-binomial mixture likelihood of ``k`` successes in ``n`` Bernoulli trials."""
    return log_beta(a + k, b + n - k) - log_beta(a, b)


def log_e_value(k: int, n: int, p0: float = 0.5, a: float = 1.0, b: float = 1.0) -> float:
    """log of the mixture e-value of ``k`` of ``n`` discordant pairs favouring A against ``p = p0``."""
    if n == 0:
        return 0.0
    if not 0.0 < p0 < 1.0:
        return math.inf if (p0 <= 0.0 and k > 0) or (p0 >= 1.0 and k < n) else log_mixture(k, n, a, b)
    return log_mixture(k, n, a, b) - k * math.log(p0) - (n - k) * math.log1p(-p0)


def confidence_sequence(k: int, n: int, alpha: float = ALPHA, a: float = 1.0, b: float = 1.0
                        ) -> tuple[float, float]:
    """``(low, high)``: the ``p0`` in [0, 1] whose mixture e-value is below ``1/alpha`` (an interval: the
    log e-value is convex in ``p0``, smallest at ``k/n``). Valid simultaneously for every ``n``."""
    if n == 0:
        return 0.0, 1.0
    from scipy.optimize import brentq

    level = math.log(1.0 / alpha)
    f = lambda p0: log_e_value(k, n, p0, a, b) - level  # noqa: E731
    mle = min(max(k / n, 1e-12), 1 - 1e-12)
    if f(mle) >= 0:  # cannot happen for a proper prior (E <= 1 at the MLE's neighbourhood); be safe
        return mle, mle
    tiny = 1e-15
    low = 0.0 if f(tiny) < 0 else brentq(f, tiny, mle, xtol=1e-12)
    high = 1.0 if f(1 - tiny) < 0 else brentq(f, mle, 1 - tiny, xtol=1e-12)
    return float(low), float(high)


@dataclass(frozen=True)
class Decision:
    """The state of a sequential comparison after a pair."""

    decided: bool  #: E >= 1/alpha was reached (at :attr:`decided_at`); stays True afterwards
    winner: str | None  #: "A" or "B" once decided (the side with more "only" wins at the decision)
    n: int  #: pairs seen
    discordant: int  #: discordant pairs seen
    only_a: int
    only_b: int
    e_value: float  #: the mixture e-value against p = 1/2 now
    decided_at: int | None  #: the pair (1-based) at which it decided


class SequentialMcNemar:
    """Anytime-valid paired comparison of A and B on the discordant pairs (see the module docstring).

    ``update(a_success, b_success)`` after every pair returns a :class:`Decision`; ``decided`` turns True the
    first time the e-value reaches ``1/alpha`` and stays True (the decision, winner and pair are frozen at
    that first crossing, which is what a run that stops there reports). ``interval`` is the confidence
    sequence for ``p = P(only A | discordant)`` (``p > 1/2``: A better).
    """

    def __init__(self, alpha: float = ALPHA, prior: float = 1.0) -> None:
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if prior <= 0:
            raise ValueError(f"prior (Beta(prior, prior)) must be > 0, got {prior}")
        self.alpha, self.a = float(alpha), float(prior)
        self.n = self.both = self.neither = self.only_a = self.only_b = 0
        self._decision: Decision | None = None

    @property
    def discordant(self) -> int:
        return self.only_a + self.only_b

    @property
    def log_e_value(self) -> float:
        return log_e_value(self.only_a, self.discordant, 0.5, self.a, self.a)

    @property
    def e_value(self) -> float:
        return math.exp(min(self.log_e_value, 700.0))

    @property
    def decided(self) -> bool:
        return self._decision is not None

    @property
    def interval(self) -> tuple[float, float]:
        """The ``1 - alpha`` confidence sequence for ``p = P(only A | discordant)`` at the current pair."""
        return confidence_sequence(self.only_a, self.discordant, self.alpha, self.a, self.a)

    def state(self) -> Decision:
        if self._decision is not None:
            return self._decision
        return Decision(False, None, self.n, self.discordant, self.only_a, self.only_b, self.e_value, None)

    def update(self, a_success: bool, b_success: bool) -> Decision:
        """Add one pair (the same init state under A and under B); returns the state after it."""
        a, b = bool(a_success), bool(b_success)
        self.n += 1
        if a and b:
            self.both += 1
        elif a:
            self.only_a += 1
        elif b:
            self.only_b += 1
        else:
            self.neither += 1
        if self._decision is None and self.log_e_value >= math.log(1.0 / self.alpha):
            self._decision = Decision(True, "A" if self.only_a > self.only_b else "B", self.n, self.discordant,
                                      self.only_a, self.only_b, self.e_value, self.n)
        return self.state()

    def summary(self) -> dict[str, Any]:
        """Plain numbers (current counts, e-value and interval; the frozen decision when there is one)."""
        d = self._decision
        low, high = self.interval
        return {"alpha": self.alpha, "prior": self.a, "pairs": self.n, "both": self.both, "only_a": self.only_a,
                "only_b": self.only_b, "neither": self.neither, "e_value": self.e_value,
                "threshold": 1.0 / self.alpha, "interval_p_only_a": [low, high], "decided": d is not None,
                "winner": d.winner if d else None, "decided_at_pair": d.decided_at if d else None,
                "e_value_at_decision": d.e_value if d else None}


# ------------------------------------------------------------------------------- stop of a running evaluation
class PairedStop:
    """``mode=both sequential=true``: the stop rule of a running evaluation (:func:`rsd.eval.runner.run_evaluation`
    takes it as ``stop``).

    The runner names its work list (:meth:`set_order`) and hands over every record, old (resume) and new
    (:meth:`add`), in whatever order workers finish them. The pairs enter :class:`SequentialMcNemar` in
    *work-list* order: a pair counts once both of its episodes are recorded and every earlier pair has counted,
    so the order the test sees is fixed before any outcome (a faster mode or a shorter episode cannot reorder
    it) and the decision is the same for any number of workers. :attr:`done` turns True at the first pair where
    the e-value reaches ``1/alpha``; the runner then starts no new episode (the ones running finish and are
    recorded, beyond the decided prefix).
    """

    def __init__(self, mode_a: str, mode_b: str, alpha: float = ALPHA, prior: float = 1.0) -> None:
        self.mode_a, self.mode_b = mode_a, mode_b
        self.test = SequentialMcNemar(alpha, prior)
        self._order: list[tuple] = []
        self._next = 0
        self._outcomes: dict[tuple, bool] = {}

    def set_order(self, keys: Sequence[tuple]) -> None:
        """The work list's ``(suite, task_id, trial, mode)`` keys, in order; a pair is ordered by its A episode."""
        modes = {k[3] for k in keys}
        if not {self.mode_a, self.mode_b} <= modes:
            raise ValueError(f"a sequential comparison needs both {self.mode_a} and {self.mode_b} episodes in the "
                             f"work list (mode=both); it has {sorted(modes)}")
        self._order = [tuple(k[:3]) for k in keys if k[3] == self.mode_a]
        self._advance()

    def add(self, rec: Mapping[str, Any]) -> None:
        key = (rec["suite"], int(rec["task_id"]), int(rec["trial"]), rec["mode"])
        self._outcomes[key] = bool(rec.get("success"))
        self._advance()

    def _advance(self) -> None:
        while self._next < len(self._order) and not self.test.decided:
            pair = self._order[self._next]
            a, b = self._outcomes.get((*pair, self.mode_a)), self._outcomes.get((*pair, self.mode_b))
            if a is None or b is None:
                return
            self.test.update(a, b)
            self._next += 1

    @property
    def done(self) -> bool:
        return self.test.decided

    def summary(self) -> dict[str, Any]:
        """:meth:`SequentialMcNemar.summary` with the modes and how much of the work list it needed."""
        used = self.test.n
        return {**self.test.summary(), "mode_a": self.mode_a, "mode_b": self.mode_b, "pairs_used": used,
                "episodes_used": 2 * used, "pairs_total": len(self._order), "episodes_total": 2 * len(self._order)}


# ---------------------------------------------------------------------------------- replay of records
def read_records(path: str | Path) -> list[dict]:
    """Episode records of ``episodes.jsonl`` / ``episodes.jsonl.gz`` (a file or a folder holding one), in
    file order; the last record of an episode (suite, task, init, mode) wins, at its first position."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("episodes.jsonl", "episodes.jsonl.gz") if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{p}: no episodes.jsonl(.gz)")
        p = found[0]
    opener = gzip.open if p.suffix == ".gz" else open
    out: dict[tuple, dict] = {}
    with opener(p, "rt") as f:
        for line in f:
            if line.strip():
                rec = json.loads(line)
                init = rec.get("init_index", rec.get("trial"))
                out[(rec.get("suite"), rec.get("task_id"), init, rec.get("mode"))] = rec
    return list(out.values())


def replay(a: Iterable[Mapping[str, Any]], b: Iterable[Mapping[str, Any]], alpha: float = ALPHA,
           prior: float = 1.0, order: str = "recorded") -> dict[str, Any]:
    """Run :class:`SequentialMcNemar` over the pairs of two sets of episode records (paired by task and init
    state, in ``a``'s order, i.e. the order they were recorded; ``order="trial"``: trial 0 of every task, then
    trial 1, ..., the order of a ``sequential=true`` run), and say where it would have stopped.

    Returns the summary at the stop (``decided_at_pair``; pairs and episodes it needed, 2 episodes a pair)
    or at the end when undecided, plus ``pairs_total`` / ``episodes_total`` of the full comparison."""
    pairs, _, _ = pair_records(list(a), list(b))
    if order not in ("recorded", "trial"):
        raise ValueError(f"order must be recorded or trial, got {order!r}")
    if order == "trial":
        pairs.sort(key=lambda p: (int(p[0].get("init_index", p[0].get("trial"))), int(p[0]["task_id"])))
    test = SequentialMcNemar(alpha, prior)
    stop = None
    for ra, rb in pairs:
        d = test.update(bool(ra.get("success")), bool(rb.get("success")))
        if d.decided and stop is None:
            stop = test.summary()
            break
    out = stop or test.summary()
    used = out["pairs"]
    return {**out, "pairs_used": used, "episodes_used": 2 * used, "pairs_total": len(pairs),
            "episodes_total": 2 * len(pairs)}


def replay_dirs(a_dir: str | Path, b_dir: str | Path | None = None, mode_a: str = "speculative",
                mode_b: str = "baseline", alpha: float = ALPHA, prior: float = 1.0, order: str = "recorded"
                ) -> dict[str, Any]:
    """:func:`replay` of committed records: one folder of a ``mode=both`` run (``mode_a`` vs ``mode_b``), or
    two folders (their ``mode_a`` / ``mode_b`` records; a folder with one mode uses that one)."""
    ra = read_records(a_dir)
    rb = ra if b_dir is None else read_records(b_dir)

    def pick(recs: Sequence[dict], mode: str) -> list[dict]:
        modes = {r.get("mode") for r in recs}
        want = mode if (b_dir is None or len(modes) > 1) else next(iter(modes))
        return [r for r in recs if r.get("mode") == want]

    return replay(pick(ra, mode_a), pick(rb, mode_b), alpha, prior, order)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rsd.analysis.sequential",
                                 description="Replay committed episode records through the anytime-valid "
                                             "paired test: at which pair would it have stopped?")
    ap.add_argument("a", help="evaluation folder (or episodes.jsonl[.gz]) of A (or of a mode=both run)")
    ap.add_argument("b", nargs="?", help="evaluation folder of B (default: the other mode of A's folder)")
    ap.add_argument("--mode-a", default="speculative")
    ap.add_argument("--mode-b", default="baseline")
    ap.add_argument("--alpha", type=float, default=ALPHA)
    ap.add_argument("--prior", type=float, default=1.0, help="Beta(prior, prior) mixture")
    ap.add_argument("--order", choices=("recorded", "trial"), default="recorded",
                    help="pairs in A's recorded order, or trial-major (as evaluate.py sequential=true runs them)")
    args = ap.parse_args(argv)
    try:
        res = replay_dirs(args.a, args.b, args.mode_a, args.mode_b, args.alpha, args.prior, args.order)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sequential: {exc}", file=sys.stderr)
        return 2
    lo, hi = res["interval_p_only_a"]
    if res["decided"]:
        print(f"decided at pair {res['decided_at_pair']} of {res['pairs_total']} ({res['episodes_used']} of "
              f"{res['episodes_total']} episodes): {res['winner']} better, e-value {res['e_value']:.1f} >= "
              f"{1 / args.alpha:g}; P(only A | discordant) in [{lo:.3f}, {hi:.3f}]")
    else:
        print(f"undecided after all {res['pairs_total']} pairs (e-value {res['e_value']:.2f} < {1 / args.alpha:g}; "
              f"only A {res['only_a']}, only B {res['only_b']}); P(only A | discordant) in [{lo:.3f}, {hi:.3f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
