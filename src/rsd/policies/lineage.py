"""From a draft checkpoint to everything behind it: main model, tokenizer, caches, demos (by content hash).

A draft trained by the pipeline sits in a folder with an ``artifact.json`` (:mod:`rsd.utils.artifacts`) whose
``inputs`` name the artifacts it was made from; each of those names its own inputs. :func:`lineage` walks
that graph once, checks every artifact's files against its manifest and the hash its consumer recorded, and
returns what an evaluation needs: the files to load (main model, tokenizer) and the training data (feature
caches and demo sets) its init states must be held out from.

``ckpt=best`` (:func:`find_best_draft`): among the drafts under ``log_dir`` whose artifact says they were
trained for the evaluated suite and whose main model still exists unchanged, the one with the best validation
metric (``val/accuracy``: for a distilled draft, agreement with that main model); ties go to the newest.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rsd.models.checkpoint import FILENAME as DRAFT_FILE
from rsd.models.checkpoint import DraftCheckpointError
from rsd.utils.artifacts import ArtifactError, find_artifacts, read_artifact, verify_artifact

log = logging.getLogger(__name__)

MAIN_FILE = "main_decoder.pt"
TOKENIZER_FILE = "rfsq.pt"
#: artifact kinds that are training data (what evaluation init states must be held out from)
DATA_KINDS = ("cache", "demos")


@dataclass
class Lineage:
    """The artifacts behind one model, each checked against the hash its consumer recorded."""

    root: dict[str, Any]  # {"path", "kind", "content_hash"} of the model itself
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # content_hash -> ref (+ "manifest")
    problems: list[str] = field(default_factory=list)  # why part of the chain cannot be trusted

    def of_kind(self, kind: str) -> list[dict[str, Any]]:
        return [a for a in self.artifacts.values() if a["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any] | None:
        found = self.of_kind(kind)
        return found[0] if len(found) == 1 else None

    def training_data(self) -> list[dict[str, Any]]:
        """Refs of every feature cache and demo set in the chain."""
        return [{k: a[k] for k in ("path", "kind", "content_hash")} for a in self.artifacts.values()
                if a["kind"] in DATA_KINDS]


def lineage(folder: str | os.PathLike, expect_hash: str | None = None) -> Lineage:
    """Walk the artifact graph from ``folder`` (a model's artifact folder) through every recorded input."""
    folder = Path(folder)
    manifest = read_artifact(folder)
    if manifest is None:
        raise ArtifactError(f"{folder} has no artifact.json: where it came from is not recorded")
    out = Lineage(root={"path": str(folder), "kind": manifest["kind"], "content_hash": manifest["content_hash"]})
    todo = [(folder, expect_hash or manifest["content_hash"], manifest["kind"], "the model")]
    seen: set[str] = set()
    while todo:
        path, want, kind, named_by = todo.pop()
        if want in seen:
            continue
        seen.add(want)
        try:
            m = read_artifact(path)
        except ArtifactError as err:
            out.problems.append(str(err))
            continue
        if m is None:
            out.problems.append(f"{kind} {path} (input of {named_by}) is missing or has no artifact.json")
            continue
        bad = verify_artifact(path, m)
        if m.get("content_hash") != want:
            bad.append(f"it was rebuilt since {named_by} used it (content {str(m.get('content_hash'))[:12]} "
                       f"!= recorded {str(want)[:12]})")
        if bad:
            out.problems.append(f"{kind} {path}: {'; '.join(bad)}")
            continue
        out.artifacts[want] = {"path": str(path), "kind": m["kind"], "content_hash": want, "manifest": m}
        for name, ref in (m.get("inputs") or {}).items():
            if not isinstance(ref, dict) or not ref.get("path") or not ref.get("content_hash"):
                out.problems.append(f"{m['kind']} {path} records input {name!r} without path and content hash")
                continue
            todo.append((Path(ref["path"]), ref["content_hash"], ref.get("kind") or name, f"{m['kind']} {path}"))
    return out


def draft_files(chain: Lineage) -> dict[str, str]:
    """The main model and tokenizer files a draft's lineage names (``{}`` parts when absent)."""
    out = {}
    main, tok = chain.one("main"), chain.one("tokenizer")
    if main:
        out["main_ckpt"] = str(Path(main["path"]) / MAIN_FILE)
    if tok:
        out["tokenizer"] = str(Path(tok["path"]) / TOKENIZER_FILE)
    return out


def find_best_draft(log_dir: str | os.PathLike, suite: str | None) -> tuple[Path, dict[str, Any]]:
    """``ckpt=best``: ``(draft file, its manifest)`` by the rule in the module docstring."""
    log_dir = Path(log_dir)
    candidates, rejected = [], []
    for folder, manifest in find_artifacts([log_dir], "draft"):
        if suite and manifest.get("suite") != suite:
            rejected.append(f"{folder} (suite {manifest.get('suite')})")
            continue
        main = (manifest.get("inputs") or {}).get("main")
        if not main:
            rejected.append(f"{folder} (no main model recorded: a ground-truth draft)")
            continue
        main_manifest = read_artifact(main["path"]) if Path(main["path"]).is_dir() else None
        if not main_manifest or main_manifest.get("content_hash") != main["content_hash"]:
            rejected.append(f"{folder} (its main model {main['path']} is gone or was rebuilt)")
            continue
        value = (manifest.get("metric") or {}).get("value")
        score = float(value) if value is not None else float("-inf")
        candidates.append((score, manifest.get("created") or "", folder, manifest))
    if not candidates:
        raise DraftCheckpointError(
            f"ckpt=best: no draft under {log_dir} was trained for {suite} with a main model that still exists"
            + (f" (looked at: {'; '.join(rejected[:6])})" if rejected else "")
            + ". Train one: `make train` (python train.py experiment=draft_proj"
            + (f" data.suite={suite}" if suite and suite != "libero_spatial" else "") + "), or pass ckpt=<path>.")
    score, _, folder, manifest = max(candidates, key=lambda c: (c[0], c[1]))
    path = folder / DRAFT_FILE
    metric = (manifest.get("metric") or {}).get("name") or "val/accuracy"
    print(f"ckpt=best -> {path} (content {manifest['content_hash'][:16]}, {metric} {score:.4f}; best of "
          f"{len(candidates)} draft(s) for {suite} whose main model exists)", flush=True)
    return path, manifest


def training_data_of(model_files: dict[str, str | None]) -> dict[str, Any]:
    """What the models in ``model_files`` (``{"draft": path, "main": path, ...}``) were trained on.

    ``{"learned": True, "data": [refs of caches / demo sets], "untraceable": [reasons]}``: a model whose
    folder has no artifact manifest, or whose chain has a missing or rebuilt artifact, is untraceable (an
    evaluation must then refuse to call itself held out)."""
    data: dict[str, dict[str, Any]] = {}
    untraceable: list[str] = []
    for what, path in model_files.items():
        if not path:
            continue
        folder = Path(path).parent
        try:
            chain = lineage(folder)
        except ArtifactError as err:
            untraceable.append(f"the {what} {path}: {err}")
            continue
        untraceable += [f"the {what} {path}: {p}" for p in chain.problems]
        for ref in chain.training_data():
            data.setdefault(ref["content_hash"], ref)
        if not chain.training_data() and not chain.problems:
            untraceable.append(f"the {what} {path}: its artifact chain names no training data")
    return {"learned": True, "data": list(data.values()), "untraceable": untraceable}


def no_training_data(reason: str) -> dict[str, Any]:
    """The training data of a policy that learned nothing (scripted expert, no-op, replay)."""
    return {"learned": False, "data": [], "untraceable": [], "reason": reason}
