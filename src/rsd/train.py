"""Training entry point: prepare the run's inputs (``rsd.prepare``), then fit the experiment's LightningModule.

``python train.py experiment=draft_proj`` (the root script) calls :func:`main`. The experiment says which
pipeline steps it needs (``prepare.until``: demos -> tokenizer -> cache -> main -> distill); the pipeline
prints its plan, builds what is stale and returns the artifacts' identities, which the trained model's own
artifact manifest records as its inputs (``artifact:`` in the experiment config).

The config is checked first (:func:`check_train_config`, before any file is loaded or the training stack is
imported); a bad value or a missing file is one line on stderr with a non-zero exit (:mod:`rsd.utils.errors`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from rsd.prepare.config import check_prepare_config, is_int, positive
from rsd.utils.config import CONFIG_DIR
from rsd.utils.errors import ConfigError, check_composition, report_errors

PROGRAM = "train.py"


def check_train_config(cfg: DictConfig) -> None:
    """An experiment is chosen and its main settings are in range; raises :class:`ConfigError` /
    ``FileNotFoundError`` naming the key and the fix."""
    if cfg.get("data") is None or cfg.get("model") is None:
        experiments = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
        raise ConfigError("no experiment chosen: run e.g. `python train.py experiment=draft_proj` "
                          f"(experiments: {', '.join(experiments)})")
    check_prepare_config(cfg)
    trainer = cfg.get("trainer") or {}
    epochs = trainer.get("max_epochs")
    if epochs is not None and (not is_int(epochs) or (epochs < 1 and epochs != -1)):
        raise ConfigError(f"trainer.max_epochs={epochs!r}: must be an integer >= 1 (or -1: no limit)")
    positive(cfg, "data.batch_size")
    positive(cfg, "data.val_batch_size")
    positive(cfg, "data.num_workers", low=0)
    lr = (cfg.get("model") or {}).get("lr")
    if lr is not None and (isinstance(lr, bool) or not isinstance(lr, int | float) or not lr >= 0):
        raise ConfigError(f"model.lr={lr!r}: must be a number >= 0 (0 keeps the initial weights)")
    ckpt_path = cfg.get("ckpt_path")
    if ckpt_path not in (None, "auto") and not Path(str(ckpt_path)).expanduser().is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path}: no such Lightning checkpoint (a .ckpt file, or "
                                "ckpt_path=auto for the newest last.ckpt of this task)")


def train(cfg: DictConfig) -> dict[str, float]:
    """Check the config, prepare the experiment's inputs, then fit it; returns the final metrics."""
    check_train_config(cfg)
    # lazy: keeps torch out of the config check (a bad config fails in < 1 s)
    from rsd.fit import fit
    from rsd.prepare.pipeline import prepare

    inputs = prepare(cfg) if cfg.get("prepare") is not None else {}
    return fit(cfg, inputs)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def hydra_main(cfg: DictConfig) -> float | None:
    with report_errors(PROGRAM):
        metrics = train(cfg)
    # returned for Hydra sweepers (e.g. optuna) optimising the monitored metric
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))


def main() -> float | None:
    """``python train.py experiment=<name> [overrides]``: composed and checked before Hydra starts the job."""
    with report_errors(PROGRAM):
        check_composition("train", sys.argv[1:], check_train_config)
    return hydra_main()
