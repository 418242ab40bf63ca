"""Contract checks of an aggregator: shapes, finite outputs and gradients of ``agg(older, newer)``,
tree == sequential == online scans, and associativity and the fast ``scan`` where claimed.

The scan paths must agree because training runs the tree (or the fast scan) and streaming the
online scan: a model that disagrees with itself between them is not the model that was trained.
"""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from psmsearch import states as S
from psmsearch.components import Aggregator
from psmsearch.contract_assembly import ATOL, BATCH, FAST_SCAN_CHUNKS, ContractViolation, _Assembly, _require
from psmsearch.contract_measures import _all_finite, _gradcheck, _max_diff, _shapes, tuple_requires_grad
from psmsearch.scan import OnlineScan, _component_origin, prefix_scan


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
    for what, state, method, args in (("agg(older, newer)", out, "forward", (older, newer)),
                                      ("initial_state((B,))", init, "initial_state", ((BATCH,),))):
        got = _dtypes_and_devices(state)
        if got != _dtypes_and_devices(newer):
            raise ContractViolation(f"{what}{_component_origin(a.aggregator, method, args)} returned {got}, the chunk "
                                    f"states are {_dtypes_and_devices(newer)}: an aggregator must keep its inputs' "
                                    "dtype and device (no .float(), .double() or .to(...) on the result; make new "
                                    "tensors from an input or a parameter, as new_zeros does)")
    return f"{_shapes(out)}, {_dtypes_and_devices(out)}"


def _dtypes_and_devices(state: Any) -> str:
    """``"float32 on cpu"`` (each distinct pair of a state's tensors, in order of first appearance)."""
    pairs = dict.fromkeys(f"{str(leaf.dtype).removeprefix('torch.')} on {leaf.device}" for leaf in S.leaves(state))
    return ", ".join(pairs)


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


def _class_location(cls: type) -> str:
    """`` (at FILE:LINE)`` of a class definition, or ``""`` where Python cannot tell."""
    try:
        return f" (at {inspect.getsourcefile(cls)}:{inspect.getsourcelines(cls)[1]})"
    except (TypeError, OSError):
        return ""


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
