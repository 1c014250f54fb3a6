"""rsd.engine: the speculative inference engine (draft proposes coarse layers, main verifies)."""

from rsd.engine.acceptance import accepted_prefix_length, relaxed_accept, strict_accept
from rsd.engine.rsd_engine import MODES, RSDInferenceEngine, greedy_tokens
from rsd.engine.stats import EngineOutput, EngineStats
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
