"""Per-chunk section timers: ``time.perf_counter`` on CPU, CUDA events (+ one synchronize) on GPU.

Usage::

    timer = make_timer(device)
    timer.start_chunk()
    with timer.section("draft"):
        ...
    with timer.section("main"):   # a section may be entered several times per chunk; times add up
        ...
    times = timer.end_chunk()     # {"draft": s, "main": s, "total": s} in seconds

On GPU, ``section`` only records events (no synchronization inside the decode loop); ``end_chunk``
synchronizes once and reads the elapsed times. ``total`` is the wall time from ``start_chunk`` to
``end_chunk`` (after that synchronize), so it includes everything the caller did in between.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import torch


class CpuTimer:
    """Wall-clock sections with ``time.perf_counter``."""

    def __init__(self) -> None:
        self._times: dict[str, float] = defaultdict(float)
        self._t0: float | None = None

    def start_chunk(self) -> None:
        self._times = defaultdict(float)
        self._t0 = time.perf_counter()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._times[name] += time.perf_counter() - t0

    def end_chunk(self) -> dict[str, float]:
        if self._t0 is None:
            raise RuntimeError("end_chunk() without start_chunk()")
        times = dict(self._times)
        times["total"] = time.perf_counter() - self._t0
        self._t0 = None
        return times


class CudaTimer(CpuTimer):
    """Sections timed with CUDA events on the current stream; one ``synchronize`` per chunk."""

    def __init__(self, device: torch.device | str) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    def start_chunk(self) -> None:
        self._pending = []
        torch.cuda.synchronize(self.device)
        super().start_chunk()

    @contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        try:
            yield
        finally:
            end.record()
            self._pending.append((name, start, end))

    def end_chunk(self) -> dict[str, float]:
        torch.cuda.synchronize(self.device)
        for name, start, end in self._pending:
            self._times[name] += start.elapsed_time(end) / 1e3
        self._pending = []
        return super().end_chunk()


def make_timer(device: torch.device | str | None = None) -> CpuTimer:
    """A :class:`CudaTimer` for a CUDA device, else a :class:`CpuTimer`."""
    if device is not None and torch.device(device).type == "cuda":
        return CudaTimer(device)
    return CpuTimer()


def time_calls(fn, iters: int, warmup: int, device: torch.device) -> dict:
    """Median / p10 / p90 milliseconds of ``fn()``, each call on its own: on CUDA, events around the call on
    an idle GPU, then a synchronize (the latency of one call, not the throughput of queued calls)."""
    for _ in range(warmup):
        fn()
    ms = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(iters)]
        for start, end in events:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
        ms = [s.elapsed_time(e) for s, e in events]
    else:
        for _ in range(iters):
            t0 = time.perf_counter()
            fn()
            ms.append(1e3 * (time.perf_counter() - t0))
    q = np.percentile(ms, [10, 90])
    return {"median": statistics.median(ms), "p10": float(q[0]), "p90": float(q[1])}
