"""Timing a GPU call with CUDA events, for the kernel tuners and the MoE engine choice."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

TIME_BUDGET_MS = 10.0  # measured calls per timing, after one warm-up call
MAX_REPS = 20


def time_ms(fn: Callable[[], object], device: torch.device, budget_ms: float = TIME_BUDGET_MS) -> float:
    """Mean ms of ``fn`` on the current stream: one warm-up call, then about ``budget_ms`` of calls
    (at most MAX_REPS); wall clock off CUDA (Triton's CPU interpreter)."""
    if device.type != "cuda":
        fn()
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()
    start.record()
    fn()
    end.record()
    end.synchronize()
    once = max(start.elapsed_time(end), 1e-3)
    reps = max(1, min(MAX_REPS, int(budget_ms / once)))
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps
