"""How the contract checks measure components: differences, shapes and finiteness of states, and
each component's own backward against finite differences.

States are tensors or tuples of tensors (see :mod:`psmsearch.states`), so every measure here walks
their leaves. :func:`_gradcheck` exists because the other gradient checks compare paths that share
one backward: a wrong hand-written backward agrees with itself there, and only finite differences
catch it.
"""

from __future__ import annotations

import copy
from typing import Any, Callable

import torch

from psmsearch import states as S
from psmsearch.components import Component
from psmsearch.contract_assembly import _require


def _max_diff(a: Any, b: Any) -> float:
    diffs = [(x.double() - y.double()).abs().max().item() for x, y in zip(S.leaves(a), S.leaves(b)) if x.numel()]
    return max(diffs, default=0.0)


def _shapes(state: Any) -> list[list[int]]:
    return [list(leaf.shape) for leaf in S.leaves(state)]


def _all_finite(state: Any) -> bool:
    return all(torch.isfinite(leaf).all().item() for leaf in S.leaves(state))


def tuple_requires_grad(state: Any) -> Any:
    """A detached copy of ``state`` whose leaves require grad."""
    return S.tree_map(lambda leaf: leaf.detach().clone().requires_grad_(True), state)


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
    rounded = sorted({str(out.dtype) for out in base if out.is_floating_point() and out.dtype != torch.float64})
    _require(not rounded, f"{what}: in float64 (inputs and parameters) it returned {', '.join(rounded)}, so its "
                          "derivative cannot be checked: a cast in it (.float(), .to(dtype)) rounds every result; "
                          "make new tensors in the dtype of an input or a parameter")
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
