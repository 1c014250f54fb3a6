"""The JSONL episode log: one record a line, appended and fsynced by the main process; resume reads it."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from rsd.eval.work_list import record_key
from rsd.utils.json_safe import clean_json, json_default

log = logging.getLogger(__name__)

EPISODES_FILE = "episodes.jsonl"


class EpisodeLog:
    """Append-only JSONL file of episode records (the only writer is the main process)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def read(self) -> tuple[list[dict], int]:
        """``(records, number of unreadable lines)``; a truncated last line counts as unreadable."""
        if not self.path.exists():
            return [], 0
        records, bad = [], 0
        with self.path.open("r", encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    record_key(rec)
                    records.append(rec)
                except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                    bad += 1
                    log.warning("%s:%d: unreadable record dropped (interrupted write?)", self.path, lineno)
        return records, bad

    def rewrite(self, records: Sequence[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(clean_json(rec), default=json_default) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def append(self, rec: dict) -> None:
        line = json.dumps(clean_json(rec), default=json_default) + "\n"
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def load_records(path: str | Path) -> list[dict]:
    """The episode records of a JSONL file (or of ``<dir>/episodes.jsonl``); last record per key wins."""
    path = Path(path)
    if path.is_dir():
        path = path / EPISODES_FILE
    records, _ = EpisodeLog(path).read()
    return list({record_key(r): r for r in records}.values())
