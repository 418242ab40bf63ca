"""The scan engine against DESIGN.md §2: exact parenthesization, three paths agree, complexity, gradients."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
import torch

from psmsearch import states as S
from psmsearch.scan import OnlineScan, prefix_scan

DESIGN_TABLE_8 = [
    "e",
    "x0",
    "(x0 x1)",
    "((x0 x1) x2)",
    "((x0 x1) (x2 x3))",
    "(((x0 x1) (x2 x3)) x4)",
    "(((x0 x1) (x2 x3)) (x4 x5))",
    "((((x0 x1) (x2 x3)) (x4 x5)) x6)",
]


class Symbolic:
    """Builds expression strings: ``agg(a, b) = "(a b)"``; counts batched calls and pairs."""

    associative = False

    def __init__(self) -> None:
        self.calls = 0
        self.pairs = 0

    def __call__(self, older: np.ndarray, newer: np.ndarray) -> np.ndarray:
        assert "e" not in set(older.ravel()) | set(newer.ravel()), "identity passed to agg"
        self.calls += 1
        self.pairs += older.shape[1] if older.ndim > 1 else 1
        return np.vectorize(lambda a, b: f"({a} {b})", otypes=[object])(older, newer)

    def initial_state(self, batch_shape: tuple[int, ...]) -> np.ndarray:
        return np.full(batch_shape, "e", dtype=object)


def symbols(n: int, batch: int = 1) -> np.ndarray:
    return np.array([[f"x{i}" for i in range(n)]] * batch, dtype=object)  # [B, N]


def expected_prefix(i: int) -> str:
    """DESIGN.md's rule written independently: left fold of the dyadic blocks of [0, i)."""

    def block(start: int, width: int) -> str:
        if width == 1:
            return f"x{start}"
        half = width // 2
        return f"({block(start, half)} {block(start + half, half)})"

    if i == 0:
        return "e"
    acc, start = None, 0
    for bit in reversed(range(i.bit_length())):
        if i >> bit & 1:
            b = block(start, 1 << bit)
            acc = b if acc is None else f"({acc} {b})"
            start += 1 << bit
    return acc


def online_prefixes(agg, states, batch_shape) -> list:
    scan = OnlineScan(agg, batch_shape)
    out = []
    for i in range(S.size(states, 1)):
        out.append(scan.prefix())
        scan.push(S.take(states, 1, i))
    return out


@pytest.mark.parametrize("mode", ["tree", "sequential"])
def test_design_table_for_eight_chunks(mode: str) -> None:
    prefixes = prefix_scan(Symbolic(), symbols(8), mode=mode)
    assert list(prefixes[0]) == DESIGN_TABLE_8


def test_online_reproduces_design_table() -> None:
    assert [p[0] for p in online_prefixes(Symbolic(), symbols(8), (1,))] == DESIGN_TABLE_8


@pytest.mark.parametrize("n", list(range(1, 41)) + [63, 64, 65, 100])
def test_every_path_has_the_exact_parenthesization(n: int) -> None:
    expected = [expected_prefix(i) for i in range(n)]
    assert list(prefix_scan(Symbolic(), symbols(n, batch=2), mode="tree")[1]) == expected
    assert list(prefix_scan(Symbolic(), symbols(n), mode="sequential")[0]) == expected
    assert [p[0] for p in online_prefixes(Symbolic(), symbols(n), (1,))] == expected


class Twisted(torch.nn.Module):
    """Deliberately non-associative and non-commutative, element-wise (so batching is bitwise-neutral)."""

    associative = False

    def __init__(self, width: int) -> None:
        super().__init__()
        self.width = width
        self.calls = 0

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(older) * 0.9 + newer * 0.7 + older * newer.flip(-1) * 0.3 - newer.square() * 0.1

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*batch_shape, self.width, dtype=torch.float64)


def test_twisted_is_really_non_associative_and_non_commutative() -> None:
    agg = Twisted(4)
    x, y, z = torch.randn(3, 4, dtype=torch.float64).unbind(0)
    assert (agg(agg(x, y), z) - agg(x, agg(y, z))).abs().max() > 1e-3
    assert (agg(x, y) - agg(y, x)).abs().max() > 1e-3


def test_tree_sequential_online_agree_bitwise_for_every_n_up_to_100() -> None:
    torch.manual_seed(0)
    agg = Twisted(5)
    for n in range(1, 101):
        states = torch.randn(2, n, 5, dtype=torch.float64)  # [B, N, d]
        tree = prefix_scan(agg, states, mode="tree")
        sequential = prefix_scan(agg, states, mode="sequential")
        online = torch.stack(online_prefixes(agg, states, (2,)), dim=1)
        assert torch.equal(tree, sequential), f"N={n}: tree != sequential"
        assert torch.equal(tree, online), f"N={n}: tree != online"


def test_tuple_states_are_scanned_leaf_wise() -> None:
    class PairAgg:
        associative = False

        def __call__(self, older, newer):
            return (older[0] * newer[0] + 1.0, torch.tanh(older[1]) + newer[1] * older[0][..., :1])

        def initial_state(self, batch_shape):
            return (torch.ones(*batch_shape, 2, dtype=torch.float64), torch.zeros(*batch_shape, 3, dtype=torch.float64))

    torch.manual_seed(1)
    states = (torch.randn(2, 11, 2, dtype=torch.float64), torch.randn(2, 11, 3, dtype=torch.float64))
    tree = prefix_scan(PairAgg(), states, mode="tree")
    sequential = prefix_scan(PairAgg(), states, mode="sequential")
    online = online_prefixes(PairAgg(), states, (2,))
    for leaf in range(2):
        assert torch.equal(tree[leaf], sequential[leaf])
        assert torch.equal(tree[leaf], torch.stack([p[leaf] for p in online], dim=1))


class GatedPair(NamedTuple):
    gate: torch.Tensor  # [..., 2]
    value: torch.Tensor  # [..., 3]


def test_namedtuple_states_keep_their_type_in_every_path() -> None:
    """An aggregator may read its state's fields by name; every path hands it the NamedTuple back."""

    class FieldAgg:
        associative = False

        def __call__(self, older: GatedPair, newer: GatedPair) -> GatedPair:
            return GatedPair(older.gate * newer.gate + 1.0, torch.tanh(older.value) + newer.value * older.gate[..., :1])

        def initial_state(self, batch_shape):
            return GatedPair(torch.ones(*batch_shape, 2, dtype=torch.float64), torch.zeros(*batch_shape, 3, dtype=torch.float64))

    torch.manual_seed(2)
    states = GatedPair(torch.randn(2, 11, 2, dtype=torch.float64), torch.randn(2, 11, 3, dtype=torch.float64))
    tree = prefix_scan(FieldAgg(), states, mode="tree")
    sequential = prefix_scan(FieldAgg(), states, mode="sequential")
    online = online_prefixes(FieldAgg(), states, (2,))
    assert isinstance(tree, GatedPair) and isinstance(sequential, GatedPair) and all(isinstance(p, GatedPair) for p in online)
    loop = [FieldAgg().initial_state((2,))]  # the left fold, a different parenthesization but the same first prefixes
    for i in range(2):
        loop.append(FieldAgg()(loop[-1], GatedPair(states.gate[:, i], states.value[:, i])) if i else GatedPair(states.gate[:, 0], states.value[:, 0]))
    for i in range(3):
        assert torch.equal(tree.value[:, i], loop[i].value) and torch.equal(sequential.value[:, i], online[i].value)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 8, 9, 31, 64, 100, 1000])
def test_tree_makes_under_2n_pair_evaluations_in_under_2log2n_batched_calls(n: int) -> None:
    agg = Symbolic()
    prefix_scan(agg, symbols(n), mode="tree")
    levels = math.ceil(math.log2(n)) if n > 1 else 0
    assert agg.calls <= max(0, 2 * levels - 1)  # the root is never built: it is no exclusive prefix
    assert agg.pairs <= 2 * n
    assert agg.pairs >= n - 2  # every chunk but the last two enters some pair on the way up


class LastUnread(Symbolic):
    """A symbolic aggregator that fails if the state of chunk ``last`` is ever passed to it."""

    def __init__(self, last: str) -> None:
        super().__init__()
        self.last = last

    def __call__(self, older: np.ndarray, newer: np.ndarray) -> np.ndarray:
        seen = " ".join(map(str, older.ravel())) + " " + " ".join(map(str, newer.ravel()))
        assert self.last not in seen.replace("(", " ").replace(")", " ").split(), f"{self.last} reached agg"
        return super().__call__(older, newer)


@pytest.mark.parametrize("mode", ["tree", "sequential"])
def test_the_last_chunk_never_reaches_agg(mode: str) -> None:
    """No exclusive prefix contains the last chunk, so no engine combines it (a NaN there stays out)."""
    for n in range(1, 41):
        prefixes = prefix_scan(LastUnread(f"x{n - 1}"), symbols(n), mode=mode)
        assert list(prefixes[0]) == [expected_prefix(i) for i in range(n)]


@pytest.mark.parametrize("mode", ["tree", "sequential"])
@pytest.mark.parametrize("n", list(range(0, 41)) + [63, 64, 65, 100])
def test_total_appends_the_fold_of_all_chunks_with_the_same_parenthesization(mode: str, n: int) -> None:
    """``total=True`` gives the prefixes of ``n + 1`` chunks: DESIGN.md's rule up to ``p_n``."""
    prefixes = prefix_scan(Symbolic(), symbols(n, batch=2), mode=mode, total=True)
    assert prefixes.shape == (2, n + 1)
    assert list(prefixes[1]) == [expected_prefix(i) for i in range(n + 1)]


def test_total_equals_the_scan_of_one_chunk_more_bitwise_and_online() -> None:
    torch.manual_seed(4)
    agg = Twisted(3)
    for n in range(1, 34):
        states = torch.randn(2, n + 1, 3, dtype=torch.float64)  # [B, N+1, d]
        longer = prefix_scan(agg, states, mode="tree")  # [B, N+1, d]
        for mode in ("tree", "sequential"):
            assert torch.equal(prefix_scan(agg, states[:, :n], mode=mode, total=True), longer), (mode, n)
        assert torch.equal(longer, torch.stack(online_prefixes(agg, states, (2,)), dim=1))


def test_a_nan_last_chunk_leaves_prefixes_and_gradients_finite() -> None:
    torch.manual_seed(5)
    agg = Twisted(4)
    for mode in ("tree", "sequential"):
        for n in (2, 3, 5, 8, 13):
            states = torch.randn(2, n, 4, dtype=torch.float64)
            states[:, -1] = float("nan")
            states.requires_grad_(True)
            prefixes = prefix_scan(agg, states, mode=mode)
            (grad,) = torch.autograd.grad(prefixes.sum(), states)
            assert torch.isfinite(prefixes).all() and torch.isfinite(grad).all(), (mode, n)


class CumulativeSum:
    """Associative addition with its own fast exclusive scan (a cumulative sum)."""

    associative = True

    def __init__(self) -> None:
        self.scans = 0

    def __call__(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return older + newer

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*batch_shape, 3, dtype=torch.float64)

    def scan(self, states: torch.Tensor) -> torch.Tensor:
        self.scans += 1
        inclusive = states.cumsum(1)  # [B, N, d]
        return torch.cat([torch.zeros_like(states[:, :1]), inclusive[:, :-1]], dim=1)  # [B, N, d]


@pytest.mark.parametrize("n", [0, 1, 2, 7])
def test_total_after_an_aggregators_own_scan(n: int) -> None:
    agg = CumulativeSum()
    states = torch.randn(2, n, 3, dtype=torch.float64)
    prefixes = prefix_scan(agg, states, total=True)  # [B, N+1, d]
    assert agg.scans == (1 if n else 0)
    naive = torch.stack([states[:, :i].sum(1) for i in range(n + 1)], dim=1)  # [B, N+1, d]
    assert torch.allclose(prefixes, naive, atol=1e-12)


def test_online_scan_is_amortised_constant_calls_and_logarithmic_memory() -> None:
    agg = Symbolic()
    scan = OnlineScan(agg, (1,))
    for t in range(1, 1025):
        scan.push(symbols(t)[:, t - 1])
        scan.prefix()
        assert scan.num_roots <= math.ceil(math.log2(t + 1))
        assert len(scan.retained()) <= 2 * math.ceil(math.log2(t + 1))
        assert agg.calls <= 2 * t
    assert agg.calls / 1024 <= 2.0


def folds_a_later_prefix_reads(n: int) -> int:
    """Distinct states an online scan over ``n`` chunks must hold, counted from the binary counter alone.

    The roots (the set bits of ``n``), plus the cached fold of an occupied slot ``j`` below the top one
    when slot ``j - 1`` is empty (or ``j = 0``): the prefix itself, or what a later push landing under
    ``j`` with empty slots between reads. Once slot ``j - 1`` is occupied no push lands there before
    the carry that replaces ``roots[j]``. The top slot's fold is its root.
    """
    bits = [j for j in range(n.bit_length()) if n >> j & 1]
    folds = [j for j in bits[:-1] if j == 0 or not n >> (j - 1) & 1]
    return len(bits) + len(folds)


def test_online_scan_keeps_only_the_folds_a_later_prefix_reads() -> None:
    """After 2^k - 1 chunks every slot is occupied and only the lowest fold (the prefix) is read again:
    1023 chunks hold ten roots and one fold, not ten roots and nine folds."""
    scan = OnlineScan(Symbolic(), (1,))
    for t in range(1, 1025):
        scan.push(symbols(t)[:, t - 1])
        assert scan.prefix()[0] == expected_prefix(t)
        held = len({id(s) for s in scan.retained()})
        assert held == folds_a_later_prefix_reads(t), f"after {t} chunks"
        assert held <= math.ceil(math.log2(t + 1)) + 1
    assert folds_a_later_prefix_reads(1023) == 11


def test_online_prefix_costs_no_extra_call() -> None:
    agg = Symbolic()
    scan = OnlineScan(agg, (1,))
    for t in range(5):
        scan.push(symbols(5)[:, t])
    before = agg.calls
    scan.prefix()
    scan.prefix()
    assert agg.calls == before


def test_associative_aggregator_streams_a_single_running_state() -> None:
    class Add:
        associative = True

        def __call__(self, a, b):
            return a + b

        def initial_state(self, batch_shape):
            return torch.zeros(*batch_shape, 3)

    scan = OnlineScan(Add(), (2,))
    xs = torch.randn(2, 50, 3)
    for t in range(50):
        scan.push(xs[:, t])
        assert scan.num_roots == 1
    assert torch.allclose(scan.prefix(), xs.sum(1), atol=1e-5)
    assert scan.state_nbytes() == 2 * 3 * 4


def test_gradients_match_across_paths() -> None:
    torch.manual_seed(2)
    agg = Twisted(4)
    base = torch.randn(2, 13, 4, dtype=torch.float64)
    grads = []
    for path in ("tree", "sequential", "online"):
        states = base.clone().requires_grad_(True)
        if path == "online":
            prefixes = torch.stack(online_prefixes(agg, states, (2,)), dim=1)
        else:
            prefixes = prefix_scan(agg, states, mode=path)
        weights = torch.linspace(-1, 1, prefixes.numel(), dtype=torch.float64).view_as(prefixes)
        (grad,) = torch.autograd.grad((prefixes * weights).sum(), states)
        grads.append(grad)
    assert grads[0].abs().sum() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-12)
    assert torch.allclose(grads[0], grads[2], atol=1e-12)
    # the last chunk contributes to no exclusive prefix
    assert torch.equal(grads[0][:, -1], torch.zeros_like(grads[0][:, -1]))


def test_gradient_against_finite_differences() -> None:
    agg = Twisted(3)
    states = torch.randn(1, 6, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s: prefix_scan(agg, s, mode="tree"), (states,))


def test_bad_arguments_are_named() -> None:
    agg = Twisted(2)
    with pytest.raises(ValueError, match="mode 'fast' is not allowed"):
        prefix_scan(agg, torch.zeros(1, 3, 2, dtype=torch.float64), mode="fast")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at least one chunk"):
        prefix_scan(agg, torch.zeros(1, 0, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="batch_shape"):
        OnlineScan(agg).prefix()


def test_retained_bytes_count_a_pinned_storage_in_full() -> None:
    big = torch.zeros(100, 8)
    view = big[:1]
    assert S.nbytes(view) == 32
    assert S.retained_nbytes([view]) == big.numel() * 4
    assert S.retained_nbytes([view, big]) == big.numel() * 4


class Widening(Twisted):
    """Returns twice the slots it was given: the plugin bug ``torch.cat([newer, older], dim=-2)``."""

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return torch.cat([newer, older], dim=-1)


@pytest.mark.parametrize("mode", ["tree", "sequential", "online"])
def test_an_aggregator_returning_the_wrong_shape_is_named_where_it_happens(mode: str) -> None:
    """A wrong-shape aggregator failed later in the task's loss ("Sizes of tensors must match ... at
    plugins/tasks.py"), with nothing naming the aggregator; every engine now names it, its file and
    the shapes."""
    from psmsearch.scan import StateShapeError

    states = torch.randn(2, 5, 3, dtype=torch.float64)  # [B, N, width]
    pattern = (r"aggregator 'Widening' \(forward at .*test_scan\.py:\d+\) returned shapes \[\(2, (\d+, )?6\)\] for inputs of "
               r"shapes \[\(2, (\d+, )?3\)\] \(older\) and \[\(2, (\d+, )?3\)\] \(newer\); agg\(older, newer\) must return "
               r"a state shaped like newer")  # the tree's batched levels add a pairs dim
    with pytest.raises(StateShapeError, match=pattern) as caught:
        if mode == "online":
            scan = OnlineScan(Widening(3))
            for i in range(5):
                scan.push(states[:, i])
        else:
            prefix_scan(Widening(3), states, mode=mode)
    from psmsearch.trial import where_raised

    assert where_raised(caught.value) == ""  # a failed trial adds no caller's line (it named the task's loss)


class BatchlessStart(Twisted):
    """Its ``initial_state`` leaves out the batch dims: the plugin bug ``return self.initial``."""

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(self.width, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["tree", "sequential"])
def test_an_initial_state_of_the_wrong_shape_is_named_where_it_is_made(mode: str) -> None:
    """It failed in whatever read the prefixes (torch.cat, or the head), blamed on that line."""
    from psmsearch.scan import StateShapeError
    from psmsearch.trial import where_raised

    pattern = (r"aggregator 'BatchlessStart' \(initial_state at .*test_scan\.py:\d+\): initial_state\(\(2,\)\) "
               r"returned shapes \[\(3,\)\], but the chunk states have shapes \[\(2, 3\)\]")
    with pytest.raises(StateShapeError, match=pattern) as caught:
        prefix_scan(BatchlessStart(3), torch.randn(2, 5, 3, dtype=torch.float64), mode=mode)
    assert where_raised(caught.value) == ""


class ShortOwnScan(Twisted):
    """Associative in name, with its own ``scan`` returning one prefix too few."""

    associative = True

    def scan(self, states: torch.Tensor) -> torch.Tensor:
        return states[:, :-1]


def test_an_own_scan_of_the_wrong_shape_is_named() -> None:
    from psmsearch.scan import StateShapeError

    with pytest.raises(StateShapeError, match=r"'ShortOwnScan' \(scan at .*test_scan\.py:\d+\): scan returned "
                                              r"shapes \[\(2, 4, 3\)\] for chunk states of shapes \[\(2, 5, 3\)\]"):
        prefix_scan(ShortOwnScan(3), torch.randn(2, 5, 3, dtype=torch.float64))


def test_a_built_in_plugin_line_is_named_in_a_normal_install_too(monkeypatch: pytest.MonkeyPatch) -> None:
    """Installed without -e, psmsearch/plugins/ sits inside psmsearch/ and site-packages, which where_raised
    skips as engine and library code: a built-in component's own line was hidden."""
    import sysconfig

    from psmsearch import errors

    plugins = sysconfig.get_paths()["purelib"] + "/psmsearch/plugins/"
    monkeypatch.setattr(errors, "_plugin_dirs", lambda: (plugins,))
    namespace: dict[str, object] = {}
    exec(compile("def build():\n    raise ValueError('bad width')\n", plugins + "token_state.py", "exec"), namespace)
    with pytest.raises(ValueError) as caught:
        namespace["build"]()  # type: ignore[operator]
    assert errors.where_raised(caught.value) == f" (at {plugins}token_state.py:2 in build)"


class TwoReturns(Twisted):
    """Right shape on one branch, wrong on the other: the message names the return that was taken."""

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        if older.shape[0] > 100:
            return older + newer
        return torch.cat([newer, older], dim=-1)


def test_a_wrong_shape_names_the_line_of_the_return_that_made_it() -> None:
    """It named the ``def`` line, leaving the author of a forward with several returns to guess."""
    import inspect

    from psmsearch.scan import StateShapeError

    lines, first = inspect.getsourcelines(TwoReturns.forward)
    wrong = first + next(i for i, text in enumerate(lines) if "torch.cat" in text)
    with pytest.raises(StateShapeError, match=rf"\(forward at .*test_scan\.py:{wrong}\) returned shapes"):
        prefix_scan(TwoReturns(3), torch.randn(2, 5, 3, dtype=torch.float64), mode="tree")
    with pytest.raises(StateShapeError, match=rf"\(forward at .*test_scan\.py:{wrong}\) returned shapes"):
        scan = OnlineScan(TwoReturns(3))
        for i in range(3):
            scan.push(torch.randn(2, 3, dtype=torch.float64))


class SymbolicAssociative(Symbolic):
    """:class:`Symbolic` claiming associativity, optionally with its own exclusive scan: the strings
    still show every call's operands, and ``e`` (the initial state) reaching ``agg`` fails at once."""

    associative = True

    def __init__(self, own_scan: bool) -> None:
        super().__init__()
        self.own_scan = own_scan

    def scan(self, states: np.ndarray) -> np.ndarray | None:
        if not self.own_scan:
            return None
        out = np.empty_like(states)  # [B, N]
        out[:, 0] = "e"
        for i in range(1, states.shape[1]):
            out[:, i] = states[:, 0] if i == 1 else self(out[:, i - 1], states[:, i - 1])
        return out


def left_fold(i: int) -> str:
    """``((x0 x1) x2) ...``: the running fold of chunks ``0 .. i-1`` (``e`` for none)."""
    acc = "e" if i == 0 else "x0"
    for k in range(1, i):
        acc = f"({acc} x{k})"
    return acc


@pytest.mark.parametrize("own_scan", [False, True], ids=["generic", "own-scan"])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 8])
def test_an_associative_aggregator_never_receives_the_initial_state(own_scan: bool, n: int) -> None:
    """DESIGN.md §2: the identity is structural, so no path calls ``agg`` with ``e``, associative or not
    (an associative aggregator may learn its ``initial_state``, which is then no identity): the
    parallel scan with and without ``total``, its own scan followed by ``total``, and streaming."""
    agg = SymbolicAssociative(own_scan)
    prefixes = prefix_scan(agg, symbols(n, batch=2), total=True)  # [B, N+1]
    expected = [left_fold(i) for i in range(n + 1)] if own_scan else [expected_prefix(i) for i in range(n + 1)]
    assert list(prefixes[1]) == expected
    assert list(prefix_scan(agg, symbols(n, batch=2))[0]) == expected[:n]
    stream = OnlineScan(SymbolicAssociative(own_scan), (2,))
    assert stream.prefix()[0] == "e"
    for i in range(n):
        stream.push(symbols(n, batch=2)[:, i])
        assert stream.prefix()[0] == left_fold(i + 1)


class NonAssociativeWithAScan(Symbolic):
    """A non-associative aggregator that also defines ``scan``: the engine must not use it."""

    def scan(self, states: np.ndarray) -> np.ndarray:
        raise AssertionError("the own scan of a non-associative aggregator was used")


@pytest.mark.parametrize("total", [False, True])
def test_an_own_scan_is_used_only_when_the_aggregator_is_associative(total: bool) -> None:
    """DESIGN.md §3: ``scan(states)`` is a fast path of associative aggregators only; a non-associative
    one keeps the exact tree parenthesization whatever it defines."""
    for n in (1, 2, 5, 8):
        prefixes = prefix_scan(NonAssociativeWithAScan(), symbols(n), total=total)
        assert list(prefixes[0]) == [expected_prefix(i) for i in range(n + total)]


class Widened(Twisted):
    """Right shapes, wrong dtype: the plugin bug of a ``.double()`` left in ``forward``."""

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return super().forward(older, newer).double()

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*batch_shape, self.width)  # float32, as the chunk states here


@pytest.mark.parametrize("mode", ["tree", "sequential", "online"])
def test_an_aggregator_returning_another_dtype_is_named_where_it_happens(mode: str) -> None:
    """Shapes alone were compared, so a float64 result from float32 inputs failed in the head that
    read the prefix ("mixed dtype (CPU)"), blamed on the head's line."""
    from psmsearch.scan import StateShapeError
    from psmsearch.trial import where_raised

    states = torch.randn(2, 5, 3)  # [B, N, width], float32
    pattern = (r"aggregator 'Widened' \(forward at .*test_scan\.py:\d+\) returned torch\.float64 for inputs of "
               r"torch\.float32; agg\(older, newer\) must return a state of newer's dtype and device")
    with pytest.raises(StateShapeError, match=pattern) as caught:
        if mode == "online":
            scan = OnlineScan(Widened(3))
            for i in range(5):
                scan.push(states[:, i])
        else:
            prefix_scan(Widened(3), states, mode=mode)
    assert where_raised(caught.value) == ""


class Elsewhere(Twisted):
    """Right shapes on the wrong device (the meta device stands in for a GPU here)."""

    def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
        return torch.empty(newer.shape, dtype=newer.dtype, device="meta")


def test_an_aggregator_returning_a_tensor_on_another_device_is_named() -> None:
    from psmsearch.scan import StateShapeError

    with pytest.raises(StateShapeError, match=r"'Elsewhere' .* returned a tensor on meta for inputs on cpu"):
        prefix_scan(Elsewhere(3), torch.randn(2, 5, 3, dtype=torch.float64), mode="tree")


def test_an_initial_state_of_another_dtype_is_named() -> None:
    from psmsearch.scan import StateShapeError

    class SingleStart(Twisted):
        def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(*batch_shape, self.width, dtype=torch.float32)

    with pytest.raises(StateShapeError, match=r"initial_state\(\(2,\)\) returned torch\.float32 for inputs of "
                                              r"torch\.float64; it must return a state of the chunk states' dtype"):
        prefix_scan(SingleStart(3), torch.randn(2, 5, 3, dtype=torch.float64), mode="tree")


def test_autocast_may_change_a_states_dtype() -> None:
    """Under autocast a matmul in ``agg`` returns bfloat16 for float32 inputs by design: not refused."""

    class Matmul(Twisted):
        def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
            return (older + newer) @ torch.eye(self.width, dtype=older.dtype)  # bfloat16 under autocast

        def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
            return torch.zeros(*batch_shape, self.width)

    states = torch.randn(2, 5, 3)  # [B, N, width], float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert Matmul(3)(states[:, 0], states[:, 1]).dtype == torch.bfloat16
        out = prefix_scan(Matmul(3), states, mode="tree")
    assert out.shape == (2, 5, 3)
    from psmsearch.scan import StateShapeError

    class Rounding(Matmul):
        def forward(self, older: torch.Tensor, newer: torch.Tensor) -> torch.Tensor:
            return super().forward(older, newer).to(torch.bfloat16)

    with pytest.raises(StateShapeError, match=r"returned torch\.bfloat16 for inputs of torch\.float32"):
        prefix_scan(Rounding(3), states, mode="tree")  # outside autocast the same result is refused


class CastingOwnScan(Twisted):
    """Associative in name, with its own ``scan`` returning float64 prefixes of float32 states."""

    associative = True

    def scan(self, states: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.zeros_like(states[:, :1]), states[:, :-1]], dim=1).double()


def test_an_own_scan_of_another_dtype_is_named() -> None:
    """The own-scan path (the default for the affine aggregators) compared shapes only."""
    from psmsearch.scan import StateShapeError

    with pytest.raises(StateShapeError, match=r"'CastingOwnScan' \(scan at .*test_scan\.py:\d+\): scan returned "
                                              r"torch\.float64 for inputs of torch\.float32; it must return the "
                                              r"exclusive prefixes in the chunk states' dtype and device"):
        prefix_scan(CastingOwnScan(3), torch.randn(2, 5, 3))


def test_chunk_states_without_a_chunk_dim_are_refused_naming_the_layout() -> None:
    """A 1-D tensor raised IndexError from deep inside the states module."""
    with pytest.raises(ValueError, match=r"chunk states must be \[B, N, \.\.\.\] \(batch, then chunk index\); got a "
                                         r"tensor of shape \(5,\)"):
        prefix_scan(Twisted(3), torch.randn(5))
    with pytest.raises(ValueError, match=r"must share \[B, N\]; got shapes \[\(2, 5, 3\), \(2, 4, 3\)\]"):
        prefix_scan(Twisted(3), (torch.randn(2, 5, 3), torch.randn(2, 4, 3)))
    with pytest.raises(TypeError, match="tensors or tuples of tensors .* got a list"):
        prefix_scan(Twisted(3), [torch.randn(2, 5, 3)])  # type: ignore[arg-type]


def test_an_online_scan_refuses_a_state_of_another_batch_shape() -> None:
    """It failed inside the aggregator, with a torch size error and no word of the scan's batch."""
    scan = OnlineScan(Twisted(3))
    scan.push(torch.randn(3, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"batch dims \(2,\), but this scan is for batch shape \(3,\)"):
        scan.push(torch.randn(2, 3, dtype=torch.float64))
    assert scan.count == 1  # the refused state was not counted
    with pytest.raises(ValueError, match=r"batch dims \(3,\), but this scan is for batch shape \(2,\)"):
        OnlineScan(Twisted(3), (2,)).push(torch.randn(3, 3, dtype=torch.float64))


class WrongStart(Twisted):
    """Its ``initial_state`` has the batch dims but the wrong state shape."""

    def initial_state(self, batch_shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*batch_shape, 2, 4, dtype=torch.float64)


def test_the_online_scan_checks_the_initial_state_as_the_tree_does() -> None:
    """Before any push it returned initial_state unchecked where prefix_scan refused it: the three
    paths must agree (DESIGN §2). A batchless one is refused at once; one of the wrong state shape at
    the first push, the first time the chunk states' shape is known."""
    from psmsearch.scan import StateShapeError

    with pytest.raises(StateShapeError, match=r"initial_state\(\(2,\)\) returned shapes \[\(3,\)\]; initial_state "
                                              r"must return a state whose leading dims are the batch shape"):
        OnlineScan(BatchlessStart(3), (2,)).prefix()
    message = r"'WrongStart' \(initial_state at .*\): initial_state\(\(3,\)\) returned shapes \[\(3, 2, 4\)\], but " \
              r"the chunk states have shapes \[\(3, 3\)\]"
    with pytest.raises(StateShapeError, match=message):
        prefix_scan(WrongStart(3), torch.randn(3, 2, 3, dtype=torch.float64), mode="tree")
    with pytest.raises(StateShapeError, match=message):
        OnlineScan(WrongStart(3), (3,)).push(torch.randn(3, 3, dtype=torch.float64))
