"""Compiled CPU kernels of :func:`.first_order_scan` (Numba), the CPU default from 64 steps on.

The PyTorch reference is a blocked scan: it runs on any device but makes a few
strided passes over memory, so on a CPU it stays several times slower than one
pass over the bytes. These kernels make that one pass. A batch item is a
``[T, R]`` slab whose rows (time steps) are contiguous; it is streamed row by
row with the running state ``h [R]`` in a small buffer, so every load and store
is sequential and LLVM vectorises the row loop.

**Gate layouts** (:func:`_gate_groups`): *full*, one gate per state element,
``a [B, T, R]``; or *grouped*, one gate per run of ``K`` consecutive state
elements, ``a [B, T, G]`` with ``R = G K``. A scalar gate per head
(``[B, T, H, 1, 1]`` against ``b [B, T, H, dk, dv]``) is ``G = H``; a diagonal
gate (``[B, T, H, dk, 1]``) is ``G = H dk``. Batch and time may each be 1 (a
gate shared by all items or all steps, such as a fixed decay): the kernels
read that one row, nothing is copied. A broadcast that skips a middle state
dim is expanded to the full layout first.

**Parallelism**: batch items run on up to ``torch.get_num_threads()`` threads
(the kernels release the GIL). One item stays on one thread. On the 2-core
machine we measured, both ways of splitting one item were slower than one
sequential stream: columns across threads (each thread strides through every
row) and time segments as a reduce-then-scan (segment totals first, then all
segments from their true start states), which reads the inputs twice for a
memory bandwidth that a second core barely raised. A chained scan (each thread
reduces its own block, waits for the state before it, publishes the next one
and rescans the block from cache: the bytes of a one-thread scan) was faster
than one thread at its best, but its median over 40 rounds was twice one
thread's on the 2-vCPU VM we measured: a thread waiting on a preempted one
stalls. See the README's notes on the CPU scan target.

**Descending passes** (a ``reverse`` scan, or the backward of a forward one)
walk memory from high to low addresses. The hardware prefetcher of the CPUs we
measured follows ascending streams far better, so those passes go in blocks of
about 128 KiB per array, read ascending once first (:func:`_touch`) and then
computed descending from cache: 1.2-1.6x faster than a plain descending pass
here (backward at 512 and 2048 state elements).

**Streaming stores**: an ascending forward scan with full gates whose output is
``STREAM_MIN_BYTES`` (8 MiB) or more writes it with non-temporal stores
(:mod:`._streaming_stores`): the output's lines are not read before they are
written, so the pass moves three arrays' bytes instead of four. The kernel alone
at (512, 16384) went from 2.6-2.8 ms to 2.1-2.3 ms on the 2-core machine; at 4 MiB
and below, where the output still fits in cache, it measured 0.7-1.0x, so small
outputs keep ordinary stores. The results are the same bits either way.
Everything else keeps ordinary stores, because streaming measured slower there
at (512, 16384): grouped gates (one gate per head or per key channel), whose
pass reads only ``b``, 1.8x slower streamed (3.3-3.6 against 1.9 ms), and the
descending passes (reverse scans, backwards) 0.80-0.90x, touched blocks and
all, the ascending backward of a reverse scan 0.90-1.03x.

Outputs come from :func:`._dispatch.new_output`: large CPU buffers in
transparent huge pages, reused from :mod:`.cpu_buffer_cache` once freed, since
their page faults and zeroing otherwise cost as much as the scan.

The accumulation dtype is float32 (float64 for float64 inputs), as in the
reference; 16-bit inputs are converted up front because NumPy has no bfloat16.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numba
import numpy as np
import torch

from . import _dispatch
from ._streaming_stores import LINE_BYTES, advance_line_nontemporal, store_fence

GradTriple = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

# Below this many state elements times steps per thread, a thread costs more than it saves.
_MIN_ELEMENTS_PER_THREAD = 1 << 16
# Elements of one array read ahead, ascending, before a descending block is computed.
_BLOCK_ELEMENTS = 1 << 15
# Bytes between two touched elements: one cache line.
_LINE_BYTES = LINE_BYTES
# From this many output bytes on, a forward scan streams its output past the caches.
STREAM_MIN_BYTES = 8 << 20


@numba.njit(nogil=True, cache=True)
def _touch(x: np.ndarray, t_lo: int, t_hi: int) -> float:  # pragma: no cover - compiled
    """Read one element per cache line of rows ``t_lo .. t_hi-1`` of ``x [T, R]``, ascending.

    Returns their sum only so that the loads cannot be optimised away.
    """
    flat = x.reshape(-1)
    stride = max(1, _LINE_BYTES // flat.itemsize)
    total = 0.0
    for i in range(t_lo * x.shape[1], t_hi * x.shape[1], stride):
        total += flat[i]
    return total


@numba.njit(nogil=True, cache=True, inline="always")
def _row(x: np.ndarray, t: int) -> np.ndarray:  # pragma: no cover - compiled
    """``x[t]``, or ``x[0]`` where ``x`` has one row (a gate broadcast over that dim)."""
    return x[t] if x.shape[0] > 1 else x[0]


@numba.njit(nogil=True, cache=True)
def _touch_gates(a: np.ndarray, t_lo: int, t_hi: int) -> float:  # pragma: no cover - compiled
    """:func:`_touch` for a gate table, which has one row when it is broadcast over time."""
    return _touch(a, t_lo, t_hi) if a.shape[0] > 1 else 0.0


@numba.njit(nogil=True, cache=True, inline="always")
def _advance(a_t: np.ndarray, b_t: np.ndarray, h: np.ndarray, out_t: np.ndarray) -> None:  # pragma: no cover
    """One step ``h = a_t ▷ h + b_t``, copied to ``out_t`` (``out_t`` may be ``h``)."""
    width, groups = h.shape[0], a_t.shape[0]
    if groups == width:
        for c in range(width):
            value = a_t[c] * h[c] + b_t[c]
            h[c] = value
            out_t[c] = value
    else:
        size = np.uint64(width // groups)  # unsigned indices: no negative-index checks, so LLVM vectorises
        for g in range(groups):
            gate = a_t[g]
            base = np.uint64(g) * size
            for k in range(size):
                value = gate * h[base + k] + b_t[base + k]
                h[base + k] = value
                out_t[base + k] = value


@numba.njit(nogil=True, cache=True, inline="always")
def _advance_full_streaming(a_t: np.ndarray, b_t: np.ndarray, h: np.ndarray,
                            out_t: np.ndarray) -> None:  # pragma: no cover - compiled
    """:func:`_advance` for one gate per element, ``out_t`` written by non-temporal stores.

    Aligned 64-byte lines go through :func:`.advance_line_nontemporal`; the
    ``head`` elements before the first line boundary and those after the last
    take ordinary stores. ``out_t`` must be element-aligned (see
    :func:`streams_output`). Same arithmetic as :func:`_advance`, same bits.
    """
    width, itemsize = h.shape[0], out_t.itemsize
    lanes = _LINE_BYTES // itemsize
    head = min(width, (_LINE_BYTES - out_t.ctypes.data % _LINE_BYTES) % _LINE_BYTES // itemsize)
    body_end = head + (width - head) // lanes * lanes
    for c in range(head):
        value = a_t[c] * h[c] + b_t[c]
        h[c] = value
        out_t[c] = value
    for c in range(head, body_end, lanes):
        advance_line_nontemporal(a_t, b_t, h, out_t, c)
    for c in range(body_end, width):
        value = a_t[c] * h[c] + b_t[c]
        h[c] = value
        out_t[c] = value


@numba.njit(nogil=True, cache=True)
def _forward_item(a: np.ndarray, b: np.ndarray, h: np.ndarray, out: np.ndarray,
                  reverse: bool, rows: int, stream: bool) -> float:  # pragma: no cover - compiled
    """Scan one batch item from state ``h [R]`` (advanced in place) into ``out [T, R]``.

    ``a [T or 1, G]``, ``b [T, R]``. A ``reverse`` scan walks memory downwards, so
    it goes in blocks of ``rows`` time steps, each touched ascending first. An
    ascending scan with ``stream`` (full gates only, ``G = R``) writes ``out``
    with non-temporal stores.
    """
    steps = b.shape[0]
    touched = 0.0
    if not reverse:
        if stream:
            for t in range(steps):
                _advance_full_streaming(_row(a, t), b[t], h, out[t])
        else:
            for t in range(steps):
                _advance(_row(a, t), b[t], h, out[t])
        return touched
    t_hi = steps
    while t_hi > 0:
        t_lo = max(0, t_hi - rows)
        touched += _touch_gates(a, t_lo, t_hi) + _touch(b, t_lo, t_hi) + _touch(out, t_lo, t_hi)
        for t in range(t_hi - 1, t_lo - 1, -1):
            _advance(_row(a, t), b[t], h, out[t])
        t_hi = t_lo
    return touched


@numba.njit(nogil=True, cache=True)
def _forward_items(a: np.ndarray, b: np.ndarray, h: np.ndarray, out: np.ndarray, reverse: bool,
                   rows: int, stream: bool, first: int, stop: int) -> float:  # pragma: no cover - compiled
    """:func:`_forward_item` for batch items ``first .. stop-1`` (``a`` may have one item for all).

    Streaming stores are fenced before returning, so the caller's thread sees them.
    """
    touched = 0.0
    for i in range(first, stop):
        touched += _forward_item(_row(a, i), b[i], h[i], out[i], reverse, rows, stream)
    if stream:
        store_fence()
    return touched


@numba.njit(nogil=True, cache=True, fastmath={"reassoc"})
def _group_sums(g_t: np.ndarray, h_prev: np.ndarray, da_t: np.ndarray) -> None:  # pragma: no cover - compiled
    """``da_t[q] = Σ_k g_t[q K + k] h_prev[q K + k]`` over each group of ``K`` state elements.

    Accumulated in float64, as before. ``reassoc`` (on this function only) lets
    LLVM sum in several vector lanes instead of one chain of dependent adds:
    2-3.8x faster for groups of 4 to 512 elements on the 2-core machine we
    measured, and the grouped backward at (512, 16384) went from 9.9 to 6.2 ms
    (the serial chain had made it slower than the full-gate backward).
    """
    size = np.uint64(g_t.shape[0] // da_t.shape[0])
    for g in range(da_t.shape[0]):
        base = np.uint64(g) * size
        total = 0.0
        for k in range(size):
            total += g_t[base + k] * h_prev[base + k]
        da_t[g] = total


@numba.njit(nogil=True, cache=True, inline="always")
def _gate_gradient(g_t: np.ndarray, h_prev: np.ndarray, da_t: np.ndarray) -> None:  # pragma: no cover
    """``da_t = g_t ⊙ h_prev``, summed over each gate's group of state elements."""
    width, groups = g_t.shape[0], da_t.shape[0]
    if groups == width:
        for c in range(width):
            da_t[c] = g_t[c] * h_prev[c]
    else:
        _group_sums(g_t, h_prev, da_t)


@numba.njit(nogil=True, cache=True)
def _backward_item(a: np.ndarray, h: np.ndarray, h0: np.ndarray, dh: np.ndarray, g_out: np.ndarray,
                   da: np.ndarray, acc: np.ndarray, reverse: bool, need_da: bool,
                   rows: int) -> float:  # pragma: no cover - compiled
    """The backward of one batch item, walking scan positions ``p`` from last to first.

    At position ``p`` (time ``t``): ``acc = g_p = dh_p + a_{p+1} ▷ g_{p+1}``,
    stored in ``g_out [T, R]``, and ``da_p = g_p ⊙ h_{p-1}`` summed per gate into
    ``da [T, G]`` (``h_{-1} = h0``). ``a [T or 1, G]``, ``h``/``dh [T, R]``, ``acc [R]``
    scratch. Unless ``reverse``, the walk descends in memory, so it goes in
    blocks of ``rows`` positions, each touched ascending first.
    """
    steps = dh.shape[0]
    step = -1 if reverse else 1                          # time offset of position p + 1
    if reverse:
        rows = max(steps, 1)                             # ascending in memory: one untouched block
    touched = 0.0
    p_hi = steps
    while p_hi > 0:
        p_lo = max(0, p_hi - rows)
        if not reverse:
            t_lo, t_hi = max(p_lo - 1, 0), min(p_hi + 1, steps)   # rows of a and h the block reads
            touched += _touch_gates(a, t_lo, t_hi) + _touch(dh, p_lo, p_hi) + _touch(g_out, p_lo, p_hi)
            if need_da:
                touched += _touch(h, t_lo, t_hi) + _touch(da, p_lo, p_hi)
        for p in range(p_hi - 1, p_lo - 1, -1):
            t = steps - 1 - p if reverse else p
            if p == steps - 1:
                acc[:] = dh[t]
                g_out[t] = acc
            else:
                _advance(_row(a, t + step), dh[t], acc, g_out[t])
            if need_da:
                _gate_gradient(acc, h[t - step] if p > 0 else h0, da[t])
        p_hi = p_lo
    return touched


@numba.njit(nogil=True, cache=True)
def _backward_items(a: np.ndarray, h: np.ndarray, h0: np.ndarray, dh: np.ndarray, g_out: np.ndarray,
                    da: np.ndarray, acc: np.ndarray, reverse: bool, need_da: bool, rows: int,
                    first: int, stop: int) -> float:  # pragma: no cover - compiled
    """:func:`_backward_item` for batch items ``first .. stop-1`` (``a`` may have one item for all)."""
    touched = 0.0
    for i in range(first, stop):
        touched += _backward_item(_row(a, i), h[i], h0[i], dh[i], g_out[i], da[i], acc[i], reverse, need_da,
                                  rows)
    return touched


class _Pool:
    """Lazily made thread pools, one per size, kept for the life of the process.

    Threads of one process may use different thread counts (PyTorch's
    ``set_num_threads`` is per thread once a thread has run an op), so a pool
    is never replaced while another thread may be submitting to it. A forked
    child inherits the pool objects but none of their threads, so they are
    dropped in the child (``os.register_at_fork``) and made anew there.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._executors: dict[int, ThreadPoolExecutor] = {}
        os.register_at_fork(after_in_child=self._forget)

    def _forget(self) -> None:
        self._lock = threading.Lock()
        self._executors = {}

    def run(self, calls: Sequence[Callable[[], Any]]) -> list[Any]:
        """Run ``calls`` concurrently and return their results (the first exception propagates)."""
        if len(calls) == 1:
            return [calls[0]()]
        with self._lock:
            executor = self._executors.get(len(calls))
            if executor is None:
                executor = ThreadPoolExecutor(len(calls), thread_name_prefix="psmsearch-scan")
                self._executors[len(calls)] = executor
        return [future.result() for future in [executor.submit(call) for call in calls]]


_POOL = _Pool()


def _block_rows(width: int) -> int:
    """Time steps per block of a descending pass: about ``_BLOCK_ELEMENTS`` elements of each array."""
    return max(1, _BLOCK_ELEMENTS // max(width, 1))


def streams_output(out: torch.Tensor, reverse: bool, full_gates: bool) -> bool:
    """Whether a forward scan into ``out`` uses streaming stores: ascending, one gate per state element,
    ``STREAM_MIN_BYTES`` or more, and element-aligned (always so for tensors PyTorch or
    :func:`._dispatch.new_output` allocated). See the module docstring for the measurements."""
    nbytes = out.numel() * out.element_size()
    return (not reverse and full_gates and nbytes >= STREAM_MIN_BYTES
            and out.data_ptr() % out.element_size() == 0)


def _workers(batch: int, steps: int, width: int) -> int:
    """Threads for a call: one per batch item, at most ``torch.get_num_threads()``, none for tiny work."""
    by_size = max(1, batch * steps * width // _MIN_ELEMENTS_PER_THREAD)
    return max(1, min(torch.get_num_threads(), batch, by_size))


def _run_over_batch(kernel: Callable[..., float], args: tuple[Any, ...], batch: int, workers: int) -> None:
    """Call ``kernel(*args, first, stop)`` on ``workers`` contiguous shares of the batch."""
    if workers == 1:
        kernel(*args, 0, batch)
        return
    bounds = [batch * k // workers for k in range(workers + 1)]
    _POOL.run([functools.partial(kernel, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])])


def _gate_groups(a_shape: torch.Size, b_shape: torch.Size) -> int | None:
    """Number of gate groups ``G`` if ``a`` is full or grouped over ``b``, else None (expand it).

    Grouped means ``a`` matches ``b`` on a leading run of state dims and is 1 on
    every state dim after it. Batch and time may each be ``b``'s or 1 (the
    kernels then read the one row for all: no expanded copy).
    """
    if any(size not in (1, full) for size, full in zip(a_shape[:2], b_shape[:2])):
        return None
    state_a, state_b = a_shape[2:], b_shape[2:]
    split = 0
    while split < len(state_b) and state_a[split] == state_b[split]:
        split += 1
    if any(size != 1 for size in state_a[split:]):
        return None
    return math.prod(state_b[:split])


def _gate_table(a: torch.Tensor, b_shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Size]:
    """``a`` as a contiguous ``[B or 1, T or 1, G]`` table, and the shape its gradient comes back in.

    The gradient has ``b``'s batch and time dims (one entry per scan position); the caller sums it
    down to ``a``'s shape.
    """
    a, groups = _grouped_gates(a, b_shape)
    table = _contiguous_as(a, dtype).view(a.shape[0], a.shape[1], groups)  # [B|1, T|1, G]
    return table, b_shape[:2] + a.shape[2:]


def _grouped_gates(a: torch.Tensor, b_shape: torch.Size) -> tuple[torch.Tensor, int]:
    """``a`` and its number of gate groups ``G``; ``a`` expanded to ``b``'s shape first where it is
    neither full nor grouped (then ``G = R``)."""
    groups = _gate_groups(a.shape, b_shape)
    if groups is None:
        return a.expand(b_shape), math.prod(b_shape[2:])
    return a, groups


def _state_table(h0: torch.Tensor | None, state_shape: torch.Size, dtype: torch.dtype,
                 fresh: bool = False) -> torch.Tensor:
    """``h0`` broadcast to ``[B, *S]`` as a contiguous ``[B, R]`` table (zeros when None).

    With ``fresh`` the table never shares memory with ``h0``, so a kernel may advance it in place.
    """
    batch, width = state_shape[0], math.prod(state_shape[1:])
    if h0 is None:
        return torch.zeros(batch, width, dtype=dtype, device="cpu")
    if fresh:
        return torch.empty(state_shape, dtype=dtype, device="cpu").copy_(h0).view(batch, width)  # copy_ broadcasts
    return h0.to(dtype).expand(state_shape).contiguous().view(batch, width)


def _contiguous_as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` itself where it is already contiguous in ``dtype``, else a contiguous copy in ``dtype``.

    The same as ``x.to(dtype).contiguous()``, in fewer PyTorch calls: after a
    large scan has streamed through the caches, each call costs tens of
    microseconds, which adds up to a tenth of the scan at (512, 16384).
    """
    if x.dtype == dtype and x.is_contiguous():
        return x
    return x.to(dtype).contiguous()


def _np(x: torch.Tensor) -> np.ndarray:
    """The NumPy view of a CPU tensor (detached first only where it needs a gradient)."""
    return x.detach().numpy() if x.requires_grad else x.numpy()


def scan_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
                 reverse: bool) -> torch.Tensor:
    """The scan of ``(a, b)`` from ``h0``, in ``b``'s dtype (see :func:`.first_order_scan`)."""
    dtype = _dispatch.compute_dtype(a, b)
    batch, steps = b.shape[:2]
    width = math.prod(b.shape[2:])
    out = _dispatch.new_output(b.shape, dtype, b.device)                     # [B, T, *S]
    if out.numel():
        # NumPy reshapes below, not PyTorch views: cheaper, and every call counts (see _contiguous_as).
        a, groups = _grouped_gates(a, b.shape)
        gates = _np(_contiguous_as(a, dtype)).reshape(a.shape[0], a.shape[1], groups)  # [B|1, T|1, G]
        inputs = _np(_contiguous_as(b, dtype)).reshape(batch, steps, width)  # [B, T, R]
        if h0 is None:
            states = np.zeros((batch, width), dtype=inputs.dtype)           # [B, R], advanced in place
        else:
            states = _np(_state_table(h0, b.shape[:1] + b.shape[2:], dtype, fresh=True))
        args = (gates, inputs, states, _np(out).reshape(batch, steps, width), reverse, _block_rows(width),
                streams_output(out, reverse, full_gates=groups == width))
        _run_over_batch(_forward_items, args, batch, _workers(batch, steps, width))
    return out if out.dtype == b.dtype else out.to(b.dtype)


def scan_backward(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None, dh: torch.Tensor,
                  reverse: bool, need_da: bool) -> GradTriple:
    """``(da, db, dh0)`` in the compute dtype; ``da`` in the gate table's shape, ``dh0`` as ``[B, *S]``.

    Like the reference, ``da`` uses the saved output ``h`` (16-bit rounded for
    16-bit inputs). The caller reduces ``da`` and ``dh0`` to their inputs' shapes.
    """
    dtype = _dispatch.compute_dtype(a, h, dh)
    batch, steps = h.shape[:2]
    width = math.prod(h.shape[2:])
    state_shape = h.shape[:1] + h.shape[2:]
    gates, gate_shape = _gate_table(a, h.shape, dtype)                     # [B|1, T|1, G]
    states = _contiguous_as(h, dtype).view(batch, steps, width)           # [B, T, R]
    grads = _contiguous_as(dh, dtype).view(batch, steps, width)           # [B, T, R]
    start = _state_table(h0, state_shape, dtype)                          # [B, R]
    db = _dispatch.new_output((batch, steps, width), dtype, h.device)     # [B, T, R]
    da_shape = (batch, steps if need_da else 0, gates.shape[2])
    da = _dispatch.new_output(da_shape, dtype, h.device)                  # [B, T, G]
    accs = torch.empty(batch, width, dtype=dtype, device="cpu")           # [B, R]: scratch for g_p
    if not db.numel():  # no state element reaches an output (T = 0, or an empty state): zero gradients
        dh0 = torch.zeros(batch, width, dtype=dtype, device="cpu")
        return (da.zero_().view(gate_shape) if need_da else None), db.view(h.shape), dh0.view(state_shape)
    args = (*(_np(x) for x in (gates, states, start, grads, db, da, accs)), reverse, need_da, _block_rows(width))
    _run_over_batch(_backward_items, args, batch, _workers(batch, steps, width))
    dh0 = _first_gate(gates, width, reverse) * db[:, steps - 1 if reverse else 0]  # [B, R]
    da_out = da.view(gate_shape) if need_da else None
    return da_out, db.view(h.shape), dh0.view(state_shape)


def _first_gate(gates: torch.Tensor, width: int, reverse: bool) -> torch.Tensor:
    """The gate of scan position 0 per state element, ``[B, R]``."""
    first = gates[:, -1 if reverse else 0]                                # [B, G]
    return first.repeat_interleave(width // first.shape[1], dim=1)
