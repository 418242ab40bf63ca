"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU present.

The interpreter (``interpret`` tests) runs kernels as NumPy and accepts code the
real compiler rejects (scalar masks, dtype mixes, shapes ``tl.dot`` cannot
take). ``triton.compile`` for a CUDA target goes all the way to a cubin (it runs
the ``ptxas`` that ships in the triton wheel) on a CPU-only machine, which
catches those. Nothing is executed; the GPU tests check results. Slow (a minute
or more on 2 cores): marker ``slow``.
"""

from __future__ import annotations

import pytest

from psmsearch.kernels import _dispatch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed"),
]

# Arguments that are neither pointers nor constexprs, and not int32.
_SCALARS = {"scale": "fp32"}


def _compile(kernel: object, constexprs: dict[str, object], pointers: dict[str, str]) -> None:
    """Compile ``kernel`` for sm_90; ``pointers`` maps every pointer argument to its element type."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name in kernel.arg_names:  # type: ignore[attr-defined]
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + pointers[name]
        else:
            signature[name] = _SCALARS.get(name, "i32")
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"  # type: ignore[attr-defined]


def _typed(dtype: str, inputs: str, fp32: str = "", int64: str = "") -> dict[str, str]:
    """Pointer types from space-separated names: input dtype, float32 buffers, int64 tables."""
    types = {name: dtype for name in inputs.split()}
    types.update({name: "fp32" for name in fp32.split()})
    types.update({name: "i64" for name in int64.split()})
    return types


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("reverse", [False, True])
def test_first_order_scan_kernels_compile(dtype: str, reverse: bool) -> None:
    from psmsearch.kernels import first_order_scan_triton as scan

    tile = {"BLOCK_T": 64, "BLOCK_N": 64}
    _compile(scan._scan_fwd_kernel, {"HAS_H0": True, "REVERSE": reverse, "GATE_FULL": False, **tile},
             _typed(dtype, "A X H0 OUT", int64="A_COLS"))
    _compile(scan._scan_bwd_kernel,
             {"HAS_H0": True, "REVERSE": reverse, "NEED_DA": True, "GATE_FULL": True, **tile},
             _typed(dtype, "A H H0 DH", fp32="DB DA DH0", int64="A_COLS"))


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunkwise_kernels_compile(dtype: str) -> None:
    from psmsearch.kernels import chunkwise_triton as forward
    from psmsearch.kernels import chunkwise_triton_backward as backward
    from psmsearch.kernels import chunkwise_triton_common as common

    precision = "ieee" if dtype == "fp32" else "tf32"
    blocks = {"CHUNK": 64, "BLOCK_K": 64, "BLOCK_V": 64, "PRECISION": precision}
    sub_blocks = {**blocks, "SUB": 16, "K_SLICE": 16}
    for to_end in (True, False):
        _compile(common._chunk_outer_kernel,
                 {"CHUNK": 64, "BLOCK_X": 64, "BLOCK_Y": 64, "DECAY_TO_END": to_end, "PRECISION": precision},
                 _typed(dtype, "X Y", fp32="G OUT"))
    _compile(forward._chunk_output_kernel, sub_blocks, _typed(dtype, "Q K V O", fp32="G S_PREV"))
    _compile(backward._chunk_scores_kernel, sub_blocks, _typed(dtype, "Q K V DO", fp32="G A DA"))
    _compile(backward._chunk_dqk_kernel, {**blocks, "SUB": 16},
             _typed(dtype, "Q K V DO", fp32="G S_PREV D_END DA DQ DK_OUT"))
    _compile(backward._chunk_dv_kernel, blocks, _typed(dtype, "K DO", fp32="G A D_END DV_OUT"))
