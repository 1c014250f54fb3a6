"""Hydra helpers shared by the entry points: resolvers, instantiation of callback/logger groups."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from rsd import PROJECT_ROOT

CONFIG_DIR = str(PROJECT_ROOT / "conf")


def register_resolvers() -> None:
    """``${rsd_root:}`` resolves to the repository root, so paths work from any working directory."""
    if not OmegaConf.has_resolver("rsd_root"):
        OmegaConf.register_new_resolver("rsd_root", lambda: str(PROJECT_ROOT))


register_resolvers()


def instantiate_group(group: DictConfig | None) -> list:
    """Instantiate every entry of a ``{name: {_target_: ...}}`` group (callbacks, loggers)."""
    from hydra.utils import instantiate

    if not group:
        return []
    objects = []
    for name, node in group.items():
        if isinstance(node, DictConfig) and "_target_" in node:
            obj = instantiate(node)
            if obj is not None:
                objects.append(obj)
        elif node is not None:
            raise ValueError(f"config entry '{name}' has no _target_: {node}")
    return objects


def find_latest_last_ckpt(log_dir: str | Path, task_name: str) -> Path | None:
    """The newest ``last.ckpt`` of a task's runs: what ``ckpt_path=auto`` resumes from."""
    runs = Path(log_dir) / task_name / "runs"
    candidates = sorted(runs.glob("*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def net_config(net: Any) -> dict:
    """A LightningModule's ``net`` argument (the constructor arguments of the ``nn.Module`` it trains) as a
    plain dict: every LightningModule of the package takes its model config this one way, and plain
    Python keeps its checkpoints loadable with ``weights_only=True``."""
    from omegaconf import DictConfig, OmegaConf

    if isinstance(net, DictConfig):
        net = OmegaConf.to_container(net, resolve=True)
    net = dict(net or {})
    net.pop("_target_", None)
    return net
