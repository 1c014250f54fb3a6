"""Artifact identity: every product of the pipeline lives in a folder with an ``artifact.json`` manifest.

An artifact is a demo set, a tokenizer, a feature cache, a main model, distillation targets, a draft or an
evaluation run. Its manifest records what it is and where it came from::

    {"format": "rsd.artifact", "version": 1,
     "kind": "cache",                              # one of KINDS
     "content_hash": "<sha256 of the files' hashes>",  # the artifact's identity
     "files": {"hidden.npy": "<sha256>", ...},     # relative path -> sha256 of the file
     "config": {...},                              # the settings that made it
     "inputs": {"demos": "<content_hash>", ...},   # the artifacts it was made from, by identity
     "code": {"commit": "<git sha>", "dirty": false},
     "created": "2026-12-04T18:00:00+00:00"}

Identity is by content: two folders with the same files have the same ``content_hash`` whatever their path,
and a folder rebuilt at the same path from other inputs gets another one. Everything that names an input
(a model naming its training cache, an evaluation naming its models) records the input's path *and* its
``content_hash``; :func:`verify_artifact` recomputes it, so a file changed behind the manifest is noticed.

Why not W&B artifacts or dvc: both need a service or a repository-wide tool around every command, while the
pipeline runs offline on a fresh clone; the manifest here is a few lines of JSON any tool can read, and W&B
runs log the same hashes in their config so lineage is still visible there.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from rsd import PROJECT_ROOT

ARTIFACT_FILE = "artifact.json"
ARTIFACT_FORMAT = "rsd.artifact"
KINDS = ("demos", "tokenizer", "cache", "main", "distill", "draft", "eval")


class ArtifactError(RuntimeError):
    """An artifact is missing, has no manifest, or its files differ from what the manifest records."""


def file_sha256(path: str | os.PathLike, limit: int | None = None) -> str:
    """sha256 of a file's bytes (hex; the first ``limit`` characters when given)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[: limit or 64]


def canonical_hash(obj: Any) -> str:
    """sha256 of an object's canonical JSON (sorted keys): equal configs give equal hashes."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform`` elsewhere): which machine a figure came from."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine()


def code_version(root: str | os.PathLike = PROJECT_ROOT) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout the code runs from (None where there is no git)."""
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no") if commit else None
    return {"commit": commit, "dirty": None if status is None else bool(status)}


def _list_files(folder: Path) -> list[str]:
    """Every regular file under ``folder`` except the manifest and temporary/hidden files."""
    out = []
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if p.is_file() and rel.name != ARTIFACT_FILE and not any(part.startswith(".") for part in rel.parts):
            out.append(rel.as_posix())
    return out


def hash_files(folder: str | os.PathLike, files: Sequence[str] | None = None) -> dict[str, str]:
    """``{relative path: sha256}`` of ``files`` (default: every file of the folder but the manifest)."""
    folder = Path(folder)
    names = list(files) if files is not None else _list_files(folder)
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise ArtifactError(f"{folder}: missing file(s) {missing}")
    return {n: file_sha256(folder / n) for n in names}


def content_hash(file_hashes: Mapping[str, str]) -> str:
    """The identity of an artifact: a hash over its files' names and hashes."""
    return canonical_hash(dict(sorted(file_hashes.items())))


def write_artifact(folder: str | os.PathLike, kind: str, *, config: Mapping[str, Any] | None = None,
                   inputs: Mapping[str, str] | None = None, files: Sequence[str] | None = None,
                   extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Hash ``files`` of ``folder`` (default: all) and write its ``artifact.json``; returns the manifest."""
    if kind not in KINDS:
        raise ValueError(f"artifact kind must be one of {KINDS}, got {kind!r}")
    folder = Path(folder)
    hashes = hash_files(folder, files)
    manifest = {
        "format": ARTIFACT_FORMAT, "version": 1, "kind": kind,
        "content_hash": content_hash(hashes), "files": hashes,
        "config": json.loads(json.dumps(dict(config or {}), default=str)),
        "inputs": dict(inputs or {}),
        "code": code_version(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        **dict(extra or {}),
    }
    tmp = folder / f".{ARTIFACT_FILE}.tmp"
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, folder / ARTIFACT_FILE)
    return manifest


def read_artifact(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The manifest of ``folder`` (or of the folder holding a file), None when there is none."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    path = folder / ARTIFACT_FILE
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} is not valid JSON ({err}); delete it to rebuild the artifact") from err
    if not isinstance(manifest, dict) or manifest.get("format") != ARTIFACT_FORMAT:
        raise ArtifactError(f"{path} is not an rsd artifact manifest")
    return manifest


def verify_artifact(folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> list[str]:
    """Problems with ``folder``'s files against its manifest (empty list: intact)."""
    folder = Path(folder)
    manifest = manifest if manifest is not None else read_artifact(folder)
    if manifest is None:
        return [f"{folder} has no {ARTIFACT_FILE}"]
    problems = []
    for name, digest in (manifest.get("files") or {}).items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif file_sha256(path) != digest:
            problems.append(f"{name} changed since the manifest was written")
    if content_hash(manifest.get("files") or {}) != manifest.get("content_hash"):
        problems.append("content_hash does not match the recorded file hashes")
    return problems


def require_artifact(folder: str | os.PathLike, kind: str | None = None, verify: bool = True) -> dict[str, Any]:
    """The manifest of an intact artifact of ``kind`` at ``folder``, else :class:`ArtifactError`."""
    manifest = read_artifact(folder)
    if manifest is None:
        raise ArtifactError(f"{folder} is not an artifact (no {ARTIFACT_FILE}); build it with "
                            "`python -m rsd.prepare`")
    if kind and manifest.get("kind") != kind:
        raise ArtifactError(f"{folder} holds a {manifest.get('kind')!r} artifact, expected {kind!r}")
    problems = verify_artifact(folder, manifest) if verify else []
    if problems:
        raise ArtifactError(f"artifact {folder} does not match its manifest: {'; '.join(problems)}")
    return manifest


def find_artifacts(roots: Iterable[str | os.PathLike], kind: str) -> list[tuple[Path, dict[str, Any]]]:
    """``(folder, manifest)`` of every artifact of ``kind`` under ``roots`` (manifests read, files not hashed)."""
    found = []
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(ARTIFACT_FILE)):
            try:
                manifest = read_artifact(path.parent)
            except ArtifactError:
                continue
            if manifest and manifest.get("kind") == kind:
                found.append((path.parent, manifest))
    return found


def artifact_ref(folder: str | os.PathLike, manifest: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``{"path", "kind", "content_hash"}``: how a consumer names an input it used."""
    manifest = manifest if manifest is not None else read_artifact(folder)
    return {"path": str(folder), "kind": (manifest or {}).get("kind"),
            "content_hash": (manifest or {}).get("content_hash")}
