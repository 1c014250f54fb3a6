"""Verify committed results against their per-episode records: ``python -m rsd.analysis.verify docs/results``.

For every evaluation folder under the given roots (a folder holding a ``summary.json``), the verifier
reads the episode records beside it (``episodes.jsonl`` or ``episodes.jsonl.gz``; the last record of an
episode wins, as when the runner resumes) and recomputes, independently of the summary code:

- per mode and per (task, mode): ``episodes``, ``successes``, ``errors``, ``success_rate`` and the 95 %
  Wilson interval ``success_ci_low`` / ``success_ci_high`` (``scipy.stats.binomtest``);
- the summary's own episode count (``episodes``);
- the paired comparison (``comparison``) of a ``mode=both`` run: paired episodes, both / only speculative /
  only baseline / neither, both success rates with their intervals, the difference, the exact McNemar p
  and its verdict;
- the sequential test of a ``sequential=true`` run (``sequential``): replayed on the pairs in the run's
  trial-major order, where it decided (pair, winner, counts at the decision);
- in an ``operating_points.json``: each point's successes, rate, Wilson interval and paired table /
  McNemar p against the baseline evaluation it names (``eval_dir``, ``baseline_eval``: paths relative to
  the repository root or to the file), from those folders' records.

Counts must be equal; real numbers equal to 1e-9 (relative). Any difference fails the run with a line
naming the file and the field (``summary.json: modes.baseline.successes: summary 329, records 328``).
Every ``*.json`` outside ``legacy/`` must also be strict JSON (no ``NaN`` / ``Infinity``).

**The rule (what must be verifiable, and what is only reported).**

1. Anything under a folder named ``legacy`` is not verified: those results were committed without
   per-episode records (``docs/results/legacy/README.md``). They are counted and listed, nothing more.
2. Every other ``summary.json`` claims to be verifiable: it must have its records beside it (else
   FAIL: "no per-episode records"), and every number above must recompute.
3. Provenance: a summary written in the provenance format (it has a ``provenance`` or ``code`` section,
   issue 20 item 1) must name a code commit (hex, 7-40 characters) and at least one artifact hash
   (``content_hash`` / ``sha256``, hex, anywhere under its ``provenance`` / ``artifacts`` / ``policy``);
   missing or malformed ones FAIL. A summary from before that format (no such section) gets its missing
   fields reported as ``missing: ...`` WARN lines and passes, unless ``--require-provenance`` (then they
   FAIL too): the check tightens by itself as summaries start to carry the section.

Exit status: 0 when nothing failed, 1 otherwise (2 for a bad command line).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsd import PROJECT_ROOT
from rsd.analysis.sequential import read_records, replay
from rsd.analysis.stats import ALPHA, mcnemar_exact, pair_records, wilson_interval

SUMMARY = "summary.json"
RECORD_FILES = ("episodes.jsonl", "episodes.jsonl.gz")
LEGACY = "legacy"
REL_TOL = 1e-9
HEX = re.compile(r"^[0-9a-f]+$")


@dataclass
class Report:
    """What one verification found: failures (each fails the run), warnings, and what was looked at."""

    failures: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    verified: list[str] = field(default_factory=list)
    legacy: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.failures

    def text(self) -> str:
        lines = [f"FAIL {m}" for m in self.failures] + [f"WARN {m}" for m in self.warnings]
        lines.append(f"verified {len(self.verified)} result file(s) against their records; {len(self.legacy)} "
                     f"legacy file(s) without records not verified; {len(self.failures)} failure(s)")
        return "\n".join(lines)


def is_legacy(path: Path, root: Path) -> bool:
    try:
        parts = path.resolve().relative_to(root.resolve()).parts
    except ValueError:
        parts = path.parts
    return LEGACY in parts[:-1]


def records_file(folder: Path) -> Path | None:
    return next((folder / n for n in RECORD_FILES if (folder / n).is_file()), None)


def _same(expected: Any, got: Any) -> bool:
    if expected is None or got is None:
        return expected is None and got is None
    if isinstance(expected, bool) or isinstance(got, bool):
        return bool(expected) == bool(got) and isinstance(expected, bool) == isinstance(got, bool)
    if isinstance(expected, int) and isinstance(got, int):
        return expected == got
    try:
        return math.isclose(float(expected), float(got), rel_tol=REL_TOL, abs_tol=1e-12)
    except (TypeError, ValueError):
        return expected == got


class _Checker:
    def __init__(self, report: Report, where: str) -> None:
        self.report, self.where = report, where

    def check(self, field_name: str, stated: Any, recomputed: Any) -> None:
        if not _same(recomputed, stated):
            self.report.failures.append(f"{self.where}: {field_name}: summary {stated!r}, records {recomputed!r}")

    def section(self, prefix: str, stated: Mapping[str, Any] | None, recomputed: Mapping[str, Any]) -> None:
        if not isinstance(stated, Mapping):
            self.report.failures.append(f"{self.where}: {prefix}: missing in the summary (records have it)")
            return
        for k, v in recomputed.items():
            if k in stated:
                self.check(f"{prefix}.{k}", stated[k], v)
            elif k in ("episodes", "successes"):
                self.report.failures.append(f"{self.where}: {prefix}.{k}: missing in the summary")


def success_numbers(records: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    n = len(records)
    k = sum(bool(r.get("success")) for r in records)
    ci = wilson_interval(k, n)
    return {"episodes": n, "successes": k, "errors": sum(bool(r.get("error")) for r in records),
            "success_rate": k / n if n else None, "success_ci_low": ci[0] if ci else None,
            "success_ci_high": ci[1] if ci else None}


def paired_numbers(a: Sequence[Mapping[str, Any]], b: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    pairs, ua, ub = pair_records(a, b)
    if not pairs:
        return None
    sa = [(bool(x.get("success")), bool(y.get("success"))) for x, y in pairs]
    both = sum(x and y for x, y in sa)
    only_a = sum(x and not y for x, y in sa)
    only_b = sum(y and not x for x, y in sa)
    n = len(sa)
    ca, cb = wilson_interval(both + only_a, n), wilson_interval(both + only_b, n)
    p = mcnemar_exact(only_a, only_b)
    return {"pairs": n, "unpaired": ua + ub, "both": both, "only_a": only_a, "only_b": only_b,
            "neither": n - both - only_a - only_b, "a_rate": (both + only_a) / n, "a_low": ca[0], "a_high": ca[1],
            "b_rate": (both + only_b) / n, "b_low": cb[0], "b_high": cb[1], "diff": (only_a - only_b) / n,
            "mcnemar_p": p, "significant": p < ALPHA}


def sequential_numbers(records: Sequence[Mapping[str, Any]], mode_a: str, mode_b: str, alpha: float,
                       prior: float) -> dict[str, Any]:
    """The sequential test of a ``sequential=true`` run replayed: its pairs in the run's trial-major order
    (trial 0 of every task, then trial 1, ...), fed until the first decision."""
    s = replay([r for r in records if r.get("mode") == mode_a], [r for r in records if r.get("mode") == mode_b],
               alpha, prior, order="trial")
    return {k: s[k] for k in ("decided", "decided_at_pair", "winner", "pairs_used", "only_a", "only_b")}


def _find_hashes(obj: Any) -> list[str]:
    out: list[str] = []
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if k in ("content_hash", "sha256", "hash") and isinstance(v, str):
                out.append(v)
            else:
                out += _find_hashes(v)
    elif isinstance(obj, list):
        for v in obj:
            out += _find_hashes(v)
    return out


def check_provenance(summary: Mapping[str, Any], where: str, report: Report, require: bool) -> None:
    prov = summary.get("provenance") if isinstance(summary.get("provenance"), Mapping) else {}
    code = prov.get("code") or summary.get("code") or {}
    commit = code.get("commit") if isinstance(code, Mapping) else (code if isinstance(code, str) else None)
    commit = commit or summary.get("commit")
    hashes = _find_hashes({"p": prov, "a": summary.get("artifacts"), "policy": summary.get("policy")})
    claims = "provenance" in summary or "code" in summary
    problems = []
    if not commit:
        problems.append("code commit")
    elif not (isinstance(commit, str) and 7 <= len(commit) <= 40 and HEX.match(commit)):
        problems.append(f"code commit (not a git sha: {commit!r})")
    if not hashes:
        problems.append("artifact hashes")
    elif bad := [h for h in hashes if not HEX.match(h.lower()) or len(h) < 8]:
        problems.append(f"artifact hashes (not hex: {bad[:3]})")
    if problems:
        msg = f"{where}: missing: {', '.join(problems)}"
        (report.failures if claims or require else report.warnings).append(msg)


def verify_summary(path: Path, report: Report, require_provenance: bool = False,
                   name: str | None = None) -> None:
    """Check one ``summary.json`` against the records beside it (see the module docstring)."""
    where = name or str(path)
    try:
        summary = json.loads(path.read_text(), parse_constant=_reject_constant)
    except (ValueError, OSError) as exc:
        report.failures.append(f"{where}: not strict JSON ({exc})")
        return
    rec_path = records_file(path.parent)
    if rec_path is None:
        report.failures.append(f"{where}: no per-episode records ({' or '.join(RECORD_FILES)}) beside it: commit "
                               f"them, or move the result under a {LEGACY}/ folder")
        return
    records = read_records(rec_path)
    c = _Checker(report, where)
    c.check("episodes", summary.get("episodes"), len(records))
    modes = sorted({str(r.get("mode")) for r in records})
    stated_modes = summary.get("modes") or {}
    if set(stated_modes) != set(modes):
        report.failures.append(f"{where}: modes: summary {sorted(stated_modes)}, records {modes}")
    for m in modes:
        c.section(f"modes.{m}", stated_modes.get(m), success_numbers([r for r in records if r.get("mode") == m]))
    stated_tasks = {int(t["task_id"]): t for t in summary.get("per_task") or [] if "task_id" in t}
    tasks = sorted({int(r["task_id"]) for r in records})
    if stated_tasks and sorted(stated_tasks) != tasks:
        report.failures.append(f"{where}: per_task: summary tasks {sorted(stated_tasks)}, records {tasks}")
    for t in tasks if stated_tasks else []:
        for m in modes:
            recs = [r for r in records if int(r["task_id"]) == t and r.get("mode") == m]
            if recs:
                c.section(f"per_task[task {t}].modes.{m}", (stated_tasks.get(t) or {}).get("modes", {}).get(m),
                          success_numbers(recs))
    paired = None
    if "speculative" in modes and "baseline" in modes:
        paired = paired_numbers([r for r in records if r.get("mode") == "speculative"],
                                [r for r in records if r.get("mode") == "baseline"])
    stated = summary.get("comparison")
    if paired is None and stated:
        report.failures.append(f"{where}: comparison: the summary has one, the records pair no episodes")
    elif paired is not None:
        if not isinstance(stated, Mapping):
            report.failures.append(f"{where}: comparison: missing in the summary (the records pair "
                                   f"{paired['pairs']} episodes)")
        else:
            for key, val in (("paired_episodes", paired["pairs"]), ("unpaired_episodes", paired["unpaired"]),
                             ("both_success", paired["both"]), ("only_speculative", paired["only_a"]),
                             ("only_baseline", paired["only_b"]), ("neither", paired["neither"]),
                             ("speculative_success_rate", paired["a_rate"]),
                             ("speculative_success_ci_low", paired["a_low"]),
                             ("speculative_success_ci_high", paired["a_high"]),
                             ("baseline_success_rate", paired["b_rate"]), ("baseline_success_ci_low", paired["b_low"]),
                             ("baseline_success_ci_high", paired["b_high"]), ("success_rate_diff", paired["diff"]),
                             ("mcnemar_p", paired["mcnemar_p"]), ("significant", paired["significant"])):
                c.check(f"comparison.{key}", stated.get(key), val)
    if isinstance(summary.get("sequential"), Mapping):
        seq = summary["sequential"]
        c.section("sequential", {k: seq.get(k) for k in ("decided", "decided_at_pair", "winner", "pairs_used",
                                                         "only_a", "only_b")},
                  sequential_numbers(records, seq.get("mode_a", "speculative"), seq.get("mode_b", "baseline"),
                                     float(seq.get("alpha", ALPHA)), float(seq.get("prior", 1.0))))
    check_provenance(summary, where, report, require_provenance)
    report.verified.append(where)


def _resolve(ref: str, base: Path, repo: Path) -> Path | None:
    for cand in (Path(ref), repo / ref, base / ref):
        if records_file(cand) is not None:
            return cand
    return None


def verify_operating_points(path: Path, report: Report, repo: Path, name: str | None = None) -> None:
    """Recompute the success numbers and paired tables of an ``operating_points.json``."""
    where = name or str(path)
    data = json.loads(path.read_text(), parse_constant=_reject_constant)
    base_dir = _resolve(str(data.get("baseline_eval")), path.parent, repo)
    if base_dir is None:
        report.failures.append(f"{where}: baseline_eval: {data.get('baseline_eval')!r} has no per-episode records")
        return
    ref = [r for r in read_records(records_file(base_dir)) if r.get("mode") == "baseline"]
    for i, p in enumerate(data.get("points") or []):
        c = _Checker(report, f"{where}: points[{i}] ({p.get('name')})")
        d = _resolve(str(p.get("eval_dir")), path.parent, repo)
        if d is None:
            report.failures.append(f"{c.where}: eval_dir: {p.get('eval_dir')!r} has no per-episode records")
            continue
        mode = "baseline" if (p.get("settings") or {}).get("mode") == "baseline" else "speculative"
        recs = [r for r in read_records(records_file(d)) if r.get("mode") == mode]
        s = success_numbers(recs)
        for k in ("episodes", "successes", "success_rate"):
            c.check(k, p.get(k), s[k])
        ci = p.get("wilson_95") or [None, None]
        c.check("wilson_95[0]", ci[0], s["success_ci_low"])
        c.check("wilson_95[1]", ci[1], s["success_ci_high"])
        pr, stated = paired_numbers(recs, ref), p.get("paired_vs_8_layer_baseline")
        if pr is None or stated is None:
            if (pr is None) != (stated is None):
                report.failures.append(f"{c.where}: paired_vs_8_layer_baseline: stated {stated is not None}, "
                                       f"records pair {0 if pr is None else pr['pairs']} episodes")
            continue
        for key, val in (("pairs", pr["pairs"]), ("both", pr["both"]), ("only_a", pr["only_a"]),
                         ("only_b", pr["only_b"]), ("neither", pr["neither"]), ("mcnemar_p", pr["mcnemar_p"])):
            c.check(f"paired_vs_8_layer_baseline.{key}", stated.get(key), val)
    report.verified.append(where)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def verify(roots: Iterable[str | Path], require_provenance: bool = False, repo: str | Path | None = None) -> Report:
    """Verify every result under ``roots`` (see the module docstring); never raises on a bad file."""
    repo = Path(repo or PROJECT_ROOT)
    report = Report()
    for root in map(Path, roots):
        if not root.exists():
            report.failures.append(f"{root}: does not exist")
            continue
        files = [root] if root.is_file() else sorted(root.rglob("*.json"))
        for f in files:
            name = str(f)
            if is_legacy(f, root if root.is_dir() else root.parent):
                if f.name in (SUMMARY, "operating_points.json"):
                    report.legacy.append(name)
                continue
            try:
                json.loads(f.read_text(), parse_constant=_reject_constant)
            except (ValueError, OSError) as exc:
                report.failures.append(f"{name}: not strict JSON ({exc})")
                continue
            if f.name == SUMMARY:
                verify_summary(f, report, require_provenance, name)
            elif f.name == "operating_points.json":
                verify_operating_points(f, report, repo, name)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rsd.analysis.verify", description=__doc__.split("\n")[0])
    ap.add_argument("roots", nargs="*", default=["docs/results"], help="result folders (default: docs/results)")
    ap.add_argument("--require-provenance", action="store_true",
                    help="fail summaries without a code commit and artifact hashes even in the old format")
    args = ap.parse_args(argv)
    report = verify(args.roots, args.require_provenance)
    print(report.text())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
