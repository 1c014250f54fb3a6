"""LightningModule training the RFSQ tokenizer on raw action chunks (see ``ActionChunkDataModule``).

Loss: MSE in normalized units between the chunk and its reconstruction, plus a penalty keeping the
encoder output inside the latent bound. A fresh model is initialised from the training data
(``RFSQTokenizer.init_from_data``: an exactly invertible linear pair). Quantizer dropout: a fraction
``dropout_prob`` of each batch is reconstructed from a random prefix of 1..L layers (uniform), the rest
from all L layers, so coarse prefixes decode meaningfully. Validation logs ``val/mse_L{n}`` for every
prefix length n = 1..L on held-out episodes.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanSquaredError

from rsd.tokenizer.rfsq import RFSQTokenizer
from rsd.utils.config import net_config
from rsd.utils.schedules import warmup_cosine


class RFSQLitModule(L.LightningModule):
    """Trains the :class:`RFSQTokenizer` (``net`` = its constructor arguments) to reconstruct action chunks
    from every prefix of its layers (quantizer dropout)."""

    def __init__(self, net: dict | None = None, lr: float = 1e-3, weight_decay: float = 1e-4,
                 warmup_steps: int = 200, min_lr_ratio: float = 0.01, dropout_prob: float = 0.5,
                 range_weight: float = 1.0, data_init: bool = True) -> None:
        super().__init__()
        tokenizer = net_config(net)
        self.save_hyperparameters({"net": tokenizer, "lr": lr, "weight_decay": weight_decay,
                                   "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "dropout_prob": dropout_prob, "range_weight": range_weight,
                                   "data_init": data_init})
        self.tokenizer = RFSQTokenizer(**tokenizer)
        self.num_layers = self.tokenizer.num_layers
        self.val_mse = nn.ModuleList(MeanSquaredError() for _ in range(self.num_layers))

    # ------------------------------------------------------------------ data
    def setup(self, stage: str) -> None:
        """Fresh model: fit the normalizer on the training episodes, then the data-dependent init.

        (When resuming, the checkpoint restored after ``setup`` overwrites both.)
        """
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is None or getattr(dm, "train_actions", None) is None or bool(self.tokenizer.normalizer.fitted):
            return
        self.tokenizer.normalizer.fit(dm.train_actions)
        chunks = getattr(dm, "train_chunks", None)
        if self.hparams.data_init and chunks is not None and len(chunks):
            self.tokenizer.init_from_data(self.tokenizer.normalizer.normalize(chunks[:200_000].float()))

    def _normalized(self, batch: Any) -> torch.Tensor:
        chunks = batch[0] if isinstance(batch, list | tuple) else batch
        return self.tokenizer.normalizer.normalize(chunks.float())

    # ------------------------------------------------------------------ steps
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x = self._normalized(batch)
        n = torch.full((x.shape[0],), self.num_layers, dtype=torch.long, device=x.device)
        if self.hparams.dropout_prob > 0:
            drop = torch.rand(x.shape[0], device=x.device) < self.hparams.dropout_prob
            n = torch.where(drop, torch.randint(1, self.num_layers + 1, n.shape, device=x.device), n)
        tok = self.tokenizer
        h = tok.pre_latent(x)
        z_q, _ = tok.quantizer.quantize(h.clamp(-1.0, 1.0), n)
        mse = (tok.decode_latent(z_q) - x).pow(2).mean()
        penalty = tok.range_penalty(h)
        loss = mse + self.hparams.range_weight * penalty
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=True, batch_size=x.shape[0])
        self.log("train/mse", mse, on_step=False, on_epoch=True, batch_size=x.shape[0])
        self.log("train/range_penalty", penalty, on_step=False, on_epoch=True, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x = self._normalized(batch)
        tok = self.tokenizer
        z = tok.latent(x)
        prefixes = tok.quantizer.dequantize_prefixes(tok.quantizer.codes(z), dtype=z.dtype)
        for n in range(self.num_layers):
            self.val_mse[n].update(tok.decode_latent(prefixes[..., n]), x)

    def on_validation_epoch_end(self) -> None:
        for n, metric in enumerate(self.val_mse, start=1):
            self.log(f"val/mse_L{n}", metric.compute(), prog_bar=n in (3, self.num_layers))
            metric.reset()

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def on_test_epoch_end(self) -> None:
        for n, metric in enumerate(self.val_mse, start=1):
            self.log(f"test/mse_L{n}", metric.compute())
            metric.reset()

    # ------------------------------------------------------------------ optimisation
    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(self.hparams.warmup_steps, total // 10)
        sched = warmup_cosine(opt, total, warmup, self.hparams.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
