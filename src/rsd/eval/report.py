"""The comparison table of the original guide: ``python -m rsd.eval.report <eval_dir>... --out report``.

For every speculative evaluation among the folders: success rate, inference time per chunk, draft
acceptance and peak memory against the baseline, with the improvement::

    | Metric | Baseline | Speculative (RSD) | Improvement |
    | Success Rate | 85.0% | 88.0% | +3.0 pts |
    | Inference Time | 70.0 ms | 48.0 ms | 1.46x faster (-31.4%) |
    | Draft Acceptance | n/a | 68.0% | - |
    | Peak Memory (GPU) | 15,210 MB | 15,530 MB | +2.1% |

The baseline of a speculative run is the ``baseline`` mode of the same folder (``mode=both``: the same
init states), else the first other folder of the same suite that has one. Peak memory is the largest
per-episode peak of the episode records: GPU (``torch.cuda.max_memory_allocated``) when recorded, else
the process's resident memory (RSS). Writes ``<out>/report.md``, ``report.png`` (tables + bar charts)
and ``report.json`` (the numbers); with two or more speculative runs (e.g. a relaxed-acceptance sweep,
``python evaluate.py -m policy.acceptance=relaxed policy.delta=1,2,3``) also an acceptance-sweep table
and ``sweep.png`` (acceptance and success against the rule).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.eval.compare import EvalFolder, eval_table, find_eval_dirs, load_eval_dir

GUIDE_HEADER = ["Metric", "Baseline", "Speculative (RSD)", "Improvement"]


def _num(x: Any) -> float | None:
    if x is None:
        return None
    try:
        x = float(x)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def fmt_pct(x: Any) -> str:
    x = _num(x)
    return "n/a" if x is None else f"{100 * x:.1f}%"


def fmt_ms(x: Any) -> str:
    x = _num(x)
    return "n/a" if x is None else f"{x:.1f} ms"


def fmt_mb(x: Any) -> str:
    x = _num(x)
    return "n/a" if x is None else f"{x:,.0f} MB"


def fmt_points(spec: Any, base: Any) -> str:
    s, b = _num(spec), _num(base)
    return "n/a" if s is None or b is None else f"{100 * (s - b):+.1f} pts"


def fmt_speedup(spec_ms: Any, base_ms: Any) -> str:
    s, b = _num(spec_ms), _num(base_ms)
    if s is None or b is None or s <= 0 or b <= 0:
        return "n/a"
    change = f"{100 * (s - b) / b:+.1f}%"
    return f"{b / s:.2f}x faster ({change})" if b >= s else f"{s / b:.2f}x slower ({change})"


def fmt_relative(spec: Any, base: Any) -> str:
    s, b = _num(spec), _num(base)
    return "n/a" if s is None or b is None or b == 0 else f"{100 * (s - b) / b:+.1f}%"


def memory_of(row: Mapping[str, Any] | None, kind: str) -> float | None:
    if not row:
        return None
    return _num(row.get("peak_cuda_mb" if kind == "GPU" else "peak_rss_mb"))


def guide_rows(base: Mapping[str, Any] | None, spec: Mapping[str, Any] | None) -> list[list[str]]:
    """The four rows of the guide's table (strings) for one baseline / speculative pair (either may be None)."""
    b, s = base or {}, spec or {}
    kind = "GPU" if _num(b.get("peak_cuda_mb")) is not None or _num(s.get("peak_cuda_mb")) is not None else "RSS"
    mb, ms = memory_of(base, kind), memory_of(spec, kind)
    return [
        ["Success Rate", fmt_pct(b.get("success_rate")), fmt_pct(s.get("success_rate")),
         fmt_points(s.get("success_rate"), b.get("success_rate"))],
        ["Inference Time", fmt_ms(b.get("avg_inference_ms")), fmt_ms(s.get("avg_inference_ms")),
         fmt_speedup(s.get("avg_inference_ms"), b.get("avg_inference_ms"))],
        ["Draft Acceptance", "n/a", fmt_pct(s.get("acceptance_rate")), "-"],
        [f"Peak Memory ({kind})", fmt_mb(mb), fmt_mb(ms), fmt_relative(ms, mb)],
    ]


def baseline_for(spec: Mapping[str, Any], base_rows: Sequence[Mapping[str, Any]]) -> tuple[Any, bool]:
    """``(baseline row or None, paired)``: the same folder's baseline first, else the first of the same suite."""
    same = next((b for b in base_rows if b["path"] == spec["path"]), None)
    if same is not None:
        return same, True
    return next((b for b in base_rows if b["suite"] == spec["suite"]), None), False


def comparisons(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Pair every speculative row with its baseline (:func:`baseline_for`)."""
    base_rows = [r for r in rows if r["mode"] == "baseline"]
    spec_rows = [r for r in rows if r["mode"] == "speculative"]
    out = []
    for s in spec_rows:
        b, paired = baseline_for(s, base_rows)
        out.append({"label": s["label"], "baseline_label": b["label"] if b else None, "paired": paired,
                    "speculative": dict(s), "baseline": dict(b) if b else None, "rows": guide_rows(b, s)})
    if not spec_rows:
        out += [{"label": b["label"], "baseline_label": b["label"], "paired": False, "speculative": None,
                 "baseline": dict(b), "rows": guide_rows(b, None)} for b in base_rows]
    return out


def _md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    esc = [[str(c).replace("|", "\\|") for c in r] for r in rows]
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"] + \
        ["| " + " | ".join(r) + " |" for r in esc]


RUN_HEADER = ["Run", "Mode", "Episodes", "Success Rate", "Inference Time", "Draft Acceptance", "Draft", "Main",
              "Peak RSS", "Peak GPU"]


def run_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[str(r["label"]), str(r["mode"]), str(r["episodes"]), fmt_pct(r["success_rate"]),
             fmt_ms(r["avg_inference_ms"]), fmt_pct(r["acceptance_rate"]) if r["mode"] == "speculative" else "n/a",
             fmt_ms(r["avg_draft_ms"]), fmt_ms(r["avg_main_ms"]), fmt_mb(r["peak_rss_mb"]),
             fmt_mb(r["peak_cuda_mb"])] for r in rows]


SWEEP_HEADER = ["Acceptance rule", "Run", "Episodes", "Draft Acceptance", "Accepted Layers / Chunk",
                "Success Rate", "Inference Time", "Speedup vs Baseline"]


def sweep_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """The acceptance sweep: every speculative run ordered by its rule (strict first, then delta / tau),
    with the speedup over the baseline of the same suite (same folder first)."""
    spec = [r for r in rows if r["mode"] == "speculative"]
    base = [r for r in rows if r["mode"] == "baseline"]

    def order(r: Mapping[str, Any]) -> tuple:
        x = _num(r.get("threshold"))
        return (0 if r.get("acceptance") == "strict" else 1, x if x is not None else math.inf, str(r["label"]))

    out = []
    for r in sorted(spec, key=order):
        b, _ = baseline_for(r, base)
        out.append([str(r.get("threshold_label")), str(r["label"]), str(r["episodes"]), fmt_pct(r["acceptance_rate"]),
                    "n/a" if _num(r.get("mean_accepted_layers")) is None else f"{float(r['mean_accepted_layers']):.2f}",
                    fmt_pct(r["success_rate"]), fmt_ms(r["avg_inference_ms"]),
                    fmt_speedup(r["avg_inference_ms"], b["avg_inference_ms"]) if b else "n/a"])
    return out


def markdown(comps: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], title: str) -> str:
    lines = [f"# {title}", ""]
    suites = sorted({str(r["suite"]) for r in rows})
    lines += [f"Suite: {', '.join(suites)}. Inference time: average per chunk (policy query). Peak memory: the "
              "largest per-episode peak.", ""]
    for c in comps:
        s, b = c["speculative"], c["baseline"]
        name = f"{c['label']} vs baseline" + (f" of {c['baseline_label']}" if b and not c["paired"] else "")
        lines += [f"## {name}", ""]
        eps = []
        if s:
            eps.append(f"{s['episodes']} speculative")
        if b:
            eps.append(f"{b['episodes']} baseline" + (" (same init states)" if c["paired"] else ""))
        if s and s.get("threshold_label"):
            eps.append(f"acceptance: {s['threshold_label']}")
        lines += [f"Episodes: {', '.join(eps)}.", ""]
        lines += _md_table(GUIDE_HEADER, c["rows"]) + [""]
    if sum(r["mode"] == "speculative" for r in rows) >= 2:
        lines += ["## Acceptance sweep", "", "Draft acceptance against closed-loop success for each acceptance "
                  "rule (plot: sweep.png).", ""] + _md_table(SWEEP_HEADER, sweep_rows(rows)) + [""]
    lines += ["## All runs", ""] + _md_table(RUN_HEADER, run_rows(rows)) + [""]
    return "\n".join(lines)


def plot(comps: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], title: str):
    """Tables of the guide (one per comparison) above bar charts of the four metrics over all runs."""
    import matplotlib.pyplot as plt

    n_tab = max(len(comps), 1)
    fig = plt.figure(figsize=(13, 1.7 * n_tab + 3.6))
    grid = fig.add_gridspec(n_tab + 1, 4, height_ratios=[1.7] * n_tab + [3.6])
    for i, c in enumerate(comps):
        ax = fig.add_subplot(grid[i, :])
        ax.axis("off")
        table = ax.table(cellText=c["rows"], colLabels=GUIDE_HEADER, loc="center", cellLoc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(9)
        table.scale(1, 1.3)
        ax.set_title(str(c["label"]), fontsize=10)
    names = [f"{r['label']}\n{r['mode']}" for r in rows]
    colors = ["tab:gray" if r["mode"] == "baseline" else "tab:blue" for r in rows]
    kind = "peak_cuda_mb" if any(_num(r["peak_cuda_mb"]) is not None for r in rows) else "peak_rss_mb"
    panels = [("success_rate", "success rate", 100.0), ("avg_inference_ms", "inference ms / chunk", 1.0),
              ("acceptance_rate", "draft acceptance %", 100.0),
              (kind, f"peak memory MB ({'GPU' if kind == 'peak_cuda_mb' else 'RSS'})", 1.0)]
    for j, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(grid[n_tab, j])
        vals = [(_num(r[key]) or 0.0) * scale for r in rows]
        ax.bar(range(len(rows)), vals, color=colors)
        ax.set_xticks(range(len(rows)), names, fontsize=6, rotation=30, ha="right")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def resolve_dirs(dirs: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for d in map(Path, dirs):
        if (d / "episodes.jsonl").is_file() or (d / "summary.json").is_file():
            out.append(d)
        else:
            found = find_eval_dirs(d)
            if not found:
                raise FileNotFoundError(f"{d}: no evaluation (episodes.jsonl / summary.json) there or below")
            out += found
    return out


def build_report(eval_dirs: Sequence[str | Path], out: str | Path, title: str = "Evaluation report",
                 labels: Sequence[str] | None = None) -> dict[str, Path]:
    """Write ``report.md``, ``report.png`` and ``report.json`` to ``out``; returns their paths."""
    dirs = resolve_dirs(eval_dirs)
    if labels and len(labels) != len(dirs):
        raise ValueError(f"{len(labels)} labels for {len(dirs)} evaluation folders")
    resolved = [str(d.resolve()) for d in dirs]  # labels: paths relative to the folders' common parent
    common = Path(os.path.commonpath(resolved)) if len(dirs) > 1 else Path(resolved[0]).parent
    folders: list[EvalFolder] = [load_eval_dir(d, label=(labels[i] if labels else None), root=common)
                                 for i, d in enumerate(dirs)]
    rows = eval_table(folders).to_dict("records")
    comps = comparisons(rows)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "png": out / "report.png", "json": out / "report.json"}
    paths["md"].write_text(markdown(comps, rows, title))
    fig = plot(comps, rows, title)
    fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    if sum(r["mode"] == "speculative" for r in rows) >= 2:
        from rsd.eval.compare import plot_acceptance_vs_success

        sweep_fig = plot_acceptance_vs_success(eval_table(folders))
        if sweep_fig is not None:
            paths["sweep_png"] = out / "sweep.png"
            sweep_fig.savefig(paths["sweep_png"], dpi=110, bbox_inches="tight")
            plt.close(sweep_fig)

    def clean(x: Any) -> Any:
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    paths["json"].write_text(json.dumps(clean({"title": title, "comparisons": comps, "runs": rows}), indent=2,
                                        default=str) + "\n")
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.eval.report", description=__doc__.split("\n")[0])
    parser.add_argument("eval_dirs", nargs="+", help="evaluation folders (or folders above them)")
    parser.add_argument("--out", default="report", help="output folder (report.md, report.png, report.json)")
    parser.add_argument("--title", default="Evaluation report")
    parser.add_argument("--label", action="append", help="a label per folder, in order (default: folder names)")
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.eval_dirs, args.out, args.title, args.label)
    except (FileNotFoundError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    print(paths["md"].read_text())
    print(f"Written: {paths['md']}, {paths['png']}, {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
