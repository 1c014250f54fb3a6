"""Where a greedy token may be claimed exact across call paths (not a test module).

The same float32 logits computed through another path (one verification call vs single KV-cached steps,
batch 1 vs batch 16, compiled vs eager) round differently: by about 2e-7 on the CPU these tests were
written on, and up to ~1e-6 on CPUs with other matrix kernels (the logits here are of order 0.1-1). A
greedy token is therefore claimed equal across paths only where the top-2 gap of its logits exceeds
``LOGIT_MARGIN`` (20x the largest of those differences); closer calls are near-ties whose argmax may
legitimately flip on another CPU.
"""

from __future__ import annotations

import torch

LOGIT_MARGIN = 2e-5


def top2_gap(logits: torch.Tensor) -> torch.Tensor:
    """``[..., V]`` -> ``[...]``: largest minus second largest logit."""
    top2 = logits.float().topk(2, dim=-1).values
    return top2[..., 0] - top2[..., 1]


def sample_min_gap(logits: torch.Tensor) -> torch.Tensor:
    """``[B, ..., V]`` -> ``[B]``: the smallest top-2 gap over each sample's greedy choices."""
    return top2_gap(logits).flatten(1).min(dim=1).values


def teacher_forced_gap(main, hidden: torch.Tensor, tokens: torch.Tensor, depth: int = 8) -> torch.Tensor:
    """``[B]``: the smallest top-2 gap of ``main``'s logits for layers ``0..depth-1`` of ``tokens`` (its own
    greedy tokens: the logits every greedy choice of the decode was made from)."""
    with torch.inference_mode():
        logits = main(hidden, tokens[:, :7])
    return sample_min_gap(logits[:, :depth])


def assert_tokens_equal_up_to_near_ties(out: torch.Tensor, ref: torch.Tensor, gaps: torch.Tensor) -> None:
    """Greedy layer tokens ``[B, L, P]`` of two call paths agree, except that the first layer where a sample
    differs may differ only at near-ties of ``ref``'s logits (``gaps`` ``[B, L, P]`` <= ``LOGIT_MARGIN``); the
    layers after it are conditioned on the flipped token and are not compared."""
    for b in range(ref.shape[0]):
        diff = (out[b] != ref[b]).any(-1).nonzero()
        if len(diff):
            k = int(diff[0])
            bad = (out[b, k] != ref[b, k]) & (gaps[b, k] > LOGIT_MARGIN)
            assert not bad.any(), f"sample {b} layer {k}: {int(bad.sum())} confident tokens differ"
