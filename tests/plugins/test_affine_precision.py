"""Precision of the affine plugin's decay layers: 16-bit accumulation and RetNet's float64 decays.

The reference is the same layer (same bf16 weights) run in float64, or RetNet's decays computed
here from their definition; nothing is shared with the code under test.
"""

from __future__ import annotations

import copy

import pytest
import torch

from psmsearch.composer import PSMLayer
from psmsearch.config import ModelConfig

TRIPLES = {
    "gla": ("affine_diag", "linear_readout_diag"),
    "mamba2": ("affine_scalar", "linear_readout_scalar"),
    "retnet": ("affine_scalar", "linear_readout_scalar"),
}


def decay_layer(encoder: str, chunk_size: int, d_model: int = 32, **encoder_params: object) -> PSMLayer:
    """A decay layer with two 16×16 heads and no norm (the norm would hide a scale error)."""
    aggregator, head = TRIPLES[encoder]
    torch.manual_seed(0)
    return PSMLayer.from_config(ModelConfig(
        d_model=d_model, chunk_size=chunk_size,
        encoder={"name": encoder, "heads": 2, "key_dim": 16, "value_dim": 16, **encoder_params},
        aggregator=aggregator, head={"name": head, "norm": False},
    ))


@pytest.mark.parametrize(("encoder", "params"), [
    ("gla", {"gate_temperature": 1.0}),  # strong per-channel decays: the cumulative gates reach -100s
    ("gla", {}),
    ("mamba2", {}),
    ("retnet", {}),
])
def test_bfloat16_generic_and_streaming_paths_accumulate_like_the_fused_kernel(encoder: str,
                                                                               params: dict) -> None:
    """At c = 64 a bf16 layer's generic and streaming paths were 5x further from float64 than the
    fused kernel (GLA τ = 1: 3.5% against 0.7%), because their cumsum, exp and einsums ran in bf16.
    Now they accumulate in float32 like the kernel: their error is the kernel's, up to bf16 rounding
    of the outputs."""
    chunk = 64
    layer = decay_layer(encoder, chunk, **params).bfloat16()
    x = torch.randn(2, 4 * chunk - 5, 32, generator=torch.Generator().manual_seed(1)).bfloat16()  # [B, T, d]
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double(), fused=False)  # [B, T, d]: same bf16 weights, float64
        got = {"fused": layer(x, fused=True), "generic": layer(x, fused=False), "streaming": layer.stream(2).feed(x)}
    scale = want.abs().max().item()
    error = {name: (y.double() - want).abs().max().item() / scale for name, y in got.items()}
    for name in ("generic", "streaming"):
        assert got[name].dtype == torch.bfloat16
        assert error[name] <= 1.5 * error["fused"] + 2e-3, f"{encoder} {params}: relative errors {error}"
