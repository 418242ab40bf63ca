"""Triton-vs-reference checks shared by the interpreter run and the CUDA run.

Every Triton launch here allocates its outputs through
``_dispatch.poisoned_outputs()``, so a kernel that misses an element leaves a
NaN that the comparison reports.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from psmsearch.kernels import _dispatch, chunk_gated_linear_attention, first_order_scan

STATE = (2, 3, 5)  # [H, dk, dv]
GATE_SHAPES = {"scalar": (2, 1, 1), "diagonal": (2, 3, 1), "full": STATE}


def _randn(shape: tuple[int, ...], gen: torch.Generator, device: str) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device)


def _grads(out: torch.Tensor | tuple[torch.Tensor, ...], inputs: list[torch.Tensor],
           poisoned: bool) -> tuple[torch.Tensor | None, ...]:
    """Gradients of a random projection of ``out``; ``None`` for an input that ``out`` does not depend on."""
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    ups = [torch.randn(o.shape, generator=gen).to(o.device, o.dtype) for o in outs]
    if poisoned:
        with _dispatch.poisoned_outputs():
            return torch.autograd.grad(outs, inputs, ups, allow_unused=True)
    return torch.autograd.grad(outs, inputs, ups, allow_unused=True)


def scan_inputs(device: str, steps: int, gate: str, with_h0: bool, batch: int = 2,
                state: tuple[int, ...] = STATE, gate_shape: tuple[int, ...] | None = None,
                dtype: torch.dtype = torch.float32, seed: int = 0) -> list[torch.Tensor | None]:
    """``a, b, h0``; ``gate_shape`` (full rank) overrides ``(batch, steps, *GATE_SHAPES[gate])``."""
    gen = torch.Generator().manual_seed(seed)
    shape = gate_shape if gate_shape is not None else (batch, steps, *GATE_SHAPES[gate])
    a = (torch.rand(shape, generator=gen) * 0.7 + 0.3).to(device, dtype)
    b = _randn((batch, steps, *state), gen, device).to(dtype)
    h0 = _randn((batch, *state), gen, device).to(dtype) if with_h0 else None
    return [a, b, h0]


def strided(x: torch.Tensor | None) -> torch.Tensor | None:
    """``x``'s values in a non-contiguous layout (last dim outermost in memory), as a transposed tensor is."""
    return None if x is None else x.movedim(-1, 0).contiguous().movedim(0, -1)


def check_scan(device: str, steps: int, gate: str, with_h0: bool, reverse: bool,
               tol: float = 1e-5, non_contiguous: bool = False, **shape: object) -> None:
    """Triton forward and gradients equal the reference's (float32), on contiguous or strided inputs."""
    a, b, h0 = scan_inputs(device, steps, gate, with_h0, **shape)
    if non_contiguous:
        a, b, h0 = strided(a), strided(b), strided(h0)
    inputs = [x.requires_grad_() for x in (a, b, h0) if x is not None]
    with _dispatch.poisoned_outputs():
        got = first_order_scan(a, b, h0, reverse=reverse, backend="triton")
    want = first_order_scan(a, b, h0, reverse=reverse, backend="reference")
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    for g_got, g_want in zip(_grads(got, inputs, True), _grads(want, inputs, False)):
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol)


def check_scan_half(device: str, dtype: torch.dtype, steps: int = 300) -> None:
    """16-bit inputs give the float32 result of the same (rounded) inputs, to 16-bit precision."""
    a, b, h0 = scan_inputs(device, steps, "diagonal", True, dtype=dtype)
    with _dispatch.poisoned_outputs():
        got = first_order_scan(a, b, h0, backend="triton")
    assert got.dtype == dtype
    want = first_order_scan(a.float(), b.float(), h0.float(), backend="reference")
    torch.testing.assert_close(got.float(), want, rtol=2e-2, atol=2e-2)


def chunk_inputs(device: str, steps: int, diagonal: bool, with_h0: bool, dk: int = 8, dv: int = 12,
                 heads: int = 2, decay: float = 2.0, dtype: torch.dtype = torch.float32,
                 seed: int = 0, batch: int = 1) -> list[torch.Tensor | None]:
    gen = torch.Generator().manual_seed(seed)
    q, k = (_randn((batch, heads, steps, dk), gen, device).to(dtype) for _ in range(2))
    v = _randn((batch, heads, steps, dv), gen, device).to(dtype)
    gate_shape = (batch, heads, steps, dk) if diagonal else (batch, heads, steps)
    log_gate = (-decay * torch.rand(gate_shape, generator=gen)).to(device, dtype)
    h0 = _randn((batch, heads, dk, dv), gen, device).to(dtype) if with_h0 else None
    return [q, k, v, log_gate, h0]


def check_chunk(device: str, steps: int, diagonal: bool, with_h0: bool, chunk_size: int = 32,
                tol: float = 1e-4, used: str = "both", non_contiguous: bool = False, **shape: object) -> None:
    """Triton chunkwise GLA (forward, final state, gradients) equals the reference's.

    ``used`` picks the outputs the loss depends on: ``"both"``, ``"output"`` (the
    final state gets no gradient) or ``"final_state"`` (the outputs get none).
    ``non_contiguous`` passes every input as a strided (transposed-layout) view.
    """
    q, k, v, log_gate, h0 = chunk_inputs(device, steps, diagonal, with_h0, **shape)
    if non_contiguous:
        q, k, v, log_gate, h0 = (strided(x) for x in (q, k, v, log_gate, h0))
    inputs = [x.requires_grad_() for x in (q, k, v, log_gate, h0) if x is not None]
    kwargs = dict(chunk_size=chunk_size, initial_state=h0, output_final_state=True)
    with _dispatch.poisoned_outputs():
        got = chunk_gated_linear_attention(q, k, v, log_gate, backend="triton", **kwargs)
    want = chunk_gated_linear_attention(q, k, v, log_gate, backend="reference", **kwargs)
    for x_got, x_want in zip(got, want):
        torch.testing.assert_close(x_got, x_want, rtol=tol, atol=tol)
    pick = {"both": slice(0, 2), "output": slice(0, 1), "final_state": slice(1, 2)}[used]
    grads_got = _grads(tuple(got[pick]), inputs, True)
    grads_want = _grads(tuple(want[pick]), inputs, False)
    for name, g_got, g_want in zip(("q", "k", "v", "log_gate", "h0"), grads_got, grads_want):
        assert (g_got is None) == (g_want is None), f"d{name}: triton gave {g_got is not None}, reference {g_want is not None}"
        if g_want is not None:
            torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol, msg=lambda m, n=name: f"d{n}: {m}")


def check_chunk_func_transforms(device: str, steps: int = 20, chunk_size: int = 16, tol: float = 1e-4) -> None:
    """``torch.func`` through the Triton chunkwise kernel equals it through the reference: ``grad``
    in every input, ``jvp``, ``vmap`` over a batch of sequences, and per-sequence gradients."""
    from torch.func import grad, jvp, vmap

    q, k, v, log_gate, h0 = chunk_inputs(device, steps, True, True)

    def run(backend: str):  # noqa: ANN202 - a closure over the backend
        def chunk(q_: torch.Tensor, k_: torch.Tensor, v_: torch.Tensor, g_: torch.Tensor,
                  h0_: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return chunk_gated_linear_attention(q_, k_, v_, g_, chunk_size=chunk_size, initial_state=h0_,
                                                output_final_state=True, backend=backend)
        return chunk

    def loss(backend: str):  # noqa: ANN202
        return lambda *x: sum(out.pow(2).sum() for out in run(backend)(*x))

    primals = (q, k, v, log_gate, h0)
    names = ("q", "k", "v", "log_gate", "h0")
    for name, g_got, g_want in zip(names, grad(loss("triton"), argnums=(0, 1, 2, 3, 4))(*primals),
                                   grad(loss("reference"), argnums=(0, 1, 2, 3, 4))(*primals)):
        torch.testing.assert_close(g_got, g_want, rtol=tol, atol=tol, msg=lambda m, n=name: f"grad {n}: {m}")
    tangents = tuple(x for x in chunk_inputs(device, steps, True, True, seed=1))
    for got, want in zip(jvp(run("triton"), primals, tangents)[1], jvp(run("reference"), primals, tangents)[1]):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"jvp: {m}")
    def batch_of_two(seed: int) -> list[torch.Tensor]:
        """Inputs with B = 2, so that a vmap rule that mixes up the batch and vmapped dims shows."""
        pairs = zip(chunk_inputs(device, steps, True, True, seed=seed), chunk_inputs(device, steps, True, True,
                                                                                     seed=seed + 10))
        return [torch.cat(pair) for pair in pairs]

    draws = [batch_of_two(seed)[:3] for seed in (2, 3, 4)]
    per_sequence = [torch.stack([draw[i] for draw in draws], dim=1) for i in range(3)]  # [2, 3, H, T, d]
    dims = (1, 1, 1, None, None)                                               # q, k, v per sequence
    shared = batch_of_two(5)
    args = (*per_sequence, shared[3], shared[4])
    for got, want in zip(vmap(run("triton"), in_dims=dims)(*args), vmap(run("reference"), in_dims=dims)(*args)):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"vmap: {m}")
    per_seq = [vmap(grad(loss(backend), argnums=(3, 4)), in_dims=dims)(*args) for backend in ("triton", "reference")]
    for name, got, want in zip(("log_gate", "h0"), *per_seq):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m, n=name: f"per-sequence grad {n}: {m}")
    import torch.autograd.forward_ad as fwad
    from torch.func import jacfwd

    tangent_q = torch.randn_like(q)
    dual_tangents = []
    for backend in ("triton", "reference"):
        with fwad.dual_level():
            outputs = run(backend)(fwad.make_dual(q, tangent_q), k, v, log_gate, h0)
            dual_tangents.append([torch.zeros_like(out) if fwad.unpack_dual(out).tangent is None  # no dependence
                                  else fwad.unpack_dual(out).tangent for out in outputs])
    for got, want in zip(*dual_tangents):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol, msg=lambda m: f"forward AD (dual q): {m}")
    with pytest.raises(RuntimeError, match="forward mode over forward mode"):
        jacfwd(jacfwd(lambda g_: loss("triton")(q, k, v, g_, h0)))(log_gate)


def check_chunk_half(device: str, dtype: torch.dtype, diagonal: bool, steps: int = 150) -> None:
    """16-bit inputs: outputs and gradients close to float32 on the same (rounded) inputs."""
    inputs16 = [x for x in chunk_inputs(device, steps, diagonal, True, dtype=dtype, dk=32, dv=32)]
    inputs32 = [x.float() for x in inputs16]
    results = []
    for inputs, backend in ((inputs16, "triton"), (inputs32, "reference")):
        leaves = [x.requires_grad_() for x in inputs]
        o, final = chunk_gated_linear_attention(*leaves[:4], chunk_size=64, initial_state=leaves[4],
                                                output_final_state=True, backend=backend)
        results.append((o, *_grads((o, final), leaves, False)))
    assert results[0][0].dtype == dtype
    for got, want in zip(*results):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * scale)


def check_chunk_mixed_dtypes(device: str, steps: int = 70) -> None:
    """bfloat16 queries with float32 keys, values and gates (autocast can give that mix).

    Outputs in bfloat16, every gradient in its own input's dtype, all close to the float32
    reference on the same values.
    """
    q, k, v, log_gate, _ = chunk_inputs(device, steps, True, False, dk=32, dv=32)
    mixed = [q.bfloat16(), k, v, log_gate]
    rounded = [q.bfloat16().float(), k, v, log_gate]
    results = []
    for inputs, backend in ((mixed, "triton"), (rounded, "reference")):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        with _dispatch.poisoned_outputs():
            o, _ = chunk_gated_linear_attention(*leaves, chunk_size=16, backend=backend)
        results.append((o, *_grads(o, leaves, False)))
    assert results[0][0].dtype == torch.bfloat16
    assert [g.dtype for g in results[0][1:]] == [torch.bfloat16, torch.float32, torch.float32, torch.float32]
    for got, want in zip(*results):
        scale = want.abs().max().item()
        torch.testing.assert_close(got.float(), want, rtol=3e-2, atol=3e-2 * scale)


def _decay_layer(device: str, encoder: str, chunk_size: int) -> Any:
    """A small seeded decay PSM layer (imported lazily: the GPU script runs the kernel checks without it)."""
    from psmsearch.composer import PSMLayer
    from psmsearch.config import ModelConfig

    aggregator, head = {"mamba2": ("affine_scalar", "linear_readout_scalar"),
                        "mlstm": ("affine_scalar_normalized", "linear_readout_normalized"),
                        "gla": ("affine_diag", "linear_readout_diag")}[encoder]
    torch.manual_seed(0)
    config = ModelConfig(d_model=24, chunk_size=chunk_size, aggregator=aggregator, head=head,
                         encoder={"name": encoder, "heads": 2, "key_dim": 8, "value_dim": 6})
    return PSMLayer.from_config(config).to(device)


@contextlib.contextmanager
def _requested(backend: str | None) -> Iterator[None]:
    """``PSMSEARCH_KERNEL_BACKEND`` set to ``backend`` (unset for None) inside the block."""
    saved = os.environ.get(_dispatch.ENV_VAR)
    if backend is None:
        os.environ.pop(_dispatch.ENV_VAR, None)
    else:
        os.environ[_dispatch.ENV_VAR] = backend
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(_dispatch.ENV_VAR, None)
        else:
            os.environ[_dispatch.ENV_VAR] = saved


def check_triton_decision(device: str) -> None:
    """Where Triton runs, the default-backend answer follows the chunk size and the dtype."""
    from psmsearch.kernels.chunkwise import TRITON_CHUNK_SIZES, default_backend_is_triton

    q = torch.zeros(1, 2, 64, 8, device=device)
    with _requested("triton" if device == "cpu" else None):
        assert [c for c in range(1, 257) if default_backend_is_triton(q, c)] == list(TRITON_CHUNK_SIZES)
        assert not default_backend_is_triton(q.double(), 16), "Triton takes no float64"


def check_decay_layer_other_chunk(device: str, encoder: str, chunk_size: int = 8) -> None:
    """At a chunk size Triton cannot take, ``fused=None`` trains on the generic path (no error).

    ``fused=True`` then runs the kernel's reference on CUDA; on the CPU Triton is only reachable as
    an explicit request (``PSMSEARCH_KERNEL_BACKEND=triton``), which it honours with a clear error.
    """
    layer = _decay_layer(device, encoder, chunk_size)
    x = _randn((2, 37, 24), torch.Generator().manual_seed(1), device)  # [B, T, d]
    with torch.no_grad(), _requested("triton" if device == "cpu" else None):
        f = layer.encoder.features(torch.nn.functional.pad(x, (0, 0, 0, 3)).unflatten(1, (5, 8)))  # [B, N, c, ...]
        assert layer.head.fused_forward(layer.encoder, layer.aggregator, f) is None
        auto = layer(x)  # [B, T, d]
        if device == "cpu":
            with pytest.raises(ValueError, match=r"chunk_size in \(16, 32, 64, 128\)"):
                layer(x, fused=True)
            required = auto
        else:
            required = layer(x, fused=True)  # [B, T, d]
    with _requested("reference"):
        generic = layer(x, fused=False)  # [B, T, d]
    torch.testing.assert_close(auto, generic, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(required, generic, rtol=1e-4, atol=1e-4)


def check_decay_layer(device: str, encoder: str, chunk_size: int = 16, steps: int = 37) -> None:
    """A decay PSM layer's default training pass takes the Triton kernel and equals the generic path.

    ``fused=None`` must hand the pass to :func:`chunk_gated_linear_attention` on Triton (the head's
    ``fused_forward`` answers with ``required=False``); outputs and the gradients of the input and of
    every parameter must equal ``fused=False`` (summaries, scan, readout one by one) with every kernel
    on its PyTorch reference. ``steps`` not a multiple of ``chunk_size`` leaves a partial last chunk.
    """
    layer = _decay_layer(device, encoder, chunk_size)
    x = _randn((2, steps, 24), torch.Generator().manual_seed(1), device).requires_grad_(True)  # [B, T, d]
    params = [x, *layer.parameters()]
    with _requested("triton" if device == "cpu" else None):
        n_chunks = -(-steps // chunk_size)
        padded = torch.nn.functional.pad(x, (0, 0, 0, n_chunks * chunk_size - steps))  # [B, N*c, d]
        f = layer.encoder.features(padded.unflatten(1, (n_chunks, chunk_size)))  # [B, N, c, ...]
        assert layer.head.fused_forward(layer.encoder, layer.aggregator, f) is not None, "fused path declined"
        with _dispatch.poisoned_outputs():
            fused = layer(x)  # [B, T, d]
        fused_grads = _grads(fused, params, poisoned=True)
    with _requested("reference"):
        generic = layer(x, fused=False)  # [B, T, d]
        generic_grads = _grads(generic, params, poisoned=False)
    torch.testing.assert_close(fused, generic, rtol=1e-4, atol=1e-4, msg=lambda m: f"{encoder} outputs: {m}")
    for g, g_ref in zip(fused_grads, generic_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-3, atol=1e-4, msg=lambda m: f"{encoder} gradients: {m}")
