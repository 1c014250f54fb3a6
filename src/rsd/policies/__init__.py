"""Policies the LIBERO evaluation drives: the interface, harness policies, the engine policy, the registry.

- :mod:`rsd.policies.base`: :class:`ChunkPolicy` (what a rollout needs) and the evaluation modes;
- :mod:`rsd.policies.harness`: no-op, replay and scripted-expert policies (checks of the harness);
- :mod:`rsd.policies.engine_policy`: backbone -> speculative engine -> actions, and checkpoint discovery
  (imports torch; not imported here, so the evaluation's parent process stays light);
- :mod:`rsd.policies.registry`: spec dict -> policy (``build_policy``), used in every worker process.
"""

from rsd.policies.base import ENGINE_STAT_KEYS, EVAL_MODES, ChunkPolicy
from rsd.policies.harness import ExpertPolicy, NoopPolicy, ReplayPolicy
from rsd.policies.registry import FACTORIES, build_policy, resolve_policy_spec, spec_identity

__all__ = ["ENGINE_STAT_KEYS", "EVAL_MODES", "ChunkPolicy", "ExpertPolicy", "NoopPolicy", "ReplayPolicy",
           "FACTORIES", "build_policy", "resolve_policy_spec", "spec_identity"]
