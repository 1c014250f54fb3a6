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

#: Speculative acceptance rules of a decoding policy (``policy.acceptance``; docs/engine.md).
ACCEPTANCE_RULES = ("strict", "relaxed", "epsilon")
#: Early-exit rules (``policy.early_exit``); the same tuple as ``rsd.engine.rsd_engine.EXIT_RULES`` (kept here
#: so the entry points validate a config without importing torch; a test checks they agree).
EXIT_RULES = ("bound", "chance", "both")
#: ``policy.accelerate`` values (``rsd.engine.accelerate.ACCELERATE_MODES``, checked equal by a test).
ACCELERATE_MODES = ("eager", "compile", "cuda_graph")
#: Residual layers of the RFSQ tokens (``policy.depth`` is in 1..NUM_LAYERS; the engine re-checks against the
#: main model it is given).
NUM_LAYERS = 8
#: Decoding options the speculative and the baseline engine share (the baseline runs at the same depth).
DECODING_KEYS = ("depth", "early_exit", "exit_epsilon", "chance_entropy", "tail_bounds", "draft_layers")
#: Every decoding option of a decoding policy: the keys of its config group (conf/policy/engine.yaml) that go to
#: ``rsd.engine.RSDInferenceEngine`` under the same name (``acceptance`` is the engine's ``mode``).
#: ``baseline_depth`` is the baseline engine's own depth in ``mode=both`` (null: ``depth``), to compare depths paired.
ENGINE_OPTION_KEYS = ("acceptance", "delta", "tau", "epsilon", "accelerate", "adaptive", "baseline_depth",
                      *DECODING_KEYS)

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
