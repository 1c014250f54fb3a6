"""Policy specs -> policies, in every worker process.

Worker processes build their own policy from a *policy spec*, a plain picklable dict::

    {"factory": "engine", ...options}      # a registered name (see FACTORIES)
    {"factory": "my.module.make_policy", ...options}   # or any importable ``f(spec: dict) -> ChunkPolicy``
                                                        # (with ``f.training_data(spec)``, see Factory)

so the models are loaded once per worker process and never pickled.

Every registered policy is a unit: a :class:`Factory` here (build / training data / resolve / the options it
honours / their checks) and a config group file ``conf/policy/<name>.yaml`` (``python evaluate.py
policy=<name>``). The entry point checks the spec (:func:`check_policy_spec`) before any file is loaded; an
option a policy cannot honour is an error, never dropped.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rsd import PROJECT_ROOT
from rsd.envs.expert import ExpertConfig
from rsd.policies.base import (
    ACCELERATE_MODES,
    ACCEPTANCE_RULES,
    ENGINE_OPTION_KEYS,
    EXIT_RULES,
    NUM_LAYERS,
    ChunkPolicy,
)
from rsd.policies.harness import ExpertPolicy, NoopPolicy, ReplayPolicy
from rsd.utils.config import CONFIG_DIR
from rsd.utils.errors import ConfigError

# The learned policies' modules (torch, lightning) are imported when a worker builds one, not here: the entry
# points check a policy spec (check_policy_spec) before anything heavy loads.

#: Keys every policy spec may carry from the evaluation's own settings (``suite``, ``ckpt``, ``device``, ...);
#: a policy that has no use for them ignores them.
CONTEXT_KEYS = frozenset({"factory", "suite", "ckpt", "log_dir", "device"})
#: The files and models of a decoding policy (conf/policy/engine.yaml).
MODEL_KEYS = frozenset({"main_ckpt", "tokenizer", "backbone", "trust_checkpoints", "allow_other_suite"})


@dataclass(frozen=True)
class Factory:
    """A registered policy: how a worker builds it, how the main process resolves its spec (``ckpt: best`` ->
    paths) and what it was trained on (every factory says; the held-out check reads it before any episode).

    ``options``: the spec keys it honours besides :data:`CONTEXT_KEYS`; any other key that is set is refused
    (:func:`check_policy_spec`), so no option is dropped silently. ``check(spec)``: the values' checks, run in
    the main process before any file is loaded (raise :class:`rsd.utils.errors.ConfigError`)."""

    build: Callable[[Mapping[str, Any]], ChunkPolicy]
    training_data: Callable[[Mapping[str, Any]], dict[str, Any]]
    resolve: Callable[[Mapping[str, Any]], dict] | None = None
    options: frozenset[str] = frozenset()
    check: Callable[[Mapping[str, Any]], None] | None = None
    about: str = ""


def _lazy(path: str) -> Callable:
    """``"module:function"`` imported at the first call (keeps this module free of torch)."""

    def call(*args: Any, **kwargs: Any) -> Any:
        return import_object(path)(*args, **kwargs)

    call.__name__ = call.__qualname__ = path.rsplit(":", 1)[-1]
    call.__doc__ = f"``{path}`` (imported when called)"
    return call


def _nothing_learned(why: str) -> Callable[[Mapping[str, Any]], dict[str, Any]]:
    def training_data(spec: Mapping[str, Any]) -> dict[str, Any]:
        from rsd.policies.lineage import no_training_data  # lazy: lineage loads torch (models.checkpoint)

        return no_training_data(why)

    return training_data


# ------------------------------------------------------------------------------------------------ checks
def _is_set(value: Any) -> bool:
    return value is not None


def _int(spec: Mapping[str, Any], key: str, low: int | None = None, high: int | None = None,
         nullable: bool = True) -> None:
    value = spec.get(key)
    if value is None and nullable:
        return
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and (low is None or value >= low) and (high is None or value <= high)
    if not ok:
        bounds = f"{low}..{high}" if high is not None else f">= {low}"
        raise ConfigError(f"policy.{key}={value!r}: must be an integer {bounds}" + (" or null" if nullable else ""))


def _number(spec: Mapping[str, Any], key: str, positive: bool = True, high: float | None = None) -> None:
    value = spec.get(key)
    if value is None:
        return
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(float(value))
    ok = ok and (float(value) > 0 if positive else float(value) >= 0) and (high is None or float(value) <= high)
    if not ok:
        what = "> 0" if positive else ">= 0"
        raise ConfigError(f"policy.{key}={value!r}: must be a finite number {what}"
                          + (f" and <= {high}" if high is not None else "") + " or null")


def _bool(spec: Mapping[str, Any], key: str) -> None:
    value = spec.get(key)
    if value is not None and not isinstance(value, bool):
        raise ConfigError(f"policy.{key}={value!r}: must be true or false")


def check_engine_options(spec: Mapping[str, Any]) -> None:
    """The decoding options (:data:`ENGINE_OPTION_KEYS`) and ``chunk_len`` of a decoding policy, checked without
    loading a model (the engine re-checks against the models when the policy is built, before any episode)."""
    acceptance = spec.get("acceptance", "strict")
    if acceptance not in ACCEPTANCE_RULES:
        raise ConfigError(f"policy.acceptance={acceptance!r}: must be one of {'|'.join(ACCEPTANCE_RULES)}")
    _int(spec, "delta", 0)
    _number(spec, "tau", positive=False, high=1.0)
    _number(spec, "epsilon")
    if acceptance == "epsilon" and spec.get("epsilon") is None:
        raise ConfigError("policy.acceptance=epsilon needs policy.epsilon=<bound> (normalized action units, > 0)")
    if acceptance == "relaxed" and spec.get("delta") is None and spec.get("tau") is None:
        raise ConfigError("policy.acceptance=relaxed needs policy.delta (levels) and/or policy.tau (a fraction)")
    _int(spec, "depth", 1, NUM_LAYERS)
    _int(spec, "baseline_depth", 1, NUM_LAYERS)
    early_exit = spec.get("early_exit")
    if early_exit in ("", "none", False):
        early_exit = None
    if early_exit is not None and early_exit not in EXIT_RULES:
        raise ConfigError(f"policy.early_exit={early_exit!r}: must be null or one of {'|'.join(EXIT_RULES)}")
    _number(spec, "exit_epsilon")
    if early_exit in ("bound", "both") and spec.get("epsilon") is None and spec.get("exit_epsilon") is None:
        raise ConfigError(f"policy.early_exit={early_exit} needs policy.exit_epsilon (or policy.epsilon)")
    _number(spec, "chance_entropy", high=1.0)
    tail = spec.get("tail_bounds")
    if tail is not None and (isinstance(tail, str | bytes) or not isinstance(tail, Sequence) or not all(
            isinstance(x, int | float) and not isinstance(x, bool) and float(x) >= 0 for x in tail)):
        raise ConfigError(f"policy.tail_bounds={tail!r}: must be null or a list of {NUM_LAYERS + 1} numbers >= 0")
    _int(spec, "draft_layers", 1, NUM_LAYERS)
    accelerate = spec.get("accelerate")
    if accelerate is not None and accelerate not in ACCELERATE_MODES:
        raise ConfigError(f"policy.accelerate={accelerate!r}: must be one of {'|'.join(ACCELERATE_MODES)}")
    if spec.get("adaptive") != "auto":
        _bool(spec, "adaptive")
    if spec.get("adaptive") is True and acceptance != "strict":
        raise ConfigError(f"policy.adaptive=true needs policy.acceptance=strict, got {acceptance!r} "
                          "(policy.adaptive=auto: on for strict only)")
    _int(spec, "chunk_len", 1)
    _bool(spec, "trust_checkpoints")


def _file_exists(path: Any) -> bool:
    p = Path(str(path)).expanduser()
    return p.is_file() or (not p.is_absolute() and (PROJECT_ROOT / p).is_file())


def _check_engine(spec: Mapping[str, Any]) -> None:
    check_engine_options(spec)
    ckpt = spec.get("ckpt")
    if ckpt is not None and str(ckpt) != "best" and not _file_exists(ckpt):
        raise FileNotFoundError(f"ckpt={ckpt}: no such draft checkpoint (use ckpt=best, or ckpt=<path to "
                                "best_draft_with_projection.pt>)")
    for key in ("main_ckpt", "tokenizer"):
        if spec.get(key) and not _file_exists(spec[key]):
            raise FileNotFoundError(f"policy.{key}={spec[key]}: no such file (set it to an existing file, or null "
                                    "to take the one the draft's artifact chain names)")


def _check_vla_llm(spec: Mapping[str, Any]) -> None:
    check_engine_options(spec)
    what = {"ckpt": "ckpt=<draft checkpoint trained on the VLA's features>",
            "main_ckpt": "policy.main_ckpt=<run>/vla_llm_main.pt (python train.py experiment=main_vla_llm)",
            "tokenizer": "policy.tokenizer=<rfsq.pt>"}
    for key, fix in what.items():
        value = spec.get(key)
        if not value or str(value) == "best":
            raise ConfigError(f"policy=vla_llm needs {fix}; got {'ckpt' if key == 'ckpt' else 'policy.' + key}="
                              f"{value!r} (ckpt=best finds engine drafts only)")
        if not _file_exists(value):
            raise FileNotFoundError(f"{'ckpt' if key == 'ckpt' else 'policy.' + key}={value}: no such file "
                                    f"(pass {fix})")


def _check_replay(spec: Mapping[str, Any]) -> None:
    _int(spec, "chunk_len", 1)
    actions = spec.get("actions")
    if actions is None:
        raise ConfigError("policy=replay needs policy.actions=<.npy/.npz file of [T, 7] actions> "
                          "(or {task_id: [T, 7]} in a spec)")
    if isinstance(actions, str) and not _file_exists(actions):
        raise FileNotFoundError(f"policy.actions={actions}: no such file")


def _check_expert(spec: Mapping[str, Any]) -> None:
    _int(spec, "expert_chunk_len", 1)
    for f in dataclasses.fields(ExpertConfig):
        value = spec.get(f.name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"policy.{f.name}={value!r}: must be a number (rsd.envs.expert.ExpertConfig)")


def _check_noop(spec: Mapping[str, Any]) -> None:
    _int(spec, "chunk_len", 1)


# ------------------------------------------------------------------------------------------------ factories
def _noop(spec: Mapping[str, Any]) -> ChunkPolicy:
    return NoopPolicy(chunk_len=spec.get("chunk_len") or 8)


def _replay(spec: Mapping[str, Any]) -> ChunkPolicy:
    return ReplayPolicy(spec["actions"], chunk_len=spec.get("chunk_len") or 8)


EXPERT_KEYS = frozenset(f.name for f in dataclasses.fields(ExpertConfig))


def _expert(spec: Mapping[str, Any]) -> ChunkPolicy:
    """``expert_chunk_len`` (default 1 = closed loop) and any ``ExpertConfig`` field (gains, geometry) from the
    spec (every other key is refused by :func:`check_policy_spec`)."""
    return ExpertPolicy(chunk_len=spec.get("expert_chunk_len") or 1,
                        **{k: v for k, v in spec.items() if k in EXPERT_KEYS and v is not None})


def vla_llm_training_data(spec: Mapping[str, Any]) -> dict[str, Any]:
    from rsd.policies.lineage import training_data_of  # lazy: lineage loads torch (models.checkpoint)

    return training_data_of({"draft": spec.get("ckpt"), "vla_llm main model": spec.get("main_ckpt"),
                             "tokenizer": spec.get("tokenizer")})


_DECODING = frozenset(ENGINE_OPTION_KEYS) | {"chunk_len"}

FACTORIES: dict[str, Factory] = {
    "noop": Factory(_noop, _nothing_learned("the no-op policy learned nothing"), options=frozenset({"chunk_len"}),
                    check=_check_noop, about="holds still (a harness check; no decoder)"),
    "replay": Factory(_replay, _nothing_learned("replays the actions it is given"),
                      options=frozenset({"actions", "chunk_len"}), check=_check_replay,
                      about="replays given actions (a harness check; no decoder)"),
    "expert": Factory(_expert, _nothing_learned("the scripted expert learned nothing"),
                      options=EXPERT_KEYS | {"expert_chunk_len"}, check=_check_expert,
                      about="the scripted privileged-state expert (no decoder)"),
    "engine": Factory(_lazy("rsd.policies.engine_policy:build_engine_policy"),
                      _lazy("rsd.policies.engine_policy:engine_training_data"),
                      _lazy("rsd.policies.engine_policy:resolve_engine_spec"),
                      options=_DECODING | MODEL_KEYS, check=_check_engine,
                      about="backbone -> speculative engine -> actions"),
    "vla_llm": Factory(_lazy("rsd.policies.vla_llm_policy:build_vla_llm_policy"), vla_llm_training_data,
                       options=_DECODING | {"main_ckpt", "tokenizer", "trust_checkpoints"}, check=_check_vla_llm,
                       about="the engine with the VLA's own language model as the main model"),
}


@functools.cache
def engine_group_defaults() -> dict[str, Any]:
    """The literal values of conf/policy/engine.yaml (interpolations left out)."""
    node = OmegaConf.load(Path(CONFIG_DIR) / "policy" / "engine.yaml")
    raw = OmegaConf.to_container(node, resolve=False)
    return {k: v for k, v in raw.items() if not (isinstance(v, str) and "${" in v)}


def _engine_group_default(spec: Mapping[str, Any], key: str) -> bool:
    """Is ``spec[key]`` the engine group's default, in a spec that is the whole engine group with another factory
    (``policy.factory=noop`` on top of the default ``policy: engine``)? Such values were not given by the user."""
    defaults = engine_group_defaults()
    return key in defaults and set(defaults) <= set(spec) and spec[key] == defaults[key]


def check_policy_spec(spec: Mapping[str, Any]) -> None:
    """Check a policy spec before anything loads: a known factory (or an importable one), no option the policy
    would drop, values in range. Raises :class:`ConfigError` / ``FileNotFoundError`` naming the key and the fix.

    A registered policy refuses every key it does not honour (:attr:`Factory.options`) that is set; an
    import-path factory is checked the same way when it declares ``options`` (an iterable of keys)."""
    name = spec.get("factory")
    if not name:
        raise ConfigError(f"the policy spec has no factory; use policy=<name> with one of {sorted(FACTORIES)}")
    factory = FACTORIES.get(str(name))
    if factory is None:
        if "." not in str(name) and ":" not in str(name):
            raise ConfigError(f"policy.factory={name!r}: not a registered policy ({'|'.join(sorted(FACTORIES))}) "
                              "nor an import path module:function")
        try:
            obj = import_object(str(name))
        except (ImportError, AttributeError, ValueError) as exc:
            raise ConfigError(f"policy.factory={name!r}: cannot import it ({type(exc).__name__}: {exc})") from exc
        if not callable(obj):
            raise ConfigError(f"policy.factory={name!r} is not callable")
        declared = getattr(obj, "options", None)
        if declared is None:
            return
        options, check, label = frozenset(declared), getattr(obj, "check", None), str(name)
    else:
        options, check, label = factory.options, factory.check, str(name)
    refused = [k for k in spec if k not in CONTEXT_KEYS and k not in options and _is_set(spec[k])
               and not _engine_group_default(spec, k)]
    if refused:
        key = refused[0]
        why = ("it has no speculative decoder" if key in _DECODING or key in MODEL_KEYS
               else "it does not know this option")
        takes = ", ".join(sorted(options)) or "no options"
        raise ConfigError(f"policy={label} does not honour policy.{key}={spec[key]!r} ({why}; it takes: {takes}). "
                          f"Remove it" + (", or use policy=engine" if key in _DECODING else "")
                          + (f" (also refused: {', '.join(refused[1:])})" if len(refused) > 1 else ""))
    if callable(check):
        check(spec)


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
