"""Policy specs -> policies, in every worker process.

Worker processes build their own policy from a *policy spec*, a plain picklable dict::

    {"factory": "engine", ...options}      # a registered name (see FACTORIES)
    {"factory": "my.module.make_policy", ...options}   # or any importable ``f(spec: dict) -> ChunkPolicy``

so the models are loaded once per worker process and never pickled.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from rsd.policies.base import ChunkPolicy
from rsd.policies.harness import ExpertPolicy, NoopPolicy, ReplayPolicy


def _noop(spec: Mapping[str, Any]) -> ChunkPolicy:
    return NoopPolicy(chunk_len=spec.get("chunk_len", 8))


def _replay(spec: Mapping[str, Any]) -> ChunkPolicy:
    return ReplayPolicy(spec["actions"], chunk_len=spec.get("chunk_len", 8))


def _expert(spec: Mapping[str, Any]) -> ChunkPolicy:
    """``expert_chunk_len`` (default 1 = closed loop; the generic ``chunk_len`` is the engine's) and any
    ``ExpertConfig`` field (gains, geometry) from the spec; other keys are ignored."""
    import dataclasses

    from rsd.envs.expert import ExpertConfig

    names = {f.name for f in dataclasses.fields(ExpertConfig)}
    return ExpertPolicy(chunk_len=spec.get("expert_chunk_len", 1),
                        **{k: v for k, v in spec.items() if k in names})


FACTORIES: dict[str, Callable[[Mapping[str, Any]], ChunkPolicy]] = {
    "noop": _noop,
    "replay": _replay,
    "expert": _expert,
    "engine": lambda spec: _engine(spec),
    "vla_llm": lambda spec: _vla_llm(spec),
}


def _vla_llm(spec: Mapping[str, Any]) -> ChunkPolicy:
    from rsd.policies.vla_llm_policy import build_vla_llm_policy

    return build_vla_llm_policy(spec)


def _engine(spec: Mapping[str, Any]) -> ChunkPolicy:
    # imported here: the engine policy pulls in torch, which the evaluation's parent process never needs
    from rsd.policies.engine_policy import build_engine_policy

    return build_engine_policy(spec)


def import_object(path: str) -> Any:
    """``"pkg.module:attr"`` or ``"pkg.module.attr"`` -> the object."""
    if ":" in path:
        module, attr = path.split(":", 1)
    else:
        module, _, attr = path.rpartition(".")
    if not module:
        raise ValueError(f"not an import path: {path!r}")
    obj = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def build_policy(spec: Mapping[str, Any]) -> ChunkPolicy:
    """Build the policy a spec names (called once in every worker process)."""
    factory_name = spec.get("factory")
    if not factory_name:
        raise ValueError(f"policy spec has no 'factory': {dict(spec)}")
    factory = FACTORIES.get(factory_name) or import_object(factory_name)
    policy = factory(spec)
    missing = [m for m in ("reset", "act") if not callable(getattr(policy, m, None))]
    if missing:
        raise TypeError(f"policy from {factory_name!r} lacks {missing}")
    return policy


def resolve_policy_spec(spec: Mapping[str, Any]) -> dict:
    """Resolve moving references (``ckpt: best``) to concrete paths once, in the main process.

    The result is what workers receive and what the output folder records, so a resumed run checks
    that it continues with the same checkpoints.
    """
    spec = dict(spec)
    if spec.get("factory") == "engine":
        from rsd.policies.engine_policy import resolve_engine_spec

        return resolve_engine_spec(spec)
    return spec


def spec_identity(spec: Mapping[str, Any], ignore: Sequence[str] = ("device", "accelerate", "adaptive", "trust_checkpoints")) -> dict:
    """The parts of a spec that decide the results (what a resumed run must match; ``accelerate`` gives
    the same tokens, like ``device`` it changes only the timings)."""
    return {k: v for k, v in spec.items() if k not in ignore}
