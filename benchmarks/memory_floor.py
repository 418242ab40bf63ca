"""The memory floor of a CPU scan: ``out = a + b`` with the result streamed past the caches.

A forward scan with full gates must read ``a`` and ``b`` once and write its
result once; the Numba kernel writes that result with non-temporal stores, so
it moves exactly those three arrays' bytes. :func:`streamed_add` moves the same
bytes the same way, line by line and in the same order, with no recurrence in
between: nothing that reads ``a`` and ``b`` and returns a third array can be
faster on the machine at hand. ``benchmarks/scan.py`` times it in the same run
as the scan, so ``scan / floor`` says how much of the scan's time is anything
but memory traffic, and ``loop / floor`` is the most any scan could gain over
the token loop in that run.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from psmsearch.kernels._streaming_stores import LINE_BYTES, add_line_nontemporal, store_fence


@numba.njit(nogil=True)  # no on-disk cache: the tests load this file under another module name
def _streamed_add(x: np.ndarray, y: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out = x + y`` over flat arrays: ordinary stores up to ``out``'s first 64-byte boundary and
    after its last full line, streamed lines in between."""
    size, lanes = out.shape[0], LINE_BYTES // out.itemsize
    head = min(size, (LINE_BYTES - out.ctypes.data % LINE_BYTES) % LINE_BYTES // out.itemsize)
    body_end = head + (size - head) // lanes * lanes
    for i in range(head):
        out[i] = x[i] + y[i]
    for i in range(head, body_end, lanes):
        add_line_nontemporal(x, y, out, i)
    for i in range(body_end, size):
        out[i] = x[i] + y[i]
    store_fence()


def streamed_add(x: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = x + y`` for contiguous CPU float tensors of one shape and dtype, ``out`` written by
    non-temporal stores (element-aligned, as every PyTorch allocation is). Returns ``out``."""
    tensors = {"x": x, "y": y, "out": out}
    for name, tensor in tensors.items():
        if tensor.device.type != "cpu" or not tensor.is_contiguous() or not tensor.is_floating_point():
            raise ValueError(f"streamed_add: {name} must be a contiguous CPU float tensor, got "
                             f"{tensor.dtype} on {tensor.device}, contiguous={tensor.is_contiguous()}")
    if {t.shape for t in tensors.values()} != {out.shape} or {t.dtype for t in tensors.values()} != {out.dtype}:
        raise ValueError("streamed_add: x, y and out must have one shape and dtype, got "
                         + ", ".join(f"{n} {tuple(t.shape)} {t.dtype}" for n, t in tensors.items()))
    if out.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"streamed_add: float32 or float64 only, got {out.dtype}")
    _streamed_add(x.numpy().reshape(-1), y.numpy().reshape(-1), out.numpy().reshape(-1))
    return out
