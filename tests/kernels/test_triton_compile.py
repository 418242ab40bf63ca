"""Every Triton kernel compiles for an H100/H200 (sm_90) without a GPU present.

The interpreter (``interpret`` tests) runs kernels as NumPy and accepts code the
real compiler rejects (scalar masks, dtype mixes, shapes ``tl.dot`` cannot
take). ``triton.compile`` for a CUDA target goes all the way to a cubin (it runs
the ``ptxas`` that ships in the triton wheel) on a CPU-only machine, which
catches those. Nothing is executed; the GPU tests check results. The same
compiler's ``ptxas -v`` reports register spills, which is what the chunkwise
launch options were chosen by. Slow (minutes on 2 cores): marker ``slow``.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

from psmsearch.kernels import _dispatch

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _dispatch.triton_available(), reason="triton is not installed"),
]

# Arguments that are neither pointers nor constexprs, and not int32.
_SCALARS = {"scale": "fp32"}


def _compile(kernel: object, constexprs: dict[str, object], pointers: dict[str, str],
             options: dict[str, int] | None = None) -> object:
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
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or {"num_warps": 4})
    assert compiled.asm["cubin"], f"{kernel.__name__}: no cubin"  # type: ignore[attr-defined]
    return compiled


def _spill_store_bytes(compiled: object, tmp_path: Path) -> int:
    """Bytes of register spill stores per thread, as ``ptxas -v`` (the one in the triton wheel) reports."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptx = tmp_path / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])  # type: ignore[attr-defined]
    ptxas = get_ptxas(90)
    run = subprocess.run([getattr(ptxas, "path", ptxas), "-v", "--gpu-name", "sm_90a", str(ptx),
                          "-o", str(tmp_path / "kernel.o")], capture_output=True, text=True, check=True)
    spills = re.findall(r"(\d+) bytes spill stores", run.stderr)
    assert spills, f"no spill figure in ptxas output: {run.stderr[-500:]}"
    return sum(int(n) for n in spills)


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
    _compile(scan._scan_fwd_coarse_kernel,
             {"HAS_H0": True, "REVERSE": reverse, "GATE_FULL": False, "GROUPS": 16, "SUB": 8, "BLOCK_N": 32},
             _typed(dtype, "A X H0 OUT", int64="A_COLS"))
    _compile(scan._scan_bwd_kernel,
             {"HAS_H0": True, "REVERSE": reverse, "NEED_DA": True, "GATE_FULL": True, **tile},
             _typed(dtype, "A H H0 DH", fp32="DB DA DH0", int64="A_COLS"))


def _chunkwise_kernels(dtype: str, chunk: int) -> list[tuple[str, object, dict[str, object], dict[str, str]]]:
    """``(name, kernel, constexprs, pointer types)`` of every chunkwise kernel as launched at ``chunk``."""
    from psmsearch.kernels import chunkwise_triton as forward
    from psmsearch.kernels import chunkwise_triton_backward as backward
    from psmsearch.kernels import chunkwise_triton_common as common

    precision = "ieee" if dtype == "fp32" else "tf32"
    blocks = {"CHUNK": chunk, "BLOCK_K": 64, "BLOCK_V": 64, "PRECISION": precision}
    sub_blocks = {**blocks, "SUB": 16, "K_SLICE": 16}
    outer = {"CHUNK": chunk, "BLOCK_X": 64, "BLOCK_Y": 64, "PRECISION": precision}
    return [
        ("chunk states (to end)", common._chunk_outer_kernel, {**outer, "DECAY_TO_END": True},
         _typed(dtype, "X Y", fp32="G OUT")),
        ("chunk states (from start)", common._chunk_outer_kernel, {**outer, "DECAY_TO_END": False},
         _typed(dtype, "X Y", fp32="G OUT")),
        ("output", forward._chunk_output_kernel, sub_blocks, _typed(dtype, "Q K V O", fp32="G S_PREV")),
        ("scores", backward._chunk_scores_kernel, sub_blocks, _typed(dtype, "Q K V DO", fp32="G A DA")),
        ("dq dk", backward._chunk_dqk_kernel, {**blocks, "SUB": 16},
         _typed(dtype, "Q K V DO", fp32="G S_PREV D_END DA DQ DK_OUT")),
        ("dv", backward._chunk_dv_kernel, blocks, _typed(dtype, "K DO", fp32="G A D_END DV_OUT")),
    ]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_chunkwise_kernels_compile(dtype: str) -> None:
    from psmsearch.kernels.chunkwise_triton_common import launch_options

    for _, kernel, constexprs, pointers in _chunkwise_kernels(dtype, 64):
        _compile(kernel, constexprs, pointers, {"num_warps": 4, **launch_options(64)})


@pytest.mark.parametrize(("dtype", "chunk"), [("fp32", 128), ("bf16", 64)])
def test_launch_options_spill_no_more_than_triton_defaults(dtype: str, chunk: int, tmp_path: Path) -> None:
    """The launch options rest on ptxas figures (no GPU timed them): together the kernels must
    spill at most a quarter of what they spill with Triton's defaults (4 warps, 3 stages)."""
    from psmsearch.kernels.chunkwise_triton_common import launch_options

    chosen, default = {"num_warps": 4, **launch_options(chunk)}, {"num_warps": 4, "num_stages": 3}
    totals = {"chosen": 0, "default": 0}
    lines = []
    for name, kernel, constexprs, pointers in _chunkwise_kernels(dtype, chunk):
        spills = {label: _spill_store_bytes(_compile(kernel, constexprs, pointers, options), tmp_path)
                  for label, options in (("chosen", chosen), ("default", default))}
        lines.append(f"{name}: {spills['chosen']} B (defaults {spills['default']} B)")
        for label in totals:
            totals[label] += spills[label]
    print(f"spill stores per thread, {dtype}, C={chunk}: " + "; ".join(lines))
    assert totals["chosen"] * 4 <= totals["default"], lines


# Shared memory one block of an H100/H200 may use (227 KiB, the sm_90 opt-in limit).
SM90_SHARED_MEMORY_BYTES = 232_448


def test_largest_chunkwise_launch_fits_sm90_shared_memory() -> None:
    """The affine plugins allow ``key_dim`` up to 256 and train through these kernels on CUDA.

    At the largest launch they can ask for (float32, C = 128, one 256-wide key block) the kernels
    that hold ``[C, dk]`` and ``[dk, dv]`` tiles in shared memory must still fit one sm_90 block:
    Triton would otherwise refuse the launch at run time. (The output and scores kernels take
    minutes each to compile at this size, so are left out: at C = 64 with the same key block they
    took 80 KiB and 32 KiB.)
    """
    from psmsearch.kernels.chunkwise_triton_common import launch_options

    used = {}
    for name, kernel, constexprs, pointers in _chunkwise_kernels("fp32", 128):
        if name not in ("chunk states (to end)", "dq dk", "dv"):
            continue
        widest = {key: 256 if key in ("BLOCK_K", "BLOCK_X") else value for key, value in constexprs.items()}
        used[name] = _compile(kernel, widest, pointers, {"num_warps": 4, **launch_options(128)}).metadata.shared
    assert len(used) == 3 and max(used.values()) <= SM90_SHARED_MEMORY_BYTES, used
