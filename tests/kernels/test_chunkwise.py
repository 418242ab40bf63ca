"""The PyTorch reference of chunk_gated_linear_attention against a float64 token loop."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_naive import naive_gated_linear_attention  # noqa: E402

from psmsearch.kernels import chunk_gated_linear_attention  # noqa: E402

B, H, DK, DV = 2, 2, 5, 6
CHUNK = 32  # two 16-step sub-blocks: exercises the off-diagonal and diagonal paths


def _inputs(steps: int, diagonal: bool, with_h0: bool, dtype: torch.dtype = torch.float64,
            decay: float = 2.0, seed: int = 0) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, H, steps, DK, generator=gen, dtype=dtype) for _ in range(2))
    v = torch.randn(B, H, steps, DV, generator=gen, dtype=dtype)
    gate_shape = (B, H, steps, DK) if diagonal else (B, H, steps)
    log_gate = -decay * torch.rand(gate_shape, generator=gen, dtype=dtype)
    h0 = torch.randn(B, H, DK, DV, generator=gen, dtype=dtype) if with_h0 else None
    return [q, k, v, log_gate, h0]


def _upstream(like: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.randn(like.shape, generator=torch.Generator().manual_seed(seed), dtype=like.dtype)


@pytest.mark.parametrize("steps", [1, 63, CHUNK, 3 * CHUNK])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_reference_matches_loop(steps: int, diagonal: bool, with_h0: bool) -> None:
    q, k, v, log_gate, h0 = _inputs(steps, diagonal, with_h0)
    inputs = [x.requires_grad_() for x in (q, k, v, log_gate, h0) if x is not None]
    o, final = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=CHUNK, initial_state=h0,
                                            output_final_state=True, backend="reference")
    o_want, final_want = naive_gated_linear_attention(q, k, v, log_gate, h0, DK ** -0.5)
    torch.testing.assert_close(o, o_want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_want, rtol=1e-10, atol=1e-10)
    outs, ups = (o, final), (_upstream(o, 1), _upstream(final, 2))
    got = torch.autograd.grad(outs, inputs, ups)
    want = torch.autograd.grad((o_want, final_want), inputs, ups)
    for g_got, g_want in zip(got, want):
        torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 64, 1 << 20])  # the last: one chunk far longer than T
def test_any_chunk_size(chunk_size: int) -> None:
    q, k, v, log_gate, _ = _inputs(40, True, False)
    o, _ = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=chunk_size, scale=0.3,
                                        backend="reference")
    o_want, _ = naive_gated_linear_attention(q, k, v, log_gate, None, 0.3)
    torch.testing.assert_close(o, o_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_strong_decay_is_stable(diagonal: bool) -> None:
    """log gates down to -60 per step: cumulative sums reach -3840 inside a chunk."""
    q, k, v, log_gate, h0 = _inputs(150, diagonal, True, dtype=torch.float32, decay=60.0)
    inputs = [x.requires_grad_() for x in (q, k, v, log_gate, h0)]
    o, final = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=64, initial_state=h0,
                                            output_final_state=True, backend="reference")
    grads = torch.autograd.grad((o, final), inputs, (torch.ones_like(o), torch.ones_like(final)))
    assert all(torch.isfinite(t).all() for t in (o, final, *grads))
    o_want, _ = naive_gated_linear_attention(*(x.detach().double() for x in (q, k, v, log_gate, h0)),
                                             DK ** -0.5)
    torch.testing.assert_close(o.double(), o_want, rtol=1e-4, atol=1e-4)


def test_bfloat16_close_to_float32() -> None:
    q, k, v, log_gate, h0 = _inputs(70, True, True, dtype=torch.float32)
    half = [x.to(torch.bfloat16) for x in (q, k, v, log_gate, h0)]
    o16, _ = chunk_gated_linear_attention(*half[:4], chunk_size=16, initial_state=half[4],
                                          backend="reference")
    assert o16.dtype == torch.bfloat16
    o32, _ = chunk_gated_linear_attention(*(x.float() for x in half[:4]), chunk_size=16,
                                          initial_state=half[4].float(), backend="reference")
    torch.testing.assert_close(o16.float(), o32, rtol=2e-2, atol=2e-2)


def test_final_state_only_on_request() -> None:
    q, k, v, log_gate, _ = _inputs(20, False, False, dtype=torch.float32)
    _, final = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=16)
    assert final is None


def test_shape_errors() -> None:
    q, k, v, log_gate, _ = _inputs(20, False, False)
    with pytest.raises(ValueError, match="log_gate"):
        chunk_gated_linear_attention(q, k, v, log_gate[..., :5])
    with pytest.raises(ValueError, match="v must be"):
        chunk_gated_linear_attention(q, k, v[:, :, :4], log_gate)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gated_linear_attention(q, k, v, log_gate, initial_state=torch.zeros(B, H, DV, DK))
    with pytest.raises(ValueError, match="at least one time step"):
        chunk_gated_linear_attention(q[:, :, :0], k[:, :, :0], v[:, :, :0], log_gate[:, :, :0])
    with pytest.raises(ValueError, match=r"chunk_gated_linear_attention: every input must be on one device; got q "
                                         r"on cpu, k on cpu, v on cpu, log_gate on cpu, initial_state on meta"):
        chunk_gated_linear_attention(q, k, v, log_gate, initial_state=torch.zeros(B, H, DK, DV, device="meta"))


def test_inputs_and_chunk_sizes_of_the_wrong_type_are_refused_by_name() -> None:
    """An int64 q was computed in float and cut back to whole numbers; a float or None chunk size
    failed deep inside padding."""
    q, k, v, log_gate, _ = _inputs(20, False, False, dtype=torch.float32)
    with pytest.raises(TypeError, match="q has dtype torch.int64; expected float16, bfloat16, float32 or float64"):
        chunk_gated_linear_attention(q.long(), k, v, log_gate)
    with pytest.raises(TypeError, match="v has dtype torch.float8_e4m3fn; expected float16, bfloat16, float32"):
        chunk_gated_linear_attention(q, k, v.to(torch.float8_e4m3fn), log_gate)  # outputs rounded to 8 bits
    with pytest.raises(TypeError, match="log_gate must be a torch.Tensor, got float"):
        chunk_gated_linear_attention(q, k, v, -0.1)
    for chunk_size in (16.0, None, True):
        with pytest.raises(TypeError, match="chunk_size must be a positive int"):
            chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=chunk_size)


def test_a_float64_initial_state_beside_float32_inputs_is_cast_to_float32() -> None:
    q, k, v, log_gate, h0 = _inputs(20, True, True, dtype=torch.float32)
    wide = h0.double().requires_grad_()
    o, final = chunk_gated_linear_attention(q, k, v, log_gate, initial_state=wide, output_final_state=True)
    want_o, want_final = chunk_gated_linear_attention(q, k, v, log_gate, initial_state=h0, output_final_state=True)
    assert o.dtype == final.dtype == torch.float32
    assert torch.equal(o, want_o) and torch.equal(final, want_final)
    assert torch.autograd.grad(final.sum(), wide)[0].dtype == torch.float64
