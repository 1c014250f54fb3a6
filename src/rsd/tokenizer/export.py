"""Callback writing the trained tokenizer file and its held-out reconstruction table at the end of fit.

``ExportTokenizer(out_path)`` loads the best checkpoint's weights (``trainer.checkpoint_callback``;
the final weights when there is none, e.g. ``fast_dev_run``), measures the reconstruction MSE in
normalized units against the number of layers used (1..8) on the datamodule's validation episodes,
and writes ``out_path`` (``data/tokenizers/rfsq_{suite}.pt``) plus ``<stem>.recon.json`` / ``.md``
next to it (and a copy of the table in the run's output folder).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L

from rsd.utils.export import BestCheckpointExport


def format_table(mse: list[float], title: str = "") -> str:
    lines = ([f"### {title}", ""] if title else []) + [
        "| layers | MSE (normalized units) |", "|---:|---:|"]
    lines += [f"| {n} | {v:.3e} |" for n, v in enumerate(mse, start=1)]
    return "\n".join(lines) + "\n"


class ExportTokenizer(BestCheckpointExport):
    def __init__(self, out_path: str, copy_to_output_dir: str | None = None) -> None:
        super().__init__()
        self.out_path = out_path
        self.copy_to_output_dir = copy_to_output_dir

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        train_seconds = self.train_seconds()
        best, best_score = self.load_best_weights(trainer, pl_module)
        tok = pl_module.tokenizer
        was_training = tok.training
        tok.eval()
        dm = trainer.datamodule
        val = getattr(dm, "val_chunks", None)
        if val is None or len(val) == 0:
            raise RuntimeError("ExportTokenizer needs a datamodule with held-out `val_chunks`")
        mse = tok.reconstruction_mse(val.to(pl_module.device))
        summary = dm.summary() if hasattr(dm, "summary") else {}
        suite = summary.get("suite", getattr(dm, "suite", "unknown"))
        out = Path(str(self.out_path).format(suite=suite))
        metadata = {
            "data": summary,
            "best_checkpoint": best,
            "best_score": best_score,
            "epochs": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "train_seconds": train_seconds,
            "val_mse_by_layers": mse,
            "hparams": {k: v for k, v in dict(pl_module.hparams).items() if k != "net"},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        tok.save(out, metadata=metadata)
        report = {
            "tokenizer": str(out),
            "identity": tok.identity(),
            "suite": suite,
            "val_episodes": summary.get("val_episodes"),
            "val_chunks": int(len(val)),
            "mse_by_layers": {str(n): v for n, v in enumerate(mse, start=1)},
            "targets": {"L8 <= 1e-4": mse[-1] <= 1e-4, "L3 <= 1e-2": len(mse) >= 3 and mse[2] <= 1e-2},
            "train_seconds": train_seconds,
            "best_checkpoint": best,
        }
        title = (f"RFSQ reconstruction on held-out episodes: {suite}, {summary.get('val_episodes')} episodes, "
                 f"{len(val)} chunks")
        md = format_table(mse, title)
        stem = out.with_suffix("")
        Path(f"{stem}.recon.json").write_text(json.dumps(report, indent=2) + "\n")
        Path(f"{stem}.recon.md").write_text(md)
        if self.copy_to_output_dir:
            d = Path(self.copy_to_output_dir)
            d.mkdir(parents=True, exist_ok=True)
            (d / "tokenizer_recon.json").write_text(json.dumps(report, indent=2) + "\n")
            (d / "tokenizer_recon.md").write_text(md)
        print(f"\nTokenizer written to {out} ({tok.identity()})\n{md}", flush=True)
        tok.train(was_training)
