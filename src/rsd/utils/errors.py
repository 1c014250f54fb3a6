"""Errors a user can read: what the entry points (``evaluate.py``, ``train.py``, ``python -m rsd.prepare``) print.

A bad configuration value or a missing / corrupt file is reported as ONE line on stderr that names the value and
the fix, with a non-zero exit (2: the configuration, 1: the project's other errors), instead of Hydra's "Error
executing job" banner and a traceback. ``HYDRA_FULL_ERROR=1`` re-raises, so the full traceback still shows.

- :class:`ConfigError`: raised by the entry points' checks, which run before any file is loaded;
- :func:`is_user_error`: the project's own errors (missing checkpoint, broken artifact, training states in the
  evaluation, stale cache, pipeline step that cannot run, ...) and ``FileNotFoundError`` / ``ValueError``;
- :func:`report_errors`: the context manager the entry points run in;
- :func:`check_composition`: composes the entry config once before Hydra does, so an unknown config group
  option (``experiment=nope``) or an unknown key is one line too.

This module imports nothing heavy (no torch): the checks must fire before the models' stack loads.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

#: The project's error classes, by module (looked up only in modules already imported: an error of a module
#: that was never imported cannot have been raised).
PROJECT_ERRORS = {
    "rsd.models.checkpoint": ("DraftCheckpointError",),
    "rsd.models.main_decoder": ("MainDecoderCheckpointError",),
    "rsd.models.vla_llm_main": ("VLALLMCheckpointError",),
    "rsd.tokenizer.rfsq": ("TokenizerCheckpointError",),
    "rsd.utils.artifacts": ("ArtifactError",),
    "rsd.utils.serialization": ("UntrustedFileError",),
    "rsd.data.heldout": ("TrainStatesError",),
    "rsd.data.cache": ("CacheError",),
    "rsd.data.action_chunks": ("DemosNotFoundError",),
    "rsd.data.libero_hdf5": ("DemoSchemaError",),
    "rsd.prepare.pipeline": ("PipelineError",),
    "rsd.eval.merge": ("MergeError",),
    "rsd.eval.workers": ("PolicyBuildError",),
    "rsd.envs.libero_setup": ("LiberoSetupError",),
    "rsd.models.backbones.base": ("BackboneError",),
}

#: How ``rsd.eval.runner`` reports a policy that could not be built in a worker (a ``RuntimeError`` whose first
#: line is this prefix; the rest is the worker's traceback).
POLICY_BUILD_PREFIX = "building the policy "

FULL_ERROR_ENV = "HYDRA_FULL_ERROR"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key, the value and the fix."""


def full_errors() -> bool:
    return os.environ.get(FULL_ERROR_ENV) == "1"


def _project_error_types() -> tuple[type, ...]:
    types: list[type] = [FileNotFoundError, ValueError, ConfigError]
    for module, names in PROJECT_ERRORS.items():
        mod = sys.modules.get(module)
        for name in names:
            cls = getattr(mod, name, None) if mod is not None else None
            if isinstance(cls, type):
                types.append(cls)
    return tuple(types)


def _hydra_error_types() -> tuple[type, ...]:
    types: list[type] = []
    try:
        from hydra.errors import HydraException

        types.append(HydraException)
    except ImportError:  # pragma: no cover - hydra is a dependency
        pass
    try:
        from omegaconf.errors import OmegaConfBaseException

        types.append(OmegaConfBaseException)
    except ImportError:  # pragma: no cover
        pass
    return tuple(types)


def is_config_error(exc: BaseException) -> bool:
    return isinstance(exc, (ConfigError, *_hydra_error_types()))


def is_user_error(exc: BaseException) -> bool:
    """An error the user can act on from its message alone (see the module docstring)."""
    if is_config_error(exc) or isinstance(exc, _project_error_types()):
        return True
    return isinstance(exc, RuntimeError) and str(exc).startswith(POLICY_BUILD_PREFIX)


def one_line(exc: BaseException) -> str:
    """The error's message as one line (a policy build failure: its first line, without the worker's traceback)."""
    text = str(exc).strip()
    if isinstance(exc, RuntimeError) and text.startswith(POLICY_BUILD_PREFIX):
        text = text.splitlines()[0]
    text = text.split("Config search path:")[0]  # Hydra's "could not find": the options are enough
    if "Available options in" in text:
        head, _, options = text.partition("Available options in")
        group, _, names = options.partition(":")
        text = f"{head.strip()} (available options in{group}: {', '.join(n.strip() for n in names.split())})"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    cause = exc.__cause__
    if cause is not None and is_config_error(exc) and str(cause).strip():
        first = str(cause).strip().splitlines()[0].strip()
        if first not in lines:
            lines.append(first)
    message = "; ".join(lines) if lines else type(exc).__name__
    if isinstance(exc, FileNotFoundError | KeyError) or not lines:
        message = f"{type(exc).__name__}: {message}"
    return message


def exit_code(exc: BaseException) -> int:
    return 2 if is_config_error(exc) else 1


def report(program: str, exc: BaseException) -> None:
    print(f"{program}: error: {one_line(exc)} (full traceback: {FULL_ERROR_ENV}=1)", file=sys.stderr, flush=True)


@contextmanager
def report_errors(program: str) -> Iterator[None]:
    """Run an entry point: a user error becomes one line on stderr and ``sys.exit(1 or 2)``; anything else (a bug)
    and every error under ``HYDRA_FULL_ERROR=1`` propagates with its traceback."""
    try:
        yield
    except Exception as exc:
        if full_errors() or not is_user_error(exc):
            raise
        report(program, exc)
        sys.exit(exit_code(exc))


def hydra_overrides(argv: Sequence[str]) -> list[str] | None:
    """The plain overrides of a Hydra command line, or None when it has flags (``-m``, ``--cfg``, ...) or
    sweeps: those are left to Hydra."""
    args = list(argv)
    if any(a.startswith("-") for a in args):
        return None
    if any("," in a.split("=", 1)[-1] and not a.split("=", 1)[-1].lstrip().startswith(("[", "{", "'", '"'))
           for a in args):
        return None  # a sweep (a=1,2) without -m is Hydra's own error
    return args


def check_composition(config_name: str, argv: Sequence[str], check: Callable[[Any], None] | None = None,
                      config_dir: str | None = None) -> None:
    """Compose ``config_name`` with the command line's overrides and run ``check(cfg)`` on it, before Hydra starts
    the job (so before its run folder or any file exists). Raises what composition or ``check`` raise; does
    nothing for command lines with flags or sweeps (Hydra then composes, and the job checks)."""
    overrides = hydra_overrides(argv)
    if overrides is None:
        return
    # lazy, like hydra: every entry point imports rsd.utils.errors first; it has no module-level dependency
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rsd.utils.config import CONFIG_DIR  # lazy: see above (omegaconf, resolvers)

    if GlobalHydra.instance().is_initialized():
        GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=config_dir or CONFIG_DIR, version_base="1.3"):
        cfg = compose(config_name=config_name, overrides=overrides)
        if check is not None:
            check(cfg)
