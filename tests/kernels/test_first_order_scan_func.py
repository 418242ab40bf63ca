"""``torch.func`` transforms and forward-mode AD through ``first_order_scan`` on the CPU backends.

The checks live in ``scan_func_checks.py`` (shared with the Triton runs); the
reference is a float64 token loop made of PyTorch ops.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import scan_func_checks as checks  # noqa: E402

from psmsearch.kernels import _dispatch  # noqa: E402
from scan_naive import naive_first_order_scan  # noqa: E402

BACKENDS = ["reference", pytest.param("numba", marks=pytest.mark.skipif(not _dispatch.numba_available(),
                                                                       reason="numba is not installed"))]
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp
# 63: the reference's step loop; 70: its blocked scan and the numba default (from 64 steps on)
STEPS = (63, 70)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("steps", STEPS)
@pytest.mark.parametrize("gate", list(checks.GATES))
@pytest.mark.parametrize("reverse", [False, True])
def test_grad_and_jvp_match_the_loop(backend: str, steps: int, gate: str, reverse: bool) -> None:
    checks.check_grad_and_jvp("cpu", backend, steps, gate, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_forward_ad_with_tangents_on_some_inputs(backend: str, reverse: bool) -> None:
    checks.check_forward_ad_with_some_tangents("cpu", backend, 70, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_vmap_matches_a_loop_over_the_vmapped_dim(backend: str, reverse: bool) -> None:
    checks.check_vmap("cpu", backend, 70, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_per_sample_gradients(backend: str, reverse: bool) -> None:
    checks.check_per_sample_gradients("cpu", backend, 70, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_jacrev_and_jacfwd(backend: str, reverse: bool) -> None:
    checks.check_jacobians("cpu", backend, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_higher_derivatives_match_the_loop(backend: str, reverse: bool) -> None:
    checks.check_higher_derivatives("cpu", backend, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_plain_backward_runs_the_fused_kernel(backend: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a differentiated backward pays for the composed one; ``loss.backward()`` runs the fused kernel."""
    import torch

    from psmsearch.kernels import first_order_scan
    from psmsearch.kernels import first_order_scan_autograd as rules

    def refuse(*args: object) -> None:
        raise AssertionError("a plain backward went through the composed gradients")

    monkeypatch.setattr(rules, "gradients_as_scans", refuse)
    a, b = torch.rand(2, 70, 3, requires_grad=True), torch.randn(2, 70, 3, requires_grad=True)
    first_order_scan(a, b, backend=backend).pow(2).sum().backward()
    assert a.grad is not None and b.grad is not None
    with pytest.raises(AssertionError, match="composed"):
        torch.autograd.grad(first_order_scan(a, b, backend=backend).pow(2).sum(), b, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nested_forward_mode_is_a_clear_error(backend: str) -> None:
    checks.check_nested_forward_mode_is_a_clear_error("cpu", backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reverse", [False, True])
def test_batched_grad_outputs(backend: str, reverse: bool) -> None:
    checks.check_batched_grad_outputs("cpu", backend, reverse)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_steps(backend: str) -> None:
    checks.check_no_steps("cpu", backend)


COMPILED_SCAN = """
import torch
from psmsearch.kernels import first_order_scan
a = torch.rand(2, 70, 3, requires_grad=True)
b = torch.randn(2, 70, 3, requires_grad=True)
loss = torch.compile(lambda a_, b_: first_order_scan(a_, b_, backend="{backend}").pow(2).sum(), backend="eager")
got = loss(a, b)
got.backward()
want = first_order_scan(a, b, backend="{backend}").pow(2).sum()
grads = torch.autograd.grad(want, (a, b))
with torch.no_grad():
    plain = loss(a, b)
assert torch.allclose(got, want) and torch.allclose(plain, want), (got, plain, want)
assert torch.allclose(a.grad, grads[0], atol=1e-5) and torch.allclose(b.grad, grads[1], atol=1e-5)
print("compiled scan ok")
"""
# torch.compile around vmap: eager frames under the transform are still offered to Dynamo (numba's dispatcher
# failed there). torch.compile around grad of a scan is not covered: Dynamo fails on functorch-wrapped
# tensors at the scan's graph break (an internal is_leaf assertion), with either backend.
COMPILED_TRANSFORM = """
import torch
from psmsearch.kernels import first_order_scan
a = torch.rand(2, 70, 3)
inputs = torch.randn(4, 2, 70, 3)
got = torch.compile(torch.vmap(lambda b_: first_order_scan(a, b_, backend="{backend}")), backend="eager")(inputs)
for i in range(4):
    assert torch.allclose(got[i], first_order_scan(a, inputs[i], backend="reference"), atol=1e-5), i
print("compiled scan ok")
"""


@pytest.mark.parametrize("script", [COMPILED_SCAN, COMPILED_TRANSFORM], ids=["scan", "vmap"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_in_a_fresh_process(backend: str, script: str) -> None:
    """torch.compile (Dynamo, eager backend) around the scan and around vmap of it, in a
    process whose kernels are not yet compiled: Dynamo must not trace into numba's dispatcher (it failed
    there); the scan is a graph break."""
    import subprocess

    result = subprocess.run([sys.executable, "-c", script.format(backend=backend)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "compiled scan ok" in result.stdout, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.parametrize("steps", [9, 70])
@pytest.mark.filterwarnings("ignore:Attempted to insert a get_attr Node:UserWarning")  # torch's linearize
def test_traces_record_the_scan(steps: int) -> None:
    """make_fx, torch.export and linearize record PyTorch ops only: a traced scan is the out-of-place
    step loop, whatever the default (numba from 64 steps on), replays correctly on new inputs, and takes
    gates that need gradients; asking for numba there is an error."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from psmsearch.kernels import first_order_scan

    a, b = torch.rand(2, steps, 3) * 0.5 + 0.5, torch.randn(2, steps, 3)
    want = naive_first_order_scan(a.double(), 2 * b.double(), None, False)
    traced = make_fx(lambda a_, b_: first_order_scan(a_, b_))(a, b)
    torch.testing.assert_close(traced(a, 2 * b).double(), want, rtol=1e-5, atol=1e-5)

    class Scan(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gates = torch.nn.Parameter(a.clone())                       # needs a gradient

        def forward(self, b_: torch.Tensor) -> torch.Tensor:
            return first_order_scan(self.gates, b_)

    exported = torch.export.export(Scan(), (b,))
    torch.testing.assert_close(exported.module()(2 * b).double(), want, rtol=1e-5, atol=1e-5)
    tangent = torch.randn_like(b)
    _, jvp_fn = torch.func.linearize(lambda b_: first_order_scan(a, b_), b)
    torch.testing.assert_close(jvp_fn(tangent).double(), naive_first_order_scan(a.double(), tangent.double(), None,
                                                                               False), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        make_fx(lambda a_, b_: first_order_scan(a_, b_, backend="numba"))(a, b)


def test_traced_with_a_backend_from_the_environment_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    """The caller passed backend=None; the error must say that the environment variable asked."""
    import torch
    from torch.fx.experimental.proxy_tensor import make_fx

    from psmsearch.kernels import first_order_scan

    a, b = torch.rand(2, 9, 3), torch.randn(2, 9, 3)
    monkeypatch.setenv("PSMSEARCH_KERNEL_BACKEND", "numba")
    with pytest.raises(RuntimeError, match="PSMSEARCH_KERNEL_BACKEND='numba'.*cannot be traced.*unset"):
        make_fx(lambda a_, b_: first_order_scan(a_, b_))(a, b)
    monkeypatch.setenv("PSMSEARCH_KERNEL_BACKEND", "foo")
    with pytest.raises(ValueError, match="PSMSEARCH_KERNEL_BACKEND='foo': unknown kernel backend"):
        make_fx(lambda a_, b_: first_order_scan(a_, b_))(a, b)
