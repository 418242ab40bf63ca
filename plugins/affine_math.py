"""The state, the features and the chunk maths that the affine encoders, aggregators and heads share.

Every affine model keeps, per head, a matrix state ``S ∈ R^{d_k × d_v}`` updated as
``S_t = E_t ▷ S_{t-1} + k_t v_tᵀ`` and read out as ``o_t = S_tᵀ q_t`` (the overview is in
:mod:`psmsearch.plugins.affine`). This module holds what more than one kind of component needs: the
state kinds, the :data:`Features` and :data:`AffineState` layouts, the dtype rules, and the
summaries (a chunk -> its ``(E, S)``) and readouts (prefix ``S`` and a chunk -> ``o``) for decays
and for the delta rule.

Representation. Encoder features are ``(q, k, v, gate, out_gate)`` with the chunk axis right after
the batch dims: ``q, k [*, c, H, dk]``, ``v [*, c, H, dv]``; the gate is the token's log-decay
``[*, c, H, 1]`` (scalar kinds) or ``[*, c, H, dk]`` (diagonal), or DeltaNet's ``β [*, c, H]``;
``out_gate [*, c, H, dv]`` are the output gate's logits (GLA's ``r``, Mamba2's ``z``), or
``[*, c, H, 0]`` when the encoder's ``output_gate`` is off. mLSTM's values carry one more column of
ones, the input of its normaliser, which its head divides by
(:class:`~psmsearch.plugins.affine_encoders.MLSTMEncoder`).
Scalar and diagonal decays are one code path: a scalar gate is a diagonal one of width 1 that
broadcasts over ``dk``. Their states store ``E`` as its logarithm (``log E [*, H]`` or
``[*, H, dk]``, identity 0) so that cumulative transitions are sums of log-decays, never products
that underflow to 0 and then break ``log`` in a backward pass (log-decays are floored at -50, as in
the kernel, so a decay of exactly 0 is allowed); DeltaNet stores ``E [*, H, dk, dk]``
itself (identity ``I``). Chunk summaries and heads use intra-chunk matmuls: decay masks are
``exp`` of differences of cumulative log-decays taken only where they are ``<= 0``; DeltaNet uses
the WY/UT transform (one batched unit-triangular solve per chunk, no loop over tokens).

Precision. Decay summaries and readouts compute in float32 for 16-bit inputs (as the kernels and
:func:`_wy` do) and round only their results.
"""

from __future__ import annotations

import torch

from psmsearch.kernels.chunkwise import LOG_GATE_FLOOR, intra_chunk_scores

SCALAR = "affine-scalar"
NORMALIZED = "affine-scalar-normalized"
DIAG = "affine-diag"
DENSE = "affine-dense"

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (q, k, v, gate, out_gate)
AffineState = tuple[torch.Tensor, torch.Tensor]  # (log E or E, S)


def _broadcast_transition(log_e: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """``exp(log E)`` shaped to scale ``memory[*, H, dk, dv]`` row-wise (``[*, H, 1|dk, 1]``)."""
    trailing = (1,) * (memory.dim() - log_e.dim())
    return log_e.exp().reshape(*log_e.shape, *trailing)  # [*, H, 1|dk, 1]


def _accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype the decay math runs in: float32 where the inputs promote to a 16-bit type.

    A bf16 ``cumsum`` of log-decays, its ``exp`` and bf16 einsums lost about 3% (GLA at c = 64,
    against the same weights in float64) where the fused kernel, which computes in float32, lost
    0.7%; so the generic and streaming paths also compute in float32 (as :func:`_wy` does for
    DeltaNet) and round only their results back to the inputs' dtype.
    """
    dtype = _promoted_dtype(*tensors)
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _promoted_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The dtype PyTorch's type promotion gives ``tensors`` together (what their einsums returned)."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _floored(log_a: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Log-decays in ``dtype``, raised to :data:`~psmsearch.kernels.chunkwise.LOG_GATE_FLOOR` as the kernel does.

    A decay of exactly 0 (``log a = -inf``, a hard reset; or a 16-bit overflow) made the differences of
    cumulative log-decays ``-inf - (-inf) = NaN`` in the summaries and readouts, where the fused kernel,
    which floors them, gave the recurrence's value. ``e^-50`` is negligible in every dtype, and a floored
    gate's gradient is 0, as in the kernel.
    """
    return log_a.to(dtype).clamp(min=LOG_GATE_FLOOR)


def _decay_summary(k: torch.Tensor, v: torch.Tensor, log_a: torch.Tensor) -> AffineState:
    """A complete chunk's ``(log E, S)`` for scalar/diagonal decays (``log E`` keeps the gate width).

    Computed in float32 at least (:func:`_accumulation_dtype`); ``log E`` comes back in
    ``log_a``'s dtype and ``S`` in that of ``k`` and ``v``.
    """
    dtype = _accumulation_dtype(k, v, log_a)
    memory_dtype, log_dtype = _promoted_dtype(k, v), log_a.dtype
    k, v, log_a = k.to(dtype), v.to(dtype), _floored(log_a, dtype)  # [*, c, H, dk], [*, c, H, dv], [*, c, H, g]
    total = log_a.sum(dim=-3)  # [*, H, g]: log of the chunk's transition
    to_end = (total.unsqueeze(-3) - log_a.cumsum(dim=-3)).exp()  # [*, c, H, g]: decay from token s to the end
    memory = torch.einsum("...shk,...shv->...hkv", k * to_end, v)  # [*, H, dk, dv]
    return total.to(log_dtype), memory.to(memory_dtype)


def _decay_readout(prefix: torch.Tensor, f: Features) -> torch.Tensor:
    """``o_t = S_tᵀ q_t`` for scalar/diagonal decays: the decayed prefix plus the causal chunk part.

    Computed in float32 at least (:func:`_accumulation_dtype`), returned in the inputs' promoted dtype.
    """
    q, k, v, log_a = f[:4]  # [*, c', H, dk], [*, c', H, dk], [*, c', H, dv], [*, c', H, g]
    out_dtype = _promoted_dtype(q, k, v, prefix)
    dtype = _accumulation_dtype(q, k, v, log_a, prefix)
    q, k, v, prefix = (t.to(dtype) for t in (q, k, v, prefix))
    log_a = _floored(log_a, dtype)  # [*, c', H, g]
    cum = log_a.cumsum(dim=-3)  # [*, c', H, g]
    inter = torch.einsum("...thk,...hkv->...thv", q * cum.exp(), prefix)  # [*, c', H, dv]
    scores = intra_chunk_scores(*(t.transpose(-3, -2) for t in (q, k, cum)))  # [*, H, c', c']
    intra = torch.einsum("...hts,...shv->...thv", scores, v)  # [*, c', H, dv]
    return (inter + intra).to(out_dtype)


def _decay_readout_last(prefix: torch.Tensor, f: Features) -> torch.Tensor:
    """The newest row of :func:`_decay_readout` alone, ``o[*, H, dv]``, in O(c') instead of O(c'^2).

    ``o_t = (q_t ⊙ e^{G_t}) S_p + Σ_{s<=t} (Σ_c q_tc k_sc e^{G_tc - G_sc}) v_s`` with ``G`` the
    cumulative log-decays from the chunk's start: every exponent is ``<= 0`` (``G`` does not
    increase), so strong decays cannot overflow. Computed in float32 at least, like the full readout.
    """
    q, k, v, log_a = f[:4]  # [*, c', H, dk], [*, c', H, dk], [*, c', H, dv], [*, c', H, g]
    out_dtype = _promoted_dtype(q, k, v, prefix)
    dtype = _accumulation_dtype(q, k, v, log_a, prefix)
    q, k, v, prefix = (t.to(dtype) for t in (q, k, v, prefix))
    log_a = _floored(log_a, dtype)  # [*, c', H, g]
    cum = log_a.cumsum(dim=-3)  # [*, c', H, g]
    q_t, cum_t = q[..., -1, :, :], cum[..., -1, :, :]  # [*, H, dk], [*, H, g]
    inter = torch.einsum("...hk,...hkv->...hv", q_t * cum_t.exp(), prefix)  # [*, H, dv]
    weights = (q_t.unsqueeze(-3) * k * (cum_t.unsqueeze(-3) - cum).exp()).sum(-1)  # [*, c', H]
    intra = torch.einsum("...sh,...shv->...hv", weights, v)  # [*, H, dv]
    return (inter + intra).to(out_dtype)


def _wy(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """WY/UT form of a chunk of delta-rule steps ``S_t = (I - β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ``.

    Returns ``W [*, H, c, dk]`` and ``U [*, H, c, dv]`` with ``Π_{s<=t}(I - β_s k_s k_sᵀ) =
    I - Σ_{s<=t} k_s w_sᵀ`` and, from a zero state, ``S_t = Σ_{s<=t} k_s u_sᵀ``. Both follow
    ``x_t = β_t (y_t - Σ_{s<t} (k_tᵀ k_s) x_s)``, i.e. ``(I + diag(β) tril₋₁(K Kᵀ)) [W U] = diag(β) [K V]``:
    one unit-lower-triangular solve, rows depending only on earlier tokens (so partial chunks work).
    The solve runs in float32 at least (torch has no 16-bit triangular solve, and it would lose
    precision there); W and U come back in the inputs' dtype.
    """
    dtype = k.dtype
    if dtype in (torch.float16, torch.bfloat16):
        k, v, beta = k.float(), v.float(), beta.float()
    kh = k.transpose(-3, -2)  # [*, H, c, dk]
    vh = v.transpose(-3, -2)  # [*, H, c, dv]
    bh = beta.transpose(-2, -1).unsqueeze(-1)  # [*, H, c, 1]
    system = bh * (kh @ kh.transpose(-1, -2)).tril(-1)  # [*, H, c, c]; unit diagonal implied
    rhs = bh * torch.cat([kh, vh], dim=-1)  # [*, H, c, dk + dv]
    solved = torch.linalg.solve_triangular(system, rhs, upper=False, unitriangular=True)  # [*, H, c, dk + dv]
    w, u = solved.split([kh.shape[-1], vh.shape[-1]], dim=-1)  # [*, H, c, dk], [*, H, c, dv]
    return w.to(dtype), u.to(dtype)


def _delta_summary(k: torch.Tensor, v: torch.Tensor, beta: torch.Tensor) -> AffineState:
    """A complete chunk's ``(E, S)`` for the delta rule: ``E = I - Kᵀ W``, ``S = Kᵀ U``."""
    return _delta_summary_from_wy(k, *_wy(k, v, beta))


def _delta_summary_from_wy(k: torch.Tensor, w: torch.Tensor, u: torch.Tensor) -> AffineState:
    """``(E [*, H, dk, dk], S [*, H, dk, dv])`` of chunks whose WY/UT form :func:`_wy` already gave."""
    kt = k.movedim(-3, -1)  # [*, H, dk, c]
    eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)  # [dk, dk]
    return eye - kt @ w, kt @ u  # [*, H, dk, dk], [*, H, dk, dv]


def _delta_readout(prefix: torch.Tensor, f: Features) -> torch.Tensor:
    """``o_t = S_tᵀ q_t`` for the delta rule: ``O = Q S_p + tril(Q Kᵀ)(U - W S_p)``."""
    q, k, v, beta = f[:4]  # [*, c', H, dk], [*, c', H, dk], [*, c', H, dv], [*, c', H]
    return _delta_readout_from_wy(prefix, q, k, *_wy(k, v, beta))


def _delta_readout_from_wy(prefix: torch.Tensor, q: torch.Tensor, k: torch.Tensor, w: torch.Tensor,
                           u: torch.Tensor) -> torch.Tensor:
    """:func:`_delta_readout` given the chunk's ``W [*, H, c', dk]`` and ``U [*, H, c', dv]``."""
    qh = q.transpose(-3, -2)  # [*, H, c', dk]
    scores = (qh @ k.movedim(-3, -1)).tril()  # [*, H, c', c']
    o = qh @ prefix + scores @ (u - w @ prefix)  # [*, H, c', dv]
    return o.transpose(-3, -2)  # [*, c', H, dv]


def _delta_readout_last(prefix: torch.Tensor, f: Features) -> torch.Tensor:
    """The newest row of :func:`_delta_readout` alone, ``o[*, H, dv]``.

    ``o_t = q_t S_p + (q_t Kᵀ)(U - W S_p)``: the triangular solve for ``W, U`` still covers all
    ``c'`` rows (each depends on the earlier ones), but the scores and the readout are one row.
    """
    q, k, v, beta = f[:4]  # [*, c', H, dk], [*, c', H, dk], [*, c', H, dv], [*, c', H]
    w, u = _wy(k, v, beta)  # [*, H, c', dk], [*, H, c', dv]
    q_t = q[..., -1, :, :].unsqueeze(-2)  # [*, H, 1, dk]
    scores = q_t @ k.movedim(-3, -1)  # [*, H, 1, c']: the last row of tril(Q Kᵀ) is all causal
    o = q_t @ prefix + scores @ (u - w @ prefix)  # [*, H, 1, dv]
    return o.squeeze(-2)  # [*, H, dv]
