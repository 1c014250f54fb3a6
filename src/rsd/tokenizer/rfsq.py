"""The RFSQ action tokenizer: action chunk ``[B, 8, 7]`` <-> codes ``[B, 8 chunk, 16 latent, 8 layers]``.

Pipeline: raw actions -> q01/q99 normalization (``ActionNormalizer``) -> encoder (flattened chunk,
linear path + residual MLP) -> latent ``[B, 8, 16]`` clipped to ``[-1, 1]`` -> residual FSQ
(``ResidualFSQ``: 8 layers x 7 levels, fixed per-layer scales) -> decoder (linear path + residual
MLP) -> normalized actions -> unnormalize.

Residuals are never normalized by batch statistics (which a decoder could not reproduce from the codes
alone): every layer ``k`` here quantizes ``residual / s_k`` with the fixed scale ``s_k = levels**-k``,
so the codes alone determine the decoded latent: ``dequantize(codes)`` reproduces the quantized latent
of the forward pass bit for bit (see ``ResidualFSQ``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from rsd.tokenizer.layout import ACTION_DIM, CHUNK_LEN, LATENT_DIM, NUM_LAYERS, NUM_LEVELS
from rsd.tokenizer.normalizer import ActionNormalizer

FILE_FORMAT = "rsd.rfsq_tokenizer"
FILE_VERSION = 1
RETRAIN_HINT = ("Retrain the tokenizer with `python train.py experiment=rfsq` (writes "
                "data/tokenizers/rfsq_{suite}.pt) or pass the tokenizer file that matches this project.")


class TokenizerCheckpointError(RuntimeError):
    """A tokenizer file is missing, unreadable, or does not match the expected shapes."""


class ResidualFSQ(nn.Module):
    """Residual finite scalar quantization with fixed per-layer scales.

    Layer ``k`` (0-based) rounds ``residual_k / s_k`` to the grid ``{-h..h} / h`` (``h = (levels-1)/2``,
    7 levels -> ``{-1, -2/3, ..., 1}``) with ``s_k = levels**-k``. With ``|z| <= 1`` the residual after
    layer ``k`` is at most ``s_k / (levels - 1)``, which is exactly the range layer ``k+1`` covers, so
    no layer saturates; the error after ``n`` layers is at most ``levels**-(n-1) / (levels - 1)``.

    Arithmetic is float64 and dequantization is a fixed left-to-right sum of per-layer terms, the same
    code path the forward pass uses, so ``dequantize(codes, n)`` equals the forward pass's quantized
    latent for ``n`` layers exactly.
    """

    def __init__(self, num_layers: int = NUM_LAYERS, num_levels: int = NUM_LEVELS) -> None:
        super().__init__()
        if num_levels < 3 or num_levels % 2 == 0:
            raise ValueError(f"num_levels must be odd and >= 3, got {num_levels}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.num_layers = num_layers
        self.num_levels = num_levels
        self.half = (num_levels - 1) // 2

    def scale(self, k: int) -> float:
        return float(self.num_levels) ** (-k)

    def _term(self, code_k: torch.Tensor, k: int) -> torch.Tensor:
        """The float64 contribution of layer ``k`` given its codes (0..levels-1)."""
        return (code_k.to(torch.float64) - self.half) / self.half * self.scale(k)

    def _check_layers(self, num_layers: int | None) -> int:
        n = self.num_layers if num_layers is None else int(num_layers)
        if not 1 <= n <= self.num_layers:
            raise ValueError(f"num_layers must be in 1..{self.num_layers}, got {num_layers}")
        return n

    @torch.no_grad()
    def codes(self, z: torch.Tensor) -> torch.Tensor:
        """``z [..., D]`` in ``[-1, 1]`` -> codes ``[..., D, L]`` (long, 0..levels-1)."""
        residual = z.detach().to(torch.float64).clamp(-1.0, 1.0)
        out = []
        for k in range(self.num_layers):
            idx = torch.round(residual * (float(self.num_levels) ** k) * self.half)
            code = (idx.clamp(-self.half, self.half) + self.half).long()
            residual = residual - self._term(code, k)
            out.append(code)
        return torch.stack(out, dim=-1)

    def dequantize(self, codes: torch.Tensor, num_layers: int | None = None,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Codes ``[..., D, L]`` -> latent ``[..., D]`` from the first ``num_layers`` layers (all if None)."""
        if codes.shape[-1] != self.num_layers:
            raise ValueError(f"codes must end with {self.num_layers} layers, got shape {tuple(codes.shape)}")
        n = self._check_layers(num_layers)
        acc = torch.zeros(codes.shape[:-1], dtype=torch.float64, device=codes.device)
        for k in range(n):
            acc = acc + self._term(codes[..., k], k)
        return acc.to(dtype)

    def dequantize_prefixes(self, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """All prefixes at once: ``[..., D, L]`` -> ``[..., D, L]`` where ``[..., n-1]`` uses ``n`` layers.

        Entry ``n-1`` is bitwise equal to ``dequantize(codes, n)`` (same sequence of float64 adds).
        """
        acc = torch.zeros(codes.shape[:-1], dtype=torch.float64, device=codes.device)
        out = []
        for k in range(self.num_layers):
            acc = acc + self._term(codes[..., k], k)
            out.append(acc)
        return torch.stack(out, dim=-1).to(dtype)

    def quantize(self, z: torch.Tensor, num_layers: int | torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``z [B, ..., D]`` -> ``(z_q, codes)`` with a straight-through gradient.

        ``num_layers``: None (all), an int, or a LongTensor ``[B]`` of per-sample prefix lengths
        (quantizer dropout). ``codes`` always holds all layers. The forward value of ``z_q`` is exactly
        ``dequantize(codes, n)``: the straight-through term ``z - z.detach()`` is exactly zero.
        """
        codes = self.codes(z)
        if num_layers is None or isinstance(num_layers, int):
            zq = self.dequantize(codes, num_layers, dtype=z.dtype)
        else:
            n = torch.as_tensor(num_layers, device=z.device).long()
            if n.ndim != 1 or n.shape[0] != z.shape[0]:
                raise ValueError(f"per-sample num_layers must be [B={z.shape[0]}], got {tuple(n.shape)}")
            if n.min() < 1 or n.max() > self.num_layers:
                raise ValueError(f"num_layers must be in 1..{self.num_layers}")
            prefixes = self.dequantize_prefixes(codes, dtype=z.dtype)
            index = (n - 1).view(-1, *([1] * (prefixes.ndim - 1))).expand(*prefixes.shape[:-1], 1)
            zq = prefixes.gather(-1, index).squeeze(-1)
        return zq + (z - z.detach()), codes

    def extra_repr(self) -> str:
        return f"num_layers={self.num_layers}, num_levels={self.num_levels}, scales=levels**-k"


class ResidualMLP(nn.Module):
    """``Linear(x) + MLP(x)``: a linear path plus a zero-initialised MLP correction (nearly invertible)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int, depth: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_dim, out_dim)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(depth):
            layers += [nn.Linear(d, hidden_dim), nn.GELU()]
            d = hidden_dim
        last = nn.Linear(d, out_dim)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x) + self.mlp(x)


class RFSQTokenizer(nn.Module):
    """Action chunks <-> RFSQ codes, with its normalizer. See the module docstring."""

    def __init__(self, action_dim: int = ACTION_DIM, chunk_len: int = CHUNK_LEN, latent_dim: int = LATENT_DIM,
                 num_layers: int = NUM_LAYERS, num_levels: int = NUM_LEVELS, hidden_dim: int = 256,
                 mlp_depth: int = 2, gripper_dim: int | None = 6) -> None:
        super().__init__()
        self.config = dict(action_dim=action_dim, chunk_len=chunk_len, latent_dim=latent_dim,
                           num_layers=num_layers, num_levels=num_levels, hidden_dim=hidden_dim,
                           mlp_depth=mlp_depth, gripper_dim=gripper_dim)
        self.action_dim = action_dim
        self.chunk_len = chunk_len
        self.latent_dim = latent_dim
        self.num_layers = num_layers
        self.num_levels = num_levels
        skip = () if gripper_dim is None else (gripper_dim,)
        self.normalizer = ActionNormalizer(action_dim, skip_dims=skip)
        self.encoder = ResidualMLP(chunk_len * action_dim, chunk_len * latent_dim, hidden_dim, mlp_depth)
        self.quantizer = ResidualFSQ(num_layers, num_levels)
        self.decoder = ResidualMLP(chunk_len * latent_dim, chunk_len * action_dim, hidden_dim, mlp_depth)
        #: training metadata stored in the file (suite, episodes, metrics...); plain python values only
        self.metadata: dict[str, Any] = {}

    # ------------------------------------------------------------------ core
    def _check_actions(self, actions: torch.Tensor) -> torch.Tensor:
        actions = torch.as_tensor(actions)
        if actions.ndim != 3 or tuple(actions.shape[1:]) != (self.chunk_len, self.action_dim):
            raise ValueError(f"expected action chunks [B, {self.chunk_len}, {self.action_dim}], "
                             f"got {tuple(actions.shape)}")
        return actions

    def _check_codes(self, codes: torch.Tensor) -> torch.Tensor:
        codes = torch.as_tensor(codes)
        want = (self.chunk_len, self.latent_dim, self.num_layers)
        if codes.ndim != 4 or tuple(codes.shape[1:]) != want:
            raise ValueError(f"expected codes [B, {want[0]}, {want[1]}, {want[2]}], got {tuple(codes.shape)}")
        if codes.is_floating_point():
            raise ValueError(f"codes must be integers, got {codes.dtype}")
        if codes.numel() and (codes.min() < 0 or codes.max() >= self.num_levels):
            raise ValueError(f"codes must be in 0..{self.num_levels - 1}, got "
                             f"{int(codes.min())}..{int(codes.max())}")
        return codes

    def pre_latent(self, actions_normalized: torch.Tensor) -> torch.Tensor:
        """Normalized ``[B, T, A]`` -> encoder output ``[B, T, D]`` before the bound."""
        b = actions_normalized.shape[0]
        h = self.encoder(actions_normalized.reshape(b, -1).to(self.encoder.linear.weight.dtype))
        return h.view(b, self.chunk_len, self.latent_dim)

    def latent(self, actions_normalized: torch.Tensor) -> torch.Tensor:
        """Normalized ``[B, T, A]`` -> bounded latent ``[B, T, D]`` in ``[-1, 1]``.

        The bound is a hard clip (identity inside), so the linear encoder/decoder paths stay exactly
        invertible; training keeps pre-activations inside with ``range_penalty``.
        """
        return self.pre_latent(actions_normalized).clamp(-1.0, 1.0)

    @staticmethod
    def range_penalty(pre_latent: torch.Tensor) -> torch.Tensor:
        """Mean squared excess of the encoder output beyond ``[-1, 1]`` (0 when inside)."""
        return (pre_latent.abs() - 1.0).clamp_min(0.0).pow(2).mean()

    @torch.no_grad()
    def init_from_data(self, actions_normalized: torch.Tensor, fill: float = 0.9, quantile: float = 0.999,
                       seed: int = 0) -> None:
        """Data-dependent init: an invertible linear encoder/decoder pair before training.

        Encoder: ``z = diag(a) R (x - mean)`` with ``R`` a random ``[T*D, T*A]`` matrix with orthonormal
        columns (every latent mixes all of the chunk, quantization noise averages out) and per-latent
        scales ``a`` that put the ``quantile`` of ``|z|`` at ``fill``. Decoder: its exact left inverse.
        The MLP corrections start at zero, so the untrained tokenizer already reconstructs up to
        quantization and clipping error; training then shapes it for coarse prefixes.
        """
        x = actions_normalized.reshape(actions_normalized.shape[0], -1).double()
        n_in, n_lat = x.shape[1], self.chunk_len * self.latent_dim
        gen = torch.Generator().manual_seed(seed)
        r, _ = torch.linalg.qr(torch.randn(n_lat, n_in, generator=gen, dtype=torch.float64))
        mean = x.mean(0)
        z = (x - mean) @ r.T
        a = fill / torch.quantile(z.abs()[: 200_000], quantile, dim=0).clamp_min(1e-6)
        w = a[:, None] * r
        enc, dec = self.encoder.linear, self.decoder.linear
        enc.weight.copy_(w.to(enc.weight.dtype))
        enc.bias.copy_((-(w @ mean)).to(enc.bias.dtype))
        dec.weight.copy_(torch.linalg.pinv(w).to(dec.weight.dtype))
        dec.bias.copy_(mean.to(dec.bias.dtype))

    def decode_latent(self, z_q: torch.Tensor) -> torch.Tensor:
        """Latent ``[B, T, D]`` -> normalized actions ``[B, T, A]``."""
        b = z_q.shape[0]
        return self.decoder(z_q.reshape(b, -1)).view(b, self.chunk_len, self.action_dim)

    def forward(self, actions_normalized: torch.Tensor, num_layers: int | torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalized chunks ``[B, T, A]`` -> ``(recon_normalized [B,T,A], z_q [B,T,D], codes [B,T,D,L])``.

        ``num_layers``: decode from the first n layers (int, per-sample LongTensor ``[B]``, or None=all).
        """
        z = self.latent(self._check_actions(actions_normalized))
        z_q, codes = self.quantizer.quantize(z, num_layers)
        return self.decode_latent(z_q), z_q, codes

    # ------------------------------------------------------------------ public API in raw units
    @torch.no_grad()
    def encode(self, actions: torch.Tensor) -> torch.Tensor:
        """Raw action chunks ``[B, 8, 7]`` -> codes ``LongTensor [B, 8, 16, 8]`` (0..6)."""
        actions = self._check_actions(actions).to(self.normalizer.q01.device)
        return self.quantizer.codes(self.latent(self.normalizer.normalize(actions)))

    @torch.no_grad()
    def decode_normalized(self, codes: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Codes ``[B, 8, 16, 8]`` -> normalized actions ``[B, 8, 7]`` (what ``forward`` reconstructs)."""
        codes = self._check_codes(codes).to(self.normalizer.q01.device)
        dtype = self.decoder.linear.weight.dtype
        return self.decode_latent(self.quantizer.dequantize(codes, num_layers, dtype=dtype))

    @torch.no_grad()
    def decode(self, codes: torch.Tensor, num_layers: int | None = None) -> torch.Tensor:
        """Codes ``[B, 8, 16, 8]`` -> raw actions ``[B, 8, 7]`` (gripper continuous in [-1, 1]; binarize it)."""
        return self.normalizer.unnormalize(self.decode_normalized(codes, num_layers))

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def reconstruction_mse(self, actions: torch.Tensor, batch_size: int = 4096) -> list[float]:
        """MSE in normalized units (all action dims) for 1..L layers, over raw chunks ``[N, 8, 7]``."""
        sums = torch.zeros(self.num_layers, dtype=torch.float64)
        count = 0
        for i in range(0, actions.shape[0], batch_size):
            x = self.normalizer.normalize(torch.as_tensor(actions[i:i + batch_size]).to(self.normalizer.q01.device))
            z = self.latent(x)
            prefixes = self.quantizer.dequantize_prefixes(self.quantizer.codes(z), dtype=z.dtype)
            for n in range(self.num_layers):
                err = (self.decode_latent(prefixes[..., n]) - x).double().pow(2)
                sums[n] += err.sum().cpu()
            count += x.numel()
        return (sums / max(count, 1)).tolist()

    # ------------------------------------------------------------------ files
    def identity(self) -> str:
        """A stable hash of config, normalizer statistics and weights (feature-cache manifests record it)."""
        h = hashlib.sha256()
        h.update(json.dumps(self.config, sort_keys=True).encode())
        for name, tensor in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(np.ascontiguousarray(tensor.detach().cpu().numpy()).tobytes())
        return f"rfsq-{h.hexdigest()[:16]}"

    def save(self, path: str | os.PathLike, metadata: dict[str, Any] | None = None) -> Path:
        """Write the tokenizer file (atomically); returns its path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if metadata:
            self.metadata.update(metadata)
        payload = {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "config": dict(self.config),
            "state_dict": {k: v.detach().cpu().clone() for k, v in self.state_dict().items()},
            "normalizer": self.normalizer.stats(),
            "metadata": json.loads(json.dumps(self.metadata, default=str)),
            "identity": self.identity(),
        }
        tmp = path.with_name(path.name + ".tmp")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device = "cpu",
             expect_layout: bool = True) -> RFSQTokenizer:
        """Load a file written by ``save``. Raises ``TokenizerCheckpointError`` with what to do on failure.

        ``expect_layout``: also require the project's fixed token layout (chunk 8, latent 16, 8 layers,
        7 levels, 7-d actions), which every downstream stage depends on.
        """
        path = Path(path)
        if not path.is_file():
            raise TokenizerCheckpointError(f"RFSQ tokenizer file not found: {path}. {RETRAIN_HINT}")
        try:
            with open(path, "rb") as f:
                payload = torch.load(io.BytesIO(f.read()), map_location=map_location, weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means the same thing here
            raise TokenizerCheckpointError(
                f"RFSQ tokenizer file {path} is truncated or corrupt ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}). {RETRAIN_HINT}") from err
        missing = [k for k in ("config", "state_dict") if not isinstance(payload, dict) or k not in payload]
        if missing or payload.get("format", FILE_FORMAT) != FILE_FORMAT:
            raise TokenizerCheckpointError(
                f"{path} is not an rsd RFSQ tokenizer file (missing {missing or 'format tag'}). {RETRAIN_HINT}")
        config = dict(payload["config"])
        if expect_layout:
            want = dict(action_dim=ACTION_DIM, chunk_len=CHUNK_LEN, latent_dim=LATENT_DIM,
                        num_layers=NUM_LAYERS, num_levels=NUM_LEVELS)
            diff = {k: config.get(k) for k, v in want.items() if config.get(k) != v}
            if diff:
                raise TokenizerCheckpointError(
                    f"RFSQ tokenizer file {path} has shapes {diff}, but this project's token layout needs "
                    f"{ {k: want[k] for k in diff} } (codes [B, 8, 16, 8], actions [B, 8, 7]). {RETRAIN_HINT}")
        try:
            tok = cls(**config)
        except TypeError as err:
            raise TokenizerCheckpointError(f"RFSQ tokenizer file {path} has an unknown config {config} "
                                           f"({err}). {RETRAIN_HINT}") from err
        state = payload["state_dict"]
        own = tok.state_dict()
        problems = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                    for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
        absent = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        if problems or absent or extra:
            detail = "; ".join(problems[:4] + ([f"missing {absent[:4]}"] if absent else [])
                               + ([f"unexpected {extra[:4]}"] if extra else []))
            raise TokenizerCheckpointError(
                f"RFSQ tokenizer file {path} does not match its config {config} ({detail}). {RETRAIN_HINT}")
        tok.load_state_dict(state)
        tok.metadata = dict(payload.get("metadata") or {})
        stored = payload.get("identity")
        if stored is not None and stored != tok.identity():
            raise TokenizerCheckpointError(
                f"RFSQ tokenizer file {path} is inconsistent: stored identity {stored} != recomputed "
                f"{tok.identity()} (the weights were modified). {RETRAIN_HINT}")
        return tok.to(map_location).eval()
