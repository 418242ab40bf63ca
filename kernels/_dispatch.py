"""Backend selection and output allocation shared by the scan kernels.

Every public kernel in :mod:`psmsearch.kernels` exists at least twice with the
same signature: a readable PyTorch *reference* (runs on any device, any float
dtype) and a *Triton* implementation (CUDA, or the CPU under
``TRITON_INTERPRET=1``). :func:`.first_order_scan` also has compiled CPU
kernels (*numba*), because on a CPU the reference's extra passes over memory
cost several times one pass. This module decides which one a call uses, so
that the rule is the same for all kernels:

1. an explicit ``backend=`` argument wins;
2. else the environment variable ``PSMSEARCH_KERNEL_BACKEND`` (``triton``,
   ``reference`` or ``numba``);
3. else Triton for CUDA tensors; on the CPU the kernel's ``cpu_default`` (numba
   for :func:`.first_order_scan` on long enough scans, where it measured faster)
   when installed, else the reference.

Naming a backend that a kernel does not have, or one that cannot run on the
tensors given, is an error that says so; nothing falls back silently.

It also owns :func:`new_output`, the allocator the kernels use for every
buffer they return.  Tests swap it (:func:`poisoned_outputs`) for one that
fills buffers with NaN, which proves that the kernels write every element.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.util
import mmap
import os
import sys
from collections.abc import Callable, Iterator
from typing import Literal

import torch

Backend = Literal["triton", "reference", "numba"]
BACKENDS: tuple[Backend, ...] = ("triton", "reference", "numba")
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


def numba_available() -> bool:
    """Whether the ``numba`` package can be imported (a dependency, but possibly absent on new Pythons)."""
    return importlib.util.find_spec("numba") is not None


def _requested_backend(backend: str | None) -> str | None:
    if backend is not None:
        return backend
    env = os.environ.get(ENV_VAR, "").strip().lower()
    return env or None


def select_backend(backend: str | None, *tensors: torch.Tensor, kernel: str = "this kernel",
                   available: tuple[Backend, ...] = ("triton", "reference"),
                   cpu_default: Backend = "reference") -> Backend:
    """Pick the implementation for a call of ``kernel`` on ``tensors`` (all on one device).

    ``available`` lists the backends the kernel has; ``cpu_default`` is the one
    a CPU call gets when nothing is requested (numba falls back to the
    reference where the package is missing). Raises ``ValueError`` for an
    unknown name or one the kernel lacks, and ``RuntimeError`` when the backend
    cannot run here (Triton on CPU tensors without ``TRITON_INTERPRET=1``, on
    float64 data or without the triton package; numba on non-CPU tensors or
    without the numba package).
    """
    device = tensors[0].device
    is_float64 = any(t.dtype == torch.float64 for t in tensors)
    requested = _requested_backend(backend)
    if requested is None:
        if device.type == "cuda" and not is_float64 and "triton" in available and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_default == "numba" and numba_available():
            return "numba"
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"unknown kernel backend {requested!r}; expected one of {BACKENDS}")
    if requested not in available:
        source = "backend=" if backend is not None else f"{ENV_VAR}="
        raise ValueError(
            f"{source}{requested!r}: {kernel} has no {requested} implementation; it has {available}"
        )
    if requested == "triton":
        _check_triton_usable(device.type == "cuda", tensors)
    if requested == "numba":
        _check_numba_usable(device)
    return requested  # type: ignore[return-value]


def _check_numba_usable(device: torch.device) -> None:
    if not numba_available():
        raise RuntimeError("backend='numba' needs the numba package, which is not installed")
    if device.type != "cpu":
        raise RuntimeError(f"backend='numba' runs on CPU tensors only, got tensors on {device}; "
                           "use backend='triton' or 'reference'")


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
    """Allocate an uninitialised buffer that a kernel will fill completely.

    Large CPU buffers are advised into transparent huge pages first (see
    :func:`advise_huge_pages`).
    """
    out = _allocator(tuple(shape), dtype=dtype, device=device)
    if out.device.type == "cpu":
        advise_huge_pages(out)
    return out


_HUGE_PAGE_BYTES = 2 << 20
_MIN_HUGE_PAGE_BUFFER_BYTES = 4 << 20


@functools.lru_cache(maxsize=1)
def _madvise() -> Callable[[int, int, int], int] | None:
    """libc's ``madvise`` on Linux, else None."""
    if sys.platform != "linux" or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.madvise
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    function.restype = ctypes.c_int
    return function


def advise_huge_pages(buffer: torch.Tensor) -> bool:
    """Ask Linux to back the 2 MiB-aligned part of a fresh CPU buffer with transparent huge pages.

    A fresh tensor's memory is mapped lazily: every 4 KiB page faults on its
    first write and is zeroed by the kernel. For a 32 MiB output that cost
    8.6 ms on the 2-core machine we measured, against 2.5 ms with huge pages
    (``benchmarks/scan.py``), more than the scan itself. PyTorch asks for huge
    pages only under ``THP_MEM_ALLOC_ENABLE=1``, which must be set before it
    starts; this does it for the kernels' own outputs, where the kernel's THP
    mode is ``always`` or ``madvise``. Buffers under 4 MiB and non-Linux
    systems are left alone. Returns whether the advice was given.
    """
    nbytes = buffer.numel() * buffer.element_size()
    madvise = _madvise()
    if madvise is None or nbytes < _MIN_HUGE_PAGE_BUFFER_BYTES:
        return False
    start = buffer.data_ptr()
    first = -(-start // _HUGE_PAGE_BYTES) * _HUGE_PAGE_BYTES
    last = (start + nbytes) // _HUGE_PAGE_BYTES * _HUGE_PAGE_BYTES
    if last <= first:
        return False
    return madvise(first, last - first, mmap.MADV_HUGEPAGE) == 0


def _nan_filled(shape: tuple[int, ...], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: inside the block, every kernel output buffer starts as NaN.

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
