"""Aggregate episode records into the evaluation's results: summary, per-task table, files, W&B.

- :func:`summarize` turns the JSONL records into one dict (per mode: episodes, successes, success rate with
  its 95 % Wilson interval, errors, inference time, engine statistics; per task; speculative vs baseline
  paired on the same init states, with the paired table and the exact McNemar p-value, when both modes ran).
  The statistics themselves live in :mod:`rsd.eval.stats`.
- :func:`format_guide_summary` prints it in the original integration guide's form; :func:`task_table` gives
  the per-task numbers (one row per task and mode), rendered by :func:`task_table_markdown` and
  :func:`task_table_rich`.
- :func:`write_summary` writes ``summary.json``, ``summary.txt`` and ``tasks.md``; :func:`log_to_wandb`
  sends the same metrics, the tables and the videos to a Weights & Biases run.
- The number formats (``fmt_*``) of every text output of ``rsd.eval`` (summary, report, notebook).

Errored episodes count as failures in the success rate (an episode that crashed did not succeed) and are
reported separately (``errors``, ``success_rate_no_errors``), never hidden.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rsd.analysis.stats import ALPHA, CONFIDENCE, pair_records, paired_comparison, success_stats
from rsd.policies.base import EVAL_MODES

log = logging.getLogger(__name__)

SUMMARY_JSON = "summary.json"
SUMMARY_TXT = "summary.txt"
TASKS_MD = "tasks.md"


def mean_or_none(xs: Sequence[float]) -> float | None:
    return float(np.mean(xs)) if len(xs) else None


def _pct(xs: Sequence[float], q: float) -> float | None:
    return float(np.percentile(xs, q)) if len(xs) else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return float(a) / float(b) if a is not None and b else None


def engine_summary(records: Sequence[Mapping[str, Any]]) -> dict:
    """Engine statistics of a set of episodes: totals, per-inference means, acceptance."""
    totals: dict[str, Any] = {}
    inferences = 0
    for rec in records:
        inferences += int(rec.get("num_inferences", len(rec.get("inference_times_ms") or [])))
        for key, value in (rec.get("engine_stats") or {}).items():
            if isinstance(value, bool):
                value = int(value)
            if isinstance(value, int | float):
                totals[key] = totals.get(key, 0.0) + float(value)
            elif isinstance(value, list) and all(isinstance(v, int | float) for v in value):
                prev = totals.get(key)
                totals[key] = ([a + b for a, b in zip(prev, value, strict=True)]
                               if isinstance(prev, list) and len(prev) == len(value) else list(value))
    out: dict[str, Any] = {"inferences": inferences, "totals": totals}
    for key, value in totals.items():
        if key.endswith("_ms") and isinstance(value, float):
            out[f"avg_{key}"] = _ratio(value, inferences)
    out["acceptance_rate"] = _ratio(totals.get("accepted_layers"), totals.get("drafted_layers"))
    out["mean_accepted_layers"] = _ratio(totals.get("accepted_layers"), inferences) \
        if "accepted_layers" in totals else None
    out["main_steps_per_inference"] = _ratio(totals.get("main_steps"), inferences) \
        if "main_steps" in totals else None
    out["main_steps_saved_per_inference"] = _ratio(totals.get("main_steps_saved"), inferences) \
        if "main_steps_saved" in totals else None
    out["decoded_layers_per_inference"] = _ratio(totals.get("decoded_layers"), inferences) \
        if "decoded_layers" in totals else None
    acc, dra = totals.get("accepted_per_layer"), totals.get("drafted_per_layer")
    if isinstance(acc, list) and isinstance(dra, list) and len(acc) == len(dra):
        out["acceptance_per_layer"] = [_ratio(a, d) for a, d in zip(acc, dra, strict=True)]
    return out


def mode_summary(records: Sequence[Mapping[str, Any]]) -> dict:
    """One mode's numbers: success with its 95 % Wilson interval, errors, timing, engine statistics."""
    n = len(records)
    successes = sum(bool(r.get("success")) for r in records)
    errors = sum(bool(r.get("error")) for r in records)
    times = [float(t) for r in records for t in (r.get("inference_times_ms") or [])]
    ok_steps = [int(r["steps"]) for r in records if r.get("success")]
    return {
        "episodes": n,
        "successes": successes,
        **success_stats(successes, n),
        "errors": errors,
        "success_rate_no_errors": _ratio(successes, n - errors),
        "avg_inference_ms": mean_or_none(times),
        "p50_inference_ms": _pct(times, 50),
        "p95_inference_ms": _pct(times, 95),
        "avg_steps_success": mean_or_none(ok_steps),
        "avg_episode_s": mean_or_none([float(r.get("wall_time_s") or 0.0) for r in records]),
        "engine": engine_summary(records),
    }


def compare_modes(records: Sequence[Mapping[str, Any]], summary_modes: Mapping[str, dict]) -> dict | None:
    """Speculative vs baseline on the init states both ran, paired by task and init state.

    The success numbers are the paired table and the exact McNemar p-value (:mod:`rsd.eval.stats`); the
    timing numbers are over the same paired episodes, so both come from the same process and inputs.
    """
    if not all(m in summary_modes for m in EVAL_MODES):
        return None
    spec_recs = [r for r in records if r["mode"] == "speculative"]
    base_recs = [r for r in records if r["mode"] == "baseline"]
    pairs, unpaired_spec, unpaired_base = pair_records(spec_recs, base_recs)
    paired = paired_comparison(spec_recs, base_recs)
    if paired is None:
        return None
    spec_t = [float(t) for s, _ in pairs for t in s.get("inference_times_ms") or []]
    base_t = [float(t) for _, b in pairs for t in b.get("inference_times_ms") or []]
    spec_eng = engine_summary([s for s, _ in pairs])
    base_eng = engine_summary([b for _, b in pairs])
    out = {
        "paired_episodes": paired["pairs"],
        "unpaired_episodes": unpaired_spec + unpaired_base,
        "speculative_success_rate": paired["a_success_rate"],
        "speculative_success_ci_low": paired["a_success_ci_low"],
        "speculative_success_ci_high": paired["a_success_ci_high"],
        "baseline_success_rate": paired["b_success_rate"],
        "baseline_success_ci_low": paired["b_success_ci_low"],
        "baseline_success_ci_high": paired["b_success_ci_high"],
        "success_rate_diff": paired["diff"],  # speculative minus baseline
        "both_success": paired["both"],
        "only_speculative": paired["only_a"],
        "only_baseline": paired["only_b"],
        "neither": paired["neither"],
        "mcnemar_p": paired["mcnemar_p"],
        "significant": paired["significant"],
        "speculative_avg_inference_ms": mean_or_none(spec_t),
        "baseline_avg_inference_ms": mean_or_none(base_t),
        "speedup": _ratio(mean_or_none(base_t), mean_or_none(spec_t)),  # baseline time / speculative time
        # strict speculative decoding is lossless: the executed actions should be identical
        "identical_actions": sum(bool(s.get("action_digest")) and s.get("action_digest") == b.get("action_digest")
                                 for s, b in pairs),
    }
    for key in ("avg_engine_ms", "avg_main_ms"):
        if spec_eng.get(key) and base_eng.get(key):
            out[f"speedup_{key[4:-3]}"] = base_eng[key] / spec_eng[key]
    return out


def summarize(records: Sequence[Mapping[str, Any]], suite: str | None = None, extra: Mapping | None = None) -> dict:
    """Everything the evaluation reports, computed from the episode records alone."""
    records = list(records)
    suites = sorted({r["suite"] for r in records})
    modes = [m for m in EVAL_MODES if any(r["mode"] == m for r in records)]
    modes += sorted({r["mode"] for r in records} - set(modes))
    per_mode = {m: mode_summary([r for r in records if r["mode"] == m]) for m in modes}
    tasks = sorted({int(r["task_id"]) for r in records})
    per_task = []
    for t in tasks:
        recs = [r for r in records if int(r["task_id"]) == t]
        named = next((r for r in recs if r.get("task_name")), {})
        row = {"task_id": t, "task_name": named.get("task_name"), "instruction": named.get("instruction"),
               "modes": {}}
        for m in modes:
            mr = [r for r in recs if r["mode"] == m]
            if mr:
                s = sum(bool(r.get("success")) for r in mr)
                row["modes"][m] = {"episodes": len(mr), "successes": s, **success_stats(s, len(mr)),
                                   "errors": sum(bool(r.get("error")) for r in mr)}
        per_task.append(row)
    errors = [{"task_id": r["task_id"], "trial": r["trial"], "mode": r["mode"], "error": r["error"]}
              for r in records if r.get("error")]
    out = {
        "suite": suite or (suites[0] if len(suites) == 1 else ",".join(suites)),
        "episodes": len(records),
        "tasks": tasks,
        "trials_per_task": max((sum(1 for r in records if r["task_id"] == t and r["mode"] == m)
                                for t in tasks for m in modes), default=0),
        "modes": per_mode,
        "per_task": per_task,
        "comparison": compare_modes(records, per_mode),
        "statistics": STATISTICS_NOTE,
        "errors": errors[:100],
        "num_errors": len(errors),
    }
    if extra:
        out.update(extra)
    return out


# --------------------------------------------------------------------------------------------------
# Number formats (the one place: the summary, the report and the notebook all print through these)


def num(x: Any) -> float | None:
    """``x`` as a float, None for None / NaN / anything not a number (pandas cells, JSON nulls)."""
    if x is None or isinstance(x, bool):
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt_pct(x: Any, digits: int = 1) -> str:
    x = num(x)
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def fmt_ms(x: Any) -> str:
    x = num(x)
    return "n/a" if x is None else f"{x:.1f} ms"


def fmt_mb(x: Any) -> str:
    x = num(x)
    return "n/a" if x is None else f"{x:,.0f} MB"


def fmt_ci(low: Any, high: Any, digits: int = 1) -> str:
    """``[low, high]`` in percent (the 95 % Wilson interval of a success rate); empty when unknown."""
    lo, hi = num(low), num(high)
    return "" if lo is None or hi is None else f"[{100 * lo:.{digits}f}, {100 * hi:.{digits}f}]"


def fmt_rate(rate: Any, low: Any = None, high: Any = None, digits: int = 1) -> str:
    """A success rate with its interval: ``75.0% [30.1, 95.4]``."""
    ci = fmt_ci(low, high, digits)
    return fmt_pct(rate, digits) + (f" {ci}" if ci and num(rate) is not None else "")


def fmt_points(a: Any, b: Any) -> str:
    x, y = num(a), num(b)
    return "n/a" if x is None or y is None else f"{100 * (x - y):+.1f} pts"


def fmt_speedup(spec_ms: Any, base_ms: Any) -> str:
    s, b = num(spec_ms), num(base_ms)
    if s is None or b is None or s <= 0 or b <= 0:
        return "n/a"
    change = f"{100 * (s - b) / b:+.1f}%"
    return f"{b / s:.2f}x faster ({change})" if b >= s else f"{s / b:.2f}x slower ({change})"


def fmt_relative(a: Any, b: Any) -> str:
    x, y = num(a), num(b)
    return "n/a" if x is None or y is None or y == 0 else f"{100 * (x - y) / y:+.1f}%"


def fmt_p(p: Any) -> str:
    p = num(p)
    return "n/a" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def significance(p: Any) -> str:
    """The verdict a text output prints next to a paired difference (exact McNemar, level :data:`ALPHA`)."""
    x = num(p)
    if x is None:
        return "not tested"
    word = "significant difference" if x < ALPHA else "no significant difference"
    return f"{word} (exact McNemar p {'' if x < 0.001 else '= '}{fmt_p(x)})"


STATISTICS_NOTE = (f"success rates with their {100 * CONFIDENCE:.0f}% Wilson interval; paired comparisons "
                   f"(same task and init state) with the exact McNemar test, 'no significant difference' when "
                   f"p >= {ALPHA}")


# --------------------------------------------------------------------------------------------------
# Text, tables


def paired_lines(paired: Mapping[str, Any], a: str, b: str, indent: str = "   ") -> list[str]:
    """The paired table of ``a`` vs ``b`` (keys of :func:`rsd.eval.stats.paired_table`) as fixed-width text."""
    cols = ["both succeed", f"only {a}", f"only {b}", "neither"]
    vals = [paired["both"], paired["only_a"], paired["only_b"], paired["neither"]]
    return [indent + " | ".join(cols), indent + " | ".join(str(v).rjust(len(c)) for v, c in zip(vals, cols,
                                                                                                strict=True))]


def _interval_text(s: Mapping[str, Any]) -> str:
    lo, hi = num(s.get("success_ci_low")), num(s.get("success_ci_high"))
    return "" if lo is None or hi is None else f" (95% Wilson interval {100 * lo:.1f}-{100 * hi:.1f}%)"


def heldout_line(summary: Mapping[str, Any]) -> str | None:
    """Whether the init states were held out from the policy's training data (``rsd.eval.start_states.check_held_out``):
    the first line of every summary, so a replay result can never pass for a held-out one."""
    heldout = summary.get("heldout") or {}
    return heldout.get("line")


def format_guide_summary(summary: Mapping[str, Any]) -> str:
    """The original guide's summary block, once per mode, then the paired comparison when both ran."""
    bar = "=" * 60
    lines = [heldout_line(summary)] if heldout_line(summary) else []
    for mode, s in summary["modes"].items():
        eng = s["engine"]
        lines += [
            bar, f"EVALUATION COMPLETE ({mode})", bar,
            f"   Task Suite: {summary['suite']}",
            f"   Total Episodes: {s['episodes']}",
            f"   Total Successes: {s['successes']}",
            f"   Success Rate: {fmt_pct(s['success_rate'])}" + _interval_text(s),
            f"   Avg Inference Time: {fmt_ms(s['avg_inference_ms'])}",
            f"   Speculative Decoding: {mode == 'speculative'}",
        ]
        if s["errors"]:
            lines.append(f"   Errors: {s['errors']} episodes raised (counted as failures; "
                         f"success rate without them {fmt_pct(s['success_rate_no_errors'])})")
        lines += [
            "   RSD Engine Statistics:",
            f"     Total Inferences: {eng['inferences']}",
            f"     Avg Draft Time: {fmt_ms(eng.get('avg_draft_ms'))}",
            f"     Avg Main Time: {fmt_ms(eng.get('avg_main_ms'))}",
            f"     Acceptance Rate: {fmt_pct(eng.get('acceptance_rate'))}",
        ]
        if eng.get("mean_accepted_layers") is not None:
            lines.append(f"     Mean Accepted Layers / Chunk: {eng['mean_accepted_layers']:.2f}")
        if eng.get("main_steps_per_inference") is not None:
            lines.append(f"     Main Steps / Chunk: {eng['main_steps_per_inference']:.2f}")
        if eng.get("decoded_layers_per_inference") is not None:
            lines.append(f"     Decoded Layers / Chunk: {eng['decoded_layers_per_inference']:.2f}")
        lines.append(bar)
    cmp_ = summary.get("comparison")
    if cmp_:
        speedup = "n/a" if cmp_["speedup"] is None else f"{cmp_['speedup']:.2f}x"
        unpaired = cmp_.get("unpaired_episodes") or 0
        spec_rate, base_rate = (fmt_rate(*(cmp_.get(f"{m}_success_{k}") for k in ("rate", "ci_low", "ci_high")))
                                for m in EVAL_MODES)
        lines += [
            "SPECULATIVE vs BASELINE (paired: same task and init state)",
            f"   Paired Episodes: {cmp_['paired_episodes']}"
            + (f" ({unpaired} episodes without a partner left out)" if unpaired else ""),
            f"   Success Rate: {spec_rate} vs {base_rate} (95% Wilson intervals)",
            f"   Difference: {100 * cmp_['success_rate_diff']:+.1f} points, {significance(cmp_.get('mcnemar_p'))}",
            "   Paired Outcomes:",
            *paired_lines({"both": cmp_["both_success"], "only_a": cmp_["only_speculative"],
                           "only_b": cmp_["only_baseline"], "neither": cmp_["neither"]},
                          "speculative", "baseline", indent="     "),
            f"   Avg Inference Time: {fmt_ms(cmp_['speculative_avg_inference_ms'])} vs "
            f"{fmt_ms(cmp_['baseline_avg_inference_ms'])}",
            f"   Speedup (baseline / speculative inference time): {speedup}",
            f"   Identical Action Sequences: {cmp_['identical_actions']} of {cmp_['paired_episodes']}",
            bar,
        ]
    seq = summary.get("sequential")
    if seq:
        lines += ["SEQUENTIAL TEST (anytime-valid mixture SPRT on the discordant pairs, work list trial-major)"]
        lo, hi = seq["interval_p_only_a"]
        if seq["decided"]:
            better = seq["mode_a"] if seq["winner"] == "A" else seq["mode_b"]
            lines += [f"   Decided at pair {seq['decided_at_pair']} of {seq['pairs_total']} "
                      f"({seq['episodes_used']} of {seq['episodes_total']} episodes): {better} better, "
                      f"e-value {seq['e_value_at_decision']:.1f} >= {seq['threshold']:g}",
                      "   (the fixed-n McNemar p above is not valid after an early stop; this decision is)"]
        else:
            lines += [f"   Undecided after {seq['pairs_used']} of {seq['pairs_total']} pairs (e-value "
                      f"{seq['e_value']:.2f} < {seq['threshold']:g}): no difference shown"]
        lines += [f"   P(only {seq['mode_a']} | discordant) in [{lo:.3f}, {hi:.3f}] (confidence sequence)", bar]
    return "\n".join(lines)


#: columns of :func:`task_table` (also the per-task frames of ``rsd.eval.compare``, local or from W&B)
TASK_COLUMNS = ["label", "mode", "task_id", "task_name", "instruction", "episodes", "successes", "success_rate",
                "success_ci_low", "success_ci_high", "errors"]


def task_table(summary: Mapping[str, Any], label: str | None = None) -> list[dict[str, Any]]:
    """Success per task: one row per (task, mode) with :data:`TASK_COLUMNS`; the one source of per-task
    numbers for tasks.md, the console, W&B and the comparison notebook."""
    rows = []
    for task in summary.get("per_task") or []:
        for mode, m in (task.get("modes") or {}).items():
            k, n = m.get("successes"), m.get("episodes")
            ci = (success_stats(int(k), int(n)) if k is not None and n is not None
                  else {key: m.get(key) for key in ("success_rate", "success_ci_low", "success_ci_high")})
            rows.append({"label": label, "mode": mode, "task_id": int(task["task_id"]),
                         "task_name": task.get("task_name"), "instruction": task.get("instruction"),
                         "episodes": n, "successes": k, **ci, "errors": m.get("errors")})
    return rows


def _cell(m: Mapping[str, Any] | None) -> str:
    if not m:
        return "-"
    ci = fmt_ci(m.get("success_ci_low"), m.get("success_ci_high"), digits=0)
    cell = f"{m['successes']}/{m['episodes']} ({fmt_pct(m['success_rate'], 0)})" + (f" {ci}" if ci else "")
    return cell + (f", {m['errors']} err" if m.get("errors") else "")


def _wide_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    """:func:`task_table` pivoted to one text row per task (a column per mode) and a total row."""
    modes = list(summary["modes"])
    by_task: dict[int, dict[str, Any]] = {}
    for r in task_table(summary):
        by_task.setdefault(r["task_id"], {"name": r["instruction"] or r["task_name"] or ""})[r["mode"]] = r
    header = ["task", "instruction"] + modes
    rows = [[str(t), v["name"]] + [_cell(v.get(m)) for m in modes] for t, v in by_task.items()]
    rows.append(["all", ""] + [_cell(summary["modes"][m]) for m in modes])
    return header, rows


TASK_CELL_NOTE = "Cells: successes/episodes (success rate) [95% Wilson interval, %]."


def task_table_rich(summary: Mapping[str, Any]):
    """The per-task table as a rich Table (console)."""
    from rich.table import Table

    header, rows = _wide_rows(summary)
    table = Table(title=f"{summary['suite']}: successes per task", caption=TASK_CELL_NOTE)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right", overflow="fold")
    for r in rows:
        table.add_row(*r, end_section=r[0] == "all")
    return table


def md_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """A markdown table (``|`` in cells escaped)."""
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in esc]


PAIRED_HEADER = ["Paired episodes", "Both succeed", "Only {a}", "Only {b}", "Neither", "McNemar p (exact)",
                 "Verdict"]


def paired_markdown(paired: Mapping[str, Any], a: str, b: str) -> list[str]:
    """A paired comparison (:func:`rsd.eval.stats.paired_comparison`) as a one-row markdown table."""
    header = [h.format(a=a, b=b) for h in PAIRED_HEADER]
    verdict = "significant difference" if paired["significant"] else "no significant difference"
    return md_table(header, [[paired["pairs"], paired["both"], paired["only_a"], paired["only_b"], paired["neither"],
                              fmt_p(paired["mcnemar_p"]), verdict]])


def task_table_markdown(summary: Mapping[str, Any]) -> str:
    """tasks.md: the per-task table and, when both modes ran, their paired comparison."""
    header, rows = _wide_rows(summary)
    first = heldout_line(summary)
    lines = ([first, ""] if first else []) + [f"# {summary['suite']}: successes per task", "", TASK_CELL_NOTE, ""]
    lines += md_table(header, rows)
    cmp_ = summary.get("comparison")
    if cmp_:
        paired = {"pairs": cmp_["paired_episodes"], "both": cmp_["both_success"], "only_a": cmp_["only_speculative"],
                  "only_b": cmp_["only_baseline"], "neither": cmp_["neither"], "mcnemar_p": cmp_["mcnemar_p"],
                  "significant": cmp_["significant"]}
        spec_rate, base_rate = (fmt_rate(*(cmp_.get(f"{m}_success_{k}") for k in ("rate", "ci_low", "ci_high")))
                                for m in EVAL_MODES)
        lines += ["", "## Speculative vs baseline (paired: same task and init state)", "",
                  f"Success {spec_rate} vs {base_rate}: {100 * cmp_['success_rate_diff']:+.1f} points, "
                  f"{significance(cmp_['mcnemar_p'])}.", ""]
        lines += paired_markdown(paired, "speculative", "baseline")
    return "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path, summary: Mapping[str, Any]) -> dict[str, Path]:
    out_dir = Path(out_dir)
    paths = {"json": out_dir / SUMMARY_JSON, "txt": out_dir / SUMMARY_TXT, "md": out_dir / TASKS_MD}
    paths["json"].write_text(json.dumps(summary, indent=2, default=str) + "\n")
    paths["txt"].write_text(format_guide_summary(summary) + "\n")
    paths["md"].write_text(task_table_markdown(summary))
    return paths


def print_summary(summary: Mapping[str, Any]) -> None:
    from rich.console import Console

    console = Console()
    console.print(format_guide_summary(summary), highlight=False)
    console.print(task_table_rich(summary))
