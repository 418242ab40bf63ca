"""Contract checks of a whole layer for leaks the other checks cannot see: future tokens reaching
earlier outputs in training mode, and memory a component keeps of its own while streaming.

Every other check runs the layer in ``eval()`` mode (so that dropout does not make equal paths
differ), but a model trains in ``train()`` mode: a component that reads later tokens only when
``self.training`` is set passes them all and trains on the future (its training loss falls far below
its validation loss). And streaming memory is measured on the tensors the stream holds, so a
component that appends every state it sees to a list of its own grows without bound while the
measured bytes stay flat.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from psmsearch import states as S
from psmsearch.contract_assembly import ATOL, BATCH, CHUNK, D_MODEL, _Assembly, _require

CHANGED_POSITIONS = (1, CHUNK - 1, CHUNK, 2 * CHUNK + 1)
"""Tokens changed one at a time: inside the first chunk, its last token, the first of the second
chunk (a chunk edge), and inside the third."""


def _layer_causal_in_training(a: _Assembly) -> str:
    """In ``train()`` mode, changing token ``t`` leaves every output before ``t`` as it was.

    The two passes draw the same random numbers (the generator is reseeded before each), so
    dropout masks agree and only a leak of token ``t`` into earlier outputs can differ.
    """
    layer = copy.deepcopy(a.layer).train()
    generator = torch.Generator().manual_seed(64)
    x = torch.randn(BATCH, 3 * CHUNK + 2, D_MODEL, generator=generator)  # [B, T, d]: into a fourth chunk
    base = _seeded(layer, x)  # [B, T, d]
    for t in CHANGED_POSITIONS:
        changed = x.clone()
        changed[:, t] += torch.randn(BATCH, D_MODEL, generator=generator)
        diff = (_seeded(layer, changed)[:, :t] - base[:, :t]).abs().max().item()
        _require(diff <= ATOL, f"in train() mode, changing token {t} changed outputs at positions < {t} by "
                               f"{diff:.3g}: the layer reads future tokens while training (in eval() mode it "
                               "may not, so every other check passes); look for code under `if self.training`")
    return f"train() mode, T={x.shape[1]}, tokens {', '.join(map(str, CHANGED_POSITIONS))} changed one at a time"


def _seeded(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(65)
        return layer(x)


def _layer_no_hidden_state(a: _Assembly) -> str:
    """No component keeps tensors of its own (attributes that are neither parameters nor buffers, or
    held in lists and dicts) that grow as a stream or the parallel pass runs: memory that
    ``state_nbytes`` and every memory metric never see.

    Every call shape is run once first (token by token through a chunk, whole chunks, parallel passes
    with and without a partial chunk), so that a bounded cache (a mask per chunk width) is full before
    the first measurement; what grows after that grows with the length streamed or the calls made.
    """
    layer = copy.deepcopy(a.layer)
    generator = torch.Generator().manual_seed(66)

    def run(chunks: int, passes: int) -> None:
        stream = layer.stream(BATCH)
        for _ in range(CHUNK + 1):
            stream.step(torch.randn(BATCH, D_MODEL, generator=generator))
        stream.feed(torch.randn(BATCH, chunks * CHUNK, D_MODEL, generator=generator))
        for _ in range(passes):
            layer(torch.randn(BATCH, 4 * CHUNK + 1, D_MODEL, generator=generator))
            layer(torch.randn(BATCH, 3 * CHUNK, D_MODEL, generator=generator))

    with torch.no_grad():
        run(chunks=1, passes=1)
        before = _own_tensor_bytes(layer)
        run(chunks=15, passes=3)
        after = _own_tensor_bytes(layer)
    for component, held in before.items():
        _require(after[component] <= held, f"the {component} holds {after[component] - held} more bytes of tensors "
                                           f"of its own after streaming 16 more chunks and 6 parallel passes "
                                           f"({held} before, every call shape run once already): it keeps what it "
                                           "sees outside the stream's states (a list it appends to?), so state_nbytes "
                                           "and the memory metrics never count it")
    return "components' own tensors: no growth over 16 streamed chunks and 6 parallel passes, after a warm-up"


def _own_tensor_bytes(layer: nn.Module) -> dict[str, int]:
    """Bytes of the tensors each component (encoder, aggregator, head) holds outside its parameters and
    buffers, in attributes and the lists, tuples, sets and dicts they hold (each storage once)."""
    out = {}
    for kind in ("encoder", "aggregator", "head"):
        found: list[torch.Tensor] = []
        for module in getattr(layer, kind).modules():
            for key, value in vars(module).items():
                if key not in ("_parameters", "_buffers", "_modules"):
                    _collect(value, found, depth=0)
        out[kind] = S.retained_nbytes(found)
    return out


def _collect(value: Any, found: list[torch.Tensor], depth: int) -> None:
    if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter):
        found.append(value)
    elif depth < 4 and isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            _collect(item, found, depth + 1)
    elif depth < 4 and isinstance(value, dict):
        for item in value.values():
            _collect(item, found, depth + 1)
