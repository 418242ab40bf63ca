"""Benchmark of the affine decay layers' two training paths: generic against fused.

A PSM layer with a decay triple (``mamba2`` / ``affine_scalar`` / ``linear_readout_scalar`` and
``gla`` / ``affine_diag`` / ``linear_readout_diag``) trains either through its components one by one
(chunk summaries, the aggregator's first-order scan over chunks, the head's readout: ``fused=False``)
or through one :func:`psmsearch.kernels.chunk_gated_linear_attention` call (``fused=True``; the
default where that runs on Triton). Both compute the same function; this script times the
layer's forward and forward+backward on both paths and prints ``generic/fused`` (> 1: the fused path
is faster).

CPU part: float32, ``B=8, T=1024, d=128, H=4, dk=dv=32``, chunk sizes 16 and 64 (``--quick``:
``T=256``, chunk 16); the fused path runs the kernel's PyTorch reference. CUDA part (when present):
``B=8, T=4096, d=1024, H=8, dk=dv=64``, chunk 64, float32 and bfloat16 (autocast), with the peak
memory one call allocates beyond what was live; the fused path runs Triton.

Usage: ``python benchmarks/affine_layers.py [--cpu-only | --cuda-only] [--quick] [--json] [--from-json FILE]``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from typing import Any

import torch
from bench_cli import device_benchmark_main
from bench_timing import best_cpu_times, cuda_time_and_peak

from psmsearch.composer import PSMLayer
from psmsearch.config import ModelConfig

TRIPLES = {
    "mamba2": ("affine_scalar", "linear_readout_scalar"),
    "gla": ("affine_diag", "linear_readout_diag"),
}
CPU_SHAPE = {"batch": 8, "steps": 1024, "d_model": 128, "heads": 4, "width": 32, "chunks": (16, 64)}
CPU_SHAPE_QUICK = {**CPU_SHAPE, "steps": 256, "chunks": (16,)}
CUDA_SHAPE = {"batch": 8, "steps": 4096, "d_model": 1024, "heads": 8, "width": 64, "chunks": (64,)}
Row = dict[str, Any]


def make_layer(encoder: str, chunk_size: int, shape: dict[str, Any], device: str) -> PSMLayer:
    """The decay layer of ``encoder`` at ``shape``'s widths, seeded."""
    aggregator, head = TRIPLES[encoder]
    torch.manual_seed(0)
    config = ModelConfig(
        d_model=shape["d_model"], chunk_size=chunk_size, aggregator=aggregator, head=head,
        encoder={"name": encoder, "heads": shape["heads"], "key_dim": shape["width"], "value_dim": shape["width"]},
    )
    return PSMLayer.from_config(config).to(device)


def layer_pass(layer: PSMLayer, x: torch.Tensor, fused: bool, backward: bool,
               dtype: torch.dtype = torch.float32) -> Callable[[], object]:
    """One forward (and backward) of ``layer`` on ``x`` through the chosen path."""
    autocast = (torch.autocast(x.device.type, dtype=dtype) if dtype != torch.float32
                else contextlib.nullcontext())

    def step() -> object:
        with autocast:
            y = layer(x, fused=fused)  # [B, T, d]
        if backward:
            y.float().square().mean().backward()
            layer.zero_grad(set_to_none=True)
            x.grad = None
        return y

    return step


def _inputs(shape: dict[str, Any], device: str) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(1)
    x = torch.randn(shape["batch"], shape["steps"], shape["d_model"], generator=gen, device=device)  # [B, T, d]
    return x.requires_grad_(True)


def cpu_rows(quick: bool) -> list[Row]:
    """Generic vs fused (reference kernel) on the CPU."""
    shape = CPU_SHAPE_QUICK if quick else CPU_SHAPE
    x = _inputs(shape, "cpu")
    rows = []
    for encoder in TRIPLES:
        for chunk in shape["chunks"]:
            layer = make_layer(encoder, chunk, shape, "cpu")
            for backward in (False, True):
                times = best_cpu_times({"generic": layer_pass(layer, x, False, backward),
                                        "fused": layer_pass(layer, x, True, backward)}, 2 if quick else 5)
                rows.append({"encoder": encoder, "chunk": chunk, "pass": "fwd+bwd" if backward else "fwd",
                             "generic_ms": times["generic"] * 1e3, "fused_ms": times["fused"] * 1e3,
                             "generic_over_fused": times["generic"] / times["fused"]})
                _progress(rows[-1])
    return rows


def cuda_rows(quick: bool) -> list[Row]:
    """Generic vs fused (Triton) on CUDA, with peak memory."""
    x = _inputs(CUDA_SHAPE, "cuda")
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for encoder in TRIPLES:
            for chunk in CUDA_SHAPE["chunks"]:
                layer = make_layer(encoder, chunk, CUDA_SHAPE, "cuda")
                for backward in (False, True):
                    row: Row = {"dtype": str(dtype).replace("torch.", ""), "encoder": encoder, "chunk": chunk,
                                "pass": "fwd+bwd" if backward else "fwd"}
                    for path in ("generic", "fused"):
                        ms, peak = cuda_time_and_peak(layer_pass(layer, x, path == "fused", backward, dtype),
                                                 3 if quick else 5)
                        row[f"{path}_ms"], row[f"{path}_peak_bytes"] = ms, peak
                    row["generic_over_fused"] = row["generic_ms"] / row["fused_ms"]
                    rows.append(row)
                    _progress(row)
                del layer
                torch.cuda.empty_cache()
    return rows


def _progress(row: Row) -> None:
    print(f"# {row.get('dtype', 'float32')} {row['encoder']} c={row['chunk']} {row['pass']}: "
          f"generic {row['generic_ms']:.2f} ms, fused {row['fused_ms']:.2f} ms", file=sys.stderr, flush=True)


def print_tables(result: dict[str, Any]) -> None:
    if "cpu" in result:
        shape = result["cpu_shape"]
        print(f"CPU, float32, B={shape['batch']} T={shape['steps']} d={shape['d_model']} H={shape['heads']} "
              f"dk=dv={shape['width']}, torch threads = {result['threads']}")
        print("encoder | chunk | pass | generic ms | fused (reference) ms | generic/fused")
        for r in result["cpu"]:
            print(f"{r['encoder']} | {r['chunk']} | {r['pass']} | {r['generic_ms']:.1f} | {r['fused_ms']:.1f} | "
                  f"{r['generic_over_fused']:.2f}x")
    if "cuda" in result:
        s = CUDA_SHAPE
        print(f"CUDA ({result['cuda_device']}), B={s['batch']} T={s['steps']} d={s['d_model']} H={s['heads']} "
              f"dk=dv={s['width']}; peak = bytes one call allocates beyond what was live")
        print("dtype | encoder | chunk | pass | generic ms | fused (Triton) ms | generic/fused | "
              "generic peak MiB | fused peak MiB")
        for r in result["cuda"]:
            print(f"{r['dtype']} | {r['encoder']} | {r['chunk']} | {r['pass']} | {r['generic_ms']:.3f} | "
                  f"{r['fused_ms']:.3f} | {r['generic_over_fused']:.2f}x | "
                  f"{r['generic_peak_bytes'] / 2**20:.0f} | {r['fused_peak_bytes'] / 2**20:.0f}")
    elif "cuda_note" in result:
        print(f"CUDA part: {result['cuda_note']}")


def main(argv: list[str] | None = None) -> None:
    device_benchmark_main(argv, __doc__.splitlines()[0],
                          lambda args: {"threads": torch.get_num_threads(),
                                        "cpu_shape": CPU_SHAPE_QUICK if args.quick else CPU_SHAPE},
                          cpu_rows, cuda_rows, print_tables)


if __name__ == "__main__":
    main()
