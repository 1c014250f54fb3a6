"""Per-dimension q01/q99 action normalization, stored with the tokenizer (buffers in its state dict).

``normalize``: ``2 * (x - q01) / (q99 - q01) - 1`` clipped to ``[-1, 1]`` (the OpenVLA convention).
Dimensions listed in ``skip_dims`` (the gripper, already -1 open / +1 close) are only clipped.
A dimension whose q01 equals q99 (constant in the training demos) maps to 0 and back to that constant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn


class ActionNormalizer(nn.Module):
    """q01/q99 normalizer for ``[..., action_dim]`` actions; ``fit`` before use."""

    def __init__(self, action_dim: int = 7, skip_dims: Sequence[int] = (6,), eps: float = 1e-6) -> None:
        super().__init__()
        self.action_dim = action_dim
        self.eps = eps
        skip = torch.zeros(action_dim, dtype=torch.bool)
        for d in skip_dims:
            skip[d] = True
        self.register_buffer("q01", -torch.ones(action_dim))
        self.register_buffer("q99", torch.ones(action_dim))
        self.register_buffer("skip", skip)
        self.register_buffer("fitted", torch.tensor(False))

    @torch.no_grad()
    def fit(self, actions: np.ndarray | torch.Tensor) -> ActionNormalizer:
        """Set q01/q99 from ``[N, action_dim]`` (or ``[..., action_dim]``) raw actions."""
        a = np.asarray(actions.cpu() if isinstance(actions, torch.Tensor) else actions, dtype=np.float64)
        a = a.reshape(-1, a.shape[-1])
        if a.shape[-1] != self.action_dim or a.shape[0] == 0:
            raise ValueError(f"fit expects actions [N, {self.action_dim}] with N >= 1, got {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError("fit: actions contain NaN or inf")
        q01, q99 = np.quantile(a, [0.01, 0.99], axis=0)
        self.q01.copy_(torch.as_tensor(q01, dtype=torch.float32))
        self.q99.copy_(torch.as_tensor(q99, dtype=torch.float32))
        self.fitted.fill_(True)
        return self

    def _scale(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        span = self.q99 - self.q01
        degenerate = (span < self.eps) & ~self.skip
        return span.clamp_min(self.eps), degenerate, self.skip

    def normalize(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw ``[..., A]`` -> ``[-1, 1]``."""
        span, degenerate, skip = self._scale()
        x = actions.to(self.q01.dtype)
        out = 2.0 * (x - self.q01) / span - 1.0
        out = torch.where(skip, x, out)
        out = torch.where(degenerate, torch.zeros_like(out), out)
        return out.clamp(-1.0, 1.0)

    def unnormalize(self, normalized: torch.Tensor) -> torch.Tensor:
        """``[-1, 1]`` ``[..., A]`` -> raw units (the gripper dimension is returned clipped, not binarized)."""
        span, degenerate, skip = self._scale()
        x = normalized.to(self.q01.dtype).clamp(-1.0, 1.0)
        out = (x + 1.0) * 0.5 * span + self.q01
        out = torch.where(skip, x, out)
        return torch.where(degenerate, self.q01.expand_as(out), out)

    def stats(self) -> dict:
        """Plain-python statistics (stored in the tokenizer file and feature-cache manifests)."""
        return {
            "q01": [float(v) for v in self.q01],
            "q99": [float(v) for v in self.q99],
            "skip_dims": [int(i) for i in torch.nonzero(self.skip).flatten()],
        }

    def extra_repr(self) -> str:
        return f"action_dim={self.action_dim}, skip_dims={self.stats()['skip_dims']}"
