"""PyTorch reference of :func:`.first_order_scan`: a blocked scan that runs on any device and dtype.

It makes a few strided passes over memory instead of one Python step per token
(see :func:`_scan_into`), so on the CPU it stays several times slower than one
sequential pass, which the Numba kernels make; on CUDA the Triton kernels make
it. Every backend module has the same two functions, ``scan_forward`` and
``scan_backward``, which :mod:`.first_order_scan_autograd` calls.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from . import _dispatch

GradTriple = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]

# Scans shorter than this run token by token (the blocked scan only pays off from here).
MIN_BLOCKED_STEPS = 64


def scan_forward(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
                 reverse: bool) -> torch.Tensor:
    """The scan of ``(a, b)`` from ``h0``, in ``b``'s dtype (see :func:`.first_order_scan`)."""
    dtype = _dispatch.compute_dtype(a, b)
    b_c = b.to(dtype)                                   # [B, T, *S]
    a_c = a.to(dtype).expand(b.shape[:2] + a.shape[2:])  # [B, T, *Sa]
    h0_c = None if h0 is None else h0.to(dtype)
    out = _dispatch.new_output(b.shape, dtype, b.device)  # [B, T, *S]
    _scan_into(a_c, b_c, h0_c, out, reverse)
    return out.to(b.dtype)


def scan_traceable(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool) -> torch.Tensor:
    """The scan as one out-of-place PyTorch op per step, for traces (``make_fx``, ``torch.export``).

    No ``out=`` and no in-place writes, so a trace records exactly what it computes
    and autograd differentiates it natively (``out=`` ops refuse inputs that need
    gradients while a trace runs them, and constant folding keeps buffers that a
    trace filled in place). Slow for long scans, so it is used for traces only.
    """
    dtype = _dispatch.compute_dtype(a, b)
    steps = b.shape[1]
    if steps == 0:
        return b.new_zeros(b.shape)
    state_shape = b.shape[:1] + b.shape[2:]
    state = (torch.zeros(state_shape, dtype=dtype, device=b.device) if h0 is None
             else h0.to(dtype).expand(state_shape))                             # [B, *S]
    gates = a.to(dtype).expand(b.shape[:2] + a.shape[2:])                       # [B, T, *Sa]
    states: list[torch.Tensor] = [state] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        state = gates[:, t] * state + b[:, t].to(dtype)
        states[t] = state
    return torch.stack(states, dim=1).to(b.dtype)                               # [B, T, *S]


def scan_backward(a: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,
                  dh: torch.Tensor, reverse: bool, need_da: bool) -> GradTriple:
    """Gradients of the scan, unreduced: ``da`` and ``dh0`` have ``h``'s full shape.

    In scan order ``p`` (time ``t = p``, or ``T-1-p`` when ``reverse``):
    ``g_p = dh_p + a_{p+1} g_{p+1}``, ``db = g``, ``da_p = g_p h_{p-1}`` with
    ``h_{-1} = h0`` (or 0) and ``dh0 = a_0 g_0``. ``h`` is the saved output, so
    for 16-bit inputs ``da`` uses the 16-bit rounded states.
    """
    dtype = _dispatch.compute_dtype(a, h, dh)
    steps = h.shape[1]
    if steps == 0:  # no steps: every gradient is empty or zero
        zeros = torch.zeros(h.shape, dtype=dtype, device=h.device)          # [B, 0, *S]
        return (zeros if need_da else None), zeros, torch.zeros(h.shape[:1] + h.shape[2:], dtype=dtype,
                                                                device=h.device)
    a_c = a.to(dtype).expand(h.shape[:2] + a.shape[2:])  # [B, T, *Sa]
    g = _state_gradients(a_c, dh.to(dtype), reverse)  # [B, T, *S]
    first = steps - 1 if reverse else 0
    dh0 = a_c[:, first] * g[:, first]                      # [B, *S]
    da = _gate_gradient(g, h.to(dtype), h0, reverse) if need_da else None
    return da, g, dh0


def _state_gradients(a: torch.Tensor, dh: torch.Tensor, reverse: bool) -> torch.Tensor:
    """``g_p = dh_p + a_{p+1} g_{p+1}``: a scan against the forward direction, gates shifted by one."""
    steps = dh.shape[1]
    g = _dispatch.new_output(dh.shape, dh.dtype, dh.device)  # [B, T, *S]
    if not reverse:
        g[:, -1] = dh[:, -1]
        if steps > 1:
            _scan_into(a[:, 1:], dh[:, :-1], g[:, -1], g[:, :-1], reverse=True)
    else:
        g[:, 0] = dh[:, 0]
        if steps > 1:
            _scan_into(a[:, :-1], dh[:, 1:], g[:, 0], g[:, 1:], reverse=False)
    return g


def _gate_gradient(g: torch.Tensor, h: torch.Tensor, h0: torch.Tensor | None,
                   reverse: bool) -> torch.Tensor:
    """``da_p = g_p * h_{p-1}`` with ``h_{-1} = h0`` (or 0), full shape ``[B, T, *S]``."""
    da = _dispatch.new_output(g.shape, g.dtype, g.device)  # [B, T, *S]
    first, rest, prev = (-1, slice(None, -1), slice(1, None)) if reverse else (0, slice(1, None), slice(None, -1))
    torch.mul(g[:, rest], h[:, prev], out=da[:, rest])
    if h0 is None:
        da[:, first] = 0
    else:
        torch.mul(g[:, first], h0.to(g.dtype), out=da[:, first])
    return da


def _block_length(steps: int) -> int:
    """Block length ``L`` of the blocked scan: a power of two near ``steps ** (1/3)``, in [8, 16].

    A level costs about ``2 L`` ops (one per block step and pass) plus a carry
    scan over ``T / L`` blocks, which recurses. Longer blocks shrink the carry
    scan but make more, smaller ops, each a strided pass that memory latency
    rather than arithmetic limits. On a 2-core CPU (``benchmarks/scan.py``, 1
    and 2 threads) 16 was as fast as 32 at 512 and 2048 rows and clearly faster
    at 16 rows (T = 65536); shorter scans such as the carry levels keep the cube
    root, 8, which measured best for T of a few hundred.
    """
    return int(min(16, max(8, 2 ** round(math.log2(max(steps, 1)) / 3))))


def _scan_into(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, out: torch.Tensor,
               reverse: bool) -> None:
    """Write the scan of ``(a, b)`` into ``out`` (all in the compute dtype).

    ``a`` is ``[B, T, *Sa]`` broadcastable to ``b``'s ``[B, T, *S]``; ``out`` may be
    a strided view, and may be ``b`` itself (an in-place scan: every step reads
    ``b_t`` in the op that writes ``out_t``), but must not otherwise overlap
    ``a``, ``b`` or ``h0``. The time axis is split into ``nb`` blocks of ``L`` steps:

    1. block totals: scan every block from a zero state, all blocks at once,
       keeping only the running state (one op per block step);
    2. carries: the state at each block end, a scan of length ``nb`` of the
       pairs (product of the block's gates, block total), done recursively
       and in place in the buffer that holds the totals;
    3. rescan every block from its true start state, writing ``out``.

    Only products of gates appear (no division by cumulative products), so gates
    in (0, 1] of any size are stable. Steps that do not fill a block are a tail
    scanned token by token.
    """
    steps = b.shape[1]
    length = _block_length(steps)
    if steps < max(MIN_BLOCKED_STEPS, 4 * length):
        _loop_scan(a, b, h0, out, reverse)
        return
    n_blocks = steps // length
    blocked = n_blocks * length
    body, tail = (slice(steps - blocked, steps), slice(0, steps - blocked)) if reverse else \
        (slice(0, blocked), slice(blocked, steps))
    a_steps = _block_steps(a[:, body], n_blocks, reverse)    # L x [B, nb, *Sa], in scan order
    b_steps = _block_steps(b[:, body], n_blocks, reverse)    # L x [B, nb, *S]
    h_steps = _block_steps(out[:, body], n_blocks, reverse)  # L x [B, nb, *S]
    starts, ends, first_start = _carry_buffers(b, n_blocks, h0, reverse)  # [B, nb, *S], [B, nb, *S], [B, *S]
    _block_totals(a_steps, b_steps, ends)
    block_gates = a[:, body].unflatten(1, (n_blocks, length)).prod(dim=2)  # [B, nb, *Sa]
    _scan_into(block_gates, ends, first_start, ends, reverse)
    _rescan_blocks(a_steps, b_steps, starts, h_steps)
    tail_start = out[:, steps - blocked] if reverse else out[:, blocked - 1]
    _loop_scan(a[:, tail], b[:, tail], tail_start, out[:, tail], reverse)


def _in_scan_order(steps: Sequence[torch.Tensor], reverse: bool) -> Sequence[torch.Tensor]:
    return steps[::-1] if reverse else steps


def _block_steps(x: torch.Tensor, n_blocks: int, reverse: bool) -> Sequence[torch.Tensor]:
    """Cut ``x [B, nb * L, *S]`` into blocks and return its ``L`` step views ``[B, nb, *S]`` in scan order.

    ``unbind`` makes all the views in one call, cheaper than indexing at every step.
    """
    return _in_scan_order(x.unflatten(1, (n_blocks, -1)).unbind(2), reverse)


def _loop_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, out: torch.Tensor,
               reverse: bool) -> None:
    """Token-by-token scan, each step vectorised over batch and state."""
    prev = h0
    for a_t, b_t, h_t in zip(*(_in_scan_order(x.unbind(1), reverse) for x in (a, b, out))):
        if prev is None:
            h_t.copy_(b_t)
        else:
            torch.addcmul(b_t, a_t, prev, out=h_t)
        prev = h_t


def _carry_buffers(b: torch.Tensor, n_blocks: int, h0: torch.Tensor | None,
                   reverse: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Views ``(starts, ends, first_start)`` of one ``[B, nb + 1, *S]`` buffer of block boundary states.

    In scan order block ``k`` starts from the state the previous block ends
    with, so the two views are one slot apart; ``first_start`` (the state
    entering the first block: ``h0`` or zero) is the slot only ``starts`` holds.
    Writing the carries into ``ends`` thus also fills ``starts``, with no copy.
    """
    edges = b.new_empty(b.shape[:1] + (n_blocks + 1,) + b.shape[2:])  # [B, nb + 1, *S]
    if reverse:
        starts, ends, first_start = edges[:, 1:], edges[:, :-1], edges[:, -1]
    else:
        starts, ends, first_start = edges[:, :-1], edges[:, 1:], edges[:, 0]
    if h0 is None:
        first_start.zero_()
    else:
        first_start.copy_(h0)
    return starts, ends, first_start


def _block_totals(a_steps: Sequence[torch.Tensor], b_steps: Sequence[torch.Tensor],
                  out: torch.Tensor) -> None:
    """Write into ``out [B, nb, *S]`` the state at the end of every block when each starts from zero.

    From a zero state the first step's state is ``b_0``, so the loop starts at step 1.
    """
    torch.addcmul(b_steps[1], a_steps[1], b_steps[0], out=out)
    for a_j, b_j in zip(a_steps[2:], b_steps[2:]):
        torch.addcmul(b_j, a_j, out, out=out)


def _rescan_blocks(a_steps: Sequence[torch.Tensor], b_steps: Sequence[torch.Tensor],
                   starts: torch.Tensor, h_steps: Sequence[torch.Tensor]) -> None:
    """Scan every block again from its true start state ``starts [B, nb, *S]``, writing all steps."""
    prev = starts
    for a_j, b_j, h_j in zip(a_steps, b_steps, h_steps):
        torch.addcmul(b_j, a_j, prev, out=h_j)
        prev = h_j
