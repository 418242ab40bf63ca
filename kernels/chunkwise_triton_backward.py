"""Triton backward for :func:`psmsearch.kernels.chunk_gated_linear_attention`.

Notation as in :mod:`.chunkwise`: per batch·head and chunk ``n`` with cumulative
log gates ``G`` (``[C, dk]``), state entering the chunk ``S_prev`` and leaving it
``S_end``::

    o_i   = scale [ (q_i ⊙ e^{G_i}) S_prev + Σ_{j<=i} A_ij v_j ],   A_ij = Σ_c q_ic k_jc e^{G_ic - G_jc}
    S_end = e^{G_last} ⊙ S_prev + Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ

Given ``dO`` and the gradient of the final state, the backward is:

1. ``D_n``, the gradient reaching each chunk's end state, by a *reverse*
   first-order scan over chunks (Triton backend): ``X_n = scale (q ⊙ e^G)ᵀ dO_n
   + e^{G_last,n} ⊙ X_{n+1}`` from ``X_N = dS_final``; then ``D_n = X_{n+1}`` and
   the initial state's gradient is ``X_0``.
2. ``_chunk_scores_kernel``: the forward scores ``A`` and ``dA = scale · dO Vᵀ``
   (causal) of every chunk, ``[C, C]`` each, into scratch buffers.
3. ``_chunk_dqk_kernel``::

       dq_i = scale e^{G_i} ⊙ (dO_i S_prevᵀ) + Σ_{j<=i} dA_ij k_j ⊙ e^{G_i - G_j}
       dk_j = e^{G_last - G_j} ⊙ (D v_j)     + Σ_{i>=j} dA_ij q_i ⊙ e^{G_i - G_j}

   with the intra-chunk sums in 16-step sub-blocks exactly as the forward
   (a reference point between query and key off the diagonal; inside a
   diagonal sub-block one row at a time, masked before ``exp``).
4. ``_chunk_dv_kernel``: ``dv_j = scale Σ_{i>=j} A_ij dO_i + D_nᵀ (k_j ⊙ e^{G_last - G_j})``.
5. The gates, in PyTorch (``O(T dk)``): every ``G`` enters as ``q e^{+G}`` or
   ``k e^{-G}``, so ``dG = q ⊙ dq - k ⊙ dk``, plus, at each chunk's last row,
   ``Σ_v D ⊙ S_end`` (``S_end`` depends on ``G_last`` with factor 1). The log
   gates' gradient is the reverse cumulative sum of ``dG`` inside each chunk,
   summed over channels for scalar gates, and 0 where a log gate lies below
   ``LOG_GATE_FLOOR`` (the forward used the floor there; the reference's clamp
   has that gradient too).

``S_prev`` and ``S_end`` are recomputed with the forward's own kernels instead of
being saved, so training memory is that of the inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _dispatch
from .chunkwise import LOG_GATE_FLOOR, SUB_BLOCK
from .chunkwise_triton_common import (
    block_sizes,
    chunk_and_head,
    chunk_outer,
    chunk_states,
    dot_precision,
    exact_block_scores,
    gate_columns,
    launch_options,
    load_row,
    load_tile,
)
from .first_order_scan import first_order_scan

Gradients = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]


@triton.jit
def _chunk_scores_kernel(
    Q, K, V, DO, G, A, DA,
    T, n_chunks, DK, DV, g_row, stride_gk, scale,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    K_SLICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (chunk, batch·head): ``A`` (forward scores) and ``dA = scale dO Vᵀ``, both causal ``[C, C]``."""
    pid_n, bh = chunk_and_head(n_chunks)
    Q += bh * T * DK
    K += bh * T * DK
    V += bh * T * DV
    DO += bh * T * DV
    G += bh * n_chunks * CHUNK * g_row
    A += (bh * n_chunks + pid_n) * CHUNK * CHUNK
    DA += (bh * n_chunks + pid_n) * CHUNK * CHUNK
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < DK
    sub = tl.arange(0, SUB)
    for qi in tl.static_range(CHUNK // SUB):
        q_rows = pid_n * CHUNK + qi * SUB + sub  # [SUB]
        q_ok = q_rows < T
        q = load_tile(Q, q_rows, kk, DK, 1, q_ok, k_ok)                          # [SUB, BK]
        cum_q = load_tile(G, q_rows, kk, g_row, stride_gk, q_rows >= 0, k_ok)    # [SUB, BK]
        for kj in tl.static_range(CHUNK // SUB):
            out_ptr = A + (qi * SUB + sub)[:, None] * CHUNK + (kj * SUB + sub)[None, :]
            if kj < qi:
                k_rows = pid_n * CHUNK + kj * SUB + sub
                k = load_tile(K, k_rows, kk, DK, 1, k_rows < T, k_ok)
                cum_k = load_tile(G, k_rows, kk, g_row, stride_gk, k_rows >= 0, k_ok)
                ref = load_row(G + (pid_n * CHUNK + kj * SUB + SUB - 1) * g_row, kk, stride_gk, k_ok)
                q_ref = q * tl.exp(cum_q - ref[None, :])  # exponent <= 0
                k_ref = k * tl.exp(ref[None, :] - cum_k)  # exponent <= 0
                tl.store(out_ptr, tl.dot(q_ref, tl.trans(k_ref), input_precision=PRECISION))
            elif kj == qi:
                tl.store(out_ptr, exact_block_scores(Q, K, G, q_rows, q_ok, DK, g_row, stride_gk,
                                                      SUB, BLOCK_K, K_SLICE))
            else:
                tl.store(out_ptr, tl.zeros([SUB, SUB], dtype=tl.float32))

    rows = pid_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    row_ok = rows < T
    d_scores = tl.zeros([CHUNK, CHUNK], dtype=tl.float32)
    for v0 in range(0, DV, BLOCK_V):
        vv = v0 + tl.arange(0, BLOCK_V)
        v_ok = vv < DV
        d_out = load_tile(DO, rows, vv, DV, 1, row_ok, v_ok)  # [C, BV]
        v = load_tile(V, rows, vv, DV, 1, row_ok, v_ok)       # [C, BV]
        d_scores += tl.dot(d_out, tl.trans(v), input_precision=PRECISION)
    idx = tl.arange(0, CHUNK)
    d_scores = tl.where(idx[:, None] >= idx[None, :], d_scores * scale, 0.0)
    tl.store(DA + idx[:, None] * CHUNK + idx[None, :], d_scores)


@triton.jit
def _chunk_dqk_kernel(
    Q, K, V, DO, G, S_PREV, D_END, DA, DQ, DK_OUT,
    T, H, n_chunks, DK, DV, g_row, stride_gk, scale,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Per (chunk, batch·head): ``dq`` and ``dk`` of the chunk's rows, ``[C, dk]`` each."""
    pid_n, bh = chunk_and_head(n_chunks)
    Q += bh * T * DK
    K += bh * T * DK
    V += bh * T * DV
    DO += bh * T * DV
    DQ += bh * T * DK
    DK_OUT += bh * T * DK
    G += bh * n_chunks * CHUNK * g_row
    DA += (bh * n_chunks + pid_n) * CHUNK * CHUNK
    state_offset = (((bh // H) * n_chunks + pid_n) * H + bh % H) * DK * DV
    S_PREV += state_offset
    D_END += state_offset
    kk = tl.arange(0, BLOCK_K)
    k_ok = kk < DK
    sub = tl.arange(0, SUB)
    chunk_start = pid_n * CHUNK
    last = load_row(G + (chunk_start + CHUNK - 1) * g_row, kk, stride_gk, k_ok)  # [BK]

    for qi in tl.static_range(CHUNK // SUB):
        q_rows = chunk_start + qi * SUB + sub
        q_ok = q_rows < T
        cum_q = load_tile(G, q_rows, kk, g_row, stride_gk, q_rows >= 0, k_ok)  # [SUB, BK]
        inter = tl.zeros([SUB, BLOCK_K], dtype=tl.float32)
        for v0 in range(0, DV, BLOCK_V):
            vv = v0 + tl.arange(0, BLOCK_V)
            v_ok = vv < DV
            d_out = load_tile(DO, q_rows, vv, DV, 1, q_ok, v_ok)     # [SUB, BV]
            s_prev = load_tile(S_PREV, kk, vv, DV, 1, k_ok, v_ok)    # [BK, BV]
            inter += tl.dot(d_out, tl.trans(s_prev), input_precision=PRECISION)
        dq = inter * tl.exp(cum_q) * scale  # [SUB, BK]
        for kj in range(qi):
            k_rows = chunk_start + kj * SUB + sub
            k = load_tile(K, k_rows, kk, DK, 1, k_rows < T, k_ok)
            cum_k = load_tile(G, k_rows, kk, g_row, stride_gk, k_rows >= 0, k_ok)
            ref = load_row(G + (chunk_start + kj * SUB + SUB - 1) * g_row, kk, stride_gk, k_ok)
            d_scores = tl.load(DA + (qi * SUB + sub)[:, None] * CHUNK + (kj * SUB + sub)[None, :])
            k_ref = k * tl.exp(ref[None, :] - cum_k)  # exponent <= 0
            dq += tl.dot(d_scores, k_ref, input_precision=PRECISION) * tl.exp(cum_q - ref[None, :])
        for jj in range(SUB):
            j_row = chunk_start + qi * SUB + jj
            k_j = load_row(K + j_row.to(tl.int64) * DK, kk, 1, k_ok & (kk * 0 + j_row < T))  # [BK]
            cum_j = load_row(G + j_row * g_row, kk, stride_gk, k_ok)                 # [BK]
            d_col = tl.load(DA + (qi * SUB + sub) * CHUNK + qi * SUB + jj)         # [SUB]
            lag = tl.where((sub >= jj)[:, None], cum_q - cum_j[None, :], float("-inf"))
            dq += d_col[:, None] * k_j[None, :] * tl.exp(lag)
        tl.store(DQ + q_rows[:, None].to(tl.int64) * DK + kk[None, :], dq,
                 mask=q_ok[:, None] & k_ok[None, :])

    for kj in tl.static_range(CHUNK // SUB):
        k_rows = chunk_start + kj * SUB + sub
        k_row_ok = k_rows < T
        cum_k = load_tile(G, k_rows, kk, g_row, stride_gk, k_rows >= 0, k_ok)  # [SUB, BK]
        from_state = tl.zeros([SUB, BLOCK_K], dtype=tl.float32)
        for v0 in range(0, DV, BLOCK_V):
            vv = v0 + tl.arange(0, BLOCK_V)
            v_ok = vv < DV
            v = load_tile(V, k_rows, vv, DV, 1, k_row_ok, v_ok)        # [SUB, BV]
            d_end = load_tile(D_END, kk, vv, DV, 1, k_ok, v_ok)        # [BK, BV]
            from_state += tl.dot(v, tl.trans(d_end), input_precision=PRECISION)
        dk = from_state * tl.exp(last[None, :] - cum_k)  # exponent <= 0
        ref = load_row(G + (chunk_start + kj * SUB + SUB - 1) * g_row, kk, stride_gk, k_ok)
        for qi in range(kj + 1, CHUNK // SUB):
            q_rows = chunk_start + qi * SUB + sub
            q = load_tile(Q, q_rows, kk, DK, 1, q_rows < T, k_ok)
            cum_q = load_tile(G, q_rows, kk, g_row, stride_gk, q_rows >= 0, k_ok)
            d_scores = tl.load(DA + (qi * SUB + sub)[:, None] * CHUNK + (kj * SUB + sub)[None, :])
            q_ref = q * tl.exp(cum_q - ref[None, :])  # exponent <= 0
            dk += tl.dot(tl.trans(d_scores), q_ref, input_precision=PRECISION) * tl.exp(ref[None, :] - cum_k)
        for ii in range(SUB):
            i_row = chunk_start + kj * SUB + ii
            q_i = load_row(Q + i_row.to(tl.int64) * DK, kk, 1, k_ok & (kk * 0 + i_row < T))  # [BK]
            cum_i = load_row(G + i_row * g_row, kk, stride_gk, k_ok)                 # [BK]
            d_row = tl.load(DA + (kj * SUB + ii) * CHUNK + kj * SUB + sub)         # [SUB]
            lag = tl.where((sub <= ii)[:, None], cum_i[None, :] - cum_k, float("-inf"))
            dk += d_row[:, None] * q_i[None, :] * tl.exp(lag)
        tl.store(DK_OUT + k_rows[:, None].to(tl.int64) * DK + kk[None, :], dk,
                 mask=k_row_ok[:, None] & k_ok[None, :])


@triton.jit
def _chunk_dv_kernel(
    K, DO, G, A, D_END, DV_OUT,
    T, H, n_chunks, DK, DV, g_row, stride_gk, scale,
    CHUNK: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr, PRECISION: tl.constexpr,
):
    """Per (dv block, chunk, batch·head): ``dv = scale Aᵀ dO + (k ⊙ e^{G_last - G}) D``, ``[C, BV]``."""
    pid_n, bh = chunk_and_head(n_chunks)
    pid_v = tl.program_id(1)
    rows = pid_n * CHUNK + tl.arange(0, CHUNK)  # [C]
    row_ok = rows < T
    idx = tl.arange(0, CHUNK)
    kk = tl.arange(0, BLOCK_K)
    vv = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    k_ok, v_ok = kk < DK, vv < DV
    G += bh * n_chunks * CHUNK * g_row
    A += (bh * n_chunks + pid_n) * CHUNK * CHUNK
    D_END += (((bh // H) * n_chunks + pid_n) * H + bh % H) * DK * DV
    scores = tl.load(A + idx[:, None] * CHUNK + idx[None, :])           # [C, C]
    d_out = load_tile(DO + bh * T * DV, rows, vv, DV, 1, row_ok, v_ok)       # [C, BV]
    dv = tl.dot(tl.trans(scores), d_out, input_precision=PRECISION) * scale
    k = load_tile(K + bh * T * DK, rows, kk, DK, 1, row_ok, k_ok)            # [C, BK]
    cum = load_tile(G, rows, kk, g_row, stride_gk, rows >= 0, k_ok)          # [C, BK]
    last = load_row(G + (pid_n * CHUNK + CHUNK - 1) * g_row, kk, stride_gk, k_ok)
    d_end = load_tile(D_END, kk, vv, DV, 1, k_ok, v_ok)                      # [BK, BV]
    dv += tl.dot(k * tl.exp(last[None, :] - cum), d_end, input_precision=PRECISION)
    tl.store(DV_OUT + bh * T * DV + rows[:, None].to(tl.int64) * DV + vv[None, :], dv,
             mask=row_ok[:, None] & v_ok[None, :])


def chunk_gla_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                       initial_state: torch.Tensor | None, chunk_size: int, scale: float,
                       d_out: torch.Tensor | None, d_final: torch.Tensor | None) -> Gradients:
    """Gradients ``(dq, dk, dv, d_log_gate, d_initial_state)`` in the inputs' dtypes.

    ``d_out`` (``[B, H, T, dv]``) and ``d_final`` (``[B, H, dk, dv]``) are the
    gradients of the two forward outputs; either may be None (no gradient).
    """
    batch, heads, steps, dk = q.shape
    dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cum, decay, starts, ends = chunk_states(k, v, log_gate, initial_state, chunk_size)
    n_chunks = ends.shape[1]
    g_cols = gate_columns(cum)
    d_out = torch.zeros_like(v) if d_out is None else d_out.contiguous()   # [B, H, T, dv]
    d_final = ends.new_zeros(batch, heads, dk, dv) if d_final is None else d_final.float()

    from_outputs = chunk_outer(q, d_out, cum, n_chunks, decay_to_end=False) * scale  # [B, n, H, dk, dv]
    into_chunk = first_order_scan(decay, from_outputs, d_final, reverse=True, backend="triton")
    d_end = torch.cat([into_chunk[:, 1:], d_final.unsqueeze(1)], dim=1).contiguous()  # [B, n, H, dk, dv]

    block_k, block_v, k_slice = block_sizes(dk, dv)
    precision = dot_precision(q.dtype)
    launch = launch_options(chunk_size)
    device = q.device
    scores = _dispatch.new_output((batch, heads, n_chunks, chunk_size, chunk_size), torch.float32, device)
    d_scores = _dispatch.new_output(scores.shape, torch.float32, device)
    _chunk_scores_kernel[(n_chunks * batch * heads,)](
        q, k, v, d_out, cum, scores, d_scores, steps, n_chunks, dk, dv, *g_cols, scale,
        CHUNK=chunk_size, SUB=SUB_BLOCK, BLOCK_K=block_k, BLOCK_V=block_v,
        K_SLICE=k_slice, PRECISION=precision, **launch,
    )
    dq = _dispatch.new_output((batch, heads, steps, dk), torch.float32, device)
    dk_out = _dispatch.new_output((batch, heads, steps, dk), torch.float32, device)
    _chunk_dqk_kernel[(n_chunks * batch * heads,)](
        q, k, v, d_out, cum, starts, d_end, d_scores, dq, dk_out,
        steps, heads, n_chunks, dk, dv, *g_cols, scale,
        CHUNK=chunk_size, SUB=SUB_BLOCK, BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=precision, **launch,
    )
    dv_out = _dispatch.new_output((batch, heads, steps, dv), torch.float32, device)
    _chunk_dv_kernel[(n_chunks * batch * heads, triton.cdiv(dv, block_v))](
        k, d_out, cum, scores, d_end, dv_out, steps, heads, n_chunks, dk, dv, *g_cols, scale,
        CHUNK=chunk_size, BLOCK_K=block_k, BLOCK_V=block_v, PRECISION=precision, **launch,
    )
    d_gate = _log_gate_gradient(q, k, dq, dk_out, d_end, ends, chunk_size, log_gate.dim() == 3)
    d_gate = d_gate.masked_fill(log_gate < LOG_GATE_FLOOR, 0.0)  # floored gates: as the reference's clamp
    d_initial = None if initial_state is None else into_chunk[:, 0].to(initial_state.dtype)
    return dq.to(q.dtype), dk_out.to(k.dtype), dv_out.to(v.dtype), d_gate.to(log_gate.dtype), d_initial


def _log_gate_gradient(q: torch.Tensor, k: torch.Tensor, dq: torch.Tensor, dk: torch.Tensor,
                       d_end: torch.Tensor, ends: torch.Tensor, chunk_size: int,
                       scalar_gate: bool) -> torch.Tensor:
    """``d log_gate``: reverse cumulative sum inside each chunk of ``dG = q dq - k dk`` (+ last row)."""
    batch, heads, steps, dk_width = q.shape
    n_chunks = ends.shape[1]
    d_cum = q.float() * dq - k.float() * dk                                   # [B, H, T, dk]
    d_cum = torch.nn.functional.pad(d_cum, (0, 0, 0, n_chunks * chunk_size - steps))
    d_cum = d_cum.unflatten(2, (n_chunks, chunk_size))                        # [B, H, n, C, dk]
    d_cum[:, :, :, -1] += (d_end * ends).sum(-1).transpose(1, 2)              # [B, H, n, dk]
    d_gate = d_cum.flip(3).cumsum(3).flip(3).flatten(2, 3)[:, :, :steps]      # [B, H, T, dk]
    return d_gate.sum(-1) if scalar_gate else d_gate
