"""The affine heads' fast paths against the naive token loop and against the paths they replace.

* ``forward_last`` (streaming's one-row readout) must equal ``forward(prefix, f)[..., -1, :]``, the
  default it overrides, and streaming through it the float64 token-by-token recurrence;
* DeltaNet's ``fused_forward`` (one WY/UT solve per chunk for summaries and readout) must equal
  ``forward(prefix_scan(aggregator, encoder.summarize(f)), f)`` and the recurrence, outputs and
  gradients, and step aside for subclasses that override what it computes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_affine import (  # noqa: E402
    BATCH,
    D_MODEL,
    ENCODERS,
    assert_close,
    inputs,
    make_layer,
    naive_layer,
    output_and_gradients,
)

from psmsearch import Head  # noqa: E402
from psmsearch.plugins import affine_heads, affine_math  # noqa: E402

STEPS = 63


def random_prefix(layer: torch.nn.Module, batch: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """An arbitrary float64 prefix state ``(E, S)`` for ``layer``'s kind (the head reads only ``S``)."""
    gen = torch.Generator().manual_seed(seed)
    transition, memory = layer.encoder.state_shape
    return (torch.zeros(*batch, *transition, dtype=torch.float64),
            torch.randn(*batch, *memory, generator=gen, dtype=torch.float64, requires_grad=True))


@pytest.mark.parametrize("output_gate", [False, True])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_forward_last_equals_the_default_outputs_and_gradients(encoder: str, output_gate: bool) -> None:
    """For partial chunks of every width 1..16, with and without the output gate, in float64."""
    layer = make_layer(encoder, 16, dtype=torch.float64, output_gate=output_gate,
                       gate_before_norm=encoder == "mamba2")
    assert type(layer.head).forward_last is not Head.forward_last
    x = inputs(16, dtype=torch.float64).requires_grad_(True)  # [B, 16, d]
    prefix = random_prefix(layer, (BATCH,), seed=3)
    params = [x, prefix[1], *layer.parameters()]
    for width in (1, 2, 7, 16):
        f = layer.encoder.features(x[:, :width])  # [B, c', ...]
        fast = layer.head.forward_last(prefix, f)  # [B, d]
        default = Head.forward_last(layer.head, prefix, f)  # [B, d]
        assert fast.shape == default.shape == (BATCH, D_MODEL)
        torch.testing.assert_close(fast, default, rtol=1e-12, atol=1e-12)
        weights = torch.randn(fast.shape, generator=torch.Generator().manual_seed(width), dtype=torch.float64)
        got = torch.autograd.grad((fast * weights).sum(), params, allow_unused=True, retain_graph=True)
        want = torch.autograd.grad((default * weights).sum(), params, allow_unused=True)
        for g, g_want in zip(got, want):
            assert (g is None) == (g_want is None)
            if g is not None:
                torch.testing.assert_close(g, g_want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_token_streaming_matches_naive_recurrence_outputs_and_gradients(encoder: str, chunk_size: int) -> None:
    """Streaming token by token (``forward_last`` each step) over T = 63 equals the float64 loop."""
    layer = make_layer(encoder, chunk_size, dtype=torch.float64, output_gate=True)
    x = inputs(STEPS, dtype=torch.float64)

    def stream(t: torch.Tensor) -> torch.Tensor:
        state = layer.stream(BATCH)
        return torch.stack([state.step(t[:, i]) for i in range(STEPS)], dim=1)  # [B, T, d]

    y, grads = output_and_gradients(layer, stream, x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    assert_close(y, y_ref, f"{encoder} c={chunk_size} streamed outputs", rtol=1e-10)
    for g, g_ref in zip(grads, grads_ref):
        assert_close(g, g_ref, f"{encoder} c={chunk_size} streamed gradients", rtol=1e-10)


def test_forward_last_of_strong_decays_stays_finite() -> None:
    """Per-token log-decays of about -100: every exponent of the one-row readout is <= 0."""
    layer = make_layer("gla", 16)
    with torch.no_grad():
        layer.encoder.gate_proj[1].bias.fill_(-1600.0)  # logsigmoid(-1600) / 16 = -100
        f = layer.encoder.features(inputs(16))  # [B, 16, ...]
        prefix = layer.aggregator.initial_state((BATCH,))
        fast = layer.head.forward_last(prefix, f)
        default = Head.forward_last(layer.head, prefix, f)
    assert bool(torch.isfinite(fast).all())
    assert_close(fast, default, "strong decays, last row")


def test_a_head_that_overrides_the_readout_gets_the_default_forward_last() -> None:
    """The one-row formula belongs to the built-in readout; a replaced readout must be honoured."""
    layer = make_layer("gla", 7)
    doubled = staticmethod(lambda memory, f: 2 * affine_math._decay_readout(memory, f))
    layer.head.__class__ = type("Doubled", (type(layer.head),), {"readout": doubled})
    with torch.no_grad():
        f = layer.encoder.features(inputs(5))  # [B, 5, ...]
        prefix = layer.aggregator.initial_state((BATCH,))
        torch.testing.assert_close(layer.head.forward_last(prefix, f), layer.head(prefix, f)[:, -1])


# --- DeltaNet's fused training pass -----------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_deltanet_fused_pass_matches_naive_recurrence_and_generic_path(chunk_size: int) -> None:
    """T = 63 (a partial last chunk), float64: outputs and the gradients of the input and every parameter."""
    layer = make_layer("deltanet", chunk_size, dtype=torch.float64, output_gate=True)
    x = inputs(STEPS, dtype=torch.float64)
    f = layer.encoder.features(x[:, : STEPS // chunk_size * chunk_size].unflatten(1, (-1, chunk_size)))
    assert layer.head.fused_forward(layer.encoder, layer.aggregator, f) is not None, "declined where it pays"
    results = {path: output_and_gradients(layer, lambda t, p=path: layer(t, fused=p), x)
               for path in (None, True, False)}
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    for path, (y, grads) in results.items():
        assert_close(y, y_ref, f"fused={path} c={chunk_size} outputs", rtol=1e-10)
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g, g_ref, f"fused={path} c={chunk_size} gradients", rtol=1e-10)
    torch.testing.assert_close(results[True][0], results[False][0], rtol=1e-12, atol=1e-12)


def test_deltanet_fused_pass_solves_each_chunk_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The generic path solves the WY/UT system in summarize and again in the readout."""
    calls = []
    wy = affine_math._wy

    def counted(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(1)
        return wy(*args)

    # _wy is looked up in two modules: by the head's fused pass, and by the generic path's summaries and readouts.
    for module in (affine_heads, affine_math):
        monkeypatch.setattr(module, "_wy", counted)
    layer = make_layer("deltanet", 8)
    layer(inputs(), fused=None).sum().backward()
    assert len(calls) == 1
    layer(inputs(64), fused=False)  # whole chunks: the readout is one call, as the summaries are
    assert len(calls) == 3


def test_deltanet_bfloat16_fused_pass_equals_generic() -> None:
    """Bitwise on whole chunks (the same operations on the same shapes); within one bfloat16 step on the
    partial last chunk, which the fused pass reads zero-padded and the generic pass as it is."""
    layer = make_layer("deltanet", 16, dtype=torch.bfloat16)
    x = inputs().bfloat16()  # [B, 37, d]: two whole chunks and 5 tokens
    with torch.no_grad():
        fused, generic = layer(x, fused=True), layer(x, fused=False)
    assert fused.dtype == torch.bfloat16
    torch.testing.assert_close(fused[:, :32], generic[:, :32], rtol=0, atol=0)
    torch.testing.assert_close(fused[:, 32:], generic[:, 32:], rtol=1.6e-2, atol=1e-2)


def _passthrough(method: str):  # noqa: ANN202
    """An override of ``method`` that only calls the parent's: same results, a different function."""
    def override(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return getattr(super(type(self), self), method)(*args, **kwargs)

    return override


@pytest.mark.parametrize(("component", "method"), [
    ("encoder", "summarize"), ("aggregator", "forward"), ("aggregator", "scan"),
    ("aggregator", "initial_state"), ("head", "readout"), ("head", "forward"),
])
def test_deltanet_overrides_of_what_the_fused_pass_computes_take_the_generic_path(component: str,
                                                                                  method: str) -> None:
    layer = make_layer("deltanet", 4)
    part = getattr(layer, component)
    original = type(part).readout if method == "readout" else None
    override = staticmethod(lambda memory, f: original(memory, f)) if original else _passthrough(method)
    part.__class__ = type("Variant", (type(part),), {method: override})
    f = layer.encoder.features(inputs(8).view(BATCH, 2, 4, D_MODEL))  # [B, N, c, ...]
    assert layer.head.fused_forward(layer.encoder, layer.aggregator, f, required=True) is None
    with torch.no_grad():
        assert_close(layer(inputs()), make_layer("deltanet", 4)(inputs()), f"{component}.{method} variant")
