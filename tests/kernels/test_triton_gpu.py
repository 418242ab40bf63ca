"""Compiled Triton kernels on CUDA against the PyTorch reference (marker ``gpu``)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import scan_func_checks  # noqa: E402
from triton_kernel_checks import (  # noqa: E402
    check_chunk,
    check_chunk_func_transforms,
    check_chunk_half,
    check_chunk_mixed_dtypes,
    check_scan,
    check_scan_half,
    chunk_inputs,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(),
                       reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]


@pytest.mark.parametrize("gate", ["scalar", "diagonal", "full"])
@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("steps", [1, 63, 1000])
def test_scan_matches_reference(steps: int, gate: str, with_h0: bool, reverse: bool) -> None:
    check_scan("cuda", steps, gate, with_h0, reverse)


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_tuned_large(reverse: bool) -> None:
    """Above the tuning threshold: every candidate tile shape runs, the chosen one must be right."""
    check_scan("cuda", 2049, "full", True, reverse, batch=4, state=(1030,), gate_shape=(4, 2049, 1030))


@pytest.mark.parametrize("candidate", range(13))
def test_every_candidate_tile_shape_is_right(candidate: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The tuner may pick any candidate on another card or size, so each one is checked, forward and
    backward (a forward-only candidate leaves the backward on its default shape)."""
    from psmsearch.kernels import first_order_scan_triton as scan_triton

    assert len(scan_triton._FORWARD_CANDIDATES) == 13, "keep the parametrization in step with the candidates"
    cfg = scan_triton._FORWARD_CANDIDATES[candidate]
    monkeypatch.setattr(scan_triton, "_config", lambda key, elements, launch, device, candidates=None:
                        cfg if cfg in (candidates or scan_triton._CANDIDATES) else scan_triton._DEFAULT_CONFIG)
    for reverse in (False, True):
        check_scan("cuda", 301, "full", True, reverse, batch=2, state=(70,), gate_shape=(2, 301, 70))
    # The gate gradient here sums 1030 columns' terms in float32: one element of 600 was seen off by
    # 1.9e-5 (relative 5.7e-5) from the reference on an H200, hence the looser tolerance for this case only.
    check_scan("cuda", 300, "scalar", True, False, state=(1030,), gate_shape=(2, 300, 1), tol=1e-4)


@pytest.mark.parametrize(("steps", "state", "reverse"), [(0, (2, 3, 5), False), (0, (2, 3, 5), True),
                                                      (9, (2, 3, 0), False)])
def test_scan_empty_inputs_with_h0(steps: int, state: tuple[int, ...], reverse: bool) -> None:
    """No scan position: nothing is launched (the backward would read the first gate of an empty table)."""
    check_scan("cuda", steps, "diagonal", True, reverse, state=state)


def test_scan_gate_broadcast_over_batch_and_time() -> None:
    check_scan("cuda", 77, "diagonal", True, False, gate_shape=(1, 1, 2, 3, 1))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_one_gate_for_the_whole_state(reverse: bool) -> None:
    check_scan("cuda", 300, "scalar", True, reverse, state=(1030,), gate_shape=(2, 300, 1))


@pytest.mark.parametrize("reverse", [False, True])
def test_scan_strided_inputs(reverse: bool) -> None:
    check_scan("cuda", 63, "diagonal", True, reverse, non_contiguous=True, batch=3)


@pytest.mark.parametrize("diagonal", [False, True])
def test_chunk_batch_of_three_strided_inputs(diagonal: bool) -> None:
    check_chunk("cuda", 150, diagonal, True, chunk_size=64, batch=3, dk=5, dv=7, non_contiguous=True)


def test_chunk_one_head_scalar_gate() -> None:
    check_chunk("cuda", 200, False, True, chunk_size=64, heads=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scan_half_inputs(dtype: torch.dtype) -> None:
    check_scan_half("cuda", dtype)


@pytest.mark.parametrize(("steps", "diagonal", "with_h0"), [
    (1, True, True), (32, False, False), (77, True, False), (200, False, True), (200, True, True),
])
def test_chunk_matches_reference(steps: int, diagonal: bool, with_h0: bool) -> None:
    check_chunk("cuda", steps, diagonal, with_h0)


@pytest.mark.parametrize("diagonal", [False, True])
def test_chunk_head_dims_64(diagonal: bool) -> None:
    check_chunk("cuda", 300, diagonal, True, chunk_size=64, dk=64, dv=64, heads=3, tol=2e-4)


def test_chunk_strong_decay() -> None:
    check_chunk("cuda", 130, True, True, chunk_size=64, dk=20, dv=7, decay=40.0)


@pytest.mark.parametrize("used", ["output", "final_state"])
def test_chunk_gradients_of_one_output(used: str) -> None:
    check_chunk("cuda", 150, True, True, chunk_size=32, used=used)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("diagonal", [False, True])
def test_chunk_half_inputs_with_gradients(dtype: torch.dtype, diagonal: bool) -> None:
    check_chunk_half("cuda", dtype, diagonal)


def test_chunk_mixed_dtypes() -> None:
    check_chunk_mixed_dtypes("cuda", steps=300)


@pytest.mark.parametrize("gate", list(scan_func_checks.GATES))
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_scan_under_torch_func_transforms(gate: str, reverse: bool) -> None:
    scan_func_checks.check_grad_and_jvp("cuda", "triton", 63, gate, reverse)
    scan_func_checks.check_forward_ad_with_some_tangents("cuda", "triton", 63, reverse)
    scan_func_checks.check_vmap("cuda", "triton", 63, reverse)
    scan_func_checks.check_per_sample_gradients("cuda", "triton", 63, reverse)
    scan_func_checks.check_jacobians("cuda", "triton", reverse)
    scan_func_checks.check_higher_derivatives("cuda", "triton", reverse, dtype=torch.float32, tol=1e-4)
    scan_func_checks.check_batched_grad_outputs("cuda", "triton", reverse)
    scan_func_checks.check_nested_forward_mode_is_a_clear_error("cuda", "triton")


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch's jvp set-up
def test_chunk_under_torch_func_transforms() -> None:
    check_chunk_func_transforms("cuda", steps=150, chunk_size=32)


def test_chunk_traced_by_default_records_the_reference() -> None:
    """make_fx records PyTorch ops only: with backend=None a traced call takes the reference (the Triton
    kernels would replay as uninitialised memory), and the trace replays correctly on new inputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from psmsearch.kernels import chunk_gated_linear_attention

    q, k, v, log_gate, _ = chunk_inputs("cuda", 40, True, False)
    traced = make_fx(lambda *x: chunk_gated_linear_attention(*x, chunk_size=16)[0])(q, k, v, log_gate)
    want = chunk_gated_linear_attention(q, k, 2 * v, log_gate, chunk_size=16, backend="reference")[0]
    torch.testing.assert_close(traced(q, k, 2 * v, log_gate), want, rtol=1e-4, atol=1e-4)


def test_chunk_default_takes_the_reference_where_triton_cannot_take_the_chunk_size(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """With nothing requested a CUDA call at c = 8 ran Triton's kernel, which refused the size; it now
    runs the reference (the same values as asking for it). Asking for Triton at c = 8 stays an error."""
    from psmsearch.kernels import chunk_gated_linear_attention

    monkeypatch.delenv("PSMSEARCH_KERNEL_BACKEND", raising=False)
    q, k, v, log_gate, _ = chunk_inputs("cuda", 40, True, False)
    got = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=8)[0]
    want = chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=8, backend="reference")[0]
    assert torch.equal(got, want)
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_gated_linear_attention(q, k, v, log_gate, chunk_size=8, backend="triton")
