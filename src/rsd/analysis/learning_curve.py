"""Held-out success against CPU-minutes of training: ``python -m rsd.analysis.learning_curve curve.json``.

Why: when the recipe that reaches a target needs more time than ``make train`` has, a user chooses by the curve
(issue 19). ``curve.json`` names the points; every success number is recomputed here from each point's
episode records, so the curve cannot drift from the evaluations it draws::

    {"title": "...", "points": [
        {"label": "layers 0-2, 2 epochs", "eval_dir": "main3_e2", "train_minutes": 5.1,
         "note": "where the minutes come from"}, ...]}

``eval_dir`` is relative to the file (or absolute). Writes ``learning_curve.md`` (one row per point: minutes,
successes, rate and 95 % Wilson interval, and the paired McNemar test against the previous point when both
ran on the same init states) and ``learning_curve.png`` beside ``curve.json`` (or in ``--out``).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.analysis.plots import save_figure
from rsd.analysis.sequential import read_records
from rsd.analysis.stats import paired_comparison, success_stats


def curve_points(spec: Mapping[str, Any], base: Path) -> list[dict[str, Any]]:
    """The points of ``spec`` with their successes, rates and intervals from the records, in minutes order."""
    points = spec.get("points")
    if not points:
        raise ValueError("a learning curve needs 'points' (label, eval_dir, train_minutes)")
    out = []
    for p in points:
        missing = [k for k in ("label", "eval_dir", "train_minutes") if k not in p]
        if missing:
            raise ValueError(f"learning-curve point {p!r} lacks {missing}")
        folder = Path(p["eval_dir"])
        folder = folder if folder.is_absolute() else base / folder
        records = read_records(folder)
        modes = sorted({str(r.get("mode")) for r in records})
        if "mode" in p:
            records = [r for r in records if r.get("mode") == p["mode"]]
        elif len(modes) > 1:
            raise ValueError(f"{folder} holds modes {modes}: name the point's 'mode'")
        n, k = len(records), sum(bool(r.get("success")) for r in records)
        if n == 0:
            raise ValueError(f"{folder} holds no episodes" + (f" of mode {p['mode']!r}" if "mode" in p else ""))
        out.append({**p, "episodes": n, "successes": k, **success_stats(k, n), "records": records})
    out.sort(key=lambda q: float(q["train_minutes"]))
    for prev, cur in zip(out, out[1:], strict=False):
        cur["vs_previous"] = paired_comparison(cur["records"], prev["records"])
    return out


def markdown(points: Sequence[Mapping[str, Any]], title: str = "") -> str:
    """One row per point; the paired column compares each point with the one before it."""
    lines = [f"# {title}\n" if title else "",
             "| point | CPU-min of training | successes | success [95 % Wilson] | paired vs previous point |",
             "|---|---|---|---|---|"]
    for p in points:
        rate = f"{100 * p['success_rate']:.1f} % [{100 * p['success_ci_low']:.1f}, {100 * p['success_ci_high']:.1f}]"
        c = p.get("vs_previous")
        paired = "" if c is None else (f"only this {c['only_a']} / only previous {c['only_b']} of {c['pairs']}, "
                                       f"McNemar p = {c['mcnemar_p']:.2g}"
                                       + ("" if c["significant"] else " (no significant difference)"))
        lines.append(f"| {p['label']} | {float(p['train_minutes']):.1f} | {p['successes']}/{p['episodes']} | {rate} "
                     f"| {paired} |")
    notes = [f"- {p['label']}: {p['note']}" for p in points if p.get("note")]
    return "\n".join(line for line in lines if line) + "\n" + ("\n" + "\n".join(notes) + "\n" if notes else "")


def plot(points: Sequence[Mapping[str, Any]], title: str = ""):
    """Success (with its interval as error bars) against CPU-minutes of training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    x = [float(p["train_minutes"]) for p in points]
    y = [p["success_rate"] for p in points]
    err = [[p["success_rate"] - p["success_ci_low"] for p in points],
           [p["success_ci_high"] - p["success_rate"] for p in points]]
    ax.errorbar(x, y, yerr=err, fmt="o-", capsize=4)
    for xi, yi, p in zip(x, y, points, strict=True):
        ax.annotate(p["label"], (xi, yi), textcoords="offset points", xytext=(4, -12), fontsize=7)
    ax.set_xlabel("CPU-minutes of main-model training")
    ax.set_ylabel("held-out success (95 % Wilson)")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(title or "learning curve", fontsize=9)
    fig.tight_layout()
    return fig


def write_curve(spec_path: str | Path, out: str | Path | None = None) -> list[Path]:
    """Read ``curve.json``, write ``learning_curve.md`` and ``learning_curve.png`` -> the written paths."""
    spec_path = Path(spec_path)
    spec = json.loads(spec_path.read_text())
    points = curve_points(spec, spec_path.parent)
    out_dir = Path(out) if out else spec_path.parent
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "learning_curve.md"
    md.write_text(markdown(points, spec.get("title", "")))
    fig = plot(points, spec.get("title", ""))
    png = save_figure(fig, out_dir, "learning_curve")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return [md, png]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.analysis.learning_curve", description=__doc__.splitlines()[0])
    parser.add_argument("spec", help="curve.json: the points (label, eval_dir, train_minutes)")
    parser.add_argument("--out", default=None, help="folder for learning_curve.md/.png (default: beside the spec)")
    args = parser.parse_args(argv)
    for path in write_curve(args.spec, args.out):
        print(path)
    print(Path(args.out or Path(args.spec).parent, "learning_curve.md").read_text(), end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
