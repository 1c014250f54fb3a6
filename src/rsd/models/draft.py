"""The draft model: one backbone hidden state -> logits of the 3 coarse RFSQ layers.

Parameter names and shapes match the original project's ``RFSQDraftModelWithProjection`` so its
checkpoints load unchanged (see ``rsd.models.checkpoint``).
"""

from __future__ import annotations

import torch
from torch import nn


class DraftTransformerDecoder(nn.Module):
    """A single pre-norm transformer decoder layer over a length-1 sequence."""

    def __init__(self, hidden_dim: int = 512, num_heads: int = 8, feedforward_dim: int = 2048,
                 max_positions: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.position_encoding = nn.Parameter(torch.randn(1, max_positions, hidden_dim) * 0.02)
        self.decoder_layer = nn.TransformerDecoderLayer(
            d_model=hidden_dim, nhead=num_heads, dim_feedforward=feedforward_dim, dropout=dropout,
            activation="gelu", batch_first=True, norm_first=True,
        )
        self.output_norm = nn.LayerNorm(hidden_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, H]`` -> ``[B, S, H]`` (self-attends as both target and memory)."""
        x = x + self.position_encoding[:, : x.shape[1]]
        return self.output_norm(self.decoder_layer(x, x))


class RFSQDraftModelWithProjection(nn.Module):
    """Projects a 4096-d hidden state to 512 and predicts the coarse layers ``[B, 3, 128, 7]``."""

    def __init__(self, input_dim: int = 4096, hidden_dim: int = 512, num_coarse_layers: int = 3,
                 chunk_len: int = 8, action_hidden_dim: int = 16, grid_size: int = 7,
                 num_heads: int = 8, feedforward_dim: int = 2048, dropout: float = 0.1) -> None:
        super().__init__()
        # constructor arguments, saved with the weights (a plain attribute: the state_dict is unchanged)
        self.config = dict(input_dim=input_dim, hidden_dim=hidden_dim, num_coarse_layers=num_coarse_layers,
                           chunk_len=chunk_len, action_hidden_dim=action_hidden_dim, grid_size=grid_size,
                           num_heads=num_heads, feedforward_dim=feedforward_dim, dropout=dropout)
        self.input_dim = input_dim
        self.num_coarse_layers = num_coarse_layers
        self.num_positions = chunk_len * action_hidden_dim
        self.grid_size = grid_size
        self.input_projection = nn.Linear(input_dim, hidden_dim)
        self.decoder = DraftTransformerDecoder(hidden_dim, num_heads, feedforward_dim, dropout=dropout)
        self.classification_heads = nn.ModuleList(
            nn.Sequential(
                nn.Linear(hidden_dim, hidden_dim // 2),
                nn.GELU(),
                nn.LayerNorm(hidden_dim // 2),
                nn.Linear(hidden_dim // 2, self.num_positions * grid_size),
            )
            for _ in range(num_coarse_layers)
        )

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden``: ``[B, input_dim]`` -> logits ``[B, num_coarse_layers, 128, grid_size]``."""
        if hidden.ndim != 2 or hidden.shape[-1] != self.input_dim:
            raise ValueError(f"draft model expects hidden states [B, {self.input_dim}], got {tuple(hidden.shape)}")
        x = self.input_projection(hidden).unsqueeze(1)
        x = self.decoder(x).squeeze(1)
        logits = [head(x).view(-1, self.num_positions, self.grid_size) for head in self.classification_heads]
        return torch.stack(logits, dim=1)

    @torch.no_grad()
    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy coarse tokens ``[B, num_coarse_layers, 128]`` (what the engine drafts)."""
        return self.forward(hidden).argmax(-1)
