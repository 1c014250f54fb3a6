"""Merge the shards of an evaluation into one: ``python -m rsd.eval.merge <shard_dir>... --out merged``.

A ``<shard_dir>`` is an evaluation folder (``episodes.jsonl``) or a folder above some (a Hydra multirun
folder ``logs/eval/multiruns/<time>``, or the ``out_dir`` of ``shard=i/n`` runs): its sub-folders with an
``episodes.jsonl`` are taken, sorted.

- Refuses folders evaluated with another policy, suite or ``max_steps`` (their ``eval_run.json``), shards
  of different splits (``shard.json``: other ``n`` or another work list), and folders whose held-out
  verdicts (``heldout.json``) differ or are missing; the merged summary keeps the common verdict.
- Reports duplicates (an episode in several folders: the first folder's record is kept; ``conflicting``
  when the outcomes differ) and what is missing (shards not given, episodes not run yet).
- Writes ``<out>/episodes.jsonl`` (work-list order), ``eval_run.json`` (the identity of the unsharded
  evaluation, so ``python evaluate.py out_dir=<out> ...`` with the same settings resumes it and runs only
  the missing episodes), ``merge.json`` and the usual ``summary.json`` / ``summary.txt`` / ``tasks.md``.

:func:`stable_view` drops what differs between two runs of the same evaluation (wall-clock times,
memory, hosts, output folders): two runs with the same seed and inputs have equal stable views.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd.eval.runner import EPISODES_FILE, HELDOUT_FILE, RUN_FILE, EpisodeLog, record_key
from rsd.eval.shard import read_shard_file
from rsd.eval.summary import SUMMARY_JSON, print_summary, summarize, write_summary
from rsd.policies.registry import spec_identity

log = logging.getLogger(__name__)

MERGE_FILE = "merge.json"

#: keys whose values depend on the run, not on the evaluation's outcome
VOLATILE_KEYS = frozenset({
    "out_dir", "pid", "host", "finished_at", "worker", "inference_times_ms", "new_episodes",
    "resumed_episodes", "speedup", "merged_from", "merge", "shard",
})


def _volatile(key: str) -> bool:
    return (key in VOLATILE_KEYS or key.endswith(("_ms", "_s", "_seconds")) or key.startswith(("peak_", "speedup"))
            or key == "wall_time")


def stable_view(obj: Any) -> Any:
    """``obj`` without wall-clock / memory / host / folder values (recursively): what a rerun reproduces."""
    if isinstance(obj, Mapping):
        return {k: stable_view(v) for k, v in obj.items() if not _volatile(str(k))}
    if isinstance(obj, list | tuple):
        return [stable_view(v) for v in obj]
    return obj


class MergeError(ValueError):
    """The folders do not belong to one evaluation."""


def find_eval_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Evaluation folders among ``paths`` (a folder with episodes.jsonl, else its sub-folders that have one)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if (p / EPISODES_FILE).is_file():
            found = [p]
        else:
            found = sorted({f.parent for f in p.glob(f"*/{EPISODES_FILE}")}
                           | {f.parent for f in p.glob(f"*/*/{EPISODES_FILE}")})
        if not found:
            raise MergeError(f"{p}: no {EPISODES_FILE} there or in its sub-folders")
        out += [f for f in found if f not in out]
    return out


def _identity(path: Path) -> dict | None:
    f = path / RUN_FILE
    return json.loads(f.read_text()) if f.is_file() else None


def _job_key(suite: str, item: Sequence) -> tuple:
    return (suite, int(item[0]), int(item[1]), item[2])


def _full_policy(dirs: Sequence[Path], identity: Mapping[str, Any]) -> dict:
    """The policy spec as the shards' summaries record it (with ``device``), else the identity's."""
    for d in dirs:
        if (d / SUMMARY_JSON).is_file():
            policy = json.loads((d / SUMMARY_JSON).read_text()).get("policy")
            if isinstance(policy, dict) and spec_identity(policy) == identity.get("policy"):
                return policy
    return dict(identity.get("policy") or {})


def merged_verdict(dirs: Sequence[Path]) -> dict:
    """The one held-out verdict all ``dirs`` share (``heldout.json``); a missing or differing one is an error,
    never read as held out."""
    verdicts = {}
    for d in dirs:
        f = d / HELDOUT_FILE
        if not f.is_file():
            raise MergeError(f"{d} has no {HELDOUT_FILE}: whether its init states were held out is unknown, so "
                             "its episodes cannot be merged into a result (rerun it with this version)")
        verdicts[d] = json.loads(f.read_text())

    def key(v: Mapping[str, Any]) -> tuple:
        return (v.get("status"), v.get("allow_train_states"),
                tuple(sorted(r.get("content_hash") or "" for r in v.get("training_data") or [])))

    first_dir, first = next(iter(verdicts.items()))
    for d, v in verdicts.items():
        if key(v) != key(first):
            raise MergeError(f"held-out verdicts differ: {first_dir} is {first.get('status')!r}, {d} is "
                             f"{v.get('status')!r} (or their training data differ); results of differently "
                             "checked runs are not merged")
    return first


def merge_shards(dirs: Sequence[str | Path], out: str | Path | None = None) -> dict:
    """Merge evaluation folders; returns ``{"summary", "records", "report", "identity"}`` and writes ``out``."""
    dirs = find_eval_dirs(dirs)
    identities = {d: _identity(d) for d in dirs}
    base = {k: v for k, v in (next((i for i in identities.values() if i), None) or {}).items() if k != "shard"}
    for d, ident in identities.items():
        if ident is None:
            log.warning("%s has no %s: its policy cannot be checked", d, RUN_FILE)
            continue
        mine = {k: v for k, v in ident.items() if k != "shard"}
        if mine != base:
            diff = sorted(k for k in set(mine) | set(base) if mine.get(k) != base.get(k))
            raise MergeError(f"{d} was evaluated differently ({', '.join(diff)}):\n  {base}\n  {mine}\n"
                             "only shards of the same evaluation (suite, policy, max_steps) can be merged")

    heldout = merged_verdict(dirs)
    shards = {d: read_shard_file(d) for d in dirs}
    given = [s for s in shards.values() if s]
    work_list: list[tuple] | None = None
    missing_shards: list[str] = []
    if given:
        first = given[0]
        for d, s in shards.items():
            if s and (s["count"], s["work_list"]) != (first["count"], first["work_list"]):
                raise MergeError(f"{d} is shard {s['shard']} of another split than {first['shard']} "
                                 "(different n or work list)")
        work_list = [_job_key(first["suite"], j) for j in first["work_list"]]
        have = sorted({s["index"] for s in given})
        missing_shards = [f"{i}/{first['count']}" for i in range(first["count"]) if i not in have]

    records: dict[tuple, dict] = {}
    source: dict[tuple, Path] = {}
    duplicates: list[dict] = []
    bad_lines = 0
    for d in dirs:
        recs, bad = EpisodeLog(d / EPISODES_FILE).read()
        bad_lines += bad
        for rec in {record_key(r): r for r in recs}.values():  # last record per key within a folder
            key = record_key(rec)
            if key in records:
                same = stable_view(records[key]) == stable_view(rec)
                duplicates.append({"key": list(key), "kept": str(source[key]), "dropped": str(d),
                                   "conflicting": not same})
                continue
            records[key] = rec
            source[key] = d

    suites = sorted({k[0] for k in records})
    if len(suites) > 1:
        raise MergeError(f"episodes of several suites: {suites}")
    if work_list is not None:
        order = {k: i for i, k in enumerate(work_list)}
        extra = sorted(k for k in records if k not in order)
        missing = [list(k) for k in work_list if k not in records]
    else:
        order, extra, missing = {}, [], []
    merged = sorted(records.values(), key=lambda r: (order.get(record_key(r), len(order)), record_key(r)))
    report = {
        "merged_from": [str(d) for d in dirs],
        "shards": sorted((s["shard"] for s in given), key=lambda x: int(x.split("/")[0])),
        "missing_shards": missing_shards,
        "episodes": len(merged),
        "work_list_episodes": len(work_list) if work_list is not None else None,
        "missing_episodes": missing,
        "duplicates": duplicates,
        "conflicting_duplicates": sum(d["conflicting"] for d in duplicates),
        "unexpected_episodes": [list(k) for k in extra],
        "unreadable_lines": bad_lines,
        "complete": work_list is not None and not missing,
    }
    identity = dict(base)
    suite = identity.get("suite") or (suites[0] if suites else None)
    summary = summarize(merged, suite=suite, extra={
        "out_dir": str(out) if out is not None else None, "policy": _full_policy(dirs, identity),
        "complete": report["complete"],
        "work_list_episodes": report["work_list_episodes"] if work_list is not None else len(merged),
        "max_steps": identity.get("max_steps"), "heldout": heldout,
        "merge": {k: v for k, v in report.items() if k not in ("duplicates", "missing_episodes")}
        | {"duplicates": len(duplicates), "missing_episodes": len(missing)},
    })
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if any((out / EPISODES_FILE).resolve() == (d / EPISODES_FILE).resolve() for d in dirs):
            raise MergeError(f"--out {out} is one of the merged folders")
        EpisodeLog(out / EPISODES_FILE).rewrite(merged)
        if identity:
            (out / RUN_FILE).write_text(json.dumps(identity, indent=2) + "\n")
        (out / MERGE_FILE).write_text(json.dumps(report, indent=2) + "\n")
        (out / HELDOUT_FILE).write_text(json.dumps(heldout, indent=1) + "\n")
        write_summary(out, summary)
    return {"summary": summary, "records": merged, "report": report, "identity": identity}


def format_report(report: Mapping[str, Any]) -> str:
    lines = [f"Merged {report['episodes']} episodes from {len(report['merged_from'])} folders"
             + (f" (shards {', '.join(report['shards'])})" if report["shards"] else "")]
    if report["missing_shards"]:
        lines.append(f"  missing shards: {', '.join(report['missing_shards'])}")
    if report["missing_episodes"]:
        shown = ", ".join(f"task {t} trial {i} {m}" for _, t, i, m in report["missing_episodes"][:10])
        more = len(report["missing_episodes"]) - 10
        lines.append(f"  missing episodes ({len(report['missing_episodes'])}): {shown}"
                     + (f" ... and {more} more" if more > 0 else ""))
    if report["duplicates"]:
        lines.append(f"  duplicates: {len(report['duplicates'])} (first folder's record kept; "
                     f"{report['conflicting_duplicates']} with different outcomes)")
        for d in report["duplicates"][:10]:
            _, t, i, m = d["key"]
            lines.append(f"    task {t} trial {i} {m}: kept {d['kept']}, dropped {d['dropped']}"
                         + (" (CONFLICT)" if d["conflicting"] else ""))
    if report["unexpected_episodes"]:
        lines.append(f"  episodes outside the shards' work list: {len(report['unexpected_episodes'])}")
    if report["unreadable_lines"]:
        lines.append(f"  unreadable JSONL lines dropped: {report['unreadable_lines']}")
    if report["work_list_episodes"] is None:
        lines.append("  (no shard.json: completeness not checked)")
    else:
        lines.append(f"  complete: {report['complete']} ({report['episodes'] - len(report['unexpected_episodes'])}"
                     f" of {report['work_list_episodes']} work-list episodes)")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rsd.eval.merge", description=__doc__.split("\n")[0])
    parser.add_argument("dirs", nargs="+", help="shard folders (or folders above them)")
    parser.add_argument("--out", required=True, help="output folder of the merged evaluation")
    parser.add_argument("--strict", action="store_true",
                        help="exit 1 when shards/episodes are missing or duplicates conflict")
    parser.add_argument("--quiet", action="store_true", help="do not print the summary")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        result = merge_shards(args.dirs, args.out)
    except MergeError as exc:
        print(f"merge refused: {exc}", file=sys.stderr)
        return 2
    report = result["report"]
    if not args.quiet:
        print_summary(result["summary"])
    print(format_report(report))
    print(f"Merged evaluation: {args.out}")
    bad = report["missing_shards"] or report["missing_episodes"] or report["conflicting_duplicates"]
    return 1 if args.strict and bad else 0


if __name__ == "__main__":
    sys.exit(main())
