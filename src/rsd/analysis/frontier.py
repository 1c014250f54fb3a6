"""Operating points: decode speed (one benchmark run) against closed-loop success (evaluation), one row per setting.

Speed and success come from different runs on purpose: decode speedups are ratios measured side by side
in one benchmark process on held-out cache frames (``scripts/benchmark_engine.py --out bench.json``, the
modes taking turns), success rates from LIBERO rollouts on held-out init states. An operating point joins
an evaluation (folder, mode) with the benchmark row that has the same decoding settings (acceptance rule,
delta / tau / epsilon, depth, early exit), and is compared paired with the 8-layer baseline's evaluation
(same task and init state; exact McNemar test).

Rules that keep the table honest (issue 20):

- **One table, one benchmark run.** A benchmark file whose rows name more than one run (``run_id`` of the
  rows, or a top-level ``runs`` / ``merged_from`` list) is refused. Every speedup is computed here from the
  ``total_ms`` columns the table shows: the point's ms per chunk and the 8-layer baseline's (and the
  same-depth baseline's) ms per chunk of the same file. Nothing is copied from a speedup field.
- **One acceptance definition**: accepted drafted layers / drafted layers, from the counts when they are
  there, at every depth. The drafted layers per chunk stand beside it (depth D drafts at most D - 1
  layers, so the denominator changes with depth and is shown). Cache-frame acceptance (benchmark,
  open loop) and closed-loop acceptance (evaluation) are separate columns and never substitute for each
  other.
- **Strict JSON**: ``operating_points.json`` has ``null`` where a number is undefined, never ``NaN``.

Success criterion (issue 13): McNemar p >= 0.05 against the 8-layer baseline and at most 3 points below it.
``python -m rsd.analysis.report <eval dirs> --baseline <8-layer baseline dir> --benchmark bench.json --out DIR``
writes ``operating_points.json``, ``operating_points.md`` and ``frontier.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.analysis import jsonio
from rsd.analysis.stats import paired_comparison, success_stats

#: The most a point may lose against the 8-layer baseline and still meet the criterion (rate units).
MAX_DROP = 0.03
ALPHA = 0.05
SETTING_KEYS = ("mode", "delta", "tau", "epsilon", "depth", "early_exit")


def eval_settings(policy: Mapping[str, Any], mode: str) -> dict[str, Any]:
    """The decoding settings an evaluation (its policy spec) ran ``mode`` with, as the benchmark names them."""
    acceptance = policy.get("acceptance", "strict")
    spec = mode == "speculative"
    return {
        "mode": acceptance if spec else "baseline",
        "delta": policy.get("delta") if spec and acceptance == "relaxed" else None,
        "tau": policy.get("tau") if spec and acceptance == "relaxed" else None,
        "epsilon": policy.get("epsilon") if spec and acceptance == "epsilon" else None,
        "depth": int(policy.get("depth") or 8),
        "early_exit": policy.get("early_exit"),
    }


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return abs(float(a) - float(b)) < 1e-9
    return a == b


def match_row(settings: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The benchmark row with these settings (``depth`` null in a row means 8)."""
    for row in rows:
        s = dict(row.get("settings") or {})
        s["depth"] = int(s.get("depth") or 8)
        if s.get("mode") != "relaxed":
            s["delta"] = s["tau"] = None
        if s.get("mode") != "epsilon":
            s["epsilon"] = None
        if all(_same(s.get(k), settings.get(k)) for k in SETTING_KEYS):
            return row
    return None


def point_name(settings: Mapping[str, Any]) -> str:
    """A short label: ``baseline``, ``strict``, ``delta=1``, ``eps=0.1`` (+ ``@D3``, ``+exit:bound``)."""
    mode = settings["mode"]
    name = {"relaxed": f"delta={settings.get('delta')}" if settings.get("delta") is not None
            else f"tau={settings.get('tau')}", "epsilon": f"eps={settings.get('epsilon')}"}.get(mode, mode)
    if settings.get("depth", 8) != 8:
        name += f"@D{settings['depth']}"
    if settings.get("early_exit"):
        name += f"+exit:{settings['early_exit']}"
    return name


def _num(x: Any) -> float | None:
    """A finite float, else None (NaN and missing values alike)."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    return float(x) if x == x and abs(x) != float("inf") else None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = _num(a), _num(b)
    return a / b if a is not None and b else None


def benchmark_run(bench: Mapping[str, Any]) -> str | None:
    """The run a benchmark file comes from (``run_id``); raises when its rows come from several runs."""
    if bench.get("merged_from") or len(bench.get("runs") or []) > 1:
        raise ValueError("the benchmark file merges several runs; one table must be one run: give the JSON "
                         "that one scripts/benchmark_engine.py run wrote")
    ids = {r.get("run_id") for r in bench.get("rows") or [] if r.get("run_id") is not None}
    if bench.get("run_id") is not None:
        ids.add(bench["run_id"])
    if len(ids) > 1:
        raise ValueError(f"the benchmark rows come from {len(ids)} runs ({', '.join(sorted(map(str, ids)))}); "
                         "one table must be one run")
    return next(iter(ids), None)


def _base_settings(depth: int = 8, early_exit: Any = None) -> dict[str, Any]:
    return {"mode": "baseline", "delta": None, "tau": None, "epsilon": None, "depth": depth, "early_exit": early_exit}


def reference_row(row: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The baseline row with ``row``'s depth / exit settings (its ``reference``, else matched by settings)."""
    ref = row.get("reference")
    found = next((r for r in rows if ref is not None and r.get("mode") == ref), None)
    if found is not None:
        return found
    s = row.get("settings") or {}
    return match_row(_base_settings(int(s.get("depth") or 8), s.get("early_exit")), rows)


def cache_frame_acceptance(row: Mapping[str, Any] | None) -> tuple[float | None, float | None]:
    """``(acceptance, drafted layers per chunk)`` of a benchmark row: accepted drafted layers / drafted
    layers, from the counts when the row has them."""
    if not row:
        return None, None
    acc = _ratio(row.get("accepted_layers"), row.get("drafted_layers"))
    if acc is None:
        acc = _num(row.get("acceptance"))
    per_chunk = _num(row.get("drafted_layers_per_chunk"))
    if per_chunk is None:
        per_chunk = _ratio(row.get("drafted_layers"), row.get("chunks"))
    return acc, per_chunk


def closed_loop_acceptance(engine: Mapping[str, Any]) -> tuple[float | None, float | None]:
    """``(acceptance, drafted layers per chunk)`` of an evaluation's engine statistics (summary
    ``modes[mode].engine``): accepted drafted layers / drafted layers of the totals."""
    totals = engine.get("totals") or {}
    acc = _ratio(totals.get("accepted_layers"), totals.get("drafted_layers"))
    if acc is None and "totals" not in engine:  # an older summary without totals
        acc = _num(engine.get("acceptance_rate"))
    return acc, _ratio(totals.get("drafted_layers"), engine.get("inferences"))


def operating_points(folders: Sequence[Any], baseline: Any, bench: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per (folder, mode) of ``folders`` (``rsd.analysis.compare.EvalFolder``), against ``baseline``'s
    ``baseline``-mode episodes, with the speed of the matching row of ``bench`` (one benchmark run)."""
    ref = [r for r in baseline.records if r.get("mode") == "baseline"]
    if not ref:
        raise ValueError(f"{baseline.path} has no baseline-mode episodes (the 8-layer reference)")
    run = benchmark_run(bench)
    rows = list(bench.get("rows") or [])
    base8 = match_row(_base_settings(), rows)
    base8_ms = _num(base8.get("total_ms")) if base8 else None
    out = []
    for folder in folders:
        for mode in sorted({r.get("mode") for r in folder.records}):
            recs = [r for r in folder.records if r.get("mode") == mode]
            settings = eval_settings(folder.policy, mode)
            row = match_row(settings, rows)
            same = reference_row(row, rows) if row else None
            ms = _num(row.get("total_ms")) if row else None
            same_ms = _num(same.get("total_ms")) if same else None
            k = sum(bool(r.get("success")) for r in recs)
            stats = success_stats(k, len(recs))
            paired = paired_comparison(recs, ref)
            engine = (folder.summary.get("modes") or {}).get(mode, {}).get("engine", {}) or {}
            cache_acc, cache_drafted = cache_frame_acceptance(row)
            loop_acc, loop_drafted = closed_loop_acceptance(engine)
            calls = _num(engine.get("main_steps_per_inference"))
            drop = None if paired is None else paired["b_success_rate"] - paired["a_success_rate"]
            meets = (paired is not None and paired["mcnemar_p"] >= ALPHA and drop is not None and drop <= MAX_DROP)
            out.append({
                "name": point_name(settings),
                "settings": settings,
                "depth": _num(row.get("mean_depth")) if row else settings["depth"],
                "eval_dir": str(folder.path),
                "episodes": len(recs),
                "successes": k,
                "success_rate": stats["success_rate"],
                "wilson_95": [stats["success_ci_low"], stats["success_ci_high"]],
                "paired_vs_8_layer_baseline": None if paired is None else {
                    key: paired[key] for key in ("pairs", "both", "only_a", "only_b", "neither", "mcnemar_p",
                                                 "a_success_rate", "b_success_rate")},
                "benchmark_run": run,
                "decode_ms_per_chunk": ms,
                "baseline_8_layer_ms_per_chunk": base8_ms,
                "same_depth_baseline_ms_per_chunk": same_ms,
                "speedup_vs_8_layer_baseline": _ratio(base8_ms, ms),
                "speedup_vs_same_depth_baseline": _ratio(same_ms, ms),
                "main_calls_per_chunk_cache_frames": _num(row.get("main_calls_per_chunk")) if row else None,
                "main_calls_per_chunk_closed_loop": calls,
                "acceptance_cache_frames": cache_acc,
                "drafted_layers_per_chunk_cache_frames": cache_drafted,
                "acceptance_closed_loop": loop_acc,
                "drafted_layers_per_chunk_closed_loop": loop_drafted,
                "meets_success_criterion": bool(meets),
                "machine": {"benchmark": bench.get("machine"), "evaluation": folder.summary.get("machine")},
            })
    return out


def best_point(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The fastest point that meets the success criterion (None when no point has a measured speedup)."""
    ok = [p for p in points if p["meets_success_criterion"] and p["speedup_vs_8_layer_baseline"] is not None]
    return max(ok, key=lambda p: p["speedup_vs_8_layer_baseline"]) if ok else None


def _f(x: Any, fmt: str) -> str:
    return "-" if _num(x) is None else format(x, fmt)


HEADER = ("| point | depth | episodes | success [95 % CI] | paired vs 8-layer (both/only this/only base/neither) "
          "| McNemar p | ms/chunk | 8-layer base ms/chunk | speedup vs 8-layer (= base ms / ms) "
          "| same-depth base ms/chunk | speedup vs same depth | acceptance, cache frames (drafted/chunk) "
          "| acceptance, closed loop (drafted/chunk) | main calls/chunk, closed loop | meets criterion |")


def markdown(points: Sequence[Mapping[str, Any]], run: str | None = None) -> str:
    """The operating-point table (one row per point, speeds from one benchmark run) and which point is best."""
    lines = [f"Speed: one benchmark run{f' ({run})' if run else ''} on held-out cache frames (open loop), "
             "total ms per chunk; every speedup is the ratio of two ms columns of this table. Success and "
             "closed-loop acceptance: the evaluations (LIBERO rollouts). Acceptance = accepted drafted layers / "
             "drafted layers.", "", HEADER, "|" + "---|" * HEADER.count(" | ") + "---|"]
    for p in points:
        lo, hi = p["wilson_95"]
        pr = p["paired_vs_8_layer_baseline"] or {}
        lines.append(
            f"| {p['name']} | {_f(p['depth'], '.2f')} | {p['episodes']} | {_f(p['success_rate'], '.1%')} "
            f"[{_f(lo, '.1%')}, {_f(hi, '.1%')}] | {pr.get('both', '-')}/{pr.get('only_a', '-')}/{pr.get('only_b', '-')}"
            f"/{pr.get('neither', '-')} | {_f(pr.get('mcnemar_p'), '.3f')} | {_f(p['decode_ms_per_chunk'], '.2f')} "
            f"| {_f(p['baseline_8_layer_ms_per_chunk'], '.2f')} | {_f(p['speedup_vs_8_layer_baseline'], '.2f')}x "
            f"| {_f(p['same_depth_baseline_ms_per_chunk'], '.2f')} | {_f(p['speedup_vs_same_depth_baseline'], '.2f')}x "
            f"| {_f(p['acceptance_cache_frames'], '.1%')} ({_f(p['drafted_layers_per_chunk_cache_frames'], '.2f')}) "
            f"| {_f(p['acceptance_closed_loop'], '.1%')} ({_f(p['drafted_layers_per_chunk_closed_loop'], '.2f')}) "
            f"| {_f(p['main_calls_per_chunk_closed_loop'], '.2f')} | {'yes' if p['meets_success_criterion'] else 'no'} |")
    best = best_point(points)
    lines += ["", f"Best point meeting the criterion (p >= {ALPHA} and at most {MAX_DROP:.0%} below the 8-layer "
              f"baseline): **{best['name']}**" if best else "No point meets the criterion with a measured speedup."]
    return "\n".join(lines) + "\n"


def plot(points: Sequence[Mapping[str, Any]]):
    """Decode speedup (x) against success with 95 % intervals (y), one labelled point each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, p in enumerate(points):
        x = p["speedup_vs_8_layer_baseline"]
        if x is None or p["success_rate"] is None:
            continue
        lo, hi = p["wilson_95"]
        y = p["success_rate"]
        ax.errorbar([x], [y], yerr=[[y - lo], [hi - y]], fmt="o" if p["meets_success_criterion"] else "x",
                    capsize=3, label=p["name"], color=f"C{i % 10}")
    ax.set_xlabel("decode speedup vs the 8-layer baseline (total ms, one benchmark run, cache frames)")
    ax.set_ylabel("success rate (95 % Wilson interval)")
    ax.set_title("Operating points (o: meets the success criterion, x: does not)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def write_operating_points(folders: Sequence[Any], baseline: Any, bench_path: str | Path, out: str | Path
                           ) -> dict[str, Path]:
    """``operating_points.json`` (strict JSON) / ``.md`` / ``frontier.png`` in ``out``."""
    bench = json.loads(Path(bench_path).read_text())
    points = operating_points(folders, baseline, bench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "operating_points.json", "md": out / "operating_points.md", "png": out / "frontier.png"}
    best = best_point(points)
    run = benchmark_run(bench)
    jsonio.write(paths["json"], {"benchmark": str(bench_path), "benchmark_run": run,
                                 "baseline_eval": str(baseline.path),
                                 "criterion": {"alpha": ALPHA, "max_drop": MAX_DROP},
                                 "best": best["name"] if best else None, "points": points}, indent=1)
    paths["md"].write_text(markdown(points, run))
    fig = plot(points)
    fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
