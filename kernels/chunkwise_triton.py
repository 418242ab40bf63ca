"""Triton forward for :func:`psmsearch.kernels.chunk_gated_linear_attention`.

Three steps, all with float32 arithmetic:

1. ``_chunk_state_kernel``: per (batch·head, chunk, dv block) the chunk's state
   contribution ``Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ``, written as
   ``[B, n_chunks, H, dk, dv]`` so that step 2 can scan it directly.
2. :func:`first_order_scan` (Triton backend) over chunks with the diagonal
   gates ``e^{G_last}``: the state at every chunk end.
3. ``_chunk_output_kernel``: per (batch·head, chunk, dv block) the output, the
   inter-chunk part ``(q ⊙ e^{G}) S_prev`` plus the intra-chunk part in 16-step
   sub-blocks: off-diagonal blocks as matmuls with a reference point between
   query and key, diagonal blocks exactly per channel (see
   :func:`psmsearch.kernels.chunkwise._diagonal_gate_scores`).

``G`` (cumulative log gates inside each chunk) is computed by PyTorch and
padded to whole chunks, so kernels read it without masks. Scalar gates are read
with stride 0 over the key channels.

Backward: there is no Triton backward kernel. :class:`_ChunkGLATriton` saves
the inputs and, in backward, recomputes the PyTorch reference
(:func:`psmsearch.kernels.chunkwise.chunk_gla_reference`) under autograd and
differentiates that: correct, but with the reference's speed and memory.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import _dispatch
from .chunkwise import SUB_BLOCK, chunk_cumulative_gates, chunk_gla_reference
from .first_order_scan import first_order_scan


@triton.jit
def _load_tile(ptr, rows, cols, row_stride, col_stride, row_ok, col_ok):
    """``ptr[rows, cols]`` as float32, zero outside the masks."""
    offsets = rows[:, None].to(tl.int64) * row_stride + cols[None, :] * col_stride
    return tl.load(ptr + offsets, mask=row_ok[:, None] & col_ok[None, :], other=0.0).to(tl.float32)


@triton.jit
def _chunk_state_kernel(
    K, V, G, DELTA,
    T, H, n_chunks, DK, DV, g_row, stride_gk,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """``DELTA[b, n, h] = Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ`` over chunk ``n``: ``[dk, BLOCK_V]``."""
    pid_v, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    rows = pid_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    kk = tl.arange(0, BLOCK_K)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, k_ok, v_ok = rows < T, kk < DK, vv < DV
    all_rows = rows >= 0
    G += bh * n_chunks * CHUNK * g_row
    k = _load_tile(K + bh * T * DK, rows, kk, DK, 1, row_ok, k_ok)   # [C, BK]
    v = _load_tile(V + bh * T * DV, rows, vv, DV, 1, row_ok, v_ok)   # [C, BV]
    cum = _load_tile(G, rows, kk, g_row, stride_gk, all_rows, k_ok)  # [C, BK]
    last_row = pid_n * CHUNK + CHUNK - 1
    last = tl.load(G + last_row * g_row + kk * stride_gk, mask=k_ok, other=0.0)  # [BK]
    k_decayed = k * tl.exp(last[None, :] - cum)  # exponent <= 0
    delta = tl.dot(tl.trans(k_decayed), v, input_precision=PRECISION)  # [BK, BV]
    b_idx, h_idx = bh // H, bh % H
    DELTA += ((b_idx * n_chunks + pid_n) * H + h_idx) * DK * DV
    tl.store(DELTA + kk[:, None] * DV + vv[None, :], delta, mask=k_ok[:, None] & v_ok[None, :])


@triton.jit
def _diagonal_block_scores(Q, K, G, rows, row_ok, DK, g_row, stride_gk,
                           SUB: tl.constexpr, BLOCK_K: tl.constexpr, K_SLICE: tl.constexpr):
    """Exact ``A_ij = Σ_c q_ic k_jc e^{G_ic - G_jc}`` (j <= i) inside one sub-block: ``[SUB, SUB]``."""
    idx = tl.arange(0, SUB)
    causal = idx[:, None] >= idx[None, :]  # [SUB, SUB]
    all_rows = rows >= 0
    scores = tl.zeros([SUB, SUB], dtype=tl.float32)
    for c0 in tl.static_range(0, BLOCK_K, K_SLICE):
        cc = c0 + tl.arange(0, K_SLICE)
        c_ok = cc < DK
        q = _load_tile(Q, rows, cc, DK, 1, row_ok, c_ok)                  # [SUB, KS]
        k = _load_tile(K, rows, cc, DK, 1, row_ok, c_ok)                  # [SUB, KS]
        cum = _load_tile(G, rows, cc, g_row, stride_gk, all_rows, c_ok)   # [SUB, KS]
        lag = tl.where(causal[:, :, None], cum[:, None, :] - cum[None, :, :], float("-inf"))
        scores += tl.sum(q[:, None, :] * k[None, :, :] * tl.exp(lag), axis=2)
    return scores


@triton.jit
def _chunk_output_kernel(
    Q, K, V, G, S_PREV, O,
    T, H, n_chunks, DK, DV, g_row, stride_gk, scale,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    K_SLICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Outputs of one chunk and dv block: inter-chunk term plus the causal intra-chunk sum."""
    pid_v, pid_n, bh = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    kk = tl.arange(0, BLOCK_K)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok, v_ok = kk < DK, vv < DV
    Q += bh * T * DK
    K += bh * T * DK
    V += bh * T * DV
    O += bh * T * DV
    G += bh * n_chunks * CHUNK * g_row
    b_idx, h_idx = bh // H, bh % H
    S_PREV += ((b_idx * n_chunks + pid_n) * H + h_idx) * DK * DV
    s_prev = tl.load(S_PREV + kk[:, None] * DV + vv[None, :], mask=k_ok[:, None] & v_ok[None, :], other=0.0)
    for qi in tl.static_range(CHUNK // SUB):
        q_rows = pid_n * CHUNK + qi * SUB + tl.arange(0, SUB)  # [SUB]
        q_ok = q_rows < T
        q = _load_tile(Q, q_rows, kk, DK, 1, q_ok, k_ok)                   # [SUB, BK]
        cum_q = _load_tile(G, q_rows, kk, g_row, stride_gk, q_rows >= 0, k_ok)
        acc = tl.dot(q * tl.exp(cum_q), s_prev, input_precision=PRECISION)  # [SUB, BV]
        for kj in tl.static_range(qi):
            k_rows = pid_n * CHUNK + kj * SUB + tl.arange(0, SUB)
            k_ok_rows = k_rows < T
            k = _load_tile(K, k_rows, kk, DK, 1, k_ok_rows, k_ok)
            v = _load_tile(V, k_rows, vv, DV, 1, k_ok_rows, v_ok)
            cum_k = _load_tile(G, k_rows, kk, g_row, stride_gk, k_rows >= 0, k_ok)
            ref_row = pid_n * CHUNK + kj * SUB + SUB - 1
            ref = tl.load(G + ref_row * g_row + kk * stride_gk, mask=k_ok, other=0.0)  # [BK]
            q_ref = q * tl.exp(cum_q - ref[None, :])  # query after the reference: exponent <= 0
            k_ref = k * tl.exp(ref[None, :] - cum_k)  # key before the reference: exponent <= 0
            scores = tl.dot(q_ref, tl.trans(k_ref), input_precision=PRECISION)  # [SUB, SUB]
            acc += tl.dot(scores, v, input_precision=PRECISION)
        v_diag = _load_tile(V, q_rows, vv, DV, 1, q_ok, v_ok)
        diag = _diagonal_block_scores(Q, K, G, q_rows, q_ok, DK, g_row, stride_gk, SUB, BLOCK_K, K_SLICE)
        acc += tl.dot(diag, v_diag, input_precision=PRECISION)
        out_ptr = O + q_rows[:, None].to(tl.int64) * DV + vv[None, :]
        tl.store(out_ptr, acc * scale, mask=q_ok[:, None] & v_ok[None, :])


def chunk_gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                     initial_state: torch.Tensor | None, chunk_size: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton chunkwise GLA: ``(o [B, H, T, dv] in q's dtype, final state [B, H, dk, dv] float32)``."""
    if chunk_size < SUB_BLOCK or chunk_size & (chunk_size - 1):
        raise ValueError(f"the Triton backend needs chunk_size a power of two >= {SUB_BLOCK}, got {chunk_size}")
    return _ChunkGLATriton.apply(q, k, v, log_gate, initial_state, chunk_size, scale)


class _ChunkGLATriton(torch.autograd.Function):
    """Triton forward; backward by recomputing and differentiating the PyTorch reference."""

    @staticmethod
    def forward(ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                initial_state: torch.Tensor | None, chunk_size: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(q, k, v, log_gate, initial_state)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        ctx.set_materialize_grads(False)
        return _forward(q, k, v, log_gate, initial_state, chunk_size, scale)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor | None,
                 d_final: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        saved = ctx.saved_tensors
        needs = ctx.needs_input_grad[:5]
        leaves = [x.detach().requires_grad_(need) if x is not None else None for x, need in zip(saved, needs)]
        with torch.enable_grad():
            o, final = chunk_gla_reference(*leaves, ctx.chunk_size, ctx.scale)
        pairs = [(y, dy) for y, dy in ((o, d_out), (final, d_final)) if dy is not None]
        wanted = [x for x, need in zip(leaves, needs) if need and x is not None]
        if not pairs or not wanted:
            return (None,) * 7
        grads = iter(torch.autograd.grad([y for y, _ in pairs], wanted, [dy for _, dy in pairs],
                                         allow_unused=True))
        result = [next(grads) if (need and x is not None) else None for x, need in zip(leaves, needs)]
        return (*result, None, None)


def _block_sizes(dk: int, dv: int) -> tuple[int, int, int]:
    """``(BLOCK_K, BLOCK_V, K_SLICE)``: all of dk in one block, dv split across programs."""
    block_k = max(16, triton.next_power_of_2(dk))
    block_v = min(64, max(16, triton.next_power_of_2(dv)))
    return block_k, block_v, min(block_k, 16)


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
             initial_state: torch.Tensor | None, chunk_size: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, steps, dk = q.shape
    dv = v.shape[-1]
    cum = chunk_cumulative_gates(log_gate, chunk_size, torch.float32)  # [B, H, n, C, dg]
    n_chunks, g_width = cum.shape[2], cum.shape[-1]
    decay = cum[:, :, :, -1].exp().transpose(1, 2).unsqueeze(-1)       # [B, n, H, dg, 1]
    cum = cum.flatten(2, 3).contiguous()                                 # [B, H, Tp, dg]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    block_k, block_v, k_slice = _block_sizes(dk, dv)
    precision = "ieee" if q.dtype == torch.float32 else "tf32"
    grid = (triton.cdiv(dv, block_v), n_chunks, batch * heads)
    g_cols = (g_width, 1 if g_width > 1 else 0)

    delta = _dispatch.new_output((batch, n_chunks, heads, dk, dv), torch.float32, q.device)
    _chunk_state_kernel[grid](
        k, v, cum, delta, steps, heads, n_chunks, dk, dv, *g_cols,
        CHUNK=chunk_size, BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=precision,
    )
    ends = first_order_scan(decay, delta, initial_state, backend="triton")  # [B, n, H, dk, dv]
    first = torch.zeros_like(ends[:, :1]) if initial_state is None else initial_state.float().unsqueeze(1)
    starts = torch.cat([first, ends[:, :-1]], dim=1).contiguous()          # [B, n, H, dk, dv]

    o = _dispatch.new_output((batch, heads, steps, dv), q.dtype, q.device)
    _chunk_output_kernel[grid](
        q, k, v, cum, starts, o, steps, heads, n_chunks, dk, dv, *g_cols, scale,
        CHUNK=chunk_size, SUB=SUB_BLOCK, BLOCK_K=block_k, BLOCK_V=block_v,
        K_SLICE=k_slice, PRECISION=precision,
    )
    return o, ends[:, -1].contiguous()
