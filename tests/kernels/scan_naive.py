"""Independent float64 loop references for the kernel tests (no code shared with psmsearch.kernels)."""

from __future__ import annotations

import torch


def naive_first_order_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None,
                           reverse: bool) -> torch.Tensor:
    """``h_t = a_t h_{t-1} + b_t`` one token at a time (``h_{t+1}`` when ``reverse``)."""
    steps = b.shape[1]
    state = torch.zeros_like(b[:, 0]) if h0 is None else h0.expand_as(b[:, 0])
    outputs: list[torch.Tensor] = [state] * steps
    for t in (reversed(range(steps)) if reverse else range(steps)):
        state = a[:, t] * state + b[:, t]
        outputs[t] = state
    return torch.stack(outputs, dim=1)


def naive_gated_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 log_gate: torch.Tensor, h0: torch.Tensor | None,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ``, ``o_t = scale S_tᵀ q_t``, token by token."""
    batch, heads, steps, dk = q.shape
    gates = log_gate.exp()
    gates = gates.unsqueeze(-1).expand(batch, heads, steps, dk) if gates.dim() == 3 else gates
    state = q.new_zeros(batch, heads, dk, v.shape[-1]) if h0 is None else h0
    outputs = []
    for t in range(steps):
        state = gates[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state))
    return torch.stack(outputs, dim=2), state
