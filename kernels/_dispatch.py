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
buffer they return. Tests make it fill buffers with NaN (:func:`poisoned_outputs`),
which proves that the kernels write every element.
"""

from __future__ import annotations

import contextlib
import importlib.util
import math
import mmap
import os
from collections.abc import Iterator
from typing import Literal

import torch

from . import cpu_buffer_cache

Backend = Literal["triton", "reference", "numba"]
BACKENDS: tuple[Backend, ...] = ("triton", "reference", "numba")
ENV_VAR = "PSMSEARCH_KERNEL_BACKEND"
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_poison = False


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


KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_tensor_inputs(kernel: str, **tensors: object) -> None:
    """Raise ``TypeError`` unless every named input is a tensor of one of :data:`KERNEL_DTYPES` (or None).

    Integer inputs would be computed in float and cut back to whole numbers, complex ones would
    lose their imaginary part, float8 ones would get float8 outputs: silently wrong or lossy, so all
    are refused by name.
    """
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{kernel}: {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dtype not in KERNEL_DTYPES:  # float8 too: its outputs would be rounded to 8 bits
            raise TypeError(f"{kernel}: {name} has dtype {tensor.dtype}; expected float16, bfloat16, float32 or "
                            "float64")


def _requested_backend(backend: str | None) -> tuple[str | None, str]:
    """The backend asked for (lower case) and where it was asked, for error messages."""
    if backend is not None:
        if not isinstance(backend, str):
            raise TypeError(f"backend={backend!r}: expected one of {BACKENDS} or None")
        return backend.strip().lower(), f"backend={backend!r}"
    env = os.environ.get(ENV_VAR, "").strip()
    return (env.lower() or None), f"{ENV_VAR}={env!r}"


def requested_backend(backend: str | None = None) -> str | None:
    """The backend asked for by ``backend`` or else ``PSMSEARCH_KERNEL_BACKEND`` (lower case), or None."""
    return _requested_backend(backend)[0]


def refuse_untraceable_backend(kernel: str, backend: str | None) -> None:
    """Inside a trace (``make_fx``, ``torch.export``, fake tensors) only the reference records: raise if
    the call or ``PSMSEARCH_KERNEL_BACKEND`` asks for another backend, naming where it was asked."""
    requested, source = _requested_backend(backend)
    if requested is None or requested == "reference":
        return
    if requested not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend; expected one of {BACKENDS}")
    fix = f"unset {ENV_VAR} or pass backend='reference'" if backend is None else "use backend='reference' or None"
    raise RuntimeError(f"{source}: {kernel}'s {requested} backend cannot be traced (make_fx, torch.export, "
                       f"torch.func.linearize and fake tensors record PyTorch ops only); {fix}")


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
    requested, source = _requested_backend(backend)
    if requested is None:
        if device.type == "cuda" and not is_float64 and "triton" in available and triton_available():
            return "triton"
        if device.type == "cpu" and cpu_default == "numba" and numba_available():
            return "numba"
        return "reference"
    if requested not in BACKENDS:
        raise ValueError(f"{source}: unknown kernel backend; expected one of {BACKENDS}")
    if requested not in available:
        raise ValueError(f"{source}: {kernel} has no {requested} implementation; it has {available}")
    if requested == "triton":
        _check_triton_usable(source, device.type == "cuda", tensors)
    if requested == "numba":
        _check_numba_usable(source, device)
    return requested  # type: ignore[return-value]


def _check_numba_usable(source: str, device: torch.device) -> None:
    if not numba_available():
        raise RuntimeError(f"{source}: numba needs the numba package, which is not installed")
    if device.type != "cpu":
        hint = "backend='triton' or 'reference'" if device.type == "cuda" else "backend='reference'"
        raise RuntimeError(f"{source}: numba runs on CPU tensors only, got tensors on {device}; use {hint}")


def _check_triton_usable(source: str, device_is_cuda: bool, tensors: tuple[torch.Tensor, ...]) -> None:
    if not triton_available():
        raise RuntimeError(f"{source}: triton needs the triton package, which is not installed")
    if not device_is_cuda and not interpret_enabled():
        raise RuntimeError(
            f"{source}: Triton on CPU tensors runs only in Triton's interpreter: set "
            "TRITON_INTERPRET=1 before importing psmsearch.kernels, or use backend='reference'"
        )
    bad = sorted({str(t.dtype) for t in tensors if t.dtype not in TRITON_DTYPES})
    if bad:
        raise RuntimeError(
            f"{source}: Triton supports float32/bfloat16/float16 inputs, got {bad}; "
            "use backend='reference' for float64"
        )


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """The accumulation dtype: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def initial_state_in(state: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A float64 initial state beside float32-computed inputs, cast to float32 (differentiably).

    The kernels compute in the inputs' dtype and cast the initial state to it; casting first means
    such a state neither steers the backend choice (Triton takes no float64) nor is refused by Triton.
    """
    if state is not None and state.dtype == torch.float64 and dtype != torch.float64:
        return state.to(dtype)
    return state


def new_output(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """Allocate a buffer that a kernel will fill completely (uninitialised, or NaN under :func:`poisoned_outputs`).

    CPU buffers of 4 MiB or more come from :func:`huge_page_buffer`.
    """
    shape = tuple(shape)
    out = None
    if (device.type if isinstance(device, torch.device) else torch.device(device).type) == "cpu":
        out = huge_page_buffer(shape, dtype)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=device)
    if _poison:
        out.fill_(float("nan"))
    return out


_MIN_HUGE_PAGE_BUFFER_BYTES = 4 << 20


def huge_page_buffer(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor | None:
    """A CPU tensor in transparent huge pages, reusing the memory of a freed output where it can.

    A fresh tensor's memory is mapped lazily: every 4 KiB page faults on its
    first write and is zeroed by the kernel. For a 32 MiB output that cost
    8.6 ms on the 2-core machine we measured, against 2.5 ms in huge pages, more
    than the scan that fills it. PyTorch asks for huge pages only under
    ``THP_MEM_ALLOC_ENABLE=1``, which must be set before it starts, so these
    buffers are mappings of our own, advised into huge pages (used where the
    kernel's THP mode is ``always`` or ``madvise``), and kept for reuse by
    :mod:`.cpu_buffer_cache` once their tensor is freed, which saves the zeroing too.

    Returns None for buffers under 4 MiB and where ``madvise`` has no huge pages (not Linux).
    """
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < _MIN_HUGE_PAGE_BUFFER_BYTES or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    return cpu_buffer_cache.CACHE.tensor(shape, dtype)


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Test hook: inside the block, every kernel output buffer starts as NaN.

    A kernel that skips an element then leaves a NaN that the comparison with the
    reference catches, where ``torch.empty`` could hide it behind stale memory.
    """
    global _poison
    previous = _poison
    _poison = True
    try:
        yield
    finally:
        _poison = previous
