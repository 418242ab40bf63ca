"""The affine (associative) plugin against a naive token-by-token recurrence written here.

For every gate type (none, fixed and data-dependent scalar, diagonal, delta) the chunked layer must
equal ``S_t = E_t S_{t-1} + f_t``, ``o_t = S_tᵀ q_t``, projected by the head, in outputs and
gradients; streaming must equal the parallel forward and hold constant, correctly accounted bytes;
⊕ must be associative with the identity as a two-sided unit, and the fast scans equal the tree.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from psmsearch import states as S
from psmsearch.composer import PSMLayer, check_compatible, compatible_combinations
from psmsearch.config import ModelConfig
from psmsearch.errors import ConfigError, IncompatibleComponentsError, PSMSearchError
from psmsearch.kernels.chunkwise import chunk_gated_linear_attention
from psmsearch.model import build_model
from psmsearch.plugins.affine import AffineScalarAggregator
from psmsearch.registry import get_registry
from psmsearch.scan import prefix_scan

D_MODEL = 24
BATCH = 2
LENGTH = 37
SMALL = {"heads": 2, "key_dim": 8, "value_dim": 6}

# encoder -> (aggregator, head, state kind)
TRIPLES = {
    "linear_attention": ("affine_scalar", "linear_readout_scalar", "affine-scalar"),
    "retnet": ("affine_scalar", "linear_readout_scalar", "affine-scalar"),
    "mamba2": ("affine_scalar", "linear_readout_scalar", "affine-scalar"),
    "mlstm": ("affine_scalar_normalized", "linear_readout_normalized", "affine-scalar-normalized"),
    "gla": ("affine_diag", "linear_readout_diag", "affine-diag"),
    "mamba": ("affine_diag", "linear_readout_diag", "affine-diag"),
    "deltanet": ("affine_dense", "linear_readout_dense", "affine-dense"),
}
ENCODERS = list(TRIPLES)
AGGREGATORS = sorted({agg for agg, _, _ in TRIPLES.values()})
DECAY_ENCODERS = [e for e in ENCODERS if TRIPLES[e][2] != "affine-dense"]


def config(encoder: str, chunk_size: int, output_gate: bool = False, gate_before_norm: bool = False,
           encoder_params: dict[str, object] | None = None, **extra: object) -> ModelConfig:
    """A model config naming the affine triple of ``encoder`` with small widths."""
    aggregator, head, _ = TRIPLES[encoder]
    return ModelConfig(
        d_model=D_MODEL,
        chunk_size=chunk_size,
        encoder={"name": encoder, **SMALL, "output_gate": output_gate, **(encoder_params or {})},
        aggregator=aggregator,
        head={"name": head, "gate_before_norm": gate_before_norm},
        **extra,
    )


def make_layer(encoder: str, chunk_size: int, seed: int = 0, dtype: torch.dtype = torch.float32,
               output_gate: bool = False, gate_before_norm: bool = False) -> PSMLayer:
    torch.manual_seed(seed)
    return PSMLayer.from_config(config(encoder, chunk_size, output_gate, gate_before_norm)).to(dtype)


def inputs(length: int = LENGTH, seed: int = 1, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, length, D_MODEL, generator=generator, dtype=dtype)  # [B, T, d]


def naive_readout(layer: PSMLayer, x: torch.Tensor) -> torch.Tensor:
    """``o[B, T, H, dv]`` by the literal recurrence, one token at a time, from the layer's features
    (mLSTM's from its weights, by :func:`naive_mlstm_readout`)."""
    if layer.encoder.name == "mlstm":
        return naive_mlstm_readout(layer, x)
    q, k, v, gate, _ = layer.encoder.features(x)  # [B, T, H, dk], [B, T, H, dk], [B, T, H, dv], [B, T, H, ...]
    heads, dk, dv = layer.encoder.state_shape[1]
    dense = layer.encoder.state_kind == "affine-dense"
    state = x.new_zeros(x.shape[0], heads, dk, dv)  # [B, H, dk, dv]
    eye = torch.eye(dk, dtype=x.dtype)  # [dk, dk]
    outputs = []
    for t in range(x.shape[1]):
        outer = k[:, t, :, :, None] * v[:, t, :, None, :]  # [B, H, dk, dv]
        if dense:
            beta = gate[:, t, :, None, None]  # [B, H, 1, 1]
            transition = eye - beta * k[:, t, :, :, None] * k[:, t, :, None, :]  # [B, H, dk, dk]
            state = transition @ state + beta * outer  # [B, H, dk, dv]
        else:
            state = gate[:, t, :, :, None].exp() * state + outer  # [B, H, dk, dv]
        outputs.append(torch.einsum("bhk,bhkv->bhv", q[:, t], state))  # [B, H, dv]
    return torch.stack(outputs, dim=1)  # [B, T, H, dv]


def naive_mlstm_readout(layer: PSMLayer, x: torch.Tensor) -> torch.Tensor:
    """xLSTM's mLSTM with its matrix memory ``C`` and normaliser ``n`` kept apart, token by token.

    Everything comes from the encoder's weights, not its features (which fold ``n`` into a value
    column): ``[ĩ, f̃] = cap·tanh((W x + b) / cap)``, ``C_t = σ(f̃) C + e^ĩ k vᵀ``,
    ``n_t = σ(f̃) n + e^ĩ k``, ``h_t = Cᵀq / max(|nᵀq|, 1)`` with ``q`` scaled by ``d_k^-1/2``.
    """
    enc = layer.encoder
    heads, dk, dv = enc.heads, enc.key_dim, enc.value_dim
    q = enc.feature_map((x @ enc.q_proj.weight.T).unflatten(-1, (heads, dk))) / dk**0.5  # [B, T, H, dk]
    k = enc.feature_map((x @ enc.k_proj.weight.T).unflatten(-1, (heads, dk)))  # [B, T, H, dk]
    v = (x @ enc.v_proj.weight.T).unflatten(-1, (heads, dv))  # [B, T, H, dv]
    cap = enc.hparams["gate_soft_cap"]
    pre = cap * torch.tanh((x @ enc.gate_proj.weight.T + enc.gate_proj.bias).unflatten(-1, (heads, 2)) / cap)
    input_gate, forget_gate = pre[..., 0].exp(), torch.sigmoid(pre[..., 1])  # [B, T, H] each
    memory = x.new_zeros(x.shape[0], heads, dk, dv)  # [B, H, dk, dv]
    normalizer = x.new_zeros(x.shape[0], heads, dk)  # [B, H, dk]
    outputs = []
    for t in range(x.shape[1]):
        f_t, i_t = forget_gate[:, t, :, None], input_gate[:, t, :, None]  # [B, H, 1]
        memory = f_t[..., None] * memory + i_t[..., None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        normalizer = f_t * normalizer + i_t * k[:, t]
        numerator = torch.einsum("bhk,bhkv->bhv", q[:, t], memory)  # [B, H, dv]
        denominator = (q[:, t] * normalizer).sum(-1).abs().clamp(min=1.0)  # [B, H]
        outputs.append(numerator / denominator[..., None])
    return torch.stack(outputs, dim=1)  # [B, T, H, dv]


def naive_layer(layer: PSMLayer, x: torch.Tensor) -> torch.Tensor:
    """The naive readout, gated by ``swish(W_g x)`` where the encoder has a gate (after or before the
    norm, as the head says), normalised, projected."""
    o = naive_readout(layer, x)  # [B, T, H, dv]
    if not layer.encoder.hparams["output_gate"]:
        return layer.head.out(layer.head.norm(o).flatten(-2))  # [B, T, d]
    logits = layer.encoder.out_gate_proj(x).unflatten(-1, o.shape[-2:])  # [B, T, H, dv]
    swish = logits * torch.sigmoid(logits)  # swish(W x) = W x · σ(W x)
    if layer.head.hparams["gate_before_norm"]:
        return layer.head.out(layer.head.norm(o * swish).flatten(-2))  # [B, T, d]
    return layer.head.out((layer.head.norm(o) * swish).flatten(-2))  # [B, T, d]


def output_and_gradients(layer: PSMLayer, fn, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``fn(x)`` and the gradients of a fixed random projection of it w.r.t. ``x`` and every parameter."""
    x = x.clone().requires_grad_(True)
    y = fn(x)  # [B, T, d]
    weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)  # [B, T, d]
    params = [p for p in layer.parameters() if p.requires_grad]
    grads = torch.autograd.grad((y * weights).sum(), [x, *params], allow_unused=True)
    return y.detach(), [g if g is not None else torch.zeros_like(p) for g, p in zip(grads, [x, *params])]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rtol: float = 1e-4) -> None:
    scale = expected.abs().max().item() or 1.0
    diff = (actual - expected).abs().max().item()
    assert diff <= rtol * max(scale, 1.0), f"{what}: max diff {diff:.3g} (scale {scale:.3g})"


# --- registration and compatibility -----------------------------------------------------------


def test_registered_with_declared_state_kinds_and_associativity() -> None:
    registry = get_registry()
    assert not [f for f in registry.failures if "affine" in f.plugin], registry.failures
    for encoder, (aggregator, head, kind) in TRIPLES.items():
        assert registry.get("encoder", encoder).state_kind == kind
        assert registry.get("aggregator", aggregator).state_kind == kind
        assert registry.get("aggregator", aggregator).associative
        assert registry.get("head", head).state_kind == kind


def test_only_matching_triples_are_compatible() -> None:
    ours = set(ENCODERS) | set(AGGREGATORS) | {head for _, head, _ in TRIPLES.values()}
    combos = {c for c in compatible_combinations() if set(c) & ours}
    assert combos == {(e, a, h) for e, (a, h, _) in TRIPLES.items()}
    with pytest.raises(IncompatibleComponentsError, match="state_kind"):
        check_compatible(get_registry(), "gla", "affine_scalar", "linear_readout_scalar")
    # mLSTM's last value column is its normaliser: a head for plain [dk, dv] states would read it as a
    # value, and the normalising head would divide another encoder's last value by itself
    for triple in (("mlstm", "affine_scalar", "linear_readout_scalar"),
                   ("mlstm", "affine_scalar_normalized", "linear_readout_scalar"),
                   ("mamba2", "affine_scalar_normalized", "linear_readout_normalized")):
        with pytest.raises(IncompatibleComponentsError, match="affine-scalar-normalized"):
            check_compatible(get_registry(), *triple)


def test_hyperparameters_are_declared_and_validated() -> None:
    registry = get_registry()
    for encoder in ENCODERS:
        names = {hp.name for hp in registry.get("encoder", encoder).hyperparameters}
        assert {"heads", "key_dim", "value_dim", "feature_map"} <= names
    for encoder in ("mamba2", "mamba"):
        bad = config(encoder, 4).model_dump()
        bad["encoder"]["params"].update(dt_min=0.05, dt_max=0.01)
        with pytest.raises(ConfigError, match=f"encoder '{encoder}' hyperparameter 'dt_min': 0.05 is out of range"):
            PSMLayer.from_config(ModelConfig(**bad))


# --- gate semantics ---------------------------------------------------------------------------


def test_gates_have_their_documented_form() -> None:
    x = inputs(5)
    none = make_layer("linear_attention", 4).encoder.features(x)[3]
    assert torch.equal(none, torch.zeros_like(none))
    retnet = make_layer("retnet", 4).encoder
    expected = torch.log(1 - 2.0 ** -(5.0 + torch.arange(SMALL["heads"])))  # [H]
    torch.testing.assert_close(retnet.features(x)[3][0, 0, :, 0], expected)
    for name in ("mamba2", "mlstm", "gla", "mamba"):
        log_a = make_layer(name, 4).encoder.features(x)[3]
        assert bool((log_a < 0).all()), f"{name}: decays must lie in (0, 1)"
    for name in ("gla", "mamba"):
        diagonal_gate = make_layer(name, 4).encoder.features(x)[3]
        assert diagonal_gate.shape == (BATCH, 5, SMALL["heads"], SMALL["key_dim"]), name
    q, k, _, beta, no_gate = make_layer("deltanet", 4).encoder.features(x)
    assert no_gate.shape == (BATCH, 5, SMALL["heads"], 0), "output_gate off: an empty gate"
    torch.testing.assert_close(k.norm(dim=-1), torch.ones_like(k.norm(dim=-1)))
    assert bool(((beta > 0) & (beta < 1)).all())


def test_data_dependent_gates_follow_their_formulas_from_the_parameters() -> None:
    """The test above checked only the sign of Mamba2's and GLA's log-decays and the range of β, so a
    gate that ignored ``Δ``'s scaling of the key, ``A``, GLA's temperature or DeltaNet's
    ``negative_eigenvalues`` passed. Here every gate is recomputed from the module's weights:
    Mamba2 ``log a = -softplus(w·x + b) exp(A_log)`` and key ``Δ k``; mLSTM
    ``log f = logsigmoid(f̃)``, key ``e^ĩ k`` and a column of ones after the values; Mamba
    ``log α = -softplus(W₂ W₁ x + b) ⊙ exp(A_log)`` per key channel and key ``Δ ⊙ k``; GLA
    ``log α = logsigmoid(W₂ W₁ x + b) / τ``; DeltaNet ``β = sigmoid(w·x + b)``, doubled with
    ``negative_eigenvalues``."""
    x = inputs(5)  # [B, T, d]
    heads, dk = SMALL["heads"], SMALL["key_dim"]

    def linear(module: torch.nn.Linear, t: torch.Tensor) -> torch.Tensor:
        return t @ module.weight.T + (0 if module.bias is None else module.bias)

    mamba = make_layer("mamba2", 4).encoder
    _, k, _, log_a, _ = mamba.features(x)
    dt = torch.log1p(torch.exp(linear(mamba.dt_proj, x)))  # [B, T, H]: softplus
    raw_k = linear(mamba.k_proj, x).unflatten(-1, (heads, dk))  # [B, T, H, dk]
    torch.testing.assert_close(log_a[..., 0], -dt * mamba.a_log.exp())
    torch.testing.assert_close(k, raw_k * dt[..., None])
    mamba = PSMLayer.from_config(config("mamba", 4, encoder_params={"dt_rank": 3})).encoder
    with torch.no_grad():
        mamba.a_log.add_(torch.randn(heads, dk, generator=torch.Generator().manual_seed(2)))  # A differs per channel
    _, k, _, log_a, _ = mamba.features(x)
    dt = torch.log1p(torch.exp(linear(mamba.dt_proj[1], linear(mamba.dt_proj[0], x)))).unflatten(-1, (heads, dk))
    torch.testing.assert_close(log_a, -dt * mamba.a_log.exp())  # [B, T, H, dk]
    torch.testing.assert_close(k, linear(mamba.k_proj, x).unflatten(-1, (heads, dk)) * dt)
    temperature = 4.0
    gla = PSMLayer.from_config(config("gla", 4, encoder_params={"gate_temperature": temperature})).encoder
    logits = linear(gla.gate_proj[1], linear(gla.gate_proj[0], x)).unflatten(-1, (heads, dk))  # [B, T, H, dk]
    torch.testing.assert_close(gla.features(x)[3], torch.log(torch.sigmoid(logits)) / temperature)
    mlstm = PSMLayer.from_config(config("mlstm", 4, encoder_params={"gate_soft_cap": 6.0})).encoder
    _, k, v, log_f, _ = mlstm.features(x)
    pre = 6.0 * torch.tanh(linear(mlstm.gate_proj, x).unflatten(-1, (heads, 2)) / 6.0)  # [B, T, H, 2]
    torch.testing.assert_close(log_f[..., 0], torch.log(torch.sigmoid(pre[..., 1])))
    torch.testing.assert_close(k, linear(mlstm.k_proj, x).unflatten(-1, (heads, dk)) * pre[..., 0, None].exp())
    torch.testing.assert_close(v[..., -1], torch.ones_like(v[..., -1]), msg="mLSTM's normaliser column")
    for negative, factor in ((False, 1.0), (True, 2.0)):
        delta = PSMLayer.from_config(config("deltanet", 4, encoder_params={"negative_eigenvalues": negative})).encoder
        beta = delta.features(x)[3]  # [B, T, H]
        torch.testing.assert_close(beta, factor * torch.sigmoid(linear(delta.beta_proj, x)))


def test_mamba_starts_from_mambas_initialisation() -> None:
    """S4D-real ``A = 1..d_k`` in every head, initial steps ``softplus(b)`` inside ``[dt_min, dt_max]``
    (log-uniform, so not all at one end), ``W₂`` within ``±dt_rank^-1/2``; Mamba2's steps likewise."""
    heads, dk = SMALL["heads"], SMALL["key_dim"]
    dt_min, dt_max = 2e-3, 5e-2
    mamba = PSMLayer.from_config(config("mamba", 4, encoder_params={"dt_rank": 4, "dt_min": dt_min,
                                                                    "dt_max": dt_max})).encoder
    torch.testing.assert_close(mamba.a_log.exp(), torch.arange(1.0, dk + 1).expand(heads, dk))
    assert mamba.dt_proj[1].weight.abs().max().item() <= 4**-0.5
    mamba2 = PSMLayer.from_config(config("mamba2", 4, encoder_params={"dt_min": dt_min, "dt_max": dt_max})).encoder
    for name, bias in (("mamba", mamba.dt_proj[1].bias), ("mamba2", mamba2.dt_proj.bias)):
        steps = torch.nn.functional.softplus(bias.detach().double())  # [H*dk] or [H]
        assert bool(((steps >= dt_min * (1 - 1e-5)) & (steps <= dt_max * (1 + 1e-5))).all()), f"{name}: {steps}"
    spread = torch.nn.functional.softplus(mamba.dt_proj[1].bias.detach().double()).log()  # [H*dk]
    assert spread.max() - spread.min() > 0.5 * (torch.tensor(dt_max / dt_min).log()), "steps drawn log-uniformly"


# --- the layer against the naive recurrence ---------------------------------------------------


# Training paths: "generic" runs summaries, scan and readout one by one (fused=False); "fused" hands
# the decay triples' whole pass to chunk_gated_linear_attention (fused=True; its reference on the CPU).
PATHS = [(e, "generic") for e in ENCODERS] + [(e, "fused") for e in DECAY_ENCODERS]


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@pytest.mark.parametrize(("encoder", "path"), PATHS)
def test_layer_matches_naive_recurrence_outputs_and_gradients(encoder: str, path: str, chunk_size: int) -> None:
    layer = make_layer(encoder, chunk_size)
    x = inputs()
    y, grads = output_and_gradients(layer, lambda t: layer(t, fused=path == "fused"), x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    assert_close(y, y_ref, f"{encoder} {path} c={chunk_size} outputs")
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"{encoder} {path} c={chunk_size} gradient w.r.t. {name}")


@pytest.mark.parametrize("gate_before_norm", [False, True])
@pytest.mark.parametrize(("encoder", "path"), PATHS)
def test_output_gate_matches_naive_recurrence_outputs_and_gradients(encoder: str, path: str,
                                                                    gate_before_norm: bool) -> None:
    """``output_gate`` multiplies the readout by swish(W x), after the norm or before it, on both paths."""
    layer = make_layer(encoder, 7, output_gate=True, gate_before_norm=gate_before_norm)
    assert layer.encoder.out_gate_proj is not None and make_layer(encoder, 7).encoder.out_gate_proj is None
    x = inputs()
    y, grads = output_and_gradients(layer, lambda t: layer(t, fused=path == "fused"), x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    with torch.no_grad():
        ungated = layer.head.out(layer.head.norm(naive_readout(layer, x)).flatten(-2))  # [B, T, d]
        other_order = make_layer(encoder, 7, output_gate=True, gate_before_norm=not gate_before_norm)(x)
    assert (y - ungated).abs().max().item() > 1e-3, "the gate must change the output"
    assert (y - other_order).abs().max().item() > 1e-3, "the two gate positions must differ"
    assert_close(y, y_ref, f"{encoder} {path} gated outputs")
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    assert "encoder.out_gate_proj.weight" in names
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"{encoder} {path} gated gradient w.r.t. {name}")


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@pytest.mark.parametrize("path", ["generic", "fused", "streaming"])
def test_mlstm_normaliser_divides_where_it_exceeds_one(path: str, chunk_size: int) -> None:
    """At its initialisation mLSTM's ``|nᵀq|`` may stay below 1, where ``max(|nᵀq|, 1)`` divides by 1
    and a head that ignored ``n`` would pass the tests above. Input-gate biases of 3 (``i ≈ 20``)
    put ``|nᵀq|`` above 1 at most positions and below it at some: both branches of the max, outputs
    and gradients, against the recurrence with ``C`` and ``n`` kept apart. The head's RMSNorm is off:
    it divides each head's readout by its own scale, so it would cancel the normaliser's division."""
    torch.manual_seed(0)
    model = config("mlstm", chunk_size, output_gate=True).model_dump()
    model["head"]["params"]["norm"] = False
    layer = PSMLayer.from_config(ModelConfig(**model))
    with torch.no_grad():
        layer.encoder.gate_proj.bias.view(SMALL["heads"], 2)[:, 0].fill_(3.0)
    x = inputs()
    with torch.no_grad():
        q, k, v, log_f, _ = layer.encoder.features(x)  # v [B, T, H, dv + 1]
        normalizer = torch.zeros(BATCH, SMALL["heads"], SMALL["key_dim"])  # [B, H, dk]
        above = []
        for t in range(LENGTH):
            normalizer = log_f[:, t].exp() * normalizer + k[:, t]
            above.append((q[:, t] * normalizer).sum(-1).abs() > 1.0)  # [B, H]
        share = torch.stack(above).float().mean().item()
    assert 0.5 < share < 1.0, f"|nᵀq| > 1 at {share:.0%} of positions: both branches must occur"
    run = {
        "generic": lambda t: layer(t, fused=False),
        "fused": lambda t: layer(t, fused=True),
        "streaming": lambda t: layer.stream(BATCH).feed(t),
    }[path]
    y, grads = output_and_gradients(layer, run, x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    assert_close(y, y_ref, f"mlstm {path} c={chunk_size} outputs")
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"mlstm {path} c={chunk_size} gradient w.r.t. {name}")


def test_mlstm_gates_are_soft_capped() -> None:
    """Input-gate pre-activations of 1000 are capped at ``gate_soft_cap``: keys grow by at most
    ``e^cap`` and the layer stays finite (uncapped, ``e^1000`` is inf in float32)."""
    layer = PSMLayer.from_config(config("mlstm", 4, encoder_params={"gate_soft_cap": 15.0}))
    with torch.no_grad():
        layer.encoder.gate_proj.bias.view(SMALL["heads"], 2)[:, 0].fill_(1000.0)
        x = inputs()
        input_pre, forget_pre = layer.encoder.gates(x)  # [B, T, H] each
        assert input_pre.max().item() <= 15.0 and forget_pre.abs().max().item() <= 15.0
        assert input_pre.max().item() > 14.9
        y = layer(x)
    assert bool(torch.isfinite(y).all())
    assert_close(y, naive_layer(layer, x), "mlstm at the cap")


@pytest.mark.parametrize("path", ["generic", "fused"])
def test_strong_decays_stay_finite_and_exact(path: str) -> None:
    """Per-token log-decays near -100 (cumulative -1600 per chunk) must not overflow anywhere."""
    layers = {name: make_layer(name, 16) for name in ("mamba2", "gla")}
    with torch.no_grad():
        layers["mamba2"].encoder.a_log.fill_(torch.log(torch.tensor(1e3)).item())
        layers["gla"].encoder.gate_proj[1].bias.fill_(-1600.0)  # logsigmoid(-1600) / 16 = -100
    x = inputs()
    for name, layer in layers.items():
        y, grads = output_and_gradients(layer, lambda t: layer(t, fused=path == "fused"), x)
        y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
        assert all(bool(torch.isfinite(g).all()) for g in [y, *grads]), f"{name}: non-finite output or gradient"
        assert_close(y, y_ref, f"{name} {path} strong decay outputs")
        for g, g_ref in zip(grads, grads_ref):
            assert_close(g, g_ref, f"{name} {path} strong decay gradients")


@pytest.mark.parametrize("path", ["generic", "tree", "fused", "streaming"])
def test_gates_of_exactly_zero_and_one_match_naive_recurrence(path: str) -> None:
    """A decay of exactly 0 (log-decay ``-inf``: a hard reset) gave NaN on every path but the fused
    kernel's, from ``-inf - (-inf)`` in the cumulative log-decays; a decay of exactly 1 is plain
    linear attention. Outputs and gradients must equal the token loop's and be finite."""
    layer = make_layer("gla", 7)
    with torch.no_grad():
        layer.encoder.gate_proj[1].bias[0] = float("-inf")  # head 0, key channel 0: logsigmoid(-inf) = -inf
        layer.encoder.gate_proj[1].bias[1] = float("inf")  # head 0, key channel 1: logsigmoid(inf) = 0
    run = {
        "generic": lambda t: layer(t, fused=False),
        "tree": lambda t: layer(t, scan_mode="tree"),
        "fused": lambda t: layer(t, fused=True),
        "streaming": lambda t: layer.stream(BATCH).feed(t),
    }[path]
    x = inputs()
    y, grads = output_and_gradients(layer, run, x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: naive_layer(layer, t), x)
    assert all(bool(torch.isfinite(g).all()) for g in [y, *grads]), f"{path}: non-finite output or gradient"
    assert_close(y, y_ref, f"{path} zero/one gate outputs")
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"{path} zero/one gate gradient w.r.t. {name}")


# --- the fused training path ------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 16])
@pytest.mark.parametrize("encoder", DECAY_ENCODERS)
def test_fused_path_equals_generic_in_float64(encoder: str, chunk_size: int) -> None:
    layer = make_layer(encoder, chunk_size, dtype=torch.float64)
    x = inputs(dtype=torch.float64)
    y, grads = output_and_gradients(layer, lambda t: layer(t, fused=True), x)
    y_ref, grads_ref = output_and_gradients(layer, lambda t: layer(t, fused=False), x)
    assert_close(y, y_ref, f"{encoder} c={chunk_size} fused outputs", rtol=1e-10)
    names = ["x", *(n for n, p in layer.named_parameters() if p.requires_grad)]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert_close(g, g_ref, f"{encoder} c={chunk_size} fused gradient w.r.t. {name}", rtol=1e-10)


@pytest.mark.parametrize("encoder", DECAY_ENCODERS)
def test_default_path_on_the_cpu_is_the_generic_one(encoder: str) -> None:
    """The fused reference measured no faster on the CPU, so ``fused=None`` declines it there."""
    layer = make_layer(encoder, 16)
    f = layer.encoder.features(inputs(32).view(BATCH, 2, 16, D_MODEL))  # [B, N, c, ...]
    assert layer.head.fused_forward(layer.encoder, layer.aggregator, f) is None
    fused = layer.head.fused_forward(layer.encoder, layer.aggregator, f, required=True)  # [B, N, c, d]
    assert fused is not None and fused.shape == (BATCH, 2, 16, D_MODEL)


def test_triton_decision_never_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    """(Chunk sizes and dtypes Triton cannot take are tested where it can run: interpret_triton_cases.py.)"""
    from psmsearch.kernels import _dispatch
    from psmsearch.kernels.chunkwise import default_backend_is_triton

    q = torch.zeros(1, 2, 64, 8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.delenv(_dispatch.ENV_VAR, raising=False)
    assert not default_backend_is_triton(q, 16), "CPU tensors without a request run the reference"
    for requested in ("numba", "bogus", "reference"):
        monkeypatch.setenv(_dispatch.ENV_VAR, requested)
        assert not default_backend_is_triton(q, 16), requested
    monkeypatch.setenv(_dispatch.ENV_VAR, "triton")
    assert not _dispatch.interpret_enabled()
    assert not default_backend_is_triton(q, 16), "Triton on CPU tensors needs the interpreter: False, no error"


class _ClippedScalarAggregator(AffineScalarAggregator):
    """A plugin's variant of ⊕ that clips the memory: the fused kernel must not replace it."""

    name = "affine_scalar_clipped"

    def forward(self, older, newer):  # noqa: ANN001, ANN201
        log_e, memory = super().forward(older, newer)
        return log_e, memory.clamp(-0.05, 0.05)

    def scan(self, states):  # noqa: ANN001, ANN201
        return None


def test_fused_path_is_refused_for_components_it_does_not_compute() -> None:
    layer = make_layer("mamba2", 4)
    x = inputs()
    clipped = PSMLayer(layer.encoder, _ClippedScalarAggregator(layer.aggregator.context), layer.head, 4)
    f = clipped.encoder.features(x[:, :8].reshape(BATCH, 2, 4, D_MODEL))  # [B, N, c, ...]
    assert clipped.head.fused_forward(clipped.encoder, clipped.aggregator, f, required=True) is None
    with pytest.raises(PSMSearchError, match="head 'linear_readout_scalar' has no fused training path for "
                                             "encoder 'mamba2' and aggregator 'affine_scalar_clipped'"):
        clipped(x, fused=True)
    with torch.no_grad():
        assert not torch.allclose(clipped(x), layer(x)), "the clipped aggregator must change the output"
    with pytest.raises(ValueError, match="scan_mode must be 'auto'"):
        layer(x, scan_mode="tree", fused=True)


@pytest.mark.parametrize("requested", ["numba", "reference"])
def test_required_fused_path_runs_the_reference_where_the_kernel_lacks_the_backend_asked_for(
        requested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``PSMSEARCH_KERNEL_BACKEND=numba`` is a valid CPU setting; the chunkwise kernel has no numba."""
    monkeypatch.setenv("PSMSEARCH_KERNEL_BACKEND", requested)
    layer = make_layer("gla", 16)
    with torch.no_grad():
        assert_close(layer(inputs(), fused=True), layer(inputs(), fused=False), f"{requested} fused vs generic")


@pytest.mark.parametrize("requested", ["bogus", "Tritonn"])
def test_required_fused_path_reports_an_unknown_backend_name(requested: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelt ``PSMSEARCH_KERNEL_BACKEND`` was silently replaced by the reference on ``fused=True``
    (the generic path reports it); both must name the variable and the allowed values."""
    monkeypatch.setenv("PSMSEARCH_KERNEL_BACKEND", requested)
    layer = make_layer("gla", 16)
    message = rf"PSMSEARCH_KERNEL_BACKEND='{requested}': unknown kernel backend; expected one of \('triton', "
    for fused in (True, False):
        with torch.no_grad(), pytest.raises(ValueError, match=message):
            layer(inputs(), fused=fused)


@pytest.mark.parametrize(("kwargs", "expected_calls"), [
    ({}, [False]),
    ({"fused": True}, [True]),
    ({"fused": False}, []),
    ({"scan_mode": "tree"}, []),
    ({"scan_mode": "sequential"}, []),
])
def test_layer_asks_the_head_for_the_fused_path_only_where_it_may(kwargs: dict, expected_calls: list) -> None:
    """``fused=None`` asks with ``required=False`` (auto scan only), ``True`` with ``required=True``."""
    layer = make_layer("gla", 4)
    calls = []
    offer = layer.head.fused_forward

    def recording(encoder, aggregator, f, *, required=False):  # noqa: ANN001, ANN202
        calls.append(required)
        return offer(encoder, aggregator, f, required=required)

    layer.head.fused_forward = recording
    with torch.no_grad():
        y = layer(inputs(), **kwargs)
        assert_close(y, make_layer("gla", 4)(inputs(), fused=False), f"{kwargs}")
    assert calls == expected_calls


def _passthrough(method: str):  # noqa: ANN202
    """An override of ``method`` that only calls the parent's: same results, a different function."""
    def override(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        return getattr(super(type(self), self), method)(*args, **kwargs)

    return override


@pytest.mark.parametrize(("component", "method"), [
    ("encoder", "summarize"), ("aggregator", "forward"), ("aggregator", "scan"),
    ("aggregator", "initial_state"), ("head", "readout"), ("head", "forward"),
])
def test_any_override_of_what_the_kernel_replaces_takes_the_generic_path(component: str, method: str) -> None:
    """The kernel computes the built-in formulas; a subclass that overrides one of them is not fused."""
    layer = make_layer("gla", 4)
    part = getattr(layer, component)
    original = type(part).readout if method == "readout" else None
    override = staticmethod(lambda memory, f: original(memory, f)) if original else _passthrough(method)
    part.__class__ = type("Variant", (type(part),), {method: override})
    f = layer.encoder.features(inputs(8).view(BATCH, 2, 4, D_MODEL))  # [B, N, c, ...]
    assert layer.head.fused_forward(layer.encoder, layer.aggregator, f, required=True) is None
    with torch.no_grad():
        assert_close(layer(inputs()), make_layer("gla", 4)(inputs()), f"{component}.{method} variant, generic path")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)")
@pytest.mark.parametrize("encoder", ["mamba2", "gla"])
def test_decay_layer_trains_through_triton_on_cuda(encoder: str) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))
    from triton_kernel_checks import check_decay_layer, check_decay_layer_other_chunk, check_triton_decision

    check_decay_layer("cuda", encoder, chunk_size=64, steps=200)
    check_decay_layer_other_chunk("cuda", encoder)
    check_triton_decision("cuda")


@pytest.mark.parametrize("encoder", DECAY_ENCODERS)
def test_decay_readout_matches_chunkwise_kernel(encoder: str) -> None:
    layer = make_layer(encoder, 8)
    x = inputs()
    with torch.no_grad():
        q, k, v, log_a, out_gate = layer.encoder.features(x)  # [B, T, H, dk], ..., [B, T, H, 1|dk], [B, T, H, 0]
        gate = log_a.squeeze(-1) if log_a.shape[-1] == 1 else log_a
        o, _ = chunk_gated_linear_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), gate.transpose(1, 2), chunk_size=16, scale=1.0
        )  # [B, H, T, dv]
        want = layer.head.project(o.transpose(1, 2), out_gate)  # [B, T, d]
        assert_close(layer(x), want, f"{encoder} vs chunk_gated_linear_attention")


@pytest.mark.parametrize("encoder", ENCODERS)
def test_scan_modes_agree_in_the_layer(encoder: str) -> None:
    layer = make_layer(encoder, 3)
    x = inputs()
    with torch.no_grad():
        assert_close(layer(x, scan_mode="auto"), layer(x, scan_mode="tree"), f"{encoder} auto vs tree")


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("output_gate", [False, True])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_streaming_equals_parallel(encoder: str, output_gate: bool) -> None:
    layer = make_layer(encoder, 7, output_gate=output_gate)
    x = inputs()
    with torch.no_grad():
        parallel = layer(x)  # [B, T, d]
        stream = layer.stream(BATCH)
        stepped = torch.stack([stream.step(x[:, t]) for t in range(LENGTH)], dim=1)  # [B, T, d]
        fed = layer.stream(BATCH).feed(x)  # [B, T, d]
    assert_close(stepped, parallel, f"{encoder} token-by-token streaming")
    assert_close(fed, parallel, f"{encoder} chunk-wise streaming")


@pytest.mark.parametrize("output_gate", [False, True])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_streaming_state_bytes_constant_and_accounted(encoder: str, output_gate: bool) -> None:
    chunk_size = 16
    layer = make_layer(encoder, chunk_size, output_gate=output_gate)
    stream = layer.stream(BATCH)
    measured = []
    with torch.no_grad():
        # 1, 3, 7 and 15 chunks: where a non-associative binary counter holds 1, 2, 3 and 4 roots
        for total in (16, 48, 112, 240):
            stream.feed(inputs(total - stream.tokens_seen, seed=total))
            assert stream.state_nbytes() == stream.expected_nbytes(), f"{encoder} after {total} tokens"
            assert stream.scan.num_roots == 1, f"{encoder} after {total} tokens"
            measured.append(stream.state_nbytes())
    expected = layer.encoder.state_nbytes(BATCH)
    assert measured == [expected] * 4, f"{encoder}: retained bytes {measured}, one state is {expected}"


# --- the aggregators --------------------------------------------------------------------------


def random_states(encoder: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arbitrary float64 states ``[B, n, ...]`` of the encoder's kind (not only reachable ones)."""
    layer = make_layer(encoder, 4)
    generator = torch.Generator().manual_seed(seed)
    transition, memory = layer.encoder.state_shape
    e = torch.randn(BATCH, n, *transition, generator=generator, dtype=torch.float64)  # [B, n, ...]
    if TRIPLES[encoder][2] != "affine-dense":
        e = -e.abs()  # log-decays
    s = torch.randn(BATCH, n, *memory, generator=generator, dtype=torch.float64)  # [B, n, H, dk, dv]
    return e, s


def max_diff(a: S.State, b: S.State) -> float:
    return max((x - y).abs().max().item() for x, y in zip(S.leaves(a), S.leaves(b)))


@pytest.mark.parametrize("encoder", ["mamba2", "gla", "deltanet"])
def test_aggregator_is_a_monoid_in_float64(encoder: str) -> None:
    agg = make_layer(encoder, 4, dtype=torch.float64).aggregator
    x, y, z = (random_states(encoder, 3, seed) for seed in (1, 2, 3))
    assert max_diff(agg(agg(x, y), z), agg(x, agg(y, z))) < 1e-10
    identity = agg.initial_state((BATCH, 3))
    assert max_diff(agg(identity, x), x) == 0.0
    assert max_diff(agg(x, identity), x) == 0.0


@pytest.mark.parametrize("n_chunks", [1, 2, 5, 13, 100])
@pytest.mark.parametrize("encoder", ["mamba2", "gla"])
def test_fast_scan_equals_tree_outputs_and_gradients(encoder: str, n_chunks: int) -> None:
    agg = make_layer(encoder, 4, dtype=torch.float64).aggregator
    states = tuple(t.requires_grad_(True) for t in random_states(encoder, n_chunks, seed=n_chunks))
    fast = agg.scan(states)
    tree = prefix_scan(agg, states, mode="tree")
    assert max_diff(fast, tree) < 1e-10
    if n_chunks == 1:
        return  # the only prefix is the constant zero state
    weights = [torch.randn_like(t) for t in S.leaves(tree)]

    def grads(prefixes: S.State) -> tuple[torch.Tensor, ...]:
        loss = sum((p * w).sum() for p, w in zip(S.leaves(prefixes), weights))
        return torch.autograd.grad(loss, states)

    for g_fast, g_tree in zip(grads(fast), grads(tree)):
        assert (g_fast - g_tree).abs().max().item() < 1e-10


def test_dense_aggregator_uses_the_generic_tree() -> None:
    agg = make_layer("deltanet", 4).aggregator
    assert agg.scan(random_states("deltanet", 4, seed=0)) is None


@pytest.mark.parametrize("encoder", ENCODERS)
def test_states_are_compact(encoder: str) -> None:
    """Summaries and ⊕ results own exactly their bytes (no view pinning a larger buffer)."""
    layer = make_layer(encoder, 5)
    with torch.no_grad():
        chunk = layer.encoder.summarize(layer.encoder.features(inputs(5)))  # [B, ...]
        combined = layer.aggregator(chunk, chunk)
    for state in (chunk, combined):
        assert S.retained_nbytes([state]) == S.nbytes(state) == layer.encoder.state_nbytes(BATCH)


# --- whole language models --------------------------------------------------------------------


@pytest.mark.parametrize("encoder", ENCODERS)
def test_language_model_streams_like_parallel(encoder: str) -> None:
    torch.manual_seed(0)
    model = build_model(config(encoder, 4, n_layers=2), vocab_size=11).eval()
    tokens = torch.randint(0, 11, (BATCH, 13), generator=torch.Generator().manual_seed(3))  # [B, T]
    with torch.no_grad():
        parallel = model(tokens)  # [B, T, V]
        stream = model.stream(BATCH)
        stepped = torch.stack([stream.step(tokens[:, t]) for t in range(tokens.shape[1])], dim=1)  # [B, T, V]
    assert_close(stepped, parallel, f"{encoder} language model streaming")
    assert stream.state_nbytes() == stream.expected_nbytes()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("encoder", ENCODERS)
def test_16_bit_layer_runs_parallel_and_streaming_close_to_float64(encoder: str, dtype: torch.dtype) -> None:
    """A bf16 or fp16 layer (DeltaNet's triangular solve has no 16-bit kernel, so it runs in float32
    inside) computes, parallel and streaming, what the float64 layer does, within 16-bit precision.
    T = 19 at c = 4 pads the last chunk: in float16 DeltaNet's normalised zero keys were NaN."""
    x = inputs(length=19).to(dtype)
    layer = make_layer(encoder, 4, dtype=dtype)
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double())  # [B, T, d]: the same bf16 weights and inputs, float64 arithmetic
        parallel = layer(x)
        streamed = layer.stream(BATCH).feed(x)
    scale = want.abs().max().item()
    for name, got in (("parallel", parallel), ("streaming", streamed)):
        assert got.dtype == dtype, name
        diff = (got.double() - want).abs().max().item()
        assert diff <= 0.05 * scale, f"{name}: bf16 differs from float64 by {diff:.3g} (scale {scale:.3g})"
