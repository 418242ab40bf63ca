"""Structural operations on PSM states.

A state is a tensor or a (nested) tuple of tensors (a NamedTuple keeps its type) whose leading dimensions are batch dimensions;
the scan engine uses ``[B, N]`` (batch, chunk index). NumPy arrays are accepted as leaves too, so
that the engine can be driven by a symbolic aggregator whose states are arrays of expression
strings (that is how the exact-parenthesization tests work). Every function here acts leaf-wise
and only along the given dimension, so it never looks inside a component's state.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence, Union

import numpy as np
import torch

State = Union[torch.Tensor, np.ndarray, tuple]


def tree_map(fn: Callable[..., Any], *states: State) -> State:
    """Apply ``fn`` leaf-wise to one or more states of the same structure."""
    first = states[0]
    if isinstance(first, tuple):
        parts = [tree_map(fn, *part) for part in zip(*states)]
        return type(first)(*parts) if hasattr(first, "_fields") else tuple(parts)  # a NamedTuple keeps its type
    return fn(*states)


def leaves(state: State) -> list:
    """The tensors (or arrays) of a state, in order."""
    if isinstance(state, tuple):
        return [leaf for part in state for leaf in leaves(part)]
    return [state]


def _index(leaf: Any, dim: int, index: slice | int) -> Any:
    key = (slice(None),) * dim + (index,)
    return leaf[key]


def take(state: State, dim: int, index: slice | int) -> State:
    """``state[..., index, ...]`` along ``dim`` for every leaf (a view where possible)."""
    return tree_map(lambda leaf: _index(leaf, dim, index), state)


def size(state: State, dim: int) -> int:
    """Length of ``dim`` (the same for every leaf)."""
    return leaves(state)[0].shape[dim]


def cat(states: Sequence[State], dim: int) -> State:
    """Concatenate states along ``dim``; empty pieces are dropped."""
    pieces = [s for s in states if size(s, dim) > 0]
    if len(pieces) == 1:
        return pieces[0]

    def join(*parts: Any) -> Any:
        if isinstance(parts[0], np.ndarray):
            return np.concatenate(parts, axis=dim)
        return torch.cat(parts, dim=dim)

    return tree_map(join, *pieces)


def unsqueeze(state: State, dim: int) -> State:
    """Insert a length-1 dimension at ``dim``."""

    def expand(leaf: Any) -> Any:
        if isinstance(leaf, np.ndarray):
            return np.expand_dims(leaf, dim)
        return leaf.unsqueeze(dim)

    return tree_map(expand, state)


def interleave(even: State, odd: State, dim: int, length: int) -> State:
    """Merge ``even`` (positions 0, 2, 4, ...) and ``odd`` (1, 3, 5, ...) along ``dim``.

    ``len(even)`` is ``len(odd)`` or ``len(odd) + 1``; the result is cut to ``length``.
    """
    n_odd = size(odd, dim)
    n_even = size(even, dim)
    if n_odd == 0:
        return take(even, dim, slice(0, length))

    def weave(e: Any, o: Any) -> Any:
        paired_e = _index(e, dim, slice(0, n_odd))
        if isinstance(e, np.ndarray):
            woven = np.stack([paired_e, o], axis=dim + 1)
            woven = woven.reshape(woven.shape[: dim] + (-1,) + woven.shape[dim + 2 :])
            if n_even > n_odd:
                woven = np.concatenate([woven, _index(e, dim, slice(n_odd, n_odd + 1))], axis=dim)
        else:
            woven = torch.stack([paired_e, o], dim=dim + 1).flatten(dim, dim + 1)
            if n_even > n_odd:
                woven = torch.cat([woven, _index(e, dim, slice(n_odd, n_odd + 1))], dim=dim)
        return _index(woven, dim, slice(0, length))

    return tree_map(weave, even, odd)


def nbytes(state: State) -> int:
    """Bytes of the state's tensors (logical size, not the storage behind views)."""
    total = 0
    for leaf in leaves(state):
        if isinstance(leaf, torch.Tensor):
            total += leaf.numel() * leaf.element_size()
        elif isinstance(leaf, np.ndarray):
            total += leaf.nbytes
    return total


def retained_nbytes(objects: Sequence[Any]) -> int:
    """Bytes of memory actually kept alive by the tensors in ``objects``.

    Storages are counted once each and in full, so a small view that pins a large buffer is
    charged for the whole buffer: this is what the allocator really holds.
    """
    seen: dict[tuple[str, int], int] = {}
    for obj in objects:
        if obj is None:
            continue
        for leaf in leaves(obj) if isinstance(obj, (tuple, torch.Tensor)) else []:
            if not isinstance(leaf, torch.Tensor):
                continue
            storage = leaf.untyped_storage()
            key = (str(leaf.device), storage.data_ptr())
            seen[key] = max(seen.get(key, 0), storage.nbytes())
    return sum(seen.values())


def describe(state: State) -> str:
    """Shapes of a state for error messages, e.g. ``([2, 5, 8], [2, 5])``."""
    if isinstance(state, tuple):
        return "(" + ", ".join(describe(s) for s in state) + ")"
    return str(list(getattr(state, "shape", ())))
