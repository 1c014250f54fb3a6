"""The learned policy: backbone -> speculative engine -> RFSQ decode, and how its files are found.

``ckpt=best`` resolves to the best draft of the suite whose main model exists (:mod:`rsd.policies.lineage`);
the main decoder and tokenizer are the ones the draft's artifact chain names by content hash, so a policy is
always assembled from the models that were trained together.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from rsd import PROJECT_ROOT
from rsd.data.cache import read_manifest
from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.envs.libero_env import TaskSpec
from rsd.models.backbones import backbone_from_config
from rsd.models.checkpoint import load_draft_checkpoint, resolve_draft_checkpoint
from rsd.models.main_decoder import load_main_decoder
from rsd.policies.base import ACCEPTANCE_RULES, DECODING_KEYS, EVAL_MODES, ChunkPolicy
from rsd.policies.lineage import draft_files, find_best_draft, lineage, training_data_of
from rsd.tokenizer import RFSQTokenizer
from rsd.utils.artifacts import read_artifact
from rsd.utils.device import resolve_device
from rsd.utils.serialization import UntrustedFileError, load_torch_file

log = logging.getLogger(__name__)

__all__ = ["ACCEPTANCE_RULES", "DECODING_KEYS", "EnginePolicy", "build_engine_policy", "engine_options"]


def _draft_identity(draft_path: str, trust: bool = False) -> dict:
    """The cache identity a draft checkpoint records (``{}`` for original-project files)."""
    _, info = load_draft_checkpoint(draft_path, trust=trust)
    return dict(info.get("cache_manifest") or {})


def engine_training_data(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The training data behind a resolved engine spec's draft, main model and tokenizer (its lineage)."""
    return training_data_of({"draft": spec.get("ckpt"), "main model": spec.get("main_ckpt"),
                             "tokenizer": spec.get("tokenizer")})


def find_main_decoder(log_dir: str | None, identity: Mapping[str, Any]) -> str:
    """The newest exported main decoder trained on the same features and tokenizer as the draft.

    Looks at ``{log_dir}/main_head/runs/*/main_decoder.pt``, ``{log_dir}/main_head/multiruns/*/*/`` and
    ``data/models/main_head_*.pt``; a file matches when its recorded ``data`` has the draft's backbone id,
    tokenizer identity and suite.
    """

    root = Path(log_dir) if log_dir else PROJECT_ROOT / "logs"
    candidates = (list(root.glob("main_head/runs/*/main_decoder.pt"))
                  + list(root.glob("main_head/multiruns/*/*/main_decoder.pt"))
                  + list((PROJECT_ROOT / "data" / "models").glob("main_head_*.pt")))
    want = {k: identity.get(k) for k in ("backbone_id", "tokenizer", "suite") if identity.get(k)}
    rejected = []
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        try:  # discovery never unpickles: a candidate that needs it is skipped, not run
            data = load_torch_file(path, what="main decoder candidate").get("data") or {}
        except UntrustedFileError:
            rejected.append(f"{path} (holds Python objects; not inspected, pass policy.main_ckpt=<path> and "
                            "policy.trust_checkpoints=true to use it)")
            continue
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
    """The tokenizer the draft's training cache names (else the suite's default path)."""
    if spec.get("tokenizer"):
        return str(spec["tokenizer"])
    cache_dir = identity.get("cache_dir")
    if cache_dir and (Path(cache_dir) / "manifest.json").is_file():
        path = (read_manifest(cache_dir).get("tokenizer") or {}).get("path")
        if path and Path(path).is_file():
            return str(path)
    suite = identity.get("suite") or spec.get("suite")
    return str(PROJECT_ROOT / "data" / "tokenizers" / f"rfsq_{suite}" / "rfsq.pt")


def resolve_engine_spec(spec: Mapping[str, Any]) -> dict:
    """``ckpt=best`` and the defaults (main decoder, tokenizer) -> concrete paths, checked once.

    A pipeline draft (with an ``artifact.json``) names its main model and tokenizer by content hash
    (:mod:`rsd.policies.lineage`); a draft without one (older or original-project files) falls back to the
    newest main decoder trained on the same features and the tokenizer its cache names."""
    spec = dict(spec)
    suite = spec.get("suite")
    log_dir = spec.get("log_dir") or str(PROJECT_ROOT / "logs")
    if str(spec.get("ckpt") or "best") == "best":
        path, manifest = find_best_draft(log_dir, suite)
        spec["ckpt"] = str(path)
    else:
        spec["ckpt"] = str(resolve_draft_checkpoint(spec["ckpt"]))
        manifest = read_artifact(Path(spec["ckpt"]).parent)
    chain: dict[str, Any] = {}
    trained_for = None
    if manifest is not None and manifest.get("kind") == "draft":
        trained_for = manifest.get("suite")
        chain = draft_files(lineage(Path(spec["ckpt"]).parent))
    if not all(spec.get(k) or chain.get(k) for k in ("main_ckpt", "tokenizer")):
        # no artifact, or a chain without a main model (ground-truth draft) or tokenizer (a cache built
        # outside the pipeline): the draft's recorded cache identity names them
        identity = _draft_identity(spec["ckpt"], bool(spec.get("trust_checkpoints")))
        trained_for = trained_for or identity.get("suite")
        if not spec.get("main_ckpt") and not chain.get("main_ckpt"):
            chain["main_ckpt"] = find_main_decoder(spec.get("log_dir"), identity)
        if not spec.get("tokenizer") and not chain.get("tokenizer"):
            chain["tokenizer"] = _tokenizer_path(spec, identity)
    if trained_for and suite and trained_for != suite and not spec.get("allow_other_suite"):
        raise ValueError(f"the draft {spec['ckpt']} was trained on {trained_for}, not {suite} "
                         "(set +policy.allow_other_suite=true to evaluate it anyway)")
    for key in ("main_ckpt", "tokenizer"):
        if not spec.get(key):
            if not chain.get(key):
                raise FileNotFoundError(f"the draft {spec['ckpt']} names no {key.replace('_ckpt', ' model')} that "
                                        f"still exists; pass policy.{key}=<path>")
            spec[key] = chain[key]
    return spec


def _build_backbone(spec: Mapping[str, Any], identity: Mapping[str, Any]):
    """The backbone the draft's training cache was built with (``policy.backbone`` overrides it)."""
    if spec.get("backbone"):
        cfg = dict(spec["backbone"])
    elif identity.get("backbone_config"):
        cfg = dict(identity["backbone_config"])
    elif identity.get("cache_dir") and (Path(identity["cache_dir"]) / "manifest.json").is_file():
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
    (``strict``: lossless, ``relaxed``: delta / tau, ``epsilon``: action distance), ``baseline`` the main
    model alone. ``decoding`` holds the options both modes share, so the baseline runs at the same depth
    and exit rule: ``depth``, ``early_exit``, ``exit_epsilon``, ``chance_entropy``, ``tail_bounds``,
    ``draft_layers`` (see ``rsd.engine.rsd_engine.RSDInferenceEngine``). The ``stats`` of each inference
    use :data:`ENGINE_STAT_KEYS` (times from the engine's timer: CUDA events on GPU).
    """

    def __init__(self, backbone: Any, draft: Any, main: Any, tokenizer: Any, device: str = "cpu",
                 acceptance: str = "strict", delta: int | None = 1, tau: float | None = None,
                 chunk_len: int = 8, info: Mapping[str, Any] | None = None, accelerate: str = "eager",
                 adaptive: bool = False, epsilon: float | None = None,
                 decoding: Mapping[str, Any] | None = None, baseline_depth: int | None = None) -> None:
        if acceptance not in ACCEPTANCE_RULES:
            raise ValueError(f"acceptance must be one of {ACCEPTANCE_RULES}, got {acceptance!r}")
        if acceptance == "epsilon" and epsilon is None:
            raise ValueError("policy.acceptance=epsilon needs policy.epsilon (normalized action units)")
        unknown = sorted(set(decoding or {}) - set(DECODING_KEYS))
        if unknown:
            raise ValueError(f"unknown decoding options {unknown}; known: {list(DECODING_KEYS)}")
        self.backbone, self.draft, self.main, self.tokenizer = backbone, draft, main, tokenizer
        self.device, self.acceptance, self.delta, self.tau = device, acceptance, delta, tau
        self.epsilon = epsilon
        self.decoding = {k: v for k, v in dict(decoding or {}).items() if v is not None}
        #: the baseline engine's depth when it differs from the speculative one's (a paired depth comparison)
        self.baseline_depth = None if baseline_depth is None else int(baseline_depth)
        self.chunk_len = int(chunk_len)
        self.accelerate = accelerate
        if adaptive and acceptance != "strict":
            raise ValueError(f"policy.adaptive=true needs policy.acceptance=strict, got {acceptance!r}")
        self.adaptive = bool(adaptive)
        self.needs_images = bool(getattr(backbone, "needs_images", False))
        self.info = dict(info or {})
        self._engines: dict[str, Any] = {}
        self.engine = None
        self._check_options()

    def _new_engine(self, mode: str, accelerate: str):
        decoding = dict(self.decoding)
        if mode == "baseline" and self.baseline_depth is not None:
            decoding["depth"] = self.baseline_depth
        return RSDInferenceEngine(
            self.main, self.draft if mode == "speculative" else None, self.tokenizer,
            mode="baseline" if mode == "baseline" else self.acceptance, delta=self.delta, tau=self.tau,
            epsilon=self.epsilon, gripper_dim=6, backbone=self._encode, device=self.device,
            accelerate=accelerate, adaptive=self.adaptive and mode == "speculative", **decoding)

    def _check_options(self) -> None:
        """Every option against the models, now (when the policy is built, before any episode), so a bad value
        stops the evaluation instead of failing every episode: one engine is built eagerly (kept when the
        policy runs eager; with ``accelerate`` the accelerated engines are built at their first episode)."""
        checks = {"speculative" if self.draft is not None else "baseline": "policy options"}
        if self.baseline_depth is not None and "baseline" not in checks:
            checks["baseline"] = "policy options (baseline_depth)"  # its own depth, against the main model too
        for mode, what in checks.items():
            try:
                engine = self._new_engine(mode, "eager")
            except ValueError as exc:
                raise ValueError(f"{what}: {exc}") from exc
            if self.accelerate == "eager":
                self._engines[mode] = engine
                self.info[f"accelerate_{mode}"] = engine.accelerate_info

    def _encode(self, observation: tuple[dict, str]):
        obs, instruction = observation
        return self.backbone([obs], [instruction])

    def engine_for(self, mode: str):
        if mode not in EVAL_MODES:
            raise ValueError(f"mode must be one of {EVAL_MODES}, got {mode!r}")
        if mode not in self._engines:
            self._engines[mode] = self._new_engine(mode, self.accelerate)
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
        stats: dict[str, Any] = {f"{k}_ms": 1e3 * float(t[k]) for k in ("backbone", "draft", "main", "check", "decode")
                                 if k in t}
        if out.depth is not None:
            stats["decoded_layers"] = int(out.depth.min())
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

    Checkpoints load with ``weights_only`` semantics; ``trust_checkpoints: true`` allows files that need
    full unpickling (e.g. an original-project draft holding Python objects), i.e. running their code.

    ``spec`` keys: ``ckpt`` (draft checkpoint path or ``best``), ``log_dir``, ``main_ckpt`` / ``tokenizer``
    (null: found as in :func:`resolve_engine_spec`), ``backbone`` (null: from the draft's cache manifest),
    ``device``, ``acceptance`` / ``delta`` / ``tau``, ``chunk_len``, ``accelerate`` (``eager`` | ``compile`` |
    ``cuda_graph``, see ``rsd.engine.accelerate``), ``adaptive`` (strict only: speculate only while faster).
    """
    if not spec.get("main_ckpt") or not spec.get("tokenizer") or str(spec.get("ckpt")) == "best":
        spec = resolve_engine_spec(spec)
    device = str(resolve_device(spec.get("device")))
    trust = bool(spec.get("trust_checkpoints"))
    draft, info = load_draft_checkpoint(spec["ckpt"], map_location=device, trust=trust)
    identity = dict(info.get("cache_manifest") or {})
    backbone = _build_backbone(spec, identity)
    tokenizer = RFSQTokenizer.load(spec["tokenizer"], map_location=device)
    if identity.get("tokenizer") and tokenizer.identity() != identity["tokenizer"]:
        raise ValueError(f"tokenizer {spec['tokenizer']} ({tokenizer.identity()}) is not the one the draft's "
                         f"tokens came from ({identity['tokenizer']})")
    main = load_main_decoder(spec["main_ckpt"], map_location=device, trust=trust)
    for name, dim in (("draft", draft.input_dim), ("main decoder", main.input_dim)):
        if dim != backbone.hidden_dim:
            raise ValueError(f"the {name} expects hidden states of size {dim}, the backbone "
                             f"{backbone.backbone_id} gives {backbone.hidden_dim}")
    log.info("engine policy: draft %s, main %s, tokenizer %s, backbone %s, device %s", spec["ckpt"],
             spec["main_ckpt"], spec["tokenizer"], backbone.backbone_id, device)
    return EnginePolicy(backbone, draft, main.to(device).eval(), tokenizer.to(device).eval(), device=device,
                        chunk_len=spec.get("chunk_len") or 8, **engine_options(spec),
                        info={"draft": spec["ckpt"], "main": spec["main_ckpt"], "tokenizer": spec["tokenizer"],
                              "backbone_id": backbone.backbone_id})


def engine_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's decoding options as :class:`EnginePolicy` keyword arguments, in one hop: the config group's keys
    (:data:`rsd.policies.base.ENGINE_OPTION_KEYS`, conf/policy/engine.yaml) under the same names; the shared
    ones (:data:`DECODING_KEYS`) as ``decoding``, which goes to both engines unchanged (null: the engine's
    default). ``delta`` / ``tau`` / ``epsilon`` pass as given (a null ``delta`` means "no level rule")."""
    out: dict[str, Any] = {k: spec[k] for k in ("acceptance", "delta", "tau", "epsilon") if k in spec}
    out.update(accelerate=spec.get("accelerate") or "eager", adaptive=adaptive_setting(spec),
               decoding=decoding_options(spec), baseline_depth=spec.get("baseline_depth"))
    return out


def adaptive_setting(spec: Mapping[str, Any]) -> bool:
    """``adaptive``: true / false, or ``auto`` (the default): on for strict acceptance, the only rule whose
    outputs do not depend on the path taken, so the speculative default never costs much more than the
    baseline where the draft is rarely accepted (``docs/results.md``), and off for the other rules."""
    value = spec.get("adaptive")
    if value == "auto":
        return (spec.get("acceptance") or "strict") == "strict"
    return bool(value)


def decoding_options(spec: Mapping[str, Any]) -> dict[str, Any]:
    """The spec's shared decoding options (:data:`DECODING_KEYS`) that are set."""
    return {k: spec[k] for k in DECODING_KEYS if spec.get(k) is not None}
