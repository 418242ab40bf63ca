"""Timing helpers shared by the benchmark scripts (CPU wall clock, CUDA events)."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import torch


def best_cpu_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall-clock time of each function over ``rounds`` interleaved rounds, in seconds.

    Each function runs once to warm up, then once per round, in turn with the
    others: on a shared machine a slow spell then hits every column alike, so
    the ratios between columns stay fair even when absolute times drift.
    """
    for fn in fns.values():
        fn()
    best = dict.fromkeys(fns, math.inf)
    for _ in range(rounds):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def best_cpu_time(fn: Callable[[], object], reps: int) -> float:
    """Best of ``reps`` wall-clock runs after one warm-up, in seconds."""
    return best_cpu_times({"fn": fn}, reps)["fn"]


def cuda_median_ms(fn: Callable[[], object], reps: int, warmup: int = 2) -> float:
    """Median of ``reps`` CUDA-event timings after ``warmup`` runs, in milliseconds."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_time_and_peak(fn: Callable[[], object], reps: int) -> tuple[float, int]:
    """Median CUDA-event milliseconds, and the peak bytes one call allocates beyond what was live."""
    ms = cuda_median_ms(fn, reps)
    torch.cuda.reset_peak_memory_stats()
    live = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return ms, torch.cuda.max_memory_allocated() - live
