"""Train any rsd model: ``python train.py experiment=draft_proj`` (see conf/experiment/)."""

from __future__ import annotations

import logging

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsd.utils.config import CONFIG_DIR, find_latest_last_ckpt, instantiate_group

log = logging.getLogger("train")


def train(cfg: DictConfig) -> dict:
    """Fit the experiment's LightningModule on its DataModule; returns the final metrics."""
    if cfg.get("data") is None or cfg.get("model") is None:
        raise SystemExit("No experiment chosen. Run e.g. `python train.py experiment=draft_proj` "
                         "(experiments: conf/experiment/).")
    L.seed_everything(cfg.seed, workers=True)
    datamodule: L.LightningDataModule = instantiate(cfg.data)
    model: L.LightningModule = instantiate(cfg.model)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_group(cfg.get("logger"))
    for lg in loggers:
        if hasattr(lg, "log_hyperparams"):
            lg.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)

    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path == "auto":
        ckpt_path = find_latest_last_ckpt(cfg.paths.log_dir, cfg.task_name)
        log.info("Resuming from %s", ckpt_path or "scratch (no last.ckpt found)")
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    if cfg.get("test"):
        trainer.test(model, datamodule=datamodule, ckpt_path="best" if trainer.checkpoint_callback else None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
    for lg in loggers:
        if hasattr(lg, "finalize"):
            lg.finalize("success")
    log.info("Output folder: %s", cfg.paths.output_dir)
    return metrics


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # returned for Hydra sweepers (e.g. optuna) optimising the monitored metric
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))


if __name__ == "__main__":
    main()
