"""The affine encoders: per-head queries, keys and values, and each model's gate.

Each encoder maps tokens ``x[*, c', d]`` to :data:`~psmsearch.plugins.affine_math.Features`
``(q, k, v, gate, out_gate)`` and summarises complete chunks into ``(E, S)`` states. What the gate is
depends on the state kind: a log-decay per head (linear attention, RetNet, Mamba2, mLSTM) or per key
channel (GLA, Mamba), or DeltaNet's ``β``. The hyperparameters every encoder shares
(:data:`SHARED_HYPERPARAMETERS`) are declared here. RetNet's fixed decays are rounded once from
float64 to the layer's dtype.
"""

from __future__ import annotations

import math
from typing import Any, Callable, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from psmsearch import ComponentContext, Encoder, HyperParameter
from psmsearch.plugins.affine_math import (
    DENSE,
    DIAG,
    NORMALIZED,
    SCALAR,
    AffineState,
    Features,
    _accumulation_dtype,
    _decay_summary,
    _delta_summary,
)

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

FEATURE_MAPS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "identity": lambda t: t,
    "elu1": lambda t: F.elu(t) + 1.0,
    "silu": F.silu,
}


class _AffineEncoder(Encoder):
    """Per-head query/key/value projections shared by every gate type.

    ``features`` is token-local (``offset`` is unused: these models carry no positions); the
    subclass's ``transition`` adds the token's gate and may rescale its key (Mamba's and Mamba2's
    ``Δ``). ``transition`` is the extension point for a new gate: a plugin subclasses a built-in
    encoder of the state kind it wants and overrides it (README, "A new gate for the affine family").
    Queries are scaled by ``d_k^-1/2``.
    """

    hyperparameters = SHARED_HYPERPARAMETERS
    chunk_size_invariant = True  # every gate type is an exact token recurrence, split into chunks of any c

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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(key, gate)`` of each token from its input ``x [*, c', d]`` and mapped key ``k [*, c', H, dk]``.

        The gate's meaning is the state kind's: a log-decay ``<= 0`` of shape ``[*, c', H, 1]`` (scalar
        kinds) or ``[*, c', H, dk]`` (diagonal), DeltaNet's ``β [*, c', H]``.
        """
        raise NotImplementedError

    def features(self, x: torch.Tensor, offset: int = 0) -> Features:
        """``x[*, c', d] -> (q, k, v, gate, out_gate)``, each with the chunk axis after the batch dims."""
        q, k = self._queries_keys(x)  # [*, c', H, dk] each
        v = self._split_heads(self.v_proj(x), self.value_dim)  # [*, c', H, dv]
        k, gate = self.transition(x, k)  # [*, c', H, dk], [*, c', H, ...]
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
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

    def transition(self, x: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return k, self.beta_scale * torch.sigmoid(self.beta_proj(x))  # [*, c', H, dk], [*, c', H]

    def summarize(self, f: Features) -> AffineState:
        """``(E [*, H, dk, dk], S [*, H, dk, dv])`` of complete chunks ``f[*, c, ...]``."""
        _, k, v, beta, _ = f
        return _delta_summary(k, v, beta)

    @property
    def state_shape(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        return (self.heads, self.key_dim, self.key_dim), self.memory_shape
