"""The PyTorch reference of first_order_scan against a float64 token loop, plus dispatch rules.

The numba backend has its own file, ``test_first_order_scan_numba.py``; tests here that
hold for any CPU backend are parametrised over both.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from scan_naive import naive_first_order_scan  # noqa: E402

from psmsearch.kernels import first_order_scan  # noqa: E402
from psmsearch.kernels import _dispatch  # noqa: E402

BATCH, STATE = 2, (2, 3, 4)  # state [H, dk, dv]
GATE_SHAPES = {
    "scalar": (2, 1, 1),   # one gate per head
    "diagonal": (2, 3, 1),  # one per key channel
    "full": STATE,
}
# 1 step, a loop-only length, the shortest blocked length (8 blocks of 8) and a
# blocked length with a tail; LONG also makes the carry scan over blocks recurse.
STEPS = (1, 63, 64, 197)
LONG = 600


def _inputs(steps: int, gate: str, with_h0: bool, dtype: torch.dtype = torch.float64,
            seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand((BATCH, steps, *GATE_SHAPES[gate]), generator=gen, dtype=dtype) * 0.6 + 0.4
    b = torch.randn((BATCH, steps, *STATE), generator=gen, dtype=dtype)
    h0 = torch.randn((BATCH, *STATE), generator=gen, dtype=dtype) if with_h0 else None
    return a, b, h0


def _grads(out: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> tuple[torch.Tensor, ...]:
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    return torch.autograd.grad(out, inputs, upstream)


@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("gate", list(GATE_SHAPES))
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_reference_matches_loop(steps: int, gate: str, with_h0: bool, reverse: bool) -> None:
    a, b, h0 = _inputs(steps, gate, with_h0)
    inputs = [x.requires_grad_() for x in (a, b, h0) if x is not None]
    got = first_order_scan(a, b, h0, reverse=reverse, backend="reference")
    want = naive_first_order_scan(a, b, h0, reverse)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs)):
        assert g_got.shape == g_want.shape
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(("gate", "with_h0", "reverse"),
                         [("scalar", True, False), ("diagonal", False, True), ("full", True, True)])
def test_reference_matches_loop_long(gate: str, with_h0: bool, reverse: bool) -> None:
    test_reference_matches_loop(LONG, gate, with_h0, reverse)


@pytest.mark.parametrize("steps", [63, 197, LONG])
@pytest.mark.parametrize("reverse", [False, True])
def test_in_place_scan_into_b(steps: int, reverse: bool) -> None:
    """``_scan_into`` with ``out`` = ``b``, as the carry levels run it: the result overwrites the inputs."""
    from psmsearch.kernels.first_order_scan_reference import _scan_into

    a, b, h0 = _inputs(steps, "diagonal", True)
    want = naive_first_order_scan(a, b, h0, reverse)
    _scan_into(a, b, h0, b, reverse)
    torch.testing.assert_close(b, want, rtol=1e-10, atol=1e-10)


def test_gates_broadcast_over_batch_and_time() -> None:
    a, b, h0 = _inputs(130, "diagonal", True)
    a = a[:1, :1].clone().requires_grad_()
    inputs = [a, b.requires_grad_(), h0.requires_grad_()]
    got = first_order_scan(a, b, h0, backend="reference")
    want = naive_first_order_scan(a.expand(b.shape[:2] + a.shape[2:]), b, h0, False)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    for g_got, g_want in zip(_grads(got, inputs), _grads(want, inputs)):
        torch.testing.assert_close(g_got, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("backend", [
    "reference",
    pytest.param("numba", marks=pytest.mark.skipif(not _dispatch.numba_available(), reason="numba is not installed")),
])
def test_tiny_gates_are_stable(reverse: bool, backend: str) -> None:
    """Gates spread over 40 decades: products underflow, nothing divides by them."""
    gen = torch.Generator().manual_seed(3)
    a = 10.0 ** (-40 * torch.rand(3, 1500, 8, generator=gen))  # float32, many denormal or 0
    b = torch.randn(3, 1500, 8, generator=gen)
    got = first_order_scan(a, b, reverse=reverse, backend=backend)
    assert torch.isfinite(got).all()
    want = naive_first_order_scan(a.double(), b.double(), None, reverse)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_unit_gates_give_a_cumulative_sum() -> None:
    b = torch.randn(2, 5000, 3, dtype=torch.float64)
    got = first_order_scan(torch.ones_like(b), b, backend="reference")
    torch.testing.assert_close(got, b.cumsum(1), rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_close_to_float32(dtype: torch.dtype) -> None:
    a, b, h0 = _inputs(700, "diagonal", True, dtype=torch.float32)
    a16, b16, h016 = a.to(dtype), b.to(dtype), h0.to(dtype)
    got = first_order_scan(a16, b16, h016, backend="reference")
    assert got.dtype == dtype
    want = first_order_scan(a16.float(), b16.float(), h016.float(), backend="reference")
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_output_keeps_b_dtype_and_shape() -> None:
    a, b, _ = _inputs(70, "scalar", False, dtype=torch.float32)
    out = first_order_scan(a, b)
    assert out.shape == b.shape and out.dtype == torch.float32


def test_default_cpu_backend_is_the_reference_unless_a_kernel_prefers_numba(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    x = torch.zeros(1)
    assert _dispatch.select_backend(None, x) == "reference"


def test_env_var_selects_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(_dispatch.ENV_VAR, "reference")
    assert _dispatch.select_backend(None, torch.zeros(1)) == "reference"
    monkeypatch.setenv(_dispatch.ENV_VAR, "bogus")
    with pytest.raises(ValueError, match="unknown kernel backend"):
        _dispatch.select_backend(None, torch.zeros(1))


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    a, b, _ = _inputs(4, "full", False, dtype=torch.float32)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        first_order_scan(a, b, backend="triton")


def test_triton_refuses_float64(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if not _dispatch.triton_available():
        pytest.skip("triton is not installed")
    a, b, _ = _inputs(4, "full", False)
    with pytest.raises(RuntimeError, match="float64"):
        first_order_scan(a, b, backend="triton")


def test_shape_errors() -> None:
    b = torch.zeros(2, 5, 3, 4)
    with pytest.raises(ValueError, match=r"^first_order_scan: a must have b's rank 4 \(b is \(2, 5, 3, 4\); size-1 "
                                         r"dims broadcast\), got shape \(2, 5, 3\)") as caught:
        first_order_scan(torch.zeros(2, 5, 3), b)
    from psmsearch.errors import where_raised

    # A failed trial names the caller's line (a plugin's scan), not the kernel's argument check, also where
    # an editable install maps psmsearch.kernels from the repository's kernels/ folder.
    assert where_raised(caught.value).startswith(f" (at {__file__}:"), where_raised(caught.value)
    with pytest.raises(ValueError, match="broadcast"):
        first_order_scan(torch.zeros(2, 5, 2, 4), b)
    with pytest.raises(ValueError, match="h0"):
        first_order_scan(torch.zeros(2, 5, 3, 1), b, torch.zeros(2, 5, 4))


BACKENDS = ["reference", pytest.param("numba", marks=pytest.mark.skipif(not _dispatch.numba_available(),
                                                                     reason="numba is not installed"))]


@pytest.mark.parametrize("backend", BACKENDS)
def test_inputs_that_are_not_real_float_tensors_are_refused_by_name(backend: str) -> None:
    """Integer inputs were computed in float and cut back to whole numbers, complex ones lost their
    imaginary part: both silently wrong, so both are errors that name the input."""
    a, b = torch.full((1, 70, 2), 0.5), torch.randn(1, 70, 2)
    cases = [
        ((a, torch.full((1, 70, 2), 3)), "b has dtype torch.int64"),
        ((a.to(torch.int32), b), "a has dtype torch.int32"),
        ((a, b.to(torch.complex64)), "b has dtype torch.complex64"),
        ((a, b.to(torch.float8_e5m2)), "b has dtype torch.float8_e5m2; expected float16, bfloat16, float32 or float64"),
        ((0.5, b), "a must be a torch.Tensor, got float"),
        ((a, b.numpy()), "b must be a torch.Tensor, got ndarray"),
        ((a, b, torch.zeros(1, 2, dtype=torch.int64)), "h0 has dtype torch.int64"),
        ((a, b, 0.0), "h0 must be a torch.Tensor"),
    ]
    for args, message in cases:
        with pytest.raises(TypeError, match=message):
            first_order_scan(*args, backend=backend)


def test_a_backend_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(TypeError, match="backend=1: expected one of"):
        first_order_scan(torch.rand(1, 4, 2), torch.randn(1, 4, 2), backend=1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_shape", [(2, 9, 1), (1, 1, 1)])
def test_an_empty_state_under_non_empty_gates_gives_zero_gate_gradients(backend: str,
                                                                        gate_shape: tuple[int, ...]) -> None:
    """No state element reaches an output, so the gates' gradient is zero; the numba backward once
    returned the gate gradient's buffer unwritten here (NaN under poisoned outputs)."""
    a = torch.rand(gate_shape, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 9, 0, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 0, dtype=torch.float64, requires_grad=True)
    with _dispatch.poisoned_outputs():
        out = first_order_scan(a, b, h0, backend=backend)
        da, db, dh0 = torch.autograd.grad(out.sum(), (a, b, h0))
    assert out.shape == b.shape and db.shape == b.shape and dh0.shape == h0.shape
    assert torch.equal(da, torch.zeros_like(a))


@pytest.mark.parametrize("backend", BACKENDS)
def test_calls_without_grad_skip_autograd_and_agree(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """No input needs a gradient, or grad mode is off: the kernel runs without the autograd
    Function (which would raise here), builds no graph, matches the float64 loop and the
    Function's result bit for bit, and leaves ``h0`` (which it must not advance) intact."""
    from psmsearch.kernels.first_order_scan_autograd import FirstOrderScan

    a, b, h0 = _inputs(197, "diagonal", True, dtype=torch.float32)
    h0_before = h0.clone()
    with_graph = first_order_scan(a.clone().requires_grad_(), b, h0, backend=backend)
    assert with_graph.grad_fn is not None

    def refuse(*args: object) -> None:
        raise AssertionError("a call without gradients went through the autograd Function")

    monkeypatch.setattr(FirstOrderScan, "apply", refuse)
    plain = first_order_scan(a, b, h0, backend=backend)
    assert not plain.requires_grad and plain.grad_fn is None
    with torch.no_grad():
        no_grad_mode = first_order_scan(a.clone().requires_grad_(), b, h0, backend=backend)
    assert no_grad_mode.grad_fn is None and not no_grad_mode.requires_grad
    assert torch.equal(plain, with_graph.detach()) and torch.equal(plain, no_grad_mode)
    assert torch.equal(h0, h0_before)
    torch.testing.assert_close(plain.double(), naive_first_order_scan(a.double(), b.double(), h0.double(), False),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_transformed_calls_go_through_the_autograd_function(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inputs that need no gradient but are dual (forward AD) or wrapped by a torch.func transform
    must reach the Function's rules: the kernels alone would drop the tangent or fail on the wrapper."""
    import torch.autograd.forward_ad as fwad

    from psmsearch.kernels.first_order_scan_autograd import FirstOrderScan

    calls: list[str] = []
    apply = FirstOrderScan.apply
    monkeypatch.setattr(FirstOrderScan, "apply", lambda *args: calls.append("apply") or apply(*args))
    a, b, _ = _inputs(70, "diagonal", False, dtype=torch.float32)
    with fwad.dual_level():
        first_order_scan(a, fwad.make_dual(b, torch.ones_like(b)), backend=backend)
    assert calls, "a dual input skipped the Function"
    calls.clear()
    torch.vmap(lambda b_: first_order_scan(a, b_, backend=backend))(b.unsqueeze(0))
    assert calls, "a vmapped input skipped the Function"


@pytest.mark.parametrize("backend", ["reference", "numba"])
def test_a_float64_h0_beside_float32_inputs_is_cast_to_float32(backend: str) -> None:
    """As documented: the scan computes in the inputs' dtype and casts h0 to it; the gradient is float64."""
    a, b = torch.rand(2, 70, 3) * 0.5 + 0.5, torch.randn(2, 70, 3)
    h0 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    got = first_order_scan(a, b, h0, backend=backend)
    assert got.dtype == torch.float32
    assert torch.equal(got, first_order_scan(a, b, h0.detach().float(), backend=backend))
    (grad,) = torch.autograd.grad(got.sum(), h0)
    assert grad.dtype == torch.float64
