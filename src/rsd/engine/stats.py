"""What an engine measured: per-chunk counts and section times (:class:`EngineStats`) and one call's result
(:class:`EngineOutput`). Acceptance is one definition everywhere: accepted drafted layers / drafted layers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

SECTIONS = ("backbone", "draft", "main", "check", "decode", "total")


@dataclass
class EngineStats:
    """Running statistics of an engine (sums; the properties give rates and per-chunk means).

    Counts are per sample (= per chunk at batch 1); times are per ``predict`` call. ``accepted_*``
    count accepted *drafted* layers (the bonus layer is not included).
    """

    num_layers: int = 8
    num_draft_layers: int = 3
    inferences: int = 0
    samples: int = 0
    drafted_layers: int = 0
    accepted_layers: int = 0
    accepted_per_layer: list[int] = field(default_factory=list)
    accepted_length_counts: list[int] = field(default_factory=list)
    main_calls: int = 0
    baseline_main_calls: int = 0
    unspeculated: int = 0  # chunks the adaptive strict mode decoded without the draft
    decoded_layers: int = 0  # sum over samples of the depth decoded (8 without depth / early exit)
    depth_counts: list[int] = field(default_factory=list)  # samples per decoded depth 0..num_layers
    time_s: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.accepted_per_layer:
            self.accepted_per_layer = [0] * self.num_draft_layers
        if not self.accepted_length_counts:
            self.accepted_length_counts = [0] * (self.num_draft_layers + 1)
        if not self.depth_counts:
            self.depth_counts = [0] * (self.num_layers + 1)

    def record(self, batch_size: int, drafted: int, accepted: int, main_calls: int,
               times: dict[str, float], depth: torch.Tensor | None = None) -> None:
        """One ``predict`` call: ``drafted``/``accepted`` layers per sample, ``main_calls`` for the batch,
        ``depth`` ``[B]`` the layers decoded per sample (``None``: all)."""
        self.inferences += 1
        self.samples += batch_size
        self.main_calls += main_calls
        self.baseline_main_calls += self.num_layers
        if depth is None:
            self.decoded_layers += self.num_layers * batch_size
            self.depth_counts[self.num_layers] += batch_size
        else:
            self.decoded_layers += int(depth.sum())
            for d, c in enumerate(torch.bincount(depth.cpu(), minlength=self.num_layers + 1).tolist()):
                self.depth_counts[d] += c
        if drafted:
            self.drafted_layers += drafted * batch_size
            self.accepted_layers += accepted * batch_size
            for i in range(accepted):
                self.accepted_per_layer[i] += batch_size
            self.accepted_length_counts[accepted] += batch_size
        for k, v in times.items():
            self.time_s[k] = self.time_s.get(k, 0.0) + v

    @property
    def acceptance_rate(self) -> float:
        """Accepted drafted layers / drafted layers (NaN when nothing was drafted)."""
        return self.accepted_layers / self.drafted_layers if self.drafted_layers else math.nan

    @property
    def mean_accepted_length(self) -> float:
        """Mean number of accepted drafted layers per chunk (0..3; the bonus layer not counted)."""
        drafted_samples = sum(self.accepted_length_counts)
        return self.accepted_layers / drafted_samples if drafted_samples else math.nan

    @property
    def per_layer_acceptance(self) -> list[float]:
        """Fraction of drafted chunks whose drafted layer ``i`` was accepted (implies all ``< i`` were)."""
        drafted_samples = sum(self.accepted_length_counts)
        return [c / drafted_samples if drafted_samples else math.nan for c in self.accepted_per_layer]

    @property
    def main_steps_saved(self) -> int:
        """Sequential main calls saved against the baseline's 8 per chunk (total)."""
        return self.baseline_main_calls - self.main_calls

    @property
    def main_calls_per_chunk(self) -> float:
        return self.main_calls / self.inferences if self.inferences else math.nan

    @property
    def mean_depth(self) -> float:
        """Mean number of RFSQ layers decoded per sample (``depth`` / early exit; 8 otherwise)."""
        return self.decoded_layers / self.samples if self.samples else math.nan

    def ms_per_chunk(self, section: str) -> float:
        """Mean milliseconds per ``predict`` call spent in ``section`` (0 if never entered)."""
        return 1e3 * self.time_s.get(section, 0.0) / self.inferences if self.inferences else math.nan

    def summary(self) -> dict:
        """Plain-python summary (what evaluations log)."""
        out = {
            "inferences": self.inferences,
            "samples": self.samples,
            "drafted_layers": self.drafted_layers,
            "accepted_layers": self.accepted_layers,
            "acceptance_rate": self.acceptance_rate,
            "mean_accepted_length": self.mean_accepted_length,
            "per_layer_acceptance": self.per_layer_acceptance,
            "accepted_length_counts": list(self.accepted_length_counts),
            "main_calls": self.main_calls,
            "main_calls_per_chunk": self.main_calls_per_chunk,
            "main_steps_saved": self.main_steps_saved,
            "unspeculated_chunks": self.unspeculated,
            "mean_depth": self.mean_depth,
            "depth_counts": list(self.depth_counts),
        }
        for s in SECTIONS:
            out[f"{s}_ms_per_chunk"] = self.ms_per_chunk(s)
        return out


@dataclass
class EngineOutput:
    """One ``predict`` call: tokens ``[B, 8, 128]``, codes ``[B, 8, 16, 8]``, actions ``[B, 8, 7]``."""

    tokens: torch.Tensor
    codes: torch.Tensor
    actions: torch.Tensor | None
    mode: str
    main_calls: int
    accepted_length: int | None = None  # effective accepted drafted layers (batch minimum)
    sample_accepted_length: torch.Tensor | None = None  # [B] per sample, before taking the minimum
    drafted: torch.Tensor | None = None  # [B, n, 128] (the drafted layers that were verified)
    times: dict[str, float] = field(default_factory=dict)  # seconds, this call
    depth: torch.Tensor | None = None  # [B] layers decoded per sample; the rest hold the centre level
