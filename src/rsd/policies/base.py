"""The policy interface that the LIBERO evaluation drives.

The harness (``rsd.eval.rollout`` / ``rsd.eval.runner``) only knows :class:`ChunkPolicy`: ``reset`` at the
start of an episode, ``act`` whenever the previous action chunk has been executed. Policies are built
from specs by :mod:`rsd.policies.registry`.

Conventions of ``act``:
- ``obs`` is the raw LIBERO observation dict (images, when rendered, are upside down as LIBERO gives
  them: flipping ``[::-1, ::-1]`` and resizing is the policy's/backbone's job).
- policies that read privileged simulator state may define ``bind_env(env)``; the rollout calls it
  before every episode.
- it returns ``(actions [T, 7] in env units, stats)``; the harness executes the T steps open loop and
  binarizes the gripper. ``stats`` holds numbers about this inference (engine statistics, see
  :data:`ENGINE_STAT_KEYS`); they are summed over the episode.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from rsd.envs.libero_env import TaskSpec

#: How an evaluation episode decodes: with the draft (``speculative``) or the main model alone
#: (``baseline``). Not to be confused with the engine's acceptance rules (``rsd.engine``).
EVAL_MODES = ("speculative", "baseline")

#: Per-inference statistics the summary knows how to report (others are summed and kept as they are).
#: Times in milliseconds; layer counts are per chunk.
ENGINE_STAT_KEYS = (
    "backbone_ms", "draft_ms", "main_ms", "check_ms", "decode_ms", "engine_ms",
    "drafted_layers", "accepted_layers", "main_steps", "main_steps_saved", "decoded_layers",
)


@runtime_checkable
class ChunkPolicy(Protocol):
    """What the rollout needs from a policy."""

    #: True when the policy reads camera images (the env is then built with its renderer on).
    needs_images: bool

    def reset(self, task: TaskSpec, mode: str, trial: int) -> None:
        """Start trial ``trial`` of ``task`` (init state ``trial``); ``mode`` is ``speculative`` or
        ``baseline`` (ignored by policies without an engine). A stochastic policy should seed from
        ``(task.task_id, trial)`` so results do not depend on which worker runs the episode."""

    def act(self, obs: dict, instruction: str) -> tuple[np.ndarray, dict]:
        """One inference: ``(actions [T, 7], stats)``."""
