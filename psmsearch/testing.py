"""The component contract suite (``psmsearch check``), importable for plugin authors' own tests.

Each check builds the component with its default hyperparameters next to compatible partners
from the registry (same ``state_kind``), provokes the property it is about and reports pass or
fail with the evidence. In a plugin's test suite::

    from psmsearch.testing import assert_component_ok

    def test_my_aggregator_keeps_the_contract():
        assert_component_ok(MyAggregator)

Checks: shapes, finite outputs, gradients (and a float64 ``gradcheck`` of each component's own
backward against finite differences), token-locality of encoder features, causality, chunk
locality and partial chunks of heads, tree == sequential == online scans, associativity where
claimed (and the fast ``scan`` against the tree, outputs and gradients, from 1 to 65 chunks),
streaming == parallel for a whole layer, sequences of a batch computed independently, the layer in
float64, and ``state_nbytes`` matching the bytes streaming really holds. Components are checked in
``eval()`` mode, so dropout does not make equal paths differ.

Every check runs twice: on the component as it is built, and again after its parameters have been
randomised (:func:`_randomise_parameters`). A property that holds only at initialisation (a
zero-initialised branch that reads future tokens, an identity matrix that makes a non-associative
combine associative until the first training step) passes the first run and fails the second; the
failure then says so.
"""

from __future__ import annotations

import copy
import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch

from psmsearch import states as S
from psmsearch.components import Aggregator, Component, ComponentContext, Encoder, Head
from psmsearch.composer import PSMLayer
from psmsearch.errors import suggest, where_raised
from psmsearch.registry import ComponentInfo, Registry, get_registry
from psmsearch.scan import OnlineScan, _component_origin, prefix_scan

D_MODEL = 32
CHUNK = 4
BATCH = 2
ATOL = 1e-4
FAST_SCAN_CHUNKS = (1, 2, 3, 7, 8, 9, 16, 17, 33, 65)  # block edges of blocked and kernel scans (64 steps and up)


@dataclass(frozen=True)
class CheckResult:
    """One check of one component: passed or not, and why."""

    component: str
    check: str
    passed: bool
    message: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        detail = f": {self.message}" if self.message else ""
        return f"{status}  {self.component:<28} {self.check}{detail}"


class ContractViolation(AssertionError):
    """A check found evidence that the component breaks its contract."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


def _max_diff(a: Any, b: Any) -> float:
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(S.leaves(a), S.leaves(b)) if x.numel()]
    return max(diffs, default=0.0)


def _shapes(state: Any) -> list[list[int]]:
    return [list(leaf.shape) for leaf in S.leaves(state)]


def _all_finite(state: Any) -> bool:
    return all(torch.isfinite(leaf).all().item() for leaf in S.leaves(state))


@dataclass
class _Assembly:
    """A component under test together with the partners it runs with."""

    encoder: Encoder
    aggregator: Aggregator
    head: Head
    layer: PSMLayer
    registry: Registry

    def inputs(self, n_chunks: int, seed: int, width: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        c = width or self.layer.chunk_size
        return torch.randn(BATCH, n_chunks, c, D_MODEL, generator=generator)  # [B, N, c, d]

    def chunk_states(self, n_chunks: int, seed: int) -> Any:
        return self.encoder.summarize(self.encoder.features(self.inputs(n_chunks, seed)))  # [B, N, ...]


def _class_location(cls: type) -> str:
    """`` (at FILE:LINE)`` of a class definition, or ``""`` where Python cannot tell."""
    try:
        return f" (at {inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]})"
    except (TypeError, OSError):
        return ""


def _partner(registry: Registry, kind: str, state_kind: str) -> type[Component]:
    for name in registry.names(kind):
        info = registry.get(kind, name)
        if info.state_kind == state_kind:
            return info.cls
    kinds = sorted({registry.get(kind, other).state_kind for other in registry.names(kind)})
    known = f" (state kinds of the registered {kind}s: {', '.join(kinds)})" if kinds else f" (no {kind} is registered)"
    raise ContractViolation(f"no registered {kind} has state_kind {state_kind!r} to test against{known}."
                            f"{suggest(state_kind, kinds)}")


def _assemble(cls: type[Component], registry: Registry, seed: int) -> _Assembly:
    torch.manual_seed(seed)
    state_kind = cls.state_kind
    classes = {kind: _partner(registry, kind, state_kind) if kind != cls.kind else cls for kind in ("encoder", "aggregator", "head")}
    context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK)
    encoder = classes["encoder"](context)
    context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK, encoder=encoder)
    aggregator = classes["aggregator"](context)
    head = classes["head"](context)
    layer = PSMLayer(encoder, aggregator, head, CHUNK).eval()  # dropout off: the checks compare paths exactly
    return _Assembly(encoder, aggregator, head, layer, registry)


# --- encoder checks ---------------------------------------------------------------------------


def _encoder_shapes(a: _Assembly) -> str:
    x = a.inputs(3, 1)  # [B, 3, c, d]
    f = a.encoder.features(x)
    for leaf in S.leaves(f):
        _require(list(leaf.shape[:3]) == [BATCH, 3, CHUNK], f"features leaf shape {list(leaf.shape)} does not start with [B, N, c] = {[BATCH, 3, CHUNK]}")
    state = a.encoder.summarize(f)
    shape = a.encoder.state_shape
    expected = [[BATCH, 3, *s] for s in (shape if shape and isinstance(shape[0], tuple) else (shape,))]
    _require(_shapes(state) == expected, f"summarize gave {_shapes(state)}, state_shape promises {expected}")
    return f"state {_shapes(state)}"


def _encoder_token_local(a: _Assembly) -> str:
    x = a.inputs(1, 2)[:, 0]  # [B, c, d]
    whole = a.encoder.features(x)
    for j in range(CHUNK):
        single = a.encoder.features(x[:, j : j + 1], offset=j)
        diff = _max_diff(S.take(whole, 1, slice(j, j + 1)), single)
        _require(diff <= ATOL, f"features of token {j} alone (offset={j}) differ from the whole chunk's by {diff:.3g}")
    bumped = x.clone()
    bumped[:, 0] += 1.0
    diff = _max_diff(S.take(a.encoder.features(bumped), 1, slice(1, None)), S.take(whole, 1, slice(1, None)))
    _require(diff <= ATOL, f"changing token 0 changed the features of later tokens by {diff:.3g}")
    return f"{CHUNK} positions"


def _encoder_gradients(a: _Assembly) -> str:
    x = a.inputs(2, 3).requires_grad_(True)
    state = a.encoder.summarize(a.encoder.features(x))
    total = sum(leaf.double().square().sum() for leaf in S.leaves(state))
    (grad,) = torch.autograd.grad(total, x)
    _require(bool(torch.isfinite(grad).all()), "gradient w.r.t. the input has non-finite values")
    _require(grad.abs().sum().item() > 0, "gradient w.r.t. the input is identically zero")
    checked = _gradcheck(a.encoder, lambda enc, x: (*S.leaves(enc.features(x)), *S.leaves(enc.summarize(enc.features(x)))),
                         [a.inputs(2, 3)], "features and summarize")
    return f"finite, non-zero; {checked}"


# --- aggregator checks ------------------------------------------------------------------------


def _aggregator_shapes(a: _Assembly) -> str:
    older, newer = a.chunk_states(3, 4), a.chunk_states(3, 5)
    out = a.aggregator(older, newer)
    if _shapes(out) != _shapes(newer):  # the location re-runs forward under a profiler: on failure only
        raise ContractViolation(f"agg(older, newer){_component_origin(a.aggregator, 'forward', (older, newer))} "
                                f"has shapes {_shapes(out)}, inputs have {_shapes(newer)}")
    init = a.aggregator.initial_state((BATCH,))
    expected = [s[:1] + s[2:] for s in _shapes(newer)]
    if _shapes(init) != expected:
        raise ContractViolation(f"initial_state((B,)){_component_origin(a.aggregator, 'initial_state', ((BATCH,),))} "
                                f"has shapes {_shapes(init)}, expected {expected}")
    return f"{_shapes(out)}"


def _aggregator_finite(a: _Assembly) -> str:
    out = a.aggregator(a.chunk_states(5, 6), a.chunk_states(5, 7))
    _require(_all_finite(out), "agg(older, newer) produced NaN or inf")
    _require(_all_finite(a.aggregator.initial_state((BATCH,))), "initial_state produced NaN or inf")
    return "all finite"


def _aggregator_gradients(a: _Assembly) -> str:
    older = tuple_requires_grad(a.chunk_states(2, 8))
    newer = tuple_requires_grad(a.chunk_states(2, 9))
    out = a.aggregator(older, newer)
    total = sum(leaf.double().square().sum() for leaf in S.leaves(out))
    grads = torch.autograd.grad(total, S.leaves(older) + S.leaves(newer), allow_unused=True)
    n_older = len(S.leaves(older))
    for side, part in (("older", grads[:n_older]), ("newer", grads[n_older:])):
        present = [g for g in part if g is not None]
        _require(bool(present) and all(torch.isfinite(g).all() for g in present), f"gradient w.r.t. {side} is missing or non-finite")
        _require(sum(g.abs().sum().item() for g in present) > 0, f"gradient w.r.t. {side} is identically zero")
    checked = _gradcheck(a.aggregator, lambda agg, old, new: tuple(S.leaves(agg(old, new))),
                         [a.chunk_states(2, 8), a.chunk_states(2, 9)], "agg(older, newer)")
    if type(a.aggregator).associative and a.aggregator.scan(a.chunk_states(1, 43)) is not None:
        n = FAST_SCAN_CHUNKS[-1]
        _gradcheck(a.aggregator, lambda agg, states: tuple(S.leaves(agg.scan(states))), [a.chunk_states(n, 11)], f"scan() at N={n}")
        checked += f"; and of scan() at N={n}"
    return f"flows to both operands; {checked}"


class _Probe(torch.nn.Module):
    """Holds a component so ``torch.func.functional_call`` can swap in parameters for any method."""

    def __init__(self, component: torch.nn.Module, compute: Callable[..., Any]) -> None:
        super().__init__()
        self.component = component
        self.compute = compute

    def forward(self, *inputs: Any) -> Any:
        return self.compute(self.component, *inputs)


def _gradcheck(component: Component, compute: Callable[..., Any], inputs: list[Any], what: str) -> str:
    """Check the backward of ``compute(component, *inputs)`` against central differences in float64.

    The derivative along one random direction through every floating-point input leaf and every
    parameter, of a random weighting of every differentiable output: ``vᵀ J u`` by backward
    against ``vᵀ (f(x + εu) - f(x - εu)) / 2ε`` (what ``torch.autograd.gradcheck``'s fast mode
    computes, without its slow full-Jacobian rerun on failure, which takes minutes here). The
    other gradient checks compare paths that share one backward, so a hand-written backward (a
    custom ``autograd.Function``, a kernel) that is wrong agrees with itself there; only finite
    differences catch it.
    """
    probe = _Probe(copy.deepcopy(component).double(), compute)
    names = [name for name, p in probe.named_parameters() if p.requires_grad]
    params = [p.detach().clone().requires_grad_(True) for p in probe.parameters() if p.requires_grad]
    structures = [S.tree_map(lambda leaf: leaf.detach().double().requires_grad_(True)
                             if leaf.dtype.is_floating_point else leaf, x) for x in inputs]
    arguments = [*(leaf for x in structures for leaf in S.leaves(x)), *params]
    n_inputs = len(arguments) - len(params)

    def outputs(args: list[torch.Tensor]) -> list[torch.Tensor]:
        rest = iter(args[:n_inputs])
        rebuilt = [S.tree_map(lambda _: next(rest), x) for x in structures]
        return S.leaves(torch.func.functional_call(probe, dict(zip(names, args[n_inputs:])), tuple(rebuilt)))

    generator = torch.Generator().manual_seed(70)
    directions = [torch.randn(a.shape, generator=generator, dtype=torch.float64) if a.requires_grad else None
                  for a in arguments]
    base = outputs(arguments)
    kept = [i for i, out in enumerate(base) if out.requires_grad and out.numel()]  # constant gates, empty slots: no
    weights = {i: torch.randn(base[i].shape, generator=generator, dtype=torch.float64) for i in kept}
    wrt = [a for a in arguments if a.requires_grad]
    grads = torch.autograd.grad(sum((base[i] * weights[i]).sum() for i in kept), wrt, allow_unused=True)
    along = [d for d in directions if d is not None]
    analytic = sum((g * d).sum().item() for g, d in zip(grads, along) if g is not None)
    scale = sum((g * d).abs().sum().item() for g, d in zip(grads, along) if g is not None)

    def shifted(step: float) -> list[torch.Tensor]:
        with torch.no_grad():
            return outputs([a + step * d if d is not None else a for a, d in zip(arguments, directions)])

    eps = 1e-6
    plus, minus = shifted(eps), shifted(-eps)
    numeric = sum(((plus[i] - minus[i]) * weights[i]).sum().item() for i in kept) / (2 * eps)
    _require(abs(analytic - numeric) <= 1e-6 * scale + 1e-9,
             f"{what}: its backward disagrees with finite differences in float64: along a random direction the "
             f"derivative is {analytic:.8g} by backward and {numeric:.8g} by central differences")
    return f"float64 directional derivative of {what} over {n_inputs} input leaves and {len(params)} parameters"


def tuple_requires_grad(state: Any) -> Any:
    """A detached copy of ``state`` whose leaves require grad."""
    return S.tree_map(lambda leaf: leaf.detach().clone().requires_grad_(True), state)


def _online_prefixes(agg: Aggregator, chunk_states: Any) -> list[Any]:
    scan = OnlineScan(agg, (BATCH,))
    out = []
    for i in range(S.size(chunk_states, 1)):
        out.append(scan.prefix())
        scan.push(S.take(chunk_states, 1, i))
    return out


def _aggregator_scan_paths(a: _Assembly) -> str:
    for n in (1, 2, 3, 5, 8, 13):
        states = a.chunk_states(n, 10 + n)
        tree = prefix_scan(a.aggregator, states, mode="tree")
        sequential = prefix_scan(a.aggregator, states, mode="sequential")
        online = _online_prefixes(a.aggregator, states)
        diff = _max_diff(tree, sequential)
        _require(diff <= ATOL, f"N={n}: tree and sequential prefixes differ by {diff:.3g}")
        for i, p in enumerate(online):
            diff = _max_diff(S.take(tree, 1, i), p)
            _require(diff <= ATOL, f"N={n}: online prefix {i} differs from the tree's by {diff:.3g}")
    states = tuple_requires_grad(a.chunk_states(6, 30))
    grads = []
    for prefixes in (prefix_scan(a.aggregator, states, mode="tree"), _online_prefixes(a.aggregator, states)):
        total = sum(leaf.double().square().sum() for leaf in S.leaves(prefixes if not isinstance(prefixes, list) else tuple(prefixes)))
        grads.append(torch.autograd.grad(total, S.leaves(states), allow_unused=True))
    for g_tree, g_online in zip(*grads):
        if g_tree is None or g_online is None:
            _require(g_tree is None and g_online is None, "gradient reaches the states in one scan path only")
            continue
        diff = (g_tree - g_online).abs().max().item()
        _require(diff <= ATOL * 10, f"tree and online gradients differ by {diff:.3g}")
    return "N in 1,2,3,5,8,13; outputs and gradients"


def _aggregator_associativity(a: _Assembly) -> str:
    if not type(a.aggregator).associative:
        return "not claimed"
    agg = copy.deepcopy(a.aggregator).double()
    x, y, z = (S.tree_map(lambda leaf: leaf.double(), a.chunk_states(2, s)) for s in (40, 41, 42))
    left = agg(agg(x, y), z)
    right = agg(x, agg(y, z))
    diff = _max_diff(left, right)
    scale = max(leaf.abs().max().item() for leaf in S.leaves(left)) or 1.0
    if diff > 1e-9 * max(scale, 1.0):
        raise ContractViolation(f"claims associative but (xy)z and x(yz) differ by {diff:.3g} (float64): set "
                                f"associative = False on {type(a.aggregator).__name__}"
                                f"{_class_location(type(a.aggregator))}, unless forward(older, newer) is meant to be "
                                "associative")
    if a.aggregator.scan(a.chunk_states(1, 43)) is None:
        return "(xy)z == x(yz) in float64; no fast scan"
    for n in FAST_SCAN_CHUNKS:
        states = a.chunk_states(n, 43 + n)
        diff = _max_diff(a.aggregator.scan(states), prefix_scan(a.aggregator, states, mode="tree"))
        _require(diff <= ATOL, f"N={n}: its fast scan() differs from the tree scan by {diff:.3g}; scan(states "
                 "[B, N, ...]) must return the exclusive prefixes, position 0 the initial_state and position i "
                 "the fold of states 0..i-1 oldest first, as prefix_scan(aggregator, states) does (an inclusive "
                 "scan is one position off)")
    for n in (17, 65):
        states = tuple_requires_grad(a.chunk_states(n, 90 + n))
        grads = []
        for prefixes in (a.aggregator.scan(states), prefix_scan(a.aggregator, states, mode="tree")):
            total = sum(leaf.double().square().sum() for leaf in S.leaves(prefixes))
            grads.append(torch.autograd.grad(total, S.leaves(states), allow_unused=True))
        for g_fast, g_tree in zip(*grads):
            _require((g_fast is None) == (g_tree is None), f"N={n}: gradient reaches the states in one of fast scan and tree only")
            if g_fast is not None:
                diff = (g_fast - g_tree).abs().max().item()
                _require(diff <= ATOL * 10 * max(1.0, g_tree.abs().max().item()),
                         f"N={n}: fast scan() and tree gradients differ by {diff:.3g}")
    return f"(xy)z == x(yz) in float64; fast scan == tree at N in {', '.join(map(str, FAST_SCAN_CHUNKS))}, gradients at 17, 65"


# --- head checks ------------------------------------------------------------------------------


def _head_inputs(a: _Assembly) -> tuple[Any, torch.Tensor]:
    prefix = prefix_scan(a.aggregator, a.chunk_states(3, 50))  # [B, 3, ...]
    return prefix, a.inputs(3, 51)  # x [B, 3, c, d]


def _head_shapes(a: _Assembly) -> str:
    prefix, x = _head_inputs(a)
    for width in (CHUNK, 1, max(1, CHUNK - 1)):
        y = a.head(prefix, a.encoder.features(x[:, :, :width]))
        _require(list(y.shape) == [BATCH, 3, width, D_MODEL], f"c'={width}: output shape {list(y.shape)}, expected {[BATCH, 3, width, D_MODEL]}")
        _require(bool(torch.isfinite(y).all()), f"c'={width}: output has NaN or inf")
    return "full and partial chunks"


def _head_causal(a: _Assembly) -> str:
    prefix, x = _head_inputs(a)
    base = a.head(prefix, a.encoder.features(x))
    for j in range(1, CHUNK):
        bumped = x.clone()
        bumped[:, :, j] += 1.0
        y = a.head(prefix, a.encoder.features(bumped))
        diff = (y[:, :, :j] - base[:, :, :j]).abs().max().item()
        _require(diff <= ATOL, f"changing chunk token {j} changed outputs at positions < {j} by {diff:.3g}")
    return f"{CHUNK - 1} perturbations"


def _head_chunk_local(a: _Assembly) -> str:
    """Chunk ``n``'s outputs may read chunk ``n``'s features and ``prefix[n]`` only, not other chunks'."""
    prefix, x = _head_inputs(a)
    base = a.head(prefix, a.encoder.features(x))  # [B, N, c, d]
    n_chunks = x.shape[1]
    for m in range(n_chunks):
        bumped = x.clone()
        bumped[:, m] += 1.0
        y = a.head(prefix, a.encoder.features(bumped))
        bumped_prefix = S.tree_map(lambda leaf, m=m: _bump_chunk(leaf, m), prefix)
        y_prefix = a.head(bumped_prefix, a.encoder.features(x))
        for n in range(n_chunks):
            if n == m:
                continue
            diff = (y[:, n] - base[:, n]).abs().max().item()
            _require(diff <= ATOL, f"changing chunk {m}'s tokens changed chunk {n}'s outputs by {diff:.3g}: a head "
                                   "may read only its own chunk and its own prefix state")
            diff = (y_prefix[:, n] - base[:, n]).abs().max().item()
            _require(diff <= ATOL, f"changing chunk {m}'s prefix state changed chunk {n}'s outputs by {diff:.3g}: a "
                                   "head may read only its own chunk and its own prefix state")
    return f"{n_chunks} chunks, tokens and prefix states"


def _bump_chunk(leaf: torch.Tensor, chunk: int) -> torch.Tensor:
    """``leaf [B, N, ...]`` with chunk ``chunk`` shifted by one (a state leaf of every chunk)."""
    bumped = leaf.clone()
    bumped[:, chunk] += 1.0
    return bumped


def _head_partial(a: _Assembly) -> str:
    prefix, x = _head_inputs(a)
    f = a.encoder.features(x)
    full = a.head(prefix, f)
    for width in range(1, CHUNK):
        part = a.head(prefix, S.take(f, 2, slice(0, width)))
        diff = (part - full[:, :, :width]).abs().max().item()
        _require(diff <= ATOL, f"c'={width}: partial-chunk output differs from the full chunk's first {width} by {diff:.3g}")
    return f"c' in 1..{CHUNK - 1}"


def _head_forward_last(a: _Assembly) -> str:
    """``forward_last`` (the streaming path's one-row readout) equals ``forward``'s last row at every width."""
    prefix, x = _head_inputs(a)
    f = a.encoder.features(x)  # [B, N, c, ...]
    for width in range(1, CHUNK + 1):
        part = S.take(f, 2, slice(0, width))  # [B, N, c', ...]
        want = a.head(prefix, part)[..., -1, :]  # [B, N, d]
        got = a.head.forward_last(prefix, part)
        _require(list(got.shape) == list(want.shape),
                 f"c'={width}: forward_last returned shape {list(got.shape)}, expected {list(want.shape)} "
                 "(forward(prefix, f)[..., -1, :])")
        diff = (got - want).abs().max().item()
        _require(diff <= ATOL, f"c'={width}: forward_last differs from forward(prefix, f)[..., -1, :] by {diff:.3g}")
    overridden = type(a.head).forward_last is not Head.forward_last
    return f"c' in 1..{CHUNK}" + ("" if overridden else " (the default: forward's last row)")


def _head_gradients(a: _Assembly) -> str:
    prefix, x = _head_inputs(a)
    prefix = tuple_requires_grad(prefix)
    x = x.requires_grad_(True)
    y = a.head(prefix, a.encoder.features(x))
    grads = torch.autograd.grad(y.double().square().sum(), [x, *S.leaves(prefix)], allow_unused=True)
    _require(grads[0] is not None and grads[0].abs().sum().item() > 0, "no gradient reaches the chunk tokens")
    prefix_grads = [g for g in grads[1:] if g is not None]
    _require(bool(prefix_grads) and sum(g.abs().sum().item() for g in prefix_grads) > 0, "no gradient reaches the prefix state")
    _require(all(torch.isfinite(g).all() for g in grads if g is not None), "gradients have NaN or inf")
    prefix, x = _head_inputs(a)
    checked = _gradcheck(a.head, lambda head, p, f: head(p, f), [prefix, a.encoder.features(x)], "head(prefix, f)")
    return f"reaches prefix and chunk; {checked}"


def _paths_output_and_gradients(layer: PSMLayer, x: torch.Tensor, fused: bool) -> tuple[torch.Tensor, list[Any]]:
    """``layer(x, fused=fused)`` and the gradients of its squared sum w.r.t. ``x`` and every parameter."""
    x = x.clone().requires_grad_(True)
    y = layer(x, fused=fused)  # [B, T, d]
    inputs = [x, *(p for p in layer.parameters() if p.requires_grad)]
    if not y.requires_grad:
        return y, [None] * len(inputs)
    return y.detach(), list(torch.autograd.grad(y.double().square().sum(), inputs, allow_unused=True))


def _compare_paths(layer: PSMLayer, x: torch.Tensor, who: str) -> int:
    """Outputs and gradients of the fused and the generic pass must agree; returns the gradient count."""
    y_fused, g_fused = _paths_output_and_gradients(layer, x, True)
    y_generic, g_generic = _paths_output_and_gradients(layer, x, False)
    diff = (y_fused - y_generic).abs().max().item()
    _require(diff <= ATOL, f"{who}, T={x.shape[1]}: fused_forward differs from the generic path by {diff:.3g}")
    for index, (g, g_ref) in enumerate(zip(g_fused, g_generic)):
        _require((g is None) == (g_ref is None),
                 f"{who}: gradient {index} (0 is the input) reaches {'only the fused' if g_ref is None else 'only the generic'} path")
        if g is not None:
            scale = max(g_ref.abs().max().item(), 1.0)
            diff = (g - g_ref).abs().max().item()
            _require(diff <= ATOL * scale, f"{who}: gradient {index} (0 is the input) differs between the paths by {diff:.3g}")
    return len(g_fused)


def _head_fused_equals_generic(a: _Assembly) -> str:
    """A head that offers ``fused_forward`` must compute what summaries, scan and readout compute.

    Run with every registered encoder of the head's state kind (and the kind's aggregator), since a
    fused kernel may mishandle one encoder's features only (zero gates, say). An encoder that does
    not build with default hyperparameters at this check's width is skipped, and named.
    """
    if type(a.head).fused_forward is Head.fused_forward:
        return "no fused path (the generic one is used)"
    x = torch.randn(BATCH, 3 * CHUNK - 1, D_MODEL, generator=torch.Generator().manual_seed(53))  # [B, T, d]
    compared, skipped, gradients = [], [], 0
    for name in a.registry.names("encoder"):
        info = a.registry.get("encoder", name)
        if info.state_kind != a.head.state_kind:
            continue
        torch.manual_seed(54)
        try:
            encoder = info.cls(ComponentContext(d_model=D_MODEL, chunk_size=CHUNK))
        except Exception as err:  # noqa: BLE001 - another plugin's encoder: report, do not blame the head
            skipped.append(f"{name} ({type(err).__name__}: {err})")
            continue
        context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK, encoder=encoder)
        layer = PSMLayer(encoder, type(a.aggregator)(context), type(a.head)(context), CHUNK).eval()
        try:
            f = encoder.features(a.inputs(3, 52))  # [B, 3, c, ...]
            if layer.head.fused_forward(layer.encoder, layer.aggregator, f, required=True) is None:
                continue
            gradients = _compare_paths(layer, x, f"encoder {name!r}")
        except ContractViolation:
            raise
        except Exception as err:  # noqa: BLE001
            raise ContractViolation(f"encoder {name!r}: raised {type(err).__name__}: {err}") from err
        compared.append(name)
    note = f"; skipped encoders that do not build here: {'; '.join(skipped)}" if skipped else ""
    if not compared:
        return f"no fused path for any encoder (the generic one is used){note}"
    return f"T={x.shape[1]}, outputs and {gradients} gradients with encoders {', '.join(compared)}{note}"


# --- layer checks (every kind) ----------------------------------------------------------------


def _layer_stream_equals_parallel(a: _Assembly) -> str:
    generator = torch.Generator().manual_seed(60)
    length = 9 * CHUNK + 2  # 10 chunks: past a power of two, so the scans' block edges are crossed
    x = torch.randn(BATCH, length, D_MODEL, generator=generator)  # [B, T, d]
    with torch.no_grad():
        parallel = a.layer(x)
        stream = a.layer.stream(BATCH)
        streamed = torch.stack([stream.step(x[:, t]) for t in range(length)], dim=1)
        chunked = a.layer.stream(BATCH).feed(x)
    diff = (parallel - streamed).abs().max().item()
    _require(diff <= ATOL, f"T={length}: token-by-token streaming differs from the parallel forward by {diff:.3g}")
    diff = (parallel - chunked).abs().max().item()
    _require(diff <= ATOL, f"T={length}: chunk-wise streaming differs from the parallel forward by {diff:.3g}")
    return f"T={length}, c={CHUNK}"


def _layer_batch_independent(a: _Assembly) -> str:
    """Each sequence of a batch is computed on its own: a component that mixes the batch (a mean
    over dim 0, a batch-norm) agrees with itself on every path, so only changing the batch shows it.

    Sequence ``b`` of ``[a, b]`` is run again as ``[b, a']``: in another slot, beside a changed
    partner. A leak may run one way only (``f[:1]``, a ``[0]`` meant for another axis, hands
    sequence 0 to the others and leaves sequence 0 alone), so changing sequence 1 and watching
    sequence 0 would miss it; moving the watched sequence catches a leak in either direction (and
    a dependence on the slot) at the cost of one run per path.
    """
    generator = torch.Generator().manual_seed(62)
    x = torch.randn(2, 5 * CHUNK + 1, D_MODEL, generator=generator)  # [2, T, d]: sequences a, b
    changed = x[0] + torch.randn(x[0].shape, generator=generator)  # [T, d]: a'
    moved = torch.stack([x[1], changed])  # [2, T, d]: b, a'
    with torch.no_grad():
        for name, run in (("parallel", a.layer), ("streaming", lambda t: _streamed(a.layer, t))):
            diff = (run(moved)[0] - run(x)[1]).abs().max().item()
            _require(diff <= ATOL, f"{name}: sequence 1 run again in slot 0 beside a changed sequence gave outputs that "
                                   f"differ by {diff:.3g}; each sequence must be computed on its own")
    return "B=2, a sequence moved to the other slot beside a changed partner, parallel and streaming"


def _layer_float64(a: _Assembly) -> str:
    """The layer converted with ``.double()`` must compute in float64, parallel and streaming: a
    component that makes tensors without following its module's dtype (``torch.zeros(...)`` in
    ``initial_state``, a mask built in the default dtype) breaks here, and on other devices alike."""
    layer = copy.deepcopy(a.layer).double()
    x = torch.randn(BATCH, 2 * CHUNK + 1, D_MODEL, generator=torch.Generator().manual_seed(61))  # [B, T, d]
    with torch.no_grad():
        want = {"parallel": a.layer(x), "streaming": _streamed(a.layer, x)}
        init = layer.aggregator.initial_state((BATCH,))
        wrong = sorted({str(leaf.dtype) for leaf in S.leaves(init) if leaf.dtype != torch.float64})
        _require(not wrong, f"after .double(), initial_state((B,)) has dtype {', '.join(wrong)}: make it from a "
                            "parameter or buffer (new_zeros), so that it follows the module's dtype and device")
        got = {"parallel": layer(x.double()), "streaming": _streamed(layer, x.double())}
    for name, y in got.items():
        _require(y.dtype == torch.float64, f"after .double(), the {name} output is {y.dtype}")
        diff = (y - want[name].double()).abs().max().item()
        _require(diff <= 1e-3 * max(1.0, want[name].abs().max().item()),
                 f"after .double(), the {name} output differs from float32's by {diff:.3g}")
    return "parallel and streaming outputs in float64, close to float32's"


def _poisoned_like(t: torch.Tensor) -> torch.Tensor:
    """What ``to_empty`` might hand back, made deterministic: NaN, all False, or -1."""
    out = torch.empty_like(t, device="cpu")
    if out.is_floating_point() or out.is_complex():
        return out.fill_(float("nan"))
    return out.fill_(False) if out.dtype == torch.bool else out.fill_(-1)


def _layer_meta_build(a: _Assembly) -> str:
    """Built on the meta device, materialised (``to_empty``) and loaded from the state dict, the layer
    computes what it computed: the way large models are initialised. A buffer kept out of the state
    dict (``persistent=False``) must be made again when the module is materialised or loaded; here
    materialising fills every tensor with NaN (booleans False) instead of leaving uninitialised memory."""
    with torch.device("meta"):
        context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK)
        encoder = type(a.encoder)(context, **a.encoder.hparams)
        context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK, encoder=encoder)
        layer = PSMLayer(encoder, type(a.aggregator)(context, **a.aggregator.hparams),
                         type(a.head)(context, **a.head.hparams), CHUNK)
    layer._apply(_poisoned_like)  # to_empty(device="cpu"), with its memory made visibly wrong
    layer.load_state_dict(a.layer.state_dict())
    layer.eval()
    x = torch.randn(BATCH, 2 * CHUNK + 1, D_MODEL, generator=torch.Generator().manual_seed(62))  # [B, T, d]
    with torch.no_grad():
        for name, run in (("parallel", lambda net: net(x)), ("streaming", lambda net: _streamed(net, x))):
            diff = (run(layer) - run(a.layer)).abs().max().item()
            _require(diff <= ATOL, f"{name}: the layer built on the meta device, materialised and loaded from the "
                                   f"state dict differs by {diff:.3g} (a non-persistent buffer left as "
                                   "uninitialised memory? make it again in _apply or a load_state_dict post-hook)")
    return "meta build, to_empty, load_state_dict: parallel and streaming outputs equal"


def _streamed(layer: PSMLayer, x: torch.Tensor) -> torch.Tensor:
    """``layer`` run token by token over ``x [B, T, d]``."""
    stream = layer.stream(x.shape[0])
    return torch.stack([stream.step(x[:, t]) for t in range(x.shape[1])], dim=1)  # [B, T, d]


CHUNK_COUNTS = (1, 2, 3, 7, 8, 16)
"""Chunk counts at which streaming memory is measured: 2^k - 1 (most roots held) and 2^k (one root)."""


def _layer_state_nbytes(a: _Assembly) -> str:
    associative = type(a.aggregator).associative
    for batch in (BATCH, 1):  # batch 1 too: there a slice of a larger buffer is often contiguous, so a view slips through
        stream = a.layer.stream(batch)
        seen: list[int] = []
        with torch.no_grad():
            for n_chunks in CHUNK_COUNTS:
                while stream.scan.count < n_chunks:
                    stream.feed(torch.randn(batch, CHUNK, D_MODEL))
                measured, expected = stream.state_nbytes(), stream.expected_nbytes()
                _require(measured == expected, f"B={batch}, after {n_chunks} chunks streaming holds {measured} bytes but state_nbytes accounts for {expected}")
                roots = stream.scan.num_roots
                limit = 1 if associative else math.ceil(math.log2(n_chunks + 1))
                _require(roots <= limit, f"after {n_chunks} chunks {roots} roots are held, at most {limit} allowed")
                seen.append(measured)
        if associative:
            _require(len(set(seen)) == 1, f"associative aggregator but retained bytes grow with n: {seen}")
    tokens = _partial_chunk_nbytes(a)
    counts = ", ".join(str(n) for n in CHUNK_COUNTS)
    return f"B=1 bytes after {counts} chunks: {seen}; and after each of {tokens} tokens streamed one at a time"


def _partial_chunk_nbytes(a: _Assembly) -> int:
    """Between chunk boundaries the stream also holds the partial chunk's features, which
    ``expected_nbytes`` counts at their logical size: token by token over two chunks and one more
    token, measured and expected bytes must agree there too. Features that are views of a wider
    buffer keep all of it alive while buffered, which whole-chunk feeds never show. Returns the
    number of tokens streamed."""
    tokens = 2 * CHUNK + 1
    for batch in (BATCH, 1):
        stream = a.layer.stream(batch)
        with torch.no_grad():
            for t in range(1, tokens + 1):
                stream.step(torch.randn(batch, D_MODEL))
                measured, expected = stream.state_nbytes(), stream.expected_nbytes()
                _require(measured == expected, f"B={batch}, after {t} tokens streamed one at a time ({stream.position} in "
                                               f"the partial chunk) streaming holds {measured} bytes but state_nbytes and "
                                               f"the buffered features account for {expected}")
    return tokens


Check = Callable[[_Assembly], str]

CHECKS: dict[str, list[tuple[str, Check]]] = {
    "encoder": [
        ("shapes", _encoder_shapes),
        ("token_local_features", _encoder_token_local),
        ("gradients", _encoder_gradients),
    ],
    "aggregator": [
        ("shapes", _aggregator_shapes),
        ("finite_outputs", _aggregator_finite),
        ("gradients", _aggregator_gradients),
        ("tree_equals_online", _aggregator_scan_paths),
        ("associativity", _aggregator_associativity),
    ],
    "head": [
        ("shapes_and_finite", _head_shapes),
        ("causal_within_chunk", _head_causal),
        ("chunk_local", _head_chunk_local),
        ("partial_chunks", _head_partial),
        ("forward_last", _head_forward_last),
        ("gradients", _head_gradients),
        ("fused_equals_generic", _head_fused_equals_generic),
    ],
}
LAYER_CHECKS: list[tuple[str, Check]] = [
    ("stream_equals_parallel", _layer_stream_equals_parallel),
    ("batch_independent", _layer_batch_independent),
    ("float64", _layer_float64),
    ("state_nbytes_matches_streaming", _layer_state_nbytes),
    ("meta_build", _layer_meta_build),
]


def check_component(component: type[Component] | ComponentInfo, registry: Registry | None = None, seed: int = 0) -> list[CheckResult]:
    """Run every contract check for one encoder, aggregator or head class; never raises."""
    registry = registry or get_registry()
    cls = component.cls if isinstance(component, ComponentInfo) else component
    if not (isinstance(cls, type) and issubclass(cls, (Encoder, Aggregator, Head))):
        return [CheckResult(repr(cls), "build", False, "not a subclass of psmsearch.Encoder, Aggregator or Head")]
    label = f"{cls.kind}:{cls.name or cls.__name__}"
    try:
        assembly = _assemble(cls, registry, seed)
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        return [CheckResult(label, "build", False, f"{type(err).__name__}: {err}{where_raised(err)}")]
    results = [CheckResult(label, "build", True, f"with {_partners(assembly, cls)}")]
    try:
        randomised: _Assembly | None = copy.deepcopy(assembly, {id(assembly.registry): assembly.registry})
        _randomise_parameters(getattr(randomised, cls.kind), seed)
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        randomised = None
        results.append(CheckResult(label, "randomised_copy", False, f"copy.deepcopy of the component raised "
                                   f"{type(err).__name__}: {err}; every check also runs on a copy with randomised "
                                   "parameters, so a component must be deep-copyable (as torch modules are)"))
    for check_name, check in CHECKS[cls.kind] + LAYER_CHECKS:
        passed, message = _run_check(check, assembly)
        if passed and randomised is not None:
            passed, failure = _run_check(check, randomised)
            if not passed:
                message = f"with randomised parameters: {failure}"
        results.append(CheckResult(label, check_name, passed, message))
    return results


def _run_check(check: Check, assembly: _Assembly) -> tuple[bool, str]:
    try:
        return True, check(assembly)
    except ContractViolation as err:
        return False, str(err)
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        return False, f"raised {type(err).__name__}: {err}"


def _randomise_parameters(component: Component, seed: int) -> None:
    """Move every floating-point parameter of ``component`` by Gaussian noise, in place.

    The noise is a tenth of the parameter's root mean square, or 0.1 where that is zero (a
    zero-initialised branch must come alive): enough for a property that holds only at
    initialisation to show, small enough that a healthy component stays in its working range.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in component.parameters():
            if not parameter.dtype.is_floating_point or not parameter.numel():
                continue
            rms = parameter.double().square().mean().sqrt().item()
            scale = 0.1 * rms if rms > 0 else 0.1
            noise = torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype)
            parameter.add_(noise.to(parameter.device) * scale)


def _partners(a: _Assembly, cls: type[Component]) -> str:
    parts = [(k, type(getattr(a, k))) for k in ("encoder", "aggregator", "head") if k != cls.kind]
    return ", ".join(f"{k} {c.name!r}" for k, c in parts)


def check_components(infos: Iterable[ComponentInfo], registry: Registry | None = None) -> list[CheckResult]:
    """Run the suite for several registered components."""
    registry = registry or get_registry()
    return [result for info in infos for result in check_component(info, registry)]


def assert_component_ok(component: type[Component], registry: Registry | None = None) -> None:
    """Raise ``AssertionError`` listing every failed check (for plugin authors' pytest suites)."""
    failures = [r for r in check_component(component, registry) if not r.passed]
    if failures:
        raise AssertionError("contract violated:\n" + "\n".join(r.line() for r in failures))
