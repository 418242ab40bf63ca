"""``torch.func`` transforms and forward-mode AD through ``first_order_scan``, for any backend.

The reference is :func:`scan_naive.naive_first_order_scan` in float64: a token
loop of PyTorch ops, which every transform differentiates and vmaps natively.
The kernels run in float32, so results agree to float32 accuracy. Shared by the
CPU tests (reference, numba), the Triton interpreter run and the CUDA run.
"""

from __future__ import annotations

import pytest
import torch
import torch.autograd.forward_ad as fwad
from scan_naive import naive_first_order_scan
from torch.func import grad, jacfwd, jacrev, jvp, vmap

from psmsearch.kernels import first_order_scan

STATE = (2, 3)  # [H, d]
GATES = {"scalar": (2, 1), "diagonal": STATE, "time-shared": STATE}
TOL = 2e-5


def _inputs(device: str, steps: int, gate: str, batch: int = 2, seed: int = 0,
            lead: tuple[int, ...] = ()) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``a, b, h0`` in float64 on ``device``, with extra leading dims ``lead`` (vmapped ones)."""
    gen = torch.Generator().manual_seed(seed)
    gate_steps = 1 if gate == "time-shared" else steps
    a = torch.rand((*lead, batch, gate_steps, *GATES[gate]), generator=gen, dtype=torch.float64) * 0.6 + 0.4
    b = torch.randn((*lead, batch, steps, *STATE), generator=gen, dtype=torch.float64)
    h0 = torch.randn((*lead, batch, *STATE), generator=gen, dtype=torch.float64)
    return a.to(device), b.to(device), h0.to(device)


def _scan(backend: str, reverse: bool):  # noqa: ANN202 - a closure over the backend
    """The kernel under test as a float64-in, float64-out function (computed in float32)."""
    def scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        start = None if h0 is None else h0.float()
        return first_order_scan(a.float(), b.float(), start, reverse=reverse, backend=backend).double()
    return scan


def _naive(reverse: bool):  # noqa: ANN202
    def scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
        gates = a.cpu().expand(b.shape[:2] + a.shape[2:])                     # the loop indexes every step
        return naive_first_order_scan(gates, b.cpu(), None if h0 is None else h0.cpu(), reverse)
    return scan


def _close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=TOL, atol=TOL, msg=lambda m: f"{what}: {m}")


def check_grad_and_jvp(device: str, backend: str, steps: int, gate: str, reverse: bool) -> None:
    """``torch.func.grad`` in all three inputs, and ``jvp`` with tangents in all three."""
    a, b, h0 = _inputs(device, steps, gate)
    weight = torch.randn(b.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    scan, naive = _scan(backend, reverse), _naive(reverse)
    got = grad(lambda *x: (scan(*x).cpu() * weight).sum(), argnums=(0, 1, 2))(a, b, h0)
    want = grad(lambda *x: (naive(*x) * weight).sum(), argnums=(0, 1, 2))(a, b, h0)
    for name, g_got, g_want in zip(("a", "b", "h0"), got, want):
        _close(g_got, g_want, f"grad {name}")
    tangents = _inputs(device, steps, gate, seed=1)
    out, tangent = jvp(scan, (a, b, h0), tangents)
    out_want, tangent_want = jvp(naive, (a, b, h0), tangents)
    _close(out, out_want, "jvp primal")
    _close(tangent, tangent_want, "jvp tangent")


def check_forward_ad_with_some_tangents(device: str, backend: str, steps: int, reverse: bool) -> None:
    """Dual tensors (``torch.autograd.forward_ad``) on one input at a time, ``h0`` absent or not."""
    a, b, h0 = _inputs(device, steps, "diagonal")
    tangents = _inputs(device, steps, "diagonal", seed=3)
    scan, naive = _scan(backend, reverse), _naive(reverse)
    for which in range(3):
        for start in (h0, None):
            if which == 2 and start is None:
                continue
            primals = [a, b, start]
            with fwad.dual_level():
                duals = [fwad.make_dual(x, t) if k == which else x
                         for k, (x, t) in enumerate(zip(primals, tangents))]
                got = fwad.unpack_dual(scan(*duals)).tangent
            want_tangents = tuple((t if k == which else torch.zeros_like(t)).cpu() for k, t in enumerate(tangents))
            zero_start = torch.zeros_like(h0)                                 # the loop's h0 when None
            _, want = jvp(naive, (a, b, zero_start if start is None else start), want_tangents)
            assert got is not None, f"tangent of input {which} was dropped"
            _close(got, want, f"forward AD, tangent on input {which}, h0 {'given' if start is not None else 'None'}")


def check_vmap(device: str, backend: str, steps: int, reverse: bool) -> None:
    """``vmap`` over every combination of batched inputs, at dim 0 and at an inner dim."""
    size = 3
    a, b, h0 = _inputs(device, steps, "scalar", lead=(size,))
    scan, naive = _scan(backend, reverse), _naive(reverse)
    for in_dims in ((0, 0, 0), (None, 0, None), (0, None, None), (None, None, 0), (0, 0, None)):
        args = [x if d == 0 else x[0] for x, d in zip((a, b, h0), in_dims)]
        got = vmap(scan, in_dims=in_dims)(*args)
        want = torch.stack([naive(*[x[i] if d == 0 else x for x, d in zip(args, in_dims)]) for i in range(size)])
        _close(got, want, f"vmap in_dims={in_dims}")
    shared_start = h0[:, 0]                                                    # [V, H, d]: broadcast over B
    got = vmap(scan, in_dims=(None, None, 0))(a[0], b[0], shared_start)
    want = torch.stack([naive(a[0], b[0], shared_start[i]) for i in range(size)])
    _close(got, want, "vmap over an h0 of lower rank than [B, *S]")
    inner = b.movedim(0, 2)                                                    # [B, T, V, H, d]
    got = vmap(lambda b_: scan(a[0], b_, None), in_dims=2, out_dims=1)(inner)
    want = torch.stack([naive(a[0], b[i], None) for i in range(size)], dim=1)
    _close(got, want, "vmap over an inner dim of b")


def check_per_sample_gradients(device: str, backend: str, steps: int, reverse: bool) -> None:
    """``vmap(grad(...))``: gradients in shared gates and ``h0`` for each of several inputs ``b``."""
    size = 3
    a, _, h0 = _inputs(device, steps, "diagonal")
    _, bs, _ = _inputs(device, steps, "diagonal", lead=(size,), seed=2)
    scan, naive = _scan(backend, reverse), _naive(reverse)

    def loss(fn, a_: torch.Tensor, h0_: torch.Tensor, b_: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        return fn(a_, b_, h0_).cpu().pow(2).sum()

    got = vmap(grad(lambda a_, h0_, b_: loss(scan, a_, h0_, b_), argnums=(0, 1)), in_dims=(None, None, 0))(a, h0, bs)
    for i in range(size):
        want = grad(lambda a_, h0_: loss(naive, a_, h0_, bs[i]), argnums=(0, 1))(a, h0)
        _close(got[0][i], want[0], f"per-sample grad a, sample {i}")
        _close(got[1][i], want[1], f"per-sample grad h0, sample {i}")


def check_jacobians(device: str, backend: str, reverse: bool, steps: int = 9) -> None:
    """``jacrev`` (vmap over the backward) and ``jacfwd`` (vmap over the jvp) equal the loop's Jacobian."""
    a, b, h0 = _inputs(device, steps, "scalar", batch=1)
    scan, naive = _scan(backend, reverse), _naive(reverse)
    want = jacrev(naive, argnums=(0, 1))(a.cpu(), b.cpu(), h0.cpu())
    for name, jac in (("jacrev", jacrev), ("jacfwd", jacfwd)):
        got = jac(scan, argnums=(0, 1))(a, b, h0)
        for arg, g_got, g_want in zip(("a", "b"), got, want):
            _close(g_got, g_want, f"{name} in {arg}")


def check_higher_derivatives(device: str, backend: str, reverse: bool, dtype: torch.dtype = torch.float64,
                             tol: float = 1e-10, steps: int = 9) -> None:
    """Derivatives of the gradient equal the loop's: ``hessian`` (forward over reverse), a third
    derivative by ``grad`` of ``grad`` of ``grad``, and autograd's double backward (``create_graph``).

    Run in ``dtype`` (float64 where the backend takes it: the results then agree to rounding).
    Errors are relative to the largest entry of the loop's result.
    """
    a, b, h0 = _inputs(device, steps, "scalar")
    a, b, h0 = (x.to(dtype) for x in (a, b, h0))

    def loss(fn):  # noqa: ANN001, ANN202
        return lambda a_, b_, h0_: fn(a_, b_, h0_).pow(2).sum()

    def scan(a_: torch.Tensor, b_: torch.Tensor, h0_: torch.Tensor) -> torch.Tensor:
        return first_order_scan(a_, b_, h0_, reverse=reverse, backend=backend).cpu().double()

    def naive(a_: torch.Tensor, b_: torch.Tensor, h0_: torch.Tensor) -> torch.Tensor:
        return _naive(reverse)(a_.double(), b_.double(), h0_.double())

    def close(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
        scale = want.abs().max().item() or 1.0
        torch.testing.assert_close(got.cpu().double() / scale, want.cpu().double() / scale, rtol=tol, atol=tol,
                                   msg=lambda m: f"{what}: {m}")

    names = ("a", "b", "h0")
    got = torch.func.hessian(loss(scan), argnums=(0, 1, 2))(a, b, h0)
    want = torch.func.hessian(loss(naive), argnums=(0, 1, 2))(a, b, h0)
    for i, (row_got, row_want) in enumerate(zip(got, want)):
        for j, (block_got, block_want) in enumerate(zip(row_got, row_want)):
            close(block_got, block_want, f"hessian block ({names[i]}, {names[j]})")

    def third(fn):  # noqa: ANN001, ANN202
        first = torch.func.grad(loss(fn), argnums=1)
        second = torch.func.grad(lambda a_, b_, h0_: first(a_, b_, h0_).pow(2).sum(), argnums=0)
        return torch.func.grad(lambda a_, b_, h0_: second(a_, b_, h0_).sum(), argnums=2)(a, b, h0)

    close(third(scan), third(naive), "third derivative (d/dh0 of d/da of |d/db|^2)")
    results = []
    for fn in (scan, naive):
        x = b.clone().requires_grad_()
        (g,) = torch.autograd.grad(loss(fn)(a, x, h0), x, create_graph=True)
        results.append(torch.autograd.grad(g.pow(2).sum(), x)[0])
    close(results[0], results[1], "double backward")


def check_nested_forward_mode_is_a_clear_error(device: str, backend: str, steps: int = 9, batch: int = 2) -> None:
    """Forward over forward would come out silently wrong through a custom Function (PyTorch drops the
    outer tangent); it must raise and name the alternatives, while reverse on either side still works."""
    a, b, _ = _inputs(device, steps, "scalar", batch=batch)
    scan = _scan(backend, False)

    def loss(a_: torch.Tensor) -> torch.Tensor:
        return scan(a_, b, None).pow(2).sum()

    with pytest.raises(RuntimeError, match="forward mode over forward mode"):
        jacfwd(jacfwd(loss))(a)
    want = jacrev(jacrev(lambda a_: _naive(False)(a_, b, None).pow(2).sum()))(a)
    _close(jacrev(jacfwd(loss))(a), want, "jacrev(jacfwd)")


def check_batched_grad_outputs(device: str, backend: str, reverse: bool, steps: int = 70) -> None:
    """A plain backward under ``vmap`` (over ``autograd.grad``'s grad outputs) equals one backward per
    output; PyTorch's legacy batched grads (``is_grads_batched``), which run no Function rules, raise
    and point to ``torch.func``."""
    a, b, h0 = _inputs(device, steps, "diagonal")
    weights = torch.randn((3, *b.shape), generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    want_b, want_a = [], []
    for w in weights:
        x, gates = b.cpu().clone().requires_grad_(), a.cpu().clone().requires_grad_()
        gb, ga = torch.autograd.grad(_naive(reverse)(gates, x, h0), (x, gates), w)
        want_b.append(gb)
        want_a.append(ga)
    x, gates = b.clone().float().requires_grad_(), a.clone().float().requires_grad_()
    out = first_order_scan(gates, x, h0.float(), reverse=reverse, backend=backend)
    got_b, got_a = vmap(lambda w: torch.autograd.grad(out, (x, gates), w, retain_graph=True))(weights.float().to(device))
    _close(got_b.double(), torch.stack(want_b), "vmap over grad outputs, gradient in b")
    _close(got_a.double(), torch.stack(want_a), "vmap over grad outputs, gradient in a")
    with pytest.raises(RuntimeError, match="legacy vmap"):
        torch.autograd.grad(out, x, weights.float().to(device), is_grads_batched=True)


def check_no_steps(device: str, backend: str) -> None:
    """``T = 0``: an empty output, and zero or empty gradients, in every mode."""
    for reverse in (False, True):
        for start in (None, torch.randn(2, *STATE, dtype=torch.float64, device=device)):
            a = torch.rand(2, 0, *STATE, dtype=torch.float64, device=device, requires_grad=True)
            b = torch.randn(2, 0, *STATE, dtype=torch.float64, device=device, requires_grad=True)
            h0 = None if start is None else start.clone().requires_grad_()
            inputs = [x for x in (a, b, h0) if x is not None]
            out = first_order_scan(a, b, h0, reverse=reverse, backend=backend)
            assert out.shape == b.shape
            for create_graph in (False, True):
                grads = torch.autograd.grad(out.sum() + 0 * sum(x.sum() for x in inputs), inputs,
                                            create_graph=create_graph, retain_graph=True)
                assert all(g.shape == x.shape and not g.any() for g, x in zip(grads, inputs))
            got = grad(lambda b_: first_order_scan(a, b_, start, reverse=reverse, backend=backend).sum())(b)
            assert got.shape == b.shape
