"""What the fit-end export callbacks share: the best checkpoint of the run and the fit's duration.

The exported files come from the best checkpoint that ``ModelCheckpoint`` kept, not from the last
weights; without one (e.g. ``fast_dev_run``, no validation) they fall back to the final weights.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning as L

from rsd.utils.serialization import load_torch_file

log = logging.getLogger(__name__)


def best_checkpoint(trainer: L.Trainer) -> tuple[str, float | None]:
    """``(path, score)`` of the checkpoint callback's best checkpoint; path ``""`` when no such file exists."""
    cb = trainer.checkpoint_callback
    best = getattr(cb, "best_model_path", "") if cb is not None else ""
    score = getattr(cb, "best_model_score", None) if cb is not None else None
    if not (best and Path(best).is_file()):
        best = ""
    return best, None if score is None else float(score)


class BestCheckpointExport(L.Callback):
    """Base of the callbacks that write a model file at the end of fit from the best checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self._t0: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0 = time.time()

    def train_seconds(self) -> float | None:
        """Seconds since the fit started (None when ``on_fit_start`` did not run)."""
        return None if self._t0 is None else time.time() - self._t0

    @staticmethod
    def read_best_checkpoint(trainer: L.Trainer, map_location: Any = "cpu") -> tuple[str, float | None, dict | None]:
        """``(path, score, checkpoint dict)`` of the run's best checkpoint (``""``, score, None without one)."""
        best, score = best_checkpoint(trainer)
        ckpt = load_torch_file(best, map_location, what="Lightning checkpoint") if best else None
        return best, score, ckpt

    def load_best_weights(self, trainer: L.Trainer, pl_module: L.LightningModule) -> tuple[str, float | None]:
        """Load the best checkpoint's weights into ``pl_module`` -> ``(path, score)``; path ``""``: final weights."""
        name = type(self).__name__
        best, score, ckpt = self.read_best_checkpoint(trainer, pl_module.device)
        if ckpt is not None:
            pl_module.load_state_dict(ckpt["state_dict"])
            log.info("%s: weights from best checkpoint %s", name, best)
        else:
            log.warning("%s: no best checkpoint; exporting the final weights", name)
        return best, score
