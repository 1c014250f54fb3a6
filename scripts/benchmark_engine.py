"""Decode benchmark of RSDInferenceEngine: baseline, strict / relaxed / epsilon speculation, depth D and
residual early exit, side by side.

Every held-out sample is decoded by all the engines in turn (rotating order, same process, same
models), so the speedups compare like with like on a shared machine. Modes (``docs/engine.md``):
``baseline`` (8 layers), ``strict``, ``relaxed`` (delta/tau), ``epsilon_<e>`` (``--epsilons``),
``*_d<D>`` (only the first ``--depth`` layers), ``*_exit`` (early exit ``--exit-rule`` with the sound
interval bound, threshold ``--exit-epsilon``) and ``*_exitemp`` (the same with per-depth bounds measured on
training frames: a measurement, not a bound). Printed per mode: main calls and mean depth per chunk,
acceptance, ms per chunk (draft, main, check = acceptance and exit tests, RFSQ decode, total), the
speedup on total ms against the 8-layer baseline AND against the baseline with the same depth / exit
settings (what speculation adds), the token-decoding speedup (draft + main + check, its ms column shown
beside it), the ideal speedup (main calls), agreement with that same-settings baseline's tokens, and the
action distance (normalized units, max abs over the chunk, before gripper binarization) to the 8-layer
baseline.

What the numbers are (issue 20):

- **Cache frames, open loop.** Every figure here is measured on held-out frames of a feature cache (or the
  synthetic task), each decoded once by every mode: not in closed loop. A speculative mode's acceptance
  in a LIBERO rollout (the evaluation summary's ``engine``) can differ a lot (the policy visits other
  states); the JSON says so in ``measured_on`` and the table's header says "cache frames".
- **Acceptance has one definition**: accepted drafted layers / drafted layers, from the counts
  (``accepted_layers`` / ``drafted_layers`` of the row; ``null`` for a mode that drafts nothing). Depth
  ``D`` drafts at most ``D - 1`` layers, so ``drafted_layers_per_chunk`` stands beside it.
- **One run, one table.** Each JSON has a ``run_id``, repeated in every row; every speedup is the ratio of
  two ms columns of the same table (``speedup`` = 8-layer baseline ``total_ms`` / ``total_ms``,
  ``speedup_token_decode`` = the same on ``token_decode_ms`` = draft + main + check). The ``*_median``
  speedups (ratios of per-chunk medians) are in the JSON only.
- **Strict JSON**: ``null`` for undefined numbers, never ``NaN`` (``rsd.analysis.jsonio``).

Real models::

    .venv/bin/python scripts/benchmark_engine.py --cache-dir data/cache/sim_state_libero_spatial \\
        --draft best --main best [--tokenizer data/tokenizers/rfsq_libero_spatial.pt] [--samples 200]

``--draft best``: the draft ``ckpt=best`` picks (rsd.policies.lineage); ``--main best``: the newest export under
``logs/main_head``.

Synthetic (no data, no checkpoints; also what runs when ``--cache-dir`` is missing)::

    .venv/bin/python scripts/benchmark_engine.py --synthetic [--tiny] [--sweep]

trains, on a synthetic task (hidden = class prototype + noise, tokens = the class's fixed table),
a default-size main decoder on the true tokens and a default-size draft on coarse targets corrupted
for a chosen share of the classes (``--draft-profile``: fractions of classes whose draft stops at
layer 3 (= all right), 2, 1, 0), so the strict acceptance is known in advance. The corrupted
layers are one level off on 8 tokens, so relaxed (delta=1) accepts them. Layers ``>= --chance-from``
are drawn at random per sample (the observation does not determine them, as on real data), so the main
model is near chance there. The tokenizer is an untrained ``RFSQTokenizer`` initialised from random
chunks (``init_from_data``: realistic action scale, meaningless actions). ``--tiny`` shrinks the models
(hidden 256, main width 128 x 2 blocks, draft width 128) for a quick run. ``--sweep`` adds a table of
strict speedup against acceptance (the trained draft's proposals corrupted at a given rate).

Batch 1 (the robot's case) and one intra-op thread by default (on a shared 2-core machine extra
threads only add contention). Use ``--device cuda`` on a GPU (the engine then times with CUDA events);
``--accelerate compile|cuda_graph`` runs the engines through ``rsd.engine.accelerate`` (the isolated
call costs stay eager; ``scripts/benchmark_gpu_latency.py`` compares the modes call by call).
"""

from __future__ import annotations

import argparse
import math
import platform
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from rsd import PROJECT_ROOT
from rsd.analysis import jsonio
from rsd.engine.action_space import action_distance, empirical_tail_bounds, normalized_decoder
from rsd.engine.rsd_engine import RSDInferenceEngine
from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.main_decoder import RFSQMainDecoder, load_main_decoder
from rsd.tokenizer.layout import NUM_LAYERS, NUM_LEVELS

MODES = ("baseline", "strict", "relaxed")


# ---------------------------------------------------------------------- synthetic task
def bump(layer: torch.Tensor, n: int = 8) -> torch.Tensor:
    """``[..., P]`` with the first ``n`` tokens moved one level (down at the top level)."""
    out = layer.clone()
    head = out[..., :n]
    out[..., :n] = torch.where(head >= NUM_LEVELS - 1, head - 1, head + 1)
    return out


def synthetic_task(args) -> dict:
    g = torch.Generator().manual_seed(args.seed)
    c, d = args.classes, args.hidden_dim
    protos = torch.randn(c, d, generator=g)
    tables = torch.randint(0, NUM_LEVELS, (c, NUM_LAYERS, 128), generator=g)
    profile = torch.tensor([float(x) for x in args.draft_profile.split(",")])
    if profile.numel() != 4 or (profile < 0).any() or profile.sum() <= 0:
        raise SystemExit("--draft-profile needs 4 non-negative fractions (draft right up to layer 3,2,1,0)")
    counts = torch.round(profile / profile.sum() * c).long()
    counts[0] += c - counts.sum()
    stop = torch.cat([torch.full((int(n),), 3 - i) for i, n in enumerate(counts)])  # accepted length per class
    stop = stop[torch.randperm(c, generator=g)]

    def sample(n: int, seed: int):
        gg = torch.Generator().manual_seed(seed)
        cls = torch.randint(0, c, (n,), generator=gg)
        tokens = tables[cls].clone()
        if args.chance_from < NUM_LAYERS:  # residual detail the hidden state does not determine
            tokens[:, args.chance_from:] = torch.randint(0, NUM_LEVELS, tokens[:, args.chance_from:].shape,
                                                         generator=gg)
        return protos[cls] + args.noise * torch.randn(n, d, generator=gg), tokens, cls

    draft_tables = tables[:, :3].clone()
    for k in range(c):
        if stop[k] < 3:
            draft_tables[k, stop[k]] = bump(draft_tables[k, stop[k]])
    return dict(sample=sample, tables=tables, draft_tables=draft_tables, stop=stop,
                expected_acceptance=float(stop.float().mean()) / 3)


def _fit(model, loss_fn, sample, steps: int, lr: float, bs: int, name: str) -> None:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warm = max(steps // 10, 1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min((s + 1) / warm, 1.0))
    t0 = time.perf_counter()
    for step in range(steps):
        hidden, tokens, cls = sample(bs, 1000 + step)
        loss = loss_fn(model, hidden, tokens, cls)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(steps // 5, 1) == 0:
            print(f"  [{name}] step {step + 1}/{steps} loss {loss.item():.4f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    model.eval()


SYNTHETIC_KEYS = ("seed", "classes", "hidden_dim", "noise", "draft_profile", "train_steps", "train_batch",
                  "main_width", "main_blocks", "draft_width", "chance_from")


def _synthetic_draft(args) -> RFSQDraftModelWithProjection:
    w = args.draft_width
    return RFSQDraftModelWithProjection(input_dim=args.hidden_dim, hidden_dim=w, num_heads=8 if w >= 256 else 4,
                                        feedforward_dim=4 * w, dropout=0.0)


def train_synthetic(args) -> tuple[RFSQMainDecoder, RFSQDraftModelWithProjection, dict]:
    task = synthetic_task(args)
    torch.manual_seed(args.seed)
    main = RFSQMainDecoder(input_dim=args.hidden_dim, d_model=args.main_width, num_blocks=args.main_blocks,
                           ff_dim=4 * args.main_width, dropout=0.0)
    draft = _synthetic_draft(args)
    print(f"synthetic task: {args.classes} classes, hidden {args.hidden_dim}, main {main.num_parameters() / 1e6:.1f}M "
          f"params, draft {sum(p.numel() for p in draft.parameters()) / 1e6:.1f}M; designed strict acceptance "
          f"{task['expected_acceptance']:.3f} (uniform over classes)", flush=True)
    key = {k: getattr(args, k) for k in SYNTHETIC_KEYS}
    saved = Path(args.synthetic_models) if args.synthetic_models else None
    if saved is not None and saved.is_file():
        payload = torch.load(saved, weights_only=True)
        if payload.get("key") == key and (payload.get("clean") is not None or not args.sweep):
            main.load_state_dict(payload["main"])
            draft.load_state_dict(payload["draft"])
            clean = None
            if args.sweep:
                clean = _synthetic_draft(args)
                clean.load_state_dict(payload["clean"])
            print(f"loaded the trained synthetic models from {saved}", flush=True)
            hidden, tokens, cls = task["sample"](args.samples * args.batch_size, 7)
            return main.eval(), draft.eval(), dict(hidden=hidden, tokens=tokens, cls=cls, actions=None, task=task,
                                                   train_hidden=task["sample"](args.empirical_frames, 3)[0],
                                                   source="synthetic", clean_draft=None if clean is None else clean.eval())
        print(f"{saved} was made with other settings: retraining", flush=True)

    def main_loss(m, hidden, tokens, cls):
        logits = m(hidden, tokens[:, : NUM_LAYERS - 1])
        return F.cross_entropy(logits.reshape(-1, NUM_LEVELS), tokens.reshape(-1))

    def draft_loss(m, hidden, tokens, cls):
        return F.cross_entropy(m(hidden).reshape(-1, NUM_LEVELS), task["draft_tables"][cls].reshape(-1))

    _fit(main, main_loss, task["sample"], args.train_steps, 1e-3, args.train_batch, "main")
    _fit(draft, draft_loss, task["sample"], args.train_steps, 1e-3, args.train_batch, "draft")
    clean = None
    if args.sweep:  # a second draft trained on the true coarse layers, corrupted at a chosen rate in the sweep
        torch.manual_seed(args.seed + 1)
        clean = _synthetic_draft(args)

        def clean_loss(m, hidden, tokens, cls):
            return F.cross_entropy(m(hidden).reshape(-1, NUM_LEVELS), tokens[:, :3].reshape(-1))

        _fit(clean, clean_loss, task["sample"], args.train_steps, 1e-3, args.train_batch, "clean draft")
    if saved is not None:
        saved.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"key": key, "main": main.state_dict(), "draft": draft.state_dict(),
                    "clean": None if clean is None else clean.state_dict()}, saved)
    hidden, tokens, cls = task["sample"](args.samples * args.batch_size, 7)
    return main, draft, dict(hidden=hidden, tokens=tokens, cls=cls, actions=None, task=task, source="synthetic",
                             train_hidden=task["sample"](args.empirical_frames, 3)[0],
                             clean_draft=clean)


# ---------------------------------------------------------------------- real checkpoints and cache
def _newest(pattern: str) -> Path:
    found = sorted((PROJECT_ROOT / "logs").glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"no file matches logs/{pattern}; train it first or pass a path")
    return found[-1]


def load_real(args):
    from rsd.data.cache import open_cache
    from rsd.models.checkpoint import load_draft_checkpoint, resolve_draft_checkpoint
    from rsd.policies.lineage import find_best_draft

    if not (args.cache_dir and args.draft and args.main):
        raise SystemExit("give --cache-dir, --draft and --main (or --synthetic)")
    main_path = _newest("main_head/runs/*/main_decoder.pt") if args.main == "best" else Path(args.main)
    main = load_main_decoder(main_path)
    draft_path = find_best_draft(PROJECT_ROOT / "logs", None)[0] if args.draft == "best" else args.draft
    draft, info = load_draft_checkpoint(resolve_draft_checkpoint(draft_path))
    manifest, arrays = open_cache(args.cache_dir)
    d = int(manifest["backbone"]["hidden_dim"])
    if main.input_dim != d or draft.input_dim != d:
        raise SystemExit(f"hidden sizes differ: cache {d}, main {main.input_dim}, draft {draft.input_dim}")
    val = np.nonzero(np.asarray(arrays["split"]) == 1)[0]
    n = min(len(val), args.samples * args.batch_size)
    rows = np.sort(np.random.default_rng(args.seed).choice(val, size=n, replace=False))
    hidden = torch.from_numpy(np.asarray(arrays["hidden"][rows], dtype=np.float32))
    tokens = torch.from_numpy(np.asarray(arrays["tokens"][rows]).astype(np.int64))
    actions = torch.from_numpy(np.asarray(arrays["actions"][rows], dtype=np.float32))
    train = np.nonzero(np.asarray(arrays["split"]) == 0)[0]
    train = np.sort(np.random.default_rng(args.seed + 1).choice(train, size=min(len(train), args.empirical_frames),
                                                                 replace=False))
    train_hidden = torch.from_numpy(np.asarray(arrays["hidden"][train], dtype=np.float32))
    tok_path = args.tokenizer or (manifest.get("tokenizer") or {}).get("path")
    print(f"main {main_path}, draft {info['path']}, cache {args.cache_dir} ({n} held-out frames), "
          f"tokenizer {tok_path}", flush=True)
    return main, draft, dict(hidden=hidden, tokens=tokens, actions=actions, tokenizer_path=tok_path,
                             train_hidden=train_hidden,
                             source=str(args.cache_dir))


def load_tokenizer(path: str | None):
    from rsd.tokenizer.rfsq import RFSQTokenizer

    if path and Path(path).is_file():
        return RFSQTokenizer.load(path), str(path)
    torch.manual_seed(0)  # an untrained tokenizer: decode cost is the same, the actions mean nothing
    tok = RFSQTokenizer().eval()
    tok.init_from_data(torch.rand(4096, 8, 7, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    return tok, "untrained RFSQTokenizer() initialised from random chunks (realistic scale, meaningless actions)"


# ---------------------------------------------------------------------- measurement
class CorruptedDraft:
    """The draft's proposals, with layer 0 corrupted on a seeded share ``1 - rate`` of the calls."""

    def __init__(self, draft, rate: float, seed: int = 0) -> None:
        self.draft, self.rate = draft, rate
        self.num_coarse_layers = draft.num_coarse_layers
        self.rng = np.random.default_rng(seed)

    def propose(self, hidden: torch.Tensor) -> torch.Tensor:
        out = self.draft.propose(hidden)
        bad = torch.from_numpy(self.rng.random(hidden.shape[0]) >= self.rate)
        out[bad, 0] = bump(out[bad, 0])
        return out


def run_modes(engines: dict, hidden: torch.Tensor, batch: int, warmup: int) -> dict:
    n = hidden.shape[0] // batch
    for eng in engines.values():
        for i in range(min(warmup, n)):
            eng.predict(hidden[i * batch:(i + 1) * batch])
        eng.reset_stats()
    names = list(engines)
    res = {m: {"tokens": [], "actions": [], "times": []} for m in names}
    for i in range(n):
        h = hidden[i * batch:(i + 1) * batch]
        for j in range(len(names)):
            m = names[(i + j) % len(names)]
            out = engines[m].predict(h)
            res[m]["tokens"].append(out.tokens.cpu())
            res[m]["actions"].append(None if out.actions is None else out.actions.cpu())
            res[m]["times"].append(out.times)
    for m in names:
        r = res[m]
        r["tokens"] = torch.cat(r["tokens"])
        r["actions"] = None if r["actions"][0] is None else torch.cat(r["actions"])
        r["stats"] = engines[m].stats
    return res


TOKEN_SECTIONS = ("draft", "main", "check")  # what token decoding costs (acceptance/exit tests included)


def _med(times: list[dict], keys: tuple[str, ...] = TOKEN_SECTIONS) -> float:
    return 1e3 * statistics.median(sum(t.get(k, 0.0) for k in keys) for t in times)


def _tok_ms(stats) -> float:
    return sum(stats.ms_per_chunk(k) for k in TOKEN_SECTIONS)


def _acceptance(stats) -> float | None:
    """Accepted drafted layers / drafted layers (the one definition); None when nothing was drafted."""
    return stats.accepted_layers / stats.drafted_layers if stats.drafted_layers else None


def summarize(res: dict, gt_tokens: torch.Tensor | None, gt_actions: torch.Tensor | None = None,
              refs: dict[str, str] | None = None, decode_norm=None, run_id: str | None = None) -> list[dict]:
    """One row per mode; ``refs[mode]`` names the baseline with the same depth / exit settings. Every
    speedup is a ratio of two ms columns of these rows (``total_ms``, or ``token_decode_ms``)."""
    refs = refs or {}
    base = res["baseline"]
    b_stats = base["stats"]
    rows = []
    for m, r in res.items():
        s = r["stats"]
        ref = res[refs.get(m, "baseline")]
        tok_ms = _tok_ms(s)
        calls = s.main_calls_per_chunk
        row = {
            "mode": m,
            "run_id": run_id,
            "reference": refs.get(m, "baseline"),
            "settings": r.get("settings"),
            "chunks": s.samples,
            "main_calls_per_chunk": calls,
            "mean_depth": s.mean_depth,
            "drafted_layers": s.drafted_layers,
            "accepted_layers": s.accepted_layers,
            "drafted_layers_per_chunk": s.drafted_layers / s.samples if s.samples else None,
            "acceptance": _acceptance(s),
            "mean_accepted_length": s.mean_accepted_length,
            "per_layer_acceptance": s.per_layer_acceptance,
            "main_steps_saved_per_chunk": s.main_steps_saved / s.inferences,
            "draft_ms": s.ms_per_chunk("draft"),
            "main_ms": s.ms_per_chunk("main"),
            "check_ms": s.ms_per_chunk("check"),
            "decode_ms": s.ms_per_chunk("decode"),
            "total_ms": s.ms_per_chunk("total"),
            "token_decode_ms": tok_ms,
            "reference_total_ms": ref["stats"].ms_per_chunk("total"),
            "baseline_total_ms": b_stats.ms_per_chunk("total"),
            "speedup": b_stats.ms_per_chunk("total") / s.ms_per_chunk("total"),
            "speedup_vs_ref": ref["stats"].ms_per_chunk("total") / s.ms_per_chunk("total"),
            "speedup_token_decode": _tok_ms(b_stats) / tok_ms,
            "speedup_token_decode_vs_ref": _tok_ms(ref["stats"]) / tok_ms,
            "speedup_token_decode_median": _med(base["times"]) / _med(r["times"]),
            "speedup_token_decode_vs_ref_median": _med(ref["times"]) / _med(r["times"]),
            "ideal_speedup": NUM_LAYERS / calls,
            "ideal_speedup_vs_ref": ref["stats"].main_calls_per_chunk / calls,
            "token_agreement": float((r["tokens"] == base["tokens"]).float().mean()),
            "chunk_agreement": float((r["tokens"] == base["tokens"]).flatten(1).all(1).float().mean()),
            "chunk_agreement_vs_ref": float((r["tokens"] == ref["tokens"]).flatten(1).all(1).float().mean()),
            "gt_token_accuracy": None if gt_tokens is None else float((r["tokens"] == gt_tokens).float().mean()),
        }
        if decode_norm is not None:  # normalized units, max abs over the chunk, before binarization
            with torch.inference_mode():
                dist = action_distance(decode_norm(r["tokens"]), decode_norm(base["tokens"]))
            row["action_dist_max"] = float(dist.max())
            row["action_dist_median"] = float(dist.median())
        if r["actions"] is not None:
            row["action_max_abs_diff"] = float((r["actions"] - base["actions"]).abs().max())
            row["action_mean_abs_diff"] = float((r["actions"] - base["actions"]).abs().mean())
            if gt_actions is not None:  # raw units, all 7 dims (gripper binarized in the prediction)
                row["action_mae_vs_gt"] = float((r["actions"] - gt_actions).abs().mean())
        rows.append(row)
    return rows


def _f(x, fmt: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def print_table(rows: list[dict]) -> None:
    """One run's table (cache frames, open loop): every speedup is the ratio of two ms columns shown here
    (8-layer baseline row's / this row's; "vs" names the same-depth baseline row)."""
    head = ("| mode | vs | main calls | depth | drafted layers/chunk | acceptance, cache frames (accepted/drafted) "
            "| per-layer acc. | draft ms | main ms | check ms | draft+main+check ms | total ms "
            "| speedup vs 8L base (total ms) | speedup vs same-depth base (total ms) "
            "| speedup vs 8L base (draft+main+check ms) | ideal vs same | chunk agr. vs same "
            "| action dist to 8L (max / median) |")
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        pla = "/".join(_f(v, ".2f") for v in r["per_layer_acceptance"]) if r["acceptance"] is not None else "-"
        print(f"| {r['mode']} | {r['reference']} | {r['main_calls_per_chunk']:.2f} | {r['mean_depth']:.2f} | "
              f"{_f(r['drafted_layers_per_chunk'], '.2f')} | {_f(r['acceptance'], '.3f')} | {pla} | "
              f"{r['draft_ms']:.2f} | {r['main_ms']:.2f} | {r['check_ms']:.2f} | {r['token_decode_ms']:.2f} | "
              f"{r['total_ms']:.2f} | {r['speedup']:.2f}x | {r['speedup_vs_ref']:.2f}x | "
              f"{r['speedup_token_decode']:.2f}x | {r['ideal_speedup_vs_ref']:.2f}x | "
              f"{r['chunk_agreement_vs_ref']:.3f} | {_f(r.get('action_dist_max'), '.4f')} / "
              f"{_f(r.get('action_dist_median'), '.4f')} |")


def component_costs(main, draft, hidden: torch.Tensor, reps: int = 30, engines: dict | None = None) -> dict:
    """Isolated per-call costs (ms): draft, first main step, one incremental step, verification calls with
    1..n drafted layers, and the engines' tests (epsilon acceptance, interval exit bound)."""
    def t(fn) -> float:
        for _ in range(5):
            fn()
        vals = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            if hidden.is_cuda:
                torch.cuda.synchronize()
            vals.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(vals)

    out = {}
    with torch.inference_mode():
        drafted = draft.propose(hidden)
        cache = main.new_cache(hidden.shape[0])
        main.score(hidden, None, cache)
        prev = torch.zeros_like(drafted[:, :1])

        def step():
            cache.truncate(1)
            main.extend(prev, cache)

        out["draft"] = t(lambda: draft.propose(hidden))
        out["main_first"] = t(lambda: main.score(hidden, None, main.new_cache(hidden.shape[0])))
        out["main_step"] = t(step)
        for n in range(drafted.shape[1], 0, -1):
            key = "main_verify" if n == drafted.shape[1] else f"main_verify_{n}"
            out[key] = t(lambda n=n: main.score(hidden, drafted[:, :n], main.new_cache(hidden.shape[0])))
        tokens = torch.randint(0, NUM_LEVELS, (hidden.shape[0], NUM_LAYERS, drafted.shape[-1]))
        for eng in (engines or {}).values():
            if eng.mode == "epsilon" and "epsilon_check" not in out:
                out["epsilon_check"] = t(lambda eng=eng: eng.accept(drafted, drafted.flip(0)))
            if eng._tail is not None and "bound_check" not in out:
                out["bound_check"] = t(lambda eng=eng: eng.tail_bound(tokens, 3))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--synthetic", action="store_true", help="train a synthetic main/draft pair (no data needed)")
    p.add_argument("--cache-dir", help="feature cache folder (held-out = split 1)")
    p.add_argument("--draft", help="draft checkpoint (best_draft_with_projection.pt) or 'best'")
    p.add_argument("--main", help="main decoder file (main_decoder.pt) or 'best'")
    p.add_argument("--tokenizer", help="RFSQ tokenizer file (default: the cache manifest's)")
    p.add_argument("--samples", type=int, default=100, help="chunks (batches) per mode")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--delta", type=int, default=1, help="relaxed: max level distance (-1 disables)")
    p.add_argument("--tau", type=float, default=-1.0, help="relaxed: min fraction of equal tokens (<0 disables)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--accelerate", default="eager", choices=["eager", "compile", "cuda_graph"],
                   help="the engines' draft/main acceleration (rsd.engine.accelerate; falls back to eager)")
    p.add_argument("--no-adaptive", action="store_true", help="leave out the adaptive strict engine row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="write the results as JSON here")
    e = p.add_argument_group("action-space rules and early exit (docs/engine.md)")
    e.add_argument("--epsilons", default="0.05,0.1,0.2",
                   help="epsilon rule thresholds, normalized action units (empty: no epsilon rows)")
    e.add_argument("--depth", type=int, default=3, help="the fixed-depth rows decode this many layers (0: none)")
    e.add_argument("--exit-rule", default="both", choices=["bound", "chance", "both", "none"],
                   help="the early-exit rows' rule")
    e.add_argument("--exit-epsilon", type=float, default=0.05, help="the exit bound's threshold (normalized units)")
    e.add_argument("--chance-entropy", type=float, default=0.98, help="chance exit: fraction of log(7)")
    e.add_argument("--empirical-frames", type=int, default=200,
                   help="training frames on which the *_exitemp rows measure their per-depth bounds (0: no rows)")
    g = p.add_argument_group("synthetic task")
    g.add_argument("--classes", type=int, default=32)
    g.add_argument("--hidden-dim", type=int, default=4096)
    g.add_argument("--noise", type=float, default=0.3)
    g.add_argument("--draft-profile", default="0.8,0.1,0.05,0.05",
                   help="fractions of classes whose drafted prefix is right up to layer 3,2,1,0")
    g.add_argument("--train-steps", type=int, default=150)
    g.add_argument("--train-batch", type=int, default=32)
    g.add_argument("--main-width", type=int, default=512)
    g.add_argument("--main-blocks", type=int, default=6)
    g.add_argument("--draft-width", type=int, default=512)
    g.add_argument("--chance-from", type=int, default=3,
                   help="layers >= this are random per sample (the main model is at chance there; 8: none)")
    g.add_argument("--tiny", action="store_true",
                   help="small models for a quick run: hidden 256, main 128 x 2 blocks, draft 128, 60 samples")
    g.add_argument("--synthetic-models", help="reuse the trained synthetic models from this file (written if absent)")
    g.add_argument("--sweep", action="store_true", help="also: strict speedup vs acceptance (0, .25, .5, .75, .9, 1)")
    args = p.parse_args(argv)
    if args.tiny:
        args.synthetic = True
        args.hidden_dim, args.main_width, args.main_blocks, args.draft_width = 256, 128, 2, 128
        args.samples = min(args.samples, 60)
    if not args.synthetic and not (args.cache_dir and Path(args.cache_dir).is_dir()):
        print(f"no feature cache at {args.cache_dir!r}: running the synthetic setup instead (--synthetic)", flush=True)
        args.synthetic = True

    torch.set_num_threads(args.threads)
    started = datetime.now(UTC).isoformat(timespec="seconds")
    run_id = f"{started}-{uuid.uuid4().hex[:8]}"
    measured_on = ("cache frames, open loop: held-out frames of " + str(args.cache_dir) if not args.synthetic
                   else "synthetic task samples, open loop") + " (not closed-loop rollouts)"
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    t0 = time.perf_counter()
    if args.synthetic:
        main_model, draft, data = train_synthetic(args)
        tokenizer, tok_desc = load_tokenizer(args.tokenizer)
    else:
        main_model, draft, data = load_real(args)
        tokenizer, tok_desc = load_tokenizer(data.get("tokenizer_path"))
    print(f"setup {time.perf_counter() - t0:.0f} s; tokenizer: {tok_desc}", flush=True)
    main_model = main_model.to(device=device, dtype=dtype).eval()
    draft = draft.to(device=device, dtype=dtype).eval()
    tokenizer = tokenizer.to(device)
    hidden = data["hidden"].to(device)

    delta = None if args.delta < 0 else args.delta
    tau = None if args.tau < 0 else args.tau
    acc = args.accelerate
    epsilons = [float(x) for x in args.epsilons.split(",") if x.strip()]
    eps_mid = epsilons[len(epsilons) // 2] if epsilons else None
    engines: dict[str, RSDInferenceEngine] = {}
    refs: dict[str, str] = {}  # mode -> the baseline with the same depth / exit settings

    def add(name: str, ref: str, mode: str, **kw) -> None:
        engines[name] = RSDInferenceEngine(main_model, None if mode == "baseline" else draft, tokenizer, mode=mode,
                                           accelerate=acc, **kw)
        refs[name] = ref

    def family(suffix: str, **kw) -> None:
        """baseline + strict (+ adaptive strict) + epsilon (middle value) with the same depth / exit settings."""
        ref = f"baseline{suffix}"
        add(ref, ref, "baseline", **kw)
        add(f"strict{suffix}", ref, "strict", **kw)
        if not args.no_adaptive:
            add(f"strict_adaptive{suffix}", ref, "strict", adaptive=True, **kw)
            add(f"strict_adaptive_fixed_probes{suffix}", ref, "strict", adaptive=True, probe_backoff=False, **kw)
        if eps_mid is not None:
            add(f"epsilon_{eps_mid:g}{suffix}", ref, "epsilon", epsilon=eps_mid, **kw)

    # the unsuffixed rows decode every layer the main model was trained for (8, or e.g. 3 for make train's)
    trained = int(getattr(main_model, "trained_layers", None) or NUM_LAYERS)
    top = {} if trained >= NUM_LAYERS else {"depth": trained}
    if top:
        print(f"the main model was trained for layers 0..{trained - 1}: the unsuffixed rows decode at depth {trained}",
              flush=True)
    add("baseline", "baseline", "baseline", **top)
    add("strict", "baseline", "strict", **top)
    if delta is not None or tau is not None:  # --delta -1 without --tau: no relaxed row
        add("relaxed", "baseline", "relaxed", delta=delta, tau=tau, **top)
    if not args.no_adaptive:  # strict, speculating only while it measures faster (lossless as well)
        add("strict_adaptive", "baseline", "strict", adaptive=True, **top)
    for eps in epsilons:
        add(f"epsilon_{eps:g}", "baseline", "epsilon", epsilon=eps, **top)
    if 1 <= args.depth < NUM_LAYERS:
        family(f"_d{args.depth}", depth=args.depth)
    exit_kw = {}
    if args.exit_rule != "none":
        exit_kw = dict(early_exit=args.exit_rule, exit_epsilon=args.exit_epsilon, chance_entropy=args.chance_entropy)
        family("_exit", **exit_kw)
    emp_bounds = None
    if args.exit_rule in ("bound", "both") and args.empirical_frames > 0:
        # per-depth bounds measured on training frames (the main model's own tokens): a measurement
        train_hidden = data["train_hidden"][: args.empirical_frames].to(device)
        base_eng = engines["baseline"]
        with torch.inference_mode():
            train_tokens = torch.cat([base_eng.predict(train_hidden[i:i + 64], decode=False).tokens
                                      for i in range(0, train_hidden.shape[0], 64)])
        base_eng.reset_stats()
        emp_bounds = empirical_tail_bounds(normalized_decoder(tokenizer), train_tokens, NUM_LEVELS)
        shown = ", ".join(f"{x:.4f}" for x in emp_bounds[1:NUM_LAYERS])
        print(f"empirical tail bounds on {train_tokens.shape[0]} training frames (max action change of dropping "
              f"layers >= D, D=1..7): {shown}", flush=True)
        family("_exitemp", **exit_kw, tail_bounds=emp_bounds)
    costs = component_costs(main_model, draft, hidden[: args.batch_size].to(dtype), engines=engines)
    n_main = main_model.num_parameters()
    n_draft = sum(p.numel() for p in draft.parameters())
    machine = f"{device.type}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                  f", {torch.get_num_threads()} thread(s)")
    print(f"\nmachine: {machine}; dtype {args.dtype}; accelerate {acc}; batch {args.batch_size}; "
          f"{hidden.shape[0] // args.batch_size} chunks per mode; main {n_main / 1e6:.1f}M params, draft {n_draft / 1e6:.1f}M")
    print("isolated call costs (median ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    print("in main steps: " + ", ".join(f"{k} {v / costs['main_step']:.2f}" for k, v in costs.items()
                                        if k != "main_step"))
    res = run_modes(engines, hidden, args.batch_size, args.warmup)
    for name, eng in engines.items():
        res[name]["settings"] = eng.settings()
    gt = data["tokens"][: res["baseline"]["tokens"].shape[0]]
    gt_actions = None if data.get("actions") is None else data["actions"][: gt.shape[0]]
    rows = summarize(res, gt, gt_actions, refs, normalized_decoder(tokenizer), run_id=run_id)
    accelerate_info = {k: e.accelerate_info for k, e in engines.items()}
    print("\naccelerate in use (isolated call costs above are eager): "
          + "; ".join(f"{k}: draft {v['draft']}, main {v['main']}" + (f" (fallback: {v['fallback']})"
                                                                       if v["fallback"] else "")
                      for k, v in accelerate_info.items()))
    print(f"relaxed: delta={delta}, tau={tau}; epsilon rows: {epsilons}; depth rows: {args.depth}; exit rows: "
          f"{args.exit_rule} (exit_epsilon {args.exit_epsilon}, chance_entropy {args.chance_entropy}); run {run_id}; "
          f"measured on {measured_on}; speedups: ratios of the ms columns shown; 'vs' = the same-settings baseline")
    if "task" in data:
        n_chunks = res["baseline"]["tokens"].shape[0]
        designed = float(data["task"]["stop"][data["cls"][:n_chunks]].float().mean()) / 3
        print(f"designed strict acceptance on these samples (synthetic): {designed:.3f}")
    print()
    print_table(rows)
    strict = next(r for r in rows if r["mode"] == "strict")
    # cost model: what the measured per-call costs predict for the measured acceptance
    a = strict["mean_accepted_length"]
    model_pred = (costs["main_first"] + (NUM_LAYERS - 1) * costs["main_step"]) / (
        costs["draft"] + costs["main_verify"] + (NUM_LAYERS - 1 - a) * costs["main_step"])
    best = max((r for r in rows if r["mode"] != "baseline"), key=lambda r: r["speedup"])
    print(f"\nfastest row: {best['mode']} {best['speedup']:.2f}x vs the 8-layer baseline, "
          f"{best['speedup_vs_ref']:.2f}x vs {best['reference']}; action distance to the 8-layer baseline "
          f"max {_f(best.get('action_dist_max'), '.4f')}")
    if gt_actions is not None:
        print("\naction MAE vs the cache's ground-truth chunks (raw units): "
              + ", ".join(f"{r['mode']} {r.get('action_mae_vs_gt', float('nan')):.4f}" for r in rows))
    for ad in (r for r in rows if r["mode"].startswith("strict_adaptive")):
        st = engines[ad["mode"]].stats
        print(f"\n{ad['mode']}: {ad['speedup_vs_ref']:.2f}x vs {ad['reference']}, speculated on "
              f"{1 - st.unspeculated / max(st.samples, 1):.0%} of the chunks; tokens identical to {ad['reference']}: "
              f"{ad['chunk_agreement_vs_ref'] == 1.0}")
    print(f"\nstrict: {strict['speedup']:.2f}x on total ms, {strict['speedup_token_decode']:.2f}x on draft+main+check ms "
          f"(median of chunks {strict['speedup_token_decode_median']:.2f}x), {strict['ideal_speedup']:.2f}x ideal "
          f"(main calls), {model_pred:.2f}x predicted (draft+main) from isolated call costs; "
          f"tokens identical to baseline: {strict['chunk_agreement'] == 1.0}")

    sweep_rows = []
    if args.sweep:
        inner = data.get("clean_draft")
        what = "a draft trained on the true coarse layers" if inner is not None else "the draft"
        inner = (inner if inner is not None else draft).to(device=device, dtype=dtype).eval()
        print(f"\nstrict speedup vs acceptance ({what}; its layer 0 corrupted on a seeded share 1 - r of the calls):\n")
        print("| r | acceptance (accepted/drafted) | main calls/chunk | baseline total ms | total ms "
              "| speedup (total ms) | ideal | identical |")
        print("|---|---|---|---|---|---|---|---|")
        for rate in (0.0, 0.25, 0.5, 0.75, 0.9, 1.0):
            strict_eng = RSDInferenceEngine(main_model, inner, tokenizer, mode="strict", accelerate=acc)
            # corrupt the (accelerated) draft's output: the corruption itself stays eager
            strict_eng.draft = CorruptedDraft(strict_eng.draft, rate, args.seed)
            eng = {"baseline": engines["baseline"], "strict": strict_eng}
            r = summarize(run_modes(eng, hidden, args.batch_size, args.warmup), gt, run_id=run_id)[1]
            r["target_rate_of_full_acceptance"] = rate
            sweep_rows.append(r)
            print(f"| {rate:.2f} | {_f(r['acceptance'], '.3f')} | {r['main_calls_per_chunk']:.2f} | "
                  f"{r['baseline_total_ms']:.2f} | {r['total_ms']:.2f} | {r['speedup']:.2f}x | "
                  f"{r['ideal_speedup']:.2f}x | {r['chunk_agreement'] == 1.0} |",
                  flush=True)
    if args.out:
        out = {"run_id": run_id, "started": started, "measured_on": measured_on, "machine": machine,
               "cpu": platform.processor() or platform.machine(), "dtype": args.dtype, "accelerate": accelerate_info,
               "batch_size": args.batch_size, "source": data["source"],
               "tokenizer": tok_desc, "main_params": n_main, "draft_params": n_draft, "costs_ms": costs,
               "delta": delta, "tau": tau, "epsilons": epsilons, "depth": args.depth, "exit_rule": args.exit_rule,
               "exit_epsilon": args.exit_epsilon, "empirical_tail_bounds": emp_bounds, "rows": rows,
               "sweep": sweep_rows,
               "designed_acceptance": designed if "task" in data else None,
               "argv": sys.argv[1:]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        jsonio.write(args.out, out)
        print(f"\nwritten {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
