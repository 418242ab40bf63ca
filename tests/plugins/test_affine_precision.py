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
    "mamba": ("affine_diag", "linear_readout_diag"),
    "mamba2": ("affine_scalar", "linear_readout_scalar"),
    "mlstm": ("affine_scalar_normalized", "linear_readout_normalized"),
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
    ("mamba", {}),
    ("mamba2", {}),
    ("mlstm", {}),
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


def test_bfloat16_mlstm_computes_its_gates_in_float32() -> None:
    """With input-gate biases of 5 (``e^ĩ`` about 150) and no norm to hide a scale error, a bf16 mLSTM
    whose gates ran in bf16 was 60-75% off its float64 twin (the same bf16 weights and inputs;
    ``‖y - y64‖ / ‖y64‖`` over three inputs): ``ĩ`` rounded by up to 2^-8 relative moves ``e^ĩ`` by
    as much, and the normaliser's division of two sums that cancel amplifies it. Computed in float32
    and rounded once into the key, 8.5-10%: what rounding ``e^ĩ k`` to bf16 costs there."""
    layer = decay_layer("mlstm", 16)
    with torch.no_grad():
        layer.encoder.gate_proj.bias.view(2, 2)[:, 0].fill_(5.0)
    layer = layer.bfloat16()
    x = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1)).bfloat16()  # [B, T, d]
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double())  # [B, T, d]
        for name, got in (("parallel", layer(x)), ("streaming", layer.stream(2).feed(x))):
            error = ((got.double() - want).norm() / want.norm()).item()
            assert got.dtype == torch.bfloat16 and error <= 0.2, f"{name}: relative error {error:.3g}"


@pytest.mark.parametrize("path", ["generic", "tree", "streaming"])
def test_bfloat16_slow_decays_do_not_compound_rounding_over_chunks(path: str) -> None:
    """Mamba2 with its slowest initial decays (``Δ`` in [1e-4, 1e-2], ``A = 1``: a chunk of 16 decays by
    about 0.98): the aggregator formed ``exp(log E)`` in bf16, whose rounding (up to 0.2%, the same
    in every chunk) compounded over the ~100 chunks such a decay remembers. At T = 1024, c = 16 the
    generic path was 4.5x further from float64 than the fused kernel (2.0% against 0.44%), streaming
    6.8x (2.9%)."""
    layer = decay_layer("mamba2", 16, dt_min=1e-4, dt_max=1e-2)
    with torch.no_grad():
        layer.encoder.a_log.zero_()  # A = exp(0) = 1, the low end of Mamba2's [1, 16]
    layer = layer.bfloat16()
    x = torch.randn(2, 1024, 32, generator=torch.Generator().manual_seed(1)).bfloat16()  # [B, T, d]
    run = {
        "generic": lambda t: layer(t, fused=False),
        "tree": lambda t: layer(t, scan_mode="tree"),
        "streaming": lambda t: layer.stream(2).feed(t),
    }[path]
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double(), fused=False)  # [B, T, d]: same bf16 weights, float64
        fused, got = layer(x, fused=True), run(x)
    scale = want.abs().max().item()
    error = {name: (y.double() - want).abs().max().item() / scale for name, y in (("fused", fused), (path, got))}
    assert got.dtype == torch.bfloat16
    assert error[path] <= 1.5 * error["fused"] + 2e-3, f"relative errors {error}"


def exact_retnet_log_decay(heads: int, decay_exponent: int = 5) -> torch.Tensor:
    """``log γ_h = log(1 - 2^-(decay_exponent + h))`` in float64, from RetNet's definition."""
    return torch.log1p(-(2.0 ** -(decay_exponent + torch.arange(heads, dtype=torch.float64))))  # [H]


def retnet_loop(layer: PSMLayer, x: torch.Tensor) -> torch.Tensor:
    """``S_t = γ S_{t-1} + k_t v_tᵀ``, ``o_t = S_tᵀ q_t`` token by token with the exact float64 ``γ``."""
    q, k, v, _, _ = layer.encoder.features(x)  # [B, T, H, dk], [B, T, H, dk], [B, T, H, dv]
    gamma = exact_retnet_log_decay(q.shape[2]).exp()[:, None, None]  # [H, 1, 1]
    state = x.new_zeros(x.shape[0], q.shape[2], k.shape[-1], v.shape[-1])  # [B, H, dk, dv]
    outputs = []
    for t in range(x.shape[1]):
        state = gamma * state + k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, dk, dv]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))  # [B, H, dv]
    o = torch.stack(outputs, dim=1)  # [B, T, H, dv]
    return layer.head.out(layer.head.norm(o).flatten(-2))  # [B, T, d]


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
def test_retnet_float64_layer_uses_exact_decays(chunk_size: int) -> None:
    """A ``.double()`` RetNet layer ran with float32-rounded decays (2e-9 relative off the float64
    recurrence); its outputs and gradients now match the loop to float64 precision, T = 63."""
    layer = decay_layer("retnet", chunk_size, d_model=24).double()
    x = torch.randn(2, 63, 24, generator=torch.Generator().manual_seed(2), dtype=torch.float64)  # [B, T, d]
    torch.testing.assert_close(layer.encoder.features(x)[3][0, 0, :, 0], exact_retnet_log_decay(2),
                               rtol=1e-14, atol=0)
    weights = torch.randn(2, 63, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    params = [p for p in layer.parameters() if p.requires_grad]

    def output_and_gradients(fn) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:  # noqa: ANN001
        xg = x.clone().requires_grad_(True)
        y = fn(xg)  # [B, T, d]
        return y, torch.autograd.grad((y * weights).sum(), [xg, *params])

    y_want, grads_want = output_and_gradients(lambda t: retnet_loop(layer, t))
    for fused in (False, True):
        y, grads = output_and_gradients(lambda t: layer(t, fused=fused))  # noqa: B023
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, y_want, rtol=1e-12, atol=1e-12)
        for g, g_want in zip(grads, grads_want):
            torch.testing.assert_close(g, g_want, rtol=1e-12, atol=1e-12)


def test_retnet_float32_layer_computes_in_float32() -> None:
    """The exact decays must not promote a float32 layer to float64: gates and outputs stay float32,
    rounded once from float64; and a layer moved between dtypes follows."""
    layer = decay_layer("retnet", 7, d_model=24)
    x = torch.randn(2, 9, 24, generator=torch.Generator().manual_seed(2))  # [B, T, d]
    gate = layer.encoder.features(x)[3]  # [B, T, H, 1]
    assert gate.dtype == torch.float32 and layer(x).dtype == torch.float32
    assert torch.equal(gate[0, 0, :, 0], exact_retnet_log_decay(2).float())
    layer.double().float()
    assert layer.encoder.features(x)[3].dtype == torch.float32
    assert layer.stream(2).feed(x).dtype == torch.float32


def test_retnet_checkpoints_keep_their_one_decay_entry() -> None:
    """The state dict holds ``encoder.log_decay`` as before (old checkpoints load strictly, old code
    loads new ones); a float64 layer loading a float32 checkpoint keeps float64-exact decays."""
    layer = decay_layer("retnet", 7, d_model=24)
    state = layer.state_dict()
    assert [name for name in state if "decay" in name] == ["encoder.log_decay"]
    fresh = decay_layer("retnet", 7, d_model=24).double()
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(1, 3, 24, dtype=torch.float64)
    torch.testing.assert_close(fresh.encoder.features(x)[3][0, 0, :, 0], exact_retnet_log_decay(2),
                               rtol=1e-14, atol=0)
