"""Timing helpers shared by the benchmark scripts (CPU wall clock, CUDA events)."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable

import torch


def best_cpu_times(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall-clock time of each function over ``rounds`` interleaved rounds, in seconds.

    Each function runs once to warm up, then once per round, in turn with the
    others: on a shared machine a slow spell then hits every column alike, so
    the ratios between columns stay fair even when absolute times drift. The
    order is shuffled anew each round (seeded, so runs repeat): a function that
    leaves many dirty cache lines behind (a large write with ordinary stores)
    slows whichever runs after it, as their write-back competes for memory
    bandwidth, and a fixed order would charge that to the same column every round.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    best = dict.fromkeys(names, math.inf)
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            start = time.perf_counter()
            fns[name]()
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
