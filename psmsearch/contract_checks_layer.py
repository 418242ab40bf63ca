"""Contract checks of a whole layer, run for every kind of component: streaming == parallel, each
sequence of a batch computed on its own, the layer in float64, built on the meta device,
``state_nbytes`` matching the bytes streaming really holds, and, where the encoder declares it, the
same outputs at every chunk size.

These are properties no single component shows alone: a component may pass its own checks and still
break the layer it is part of (a mean over the batch, a tensor made in the default dtype, a buffer
left uninitialised after ``to_empty``).
"""

from __future__ import annotations

import copy
import math

import torch

from psmsearch import states as S
from psmsearch.components import ComponentContext
from psmsearch.composer import PSMLayer
from psmsearch.contract_assembly import ATOL, BATCH, CHUNK, D_MODEL, _Assembly, _require


def _layer_stream_equals_parallel(a: _Assembly) -> str:
    """Streaming, token by token and chunk-wise, equals the parallel pass, at the suite's batch and at
    batch 1: the batch every memory and latency metric streams at, where a component's "fast path"
    for a single sequence would otherwise go unchecked."""
    generator = torch.Generator().manual_seed(60)
    length = 9 * CHUNK + 2  # 10 chunks: past a power of two, so the scans' block edges are crossed
    for batch in (BATCH, 1):
        x = torch.randn(batch, length, D_MODEL, generator=generator)  # [B, T, d]
        with torch.no_grad():
            parallel = a.layer(x)
            stream = a.layer.stream(batch)
            streamed = torch.stack([stream.step(x[:, t]) for t in range(length)], dim=1)
            chunked = a.layer.stream(batch).feed(x)
        diff = (parallel - streamed).abs().max().item()
        _require(diff <= ATOL, f"B={batch}, T={length}: token-by-token streaming differs from the parallel forward "
                               f"by {diff:.3g}")
        diff = (parallel - chunked).abs().max().item()
        _require(diff <= ATOL, f"B={batch}, T={length}: chunk-wise streaming differs from the parallel forward by "
                               f"{diff:.3g}")
    return f"B={BATCH} and 1, T={length}, c={CHUNK}"


CHUNK_SIZES = (1, 3, CHUNK, 2 * CHUNK + 1)
"""The chunk sizes a ``chunk_size_invariant`` encoder's layer is run at: one token, an odd size, the
suite's own and one past twice it (at the check's length, T = 15, c = 4 and 9 end in a partial chunk)."""


def _layer_chunk_size_invariance(a: _Assembly) -> str:
    """Where the encoder declares ``chunk_size_invariant``, the layer's outputs at every chunk size
    agree (float64): summaries, scan and the head's intra-chunk readout are one recurrence. A summary
    that drops a decay term, or a readout that applies it twice, still streams exactly as it runs in
    parallel (both paths use them), so only changing ``c`` shows it.

    The layer at each ``c`` is built again for it, as the suite builds components, and given the
    assembly's parameter values: the same weights, split differently (a buffer sized by ``c``, such as
    a mask, is made for it). Not checked where the aggregator is not associative (a combine that is no
    monoid makes no exact recurrence), or where the aggregator or head sets ``chunk_size_invariant =
    False`` (one not meant to keep the recurrence exact).
    """
    encoder, aggregator, head = type(a.encoder), type(a.aggregator), type(a.head)
    if not encoder.chunk_size_invariant:
        return "not claimed by the encoder"
    if not aggregator.associative:
        return f"not checked: aggregator {aggregator.name!r} is not associative"
    for kind, cls in (("aggregator", aggregator), ("head", head)):
        if getattr(cls, "chunk_size_invariant", None) is False:
            return f"not checked: {kind} {cls.name!r} sets chunk_size_invariant = False"
    generator = torch.Generator().manual_seed(64)
    length = 3 * CHUNK + 3
    x = torch.randn(BATCH, length, D_MODEL, generator=generator, dtype=torch.float64)  # [B, T, d]
    outputs = {}
    for c in CHUNK_SIZES:
        layer = _layer_at(a, c)
        if isinstance(layer, str):
            return layer
        with torch.no_grad():
            outputs[c] = layer.double()(x)  # [B, T, d]
    reference = outputs[1]  # one token per chunk: the recurrence itself
    scale = max(reference.abs().max().item(), 1.0)
    for c, y in outputs.items():
        diff = (y - reference).abs().max().item()
        _require(diff <= 1e-8 * scale,
                 f"T={length}: outputs at c={c} differ from those at c=1 by {diff:.3g} (float64, the same weights); "
                 f"encoder {encoder.name!r} declares chunk_size_invariant, so its summarize, aggregator "
                 f"{aggregator.name!r} and head {head.name!r} must make one recurrence at any c. An encoder whose "
                 f"features or summary depend on c sets chunk_size_invariant = False; so does an aggregator or head "
                 f"not meant to keep the recurrence exact")
    return f"T={length}, c in {', '.join(map(str, CHUNK_SIZES))} against c=1, float64"


def _layer_at(a: _Assembly, chunk: int) -> PSMLayer | str:
    """The assembly's components built again for chunk size ``chunk`` with its parameter values, or why
    they cannot be (a parameter whose shape depends on ``c``)."""
    context = ComponentContext(d_model=D_MODEL, chunk_size=chunk)
    encoder = type(a.encoder)(context, **a.rebuilt_kwargs("encoder"))
    context = ComponentContext(d_model=D_MODEL, chunk_size=chunk, encoder=encoder)
    layer = PSMLayer(encoder, type(a.aggregator)(context, **a.rebuilt_kwargs("aggregator")),
                     type(a.head)(context, **a.rebuilt_kwargs("head")), chunk)
    values = dict(a.layer.named_parameters())
    with torch.no_grad():
        for name, parameter in layer.named_parameters():
            value = values.get(name)
            if value is None or value.shape != parameter.shape:
                return f"not comparable: parameter {name!r} is not the same at c={chunk} as at c={CHUNK}"
            parameter.copy_(value)
    return layer.eval()


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
        encoder = type(a.encoder)(context, **a.rebuilt_kwargs("encoder"))
        context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK, encoder=encoder)
        layer = PSMLayer(encoder, type(a.aggregator)(context, **a.rebuilt_kwargs("aggregator")),
                         type(a.head)(context, **a.rebuilt_kwargs("head")), CHUNK)
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
