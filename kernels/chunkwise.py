"""Chunkwise gated linear attention (GLA / Mamba2-SSD form) for matrix-valued states.

Recurrence per batch and head, with ``S_t`` a ``[dk, dv]`` matrix::

    S_t = diag(exp(log_gate_t)) S_{t-1} + k_t v_tᵀ        (S_{-1} = initial_state or 0)
    o_t = scale * S_tᵀ q_t                                 (inclusive of token t)

``log_gate`` is ``<= 0`` (the log of a decay in [0, 1]), either one scalar per
head and step (``[B, H, T]``) or one per key channel (``[B, H, T, dk]``). A gate
of exactly 0 (``log_gate = -inf``) is allowed: log gates are floored at
:data:`LOG_GATE_FLOOR` (-50) before they are summed.

The chunkwise form splits time into chunks of ``C`` steps. With ``G`` the
cumulative log gate *inside* a chunk (``G_i = Σ_{j<=i} log_gate_j``, non-increasing)::

    o_i = scale * [ (q_i ⊙ e^{G_i}) S_prev  +  Σ_{j<=i} (Σ_c q_ic k_jc e^{G_ic - G_jc}) v_j ]
    S_end = e^{G_last} ⊙ S_prev + Σ_j (k_j ⊙ e^{G_last - G_j}) v_jᵀ

The chunk-end states come from :func:`first_order_scan` over chunks. Every
exponent above is a difference ``G_later - G_earlier <= 0``, so nothing
overflows however strong the decay; for per-channel gates the intra-chunk
scores use 16-step sub-blocks with a reference point between query and key
(see :func:`_diagonal_gate_scores`) instead of ``e^{G_i} · e^{-G_j}``.

The reference here is plain PyTorch and differentiable by autograd. The Triton
implementation (forward and backward kernels) is in :mod:`.chunkwise_triton`.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _dispatch
from .first_order_scan import first_order_scan

SUB_BLOCK = 16
KERNEL = "chunk_gated_linear_attention"
TRITON_CHUNK_SIZES = (16, 32, 64, 128)  # a [C, C] score tile per chunk must fit in shared memory
LOG_GATE_FLOOR = -50.0
"""Smallest log gate the chunkwise form uses; lower ones (a gate of exactly 0 is ``-inf``) are raised to it.

``e^-50 ≈ 2e-22`` is below float64's resolution (1.1e-16) by six orders, so the state a floored
gate lets through is negligible next to the new one in every dtype, as the exact 0 would be. The
floor is not lower because ``G`` after a floored gate carries it: the later gates of the same chunk
are added to about -50, where a float32 ulp is 3.8e-6, and ``G_i - G_j`` between two of them keeps
that absolute error (at -1e4 it would be 1e-3). The gradient of a floored gate is 0 (exactly: the
gate's true gradient, ``e^{log_gate}`` times a finite factor, is below ``e^-50`` of it).
"""


def chunk_gated_linear_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    log_gate: torch.Tensor,
    *,
    chunk_size: int = 64,
    initial_state: torch.Tensor | None = None,
    scale: float | None = None,
    output_final_state: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Gated linear attention computed chunk by chunk.

    Args:
        q, k: ``[B, H, T, dk]``; v: ``[B, H, T, dv]``. They may differ in dtype (as
            under autocast); both backends accumulate in float32 or wider
            (Triton's matmuls use tf32 products when ``q`` is 16-bit).
        log_gate: ``[B, H, T]`` (scalar gate per head) or ``[B, H, T, dk]``
            (diagonal, per key channel), values ``<= 0``; ``-inf`` (forget
            everything) included. Values below :data:`LOG_GATE_FLOOR` count as
            the floor, and their gradient is 0.
        chunk_size: steps per chunk; ``T`` need not be a multiple. The Triton
            backend needs a power of two from 16 to 128: with ``backend=None`` and
            no ``PSMSEARCH_KERNEL_BACKEND``, other sizes run on the reference (also
            on CUDA), while an explicit ``triton`` request with them is a ``ValueError``.
        initial_state: optional ``[B, H, dk, dv]`` state before step 0.
        scale: multiplies the output; default ``dk ** -0.5``.
        output_final_state: also return the state after the last step.
        backend: ``"triton"``, ``"reference"`` or None (see :mod:`._dispatch`).
            The Triton backend saves only its inputs for backward and recomputes
            the chunk states there.

    Returns:
        ``(o, final_state)``: ``o`` is ``[B, H, T, dv]`` in ``q``'s dtype;
        ``final_state`` is ``[B, H, dk, dv]`` in float32 (float64 for float64
        inputs), or None unless ``output_final_state``. All arithmetic is float32
        or wider.
    """
    _check_inputs(q, k, v, log_gate, initial_state, chunk_size)
    initial_state = _dispatch.initial_state_in(initial_state, _dispatch.compute_dtype(q, k, v, log_gate))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    tensors = [t for t in (q, k, v, log_gate, initial_state) if t is not None]
    chosen = _dispatch.select_backend(backend, *tensors, kernel=KERNEL)
    if chosen == "triton" and chunk_size not in TRITON_CHUNK_SIZES and _dispatch.requested_backend(backend) is None:
        chosen = "reference"  # the default serves any chunk size; an explicit Triton request is reported below
    if chosen == "triton" and is_in_torch_dispatch_mode():  # make_fx, torch.export: PyTorch ops only
        _dispatch.refuse_untraceable_backend(KERNEL, backend)
        chosen = "reference"
    if chosen == "triton":
        from .chunkwise_triton import chunk_gla_triton

        o, final = chunk_gla_triton(q, k, v, log_gate, initial_state, chunk_size, scale)
    else:
        # One chunk longer than the sequence computes the same as one chunk of T steps, at C^2 not T^2 cost.
        o, final = chunk_gla_reference(q, k, v, log_gate, initial_state, min(chunk_size, q.shape[2]), scale)
    return o, (final if output_final_state else None)


def default_backend_is_triton(q: torch.Tensor, chunk_size: int) -> bool:
    """Whether a call on ``q``'s device and dtype with ``backend=None`` would run the Triton kernels.

    For callers that have an equivalent unfused path (the affine plugin's heads) and should take
    this kernel only where it pays. It honours ``PSMSEARCH_KERNEL_BACKEND``, and answers False,
    not an error, where that names a backend this kernel lacks or that cannot run here: the
    caller's other path then applies or reports it.
    """
    if chunk_size not in TRITON_CHUNK_SIZES:
        return False
    try:
        return _dispatch.select_backend(None, q, kernel=KERNEL) == "triton"
    except (ValueError, RuntimeError):
        return False


def _check_inputs(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                  initial_state: torch.Tensor | None, chunk_size: int) -> None:
    _dispatch.check_tensor_inputs(KERNEL, q=q, k=k, v=v, log_gate=log_gate, initial_state=initial_state)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be [B, H, T, dk], got {tuple(q.shape)} and {tuple(k.shape)}")
    batch, heads, steps, dk = q.shape
    if steps == 0 or dk == 0:
        raise ValueError(f"q and k need at least one time step and one key channel, got {tuple(q.shape)}")
    if v.dim() != 4 or v.shape[:3] != q.shape[:3]:
        raise ValueError(f"v must be [B, H, T, dv] = {(batch, heads, steps)} + (dv,), got {tuple(v.shape)}")
    if log_gate.shape not in (q.shape[:3], q.shape):
        raise ValueError(f"log_gate must be [B, H, T] or [B, H, T, dk], got {tuple(log_gate.shape)}")
    if initial_state is not None and initial_state.shape != (batch, heads, dk, v.shape[-1]):
        raise ValueError(f"initial_state must be [B, H, dk, dv], got {tuple(initial_state.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    devices = {name: t.device for name, t in (("q", q), ("k", k), ("v", v), ("log_gate", log_gate),
                                              ("initial_state", initial_state)) if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"{KERNEL}: every input must be on one device; got {listed}")


def gate_per_channel(log_gate: torch.Tensor) -> torch.Tensor:
    """Log gates as ``[B, H, T, dg]`` with ``dg = 1`` (scalar, broadcast over dk) or ``dk``."""
    return log_gate.unsqueeze(-1) if log_gate.dim() == 3 else log_gate


def chunk_cumulative_gates(log_gate: torch.Tensor, chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``G``: log gates summed from each chunk's start, ``[B, H, n_chunks, C, dg]``.

    Log gates below :data:`LOG_GATE_FLOOR` are raised to it first, so that a gate of
    exactly 0 (``-inf``) does not turn the differences ``G_i - G_j`` into
    ``-inf - (-inf) = NaN``; both backends take their cumulative gates from here.
    Time is padded to whole chunks with ``log_gate = 0`` (decay 1), which leaves
    the state unchanged through the padding.
    """
    gates = gate_per_channel(log_gate).to(dtype).clamp(min=LOG_GATE_FLOOR)  # [B, H, T, dg]
    steps = gates.shape[2]
    n_chunks = math.ceil(steps / chunk_size)
    gates = F.pad(gates, (0, 0, 0, n_chunks * chunk_size - steps))  # [B, H, Tp, dg]
    return gates.unflatten(2, (n_chunks, chunk_size)).cumsum(dim=3)


def chunk_gla_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor,
                        initial_state: torch.Tensor | None, chunk_size: int,
                        scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch chunkwise GLA; returns ``(o [B, H, T, dv] in q's dtype, final state [B, H, dk, dv])``."""
    dtype = _dispatch.compute_dtype(q, k, v, log_gate)
    steps = q.shape[2]
    q_c, k_c, v_c = (_to_chunks(x.to(dtype), chunk_size) for x in (q, k, v))  # [B, H, n, C, d]
    cum = chunk_cumulative_gates(log_gate, chunk_size, dtype)  # [B, H, n, C, dg]
    h0 = None if initial_state is None else initial_state.to(dtype)
    ends = _chunk_end_states(k_c, v_c, cum, h0)                 # [B, H, n, dk, dv]
    starts = _chunk_start_states(ends, h0)                      # [B, H, n, dk, dv]
    inter = (q_c * cum.exp()) @ starts                          # [B, H, n, C, dv]
    intra = intra_chunk_scores(q_c, k_c, cum) @ v_c             # [B, H, n, C, dv]
    o = (scale * (inter + intra)).flatten(2, 3)[:, :, :steps]   # [B, H, T, dv]
    return o.to(q.dtype), ends[:, :, -1]


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """``[B, H, T, d]`` -> ``[B, H, n_chunks, C, d]``, zero-padding the last chunk."""
    steps = x.shape[2]
    n_chunks = math.ceil(steps / chunk_size)
    return F.pad(x, (0, 0, 0, n_chunks * chunk_size - steps)).unflatten(2, (n_chunks, chunk_size))


def _chunk_end_states(k_c: torch.Tensor, v_c: torch.Tensor, cum: torch.Tensor,
                      h0: torch.Tensor | None) -> torch.Tensor:
    """State after each chunk, ``[B, H, n, dk, dv]``, via a first-order scan over chunks."""
    last = cum[:, :, :, -1:]                                      # [B, H, n, 1, dg]
    contribution = (k_c * (last - cum).exp()).transpose(-1, -2) @ v_c  # [B, H, n, dk, dv]
    decay = last.exp().transpose(-1, -2)                          # [B, H, n, dg, 1]
    ends = first_order_scan(decay.transpose(1, 2), contribution.transpose(1, 2), h0,
                            backend="reference")                  # [B, n, H, dk, dv]
    return ends.transpose(1, 2)


def _chunk_start_states(ends: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    """State entering each chunk: ``h0`` (or 0), then the previous chunk's end."""
    first = torch.zeros_like(ends[:, :, :1]) if h0 is None else h0.unsqueeze(2)  # [B, H, 1, dk, dv]
    return torch.cat([first, ends[:, :, :-1]], dim=2)


def intra_chunk_scores(q_c: torch.Tensor, k_c: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Causal decayed scores ``A_ij = Σ_c q_ic k_jc e^{G_ic - G_jc}`` (j <= i), ``[..., C, C]``.

    ``q_c, k_c [..., C, dk]``, ``cum [..., C, dg]`` (cumulative log gates from the chunk's start,
    ``dg`` 1 or ``dk``). Any leading dims; ``C`` may be a partial chunk. Shared with the affine
    plugin's readout head, so the training kernel and the streaming head use one formula.
    """
    if cum.shape[-1] == 1:
        return _scalar_gate_scores(q_c, k_c, cum[..., 0])
    return _diagonal_gate_scores(q_c, k_c, cum)


def _causal_decay(cum_q: torch.Tensor, cum_k: torch.Tensor) -> torch.Tensor:
    """``e^{G_i - G_j}`` for ``j <= i`` and 0 above the diagonal; ``cum_*`` are ``[..., C]``.

    The mask is applied before ``exp``, so positive differences (j > i) are never
    exponentiated and their gradient is exactly zero.
    """
    size = cum_q.shape[-1]
    causal = torch.ones(size, size, dtype=torch.bool, device=cum_q.device).tril()
    diff = cum_q[..., :, None] - cum_k[..., None, :]  # [..., C, C]
    return torch.where(causal, diff, float("-inf")).exp()


def _scalar_gate_scores(q_c: torch.Tensor, k_c: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Scores for one gate per head: ``(q kᵀ) ⊙ e^{G_i - G_j}``; ``cum`` is ``[B, H, n, C]``."""
    return (q_c @ k_c.transpose(-1, -2)) * _causal_decay(cum, cum)


def _diagonal_gate_scores(q_c: torch.Tensor, k_c: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """Scores for per-channel gates, stable for any decay.

    The chunk is cut into sub-blocks of ``s`` steps. For a key in an earlier
    sub-block ``J`` than the query, split ``G_i - G_j = (G_i - G_r) + (G_r - G_j)``
    at ``r``, the last step of ``J``: both parts are ``<= 0``, so the factors
    ``q_i e^{G_i - G_r}`` and ``k_j e^{G_r - G_j}`` are bounded and the block is a
    matmul. Inside a diagonal sub-block the decay is formed per channel, exactly,
    as ``[s_i, s_j, dk]`` with the channels last, so that the products and the sum
    over channels are a few large elementwise ops (a ``[dk, s, s]`` decay in a
    three-operand einsum became one tiny batched matmul per element). A chunk of
    one sub-block (``C <= 16``, or partial chunks) has no off-diagonal part.
    """
    chunk = cum.shape[-2]
    sub = SUB_BLOCK if chunk % SUB_BLOCK == 0 else chunk
    n_sub = chunk // sub
    q_b, k_b, cum_b = (x.unflatten(-2, (n_sub, sub)) for x in (q_c, k_c, cum))  # [B, H, n, m, s, d]
    causal = torch.ones(sub, sub, dtype=torch.bool, device=q_c.device).tril()  # [s, s]
    diff = cum_b[..., :, None, :] - cum_b[..., None, :, :]                # [B, H, n, m, s(i), s(j), dk]
    decay = torch.where(causal[..., None], diff, float("-inf")).exp()    # [B, H, n, m, s, s, dk]; exponents <= 0
    diagonal = ((q_b[..., :, None, :] * decay) * k_b[..., None, :, :]).sum(-1)  # [B, H, n, m, s, s]
    if n_sub == 1:
        return diagonal.squeeze(-3)                                       # [B, H, n, C, C]
    ref = cum_b[..., -1, :]                                               # [B, H, n, m, dk]
    k_ref = k_b * (ref.unsqueeze(-2) - cum_b).exp()                       # [B, H, n, m(J), s, dk]
    earlier = _earlier_block_mask(n_sub, sub, q_c.device)                 # [C, m]
    lag = torch.where(earlier[..., None], cum[..., :, None, :] - ref[..., None, :, :], float("-inf"))
    q_ref = q_c.unsqueeze(-2) * lag.exp()                                 # [B, H, n, C, m(J), dk]
    off_diagonal = torch.einsum("...iJc,...Jjc->...iJj", q_ref, k_ref).flatten(-2)  # [B, H, n, C, C]
    return off_diagonal + _block_diagonal(diagonal)


def _earlier_block_mask(n_sub: int, sub: int, device: torch.device) -> torch.Tensor:
    """``[C, m]``: True where key sub-block ``J`` lies strictly before the query's sub-block."""
    query_block = torch.arange(n_sub * sub, device=device) // sub
    return torch.arange(n_sub, device=device)[None, :] < query_block[:, None]


def _block_diagonal(blocks: torch.Tensor) -> torch.Tensor:
    """``[..., m, s, s]`` diagonal blocks -> ``[..., m*s, m*s]`` block-diagonal matrix."""
    n_sub = blocks.shape[-3]
    eye = torch.eye(n_sub, dtype=blocks.dtype, device=blocks.device)
    full = blocks[..., :, :, None, :] * eye[:, None, :, None]  # [..., m, s, m, s]
    return full.flatten(-4, -3).flatten(-2)

