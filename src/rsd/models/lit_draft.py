"""``DraftLitModule``: trains ``RFSQDraftModelWithProjection`` on feature-cache batches.

Loss: cross-entropy over all ``num_coarse_layers x 128`` tokens of the coarse layers L0..L2 (optionally
weighted per layer, with label smoothing). When the batch carries the main model's distributions
(``soft_targets``, ``data.targets=distill_soft``), knowledge distillation (Hinton et al.) at temperature ``T``
(``distill_temperature``) with weight ``alpha`` (``distill_weight``)::

    loss = alpha * T^2 * KL(teacher_T || softmax(student / T)) + (1 - alpha) * CE(targets)

where ``targets`` are the main model's greedy tokens. The cache stores probabilities ``p`` (temperature 1),
not logits, so the tempered teacher is ``teacher_T = p^(1/T) / sum(p^(1/T))``, which equals
``softmax(logits / T)`` exactly (up to the float16 rounding of ``p``). ``T^2`` keeps the gradient scale of the
soft term independent of ``T``. Imitating the main model's whole distribution, not only its argmax, is what
raises the agreement strict verification needs (``docs/engine.md``, "Distilling the draft").

Metrics, under ``train/`` and ``val/``:

- ``token_acc_L{k}``: fraction of the 128 tokens of layer k predicted right;
- ``exact_L{k}``: fraction of samples whose whole layer k (all 128 tokens) is right -- what strict
  speculative verification accepts;
- ``within1_L{k}`` / ``exact_within1_L{k}``: the same with a tolerance of one FSQ level (|pred - target|
  <= 1), what the engine's relaxed acceptance with delta=1 accepts;
- ``accepted_layers``: mean length of the exactly-right prefix of drafted layers (0..3), the strict
  acceptance the engine would see against ground truth;
- ``accuracy``: mean token accuracy over the coarse layers (``val/accuracy`` is what ModelCheckpoint
  monitors and the export records as ``val_accuracy``);
- ``gt_accuracy``: the same against the demonstrations' tokens; differs from ``accuracy`` only when the
  targets are the main model's greedy tokens (``data.targets=distill``);
- ``kl``: mean per-token ``KL(teacher_T || student_T)`` (without the ``T^2`` factor), only with soft targets;
- ``loss``.

Optimizer: AdamW, linear warm-up then cosine decay to ``min_lr_ratio * lr`` (per step). Gradient
clipping and bf16 autocast come from the trainer config.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MeanMetric

from rsd.models.draft import RFSQDraftModelWithProjection
from rsd.models.lit_tokens import TokenClassifierLitModule, constructor_keys

log = logging.getLogger(__name__)

def tempered_teacher(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Teacher probabilities ``[..., V]`` at temperature ``T``: ``p^(1/T)`` renormalized (= ``softmax(logits/T)``;
    the cache stores probabilities, not logits). Zeros stay zero (float16 underflow of very unlikely tokens)."""
    q = probs.float().clamp_min(0).pow(1.0 / float(temperature))
    return q / q.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)


def distill_kl(probs: torch.Tensor, student_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-token ``KL(teacher_T || softmax(student / T))`` ``[...]`` for teacher probabilities ``[..., V]``."""
    q = tempered_teacher(probs, temperature)
    log_s = F.log_softmax(student_logits.float() / float(temperature), dim=-1)
    return (torch.xlogy(q, q) - q * log_s).sum(dim=-1)


#: constructor arguments of RFSQDraftModelWithProjection (what a checkpoint's config["model"] holds)
MODEL_KEYS = constructor_keys(RFSQDraftModelWithProjection)


class DraftLitModule(TokenClassifierLitModule):
    """Trains :class:`RFSQDraftModelWithProjection` (``net``: the module or its constructor arguments) on the
    coarse layers."""

    network_class = RFSQDraftModelWithProjection
    checkpoint_config_key = "draft_model_config"

    def __init__(self, net: nn.Module | dict | None = None, lr: float = 3e-4,
                 weight_decay: float = 0.01, betas: tuple[float, float] = (0.9, 0.95),
                 warmup_steps: int | None = None, warmup_fraction: float = 0.03, min_lr_ratio: float = 0.02,
                 label_smoothing: float = 0.0, layer_weights: list[float] | None = None,
                 distill_temperature: float = 2.0, distill_weight: float = 1.0) -> None:
        super().__init__()
        if not distill_temperature > 0 or not 0.0 <= distill_weight <= 1.0:
            raise ValueError(f"distill_temperature must be > 0 and distill_weight in [0, 1], got "
                             f"{distill_temperature}, {distill_weight}")
        # plain python (Hydra passes ListConfig), so checkpoints load with torch.load(weights_only=True)
        betas = tuple(float(b) for b in betas)
        layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.model = self._build_net(net, lr=lr, weight_decay=weight_decay, betas=betas,
                                     warmup_steps=warmup_steps, warmup_fraction=warmup_fraction,
                                     min_lr_ratio=min_lr_ratio, label_smoothing=label_smoothing,
                                     layer_weights=layer_weights, distill_temperature=float(distill_temperature),
                                     distill_weight=float(distill_weight))
        self.num_coarse_layers = num_coarse_layers = self.model.num_coarse_layers
        weights = torch.ones(num_coarse_layers) if layer_weights is None else torch.as_tensor(
            list(layer_weights), dtype=torch.float32)
        if weights.shape != (num_coarse_layers,):
            raise ValueError(f"layer_weights needs {num_coarse_layers} entries, got {list(weights.shape)}")
        self.register_buffer("layer_weights", weights / weights.sum() * num_coarse_layers, persistent=False)
        names = ["accuracy", "gt_accuracy", "accepted_layers"] + [f"{kind}_L{k}" for k in range(num_coarse_layers)
                                                   for kind in ("token_acc", "exact", "within1", "exact_within1")]
        # ModuleDict keys cannot be "train" (Module.train), hence the "_metrics" suffix
        self.metrics = nn.ModuleDict({f"{stage}_metrics": nn.ModuleDict({n: MeanMetric() for n in names})
                                      for stage in ("train", "val", "test")})
        # logged only when batches carry soft targets (an empty MeanMetric would log nan)
        self.kl_metrics = nn.ModuleDict({stage: MeanMetric() for stage in ("fit", "val", "test")})

    # ------------------------------------------------------------------ model
    @property
    def network(self) -> nn.Module:
        return self.model

    def model_config(self) -> dict[str, Any]:
        """Constructor arguments of the draft model (stored in exported checkpoints)."""
        return self.network_config()

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model(hidden)

    # ------------------------------------------------------------------ steps
    def _step(self, batch: dict[str, torch.Tensor], stage: str) -> torch.Tensor:
        hidden = batch["hidden"]
        targets = batch["targets"] if "targets" in batch else batch["tokens"][:, : self.num_coarse_layers]
        targets = targets[:, : self.num_coarse_layers].long()
        logits = self.model(hidden)  # [B, L, 128, G]
        b, n_layers, p, g = logits.shape
        ce = F.cross_entropy(logits.float().reshape(-1, g), targets.reshape(-1), reduction="none",
                             label_smoothing=self.hparams.label_smoothing).view(b, n_layers, p)
        loss = (ce.mean(dim=(0, 2)) * self.layer_weights).mean()
        soft = batch.get("soft_targets")
        if soft is not None:  # knowledge distillation from the main model's distributions (module docstring)
            t, alpha = self.hparams.distill_temperature, self.hparams.distill_weight
            kl = distill_kl(soft[:, :n_layers], logits, t)  # [B, L, P]
            kl_loss = (kl.mean(dim=(0, 2)) * self.layer_weights).mean()
            loss = alpha * t * t * kl_loss + (1.0 - alpha) * loss
            kl_metric = self.kl_metrics["fit" if stage == "train" else stage]
            kl_metric.update(kl.detach().mean(dim=(1, 2)))
            self.log(f"{stage}/kl", kl_metric, on_step=False, on_epoch=True, batch_size=b)
        with torch.no_grad():
            pred = logits.argmax(-1)
            correct = pred == targets  # [B, L, P]
            near = (pred - targets).abs() <= 1  # within one FSQ level (relaxed acceptance, delta=1)
            token_acc = correct.float().mean(-1)  # [B, L]
            exact = correct.all(-1)  # [B, L]
            accepted = exact.long().cumprod(-1).sum(-1).float()  # exactly-right prefix length
            m = self.metrics[f"{stage}_metrics"]
            m["accuracy"].update(token_acc.mean(-1))
            truth = batch["tokens"][:, :n_layers] if "tokens" in batch else targets
            m["gt_accuracy"].update((pred == truth).float().mean(dim=(1, 2)))
            m["accepted_layers"].update(accepted)
            for k in range(n_layers):
                m[f"token_acc_L{k}"].update(token_acc[:, k])
                m[f"exact_L{k}"].update(exact[:, k].float())
                m[f"within1_L{k}"].update(near[:, k].float().mean(-1))
                m[f"exact_within1_L{k}"].update(near[:, k].all(-1).float())
        on_step = stage == "train"
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, batch_size=b, sync_dist=True)
        for name, metric in self.metrics[f"{stage}_metrics"].items():
            self.log(f"{stage}/{name}", metric, on_step=False, on_epoch=True, batch_size=b,
                     prog_bar=name == "accuracy" and stage == "val")
        return loss

    # ------------------------------------------------------------------ optimisation
    def warmup_steps(self, total_steps: int) -> int:
        """``warmup_steps`` when set, else ``warmup_fraction`` of the run. One parameter group (the base's
        default), so ``optimizer_state_dict`` loads into a plain ``AdamW(model.parameters())``."""
        hp = self.hparams
        warmup = hp.warmup_steps if hp.warmup_steps is not None else int(hp.warmup_fraction * total_steps)
        return max(min(int(warmup), total_steps - 1), 0)
