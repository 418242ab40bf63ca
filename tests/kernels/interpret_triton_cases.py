"""Triton kernels under TRITON_INTERPRET=1 (CPU), against the PyTorch reference.

Not collected by default (no ``test_`` prefix): ``test_triton_interpret.py`` runs
this file in a subprocess with the variable set, because Triton decides between
compiling and interpreting when a kernel module is imported.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (see test_triton_interpret.py)")

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from triton_kernel_checks import (  # noqa: E402
    check_chunk,
    check_chunk_func_transforms,
    check_chunk_half,
    check_chunk_mixed_dtypes,
    check_decay_layer,
    check_decay_layer_other_chunk,
    check_scan,
    check_scan_half,
    check_triton_decision,
    chunk_inputs,
)

import scan_func_checks  # noqa: E402

from psmsearch.kernels import chunk_gated_linear_attention  # noqa: E402

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize(("steps", "gate", "with_h0", "reverse"), [
    (1, "full", True, False),
    (1, "scalar", False, True),
    (13, "scalar", True, False),
    (13, "diagonal", False, True),
    (21, "full", False, False),
    (21, "diagonal", True, True),
    (21, "scalar", True, True),
    (21, "full", True, True),
])
def test_scan_matches_reference(steps: int, gate: str, with_h0: bool, reverse: bool) -> None:
    check_scan("cpu", steps, gate, with_h0, reverse)


# About 5 s each in the interpreter: one runs by default (the T = 63), the others in
# test_triton_interpret.py's slow case.
@pytest.mark.parametrize(("gate", "reverse", "non_contiguous"), [
    ("scalar", False, True),
    pytest.param("diagonal", True, False, marks=pytest.mark.slow),
    pytest.param("full", True, True, marks=pytest.mark.slow),
])
def test_scan_63_steps(gate: str, reverse: bool, non_contiguous: bool) -> None:
    """T = 63: seven full 8-step interpreter tiles and a partial one; B = 3, strided inputs too."""
    check_scan("cpu", 63, gate, True, reverse, non_contiguous=non_contiguous, batch=3)


@pytest.mark.parametrize(("steps", "gate", "with_h0", "reverse", "layout"), [
    (1, "full", True, False, {}),
    (21, "diagonal", True, True, {}),
    (37, "scalar", False, False, {}),                                 # no initial state
    (37, "full", True, True, {"non_contiguous": True}),               # strided inputs
    (37, "diagonal", False, True, {"gate_shape": (1, 1, 2, 3, 1)}),   # one gate for every batch row and step
])
def test_scan_coarse_forward(steps: int, gate: str, with_h0: bool, reverse: bool, layout: dict[str, object],
                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The forward kernel whose groups walk consecutive steps (CUDA tuning may pick it), on a tiny tile:
    4 groups of 4 steps, so T = 37 spans two tiles and a partial third; the backward keeps its kernel."""
    _force_coarse_forward(monkeypatch)
    check_scan("cpu", steps, gate, with_h0, reverse, batch=3, **layout)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_coarse_forward_half_inputs(dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    _force_coarse_forward(monkeypatch)
    check_scan_half("cpu", dtype, steps=37)


def _force_coarse_forward(monkeypatch: pytest.MonkeyPatch) -> None:
    from psmsearch.kernels import first_order_scan_triton as scan_triton

    coarse = scan_triton._Config(block_t=16, block_n=16, num_warps=1, sub=4)
    monkeypatch.setattr(scan_triton, "_config", lambda key, elements, launch, device, candidates=None:
                        coarse if candidates is scan_triton._FORWARD_CANDIDATES else scan_triton._INTERPRET_CONFIG)


@pytest.mark.parametrize(("steps", "gate", "state", "reverse"), [
    (0, "full", (2, 3, 5), False),        # no step: h0 reaches no output, its gradient is zero
    (0, "scalar", (2, 3, 5), True),
    (9, "diagonal", (2, 3, 0), False),    # an empty state under non-empty gates: their gradient is zero
])
def test_scan_empty_inputs_with_h0(steps: int, gate: str, state: tuple[int, ...], reverse: bool) -> None:
    check_scan("cpu", steps, gate, True, reverse, state=state)


def test_scan_float64_h0_beside_float32_inputs() -> None:
    """Triton refused it ("Triton supports float32/bfloat16/float16 inputs"); h0 is cast to float32 first."""
    from psmsearch.kernels import first_order_scan

    a, b, h0 = torch.rand(2, 9, 3) * 0.5 + 0.5, torch.randn(2, 9, 3), torch.randn(2, 3, dtype=torch.float64)
    got = first_order_scan(a, b, h0, backend="triton")
    torch.testing.assert_close(got, first_order_scan(a, b, h0.float(), backend="reference"), rtol=1e-6, atol=1e-6)


def test_scan_gate_broadcast_over_batch_and_time() -> None:
    check_scan("cpu", 11, "diagonal", True, False, gate_shape=(1, 1, 2, 3, 1))


def test_scan_one_gate_for_the_whole_state() -> None:
    """A gate of one element per step broadcast over a vector state (its column table is all zeros)."""
    check_scan("cpu", 9, "scalar", True, False, state=(7,), gate_shape=(2, 9, 1))


@pytest.mark.parametrize("chunk_size", [8, 24, 256])
def test_triton_chunk_size_out_of_range_is_a_clear_error(chunk_size: int) -> None:
    q, k, v, log_gate, _ = chunk_inputs("cpu", 20, False, False)
    with pytest.raises(ValueError, match=r"chunk_size in \(16, 32, 64, 128\)"):
        chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=chunk_size, backend="triton")


def test_chunk_one_head_scalar_gate() -> None:
    check_chunk("cpu", 20, False, True, chunk_size=16, heads=1)


@pytest.mark.parametrize(("steps", "diagonal", "with_h0"), [
    (1, True, True),
    (32, False, False),
    (45, True, False),
    (77, False, True),
    (96, True, True),
])
def test_chunk_matches_reference(steps: int, diagonal: bool, with_h0: bool) -> None:
    check_chunk("cpu", steps, diagonal, with_h0)


@pytest.mark.slow  # about 6 s each in the interpreter: run by test_triton_interpret.py's slow case
@pytest.mark.parametrize("diagonal", [False, True])
def test_chunk_batch_of_three_strided_inputs(diagonal: bool) -> None:
    """B = 3 (the other cases have B = 1, so a batch index mix-up in the kernels would not show),
    3 chunks of 16 with a partial last one, dk != dv, and every input a transposed-layout view."""
    check_chunk("cpu", 40, diagonal, True, chunk_size=16, batch=3, dk=5, dv=7, non_contiguous=True)


def test_chunk_strong_decay_and_odd_head_dims() -> None:
    check_chunk("cpu", 40, True, True, chunk_size=16, dk=20, dv=7, decay=40.0)


@pytest.mark.parametrize(("used", "diagonal"), [("output", True), ("final_state", False)])
def test_chunk_gradients_of_one_output(used: str, diagonal: bool) -> None:
    check_chunk("cpu", 50, diagonal, True, chunk_size=16, used=used)


def test_chunk_63_steps_dv_split_across_programs() -> None:
    """T = 63 in one 64-step chunk; dv = 70 spans two dv blocks of 64."""
    check_chunk("cpu", 63, True, False, chunk_size=64, dk=5, dv=70, heads=1)


def test_chunk_bfloat16_outputs_and_gradients() -> None:
    check_chunk_half("cpu", torch.bfloat16, True, steps=70)


def test_chunk_mixed_dtypes() -> None:
    check_chunk_mixed_dtypes("cpu")


@pytest.mark.parametrize("encoder", ["mamba2", "mlstm", "gla"])
def test_decay_layer_trains_through_the_triton_kernel(encoder: str) -> None:
    check_decay_layer("cpu", encoder)


@pytest.mark.parametrize("encoder", ["mamba2", "gla"])
def test_decay_layer_at_a_chunk_size_triton_cannot_take(encoder: str) -> None:
    check_decay_layer_other_chunk("cpu", encoder)


def test_triton_decision_follows_chunk_size_and_dtype() -> None:
    check_triton_decision("cpu")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_scan_under_torch_func_transforms(reverse: bool) -> None:
    """grad, jvp, vmap and per-sample gradients through the Triton scan (tiny: the interpreter is slow)."""
    scan_func_checks.check_grad_and_jvp("cpu", "triton", 9, "scalar", reverse)
    scan_func_checks.check_vmap("cpu", "triton", 9, reverse)
    scan_func_checks.check_per_sample_gradients("cpu", "triton", 9, reverse)
    scan_func_checks.check_higher_derivatives("cpu", "triton", reverse, dtype=torch.float32, tol=1e-4, steps=5)
    scan_func_checks.check_batched_grad_outputs("cpu", "triton", reverse, steps=9)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_scan_nested_forward_mode_is_a_clear_error() -> None:
    scan_func_checks.check_nested_forward_mode_is_a_clear_error("cpu", "triton", steps=3, batch=1)


@pytest.mark.slow  # about 30 s in the interpreter: run by test_triton_interpret.py's slow case
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_chunk_under_torch_func_transforms() -> None:
    check_chunk_func_transforms("cpu")


def test_chunk_traced_with_triton_asked_for_is_a_clear_error() -> None:
    """make_fx records PyTorch ops only; the Triton kernels would replay as uninitialised memory."""
    from torch.fx.experimental.proxy_tensor import make_fx

    q, k, v, log_gate, _ = chunk_inputs("cpu", 20, True, False)
    with pytest.raises(RuntimeError, match="cannot be traced"):
        make_fx(lambda *x: chunk_gated_linear_attention(*x, chunk_size=16, backend="triton")[0])(q, k, v, log_gate)
