"""PSM layers and language models: streaming equals parallel for every compatible combination."""

from __future__ import annotations

import pytest
import torch

from psmsearch.composer import PSMLayer, compatible_combinations, validate_model_config
from psmsearch.config import ModelConfig
from psmsearch.errors import ConfigError
from psmsearch.model import build_model
from psmsearch.plugins.token_state import AttentionHead, MLPAggregator, PoolEncoder
from psmsearch.registry import get_registry

COMBINATIONS = compatible_combinations(get_registry())


def test_every_registered_component_is_in_some_combination() -> None:
    registry = get_registry()
    used = {("encoder", e) for e, _, _ in COMBINATIONS} | {("aggregator", a) for _, a, _ in COMBINATIONS} | {("head", h) for _, _, h in COMBINATIONS}
    registered = {(i.kind, i.name) for i in registry.all() if i.kind != "task"}
    assert registered == used


@pytest.mark.parametrize("chunk_size", [1, 3, 8])
@pytest.mark.parametrize("encoder, aggregator, head", COMBINATIONS)
def test_streaming_logits_equal_parallel_logits(encoder: str, aggregator: str, head: str, chunk_size: int) -> None:
    torch.manual_seed(chunk_size)
    config = ModelConfig(d_model=32, n_layers=2, chunk_size=chunk_size, encoder=encoder, aggregator=aggregator, head=head)
    model = build_model(config, vocab_size=13).eval()
    length = 2 * chunk_size + 5 if chunk_size > 1 else 11  # never a multiple of c (for c > 1)
    tokens = torch.randint(0, 13, (2, length))
    with torch.no_grad():
        parallel = model(tokens)  # [B, T, V]
    stream = model.stream(2)
    streamed = torch.stack([stream.step(tokens[:, t]) for t in range(length)], dim=1)
    assert (parallel - streamed).abs().max().item() < 1e-4
    chunked = model.stream(2).feed(tokens)
    assert (parallel - chunked).abs().max().item() < 1e-4
    assert stream.state_nbytes() == stream.expected_nbytes()


def test_tree_and_sequential_scan_modes_agree_in_a_layer() -> None:
    torch.manual_seed(0)
    layer = PSMLayer.from_config(ModelConfig(d_model=16, chunk_size=2, aggregator={"name": "attention", "heads": 2}, head={"name": "attention", "heads": 2}))
    x = torch.randn(2, 9, 16)
    assert torch.allclose(layer(x, scan_mode="tree"), layer(x, scan_mode="sequential"), atol=1e-6)


def test_feeding_no_tokens_returns_an_empty_output_and_keeps_the_state() -> None:
    layer = PSMLayer.from_config(ModelConfig(d_model=16, chunk_size=2, head={"name": "attention", "heads": 2}, aggregator={"name": "attention", "heads": 2}))
    stream = layer.stream(3)
    assert stream.feed(torch.zeros(3, 0, 16)).shape == (3, 0, 16)
    assert stream.tokens_seen == 0 and stream.scan.count == 0


def test_parallel_pass_on_no_tokens_returns_an_empty_output_as_streaming_does() -> None:
    """There is no chunk to scan; the parallel pass raised 'prefix_scan needs at least one chunk'."""
    config = ModelConfig(d_model=16, chunk_size=2, head={"name": "attention", "heads": 2}, aggregator={"name": "attention", "heads": 2})
    layer = PSMLayer.from_config(config)
    x = torch.zeros(3, 0, 16, dtype=torch.float64)
    assert layer.double()(x).shape == (3, 0, 16) and layer(x).dtype == torch.float64
    assert build_model(config, vocab_size=5)(torch.zeros(3, 0, dtype=torch.long)).shape == (3, 0, 5)


def test_gradients_of_parallel_path_match_streaming_path() -> None:
    torch.manual_seed(1)
    layer = PSMLayer.from_config(ModelConfig(d_model=16, chunk_size=3, encoder="pool", aggregator="mlp", head={"name": "attention", "heads": 2}))
    x = torch.randn(1, 10, 16, requires_grad=True)
    (g_parallel,) = torch.autograd.grad(layer(x).square().sum(), x)
    stream = layer.stream(1)
    streamed = torch.stack([stream.step(x[:, t]) for t in range(10)], dim=1)
    (g_stream,) = torch.autograd.grad(streamed.square().sum(), x)
    assert torch.allclose(g_parallel, g_stream, atol=1e-5)


class _UnitDirectionPool(PoolEncoder):
    """Pool encoder on unit-length tokens: NaN on an all-zero token, as a key normalised without an epsilon.

    It ``view``s its input, as components may: the layer hands it contiguous tensors.
    """

    def features(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])  # [*, d]
        return super().features((flat / flat.norm(dim=-1, keepdim=True)).view(x.shape), offset)  # [*, c', d]


class _ViewingHead(AttentionHead):
    """The attention head, ``view``ing the prefix it is given (which must therefore be contiguous)."""

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return super().forward(prefix.view(-1, *prefix.shape[-2:]).view(prefix.shape), f)  # [*, c', d]


@pytest.mark.parametrize("length", [9, 10, 3])
def test_a_partial_last_chunk_is_never_padded(length: int) -> None:
    """No zero padding reaches a component: values and gradients equal streaming's and stay finite.

    With the last chunk padded by zero tokens, this encoder's features were NaN there, its summary
    entered the upsweep pairs, and every parameter gradient was NaN (the outputs were right).
    """
    torch.manual_seed(3)
    built = PSMLayer.from_config(ModelConfig(d_model=8, chunk_size=4, encoder="pool", aggregator="mlp",
                                             head={"name": "attention", "heads": 2}))
    head = _ViewingHead(built.head.context, heads=2)
    head.load_state_dict(built.head.state_dict())
    layer = PSMLayer(_UnitDirectionPool(built.encoder.context), built.aggregator, head, 4).double()
    x = torch.randn(2, length, 8, dtype=torch.float64)
    weights = torch.randn(2, length, 8, dtype=torch.float64)

    def loss_and_grads(run) -> tuple[torch.Tensor, list[torch.Tensor]]:
        y = run()  # [B, T, d]
        grads = torch.autograd.grad((y * weights).sum(), list(layer.parameters()), allow_unused=True)
        return y, [torch.zeros_like(p) if g is None else g for p, g in zip(layer.parameters(), grads)]

    parallel, parallel_grads = loss_and_grads(lambda: layer(x))
    stream = layer.stream(2)
    streamed, stream_grads = loss_and_grads(lambda: torch.stack([stream.step(x[:, t]) for t in range(length)], 1))
    assert torch.isfinite(parallel).all() and all(torch.isfinite(g).all() for g in parallel_grads)
    assert torch.allclose(parallel, streamed, atol=1e-12)
    for g_parallel, g_stream in zip(parallel_grads, stream_grads):
        assert torch.allclose(g_parallel, g_stream, atol=1e-10)
    for mode in ("tree", "sequential"):
        assert torch.allclose(layer(x, scan_mode=mode), streamed, atol=1e-12)


@pytest.mark.parametrize(("encoder", "aggregator", "head"), [
    ("pool", "mlp", {"name": "attention", "heads": 2}),
    ("deltanet", "affine_dense", "linear_readout_dense"),  # fused by default
])
@pytest.mark.parametrize("length", [3, 8, 9])
def test_an_empty_batch_gives_an_empty_output(encoder: str, aggregator: str, head: object, length: int) -> None:
    """A data-parallel rank gets no rows when the batch is smaller than the number of processes;
    inferring a reshape's -1 from 0 elements failed there."""
    config = ModelConfig(d_model=16, n_layers=1, chunk_size=4, encoder=encoder, aggregator=aggregator, head=head)
    model = build_model(config, vocab_size=5)
    assert model(torch.zeros(0, length, dtype=torch.long)).shape == (0, length, 5)


def _unit_direction(encoder_class: type) -> type:
    """``encoder_class`` on unit-length tokens: its features are NaN on an all-zero token."""

    class UnitDirection(encoder_class):
        def features(self, x: torch.Tensor, offset: int = 0):  # noqa: ANN201
            return super().features(x / x.norm(dim=-1, keepdim=True), offset)

    return UnitDirection


@pytest.mark.parametrize(("encoder", "aggregator", "head"), [
    ("deltanet", "affine_dense", "linear_readout_dense"),
    ("gla", "affine_diag", "linear_readout_diag"),
])
def test_a_fused_pass_over_a_partial_chunk_sees_no_padding_token(encoder: str, aggregator: str, head: str) -> None:
    """The fused kernels need whole chunks; they got the features of zero tokens, NaN for this encoder,
    which reached a real output through the masked intra-chunk products (0 * NaN)."""
    from psmsearch.registry import get_registry

    torch.manual_seed(0)
    built = PSMLayer.from_config(ModelConfig(d_model=16, chunk_size=4, encoder=encoder, aggregator=aggregator, head=head)).double()
    unit = _unit_direction(get_registry().get("encoder", encoder).cls)(built.encoder.context).double()
    unit.load_state_dict(built.encoder.state_dict())
    layer = PSMLayer(unit, built.aggregator, built.head, 4)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    stream = layer.stream(2)
    streamed = torch.stack([stream.step(x[:, t]) for t in range(5)], dim=1)  # [B, T, d]
    for fused in (None, True):
        y = layer(x, fused=fused)
        grads = torch.autograd.grad(y.square().sum(), [p for p in layer.parameters() if p.requires_grad], allow_unused=True)
        assert torch.allclose(y, streamed, atol=1e-10), fused
        assert all(torch.isfinite(g).all() for g in grads if g is not None), fused


def test_incompatible_state_kinds_are_refused_with_a_clear_message() -> None:
    from psmsearch.registry import load_registry
    from pathlib import Path

    class_file = Path(__file__).parent / "fixtures" / "other_state_kind.py"
    registry = load_registry(extra_plugins=[str(class_file)])
    config = ModelConfig(encoder="embed", aggregator="sum_vec", head="attention")
    with pytest.raises(ConfigError, match=r"aggregator 'sum_vec' has state_kind 'vector'.*must share one state_kind"):
        validate_model_config(config, registry)


def test_building_a_layer_of_incompatible_components_is_refused_before_any_is_built() -> None:
    """The composer's own check (DESIGN.md §3), for code that builds a model without validating its
    config first: an affine aggregator between token-state components failed inside the aggregator's
    constructor instead ("'int' object is not iterable"), naming nothing."""
    from psmsearch.errors import IncompatibleComponentsError

    config = ModelConfig(d_model=16, encoder="embed", aggregator="affine_diag", head="attention")
    with pytest.raises(IncompatibleComponentsError, match=(
            r"^incompatible components: encoder 'embed' has state_kind 'tokens', aggregator 'affine_diag' has "
            r"state_kind 'affine-diag', head 'attention' has state_kind 'tokens'; encoder, aggregator and head "
            r"must share one state_kind$")):
        build_model(config, 5)


def test_unknown_hyperparameter_and_bad_value_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"model.aggregator.depth: aggregator 'attention' has no hyperparameter 'depth'; allowed: heads, layers, mlp_ratio\.$") as unknown:
        validate_model_config(ModelConfig(aggregator={"name": "attention", "depth": 3}))
    assert unknown.value.field == "model.aggregator.depth"
    with pytest.raises(ConfigError, match=r"has no hyperparameter 'layer'; allowed: heads, layers, mlp_ratio\. Did you mean 'layers'\?$"):
        validate_model_config(ModelConfig(aggregator={"name": "attention", "layer": 3}))  # a typo gets a suggestion
    with pytest.raises(ConfigError, match=r"hyperparameter 'layers': 9 is out of range; expected int in \[1, 6\]") as bad:
        validate_model_config(ModelConfig(aggregator={"name": "attention", "layers": 9}))
    assert bad.value.field == "model.aggregator.layers"


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("encoder, aggregator, head", COMBINATIONS)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func set-up
def test_torch_func_per_sample_gradients_equal_backward(encoder: str, aggregator: str, head: str,
                                                        chunk_size: int) -> None:
    """``torch.func`` works on every model: ``vmap(grad(loss))`` gives each sequence's gradient, equal to
    ``loss.backward()`` on that sequence alone. At c = 1 the 70 chunks take the affine aggregators'
    compiled scan (numba from 64 chunks on), at c = 4 the reference."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=1, chunk_size=chunk_size, encoder=encoder, aggregator=aggregator,
                         head=head)
    model = build_model(config, vocab_size=13).eval()
    tokens = torch.randint(0, 13, (3, 70))                                    # [N, T]: three sequences

    def loss(params: dict[str, torch.Tensor], sequence: torch.Tensor) -> torch.Tensor:
        logits = functional_call(model, params, (sequence[None, :-1],))      # [1, T-1, V]
        return torch.nn.functional.cross_entropy(logits[0], sequence[1:])

    params = {name: p.detach() for name, p in model.named_parameters()}
    per_sequence = vmap(grad(loss), in_dims=(None, 0))(params, tokens)
    for i in range(tokens.shape[0]):
        model.zero_grad()
        loss(dict(model.named_parameters()), tokens[i]).backward()
        for name, p in model.named_parameters():
            torch.testing.assert_close(per_sequence[name][i], p.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m, name=name: f"{name}, sequence {i}: {m}")


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize("encoder, aggregator, head", COMBINATIONS)
@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # torch.func set-up
def test_hessian_vector_products_equal_finite_differences(encoder: str, aggregator: str, head: str,
                                                          chunk_size: int) -> None:
    """Second derivatives work on every model (``jvp`` of ``grad``, as in sharpness or Newton-type
    methods): the Hessian-vector product equals a central difference of gradients, in float64. The
    transforms run one after another on the same model, so nothing cached in one may leak into the next."""
    from torch.func import functional_call, grad, jvp

    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=1, chunk_size=chunk_size, encoder=encoder, aggregator=aggregator,
                         head=head)
    model = build_model(config, vocab_size=13).double().eval()
    tokens = torch.randint(0, 13, (2, 70))

    def loss(params: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, params, (tokens[:, :-1],))           # [N, T-1, V]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, 13), tokens[:, 1:].reshape(-1))

    params = {name: p.detach() for name, p in model.named_parameters()}
    direction = {name: torch.randn_like(p) for name, p in params.items()}
    _, product = jvp(grad(loss), (params,), (direction,))
    step = 1e-6
    ahead = grad(loss)({name: p + step * direction[name] for name, p in params.items()})
    behind = grad(loss)({name: p - step * direction[name] for name, p in params.items()})
    for name in params:
        difference = (ahead[name] - behind[name]) / (2 * step)
        scale = difference.abs().max().item() or 1.0
        torch.testing.assert_close(product[name] / scale, difference / scale, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("encoder, aggregator, head", COMBINATIONS)
def test_exported_model_equals_eager(encoder: str, aggregator: str, head: str) -> None:
    """torch.export records every model (the scan kernels trace as PyTorch ops) and the exported program
    gives the eager model's logits on new tokens of the traced length."""
    torch.manual_seed(0)
    config = ModelConfig(d_model=32, n_layers=1, chunk_size=4, encoder=encoder, aggregator=aggregator, head=head)
    model = build_model(config, vocab_size=13).eval()
    exported = torch.export.export(model, (torch.randint(0, 13, (2, 23)),))
    tokens = torch.randint(0, 13, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(exported.module()(tokens), model(tokens), rtol=1e-5, atol=1e-5)


class _BatchlessMLP(MLPAggregator):
    """The plugin bug ``return self.initial``: an initial state without the batch dims."""

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(4, 8)


@pytest.mark.parametrize("path", ["whole chunks", "one partial chunk", "streaming"])
def test_an_initial_state_without_batch_dims_names_the_aggregator(path: str) -> None:
    """Every path that reads ``initial_state`` checks it against the encoder's ``state_shape``; it
    failed in the head before, blamed on the head's line."""
    from psmsearch.scan import StateShapeError

    built = PSMLayer.from_config(ModelConfig(d_model=8, chunk_size=4, encoder="pool", aggregator="mlp",
                                             head={"name": "attention", "heads": 2}))
    layer = PSMLayer(built.encoder, _BatchlessMLP(built.aggregator.context), built.head, 4)
    x = torch.randn(2, 9 if path == "whole chunks" else 3, 8)
    with pytest.raises(StateShapeError, match=r"'mlp' \(initial_state at .*test_composer\.py:\d+\): "
                                              r"initial_state\(\(2,\)\) returned shapes \[\(4, 8\)\], but the "
                                              r"chunk states have shapes \[\(2, 4, 8\)\]"):
        if path == "streaming":
            layer.stream(2)
        else:
            layer(x)


def test_the_head_reads_bitwise_the_same_prefixes_in_training_and_streaming() -> None:
    """DESIGN §2: both modes use one parenthesization, so with a non-associative aggregator (exact in
    float64 only if the calls are the same) the prefixes the head receives are equal bit for bit, for
    chunk counts that are not powers of two and with a partial last chunk."""
    from psmsearch.components import Aggregator, ComponentContext, Encoder, Head

    width, chunk = 3, 3

    class Corners(Encoder):
        name, state_kind = "corners", "bitwise"

        def features(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
            return x * 1.0

        def summarize(self, f: torch.Tensor) -> torch.Tensor:
            return f.select(-2, 0) * 0.5 + f.select(-2, -1) * 0.25  # [*, d]

        @property
        def state_shape(self) -> tuple[int]:
            return (width,)

    class Twisted(Aggregator):
        name, state_kind = "twisted", "bitwise"

        def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
            return torch.tanh(older) * 0.9 + newer * 0.7 + older * newer.flip(-1) * 0.3 - newer.square() * 0.1

        def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
            return torch.full((*batch_shape, width), 0.123, dtype=torch.float64)

    seen: list[torch.Tensor] = []

    class Recording(Head):
        name, state_kind = "recording", "bitwise"

        def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
            seen.append(prefix.detach().clone())
            return prefix.unsqueeze(-2) + f.cumsum(-2)  # [*, c', d]

    encoder = Corners(ComponentContext(width, chunk))
    context = ComponentContext(width, chunk, encoder)
    layer = PSMLayer(encoder, Twisted(context), Recording(context), chunk)
    torch.manual_seed(0)
    for chunks in (1, 2, 3, 5, 6, 7, 11, 13):
        for extra in (0, 1, 2):
            steps = chunks * chunk + extra
            x = torch.randn(2, steps, width, dtype=torch.float64)
            for mode in ("auto", "sequential"):
                seen.clear()
                y = layer(x, scan_mode=mode)
                trained = torch.cat([s.reshape(2, -1, width) for s in seen], 1)  # [B, chunks (+1), d]
                seen.clear()
                stream = layer.stream(2)
                streamed_y = torch.stack([stream.step(x[:, t]) for t in range(steps)], 1)
                streamed = torch.stack(seen[::chunk], 1)  # the head runs once per token; one prefix per chunk
                assert torch.equal(trained, streamed), (chunks, extra, mode)
                assert torch.equal(y, streamed_y), (chunks, extra, mode)


def _small_attention_layer() -> PSMLayer:
    return PSMLayer.from_config(ModelConfig(d_model=8, chunk_size=4, encoder="pool", aggregator="mlp",
                                            head={"name": "attention", "heads": 2}))


def test_an_input_the_layer_cannot_read_is_refused_naming_what_it_expected() -> None:
    """A wrong width, rank or dtype failed in a component's first matmul ("mat1 and mat2 shapes cannot be
    multiplied"), or unpacking x.shape ("not enough values to unpack")."""
    layer = _small_attention_layer()
    with pytest.raises(ValueError, match=r"PSMLayer\.forward: x must be \[B, T, 8\] \(batch, tokens, d_model\), "
                                         r"got shape \(2, 7, 5\)"):
        layer(torch.randn(2, 7, 5))
    with pytest.raises(ValueError, match=r"got shape \(7, 8\)"):
        layer(torch.randn(7, 8))
    with pytest.raises(ValueError, match=r"x is torch\.float64, the layer's parameters torch\.float32; cast x "
                                         r"\(x\.to\(torch\.float32\)\) or the layer"):
        layer(torch.randn(2, 7, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"x must be a floating tensor \(token embeddings\), got torch\.int64"):
        layer(torch.ones(2, 7, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"x is on meta, the layer's parameters on cpu"):
        layer(torch.empty(2, 7, 8, device="meta"))
    with pytest.raises(TypeError, match=r"x must be a tensor \[B, T, 8\] .* got a list"):
        layer([[0.0] * 8])  # type: ignore[arg-type]
    assert layer.double()(torch.randn(2, 7, 8, dtype=torch.float64)).dtype == torch.float64


def test_a_stream_refuses_tokens_of_another_batch_size_or_width() -> None:
    """It failed in the head ("Sizes of tensors must match ... Expected size 2 but got size 3"), saying
    nothing of the stream's batch size; nothing the stream holds changes on a refused input."""
    layer = _small_attention_layer().eval()
    stream = layer.stream(2)
    stream.feed(torch.randn(2, 5, 8))
    with pytest.raises(ValueError, match=r"stream\(\.\.\.\)\.feed: x must be \[2, T, 8\] \(batch, tokens, d_model\), "
                                         r"got shape \(3, 7, 8\)"):
        stream.feed(torch.randn(3, 7, 8))
    with pytest.raises(ValueError, match=r"stream\(\.\.\.\)\.step: x must be \[2, 8\] \(batch, d_model\), got shape "
                                         r"\(3, 8\)"):
        stream.step(torch.randn(3, 8))
    with pytest.raises(ValueError, match=r"step: x must be \[2, 8\] .* got shape \(2, 1, 8\)"):
        stream.step(torch.randn(2, 1, 8))
    assert stream.tokens_seen == 5 and stream.scan.count == 1 and stream.position == 1
    assert stream.step(torch.randn(2, 8)).shape == (2, 8)


@pytest.mark.parametrize("length", [0, 3, 4, 9])
def test_bad_scan_arguments_are_refused_whatever_the_sequence_length(length: int) -> None:
    """A bad scan_mode was refused only once a whole chunk reached the scan (T >= c), and fused=True
    with a head that has no fused path only when T > 0."""
    from psmsearch.errors import PSMSearchError

    layer = _small_attention_layer()
    x = torch.randn(2, length, 8)
    with pytest.raises(ValueError, match="prefix_scan mode 'bogus' is not allowed; use 'auto', 'tree' or 'sequential'"):
        layer(x, scan_mode="bogus")
    with pytest.raises(PSMSearchError, match="head 'attention' has no fused training path"):
        layer(x, fused=True)
    assert layer(x, scan_mode="tree").shape == (2, length, 8)


def test_a_constructor_assert_on_its_arguments_is_a_configuration_error(tmp_path) -> None:
    """torch's MultiheadAttention checks its width with ``assert``: a plugin built on it with heads that do
    not divide d_model failed only at trial time ("building the model"), where built-in components
    are refused before anything trains."""
    from psmsearch.registry import load_registry

    plugin = tmp_path / "mha_agg.py"
    plugin.write_text(
        "import torch\n"
        "from psmsearch import Aggregator, HyperParameter, hookimpl\n\n"
        "class MHA(Aggregator):\n"
        "    name = 'zz_mha'\n"
        "    state_kind = 'tokens'\n"
        "    hyperparameters = (HyperParameter('heads', 'int', 2, low=1, high=8),)\n\n"
        "    def __init__(self, context, **hparams):\n"
        "        super().__init__(context, **hparams)\n"
        "        self.attn = torch.nn.MultiheadAttention(context.d_model, self.hparams['heads'])\n\n"
        "    def forward(self, older, newer):\n"
        "        return newer\n\n"
        "    def initial_state(self, batch_shape):\n"
        "        raise NotImplementedError\n\n"
        "@hookimpl\n"
        "def register_aggregators(register):\n"
        "    register(MHA)\n"
    )
    registry = load_registry(extra_plugins=[str(plugin)])
    with pytest.raises(ConfigError, match=r"^model\.aggregator: AssertionError: embed_dim must be divisible by num_heads "
                                          r"\(at .*mha_agg\.py:11 in __init__\)"):
        validate_model_config(ModelConfig(d_model=30, aggregator={"name": "zz_mha", "heads": 4}), registry)
    validate_model_config(ModelConfig(d_model=32, aggregator={"name": "zz_mha", "heads": 4}), registry)


class _Float64Start(MLPAggregator):
    """``initial_state`` made in float64 for a float32 layer."""

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return super().initial_state(batch_shape).double()


@pytest.mark.parametrize("path", ["one partial chunk", "streaming", "whole chunks"])
def test_an_initial_state_of_another_dtype_is_named_on_every_path(path: str) -> None:
    """Only the scan checked it: with T < c, and in streaming, the head read it first ("mixed dtype")."""
    from psmsearch.scan import StateShapeError

    built = _small_attention_layer()
    layer = PSMLayer(built.encoder, _Float64Start(built.aggregator.context), built.head, 4)
    with pytest.raises(StateShapeError, match=r"initial_state\(\(2,\)\) returned torch\.float64 .*for inputs of "
                                              r"torch\.float32; it must return a state of the chunk states' dtype"):
        if path == "streaming":
            layer.stream(2)
        else:
            layer(torch.randn(2, 3 if path == "one partial chunk" else 13, 8))


def test_a_layer_runs_under_autocast_and_on_the_meta_device() -> None:
    """Autocast changes dtypes between ops by design, and torch.is_autocast_enabled raises for the meta
    device: neither may turn the input checks into a refusal."""
    layer = _small_attention_layer().eval()
    x = torch.randn(2, 9, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).shape == (2, 9, 8)
        assert layer(x.to(torch.bfloat16)).shape == (2, 9, 8)
        assert layer.stream(2).feed(x.to(torch.bfloat16)).shape == (2, 9, 8)
    with pytest.raises(ValueError, match=r"x is torch\.bfloat16, the layer's parameters torch\.float32"):
        layer(x.to(torch.bfloat16))  # outside autocast
    with torch.device("meta"):
        meta = _small_attention_layer()
    assert meta(torch.empty(2, 9, 8, device="meta")).device.type == "meta"
    with pytest.raises(ValueError, match=r"x is torch\.float64, the layer's parameters torch\.float32"):
        meta(torch.empty(2, 9, 8, device="meta", dtype=torch.float64))
