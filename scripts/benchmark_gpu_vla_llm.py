"""Design 2 of ``benchmark_gpu_latency.py`` (imported by it, not run on its own): the VLA's language model decodes
the RFSQ layers (``rsd.models.vla_llm_main.VLALLMMain``); forced acceptance a = 0..3, cache modes, each mode
optionally in a child process (``run_child``), the tables and the issue's targets. See that script's docstring.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.engine.timing import time_calls
from rsd.models.backbones.openvla_shaped import OpenVLAShapedBackbone
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.hf_cache import crop_cache, output_cache
from rsd.tokenizer.layout import CHUNK_LEN

#: the issue's target for the faster design per action (shared with the head design's table)
TARGET_AR_RATIO = 20.0


class ForcedDraft:
    """Runs the (accelerated) draft, then proposes fixed tokens instead (a forced acceptance)."""

    def __init__(self, draft, tokens: torch.Tensor) -> None:
        self.draft, self.tokens = draft, tokens
        self.num_coarse_layers = tokens.shape[1]

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        self.draft.propose(hidden)
        return self.tokens


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
            crop_cache(static, 0)
        out = lm(inputs_embeds=e, use_cache=True, **({kw: static} if static is not None else {}))
        cache = static if static is not None else output_cache(out)
        return LLMPrompt(out.last_hidden_state[:, -1], cache, length)

    with torch.inference_mode():
        prompt = prefill()
        base = RSDInferenceEngine(main, mode="baseline", tokenizer=tokenizer, device=device)
        greedy = base.predict(prompt, decode=False).tokens
        consistent, drafts = forced_drafts(main, prompt, greedy)
        forced = {a: RSDInferenceEngine(main, ForcedDraft(draft, tok), mode="strict", tokenizer=tokenizer,
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
            ms[name] = time_calls(fn, args.backbone_iters, args.backbone_warmup, device)
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
