"""One progress bar for the package's long loops (collection, cache building, evaluation)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 enabled: bool = True, unit: str = "it") -> Any:
    """A tqdm bar over ``iterable`` (or a manual one when None); when disabled, the iterable itself or None.

    Refreshes at most once a second, so logs of long runs stay readable when redirected to a file.
    """
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=1.0)
