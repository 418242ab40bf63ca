"""The intra-chunk decayed scores against their definition, pair by pair, in float64.

``A_ij = Σ_c q_ic k_jc e^{G_ic - G_jc}`` for ``j <= i``, else 0: written here as one direct
``[C, C, dk]`` formula (fine in float64 for moderate decays), independent of the sub-block split.
"""

from __future__ import annotations

import pytest
import torch

from psmsearch.kernels.chunkwise import intra_chunk_scores


def direct_scores(q: torch.Tensor, k: torch.Tensor, cum: torch.Tensor) -> torch.Tensor:
    """``[..., C, C]`` by the definition: all pairs, per channel, causal mask applied after ``exp``."""
    diff = cum[..., :, None, :] - cum[..., None, :, :]  # [..., C(i), C(j), dg]
    scores = (q[..., :, None, :] * k[..., None, :, :] * diff.exp()).sum(-1)  # [..., C, C]
    size = q.shape[-2]
    return scores * torch.ones(size, size, dtype=q.dtype).tril()


@pytest.mark.parametrize("chunk", [1, 7, 16, 32, 48])
@pytest.mark.parametrize("gate_width", [1, 5])
def test_scores_match_definition_outputs_and_gradients(chunk: int, gate_width: int) -> None:
    """One 16-step sub-block (c <= 16 or not a multiple: no off-diagonal part) and 2–3 sub-blocks."""
    gen = torch.Generator().manual_seed(chunk)
    q, k = (torch.randn(2, 3, chunk, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(2))
    log_gate = (-torch.rand(2, 3, chunk, gate_width, generator=gen, dtype=torch.float64)).requires_grad_()
    inputs = (q, k, log_gate)
    got = intra_chunk_scores(q, k, log_gate.cumsum(-2))  # [2, 3, C, C]
    want = direct_scores(q, k, log_gate.cumsum(-2))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    up = torch.randn(got.shape, generator=gen, dtype=torch.float64)
    for g, g_want in zip(torch.autograd.grad(got, inputs, up), torch.autograd.grad(want, inputs, up)):
        torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk", [16, 64])
def test_strong_per_channel_decays_never_overflow(chunk: int) -> None:
    """Log gates down to -80 per step: every exponent must stay <= 0 (no inf, no NaN gradient)."""
    gen = torch.Generator().manual_seed(1)
    q, k = (torch.randn(1, 2, chunk, 4, generator=gen, requires_grad=True) for _ in range(2))
    log_gate = (-80 * torch.rand(1, 2, chunk, 4, generator=gen)).requires_grad_()
    scores = intra_chunk_scores(q, k, log_gate.cumsum(-2))  # [1, 2, C, C]
    grads = torch.autograd.grad(scores.sum(), (q, k, log_gate))
    assert all(bool(torch.isfinite(t).all()) for t in (scores, *grads))
    torch.testing.assert_close(scores.diagonal(dim1=-2, dim2=-1), (q * k).sum(-1).detach())
