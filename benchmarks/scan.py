"""Benchmark of :func:`psmsearch.kernels.first_order_scan` with diagonal gates.

"Diagonal" means one gate per state element: ``a`` has ``b``'s shape, i.e. the
transition matrix of the flattened state is diagonal.

CPU part, ``b = a = [1, T, rows]`` float32 at (rows, T) in
{(16, 65536), (512, 16384), (2048, 4096)}: the PyTorch reference and the
compiled CPU kernels (numba, the CPU default from 64 steps on) against

* a Python token-by-token loop (timed on a prefix of T and extrapolated
  linearly when T is long; the table says so),
* ``torch._higher_order_ops.associative_scan(..., combine_mode="generic")``,
* a plain copy of the same bytes (``b.clone()``, the memory floor, paying for a
  fresh allocation), and, for reference, ``copy_`` into a preallocated buffer,
* ``a + b``, fresh and into a preallocated buffer: the same bytes as the scan
  (two tensors read, one written), by PyTorch on all threads, and
  ``a + b`` streamed (:mod:`memory_floor`): one thread, the result written with
  non-temporal stores exactly as the numba scan writes its own, so it moves
  the fewest bytes any scan can. ``loop/(a+b streamed)`` is the most a scan
  that makes one pass on one thread can gain over the loop in that run (a
  second thread raised read bandwidth by about 7% on the 2-core machine we
  measured: 31 to 33 GB/s).

The numba kernels are also timed writing into a preallocated output ("numba
kernel") and with the CPU output-buffer cache off ("numba fresh"). As called,
the kernels take their large outputs from :mod:`psmsearch.kernels.cpu_buffer_cache`,
which hands out the memory of freed outputs again, already faulted in, as a
training loop sees it from its second step on; "numba fresh" is a first call:
a new mapping whose pages the OS faults in and zeroes. Turning the cache off
unmaps the idle buffer the previous call left, so "numba fresh" is timed in
rounds of its own after the others: interleaved with them, it left "numba" a
fresh mapping in most rounds (at (512, 16384), 2.11 ms as called beside a
1.87 ms kernel, against 1.94 ms timed without it, 2026-11-30). ``clone`` and ``a + b`` allocate
through PyTorch, fresh each time. Every CPU figure is a best-of: the
scans and both copies over 15 interleaved rounds in shuffled order (see :func:`_cpu_times`), the
loop over 3 runs. Before each timed call of the first table the caches are left
clean (:class:`bench_timing.CacheCleaner`), so that no column pays for the
write-back of the dirty lines the previous one left; ``--warm-caches`` skips
that step (the column order alone then decides who pays). The table ends with the issue's targets at (512, 16384):
``loop/numba`` >= 50x and ``numba/copy`` <= 4x, met or not on the run at hand.

``--model-sizes`` adds a second CPU table: numba against the reference at the
shapes an affine aggregator scans in training (``[B, T, H, dk, dv]`` states with
scalar or per-key-channel gates, T = number of chunks), forward and
forward+backward. It is what ``MIN_COMPILED_CPU_STEPS`` in
:mod:`psmsearch.kernels.first_order_scan` rests on.

CUDA part (when available), ``b = a = [8, T, 1536]`` for T = 2^10 .. 2^16, float32
and bfloat16, forward and forward+backward: Triton and the reference, timed with
CUDA events, as GB/s of the bytes each pass must move and as a percentage of the
measured device-to-device copy bandwidth.

Huge pages: a fresh 32 MiB CPU tensor costs 8192 page faults of 4 KiB the first
time it is written, which at (512, 16384) took about 8 ms, far more than
copying the bytes. "numba fresh" and ``b.clone()`` both pay for a fresh
result, so that comparison stays fair only if both get the same pages. The
kernels put their own large outputs in huge pages
(:func:`psmsearch.kernels._dispatch.huge_page_buffer`), ``clone`` does not. Run as a script, the benchmark therefore sets ``THP_MEM_ALLOC_ENABLE=1`` before
importing torch, unless the variable is already set or ``--no-thp`` is given
(which sets it to 0): PyTorch's CPU allocator then aligns allocations of 2 MiB
or more to 2 MiB and ``madvise``-s them into transparent huge pages, which
works where the kernel's THP mode is ``always`` or ``madvise``. The CPU table
header says whether it is on, the kernel's mode, and how many MiB of huge
pages a fresh 32 MiB tensor actually got (read from ``/proc/self/smaps_rollup``).
Two side effects show in the table: allocations of 2 to 4 MiB (the whole
tensor at 16 rows, the scan's carry buffers at 512 and 2048 rows) are no
longer served again from malloc's heap but freshly mapped, so they cost more
than without THP; and on a virtual machine a huge-page fault can stall for
milliseconds, so the clone column varies more from run to run than without THP.

Usage: ``python benchmarks/scan.py [--cpu-only | --cuda-only] [--quick] [--model-sizes] [--json] [--threads N] [--no-thp]
[--warm-caches]``.
On a CPU shared with other jobs, ``--threads 1`` gives steadier figures: two
threads that wait on each other at every op suffer most from preemption.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

THP_ENV = "THP_MEM_ALLOC_ENABLE"


def configure_thp(argv: list[str]) -> None:
    """Ask PyTorch's CPU allocator for transparent huge pages unless told otherwise.

    Torch reads ``THP_MEM_ALLOC_ENABLE`` once, at its first allocation, so this
    must run before torch is imported. An explicit ``--no-thp`` sets it to 0; a
    value the user already set is kept.
    """
    if "--no-thp" in argv:
        os.environ[THP_ENV] = "0"
    else:
        os.environ.setdefault(THP_ENV, "1")


if __name__ == "__main__":
    configure_thp(sys.argv[1:])

import torch  # noqa: E402

from bench_cli import device_benchmark_parser, print_saved  # noqa: E402
from bench_timing import best_cpu_time as _cpu_time  # noqa: E402
from bench_timing import CacheCleaner  # noqa: E402
from bench_timing import best_cpu_times as _cpu_times  # noqa: E402
from bench_timing import cuda_median_ms as _cuda_time  # noqa: E402

from psmsearch.kernels import _dispatch, cpu_buffer_cache, first_order_scan  # noqa: E402

CPU_SHAPES = ((16, 65536), (512, 16384), (2048, 4096))
TARGET_SHAPE = (512, 16384)  # (rows, T) of the CPU targets
LOOP_PREFIX = 2048
# B, T, H, dk, dv: aggregator-sized scans, then one long scan of the target's 512 state elements per step
MODEL_SHAPES = ((16, 16, 4, 32, 32), (16, 32, 4, 32, 32), (32, 64, 4, 16, 16), (8, 256, 2, 16, 16), (1, 16384, 8, 8, 8))
CUDA_BATCH, CUDA_WIDTH = 8, 1536
CUDA_EXPONENTS, CUDA_EXPONENTS_QUICK = tuple(range(10, 17)), (10, 13, 16)
Row = dict[str, Any]


def _token_loop(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The naive baseline: one Python step per token, each vectorised over rows."""
    state = torch.zeros_like(b[:, 0])
    out = torch.empty_like(b)
    for t in range(b.shape[1]):
        state = a[:, t] * state + b[:, t]
        out[:, t] = state
    return out


def _affine_combine(left: tuple[torch.Tensor, torch.Tensor],
                    right: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    return right[0] * left[0], right[0] * left[1] + right[1]


def _torch_associative_scan(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    from torch._higher_order_ops import associative_scan

    return associative_scan(_affine_combine, (a, b), dim=1, combine_mode="generic")[1]


def _time_associative_scan(a: torch.Tensor, b: torch.Tensor, reps: int) -> tuple[float | None, str]:
    try:
        return _cpu_time(lambda: _torch_associative_scan(a, b), reps), ""
    except Exception as exc:  # report why it does not run instead of failing the benchmark
        return None, f"n/a: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"


def _numba_kernel_into(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> Callable[[], object]:
    """The numba forward kernel alone, writing into the preallocated ``out`` (no allocation, no dispatch)."""
    from psmsearch.kernels import first_order_scan_numba as compiled

    start = torch.zeros(b.shape[0], b.shape[2])
    args = (a.numpy(), b.numpy(), start.numpy(), out.numpy(), False, compiled._block_rows(b.shape[2]),
            compiled.streams_output(out, reverse=False, full_gates=True), 0, b.shape[0])
    return lambda: compiled._forward_items(*args)


def _fresh_numba_call(a: torch.Tensor, b: torch.Tensor) -> Callable[[], object]:
    """The numba scan as called, with the output-buffer cache off: a first call's fresh output mapping."""
    return lambda: _without_buffer_cache(lambda: first_order_scan(a, b, backend="numba"))


def _without_buffer_cache(fn: Callable[[], object]) -> object:
    """Run ``fn`` with the CPU output-buffer cache off: its outputs are fresh mappings, faulted in anew."""
    limit = cpu_buffer_cache.stats().idle_limit_bytes
    cpu_buffer_cache.set_idle_limit(0)
    try:
        return fn()
    finally:
        cpu_buffer_cache.set_idle_limit(limit)


def _kernel_thp_mode() -> str:
    """The kernel's THP mode (``always``, ``madvise`` or ``never``), or ``unknown``."""
    try:
        text = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return "unknown"
    chosen = [word.strip("[]") for word in text.split() if word.startswith("[")]
    return chosen[0] if chosen else "unknown"


def _anon_huge_kib() -> int | None:
    """Anonymous huge-page memory of this process in KiB, or None where Linux does not say."""
    try:
        lines = Path("/proc/self/smaps_rollup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return None


def thp_status() -> dict[str, Any]:
    """Whether huge pages were requested and whether a fresh 32 MiB tensor really got them."""
    before = _anon_huge_kib()
    probe = torch.empty(8 * 2 ** 20)  # 32 MiB of float32, like the benchmark's tensors
    probe.fill_(1.0)  # fault every page in
    after = _anon_huge_kib()
    del probe
    huge_mib = None if before is None or after is None else (after - before) / 1024
    return {"env": os.environ.get(THP_ENV), "kernel_mode": _kernel_thp_mode(), "probe_huge_mib": huge_mib}


def _thp_line(thp: dict[str, Any]) -> str:
    """One line for the table header: is THP allocation on, and did it take effect."""
    requested = (thp["env"] or "0").strip().lower() in ("1", "true", "on", "yes")
    huge = thp["probe_huge_mib"]
    if not requested:
        state = "off"
    elif huge is None:
        state = "requested (not verifiable here)"
    else:
        state = "on" if huge > 0 else "requested but not in effect"
    got = "n/a" if huge is None else f"{huge:.0f} MiB"
    return (f"THP allocation {state} ({THP_ENV}={thp['env']}, kernel THP mode {thp['kernel_mode']}, "
            f"huge pages in a fresh 32 MiB tensor: {got})")


def cpu_rows(quick: bool, clean_caches: bool = True) -> list[Row]:
    """Time the CPU variants at every CPU shape (caches left clean before each timed call unless told not to)."""
    reps, loop_reps = (3, 1) if quick else (15, 3)
    before_each = CacheCleaner() if clean_caches else None
    rows = []
    for width, steps in CPU_SHAPES:
        gen = torch.Generator().manual_seed(0)
        a = torch.rand(1, steps, width, generator=gen) * 0.5 + 0.5
        b = torch.randn(1, steps, width, generator=gen)
        prefix = min(steps, LOOP_PREFIX)
        loop_s = _cpu_time(lambda: _token_loop(a[:, :prefix], b[:, :prefix]), loop_reps) * steps / prefix
        dst, kernel_out = torch.empty_like(b), torch.empty_like(b)
        fns: dict[str, Callable[[], object]] = {
            "reference": lambda: first_order_scan(a, b, backend="reference"),
            "clone": lambda: b.clone(),
            "prealloc": lambda: dst.copy_(b),
            "add": lambda: torch.add(a, b),
            "add_prealloc": lambda: torch.add(a, b, out=dst),
        }
        if _dispatch.numba_available():
            from memory_floor import streamed_add

            floor_out = torch.empty_like(b)
            fns["add_streamed"] = lambda: streamed_add(a, b, floor_out)
            fns["numba"] = lambda: first_order_scan(a, b, backend="numba")
            fns["numba_kernel"] = _numba_kernel_into(a, b, kernel_out)
        times = _cpu_times(fns, reps, before_each)
        if _dispatch.numba_available():  # in rounds of its own: turning the cache off empties it (see above)
            times.update(_cpu_times({"numba_fresh": _fresh_numba_call(a, b)}, reps, before_each))
        ref_s, clone_s, copy_s, add_s = times["reference"], times["clone"], times["prealloc"], times["add"]
        numba_s, kernel_s, fresh_s = times.get("numba"), times.get("numba_kernel"), times.get("numba_fresh")
        floor_s = times.get("add_streamed")
        assoc_s, assoc_note = _time_associative_scan(a, b, 1 if quick else 2)
        rows.append({
            "rows": width, "T": steps, "reference_ms": ref_s * 1e3,
            "numba_ms": _ms(numba_s), "numba_kernel_ms": _ms(kernel_s), "numba_fresh_ms": _ms(fresh_s),
            "loop_ms": loop_s * 1e3, "loop_extrapolated_from": prefix if prefix < steps else None,
            "assoc_scan_ms": None if assoc_s is None else assoc_s * 1e3, "assoc_scan_note": assoc_note,
            "copy_clone_ms": clone_s * 1e3, "copy_prealloc_ms": copy_s * 1e3,
            "loop_over_reference": loop_s / ref_s, "reference_over_copy": ref_s / clone_s,
            "reference_over_prealloc_copy": ref_s / copy_s, "assoc_scan_over_reference": _ratio(assoc_s, ref_s),
            "loop_over_numba": _ratio(loop_s, numba_s), "numba_over_copy": _ratio(numba_s, clone_s),
            "loop_over_numba_kernel": _ratio(loop_s, kernel_s), "loop_over_numba_fresh": _ratio(loop_s, fresh_s),
            "add_ms": add_s * 1e3, "add_prealloc_ms": times["add_prealloc"] * 1e3,
            "loop_over_add": loop_s / add_s, "numba_over_add": _ratio(numba_s, add_s),
            "numba_kernel_over_add_prealloc": _ratio(kernel_s, times["add_prealloc"]),
            "add_streamed_ms": _ms(floor_s), "loop_over_add_streamed": _ratio(loop_s, floor_s),
            "numba_over_add_streamed": _ratio(numba_s, floor_s),
            "numba_kernel_over_add_streamed": _ratio(kernel_s, floor_s),
        })
    return rows


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _ratio(num: float | None, den: float | None) -> float | None:
    """``num / den``, None where either was not measured."""
    return None if num is None or den is None else num / den


def model_rows(quick: bool) -> list[Row]:
    """Numba against the reference at aggregator-sized scans and one long one, forward and forward+backward."""
    reps = 3 if quick else 10
    rows = []
    for batch, steps, heads, dk, dv in MODEL_SHAPES:
        for gate, gate_shape in (("scalar", (heads, 1, 1)), ("diagonal", (heads, dk, 1))):
            gen = torch.Generator().manual_seed(0)
            a = (torch.rand(batch, steps, *gate_shape, generator=gen) * 0.5 + 0.5).requires_grad_()
            b = torch.randn(batch, steps, heads, dk, dv, generator=gen).requires_grad_()
            upstream = torch.randn(b.shape, generator=gen)
            fns: dict[str, Callable[[], object]] = {}
            for backend in ("reference", "numba"):
                fns[f"{backend} fwd"] = lambda be=backend: first_order_scan(a.detach(), b.detach(), backend=be)
                fns[f"{backend} fwd+bwd"] = lambda be=backend: torch.autograd.grad(
                    first_order_scan(a, b, backend=be), (a, b), upstream)
            times = _cpu_times(fns, reps)
            for kind in ("fwd", "fwd+bwd"):
                ref_s, numba_s = times[f"reference {kind}"], times[f"numba {kind}"]
                rows.append({"B": batch, "T": steps, "state": f"{heads}x{dk}x{dv}", "gate": gate, "pass": kind,
                             "reference_ms": ref_s * 1e3, "numba_ms": numba_s * 1e3,
                             "reference_over_numba": ref_s / numba_s})
    return rows


def print_model_table(rows: list[Row]) -> None:
    print("CPU, aggregator-sized scans and one long scan [B, T, H, dk, dv], float32: numba against the reference")
    print("B | T | state | gate | pass | reference ms | numba ms | ref/numba")
    for r in rows:
        print(f"{r['B']} | {r['T']} | {r['state']} | {r['gate']} | {r['pass']} | {r['reference_ms']:.2f} | "
              f"{r['numba_ms']:.2f} | {r['reference_over_numba']:.2f}x")


def _fmt(value: float | None, spec: str = ".2f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_cpu_table(rows: list[Row], threads: int | None = None, thp: dict[str, Any] | None = None,
                    clean_caches: bool | None = None) -> None:
    threads = torch.get_num_threads() if threads is None else threads
    caches = {True: ", caches left clean before each timed call", False: ", warm caches (--warm-caches)",
              None: ""}[clean_caches]
    print(f"CPU, diagonal gates, float32, torch threads = {threads}{caches}")
    if thp is not None:
        print(_thp_line(thp))
    header = ("rows", "T", "reference ms", "numba ms", "numba fresh ms", "numba kernel ms", "token loop ms",
              "assoc_scan ms", "copy (clone) ms", "copy_ prealloc ms", "loop/ref", "loop/numba", "loop/numba fresh",
              "loop/numba kernel", "ref/copy", "numba/copy", "ref/copy_", "assoc_scan/ref")
    print(" | ".join(header))
    for r in rows:
        loop = _fmt(r["loop_ms"], ".1f") + ("*" if r["loop_extrapolated_from"] else "")
        assoc = _fmt(r["assoc_scan_ms"], ".1f") if r["assoc_scan_ms"] is not None else r["assoc_scan_note"]
        print(" | ".join([str(r["rows"]), str(r["T"]), _fmt(r["reference_ms"]), _fmt(r.get("numba_ms")),
                          _fmt(r.get("numba_fresh_ms")), _fmt(r.get("numba_kernel_ms")), loop, assoc,
                          _fmt(r["copy_clone_ms"]), _fmt(r["copy_prealloc_ms"]),
                          _fmt(r["loop_over_reference"], ".1f") + "x",
                          _fmt(r.get("loop_over_numba"), ".1f") + "x",
                          _fmt(r.get("loop_over_numba_fresh"), ".1f") + "x",
                          _fmt(r.get("loop_over_numba_kernel"), ".1f") + "x",
                          _fmt(r["reference_over_copy"], ".2f") + "x",
                          _fmt(r.get("numba_over_copy"), ".2f") + "x",
                          _fmt(r["reference_over_prealloc_copy"], ".2f") + "x",
                          "n/a" if r.get("assoc_scan_over_reference") is None
                          else _fmt(r["assoc_scan_over_reference"], ".1f") + "x"]))
    if any(r["loop_extrapolated_from"] for r in rows):
        print(f"* token loop timed on the first {LOOP_PREFIX} steps and extrapolated linearly to T")
    print("reference, numba: as called, their outputs from the buffer cache (a freed output's memory, "
          "already faulted in); numba fresh: the cache off, every output a fresh mapping that is faulted "
          "in and zeroed by the OS; numba kernel: the numba forward writing into a preallocated output; "
          "ref/copy, numba/copy: over copy (clone), which allocates its result through PyTorch; "
          "ref/copy_: over copy_ into a preallocated buffer")
    for r in rows:
        if (r["rows"], r["T"]) == TARGET_SHAPE and r.get("loop_over_numba") is not None:
            print(f"Targets at {TARGET_SHAPE}: loop/numba {r['loop_over_numba']:.1f}x (target >= 50x: "
                  f"{'met' if r['loop_over_numba'] >= 50 else 'not met'}), numba/copy "
                  f"{r['numba_over_copy']:.2f}x (target <= 4x: {'met' if r['numba_over_copy'] <= 4 else 'not met'})")
            print(f"  the issue names the reference; numba is the CPU default that stands in for it: the PyTorch "
                  f"reference itself is at loop/ref {r['loop_over_reference']:.1f}x (>= 50x: "
                  f"{'met' if r['loop_over_reference'] >= 50 else 'not met'}), ref/copy "
                  f"{r['reference_over_copy']:.2f}x (<= 4x: {'met' if r['reference_over_copy'] <= 4 else 'not met'})")
            if r.get("loop_over_add_streamed") is not None:
                print(f"  the memory floor in this run (a + b streamed, below): at most "
                      f"{r['loop_over_add_streamed']:.1f}x the loop for any scan; the numba kernel at "
                      f"{r['numba_kernel_over_add_streamed']:.2f}x that floor, as called at "
                      f"{r['numba_over_add_streamed']:.2f}x")
    if rows and "add_ms" in rows[0]:
        print("Same-bytes floor: a + b reads the scan's two inputs and writes one result, as any scan must "
              "(torch's elementwise add, on all threads, ordinary stores). a+b streamed: the same add on one "
              "thread into a preallocated buffer, the result written with non-temporal stores as the numba scan "
              "writes its own (benchmarks/memory_floor.py): the fewest bytes any scan can move, so "
              "loop/(a+b streamed) is the most a one-pass scan on one thread can gain over the loop in this run.")
        print("rows | T | a+b ms | a+b prealloc ms | a+b streamed ms | loop/(a+b) | loop/(a+b streamed) | "
              "numba/(a+b) | numba kernel/(a+b prealloc) | numba kernel/(a+b streamed)")
        for r in rows:
            print(" | ".join([str(r["rows"]), str(r["T"]), _fmt(r["add_ms"]), _fmt(r["add_prealloc_ms"]),
                              _fmt(r.get("add_streamed_ms")),
                              _fmt(r["loop_over_add"], ".1f") + "x", _fmt(r.get("loop_over_add_streamed"), ".1f") + "x",
                              _fmt(r.get("numba_over_add")) + "x",
                              _fmt(r.get("numba_kernel_over_add_prealloc")) + "x",
                              _fmt(r.get("numba_kernel_over_add_streamed")) + "x"]))


def _copy_bandwidth(x: torch.Tensor, reps: int) -> float:
    """Device-to-device copy bandwidth in GB/s, counting bytes read and written."""
    dst = torch.empty_like(x)
    ms = _cuda_time(lambda: dst.copy_(x), reps)
    return 2 * x.numel() * x.element_size() / ms / 1e6


def _cuda_case(a: torch.Tensor, b: torch.Tensor, backend: str, backward: bool) -> Callable[[], object]:
    if not backward:
        return lambda: first_order_scan(a, b, backend=backend)
    leaves = (a.detach().requires_grad_(), b.detach().requires_grad_())
    upstream = torch.randn_like(b)

    def step() -> object:
        h = first_order_scan(*leaves, backend=backend)
        return torch.autograd.grad(h, leaves, upstream)

    return step


def cuda_rows(quick: bool) -> list[Row]:
    """Time Triton and the reference on CUDA at every T and dtype, forward and forward+backward."""
    exponents = CUDA_EXPONENTS_QUICK if quick else CUDA_EXPONENTS
    reps = 3 if quick else 5
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for exp in exponents:
            steps = 2 ** exp
            gen = torch.Generator(device="cuda").manual_seed(0)
            shape = (CUDA_BATCH, steps, CUDA_WIDTH)
            a = (torch.rand(shape, generator=gen, device="cuda") * 0.5 + 0.5).to(dtype)
            b = torch.randn(shape, generator=gen, device="cuda").to(dtype)
            copy_gbs = _copy_bandwidth(b, reps)
            tensor_bytes = b.numel() * b.element_size()
            for backward, passes in ((False, 3), (True, 8)):  # tensors read or written: a, b, h (+ a, h, dh, da, db)
                for backend in ("triton", "reference"):
                    ms = _cuda_time(_cuda_case(a, b, backend, backward), reps)
                    gbs = passes * tensor_bytes / ms / 1e6
                    rows.append({
                        "dtype": str(dtype).replace("torch.", ""), "T": steps, "rows": CUDA_BATCH * CUDA_WIDTH,
                        "pass": "fwd+bwd" if backward else "fwd", "backend": backend, "ms": ms,
                        "GB/s": gbs, "copy_GB/s": copy_gbs, "pct_of_copy": 100 * gbs / copy_gbs,
                    })
                    _progress(rows[-1])
            del a, b
            torch.cuda.empty_cache()
    return rows


def _progress(row: Row) -> None:
    print(f"# {row['dtype']} T={row['T']} {row['pass']} {row['backend']}: {row['ms']:.3f} ms "
          f"{row['GB/s']:.0f} GB/s ({row['pct_of_copy']:.0f}% of copy)", file=sys.stderr, flush=True)


def print_cuda_table(rows: list[Row], device: str) -> None:
    print(f"CUDA ({device}), diagonal gates, b = a = [{CUDA_BATCH}, T, {CUDA_WIDTH}]; "
          "bytes: fwd 3 tensors (a, b, h), fwd+bwd 8 (+ a, h, dh, da, db)")
    print("dtype | T | pass | triton ms | triton GB/s | % of copy | reference ms | reference GB/s | "
          "% of copy | triton speed-up | copy GB/s")
    paired: dict[tuple, dict[str, Row]] = {}
    for r in rows:
        paired.setdefault((r["dtype"], r["T"], r["pass"]), {})[r["backend"]] = r
    for (dtype, steps, kind), by in paired.items():
        tri, ref = by["triton"], by["reference"]
        print(f"{dtype} | {steps} | {kind} | {tri['ms']:.3f} | {tri['GB/s']:.0f} | {tri['pct_of_copy']:.0f}% | "
              f"{ref['ms']:.3f} | {ref['GB/s']:.0f} | {ref['pct_of_copy']:.0f}% | "
              f"{ref['ms'] / tri['ms']:.1f}x | {tri['copy_GB/s']:.0f}")


def print_tuning_table(tunings: list[dict[str, Any]]) -> None:
    """Each tuning the Triton scan made: the pick, and every candidate's time relative to it."""
    print("Triton tile tuning (ms of 3 launches; x = time over the pick's; failed = did not compile or fit)")
    for tuning in tunings:
        best = tuning["candidates"][tuning["chosen"]]
        if best is None:
            print(f"{' '.join(tuning['key'])}: every candidate failed")
            continue
        spread = ", ".join(f"{name} " + ("failed" if ms is None else f"{ms / best:.2f}x")
                           for name, ms in tuning["candidates"].items())
        print(f"{' '.join(tuning['key'])}: {tuning['chosen']} {best:.3f} ms | {spread}")


def main(argv: list[str] | None = None) -> None:
    parser = device_benchmark_parser(__doc__.splitlines()[0])
    parser.add_argument("--model-sizes", action="store_true",
                        help="also time numba against the reference at aggregator-sized scans (CPU)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warm-caches", action="store_true",
                        help="CPU table: do not leave the caches clean before each timed call")
    parser.add_argument("--no-thp", action="store_true",
                        help=f"set {THP_ENV}=0 instead of 1 (read before torch is imported, when run as a script)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        print_saved(args.from_json, lambda result: print_tables(result, cpu_only=False))
        return
    result = run(args)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_tables(result, args.cpu_only)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the parts that the flags ask for; returns the JSON-able result."""
    result: dict[str, Any] = {"torch": torch.__version__}
    if not args.cuda_only:
        result["cpu_threads"] = torch.get_num_threads()
        result["cpu_thp"] = thp_status()
        result["cpu_clean_caches"] = not args.warm_caches
        result["cpu"] = cpu_rows(args.quick, clean_caches=not args.warm_caches)
        if args.model_sizes and _dispatch.numba_available():
            result["cpu_model_sizes"] = model_rows(args.quick)
    if not args.cpu_only:
        if torch.cuda.is_available():
            result["cuda_device"] = torch.cuda.get_device_name()
            result["cuda"] = cuda_rows(args.quick)
            from psmsearch.kernels import first_order_scan_triton
            result["cuda_tuning"] = first_order_scan_triton.tuning_report()
        else:
            result["cuda_note"] = "n/a: torch.cuda.is_available() is False"
    return result


def print_tables(result: dict[str, Any], cpu_only: bool) -> None:
    if "cpu" in result:
        print_cpu_table(result["cpu"], result.get("cpu_threads"), result.get("cpu_thp"), result.get("cpu_clean_caches"))
    if "cpu_model_sizes" in result:
        print_model_table(result["cpu_model_sizes"])
    if "cuda" in result:
        print_cuda_table(result["cuda"], result.get("cuda_device", "CUDA"))
    if result.get("cuda_tuning"):
        print_tuning_table(result["cuda_tuning"])
    elif not cpu_only and "cuda_note" in result:
        print(f"CUDA part: {result['cuda_note']}")


if __name__ == "__main__":
    main()
