"""The fixed RFSQ token layout and conversions between its three views.

- codes:  ``[B, 8 chunk, 16 latent, 8 layers]`` (what the tokenizer produces and decodes)
- layers: ``[B, 8 layers, 128 positions]`` with position ``p = t * 16 + d`` (draft and engine view)
- main:   ``[B, 8 layers, 8 chunk, 16 latent]`` (the main model's token tensor)
"""

from __future__ import annotations

import torch

CHUNK_LEN = 8
ACTION_DIM = 7
LATENT_DIM = 16
NUM_LAYERS = 8
NUM_LEVELS = 7
NUM_POSITIONS = CHUNK_LEN * LATENT_DIM


def codes_to_layers(codes: torch.Tensor) -> torch.Tensor:
    """``[B, T, D, L]`` -> ``[B, L, T*D]``."""
    b, t, d, n = codes.shape
    return codes.permute(0, 3, 1, 2).reshape(b, n, t * d)


def layers_to_codes(layers: torch.Tensor, chunk_len: int = CHUNK_LEN) -> torch.Tensor:
    """``[B, L, T*D]`` -> ``[B, T, D, L]``."""
    b, n, p = layers.shape
    return layers.reshape(b, n, chunk_len, p // chunk_len).permute(0, 2, 3, 1)
