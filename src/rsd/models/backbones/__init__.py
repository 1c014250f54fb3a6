"""Backbones: (observation, instruction) -> hidden state. ``build_backbone(name, **kwargs)`` is the registry.

- ``sim_state``: privileged simulator state through a fixed recorded transform (CPU, no rendering).
- ``hf_vlm``: a local transformers image-text-to-text model (``hidden_states[-1][:, -1]``, rsd.models.backbones.hf_vlm).
- ``openvla``: OpenVLA / OpenVLA-OFT from a local remote-code directory (rsd.models.backbones.openvla).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from rsd.models.backbones.base import Backbone, BackboneError
from rsd.models.backbones.hf_vlm import HFVLMBackbone, VLMBackboneError, check_hidden_dim
from rsd.models.backbones.openvla import OpenVLABackbone
from rsd.models.backbones.sim_state import SimStateBackbone

_PLANNED: dict[str, str] = {}
BACKBONES: dict[str, type[Backbone]] = {"sim_state": SimStateBackbone, "hf_vlm": HFVLMBackbone,
                                        "openvla": OpenVLABackbone}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Instantiate a registered backbone by name (kwargs as in its ``config()``)."""
    if name in BACKBONES:
        return BACKBONES[name].from_config(kwargs)
    if name in _PLANNED:
        raise NotImplementedError(
            f"backbone '{name}' ({_PLANNED[name]}) is not implemented yet; it is planned for a later issue. "
            f"Available now: {sorted(BACKBONES)} (e.g. backbone=sim_state).")
    raise ValueError(f"unknown backbone '{name}'; available: {sorted(BACKBONES)}, planned: {sorted(_PLANNED)}")


def backbone_from_config(cfg: Mapping[str, Any]) -> Backbone:
    """Rebuild from a config dict with a ``name`` key (a cache manifest's ``backbone.config``)."""
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"backbone config has no 'name': {sorted(cfg)}")
    return build_backbone(cfg.pop("name"), **cfg)


__all__ = ["Backbone", "BackboneError", "SimStateBackbone", "HFVLMBackbone", "OpenVLABackbone", "VLMBackboneError",
           "check_hidden_dim", "build_backbone", "backbone_from_config"]
