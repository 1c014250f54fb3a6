"""rsd.engine: the speculative inference engine (draft proposes coarse layers, main verifies)."""

from rsd.engine.rsd_engine import (
    MODES,
    EngineOutput,
    EngineStats,
    RSDInferenceEngine,
    accepted_prefix_length,
    greedy_tokens,
    relaxed_accept,
    strict_accept,
)
from rsd.engine.timing import CpuTimer, CudaTimer, make_timer

__all__ = [
    "MODES",
    "CpuTimer",
    "CudaTimer",
    "EngineOutput",
    "EngineStats",
    "RSDInferenceEngine",
    "accepted_prefix_length",
    "greedy_tokens",
    "make_timer",
    "relaxed_accept",
    "strict_accept",
]
