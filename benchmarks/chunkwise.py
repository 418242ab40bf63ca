"""Benchmark of :func:`psmsearch.kernels.chunk_gated_linear_attention` (chunkwise GLA / SSD).

CPU part: the PyTorch reference (chunk size 64) against a token-by-token
recurrence of the matrix state (the naive baseline, one Python step per token,
vectorised over batch and heads), forward and forward+backward, scalar and
per-channel gates, at ``B=1, H=4, dk=dv=32`` for T in {1024, 4096}. The loop is
timed on a prefix and extrapolated linearly (it is linear in T).

CUDA part (when available): Triton against the reference, float32 and bfloat16,
forward and forward+backward, at ``B=4, H=8`` with ``dk=dv`` in {64, 128} and
T in {2048, 8192}: milliseconds, tokens per second, the speed-up, and the peak
memory that a forward+backward allocates beyond its inputs (the Triton
backward saves only the inputs; the reference keeps autograd's intermediates).
Triton is also timed with Triton's default launch (4 warps, 3 stages) instead
of :func:`psmsearch.kernels.chunkwise_triton_common.launch_options`, which
were chosen from compiler spill figures without a GPU: ``default/options`` > 1
means the options are faster.

Usage: ``python benchmarks/chunkwise.py [--cpu-only | --cuda-only] [--quick] [--json]``.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch
from bench_cli import device_benchmark_main
from bench_timing import best_cpu_time as _cpu_time
from bench_timing import cuda_time_and_peak

from psmsearch.kernels import chunk_gated_linear_attention

CHUNK = 64
CPU_SHAPE = {"batch": 1, "heads": 4, "dk": 32, "dv": 32}
CPU_STEPS, CPU_STEPS_QUICK = (1024, 4096), (1024,)
LOOP_PREFIX = 256
CUDA_BATCH, CUDA_HEADS = 4, 8
CUDA_STEPS, CUDA_STEPS_QUICK = (2048, 8192), (8192,)
CUDA_WIDTHS = (64, 128)
Row = dict[str, Any]


def _inputs(batch: int, heads: int, steps: int, dk: int, dv: int, diagonal: bool, device: str,
            dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(batch, heads, steps, dk, generator=gen, device=device)
    k = torch.randn(batch, heads, steps, dk, generator=gen, device=device) * dk ** -0.5
    v = torch.randn(batch, heads, steps, dv, generator=gen, device=device)
    gate_shape = (batch, heads, steps, dk) if diagonal else (batch, heads, steps)
    log_gate = -0.1 * torch.rand(gate_shape, generator=gen, device=device)
    return [x.to(dtype) for x in (q, k, v, log_gate)]


def token_loop(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, log_gate: torch.Tensor) -> torch.Tensor:
    """``S_t = diag(e^{g_t}) S_{t-1} + k_t v_tᵀ``, ``o_t = dk^-1/2 S_tᵀ q_t``, one step per token."""
    batch, heads, steps, dk = q.shape
    gates = log_gate.exp()
    gates = gates.unsqueeze(-1).expand(batch, heads, steps, dk) if gates.dim() == 3 else gates
    state = q.new_zeros(batch, heads, dk, v.shape[-1])  # [B, H, dk, dv]
    outputs = []
    for t in range(steps):
        state = gates[:, :, t, :, None] * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, :, t], state) * dk ** -0.5)
    return torch.stack(outputs, dim=2)  # [B, H, T, dv]


def _with_backward(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> Callable[[], object]:
    leaves = [x.detach().requires_grad_() for x in inputs]

    def step() -> object:
        o = fn(*leaves)
        return torch.autograd.grad(o, leaves, torch.ones_like(o))

    return step


def _reference(*inputs: torch.Tensor) -> torch.Tensor:
    return chunk_gated_linear_attention(*inputs, chunk_size=CHUNK, backend="reference")[0]


def _triton(*inputs: torch.Tensor) -> torch.Tensor:
    return chunk_gated_linear_attention(*inputs, chunk_size=CHUNK, backend="triton")[0]


@contextlib.contextmanager
def _triton_default_launch() -> Iterator[None]:
    """Launch the chunkwise kernels with Triton's default warps and stages instead of ``launch_options``.

    The options were chosen from ptxas spill figures without a GPU; this A/B is
    what times them. The launchers import ``launch_options`` by name, so it is
    replaced in each of their modules for the duration.
    """
    from psmsearch.kernels import chunkwise_triton, chunkwise_triton_backward, chunkwise_triton_common

    modules = (chunkwise_triton, chunkwise_triton_backward, chunkwise_triton_common)
    saved = [module.launch_options for module in modules]
    for module in modules:
        module.launch_options = lambda chunk_size: {}
    try:
        yield
    finally:
        for module, original in zip(modules, saved):
            module.launch_options = original


def _triton_default(*inputs: torch.Tensor) -> torch.Tensor:
    with _triton_default_launch():
        return _triton(*inputs)


def cpu_rows(quick: bool) -> list[Row]:
    """Reference vs token loop on the CPU."""
    rows = []
    for steps in CPU_STEPS_QUICK if quick else CPU_STEPS:
        for diagonal in (False, True):
            inputs = _inputs(**CPU_SHAPE, steps=steps, diagonal=diagonal, device="cpu")
            prefix = [x[:, :, :LOOP_PREFIX] for x in inputs]
            for backward in (False, True):
                ref = _with_backward(_reference, inputs) if backward else (lambda: _reference(*inputs))
                loop = _with_backward(token_loop, prefix) if backward else (lambda: token_loop(*prefix))
                ref_s = _cpu_time(ref, 2 if quick else 3)
                loop_s = _cpu_time(loop, 1) * steps / LOOP_PREFIX
                rows.append({"T": steps, "gate": "diagonal" if diagonal else "scalar",
                             "pass": "fwd+bwd" if backward else "fwd", "reference_ms": ref_s * 1e3,
                             "loop_ms": loop_s * 1e3, "loop_over_reference": loop_s / ref_s})
                _progress(f"T={steps} {rows[-1]['gate']} {rows[-1]['pass']}: reference {ref_s * 1e3:.1f} ms, "
                          f"loop {loop_s * 1e3:.0f} ms")
    return rows


def _in_default_launch(step: Callable[[], object]) -> Callable[[], object]:
    """``step`` (forward and backward) with the default launch in force for both passes."""
    def run() -> object:
        with _triton_default_launch():
            return step()

    return run


def cuda_rows(quick: bool) -> list[Row]:
    """Triton vs reference on CUDA."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for width in CUDA_WIDTHS:
            for steps in CUDA_STEPS_QUICK if quick else CUDA_STEPS:
                for diagonal in (False, True):
                    inputs = _inputs(CUDA_BATCH, CUDA_HEADS, steps, width, width, diagonal, "cuda", dtype)
                    for backward in (False, True):
                        row: Row = {"dtype": str(dtype).replace("torch.", ""), "d": width, "T": steps,
                                    "gate": "diagonal" if diagonal else "scalar",
                                    "pass": "fwd+bwd" if backward else "fwd"}
                        for name, fn in (("triton", _triton), ("triton_default_launch", _triton_default),
                                         ("reference", _reference)):
                            case = _with_backward(fn, inputs) if backward else (lambda fn=fn, xs=inputs: fn(*xs))
                            if name == "triton_default_launch" and backward:
                                case = _in_default_launch(case)
                            ms, peak = cuda_time_and_peak(case, 3 if quick else 5)
                            row[f"{name}_ms"], row[f"{name}_peak_bytes"] = ms, peak
                        row["speedup"] = row["reference_ms"] / row["triton_ms"]
                        row["default_launch_over_options"] = row["triton_default_launch_ms"] / row["triton_ms"]
                        row["triton_tokens_per_s"] = CUDA_BATCH * steps / row["triton_ms"] * 1e3
                        rows.append(row)
                        _progress(f"{row['dtype']} d={width} T={steps} {row['gate']} {row['pass']}: "
                                  f"triton {row['triton_ms']:.3f} ms, reference {row['reference_ms']:.3f} ms")
                    del inputs
                    torch.cuda.empty_cache()
    return rows


def _progress(line: str) -> None:
    print(f"# {line}", file=sys.stderr, flush=True)


def print_tables(result: dict[str, Any]) -> None:
    if "cpu" in result:
        print(f"CPU, float32, B={CPU_SHAPE['batch']} H={CPU_SHAPE['heads']} dk=dv={CPU_SHAPE['dk']}, "
              f"chunk {CHUNK}, torch threads = {result.get('threads')}")
        print("T | gate | pass | reference ms | token loop ms* | loop/ref")
        for r in result["cpu"]:
            print(f"{r['T']} | {r['gate']} | {r['pass']} | {r['reference_ms']:.1f} | {r['loop_ms']:.0f} | "
                  f"{r['loop_over_reference']:.1f}x")
        print(f"* token loop timed on the first {LOOP_PREFIX} steps and extrapolated linearly to T")
    if "cuda" in result:
        print(f"CUDA ({result.get('cuda_device')}), B={CUDA_BATCH} H={CUDA_HEADS}, chunk {CHUNK}; "
              "peak = bytes allocated by one call beyond its inputs")
        print("dtype | d | T | gate | pass | triton ms | triton, default launch ms | default/options | "
              "reference ms | speed-up | triton Mtok/s | triton peak MiB | reference peak MiB")
        for r in result["cuda"]:
            default_ms = r.get("triton_default_launch_ms")
            default = "n/a" if default_ms is None else f"{default_ms:.3f}"
            ratio = "n/a" if default_ms is None else f"{r['default_launch_over_options']:.2f}x"
            print(f"{r['dtype']} | {r['d']} | {r['T']} | {r['gate']} | {r['pass']} | {r['triton_ms']:.3f} | "
                  f"{default} | {ratio} | {r['reference_ms']:.3f} | {r['speedup']:.1f}x | "
                  f"{r['triton_tokens_per_s'] / 1e6:.2f} | "
                  f"{r['triton_peak_bytes'] / 2**20:.0f} | {r['reference_peak_bytes'] / 2**20:.0f}")
    elif "cuda_note" in result:
        print(f"CUDA part: {result['cuda_note']}")


def main(argv: list[str] | None = None) -> None:
    device_benchmark_main(argv, __doc__.splitlines()[0],
                          lambda args: {"torch": torch.__version__, "threads": torch.get_num_threads()},
                          cpu_rows, cuda_rows, print_tables)


if __name__ == "__main__":
    main()
