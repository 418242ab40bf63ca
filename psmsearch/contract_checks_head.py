"""Contract checks of a head: shapes of full and partial chunks, causality within a chunk, reading
only its own chunk and prefix state, ``forward_last`` against ``forward``'s last row, gradients,
and an optional ``fused_forward`` against summaries + scan + readout.

Streaming reads a head one partial chunk at a time, so everything it may see must be in the
tokens so far and the chunk's own prefix state; each check here provokes one way to see more.
"""

from __future__ import annotations

from typing import Any

import torch

from psmsearch import states as S
from psmsearch.components import ComponentContext, Head
from psmsearch.composer import PSMLayer
from psmsearch.contract_assembly import ATOL, BATCH, CHUNK, D_MODEL, ContractViolation, _Assembly, _require
from psmsearch.contract_measures import _gradcheck, tuple_requires_grad
from psmsearch.scan import prefix_scan


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
        layer = PSMLayer(encoder, type(a.aggregator)(context, **a.rebuilt_kwargs("aggregator")),
                         type(a.head)(context, **a.rebuilt_kwargs("head")), CHUNK).eval()
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
