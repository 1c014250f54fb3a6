"""Per-chunk latency of the draft / main decoder / speculative engine: eager vs compile vs cuda_graph.

One self-contained script for a GPU machine (no data, no checkpoints, no network; imports only torch,
numpy and ``rsd``'s model and engine modules): builds the default-size draft
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
"""

from __future__ import annotations

import argparse
import json
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

OPS = ("draft", "verify", "step", "baseline", "strict_a3", "strict_a0")


class ForcedDraft:
    """Runs the (accelerated) draft, then proposes fixed tokens instead (a forced acceptance)."""

    def __init__(self, draft, tokens: torch.Tensor) -> None:
        self.draft, self.tokens = draft, tokens
        self.num_coarse_layers = tokens.shape[1]

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        self.draft.propose(hidden)
        return self.tokens


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


def bench_mode(main, draft, hidden: torch.Tensor, accel: str, args, device: torch.device) -> dict:
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
    return {"accelerate": accel, "info": dict(info), "setup_s": setup_s,
            "ms": res, "accepted_a3": out_a3.accepted_length, "accepted_a0": out_a0.accepted_length,
            # strict is lossless up to float rounding: its verification scores 4 layers in one call
            "strict_equals_baseline": {"a3": bool(torch.equal(out_a3.tokens, greedy)),
                                       "a0": bool(torch.equal(out_a0.tokens, greedy)),
                                       "a0_tokens_differing": int((out_a0.tokens != greedy).sum())},
            "_check": check}


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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--accel", default=None,
                   help=f"comma-separated of {ACCELERATE_MODES} (default: all on CUDA, eager,cuda_graph on CPU)")
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--warmup", type=int, default=None, help="default: min(20, iters)")
    p.add_argument("--hidden-dim", type=int, default=4096)
    p.add_argument("--tiny", action="store_true", help="tiny models (tests), not the default sizes")
    p.add_argument("--threads", type=int, default=1, help="CPU intra-op threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    torch.set_num_threads(args.threads)
    args.warmup = min(20, args.iters) if args.warmup is None else args.warmup
    accels = (args.accel or ",".join(ACCELERATE_MODES if device.type == "cuda" else ("eager", "cuda_graph")))
    accels = [a.strip() for a in accels.split(",") if a.strip()]
    if "eager" not in accels:
        accels.insert(0, "eager")  # the reference of the ratios and the token checks
    bad = [a for a in accels if a not in ACCELERATE_MODES]
    if bad:
        raise SystemExit(f"unknown --accel {bad}; choose from {ACCELERATE_MODES}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    machine = {"device": str(device), "name": torch.cuda.get_device_name(device) if device.type == "cuda"
               else platform.processor() or platform.machine(), "torch": torch.__version__,
               "cuda": torch.version.cuda, "python": platform.python_version(),
               "threads": torch.get_num_threads()}
    print(f"machine: {machine}; iters {args.iters}, warmup {args.warmup}; "
          f"models: {'tiny' if args.tiny else 'default size'}, hidden {args.hidden_dim}", flush=True)

    rows = []
    for dt in dtypes:
        dtype = getattr(torch, dt)
        main_model, draft = build_models(args, dtype, device)
        hidden = torch.randn(1, args.hidden_dim, generator=torch.Generator().manual_seed(args.seed + 1))
        hidden = hidden.to(device=device, dtype=dtype)
        ref = None
        for accel in accels:
            print(f"[{dt} {accel}] ...", flush=True)
            r = bench_mode(main_model, draft, hidden, accel, args, device)
            r["dtype"] = dt
            check = r.pop("_check")
            if accel == "eager":
                ref = (r, check)
            eager_r, eager_check = ref
            r["tokens_equal_eager"] = all(torch.equal(check[k], eager_check[k]) for k in check)
            r["vs_eager"] = {o: eager_r["ms"][o]["median"] / r["ms"][o]["median"] for o in OPS}
            r["speedup_a3"] = r["ms"]["baseline"]["median"] / r["ms"]["strict_a3"]["median"]
            r["speedup_a0"] = r["ms"]["baseline"]["median"] / r["ms"]["strict_a0"]["median"]
            print(f"[{dt} {accel}] in use: draft {r['info']['draft']}, main {r['info']['main']}; setup "
                  f"{r['setup_s']:.1f} s; baseline {r['ms']['baseline']['median']:.3f} ms, strict a=3 "
                  f"{r['ms']['strict_a3']['median']:.3f} ms (accepted {r['accepted_a3']}), tokens == eager: "
                  f"{r['tokens_equal_eager']}" + (f"; draft check: {r['info']['draft_check']}"
                                                  if r["info"].get("draft_check") else ""), flush=True)
            rows.append(r)
        del main_model, draft
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print_tables(rows)
    if args.out:
        out = {"machine": machine, "batch_size": 1, "iters": args.iters, "warmup": args.warmup, "tiny": args.tiny,
               "hidden_dim": args.hidden_dim, "rows": rows, "argv": sys.argv[1:] if argv is None else argv}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2, default=str) + "\n")
        print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
