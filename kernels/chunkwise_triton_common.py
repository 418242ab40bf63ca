"""Pieces shared by the Triton forward and backward of chunkwise GLA.

* tile loaders and the exact per-channel scores of a diagonal sub-block;
* ``_chunk_outer_kernel`` and :func:`chunk_outer`: per chunk
  ``Σ_j (x_j ⊙ w_j) y_jᵀ`` with ``w_j = e^{G_last - G_j}`` (a chunk's state
  contribution, forward) or ``w_j = e^{G_j}`` (the gradient a chunk's outputs
  send to its start state, backward);
* :func:`chunk_states`: cumulative gates plus the state entering and leaving
  every chunk (chunk contributions, then :func:`first_order_scan` over chunks).

``G`` (cumulative log gates inside each chunk) is computed by PyTorch and padded
to whole chunks, so kernels read it without row masks; scalar gates are read
with stride 0 over the key channels.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _dispatch
from .chunkwise import chunk_cumulative_gates
from .first_order_scan import first_order_scan


@triton.jit
def load_tile(ptr, rows, cols, row_stride, col_stride, row_ok, col_ok):
    """``ptr[rows, cols]`` as float32, zero outside the masks."""
    offsets = rows[:, None].to(tl.int64) * row_stride + cols[None, :] * col_stride
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def load_row(ptr, cols, col_stride, ok):
    """``ptr[cols]`` (one row, ``ptr`` already at its start) as float32, zero where not ``ok``."""
    return tl.load(ptr + cols * col_stride, mask=ok, other=0.0).to(tl.float32)


@triton.jit
def chunk_and_head(n_chunks):
    """``(chunk, batch·head)`` of this program: grid axis 0 enumerates chunks × batch·heads.

    One flat axis (up to 2^31 programs) instead of two, because CUDA caps grid
    axes 1 and 2 at 65,535: many heads or very long sequences would not launch.
    """
    pid = tl.program_id(0).to(tl.int64)
    return (pid % n_chunks).to(tl.int32), pid // n_chunks


@triton.jit
def exact_block_scores(Q, K, G, rows, row_ok, DK, g_row, stride_gk,
                       SUB: tl.constexpr, BLOCK_K: tl.constexpr, K_SLICE: tl.constexpr):
    """``A_ij = Σ_c q_ic k_jc e^{G_ic - G_jc}`` (j <= i, else 0) inside one sub-block: ``[SUB, SUB]``.

    The decay is formed per channel, ``K_SLICE`` channels at a time, and masked
    before ``exp`` so that no positive exponent is ever evaluated.
    """
    idx = tl.arange(0, SUB)
    causal = idx[:, None] >= idx[None, :]  # [SUB, SUB]
    all_rows = rows >= 0
    scores = tl.zeros([SUB, SUB], dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_K, K_SLICE):
        cc = c0 + tl.arange(0, K_SLICE)
        c_ok = cc < DK
        q = load_tile(Q, rows, cc, DK, 1, row_ok, c_ok)                  # [SUB, KS]
        k = load_tile(K, rows, cc, DK, 1, row_ok, c_ok)                  # [SUB, KS]
        cum = load_tile(G, rows, cc, g_row, stride_gk, all_rows, c_ok)   # [SUB, KS]
        lag = tl.where(causal[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf"))
        scores += tl.sum(q[:, None, :] * k[None, :, :] * tl.exp(lag), axis=2)
    return scores


@triton.jit
def _chunk_outer_kernel(
    X, Y, G, OUT,
    T, H, n_chunks, DX, DY, g_row, stride_gk,
    CHUNK: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_Y: tl.constexpr,
    DECAY_TO_END: tl.constexpr, PRECISION: tl.constexpr,
):
    """``OUT[b, n, h] = Σ_j (x_j ⊙ w_j) y_jᵀ`` over chunk ``n``, one ``[DX, BLOCK_Y]`` block."""
    pid_n, bh = chunk_and_head(n_chunks)
    pid_y = tl.program_id(1)
    rows = pid_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    xx = tl.arange(0, BLOCK_X)
    yy = pid_y * BLOCK_Y + tl.arange(0, BLOCK_Y)
    row_ok, x_ok, y_ok = rows < T, xx < DX, yy < DY
    G += bh * n_chunks * CHUNK * g_row
    x = load_tile(X + bh * T * DX, rows, xx, DX, 1, row_ok, x_ok)   # [C, BX]
    y = load_tile(Y + bh * T * DY, rows, yy, DY, 1, row_ok, y_ok)   # [C, BY]
    cum = load_tile(G, rows, xx, g_row, stride_gk, rows >= 0, x_ok)  # [C, BX]
    if DECAY_TO_END:
        last = load_row(G + (pid_n * CHUNK + CHUNK - 1) * g_row, xx, stride_gk, x_ok)  # [BX]
        weighted = x * tl.exp(last[None, :] - cum)  # exponent <= 0
    else:
        weighted = x * tl.exp(cum)  # exponent <= 0
    outer = tl.dot(tl.trans(weighted), y, input_precision=PRECISION)  # [BX, BY]
    OUT += (((bh // H) * n_chunks + pid_n) * H + bh % H) * DX * DY
    tl.store(OUT + xx[:, None] * DY + yy[None, :], outer, mask=x_ok[:, None] & y_ok[None, :])


def block_sizes(dk: int, dv: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_V, K_SLICE)``: all of dk in one block, dv split across programs."""
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(64, max(16, triton.next_power_of_2(dv)))
    return block_k, block_v, min(block_k, 16)


def launch_options(chunk_size: int) -> dict[str, int]:
    """``num_warps`` / ``num_stages`` of every chunkwise kernel launch at ``chunk_size``.

    Chosen from what ``ptxas -v`` reports for sm_90 (``tests/kernels/test_triton_compile.py``
    checks it), not from timings: no GPU was available to measure them. With
    Triton's default of 4 warps and 3 stages, the ``[C, C]`` and ``[C, dk]``
    tiles of chunks of 64 and 128 spill registers to local memory. Spill stores
    per thread at C = 128 with float32 inputs, defaults -> these options: scores
    kernel 66,904 -> 536 B, ``dv`` 54,668 -> 16,244 B, chunk states 15,216 -> 0 B,
    output 4,988 -> 1,296 B, ``dq``/``dk`` 3,840 -> 588 B; at C = 64 with bfloat16:
    ``dq``/``dk`` 2,120 -> 0 B, output 748 -> 92 B, scores 0 -> 40 B. With 8 warps
    each thread holds half as much of each tile, and one stage keeps no
    prefetched tiles in registers. Smaller chunks keep Triton's defaults.
    """
    return {"num_warps": 8, "num_stages": 1} if chunk_size >= 64 else {}


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision: exact IEEE products for float32 inputs, tf32 for 16-bit ones."""
    return "ieee" if dtype == torch.float32 else "tf32"


def gate_columns(cum: torch.Tensor) -> tuple[int, int]:
    """``(row stride, channel stride)`` of flattened ``G``; stride 0 broadcasts a scalar gate."""
    width = cum.shape[-1]
    return width, (1 if width > 1 else 0)


def chunk_outer(x: torch.Tensor, y: torch.Tensor, cum: torch.Tensor, n_chunks: int,
                decay_to_end: bool) -> torch.Tensor:
    """Per chunk ``Σ_j (x_j ⊙ w_j) y_jᵀ`` as ``[B, n, H, dx, dy]`` float32.

    ``x`` is ``[B, H, T, dx]``, ``y`` is ``[B, H, T, dy]`` (both contiguous), ``cum``
    is ``[B, H, n·C, dg]``; ``w_j = e^{G_last - G_j}`` if ``decay_to_end`` else ``e^{G_j}``.
    """
    batch, heads, steps, dx = x.shape
    dy = y.shape[-1]
    chunk = cum.shape[2] // n_chunks
    block_x, block_y, _ = block_sizes(dx, dy)
    out = _dispatch.new_output((batch, n_chunks, heads, dx, dy), torch.float32, x.device)
    _chunk_outer_kernel[(n_chunks * batch * heads, triton.cdiv(dy, block_y))](
        x, y, cum, out, steps, heads, n_chunks, dx, dy, *gate_columns(cum),
        CHUNK=chunk, BLOCK_X=block_x, BLOCK_Y=block_y, DECAY_TO_END=decay_to_end,
        PRECISION=dot_precision(x.dtype), **launch_options(chunk),
    )
    return out


def chunk_states(k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                 initial_state: torch.Tensor | None,
                 chunk_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(cum, decay, starts, ends)`` of the chunkwise recurrence, all float32.

    ``cum``: cumulative log gates ``[B, H, n·C, dg]``; ``decay``: ``e^{G_last}`` as
    ``[B, n, H, dg, 1]``; ``starts`` / ``ends``: the state entering / leaving every
    chunk, ``[B, n, H, dk, dv]`` (``starts[:, 0]`` is the initial state or 0).
    """
    cum = chunk_cumulative_gates(log_gate, chunk_size, torch.float32)   # [B, H, n, C, dg]
    n_chunks = cum.shape[2]
    decay = cum[:, :, :, -1].exp().transpose(1, 2).unsqueeze(-1)        # [B, n, H, dg, 1]
    cum = cum.flatten(2, 3).contiguous()                                  # [B, H, n·C, dg]
    delta = chunk_outer(k, v, cum, n_chunks, decay_to_end=True)          # [B, n, H, dk, dv]
    ends = first_order_scan(decay, delta, initial_state, backend="triton")  # [B, n, H, dk, dv]
    first = torch.zeros_like(ends[:, :1]) if initial_state is None else initial_state.float().unsqueeze(1)
    starts = torch.cat([first, ends[:, :-1]], dim=1).contiguous()         # [B, n, H, dk, dv]
    return cum, decay, starts, ends
