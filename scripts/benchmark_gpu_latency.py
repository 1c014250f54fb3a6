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

import torch

try:
    from rsd.engine.accelerate import ACCELERATE_MODES, accelerate_models
except ModuleNotFoundError:  # not installed: use the checkout's src/
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from rsd.engine.accelerate import ACCELERATE_MODES, accelerate_models
from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.engine.timing import time_calls
from rsd.models.backbones.openvla_shaped import BACKBONE_SCALES, IMAGE_SIZE, VOCAB_SIZE, OpenVLAShapedBackbone
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.main_decoder import RFSQMainDecoder
from rsd.tokenizer.layout import CHUNK_LEN
from rsd.tokenizer.rfsq import RFSQTokenizer
from rsd.utils.artifacts import cpu_model

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the design-2 half beside this file
from benchmark_gpu_vla_llm import (  # noqa: E402
    TARGET_AR_RATIO,
    VLA_ACCEL,
    ForcedDraft,
    acceptance_profile,
    bench_vla_llm,
    print_vla_tables,
    run_child,
    vla_targets,
)

OPS = ("draft", "verify", "step", "baseline", "strict_a3", "strict_a0")
#: the backbone's own operations (``--backbone``), timed once per dtype
BACKBONE_OPS = ("dino", "siglip", "projector", "vision", "llm_prefill", "backbone", "ar_llm", "ar_action")
#: the engine's per-chunk sections (timed end to end with the backbone for baseline, strict_a3, strict_a0)
SECTIONS = ("backbone", "draft", "main", "decode", "total")
#: the issue's targets on one H100/H200
TARGET_DRAFT_MS = 0.1
TARGET_HEAD_PCT = 5.0


def cpu_name() -> str:
    return f"{cpu_model()} ({os.cpu_count()} cores)"


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
            ms[name] = time_calls(fn, iters, warmup, device)
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
        res = {name: time_calls(fn, args.iters, args.warmup, device) for name, fn in ops.items()}
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
        ms = time_calls(lambda: head(hidden), args.iters, args.warmup, device)
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
