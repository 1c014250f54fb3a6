"""The main model: a coarse-to-fine depth decoder over the 8 RFSQ layers (RQ-Transformer style).

Depth sequence (one step per RFSQ layer, all 128 tokens of a layer predicted at once)::

    position:   0              1         2        ...   7
    input:      proj(hidden)   emb(L0)   emb(L1)  ...   emb(L6)
    predicts:   L0             L1        L2       ...   L7

A causal pre-norm transformer runs over this length-8 sequence; the output at position ``k`` goes
through layer ``k``'s head to logits ``[B, 128, 7]``. Hence:

- ``forward(hidden, prefix)`` with a prefix of ``k`` layers returns the logits of layers ``0..k`` in
  ONE call (teacher forcing: give the 7 true layers ``L0..L6``, get the logits of all 8);
- ``score`` does the same while filling a :class:`DepthKVCache`, and ``extend`` appends layers to
  the cache and returns the logits of the next layers. The engine (``rsd.engine``) builds greedy and
  speculative decoding from these two calls; both decoding modes share this code path.

Layer embedding: every (position p, level v) pair has its own vector ``E[p * 7 + v]``; a layer's
embedding is the sum over its 128 positions (= a linear map of the flattened one-hot layer, i.e.
token embedding + position embedding flattened through one linear layer), followed by LayerNorm.

``trained_layers=K`` (< 8) trains and decodes only layers ``0..K-1``: teacher forcing runs ``K`` depth
positions instead of 8 (K = 3: ~2.5x less training compute per sample on the CPU), and the engine refuses a
depth above ``K``. Layers ``>= 3`` were at chance (1/7) in the 8-layer model and move the action by at most
~0.03 normalized units, so on the CPU budget of ``make train`` the compute goes to the layers that matter.

Size (defaults ``d_model=512, num_blocks=6, ff_dim=2048``): ~25M parameters; one incremental depth
step costs ~19M multiply-adds against ~7.5M for the whole draft model. Measured on the project's
2-core CPU at batch 1 (fp32, one thread): one main step 2-4x one draft call; the 4-position
verification call (hidden + 3 drafted layers) 1.4-1.7x one step (1.1-1.2x in bf16), which is what
keeps CPU speedups below the ideal ``8 / (8 - accepted)`` (``scripts/benchmark_engine.py``).
"""

from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rsd.tokenizer.layout import NUM_LAYERS, NUM_LEVELS, NUM_POSITIONS
from rsd.utils.serialization import UntrustedFileError, load_torch_file

MAIN_DECODER_FORMAT = "rsd.main_decoder"
MAIN_DECODER_FORMAT_VERSION = 1


class MainDecoderCheckpointError(ValueError):
    """A main decoder file is truncated, foreign or does not match its config."""


@dataclass
class DepthKVCache:
    """Keys/values of every block for the depth positions decoded so far (preallocated to a maximum length).

    ``length`` is the number of valid positions; ``truncate(n)`` drops the positions ``>= n``
    (rejected draft layers) without copying: they are overwritten by the next ``extend``.
    """

    keys: list[torch.Tensor]  # per block [B, heads, max_len, head_dim]
    values: list[torch.Tensor]
    length: int = 0

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        self.length = length


class DepthBlock(nn.Module):
    """Pre-norm causal self-attention + GELU MLP, with an optional KV cache."""

    def __init__(self, d_model: int, num_heads: int, ff_dim: int, dropout: float) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = d_model // num_heads
        self.dropout = dropout
        self.norm1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, ff_dim), nn.GELU(), nn.Linear(ff_dim, d_model))
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cache: DepthKVCache | None = None, index: int = 0,
                start: int = 0) -> torch.Tensor:
        """``x``: ``[B, T, d]`` at depth positions ``start .. start+T-1``."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if cache is not None:
            cache.keys[index][:, :, start:start + t] = k
            cache.values[index][:, :, start:start + t] = v
            k = cache.keys[index][:, :, :start + t]
            v = cache.values[index][:, :, :start + t]
        p = self.dropout if self.training else 0.0
        if t == 1:  # one new position attends to everything before it
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        elif start == 0:
            a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        else:  # new positions after a cached prefix: query i (absolute start+i) sees keys <= start+i
            mask = torch.ones(t, start + t, dtype=torch.bool, device=x.device).tril(diagonal=start)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        x = x + self.resid_dropout(self.proj(a.transpose(1, 2).reshape(b, t, d)))
        return x + self.resid_dropout(self.mlp(self.norm2(x)))


class RFSQMainDecoder(nn.Module):
    """Hidden state ``[B, input_dim]`` + RFSQ layers ``< k`` ``[B, k, 128]`` -> logits of layer k.

    See the module docstring for the depth sequence. ``config`` holds the constructor arguments
    (saved with the weights by :func:`save_main_decoder`).
    """

    def __init__(self, input_dim: int = 4096, d_model: int = 512, num_blocks: int = 6, num_heads: int = 8,
                 ff_dim: int = 2048, dropout: float = 0.0, num_layers: int = NUM_LAYERS,
                 num_positions: int = NUM_POSITIONS, num_levels: int = NUM_LEVELS,
                 hidden_norm: bool = True, trained_layers: int | None = None) -> None:
        super().__init__()
        trained = num_layers if trained_layers is None else int(trained_layers)
        if not 1 <= trained <= num_layers:
            raise ValueError(f"trained_layers must be in 1..{num_layers}, got {trained_layers!r}")
        self.config = dict(input_dim=input_dim, d_model=d_model, num_blocks=num_blocks, num_heads=num_heads,
                           ff_dim=ff_dim, dropout=dropout, num_layers=num_layers,
                           num_positions=num_positions, num_levels=num_levels, hidden_norm=hidden_norm,
                           trained_layers=trained)
        self.input_dim = input_dim
        self.d_model = d_model
        self.num_layers = num_layers
        #: layers 0..trained_layers-1 are trained (training cost grows with it: one depth position per layer);
        #: the heads of the others keep their initial weights, so decoding stops before them (engine depth)
        self.trained_layers = trained
        self.num_positions = num_positions
        self.num_levels = num_levels
        self.hidden_norm = nn.LayerNorm(input_dim) if hidden_norm else nn.Identity()
        self.hidden_projection = nn.Linear(input_dim, d_model)
        self.token_embedding = nn.Embedding(num_positions * num_levels, d_model)
        self.layer_norm_in = nn.LayerNorm(d_model)
        self.depth_embedding = nn.Parameter(torch.zeros(1, num_layers, d_model))
        self.embed_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(DepthBlock(d_model, num_heads, ff_dim, dropout) for _ in range(num_blocks))
        self.output_norm = nn.LayerNorm(d_model)
        # one head per RFSQ layer, stored batched: [L, P*V, d] / [L, P*V]
        self.head_weight = nn.Parameter(torch.empty(num_layers, num_positions * num_levels, d_model))
        self.head_bias = nn.Parameter(torch.zeros(num_layers, num_positions * num_levels))
        self.register_buffer("position_offsets", torch.arange(num_positions) * num_levels, persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=1.0 / math.sqrt(self.num_positions))
        nn.init.normal_(self.depth_embedding, std=0.02)
        nn.init.normal_(self.head_weight, std=0.02)
        nn.init.zeros_(self.head_bias)

    # ------------------------------------------------------------------ building blocks
    def embed_hidden(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, input_dim]`` -> ``[B, 1, d]`` (depth position 0)."""
        if hidden.ndim != 2 or hidden.shape[-1] != self.input_dim:
            raise ValueError(f"main decoder expects hidden states [B, {self.input_dim}], got {tuple(hidden.shape)}")
        return self.hidden_projection(self.hidden_norm(hidden)).unsqueeze(1)

    def embed_layers(self, layers: torch.Tensor) -> torch.Tensor:
        """Token layers ``[B, k, 128]`` (ints ``0..num_levels-1``) -> layer vectors ``[B, k, d]``."""
        if layers.ndim != 3 or layers.shape[-1] != self.num_positions:
            raise ValueError(f"token layers must be [B, k, {self.num_positions}], got {tuple(layers.shape)}")
        b, k, p = layers.shape
        idx = (layers.long() + self.position_offsets).reshape(b * k, p)
        pooled = F.embedding_bag(idx, self.token_embedding.weight, mode="sum")
        return self.layer_norm_in(pooled.view(b, k, -1))

    def _run(self, x: torch.Tensor, cache: DepthKVCache | None, start: int) -> torch.Tensor:
        """Depth positions ``start..start+T-1``: ``[B, T, d]`` -> logits ``[B, T, 128, V]``."""
        t = x.shape[1]
        if start + t > self.num_layers:
            raise ValueError(f"depth positions {start}..{start + t - 1} exceed the {self.num_layers} RFSQ layers")
        x = self.embed_dropout(x + self.depth_embedding[:, start:start + t])
        for i, block in enumerate(self.blocks):
            x = block(x, cache, i, start)
        x = self.output_norm(x)
        # one matrix product per layer head (a batched einsum/bmm is several times slower at batch 1 on CPU)
        logits = torch.stack([F.linear(x[:, j], self.head_weight[start + j], self.head_bias[start + j])
                              for j in range(t)], dim=1)
        if cache is not None:
            cache.length = start + t
        return logits.view(x.shape[0], t, self.num_positions, self.num_levels)

    def _sequence(self, hidden: torch.Tensor, layers_prefix: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_hidden(hidden)
        if layers_prefix is not None and layers_prefix.shape[1] > 0:
            if layers_prefix.shape[0] != hidden.shape[0]:
                raise ValueError(f"batch mismatch: hidden {tuple(hidden.shape)} vs layers {tuple(layers_prefix.shape)}")
            if layers_prefix.shape[1] >= self.num_layers:
                raise ValueError(f"a prefix of {layers_prefix.shape[1]} layers leaves nothing to predict "
                                 f"(at most {self.num_layers - 1}); pass tokens[:, :{self.num_layers - 1}]")
            x = torch.cat([x, self.embed_layers(layers_prefix)], dim=1)
        return x

    # ------------------------------------------------------------------ public API
    def forward(self, hidden: torch.Tensor, layers_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``[B, k+1, 128, V]`` of layers ``0..k`` given ``hidden`` and a prefix ``[B, k, 128]``.

        ``k = 0`` (``None`` or an empty prefix) scores layer 0 only; ``k = 7`` (teacher forcing with
        ``tokens[:, :7]``) scores all 8 layers.
        """
        return self._run(self._sequence(hidden, layers_prefix), None, 0)

    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> DepthKVCache:
        """An empty KV cache for ``batch_size`` sequences (on the model's device/dtype by default)."""
        ref = self.head_weight
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        blk = self.blocks[0] if len(self.blocks) else None
        heads, head_dim = (blk.num_heads, blk.head_dim) if blk is not None else (1, 1)
        shape = (batch_size, heads, self.num_layers, head_dim)
        keys = [torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks]
        values = [torch.empty(shape, device=device, dtype=dtype) for _ in self.blocks]
        return DepthKVCache(keys, values, 0)

    def score(self, hidden: torch.Tensor, layers_prefix: torch.Tensor | None, cache: DepthKVCache) -> torch.Tensor:
        """Like :meth:`forward` (logits of layers ``0..k``) and fills the empty ``cache`` (length ``k+1``)."""
        if cache.length != 0:
            raise ValueError("score() starts a new sequence: pass an empty cache (new_cache() or truncate(0))")
        return self._run(self._sequence(hidden, layers_prefix), cache, 0)

    def extend(self, layers: torch.Tensor, cache: DepthKVCache) -> torch.Tensor:
        """Append token layers ``[B, m, 128]`` after the cached positions; logits ``[B, m, 128, V]``.

        With ``n = cache.length`` positions cached (hidden + layers ``0..n-2``), ``layers`` are layers
        ``n-1 .. n+m-2`` and the returned logits are those of layers ``n .. n+m-1``.
        """
        if cache.length == 0:
            raise ValueError("extend() needs a cache started by score(hidden, ...)")
        return self._run(self.embed_layers(layers), cache, cache.length)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


# ---------------------------------------------------------------------- export / import
def save_main_decoder(model: RFSQMainDecoder, path: str | Path, **extra) -> Path:
    """Write ``{format, version, config, state_dict, **extra}`` (CPU tensors; ``extra`` made JSON-plain)."""
    path = Path(path)
    extra = json.loads(json.dumps(extra, default=str))
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": MAIN_DECODER_FORMAT,
        "version": MAIN_DECODER_FORMAT_VERSION,
        "config": dict(model.config),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        **extra,
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def _config_and_state_from(payload: dict, path: Path) -> tuple[dict, dict]:
    if payload.get("format") == MAIN_DECODER_FORMAT:
        if "config" not in payload or "state_dict" not in payload:
            raise MainDecoderCheckpointError(f"{path}: main decoder file lacks 'config' or 'state_dict' (keys: {sorted(payload)})")
        return dict(payload["config"]), payload["state_dict"]
    if "state_dict" in payload and "hyper_parameters" in payload:  # a Lightning checkpoint of MainDecoderLitModule
        hp = payload["hyper_parameters"]
        for key in ("net", "decoder"):  # MainDecoderLitModule(net={...}); "decoder" in checkpoints before 2026-12
            if isinstance(hp.get(key), dict):
                hp = hp[key]
                break
        cfg_keys = set(inspect.signature(RFSQMainDecoder.__init__).parameters) - {"self"}
        config = {k: hp[k] for k in cfg_keys if k in hp}
        state = {k[len("decoder."):]: v for k, v in payload["state_dict"].items() if k.startswith("decoder.")}
        if not state:
            raise MainDecoderCheckpointError(f"{path}: Lightning checkpoint has no 'decoder.*' weights; is it a main-decoder run?")
        return config, state
    raise MainDecoderCheckpointError(f"{path}: not a main decoder file (expected format '{MAIN_DECODER_FORMAT}' or a "
                     f"MainDecoderLitModule .ckpt; top-level keys: {sorted(payload)[:10]})")


def _read_payload(path: str | Path, map_location: str | torch.device, trust: bool) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"main decoder file not found: {path} (train one with `python train.py "
                                f"experiment=main_head`; it is exported as <run>/main_decoder.pt)")
    try:
        payload = load_torch_file(path, map_location, trust=trust, what="main decoder",
                                  opt_in="policy.trust_checkpoints=true")
    except UntrustedFileError as exc:
        raise MainDecoderCheckpointError(str(exc)) from exc
    except Exception as exc:  # truncated zip, pickle garbage, ...
        msg = str(exc).splitlines()[0] if str(exc) else ""
        raise MainDecoderCheckpointError(f"{path}: could not be read as a torch file ({type(exc).__name__}: "
                                         f"{msg}); truncated or corrupt? Re-export or retrain it.") from exc
    if not isinstance(payload, dict):
        raise MainDecoderCheckpointError(f"{path}: expected a dict, got {type(payload).__name__}")
    return payload


def load_main_decoder(path: str | Path, map_location: str | torch.device = "cpu", trust: bool = False
                      ) -> RFSQMainDecoder:
    """Build an :class:`RFSQMainDecoder` from ``main_decoder.pt`` (or a Lightning ``.ckpt``), in eval mode.

    Raises ``FileNotFoundError`` for a missing file and :class:`MainDecoderCheckpointError` (a
    ``ValueError``) with the reason for a truncated, foreign or mismatched one, or for a file that needs
    full unpickling when ``trust`` is false (see :mod:`rsd.utils.serialization`).
    """
    path = Path(path)
    payload = _read_payload(path, map_location, trust)
    if not isinstance(payload, dict):
        raise MainDecoderCheckpointError(f"{path}: expected a dict, got {type(payload).__name__}")
    config, state = _config_and_state_from(payload, path)
    try:
        model = RFSQMainDecoder(**config)
    except TypeError as exc:
        raise MainDecoderCheckpointError(f"{path}: invalid main decoder config {config}: {exc}") from exc
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise MainDecoderCheckpointError(f"{path}: weights do not match config {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {wrong[:5]}")
    model.load_state_dict(state)
    return model.eval()
