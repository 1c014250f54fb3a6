"""vla_llm decoding across transformers versions and in bfloat16 (issue 21), on a tiny random Llama.

- the static KV cache is rolled back without ``StaticLayer.crop`` (transformers 5.17 lacks it): decoding with
  it removed gives the dynamic cache's tokens, and a rejected layer's positions are overwritten;
- forced acceptance in bfloat16: a draft copied from the baseline's step-by-step layers is not what a
  3-position verification call reproduces when the two round differently (as bf16 kernels for 1 and 3
  positions do on a GPU; this CPU computes both bit-identically, so the difference is emulated by a one-ulp
  change of the verification call's output). The benchmark's forced drafts are built from the verification
  call itself and are accepted for exactly ``a`` layers.
"""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from margins import LOGIT_MARGIN, assert_tokens_equal_up_to_near_ties, top2_gap

from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.models.hf_cache import crop_cache
from rsd.models.vla_llm_main import LLMPrompt, VLALLMMain, self_consistent_prefix

pytestmark = pytest.mark.usefixtures("torch_one_thread")
ROOT = Path(__file__).resolve().parents[1]
P = 12  # prompt length


def _llm(dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=64, max_position_embeddings=64)
    lm = LlamaModel(cfg).to(dtype).eval()
    return lm, VLALLMMain(lm).eval()


def _prompt(lm, seed: int = 1, static: bool = False) -> LLMPrompt:
    from transformers import StaticCache

    from rsd.models.hf_cache import cache_kwarg

    e = torch.randn(1, P, 64, generator=torch.Generator().manual_seed(seed)).to(lm.dtype)
    kw = cache_kwarg(lm)
    extra = {kw: StaticCache(config=lm.config, max_cache_len=P + 8)} if static else {}
    out = lm(inputs_embeds=e, use_cache=True, **extra)
    cache = extra[kw] if static else (getattr(out, kw, None) or out.past_key_values)
    return LLMPrompt(out.last_hidden_state[:, -1], cache, P)


class _Fixed:
    num_coarse_layers = 3

    def __init__(self, tokens: torch.Tensor) -> None:
        self.tokens = tokens

    def propose(self, hidden) -> torch.Tensor:
        return self.tokens.clone()


def test_static_cache_rolls_back_without_static_layer_crop(monkeypatch) -> None:
    from transformers import cache_utils

    if hasattr(cache_utils.StaticLayer, "crop"):  # as in transformers 5.17
        monkeypatch.delattr(cache_utils.StaticLayer, "crop")
    monkeypatch.setattr(cache_utils.Cache, "crop", lambda self, n: (_ for _ in ()).throw(AssertionError("crop")),
                        raising=False)
    lm, main = _llm(torch.float32)
    with torch.inference_mode():
        dynamic = _prompt(lm)
        ref = RSDInferenceEngine(main, mode="baseline").predict(dynamic, decode=False).tokens
        static = _prompt(lm, static=True)
        out = RSDInferenceEngine(main, mode="baseline").predict(static, decode=False).tokens
        gaps = top2_gap(main(dynamic, ref[:, :7]))
        # static and dynamic attend over different padded lengths: equal up to near-ties (docs/CONVENTIONS.md)
        assert_tokens_equal_up_to_near_ties(out, ref, gaps)
        assert (gaps > LOGIT_MARGIN).float().mean() > 0.99
        # a rejected layer: 3 drafted positions written, 2 kept; the write position moves back, and the next step
        # overwrites the stale one (same logits as a cache that never saw it)
        drafted = ref[:, :3].clone()
        drafted[:, 1] = (drafted[:, 1] + 1) % 7
        cache = main.new_cache(1)
        main.score(static, drafted, cache)
        assert [int(layer.cumulative_length) for layer in static.cache.layers] == [P + 3] * 2
        cache.truncate(2)
        assert [int(layer.cumulative_length) for layer in static.cache.layers] == [P + 1] * 2
        after = main.extend(ref[:, 1:2], cache)
        fresh = main.new_cache(1)
        main.score(dynamic, ref[:, :1], fresh)
        expected = main.extend(ref[:, 1:2], fresh)
        assert torch.allclose(after, expected, atol=1e-5)
        crop_cache(static.cache, 0)  # rewinding to empty is how the benchmark reuses one preallocated cache
        assert [int(layer.cumulative_length) for layer in static.cache.layers] == [0, 0]
        with pytest.raises(ValueError):
            crop_cache(static.cache, P + 9)


def _emulate_shape_dependent_rounding(lm) -> None:
    """Outputs of multi-position forwards after the prompt (the verification call: 2..7 positions) change by one
    bfloat16 ulp, as a GPU's kernels for 3 positions round differently from those for 1."""
    def hook(module, args, out):
        if 2 <= out.shape[1] <= 7:
            return torch.nextafter(out, torch.full_like(out, float("inf")))
        return out

    lm.norm.register_forward_hook(hook)


def test_forced_acceptance_in_bfloat16_accepts_exactly_a_layers() -> None:
    bench = runpy.run_path(str(ROOT / "scripts" / "benchmark_gpu_vla_llm.py"), run_name="bench")
    lm, main = _llm(torch.bfloat16)
    _emulate_shape_dependent_rounding(lm)
    with torch.inference_mode():
        prompt = _prompt(lm)
        greedy = RSDInferenceEngine(main, mode="baseline").predict(prompt, decode=False).tokens
        # the emulated rounding is effective: the verification call disagrees with the steps somewhere in layers
        # 1..2 (layer 0 is head_0 on the prompt's hidden state: the same computation, bit-equal)
        consistent = self_consistent_prefix(main, prompt, greedy[:, :3])
        assert torch.equal(consistent[:, 0], greedy[:, 0])
        assert int((consistent[:, 1:] != greedy[:, 1:3]).sum()) > 0
        # before (a draft copied from the baseline's layers): a = 3 is not accepted as 3
        naive = RSDInferenceEngine(main, _Fixed(greedy[:, :3]), mode="strict").predict(prompt, decode=False)
        assert naive.accepted_length < 3
        # after: the benchmark's forced drafts are accepted for exactly a layers
        _, drafts = bench["forced_drafts"](main, prompt, greedy)
        for a, tok in drafts.items():
            out = RSDInferenceEngine(main, _Fixed(tok), mode="strict").predict(prompt, decode=False)
            assert out.accepted_length == a, (a, out.accepted_length)
            assert out.main_calls == 8 - a
            assert torch.equal(out.tokens[:, :a], tok[:, :a])
