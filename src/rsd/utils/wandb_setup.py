"""Weights & Biases that never prompts or hangs: online with a key and network, offline otherwise."""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from omegaconf import OmegaConf

log = logging.getLogger(__name__)


def _has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def _wandb_reachable(timeout: float = 2.0) -> bool:
    try:
        socket.create_connection(("api.wandb.ai", 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def resolve_wandb_mode(mode: str | None = None) -> str:
    """``mode`` wins, then ``$WANDB_MODE``; else online only when a key and the network are there."""
    mode = mode or os.environ.get("WANDB_MODE")
    if mode:
        return mode
    return "online" if _has_api_key() and _wandb_reachable() else "offline"


def make_wandb_logger(project: str, group: str | None, tags: list | None, save_dir: str,
                      mode: str | None = None, config: dict | None = None, **kwargs):
    """A ``WandbLogger`` in a mode that works on this machine; says how to sync an offline run."""
    from lightning.pytorch.loggers import WandbLogger

    mode = resolve_wandb_mode(mode)
    os.environ["WANDB_MODE"] = mode
    os.environ.setdefault("WANDB_SILENT", "true")
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    if mode == "offline":
        log.info("W&B offline (no API key or no network). Upload later with: wandb sync %s/wandb/offline-run-*",
                 save_dir)
    tags = list(OmegaConf.to_container(tags, resolve=True)) if OmegaConf.is_config(tags) else list(tags or [])
    return WandbLogger(project=project, group=group, tags=tags, save_dir=save_dir, mode=mode,
                       config=config, **kwargs)
