"""Split one evaluation over processes and machines: ``python evaluate.py shard=i/n``.

The work list of an evaluation (every ``(task, trial, mode)``, see ``rsd.eval.work_list``) is cut by its
``(task, trial)`` pairs: the sorted pairs are dealt round-robin, pair ``k`` goes to shard ``k % n``. So the
split depends only on the request (never on timing or on which machine runs what), every shard gets a
mix of tasks, and the modes of one init state (``mode=both``) stay in the same shard, paired.

Each shard is an ordinary evaluation folder (episodes.jsonl, eval_run.json with the shard in its
identity, summary.json) plus ``shard.json``: the shard's place in the whole work list, which
``python -m rsd.eval.merge`` uses to check that the shards belong together and to name missing episodes.

Output folders: with ``out_dir=X`` shard ``i`` of ``n`` writes to ``X/shard_<i>_of_<n>`` (so a Hydra
multirun ``-m shard=0/4,1/4,2/4,3/4 out_dir=X`` cannot collide and resumes in place); without ``out_dir``
every job has its own Hydra folder already.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

SHARD_FILE = "shard.json"

_SHARD_RE = re.compile(r"^\s*(\d+)\s*(?:/|of|_of_|-of-)\s*(\d+)\s*$")


def parse_shard(shard: Any) -> tuple[int, int] | None:
    """``"i/n"`` (or ``(i, n)``, ``"i_of_n"``) -> ``(i, n)`` with ``0 <= i < n``; ``None``/``""`` -> ``None``."""
    if shard is None or shard == "":
        return None
    if isinstance(shard, str):
        m = _SHARD_RE.match(shard)
        if not m:
            raise ValueError(f"shard must look like 'i/n' (e.g. shard=0/4), got {shard!r}")
        index, count = int(m.group(1)), int(m.group(2))
    elif isinstance(shard, Sequence) and len(shard) == 2:
        index, count = int(shard[0]), int(shard[1])
    else:
        raise ValueError(f"shard must look like 'i/n' (e.g. shard=0/4), got {shard!r}")
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: need 0 <= i < n (shards of 4 are 0/4 .. 3/4)")
    return index, count


def format_shard(index: int, count: int) -> str:
    return f"{index}/{count}"


def shard_dirname(shard: Any) -> str:
    index, count = parse_shard(shard)
    return f"shard_{index}_of_{count}"


def shard_of_pairs(pairs: Sequence[tuple[int, int]], count: int) -> dict[tuple[int, int], int]:
    """``{(task, trial): shard}``: round-robin over the sorted distinct pairs."""
    return {pair: k % count for k, pair in enumerate(sorted({(int(t), int(i)) for t, i in pairs}))}


def select_shard(jobs: Sequence[Any], shard: Any) -> tuple[list[Any], dict]:
    """The jobs (``rsd.eval.work_list.Job``) of shard ``i/n``, in work-list order, and the shard's record."""
    index, count = parse_shard(shard)
    owner = shard_of_pairs([(j.task_id, j.trial) for j in jobs], count)
    mine = [j for j in jobs if owner[(j.task_id, j.trial)] == index]
    info = {
        "shard": format_shard(index, count), "index": index, "count": count,
        "suite": jobs[0].suite if jobs else None,
        "jobs": len(mine), "total_jobs": len(jobs),
        # the whole work list, in order: merge checks the shards against it and names what is missing
        "work_list": [[j.task_id, j.trial, j.mode] for j in jobs],
    }
    return mine, info


def write_shard_file(out_dir: str | Path, info: dict) -> Path:
    """``<out_dir>/shard.json``; refuses a folder that holds another shard of another split."""
    path = Path(out_dir) / SHARD_FILE
    if path.exists():
        old = json.loads(path.read_text())
        if (old.get("shard"), old.get("work_list")) != (info["shard"], info["work_list"]):
            raise ValueError(f"{out_dir} holds shard {old.get('shard')} of another work list; "
                             f"use another out_dir for shard {info['shard']}")
    path.write_text(json.dumps(info) + "\n")
    return path


def read_shard_file(out_dir: str | Path) -> dict | None:
    path = Path(out_dir) / SHARD_FILE
    return json.loads(path.read_text()) if path.is_file() else None
