"""The backbone interface: (observation, task instruction) -> one hidden state per sample.

Every backbone (privileged simulator state, a local Hugging Face VLM, OpenVLA) maps a batch of raw
environment observations (the dicts LIBERO's ``env.step`` / ``env.regenerate_obs_from_state`` return)
and their task instructions to a tensor ``[B, hidden_dim]``. The feature cache, the draft/main models
and the speculative engine depend only on this interface.

A backbone is rebuilt from its ``config()`` (a JSON-serialisable dict stored in the feature cache's
manifest), so evaluation computes exactly the features the models were trained on.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from typing import Any

import torch


class BackboneError(RuntimeError):
    """A backbone could not produce a feature; raised instead of substituting data."""


class Backbone(abc.ABC):
    """Maps ``(observations, instructions)`` to hidden states ``[B, hidden_dim]``.

    Subclasses set ``name`` (the registry name), implement ``encode`` and ``config``, and describe the
    feature in ``feature_definition`` (stored in the cache manifest).
    """

    #: registry name (``build_backbone(name)``), e.g. ``"sim_state"``
    name: str = ""
    #: whether ``encode`` reads camera images (False: the env can run without a renderer)
    needs_images: bool = False

    @property
    @abc.abstractmethod
    def hidden_dim(self) -> int:
        """Size D of the hidden state."""

    @property
    def backbone_id(self) -> str:
        """Identity of the feature (name plus what fixes its values, e.g. a model path or a seed)."""
        return self.name

    @property
    @abc.abstractmethod
    def feature_definition(self) -> str:
        """Human-readable definition of the hidden state (recorded in the cache manifest)."""

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @abc.abstractmethod
    def encode(self, observations: list[dict], instructions: list[str]) -> torch.Tensor:
        """``len(observations) == len(instructions) == B`` -> ``[B, hidden_dim]`` on ``device``."""

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-serialisable keyword arguments that rebuild this exact backbone (``from_config``)."""

    @classmethod
    def id_from_config(cls, cfg: Mapping[str, Any]) -> str | None:
        """The ``backbone_id`` that ``from_config(cfg)`` would have, computed cheaply (None: unknown)."""
        return None

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Backbone:
        """Rebuild from ``config()`` (extra keys such as ``name`` are ignored)."""
        kwargs = {k: v for k, v in dict(cfg).items() if k not in ("name", "_target_")}
        return cls(**kwargs)

    def __call__(self, observations: list[dict], instructions: list[str]) -> torch.Tensor:
        if len(observations) != len(instructions):
            raise ValueError(f"{len(observations)} observations but {len(instructions)} instructions")
        return self.encode(observations, instructions)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(id={self.backbone_id!r}, hidden_dim={self.hidden_dim})"
