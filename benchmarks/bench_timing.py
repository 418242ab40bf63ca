"""Timing helpers shared by the benchmark scripts (CPU wall clock, CUDA events)."""

from __future__ import annotations

import math
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def best_cpu_times(fns: dict[str, Callable[[], object]], rounds: int,
                   before_each: Callable[[], object] | None = None) -> dict[str, float]:
    """Best wall-clock time of each function over ``rounds`` interleaved rounds, in seconds.

    Each function runs once to warm up, then once per round, in turn with the
    others: on a shared machine a slow spell then hits every column alike, so
    the ratios between columns stay fair even when absolute times drift. The
    order is shuffled anew each round (seeded, so runs repeat): a function that
    leaves many dirty cache lines behind (a large write with ordinary stores)
    slows whichever runs after it, as their write-back competes for memory
    bandwidth, and a fixed order would charge that to the same column every round.
    ``before_each`` (untimed) runs before every timed call, e.g. a :class:`CacheCleaner`
    that takes that write-back out of the next call's time altogether.
    """
    for fn in fns.values():
        fn()
    names = list(fns)
    best = dict.fromkeys(names, math.inf)
    order = random.Random(0)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            if before_each is not None:
                before_each()
            start = time.perf_counter()
            fns[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def cache_size_bytes(text: str) -> int | None:
    """A cache size as Linux writes it (``32768K``, ``1M``, ``512``) in bytes, or None if unreadable."""
    text = text.strip().upper()
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    scale = units.get(text[-1:], 1)
    digits = text[:-1] if text[-1:] in units else text
    return int(digits) * scale if digits.isdigit() else None


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """The largest CPU cache of CPU 0 as Linux reports it (``/sys/.../cache/index*/size``), else ``default``."""
    sizes = [cache_size_bytes(entry.read_text())
             for entry in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size")]
    return max((size for size in sizes if size), default=default)


class CacheCleaner:
    """Leaves the CPU caches clean: reads a buffer of twice the last-level cache.

    The read evicts every line that an earlier call left in cache; the dirty ones
    are written back then, during this untimed step, instead of during the next
    timed call. Without it, a call timed after a large write with ordinary stores
    paid for that write: the Numba scan at (512, 16384) measured 3.2-3.7 ms after
    ``torch.add(out=)`` or the reference, against 2.8-2.9 ms after itself.
    Inputs too large for the cache are not affected; smaller ones start cold.
    """

    def __init__(self) -> None:
        self._buffer = torch.ones(2 * last_level_cache_bytes() // 4)  # float32

    def __call__(self) -> float:
        return float(self._buffer.sum())


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
