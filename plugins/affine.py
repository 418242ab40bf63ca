"""Associative (affine) PSM components: linear attention, RetNet, Mamba2, mLSTM, GLA, Mamba and DeltaNet.

Every model here keeps, per head, a matrix state ``S ∈ R^{d_k × d_v}`` updated token by token as
``S_t = E_t ▷ S_{t-1} + k_t v_tᵀ`` (DeltaNet: ``+ β_t k_t v_tᵀ``) and read out as ``o_t = S_tᵀ q_t``.
The pairs ``(E, S)`` form a monoid under ``(E_old, S_old) ⊕ (E_new, S_new) =
(E_new ∘ E_old, E_new ▷ S_old + S_new)`` with identity ``(I, 0)``, so the aggregators are
associative and streaming keeps one running state. The gate type decides what ``E`` is and hence
the state kind; only triples of one kind are compatible:

==================  =====================  ================  ===================  ======================
state kind          encoders               ``E_t``           aggregator           head
==================  =====================  ================  ===================  ======================
``affine-scalar``   ``linear_attention``,  ``a_t I``         ``affine_scalar``    ``linear_readout_scalar``
                    ``retnet``, ``mamba2``
``affine-scalar-``  ``mlstm``              ``f_t I``         ``affine_scalar_``   ``linear_readout_``
``normalized``                                               ``normalized``       ``normalized``
``affine-diag``     ``gla``, ``mamba``     ``diag(α_t)``     ``affine_diag``      ``linear_readout_diag``
``affine-dense``    ``deltanet``           ``I - β k kᵀ``    ``affine_dense``     ``linear_readout_dense``
==================  =====================  ================  ===================  ======================

Representation. Encoder features are ``(q, k, v, gate, out_gate)`` with the chunk axis right after
the batch dims: ``q, k [*, c, H, dk]``, ``v [*, c, H, dv]``; the gate is the token's log-decay
``[*, c, H, 1]`` (scalar kinds) or ``[*, c, H, dk]`` (diagonal), or DeltaNet's ``β [*, c, H]``;
``out_gate [*, c, H, dv]`` are the output gate's logits (GLA's ``r``, Mamba2's ``z``), or
``[*, c, H, 0]`` when the encoder's ``output_gate`` is off. mLSTM's values carry one more column of
ones, the input of its normaliser, which its head divides by (:class:`MLSTMEncoder`).
Scalar and diagonal decays are one code path: a scalar gate is a diagonal one of width 1 that
broadcasts over ``dk``. Their states store ``E`` as its logarithm (``log E [*, H]`` or
``[*, H, dk]``, identity 0) so that cumulative transitions are sums of log-decays, never products
that underflow to 0 and then break ``log`` in a backward pass (log-decays are floored at -50, as in
the kernel, so a decay of exactly 0 is allowed); DeltaNet stores ``E [*, H, dk, dk]``
itself (identity ``I``). Chunk summaries and heads use intra-chunk matmuls: decay masks are
``exp`` of differences of cumulative log-decays taken only where they are ``<= 0``; DeltaNet uses
the WY/UT transform (one batched unit-triangular solve per chunk, no loop over tokens).

Training on Triton. For scalar and diagonal decays, summaries + scan + readout together are exactly
chunkwise gated linear attention at chunk size ``c``; the decay heads hand the whole training pass to
:func:`~psmsearch.kernels.chunk_gated_linear_attention` where its Triton kernels run
(:meth:`_DecayReadoutHead.fused_forward`). DeltaNet's head fuses its training pass on every device
(:meth:`DenseReadoutHead.fused_forward`): the WY/UT solve of each chunk then serves both its summary
and its readout. Streaming uses the components one by one, and reads out only the newest token's
row (``forward_last``: O(c') per token for the decays instead of O(c'^2)).

Precision. Decay summaries and readouts compute in float32 for 16-bit inputs (as the kernels and
:func:`_wy` do) and round only their results; RetNet's fixed decays are rounded once from float64 to
the layer's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from psmsearch import Aggregator, ComponentContext, Encoder, Head, HyperParameter, hookimpl, prefix_scan
from psmsearch.kernels._dispatch import requested_backend
from psmsearch.kernels.chunkwise import (
    LOG_GATE_FLOOR,
    chunk_gated_linear_attention,
    default_backend_is_triton,
    intra_chunk_scores,
)
from psmsearch.kernels.first_order_scan import first_order_scan

SCALAR = "affine-scalar"
NORMALIZED = "affine-scalar-normalized"
DIAG = "affine-diag"
DENSE = "affine-dense"

Features = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (q, k, v, gate, out_gate)
AffineState = tuple[torch.Tensor, torch.Tensor]  # (log E or E, S)

HEADS = HyperParameter(
    "heads", "categorical", 4, choices=(1, 2, 4, 8, 16), help="heads, each with its own d_k × d_v state"
)
KEY_DIM = HyperParameter("key_dim", "int", 16, low=4, high=256, log=True, help="d_k: key/query width per head")
VALUE_DIM = HyperParameter("value_dim", "int", 16, low=4, high=256, log=True, help="d_v: value width per head")
FEATURE_MAP = HyperParameter(
    "feature_map", "categorical", "identity", choices=("identity", "elu1", "silu"),
    help="elementwise map applied to queries and keys before scaling / normalisation",
)
OUTPUT_GATE = HyperParameter(
    "output_gate", "bool", False,
    help="multiply the head's normalised readout by swish(W x) per value channel (GLA's r, Mamba2's z)",
)
SHARED_HYPERPARAMETERS = (HEADS, KEY_DIM, VALUE_DIM, FEATURE_MAP, OUTPUT_GATE)
NORM = HyperParameter("norm", "bool", True, help="per-head RMSNorm of the readout before the output projection")
GATE_BEFORE_NORM = HyperParameter(
    "gate_before_norm", "bool", False,
    help="with the encoder's output_gate: norm(o * swish(z)) as Mamba2's gated RMSNorm, not norm(o) * swish(z) as GLA",
)

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "elu1": lambda t: F.elu(t) + 1.0,
    "silu": F.silu,
}


# --- shared math ------------------------------------------------------------------------------


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


# --- encoders ---------------------------------------------------------------------------------


class _AffineEncoder(Encoder):
    """Per-head query/key/value projections shared by every gate type.

    ``features`` is token-local (``offset`` is unused: these models carry no positions); the
    subclass's ``_transition`` adds the token's gate and may rescale its key (Mamba's and Mamba2's ``Δ``).
    Queries are scaled by ``d_k^-1/2``.
    """

    hyperparameters = SHARED_HYPERPARAMETERS

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        d = context.d_model
        self.heads: int = self.hparams["heads"]
        self.key_dim: int = self.hparams["key_dim"]
        self.value_dim: int = self.hparams["value_dim"]
        self.feature_map = FEATURE_MAPS[self.hparams["feature_map"]]
        self.q_proj = nn.Linear(d, self.heads * self.key_dim, bias=False)
        self.k_proj = nn.Linear(d, self.heads * self.key_dim, bias=False)
        self.v_proj = nn.Linear(d, self.heads * self.value_dim, bias=False)
        self.out_gate_proj = (nn.Linear(d, self.heads * self.value_dim, bias=False)
                              if self.hparams["output_gate"] else None)

    def _split_heads(self, t: torch.Tensor, width: int) -> torch.Tensor:
        return t.unflatten(-1, (self.heads, width))  # [*, c', H, width]

    def _queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mapped queries and keys ``[*, c', H, dk]`` (DeltaNet normalises them)."""
        q = self.feature_map(self._split_heads(self.q_proj(x), self.key_dim))  # [*, c', H, dk]
        k = self.feature_map(self._split_heads(self.k_proj(x), self.key_dim))  # [*, c', H, dk]
        return q, k

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, gate)`` of each token; the gate's meaning is the state kind's."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, offset: int = 0) -> Features:
        """``x[*, c', d] -> (q, k, v, gate, out_gate)``, each with the chunk axis after the batch dims."""
        q, k = self._queries_keys(x)  # [*, c', H, dk] each
        v = self._split_heads(self.v_proj(x), self.value_dim)  # [*, c', H, dv]
        k, gate = self._transition(x, k)  # [*, c', H, dk], [*, c', H, ...]
        if self.out_gate_proj is None:
            out_gate = x.new_zeros(*x.shape[:-1], self.heads, 0)  # [*, c', H, 0]: no gate
        else:
            out_gate = self._split_heads(self.out_gate_proj(x), self.value_dim)  # [*, c', H, dv]
        return q * self.key_dim**-0.5, k, v, gate, out_gate

    @property
    def memory_shape(self) -> tuple[int, int, int]:
        """Shape of ``S`` per sequence: ``(H, dk, dv)``."""
        return (self.heads, self.key_dim, self.value_dim)


class _DecayEncoder(_AffineEncoder):
    """Scalar (``gate_width == 1``) or diagonal (``gate_width == dk``) decays: gate = log-decay."""

    diagonal: ClassVar[bool] = False

    @property
    def gate_width(self) -> int:
        return self.key_dim if self.diagonal else 1

    def summarize(self, f: Features) -> AffineState:
        """``(log E [*, H] or [*, H, dk], S [*, H, dk, dv])`` of complete chunks ``f[*, c, ...]``."""
        _, k, v, log_a, _ = f
        total, memory = _decay_summary(k, v, log_a)  # [*, H, g], [*, H, dk, dv]
        return (total if self.diagonal else total.squeeze(-1)), memory

    @property
    def state_shape(self) -> tuple[tuple[int, ...], tuple[int, int, int]]:
        transition = (self.heads, self.key_dim) if self.diagonal else (self.heads,)
        return transition, self.memory_shape


class LinearAttentionEncoder(_DecayEncoder):
    """Linear attention: no forgetting (``E = I``; the log-decay gate is 0)."""

    name = "linear_attention"
    state_kind = SCALAR

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, k.new_zeros(*k.shape[:-1], 1)  # [*, c', H, dk], [*, c', H, 1]


class RetNetEncoder(_DecayEncoder):
    """RetNet retention: fixed per-head decays ``γ_h = 1 - 2^-(decay_exponent + h)``."""

    name = "retnet"
    state_kind = SCALAR
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        HyperParameter(
            "decay_exponent", "int", 5, low=1, high=12,
            help="head h decays by 1 - 2^-(decay_exponent + h) per token",
        ),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        exact = self._exact_log_decay()  # [H], float64
        # log γ = log_decay + log_decay_residual: a float32 pair carrying float64's precision.
        self.register_buffer("log_decay", exact.float())  # [H]
        self.register_buffer("log_decay_residual", (exact - exact.float().double()).float(), persistent=False)  # [H]
        self.register_load_state_dict_post_hook(_remake_residual_after_load)

    def _exact_log_decay(self) -> torch.Tensor:
        """``log(1 - 2^-(decay_exponent + h))`` for every head ``h``, in float64 on the CPU."""
        exponents = self.hparams["decay_exponent"] + torch.arange(self.heads, dtype=torch.float64)  # [H]
        return torch.log1p(-(2.0**-exponents))  # [H]

    def _apply(self, fn: Any, recurse: bool = True) -> "RetNetEncoder":
        """After ``.to()``, ``.double()``, ``to_empty()``...: the residual is made again from the
        hyperparameters in ``log_decay``'s dtype and device (``to_empty`` would leave it uninitialised)."""
        super()._apply(fn, recurse)
        self._remake_residual()
        return self

    def _remake_residual(self) -> None:
        exact = self._exact_log_decay()  # [H]
        residual = exact - exact.float().double()  # [H]: what float32's log_decay lacks
        self.log_decay_residual = residual.to(device=self.log_decay.device, dtype=self.log_decay.dtype)

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed decays as ``log_decay + log_decay_residual`` in the module's dtype.

        ``log_decay`` alone is float32-rounded, so a ``.double()`` layer computed with decays 2e-9
        relative off its float64 recurrence; a float64 buffer would instead make float32 layers
        compute in float64 by type promotion. Both buffers follow the module's dtype: in float64
        their sum is the exact decay to about 2^-48 relative, in float32 it rounds to ``log_decay``.
        The residual is not persistent, so checkpoints keep their one ``log_decay`` entry.
        """
        log_decay = self.log_decay + self.log_decay_residual  # [H]
        gate = k.new_zeros(*k.shape[:-1], 1) + log_decay[:, None]  # [*, c', H, 1]: a fresh tensor
        return k, gate


def _remake_residual_after_load(module: "RetNetEncoder", _incompatible_keys: Any) -> None:
    """A load with ``assign=True`` replaces ``log_decay`` but leaves the non-persistent residual as it was."""
    module._remake_residual()


class Mamba2Encoder(_DecayEncoder):
    """Mamba2 / SSD-style data-dependent scalar decay per head.

    ``Δ_t = softplus(w·x_t + b)``, ``log a_t = -Δ_t exp(A_log)`` and the input is discretised as
    ``Δ_t k_t v_tᵀ`` (``k`` plays ``B``, ``q`` plays ``C``). ``b`` starts at softplus⁻¹ of a
    log-uniform ``Δ`` in ``[dt_min, dt_max]`` and ``exp(A_log)`` uniform in ``[1, 16]``, as in Mamba2.
    The block's convolution and output gate are not part of this sequence mixer.
    """

    name = "mamba2"
    state_kind = SCALAR
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        # Disjoint ranges, so that every point a search can sample is valid (dt_min <= dt_max).
        HyperParameter("dt_min", "float", 1e-3, low=1e-4, high=1e-2, log=True, help="smallest initial step Δ"),
        HyperParameter("dt_max", "float", 1e-1, low=1e-2, high=1.0, log=True, help="largest initial step Δ"),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        dt_min, dt_max = _step_range(self.name, self.hparams)
        self.dt_proj = nn.Linear(context.d_model, self.heads)
        with torch.no_grad():
            self.dt_proj.bias.copy_(_initial_step_bias(self.heads, dt_min, dt_max))  # [H]
            self.dt_proj.weight.mul_(0.1)
        self.a_log = nn.Parameter(torch.empty(self.heads).uniform_(1.0, 16.0).log())  # [H]

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = F.softplus(self.dt_proj(x)).unsqueeze(-1)  # [*, c', H, 1]
        return k * dt, -dt * self.a_log.exp()[:, None]  # [*, c', H, dk], [*, c', H, 1]


def _step_range(encoder: str, hparams: dict[str, Any]) -> tuple[float, float]:
    """``(dt_min, dt_max)`` of a Mamba-style encoder, refused where the range is empty."""
    dt_min, dt_max = hparams["dt_min"], hparams["dt_max"]
    if dt_min > dt_max:
        raise ValueError(f"encoder {encoder!r}: dt_min={dt_min} exceeds dt_max={dt_max}")
    return dt_min, dt_max


def _initial_step_bias(count: int, dt_min: float, dt_max: float) -> torch.Tensor:
    """``softplus⁻¹(Δ)`` for ``count`` steps ``Δ`` drawn log-uniformly in ``[dt_min, dt_max]`` (Mamba's init)."""
    dt = torch.exp(torch.empty(count).uniform_(math.log(dt_min), math.log(dt_max)))  # [count]
    return dt + torch.log(-torch.expm1(-dt))  # [count]


class MambaEncoder(_DecayEncoder):
    """Mamba (S6) selective decay, one step ``Δ`` per key channel: a data-dependent diagonal gate.

    ``Δ_t = softplus(W₂ W₁ x_t + b)`` per head and key channel (``W₁`` of rank ``dt_rank``),
    ``log α_t = -Δ_t ⊙ exp(A_log)`` with a learned ``A_log [H, dk]``, and the key discretised as
    ``Δ_t ⊙ k_t`` (``k`` plays ``B``, ``q`` plays ``C``, the key channel is Mamba's state index).
    As in Mamba, ``A`` starts at the S4D-real ``1, 2, ..., d_k`` in every head, ``W₂`` uniform in
    ``±dt_rank^-1/2`` and ``b`` at softplus⁻¹ of a log-uniform ``Δ`` in ``[dt_min, dt_max]``.

    One difference from Mamba, so that ``E`` stays diagonal in the key channel: Mamba's ``Δ`` varies
    over the value channel (its ``d``), which makes the decay ``exp(Δ_d A_dn)`` differ over both axes
    of the ``[d_k, d_v]`` state; here ``Δ`` varies over the key channel and is shared by the values.
    The block's convolution and output gate are not part of this sequence mixer.
    """

    name = "mamba"
    state_kind = DIAG
    diagonal = True
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        HyperParameter("dt_rank", "int", 16, low=1, high=128, log=True, help="rank of the step projection W₂ W₁"),
        # Disjoint ranges, so that every point a search can sample is valid (dt_min <= dt_max).
        HyperParameter("dt_min", "float", 1e-3, low=1e-4, high=1e-2, log=True, help="smallest initial step Δ"),
        HyperParameter("dt_max", "float", 1e-1, low=1e-2, high=1.0, log=True, help="largest initial step Δ"),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        dt_min, dt_max = _step_range(self.name, self.hparams)
        rank, channels = self.hparams["dt_rank"], self.heads * self.key_dim
        self.dt_proj = nn.Sequential(nn.Linear(context.d_model, rank, bias=False), nn.Linear(rank, channels))
        with torch.no_grad():
            nn.init.uniform_(self.dt_proj[1].weight, -(rank**-0.5), rank**-0.5)
            self.dt_proj[1].bias.copy_(_initial_step_bias(channels, dt_min, dt_max))  # [H*dk]
        s4d_real = torch.arange(1, self.key_dim + 1, dtype=torch.get_default_dtype()).log()  # [dk]
        self.a_log = nn.Parameter(s4d_real.repeat(self.heads, 1))  # [H, dk]

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dt = F.softplus(self._split_heads(self.dt_proj(x), self.key_dim))  # [*, c', H, dk]
        return k * dt, -dt * self.a_log.exp()  # [*, c', H, dk] each


class GLAEncoder(_DecayEncoder):
    """Gated linear attention: per-key-channel decay ``α_t = sigmoid(W₂ W₁ x_t)^(1/τ)``.

    ``log α = logsigmoid(low-rank projection) / gate_temperature`` as in GLA (rank 16, τ = 16).
    """

    name = "gla"
    state_kind = DIAG
    diagonal = True
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        HyperParameter("gate_rank", "int", 16, low=1, high=128, log=True, help="rank of the gate projection"),
        HyperParameter(
            "gate_temperature", "float", 16.0, low=1.0, high=64.0, log=True,
            help="τ in log α = logsigmoid(·) / τ",
        ),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        self.gate_proj = nn.Sequential(
            nn.Linear(context.d_model, self.hparams["gate_rank"], bias=False),
            nn.Linear(self.hparams["gate_rank"], self.heads * self.key_dim),
        )

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self._split_heads(self.gate_proj(x), self.key_dim)  # [*, c', H, dk]
        return k, F.logsigmoid(logits) / self.hparams["gate_temperature"]  # [*, c', H, dk] each


class MLSTMEncoder(_DecayEncoder):
    """xLSTM's mLSTM: exponential input gate, sigmoid forget gate and a normaliser state per head.

    ``C_t = f_t C_{t-1} + i_t k_t v_tᵀ``, ``n_t = f_t n_{t-1} + i_t k_t`` and the head reads
    ``h_t = C_tᵀ q_t / max(|n_tᵀ q_t|, 1)``, with ``f_t = sigmoid(f̃_t)`` and ``i_t = exp(ĩ_t)``
    (one of each per head and token, ``[ĩ, f̃] = W x + b``). The normaliser is one more value
    column: values are ``[v_t, 1]``, so ``S = [C | n] ∈ R^{d_k × (d_v + 1)}`` is an ordinary
    scalar-decay state (``log E = logsigmoid(f̃)``, key ``i_t k_t``). Its state kind is
    ``affine-scalar-normalized``, not ``affine-scalar``: the maths of ``⊕`` is the same
    (``affine_scalar_normalized`` is ``affine_scalar`` under that kind), but a head must know that
    the last column is ``n`` and divide by it (``linear_readout_normalized``), so a head written for
    plain ``[dk, dv]`` states, which would read ``n`` as a value, is refused as incompatible.

    Both pre-activations are soft-capped, ``cap · tanh(· / cap)`` (``gate_soft_cap``, as in xLSTM
    7B), so ``i_t <= e^cap``: with the default 15 that is 3.3e6, and float32 and bfloat16 states stay
    far from overflow without xLSTM's running max-stabiliser ``m_t`` (which only rescales ``C`` and
    ``n`` together and cancels in ``h``). float16 ends at 65504, and a state sums ``i_t k_t v_tᵀ``
    over the forget gate's window, so float16 states can overflow whatever the cap: use bfloat16.
    The gates are computed in float32 whatever the layer's dtype (a bf16 ``ĩ`` of 8 is off by up to
    0.03, ``e^ĩ`` by 3%) and the key ``e^ĩ k`` and ``log f`` are rounded once. Initialisation as in xLSTM: forget-gate biases spaced from 3 to 6
    over the heads, input-gate biases from N(0, 0.1); the gate weights start at a tenth of
    PyTorch's default (xLSTM starts them at 0), so the gates depend on the data from the first step.
    The block's convolution, skip and output gate are not part of this sequence mixer.
    """

    name = "mlstm"
    state_kind = NORMALIZED
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        HyperParameter(
            "gate_soft_cap", "float", 15.0, low=5.0, high=50.0,
            help="gate pre-activations are capped as cap·tanh(x/cap); the input gate exp(ĩ) stays <= e^cap",
        ),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        self.gate_proj = nn.Linear(context.d_model, self.heads * 2)  # per head: [ĩ, f̃]
        with torch.no_grad():
            self.gate_proj.weight.mul_(0.1)
            biases = self.gate_proj.bias.view(self.heads, 2)  # [H, 2]
            biases[:, 0].normal_(0.0, 0.1)
            biases[:, 1].copy_(torch.linspace(3.0, 6.0, self.heads))

    def gates(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Soft-capped pre-activations ``(ĩ, f̃)``, each ``[*, c', H]``, in float32 at least."""
        dtype = _accumulation_dtype(x, self.gate_proj.weight)
        weight, bias = self.gate_proj.weight.to(dtype), self.gate_proj.bias.to(dtype)
        cap = self.hparams["gate_soft_cap"]
        capped = cap * torch.tanh(self._split_heads(F.linear(x.to(dtype), weight, bias), 2) / cap)  # [*, c', H, 2]
        return capped[..., 0], capped[..., 1]

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        input_pre, forget_pre = self.gates(x)  # [*, c', H] each, float32 at least
        key = (k * input_pre.exp().unsqueeze(-1)).to(k.dtype)  # [*, c', H, dk]
        return key, F.logsigmoid(forget_pre).unsqueeze(-1).to(k.dtype)  # [*, c', H, dk], [*, c', H, 1]

    def features(self, x: torch.Tensor, offset: int = 0) -> Features:
        """:meth:`_AffineEncoder.features` with a column of ones after the values (the normaliser's input)."""
        q, k, v, log_f, out_gate = super().features(x, offset)  # v [*, c', H, dv]
        values = torch.cat([v, v.new_ones(*v.shape[:-1], 1)], dim=-1)  # [*, c', H, dv + 1]
        return q, k, values, log_f, out_gate

    @property
    def memory_shape(self) -> tuple[int, int, int]:
        """Shape of ``S = [C | n]`` per sequence: ``(H, dk, dv + 1)``."""
        return (self.heads, self.key_dim, self.value_dim + 1)


class DeltaNetEncoder(_AffineEncoder):
    """DeltaNet: ``E_t = I - β_t k_t k_tᵀ``, input ``β_t k_t v_tᵀ``; L2-normalised queries and keys.

    ``β = sigmoid(w·x)``, or ``2 sigmoid`` with ``negative_eigenvalues`` (eigenvalues of ``E`` in
    ``[-1, 1]``, which lets the state track parity-like structure). Chunks are summarised with the
    WY/UT transform: one triangular solve per chunk, batched over all chunks and heads.
    """

    name = "deltanet"
    state_kind = DENSE
    hyperparameters = (
        *SHARED_HYPERPARAMETERS,
        HyperParameter("negative_eigenvalues", "bool", False, help="β in (0, 2) instead of (0, 1)"),
    )

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        self.beta_proj = nn.Linear(context.d_model, self.heads)
        self.beta_scale = 2.0 if self.hparams["negative_eigenvalues"] else 1.0

    def _queries_keys(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, k = super()._queries_keys(x)  # [*, c', H, dk] each
        # normalize's eps (1e-12) is 0 in float16, and a zero key (the padding of a partial chunk)
        # then becomes 0/0 = NaN, which the masked readout spreads as 0 * NaN; keep eps representable.
        eps = max(1e-12, torch.finfo(k.dtype).tiny)
        return F.normalize(q, dim=-1, eps=eps), F.normalize(k, dim=-1, eps=eps)

    def _transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, self.beta_scale * torch.sigmoid(self.beta_proj(x))  # [*, c', H, dk], [*, c', H]

    def summarize(self, f: Features) -> AffineState:
        """``(E [*, H, dk, dk], S [*, H, dk, dv])`` of complete chunks ``f[*, c, ...]``."""
        _, k, v, beta, _ = f
        return _delta_summary(k, v, beta)

    @property
    def state_shape(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        return (self.heads, self.key_dim, self.key_dim), self.memory_shape


# --- aggregators ------------------------------------------------------------------------------


def _encoder_state_shape(context: ComponentContext, who: str) -> tuple[tuple[int, ...], tuple[int, int, int]]:
    """``(transition shape, memory shape (H, dk, dv))`` from the encoder in ``context``."""
    if context.encoder is None:
        raise ValueError(f"{who} needs the encoder in its context to know the state shape")
    transition, memory = context.encoder.state_shape
    return tuple(transition), tuple(memory)  # type: ignore[return-value]


class _AffineAggregator(Aggregator):
    """``(E_old, S_old) ⊕ (E_new, S_new) = (E_new ∘ E_old, E_new ▷ S_old + S_new)``: associative.

    The state's shapes come from the encoder; a non-persistent scalar buffer tracks the module's
    dtype and device so that ``initial_state`` follows ``.to()`` / ``.double()``.
    """

    associative = True

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        self.transition_shape, self.memory_shape = _encoder_state_shape(context, f"aggregator {self.name!r}")
        self.register_buffer("_like", torch.zeros(()), persistent=False)

    def _identity_transition(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        raise NotImplementedError

    def initial_state(self, batch_shape: tuple[int, ...]) -> AffineState:
        """The zero state: identity transition, ``S = 0 [*, H, dk, dv]``."""
        memory = self._like.new_zeros(*batch_shape, *self.memory_shape)  # [*, H, dk, dv]
        return self._identity_transition(batch_shape), memory


class _DecayAggregator(_AffineAggregator):
    """Scalar/diagonal decays stored as ``log E``: ``log E = log E_old + log E_new``.

    ``scan`` runs the shared first-order scan kernel over chunks for ``S`` and a cumulative sum for
    ``log E``. For 16-bit states the transition ``exp(log E)`` is formed, and ``S`` combined, in
    float32 (:func:`_accumulation_dtype`); only the resulting ``S`` is rounded. A bf16 ``exp`` rounds a
    slow decay such as 0.984 by up to 0.2%, the same way in every chunk, so the error compounded over
    the chunks a slow decay remembers.
    """

    def _identity_transition(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return self._like.new_zeros(*batch_shape, *self.transition_shape)  # [*, H(, dk)]: log I = 0

    def forward(self, older: AffineState, newer: AffineState) -> AffineState:
        log_old, s_old = older  # [*, H(, dk)], [*, H, dk, dv]
        log_new, s_new = newer
        out_dtype = _promoted_dtype(log_new, s_old, s_new)
        dtype = _accumulation_dtype(log_new, s_old, s_new)
        memory = _broadcast_transition(log_new.to(dtype), s_old) * s_old.to(dtype) + s_new.to(dtype)  # [*, H, dk, dv]
        return log_old + log_new, memory.to(out_dtype)

    def scan(self, states: AffineState) -> AffineState:
        """Exclusive prefixes over dim 1 of ``states[B, N, ...]``; prefix 0 is the zero state."""
        log_e, memory = states  # [B, N, H(, dk)], [B, N, H, dk, dv]
        gates = _broadcast_transition(log_e.to(_accumulation_dtype(log_e, memory)), memory)  # [B, N, H, 1|dk, 1]
        inclusive = first_order_scan(gates, memory)  # [B, N, H, dk, dv] in memory's dtype
        log_first, memory_first = self.initial_state(log_e.shape[:1])  # [B, H(, dk)], [B, H, dk, dv]
        log_prefix = torch.cat([log_first.unsqueeze(1), log_e.cumsum(dim=1)[:, :-1]], dim=1)  # [B, N, H(, dk)]
        memory_prefix = torch.cat([memory_first.unsqueeze(1), inclusive[:, :-1]], dim=1)  # [B, N, H, dk, dv]
        return log_prefix, memory_prefix


class AffineScalarAggregator(_DecayAggregator):
    """⊕ for one decay per head (linear attention, RetNet, Mamba2): state ``(log a [H], S)``."""

    name = "affine_scalar"
    state_kind = SCALAR


class AffineScalarNormalizedAggregator(_DecayAggregator):
    """``affine_scalar``'s ⊕ for states whose last value column is a normaliser (mLSTM): the same maths,
    under the state kind that only normalising heads read."""

    name = "affine_scalar_normalized"
    state_kind = NORMALIZED


class AffineDiagAggregator(_DecayAggregator):
    """⊕ for per-key-channel decays (GLA, Mamba): state ``(log α [H, dk], S)``."""

    name = "affine_diag"
    state_kind = DIAG


class AffineDenseAggregator(_AffineAggregator):
    """⊕ for dense transitions (DeltaNet): ``(E_new E_old, E_new S_old + S_new)`` by batched matmuls.

    No fast ``scan``: the generic tree scan already does one batched matmul per level.
    """

    name = "affine_dense"
    state_kind = DENSE

    def _identity_transition(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        heads, dk, _ = self.transition_shape
        eye = torch.eye(dk, dtype=self._like.dtype, device=self._like.device)  # [dk, dk]
        return eye.repeat(*batch_shape, heads, 1, 1)  # [*, H, dk, dk]: materialised, not an expand()

    def forward(self, older: AffineState, newer: AffineState) -> AffineState:
        e_old, s_old = older  # [*, H, dk, dk], [*, H, dk, dv]
        e_new, s_new = newer
        return e_new @ e_old, e_new @ s_old + s_new


# --- heads ------------------------------------------------------------------------------------


class _ReadoutHead(Head):
    """Reads ``o_t = S_tᵀ q_t`` from the prefix state and the chunk, then projects ``H·dv -> d``.

    The queries, keys, values and gates come from the encoder's features; the head owns only the
    optional per-head RMSNorm and the output projection (:meth:`project`), which applies the
    encoder's output gate when it has one: ``y = W_o (norm(o) ⊙ swish(z))`` as GLA does, or with
    ``gate_before_norm`` ``y = W_o norm(o ⊙ swish(z))`` as Mamba2's gated RMSNorm does.
    """

    hyperparameters = (NORM, GATE_BEFORE_NORM)
    readout: ClassVar[Callable[[torch.Tensor, Features], torch.Tensor]]
    normalized: ClassVar[bool] = False
    """Whether the state's last value column is a normaliser to divide by (``affine-scalar-normalized``)."""

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__(context, **hparams)
        _, (heads, _, value_dim) = _encoder_state_shape(context, f"head {self.name!r}")
        if self.normalized:
            value_dim -= 1  # the last column is the normaliser n, not a value
        self.norm = nn.RMSNorm(value_dim, eps=1e-5) if self.hparams["norm"] else nn.Identity()
        self.out = nn.Linear(heads * value_dim, context.d_model, bias=False)

    def project(self, o: torch.Tensor, out_gate: torch.Tensor) -> torch.Tensor:
        """``o[*, c', H, dv]`` (``dv + 1`` with a normaliser), ``out_gate[*, c', H, dv or 0]`` -> ``y[*, c', d]``.

        Every path (training, fused, streaming) ends here, so mLSTM's normalisation is applied once, here.
        """
        o = self.normalize(o)  # [*, c', H, dv]
        if not out_gate.shape[-1]:
            o = self.norm(o)  # [*, c', H, dv]
        elif self.hparams["gate_before_norm"]:
            o = self.norm(o * F.silu(out_gate))  # [*, c', H, dv]
        else:
            o = self.norm(o) * F.silu(out_gate)  # [*, c', H, dv]
        return self.out(o.flatten(-2))  # [*, c', d]

    def normalize(self, o: torch.Tensor) -> torch.Tensor:
        """``o[..., :dv] / max(|o[..., dv]|, 1)`` for a normalised state kind (mLSTM's
        ``h = Cᵀq / max(|nᵀq|, 1)``), else ``o`` itself. Divides in float32 at least."""
        if not self.normalized:
            return o
        dtype = _accumulation_dtype(o)
        values, normalizer = o[..., :-1].to(dtype), o[..., -1:].to(dtype)  # [*, H, dv], [*, H, 1]
        return (values / normalizer.abs().clamp(min=1.0)).to(o.dtype)

    def forward(self, prefix: AffineState, f: Features) -> torch.Tensor:
        """``prefix (E, S [*, H, dk, dv])``, ``f[*, c', ...]`` -> ``y[*, c', d]``; ``E`` is not needed."""
        _, memory = prefix
        return self.project(type(self).readout(memory, f), f[4])  # [*, c', d]

    def forward_last(self, prefix: AffineState, f: Features) -> torch.Tensor:
        """The newest position's output ``y[*, d]`` alone (streaming asks for it once per token).

        The readout's last row (:data:`_LAST_ROW_READOUTS`), gated, normalised and projected for one
        position: the decay heads do O(c') work instead of O(c'^2). A subclass that replaces
        ``forward`` or ``readout`` gets the default, ``forward(prefix, f)[..., -1, :]``.
        """
        last_row = _LAST_ROW_READOUTS.get(type(self).readout)
        if last_row is None or type(self).forward is not _ReadoutHead.forward:
            return super().forward_last(prefix, f)
        _, memory = prefix
        o = last_row(memory, f).unsqueeze(-3)  # [*, 1, H, dv]
        return self.project(o, f[4][..., -1:, :, :])[..., 0, :]  # [*, d]


_LAST_ROW_READOUTS: dict[Callable[[torch.Tensor, Features], torch.Tensor],
                         Callable[[torch.Tensor, Features], torch.Tensor]] = {
    _decay_readout: _decay_readout_last,
    _delta_readout: _delta_readout_last,
}
"""Readout -> the function computing its newest row alone (``[*, H, dv]``), for ``forward_last``."""


def _is_plain_decay_pair(encoder: Encoder, aggregator: Aggregator) -> bool:
    """Whether ``encoder`` summarises and ``aggregator`` combines exactly as this module's decay classes.

    A plugin subclass that overrides ``summarize``, ``forward``, ``scan`` or ``initial_state`` computes
    something else, which the fused kernel would silently ignore; such pairs take the generic path.
    """
    return (
        isinstance(encoder, _DecayEncoder)
        and type(encoder).summarize is _DecayEncoder.summarize
        and isinstance(aggregator, _DecayAggregator)
        and type(aggregator).forward is _DecayAggregator.forward
        and type(aggregator).scan is _DecayAggregator.scan
        and type(aggregator).initial_state is _AffineAggregator.initial_state
    )


class _DecayReadoutHead(_ReadoutHead):
    """Scalar/diagonal readout, with the whole training pass fused into chunkwise gated linear attention.

    Summaries, scan and readout of a decay triple are together exactly
    :func:`~psmsearch.kernels.chunk_gated_linear_attention` at chunk size ``c`` (the kernel's chunk
    states are the PSM's chunk states), whose Triton kernels save only their inputs and recompute
    states in the backward. ``fused_forward`` uses it by default where it runs on Triton (CUDA, ``c``
    in 16..128, a power of two). On the CPU its reference measured as fast as the generic path, not
    faster (``benchmarks/affine_layers.py``), so CPU training keeps the generic path unless
    asked.
    """

    readout = staticmethod(_decay_readout)

    def fused_forward(self, encoder: Encoder, aggregator: Aggregator, f: Features, *,
                      required: bool = False) -> torch.Tensor | None:
        """``f[B, N, c, ...] -> y[B, N, c, d]`` in one chunkwise kernel call, or ``None``.

        With ``required=True`` the kernel runs on Triton where that is its default and can take
        ``c``, and else on its PyTorch reference (CUDA with ``c`` not in 16..128, or
        ``PSMSEARCH_KERNEL_BACKEND=numba``, which names a backend the kernel lacks), except that an
        explicit ``triton`` or ``reference`` request is honoured (or reported) as asked, and a name
        that is no backend at all is reported by the kernel, not replaced by the reference.
        """
        plain_head = type(self).readout is _decay_readout and type(self).forward is _ReadoutHead.forward
        if not plain_head or not _is_plain_decay_pair(encoder, aggregator):
            return None
        q, k, v, log_a, out_gate = f  # [B, N, c, H, dk|dk|dv|g|dv or 0]
        chunk = q.shape[2]
        on_triton = default_backend_is_triton(q, chunk)
        if not required and not on_triton:
            return None
        requested = requested_backend()
        backend = "reference" if not on_triton and requested in (None, "numba") else None
        q, k, v, log_a = (t.flatten(1, 2).transpose(1, 2) for t in (q, k, v, log_a))  # [B, H, N*c, width]
        gate = log_a.squeeze(-1) if log_a.shape[-1] == 1 else log_a  # [B, H, N*c(, dk)]
        o, _ = chunk_gated_linear_attention(q, k, v, gate, chunk_size=chunk, scale=1.0,
                                            backend=backend)  # [B, H, N*c, dv]
        o = o.transpose(1, 2).unflatten(1, f[0].shape[1:3])  # [B, N, c, H, dv]
        return self.project(o, out_gate)  # [B, N, c, d]


class ScalarReadoutHead(_DecayReadoutHead):
    """Readout for one decay per head (linear attention, RetNet, Mamba2)."""

    name = "linear_readout_scalar"
    state_kind = SCALAR


class NormalizedReadoutHead(_DecayReadoutHead):
    """Readout for one decay per head with a normaliser column (mLSTM): ``o = Cᵀq / max(|nᵀq|, 1)``."""

    name = "linear_readout_normalized"
    state_kind = NORMALIZED
    normalized = True


class DiagReadoutHead(_DecayReadoutHead):
    """Readout for per-key-channel decays (GLA, Mamba); exact intra-chunk decay masks in 16-step sub-blocks."""

    name = "linear_readout_diag"
    state_kind = DIAG


class DenseReadoutHead(_ReadoutHead):
    """Readout for the delta rule (DeltaNet) through the WY/UT transform.

    Training goes through :meth:`fused_forward`, which solves each chunk's WY/UT system once for
    both the chunk summary and the readout (the generic path solves it in each).
    """

    name = "linear_readout_dense"
    state_kind = DENSE
    readout = staticmethod(_delta_readout)

    def fused_forward(self, encoder: Encoder, aggregator: Aggregator, f: Features, *,
                      required: bool = False) -> torch.Tensor | None:
        """``f[B, N, c, ...] -> y[B, N, c, d]`` with one triangular solve per chunk, or ``None``.

        Computes exactly ``forward(prefix_scan(aggregator, encoder.summarize(f)), f)``, sharing
        ``W, U`` between the summaries and the readout: a solve is ~15% of a DeltaNet training
        step. It always pays, so ``required`` changes nothing. ``None`` (the generic path) where a
        subclass overrides what this computes: the encoder's ``summarize``, the aggregator's
        ``forward``, ``scan`` or ``initial_state``, or this head's ``forward`` or ``readout``.
        """
        plain = (
            type(self).readout is _delta_readout
            and type(self).forward is _ReadoutHead.forward
            and isinstance(encoder, DeltaNetEncoder)
            and type(encoder).summarize is DeltaNetEncoder.summarize
            and isinstance(aggregator, AffineDenseAggregator)
            and type(aggregator).forward is AffineDenseAggregator.forward
            and type(aggregator).scan is Aggregator.scan
            and type(aggregator).initial_state is _AffineAggregator.initial_state
        )
        if not plain:
            return None
        q, k, v, beta, out_gate = f  # [B, N, c, H, dk|dk|dv], [B, N, c, H], [B, N, c, H, dv or 0]
        w, u = _wy(k, v, beta)  # [B, N, H, c, dk], [B, N, H, c, dv]
        _, memory = prefix_scan(aggregator, _delta_summary_from_wy(k, w, u))  # [B, N, H, dk, dv]
        return self.project(_delta_readout_from_wy(memory, q, k, w, u), out_gate)  # [B, N, c, d]


@hookimpl
def register_encoders(register: Callable[..., None]) -> None:
    for cls in (LinearAttentionEncoder, RetNetEncoder, Mamba2Encoder, MLSTMEncoder, GLAEncoder, MambaEncoder,
                DeltaNetEncoder):
        register(cls)


@hookimpl
def register_aggregators(register: Callable[..., None]) -> None:
    for cls in (AffineScalarAggregator, AffineScalarNormalizedAggregator, AffineDiagAggregator, AffineDenseAggregator):
        register(cls)


@hookimpl
def register_heads(register: Callable[..., None]) -> None:
    for cls in (ScalarReadoutHead, NormalizedReadoutHead, DiagReadoutHead, DenseReadoutHead):
        register(cls)
