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

This module is the plugin: its hooks register the components above, and it re-exports their classes
and the family's public constants. The code lives in four helper modules beside it, which are not
plugins themselves:

* :mod:`~psmsearch.plugins.affine_math`: the state kinds, the feature and state layouts, the dtype
  rules, and the chunk summaries and readouts (decays; the WY/UT transform for the delta rule);
* :mod:`~psmsearch.plugins.affine_encoders`: the seven encoders and the hyperparameters they share;
* :mod:`~psmsearch.plugins.affine_aggregators`: ``⊕`` for each state kind;
* :mod:`~psmsearch.plugins.affine_heads`: the readout heads, with their fused training passes.
"""

from __future__ import annotations

from typing import Callable

from psmsearch import hookimpl
from psmsearch.plugins.affine_aggregators import (
    AffineDenseAggregator,
    AffineDiagAggregator,
    AffineScalarAggregator,
    AffineScalarNormalizedAggregator,
)
from psmsearch.plugins.affine_encoders import (
    FEATURE_MAP,
    FEATURE_MAPS,
    HEADS,
    KEY_DIM,
    OUTPUT_GATE,
    SHARED_HYPERPARAMETERS,
    VALUE_DIM,
    DeltaNetEncoder,
    GLAEncoder,
    LinearAttentionEncoder,
    Mamba2Encoder,
    MambaEncoder,
    MLSTMEncoder,
    RetNetEncoder,
)
from psmsearch.plugins.affine_heads import (
    GATE_BEFORE_NORM,
    NORM,
    DenseReadoutHead,
    DiagReadoutHead,
    NormalizedReadoutHead,
    ScalarReadoutHead,
)
from psmsearch.plugins.affine_math import DENSE, DIAG, NORMALIZED, SCALAR, AffineState, Features

__all__ = [
    # state kinds and layouts
    "SCALAR", "NORMALIZED", "DIAG", "DENSE", "Features", "AffineState",
    # hyperparameters
    "HEADS", "KEY_DIM", "VALUE_DIM", "FEATURE_MAP", "OUTPUT_GATE", "SHARED_HYPERPARAMETERS", "FEATURE_MAPS",
    "NORM", "GATE_BEFORE_NORM",
    # encoders
    "LinearAttentionEncoder", "RetNetEncoder", "Mamba2Encoder", "MLSTMEncoder", "GLAEncoder", "MambaEncoder",
    "DeltaNetEncoder",
    # aggregators
    "AffineScalarAggregator", "AffineScalarNormalizedAggregator", "AffineDiagAggregator", "AffineDenseAggregator",
    # heads
    "ScalarReadoutHead", "NormalizedReadoutHead", "DiagReadoutHead", "DenseReadoutHead",
]


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
