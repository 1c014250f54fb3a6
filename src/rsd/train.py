"""Training entry point: prepare the run's inputs (``rsd.prepare``), then fit the experiment's LightningModule.

``python train.py experiment=draft_proj`` (the root script) calls :func:`main`. The experiment says which
pipeline steps it needs (``prepare.until``: demos -> tokenizer -> cache -> main -> distill); the pipeline
prints its plan, builds what is stale and returns the artifacts' identities, which the trained model's own
artifact manifest records as its inputs (``artifact:`` in the experiment config).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from rsd.fit import fit
from rsd.prepare.pipeline import prepare
from rsd.utils.config import CONFIG_DIR


def train(cfg: DictConfig) -> dict[str, float]:
    """Prepare the experiment's inputs, then fit it; returns the final metrics."""
    if cfg.get("data") is None or cfg.get("model") is None:
        raise SystemExit("No experiment chosen. Run e.g. `python train.py experiment=draft_proj` "
                         "(experiments: conf/experiment/).")
    inputs = prepare(cfg) if cfg.get("prepare") is not None else {}
    return fit(cfg, inputs)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    metrics = train(cfg)
    # returned for Hydra sweepers (e.g. optuna) optimising the monitored metric
    return metrics.get(cfg.get("optimized_metric", "val/accuracy"))
