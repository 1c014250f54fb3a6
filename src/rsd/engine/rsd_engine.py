"""The RSD inference engine: the only place where action tokens are decoded (baseline or speculative).

Modes (tokens in the layers view ``[B, 8, 128]``, see ``rsd.tokenizer.layout``):

- ``baseline``: the main model alone, greedy, layer by layer: 8 sequential main steps.
- ``strict``: the draft proposes ``L0..L2`` in one call; ONE main call scores layers ``0..3`` given
  the drafted prefix; the longest prefix of drafted layers equal to the main model's greedy choice is
  accepted, the main model's own choice at the next layer is kept (the bonus layer), and decoding
  continues layer by layer from the KV cache. Main calls per chunk: ``1 + (8 - a - 1) = 8 - a`` for
  ``a`` accepted layers. Lossless: the tokens equal the baseline's.
- ``strict`` with ``adaptive=True``: per chunk, speculate or decode like the baseline, whichever the
  running means of measured draft + main time say is faster (the other path is probed every
  ``probe_every`` chunks). Still lossless (both paths give the baseline's tokens); it bounds the cost
  of a draft the main model rarely agrees with at about the baseline's time.
- ``relaxed``: as ``strict``, but a drafted layer is accepted when every token is within level
  distance ``delta`` of the main model's choice, or when the fraction of equal tokens reaches
  ``tau`` (either criterion can be disabled with ``None``). Not lossless.

Batches: the accepted length is per chunk for batch 1 (the robot's case). For ``B > 1`` the batch
shares one KV cache, so the engine accepts the *smallest* accepted length of the batch (the other
samples get the main model's choice for the rest, which in strict mode are the same tokens); the
statistics count that effective length.

The main model must provide ``new_cache(batch_size) -> cache`` (with ``truncate(n)``),
``score(hidden, prefix, cache) -> logits [B, k+1, 128, V]`` and ``extend(layers, cache) -> logits
[B, m, 128, V]`` (see :class:`rsd.models.main_decoder.RFSQMainDecoder`). The draft must provide
``propose(hidden) -> tokens [B, n, 128]`` or return logits ``[B, n, 128, V]`` from ``__call__``.
The tokenizer needs ``decode(codes [B, 8, 16, 8]) -> actions [B, 8, 7]``; the engine binarizes the
gripper (``> 0`` -> +1 close, else -1 open) after decoding.

Timing (per ``predict`` call, :class:`EngineStats`): ``draft`` (proposal), ``main`` (every main call,
including cache allocation and the greedy argmax), ``decode`` (RFSQ decode + post-processing),
``backbone`` (only through :meth:`RSDInferenceEngine.predict_observation`) and ``total``;
``time.perf_counter`` on CPU, CUDA events with one synchronize per call on GPU (``rsd.engine.timing``).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsd.engine.accelerate import accelerate_models
from rsd.engine.timing import make_timer
from rsd.tokenizer.layout import layers_to_codes

MODES = ("baseline", "strict", "relaxed")
SECTIONS = ("backbone", "draft", "main", "decode", "total")


# ---------------------------------------------------------------------- acceptance rules
def strict_accept(drafted: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
    """``[B, n, P]`` x2 -> ``[B, n]`` bool: the drafted layer equals the main model's greedy layer."""
    return (drafted == verified).all(dim=-1)


def relaxed_accept(drafted: torch.Tensor, verified: torch.Tensor, delta: int | None = 1,
                   tau: float | None = None) -> torch.Tensor:
    """``[B, n]`` bool: every token within ``delta`` levels, or a fraction ``>= tau`` of equal tokens."""
    if delta is None and tau is None:
        raise ValueError("relaxed acceptance needs delta and/or tau")
    accept = torch.zeros(drafted.shape[:2], dtype=torch.bool, device=drafted.device)
    if delta is not None:
        accept |= ((drafted.long() - verified.long()).abs() <= int(delta)).all(dim=-1)
    if tau is not None:
        accept |= (drafted == verified).float().mean(dim=-1) >= float(tau)
    return accept


def accepted_prefix_length(accept: torch.Tensor) -> torch.Tensor:
    """``[B, n]`` bool -> ``[B]`` long: the number of leading accepted layers."""
    return accept.long().cumprod(dim=1).sum(dim=1)


# ---------------------------------------------------------------------- statistics
@dataclass
class EngineStats:
    """Running statistics of an engine (sums; the properties give rates and per-chunk means).

    Counts are per sample (= per chunk at batch 1); times are per ``predict`` call. ``accepted_*``
    count accepted *drafted* layers (the bonus layer is not included).
    """

    num_layers: int = 8
    num_draft_layers: int = 3
    inferences: int = 0
    samples: int = 0
    drafted_layers: int = 0
    accepted_layers: int = 0
    accepted_per_layer: list[int] = field(default_factory=list)
    accepted_length_counts: list[int] = field(default_factory=list)
    main_calls: int = 0
    baseline_main_calls: int = 0
    unspeculated: int = 0  # chunks the adaptive strict mode decoded without the draft
    time_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.accepted_per_layer:
            self.accepted_per_layer = [0] * self.num_draft_layers
        if not self.accepted_length_counts:
            self.accepted_length_counts = [0] * (self.num_draft_layers + 1)

    def record(self, batch_size: int, drafted: int, accepted: int, main_calls: int,
               times: dict[str, float]) -> None:
        """One ``predict`` call: ``drafted``/``accepted`` layers per sample, ``main_calls`` for the batch."""
        self.inferences += 1
        self.samples += batch_size
        self.main_calls += main_calls
        self.baseline_main_calls += self.num_layers
        if drafted:
            self.drafted_layers += drafted * batch_size
            self.accepted_layers += accepted * batch_size
            for i in range(accepted):
                self.accepted_per_layer[i] += batch_size
            self.accepted_length_counts[accepted] += batch_size
        for k, v in times.items():
            self.time_s[k] = self.time_s.get(k, 0.0) + v

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted layers / drafted layers (NaN when nothing was drafted)."""
        return self.accepted_layers / self.drafted_layers if self.drafted_layers else math.nan

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of accepted drafted layers per chunk (0..3; the bonus layer not counted)."""
        drafted_samples = sum(self.accepted_length_counts)
        return self.accepted_layers / drafted_samples if drafted_samples else math.nan

    @property
    def per_layer_acceptance(self) -> list[float]:
        """Fraction of drafted chunks whose drafted layer ``i`` was accepted (implies all ``< i`` were)."""
        drafted_samples = sum(self.accepted_length_counts)
        return [c / drafted_samples if drafted_samples else math.nan for c in self.accepted_per_layer]

    @property
    def main_steps_saved(self) -> int:
        """Sequential main calls saved against the baseline's 8 per chunk (total)."""
        return self.baseline_main_calls - self.main_calls

    @property
    def main_calls_per_chunk(self) -> float:
        return self.main_calls / self.inferences if self.inferences else math.nan

    def ms_per_chunk(self, section: str) -> float:
        """Mean milliseconds per ``predict`` call spent in ``section`` (0 if never entered)."""
        return 1e3 * self.time_s.get(section, 0.0) / self.inferences if self.inferences else math.nan

    def summary(self) -> dict:
        """Plain-python summary (what evaluations log)."""
        out = {
            "inferences": self.inferences,
            "samples": self.samples,
            "drafted_layers": self.drafted_layers,
            "accepted_layers": self.accepted_layers,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_layer_acceptance": self.per_layer_acceptance,
            "accepted_length_counts": list(self.accepted_length_counts),
            "main_calls": self.main_calls,
            "main_calls_per_chunk": self.main_calls_per_chunk,
            "main_steps_saved": self.main_steps_saved,
            "unspeculated_chunks": self.unspeculated,
        }
        for s in SECTIONS:
            out[f"{s}_ms_per_chunk"] = self.ms_per_chunk(s)
        return out


@dataclass
class EngineOutput:
    """One ``predict`` call: tokens ``[B, 8, 128]``, codes ``[B, 8, 16, 8]``, actions ``[B, 8, 7]``."""

    tokens: torch.Tensor
    codes: torch.Tensor
    actions: torch.Tensor | None
    mode: str
    main_calls: int
    accepted_length: int | None = None  # effective accepted drafted layers (batch minimum)
    sample_accepted_length: torch.Tensor | None = None  # [B] per sample, before taking the minimum
    drafted: torch.Tensor | None = None  # [B, n, 128]
    times: dict[str, float] = field(default_factory=dict)  # seconds, this call


# ---------------------------------------------------------------------- engine
class RSDInferenceEngine:
    """Hidden state -> RFSQ tokens (baseline / strict / relaxed speculative) -> action chunk.

    Args:
        main: the main depth decoder (``RFSQMainDecoder`` or anything with its cache API).
        draft: the draft model (``RFSQDraftModelWithProjection``); required unless ``mode="baseline"``.
        tokenizer: an object with ``decode(codes) -> actions``; ``None`` decodes tokens only.
        mode: ``"baseline"``, ``"strict"`` or ``"relaxed"``.
        delta, tau: the relaxed acceptance criteria (``None`` disables one).
        normalizer: optional object with ``unnormalize(actions)`` applied after ``tokenizer.decode``.
            ``rsd.tokenizer.rfsq.RFSQTokenizer.decode`` already returns raw units: leave it ``None``
            there; pass one only for a tokenizer that returns normalized ``[-1, 1]`` actions.
        gripper_dim: action dimension binarized to -1 (open) / +1 (close) by sign; ``None`` keeps it.
        backbone: optional callable ``observation -> hidden [B, D]`` used by :meth:`predict_observation`.
        device: where the models run (default: the main model's device).
        accelerate: ``"eager"`` (default), ``"compile"`` or ``"cuda_graph"`` (``rsd.engine.accelerate``;
            falls back to eager with a warning); :attr:`accelerate_info` records what is in use.
        adaptive, probe_every, smoothing: strict mode only: choose per chunk between speculation and
            baseline decoding by exponential means (weight ``smoothing``) of their measured draft + main
            time; the path not chosen is re-measured every ``probe_every`` chunks.
    """

    def __init__(self, main, draft=None, tokenizer=None, *, mode: str = "strict", delta: int | None = 1,
                 tau: float | None = None, normalizer=None, gripper_dim: int | None = 6,
                 backbone: Callable | None = None, device: torch.device | str | None = None,
                 accelerate: str = "eager", adaptive: bool = False, probe_every: int = 20,
                 smoothing: float = 0.2) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "baseline" and draft is None:
            raise ValueError(f"mode {mode!r} needs a draft model")
        if mode == "relaxed" and delta is None and tau is None:
            raise ValueError("relaxed mode needs delta and/or tau")
        if adaptive and mode != "strict":
            raise ValueError(f"adaptive=True needs mode='strict' (switching paths changes {mode!r} outputs)")
        if probe_every < 2 or not 0.0 < smoothing <= 1.0:
            raise ValueError(f"probe_every must be >= 2 and 0 < smoothing <= 1, got {probe_every}, {smoothing}")
        self.adaptive = adaptive
        self.probe_every = probe_every
        self.smoothing = smoothing
        self._mean_s: dict[bool, float | None] = {True: None, False: None}  # speculate? -> mean seconds
        self._since_probe = 0
        self.main = main
        self.draft = draft
        self.tokenizer = tokenizer
        self.mode = mode
        self.delta = delta
        self.tau = tau
        self.normalizer = normalizer
        self.gripper_dim = gripper_dim
        self.backbone = backbone
        params = list(main.parameters()) if hasattr(main, "parameters") else []
        self.device = torch.device(device) if device is not None else (params[0].device if params else torch.device("cpu"))
        self.dtype = params[0].dtype if params else torch.float32
        self.num_layers = int(getattr(main, "num_layers", 8))
        self.num_positions = getattr(main, "num_positions", None)
        for m in (main, draft):
            if isinstance(m, torch.nn.Module):
                m.eval()
        self.draft, self.main, self.accelerate_info = accelerate_models(draft, main, accelerate, self.device)
        self.timer = make_timer(self.device)
        self.stats = self._new_stats()

    def _new_stats(self) -> EngineStats:
        n = int(getattr(self.draft, "num_coarse_layers", 3)) if self.draft is not None else 3
        return EngineStats(num_layers=self.num_layers, num_draft_layers=n)

    def reset_stats(self) -> EngineStats:
        """Start new statistics; returns the old ones."""
        old, self.stats = self.stats, self._new_stats()
        return old

    # ------------------------------------------------------------------ acceptance
    def accept(self, drafted: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` bool for the engine's mode."""
        if self.mode == "relaxed":
            return relaxed_accept(drafted, verified, self.delta, self.tau)
        return strict_accept(drafted, verified)

    # ------------------------------------------------------------------ decoding
    def _propose(self, hidden: torch.Tensor) -> torch.Tensor:
        if hasattr(self.draft, "propose"):
            drafted = self.draft.propose(hidden)
        else:
            drafted = self.draft(hidden).argmax(-1)
        if drafted.ndim != 3 or not 1 <= drafted.shape[1] < self.num_layers or drafted.shape[0] != hidden.shape[0] \
                or (self.num_positions is not None and drafted.shape[2] != self.num_positions):
            raise ValueError(f"the draft must propose tokens [B, n, {self.num_positions or 'P'}] with 1 <= n < "
                             f"{self.num_layers} for B={hidden.shape[0]}, got {tuple(drafted.shape)}")
        return drafted.long()

    def _continue(self, tokens: torch.Tensor, cache, layer: int) -> int:
        """Greedy steps from ``layer`` (already in ``tokens``) to the last layer; returns the main calls."""
        calls = 0
        for k in range(layer + 1, self.num_layers):
            with self.timer.section("main"):
                logits = self.main.extend(tokens[:, k - 1:k], cache)
                tokens[:, k] = logits[:, 0].argmax(-1)
            calls += 1
        return calls

    def _baseline(self, hidden: torch.Tensor) -> tuple[torch.Tensor, int]:
        b = hidden.shape[0]
        with self.timer.section("main"):
            cache = self.main.new_cache(b)
            logits = self.main.score(hidden, None, cache)
            first = logits[:, 0].argmax(-1)
        tokens = torch.empty(b, self.num_layers, first.shape[-1], dtype=torch.long, device=first.device)
        tokens[:, 0] = first
        return tokens, 1 + self._continue(tokens, cache, 0)

    def _speculative(self, hidden: torch.Tensor) -> dict:
        b = hidden.shape[0]
        with self.timer.section("draft"):
            drafted = self._propose(hidden)
        n = drafted.shape[1]
        with self.timer.section("main"):
            cache = self.main.new_cache(b)
            logits = self.main.score(hidden, drafted, cache)  # layers 0..n
            verified = logits.argmax(-1)  # [B, n+1, P]
        sample_len = accepted_prefix_length(self.accept(drafted, verified[:, :n]))
        a = int(sample_len.min())
        tokens = torch.empty(b, self.num_layers, drafted.shape[-1], dtype=torch.long, device=drafted.device)
        tokens[:, :a] = drafted[:, :a]
        tokens[:, a] = verified[:, a]  # the bonus layer: the main model's own choice
        cache.truncate(a + 1)  # hidden + accepted layers; drop the rejected drafted positions
        calls = 1 + self._continue(tokens, cache, a)
        return dict(tokens=tokens, main_calls=calls, accepted_length=a, sample_accepted_length=sample_len,
                    drafted=drafted)

    def decode_actions(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """Tokens ``[B, 8, 128]`` -> actions ``[B, 8, 7]`` (un-normalized, gripper binarized)."""
        if self.tokenizer is None:
            return None
        actions = self.tokenizer.decode(layers_to_codes(tokens))
        if self.normalizer is not None:
            actions = self.normalizer.unnormalize(actions)
        if self.gripper_dim is not None:
            g = actions[..., self.gripper_dim]
            actions = actions.clone()
            actions[..., self.gripper_dim] = torch.where(g > 0, torch.ones_like(g), -torch.ones_like(g))
        return actions

    @torch.inference_mode()
    def predict(self, hidden: torch.Tensor, *, decode: bool = True) -> EngineOutput:
        """Hidden states ``[B, D]`` -> :class:`EngineOutput` (tokens, codes, actions); updates :attr:`stats`."""
        self.timer.start_chunk()
        return self._decode_chunk(hidden, decode)

    @torch.inference_mode()
    def predict_observation(self, observation, *, decode: bool = True) -> EngineOutput:
        """``backbone(observation) -> hidden``, timed as ``backbone``, then the same as :meth:`predict`."""
        if self.backbone is None:
            raise ValueError("predict_observation needs a backbone (pass backbone=... to the engine)")
        self.timer.start_chunk()
        with self.timer.section("backbone"):
            hidden = self.backbone(observation)
        return self._decode_chunk(hidden, decode)

    def _speculate_now(self) -> bool:
        """Adaptive strict mode: measure both paths once, then take the faster, probing the other."""
        if not self.adaptive:
            return True
        spec, base = self._mean_s[True], self._mean_s[False]
        if spec is None or base is None:
            return spec is None
        faster = spec <= base
        self._since_probe += 1
        if self._since_probe >= self.probe_every:
            self._since_probe = 0
            return not faster
        return faster

    def _learn(self, speculated: bool, times: dict[str, float]) -> None:
        if not self.adaptive:
            return
        t = times.get("draft", 0.0) + times.get("main", 0.0)
        old = self._mean_s[speculated]
        self._mean_s[speculated] = t if old is None else (1 - self.smoothing) * old + self.smoothing * t

    def _decode_chunk(self, hidden: torch.Tensor, decode: bool) -> EngineOutput:
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        speculate = self.mode != "baseline" and self._speculate_now()
        if not speculate:
            tokens, calls = self._baseline(hidden)
            res = dict(tokens=tokens, main_calls=calls)
        else:
            res = self._speculative(hidden)
        tokens = res["tokens"]
        actions = None
        if decode and self.tokenizer is not None:
            with self.timer.section("decode"):
                actions = self.decode_actions(tokens)
        times = self.timer.end_chunk()
        if self.mode != "baseline":
            self._learn(speculate, times)
            self.stats.unspeculated += 0 if speculate else hidden.shape[0]
        drafted = res.get("drafted")
        self.stats.record(hidden.shape[0], 0 if drafted is None else drafted.shape[1],
                          res.get("accepted_length") or 0, res["main_calls"], times)
        return EngineOutput(codes=layers_to_codes(tokens), actions=actions, mode=self.mode, times=times, **res)

    def __call__(self, hidden: torch.Tensor) -> EngineOutput:
        return self.predict(hidden)


# ---------------------------------------------------------------------- distillation targets
def greedy_tokens(main, hidden, batch_size: int = 256, device: torch.device | str | None = None) -> np.ndarray:
    """The main model's greedy tokens (the baseline engine) for hidden states ``[N, D]`` -> uint8 ``[N, 8, P]``."""
    engine = RSDInferenceEngine(main, mode="baseline", device=device)
    out = []
    for i in range(0, hidden.shape[0], batch_size):
        h = torch.from_numpy(np.array(hidden[i:i + batch_size], dtype=np.float32))  # a copy (memmaps are read-only)
        out.append(engine.predict(h, decode=False).tokens.to("cpu", torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, engine.num_layers, engine.num_positions or 0), np.uint8)


def write_distill_tokens(main, cache_dir: str | os.PathLike, batch_size: int = 256,
                         device: torch.device | str | None = None, source: Mapping[str, Any] | None = None) -> Path:
    """Write ``{cache_dir}/distill_tokens.npy`` (uint8 ``[N, 8, 128]``, one row per cache frame): the main
    model's greedy tokens, which ``FeatureCacheDataModule(targets="distill")`` trains the draft on.

    ``distill_tokens.json`` next to it records ``source`` (which main model made them) and the cache's
    frame count, so a draft trained on them can say which main model it imitates."""
    from rsd.data.cache import CacheError, open_cache

    manifest, arrays = open_cache(cache_dir)
    d = int(manifest["backbone"]["hidden_dim"])
    if getattr(main, "input_dim", d) != d:
        raise CacheError(f"feature cache {cache_dir} has hidden size {d}, the main decoder expects {main.input_dim}")
    tokens = greedy_tokens(main, arrays["hidden"], batch_size, device)
    path = Path(cache_dir) / "distill_tokens.npy"
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, tokens)
    os.replace(tmp, path)
    info = {"main": dict(source or {}), "num_frames": int(tokens.shape[0]), "shape": list(tokens.shape),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    path.with_suffix(".json").write_text(json.dumps(info, indent=2))
    return path
