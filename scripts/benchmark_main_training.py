"""Training cost of the main model per trained-layer count, side by side in one process.

``make train``'s main step is the pipeline's largest cost after the demonstrations. Teacher forcing runs one
depth position per trained layer (``model.net.trained_layers``), so the cost of an optimizer step grows with
it. This script times full AdamW steps (forward, cross-entropy over the trained layers, backward, step) of
the model ``conf/model/main_head.yaml`` builds, for each ``--layers`` value in turn (rotating order, same
process, same batch), and prints ms per step, the ratio to the first value and the minutes one epoch of
``--frames`` training frames takes at ``--batch-size``::

    .venv/bin/python scripts/benchmark_main_training.py --layers 8 3 --steps 20 --batch-size 64

Random inputs: the cost does not depend on the values. Threads: torch's default (the cores of the machine).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from rsd.models.main_decoder import RFSQMainDecoder
from rsd.utils.config import CONFIG_DIR


def net_config() -> dict:
    """The main model's constructor arguments from ``conf/model/main_head.yaml`` (input width 4096)."""
    cfg = OmegaConf.load(Path(CONFIG_DIR) / "model" / "main_head.yaml")
    net = OmegaConf.to_container(cfg.net, resolve=False)
    net.pop("_target_", None)
    net["input_dim"] = 4096
    return net


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[8, 3])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per layer count (after 2 warm-up steps)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--frames", type=int, default=42_400, help="training frames per epoch (make train's cache)")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.manual_seed(0)
    models, optims = {}, {}
    for k in args.layers:
        models[k] = RFSQMainDecoder(**{**net_config(), "trained_layers": k}).train()
        optims[k] = torch.optim.AdamW(models[k].parameters(), lr=3e-4)
    hidden = torch.randn(args.batch_size, 4096)
    tokens = torch.randint(0, 7, (args.batch_size, 8, 128))

    def step(k: int) -> float:
        t0 = time.perf_counter()
        logits = models[k](hidden, tokens[:, : k - 1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, :k].reshape(-1))
        optims[k].zero_grad(set_to_none=True)
        loss.backward()
        optims[k].step()
        return time.perf_counter() - t0

    for k in args.layers:
        step(k), step(k)
    times: dict[int, list[float]] = {k: [] for k in args.layers}
    for i in range(args.steps):
        order = args.layers[i % len(args.layers):] + args.layers[: i % len(args.layers)]
        for k in order:
            times[k].append(step(k))
    first = args.layers[0]
    mean = {k: sum(v) / len(v) for k, v in times.items()}
    steps_per_epoch = args.frames / args.batch_size
    print(f"main model training steps (batch {args.batch_size}, {torch.get_num_threads()} threads, "
          f"{platform.processor() or platform.machine()}), {args.steps} steps each, one run")
    print("| trained layers | ms / step | vs first | min / epoch |")
    print("|---|---|---|---|")
    rows = []
    for k in args.layers:
        row = {"trained_layers": k, "ms_per_step": 1e3 * mean[k], "ratio_to_first": mean[first] / mean[k],
               "minutes_per_epoch": mean[k] * steps_per_epoch / 60}
        rows.append(row)
        print(f"| {k} | {row['ms_per_step']:.0f} | {row['ratio_to_first']:.2f}x | {row['minutes_per_epoch']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"batch_size": args.batch_size, "threads": torch.get_num_threads(), "frames": args.frames,
                       "steps": args.steps, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
