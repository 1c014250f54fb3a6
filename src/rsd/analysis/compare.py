"""Compare runs: load training metrics and evaluations (local folders or W&B) and plot them.

What ``notebooks/compare_runs.ipynb`` shows, importable and testable:

- **Sources.** Local: evaluation folders (``episodes.jsonl`` + ``summary.json``; shard folders are skipped
  when discovering, merge them first) and training runs (``<run>/csv/metrics.csv`` of Lightning's
  CSVLogger) found under ``log_dir`` (``logs/<task>/runs/<time>/``). W&B: the project's runs through
  ``wandb.Api()``, only when ``WANDB_API_KEY`` is set and the W&B mode is not offline/disabled
  (:func:`wandb_online`); anything else, or an API failure, falls back to the local folders.
- **Tables** (pandas): :func:`eval_table` one row per (evaluation, mode) with success and its 95 % Wilson
  interval, latency, engine statistics (per-chunk backbone / draft / main / decode ms, acceptance) and peak
  memory; :func:`task_frame` success per task (rows of ``rsd.eval.summary.task_table``);
  :func:`records_by_run` the episode records behind each row, which paired comparisons need
  (``rsd.analysis.report.comparisons``); :func:`load_train_metrics` one row per epoch.
- **Plots** live in :mod:`rsd.analysis.plots` (:func:`~rsd.analysis.plots.plot_layer_curves`,
  ``plot_acceptance_vs_success``, ``plot_latency_breakdown``, ``plot_success_per_task``). Success rates are drawn with
  their intervals as error bars; runs are named by :func:`short_labels` (the acceptance rule), not by path.
- Running the notebook headless: :func:`rsd.analysis.notebook.execute_notebook`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from rsd.analysis.stats import success_stats
from rsd.eval.runner import EPISODES_FILE, RUN_FILE, load_records
from rsd.eval.shard import SHARD_FILE
from rsd.eval.summary import SUMMARY_JSON, TASK_COLUMNS, num, summarize, task_table

log = logging.getLogger(__name__)

LAYER_COLUMN = re.compile(r"^(?P<stage>[A-Za-z0-9_]+)/(?P<metric>.+)_L(?P<layer>\d+)$")
LATENCY_PARTS = ("backbone", "draft", "main", "decode")
EVAL_COLUMNS = [
    "label", "source", "path", "suite", "mode", "acceptance", "delta", "tau", "epsilon", "threshold", "threshold_label",
    "episodes", "successes", "success_rate", "success_ci_low", "success_ci_high", "errors", "avg_inference_ms", "p95_inference_ms",
    "acceptance_rate", "mean_accepted_layers", "inferences",
    *[f"avg_{p}_ms" for p in LATENCY_PARTS], "avg_engine_ms", "peak_rss_mb", "peak_cuda_mb",
]


# --------------------------------------------------------------------------------------------------
# Local evaluation folders


@dataclass
class EvalFolder:
    """One evaluation folder: its summary (recomputed from episodes.jsonl when there) and records."""

    path: Path
    label: str
    summary: dict
    records: list[dict] = field(default_factory=list)
    policy: dict = field(default_factory=dict)


def _label(path: Path, root: Path | None) -> str:
    if root is not None:
        try:
            rel = path.resolve().relative_to(Path(root).resolve())
            if str(rel) != ".":
                return str(rel)
        except ValueError:
            pass
    return path.name


def load_eval_dir(path: str | Path, label: str | None = None, root: str | Path | None = None) -> EvalFolder:
    """An evaluation folder (``episodes.jsonl`` and/or ``summary.json``)."""
    path = Path(path)
    saved = json.loads((path / SUMMARY_JSON).read_text()) if (path / SUMMARY_JSON).is_file() else {}
    records = load_records(path) if (path / EPISODES_FILE).is_file() else []
    if not records and not saved:
        raise FileNotFoundError(f"{path}: neither {EPISODES_FILE} nor {SUMMARY_JSON}")
    if records:  # recomputed from the episodes (a resumed or merged folder may be newer than its summary)
        summary = summarize(records, suite=saved.get("suite"))
        for k, v in saved.items():
            summary.setdefault(k, v)
    else:
        summary = saved
    policy = dict(saved.get("policy") or {})
    if not policy and (path / RUN_FILE).is_file():
        policy = dict(json.loads((path / RUN_FILE).read_text()).get("policy") or {})
    return EvalFolder(path=path, label=label or _label(path, root), summary=summary, records=records,
                      policy=policy)


def find_eval_dirs(log_dir: str | Path, include_shards: bool = False) -> list[Path]:
    """Evaluation folders under ``log_dir`` (sorted), without shard folders unless ``include_shards``."""
    root = Path(log_dir)
    if not root.exists():
        return []
    dirs = {p.parent for name in ("episodes.jsonl", "summary.json") for p in root.rglob(name)}
    dirs = {d for d in dirs if "wandb" not in d.parts and (include_shards or not (d / SHARD_FILE).is_file())}
    return sorted(dirs)


def threshold_of(policy: Mapping[str, Any]) -> tuple[float, str]:
    """``(x, label)`` of a policy's acceptance rule: strict -> ``(0, "strict")``; relaxed -> tau or delta;
    epsilon -> ``(epsilon, "epsilon eps=<e>")``. Only the parameters of the policy's own rule are read (a
    policy spec carries a default ``delta`` whatever its rule, which must not name an epsilon run)."""
    kind = str(policy.get("acceptance") or "strict")
    if kind == "strict":
        return 0.0, "strict"
    if kind == "epsilon":
        eps = policy.get("epsilon")
        return (float(eps), f"epsilon eps={eps}") if eps is not None else (math.nan, "epsilon")
    tau, delta = policy.get("tau"), policy.get("delta")
    if tau is not None:
        return float(tau), f"{kind} tau={tau}"
    if delta is not None:
        return float(delta), f"{kind} delta={delta}"
    return math.nan, kind


def _peak(records: Iterable[Mapping[str, Any]], key: str) -> float | None:
    vals = [float(r[key]) for r in records if r.get(key) is not None]
    return max(vals) if vals else None


def peak_memory(records: Sequence[Mapping[str, Any]]) -> dict[str, float | None]:
    """Largest per-episode peaks of the records: ``{"peak_rss_mb", "peak_cuda_mb"}`` (None if not recorded)."""
    return {"peak_rss_mb": _peak(records, "peak_rss_mb"), "peak_cuda_mb": _peak(records, "peak_cuda_mb")}


def mode_row(label: str, mode: str, stats: Mapping[str, Any], policy: Mapping[str, Any], suite: str | None,
             source: str = "local", path: str | None = None, memory: Mapping[str, Any] | None = None) -> dict:
    """One row of :func:`eval_table` from a mode summary (``summary["modes"][mode]``)."""
    eng = stats.get("engine") or {}
    k, n = num(stats.get("successes")), num(stats.get("episodes"))
    rate = (success_stats(int(k), int(n)) if k is not None and n is not None  # recomputed: W&B rows have counts
            else {key: stats.get(key) for key in ("success_rate", "success_ci_low", "success_ci_high")})
    x, xlabel = threshold_of(policy) if mode == "speculative" else (math.nan, "baseline")
    row = {
        "label": label, "source": source, "path": path, "suite": suite, "mode": mode,
        "acceptance": policy.get("acceptance"), "delta": policy.get("delta"), "tau": policy.get("tau"),
        "epsilon": policy.get("epsilon"),
        "threshold": x, "threshold_label": xlabel,
        **{k: stats.get(k) for k in ("episodes", "successes", "errors", "avg_inference_ms", "p95_inference_ms")},
        **rate,
        "acceptance_rate": eng.get("acceptance_rate"), "mean_accepted_layers": eng.get("mean_accepted_layers"),
        "inferences": eng.get("inferences"),
        **{f"avg_{p}_ms": eng.get(f"avg_{p}_ms") for p in (*LATENCY_PARTS, "engine")},
        "peak_rss_mb": None, "peak_cuda_mb": None,
    }
    row.update(memory or {})
    return row


def eval_table(folders: Sequence[EvalFolder]) -> pd.DataFrame:
    """One row per (evaluation folder, mode); columns :data:`EVAL_COLUMNS`."""
    rows = []
    for f in folders:
        for mode, stats in (f.summary.get("modes") or {}).items():
            recs = [r for r in f.records if r.get("mode") == mode]
            rows.append(mode_row(f.label, mode, stats, f.policy, f.summary.get("suite"), "local", str(f.path),
                                 peak_memory(recs)))
    return pd.DataFrame(rows, columns=EVAL_COLUMNS)


def task_frame(folders: Sequence[EvalFolder]) -> pd.DataFrame:
    """Success per task with its interval: one row per (folder, mode, task), columns ``TASK_COLUMNS``."""
    return pd.DataFrame([row for f in folders for row in task_table(f.summary, label=f.label)],
                        columns=TASK_COLUMNS)


def records_by_run(folders: Sequence[EvalFolder]) -> dict[tuple[str, str], list[dict]]:
    """``{(path, mode): episode records}`` of the folders, keyed like :func:`eval_table`'s ``path`` and ``mode``
    columns: what a paired comparison of two rows pairs (runs from W&B have no records here)."""
    out: dict[tuple[str, str], list[dict]] = {}
    for f in folders:
        for r in f.records:
            out.setdefault((str(f.path), str(r.get("mode"))), []).append(r)
    return out


def short_labels(rows: Sequence[Mapping[str, Any]] | pd.DataFrame) -> list[str]:
    """Plot names of :func:`eval_table` rows: the acceptance rule (``strict``, ``relaxed delta=2``) or
    ``baseline``; a name several rows share gets the last part of their run label, then a counter."""
    recs = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    names = [str(r.get("threshold_label") or r.get("mode")) if r.get("mode") == "speculative" else str(r.get("mode"))
             for r in recs]
    first = list(names)
    for i, r in enumerate(recs):
        if first.count(first[i]) > 1:
            tail = Path(str(r.get("label"))).name
            if tail and tail not in names[i]:
                names[i] = f"{names[i]} ({tail})"
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(name if names.count(name) == 1 else f"{name} #{seen[name]}")
    return out


def ci_errors(df: pd.DataFrame, scale: float = 1.0) -> list[list[float]] | None:
    """matplotlib ``yerr`` (distances below and above) of the rows' ``success_rate`` from their interval
    columns; 0 where a row has no interval, None when none has."""
    if not {"success_ci_low", "success_ci_high"} <= set(df.columns) or df["success_ci_low"].isna().all():
        return None
    rate = df["success_rate"].astype(float)
    low = (rate - df["success_ci_low"].astype(float)).fillna(0.0).clip(lower=0.0) * scale
    high = (df["success_ci_high"].astype(float) - rate).fillna(0.0).clip(lower=0.0) * scale
    return [low.tolist(), high.tolist()]


# --------------------------------------------------------------------------------------------------
# Local training runs (Lightning CSVLogger)


def find_train_runs(log_dir: str | Path) -> list[Path]:
    """Training run folders under ``log_dir`` that have ``csv/metrics.csv`` (sorted)."""
    root = Path(log_dir)
    if not root.exists():
        return []
    return sorted({p.parent.parent for p in root.rglob("csv/metrics.csv")})


def _metrics_csv(run: Path) -> Path:
    run = Path(run)
    if run.is_file():
        return run
    for cand in (run / "csv" / "metrics.csv", run / "metrics.csv"):
        if cand.is_file():
            return cand
    found = sorted(run.glob("csv/*/metrics.csv"))
    if found:
        return found[-1]
    raise FileNotFoundError(f"{run}: no csv/metrics.csv")


def epoch_metrics(df: pd.DataFrame) -> pd.DataFrame:
    """Lightning's sparse rows (one per logging call) -> one row per epoch (last value of each column)."""
    if "epoch" not in df.columns or df.empty:
        return df.reset_index(drop=True)
    df = df.dropna(subset=["epoch"])
    out = df.groupby("epoch", sort=True).last()  # last non-null value per column
    out = out.reset_index()
    out["epoch"] = out["epoch"].astype(int)
    return out


def load_train_metrics(run: str | Path) -> pd.DataFrame:
    """A training run's CSV metrics, one row per epoch."""
    return epoch_metrics(pd.read_csv(_metrics_csv(Path(run))))


def layer_columns(df: pd.DataFrame, stage: str = "val") -> dict[str, list[tuple[int, str]]]:
    """``{metric: [(layer, column), ...]}`` of the per-layer columns ``<stage>/<metric>_L<k>`` present."""
    out: dict[str, list[tuple[int, str]]] = {}
    for col in df.columns:
        m = LAYER_COLUMN.match(str(col))
        if m and m.group("stage") == stage and df[col].notna().any():
            out.setdefault(m.group("metric"), []).append((int(m.group("layer")), col))
    return {k: sorted(v) for k, v in sorted(out.items())}


# --------------------------------------------------------------------------------------------------
# Weights & Biases


def wandb_online(mode: str | None = None) -> bool:
    """Read W&B through its API only with ``WANDB_API_KEY`` set and a mode that is not offline/disabled."""
    if not os.environ.get("WANDB_API_KEY"):
        return False
    mode = mode or os.environ.get("WANDB_MODE") or "online"
    return mode not in ("offline", "disabled", "dryrun")


def _flat(d: Any) -> dict:
    """W&B summaries/configs as plain dicts (``run.summary`` is a mapping-like object)."""
    try:
        return {k: d[k] for k in d.keys()}
    except (AttributeError, TypeError):
        return dict(d or {})


def wandb_eval_rows(runs: Iterable[Any]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Eval runs logged by ``rsd.eval.wandb_log.log_to_wandb`` -> ``(eval_table, task_table)`` frames."""
    rows, tasks = [], []
    task_key = re.compile(r"^(?P<mode>[^/]+)/task_(?P<task>\d+)/(?P<name>\w+)$")
    for run in runs:
        summary, config = _flat(run.summary), _flat(run.config)
        modes = sorted({k.split("/")[0] for k in summary if k.endswith("/success_rate") and k.count("/") == 1})
        if not modes:
            continue
        policy = config.get("policy") if isinstance(config.get("policy"), Mapping) else {}
        label = getattr(run, "name", None) or getattr(run, "id", "run")
        for mode in modes:
            stats = {k[len(mode) + 1:]: v for k, v in summary.items()
                     if k.startswith(f"{mode}/") and k.count("/") == 1}
            stats["engine"] = {k[len(mode) + 8:]: v for k, v in summary.items() if k.startswith(f"{mode}/engine/")}
            rows.append(mode_row(label, mode, stats, policy, config.get("suite"), "wandb",
                                 getattr(run, "url", None)))
        per_task: dict[tuple[str, int], dict] = {}
        for k, v in summary.items():
            m = task_key.match(k)
            if m and m.group("name") in TASK_COLUMNS:
                row = per_task.setdefault((m.group("mode"), int(m.group("task"))), {
                    "label": label, "mode": m.group("mode"), "task_id": int(m.group("task"))})
                row[m.group("name")] = v
        tasks += [per_task[k] for k in sorted(per_task)]
    return pd.DataFrame(rows, columns=EVAL_COLUMNS), pd.DataFrame(tasks, columns=TASK_COLUMNS)


def wandb_train_histories(runs: Iterable[Any], samples: int = 2000) -> dict[str, pd.DataFrame]:
    """Training runs' histories (per epoch) of the runs that logged per-layer metrics."""
    out: dict[str, pd.DataFrame] = {}
    for run in runs:
        summary = _flat(run.summary)
        if not any(LAYER_COLUMN.match(str(k)) for k in summary) or any(k.endswith("/engine/inferences")
                                                                       for k in summary):
            continue
        hist = run.history(samples=samples, pandas=True)
        if hist is None or len(hist) == 0:
            continue
        out[getattr(run, "name", None) or run.id] = epoch_metrics(hist)
    return out


def load_wandb(project: str, entity: str | None = None, max_runs: int = 100,
               filters: Mapping | None = None) -> tuple[pd.DataFrame, pd.DataFrame, dict[str, pd.DataFrame]]:
    """``(eval_table, task_table, train histories)`` of a W&B project (needs the network and a key)."""
    import wandb

    api = wandb.Api(timeout=30)
    path = f"{entity}/{project}" if entity else project
    runs = list(api.runs(path, filters=dict(filters or {}), per_page=min(max_runs, 100)))[:max_runs]
    ev, tasks = wandb_eval_rows(runs)
    return ev, tasks, wandb_train_histories(runs)


# --------------------------------------------------------------------------------------------------
# Everything the notebook needs


@dataclass
class Comparison:
    source: str  # "local" | "wandb"
    evals: pd.DataFrame
    tasks: pd.DataFrame
    train: dict[str, pd.DataFrame]
    folders: list[EvalFolder] = field(default_factory=list)


def load_local(log_dir: str | Path = "logs", eval_dirs: Sequence[str | Path] | None = None,
               train_runs: Sequence[str | Path] | None = None, include_shards: bool = False) -> Comparison:
    """Evaluations and training runs from local folders (all found under ``log_dir`` unless given)."""
    root = Path(log_dir)
    dirs = [Path(d) for d in eval_dirs] if eval_dirs is not None else find_eval_dirs(root, include_shards)
    folders = []
    for d in dirs:
        try:
            folders.append(load_eval_dir(d, root=root))
        except (OSError, ValueError, KeyError) as exc:
            log.warning("skipping evaluation folder %s: %s", d, exc)
    runs = [Path(r) for r in train_runs] if train_runs is not None else find_train_runs(root)
    train = {}
    for r in runs:
        try:
            train[_label(r, root)] = load_train_metrics(r)
        except (OSError, ValueError, pd.errors.ParserError) as exc:
            log.warning("skipping training run %s: %s", r, exc)
    return Comparison("local", eval_table(folders), task_frame(folders), train, folders)


def load_runs(log_dir: str | Path = "logs", eval_dirs: Sequence[str | Path] | None = None,
              train_runs: Sequence[str | Path] | None = None, wandb_project: str | None = "rsd",
              wandb_entity: str | None = None, wandb_mode: str | None = None) -> Comparison:
    """W&B when :func:`wandb_online` (and it answers), else the local folders."""
    if wandb_project and wandb_online(wandb_mode):
        try:
            ev, tasks, train = load_wandb(wandb_project, wandb_entity)
            if len(ev) or train:
                return Comparison("wandb", ev, tasks, train)
            log.warning("W&B project %s has no runs to compare; using the local folders", wandb_project)
        except Exception as exc:  # noqa: BLE001 - network/auth problems: fall back to the local folders
            log.warning("W&B API failed (%s); using the local folders", exc)
    return load_local(log_dir, eval_dirs, train_runs)
