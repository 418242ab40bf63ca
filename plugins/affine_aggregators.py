"""The affine aggregators: ``⊕`` on ``(E, S)`` states, one per state kind.

``(E_old, S_old) ⊕ (E_new, S_new) = (E_new ∘ E_old, E_new ▷ S_old + S_new)`` with identity ``(I, 0)``
is associative, so chunk states scan in parallel in training and a stream keeps one running state.
Scalar and diagonal decays share one implementation (:class:`_DecayAggregator`: ``log E`` adds up, ``S``
runs through the first-order scan kernel); DeltaNet's dense ``E`` composes by batched matmuls
(:class:`AffineDenseAggregator`).
"""

from __future__ import annotations

from typing import Any

import torch

from psmsearch import Aggregator, ComponentContext
from psmsearch.kernels.first_order_scan import first_order_scan
from psmsearch.plugins.affine_math import (
    DENSE,
    DIAG,
    NORMALIZED,
    SCALAR,
    AffineState,
    _accumulation_dtype,
    _broadcast_transition,
    _promoted_dtype,
)


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
    float32 (:func:`~psmsearch.plugins.affine_math._accumulation_dtype`); only the resulting ``S`` is
    rounded. A bf16 ``exp`` rounds a slow decay such as 0.984 by up to 0.2%, the same way in every
    chunk, so the error compounded over the chunks a slow decay remembers.
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
