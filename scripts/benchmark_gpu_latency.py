"""Per-chunk latency of the draft / main decoder / speculative engine: eager vs compile vs cuda_graph.

One self-contained script for a GPU machine (no data, no checkpoints, no network; imports only torch,
numpy and ``rsd``'s model, engine and tokenizer modules, plus transformers with ``--backbone``): builds the default-size draft
(``RFSQDraftModelWithProjection``) and main decoder (``RFSQMainDecoder``) with random weights, batch 1,
and for every dtype and acceleration mode (``rsd.engine.accelerate``) measures, as medians over
``--iters`` calls after ``--warmup`` calls (CUDA events on GPU, ``perf_counter`` on CPU):

- ``draft``: one proposal (forward + argmax) of the 3 coarse layers;
- ``verify``: the main decoder's verification call (layers 0..3 given the 3 drafted layers, new cache);
- ``step``: one main decoder step from the KV cache (layer 4 given layers 0..3);
- ``baseline``: a whole baseline chunk (``RSDInferenceEngine(mode="baseline").predict``: 8 main calls);
- ``strict_a3``: a strict speculative chunk with every drafted layer accepted (the draft runs, but the
  engine is handed the main model's own greedy layers 0..2: 1 verify + 4 steps);
- ``strict_a0``: a strict chunk with the random draft (nothing accepted: draft + verify + 7 steps).

Printed: the latency table (ms), the speedups of every mode over eager (same dtype, same op), the strict
speedups over the baseline, and whether each mode's tokens equal eager's. ``--out`` writes it all as JSON.

GPU::

    python scripts/benchmark_gpu_latency.py --device cuda --out logs/bench/gpu_latency.json

CPU smoke test (seconds; compile is left out by default on CPU, where inductor needs minutes)::

    python scripts/benchmark_gpu_latency.py --device cpu --iters 5

With an OpenVLA-shaped backbone of random weights (``--backbone openvla-shaped``; built offline from
transformers config classes, no remote code, no download): DINOv2-L/14 (with 4 registers) and
SigLIP-so400m/14 at 224 px, their 256 patch features each (second-to-last layer, as OpenVLA's fused
featurizer) concatenated channel-wise (1024 + 1152 = 2176) through OpenVLA's 3-layer GELU MLP projector
(2176 -> 8704 -> 4096 -> 4096) into a Llama-2-7B text model; the image tokens are spliced in after BOS
of ``--prompt-tokens`` (20) prompt tokens: 276 tokens. The feature is the last layer (after the final
norm) at the last prompt token, as ``backbone=openvla``. ``--backbone-scale small|tiny`` keep that
structure with fewer layers / less width (CPU, seconds; the draft and main decoder then take the
backbone's hidden size as ``input_dim``; ``tiny`` also uses the tiny draft / main decoder). Measured in
addition, per dtype (medians over ``--backbone-iters`` calls):

- the backbone's parts (``dino``, ``siglip``, ``projector``, ``vision`` = both towers + projector,
  ``llm_prefill``) and the whole ``backbone`` forward (vision + projector + prefill -> hidden);
- OpenVLA's own action generation on the same backbone: ``ar_llm`` = LLM prefill (KV cache, last-token
  logits) + 6 greedy decode steps (7 action tokens), and ``ar_action`` = vision + projector + ``ar_llm``:
  one action per backbone pass, i.e. OpenVLA's per-action latency;
- per (dtype, accelerate) and engine mode (``baseline``, ``strict_a3``, ``strict_a0``): the engine's own
  per-chunk sections (``RSDInferenceEngine.predict_observation`` with the backbone and a randomly
  initialised ``RFSQTokenizer``): backbone, draft, main, decode (RFSQ decode to the 8 x 7 chunk) and the
  chunk total; per-action latency = chunk total / 8; OpenVLA-AR / RSD per action; (draft + main +
  decode) / backbone in %; and the issue's targets for one H100/H200 (draft <= 0.1 ms at batch 1;
  draft + main + decode <= 5 % of the backbone forward; per action >= 20x faster than OpenVLA's
  autoregressive generation), judged on the strict modes' worst case (a=0) and shown for a=3.

Full scale needs ~15 GB of weights in bfloat16: CUDA only (refused on CPU). The dtype defaults to
bfloat16 on CUDA and float32 on CPU with a backbone (float32 at full scale: ~30 GB and a much slower
run). The parameters are created directly on the device in the dtype. The JSON is rewritten and a
summary line printed after every (dtype, accelerate) row, so a run cut short keeps its finished rows;
``compile`` goes last, as the slowest to set up. One GPU (estimated at a few minutes, not yet run)::

    python scripts/benchmark_gpu_latency.py --device cuda --backbone openvla-shaped --backbone-scale full \
        --accel eager,cuda_graph,compile --out logs/bench/openvla_shaped_gpu.json

The second design, ``--designs head,vla_llm`` (needs ``--backbone openvla-shaped``): the VLA's own language
model decodes the RFSQ layers (``rsd.models.vla_llm_main.VLALLMMain`` on the backbone's Llama, one LLM position
per layer, docs/vla_llm.md). Per dtype and cache mode (``--vla-accel``: ``eager`` = DynamicCache,
``static`` = StaticCache, ``static_compile`` = StaticCache + ``torch.compile`` of the language model,
``mode="reduce-overhead"`` = CUDA graphs on CUDA), medians of: ``backbone`` (vision + projector + LLM prefill
into the KV cache), ``draft`` (the draft on the prompt's last hidden state), ``verify`` (head_0 + ONE LLM
forward over the 3 drafted layers), ``step`` (one LLM layer step), the whole chunk (backbone + decode) for the
baseline (7 LLM steps) and for strict speculation forced to accept a = 0, 1, 2, 3 layers (the draft runs,
then the engine gets tokens that agree with the baseline's on exactly a layers), the speedup of each over the
baseline next to its ideal 7 / (8 - a) LLM forwards, and the expected chunk at the acceptance profile of a
CPU benchmark JSON (``--acceptance-json``: ``scripts/benchmark_engine.py --out`` output, its strict row's
``per_layer_acceptance``, or any JSON with ``accepted_length_counts`` / ``profile`` = P(a = 0..3));
per action (chunk / 8) against OpenVLA's autoregressive action in the same run. Targets (one H100/H200):
speculation at the profile >= 1.45x per chunk; the light head's (draft + main + decode) <= 5 % of the backbone
and draft <= 0.1 ms as a CUDA graph; the faster design per action >= 20x OpenVLA's AR. The JSON's ``device`` is
``torch.cuda.get_device_name()`` (or the CPU's name; ``cpu_smoke: true`` then). Both designs on one GPU::

    python scripts/benchmark_gpu_latency.py --device cuda --backbone openvla-shaped --backbone-scale full \
        --designs head,vla_llm --accel eager,cuda_graph --vla-accel eager,static,static_compile \
        --acceptance-json docs/results/legacy/gpu/cpu_acceptance.json --iters 50 --backbone-iters 10 \
        --out docs/results/gpu/openvla_shaped_h200.json

CPU (small scale, ~20 s on one core)::

    python scripts/benchmark_gpu_latency.py --device cpu --backbone openvla-shaped --backbone-scale small \
        --accel eager --iters 20 --backbone-iters 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

try:
    from rsd.engine.accelerate import ACCELERATE_MODES, accelerate_models
except ModuleNotFoundError:  # not installed: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rsd.engine.accelerate import ACCELERATE_MODES, accelerate_models
from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.main_decoder import RFSQMainDecoder
from rsd.tokenizer.layout import CHUNK_LEN
from rsd.tokenizer.rfsq import RFSQTokenizer

OPS = ("draft", "verify", "step", "baseline", "strict_a3", "strict_a0")
#: the backbone's own operations (``--backbone``), timed once per dtype
BACKBONE_OPS = ("dino", "siglip", "projector", "vision", "llm_prefill", "backbone", "ar_llm", "ar_action")
#: the engine's per-chunk sections (timed end to end with the backbone for baseline, strict_a3, strict_a0)
SECTIONS = ("backbone", "draft", "main", "decode", "total")
#: the issue's targets on one H100/H200
TARGET_DRAFT_MS = 0.1
TARGET_HEAD_PCT = 5.0
TARGET_AR_RATIO = 20.0
OPENVLA_ACTION_TOKENS = 7  # OpenVLA generates one token per action dimension: prefill + 6 decode steps


class ForcedDraft:
    """Runs the (accelerated) draft, then proposes fixed tokens instead (a forced acceptance)."""

    def __init__(self, draft, tokens: torch.Tensor) -> None:
        self.draft, self.tokens = draft, tokens
        self.num_coarse_layers = tokens.shape[1]

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        self.draft.propose(hidden)
        return self.tokens


# ---------------------------------------------------------------------- the OpenVLA-shaped backbone
#: sizes per ``--backbone-scale``: Llama text model, DINOv2 (with registers) and SigLIP vision towers. Every scale
#: keeps 224 px, patch 14 (256 patches per tower), the 3-layer projector and vocab 32000 (OpenVLA pads it to 32064)
BACKBONE_SCALES = {
    "full": {  # Llama-2-7B, DINOv2-L/14 (reg4), SigLIP-so400m/14 at 224 px: OpenVLA-7B's prismatic backbone
        "llm": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, intermediate_size=11008),
        "dino": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4),
        "siglip": dict(hidden_size=1152, num_hidden_layers=27, num_attention_heads=16, intermediate_size=4304),
    },
    "small": {
        "llm": dict(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
        "dino": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=4),
        "siglip": dict(hidden_size=288, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1152),
    },
    "tiny": {
        "llm": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=172),
        "dino": dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=4),
        "siglip": dict(hidden_size=48, num_hidden_layers=1, num_attention_heads=2, intermediate_size=96),
    },
}
IMAGE_SIZE, PATCH_SIZE, VOCAB_SIZE, NUM_REGISTERS = 224, 14, 32000, 4


def _forward_kwarg(module, new: str, old: str) -> str:
    """The name ``module.forward`` takes for an argument transformers renamed (``cache`` / ``past_key_values``)."""
    import inspect

    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return old
    return new if new in params else old


class OpenVLAShapedBackbone(torch.nn.Module):
    """OpenVLA's prismatic structure with random weights (transformers classes, no remote code).

    ``forward(obs) -> hidden [1, D]``: DINOv2 + SigLIP patch features (second-to-last layer, prefix tokens
    dropped, as OpenVLA's timm featurizers) concatenated channel-wise -> fused GELU MLP projector (3 linear
    layers) -> image tokens spliced in after BOS -> Llama prefill -> last layer (final norm) at the last token.
    ``generate_action(obs)``: OpenVLA's greedy autoregressive action (7 tokens: prefill + 6 cached steps).
    ``obs``: ``{"input_ids" [1, T], "pixels_dino" [1, 3, 224, 224], "pixels_siglip" [1, 3, 224, 224]}``.
    """

    def __init__(self, scale: str) -> None:
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

        try:
            from transformers import Dinov2WithRegistersConfig as DinoConfig
            from transformers import Dinov2WithRegistersModel as DinoModel
            reg = dict(num_register_tokens=NUM_REGISTERS)
        except ImportError:  # older transformers: DINOv2 without registers (4 tokens fewer)
            from transformers import Dinov2Config as DinoConfig
            from transformers import Dinov2Model as DinoModel
            reg = {}
        sizes = BACKBONE_SCALES[scale]
        self.scale = scale
        self.dino = DinoModel(DinoConfig(**sizes["dino"], image_size=IMAGE_SIZE, patch_size=PATCH_SIZE,
                                         layerscale_value=1.0, **reg)).eval()
        self.num_prefix = 1 + int(reg.get("num_register_tokens", 0))  # CLS (+ registers)
        self.siglip = SiglipVisionModel(SiglipVisionConfig(**sizes["siglip"], image_size=IMAGE_SIZE,
                                                           patch_size=PATCH_SIZE, vision_use_head=False)).eval()
        llm = sizes["llm"]
        self.llm = LlamaForCausalLM(LlamaConfig(**llm, num_key_value_heads=llm["num_attention_heads"],
                                                vocab_size=VOCAB_SIZE, max_position_embeddings=2048,
                                                rms_norm_eps=1e-5, tie_word_embeddings=False)).eval()
        vision_dim = sizes["dino"]["hidden_size"] + sizes["siglip"]["hidden_size"]
        d = llm["hidden_size"]
        # OpenVLA's FusedMLPProjector ("fused-gelu-mlp"): vision_dim -> 4 * vision_dim -> D -> D
        self.projector = torch.nn.Sequential(torch.nn.Linear(vision_dim, 4 * vision_dim), torch.nn.GELU(),
                                             torch.nn.Linear(4 * vision_dim, d), torch.nn.GELU(),
                                             torch.nn.Linear(d, d)).eval()
        self.hidden_dim = d
        self.vision_dim = vision_dim
        self._cache_kwarg = _forward_kwarg(self.llm, "cache", "past_key_values")

    def sizes(self) -> dict:
        """The exact sizes and parameter counts (printed and written to the JSON)."""
        def count(m):
            return sum(p.numel() for p in m.parameters())

        out = {k: dict(v) for k, v in BACKBONE_SCALES[self.scale].items()}
        out["llm"].update(vocab_size=VOCAB_SIZE, attn=getattr(self.llm.config, "_attn_implementation", None))
        out["dino"]["num_register_tokens"] = self.num_prefix - 1
        out["projector"] = [self.vision_dim, 4 * self.vision_dim, self.hidden_dim, self.hidden_dim]
        out["image"] = dict(size=IMAGE_SIZE, patch=PATCH_SIZE, patches_per_tower=(IMAGE_SIZE // PATCH_SIZE) ** 2)
        out["params_m"] = {k: round(count(getattr(self, k)) / 1e6, 2) for k in ("dino", "siglip", "projector", "llm")}
        out["params_m"]["total"] = round(count(self) / 1e6, 2)
        return out

    def dino_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.dino(pixel_values=pixels, output_hidden_states=True)
        return out.hidden_states[-2][:, self.num_prefix:]

    def siglip_patches(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.siglip(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]

    def image_tokens(self, obs: dict) -> torch.Tensor:
        fused = torch.cat([self.dino_patches(obs["pixels_dino"]), self.siglip_patches(obs["pixels_siglip"])], dim=-1)
        return self.projector(fused)

    def embeddings(self, obs: dict) -> torch.Tensor:
        """``[1, T + 256, D]``: BOS, the image tokens, the rest of the prompt (OpenVLA's order)."""
        text = self.llm.get_input_embeddings()(obs["input_ids"])
        return torch.cat([text[:, :1], self.image_tokens(obs), text[:, 1:]], dim=1)

    def features(self, embeds: torch.Tensor) -> torch.Tensor:
        """LLM prefill without the LM head -> last layer (after the final norm) at the last token."""
        return self.llm.model(inputs_embeds=embeds, use_cache=False).last_hidden_state[:, -1]

    def forward(self, obs: dict) -> torch.Tensor:
        return self.features(self.embeddings(obs))

    def generate_from_embeddings(self, embeds: torch.Tensor, num_tokens: int = OPENVLA_ACTION_TOKENS) -> torch.Tensor:
        """Greedy decoding with a KV cache: prefill (last-token logits) + ``num_tokens - 1`` steps -> ``[1, n]``."""
        out = self.llm(inputs_embeds=embeds, use_cache=True, logits_to_keep=1)
        # the output field follows the argument's name (``cache`` on recent 5.x, ``past_key_values`` before)
        cache = getattr(out, self._cache_kwarg, None)
        if cache is None:
            cache = out.cache if self._cache_kwarg == "past_key_values" else out.past_key_values
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens = [token]
        for _ in range(num_tokens - 1):
            out = self.llm(input_ids=token, use_cache=True, logits_to_keep=1, **{self._cache_kwarg: cache})
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            tokens.append(token)
        return torch.cat(tokens, dim=1)

    def generate_action(self, obs: dict) -> torch.Tensor:
        """OpenVLA's per-action path on this backbone: vision + projector + prefill + 6 decode steps."""
        return self.generate_from_embeddings(self.embeddings(obs))

# ---------------------------------------------------------------------- design 2: the LLM decodes the layers
VLA_ACCEL = ("eager", "static", "static_compile")
TARGET_VLA_SPEEDUP = 1.45
VLA_FORCED = (0, 1, 2, 3)


def acceptance_profile(path: str | None) -> dict | None:
    """P(accepted length a = 0..3) from a CPU benchmark JSON (see the module docstring), or None."""
    if not path:
        return None
    data = json.loads(Path(path).read_text())

    def rows(obj):
        if isinstance(obj, dict):
            yield obj
            for v in obj.values():
                yield from rows(v)
        elif isinstance(obj, list):
            for v in obj:
                yield from rows(v)

    for row in rows(data):
        if "profile" in row and len(row["profile"]) == 4:
            p = [float(x) for x in row["profile"]]
            return {"source": path, "p": [x / sum(p) for x in p], "from": "profile"}
        if "accepted_length_counts" in row and len(row["accepted_length_counts"]) == 4:
            c = [float(x) for x in row["accepted_length_counts"]]
            return {"source": path, "p": [x / sum(c) for x in c], "from": "accepted_length_counts",
                    "mode": row.get("mode")}
    for row in rows(data):  # benchmark_engine.py: per_layer_acceptance of its first strict row (marginal)
        pla = row.get("per_layer_acceptance")
        if pla and len(pla) == 3 and "strict" in str(row.get("mode", "strict")):
            q = [1.0, *[float(x) for x in pla], 0.0]  # P(a >= k)
            return {"source": path, "p": [q[k] - q[k + 1] for k in range(4)], "from": "per_layer_acceptance",
                    "mode": row.get("mode")}
    raise SystemExit(f"--acceptance-json {path}: no accepted_length_counts / profile / per_layer_acceptance found")


class _ForcedTokens:
    """Runs the real draft on the prompt, then proposes given tokens (a forced accepted length)."""

    num_coarse_layers = 3

    def __init__(self, draft, tokens: torch.Tensor) -> None:
        self.draft, self.tokens = draft, tokens

    def propose(self, hidden) -> torch.Tensor:
        self.draft.propose(hidden)
        return self.tokens


def forced_drafts(main, prompt, greedy: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """``(consistent, {a: tokens [B, 3, 128]})``: drafts that strict verification accepts exactly ``a`` layers of.

    Built from the verification call's own greedy layers (``self_consistent_prefix``), not from the baseline's
    step-by-step layers: in bfloat16 on a GPU those differ in a near-tie token or two per layer, so a draft copied
    from the baseline was accepted only up to layer 0 (the H200 run at 90feab5: a = 1, 2, 3 all accepted 1).
    ``a < 3``: layer ``a`` is then changed in every token (rejected), the layers before it are kept."""
    from rsd.models.vla_llm_main import self_consistent_prefix

    consistent = self_consistent_prefix(main, prompt, greedy[:, :3])
    out = {}
    for a in VLA_FORCED:
        tok = consistent.clone()
        if a < 3:
            tok[:, a] = (tok[:, a] + 1) % 7
        out[a] = tok
    return consistent, out


def fault_hook(mode: str) -> None:
    """Test hook: ``RSD_BENCH_FAULT=<mode>:raise`` or ``<mode>:segv`` makes that vla_llm mode fail (an exception, or
    the process killing itself with SIGSEGV as inductor's CUDA-graph path did at 90feab5)."""
    spec = os.environ.get("RSD_BENCH_FAULT", "")
    if ":" not in spec or spec.split(":", 1)[0] != mode:
        return
    kind = spec.split(":", 1)[1]
    if kind == "segv":
        import signal

        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGSEGV)
    raise RuntimeError(f"fault injected into vla_llm mode {mode!r} (RSD_BENCH_FAULT)")


def bench_vla_llm(backbone: OpenVLAShapedBackbone, obs: dict, dtype: torch.dtype, device: torch.device, args,
                  accel: str, profile: dict | None, tokenizer) -> dict:
    """Design 2 (``VLALLMMain`` on the backbone's Llama) for one cache mode; see the module docstring.

    A failure anywhere is recorded (``info.fallback``, the mode's row has no ``ms``), never raised."""
    t0 = time.perf_counter()
    info = {"accelerate": accel, "fallback": None}
    lm = backbone.llm.model
    original_forward = lm.forward
    try:
        res = _bench_vla_llm(backbone, obs, dtype, device, args, accel, profile, tokenizer, info, t0)
    except Exception as exc:  # noqa: BLE001 - a failing mode (e.g. a compile/graph error) is recorded, not fatal
        info["fallback"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        print(f"    vla_llm [{accel}] failed: {info['fallback']}", flush=True)
        return {"info": info, "setup_s": time.perf_counter() - t0}
    finally:
        lm.forward = original_forward
    return res


def _bench_vla_llm(backbone, obs, dtype, device, args, accel, profile, tokenizer, info, t0) -> dict:
    from transformers import StaticCache

    from rsd.models.vla_llm_main import LLMPrompt, VLALLMMain

    fault_hook(accel)
    torch.manual_seed(args.seed)
    lm = backbone.llm.model
    main = VLALLMMain(lm).to(device=device, dtype=dtype).eval()
    d = backbone.hidden_dim
    draft = (RFSQDraftModelWithProjection(input_dim=d, hidden_dim=64, num_heads=4, feedforward_dim=128, dropout=0.0)
             if args.tiny else RFSQDraftModelWithProjection(input_dim=d, dropout=0.0)).to(device=device, dtype=dtype).eval()
    with torch.inference_mode():
        embeds = backbone.embeddings(obs)
    length = int(embeds.shape[1])
    static = None
    if accel in ("static", "static_compile"):
        static = StaticCache(config=lm.config, max_cache_len=length + main.num_layers)
    if accel == "static_compile":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        lm.forward = torch.compile(lm.forward, mode=mode, dynamic=False)
        info["compile"] = mode
    kw = main._cache_kw

    def prefill() -> LLMPrompt:
        e = backbone.embeddings(obs)
        if static is not None:  # reuse the preallocated cache (static addresses for the graphs): rewind it
            from rsd.models.vla_llm_main import crop_cache

            crop_cache(static, 0)
        out = lm(inputs_embeds=e, use_cache=True, **({kw: static} if static is not None else {}))
        cache = static if static is not None else getattr(out, kw, None) or out.past_key_values
        return LLMPrompt(out.last_hidden_state[:, -1], cache, length)

    with torch.inference_mode():
        prompt = prefill()
        base = RSDInferenceEngine(main, mode="baseline", tokenizer=tokenizer, device=device)
        greedy = base.predict(prompt, decode=False).tokens
        consistent, drafts = forced_drafts(main, prompt, greedy)
        forced = {a: RSDInferenceEngine(main, _ForcedTokens(draft, tok), mode="strict", tokenizer=tokenizer,
                                        device=device) for a, tok in drafts.items()}
        equal = {"verify_vs_steps_tokens_differing": [int((consistent[:, k] != greedy[:, k]).sum()) for k in range(3)]}
        for a, eng in forced.items():
            out = eng.predict(prefill(), decode=False)
            equal[a] = {"requested": a, "accepted": out.accepted_length, "accepted_as_forced": out.accepted_length == a,
                        "tokens_equal_baseline": bool(torch.equal(out.tokens, greedy)),
                        "tokens_differing": int((out.tokens != greedy).sum())}
        bad = [a for a in VLA_FORCED if not equal[a]["accepted_as_forced"]]
        if bad:
            raise RuntimeError(f"forced acceptance failed for a = {bad}: {equal}")

        def verify():
            return main.score(prompt, consistent, main.new_cache(1))

        cache = main.new_cache(1)

        def step():
            cache.truncate(4)
            return main.extend(greedy[:, 3:4], cache)

        # decode only (the prompt prefilled once; score() rewinds its cache): the parts' sum is comparable
        ops = {"backbone": prefill, "draft": lambda: draft.propose(prompt), "verify": verify, "step": step,
               "tokens_baseline": lambda: base.predict(prompt, decode=False)}
        for a, eng in forced.items():
            ops[f"tokens_a{a}"] = (lambda e=eng: e.predict(prompt, decode=False))
        ops["baseline"] = lambda: base.predict(prefill())
        for a, eng in forced.items():
            ops[f"strict_a{a}"] = (lambda e=eng: e.predict(prefill()))
        ms = {}
        for name, fn in ops.items():
            if name in ("draft", "verify", "step", "tokens_baseline"):  # re-attach the prompt's sequence
                prompt = prefill()
                cache = main.new_cache(1)
                main.score(prompt, consistent, cache)
            ms[name] = timed(fn, args.backbone_iters, args.backbone_warmup, device)
            print(f"    vla_llm [{accel}] {name}: {ms[name]['median']:.3f} ms", flush=True)
    base_ms = ms["baseline"]["median"]
    step_ms, verify_ms, draft_ms = ms["step"]["median"], ms["verify"]["median"], ms["draft"]["median"]
    speed = {}
    for a in VLA_FORCED:
        steps = 4 if a == 3 else 7 - a
        parts = draft_ms + verify_ms + steps * step_ms
        tok = ms[f"tokens_a{a}"]["median"]
        speed[a] = {"chunk_ms": ms[f"strict_a{a}"]["median"], "speedup": base_ms / ms[f"strict_a{a}"]["median"],
                    "ideal_llm_forwards": 7 / (8 - a), "tokens_ms": tok,
                    "tokens_speedup": ms["tokens_baseline"]["median"] / tok,
                    "parts_ms": parts, "overhead_ms": tok - parts, "llm_steps_after_verify": steps}
    res = {"info": info, "setup_s": time.perf_counter() - t0, "ms": ms, "prompt_tokens": length,
           "new_params_m": round(sum(v.numel() for v in main.new_parameters().values()) / 1e6, 2),
           "strict_check": equal, "forced": speed,
           "baseline_tokens": {"ms": ms["tokens_baseline"]["median"], "parts_ms": 7 * step_ms,
                               "overhead_ms": ms["tokens_baseline"]["median"] - 7 * step_ms},
           "decode_ms": {"baseline": base_ms - ms["backbone"]["median"]},
           "per_action_ms": {"baseline": base_ms / CHUNK_LEN, **{f"strict_a{a}": v["chunk_ms"] / CHUNK_LEN
                                                                 for a, v in speed.items()}}}
    if profile is not None:
        expected = sum(p * speed[a]["chunk_ms"] for a, p in enumerate(profile["p"]))
        res["profile"] = {**profile, "expected_chunk_ms": expected, "speedup": base_ms / expected,
                          "ideal_llm_forwards": 7 / sum(p * (8 - a) for a, p in enumerate(profile["p"]))}
    return res


def run_child(cmd: list[str], out_path: Path, timeout: float) -> dict:
    """Run ``cmd`` (a child benchmark that writes its row as JSON to ``out_path``) and return that row; a child
    that dies (a signal such as SIGSEGV, a non-zero exit, a timeout) gives a row with the reason instead."""
    import signal
    import subprocess

    t0 = time.perf_counter()
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or "")[-2000:] if isinstance(exc.stdout, str) else ""
        return {"info": {"fallback": f"child process timed out after {timeout:.0f} s", "isolated": True},
                "child": {"returncode": None, "output_tail": tail}, "setup_s": time.perf_counter() - t0}
    if res.stdout:
        print("\n".join("    | " + line for line in res.stdout.rstrip().splitlines()[-40:]), flush=True)
    if res.returncode == 0 and out_path.is_file():
        row = json.loads(out_path.read_text())
        for key in ("forced", "strict_check"):  # JSON made the forced accepted lengths strings
            if isinstance(row.get(key), dict):
                row[key] = {int(k) if str(k).isdigit() else k: v for k, v in row[key].items()}
        row.setdefault("info", {})["isolated"] = True
        return row
    rc = res.returncode
    why = (f"child process killed by signal {signal.Signals(-rc).name}" if rc < 0
           else f"child process exited with code {rc}")
    err = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    if err and rc > 0:
        why += f": {err[-1][:300]}"
    return {"info": {"fallback": why, "isolated": True},
            "child": {"returncode": rc, "output_tail": (res.stdout + res.stderr)[-2000:]},
            "setup_s": time.perf_counter() - t0}


def vla_targets(vla_rows: dict, head_rows: list[dict], ar_action_ms: float) -> dict:
    """The issue's targets for design 2 and for the faster design per action (best mode of each)."""
    ok = {k: r for k, r in vla_rows.items() if "ms" in r}
    out = {}
    if ok:
        best = max(ok.items(), key=lambda kv: kv[1].get("profile", {}).get("speedup", kv[1]["forced"][3]["speedup"]))
        sp = best[1].get("profile", {}).get("speedup")
        out["vla_llm_speedup_at_profile"] = {"target": f">= {TARGET_VLA_SPEEDUP}x", "mode": best[0], "value": sp,
                                             "met": None if sp is None else sp >= TARGET_VLA_SPEEDUP}
        vla_pa = min(min(r["per_action_ms"].values()) for r in ok.values())
    else:
        vla_pa = float("inf")
    head_pa = min((m["per_action_ms"] for r in head_rows for m in r.get("chunk_summary", {}).get("modes", {}).values()),
                  default=float("inf"))
    faster = min(vla_pa, head_pa)
    out["faster_design_per_action_vs_openvla_ar"] = {
        "target": f">= {TARGET_AR_RATIO:.0f}x", "design": "vla_llm" if vla_pa < head_pa else "head",
        "per_action_ms": faster, "openvla_ar_ms": ar_action_ms, "value": ar_action_ms / faster,
        "met": ar_action_ms / faster >= TARGET_AR_RATIO}
    return out


def print_vla_tables(name: str, dt: str, vla: dict) -> None:
    print(f"\nvla_llm design (the VLA's LLM decodes the 8 layers; {dt}, batch 1, median ms) on {name}:\n")
    print("| cache | backbone (prefill) | draft | verify (3 pos.) | step | baseline chunk | a=0 | a=1 | a=2 | a=3 "
          "| profile chunk |")
    print("|---|" + "---|" * 10)
    for accel, r in vla["rows"].items():
        if "ms" not in r:
            print(f"| {accel} | failed: {r['info']['fallback']} |" + " |" * 9)
            continue
        ms = r["ms"]
        prof = r.get("profile", {}).get("expected_chunk_ms")
        print(f"| {accel} | {ms['backbone']['median']:.3f} | {ms['draft']['median']:.3f} | {ms['verify']['median']:.3f} "
              f"| {ms['step']['median']:.3f} | {ms['baseline']['median']:.3f} | "
              + " | ".join(f"{ms[f'strict_a{a}']['median']:.3f}" for a in VLA_FORCED)
              + f" | {'-' if prof is None else f'{prof:.3f}'} |")
    print("\nspeedup per chunk over the same model's baseline (measured / ideal in LLM forwards 7/(8-a)):\n")
    print("| cache | a=0 | a=1 | a=2 | a=3 | at the CPU profile |")
    print("|---|---|---|---|---|---|")
    for accel, r in vla["rows"].items():
        if "ms" not in r:
            continue
        f = r["forced"]
        prof = r.get("profile")
        print(f"| {accel} | " + " | ".join(f"{f[a]['speedup']:.2f}x / {f[a]['ideal_llm_forwards']:.2f}x"
                                           for a in VLA_FORCED)
              + (f" | {prof['speedup']:.2f}x / {prof['ideal_llm_forwards']:.2f}x |" if prof else " | - |"))
    print("\ndecode only (prompt prefilled once), median ms: measured vs its parts (draft + verify + steps x step); "
          "overhead = measured - parts:\n")
    print("| cache | baseline (7 steps) | a=0 | a=1 | a=2 | a=3 | a=3 speedup (ideal 1.40x) | strict check: accepted "
          "a=0..3 | verify vs steps, tokens differing in layers 0..2 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for accel, r in vla["rows"].items():
        if "ms" not in r:
            continue
        f, bt, chk = r["forced"], r["baseline_tokens"], r["strict_check"]
        print(f"| {accel} | {bt['ms']:.3f} (+{bt['overhead_ms']:.3f}) | "
              + " | ".join(f"{f[a]['tokens_ms']:.3f} (parts {f[a]['parts_ms']:.3f}, +{f[a]['overhead_ms']:.3f})"
                           for a in VLA_FORCED)
              + f" | {f[3]['tokens_speedup']:.2f}x | "
              + " / ".join(str(chk[a]["accepted"]) for a in VLA_FORCED)
              + f" | {chk['verify_vs_steps_tokens_differing']} |")
    for key, t in vla["targets"].items():
        met = t.get("met")
        state = "not measured" if met is None else ("met" if met else "NOT met")
        val = t.get("value")
        print(f"target {key}: {t['target']}: {'-' if val is None else f'{val:.2f}x'} -> {state}"
              + (f" (design {t['design']}, {t['per_action_ms']:.3f} ms vs {t['openvla_ar_ms']:.3f} ms per action)"
                 if "design" in t else ""))


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores)"


def build_backbone(scale: str, dtype: torch.dtype, device: torch.device, prompt_tokens: int, seed: int):
    """The backbone built on ``device`` in ``dtype`` (random weights) and one observation for it."""
    if scale == "full" and device.type != "cuda":
        raise SystemExit("--backbone-scale full is a 7.5 B parameter model (~15 GB in bfloat16, ~30 GB in float32): "
                         "it runs on CUDA only (model construction and a 7B forward are out of reach of a CPU "
                         "benchmark); use --backbone-scale small or tiny on a CPU")
    if scale == "full" and device.type == "cuda":
        need = 7.6e9 * torch.finfo(dtype).bits / 8 + 2e9
        free, _ = torch.cuda.mem_get_info(device)
        if free < need:
            raise SystemExit(f"--backbone-scale full in {dtype} needs ~{need / 1e9:.0f} GB of GPU memory, "
                             f"{free / 1e9:.0f} GB free on {torch.cuda.get_device_name(device)}")
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created (and initialised) on the device in the dtype
    try:
        with torch.device(device):
            backbone = OpenVLAShapedBackbone(scale)
    finally:
        torch.set_default_dtype(old)
    bad = {(p.device.type, p.dtype) for p in backbone.parameters()} - {(device.type, dtype)}
    if bad:  # not expected (every parameter is created under the device / dtype above); cast what is not
        print(f"note: backbone parameters in {sorted(map(str, bad))}, moved to {device} / {dtype}", flush=True)
        backbone.to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 2)
    ids = torch.randint(3, VOCAB_SIZE, (1, prompt_tokens), generator=g)
    ids[0, 0] = 1  # BOS
    ids[0, -1] = 29871  # the empty token OpenVLA's predict_action appends
    obs = {"input_ids": ids.to(device),
           "pixels_dino": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device=device, dtype=dtype),
           "pixels_siglip": torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE, generator=g).to(device=device, dtype=dtype)}
    return backbone, obs


def bench_backbone(backbone: OpenVLAShapedBackbone, obs: dict, args, device: torch.device) -> dict:
    """Medians of the backbone's parts, its whole forward, and OpenVLA's autoregressive action."""
    iters, warmup = args.backbone_iters, args.backbone_warmup
    with torch.inference_mode():
        fused = torch.cat([backbone.dino_patches(obs["pixels_dino"]),
                           backbone.siglip_patches(obs["pixels_siglip"])], dim=-1)
        embeds = backbone.embeddings(obs)
        hidden = backbone(obs)
        action_tokens = backbone.generate_action(obs)
        ops = {
            "dino": lambda: backbone.dino_patches(obs["pixels_dino"]),
            "siglip": lambda: backbone.siglip_patches(obs["pixels_siglip"]),
            "projector": lambda: backbone.projector(fused),
            "vision": lambda: backbone.image_tokens(obs),
            "llm_prefill": lambda: backbone.features(embeds),
            "backbone": lambda: backbone(obs),
            "ar_llm": lambda: backbone.generate_from_embeddings(embeds),
            "ar_action": lambda: backbone.generate_action(obs),
        }
        ms = {}
        for name, fn in ops.items():
            ms[name] = timed(fn, iters, warmup, device)
            print(f"  {name}: {ms[name]['median']:.3f} ms", flush=True)
    return {"ms": ms, "tokens": int(embeds.shape[1]), "hidden_finite": bool(torch.isfinite(hidden).all()),
            "ar_action_tokens": int(action_tokens.shape[1])}


def bench_chunks(engines: dict, obs: dict, args) -> dict:
    """Per-chunk medians of the engine's own sections (``predict_observation``: backbone, draft, main, decode)."""
    out = {}
    for name, engine in engines.items():
        for _ in range(args.backbone_warmup):
            engine.predict_observation(obs)
        times = [engine.predict_observation(obs).times for _ in range(args.backbone_iters)]
        out[name] = {s: 1e3 * statistics.median([t.get(s, 0.0) for t in times]) for s in SECTIONS}
    return out


def chunk_summary(chunk: dict, backbone_res: dict, draft_ms: float) -> dict:
    """Per-mode totals, per-action latency, ratios and the targets (see the module docstring)."""
    ar_action = backbone_res["ms"]["ar_action"]["median"]
    modes = {}
    for name, sec in chunk.items():
        head = sec["draft"] + sec["main"] + sec["decode"]
        per_action = sec["total"] / CHUNK_LEN
        modes[name] = {**{f"{s}_ms": sec[s] for s in SECTIONS if s != "total"}, "chunk_ms": sec["total"],
                       "chunk_sum_ms": sec["backbone"] + head, "head_ms": head,
                       "head_pct_of_backbone": 100.0 * head / sec["backbone"],
                       "per_action_ms": per_action, "ar_per_action_ms": ar_action,
                       "ar_over_rsd_per_action": ar_action / per_action}
    strict = ("strict_a3", "strict_a0")
    head_pct = {k: modes[k]["head_pct_of_backbone"] for k in strict}
    ratio = {k: modes[k]["ar_over_rsd_per_action"] for k in strict}
    targets = {
        "draft_ms": {"target": f"<= {TARGET_DRAFT_MS} ms", "value": draft_ms, "met": draft_ms <= TARGET_DRAFT_MS},
        "head_pct_of_backbone": {"target": f"<= {TARGET_HEAD_PCT} %", "a3": head_pct["strict_a3"],
                                 "a0": head_pct["strict_a0"], "met": max(head_pct.values()) <= TARGET_HEAD_PCT},
        "ar_over_rsd_per_action": {"target": f">= {TARGET_AR_RATIO}x", "a3": ratio["strict_a3"],
                                   "a0": ratio["strict_a0"], "met": min(ratio.values()) >= TARGET_AR_RATIO},
    }
    return {"modes": modes, "targets": targets}


def build_models(args, dtype: torch.dtype, device: torch.device):
    torch.manual_seed(args.seed)
    if args.tiny:
        main = RFSQMainDecoder(input_dim=args.hidden_dim, d_model=64, num_blocks=2, num_heads=4, ff_dim=128)
        draft = RFSQDraftModelWithProjection(input_dim=args.hidden_dim, hidden_dim=64, num_heads=4,
                                             feedforward_dim=128, dropout=0.0)
    else:  # the defaults of the project's configs
        main = RFSQMainDecoder(input_dim=args.hidden_dim, dropout=0.0)
        draft = RFSQDraftModelWithProjection(input_dim=args.hidden_dim, dropout=0.0)
    return main.to(device=device, dtype=dtype).eval(), draft.to(device=device, dtype=dtype).eval()


def timed(fn, iters: int, warmup: int, device: torch.device) -> dict:
    """Median / p10 / p90 milliseconds of ``fn()``, each call on its own: on CUDA, events around the call on
    an idle GPU, then a synchronize (the latency of one call, not the throughput of queued calls)."""
    for _ in range(warmup):
        fn()
    ms = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t0))
    q = np.percentile(ms, [10, 90])
    return {"median": statistics.median(ms), "p10": float(q[0]), "p90": float(q[1])}


def bench_mode(main, draft, hidden: torch.Tensor, accel: str, args, device: torch.device,
               backbone=None, obs=None, tokenizer=None) -> dict:
    """The call-by-call ops; with ``backbone`` (``hidden`` = its output on ``obs``) also the engines' per-chunk
    sections end to end (``predict_observation`` with ``tokenizer``'s decode) in ``res["chunk"]``."""
    t0 = time.perf_counter()
    # one accelerated draft / main shared by the three engines (compiled once; given to the engines as they are)
    d, m, info = accelerate_models(draft, main, accel, device)
    base = RSDInferenceEngine(m, mode="baseline", device=device)
    strict = RSDInferenceEngine(m, d, mode="strict", device=device)
    with torch.inference_mode():
        greedy = base.predict(hidden, decode=False).tokens  # compiles the baseline path
        forced = RSDInferenceEngine(m, ForcedDraft(d, greedy[:, : draft.num_coarse_layers].clone()),
                                    mode="strict", device=device)
        out_a3 = forced.predict(hidden, decode=False)
        out_a0 = strict.predict(hidden, decode=False)
        drafted = d.propose(hidden)
        cache = m.new_cache(1)
        m.score(hidden, greedy[:, :3], cache)  # hidden + layers 0..2 cached (length 4; the verify call's shape)

        def step():
            cache.truncate(4)
            return m.extend(greedy[:, 3:4], cache)  # layer 3 in -> logits of layer 4

        ops = {
            "draft": lambda: d.propose(hidden),
            "verify": lambda: m.score(hidden, drafted, m.new_cache(1)),
            "step": step,
            "baseline": lambda: base.predict(hidden, decode=False),
            "strict_a3": lambda: forced.predict(hidden, decode=False),
            "strict_a0": lambda: strict.predict(hidden, decode=False),
        }
        step()
        setup_s = time.perf_counter() - t0
        res = {name: timed(fn, args.iters, args.warmup, device) for name, fn in ops.items()}
        check = {"tokens": greedy.cpu(), "drafted": drafted.cpu(), "a3_tokens": out_a3.tokens.cpu(),
                 "a0_tokens": out_a0.tokens.cpu()}
    extra = {}
    if backbone is not None:
        kw = dict(tokenizer=tokenizer, backbone=backbone, device=device)
        engines = {"baseline": RSDInferenceEngine(m, mode="baseline", **kw),
                   "strict_a3": RSDInferenceEngine(m, ForcedDraft(d, greedy[:, : draft.num_coarse_layers].clone()),
                                                   mode="strict", **kw),
                   "strict_a0": RSDInferenceEngine(m, d, mode="strict", **kw)}
        extra["chunk"] = bench_chunks(engines, obs, args)
        extra["fused_head"] = bench_fused_head(main, tokenizer, hidden, accel, args, device,
                                               RSDInferenceEngine(main, mode="baseline", tokenizer=tokenizer,
                                                                  device=device))
        extra["chunk_accepted"] = {k: e.stats.mean_accepted_length for k, e in engines.items() if k != "baseline"}
    return {**extra, "accelerate": accel, "info": dict(info), "setup_s": setup_s,
            "ms": res, "accepted_a3": out_a3.accepted_length, "accepted_a0": out_a0.accepted_length,
            # strict is lossless up to float rounding: its verification scores 4 layers in one call
            "strict_equals_baseline": {"a3": bool(torch.equal(out_a3.tokens, greedy)),
                                       "a0": bool(torch.equal(out_a0.tokens, greedy)),
                                       "a3_tokens_differing": int((out_a3.tokens != greedy).sum()),
                                       "a0_tokens_differing": int((out_a0.tokens != greedy).sum())},
            "_check": check}


def bench_fused_head(main, tokenizer, hidden: torch.Tensor, accel: str, args, device: torch.device, engine) -> dict:
    """The light head's decode (8 main steps + RFSQ decode + gripper) as ONE function (``rsd.engine.accelerate
    .LightHead``: eager, ``compile`` or one captured ``cuda_graph`` for the row's mode): median ms, and whether its
    tokens / actions equal the eager engine's baseline (else the count of differing tokens)."""
    from rsd.engine.accelerate import LightHead

    t0 = time.perf_counter()
    head = LightHead(main, tokenizer, accel)
    with torch.inference_mode():
        ref = engine.predict(hidden)
        tokens, actions = head(hidden)
        ms = timed(lambda: head(hidden), args.iters, args.warmup, device)
    return {"info": dict(head.info), "setup_s": time.perf_counter() - t0, "ms": ms,
            "tokens_equal_engine": bool(torch.equal(tokens, ref.tokens)),
            "tokens_differing": int((tokens != ref.tokens).sum()), "tokens_total": int(tokens.numel()),
            "actions_max_abs_diff": float((actions.float() - ref.actions.float()).abs().max())}


def print_tables(rows: list[dict]) -> None:
    print("\nlatency, median ms per call (batch 1):\n")
    print("| dtype | accelerate | in use (draft / main) | " + " | ".join(OPS) + " | strict a=3 vs baseline "
          "| strict a=0 vs baseline |")
    print("|---|---|---|" + "---|" * len(OPS) + "---|---|")
    for r in rows:
        ms = r["ms"]
        use = f"{r['info']['draft']} / {r['info']['main']}" + (" (fell back)" if r["info"]["fallback"] else "")
        print(f"| {r['dtype']} | {r['accelerate']} | {use} | "
              + " | ".join(f"{ms[o]['median']:.3f}" for o in OPS)
              + f" | {r['speedup_a3']:.2f}x | {r['speedup_a0']:.2f}x |")
    print("\nspeedup over eager (same dtype; eager median / this median), and tokens vs eager:\n")
    print("| dtype | accelerate | " + " | ".join(OPS) + " | tokens == eager | strict == baseline (a=3 / a=0) |")
    print("|---|---|" + "---|" * len(OPS) + "---|---|")
    for r in rows:
        eq = r["strict_equals_baseline"]
        a0 = "True" if eq["a0"] else f"False ({eq['a0_tokens_differing']} of 1024 tokens)"
        print(f"| {r['dtype']} | {r['accelerate']} | " + " | ".join(f"{r['vs_eager'][o]:.2f}x" for o in OPS)
              + f" | {r['tokens_equal_eager']} | {eq['a3']} / {a0} |")
    fallbacks = [r for r in rows if r["info"]["fallback"]]
    for r in fallbacks:
        print(f"\n{r['dtype']} {r['accelerate']}: fell back to eager: {r['info']['fallback']}")


def print_backbone_tables(machine: dict, bb: dict, rows: list[dict]) -> None:
    name = machine["name"]
    print(f"\nOpenVLA-shaped backbone ({bb['scale']} scale, random weights, {bb['tokens']} tokens), "
          f"median ms per call, batch 1, on {name}:\n")
    print("| dtype | " + " | ".join(BACKBONE_OPS) + " |")
    print("|---|" + "---|" * len(BACKBONE_OPS))
    for dt, r in bb["results"].items():
        print(f"| {dt} | " + " | ".join(f"{r['ms'][o]['median']:.3f}" for o in BACKBONE_OPS) + " |")
    print("\n(ar_llm: LLM prefill + 6 greedy decode steps with KV cache; ar_action: vision + projector + ar_llm = "
          "OpenVLA's autoregressive latency per action)")
    print(f"\nper chunk of {CHUNK_LEN} actions, median ms of the engine's sections (predict_observation), on {name}:\n")
    print("| dtype | accelerate | mode | backbone | draft | main | decode | chunk total | draft+main+decode "
          "| % of backbone | per action (total/8) | OpenVLA AR per action | AR / RSD per action |")
    print("|---|---|---|" + "---|" * 10)
    for r in rows:
        for mode, m in r["chunk_summary"]["modes"].items():
            print(f"| {r['dtype']} | {r['accelerate']} | {mode} | {m['backbone_ms']:.3f} | {m['draft_ms']:.3f} | "
                  f"{m['main_ms']:.3f} | {m['decode_ms']:.3f} | {m['chunk_ms']:.3f} | {m['head_ms']:.3f} | "
                  f"{m['head_pct_of_backbone']:.1f} % | {m['per_action_ms']:.3f} | {m['ar_per_action_ms']:.3f} | "
                  f"{m['ar_over_rsd_per_action']:.1f}x |")
    print(f"\ntargets (set for one H100/H200; this run: {name}); strict worst case a=0 decides, a=3 shown:\n")
    print(f"| dtype | accelerate | draft ms (<= {TARGET_DRAFT_MS}) | (draft+main+decode) / backbone, a=3 / a=0 "
          f"(<= {TARGET_HEAD_PCT} %) | OpenVLA AR / RSD per action, a=3 / a=0 (>= {TARGET_AR_RATIO:.0f}x) |")
    print("|---|---|---|---|---|")

    def met(ok: bool) -> str:
        return "met" if ok else "NOT met"

    for r in rows:
        t = r["chunk_summary"]["targets"]
        d, h, a = t["draft_ms"], t["head_pct_of_backbone"], t["ar_over_rsd_per_action"]
        print(f"| {r['dtype']} | {r['accelerate']} | {d['value']:.3f}: {met(d['met'])} | "
              f"{h['a3']:.1f} % / {h['a0']:.1f} %: {met(h['met'])} | {a['a3']:.1f}x / {a['a0']:.1f}x: {met(a['met'])} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default=None,
                   help="comma-separated (default float32,bfloat16; with --backbone: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--accel", default=None,
                   help=f"comma-separated of {ACCELERATE_MODES} (default: all on CUDA, eager,cuda_graph on CPU)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=None, help="default: min(20, iters)")
    p.add_argument("--hidden-dim", type=int, default=4096, help="draft / main input size (without --backbone)")
    p.add_argument("--tiny", action="store_true", help="tiny models (tests), not the default sizes")
    p.add_argument("--backbone", choices=("none", "openvla-shaped"), default="none",
                   help="also time a random-weight OpenVLA-shaped backbone, OpenVLA's autoregressive action and the "
                        "engine per chunk end to end (needs transformers)")
    p.add_argument("--backbone-scale", choices=tuple(BACKBONE_SCALES), default="full",
                   help="full: Llama-2-7B + DINOv2-L + SigLIP-so400m (CUDA only); small / tiny: the same structure, "
                        "smaller (tiny also uses the tiny draft / main decoder)")
    p.add_argument("--backbone-iters", type=int, default=20, help="timed calls of each backbone op / engine chunk")
    p.add_argument("--backbone-warmup", type=int, default=3)
    p.add_argument("--prompt-tokens", type=int, default=20,
                   help="prompt tokens incl. BOS and the empty token (+256 image tokens = 276 by default)")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--designs", default="head",
                   help="comma-separated: head (light depth decoder), vla_llm (the backbone's LLM decodes the layers; "
                        "needs --backbone openvla-shaped)")
    p.add_argument("--vla-accel", default=None,
                   help=f"vla_llm cache modes, comma-separated of {VLA_ACCEL} (default: all on CUDA, eager,static on CPU)")
    p.add_argument("--acceptance-json", default=None,
                   help="a CPU benchmark JSON (scripts/benchmark_engine.py --out) whose acceptance profile weighs the "
                        "forced accepted lengths of the vla_llm design")
    p.add_argument("--vla-isolate", default="static_compile",
                   help="vla_llm cache modes run in a child process (comma-separated, 'all' or 'none'; default "
                        "static_compile): a segfault there (inductor's CUDA graphs) costs that row, not the run")
    p.add_argument("--vla-child-timeout", type=float, default=900.0, help="seconds per isolated vla_llm mode")
    p.add_argument("--vla-child", default=None, help=argparse.SUPPRESS)  # internal: run one mode, write its row
    p.add_argument("--vla-child-out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", help="write the results as JSON here (rewritten after every row)")
    args = p.parse_args(argv)
    raw_argv = list(sys.argv[1:] if argv is None else argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    use_backbone = args.backbone != "none"
    designs = [x.strip() for x in args.designs.split(",") if x.strip()]
    if set(designs) - {"head", "vla_llm"}:
        raise SystemExit(f"unknown --designs {designs}; choose from head, vla_llm")
    if "vla_llm" in designs and not use_backbone:
        raise SystemExit("--designs vla_llm decodes with the backbone's LLM: add --backbone openvla-shaped")
    vla_accels = [x.strip() for x in (args.vla_accel or (",".join(VLA_ACCEL) if device.type == "cuda"
                                                         else "eager,static")).split(",") if x.strip()]
    if set(vla_accels) - set(VLA_ACCEL):
        raise SystemExit(f"unknown --vla-accel {vla_accels}; choose from {VLA_ACCEL}")
    profile = acceptance_profile(args.acceptance_json)
    isolate = set(vla_accels if args.vla_isolate == "all" else
                  [] if args.vla_isolate == "none" else [x.strip() for x in args.vla_isolate.split(",") if x.strip()])
    if use_backbone and args.backbone_scale == "full" and device.type != "cuda":
        build_backbone("full", torch.float32, device, args.prompt_tokens, args.seed)  # raises the explanation
    if use_backbone and args.backbone_scale == "tiny":
        args.tiny = True
    if use_backbone:
        args.hidden_dim = BACKBONE_SCALES[args.backbone_scale]["llm"]["hidden_size"]
    torch.set_num_threads(args.threads)
    args.warmup = min(20, args.iters) if args.warmup is None else args.warmup
    accels = (args.accel or ",".join(ACCELERATE_MODES if device.type == "cuda" else ("eager", "cuda_graph")))
    accels = [a.strip() for a in accels.split(",") if a.strip()]
    if "eager" not in accels:
        accels.insert(0, "eager")  # the reference of the ratios and the token checks
    bad = [a for a in accels if a not in ACCELERATE_MODES]
    if bad:
        raise SystemExit(f"unknown --accel {bad}; choose from {ACCELERATE_MODES}")
    if args.dtypes is None:
        args.dtypes = ("bfloat16" if device.type == "cuda" else "float32") if use_backbone else "float32,bfloat16"
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    machine = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else cpu_name(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": platform.python_version(),
               "threads": torch.get_num_threads()}
    if use_backbone:
        import transformers

        machine["transformers"] = transformers.__version__
    print(f"machine: {machine}; iters {args.iters}, warmup {args.warmup}; "
          f"models: {'tiny' if args.tiny else 'default size'}, hidden {args.hidden_dim}", flush=True)

    if args.vla_child:  # one vla_llm mode in this (child) process: its row as JSON, nothing else
        dtype = getattr(torch, dtypes[0])
        backbone, obs = build_backbone(args.backbone_scale, dtype, device, args.prompt_tokens, args.seed)
        torch.manual_seed(args.seed)
        tokenizer = RFSQTokenizer().to(device).eval()
        row = bench_vla_llm(backbone, obs, dtype, device, args, args.vla_child, profile, tokenizer)
        Path(args.vla_child_out).write_text(json.dumps(row, default=str) + "\n")
        return 0

    def child_row(vaccel: str, dt: str) -> dict:
        import tempfile

        keep = []
        skip = {"--out", "--dtypes", "--vla-accel", "--designs", "--vla-child", "--vla-child-out"}
        it = iter(raw_argv)
        for a in it:
            name = a.split("=", 1)[0]
            if name in skip:
                if "=" not in a:
                    next(it, None)
                continue
            keep.append(a)
        with tempfile.TemporaryDirectory() as tmp:
            out_path = Path(tmp) / "row.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), *keep, "--device", str(device), "--dtypes", dt,
                   "--designs", "vla_llm", "--vla-accel", vaccel, "--vla-child", vaccel,
                   "--vla-child-out", str(out_path)]
            row = run_child(cmd, out_path, args.vla_child_timeout)
        row.setdefault("info", {}).setdefault("accelerate", vaccel)
        if row["info"].get("fallback") and "ms" not in row:
            print(f"    vla_llm [{vaccel}] failed (child process): {row['info']['fallback']}", flush=True)
        return row

    rows = []
    vla: dict = {}
    bb = None
    if use_backbone:
        bb = {"name": args.backbone, "scale": args.backbone_scale, "prompt_tokens": args.prompt_tokens,
              "iters": args.backbone_iters, "warmup": args.backbone_warmup, "results": {}}

    def write_out() -> None:
        if not args.out:
            return
        out = {"device": machine["name"], "cpu_smoke": device.type != "cuda", "designs": designs,
               "machine": machine, "batch_size": 1, "iters": args.iters, "warmup": args.warmup, "tiny": args.tiny,
               "hidden_dim": args.hidden_dim, "rows": rows, "argv": sys.argv[1:] if argv is None else argv}
        if bb is not None:
            out.update(backbone=bb, chunk_len=CHUNK_LEN)
        if vla:
            out["vla_llm"] = vla
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")

    for dt in dtypes:
        dtype = getattr(torch, dt)
        backbone = obs = tokenizer = None
        if use_backbone:
            t0 = time.perf_counter()
            backbone, obs = build_backbone(args.backbone_scale, dtype, device, args.prompt_tokens, args.seed)
            bb["sizes"] = backbone.sizes()
            print(f"[{dt}] OpenVLA-shaped backbone, {args.backbone_scale} scale, built in "
                  f"{time.perf_counter() - t0:.1f} s: {bb['sizes']}", flush=True)
            r = bench_backbone(backbone, obs, args, device)
            bb["tokens"] = r["tokens"]
            r["build_s"] = time.perf_counter() - t0
            bb["results"][dt] = r
            with torch.inference_mode():
                hidden = backbone(obs).to(dtype)
            torch.manual_seed(args.seed)
            tokenizer = RFSQTokenizer().to(device).eval()  # random weights; float32 (as the engine loads it)
            write_out()
        main_model, draft = build_models(args, dtype, device)
        if not use_backbone:
            hidden = torch.randn(1, args.hidden_dim, generator=torch.Generator().manual_seed(args.seed + 1))
            hidden = hidden.to(device=device, dtype=dtype)
        ref = None
        for accel in (accels if "head" in designs else []):
            print(f"[{dt} {accel}] ...", flush=True)
            r = bench_mode(main_model, draft, hidden, accel, args, device, backbone, obs, tokenizer)
            r["dtype"] = dt
            check = r.pop("_check")
            if accel == "eager":
                ref = (r, check)
            eager_r, eager_check = ref
            r["tokens_equal_eager"] = all(torch.equal(check[k], eager_check[k]) for k in check)
            r["vs_eager"] = {o: eager_r["ms"][o]["median"] / r["ms"][o]["median"] for o in OPS}
            r["speedup_a3"] = r["ms"]["baseline"]["median"] / r["ms"]["strict_a3"]["median"]
            r["speedup_a0"] = r["ms"]["baseline"]["median"] / r["ms"]["strict_a0"]["median"]
            if use_backbone:
                r["chunk_summary"] = chunk_summary(r["chunk"], bb["results"][dt], r["ms"]["draft"]["median"])
                fh, bk = r["fused_head"], bb["results"][dt]["ms"]["backbone"]["median"]
                fh["pct_of_backbone"] = 100.0 * fh["ms"]["median"] / bk
                fh["draft_plus_fused_pct_of_backbone"] = 100.0 * (fh["ms"]["median"] + r["ms"]["draft"]["median"]) / bk
                fh["draft_ms"] = r["ms"]["draft"]["median"]
                fh["target_met"] = fh["draft_plus_fused_pct_of_backbone"] <= TARGET_HEAD_PCT
                print(f"[{dt} {accel}] light head as one function ({fh['info']['mode']}): {fh['ms']['median']:.3f} ms "
                      f"= {fh['pct_of_backbone']:.1f} % of the backbone; + draft {fh['draft_ms']:.3f} ms: "
                      f"{fh['draft_plus_fused_pct_of_backbone']:.1f} % (target <= {TARGET_HEAD_PCT} %); tokens == "
                      f"engine's: {fh['tokens_equal_engine']} ({fh['tokens_differing']} of {fh['tokens_total']} "
                      f"differ)" + (f"; fell back: {fh['info']['fallback']}" if fh["info"]["fallback"] else ""),
                      flush=True)
            print(f"[{dt} {accel}] in use: draft {r['info']['draft']}, main {r['info']['main']}; setup "
                  f"{r['setup_s']:.1f} s; baseline {r['ms']['baseline']['median']:.3f} ms, strict a=3 "
                  f"{r['ms']['strict_a3']['median']:.3f} ms (accepted {r['accepted_a3']}), tokens == eager: "
                  f"{r['tokens_equal_eager']}" + (f"; draft check: {r['info']['draft_check']}"
                                                  if r["info"].get("draft_check") else ""), flush=True)
            if use_backbone:  # the row's chunk summary now (the tables come at the end)
                for mode, m in r["chunk_summary"]["modes"].items():
                    print(f"[{dt} {accel}] {mode}: chunk {m['chunk_ms']:.3f} ms (backbone {m['backbone_ms']:.3f}, "
                          f"draft {m['draft_ms']:.3f}, main {m['main_ms']:.3f}, decode {m['decode_ms']:.3f}); "
                          f"per action {m['per_action_ms']:.3f} ms; draft+main+decode "
                          f"{m['head_pct_of_backbone']:.1f} % of the backbone; OpenVLA AR / RSD per action "
                          f"{m['ar_over_rsd_per_action']:.1f}x", flush=True)
            rows.append(r)
            write_out()
        if "vla_llm" in designs:
            vla[dt] = {"rows": {}}
            for vaccel in vla_accels:
                print(f"[{dt} vla_llm {vaccel}] ...", flush=True)
                if vaccel in isolate:
                    vla[dt]["rows"][vaccel] = child_row(vaccel, dt)
                else:
                    vla[dt]["rows"][vaccel] = bench_vla_llm(backbone, obs, dtype, device, args, vaccel, profile,
                                                            tokenizer)
                write_out()
            vla[dt]["targets"] = vla_targets(vla[dt]["rows"], [r for r in rows if r["dtype"] == dt],
                                             bb["results"][dt]["ms"]["ar_action"]["median"])
            write_out()
        del main_model, draft, backbone
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if rows:
        print_tables(rows)
    if use_backbone and rows:
        print_backbone_tables(machine, bb, rows)
    for dt, v in vla.items():
        print_vla_tables(machine["name"], dt, v)
    if args.out:
        write_out()
        print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
