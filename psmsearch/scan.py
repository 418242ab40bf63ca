"""The scan engine: exclusive prefix states with one fixed parenthesization (DESIGN.md §2).

Operand order is always ``agg(older, newer)``. The exclusive prefix ``p_i`` of chunk ``i`` is the
left fold, from the largest dyadic block to the smallest, of the complete power-of-two blocks that
make up ``[0, i)``, each block reduced as a balanced binary tree. For 8 chunks:

    p0 = e            p1 = x0            p2 = (x0 x1)         p3 = ((x0 x1) x2)
    p4 = ((x0 x1)(x2 x3))                p5 = (((x0 x1)(x2 x3)) x4)
    p6 = (((x0 x1)(x2 x3))(x4 x5))       p7 = ((((x0 x1)(x2 x3))(x4 x5)) x6)

Three independent implementations compute exactly these expressions:

* :func:`prefix_scan` with ``mode="tree"``: Blelloch's upsweep/downsweep, one batched ``agg``
  call per tree level (training);
* :func:`prefix_scan` with ``mode="sequential"``: the definition above, evaluated literally per
  chunk (a slow reference);
* :class:`OnlineScan`: the binary-counter scan that streams one chunk at a time in O(log n) memory
  (inference).

The identity ``e`` is structural: it is never passed to ``agg``; ``agg(e, x) = x`` by bypass and
the prefix of chunk 0 is ``agg.initial_state(batch_shape)``.
"""

from __future__ import annotations

import sys
from typing import Any, Callable, Literal, Protocol

import numpy as np
import torch

from psmsearch import states as S
from psmsearch.states import State

_LEAF_TYPES = (torch.Tensor, np.ndarray)

ScanMode = Literal["auto", "tree", "sequential"]


class AggregatorLike(Protocol):
    """What the engine needs of an aggregator (a :class:`psmsearch.Aggregator` or a test double)."""

    associative: bool

    def __call__(self, older: State, newer: State) -> State: ...

    def initial_state(self, batch_shape: tuple[int, ...]) -> State: ...


class StateShapeError(ValueError):
    """An aggregator returned a state shaped unlike its inputs (its contract: the shape of ``newer``).

    ``names_its_origin`` is set when the message names the aggregator's ``forward`` (file and line), so
    a failed trial adds no caller's line of its own (that would be the code that read the bad state).
    """

    names_its_origin = False


def _component_origin(obj: Any, method: str = "forward", args: tuple[Any, ...] | None = None) -> str:
    """`` (METHOD at FILE:LINE)`` of ``obj``'s ``method`` (of the module a ``torch.compile`` wrapper
    holds), or ``""`` where Python cannot tell. With the ``args`` of the bad call, LINE is the line that
    returned the bad result (see :func:`_returning_line`), else the method's ``def`` line."""
    import inspect

    obj = getattr(obj, "_orig_mod", obj)  # torch.compile's OptimizedModule
    try:
        function = inspect.unwrap(getattr(type(obj), method))
        line = (_returning_line(obj, method, function, args) if args is not None else None) \
            or inspect.getsourcelines(function)[1]
        return f" ({method} at {inspect.getsourcefile(function)}:{line})"
    except (AttributeError, TypeError, OSError):
        return ""


def _returning_line(obj: Any, method: str, function: Callable[..., Any], args: tuple[Any, ...]) -> int | None:
    """The line whose ``return`` gave the bad result: ``method`` called again on the same arguments while
    a profiler notes where its frame returns (on the error path only; None where that does not work).

    With several ``return`` statements in a plugin's ``forward``, the ``def`` line left the author to
    guess which one made the state of the wrong shape.
    """
    code = getattr(function, "__code__", None)
    returned: list[int] = []

    def profile(frame: Any, event: str, _arg: Any) -> None:
        if event == "return" and frame.f_code is code:
            returned.append(frame.f_lineno)

    previous = sys.getprofile()
    sys.setprofile(profile)
    try:
        with torch.no_grad():
            getattr(obj, method)(*args)
    except Exception:  # noqa: BLE001 - only the message's line depends on it
        return None
    finally:
        sys.setprofile(previous)
    return returned[-1] if returned else None


def _leaf_shapes(state: Any) -> list[tuple[int, ...]] | None:
    """Shapes of a state's tensors, or None where ``state`` is not a state (a list, a number, None)."""
    return [tuple(leaf.shape) for leaf in S.leaves(state)] if isinstance(state, (tuple, *_LEAF_TYPES)) else None


def _name_of(agg: Any) -> str:
    inner = getattr(agg, "_orig_mod", agg)
    return getattr(inner, "name", type(inner).__name__)


def checked_initial_state(agg: AggregatorLike, batch_shape: tuple[int, ...],
                          want: list[tuple[int, ...]], like: Any = None) -> State:
    """``agg.initial_state(batch_shape)``, refused unless its tensors have the shapes ``want`` and, where
    ``like`` is given (a state, or a tensor standing for every leaf), its dtypes and devices.

    ``want`` is the shape of a chunk state with ``batch_shape`` in front (the head reads the initial
    state where it reads every other prefix). A plugin whose ``initial_state`` left out the batch
    dims, or made its state in another dtype, otherwise failed in the head, with a torch error blamed
    on the head's line.
    """
    state = agg.initial_state(batch_shape)
    got = _leaf_shapes(state)
    if got != want:
        shown = "a " + type(state).__name__ if got is None else f"shapes {got}"
        origin = _component_origin(agg, "initial_state", (batch_shape,))
        error = StateShapeError(
            f"aggregator {_name_of(agg)!r}{origin}: initial_state({batch_shape}) returned {shown}, but the "
            f"chunk states have shapes {want}; initial_state must return a state shaped like them, batch "
            "dims first"
        )
        error.names_its_origin = bool(origin)
        raise error
    if like is not None:
        reference = S.tree_map(lambda _: like, state) if isinstance(like, torch.Tensor) else like
        mismatch = _kind_mismatch(state, reference)
        if mismatch:
            origin = _component_origin(agg, "initial_state", (batch_shape,))
            error = StateShapeError(f"aggregator {_name_of(agg)!r}{origin}: initial_state({batch_shape}) returned "
                                    f"{mismatch}; it must return a state of the chunk states' dtype and device")
            error.names_its_origin = bool(origin)
            raise error
    return state


def shape_checked(agg: Callable[[State, State], State]) -> Callable[[State, State], State]:
    """``agg`` with every result compared against ``newer``: a wrong shape is named where it is made.

    A plugin aggregator that returned, say, ``[*, 2k, d]`` for ``[*, k, d]`` inputs failed later in
    whatever read the prefixes (the head, or the task's loss), blamed on that code. The check costs
    one shape comparison per call (one call per tree level in training, a few per streamed chunk).
    """

    def combine(older: State, newer: State) -> State:
        out = agg(older, newer)
        got = _leaf_shapes(out)
        want = [tuple(leaf.shape) for leaf in S.leaves(newer)]
        if got != want:
            shown = "a " + type(out).__name__ if got is None else f"shapes {got}"
            origin = _component_origin(agg, "forward", (older, newer))
            error = StateShapeError(
                f"aggregator {_name_of(agg)!r}{origin} returned {shown} for inputs of shapes "
                f"{[tuple(leaf.shape) for leaf in S.leaves(older)]} (older) and {want} (newer); "
                "agg(older, newer) must return a state shaped like newer"
            )
            error.names_its_origin = bool(origin)
            raise error
        mismatch = _kind_mismatch(out, newer)
        if mismatch:
            origin = _component_origin(agg, "forward", (older, newer))
            error = StateShapeError(
                f"aggregator {_name_of(agg)!r}{origin} returned {mismatch}; agg(older, newer) must return a "
                "state of newer's dtype and device (what the head that reads the prefix was built for)"
            )
            error.names_its_origin = bool(origin)
            raise error
        return out

    return combine


def _kind_mismatch(out: State, like: State) -> str:
    """How ``out``'s tensors differ from ``like``'s in dtype or device (``""`` where they do not).

    Under autocast a dtype may change between ops by design, so only the device is compared then.
    """
    for index, (got, want) in enumerate(zip(S.leaves(out), S.leaves(like))):
        if not isinstance(got, torch.Tensor) or not isinstance(want, torch.Tensor):
            continue
        where = "" if isinstance(like, torch.Tensor) else f" in tensor {index} of the state"
        if got.device != want.device:
            return f"a tensor on {got.device}{where} for inputs on {want.device}"
        if got.dtype != want.dtype and not autocast_on(want.device.type):
            return f"{got.dtype}{where} for inputs of {want.dtype}"
    return ""


def autocast_on(device_type: str) -> bool:
    """Whether autocast is on for ``device_type`` (False for a device type autocast does not know, as
    ``meta``, for which ``torch.is_autocast_enabled`` raises)."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def check_mode(mode: str) -> None:
    """Raise the ValueError of a scan mode that is not one of :data:`ScanMode`'s."""
    if mode not in ("auto", "tree", "sequential"):
        raise ValueError(f"prefix_scan mode {mode!r} is not allowed; use 'auto', 'tree' or 'sequential'")


def _batch_shape(states: State) -> tuple[int, ...]:
    return tuple(S.leaves(states)[0].shape[:1])


def _with_initial(agg: AggregatorLike, prefixes: State | None, states: State) -> State:
    """Prepend ``initial_state`` (the prefix of chunk 0) to the prefixes of chunks 1..N-1 of ``states``."""
    batch_shape = _batch_shape(states)
    want = [batch_shape + tuple(leaf.shape[2:]) for leaf in S.leaves(states)]
    first = S.unsqueeze(checked_initial_state(agg, batch_shape, want, like=states), 1)  # [B, 1, ...]
    if prefixes is None:
        return first
    return S.cat([first, prefixes], dim=1)


def _tree_scan(agg: Callable[[State, State], State], states: State) -> State | None:
    """``p_1 .. p_M`` of ``states[B, M, ...]`` (``p_0 = e`` is left out; ``p_M`` folds all M chunks).

    This is Blelloch's scan over ``M + 1`` chunks whose last one is never read: no prefix of chunks
    ``0..M`` contains chunk ``M``, so every tree node that would hold it is left out, and ``U_k``
    below is level ``k`` of that tree without its last node. Upsweep: ``U_{k+1}[j] =
    agg(U_k[2j], U_k[2j+1])``; an unpaired last node of ``U_k`` is not carried up, since its parent
    would hold chunk ``M``. Downsweep, with ``D_k[j]`` the prefix of node ``j`` at level ``k`` and
    ``R_k = D_k[1:]`` (``D_k[0] = e`` always): ``D_k[2j] = D_{k+1}[j]`` and ``D_k[2j+1] =
    agg(D_{k+1}[j], U_k[2j])``, parent prefix first. Under ``2·ceil(log2(M + 1))`` batched calls.
    """
    if S.size(states, 1) == 0:
        return None
    levels = [states]  # levels[k] = U_k: [B, u_k, ...], u_{k+1} = u_k // 2
    while S.size(levels[-1], 1) > 1:
        level = levels[-1]
        pairs = S.size(level, 1) // 2
        older = S.take(level, 1, slice(0, 2 * pairs, 2))  # [B, pairs, ...]
        newer = S.take(level, 1, slice(1, 2 * pairs, 2))  # [B, pairs, ...]
        levels.append(agg(older, newer))

    rest = levels[-1]  # R at the top level, [B, 1, ...]: the prefix of the top's second node
    for k in range(len(levels) - 2, -1, -1):
        level = levels[k]
        u_k = S.size(level, 1)
        first = S.take(level, 1, slice(0, 1))  # D_k[1] = U_k[0]
        m = (u_k - 1) // 2  # odd nodes 2j+1 (j >= 1) whose prefix is read at this level
        if m > 0:
            lefts = S.take(level, 1, slice(2, 2 * m + 1, 2))  # U_k[2j], j = 1..m
            combined = agg(S.take(rest, 1, slice(0, m)), lefts)
            even = S.cat([first, combined], dim=1)
        else:
            even = first
        rest = S.interleave(even, rest, dim=1, length=u_k)
    return rest


def _block_reducer(
    agg: Callable[[State, State], State], chunks: list[State]
) -> Callable[[int, int], State]:
    """``reduce(start, width)``: the balanced tree over ``chunks[start:start+width]``, memoised."""
    memo: dict[tuple[int, int], State] = {}

    def reduce(start: int, width: int) -> State:
        if width == 1:
            return chunks[start]
        key = (start, width)
        if key not in memo:
            half = width // 2
            memo[key] = agg(reduce(start, half), reduce(start + half, half))
        return memo[key]

    return reduce


def _sequential_scan(agg: Callable[[State, State], State], states: State) -> State | None:
    """``p_1 .. p_M`` of ``states[B, M, ...]`` by the literal definition: dyadic blocks, largest first."""
    n = S.size(states, 1)
    chunks = [S.take(states, 1, i) for i in range(n)]  # each [B, ...]
    reduce = _block_reducer(agg, chunks)
    prefixes = []
    for i in range(1, n + 1):
        start, acc = 0, None
        for bit in reversed(range(i.bit_length())):
            width = 1 << bit
            if i & width:
                block = reduce(start, width)
                acc = block if acc is None else agg(acc, block)
                start += width
        prefixes.append(S.unsqueeze(acc, 1))
    return S.cat(prefixes, dim=1) if prefixes else None


def prefix_scan(agg: AggregatorLike, states: State, mode: ScanMode = "auto", *, total: bool = False) -> State:
    """Exclusive prefix states of ``states[B, N, ...]`` -> ``[B, N, ...]`` (``[B, N + 1, ...]`` with ``total``).

    ``p_0`` is ``agg.initial_state((B,))``; ``p_i`` combines chunks ``0..i-1`` with the
    parenthesization of DESIGN.md §2. ``mode="auto"`` uses the aggregator's own ``scan`` when it is
    associative and provides one, else the tree; ``"tree"`` and ``"sequential"`` force the generic
    engines (the latter is a slow literal reference).

    The last chunk's state enters no exclusive prefix, so the engines never pass it to ``agg``.
    ``total=True`` appends ``p_N``, the fold of all ``N`` chunks with the same parenthesization:
    the prefixes of ``N + 1`` chunks whose last state is not needed. A layer uses it for its last
    chunk, whose summary no prefix reads and which may be partial (``N = 0`` is allowed then).
    """
    check_mode(mode)
    _check_chunk_layout(states)
    n = S.size(states, 1)
    if n < 1 and not total:
        raise ValueError(f"prefix_scan needs at least one chunk; got states of shape {S.describe(states)}")
    if mode == "auto" and n > 0 and getattr(agg, "associative", False):
        fast = getattr(agg, "scan", None)
        result = fast(states) if fast is not None else None
        if result is not None:
            _check_own_scan(agg, result, states)
            return _append_total(agg, result, states) if total else result
    engine = _sequential_scan if mode == "sequential" else _tree_scan
    read = states if total else S.take(states, 1, slice(0, n - 1))  # [B, N or N-1, ...]
    return _with_initial(agg, engine(shape_checked(agg), read), states)


def _check_chunk_layout(states: State) -> None:
    """Raise the ValueError of chunk states that are not tensors (or arrays) of shape ``[B, N, ...]``."""
    leaves = S.leaves(states) if isinstance(states, (tuple, *_LEAF_TYPES)) else [states]
    for leaf in leaves:
        if not isinstance(leaf, _LEAF_TYPES):
            raise TypeError(f"prefix_scan: chunk states must be tensors or tuples of tensors [B, N, ...]; "
                            f"got a {type(leaf).__name__}")
        if leaf.ndim < 2:
            raise ValueError(f"prefix_scan: chunk states must be [B, N, ...] (batch, then chunk index); got a "
                             f"tensor of shape {tuple(leaf.shape)}")
    if len({leaf.shape[:2] for leaf in leaves}) > 1:
        raise ValueError(f"prefix_scan: every tensor of the chunk states must share [B, N]; got shapes "
                         f"{[tuple(leaf.shape) for leaf in leaves]}")


def _check_own_scan(agg: AggregatorLike, prefixes: Any, states: State) -> None:
    """An associative aggregator's own ``scan`` must return one prefix per chunk, shaped like ``states``."""
    got, want = _leaf_shapes(prefixes), _leaf_shapes(states)
    if got != want:
        shown = "a " + type(prefixes).__name__ if got is None else f"shapes {got}"
        origin = _component_origin(agg, "scan", (states,))
        error = StateShapeError(
            f"aggregator {_name_of(agg)!r}{origin}: scan returned {shown} for chunk states of shapes {want}; "
            "it must return the exclusive prefixes shaped like the states (or None to use the generic scan)"
        )
        error.names_its_origin = bool(origin)
        raise error
    mismatch = _kind_mismatch(prefixes, states)
    if mismatch:
        origin = _component_origin(agg, "scan", (states,))
        error = StateShapeError(f"aggregator {_name_of(agg)!r}{origin}: scan returned {mismatch}; it must return "
                                "the exclusive prefixes in the chunk states' dtype and device")
        error.names_its_origin = bool(origin)
        raise error


def _append_total(agg: AggregatorLike, prefixes: State, states: State) -> State:
    """``prefixes[B, N, ...]`` of an associative scan, with the fold of all ``N`` chunks appended."""
    n = S.size(states, 1)
    last = S.take(states, 1, slice(n - 1, n))  # [B, 1, ...]
    fold = last if n == 1 else shape_checked(agg)(S.take(prefixes, 1, slice(n - 1, n)), last)  # [B, 1, ...]
    return S.cat([prefixes, fold], dim=1)  # [B, N + 1, ...]


class OnlineScan:
    """Streaming binary-counter scan: push chunk states one at a time, read the exclusive prefix.

    ``roots[k]`` holds a complete balanced subtree over ``2**k`` chunks; pushing is a binary
    increment (``cur = agg(roots[k], cur)`` while ``roots[k]`` is occupied). ``folds[k]`` caches the
    fold of the occupied roots ``>= k`` (highest first), so after a push that lands in slot ``j``
    (all lower slots empty) the prefix is ``folds[j] = agg(folds[j'], roots[j])``, ``j'`` the next
    occupied slot above: one call per emitted prefix plus amortised one per carry.

    A fold is kept only while a later push can read it: ``folds[j]`` is read by a push that lands
    in a lower slot with every slot between empty, which cannot happen once slot ``j - 1`` is
    occupied (it stays occupied until the carry that replaces ``roots[j]``). So the push that lands
    in ``j - 1`` drops ``folds[j]``. Memory is the ``popcount(n) <= ceil(log2(n + 1))`` roots plus
    one fold per occupied slot whose next lower slot is empty (slot 0 included): at most
    ``ceil(log2(n + 1)) + 1`` distinct states (11, not 19, after 1023 chunks).

    For an associative aggregator the parenthesization does not matter and a single running state
    is kept (``num_roots == 1``).
    """

    def __init__(self, agg: AggregatorLike, batch_shape: tuple[int, ...] | None = None) -> None:
        self.agg = agg
        self._combine = shape_checked(agg)
        self.batch_shape = batch_shape
        self.associative = bool(getattr(agg, "associative", False))
        self.roots: list[State | None] = []
        self.folds: list[State | None] = []
        self.running: State | None = None
        self.count = 0

    def push(self, state: State) -> None:
        """Append the state of the next complete chunk (leading dims: batch only).

        Every state must have the batch shape of the first (or of ``batch_shape``). The first push
        also checks ``initial_state`` against it, as :func:`prefix_scan` does, so that the prefix
        returned before any push has the shapes every later one has.
        """
        batch = tuple(S.leaves(state)[0].shape[:1]) if isinstance(state, (tuple, *_LEAF_TYPES)) else None
        if self.batch_shape is None:
            self.batch_shape = batch
        elif batch != tuple(self.batch_shape):
            raise ValueError(f"OnlineScan: pushed a state with batch dims {batch}, but this scan is for batch "
                             f"shape {tuple(self.batch_shape)} (a new batch needs a new scan)")
        if self.count == 0:
            want = [tuple(leaf.shape) for leaf in S.leaves(state)]
            checked_initial_state(self.agg, tuple(self.batch_shape), want, like=state)  # type: ignore[arg-type]
        self.count += 1
        if self.associative:
            self.running = state if self.running is None else self._combine(self.running, state)
            return
        cur, k = state, 0
        while k < len(self.roots) and self.roots[k] is not None:
            cur = self._combine(self.roots[k], cur)
            self.roots[k] = None
            self.folds[k] = None
            k += 1
        if k == len(self.roots):
            self.roots.append(None)
            self.folds.append(None)
        self.roots[k] = cur
        above = next((j for j in range(k + 1, len(self.roots)) if self.roots[j] is not None), None)
        self.folds[k] = cur if above is None else self._combine(self.folds[above], cur)
        if above == k + 1:
            self.folds[above] = None  # no later push reads it before the carry into `above` (see the class doc)

    def prefix(self) -> State:
        """The exclusive prefix state for the next chunk (``initial_state`` before any push)."""
        if self.count == 0:
            if self.batch_shape is None:
                raise ValueError("OnlineScan.prefix() before any push needs batch_shape at construction")
            return self._checked_batch(self.agg.initial_state(self.batch_shape))
        if self.associative:
            return self.running  # type: ignore[return-value]
        lowest = next(k for k, root in enumerate(self.roots) if root is not None)
        return self.folds[lowest]  # type: ignore[return-value]

    def _checked_batch(self, state: State) -> State:
        """``initial_state``'s result, refused where its leading dims are not the batch shape (before
        any push the chunk states' other dims are not known yet; the first push checks those)."""
        batch = tuple(self.batch_shape)  # type: ignore[arg-type]
        got = _leaf_shapes(state)
        if got is None or any(shape[:len(batch)] != batch for shape in got):
            shown = "a " + type(state).__name__ if got is None else f"shapes {got}"
            origin = _component_origin(self.agg, "initial_state", (batch,))
            error = StateShapeError(f"aggregator {_name_of(self.agg)!r}{origin}: initial_state({batch}) returned "
                                    f"{shown}; initial_state must return a state whose leading dims are the "
                                    "batch shape")
            error.names_its_origin = bool(origin)
            raise error
        return state

    @property
    def num_roots(self) -> int:
        """Occupied subtree roots (1 for an associative aggregator once anything was pushed)."""
        if self.associative:
            return int(self.running is not None)
        return sum(root is not None for root in self.roots)

    def retained(self) -> list[Any]:
        """Every state this scan keeps alive (roots and cached folds, or the running state)."""
        if self.associative:
            return [self.running] if self.running is not None else []
        return [s for s in self.roots + self.folds if s is not None]

    def state_nbytes(self) -> int:
        """Bytes of memory the retained states really hold (each storage counted once)."""
        return S.retained_nbytes(self.retained())


def held_state_counts(pushes: int) -> list[int]:
    """Distinct states a non-associative :class:`OnlineScan` retains after 0, 1, ..., ``pushes`` pushes.

    The count depends on the number of pushes only, so it is worked out here on occupancy flags,
    without states, following :meth:`OnlineScan.push` step by step (roots carried into the first
    empty slot; the new root's fold is the root itself when no slot above is occupied, else a state
    of its own; the fold of the next slot up is dropped when that slot is occupied). The peak is
    not reached only at ``2^k - 1`` pushes, where the roots are: after 13 pushes (0b1101) the scan
    holds 5 states, as after 15, where 7 and 14 hold 4; 853 hold 11 where 511 hold 10. Memory
    metrics use this to know where to measure.
    """
    roots: list[bool] = []
    folds: list[str | None] = []  # None: no fold; "root": the root itself; "own": a state of its own
    held, counts = 0, [0]
    for _ in range(pushes):
        k = 0
        while k < len(roots) and roots[k]:
            held -= 1 + (folds[k] == "own")
            roots[k], folds[k] = False, None
            k += 1
        if k == len(roots):
            roots.append(False)
            folds.append(None)
        roots[k] = True
        above = next((j for j in range(k + 1, len(roots)) if roots[j]), None)
        folds[k] = "root" if above is None else "own"
        held += 1 + (folds[k] == "own")
        if above == k + 1:
            held -= folds[above] == "own"
            folds[above] = None
        counts.append(held)
    return counts
