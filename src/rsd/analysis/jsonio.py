"""Strict JSON for result files: ``null`` where a number is undefined, never ``NaN`` / ``Infinity``.

``json.dumps`` writes ``NaN`` by default, which is not JSON (other parsers refuse it). Every result file the
analysis writes goes through :func:`dumps`, which replaces non-finite floats by ``None`` first and then
serialises with ``allow_nan=False``, so a non-finite number that slipped through fails loudly instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf), at any depth of dicts / lists / tuples, as None.

    Numpy scalars become Python numbers and paths strings, so the result serialises with the plain encoder."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", None) == 0:
        value = value.item()  # numpy / torch scalars
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def dumps(value: Any, indent: int | None = 2) -> str:
    """Strict JSON text of ``value``: non-finite floats as ``null``, other objects (dates, ...) as strings."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False, default=str)


def write(path: str | Path, value: Any, indent: int | None = 2) -> Path:
    """Write :func:`dumps` of ``value`` (with a final newline) to ``path``; returns the path."""
    path = Path(path)
    path.write_text(dumps(value, indent) + "\n")
    return path
