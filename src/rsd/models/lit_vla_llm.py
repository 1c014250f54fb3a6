"""Training of ``main=vla_llm`` (:mod:`rsd.models.vla_llm_main`): data, LightningModule, export callback.

Teacher forcing on all layers: per batch, the backbone prefills the prompts (image + instruction, no
gradient while the LLM is frozen), then ONE language-model forward over the 7 true layers ``L0..L6``
gives, with head_0 on the prompt's last hidden state, the logits of all 8 layers: the same code path as
the engine's verification call. Loss: cross-entropy over the 8 x 128 tokens. Metrics as the light main
decoder's (``rsd.models.lit_main``): ``acc_L{k}``, ``exact_L{k}``, ``exact_all``, ``accuracy``.

Data: ``rsd.data.frame_images.VLAFrameDataModule`` (the feature cache's tokens plus each frame's camera
image).

Checkpoints hold only the trainable weights (the frozen VLM stays in its model directory); the export
callback writes ``{output_dir}/vla_llm_main.pt`` (:func:`rsd.models.vla_llm_main.save_vla_llm_main`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rsd.models.backbones import backbone_from_config
from rsd.models.layer_metrics import LayerTokenMetrics
from rsd.models.lit_tokens import TokenClassifierLitModule, weight_decay_groups
from rsd.models.vla_llm_main import VLALLMMain, VLAPromptBackbone, save_vla_llm_main
from rsd.utils.config import net_config
from rsd.utils.export import BestCheckpointExport, best_checkpoint

log = logging.getLogger(__name__)



def _plain(cfg: Any) -> dict:
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.to_container(cfg, resolve=True)
    return dict(cfg or {})


# ---------------------------------------------------------------------- the LightningModule
class VLALLMLitModule(TokenClassifierLitModule):
    """Trains :class:`VLALLMMain` on a ``backbone`` (its config dict: ``hf_vlm`` / ``openvla``) with AdamW +
    warm-up + cosine. ``main``: :class:`VLALLMMain` options (``train_llm``; layout sizes). Its network needs the
    backbone's language model, so it is built here rather than injected."""

    network_class = VLALLMMain
    checkpoint_config_key = "vla_llm_main_config"

    def __init__(self, backbone: Mapping[str, Any] | None = None, net: Mapping[str, Any] | None = None,
                 lr: float = 3e-4, weight_decay: float = 0.05, warmup_steps: int = 100, min_lr_ratio: float = 0.05,
                 label_smoothing: float = 0.0, betas: tuple[float, float] = (0.9, 0.95)) -> None:
        super().__init__()
        backbone, main = _plain(backbone), net_config(net)
        if backbone.get("name") not in ("hf_vlm", "openvla"):
            raise ValueError(f"main=vla_llm decodes with a VLA's language model: backbone=hf_vlm or openvla, got "
                             f"{backbone.get('name')!r}")
        self.save_hyperparameters({"backbone": backbone, "net": main, "lr": lr, "weight_decay": weight_decay,
                                   "warmup_steps": warmup_steps, "min_lr_ratio": min_lr_ratio,
                                   "label_smoothing": label_smoothing, "betas": tuple(betas)})
        self.backbone = backbone_from_config(backbone)
        self.prompts = VLAPromptBackbone(self.backbone)
        self.main = VLALLMMain(self.prompts.language_model(), **main)
        self.num_layers = self.main.num_layers
        self.strict_loading = False  # checkpoints hold the trainable weights only
        self.layer_metrics = LayerTokenMetrics(self.num_layers)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "cache_identity"):
            ident = dm.cache_identity()
            if ident.get("backbone_id") != self.backbone.backbone_id:
                raise ValueError(f"the data was cached with backbone {ident.get('backbone_id')}, the model runs "
                                 f"{self.backbone.backbone_id}: use the same backbone config")

    def _step(self, batch: Mapping[str, Any], stage: str) -> torch.Tensor:
        tokens = batch["tokens"].long().to(self.device)
        images = [im.cpu().numpy() for im in batch["image"]]
        grad = self.main.train_llm and stage == "train"
        with torch.set_grad_enabled(grad):
            prompt = self.prompts.encode_images(images, list(batch["instruction"]))
        logits = self.main(prompt, tokens[:, : self.num_layers - 1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens.reshape(-1),
                               label_smoothing=self.hparams.label_smoothing)
        self.layer_metrics.update(stage, logits, tokens)
        self.log(f"{stage}/loss", loss, prog_bar=True, on_step=stage == "train", on_epoch=True,
                 batch_size=tokens.shape[0])
        return loss

    @property
    def network(self) -> nn.Module:
        return self.main

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        """Keep only trainable weights and metric states (a frozen 7B LLM is not copied into every .ckpt)."""
        super().on_save_checkpoint(checkpoint)
        keep = {f"main.{k}" for k in (self.main.state_dict() if self.main.train_llm else self.main.new_parameters())}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items()
                                    if k in keep or not k.startswith("main.")}

    def parameter_groups(self) -> list[dict]:
        return weight_decay_groups(self.main.named_parameters(), self.hparams.weight_decay)


class ExportVLALLMMain(BestCheckpointExport):
    """At the end of fit, write the best checkpoint's weights to ``{output_dir}/vla_llm_main.pt``
    (load with :func:`rsd.models.vla_llm_main.load_vla_llm_main`); ``copy_to`` as ``ExportMainDecoder``'s."""

    def __init__(self, output_dir: str, filename: str = "vla_llm_main.pt", copy_to: str | None = None) -> None:
        super().__init__()
        self.output_dir, self.filename, self.copy_to = output_dir, filename, copy_to

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        if not isinstance(pl_module, VLALLMLitModule):
            raise TypeError(f"ExportVLALLMMain expects a VLALLMLitModule, got {type(pl_module).__name__}")
        best, score = best_checkpoint(trainer)
        if best:  # our own trainer's checkpoint (hyper-parameters too); trainable weights only
            state = torch.load(best, map_location=pl_module.device, weights_only=False)["state_dict"]
            pl_module.load_state_dict(state, strict=False)
        dm = getattr(trainer, "datamodule", None)
        data = dict(dm.cache_identity()) if dm is not None and hasattr(dm, "cache_identity") else {}
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items()
                   if k.startswith("val/") and torch.as_tensor(v).numel() == 1}
        extra = {"metrics": metrics, "best_checkpoint": best, "best_score": score, "epoch": int(trainer.current_epoch),
                 "global_step": int(trainer.global_step), "train_seconds": self.train_seconds(), "data": data,
                 "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        cfg = pl_module.backbone.config()
        out = [save_vla_llm_main(pl_module.main, Path(self.output_dir) / self.filename, cfg, **extra)]
        if self.copy_to:
            target = str(self.copy_to).format(backbone=data.get("backbone_name", "unknown"),
                                              suite=data.get("suite", "unknown"))
            out.append(save_vla_llm_main(pl_module.main, target, cfg, **extra))
        print(f"\nvla_llm main model written to {', '.join(map(str, out))} (val/accuracy "
              f"{metrics.get('val/accuracy', float('nan')):.4f})", flush=True)
