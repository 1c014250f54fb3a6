"""The generic fit loop every training run shares (the entry point and the pipeline's nested runs).

Instantiate ``cfg.data`` (a LightningDataModule), ``cfg.model`` (a LightningModule taking ``net=``),
``cfg.callbacks.*``, ``cfg.logger.*`` and ``cfg.trainer``; fit (resuming from ``ckpt_path``), test if
``cfg.test``, then write the run's ``artifact.json`` (``cfg.artifact``) naming the inputs it was given.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from rsd.utils.artifacts import write_artifact
from rsd.utils.config import find_latest_last_ckpt, instantiate_group

log = logging.getLogger("rsd.fit")


def write_run_artifact(cfg: DictConfig, inputs: dict, metrics: dict[str, float]) -> dict | None:
    """The run's ``artifact.json`` (``cfg.artifact``: kind and files) naming the prepared inputs it used."""
    spec = cfg.get("artifact")
    if not spec:
        return None
    out = Path(cfg.paths.output_dir)
    files = [f for f in spec.files if (out / f).is_file()]
    if not files:
        log.warning("no %s in %s: no artifact manifest written", list(spec.files), out)
        return None
    monitor = cfg.get("optimized_metric")
    return write_artifact(out, spec.kind, files=files, inputs=inputs,
                          config={"experiment": cfg.get("task_name"), "model": OmegaConf.to_container(cfg.model),
                                  "data": OmegaConf.to_container(cfg.data, resolve=True)},
                          extra={"suite": cfg.get("prepare", {}).get("suite"),
                                 "metric": {"name": monitor, "value": metrics.get(monitor)} if monitor else None})


def fit(cfg: DictConfig, inputs: dict | None = None) -> dict[str, float]:
    """Fit the experiment's LightningModule on its DataModule (resuming from ``ckpt_path``), test if
    ``cfg.test``, write the run's artifact manifest with ``inputs`` (the pipeline's refs); returns the metrics."""
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
    manifest = write_run_artifact(cfg, inputs or {}, metrics)
    if manifest:
        log.info("%s artifact %s (%s)", manifest["kind"], cfg.paths.output_dir, manifest["content_hash"][:12])
    log.info("Output folder: %s", cfg.paths.output_dir)
    return metrics
