"""The policy interface that the LIBERO evaluation drives, and the factories that build policies.

The harness (``rsd.eval.rollout`` / ``rsd.eval.runner``) only knows :class:`ChunkPolicy`: ``reset`` at the
start of an episode, ``act`` whenever the previous action chunk has been executed. Worker processes
build their own policy from a *policy spec*, a plain picklable dict::

    {"factory": "engine", ...options}      # a registered name (see FACTORIES)
    {"factory": "my.module.make_policy", ...options}   # or any importable ``f(spec: dict) -> ChunkPolicy``

so the models are loaded once per worker process and never pickled.

Conventions of ``act``:
- ``obs`` is the raw LIBERO observation dict (images, when rendered, are upside down as LIBERO gives
  them: flipping ``[::-1, ::-1]`` and resizing is the policy's/backbone's job).
- policies that read privileged simulator state may define ``bind_env(env)``; the rollout calls it
  before every episode.
- it returns ``(actions [T, 7] in env units, stats)``; the harness executes the T steps open loop and
  binarizes the gripper. ``stats`` holds numbers about this inference (engine statistics, see
  :data:`ENGINE_STAT_KEYS`); they are summed over the episode.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

from rsd.envs.libero_env import TaskSpec

log = logging.getLogger(__name__)

MODES = ("speculative", "baseline")

#: Per-inference statistics the summary knows how to report (others are summed and kept as they are).
#: Times in milliseconds; layer counts are per chunk.
ENGINE_STAT_KEYS = (
    "backbone_ms", "draft_ms", "main_ms", "decode_ms", "engine_ms",
    "drafted_layers", "accepted_layers", "main_steps", "main_steps_saved",
)


@runtime_checkable
class ChunkPolicy(Protocol):
    """What the rollout needs from a policy."""

    #: True when the policy reads camera images (the env is then built with its renderer on).
    needs_images: bool

    def reset(self, task: TaskSpec, mode: str, trial: int) -> None:
        """Start trial ``trial`` of ``task`` (init state ``trial``); ``mode`` is ``speculative`` or
        ``baseline`` (ignored by policies without an engine). A stochastic policy should seed from
        ``(task.task_id, trial)`` so results do not depend on which worker runs the episode."""

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        """One inference: ``(actions [T, 7], stats)``."""


# --------------------------------------------------------------------------------------------------
# Simple policies (no models): smoke tests of the harness


class NoopPolicy:
    """Holds still with the gripper open: never succeeds; measures the harness itself."""

    needs_images = False

    def __init__(self, chunk_len: int = 8) -> None:
        self.chunk_len = int(chunk_len)

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        pass

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        actions = np.zeros((self.chunk_len, 7))
        actions[:, -1] = -1.0
        return actions, {}


class ReplayPolicy:
    """Replays recorded action sequences chunk by chunk (open loop).

    ``actions`` is one ``[T, 7]`` sequence for every episode, or ``{task_id: [T, 7]}`` / a ``.npy``/``.npz``
    path. After the sequence ends it holds still with the last gripper command.
    """

    needs_images = False

    def __init__(self, actions: Any, chunk_len: int = 8) -> None:
        self.chunk_len = int(chunk_len)
        self._sequences = _load_actions(actions)
        self._seq = np.zeros((0, 7))
        self._t = 0

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        seqs = self._sequences
        if isinstance(seqs, dict):
            key = task.task_id if task.task_id in seqs else str(task.task_id)
            if key not in seqs:
                raise KeyError(f"ReplayPolicy has no actions for task {task.task_id}")
            seqs = seqs[key]
        self._seq = np.asarray(seqs, dtype=np.float64).reshape(-1, 7)
        self._t = 0

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        chunk = self._seq[self._t: self._t + self.chunk_len]
        self._t += self.chunk_len
        if len(chunk) < self.chunk_len:
            hold = np.zeros((self.chunk_len - len(chunk), 7))
            hold[:, -1] = self._seq[-1, -1] if len(self._seq) else -1.0
            chunk = np.concatenate([chunk, hold]) if len(chunk) else hold
        return chunk, {}


def _load_actions(actions: Any) -> Any:
    if isinstance(actions, str):
        data = np.load(actions, allow_pickle=False)
        if isinstance(data, np.lib.npyio.NpzFile):
            return {k: data[k] for k in data.files}
        return data
    if isinstance(actions, Mapping):
        return {k: np.asarray(v, dtype=np.float64) for k, v in actions.items()}
    return np.asarray(actions, dtype=np.float64)


class ExpertPolicy:
    """Helper-1's scripted privileged-state expert (``rsd.envs.expert``) as a chunk policy.

    The expert reads ``env.sim``, so the rollout hands it the env (:meth:`bind_env`); it is built at the
    first ``act`` of an episode, i.e. after ``reset``/``set_init_state`` and the warm-up, as the expert
    expects. It is closed loop: with ``chunk_len=1`` (the default) this *is* the expert; with a longer
    chunk its current action is held for the whole chunk (open loop, degrades it).
    """

    needs_images = False

    def __init__(self, chunk_len: int = 1, **config: Any) -> None:
        self.chunk_len = int(chunk_len)
        self.config = config
        self._env = None
        self._task: TaskSpec | None = None
        self._expert = None

    def bind_env(self, env: Any) -> None:
        self._env = env

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        self._task = task
        self._expert = None

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        if self._expert is None:
            from rsd.envs.expert import ExpertConfig, make_expert

            if self._env is None or self._task is None:
                raise RuntimeError("ExpertPolicy needs bind_env(env) and reset(task) before act")
            self._expert = make_expert(self._env, self._task, ExpertConfig(**self.config))
        action = np.asarray(self._expert.act(obs), dtype=np.float64).reshape(1, 7)
        return np.repeat(action, self.chunk_len, axis=0), {}


# --------------------------------------------------------------------------------------------------
# The real policy: backbone -> speculative engine -> RFSQ decode


def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def _draft_identity(draft_path: str) -> dict:
    """The cache identity a draft checkpoint records (``{}`` for original-project files)."""
    from rsd.models.checkpoint import load_draft_checkpoint

    _, info = load_draft_checkpoint(draft_path)
    return dict(info.get("cache_manifest") or {})


def find_main_decoder(log_dir: str | None, identity: Mapping[str, Any]) -> str:
    """The newest exported main decoder trained on the same features and tokenizer as the draft.

    Looks at ``{log_dir}/main_head/runs/*/main_decoder.pt``, ``{log_dir}/main_head/multiruns/*/*/`` and
    ``data/models/main_head_*.pt``; a file matches when its recorded ``data`` has the draft's backbone id,
    tokenizer identity and suite.
    """
    from pathlib import Path

    import torch

    from rsd import PROJECT_ROOT

    root = Path(log_dir) if log_dir else PROJECT_ROOT / "logs"
    candidates = (list(root.glob("main_head/runs/*/main_decoder.pt"))
                  + list(root.glob("main_head/multiruns/*/*/main_decoder.pt"))
                  + list((PROJECT_ROOT / "data" / "models").glob("main_head_*.pt")))
    want = {k: identity.get(k) for k in ("backbone_id", "tokenizer", "suite") if identity.get(k)}
    rejected = []
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:
            data = torch.load(path, map_location="cpu", weights_only=False).get("data") or {}
        except Exception as exc:  # unreadable candidates are skipped, and named if nothing matches
            rejected.append(f"{path} (unreadable: {exc})")
            continue
        diff = {k: (data.get(k), v) for k, v in want.items() if data.get(k) != v}
        if not diff:
            return str(path)
        rejected.append(f"{path} ({', '.join(f'{k} {a!r} != {b!r}' for k, (a, b) in diff.items())})")
    raise FileNotFoundError(
        f"no main decoder matches the draft's features {want} under {root}/main_head/runs/*/main_decoder.pt or "
        f"data/models/main_head_*.pt (train one: `python train.py experiment=main_head` on the same cache), "
        f"or pass policy.main_ckpt=<path>." + (f" Candidates: {'; '.join(rejected[:5])}" if rejected else ""))


def _tokenizer_path(spec: Mapping[str, Any], identity: Mapping[str, Any]) -> str:
    from pathlib import Path

    from rsd import PROJECT_ROOT

    if spec.get("tokenizer"):
        return str(spec["tokenizer"])
    cache_dir = identity.get("cache_dir")
    if cache_dir and (Path(cache_dir) / "manifest.json").is_file():
        from rsd.data.cache import read_manifest

        path = (read_manifest(cache_dir).get("tokenizer") or {}).get("path")
        if path and Path(path).is_file():
            return str(path)
    suite = identity.get("suite") or spec.get("suite")
    return str(PROJECT_ROOT / "data" / "tokenizers" / f"rfsq_{suite}.pt")


def resolve_engine_spec(spec: Mapping[str, Any]) -> dict:
    """``ckpt=best`` and the defaults (main decoder, tokenizer) -> concrete paths, checked once."""
    from rsd.models.checkpoint import resolve_draft_checkpoint

    spec = dict(spec)
    spec["ckpt"] = str(resolve_draft_checkpoint(spec.get("ckpt") or "best", spec.get("log_dir")))
    identity = _draft_identity(spec["ckpt"])
    suite = spec.get("suite")
    if identity.get("suite") and suite and identity["suite"] != suite and not spec.get("allow_other_suite"):
        raise ValueError(f"the draft {spec['ckpt']} was trained on {identity['suite']}, not {suite} "
                         "(set +policy.allow_other_suite=true to evaluate it anyway)")
    if not spec.get("main_ckpt"):
        spec["main_ckpt"] = find_main_decoder(spec.get("log_dir"), identity)
    spec["tokenizer"] = _tokenizer_path(spec, identity)
    return spec


def _build_backbone(spec: Mapping[str, Any], identity: Mapping[str, Any]):
    """The backbone the draft's training cache was built with (``policy.backbone`` overrides it)."""
    from pathlib import Path

    from rsd.models.backbones import backbone_from_config

    if spec.get("backbone"):
        cfg = dict(spec["backbone"])
    elif identity.get("backbone_config"):
        cfg = dict(identity["backbone_config"])
    elif identity.get("cache_dir") and (Path(identity["cache_dir"]) / "manifest.json").is_file():
        from rsd.data.cache import read_manifest

        cfg = dict(read_manifest(identity["cache_dir"])["backbone"]["config"])
    else:
        raise ValueError("the draft checkpoint records no backbone (an original-project file?); pass "
                         "policy.backbone={name: ..., ...} (the config the features were computed with)")
    if not cfg.get("name"):
        cfg["name"] = identity.get("backbone_name")
    backbone = backbone_from_config(cfg)
    if identity.get("backbone_id") and backbone.backbone_id != identity["backbone_id"] and not spec.get("backbone"):
        raise ValueError(f"rebuilt backbone {backbone.backbone_id} differs from the draft's training features "
                         f"{identity['backbone_id']}")
    return backbone


class EnginePolicy:
    """Backbone -> :class:`rsd.engine.RSDInferenceEngine` (speculative or baseline) -> action chunk.

    One engine per evaluation mode shares the models: ``speculative`` uses the configured acceptance
    (``strict``: lossless, ``relaxed``: delta / tau), ``baseline`` the main model alone. The ``stats`` of
    each inference use :data:`ENGINE_STAT_KEYS` (times from the engine's timer: CUDA events on GPU).
    """

    def __init__(self, backbone: Any, draft: Any, main: Any, tokenizer: Any, device: str = "cpu",
                 acceptance: str = "strict", delta: int | None = 1, tau: float | None = None,
                 chunk_len: int = 8, info: Mapping[str, Any] | None = None, accelerate: str = "eager",
                 adaptive: bool = False) -> None:
        if acceptance not in ("strict", "relaxed"):
            raise ValueError(f"acceptance must be strict or relaxed, got {acceptance!r}")
        self.backbone, self.draft, self.main, self.tokenizer = backbone, draft, main, tokenizer
        self.device, self.acceptance, self.delta, self.tau = device, acceptance, delta, tau
        self.chunk_len = int(chunk_len)
        self.accelerate = accelerate
        if adaptive and acceptance != "strict":
            raise ValueError(f"policy.adaptive=true needs policy.acceptance=strict, got {acceptance!r}")
        self.adaptive = bool(adaptive)
        self.needs_images = bool(getattr(backbone, "needs_images", False))
        self.info = dict(info or {})
        self._engines: dict[str, Any] = {}
        self.engine = None

    def _encode(self, observation: tuple[dict, str]):
        obs, instruction = observation
        return self.backbone([obs], [instruction])

    def engine_for(self, mode: str):
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode not in self._engines:
            from rsd.engine.rsd_engine import RSDInferenceEngine

            self._engines[mode] = RSDInferenceEngine(
                self.main, self.draft if mode == "speculative" else None, self.tokenizer,
                mode="baseline" if mode == "baseline" else self.acceptance, delta=self.delta, tau=self.tau,
                gripper_dim=6, backbone=self._encode, device=self.device, accelerate=self.accelerate,
                adaptive=self.adaptive and mode == "speculative")
            self.info[f"accelerate_{mode}"] = self._engines[mode].accelerate_info
            log.info("engine policy (%s): accelerate %s", mode, self._engines[mode].accelerate_info)
        return self._engines[mode]

    def reset(self, task: TaskSpec, mode: str, trial: int = 0) -> None:
        self.engine = self.engine_for(mode)

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        if self.engine is None:
            raise RuntimeError("EnginePolicy.act before reset")
        out = self.engine.predict_observation((obs, instruction))
        if out.actions is None:
            raise RuntimeError("the engine decoded no actions (no tokenizer)")
        actions = out.actions[0].detach().float().cpu().numpy()[: self.chunk_len]
        t = out.times
        stats: dict[str, Any] = {f"{k}_ms": 1e3 * float(t[k]) for k in ("backbone", "draft", "main", "decode")
                                 if k in t}
        stats["engine_ms"] = 1e3 * float(t.get("total", 0.0))
        stats["main_steps"] = int(out.main_calls)
        stats["main_steps_saved"] = int(self.engine.num_layers) - int(out.main_calls)
        if out.drafted is not None:
            n, a = int(out.drafted.shape[1]), int(out.accepted_length or 0)
            stats.update(drafted_layers=n, accepted_layers=a, drafted_per_layer=[1] * n,
                         accepted_per_layer=[int(i < a) for i in range(n)])
        return actions, stats


def build_engine_policy(spec: Mapping[str, Any]) -> ChunkPolicy:
    """Backbone + draft + main model + tokenizer as a :class:`ChunkPolicy` (see :class:`EnginePolicy`).

    ``spec`` keys: ``ckpt`` (draft checkpoint path or ``best``), ``log_dir``, ``main_ckpt`` / ``tokenizer``
    (null: found as in :func:`resolve_engine_spec`), ``backbone`` (null: from the draft's cache manifest),
    ``device``, ``acceptance`` / ``delta`` / ``tau``, ``chunk_len``, ``accelerate`` (``eager`` | ``compile`` |
    ``cuda_graph``, see ``rsd.engine.accelerate``), ``adaptive`` (strict only: speculate only while faster).
    """
    from rsd.models.checkpoint import load_draft_checkpoint
    from rsd.models.main_decoder import load_main_decoder
    from rsd.tokenizer import RFSQTokenizer

    if not spec.get("main_ckpt") or not spec.get("tokenizer") or str(spec.get("ckpt")) == "best":
        spec = resolve_engine_spec(spec)
    device = resolve_device(spec.get("device"))
    draft, info = load_draft_checkpoint(spec["ckpt"], map_location=device)
    identity = dict(info.get("cache_manifest") or {})
    backbone = _build_backbone(spec, identity)
    tokenizer = RFSQTokenizer.load(spec["tokenizer"], map_location=device)
    if identity.get("tokenizer") and tokenizer.identity() != identity["tokenizer"]:
        raise ValueError(f"tokenizer {spec['tokenizer']} ({tokenizer.identity()}) is not the one the draft's "
                         f"tokens came from ({identity['tokenizer']})")
    main = load_main_decoder(spec["main_ckpt"], map_location=device)
    for name, dim in (("draft", draft.input_dim), ("main decoder", main.input_dim)):
        if dim != backbone.hidden_dim:
            raise ValueError(f"the {name} expects hidden states of size {dim}, the backbone "
                             f"{backbone.backbone_id} gives {backbone.hidden_dim}")
    log.info("engine policy: draft %s, main %s, tokenizer %s, backbone %s, device %s", spec["ckpt"],
             spec["main_ckpt"], spec["tokenizer"], backbone.backbone_id, device)
    return EnginePolicy(backbone, draft, main.to(device).eval(), tokenizer.to(device).eval(), device=device,
                        acceptance=spec.get("acceptance", "strict"), delta=spec.get("delta", 1),
                        tau=spec.get("tau"), chunk_len=spec.get("chunk_len", 8),
                        accelerate=spec.get("accelerate") or "eager", adaptive=bool(spec.get("adaptive")),
                        info={"draft": spec["ckpt"], "main": spec["main_ckpt"], "tokenizer": spec["tokenizer"],
                              "backbone_id": backbone.backbone_id})


def resolve_policy_spec(spec: Mapping[str, Any]) -> dict:
    """Resolve moving references (``ckpt: best``) to concrete paths once, in the main process.

    The result is what workers receive and what the output folder records, so a resumed run checks
    that it continues with the same checkpoints.
    """
    spec = dict(spec)
    if spec.get("factory") == "engine":
        return resolve_engine_spec(spec)
    return spec


# --------------------------------------------------------------------------------------------------
# Factories


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
    "engine": build_engine_policy,
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
    factory = FACTORIES.get(factory_name) or import_object(factory_name)
    policy = factory(spec)
    missing = [m for m in ("reset", "act") if not callable(getattr(policy, m, None))]
    if missing:
        raise TypeError(f"policy from {factory_name!r} lacks {missing}")
    return policy


def policy_needs_images(policy: Any) -> bool:
    return bool(getattr(policy, "needs_images", False))


def spec_identity(spec: Mapping[str, Any], ignore: Sequence[str] = ("device", "accelerate", "adaptive")) -> dict:
    """The parts of a spec that decide the results (what a resumed run must match; ``accelerate`` gives
    the same tokens, like ``device`` it changes only the timings)."""
    return {k: v for k, v in spec.items() if k not in ignore}
