"""Contract check of every kind: a component called twice on identical inputs gives identical outputs.

The other checks compare two computations of one function (tree against online scan, a sequence
alone against beside a partner, a layer built on the meta device against the original), so a
component that draws random numbers in ``forward`` fails them all, each with a message that points
elsewhere (a batch mixed up, a buffer left uninitialised). This check runs first and names the
likely cause: a random op, or ``F.dropout`` called without ``training=self.training`` (it drops in
``eval()`` mode too, where the suite runs every component).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from psmsearch import states as S
from psmsearch.contract_assembly import _Assembly, _require
from psmsearch.scan import _component_origin, prefix_scan

_CAUSES = ("in eval() mode; a random op in it (torch.randn*, torch.rand*, torch.bernoulli), or F.dropout(x, p) "
           "without training=self.training, which drops in eval() mode too (nn.Dropout does not)")


def _largest_difference(first: Any, second: Any) -> float:
    """The largest element-wise difference of two states; equal elements (infinities included) and
    elements NaN in both count as no difference, any other NaN or infinity as an infinite one."""
    largest = 0.0
    for x, y in zip(S.leaves(first), S.leaves(second)):
        x, y = x.detach(), y.detach()
        if x.shape != y.shape:
            return float("inf")
        same = x == y
        if x.is_floating_point():
            same |= torch.isnan(x) & torch.isnan(y)
        diff = (x.double() - y.double()).abs().masked_fill(same, 0.0)
        if diff.numel():
            largest = max(largest, float(diff.nan_to_num(nan=float("inf"), posinf=float("inf")).max()))
    return largest


def _twice(call: Callable[[], Any], what: str, component: Any, method: str, args: tuple[Any, ...]) -> None:
    with torch.no_grad():
        first, second = call(), call()
    diff = _largest_difference(first, second)
    _require(diff == 0.0, f"two calls of {what}{_component_origin(component, method, args)} on identical inputs "
                          f"differ by {diff:.3g} {_CAUSES}")


def _encoder_deterministic(a: _Assembly) -> str:
    x = a.inputs(3, 81)  # [B, 3, c, d]
    _twice(lambda: a.encoder.features(x), "features(x)", a.encoder, "features", (x,))
    f = a.encoder.features(x)
    _twice(lambda: a.encoder.summarize(f), "summarize(f)", a.encoder, "summarize", (f,))
    return "features and summarize, called twice, bitwise equal"


def _aggregator_deterministic(a: _Assembly) -> str:
    older, newer = a.chunk_states(3, 82), a.chunk_states(3, 83)  # [B, 3, ...]
    _twice(lambda: a.aggregator(older, newer), "agg(older, newer)", a.aggregator, "forward", (older, newer))
    _twice(lambda: a.aggregator.initial_state((2,)), "initial_state((2,))", a.aggregator, "initial_state", ((2,),))
    return "agg(older, newer) and initial_state, called twice, bitwise equal"


def _head_deterministic(a: _Assembly) -> str:
    with torch.no_grad():
        prefix = prefix_scan(a.aggregator, a.chunk_states(3, 84))  # [B, 3, ...]
        f = a.encoder.features(a.inputs(3, 85))  # [B, 3, c, ...]
    _twice(lambda: a.head(prefix, f), "head(prefix, f)", a.head, "forward", (prefix, f))
    return "head(prefix, f), called twice, bitwise equal"
