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

BACKBONES: dict[str, type[Backbone]] = {"sim_state": SimStateBackbone, "hf_vlm": HFVLMBackbone,
                                        "openvla": OpenVLABackbone}


def build_backbone(name: str, **kwargs: Any) -> Backbone:
    """Instantiate a registered backbone by name (kwargs as in its ``config()``)."""
    if name in BACKBONES:
        return BACKBONES[name].from_config(kwargs)
    raise ValueError(f"unknown backbone '{name}'; available: {sorted(BACKBONES)}")


def backbone_from_config(cfg: Mapping[str, Any]) -> Backbone:
    """Rebuild from a config dict with a ``name`` key (a cache manifest's ``backbone.config``)."""
    cfg = dict(cfg)
    if "name" not in cfg:
        raise ValueError(f"backbone config has no 'name': {sorted(cfg)}")
    return build_backbone(cfg.pop("name"), **cfg)


def backbone_from_manifest(manifest: Mapping[str, Any]) -> Backbone:
    """Rebuild the exact backbone a feature cache was built with (what evaluation must use) from the cache's
    manifest (``rsd.data.cache.read_manifest``); ``BackboneError`` when the rebuilt identity differs."""
    bb = backbone_from_config(manifest["backbone"]["config"])
    if bb.backbone_id != manifest["backbone"]["id"]:
        raise BackboneError(f"rebuilt backbone {bb.backbone_id} differs from the cache's "
                            f"{manifest['backbone']['id']}")
    return bb


def requested_backbone_id(backbone_cfg: Mapping[str, Any]) -> str | None:
    """The ``backbone_id`` a backbone config would produce, without building the backbone (None: unknown)."""
    cfg = dict(backbone_cfg)
    cls = BACKBONES.get(cfg.pop("name", ""))
    return None if cls is None else cls.id_from_config(cfg)


__all__ = ["Backbone", "BackboneError", "SimStateBackbone", "HFVLMBackbone", "OpenVLABackbone", "VLMBackboneError",
           "check_hidden_dim", "build_backbone", "backbone_from_config", "backbone_from_manifest",
           "requested_backbone_id"]
