"""Triton chunkwise GLA with zero gates under ``TRITON_INTERPRET=1``, against the float64 loop.

Not collected by default (no ``test_`` prefix): ``test_chunkwise_zero_gates.py`` runs this file in a
subprocess with the variable set, because Triton decides between compiling and interpreting when a
kernel module is imported. Sizes are tiny: the interpreter is slow.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

if os.environ.get("TRITON_INTERPRET") != "1":
    raise RuntimeError("run this file with TRITON_INTERPRET=1 (see test_chunkwise_zero_gates.py)")

sys.path.insert(0, str(Path(__file__).parent))
import torch  # noqa: E402
from zero_gate_checks import check_zero_gates  # noqa: E402

pytestmark = pytest.mark.interpret


@pytest.mark.parametrize(("diagonal", "with_h0"), [(False, True), (True, False)])
def test_triton_with_zero_gates_matches_loop(diagonal: bool, with_h0: bool) -> None:
    """T = 37 over 16-step chunks: zero gates at chunk starts and ends, and a partial last chunk."""
    check_zero_gates("triton", 37, 16, diagonal, with_h0, torch.float32, tol=1e-4)
