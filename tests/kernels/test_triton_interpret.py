"""Runs ``interpret_triton_cases.py`` in a subprocess with ``TRITON_INTERPRET=1``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from psmsearch.kernels import _dispatch

CASES = Path(__file__).with_name("interpret_triton_cases.py")


@pytest.mark.interpret
@pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed")
@pytest.mark.parametrize("selection", [
    "interpret and not slow",
    # the chunk kernel under torch.func (~30 s), T = 63 scans and B = 3 strided chunks (~30 s)
    pytest.param("interpret and slow", marks=pytest.mark.slow),
])
def test_triton_kernels_under_interpreter(selection: str) -> None:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    env.pop(_dispatch.ENV_VAR, None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", selection, str(CASES)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout, result.stdout[-2000:]
