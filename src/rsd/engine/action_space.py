"""Action-space tools of the engine: decoding token prefixes, the epsilon acceptance rule, exit bounds.

Everything here measures actions in the tokenizer's *normalized* units (``[-1, 1]`` per dimension from
the training demos' 1st/99th percentiles, see ``rsd.tokenizer.normalizer``), with the norm

    ``dist(a, b) = max |a - b|`` over the 8 x 7 chunk, before the gripper is binarized.

Why that norm: normalized units make the 7 dimensions comparable (a raw-unit max would be dominated by
whichever dimension has the widest range); the max over the chunk bounds every single action component
the robot executes, so "at most epsilon" holds per step and per joint, not on average. Before
binarization because binarization is a step function: a bound on the continuous gripper value is the
only bound that can be stated (a gripper value within epsilon of 0 can still flip sign).

Prefix decoding: layers of a token tensor ``[B, 8, 128]`` that are not decoded hold the *centre level*
``num_levels // 2``. ``ResidualFSQ`` maps the centre level to exactly ``0.0`` (``_term``), and adding
``0.0`` to the float64 accumulator changes nothing, so decoding a centre-padded tensor with all 8 layers
equals ``decode(codes, num_layers=D)`` bit for bit (tested). That lets candidates of different depths be
decoded in ONE batched tokenizer call.

Tail bounds (residual early exit): with ``D`` layers decoded, the remaining layers ``D..L-1`` can add at
most ``t_D = sum_{i>=D} s_i`` to each latent coordinate (``s_i = levels**-i``, whatever codes they hold),
so the full latent lies in the box ``z_D +- t_D``. :class:`IntervalTailBound` pushes that box through the
tokenizer's decoder with interval arithmetic (float64): the result bounds what ANY completion of the
remaining layers can change in the decoded action, for this very prefix. It is sound (up to the float32
rounding of the real decode, ~1e-6) and much tighter than a global Lipschitz constant, because the
box is small and GELU's slope is measured on the actual interval. :func:`empirical_tail_bounds` is the
alternative the engine also accepts (``tail_bounds=``): the largest change seen on data, NOT a bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from rsd.tokenizer.layout import layers_to_codes

#: argmin of the exact GELU ``x * Phi(x)`` (its only minimum; decreasing before, increasing after)
GELU_ARGMIN = -0.7517915246935645


def centre_level(num_levels: int) -> int:
    """The level that RFSQ decodes as zero (levels are odd: ``0..levels-1`` centred on ``levels // 2``)."""
    return int(num_levels) // 2


def pad_prefix(tokens: torch.Tensor, depth: int | torch.Tensor, num_levels: int) -> torch.Tensor:
    """Tokens ``[B, L, P]`` with layers ``>= depth`` (int or per-sample ``[B]``) set to the centre level."""
    layer = torch.arange(tokens.shape[1], device=tokens.device).view(1, -1, 1)
    d = torch.as_tensor(depth, device=tokens.device).view(-1, 1, 1)
    return torch.where(layer < d, tokens, torch.full_like(tokens, centre_level(num_levels)))


def normalized_decoder(tokenizer, normalizer=None) -> Callable[[torch.Tensor], torch.Tensor]:
    """``tokens [B, L, P] -> normalized actions [B, 8, 7]`` (float): the space epsilon is measured in.

    Uses ``tokenizer.decode_normalized`` (``RFSQTokenizer``); a tokenizer without it is accepted only when
    the engine was given a ``normalizer`` (its ``decode`` then returns normalized actions already).
    """
    fn = getattr(tokenizer, "decode_normalized", None)
    if fn is None:
        if normalizer is None:
            raise ValueError("action-space rules (epsilon, early exit) need a tokenizer with "
                             "decode_normalized(codes) (rsd.tokenizer.rfsq.RFSQTokenizer)")
        fn = tokenizer.decode
    return lambda tokens: fn(layers_to_codes(tokens)).float()


def action_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``[N, T, A]`` x2 -> ``[N]``: max abs difference over the chunk (the module docstring's norm)."""
    return (a - b).abs().flatten(1).amax(dim=1)


def epsilon_accept(drafted: torch.Tensor, verified: torch.Tensor, decode: Callable[[torch.Tensor], torch.Tensor],
                   epsilon: float, num_layers: int, num_levels: int) -> torch.Tensor:
    """``[B, n]`` bool: drafted layer ``j`` instead of the main model's, after drafted ``0..j-1``, moves the
    decoded ``(j+1)``-layer prefix by at most ``epsilon`` (normalized units, max abs over the chunk).

    ``verified[:, j]`` is the main model's greedy layer ``j`` given the drafted layers ``< j`` (what one
    verification call returns), so both candidates share the prefix and differ only in layer ``j``. All
    ``2 n B`` candidate prefixes are decoded in one call (centre-padded, see the module docstring). A layer
    equal to the main model's has distance exactly 0, so strict acceptance implies epsilon acceptance.
    """
    b, n, p = drafted.shape
    if n == 0:
        return torch.zeros(b, 0, dtype=torch.bool, device=drafted.device)
    centre = centre_level(num_levels)
    cand = torch.full((2, n, b, num_layers, p), centre, dtype=torch.long, device=drafted.device)
    for j in range(n):
        cand[:, j, :, :j] = drafted[:, :j]
        cand[0, j, :, j] = drafted[:, j]
        cand[1, j, :, j] = verified[:, j]
    actions = decode(cand.view(2 * n * b, num_layers, p))
    actions = actions.view(2, n * b, *actions.shape[1:])
    dist = action_distance(actions[0], actions[1]).view(n, b)
    return (dist <= float(epsilon)).T


def latent_tail(num_layers: int, num_levels: int) -> list[float]:
    """``t[D]`` for ``D = 0..L``: the most layers ``D..L-1`` can add to one latent coordinate (``t[L] = 0``)."""
    s = [float(num_levels) ** (-i) for i in range(num_layers)]
    return [math.fsum(s[d:]) for d in range(num_layers + 1)]


class IntervalTailBound:
    """Sound bound on ``dist(decode(prefix_D + any completion), decode(prefix_D))`` per sample.

    Needs an ``RFSQTokenizer``-like object: ``quantizer`` (``ResidualFSQ``: ``num_layers``, ``num_levels``,
    ``dequantize``) and ``decoder`` (``ResidualMLP``: ``linear`` + ``mlp`` of Linear / GELU / ReLU /
    Identity / Dropout) with ``chunk_len`` and ``action_dim``. The decoder's weights are copied to float64
    once, so a later change of the tokenizer's weights needs a new instance.
    """

    def __init__(self, tokenizer) -> None:
        q, dec = getattr(tokenizer, "quantizer", None), getattr(tokenizer, "decoder", None)
        if q is None or dec is None or not hasattr(dec, "linear") or not hasattr(dec, "mlp"):
            raise ValueError("the interval exit bound needs an RFSQTokenizer (quantizer + ResidualMLP decoder); "
                             "pass tail_bounds=[...] instead (e.g. rsd.engine.action_space.empirical_tail_bounds)")
        self.num_layers, self.num_levels = int(q.num_layers), int(q.num_levels)
        self.quantizer = q
        self.chunk_len, self.action_dim = int(tokenizer.chunk_len), int(tokenizer.action_dim)
        self.tail = latent_tail(self.num_layers, self.num_levels)
        self._floor: list[float] | None = None
        self.linear = self._linear(dec.linear)
        self.mlp: list[tuple[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None]] = []
        for m in dec.mlp:
            if isinstance(m, nn.Linear):
                self.mlp.append(("linear", self._linear(m)))
            elif isinstance(m, nn.GELU):
                if m.approximate != "none":
                    raise ValueError("the interval exit bound supports the exact GELU only")
                self.mlp.append(("gelu", None))
            elif isinstance(m, nn.ReLU):
                self.mlp.append(("relu", None))
            elif not isinstance(m, (nn.Identity, nn.Dropout)):
                raise ValueError(f"the interval exit bound does not support {type(m).__name__} in the decoder")

    @staticmethod
    def _linear(m: nn.Linear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(W^T, |W|^T, b)`` in float64 (transposed once: the bound is a few ``x @ W^T`` per check)."""
        w = m.weight.detach().to(torch.float64)
        b = torch.zeros(w.shape[0], dtype=torch.float64, device=w.device) if m.bias is None else \
            m.bias.detach().to(torch.float64)
        return w.T.contiguous(), w.abs().T.contiguous(), b

    @staticmethod
    def _affine(lo: torch.Tensor, hi: torch.Tensor, wb: tuple[torch.Tensor, torch.Tensor, torch.Tensor]):
        wt, abs_wt, b = wb
        c, r = (hi + lo) / 2, (hi - lo) / 2
        c2, r2 = torch.addmm(b, c, wt), r @ abs_wt
        return c2 - r2, c2 + r2

    @staticmethod
    def _gelu(lo: torch.Tensor, hi: torch.Tensor):
        g = torch.nn.functional.gelu
        low = g(torch.minimum(torch.maximum(torch.full_like(lo, GELU_ARGMIN), lo), hi)) - 1e-12
        return low, torch.maximum(g(lo), g(hi))

    def interval(self, z_lo: torch.Tensor, z_hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Latent box ``[B, T*D]`` (float64) -> a box containing the decoder's output ``[B, T*A]``."""
        lo, hi = self._affine(z_lo, z_hi, self.linear)
        mlo, mhi = z_lo, z_hi
        for kind, wb in self.mlp:
            if kind == "linear":
                mlo, mhi = self._affine(mlo, mhi, wb)
            elif kind == "gelu":
                mlo, mhi = self._gelu(mlo, mhi)
            else:
                mlo, mhi = mlo.clamp_min(0), mhi.clamp_min(0)
        return lo + mlo, hi + mhi

    @property
    def floor(self) -> list[float]:
        """A prefix-independent LOWER bound of ``self(tokens, D)`` per depth: the linear path's radius
        ``max_i sum_j |W_ij| t_D`` (the interval's half-width is at least that). Where it exceeds a
        threshold the exit test cannot pass, so the engine skips computing it (same decision)."""
        if self._floor is None:
            row = self.linear[1].sum(dim=0)  # [T*A]: sum_j |W_ij|
            self._floor = [float(row.max()) * t for t in self.tail]
        return self._floor

    def __call__(self, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        """Tokens ``[B, L, P]`` (layers ``< depth`` used) -> ``[B]`` float64 bound for stopping at ``depth``."""
        if depth >= self.num_layers:
            return torch.zeros(tokens.shape[0], dtype=torch.float64, device=tokens.device)
        b = tokens.shape[0]
        codes = layers_to_codes(tokens, self.chunk_len)
        z = self.quantizer.dequantize(codes, depth, dtype=torch.float64).flatten(1).to(self.linear[0].device)
        t = self.tail[depth]
        # one pass: rows 0..B-1 the box z +- t, rows B..2B-1 the point z (the prefix decode itself)
        lo, hi = self.interval(torch.cat([z - t, z]), torch.cat([z + t, z]))
        centre = (lo[b:] + hi[b:]) / 2
        return torch.maximum(hi[:b] - centre, centre - lo[:b]).amax(dim=1)


def empirical_tail_bounds(decode: Callable[[torch.Tensor], torch.Tensor], tokens: torch.Tensor,
                          num_levels: int, batch_size: int = 1024) -> list[float]:
    """``r[D]``, ``D = 0..L``: the largest ``dist(decode(tokens), decode(first D layers))`` seen on ``tokens``.

    A measurement on data (e.g. the main model's tokens on training frames), not a bound: held-out
    chunks can exceed it. ``r[0]`` is not used by the engine (at least one layer is always decoded).
    """
    n_layers = tokens.shape[1]
    out = [0.0] * (n_layers + 1)
    with torch.inference_mode():
        for i in range(0, tokens.shape[0], batch_size):
            t = tokens[i:i + batch_size].long()
            full = decode(t)
            for d in range(1, n_layers):
                out[d] = max(out[d], float(action_distance(decode(pad_prefix(t, d, num_levels)), full).max()))
    out[0] = math.inf
    return out


def mean_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Logits ``[B, P, V]`` -> ``[B]`` mean per-token entropy (nats) of the softmax, in float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean(-1)


def chance_threshold(num_levels: int, fraction: float) -> float:
    """Entropy (nats) above which a layer counts as "no better than chance": ``fraction * log(levels)``."""
    return float(fraction) * math.log(num_levels)


__all__: Sequence[str] = (
    "GELU_ARGMIN", "IntervalTailBound", "action_distance", "centre_level", "chance_threshold",
    "empirical_tail_bounds", "epsilon_accept", "latent_tail", "mean_entropy", "normalized_decoder", "pad_prefix",
)
