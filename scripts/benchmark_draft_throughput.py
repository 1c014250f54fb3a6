"""Draft-training throughput: memory-mapped feature cache vs the original project's data format.

Original format: one ``torch.save``d list of per-sample dicts (``{"hidden_state": float32 [D],
"coarse_tokens": long [3, 128]}``), loaded whole with ``torch.load`` and batched by a default
``DataLoader`` (per-sample ``__getitem__`` + default collate). This project: ``FeatureCacheDataModule``
over the cache's memory-mapped ``.npy`` files (one sorted gather per batch).

Both pipelines train the same draft model (same seed, batch size, optimizer) for the same number of
steps in this process, side by side, in alternating rounds (medians reported); the script prints samples/s for data loading alone and for
training (data + forward/backward/step), the one-off load time of the original file, and the ratios.

    .venv/bin/python scripts/benchmark_draft_throughput.py [--cache data/cache/sim_state_libero_spatial]

Without a cache it benchmarks a synthetic one (same shapes). Runtime ~1-2 min on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from rsd import PROJECT_ROOT
from rsd.data.cache import cache_complete, open_cache, write_cache
from rsd.data.cache_datamodule import FeatureCacheDataModule
from rsd.models.draft import RFSQDraftModelWithProjection


class OriginalDataset(Dataset):
    """The original project's dataset: a python list of per-sample dicts."""

    def __init__(self, samples: list[dict]) -> None:
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


def synthetic_cache(folder: Path, n: int, dim: int) -> Path:
    rng = np.random.default_rng(0)
    hidden = rng.standard_normal((n, dim), dtype=np.float32).astype(np.float16)
    tokens = rng.integers(0, 7, (n, 8, 128), dtype=np.uint8)
    episode = np.arange(n) // 100
    split = (episode % 10 == 0).astype(np.uint8)
    manifest = {"backbone": {"name": "synthetic", "id": "synthetic", "hidden_dim": dim}, "suite": "synthetic",
                "tokenizer": {"identity": "synthetic"}}
    return write_cache(folder, hidden, tokens, rng.uniform(-1, 1, (n, 8, 7)), episode,
                       np.zeros(n, np.int16), split, manifest)


def train_steps(model, opt, batches, steps: int, warmup: int, hidden_key: str, target_key: str) -> tuple[float, int]:
    """Run ``warmup + steps`` training steps pulling from ``batches``; returns (seconds, samples) timed."""
    it = iter(batches)
    seen, t0 = 0, None
    for step in range(warmup + steps):
        if step == warmup:
            t0 = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            it = iter(batches)
            batch = next(it)
        hidden, targets = batch[hidden_key].float(), batch[target_key][:, :3].long()
        logits = model(hidden)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step >= warmup:
            seen += hidden.shape[0]
    return time.perf_counter() - t0, seen


def data_only(batches, n_batches: int) -> tuple[float, int]:
    t0, seen = time.perf_counter(), 0
    for i, batch in enumerate(batches):
        seen += next(iter(batch.values())).shape[0]
        if i + 1 >= n_batches:
            break
    return time.perf_counter() - t0, seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default=str(PROJECT_ROOT / "data/cache/sim_state_libero_spatial"))
    parser.add_argument("--samples", type=int, default=0,
                        help="training samples in the original-format file (0: all, as the original stored them)")
    parser.add_argument("--batch-size", type=int, default=512, help="as in conf/data/feature_cache.yaml")
    parser.add_argument("--steps", type=int, default=18, help="timed training steps per pipeline (all rounds)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps at the start of every round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median reported)")
    parser.add_argument("--data-batches", type=int, default=60, help="batches for the data-only measurement")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tmp = Path(tempfile.mkdtemp(prefix="rsd-bench-"))
    cache = Path(args.cache)
    source = "real cache"
    if not cache_complete(cache):
        cache = synthetic_cache(tmp / "cache", max(args.samples, 40000), 4096)
        source = "synthetic cache (no real cache found)"
    manifest, arrays = open_cache(cache)
    dim = int(manifest["backbone"]["hidden_dim"])
    train_rows = np.nonzero(np.asarray(arrays["split"]) == 0)[0]
    n_orig = len(train_rows) if args.samples <= 0 else min(args.samples, len(train_rows))
    rows = np.sort(np.random.default_rng(0).choice(train_rows, n_orig, replace=False))

    # ---- the original format: a list of per-sample dicts in one torch.save file
    samples = [{"hidden_state": torch.from_numpy(np.asarray(arrays["hidden"][i], dtype=np.float32)),
                "coarse_tokens": torch.from_numpy(arrays["tokens"][i, :3].astype(np.int64))} for i in rows]
    orig_file = tmp / "draft_training_data.pt"
    t0 = time.perf_counter()
    torch.save(samples, orig_file)
    save_s = time.perf_counter() - t0
    del samples
    t0 = time.perf_counter()
    loaded = torch.load(orig_file, weights_only=True)
    load_s = time.perf_counter() - t0
    orig_loader = DataLoader(OriginalDataset(loaded), batch_size=args.batch_size, shuffle=True, num_workers=0)

    # ---- this project: the memory-mapped cache
    t0 = time.perf_counter()
    dm = FeatureCacheDataModule(str(cache), batch_size=args.batch_size)
    dm.setup("fit")
    cache_loader = dm.train_dataloader()
    open_s = time.perf_counter() - t0

    results = {"source": source, "cache": str(cache), "cache_frames": int(manifest["num_frames"]),
               "original_samples": len(rows), "hidden_dim": dim, "batch_size": args.batch_size,
               "threads": torch.get_num_threads(), "original_file_mb": round(orig_file.stat().st_size / 2**20, 1),
               "original_save_s": round(save_s, 2), "original_load_s": round(load_s, 2),
               "cache_open_s": round(open_s, 3)}
    # Rounds alternate between the pipelines and the median is reported, so a load change on a shared
    # machine hits both sides alike.
    pipelines = {"original": (orig_loader, "hidden_state", "coarse_tokens"),
                 "cache": (cache_loader, "hidden", "targets")}
    models = {}
    for name in pipelines:
        torch.manual_seed(0)
        model = RFSQDraftModelWithProjection(input_dim=dim)
        models[name] = (model, torch.optim.AdamW(model.parameters(), lr=3e-4))
    data_rates: dict[str, list[float]] = {n: [] for n in pipelines}
    train_rates: dict[str, list[float]] = {n: [] for n in pipelines}
    for _ in range(args.rounds):
        for name, (loader, hk, tk) in pipelines.items():
            s, n = data_only(loader, args.data_batches // args.rounds)
            data_rates[name].append(n / s)
            s, n = train_steps(*models[name], loader, args.steps // args.rounds, args.warmup, hk, tk)
            train_rates[name].append(n / s)
    for name in pipelines:
        results[f"{name}_data_samples_per_s"] = round(float(np.median(data_rates[name])), 1)
        results[f"{name}_train_samples_per_s"] = round(float(np.median(train_rates[name])), 1)
        results[f"{name}_train_samples_per_s_rounds"] = [round(r, 1) for r in train_rates[name]]
    results["data_ratio_cache_over_original"] = round(
        results["cache_data_samples_per_s"] / results["original_data_samples_per_s"], 2)
    results["train_ratio_cache_over_original"] = round(
        results["cache_train_samples_per_s"] / results["original_train_samples_per_s"], 2)
    # a full epoch over the original file also pays its torch.load once; the cache pays ~nothing
    per_epoch_orig = load_s + len(rows) / results["original_train_samples_per_s"]
    per_epoch_cache = open_s + len(rows) / results["cache_train_samples_per_s"]
    results["first_epoch_ratio_incl_loading"] = round(per_epoch_orig / per_epoch_cache, 2)

    print(f"data: {source}: {cache} ({results['cache_frames']} frames, D={dim}); original-format file: "
          f"{len(rows)} samples, {results['original_file_mb']} MB (save {save_s:.1f} s, load {load_s:.1f} s)")
    print(f"{'pipeline':<30}{'data only (samples/s)':>24}{'training (samples/s)':>24}")
    print(f"{'original (list of dicts)':<30}{results['original_data_samples_per_s']:>24,.0f}"
          f"{results['original_train_samples_per_s']:>24,.0f}")
    print(f"{'memmap feature cache':<30}{results['cache_data_samples_per_s']:>24,.0f}"
          f"{results['cache_train_samples_per_s']:>24,.0f}")
    print(f"ratio cache/original: data {results['data_ratio_cache_over_original']}x, training "
          f"{results['train_ratio_cache_over_original']}x, first epoch incl. loading "
          f"{results['first_epoch_ratio_incl_loading']}x ({torch.get_num_threads()} threads, batch {args.batch_size})")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    for f in tmp.rglob("*"):
        if f.is_file():
            os.remove(f)


if __name__ == "__main__":
    main()
