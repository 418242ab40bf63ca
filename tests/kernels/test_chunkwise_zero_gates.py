"""Zero gates (``log_gate = -inf``) in chunk_gated_linear_attention: the reference here, Triton
under ``TRITON_INTERPRET=1`` in a subprocess (``interpret_zero_gate_cases.py``)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from zero_gate_checks import check_zero_gates  # noqa: E402

from psmsearch.kernels import _dispatch  # noqa: E402
from psmsearch.kernels.chunkwise import LOG_GATE_FLOOR  # noqa: E402

CASES = Path(__file__).with_name("interpret_zero_gate_cases.py")


@pytest.mark.parametrize("chunk_size", [1, 7, 16, 32])
@pytest.mark.parametrize("diagonal", [False, True])
@pytest.mark.parametrize("with_h0", [False, True])
def test_reference_with_zero_gates_matches_loop_in_float64(chunk_size: int, diagonal: bool, with_h0: bool) -> None:
    """T = 63 (a partial last chunk); c = 32 puts zero gates inside two 16-step sub-blocks."""
    check_zero_gates("reference", 63, chunk_size, diagonal, with_h0, torch.float64, tol=1e-10)


@pytest.mark.parametrize("diagonal", [False, True])
def test_reference_with_zero_gates_in_float32(diagonal: bool) -> None:
    """The floor costs float32 about an ulp of |LOG_GATE_FLOOR| in the later gates of a chunk."""
    check_zero_gates("reference", 63, 16, diagonal, True, torch.float32, tol=1e-4)


def test_floor_is_negligible_yet_keeps_float32_precision() -> None:
    """``e^floor`` is far below float64's resolution; a float32 ulp at the floor stays small."""
    assert math.exp(LOG_GATE_FLOOR) < 1e-6 * torch.finfo(torch.float64).eps
    ulp = torch.tensor(LOG_GATE_FLOOR).nextafter(torch.tensor(0.0)) - LOG_GATE_FLOOR
    assert ulp.item() <= 4e-6


@pytest.mark.interpret
@pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed")
def test_triton_with_zero_gates_under_interpreter() -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(_dispatch.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "interpret", str(CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
