"""``main=vla_llm``: the VLA's own language model decodes the RFSQ layers, one LLM position per layer.

Why: with a light depth decoder (:mod:`rsd.models.main_decoder`) on top of one backbone pass, the main
steps are tiny next to the backbone, so speculation cannot change a GPU policy's latency much. Here
every sequential decoding step is a step of the VLA's language model (as in OpenVLA's own action
generation and in Spec-VLA), so accepted draft layers save whole LLM steps.

Sequence (``P`` = prompt length: image tokens + instruction, prefilled once by the backbone)::

    LLM position:  0 .. P-1          P          P+1        ...  P+6
    input:         the prompt        e(L0)      e(L1)      ...  e(L6)
    output read:   h = last prompt   h(P)       h(P+1)     ...  h(P+6)
    head:          head_0 -> L0      head_1->L1 head_2->L2 ...  head_7 -> L7

``h`` is the last layer (after the final norm) at the last prompt token, i.e. exactly the feature the
``hf_vlm`` / ``openvla`` backbones cache and the draft reads (``hidden_states[-1][:, -1]``). A layer's
input embedding ``e(Lk)`` is the main decoder's: the sum over the 128 positions of a learned vector per
(position, level) pair, LayerNorm, times a scale matched to the LLM's own input embeddings, plus a
learned vector per depth. ``head_k`` is a linear map ``hidden -> 128 x 7`` logits.

The engine's interface (:class:`rsd.engine.rsd_engine.RSDInferenceEngine`, unchanged):

- the engine's ``hidden`` is an :class:`LLMPrompt`: the prompt's last hidden state **and** its KV cache.
  It is tensor-like (every torch function and tensor attribute sees its ``hidden`` tensor), so the draft
  (``RFSQDraftModelWithProjection``) reads it as the ``[B, D]`` hidden state it was trained on, and the
  engine's ``hidden.to(device, dtype)`` / ``hidden.shape[0]`` work. :class:`VLAPromptBackbone` is the
  backbone callable that produces it (vision tower + LLM prefill, timed as ``backbone``);
- ``new_cache(B)`` -> an empty :class:`LLMLayerCache`; ``score(prompt, prefix [B, k, 128], cache)`` ->
  logits ``[B, k+1, 128, 7]`` of layers ``0..k`` (head_0 on ``h``, then ONE LLM forward over the ``k``
  prefix layers: the verification call); ``extend(layers [B, m, 128], cache)`` -> the next ``m`` layers'
  logits (one LLM forward); ``cache.truncate(n)`` crops the transformers cache to the prompt plus the
  ``n - 1`` accepted layer positions (``DynamicCache.crop``; on a ``StaticCache`` only the write position
  moves back and the stale entries are masked and later overwritten).

Counting: the baseline is 7 LLM steps (layer 0 comes from the prompt's last position for free); strict
speculation with ``a`` accepted layers is 1 verification forward over 3 positions + ``7 - a - 1``
steps for ``a < 3`` (4 for ``a = 3``), i.e. at best 5 LLM forwards against 7.

Prompt caches are shared, not copied: ``score`` crops the prompt's cache back to the prompt and appends
after it (a ``DynamicCache`` appends by concatenation, which never writes into the prompt's tensors; a
``StaticCache`` writes only after the prompt). So one prompt can be decoded several times (baseline and
speculative on the same observation), but only one layer sequence per prompt is live at a time (the
engine decodes one chunk at a time). Batches: prompts of one length, or left-padded with their attention
mask (dynamic cache only).

Transformers' own classes do all the work (the language model, ``DynamicCache`` / ``StaticCache``); this
module adds the layer embedding and the heads. Saved files hold only those (and the LLM too when it was
fine-tuned) plus the backbone config: :func:`save_vla_llm_main` / :func:`load_vla_llm_main`.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_map

from rsd.models.backbones import backbone_from_config
from rsd.models.hf_cache import (
    as_cache,
    cache_kwarg,
    crop_cache,
    find_language_model,
    output_cache,
)
from rsd.tokenizer.layout import NUM_LAYERS, NUM_LEVELS, NUM_POSITIONS

VLA_LLM_FORMAT = "rsd.vla_llm_main"
VLA_LLM_FORMAT_VERSION = 1


class VLALLMCheckpointError(ValueError):
    """A vla_llm main file is missing pieces, foreign, or does not fit the backbone it is loaded on."""


# ---------------------------------------------------------------------- the engine's "hidden" and cache
class LLMPrompt:
    """A prefilled prompt: ``hidden`` ``[B, D]`` (last layer, last prompt token) + its KV ``cache``.

    Tensor-like (``__torch_function__``): torch functions and tensor attributes see ``hidden``, so the
    draft and the engine treat it as the hidden state; :class:`VLALLMMain` reads ``cache``. ``length``
    is the prompt's length in the cache; ``attention_mask`` ``[B, length]`` (None: no padding).
    """

    def __init__(self, hidden: torch.Tensor, cache: Any, length: int,
                 attention_mask: torch.Tensor | None = None) -> None:
        self.hidden = hidden
        self.cache = cache
        self.length = int(length)
        self.attention_mask = attention_mask
        #: positions in ``cache`` as the decoding path left them (host-side; None: unknown, crop to be sure)
        self.kv_length: int | None = self.length

    def set_kv_length(self, length: int) -> None:
        """Crop the KV cache to ``length`` positions unless it is known to hold exactly that many."""
        if self.kv_length != length:
            crop_cache(self.cache, length)
            self.kv_length = int(length)

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        def unwrap(x):
            return x.hidden if isinstance(x, LLMPrompt) else x

        return func(*tree_map(unwrap, tuple(args)), **tree_map(unwrap, dict(kwargs or {})))

    @property
    def shape(self) -> torch.Size:
        return self.hidden.shape

    def to(self, *args, **kwargs) -> LLMPrompt:
        """Moves / casts ``hidden`` only (the cache stays where the LLM is)."""
        hidden = self.hidden.to(*args, **kwargs)
        if hidden is self.hidden:  # nothing to move (the engine's call on the LLM's own device / dtype)
            return self
        moved = LLMPrompt(hidden, self.cache, self.length, self.attention_mask)
        moved.kv_length = None  # the two objects share the cache: neither can vouch for its length any more
        self.kv_length = None
        return moved

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def __getattr__(self, name: str):
        if name == "hidden":  # not set yet (copy / unpickling)
            raise AttributeError(name)
        return getattr(self.hidden, name)

    def __repr__(self) -> str:
        return f"LLMPrompt(hidden={tuple(self.hidden.shape)}, length={self.length}, cache={type(self.cache).__name__})"


class LLMLayerCache:
    """The engine's cache for :class:`VLALLMMain`: the prompt's KV cache plus the decoded layer positions.

    ``length``: depth positions decoded (0 = empty; 1 = the prompt; ``1 + j`` = the prompt and layers
    ``0..j-1`` fed back). ``truncate(n)`` crops the KV cache to ``prompt.length + n - 1`` positions.
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = int(batch_size)
        self.prompt: LLMPrompt | None = None
        self.length = 0

    @property
    def kv(self) -> Any:
        return None if self.prompt is None else self.prompt.cache

    def kv_positions(self, length: int | None = None) -> int:
        """KV-cache positions that hold the prompt and the layers of depth length ``length``."""
        n = self.length if length is None else length
        return self.prompt.length + max(n - 1, 0)

    def truncate(self, length: int) -> None:
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of length {self.length} to {length}")
        if self.prompt is not None and length >= 1:
            self.prompt.set_kv_length(self.kv_positions(length))
        self.length = length


# ---------------------------------------------------------------------- the main model
class VLALLMMain(nn.Module):
    """Layer embedding in, the VLA's language model, per-layer heads out (see the module docstring).

    Args:
        language_model: the VLA's decoder stack (:func:`find_language_model`), shared with the backbone.
        num_layers / num_positions / num_levels: the RFSQ token layout (8 / 128 / 7).
        train_llm: let the optimiser update the language model too (small models; default: frozen, so
            the backbone's cached features and the draft stay valid).
    """

    def __init__(self, language_model: nn.Module, num_layers: int = NUM_LAYERS, num_positions: int = NUM_POSITIONS,
                 num_levels: int = NUM_LEVELS, train_llm: bool = False) -> None:
        super().__init__()
        d = int(language_model.config.hidden_size)
        self.config = dict(num_layers=num_layers, num_positions=num_positions, num_levels=num_levels,
                           train_llm=bool(train_llm))
        self.input_dim = d
        self.num_layers, self.num_positions, self.num_levels = num_layers, num_positions, num_levels
        self.train_llm = bool(train_llm)
        ref = next(language_model.parameters())
        kw = dict(device=ref.device, dtype=ref.dtype)
        self.token_embedding = nn.Embedding(num_positions * num_levels, d, **kw)
        self.layer_norm_in = nn.LayerNorm(d, **kw)
        self.embed_scale = nn.Parameter(torch.ones((), **kw))
        self.depth_embedding = nn.Parameter(torch.zeros(num_layers - 1, d, **kw))
        self.head_weight = nn.Parameter(torch.empty(num_layers, num_positions * num_levels, d, **kw))
        self.head_bias = nn.Parameter(torch.zeros(num_layers, num_positions * num_levels, **kw))
        self.register_buffer("position_offsets", torch.arange(num_positions, device=ref.device) * num_levels,
                             persistent=False)
        self.language_model = language_model
        self.language_model.requires_grad_(self.train_llm)
        self._cache_kw = cache_kwarg(language_model)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.token_embedding.weight, std=1.0 / math.sqrt(self.num_positions))
        nn.init.normal_(self.depth_embedding, std=0.02)
        nn.init.normal_(self.head_weight, std=0.02)
        nn.init.zeros_(self.head_bias)
        with torch.no_grad():  # inputs at the scale of the LLM's own token embeddings (RMS per vector)
            emb = self.language_model.get_input_embeddings().weight
            self.embed_scale.fill_(float(emb.float().pow(2).mean().sqrt()))

    def new_parameters(self) -> dict[str, torch.Tensor]:
        """The parameters this model adds to the language model (what a frozen-LLM file stores)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("language_model.")}

    # ------------------------------------------------------------------ building blocks
    def embed_layers(self, layers: torch.Tensor, start: int) -> torch.Tensor:
        """Token layers ``[B, m, 128]`` fed at depth positions ``start..start+m-1`` -> ``[B, m, D]``."""
        if layers.ndim != 3 or layers.shape[-1] != self.num_positions:
            raise ValueError(f"token layers must be [B, m, {self.num_positions}], got {tuple(layers.shape)}")
        b, m, p = layers.shape
        idx = (layers.long() + self.position_offsets).reshape(b * m, p)
        pooled = F.embedding_bag(idx, self.token_embedding.weight, mode="sum").view(b, m, -1)
        return self.layer_norm_in(pooled) * self.embed_scale + self.depth_embedding[start - 1:start - 1 + m]

    def head(self, h: torch.Tensor, start: int) -> torch.Tensor:
        """Outputs ``[B, T, D]`` at depth positions ``start..`` -> logits ``[B, T, 128, V]`` (heads ``start..``)."""
        b, t, _ = h.shape
        h = h.to(self.head_weight.dtype)
        logits = torch.stack([F.linear(h[:, j], self.head_weight[start + j], self.head_bias[start + j])
                              for j in range(t)], dim=1)
        return logits.view(b, t, self.num_positions, self.num_levels)

    def _llm(self, x: torch.Tensor, cache: LLMLayerCache) -> torch.Tensor:
        """One language-model forward of the layer inputs ``x`` ``[B, m, D]`` after the cached positions."""
        prompt = cache.prompt
        mask = None
        if prompt.attention_mask is not None and not bool(prompt.attention_mask.all()):
            extra = cache.kv_positions() - prompt.length + x.shape[1]
            mask = torch.cat([prompt.attention_mask, prompt.attention_mask.new_ones(x.shape[0], extra)], dim=1)
        out = self.language_model(inputs_embeds=x.to(next(self.language_model.parameters()).dtype),
                                  attention_mask=mask, use_cache=True, **{self._cache_kw: prompt.cache})
        if prompt.kv_length is not None:
            prompt.kv_length += int(x.shape[1])
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

    def _check_prompt(self, prompt: Any) -> LLMPrompt:
        if not isinstance(prompt, LLMPrompt):
            raise TypeError(f"the vla_llm main model decodes from an LLMPrompt (the prefilled prompt that "
                            f"VLAPromptBackbone returns), got {type(prompt).__name__}")
        if prompt.hidden.ndim != 2 or prompt.hidden.shape[-1] != self.input_dim:
            raise ValueError(f"prompt hidden state must be [B, {self.input_dim}], got {tuple(prompt.hidden.shape)}")
        return prompt

    # ------------------------------------------------------------------ the engine's API
    def new_cache(self, batch_size: int, device: torch.device | str | None = None,
                  dtype: torch.dtype | None = None) -> LLMLayerCache:
        """An empty cache; ``score`` attaches the prompt's KV cache (device / dtype are the LLM's)."""
        return LLMLayerCache(batch_size)

    def score(self, prompt: LLMPrompt, layers_prefix: torch.Tensor | None, cache: LLMLayerCache) -> torch.Tensor:
        """Logits ``[B, k+1, 128, V]`` of layers ``0..k`` given the prompt and a prefix ``[B, k, 128]``;
        fills the empty ``cache`` (length ``k + 1``)."""
        prompt = self._check_prompt(prompt)
        if cache.length != 0:
            raise ValueError("score() starts a new sequence: pass an empty cache (new_cache() or truncate(0))")
        k = 0 if layers_prefix is None else int(layers_prefix.shape[1])
        if k >= self.num_layers:
            raise ValueError(f"a prefix of {k} layers leaves nothing to predict (at most {self.num_layers - 1})")
        if k and layers_prefix.shape[0] != prompt.shape[0]:
            raise ValueError(f"batch mismatch: prompt {tuple(prompt.shape)} vs layers {tuple(layers_prefix.shape)}")
        cache.prompt = prompt
        prompt.set_kv_length(prompt.length)  # drop what an earlier sequence on this prompt appended
        logits = self.head(prompt.hidden.unsqueeze(1), 0)
        if k:
            h = self._llm(self.embed_layers(layers_prefix, 1), cache)
            logits = torch.cat([logits, self.head(h, 1)], dim=1)
        cache.length = k + 1
        return logits

    def extend(self, layers: torch.Tensor, cache: LLMLayerCache) -> torch.Tensor:
        """Append layers ``[B, m, 128]`` (layers ``n-1..n+m-2`` for ``n = cache.length``) -> logits of layers
        ``n..n+m-1``."""
        n = cache.length
        if n == 0 or cache.prompt is None:
            raise ValueError("extend() needs a cache started by score(prompt, ...)")
        m = layers.shape[1]
        if n + m > self.num_layers:
            raise ValueError(f"depth positions {n}..{n + m - 1} exceed the {self.num_layers} RFSQ layers")
        cache.prompt.set_kv_length(cache.kv_positions(n))
        h = self._llm(self.embed_layers(layers, n), cache)
        cache.length = n + m
        return self.head(h, n)

    def forward(self, prompt: LLMPrompt, layers_prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: ``layers_prefix = tokens[:, :7]`` -> logits of all 8 layers ``[B, 8, 128, V]``."""
        return self.score(prompt, layers_prefix, self.new_cache(prompt.shape[0]))

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)


def self_consistent_prefix(main: Any, prompt: Any, layers: torch.Tensor) -> torch.Tensor:
    """Layers ``[B, n, 128]`` that the verification call reproduces: ``main.score(prompt, x)``'s greedy
    layer ``j`` equals ``x[:, j]`` for every ``j < n`` (starting from ``layers``, e.g. the baseline's).

    Why: a verification call scores ``n`` positions in one forward; the baseline computes them one step at a
    time. In float32 the two agree up to ~1e-6; in bfloat16 on a GPU the kernels for 1 and 3 positions round
    differently and a layer of 128 tokens almost always holds a near-tie, so the baseline's own layers are
    NOT accepted by strict verification (forcing ``a = 3`` then accepted 1). A draft forced to be accepted
    must be built from the verification call itself. Layer ``j``'s verified tokens depend only on the
    drafted layers ``< j`` (causal), so ``n`` rounds reach the fixed point.
    """
    x = layers.clone()
    n = int(x.shape[1])
    for _ in range(n + 1):
        verified = main.score(prompt, x, main.new_cache(x.shape[0])).argmax(-1)[:, :n].to(x.dtype)
        if torch.equal(verified, x):
            return x
        x = verified
    raise RuntimeError("the verification call does not reach a fixed point (non-deterministic kernels?)")


# ---------------------------------------------------------------------- the backbone side: prefill
class VLAPromptBackbone:
    """An ``hf_vlm`` / ``openvla`` backbone that returns :class:`LLMPrompt` (prefill with a KV cache).

    ``__call__(observations, instructions)`` / :meth:`encode` build the same prompt and image as the
    wrapped backbone's ``encode`` and run ONE forward with ``use_cache=True``; ``hidden`` is the same
    ``hidden_states[-1][:, -1]``. ``static_cache_len``: prefill into a preallocated ``StaticCache`` of that
    many positions (prompt + 8 layers at most; batch prompts of one length), the form CUDA graphs need.
    """

    needs_images = True

    def __init__(self, backbone: Any, static_cache_len: int | None = None) -> None:
        self.backbone = backbone
        self.model = backbone.model
        self.static_cache_len = static_cache_len
        self._kw = cache_kwarg(self.model)
        params = inspect.signature(self.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params

    @property
    def hidden_dim(self) -> int:
        return int(self.backbone.hidden_dim)

    @property
    def backbone_id(self) -> str:
        return self.backbone.backbone_id

    def language_model(self) -> nn.Module:
        return find_language_model(self.model)

    def prefill(self, inputs: Mapping[str, Any]) -> LLMPrompt:
        """Processor outputs (on the device) -> the prefilled prompt."""
        kwargs = dict(inputs)
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1  # the LM head is not needed over the prompt
        if self.static_cache_len is not None:
            from transformers import StaticCache

            lm = self.language_model()
            kwargs[self._kw] = StaticCache(config=lm.config, max_cache_len=int(self.static_cache_len))
        out = self.model(**kwargs, use_cache=True, output_hidden_states=True)
        hidden_states = getattr(out, "hidden_states", None)
        if not hidden_states:
            raise RuntimeError("the VLM's forward returned no hidden_states")
        cache = as_cache(output_cache(out))
        hidden = hidden_states[-1][:, -1]
        length = int(hidden_states[-1].shape[1])
        mask = inputs.get("attention_mask")
        if mask is not None and int(mask.shape[1]) != length:  # OpenVLA splices the image in: no padding there
            mask = None
        if not bool(torch.isfinite(hidden).all()):
            raise RuntimeError("the prompt's hidden state is not finite")
        return LLMPrompt(hidden, cache, length, mask)

    def encode(self, observations: Sequence[Mapping], instructions: Sequence[str]) -> LLMPrompt:
        images = [self.backbone.prepare_image(o) for o in observations]
        return self.encode_images(images, instructions)

    def encode_images(self, images: Sequence[Any], instructions: Sequence[str]) -> LLMPrompt:
        """Prepared PIL images (or arrays as the env renders them, prepared here) + instructions."""
        images = [im if hasattr(im, "size") and not isinstance(im, np.ndarray)
                  else self.backbone.prepare_image({self.backbone.image_key: im}) for im in images]
        prompts = [self.backbone.build_prompt(i) for i in instructions]
        if len(set(prompts)) > 1 and getattr(self.backbone, "padding", "left") == "group":
            raise ValueError("this backbone batches one prompt at a time (padding=group): encode one task per call")
        return self.prefill(self.backbone.model_inputs(prompts, images))

    def __call__(self, observations: Sequence[Mapping], instructions: Sequence[str]) -> LLMPrompt:
        with torch.inference_mode():
            return self.encode(observations, instructions)


# ---------------------------------------------------------------------- files
def save_vla_llm_main(model: VLALLMMain, path: str | Path, backbone_config: Mapping[str, Any], **extra) -> Path:
    """Write ``{format, version, config, backbone, state_dict, **extra}``: the new parameters, plus the
    language model's when it was trained (``config.train_llm``)."""
    path = Path(path)
    extra = json.loads(json.dumps(extra, default=str))
    state = model.state_dict() if model.train_llm else model.new_parameters()
    payload = {"format": VLA_LLM_FORMAT, "version": VLA_LLM_FORMAT_VERSION, "config": dict(model.config),
               "backbone": json.loads(json.dumps(dict(backbone_config), default=str)),
               "state_dict": {k: v.detach().cpu() for k, v in state.items()}, **extra}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def load_vla_llm_main(path: str | Path, backbone: Any = None, map_location: str | torch.device = "cpu",
                      backbone_overrides: Mapping[str, Any] | None = None) -> tuple[VLALLMMain, VLAPromptBackbone]:
    """``(main, prompt_backbone)`` from a file of :func:`save_vla_llm_main`, in eval mode.

    ``backbone``: an already built ``hf_vlm`` / ``openvla`` backbone; default: rebuilt from the file's
    recorded config (``backbone_overrides`` e.g. ``{"device": "cuda"}``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"vla_llm main file not found: {path} (train one with `python train.py "
                                f"experiment=main_vla_llm`; it is exported as <run>/vla_llm_main.pt)")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle garbage, ...
        raise VLALLMCheckpointError(f"{path}: could not be read as a torch file ({type(exc).__name__}: "
                                    f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    if not isinstance(payload, dict) or payload.get("format") != VLA_LLM_FORMAT:
        raise VLALLMCheckpointError(f"{path}: not a vla_llm main file (format {VLA_LLM_FORMAT!r} expected)")
    for key in ("config", "backbone", "state_dict"):
        if key not in payload:
            raise VLALLMCheckpointError(f"{path}: lacks {key!r}")
    if backbone is None:
        backbone = backbone_from_config({**payload["backbone"], **dict(backbone_overrides or {})})
    prompt_backbone = VLAPromptBackbone(backbone)
    main = VLALLMMain(prompt_backbone.language_model(), **payload["config"])
    state = payload["state_dict"]
    missing, unexpected = main.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("language_model.")]
    if missing or unexpected:
        raise VLALLMCheckpointError(f"{path}: weights do not fit the model (missing {missing[:5]}, unexpected "
                                    f"{unexpected[:5]})")
    return main.eval(), prompt_backbone
