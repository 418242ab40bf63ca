"""First-order linear recurrence ``h_t = a_t * h_{t-1} + b_t`` as an inclusive scan.

This is the state update of the associative (affine) family of Prefix-Scannable
Models: the pairs ``(a, b)`` compose with ``(a2, b2) ⊕ (a1, b1) = (a2 a1, b2 + a2 b1)``.

Three implementations share one signature and one set of differentiation rules
(:mod:`.first_order_scan_autograd`: reverse and forward mode, ``torch.func`` transforms):

* the PyTorch *reference* (:mod:`.first_order_scan_reference`), a blocked scan that
  runs on any device and dtype and costs a few passes over memory instead of one
  Python step per token,
* the Triton kernels in :mod:`.first_order_scan_triton` (CUDA, or the CPU under
  ``TRITON_INTERPRET=1``), and
* the compiled CPU kernels in :mod:`.first_order_scan_numba`, one sequential
  pass over memory, the default on CPU tensors.

Autograd never records a Python loop: the backward of a scan is a scan in the
opposite direction (``g_t = dh_t + a_{t+1} g_{t+1}``), which every backend runs
with its own kernels.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from . import _dispatch
from .first_order_scan_autograd import FirstOrderScan, forward_ad_active, implementation
from .first_order_scan_reference import MIN_BLOCKED_STEPS, scan_traceable

# From this many time steps on, CPU calls default to the compiled (numba) kernels.
# Shorter scans run the reference's step loop, already one pass over memory, which
# measured as fast or faster in aggregator-sized batches (numba 0.6-1.1x the
# reference's speed at T = 16 and 32, 1.1-2.0x at T = 64; benchmarks/scan.py --model-sizes).
MIN_COMPILED_CPU_STEPS = MIN_BLOCKED_STEPS
# Whether a tensor is wrapped by a torch.func transform (a private API: where it is gone, assume so).
_is_functorch_wrapped = getattr(getattr(torch._C, "_functorch", None), "is_functorch_wrapped_tensor",
                                lambda tensor: True)


def first_order_scan(
    a: torch.Tensor,
    b: torch.Tensor,
    h0: torch.Tensor | None = None,
    *,
    reverse: bool = False,
    backend: str | None = None,
) -> torch.Tensor:
    """Inclusive scan of ``h_t = a_t * h_{t-1} + b_t`` over dim 1.

    Args:
        a: gates, same rank as ``b``; every dim broadcastable to ``b``'s, e.g. a
            scalar gate per head ``[B, T, H, 1, 1]``, a diagonal gate
            ``[B, T, H, dk, 1]`` or a full one ``[B, T, *S]``.
        b: inputs ``[B, T, *S]``; the scan runs over ``T`` (dim 1).
        h0: optional initial state, broadcastable to ``[B, *S]``; zero if None.
        reverse: scan from the end: ``h_t = a_t * h_{t+1} + b_t``, ``h_T = h0``.
        backend: ``"triton"``, ``"reference"``, ``"numba"`` or None (see :mod:`._dispatch`):
            by default Triton on CUDA, numba on the CPU from ``MIN_COMPILED_CPU_STEPS``
            steps on, else the reference.

    Returns:
        ``h`` of shape ``[B, T, *S]`` and ``b``'s dtype. The recurrence is
        accumulated in float32, or float64 when ``a`` or ``b`` is float64 (the
        reference and numba; Triton takes no float64); ``h0`` is cast to that dtype.
        Differentiable in ``a``, ``b`` and ``h0``, in reverse and forward mode and
        under ``torch.func`` (see :mod:`.first_order_scan_autograd`).
    """
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode():
        return _traced_scan(a, b, h0, reverse, backend)
    return _scan(a, b, h0, reverse, backend)


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool,
          backend: str | None) -> torch.Tensor:
    """The call itself: checks, backend choice, and the kernels with or without the autograd Function."""
    _check_shapes(a, b, h0)
    h0 = _dispatch.initial_state_in(h0, _dispatch.compute_dtype(a, b))
    tensors = [t for t in (a, b, h0) if t is not None]
    cpu_default = "numba" if b.shape[1] >= MIN_COMPILED_CPU_STEPS else "reference"
    chosen = _dispatch.select_backend(backend, *tensors, kernel="first_order_scan",
                                      available=("triton", "reference", "numba"), cpu_default=cpu_default)
    if not _needs_autograd(tensors):
        return implementation(chosen).scan_forward(a, b, h0, reverse)
    return FirstOrderScan.apply(a, b, h0, reverse, chosen)


def _traced_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, reverse: bool,
                 backend: str | None) -> torch.Tensor:
    """A call that something is tracing.

    Under a dispatch mode (``make_fx``, ``torch.export``, ``torch.func.linearize``,
    fake tensors) only PyTorch ops are recorded: the numba and Triton kernels write
    through pointers a trace does not see, and a replayed trace would return
    uninitialised memory. The scan then runs as one out-of-place op per step
    (:func:`.first_order_scan_reference.scan_traceable`), which every trace records
    and autograd differentiates natively; asking for another backend there is an
    error. Under ``torch.compile`` (Dynamo) the call is a graph break instead and
    runs eagerly with the usual backend, since Dynamo cannot trace numba.
    """
    if is_in_torch_dispatch_mode():
        _dispatch.refuse_untraceable_backend("first_order_scan", backend)
        _check_shapes(a, b, h0)
        return scan_traceable(a, b, h0, reverse)
    return _outside_compiled_graph()(a, b, h0, reverse, backend)


_graph_break_scan: Callable[..., torch.Tensor] | None = None


def _outside_compiled_graph() -> Callable[..., torch.Tensor]:
    """:func:`_scan` as a ``torch.compile`` graph break, made on first use (it imports Dynamo, about 1 s).

    Kept in a module global rather than behind ``functools.cache``, which Dynamo warns about
    when it traces through it.
    """
    global _graph_break_scan
    if _graph_break_scan is None:
        _graph_break_scan = torch.compiler.disable(_scan)
    return _graph_break_scan


def _needs_autograd(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether the call must go through the autograd Function rather than straight to the kernels.

    It must when an input needs a gradient, when an input is wrapped by a
    ``torch.func`` transform (``vmap``, ``grad``, ``jvp``: the kernels cannot read a
    wrapped tensor, the Function's rules unwrap it), or when forward-mode AD is
    active (a dual tensor does not require grad; skipping the Function would
    drop its tangent). Where the private attributes that tell are gone, it goes
    through the Function: slower by a few microseconds, never wrong.
    """
    grad_mode = torch.is_grad_enabled()
    for tensor in tensors:  # a plain loop: cheaper than generators in a call that usually starts cold
        if (grad_mode and tensor.requires_grad) or _is_functorch_wrapped(tensor):
            return True
    return forward_ad_active()


def _check_shapes(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None) -> None:
    _dispatch.check_tensor_inputs("first_order_scan", a=a, b=b, h0=h0)
    if b.dim() < 2:
        raise ValueError(f"first_order_scan: b must be [B, T, *S], got shape {tuple(b.shape)}")
    if a.dim() != b.dim():
        raise ValueError(f"first_order_scan: a must have b's rank {b.dim()} (b is {tuple(b.shape)}; size-1 dims "
                         f"broadcast), got shape {tuple(a.shape)}")
    if not _broadcasts_to(a.shape, b.shape):
        raise ValueError(f"first_order_scan: a {tuple(a.shape)} does not broadcast to b {tuple(b.shape)}")
    state_shape = b.shape[:1] + b.shape[2:]
    if h0 is not None and not _broadcasts_to(h0.shape, state_shape):
        raise ValueError(f"first_order_scan: h0 {tuple(h0.shape)} does not broadcast to [B, *S] {tuple(state_shape)}")
    if a.device != b.device or (h0 is not None and h0.device != b.device):
        devices = f"a on {a.device}, b on {b.device}" + ("" if h0 is None else f", h0 on {h0.device}")
        raise ValueError(f"first_order_scan: a, b and h0 must be on the same device; got {devices}")


def _broadcasts_to(shape: torch.Size, target: torch.Size) -> bool:
    if len(shape) > len(target):
        return False
    return all(s in (1, t) for s, t in zip(reversed(shape), reversed(target)))
