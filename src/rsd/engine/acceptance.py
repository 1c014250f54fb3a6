"""Acceptance rules of speculative decoding: which drafted layers the main model's verification keeps.

Kept apart from the engine so analysis code and tests can apply a rule to stored tokens without an engine.
"""

from __future__ import annotations

import torch


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
