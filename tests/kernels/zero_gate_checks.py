"""Gates of exactly 0 (``log_gate = -inf``) in chunkwise GLA, against the float64 token loop.

Shared by ``test_chunkwise_zero_gates.py`` (the reference) and ``interpret_zero_gate_cases.py``
(Triton under ``TRITON_INTERPRET=1``). The loop multiplies the state by ``e^-inf = 0``, which is
exact; the chunkwise form differences cumulative gates and gave ``-inf - (-inf) = NaN``.
"""

from __future__ import annotations

import torch
from scan_naive import naive_gated_linear_attention

from psmsearch.kernels import chunk_gated_linear_attention


def zero_gate_inputs(steps: int, chunk_size: int, diagonal: bool, with_h0: bool, dtype: torch.dtype,
                     heads: int = 2, dk: int = 5, dv: int = 6,
                     seed: int = 0) -> tuple[list[torch.Tensor | None], torch.Tensor]:
    """``[q, k, v, log_gate, h0]`` with zero gates where a chunk starts and ends, at a chunk's
    second step, twice in a row, and (per channel) in one key channel only; and the zero mask."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(1, heads, steps, dk, generator=gen, dtype=torch.float64) for _ in range(2))
    v = torch.randn(1, heads, steps, dv, generator=gen, dtype=torch.float64)
    gate_shape = (1, heads, steps, dk) if diagonal else (1, heads, steps)
    log_gate = -torch.rand(gate_shape, generator=gen, dtype=torch.float64)
    zero = torch.zeros(gate_shape, dtype=torch.bool)
    for t in {0, 1, chunk_size - 1, chunk_size, chunk_size + 1, 2 * chunk_size + 3, 2 * chunk_size + 4, steps - 1}:
        if t < steps:
            zero[:, :, t] = True
    if diagonal:
        zero[:, 0, steps // 2, 1] = True  # one channel of one head forgets, the others remember
    log_gate = log_gate.masked_fill(zero, float("-inf"))
    h0 = torch.randn(1, heads, dk, dv, generator=gen, dtype=torch.float64) if with_h0 else None
    return [None if x is None else x.to(dtype) for x in (q, k, v, log_gate, h0)], zero


def check_zero_gates(backend: str, steps: int, chunk_size: int, diagonal: bool, with_h0: bool,
                     dtype: torch.dtype, tol: float) -> None:
    """Outputs, final state and every gradient of ``backend`` equal the float64 loop's.

    The gradient of a zero gate's log is 0 in the loop (``d e^g / dg = e^g = 0``), and so in the kernel.
    """
    tensors, zero = zero_gate_inputs(steps, chunk_size, diagonal, with_h0, dtype)
    inputs = [x.requires_grad_() for x in tensors if x is not None]
    q, k, v, log_gate, h0 = tensors
    o, final = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=chunk_size, initial_state=h0,
                                            output_final_state=True, backend=backend)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    eq, ek, ev, eg, *eh = exact
    o_want, final_want = naive_gated_linear_attention(eq, ek, ev, eg, eh[0] if eh else None, eq.shape[-1] ** -0.5)
    gen = torch.Generator().manual_seed(5)
    ups = [torch.randn(t.shape, generator=gen, dtype=torch.float64) for t in (o_want, final_want)]
    assert torch.isfinite(o).all() and torch.isfinite(final).all(), "non-finite output or final state"
    torch.testing.assert_close(o.double(), o_want, rtol=tol, atol=tol, msg=lambda m: f"outputs: {m}")
    torch.testing.assert_close(final.double(), final_want, rtol=tol, atol=tol, msg=lambda m: f"final state: {m}")
    got = torch.autograd.grad((o, final), inputs, [u.to(t.dtype) for u, t in zip(ups, (o, final))])
    want = torch.autograd.grad((o_want, final_want), exact, ups)
    for name, g, g_want in zip(("q", "k", "v", "log_gate", "h0"), got, want):
        assert torch.isfinite(g).all(), f"d{name} is not finite"
        torch.testing.assert_close(g.double(), g_want, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")
    assert bool((got[3][zero] == 0).all()), "a zero gate's log must get gradient 0"
