"""LightningModule training the main depth decoder on the feature cache, and its export callback.

Teacher forcing: ``decoder(hidden, tokens[:, :K-1])`` gives the logits of the ``K = net.trained_layers`` trained
layers (all 8 by default) in one call; the loss is the cross-entropy over the K x 128 tokens. Metrics (torchmetrics, under ``train/``,
``val/`` and ``test/``): ``acc_L{k}`` token accuracy of layer k, ``exact_L{k}`` fraction of samples
whose whole layer k is right (what strict speculative acceptance needs), ``exact_all`` all 8 layers
right, and ``accuracy`` = mean token accuracy over the 8 layers (``val/accuracy`` is monitored).

Batches: dicts with ``hidden`` float ``[B, D]`` and ``tokens`` long ``[B, 8, 128]`` (layers view),
as ``rsd.data.cache_datamodule.FeatureCacheDataModule`` yields them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from rsd.models.layer_metrics import LayerTokenMetrics
from rsd.models.lit_tokens import TokenClassifierLitModule, weight_decay_groups
from rsd.models.main_decoder import RFSQMainDecoder, save_main_decoder
from rsd.utils.export import BestCheckpointExport

log = logging.getLogger(__name__)



class MainDecoderLitModule(TokenClassifierLitModule):
    """Trains :class:`RFSQMainDecoder` (``net``: the module or its constructor arguments) with AdamW + warm-up +
    cosine."""

    network_class = RFSQMainDecoder
    checkpoint_config_key = "main_decoder_config"

    def __init__(self, net: nn.Module | dict | None = None, lr: float = 3e-4, weight_decay: float = 0.05,
                 warmup_steps: int = 500, min_lr_ratio: float = 0.05, label_smoothing: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95)) -> None:
        super().__init__()
        self.decoder = self._build_net(net, lr=lr, weight_decay=weight_decay, warmup_steps=warmup_steps,
                                       min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing,
                                       betas=tuple(float(b) for b in betas))
        n = self.decoder.trained_layers  # layers 0..n-1 are trained (the net's config says how many)
        self.num_layers = n
        self._checked_range = False
        self.layer_metrics = LayerTokenMetrics(n)

    @property
    def network(self) -> nn.Module:
        return self.decoder

    def _unpack(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not isinstance(batch, dict) or "hidden" not in batch or "tokens" not in batch:
            raise ValueError("main decoder batches must be dicts with 'hidden' [B, D] and 'tokens' [B, 8, 128]")
        hidden, tokens = batch["hidden"].float(), batch["tokens"].long()
        want = (self.decoder.num_layers, self.decoder.num_positions)
        if tokens.ndim != 3 or tuple(tokens.shape[1:]) != want:
            raise ValueError(f"tokens must be the layers view [B, {want[0]}, {want[1]}], got {tuple(tokens.shape)}")
        tokens = tokens[:, : self.num_layers]  # only the trained layers are predicted
        if not self._checked_range:  # once: out-of-range levels would silently index a neighbour's embedding
            lo, hi = int(tokens.min()), int(tokens.max())
            if lo < 0 or hi >= self.decoder.num_levels:
                raise ValueError(f"token levels must be in 0..{self.decoder.num_levels - 1}, got {lo}..{hi}")
            self._checked_range = True
        return hidden, tokens

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        hidden, tokens = self._unpack(batch)
        logits = self.decoder(hidden, tokens[:, : self.num_layers - 1])  # [B, trained layers, 128, V]
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1),
                               label_smoothing=self.hparams.label_smoothing)
        b = hidden.shape[0]
        self.layer_metrics.update(stage, logits, tokens)
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=on_step, on_epoch=True, batch_size=b, sync_dist=True)
        return loss

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> list[dict]:
        return weight_decay_groups(self.decoder.named_parameters(), self.hparams.weight_decay)


class ExportMainDecoder(BestCheckpointExport):
    """At the end of fit, write the best checkpoint's decoder to ``{output_dir}/main_decoder.pt``.

    The file holds ``config`` + ``state_dict`` (load it with ``rsd.models.main_decoder.load_main_decoder``)
    plus the validation metrics and, when the datamodule has ``cache_identity()``, the feature cache it
    was trained on. ``copy_to`` (optional, may contain ``{backbone}`` and ``{suite}``) writes a second copy,
    e.g. ``data/models/main_head_{backbone}_{suite}.pt``.
    """

    def __init__(self, output_dir: str, filename: str = "main_decoder.pt", copy_to: str | None = None) -> None:
        super().__init__()
        self.output_dir = output_dir
        self.filename = filename
        self.copy_to = copy_to

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, MainDecoderLitModule):
            raise TypeError(f"ExportMainDecoder expects a MainDecoderLitModule, got {type(pl_module).__name__}")
        best, best_score = self.load_best_weights(trainer, pl_module)
        dm = getattr(trainer, "datamodule", None)
        data = {}
        if dm is not None and hasattr(dm, "cache_identity"):
            try:
                data = dict(dm.cache_identity())
            except Exception as exc:  # noqa: BLE001 - metadata only
                log.warning("ExportMainDecoder: no cache identity (%s)", exc)
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
        extra = {
            "metrics": metrics,
            "best_checkpoint": best,
            "best_score": best_score,
            "epoch": int(trainer.current_epoch),
            "global_step": int(trainer.global_step),
            "train_seconds": self.train_seconds(),
            "data": data,
            "hparams": {k: v for k, v in dict(pl_module.hparams).items() if k != "net"},
            "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        decoder = pl_module.decoder
        out = save_main_decoder(decoder, Path(self.output_dir) / self.filename, **extra)
        written = [str(out)]
        if self.copy_to:
            target = Path(str(self.copy_to).format(backbone=data.get("backbone_name", "unknown"),
                                                   suite=data.get("suite", "unknown")))
            written.append(str(save_main_decoder(decoder, target, **extra)))
        print(f"\nMain decoder written to {', '.join(written)} (val/accuracy "
              f"{metrics.get('val/accuracy', float('nan')):.4f})", flush=True)
