"""Per-layer token metrics of the main models (accuracy and whole-layer exact match), logged per epoch.

Both main models (the light depth decoder and ``vla_llm``) predict all RFSQ layers with teacher forcing
and are judged the same way, so their metrics come from one place and stay comparable.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn
from torchmetrics import MeanMetric

STAGES = ("train", "val", "test")


class LayerTokenMetrics(nn.Module):
    """``{stage}/acc_L{k}``, ``{stage}/exact_L{k}``, ``{stage}/exact_all`` and ``{stage}/accuracy`` (the mean
    of the per-layer accuracies) for ``num_layers`` layers of tokens ``[B, L, P]``."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.num_layers = int(num_layers)
        # keys "<stage>_metrics": "train" would shadow nn.Module.train
        self.stages = nn.ModuleDict({
            f"{stage}_metrics": nn.ModuleDict({
                **{f"acc_L{k}": MeanMetric() for k in range(self.num_layers)},
                **{f"exact_L{k}": MeanMetric() for k in range(self.num_layers)},
                "exact_all": MeanMetric(),
            })
            for stage in STAGES
        })

    def of(self, stage: str) -> nn.ModuleDict:
        return self.stages[f"{stage}_metrics"]

    @torch.no_grad()
    def update(self, stage: str, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        """Accumulate a batch: ``logits [B, L, P, V]`` against ``tokens [B, L, P]``."""
        correct = logits.argmax(-1) == tokens
        acc, exact = correct.float().mean(-1), correct.all(-1)  # [B, L]
        m = self.of(stage)
        for k in range(self.num_layers):
            m[f"acc_L{k}"].update(acc[:, k])
            m[f"exact_L{k}"].update(exact[:, k].float())
        m["exact_all"].update(exact.all(-1).float())

    def log_epoch(self, module: L.LightningModule, stage: str) -> None:
        """Log the epoch's values through ``module`` and reset them."""
        m = self.of(stage)
        accs = []
        for k in range(self.num_layers):
            accs.append(m[f"acc_L{k}"].compute())
            module.log(f"{stage}/acc_L{k}", accs[-1])
            module.log(f"{stage}/exact_L{k}", m[f"exact_L{k}"].compute())
        module.log(f"{stage}/exact_all", m["exact_all"].compute())
        module.log(f"{stage}/accuracy", torch.stack(accs).mean(), prog_bar=True)
        self.reset(stage)

    def reset(self, stage: str) -> None:
        for metric in self.of(stage).values():
            metric.reset()
