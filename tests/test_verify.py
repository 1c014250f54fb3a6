"""The verifier (rsd.analysis.verify): committed results recompute from their records; tampering fails."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

from rsd import PROJECT_ROOT
from rsd.analysis.verify import main, verify
from rsd.eval.summary import summarize

RESULTS = PROJECT_ROOT / "docs" / "results"


def _records() -> list[dict]:
    out = []
    for i in range(40):
        task, trial = i // 10, i % 10
        base = (i * 7) % 10 < 6
        spec = base if i % 5 else not base
        out += [{"suite": "libero_spatial", "task_id": task, "trial": trial, "init_index": trial, "mode": m,
                 "success": s, "steps": 50, "inference_times_ms": [2.0], "engine_stats": {}, "error": None}
                for m, s in (("speculative", spec), ("baseline", base))]
    return out


def _result(folder: Path, provenance: bool = False) -> Path:
    folder.mkdir(parents=True)
    recs = _records()
    with gzip.open(folder / "episodes.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    summary = summarize(recs, suite="libero_spatial")
    if provenance:
        summary["provenance"] = {"code": {"commit": "90feab5" + "0" * 33, "dirty": False},
                                 "artifacts": {"main": {"path": "x", "content_hash": "ab" * 32}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def test_the_committed_results_verify() -> None:
    report = verify([RESULTS])
    assert report.ok, report.text()
    assert report.legacy  # the results without records are listed as legacy, not verified
    assert main([str(RESULTS)]) == 0


def test_a_tampered_copy_of_the_results_fails(tmp_path: Path, capsys) -> None:
    root = tmp_path / "results"
    shutil.copytree(RESULTS, root)
    good = _result(root / "new_eval", provenance=True)
    assert verify([root]).ok, verify([root]).text()

    # 1. a count in the summary changed
    s = json.loads((good / "summary.json").read_text())
    s["modes"]["baseline"]["successes"] += 1
    (good / "summary.json").write_text(json.dumps(s))
    # 2. a legacy summary moved out of legacy/: it now claims to be verifiable, without records
    legacy = next((root / "legacy").rglob("summary.json")).parent
    shutil.copytree(legacy, root / "not_legacy")
    # 3. a NaN outside legacy/
    (root / "bench.json").write_text('{"acceptance": NaN}')
    assert main([str(root)]) == 1
    out = capsys.readouterr().out
    assert f"{good / 'summary.json'}: modes.baseline.successes: summary" in out
    assert f"{root / 'not_legacy' / 'summary.json'}: no per-episode records" in out
    assert f"{root / 'bench.json'}: not strict JSON" in out


def test_records_changed_behind_the_summary_fail_with_the_paired_numbers(tmp_path: Path) -> None:
    good = _result(tmp_path / "r", provenance=True)
    recs = _records()
    failed_base = {(r["task_id"], r["trial"]) for r in recs if r["mode"] == "baseline" and not r["success"]}
    flip = next(r for r in recs if r["mode"] == "speculative" and not r["success"]
                and (r["task_id"], r["trial"]) in failed_base)  # neither -> only speculative
    flip["success"] = True
    with gzip.open(good / "episodes.jsonl.gz", "wt") as f:
        f.writelines(json.dumps(r) + "\n" for r in recs)
    text = verify([tmp_path]).text()
    for field in ("modes.speculative.successes", "modes.speculative.success_ci_low", "comparison.only_speculative",
                  "comparison.mcnemar_p", f"per_task[task {flip['task_id']}].modes.speculative.successes"):
        assert f": {field}: summary" in text, (field, text)


def test_provenance_rule(tmp_path: Path) -> None:
    _result(tmp_path / "old")  # old format: no provenance section -> reported missing, passes
    report = verify([tmp_path])
    assert report.ok and any("missing: code commit, artifact hashes" in w for w in report.warnings)
    assert not verify([tmp_path], require_provenance=True).ok
    new = _result(tmp_path / "new", provenance=True)
    s = json.loads((new / "summary.json").read_text())
    s["provenance"]["code"]["commit"] = None  # claims provenance but names no commit: fails
    (new / "summary.json").write_text(json.dumps(s))
    report = verify([tmp_path])
    assert not report.ok and any("new/summary.json: missing: code commit" in f for f in report.failures)
