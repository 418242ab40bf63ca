"""Backend selection and output allocation shared by the scan kernels.

Every public kernel in :mod:`psmsearch.kernels` exists twice with the same
signature: a readable PyTorch *reference* (runs on any device, any float dtype)
and a *Triton* implementation (CUDA, or the CPU under ``TRITON_INTERPRET=1``).
This module decides which one a call uses, so that the rule is the same for all
kernels:

1. an explicit ``backend=`` argument wins;
2. else the environment variable ``PSMSEARCH_KERNEL_BACKEND`` (``triton`` or
   ``reference``);
3. else Triton for CUDA tensors and the reference for everything else.

It also owns :func:`new_output`, the allocator the Triton launchers use for
every buffer they return.  Tests swap it (:func:`poisoned_outputs`) for one that
fills buffers with NaN, which proves that the kernels write every element.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
from collections.abc import Callable, Iterator
from typing import Literal

import torch

Backend = Literal["triton", "reference"]
BACKENDS: tuple[Backend, ...] = ("triton", "reference")
ENV_VAR = "PSMSEARCH_KERNEL_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

Allocator = Callable[..., torch.Tensor]
_allocator: Allocator = torch.empty


def interpret_enabled() -> bool:
    """Whether Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``).

    Triton reads the variable when a kernel is *defined* (at import of the module
    that holds it), so it must be set before :mod:`psmsearch.kernels` is imported.
    """
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (it exists on Linux only)."""
    return importlib.util.find_spec("triton") is not None


def _requested_backend(backend: str | None) -> str | None:
    if backend is not None:
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return env or None


def select_backend(backend: str | None, *tensors: torch.Tensor) -> Backend:
    """Pick the implementation for a call on ``tensors`` (all on one device).

    Raises ``ValueError`` for an unknown name and ``RuntimeError`` when Triton is
    asked for where it cannot run (CPU tensors without ``TRITON_INTERPRET=1``,
    float64 data, or no triton package).
    """
    device_is_cuda = tensors[0].is_cuda
    is_float64 = any(t.dtype == torch.float64 for t in tensors)
    requested = _requested_backend(backend)
    if requested is None:
        use_triton = device_is_cuda and not is_float64 and triton_available()
        return "triton" if use_triton else "reference"
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; expected one of {BACKENDS}")
    if requested == "triton":
        _check_triton_usable(device_is_cuda, tensors)
    return requested  # type: ignore[return-value]


def _check_triton_usable(device_is_cuda: bool, tensors: tuple[torch.Tensor, ...]) -> None:
    if not triton_available():
        raise RuntimeError("backend='triton' needs the triton package, which is not installed")
    if not device_is_cuda and not interpret_enabled():
        raise RuntimeError(
            "backend='triton' on CPU tensors runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing psmsearch.kernels, or use backend='reference'"
        )
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in TRITON_DTYPES})
    if bad:
        raise RuntimeError(
            f"backend='triton' supports float32/bfloat16/float16 inputs, got {bad}; "
            "use backend='reference' for float64"
        )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocate an uninitialised buffer that a Triton kernel will fill completely."""
    return _allocator(tuple(shape), dtype=dtype, device=device)


def _nan_filled(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: inside the block, every Triton output buffer starts as NaN.

    A kernel that skips an element then leaves a NaN that the comparison with the
    reference catches, where ``torch.empty`` could hide it behind stale memory.
    """
    global _allocator
    previous = _allocator
    _allocator = _nan_filled
    try:
        yield
    finally:
        _allocator = previous
