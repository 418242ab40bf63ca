"""The contract suite passes the built-ins and catches each kind of broken component, with evidence."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from psmsearch.plugins.token_state import AttentionHead, EmbedEncoder, MLPAggregator
from psmsearch.testing import assert_component_ok, check_component

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def registry():
    from psmsearch.registry import load_registry

    return load_registry(extra_plugins=[str(FIXTURES / "broken_components.py")])


@pytest.mark.parametrize("kind, name", [("encoder", "embed"), ("encoder", "pool"), ("aggregator", "attention"), ("aggregator", "mlp"),
                                        ("head", "attention"), ("aggregator", "zz_dropout")])
def test_builtin_components_pass_every_check(registry, kind: str, name: str) -> None:
    results = check_component(registry.get(kind, name), registry)
    assert len(results) >= 6
    assert all(r.passed for r in results), [r.line() for r in results if not r.passed]


@pytest.mark.parametrize(
    "kind, name, failing_check, evidence",
    [
        ("aggregator", "zz_wrong_shape", "shapes",  # located at the return that made the state (it was not)
         f"agg(older, newer) (forward at {FIXTURES / 'broken_components.py'}:17) has shapes [[2, 3, 8, 32]], "
         "inputs have [[2, 3, 4, 32]]"),
        ("aggregator", "zz_nan", "finite_outputs", "produced NaN or inf"),
        ("aggregator", "zz_fake_assoc", "associativity", "claims associative but (xy)z and x(yz) differ"),
        ("head", "zz_peeking", "causal_within_chunk", "changing chunk token 1 changed outputs at positions < 1"),
        ("head", "zz_fused_scales_twice", "fused_equals_generic",
         "encoder 'linear_attention', T=11: fused_forward differs from the generic path by"),
        ("head", "zz_fused_detached", "fused_equals_generic",
         "encoder 'linear_attention': gradient 0 (0 is the input) reaches only the generic path"),
        ("head", "zz_fused_no_decay", "fused_equals_generic", "encoder 'mamba2', T=11: fused_forward differs"),
        ("head", "zz_fused_raises", "fused_equals_generic",
         "encoder 'gla': raised RuntimeError: kernel: unsupported layout"),
        ("encoder", "zz_misreports", "state_nbytes_matches_streaming", "B=2, after 1 chunks streaming holds 1024 bytes but state_nbytes accounts for 512"),
        ("aggregator", "zz_assoc_at_init", "associativity",
         "with randomised parameters: claims associative but (xy)z and x(yz) differ"),
        ("head", "zz_peeks_at_init", "causal_within_chunk",
         "with randomised parameters: changing chunk token 1 changed outputs at positions < 1"),
        ("head", "zz_next_chunk", "chunk_local", "changing chunk 0's tokens changed chunk 2's outputs by"),
        ("aggregator", "zz_float32_initial_state", "float64",
         "after .double(), initial_state((B,)) has dtype torch.float32: make it from a parameter or buffer"),
        ("aggregator", "zz_wrong_backward_agg", "gradients",
         "agg(older, newer): its backward disagrees with finite differences in float64"),
        ("head", "zz_wrong_backward_head", "gradients", "head(prefix, f): its backward disagrees with finite differences"),
        ("encoder", "zz_wrong_backward_enc", "gradients",
         "features and summarize: its backward disagrees with finite differences"),
        ("aggregator", "zz_no_initial_state", "shapes",
         f"raised NotImplementedError: NoInitialState (aggregator 'zz_no_initial_state', in {FIXTURES / 'broken_components.py'}) "
         "does not implement initial_state(), which every aggregator must; see the docstring of psmsearch.Aggregator"),
        ("aggregator", "zz_blocked_scan", "associativity", "N=9: its fast scan() differs from the tree scan by"),
        ("aggregator", "zz_batch_leak", "batch_independent",
         "parallel: sequence 1 run again in slot 0 beside a changed sequence gave outputs that differ by"),
        ("head", "zz_head_batch_leak", "batch_independent",
         "parallel: sequence 1 run again in slot 0 beside a changed sequence gave outputs that differ by"),
        ("head", "zz_forward_last_off_by_one", "forward_last", "c'=2: forward_last differs from forward(prefix, f)[..., -1, :] by"),
        ("head", "zz_forward_last_off_by_one", "stream_equals_parallel", "token-by-token streaming differs from the parallel forward"),
        ("head", "zz_unrefreshed_buffer", "meta_build",
         "parallel: the layer built on the meta device, materialised and loaded from the state dict differs by nan"),
    ],
)
def test_broken_component_fails_the_right_check(registry, kind, name, failing_check, evidence) -> None:
    results = {r.check: r for r in check_component(registry.get(kind, name), registry)}
    assert not results[failing_check].passed
    assert evidence in results[failing_check].message
    assert results["build"].passed


def test_an_unexpected_exception_names_the_plugin_line_it_came_through(registry) -> None:
    """A shape error raised inside torch said only "raised RuntimeError: Sizes of tensors must match...":
    the failure now names the innermost line of plugin code on the way (here the fixture's forward), and
    the result keeps the full traceback (``psmsearch check --traceback`` prints it)."""
    lines = (FIXTURES / "broken_components.py").read_text().splitlines()
    line = next(n for n, text in enumerate(lines, 1) if "torch.cat([older, newer[..., :1, :]]" in text)
    results = {r.check: r for r in check_component(registry.get("aggregator", "zz_cat_mismatch"), registry)}
    shapes = results["shapes"]
    assert not shapes.passed and shapes.message.startswith("raised RuntimeError: Sizes of tensors must match")
    assert shapes.message.endswith(f"(at {FIXTURES / 'broken_components.py'}:{line} in forward)"), shapes.message
    assert shapes.traceback.startswith("Traceback (most recent call last)") and "RuntimeError" in shapes.traceback
    assert results["build"].traceback == "" and not [r for r in results.values() if r.passed and r.traceback]


def test_assert_component_ok_raises_with_the_failed_checks(registry) -> None:
    with pytest.raises(AssertionError, match="FAIL  aggregator:zz_nan +finite_outputs"):
        assert_component_ok(registry.get("aggregator", "zz_nan").cls, registry)
    assert_component_ok(registry.get("aggregator", "mlp").cls, registry)


def test_a_component_that_cannot_be_copied_fails_a_check_instead_of_crashing_the_suite() -> None:
    from psmsearch.registry import load_registry

    registry = load_registry(extra_plugins=[str(FIXTURES / "undeepcopyable.py")])
    results = {r.check: r for r in check_component(registry.get("aggregator", "zz_holds_a_lock"), registry)}
    assert not results["randomised_copy"].passed and "cannot pickle" in results["randomised_copy"].message
    assert results["associativity"].passed, "the checks of the component as built still run"


def test_batch_check_catches_a_leak_that_runs_one_way(registry) -> None:
    """``zz_reads_sequence_0`` adds sequence 0's features to every sequence and leaves sequence 0 alone.
    Changing sequence 1 and watching sequence 0 passed it, and with that every check of the suite;
    the check is run alone here (a whole ``check_component`` takes tens of seconds)."""
    from psmsearch.testing import ContractViolation, _assemble, _layer_batch_independent

    assembly = _assemble(registry.get("head", "zz_reads_sequence_0").cls, registry, seed=0)
    with pytest.raises(ContractViolation, match="parallel: sequence 1 run again in slot 0 beside a changed sequence"):
        _layer_batch_independent(assembly)
    healthy = _assemble(registry.get("head", "attention").cls, registry, seed=0)
    assert "moved to the other slot" in _layer_batch_independent(healthy)


def test_chunk_size_check_catches_a_summary_that_disagrees_with_the_readout(registry) -> None:
    """``zz_summary_without_decay`` drops the decay from its chunk summaries only: streaming equals the
    parallel pass (both use the summary) and every other check passes, but the layer is no recurrence.
    An encoder that declares ``chunk_size_invariant`` (the affine family) must give one output at every
    chunk size; one that does not is not checked. The check runs alone here."""
    from psmsearch.testing import ContractViolation, _assemble, _layer_chunk_size_invariance

    assembly = _assemble(registry.get("encoder", "zz_summary_without_decay").cls, registry, seed=0)
    with pytest.raises(ContractViolation, match=r"T=15: outputs at c=3 differ from those at c=1 by .*encoder "
                                                r"'zz_summary_without_decay' declares chunk_size_invariant, so its "
                                                r"summarize, aggregator 'affine_diag' and head 'linear_readout_diag'"):
        _layer_chunk_size_invariance(assembly)
    healthy = _assemble(registry.get("encoder", "gla").cls, registry, seed=0)
    assert _layer_chunk_size_invariance(healthy) == "T=15, c in 1, 3, 4, 9 against c=1, float64"
    tokens = _assemble(registry.get("encoder", "embed").cls, registry, seed=0)
    assert _layer_chunk_size_invariance(tokens) == "not claimed by the encoder"

    from psmsearch.plugins.affine import AffineDiagAggregator, DiagReadoutHead

    class MaskedHead(DiagReadoutHead):  # exact, with a buffer sized by c (as the attention head's mask)
        name = "masked_diag_head"

        def __init__(self, context, **hparams):
            super().__init__(context, **hparams)
            self.register_buffer("mask", torch.ones(context.chunk_size))

        def forward(self, prefix, f):
            return super().forward(prefix, f) * self.mask[: f[0].shape[-3], None]  # [B, N, c, d]

    masked = _assemble(MaskedHead, registry, seed=0)
    assert _layer_chunk_size_invariance(masked) == "T=15, c in 1, 3, 4, 9 against c=1, float64", "built again per c"

    class NotAMonoid(AffineDiagAggregator):
        name = "clipped_diag"
        associative = False

    assert _layer_chunk_size_invariance(_assemble(NotAMonoid, registry, seed=0)) == \
        "not checked: aggregator 'clipped_diag' is not associative"

    class Approximate(DiagReadoutHead):
        name = "approximate_diag"
        chunk_size_invariant = False

    assert _layer_chunk_size_invariance(_assemble(Approximate, registry, seed=0)) == \
        "not checked: head 'approximate_diag' sets chunk_size_invariant = False"


def test_state_bytes_check_streams_partial_chunks(registry) -> None:
    """``zz_pins_wide_projection``'s buffered features keep a buffer twice their size alive; whole-chunk
    feeds (all the check streamed) never buffer features, so it passed. The check runs alone here."""
    from psmsearch.testing import ContractViolation, _assemble, _layer_state_nbytes

    assembly = _assemble(registry.get("encoder", "zz_pins_wide_projection").cls, registry, seed=0)
    with pytest.raises(ContractViolation, match=r"B=2, after 1 tokens streamed one at a time \(1 in the partial chunk\) "
                                                r"streaming holds 512 bytes but state_nbytes and the buffered features account for 256"):
        _layer_state_nbytes(assembly)


def test_a_constructor_that_raises_fails_the_build_check_naming_its_line() -> None:
    from psmsearch.plugins.token_state import MLPAggregator

    class BuildFails(MLPAggregator):
        name = "zz_build_fails"

        def __init__(self, context, **hparams):  # noqa: ANN001, ANN003
            super().__init__(context, **hparams)
            raise RuntimeError("cannot build")

    (result,) = check_component(BuildFails)
    assert not result.passed and result.check == "build"
    assert result.message.startswith(f"RuntimeError: cannot build (at {Path(__file__)}:"), result.message
    assert result.message.endswith(" in __init__)")


class _MixesTokens(EmbedEncoder):
    """Features that read the other tokens of the chunk: not computable token by token while streaming."""

    name = "zz_mixes_tokens"

    def features(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        f = super().features(x, offset)  # [*, c, d]
        return f + 0.5 * f.mean(-2, keepdim=True)


class _PromisesOtherShape(EmbedEncoder):
    """``state_shape`` one slot short of what ``summarize`` returns."""

    name = "zz_promises_other_shape"

    @property
    def state_shape(self) -> tuple[int, int]:
        slots, width = super().state_shape
        return slots - 1, width


class _MixesPairs(MLPAggregator):
    """Mixes the pairs of one batched call (a tree level): the tree's prefixes then depend on the batching."""

    name = "zz_mixes_pairs"

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        out = super().forward(older, newer)
        return out + 0.1 * out.mean(1, keepdim=True) if out.dim() == 4 else out  # [B, pairs, k, d]


class _DependsOnChunkLength(AttentionHead):
    """Scales its output by c'/c: a partial chunk's outputs differ from the full chunk's first ones."""

    name = "zz_depends_on_chunk_length"

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return super().forward(prefix, f) * (f.shape[-2] / self.context.chunk_size)


class _NarrowOutput(AttentionHead):
    """Returns one feature too few."""

    name = "zz_narrow_output"

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return super().forward(prefix, f)[..., :-1]


class _DropsInEval(MLPAggregator):
    """``F.dropout(x, p)`` without ``training=self.training``: it drops in eval() mode too."""

    name = "zz_drops_in_eval"

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.dropout(super().forward(older, newer), 0.1)


class _NoisyFeatures(EmbedEncoder):
    name = "zz_noisy_features"

    def features(self, x: torch.Tensor, offset: int = 0) -> torch.Tensor:
        f = super().features(x, offset)
        return f + 0.01 * torch.randn_like(f)


class _NoisyHead(AttentionHead):
    name = "zz_noisy_head"

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        y = super().forward(prefix, f)
        return y + 0.01 * torch.randn_like(y)


class _ReturnsFloat64(MLPAggregator):
    """A ``.double()`` left on the result: the head that reads it failed with "mixed dtype"."""

    name = "zz_returns_float64"

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return super().forward(older, newer).double()


class _ReturnsFloat32(MLPAggregator):
    """A ``.float()`` on the result: harmless in float32, it rounds every float64 result."""

    name = "zz_returns_float32"

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return super().forward(older, newer).float()


def _next_token(f: torch.Tensor) -> torch.Tensor:
    """Each position's next token's features, zero at the chunk's last: a read of the future."""
    return torch.cat([f[..., 1:, :], torch.zeros_like(f[..., :1, :])], dim=-2)


class _LeaksWhileTraining(AttentionHead):
    """Reads the next token only when ``self.training``: every eval()-mode check passes it."""

    name = "zz_leaks_while_training"

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        y = super().forward(prefix, f)
        return y + _next_token(f) if self.training else y


class _SingleSequenceShortcut(AttentionHead):
    """``forward_last`` drops the prefix for one sequence: a wrong fast path only batch 1 takes."""

    name = "zz_single_sequence_shortcut"

    def forward_last(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        return super().forward_last(torch.zeros_like(prefix) if f.shape[0] == 1 else prefix, f)


class _Hoards(MLPAggregator):
    """Keeps every state it makes (say, for plotting): memory that grows outside the stream's states."""

    name = "zz_hoards"

    def __init__(self, context, **hparams) -> None:  # noqa: ANN001, ANN003
        super().__init__(context, **hparams)
        self.history: list[torch.Tensor] = []

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        out = super().forward(older, newer)
        self.history.append(out.detach())
        return out


@pytest.mark.parametrize(("cls", "check", "evidence"), [
    (_LeaksWhileTraining, "_layer_causal_in_training", "in train() mode, changing token 1 changed outputs at "
                                                       "positions < 1"),
    (_SingleSequenceShortcut, "_layer_stream_equals_parallel", "B=1, T=38: token-by-token streaming differs"),
    (_Hoards, "_layer_no_hidden_state", "the aggregator holds"),
    (_DropsInEval, "_aggregator_deterministic", "two calls of agg(older, newer) (forward at "),
    (_DropsInEval, "_aggregator_deterministic", "F.dropout(x, p) without training=self.training"),
    (_NoisyFeatures, "_encoder_deterministic", "two calls of features(x) (features at "),
    (_NoisyHead, "_head_deterministic", "two calls of head(prefix, f) (forward at "),
    (_ReturnsFloat64, "_aggregator_shapes", "returned float64 on cpu, the chunk states are float32 on cpu: an "
                                            "aggregator must keep its inputs' dtype and device"),
    (_ReturnsFloat32, "_aggregator_gradients", "agg(older, newer): in float64 (inputs and parameters) it returned "
                                               "torch.float32, so its derivative cannot be checked"),
    (_MixesTokens, "_encoder_token_local", "features of token 0 alone (offset=0) differ from the whole chunk's"),
    (_PromisesOtherShape, "_encoder_shapes", "state_shape promises"),
    (_MixesPairs, "_aggregator_scan_paths", "tree and sequential prefixes differ"),
    (_DependsOnChunkLength, "_head_partial", "partial-chunk output differs from the full chunk's first 1"),
    (_NarrowOutput, "_head_shapes", "output shape [2, 3, 4, 31], expected [2, 3, 4, 32]"),
])
def test_each_check_without_a_failing_fixture_above_catches_its_bug(registry, cls: type, check: str,
                                                                    evidence: str) -> None:
    """The checks token_local_features, shapes (encoder), tree_equals_online, partial_chunks and
    shapes_and_finite (head) fail a component with the bug each exists for; run alone, as a whole
    ``check_component`` takes tens of seconds."""
    from psmsearch import testing

    with pytest.raises(testing.ContractViolation) as caught:
        getattr(testing, check)(testing._assemble(cls, registry, seed=0))
    assert evidence in str(caught.value)


def test_failures_after_a_failed_determinism_check_point_back_to_it(registry) -> None:
    """A component that draws random numbers fails every check that compares two computations, each
    message pointing elsewhere (a mixed batch, a buffer left uninitialised); each now says to fix the
    determinism first."""
    results = check_component(_DropsInEval, registry)
    failed = [r for r in results if not r.passed]
    assert failed[0].check == "deterministic"
    assert len(failed) >= 3 and {"tree_equals_online", "batch_independent"} <= {r.check for r in failed}
    assert all(r.message.endswith("(this component is not deterministic, see 'deterministic': fix that first)")
               for r in failed[1:])
    deterministic = check_component(MLPAggregator, registry)
    assert all(r.passed for r in deterministic) and deterministic[1].check == "deterministic"


def test_equal_infinities_are_no_difference_to_the_determinism_check() -> None:
    """inf - inf is NaN: a deterministic component with infinite outputs was called nondeterministic."""
    from psmsearch.contract_checks_determinism import _largest_difference

    x = torch.tensor([0.0, -float("inf"), float("nan"), 1.0])
    assert _largest_difference(x, x.clone()) == 0.0
    assert _largest_difference(x, torch.tensor([0.0, float("inf"), float("nan"), 1.0])) == float("inf")
    assert _largest_difference(x, torch.tensor([0.0, -float("inf"), 0.0, 1.5])) == float("inf")  # NaN against a number
    assert _largest_difference(x, torch.tensor([0.0, -float("inf"), float("nan"), 1.5])) == 0.5


class _CachesAMaskPerWidth(AttentionHead):
    """A bounded cache: one causal mask per chunk width it has seen (at most c of them)."""

    name = "zz_caches_masks"

    def __init__(self, context, **hparams) -> None:  # noqa: ANN001, ANN003
        super().__init__(context, **hparams)
        self._masks: dict[int, torch.Tensor] = {}

    def forward(self, prefix: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
        width = f.shape[-2]
        self._masks.setdefault(width, torch.ones(width, width).tril())
        return super().forward(prefix, f)


def test_a_bounded_cache_is_no_hidden_state(registry) -> None:
    """Masks cached per chunk width stop growing once every width was seen; only what keeps growing fails."""
    from psmsearch import testing

    assembly = testing._assemble(_CachesAMaskPerWidth, registry, seed=0)
    assert "no growth" in testing._layer_no_hidden_state(assembly)
    assert assembly.head._masks == {}  # the check ran on a copy


def test_a_component_that_adds_to_its_hparams_is_rebuilt_from_what_it_was_given(registry) -> None:
    """The checks that build the layer again passed the resolved hparams back to the constructor, so a
    component that records a derived value there ("d_head") failed them with "has no hyperparameter"."""
    from psmsearch import testing
    from psmsearch.plugins.affine import GLAEncoder

    class RecordsItsHeadWidth(GLAEncoder):
        name = "zz_records_head_width"

        def __init__(self, context, **hparams) -> None:  # noqa: ANN001, ANN003
            super().__init__(context, **hparams)
            self.hparams["d_head"] = context.d_model // self.hparams["heads"]

    assembly = testing._assemble(RecordsItsHeadWidth, registry, seed=0)
    assert "against c=1" in testing._layer_chunk_size_invariance(assembly)
    assert "equal" in testing._layer_meta_build(assembly)
