"""Loading torch files without running code from them.

``torch.load(weights_only=False)`` unpickles arbitrary objects, so a crafted checkpoint, cache sidecar or
"found" file executes code the moment it is read. Every loader of this package goes through
:func:`load_torch_file`: tensors, containers and the few plain classes that the project's own files hold
(Lightning's hyper-parameter dict, OmegaConf containers) load safely; anything else is refused with a
message naming the explicit opt-in, and only an opted-in call unpickles fully.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


class UntrustedFileError(pickle.UnpicklingError):
    """A file needs full unpickling (it holds Python objects beyond tensors) and the caller did not opt in."""


def _project_safe_globals() -> list[Any]:
    """Classes that files written by this project (and Lightning checkpoints of its modules) contain."""
    out: list[Any] = []
    try:
        from lightning.fabric.utilities.data import AttributeDict

        out.append(AttributeDict)
    except ImportError:  # pragma: no cover
        pass
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf.nodes import AnyNode

        out += [DictConfig, ListConfig, ContainerMetadata, Metadata, AnyNode]
    except ImportError:  # pragma: no cover
        pass
    import collections
    import typing

    out += [collections.defaultdict, dict, list, int, typing.Any]
    return out


def load_torch_file(path: str | os.PathLike | bytes, map_location: str | torch.device = "cpu", *,
                    trust: bool = False, opt_in: str = "trust=true", what: str = "file") -> Any:
    """``torch.load`` with ``weights_only=True`` (plus the project's allow-list).

    A file that needs full unpickling raises :class:`UntrustedFileError` naming ``opt_in`` (the config
    flag or CLI option that sets ``trust``); with ``trust=True`` it is loaded fully, with a warning.
    Other errors (missing, truncated, not a torch file) propagate unchanged for the caller to explain.
    """
    data = path if isinstance(path, bytes) else Path(path).read_bytes()
    name = "<bytes>" if isinstance(path, bytes) else str(path)
    try:
        with torch.serialization.safe_globals(_project_safe_globals()):
            return torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"GLOBAL (\S+) was not an allowed global", str(err))
        if found is None:  # not a forbidden class: garbage or a truncated file, for the caller to explain
            raise
        if not trust:
            raise UntrustedFileError(
                f"{what} {name} holds Python objects beyond tensors ({found.group(1)}); loading it would run "
                f"code stored in the file. If you trust where it came from, load it with {opt_in}.") from err
    log.warning("%s %s: loading with full unpickling (%s); only do this for files you trust", what, name, opt_in)
    return torch.load(io.BytesIO(data), map_location=map_location, weights_only=False)
