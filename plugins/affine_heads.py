"""The affine readout heads: ``o_t = S_tᵀ q_t`` from the prefix state and the chunk, then ``H·dv -> d``.

Training on Triton. For scalar and diagonal decays, summaries + scan + readout together are exactly
chunkwise gated linear attention at chunk size ``c``; the decay heads hand the whole training pass to
:func:`~psmsearch.kernels.chunk_gated_linear_attention` where its Triton kernels run
(:meth:`_DecayReadoutHead.fused_forward`). DeltaNet's head fuses its training pass on every device
(:meth:`DenseReadoutHead.fused_forward`): the WY/UT solve of each chunk then serves both its summary
and its readout. Streaming uses the components one by one, and reads out only the newest token's
row (``forward_last``: O(c') per token for the decays instead of O(c'^2)).
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from psmsearch import Aggregator, ComponentContext, Encoder, Head, HyperParameter, prefix_scan
from psmsearch.kernels._dispatch import requested_backend
from psmsearch.kernels.chunkwise import chunk_gated_linear_attention, default_backend_is_triton
from psmsearch.plugins.affine_aggregators import (
    AffineDenseAggregator,
    _AffineAggregator,
    _DecayAggregator,
    _encoder_state_shape,
)
from psmsearch.plugins.affine_encoders import DeltaNetEncoder, _DecayEncoder
from psmsearch.plugins.affine_math import (
    DENSE,
    DIAG,
    NORMALIZED,
    SCALAR,
    AffineState,
    Features,
    _accumulation_dtype,
    _decay_readout,
    _decay_readout_last,
    _delta_readout,
    _delta_readout_from_wy,
    _delta_readout_last,
    _delta_summary_from_wy,
    _wy,
)

NORM = HyperParameter("norm", "bool", True, help="per-head RMSNorm of the readout before the output projection")
GATE_BEFORE_NORM = HyperParameter(
    "gate_before_norm", "bool", False,
    help="with the encoder's output_gate: norm(o * swish(z)) as Mamba2's gated RMSNorm, not norm(o) * swish(z) as GLA",
)


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
    """Whether ``encoder`` summarises and ``aggregator`` combines exactly as the built-in decay classes.

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
