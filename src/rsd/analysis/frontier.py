"""Operating points: decode speed (benchmark) against closed-loop success (evaluation), one row per setting.

Speed and success come from different runs on purpose: decode speedups are ratios measured side by side
in one benchmark process on held-out cache samples (``scripts/benchmark_engine.py --out bench.json``, the
modes taking turns), success rates from LIBERO rollouts on held-out init states. An operating point joins
an evaluation (folder, mode) with the benchmark row that has the same decoding settings (acceptance rule,
delta / tau / epsilon, depth, early exit), and is compared paired with the 8-layer baseline's evaluation
(same task and init state; exact McNemar test).

Success criterion (issue 13): McNemar p >= 0.05 against the 8-layer baseline and at most 3 points below it.
``python -m rsd.analysis.report <eval dirs> --baseline <8-layer baseline dir> --benchmark bench.json --out DIR``
writes ``operating_points.json``, ``operating_points.md`` and ``frontier.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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


def operating_points(folders: Sequence[Any], baseline: Any, bench: Mapping[str, Any]) -> list[dict[str, Any]]:
    """One dict per (folder, mode) of ``folders`` (``rsd.analysis.compare.EvalFolder``), against ``baseline``'s
    ``baseline``-mode episodes, with the speed of the matching row of ``bench``."""
    ref = [r for r in baseline.records if r.get("mode") == "baseline"]
    if not ref:
        raise ValueError(f"{baseline.path} has no baseline-mode episodes (the 8-layer reference)")
    rows = list(bench.get("rows") or [])
    out = []
    for folder in folders:
        for mode in sorted({r.get("mode") for r in folder.records}):
            recs = [r for r in folder.records if r.get("mode") == mode]
            settings = eval_settings(folder.policy, mode)
            row = match_row(settings, rows)
            k = sum(bool(r.get("success")) for r in recs)
            stats = success_stats(k, len(recs))
            paired = paired_comparison(recs, ref)
            engine = (folder.summary.get("modes") or {}).get(mode, {}).get("engine", {})
            drop = None if paired is None else paired["b_success_rate"] - paired["a_success_rate"]
            meets = (paired is not None and paired["mcnemar_p"] >= ALPHA and drop is not None and drop <= MAX_DROP)
            out.append({
                "name": point_name(settings),
                "settings": settings,
                "depth": row.get("mean_depth") if row else settings["depth"],
                "eval_dir": str(folder.path),
                "episodes": len(recs),
                "successes": k,
                "success_rate": stats["success_rate"],
                "wilson_95": [stats["success_ci_low"], stats["success_ci_high"]],
                "paired_vs_8_layer_baseline": None if paired is None else {
                    key: paired[key] for key in ("pairs", "both", "only_a", "only_b", "neither", "mcnemar_p",
                                                 "a_success_rate", "b_success_rate")},
                "decode_ms_per_chunk": row.get("total_ms") if row else None,
                "speedup_vs_8_layer_baseline": row.get("speedup") if row else None,
                "speedup_vs_same_depth_baseline": row.get("speedup_vs_ref") if row else None,
                "main_calls_per_chunk": row.get("main_calls_per_chunk") if row else engine.get("main_steps_per_chunk"),
                "acceptance_rate": row.get("acceptance") if row else engine.get("acceptance_rate"),
                "closed_loop_acceptance_rate": engine.get("acceptance_rate"),
                "meets_success_criterion": bool(meets),
                "machine": {"benchmark": bench.get("machine"), "evaluation": folder.summary.get("machine")},
            })
    return out


def best_point(points: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
    """The fastest point that meets the success criterion (None when no point has a measured speedup)."""
    ok = [p for p in points if p["meets_success_criterion"] and p["speedup_vs_8_layer_baseline"] is not None]
    return max(ok, key=lambda p: p["speedup_vs_8_layer_baseline"]) if ok else None


def _f(x: Any, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and x != x) else format(x, fmt)


def markdown(points: Sequence[Mapping[str, Any]]) -> str:
    """The operating-point table (one row per point) and which point is best."""
    lines = ["| point | depth | episodes | success [95 % CI] | paired vs 8-layer (both/only this/only base/neither) "
             "| McNemar p | decode ms/chunk | speedup vs 8-layer | vs same depth | main calls/chunk | acceptance "
             "| meets criterion |", "|" + "---|" * 12]
    for p in points:
        lo, hi = p["wilson_95"]
        pr = p["paired_vs_8_layer_baseline"] or {}
        lines.append(
            f"| {p['name']} | {_f(p['depth'], '.2f')} | {p['episodes']} | {_f(p['success_rate'], '.1%')} "
            f"[{_f(lo, '.1%')}, {_f(hi, '.1%')}] | {pr.get('both', '-')}/{pr.get('only_a', '-')}/{pr.get('only_b', '-')}"
            f"/{pr.get('neither', '-')} | {_f(pr.get('mcnemar_p'), '.3f')} | {_f(p['decode_ms_per_chunk'], '.2f')} "
            f"| {_f(p['speedup_vs_8_layer_baseline'], '.2f')}x | {_f(p['speedup_vs_same_depth_baseline'], '.2f')}x "
            f"| {_f(p['main_calls_per_chunk'], '.2f')} | {_f(p['acceptance_rate'], '.1%')} "
            f"| {'yes' if p['meets_success_criterion'] else 'no'} |")
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
    ax.set_xlabel("decode speedup vs the 8-layer baseline (benchmark, same run)")
    ax.set_ylabel("success rate (95 % Wilson interval)")
    ax.set_title("Operating points (o: meets the success criterion, x: does not)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    return fig


def write_operating_points(folders: Sequence[Any], baseline: Any, bench_path: str | Path, out: str | Path
                           ) -> dict[str, Path]:
    """``operating_points.json`` / ``.md`` / ``frontier.png`` in ``out``."""
    bench = json.loads(Path(bench_path).read_text())
    points = operating_points(folders, baseline, bench)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "operating_points.json", "md": out / "operating_points.md", "png": out / "frontier.png"}
    best = best_point(points)
    paths["json"].write_text(json.dumps({"benchmark": str(bench_path), "baseline_eval": str(baseline.path),
                                         "criterion": {"alpha": ALPHA, "max_drop": MAX_DROP},
                                         "best": best["name"] if best else None, "points": points},
                                        indent=1, default=str) + "\n")
    paths["md"].write_text(markdown(points))
    fig = plot(points)
    fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return paths
