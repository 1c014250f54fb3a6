"""The comparison table of the original guide: ``python -m rsd.analysis.report <eval_dir>... --out report``.

For every speculative evaluation among the folders: success rate (with its 95 % Wilson interval),
inference time per chunk, draft acceptance and peak memory against the baseline, with the improvement
(the time ratio only against the same folder's baseline: one run, the modes taking turns)::

    | Metric | Baseline | Speculative (RSD) | Improvement |
    | Success Rate | 85.0% [76.7, 90.7] | 88.0% [80.2, 93.0] | +3.0 pts, no significant difference (exact McNemar p = 0.508) |
    | Inference Time | 70.0 ms | 48.0 ms | 1.46x faster (-31.4%) |
    | Draft Acceptance | n/a | 68.0% | - |
    | Peak Memory (GPU) | 15,210 MB | 15,530 MB | +2.1% |

followed by the paired table (both succeed / only speculative / only baseline / neither) over the init
states both ran, paired by task and init state, and its exact McNemar p-value (:mod:`rsd.analysis.stats`).

The baseline of a speculative run is the ``baseline`` mode of the same folder (``mode=both``), else the
first other folder of the same suite that has one. Peak memory is the largest per-episode peak of the
episode records: GPU (``torch.cuda.max_memory_allocated``) when recorded, else the process's resident
memory (RSS). Writes ``<out>/report.md``, ``report.png`` (tables + bar charts, success with error bars)
and ``report.json`` (the numbers); with two or more speculative runs (e.g. a relaxed-acceptance sweep,
``python evaluate.py -m policy.acceptance=relaxed policy.delta=1,2,3``) also an acceptance-sweep table
(with each rule's paired test against the baseline) and ``sweep.png`` (acceptance and success against the
rule, named by the rule).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.analysis import jsonio
from rsd.analysis.compare import (
    EvalFolder,
    ci_errors,
    eval_table,
    find_eval_dirs,
    load_eval_dir,
    records_by_run,
    short_labels,
)
from rsd.analysis.frontier import write_operating_points
from rsd.analysis.plots import plot_acceptance_vs_success
from rsd.analysis.stats import paired_comparison
from rsd.eval.summary import (
    STATISTICS_NOTE,
    fmt_mb,
    fmt_ms,
    fmt_p,
    fmt_pct,
    fmt_points,
    fmt_rate,
    fmt_relative,
    fmt_speedup,
    md_table,
    num,
    paired_markdown,
    significance,
)

GUIDE_HEADER = ["Metric", "Baseline", "Speculative (RSD)", "Improvement"]

#: ``{(path, mode): episode records}`` (:func:`rsd.analysis.compare.records_by_run`)
Records = Mapping[tuple[str, str], Sequence[Mapping[str, Any]]]


def memory_of(row: Mapping[str, Any] | None, kind: str) -> float | None:
    if not row:
        return None
    return num(row.get("peak_cuda_mb" if kind == "GPU" else "peak_rss_mb"))


def rate_of(row: Mapping[str, Any] | None) -> str:
    """A row's success rate with its 95 % Wilson interval."""
    r = row or {}
    return fmt_rate(r.get("success_rate"), r.get("success_ci_low"), r.get("success_ci_high"))


def paired_of(spec: Mapping[str, Any] | None, base: Mapping[str, Any] | None,
              records: Records | None) -> dict | None:
    """The paired comparison (:func:`rsd.analysis.stats.paired_comparison`) of a speculative row against a
    baseline row over the init states both ran; None without records or without shared init states."""
    if not records or not spec or not base:
        return None
    return paired_comparison(records.get((str(spec["path"]), str(spec["mode"])), []),
                             records.get((str(base["path"]), str(base["mode"])), []))


#: what stands in the speedup cell when the baseline is another folder's (another run, another process)
DIFFERENT_RUNS = "not compared (different runs)"


def guide_rows(base: Mapping[str, Any] | None, spec: Mapping[str, Any] | None,
               paired: Mapping[str, Any] | None = None, same_run: bool = True) -> list[list[str]]:
    """The four rows of the guide's table (strings) for one baseline / speculative pair (either may be None);
    success rates with their intervals, the difference with the paired test's verdict when there is one.
    The inference-time ratio is shown only for ``same_run`` (both modes of one folder, taking turns in one
    process); across runs it is :data:`DIFFERENT_RUNS` (the design notes: no ms from different runs)."""
    b, s = base or {}, spec or {}
    kind = "GPU" if num(b.get("peak_cuda_mb")) is not None or num(s.get("peak_cuda_mb")) is not None else "RSS"
    mb, ms = memory_of(base, kind), memory_of(spec, kind)
    diff = fmt_points(s.get("success_rate"), b.get("success_rate"))
    if paired is not None and diff != "n/a":
        diff += f", {significance(paired['mcnemar_p'])}"
    elif base and spec:
        diff += " (not paired: no shared init states)" if diff != "n/a" else ""
    return [
        ["Success Rate", rate_of(base) if base else "n/a", rate_of(spec) if spec else "n/a", diff],
        ["Inference Time", fmt_ms(b.get("avg_inference_ms")), fmt_ms(s.get("avg_inference_ms")),
         fmt_speedup(s.get("avg_inference_ms"), b.get("avg_inference_ms")) if same_run or not (base and spec)
         else DIFFERENT_RUNS],
        ["Draft Acceptance", "n/a", fmt_pct(s.get("acceptance_rate")), "-"],
        [f"Peak Memory ({kind})", fmt_mb(mb), fmt_mb(ms), fmt_relative(ms, mb)],
    ]


def baseline_for(spec: Mapping[str, Any], base_rows: Sequence[Mapping[str, Any]]) -> tuple[Any, bool]:
    """``(baseline row or None, same folder)``: the same folder's baseline first, else the first of the same suite."""
    same = next((b for b in base_rows if b["path"] == spec["path"]), None)
    if same is not None:
        return same, True
    return next((b for b in base_rows if b["suite"] == spec["suite"]), None), False


def comparisons(rows: Sequence[Mapping[str, Any]], records: Records | None = None) -> list[dict]:
    """Pair every speculative row with its baseline (:func:`baseline_for`); with ``records``, also pair their
    episodes by task and init state (``"paired"``: the paired table and exact McNemar p-value)."""
    base_rows = [r for r in rows if r["mode"] == "baseline"]
    spec_rows = [r for r in rows if r["mode"] == "speculative"]
    out = []
    for s in spec_rows:
        b, same = baseline_for(s, base_rows)
        paired = paired_of(s, b, records)
        out.append({"label": s["label"], "baseline_label": b["label"] if b else None, "same_folder": same,
                    "speculative": dict(s), "baseline": dict(b) if b else None, "paired": paired,
                    "rows": guide_rows(b, s, paired, same_run=same)})
    if not spec_rows:
        out += [{"label": b["label"], "baseline_label": b["label"], "same_folder": False, "speculative": None,
                 "baseline": dict(b), "paired": None, "rows": guide_rows(b, None)} for b in base_rows]
    return out


def comparison_markdown(c: Mapping[str, Any], level: int = 2) -> list[str]:
    """One comparison: heading, episodes, the guide's table and the paired table (markdown lines)."""
    s, b, paired = c["speculative"], c["baseline"], c.get("paired")
    name = f"{c['label']} vs baseline" + (f" of {c['baseline_label']}" if b and not c["same_folder"] else "")
    lines = [f"{'#' * level} {name}", ""]
    eps = []
    if s:
        eps.append(f"{s['episodes']} speculative")
    if b:
        eps.append(f"{b['episodes']} baseline" + (" (same folder)" if c["same_folder"] else ""))
    if s and s.get("threshold_label"):
        eps.append(f"acceptance: {s['threshold_label']}")
    lines += [f"Episodes: {', '.join(eps)}.", ""]
    lines += md_table(GUIDE_HEADER, c["rows"]) + [""]
    if paired is not None:
        left = (f" ({paired['unpaired_a']} speculative and {paired['unpaired_b']} baseline episodes without a "
                f"partner left out)" if paired["unpaired_a"] or paired["unpaired_b"] else "")
        lines += [f"Paired by task and init state{left}: success "
                  f"{fmt_rate(paired['a_success_rate'], paired['a_success_ci_low'], paired['a_success_ci_high'])}"
                  f" vs {fmt_rate(paired['b_success_rate'], paired['b_success_ci_low'], paired['b_success_ci_high'])},"
                  f" {significance(paired['mcnemar_p'])}.", ""]
        lines += paired_markdown(paired, "speculative", "baseline") + [""]
    elif s and b:
        lines += ["No paired test: the two runs share no init state (or their episode records are missing).", ""]
    return lines


RUN_HEADER = ["Run", "Plot label", "Mode", "Episodes", "Success Rate [95% CI]", "Inference Time", "Draft Acceptance",
              "Draft", "Main", "Peak RSS", "Peak GPU"]


def run_rows(rows: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    return [[str(r["label"]), short, str(r["mode"]), str(r["episodes"]), rate_of(r), fmt_ms(r["avg_inference_ms"]),
             fmt_pct(r["acceptance_rate"]) if r["mode"] == "speculative" else "n/a", fmt_ms(r["avg_draft_ms"]),
             fmt_ms(r["avg_main_ms"]), fmt_mb(r["peak_rss_mb"]), fmt_mb(r["peak_cuda_mb"])]
            for r, short in zip(rows, short_labels(rows), strict=True)]


SWEEP_HEADER = ["Acceptance rule", "Run", "Episodes", "Draft Acceptance", "Accepted Layers / Chunk",
                "Success Rate [95% CI]", "Paired vs Baseline (both / only spec / only base / neither)",
                "McNemar p", "Inference Time", "Speedup vs Baseline"]


def _sweep_order(r: Mapping[str, Any]) -> tuple:
    x = num(r.get("threshold"))
    return (0 if r.get("acceptance") == "strict" else 1, x if x is not None else math.inf, str(r["label"]))


def sweep_rows(rows: Sequence[Mapping[str, Any]], records: Records | None = None) -> list[list[str]]:
    """The acceptance sweep: every speculative run ordered by its rule (strict first, then delta / tau), with
    its success interval, the paired table and exact McNemar p-value against the baseline of the same suite
    (same folder first), and the speedup over that baseline when it is the same folder's (same run)."""
    spec = [r for r in rows if r["mode"] == "speculative"]
    base = [r for r in rows if r["mode"] == "baseline"]
    out = []
    for r in sorted(spec, key=_sweep_order):
        b, same = baseline_for(r, base)
        paired = paired_of(r, b, records)
        table = "n/a" if paired is None else \
            f"{paired['both']} / {paired['only_a']} / {paired['only_b']} / {paired['neither']}"
        p = "n/a" if paired is None else \
            f"{fmt_p(paired['mcnemar_p'])}{'' if paired['significant'] else ' (no significant difference)'}"
        out.append([str(r.get("threshold_label")), str(r["label"]), str(r["episodes"]), fmt_pct(r["acceptance_rate"]),
                    "n/a" if num(r.get("mean_accepted_layers")) is None else f"{float(r['mean_accepted_layers']):.2f}",
                    rate_of(r), table, p, fmt_ms(r["avg_inference_ms"]),
                    "n/a" if not b else fmt_speedup(r["avg_inference_ms"], b["avg_inference_ms"]) if same
                    else DIFFERENT_RUNS])
    return out


def markdown(comps: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], title: str,
             records: Records | None = None) -> str:
    lines = [f"# {title}", ""]
    suites = sorted({str(r["suite"]) for r in rows})
    lines += [f"Suite: {', '.join(suites)}. Inference time: average per chunk (policy query). Peak memory: the "
              f"largest per-episode peak. Statistics: {STATISTICS_NOTE}.", ""]
    for c in comps:
        lines += comparison_markdown(c)
    if sum(r["mode"] == "speculative" for r in rows) >= 2:
        lines += ["## Acceptance sweep", "", "Draft acceptance against closed-loop success for each acceptance "
                  "rule, each paired with the baseline on the init states both ran (plot: sweep.png).", ""]
        lines += md_table(SWEEP_HEADER, sweep_rows(rows, records)) + [""]
    lines += ["## All runs", ""] + md_table(RUN_HEADER, run_rows(rows)) + [""]
    return "\n".join(lines)


def plot(comps: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]], title: str):
    """Tables of the guide (one per comparison) above bar charts of the four metrics over all runs; the
    success panel has the 95 % intervals as error bars; runs are named by :func:`short_labels`."""
    import matplotlib.pyplot as plt
    import pandas as pd
    from matplotlib.patches import Patch

    n_tab = max(len(comps), 1)
    fig = plt.figure(figsize=(max(13, 1.6 * len(rows) + 4), 1.7 * n_tab + 3.9))
    grid = fig.add_gridspec(n_tab + 1, 4, height_ratios=[1.7] * n_tab + [3.9])
    for i, c in enumerate(comps):
        ax = fig.add_subplot(grid[i, :])
        ax.axis("off")
        table = ax.table(cellText=c["rows"], colLabels=GUIDE_HEADER, loc="center", cellLoc="center",
                         colWidths=[0.14, 0.22, 0.22, 0.42])  # the improvement cell holds the test's verdict
        table.auto_set_font_size(False)
        table.set_fontsize(8)
        table.scale(1, 1.3)
        ax.set_title(str(c["label"]), fontsize=10)
    names = short_labels(rows)
    colors = ["tab:gray" if r["mode"] == "baseline" else "tab:blue" for r in rows]
    kind = "peak_cuda_mb" if any(num(r["peak_cuda_mb"]) is not None for r in rows) else "peak_rss_mb"
    panels = [("success_rate", "success rate % (95% CI)", 100.0), ("avg_inference_ms", "inference ms / chunk", 1.0),
              ("acceptance_rate", "draft acceptance %", 100.0),
              (kind, f"peak memory MB ({'GPU' if kind == 'peak_cuda_mb' else 'RSS'})", 1.0)]
    frame = pd.DataFrame(list(rows))
    for j, (key, label, scale) in enumerate(panels):
        ax = fig.add_subplot(grid[n_tab, j])
        vals = [(num(r[key]) or 0.0) * scale for r in rows]
        yerr = ci_errors(frame, scale) if key == "success_rate" else None
        ax.bar(range(len(rows)), vals, color=colors, yerr=yerr, capsize=3)
        ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=30, ha="right")
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        if j == 0:
            ax.set_ylim(0, 105)
            ax.legend(handles=[Patch(color="tab:gray", label="baseline"), Patch(color="tab:blue", label="speculative")],
                      fontsize=7, loc="lower left")
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
    records = records_by_run(folders)
    comps = comparisons(rows, records)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"md": out / "report.md", "png": out / "report.png", "json": out / "report.json"}
    paths["md"].write_text(markdown(comps, rows, title, records))
    fig = plot(comps, rows, title)
    fig.savefig(paths["png"], dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    if sum(r["mode"] == "speculative" for r in rows) >= 2:
        sweep_fig = plot_acceptance_vs_success(eval_table(folders))
        if sweep_fig is not None:
            paths["sweep_png"] = out / "sweep.png"
            sweep_fig.savefig(paths["sweep_png"], dpi=110, bbox_inches="tight")
            plt.close(sweep_fig)

    jsonio.write(paths["json"], {"title": title, "comparisons": comps, "runs": rows})
    return paths


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.analysis.report", description=__doc__.split("\n")[0])
    parser.add_argument("eval_dirs", nargs="+", help="evaluation folders (or folders above them)")
    parser.add_argument("--out", default="report", help="output folder (report.md, report.png, report.json)")
    parser.add_argument("--title", default="Evaluation report")
    parser.add_argument("--label", action="append", help="a label per folder, in order (default: folder names)")
    parser.add_argument("--benchmark", help="a scripts/benchmark_engine.py --out JSON: also write the operating "
                        "points (speed vs success, rsd.analysis.frontier) of the folders")
    parser.add_argument("--baseline", help="with --benchmark: the 8-layer baseline's evaluation folder")
    args = parser.parse_args(argv)
    if bool(args.benchmark) != bool(args.baseline):
        print("report: --benchmark and --baseline go together", file=sys.stderr)
        return 2
    try:
        paths = build_report(args.eval_dirs, args.out, args.title, args.label)
        if args.benchmark:
            folders = [load_eval_dir(d) for d in resolve_dirs(args.eval_dirs)]
            paths.update({f"points_{k}": v for k, v in write_operating_points(
                folders, load_eval_dir(args.baseline), args.benchmark, args.out).items()})
    except (FileNotFoundError, ValueError) as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if "points_md" in paths:
        print(paths["points_md"].read_text())
    print(paths["md"].read_text())
    print(f"Written: {paths['md']}, {paths['png']}, {paths['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
