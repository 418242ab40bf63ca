"""What every contract check stands on: the component built beside compatible partners.

A check exercises a component inside a whole layer, so it needs an encoder, an aggregator and a head
that fit together: :func:`_assemble` builds the class under test at its default hyperparameters and
takes each other kind from the registry (the one ``check --partner`` names, else the first by name
with the same ``state_kind``), at the
suite's small sizes (``D_MODEL``, ``CHUNK``, ``BATCH``). A check that finds evidence of a broken
contract raises :class:`ContractViolation` (through :func:`_require`), which the runner in
:mod:`psmsearch.testing` reports as a failed check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from psmsearch.components import Aggregator, Component, ComponentContext, Encoder, Head
from psmsearch.composer import PSMLayer
from psmsearch.errors import suggest
from psmsearch.registry import Registry


D_MODEL = 32
CHUNK = 4
BATCH = 2
ATOL = 1e-4
FAST_SCAN_CHUNKS = (1, 2, 3, 7, 8, 9, 16, 17, 33, 65)  # block edges of blocked and kernel scans (64 steps and up)


class ContractViolation(AssertionError):
    """A check found evidence that the component breaks its contract."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ContractViolation(message)


@dataclass
class _Assembly:
    """A component under test together with the partners it runs with."""

    encoder: Encoder
    aggregator: Aggregator
    head: Head
    layer: PSMLayer
    registry: Registry
    built_with: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """The hyperparameters each kind was built with (``check --set``'s for the component under test, none
    for its partners): what a check that builds the layer again passes, never the resolved ``hparams``,
    to which a component may have added keys of its own."""

    def rebuilt_kwargs(self, kind: str) -> dict[str, Any]:
        return dict(self.built_with.get(kind, {}))

    def inputs(self, n_chunks: int, seed: int, width: int | None = None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        c = width or self.layer.chunk_size
        return torch.randn(BATCH, n_chunks, c, D_MODEL, generator=generator)  # [B, N, c, d]

    def chunk_states(self, n_chunks: int, seed: int) -> Any:
        return self.encoder.summarize(self.encoder.features(self.inputs(n_chunks, seed)))  # [B, N, ...]


def _partner(registry: Registry, kind: str, state_kind: str) -> type[Component]:
    for name in registry.names(kind):
        info = registry.get(kind, name)
        if info.state_kind == state_kind:
            return info.cls
    kinds = sorted({registry.get(kind, other).state_kind for other in registry.names(kind)})
    known = f" (state kinds of the registered {kind}s: {', '.join(kinds)})" if kinds else f" (no {kind} is registered)"
    raise ContractViolation(f"no registered {kind} has state_kind {state_kind!r} to test against{known}."
                            f"{suggest(state_kind, kinds)}")


def _chosen_partner(registry: Registry, kind: str, name: str, state_kind: str) -> type[Component]:
    """The partner of ``kind`` named by the user (``check --partner KIND:NAME``), of the state kind under test."""
    info = registry.get(kind, name)
    if info.state_kind != state_kind:
        raise ContractViolation(f"--partner {kind}:{name} has state_kind {info.state_kind!r}, and the component under "
                                f"test {state_kind!r}; a partner must share it")
    return info.cls


def _assemble(cls: type[Component], registry: Registry, seed: int,
              partners: Mapping[str, str] | None = None, hyperparameters: Mapping[str, Any] | None = None) -> _Assembly:
    """``cls`` built beside a partner of each other kind: the one ``partners`` names (kind -> name), else
    the first registered of its state kind. ``cls`` takes ``hyperparameters`` (``check --set``), its
    declared defaults for the rest; the partners take their defaults."""
    torch.manual_seed(seed)
    state_kind = cls.state_kind
    chosen = partners or {}
    classes = {kind: cls if kind == cls.kind else
               _chosen_partner(registry, kind, chosen[kind], state_kind) if kind in chosen else
               _partner(registry, kind, state_kind)
               for kind in ("encoder", "aggregator", "head")}
    context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK)
    given = dict(hyperparameters or {})
    encoder = classes["encoder"](context, **(given if cls.kind == "encoder" else {}))
    context = ComponentContext(d_model=D_MODEL, chunk_size=CHUNK, encoder=encoder)
    aggregator = classes["aggregator"](context, **(given if cls.kind == "aggregator" else {}))
    head = classes["head"](context, **(given if cls.kind == "head" else {}))
    layer = PSMLayer(encoder, aggregator, head, CHUNK).eval()  # dropout off: the checks compare paths exactly
    built_with = {kind: (given if kind == cls.kind else {}) for kind in ("encoder", "aggregator", "head")}
    return _Assembly(encoder, aggregator, head, layer, registry, built_with)
