"""Policy specs -> policies, in every worker process.

Worker processes build their own policy from a *policy spec*, a plain picklable dict::

    {"factory": "engine", ...options}      # a registered name (see FACTORIES)
    {"factory": "my.module.make_policy", ...options}   # or any importable ``f(spec: dict) -> ChunkPolicy``
                                                        # (with ``f.training_data(spec)``, see Factory)

so the models are loaded once per worker process and never pickled.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rsd.envs.expert import ExpertConfig
from rsd.policies.base import ChunkPolicy
from rsd.policies.engine_policy import build_engine_policy, engine_training_data, resolve_engine_spec
from rsd.policies.harness import ExpertPolicy, NoopPolicy, ReplayPolicy
from rsd.policies.lineage import no_training_data, training_data_of
from rsd.policies.vla_llm_policy import build_vla_llm_policy


@dataclass(frozen=True)
class Factory:
    """A registered policy: how a worker builds it, how the main process resolves its spec (``ckpt: best`` ->
    paths) and what it was trained on (every factory says; the held-out check reads it before any episode)."""

    build: Callable[[Mapping[str, Any]], ChunkPolicy]
    training_data: Callable[[Mapping[str, Any]], dict[str, Any]]
    resolve: Callable[[Mapping[str, Any]], dict] | None = None


def _noop(spec: Mapping[str, Any]) -> ChunkPolicy:
    return NoopPolicy(chunk_len=spec.get("chunk_len", 8))


def _replay(spec: Mapping[str, Any]) -> ChunkPolicy:
    return ReplayPolicy(spec["actions"], chunk_len=spec.get("chunk_len", 8))


def _expert(spec: Mapping[str, Any]) -> ChunkPolicy:
    """``expert_chunk_len`` (default 1 = closed loop; the generic ``chunk_len`` is the engine's) and any
    ``ExpertConfig`` field (gains, geometry) from the spec; other keys are ignored."""
    names = {f.name for f in dataclasses.fields(ExpertConfig)}
    return ExpertPolicy(chunk_len=spec.get("expert_chunk_len", 1),
                        **{k: v for k, v in spec.items() if k in names})


def vla_llm_training_data(spec: Mapping[str, Any]) -> dict[str, Any]:
    return training_data_of({"draft": spec.get("ckpt"), "vla_llm main model": spec.get("main_ckpt"),
                             "tokenizer": spec.get("tokenizer")})


FACTORIES: dict[str, Factory] = {
    "noop": Factory(_noop, lambda spec: no_training_data("the no-op policy learned nothing")),
    "replay": Factory(_replay, lambda spec: no_training_data("replays the actions it is given")),
    "expert": Factory(_expert, lambda spec: no_training_data("the scripted expert learned nothing")),
    "engine": Factory(build_engine_policy, engine_training_data, resolve_engine_spec),
    "vla_llm": Factory(build_vla_llm_policy, vla_llm_training_data),
}


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
    factory = FACTORIES[factory_name].build if factory_name in FACTORIES else import_object(factory_name)
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
    factory = FACTORIES.get(spec.get("factory"))
    return factory.resolve(spec) if factory and factory.resolve else spec


def policy_training_data(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What a resolved spec's policy was trained on, for every factory (see :class:`Factory`).

    An import-path factory declares it with a ``training_data(spec)`` attribute on the function; one that does
    not is untraceable, and an evaluation of it is not called held out unless the user allows it."""
    name = spec.get("factory")
    if name in FACTORIES:
        return FACTORIES[name].training_data(spec)
    declared = getattr(import_object(name), "training_data", None)
    if callable(declared):
        return declared(spec)
    return {"learned": True, "data": [], "untraceable": [
        f"policy factory {name!r} does not declare its training data (give it a `training_data(spec)` attribute "
        "returning rsd.policies.lineage.training_data_of(...) or no_training_data(...))"]}


def spec_identity(spec: Mapping[str, Any], ignore: Sequence[str] = ("device", "accelerate", "adaptive", "trust_checkpoints")) -> dict:
    """The parts of a spec that decide the results (what a resumed run must match; ``accelerate`` gives
    the same tokens, like ``device`` it changes only the timings)."""
    return {k: v for k, v in spec.items() if k not in ignore}
