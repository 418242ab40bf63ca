"""Triton forward and backward for :func:`psmsearch.kernels.chunk_gated_linear_attention`.

Forward, all with float32 arithmetic:

1. :func:`.chunkwise_triton_common.chunk_states`: per (batch·head, chunk) the
   chunk's state contribution ``Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ``, then
   :func:`first_order_scan` (Triton backend) over chunks with the diagonal gates
   ``e^{G_last}``: the state entering and leaving every chunk.
2. ``_chunk_output_kernel``: per (batch·head, chunk, dv block) the output, the
   inter-chunk part ``(q ⊙ e^{G}) S_prev`` plus the intra-chunk part in 16-step
   sub-blocks: off-diagonal blocks as matmuls with a reference point between
   query and key, diagonal blocks exactly per channel (see
   :func:`psmsearch.kernels.chunkwise._diagonal_gate_scores`).

Backward: Triton kernels in :mod:`.chunkwise_triton_backward` (a reverse scan
over chunks for the state gradients, then per-chunk ``dq``, ``dk``, ``dv`` and
the gates); only the inputs are saved, chunk states are recomputed.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from . import _dispatch
from .chunkwise import SUB_BLOCK, TRITON_CHUNK_SIZES, chunk_gla_reference
from .chunkwise_triton_backward import chunk_gla_backward
from .chunkwise_triton_common import (
    block_sizes,
    chunk_and_head,
    chunk_states,
    dot_precision,
    exact_block_scores,
    gate_columns,
    launch_options,
    load_row,
    load_tile,
)
from .first_order_scan_autograd import (
    NESTED_FORWARD_MODE,
    NO_SECOND_DERIVATIVE,
    fold_vmap_dim,
    functorch_jvp_depth,
    vmap_dim_first,
)


@triton.jit
def _chunk_output_kernel(
    Q, K, V, G, S_PREV, O,
    T, H, n_chunks, DK, DV, g_row, stride_gk, scale,
    CHUNK: tl.constexpr, SUB: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
    K_SLICE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Outputs of one chunk and dv block: inter-chunk term plus the causal intra-chunk sum."""
    pid_n, bh = chunk_and_head(n_chunks)
    pid_v = tl.program_id(1)
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
        q = load_tile(Q, q_rows, kk, DK, 1, q_ok, k_ok)                   # [SUB, BK]
        cum_q = load_tile(G, q_rows, kk, g_row, stride_gk, q_rows >= 0, k_ok)
        acc = tl.dot(q * tl.exp(cum_q), s_prev, input_precision=PRECISION)  # [SUB, BV]
        for kj in tl.static_range(qi):
            k_rows = pid_n * CHUNK + kj * SUB + tl.arange(0, SUB)
            k_ok_rows = k_rows < T
            k = load_tile(K, k_rows, kk, DK, 1, k_ok_rows, k_ok)
            v = load_tile(V, k_rows, vv, DV, 1, k_ok_rows, v_ok)
            cum_k = load_tile(G, k_rows, kk, g_row, stride_gk, k_rows >= 0, k_ok)
            ref_row = pid_n * CHUNK + kj * SUB + SUB - 1
            ref = load_row(G + ref_row * g_row, kk, stride_gk, k_ok)  # [BK]
            q_ref = q * tl.exp(cum_q - ref[None, :])  # query after the reference: exponent <= 0
            k_ref = k * tl.exp(ref[None, :] - cum_k)  # key before the reference: exponent <= 0
            scores = tl.dot(q_ref, tl.trans(k_ref), input_precision=PRECISION)  # [SUB, SUB]
            acc += tl.dot(scores, v, input_precision=PRECISION)
        v_diag = load_tile(V, q_rows, vv, DV, 1, q_ok, v_ok)
        diag = exact_block_scores(Q, K, G, q_rows, q_ok, DK, g_row, stride_gk, SUB, BLOCK_K, K_SLICE)
        acc += tl.dot(diag, v_diag, input_precision=PRECISION)
        out_ptr = O + q_rows[:, None].to(tl.int64) * DV + vv[None, :]
        tl.store(out_ptr, acc * scale, mask=q_ok[:, None] & v_ok[None, :])


def chunk_gla_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                     initial_state: torch.Tensor | None, chunk_size: int,
                     scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton chunkwise GLA: ``(o [B, H, T, dv] in q's dtype, final state [B, H, dk, dv] float32)``."""
    if chunk_size not in TRITON_CHUNK_SIZES:
        raise ValueError(f"the Triton backend needs chunk_size in {TRITON_CHUNK_SIZES} "
                         f"(a [C, C] score tile per chunk must fit in shared memory), got {chunk_size}")
    return _ChunkGLATriton.apply(q, k, v, log_gate, initial_state, chunk_size, scale)


_REFERENCE_HINT = "; backend='reference' is differentiable to any order"


class _ChunkGLATriton(torch.autograd.Function):
    """Triton forward and backward; saves only the inputs.

    In the form ``torch.func`` needs, like :class:`.first_order_scan_autograd.FirstOrderScan`:
    the backward is a vmappable Function of its own (first derivatives only),
    ``vmap`` folds the vmapped dim into the batch, and forward mode (``jvp``)
    differentiates the PyTorch reference (a recomputation on the same device).
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,  # type: ignore[override]
                initial_state: torch.Tensor | None, chunk_size: int,
                scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        return _forward(q, k, v, log_gate, initial_state, chunk_size, scale)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[torch.Tensor, torch.Tensor]) -> None:
        q, k, v, log_gate, initial_state, chunk_size, scale = inputs
        ctx.save_for_backward(q, k, v, log_gate, initial_state)
        ctx.save_for_forward(q, k, v, log_gate, initial_state)
        ctx.chunk_size, ctx.scale = chunk_size, scale
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, d_out: torch.Tensor | None,  # type: ignore[override]
                 d_final: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        if d_out is None and d_final is None:
            return (None,) * 7
        q, k, v, log_gate, initial_state = ctx.saved_tensors
        grads = _ChunkGLATritonGradients.apply(q, k, v, log_gate, initial_state, ctx.chunk_size, ctx.scale,
                                               d_out, d_final)
        needed = [g if need else None for g, need in zip(grads, ctx.needs_input_grad[:5])]
        if d_out is None:
            needed[0] = None  # q reaches the outputs only: None, as autograd through the reference gives
        return (*needed, None, None)

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The tangent ``J ẋ`` of the PyTorch reference, as a vjp of its vjp.

        The reference's pullback ``u -> Jᵀ u`` is linear in ``u``, so its own vjp at
        ``u = 0`` with cotangent ``ẋ`` is ``J ẋ``. Reverse mode twice, rather than
        ``torch.func.jvp``, because a forward-mode level opened here would nest in
        the caller's (forbidden under ``torch.autograd.forward_ad``, and mistaken for
        forward over forward under ``torch.func``).
        """
        if (functorch_jvp_depth() or 0) > 1:
            raise RuntimeError(NESTED_FORWARD_MODE.format(kernel="chunk_gated_linear_attention (Triton)"))
        primals = ctx.saved_tensors
        given = [k for k, x in enumerate(primals) if x is not None]             # initial_state may be None

        def reference(*inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            full: list[torch.Tensor | None] = [None] * len(primals)
            for k, x in zip(given, inputs):
                full[k] = x
            return chunk_gla_reference(*full, ctx.chunk_size, ctx.scale)

        directions = tuple(torch.zeros_like(primals[k]) if tangents[k] is None else tangents[k] for k in given)
        with torch.enable_grad():
            outputs, pullback = torch.func.vjp(reference, *(primals[k] for k in given))
            _, pushforward = torch.func.vjp(pullback, tuple(torch.zeros_like(out) for out in outputs))
            (output_tangents,) = pushforward(directions)
        return output_tangents

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             log_gate: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int,
             scale: float) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[int, int]]:
        """One call over ``V B`` sequences: the vmapped dim folded into the batch."""
        batch, folded = _fold_batch(info.batch_size, in_dims[:5], (q, k, v, log_gate, initial_state))
        o, final = _ChunkGLATriton.apply(*folded, chunk_size, scale)
        return (o.unflatten(0, (info.batch_size, batch)), final.unflatten(0, (info.batch_size, batch))), (0, 0)


class _ChunkGLATritonGradients(torch.autograd.Function):
    """``(dq, dk, dv, d_log_gate, d_initial_state)`` from the Triton backward kernels.

    A Function of its own so that the backward can run under ``vmap``; not differentiable.
    """

    @staticmethod
    def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,  # type: ignore[override]
                initial_state: torch.Tensor | None, chunk_size: int, scale: float,
                d_out: torch.Tensor | None, d_final: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return tuple(chunk_gla_backward(q, k, v, log_gate, initial_state, chunk_size, scale, d_out, d_final))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        ctx.set_materialize_grads(False)

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:  # type: ignore[override]
        raise RuntimeError(NO_SECOND_DERIVATIVE.format(kernel="chunk_gated_linear_attention (Triton)", hint=_REFERENCE_HINT))

    @staticmethod
    def jvp(ctx: Any, *tangents: Any) -> Any:
        raise RuntimeError(NO_SECOND_DERIVATIVE.format(kernel="chunk_gated_linear_attention (Triton)", hint=_REFERENCE_HINT))

    @staticmethod
    def vmap(info: Any, in_dims: tuple[int | None, ...], q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             log_gate: torch.Tensor, initial_state: torch.Tensor | None, chunk_size: int, scale: float,
             d_out: torch.Tensor | None, d_final: torch.Tensor | None) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
        tensors = (q, k, v, log_gate, initial_state, d_out, d_final)
        dims = (*in_dims[:5], *in_dims[7:9])
        batch, folded = _fold_batch(info.batch_size, dims, tensors)
        grads = _ChunkGLATritonGradients.apply(*folded[:5], chunk_size, scale, *folded[5:])
        unfolded = tuple(None if g is None else g.unflatten(0, (info.batch_size, batch)) for g in grads)
        return unfolded, tuple(None if g is None else 0 for g in grads)


def _fold_batch(size: int, dims: tuple[int | None, ...],
                tensors: tuple[torch.Tensor | None, ...]) -> tuple[int, list[torch.Tensor | None]]:
    """In a vmap rule: every tensor as ``[V B, ...]`` (batch dim first in all of them), and ``B``."""
    moved = [None if x is None else vmap_dim_first(x, d, size) for x, d in zip(tensors, dims)]  # [V, B, ...]
    batch = next(x.shape[1] for x in moved if x is not None)
    return batch, [None if x is None else fold_vmap_dim(x) for x in moved]


def _forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
             initial_state: torch.Tensor | None, chunk_size: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    batch, heads, steps, dk = q.shape
    dv = v.shape[-1]
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    cum, _, starts, ends = chunk_states(k, v, log_gate, initial_state, chunk_size)
    n_chunks = ends.shape[1]
    block_k, block_v, k_slice = block_sizes(dk, dv)
    o = _dispatch.new_output((batch, heads, steps, dv), q.dtype, q.device)
    _chunk_output_kernel[(n_chunks * batch * heads, triton.cdiv(dv, block_v))](
        q, k, v, cum, starts, o, steps, heads, n_chunks, dk, dv, *gate_columns(cum), scale,
        CHUNK=chunk_size, SUB=SUB_BLOCK, BLOCK_K=block_k, BLOCK_V=block_v,
        K_SLICE=k_slice, PRECISION=dot_precision(q.dtype), **launch_options(chunk_size),
    )
    return o, ends[:, -1].contiguous()
