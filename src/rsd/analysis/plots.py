"""Figures of compared runs (what ``notebooks/compare_runs.ipynb`` draws), from the frames of
:mod:`rsd.analysis.compare`.

Success rates are drawn with their 95 % Wilson intervals as error bars; runs are named by
:func:`rsd.analysis.compare.short_labels` (the acceptance rule), not by path. Every function returns a
matplotlib figure, or ``None`` when there is nothing to draw; :func:`save_figure` writes one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from rsd.analysis.compare import LATENCY_PARTS, ci_errors, layer_columns, short_labels
from rsd.eval.summary import num


def _plt():
    import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg by itself

    return plt


def plot_layer_curves(train: Mapping[str, pd.DataFrame], stage: str = "val", metrics: Sequence[str] | None = None):
    """One panel per per-layer metric (``<stage>/<metric>_L<k>``), a line per (run, layer) over epochs."""
    found: dict[str, list[tuple[str, int, str]]] = {}
    for run, df in train.items():
        for metric, cols in layer_columns(df, stage).items():
            if metrics is None or metric in metrics:
                found.setdefault(metric, []).extend((run, layer, col) for layer, col in cols)
    if not found:
        return None
    plt = _plt()
    from matplotlib.lines import Line2D

    n = len(found)
    ncols = min(n, 3)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.6 * nrows + 0.4), squeeze=False)
    styles = ["-", "--", ":", "-."]
    runs = list(train)
    cmap = plt.get_cmap("viridis")
    for ax, (metric, items) in zip(axes.flat, found.items(), strict=False):
        layers = sorted({layer for _, layer, _ in items})
        colors = {layer: cmap(i / max(len(layers) - 1, 1)) for i, layer in enumerate(layers)}
        for run, layer, col in items:
            df = train[run]
            x = df["epoch"] if "epoch" in df.columns else df.index
            ok = df[col].notna()
            ax.plot(x[ok], df[col][ok], styles[runs.index(run) % len(styles)], color=colors[layer], marker="o",
                    ms=3)
        ax.set_title(f"{stage}/{metric}_L*")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend([Line2D([], [], color=colors[la]) for la in layers], [f"L{la}" for la in layers], fontsize=7,
                  ncol=2 if len(layers) > 4 else 1, title="layer", title_fontsize=7)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    if len(runs) > 1:  # runs by line style, under the panels
        fig.legend([Line2D([], [], color="black", ls=styles[i % len(styles)]) for i in range(len(runs))],
                   [r.replace("/runs/", " ") for r in runs], loc="lower center", ncol=min(len(runs), 3),
                   fontsize=8)
        fig.subplots_adjust(bottom=0.12 + 0.04 * math.ceil(len(runs) / 3))
    fig.suptitle(f"Per-layer training curves ({stage})")
    fig.tight_layout(rect=(0, 0.06 * math.ceil(len(runs) / 3) if len(runs) > 1 else 0, 1, 1))
    return fig


def plot_acceptance_vs_success(evals: pd.DataFrame):
    """Draft acceptance and success rate (with its 95 % interval) of the speculative evaluations across
    acceptance rules, against the baseline's success and interval (a band). Runs are named by their rule
    (:func:`short_labels`): tick labels on the left, a legend on the right, no text over the points."""
    spec = evals[(evals["mode"] == "speculative") & evals["acceptance_rate"].notna()].copy()
    if spec.empty:
        return None
    plt = _plt()
    spec = spec.sort_values(["threshold", "label"], na_position="last").reset_index(drop=True)
    names = short_labels(spec)
    base = evals[(evals["mode"] == "baseline") & evals["success_rate"].notna()]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(11, 5 + 0.9 * len(spec)), 4.4))
    x = list(range(len(spec)))
    success = spec["success_rate"].astype(float)
    ax1.plot(x, spec["acceptance_rate"].astype(float), "o-", label="draft acceptance")
    ax1.errorbar(x, success, yerr=ci_errors(spec), fmt="s-", capsize=4, label="success rate (speculative), 95% CI")
    if not base.empty:
        b = base.iloc[0]  # the first baseline (report: the same suite's)
        ax1.axhline(float(b["success_rate"]), color="gray", ls="--", label="success rate (baseline)")
        if num(b.get("success_ci_low")) is not None:
            ax1.axhspan(float(b["success_ci_low"]), float(b["success_ci_high"]), color="gray", alpha=0.15,
                        label="baseline 95% CI")
    ax1.set_xticks(x, names, fontsize=8, rotation=30 if len(spec) > 3 else 0, ha="right" if len(spec) > 3 else "center")
    ax1.set_ylim(-0.02, 1.02)
    ax1.set_title("acceptance and success per acceptance rule")
    ax1.legend(fontsize=7)
    ax1.grid(alpha=0.3)
    markers = "os^Dv<>pPX*h"
    err = ci_errors(spec)
    for i, name in enumerate(names):
        yerr = None if err is None else [[err[0][i]], [err[1][i]]]
        ax2.errorbar([float(spec["acceptance_rate"].iloc[i])], [float(success.iloc[i])], yerr=yerr,
                     fmt=markers[i % len(markers)], capsize=4, label=name)
    ax2.set_xlabel("draft acceptance rate")
    ax2.set_ylabel("success rate (95% CI)")
    ax2.set_xlim(-0.02, 1.02)
    ax2.set_ylim(-0.02, 1.02)
    ax2.set_title("success vs acceptance")
    ax2.legend(fontsize=7, title="acceptance rule", title_fontsize=7, loc="best")
    ax2.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def plot_latency_breakdown(evals: pd.DataFrame):
    """Stacked per-chunk latency (backbone / draft / main / decode ms) of every evaluation and mode."""
    cols = [f"avg_{p}_ms" for p in LATENCY_PARTS]
    df = evals[evals[cols].notna().any(axis=1)]
    if df.empty:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(df) + 2), 4))
    names = short_labels(df)
    bottom = [0.0] * len(df)
    for part, col in zip(LATENCY_PARTS, cols, strict=True):
        vals = [num(v) or 0.0 for v in df[col]]
        ax.bar(names, vals, bottom=bottom, label=part)
        bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
    total = df["avg_inference_ms"].astype(float).tolist()
    ax.scatter(names, total, color="black", marker="_", s=400, zorder=3, label="measured per chunk")
    ax.set_ylabel("ms per chunk (inference)")
    ax.set_title("Latency breakdown per chunk")
    ax.legend(fontsize=8)
    ax.tick_params(axis="x", labelsize=7, labelrotation=30 if len(df) > 4 else 0)
    fig.tight_layout()
    return fig


def plot_success_per_task(tasks: pd.DataFrame):
    """Grouped bars: success rate per task with its 95 % interval, one bar per (evaluation, mode)."""
    if tasks.empty:
        return None
    plt = _plt()
    tasks = tasks.copy()
    tasks["series"] = tasks["label"].astype(str) + " " + tasks["mode"].astype(str)
    series = list(dict.fromkeys(tasks["series"]))
    task_ids = sorted(tasks["task_id"].unique())
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(task_ids) * max(1, len(series) / 2) + 2), 4))
    width = 0.8 / max(len(series), 1)
    for i, name in enumerate(series):
        df = tasks[tasks["series"] == name].groupby("task_id").first().reindex(task_ids)
        pos = [t + (i - (len(series) - 1) / 2) * width for t in range(len(task_ids))]
        ax.bar(pos, df["success_rate"].fillna(0).astype(float), width, label=name,
               hatch="//" if name.endswith("baseline") else None, yerr=ci_errors(df), capsize=2,
               error_kw={"elinewidth": 0.8})
    ax.set_xticks(range(len(task_ids)), [str(t) for t in task_ids])
    ax.set_xlabel("task")
    ax.set_ylabel("success rate (95% CI)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Success per task: baseline vs speculative")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(fig: Any, out_dir: str | Path | None, name: str) -> Path | None:
    """``<out_dir>/<name>.png`` (nothing when ``fig`` or ``out_dir`` is None)."""
    if fig is None or out_dir is None:
        return None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


