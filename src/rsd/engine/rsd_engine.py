"""The RSD inference engine: the only place where action tokens are decoded (baseline or speculative).

Modes (tokens in the layers view ``[B, 8, 128]``, see ``rsd.tokenizer.layout``; ``docs/engine.md``):

- ``baseline``: the main model alone, greedy, layer by layer: 8 sequential main steps (``depth`` D: D).
- ``strict``: the draft proposes ``L0..L2`` in one call; ONE main call scores layers ``0..m`` given the
  drafted prefix (``m = min(drafted, depth - 1)``); the longest prefix of drafted layers equal to the main
  model's greedy choice is accepted, the main model's own choice at the next layer is kept (the bonus
  layer), and decoding continues layer by layer from the KV cache. Main calls per chunk:
  ``1 + (D - a - 1) = D - a`` for ``a`` accepted layers. Guarantee: the tokens equal the baseline's at
  the same ``depth`` / ``early_exit`` settings, exactly in float32 on one device, as long as the
  verification call and the single steps pick the same argmax (they compute the same logits with
  different matrix shapes; a flip needs a top-2 logit gap at float32 rounding level, ~1e-6; in bf16 or
  with fused kernels (``accelerate``) such near-ties flip more often).
- ``strict`` with ``adaptive=True``: per chunk, speculate or decode like the baseline, whichever the
  running means of measured draft + main time say is faster (the other path is probed every
  ``probe_every`` chunks; each probe that confirms the choice doubles that interval, up to
  ``MAX_PROBE_FACTOR`` times, and a probe that changes it resets it, so a draft that never pays costs almost
  nothing after a while). Still lossless (both paths give the baseline's tokens).
- ``relaxed``: a drafted layer is accepted when every token is within level distance ``delta`` of the
  main model's choice, or when the fraction of equal tokens reaches ``tau``. Token-level closeness only:
  no bound on the action (one level at layer 0 moves the latent by 1/3).
- ``epsilon``: drafted layer ``j`` is accepted when replacing the main model's greedy layer ``j`` (given
  the accepted drafted layers ``< j``, as verification returns it) by the drafted one moves the decoded
  ``j+1``-layer prefix by at most ``epsilon`` in normalized action units, max abs over the 8 x 7 chunk,
  before gripper binarization (``rsd.engine.action_space``). Guarantee per accepted layer, relative to the
  main model's alternative on the same prefix; it does NOT compose into "within ``a * epsilon`` of the
  baseline", because the main model's later layers are conditioned on the drafted prefix and differ from
  the baseline's. With ``r_k`` the most layers ``>= k`` can move the action (see early exit), the chunk is
  within ``sum_{j<a} (epsilon + 2 r_{j+1})`` of the baseline's (triangle inequality over the swaps).

Depth and residual early exit (any mode):

- ``depth=D`` (1..8, at most the main model's ``trained_layers``): decode only layers ``0..D-1``; layers ``>= D``
  hold the centre level, which RFSQ
  decodes as exactly 0, so the action is the tokenizer's D-layer prefix decode. At ``D <= 3`` the engine
  drafts / verifies only ``D - 1`` layers (the main model supplies layer ``D-1`` as the bonus layer).
- ``early_exit="bound"``: before each layer ``k >= 1``, stop when the remaining layers ``k..7`` cannot move
  the decoded action by more than ``exit_epsilon`` (default ``epsilon``): a per-chunk interval bound
  through the tokenizer's decoder (sound, ``IntervalTailBound``) or given ``tail_bounds`` (e.g. measured
  on data: then a measurement, not a bound). ``"chance"``: stop (dropping layer ``k``) once the main
  model's layer-``k`` distribution has mean per-token entropy ``>= chance_entropy * log(7)`` (no better
  than chance: its tokens are residual detail the observation does not determine). ``"both"``: either.
  Speculative modes take the same exit decisions as the baseline on the layers they verified, so strict
  + early exit equals baseline + early exit.

Batches: the accepted length is per chunk for batch 1 (the robot's case). For ``B > 1`` the batch
shares one KV cache, so the engine accepts the *smallest* accepted length of the batch (the other
samples get the main model's choice for the rest, which in strict mode are the same tokens); the
statistics count that effective length. Early exit is per sample (the batch steps on while any sample
decodes; each sample's layers past its own depth are set to the centre level).

The main model must provide ``new_cache(batch_size) -> cache`` (with ``truncate(n)``),
``score(hidden, prefix, cache) -> logits [B, k+1, 128, V]`` and ``extend(layers, cache) -> logits
[B, m, 128, V]`` (see :class:`rsd.models.main_decoder.RFSQMainDecoder`). The draft must provide
``propose(hidden) -> tokens [B, n, 128]`` or return logits ``[B, n, 128, V]`` from ``__call__``.
The tokenizer needs ``decode(codes [B, 8, 16, 8]) -> actions [B, 8, 7]`` (``decode_normalized`` too for
``epsilon`` and the bound exit); the engine binarizes the gripper (``> 0`` -> +1 close, else -1 open).

Timing (per ``predict`` call, :class:`EngineStats`): ``draft`` (proposal), ``main`` (every main call,
including cache allocation and the greedy argmax), ``check`` (acceptance test and early-exit tests: the
epsilon rule's prefix decodes, the interval bound, the entropy), ``decode`` (RFSQ decode +
post-processing), ``backbone`` (only through :meth:`RSDInferenceEngine.predict_observation`) and ``total``;
``time.perf_counter`` on CPU, CUDA events with one synchronize per call on GPU (``rsd.engine.timing``).
A decode speedup must count ``draft + main + check``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch

from rsd.engine.accelerate import accelerate_models
from rsd.engine.acceptance import accepted_prefix_length, relaxed_accept, strict_accept
from rsd.engine.action_space import (
    IntervalTailBound,
    chance_threshold,
    epsilon_accept,
    mean_entropy,
    normalized_decoder,
    pad_prefix,
)
from rsd.engine.stats import EngineOutput, EngineStats
from rsd.engine.timing import make_timer
from rsd.tokenizer.layout import NUM_LEVELS, layers_to_codes

MODES = ("baseline", "strict", "relaxed", "epsilon")
EXIT_RULES = ("bound", "chance", "both")
#: the adaptive rule probes the path it does not take at most every MAX_PROBE_FACTOR * probe_every chunks
MAX_PROBE_FACTOR = 32


# ---------------------------------------------------------------------- engine
class RSDInferenceEngine:
    """Hidden state -> RFSQ tokens (baseline / strict / relaxed / epsilon speculative) -> action chunk.

    Args:
        main: the main depth decoder (``RFSQMainDecoder`` or anything with its cache API).
        draft: the draft model (``RFSQDraftModelWithProjection``); required unless ``mode="baseline"``.
        tokenizer: an object with ``decode(codes) -> actions``; ``None`` decodes tokens only. ``epsilon``
            and ``early_exit="bound"`` also need ``decode_normalized`` (``RFSQTokenizer``).
        mode: ``"baseline"``, ``"strict"``, ``"relaxed"`` or ``"epsilon"`` (module docstring).
        delta, tau: the relaxed acceptance criteria (``None`` disables one).
        epsilon: the epsilon rule's (and by default the bound exit's) threshold, in normalized action
            units (max abs over the chunk, before gripper binarization). Required by ``mode="epsilon"``.
        depth: decode only the first ``depth`` layers (1..8; ``None`` = all).
        early_exit: ``None`` (off), ``"bound"``, ``"chance"`` or ``"both"`` (module docstring).
        exit_epsilon: the bound exit's threshold (``None``: ``epsilon``).
        chance_entropy: the chance exit's threshold as a fraction of ``log(levels)`` (0 < x <= 1).
        tail_bounds: ``r[k]`` for ``k = 0..8``: use these per-depth bounds for the bound exit instead of
            the interval bound through the tokenizer (e.g. ``action_space.empirical_tail_bounds``).
        draft_layers: verify at most this many drafted layers (``None``: all the draft proposes): fewer
            layers make the verification call shorter.
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
            (+ check) time; the path not chosen is re-measured every ``probe_every`` chunks, an interval that
            doubles with each probe confirming the choice (at most ``MAX_PROBE_FACTOR * probe_every``;
            ``probe_backoff=False``: a fixed interval, the rule before 2026-12-06).
    """

    def __init__(self, main, draft=None, tokenizer=None, *, mode: str = "strict", delta: int | None = 1,
                 tau: float | None = None, normalizer=None, gripper_dim: int | None = 6,
                 backbone: Callable | None = None, device: torch.device | str | None = None,
                 accelerate: str = "eager", adaptive: bool = False, probe_every: int = 20,
                 probe_backoff: bool = True, smoothing: float = 0.2, epsilon: float | None = None,
                 depth: int | None = None, early_exit: str | None = None, exit_epsilon: float | None = None,
                 chance_entropy: float = 0.98, tail_bounds: Sequence[float] | None = None,
                 draft_layers: int | None = None) -> None:
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
        self.probe_backoff = probe_backoff
        self.smoothing = smoothing
        self._mean_s: dict[bool, float | None] = {True: None, False: None}  # speculate? -> mean seconds
        self._since_probe = 0
        self._probe_interval = probe_every  # grows while probes confirm the faster path
        self._probing = False  # the chunk being decoded probes the path not chosen
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
        self.num_levels = int(getattr(main, "num_levels", NUM_LEVELS))
        self._configure_action_rules(epsilon, depth, early_exit, exit_epsilon, chance_entropy, tail_bounds,
                                     draft_layers)
        for m in (main, draft):
            if isinstance(m, torch.nn.Module):
                m.eval()
        self.draft, self.main, self.accelerate_info = accelerate_models(draft, main, accelerate, self.device)
        self.timer = make_timer(self.device)
        self.stats = self._new_stats()

    def _configure_action_rules(self, epsilon, depth, early_exit, exit_epsilon, chance_entropy, tail_bounds,
                                draft_layers) -> None:
        """Validate and store the epsilon / depth / early-exit options (errors name the option)."""
        if epsilon is not None and not (float(epsilon) >= 0.0 and math.isfinite(float(epsilon))):
            raise ValueError(f"epsilon must be a finite number >= 0, got {epsilon!r}")
        if self.mode == "epsilon" and epsilon is None:
            raise ValueError("mode 'epsilon' needs epsilon (normalized action units)")
        self.epsilon = None if epsilon is None else float(epsilon)
        self.depth = self.num_layers if depth is None else int(depth)
        if not 1 <= self.depth <= self.num_layers:
            raise ValueError(f"depth must be in 1..{self.num_layers}, got {depth!r}")
        trained = int(getattr(self.main, "trained_layers", self.num_layers))
        if self.depth > trained:  # the heads of the other layers were never trained
            raise ValueError(f"depth {self.depth}{' (null: all layers)' if depth is None else ''} needs layers the "
                             f"main model was not trained for: it was trained for layers 0..{trained - 1} "
                             f"(trained_layers={trained}); use depth <= {trained}")
        early_exit = None if early_exit in (None, "", "none", False) else str(early_exit)
        if early_exit is not None and early_exit not in EXIT_RULES:
            raise ValueError(f"early_exit must be None or one of {EXIT_RULES}, got {early_exit!r}")
        self.early_exit = early_exit
        self.exit_epsilon = self.epsilon if exit_epsilon is None else float(exit_epsilon)
        if not 0.0 < float(chance_entropy) <= 1.0:
            raise ValueError(f"chance_entropy is a fraction of log(levels) in (0, 1], got {chance_entropy!r}")
        self.chance_entropy = float(chance_entropy)
        self._chance_nats = chance_threshold(self.num_levels, self.chance_entropy)
        if draft_layers is not None and int(draft_layers) < 1:
            raise ValueError(f"draft_layers must be >= 1 or None, got {draft_layers!r}")
        self.draft_layers = None if draft_layers is None else int(draft_layers)
        self._decode_norm = None
        if self.mode == "epsilon":
            if self.tokenizer is None:
                raise ValueError("mode 'epsilon' needs the tokenizer (it decodes the candidate layers)")
            self._decode_norm = normalized_decoder(self.tokenizer, self.normalizer)
        self._tail = None
        self.tail_bounds = None
        if early_exit in ("bound", "both"):
            if self.exit_epsilon is None:
                raise ValueError(f"early_exit={early_exit!r} needs epsilon or exit_epsilon")
            if tail_bounds is not None:
                if len(tail_bounds) != self.num_layers + 1:
                    raise ValueError(f"tail_bounds needs {self.num_layers + 1} values (depth 0..{self.num_layers}), "
                                     f"got {len(tail_bounds)}")
                self.tail_bounds = [float(x) for x in tail_bounds]
            elif self.tokenizer is None:
                raise ValueError(f"early_exit={early_exit!r} needs the tokenizer (or tail_bounds=[...])")
            else:
                self._tail = IntervalTailBound(self.tokenizer)

    def _new_stats(self) -> EngineStats:
        n = int(getattr(self.draft, "num_coarse_layers", 3)) if self.draft is not None else 3
        if self.draft_layers is not None:
            n = min(n, self.draft_layers)
        return EngineStats(num_layers=self.num_layers, num_draft_layers=n)

    def reset_stats(self) -> EngineStats:
        """Start new statistics; returns the old ones."""
        old, self.stats = self.stats, self._new_stats()
        return old

    def settings(self) -> dict:
        """The decoding settings that change the tokens (what a results table records per operating point)."""
        return {"mode": self.mode, "delta": self.delta if self.mode == "relaxed" else None,
                "tau": self.tau if self.mode == "relaxed" else None, "epsilon": self.epsilon,
                "depth": self.depth, "early_exit": self.early_exit, "exit_epsilon": self.exit_epsilon
                if self.early_exit in ("bound", "both") else None,
                "chance_entropy": self.chance_entropy if self.early_exit in ("chance", "both") else None,
                "tail_bounds": self.tail_bounds, "draft_layers": self.draft_layers, "adaptive": self.adaptive}

    # ------------------------------------------------------------------ acceptance
    def accept(self, drafted: torch.Tensor, verified: torch.Tensor) -> torch.Tensor:
        """``[B, n]`` bool for the engine's mode (``verified``: the main model's greedy drafted layers)."""
        if self.mode == "relaxed":
            return relaxed_accept(drafted, verified, self.delta, self.tau)
        if self.mode == "epsilon":
            return epsilon_accept(drafted, verified, self._decode_norm, self.epsilon, self.num_layers,
                                  self.num_levels)
        return strict_accept(drafted, verified)

    def tail_bound(self, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """``[B]``: how far layers ``depth..`` can move the decoded action of ``tokens[:, :depth]``."""
        if self.tail_bounds is not None:
            return torch.full((tokens.shape[0],), self.tail_bounds[depth], dtype=torch.float64)
        if self._tail is None:
            raise ValueError("tail_bound needs early_exit='bound'/'both'")
        return self._tail(tokens, depth)

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

    def _verify(self, hidden: torch.Tensor) -> dict:
        """Draft + ONE verification call: the accepted prefix, the bonus layer, the cache after them."""
        b = hidden.shape[0]
        with self.timer.section("draft"):
            drafted = self._propose(hidden)
        m = min(drafted.shape[1], self.depth - 1, self.draft_layers or self.num_layers)
        drafted = drafted[:, :m]  # layers the engine would never keep are not verified (shorter call)
        with self.timer.section("main"):
            cache = self.main.new_cache(b)
            logits = self.main.score(hidden, drafted, cache)  # layers 0..m
            verified = logits.argmax(-1)  # [B, m+1, P]
        with self.timer.section("check"):
            sample_len = accepted_prefix_length(self.accept(drafted, verified[:, :m]))
        a = int(sample_len.min())
        tokens = torch.empty(b, self.num_layers, drafted.shape[-1], dtype=torch.long, device=drafted.device)
        tokens[:, :a] = drafted[:, :a]
        tokens[:, a] = verified[:, a]  # the bonus layer: the main model's own choice
        cache.truncate(a + 1)  # hidden + accepted layers; drop the rejected drafted positions
        return dict(tokens=tokens, cache=cache, known=a + 1, logits=logits, accepted_length=a,
                    sample_accepted_length=sample_len, drafted=drafted)

    def _start(self, hidden: torch.Tensor) -> dict:
        """The baseline's first main call: layer 0 from the hidden state."""
        b = hidden.shape[0]
        with self.timer.section("main"):
            cache = self.main.new_cache(b)
            logits = self.main.score(hidden, None, cache)
            first = logits[:, 0].argmax(-1)
        tokens = torch.empty(b, self.num_layers, first.shape[-1], dtype=torch.long, device=first.device)
        tokens[:, 0] = first
        return dict(tokens=tokens, cache=cache, known=1, logits=logits)

    def _decode_tokens(self, hidden: torch.Tensor, speculate: bool) -> dict:
        """Greedy layers after the known ones, with the depth cap and the early-exit rules, per sample.

        At layer ``k`` (layers ``< k`` set): stop at depth ``k`` if ``k == depth``, or (bound) if the tail
        bound of ``tokens[:, :k]`` is ``<= exit_epsilon``; else get layer ``k``'s logits (from the
        verification call when known, else one main step) and stop at depth ``k`` (chance) if their mean
        entropy reaches the chance threshold; else keep the greedy layer ``k``. The verified layers go
        through the same tests as the baseline's steps, so strict mode takes the same decisions.
        """
        res = self._verify(hidden) if speculate and self.depth >= 2 else self._start(hidden)
        tokens, cache, known, logits = res.pop("tokens"), res.pop("cache"), res.pop("known"), res.pop("logits")
        b = hidden.shape[0]
        calls = 1
        depth = torch.full((b,), self.num_layers, dtype=torch.long, device=tokens.device)
        active = torch.ones(b, dtype=torch.bool, device=tokens.device)
        bound = self.early_exit in ("bound", "both")
        chance = self.early_exit in ("chance", "both")
        k = 1
        while True:
            if k >= self.depth:
                depth[active] = k
                break
            if bound and (self._tail is None or self._tail.floor[k] <= self.exit_epsilon):
                with self.timer.section("check"):
                    stop = active & (self.tail_bound(tokens, k).to(tokens.device) <= self.exit_epsilon)
                    depth[stop] = k
                    active &= ~stop
                if not bool(active.any()):
                    break
            if k < known:
                layer_logits = logits[:, k]
            else:
                with self.timer.section("main"):
                    layer_logits = self.main.extend(tokens[:, k - 1:k], cache)[:, 0]
                    tokens[:, k] = layer_logits.argmax(-1)
                calls += 1
            if chance:
                with self.timer.section("check"):
                    stop = active & (mean_entropy(layer_logits).to(tokens.device) >= self._chance_nats)
                    depth[stop] = k
                    active &= ~stop
                if not bool(active.any()):
                    break
            k += 1
        if bool((depth < self.num_layers).any()):
            tokens = pad_prefix(tokens, depth, self.num_levels)
        return dict(tokens=tokens, main_calls=calls, depth=depth, **res)

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
        if self._since_probe >= self._probe_interval:
            self._since_probe = 0
            self._probing = True
            return not faster
        return faster

    def _learn(self, speculated: bool, times: dict[str, float]) -> None:
        if not self.adaptive:
            return
        t = times.get("draft", 0.0) + times.get("main", 0.0) + times.get("check", 0.0)
        old = self._mean_s[speculated]
        self._mean_s[speculated] = t if old is None else (1 - self.smoothing) * old + self.smoothing * t
        if self._probing:  # a probe just ran: was the probed path slower than the chosen one?
            chosen = self._mean_s[not speculated]
            confirmed = self.probe_backoff and chosen is not None and t >= chosen
            self._probe_interval = (min(2 * self._probe_interval, MAX_PROBE_FACTOR * self.probe_every)
                                    if confirmed else self.probe_every)
            self._probing = False

    def _decode_chunk(self, hidden: torch.Tensor, decode: bool) -> EngineOutput:
        hidden = hidden.to(device=self.device, dtype=self.dtype)
        speculate = self.mode != "baseline" and self.depth >= 2 and self._speculate_now()
        res = self._decode_tokens(hidden, speculate)
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
                          res.get("accepted_length") or 0, res["main_calls"], times, depth=res["depth"])
        return EngineOutput(codes=layers_to_codes(tokens), actions=actions, mode=self.mode, times=times, **res)

    def __call__(self, hidden: torch.Tensor) -> EngineOutput:
        return self.predict(hidden)


# ---------------------------------------------------------------------- distillation targets
def greedy_tokens(main, hidden, batch_size: int = 256, device: torch.device | str | None = None) -> np.ndarray:
    """The main model's greedy tokens (the baseline engine) for hidden states ``[N, D]`` -> uint8 ``[N, 8, P]``;
    layers the main model was not trained for hold the centre level (as at a smaller ``depth``)."""
    engine = RSDInferenceEngine(main, mode="baseline", device=device,
                                depth=int(getattr(main, "trained_layers", getattr(main, "num_layers", 8))))
    out = []
    for i in range(0, hidden.shape[0], batch_size):
        h = torch.from_numpy(np.array(hidden[i:i + batch_size], dtype=np.float32))  # a copy (memmaps are read-only)
        out.append(engine.predict(h, decode=False).tokens.to("cpu", torch.uint8).numpy())
    return np.concatenate(out) if out else np.zeros((0, engine.num_layers, engine.num_positions or 0), np.uint8)
