"""transformers' KV caches across its versions: the cache argument's name, the cache of an output, legacy tuples,
cropping without methods one version lacks, and where a VLM keeps its language model.

Kept apart from :mod:`rsd.models.vla_llm_main` because the GPU benchmark and the tests use them on their own.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def cache_kwarg(module: nn.Module) -> str:
    """The name ``module.forward`` takes for the KV cache (``cache`` in recent transformers 5.x, else
    ``past_key_values``)."""
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def output_cache(out: Any) -> Any:
    """The KV cache of a transformers model output (field ``cache`` or ``past_key_values``)."""
    for name in ("cache", "past_key_values"):
        value = getattr(out, name, None)
        if value is not None:
            return value
    if isinstance(out, Mapping):
        for name in ("cache", "past_key_values"):
            if out.get(name) is not None:
                return out[name]
    raise RuntimeError("the model returned no KV cache (use_cache=True was ignored)")


def as_cache(cache: Any) -> Any:
    """A transformers ``Cache`` (legacy tuples of ``(key, value)`` per layer, as older models return them,
    become a ``DynamicCache``)."""
    if hasattr(cache, "get_seq_length"):
        return cache
    from transformers import DynamicCache

    if hasattr(DynamicCache, "from_legacy_cache"):
        return DynamicCache.from_legacy_cache(tuple(cache))
    return DynamicCache(ddp_cache_data=[tuple(layer) for layer in cache])


def cache_length(cache: Any) -> int:
    """Number of cached positions as a python int (a ``StaticCache`` counts with a tensor: on a GPU this
    reads it back, a host synchronization; the decoding path never calls it, see :func:`crop_cache`)."""
    return int(cache.get_seq_length())


def _is_static_layer(layer: Any) -> bool:
    """A preallocated layer (``StaticLayer``): fixed ``max_cache_len`` buffers written at ``cumulative_length``."""
    return torch.is_tensor(getattr(layer, "cumulative_length", None)) and hasattr(layer, "max_cache_len")


def crop_cache(cache: Any, length: int) -> None:
    """Keep the first ``length`` positions, with no cache method that one transformers version lacks.

    Per layer: a static layer (``StaticLayer``: ``cumulative_length`` tensor, the write position) gets its
    write position set in place to ``length`` (``fill_``: same tensor, so static addresses for CUDA graphs
    stay; nothing is read back to the host; the stale entries after it are masked as future positions and
    overwritten by the next forward). ``StaticLayer.crop`` is not used: transformers 5.17 lacks it. A dynamic
    layer is cut with ``layer.crop(-n)`` (``n`` from its tensor shape; every 5.x accepts the negative form).
    A cache without per-layer objects (older transformers): ``cache.crop(-n)``.
    """
    length = int(length)
    if length < 0:
        raise ValueError(f"cannot crop a cache to {length} positions")
    layers = getattr(cache, "layers", None)
    if layers is None:
        remove = cache_length(cache) - length
        if remove < 0:
            raise ValueError(f"cannot crop a cache of {cache_length(cache)} positions to {length}")
        if remove:
            cache.crop(-remove)
        return
    for layer in layers:
        if not getattr(layer, "is_initialized", True):
            continue
        if _is_static_layer(layer):
            if length > int(layer.max_cache_len):
                raise ValueError(f"cannot crop a static cache of {layer.max_cache_len} positions to {length}")
            layer.cumulative_length.fill_(length)
            continue
        keys = getattr(layer, "keys", None)
        current = int(keys.shape[-2]) if torch.is_tensor(keys) else int(layer.get_seq_length())
        if length > current:
            raise ValueError(f"cannot crop a cache of {current} positions to {length}")
        if length < current:
            layer.crop(length - current)


def find_language_model(vlm: nn.Module) -> nn.Module:
    """The decoder stack (no LM head) of a VLM: it takes ``inputs_embeds`` + a cache and returns
    ``last_hidden_state`` after the final norm.

    LLaVA (transformers 5): ``vlm.model.language_model``; OpenVLA (remote code): ``vlm.language_model.model``;
    a bare ``*ForCausalLM``: ``.model``.
    """
    candidates = []
    inner = getattr(vlm, "model", None)
    if inner is not None and getattr(inner, "language_model", None) is not None:
        candidates.append(inner.language_model)
    lm = getattr(vlm, "language_model", None)
    if lm is not None:
        candidates.append(getattr(lm, "model", lm))
    if callable(getattr(vlm, "get_decoder", None)):
        try:
            candidates.append(vlm.get_decoder())
        except Exception:  # noqa: BLE001 - remote code without a decoder accessor
            pass
    if inner is not None:
        candidates.append(inner)
    for c in candidates:
        if isinstance(c, nn.Module) and callable(getattr(c, "get_input_embeddings", None)) \
                and not hasattr(c, "lm_head") and "inputs_embeds" in inspect.signature(c.forward).parameters:
            return c
    raise ValueError(f"cannot find the language model (decoder without LM head) of {type(vlm).__name__}")
