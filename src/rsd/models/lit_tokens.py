"""``TokenClassifierLitModule``: the shared base of the LightningModules that learn RFSQ tokens (the draft,
:mod:`rsd.models.lit_draft`, the main decoder, :mod:`rsd.models.lit_main`, and the VLA-LLM main model,
:mod:`rsd.models.lit_vla_llm`).

Why one base: they train an ``nn.Module`` on the same feature-cache batches, with the same input-width check,
the same step dispatch, AdamW with linear warm-up and cosine decay, the same per-layer epoch metrics and the
same data identity in their checkpoints; only the loss, the metrics, the parameter groups and the warm-up rule
differ.

``net`` is the network as Hydra composes it: the instantiated ``nn.Module`` (``net: {_target_: ...}`` in the
model config, as lightning-hydra-template injects it) or a mapping of its constructor arguments (tests, old
configs). Either way the hyperparameters keep the constructor arguments as plain Python, not the module: a
Lightning checkpoint then rebuilds its network by itself and loads with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterable, Mapping
from typing import Any, ClassVar

import lightning as L
import torch
from torch import nn

from rsd.models.layer_metrics import LayerTokenMetrics
from rsd.utils.config import net_config
from rsd.utils.schedules import warmup_cosine

log = logging.getLogger(__name__)


def constructor_keys(cls: type[nn.Module]) -> tuple[str, ...]:
    """The keyword arguments of ``cls.__init__`` (what a ``net`` mapping may hold)."""
    return tuple(k for k, p in inspect.signature(cls.__init__).parameters.items()
                 if k != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))


def constructor_defaults(cls: type[nn.Module]) -> dict[str, Any]:
    """The defaults of ``cls.__init__``'s keyword arguments."""
    return {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
            if k != "self" and p.default is not inspect.Parameter.empty}


def build_network(cls: type[nn.Module], net: nn.Module | Mapping[str, Any] | None) -> tuple[nn.Module, dict]:
    """``(module, constructor arguments)`` from an injected module or a mapping of arguments.

    An injected module must be a ``cls`` and carry ``config`` (its constructor arguments), the only way the
    checkpoint can rebuild it; unknown argument names are refused with the known ones listed."""
    if isinstance(net, nn.Module):
        if not isinstance(net, cls):
            raise TypeError(f"model.net must build a {cls.__name__}, got {type(net).__name__}")
        config = getattr(net, "config", None)
        if not isinstance(config, Mapping):
            raise TypeError(f"{type(net).__name__} has no `config` dict of its constructor arguments")
        return net, dict(config)
    args = net_config(net)
    unknown = sorted(set(args) - set(constructor_keys(cls)))
    if unknown:
        raise ValueError(f"model.net has unknown {cls.__name__} arguments {unknown}; known: "
                         f"{list(constructor_keys(cls))}")
    module = cls(**args)
    return module, dict(getattr(module, "config", None) or {**constructor_defaults(cls), **args})


def weight_decay_groups(named_parameters: Iterable[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """AdamW groups with weight decay on matrices only (not on norms, biases or embeddings); frozen
    parameters are left out."""
    decay, no_decay = [], []
    for name, p in named_parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embedding" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": float(weight_decay)}, {"params": no_decay, "weight_decay": 0.0}]


class TokenClassifierLitModule(L.LightningModule):
    """Base of the draft and main LightningModules (module docstring). Subclasses set ``network_class``,
    build the network with :meth:`_build_net`, expose it as :attr:`network` and implement ``_step``."""

    network_class: ClassVar[type[nn.Module]]
    #: where the network's constructor arguments go in a Lightning checkpoint (rebuilt without Hydra)
    checkpoint_config_key: ClassVar[str] = "net_config"

    def _build_net(self, net: nn.Module | Mapping[str, Any] | None, **hparams: Any) -> nn.Module:
        """Build (or take) the network and save the hyperparameters (``net`` = its constructor arguments)."""
        module, config = build_network(self.network_class, net)
        self.save_hyperparameters({"net": config, **hparams})
        return module

    @property
    def network(self) -> nn.Module:
        raise NotImplementedError

    def network_config(self) -> dict[str, Any]:
        """Constructor arguments of the network (stored in checkpoints and exports)."""
        return {**constructor_defaults(self.network_class), **dict(self.hparams.net)}

    # ------------------------------------------------------------------ data checks
    def setup(self, stage: str) -> None:
        """Refuse a feature cache whose hidden size is not the network's input width (before any step)."""
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dim = None
        if dm is not None and hasattr(dm, "hidden_dim"):
            try:
                dim = dm.hidden_dim
            except Exception as exc:  # noqa: BLE001 - the datamodule reports its own problem when it loads
                log.debug("could not read the datamodule's hidden_dim: %s", exc)
        width = int(self.network.input_dim)
        if dim is not None and int(dim) != width:
            raise ValueError(f"the feature cache has hidden states of size {int(dim)} but the "
                             f"{self.network_class.__name__} expects input_dim={width}; set "
                             f"model.net.input_dim={int(dim)} (or use the matching backbone)")

    # ------------------------------------------------------------------ steps
    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    def _layer_metrics(self) -> LayerTokenMetrics | None:
        """The per-layer token metrics a subclass registered as ``self.layer_metrics``, logged at each epoch's
        end (None: the subclass logs its own metrics with ``self.log``)."""
        metrics = self._modules.get("layer_metrics")
        return metrics if isinstance(metrics, LayerTokenMetrics) else None

    def on_train_epoch_end(self) -> None:
        if (metrics := self._layer_metrics()) is not None:
            metrics.log_epoch(self, "train")

    def on_validation_epoch_end(self) -> None:
        if (metrics := self._layer_metrics()) is None:
            return
        if self.trainer.sanity_checking:  # the sanity batches are not an epoch's result
            metrics.reset("val")
        else:
            metrics.log_epoch(self, "val")

    def on_test_epoch_end(self) -> None:
        if (metrics := self._layer_metrics()) is not None:
            metrics.log_epoch(self, "test")

    # ------------------------------------------------------------------ checkpoints carry the data identity
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None and hasattr(dm, "cache_identity"):
            try:
                checkpoint["cache_manifest"] = dm.cache_identity()
            except Exception as err:  # noqa: BLE001 - the checkpoint itself must still be written
                log.warning("could not record the cache identity in the checkpoint: %s", err)
        checkpoint[self.checkpoint_config_key] = self.network_config()

    # ------------------------------------------------------------------ optimisation
    def parameter_groups(self) -> Iterable[torch.nn.Parameter] | list[dict[str, Any]]:
        """What AdamW optimizes: by default the network's parameters as one group."""
        return self.network.parameters()

    def warmup_steps(self, total_steps: int) -> int:
        """Warm-up length for a run of ``total_steps`` optimizer steps: ``warmup_steps``, at most 10 % of the
        run (and at least one step), so a short run still spends most of its steps at a useful rate."""
        return max(min(int(self.hparams.warmup_steps), total_steps // 10), 1)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        opt = torch.optim.AdamW(self.parameter_groups(), lr=hp.lr, weight_decay=hp.weight_decay,
                                betas=tuple(float(b) for b in hp.betas))
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = warmup_cosine(opt, total, self.warmup_steps(total), hp.min_lr_ratio)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "frequency": 1}}
