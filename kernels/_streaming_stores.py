"""Non-temporal ("streaming") stores for the Numba CPU kernels, as Numba intrinsics.

A plain store to memory that is not in cache first reads the cache line it
writes (read for ownership), so an output written once costs two passes over
its bytes, and it evicts inputs from cache. A non-temporal store writes whole
lines straight to memory. For a scan whose output is far larger than the
caches, the forward pass then moves three arrays' bytes instead of four: 1.2 to
1.5x faster at 8 to 32 MiB outputs on the 2-core machine we measured, and
slower below that, where the output would still be in cache when it is read
next (see ``STREAM_MIN_BYTES`` in :mod:`.first_order_scan_numba`).

Each intrinsic handles one 64-byte line (16 float32 or 8 float64 lanes) as one
LLVM vector; the destination must be 64-byte aligned, which the callers
arrange by peeling the first elements of a row with ordinary stores. LLVM
lowers the vector store to ``movntps``/``movntpd`` (x86) or ``stnp`` (AArch64),
and to an ordinary store where the target has none. The arithmetic is the
same multiply then add, unfused, as the ordinary kernels do, so both give
bit-identical results. Non-temporal stores are weakly ordered: a kernel that
used them calls :func:`store_fence` before its results are read by another thread.

Numba's on-disk cache (``cache=True``) keys a kernel on its own source file:
after editing this module, clear the ``__pycache__`` of :mod:`.first_order_scan_numba`
so that its kernels are compiled again with the new intrinsics.
"""

from __future__ import annotations

import platform
from typing import Any

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

LINE_BYTES = 64
_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")


def _line_pointer(context: Any, builder: ir.IRBuilder, array_type: types.Array, array: ir.Value,
                  index: ir.Value, vector: ir.VectorType) -> ir.Value:
    """Pointer to ``array[index]`` cast to a pointer to one line-wide ``vector``."""
    view = context.make_array(array_type)(context, builder, array)
    element = cgutils.get_item_pointer(context, builder, array_type, view, [index], wraparound=False)
    return builder.bitcast(element, vector.as_pointer())


def _line_vector(context: Any, array_type: types.Array) -> tuple[ir.VectorType, int]:
    element = context.get_data_type(array_type.dtype)
    itemsize = context.get_abi_sizeof(element)
    return ir.VectorType(element, LINE_BYTES // itemsize), itemsize


def _store_nontemporal(builder: ir.IRBuilder, value: ir.Value, pointer: ir.Value) -> None:
    store = builder.store(value, pointer, align=LINE_BYTES)
    store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))


def _check_arguments(index: Any, *arrays: Any) -> None:
    """Contiguous 1-d float arrays of one dtype (a line is loaded as consecutive lanes), an integer index."""
    if not all(isinstance(array, types.Array) and array.ndim == 1 and array.layout == "C" for array in arrays):
        raise TypeError(f"streaming stores need C-contiguous 1-d arrays, got {arrays}")
    dtypes = {array.dtype for array in arrays}
    if len(dtypes) != 1 or not isinstance(next(iter(dtypes)), types.Float):
        raise TypeError(f"streaming stores need float arrays of one dtype, got {arrays}")
    if not isinstance(index, types.Integer):
        raise TypeError(f"streaming stores need an integer index, got {index}")


@intrinsic
def advance_line_nontemporal(typingctx: Any, gates: Any, inputs: Any, state: Any, out: Any,
                             index: Any) -> Any:
    """``state[i:i+L] = gates[i:i+L] * state[i:i+L] + inputs[i:i+L]``, also streamed to ``out[i:i+L]``.

    ``L`` is one line of lanes; ``out[index]`` must be 64-byte aligned.
    """
    _check_arguments(index, gates, inputs, state, out)
    signature = types.void(gates, inputs, state, out, index)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        vector, itemsize = _line_vector(context, sig.args[0])
        gate_p, input_p, state_p, out_p = (
            _line_pointer(context, builder, sig.args[k], args[k], args[4], vector) for k in range(4))
        gate_v = builder.load(gate_p, align=itemsize)
        input_v = builder.load(input_p, align=itemsize)
        state_v = builder.load(state_p, align=itemsize)
        value = builder.fadd(builder.fmul(gate_v, state_v), input_v)
        builder.store(value, state_p, align=itemsize)
        _store_nontemporal(builder, value, out_p)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def add_line_nontemporal(typingctx: Any, x: Any, y: Any, out: Any, index: Any) -> Any:
    """``out[i:i+L] = x[i:i+L] + y[i:i+L]``, streamed; ``out[index]`` must be 64-byte aligned.

    Not used by the kernels: it moves the bytes of one forward scan step with
    full gates (two lines read, one line streamed) without the recurrence, so a
    loop of it is the memory floor that ``benchmarks/memory_floor.py`` measures
    the scan against.
    """
    _check_arguments(index, x, y, out)
    signature = types.void(x, y, out, index)

    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        vector, itemsize = _line_vector(context, sig.args[0])
        x_p, y_p, out_p = (_line_pointer(context, builder, sig.args[k], args[k], args[3], vector) for k in range(3))
        value = builder.fadd(builder.load(x_p, align=itemsize), builder.load(y_p, align=itemsize))
        _store_nontemporal(builder, value, out_p)
        return context.get_dummy_value()

    return signature, codegen


@intrinsic
def store_fence(typingctx: Any) -> Any:
    """Orders the streaming stores before anything after it: ``sfence`` on x86 (LLVM's ``fence``
    does not promise to cover non-temporal stores there), plus a sequentially consistent fence."""
    def codegen(context: Any, builder: ir.IRBuilder, sig: Any, args: Any) -> ir.Value:
        if _X86:
            sfence = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(sfence, [])
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen
