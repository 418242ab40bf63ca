"""The component contract suite (``psmsearch check``), importable for plugin authors' own tests.

Each check builds the component with its default hyperparameters next to compatible partners
from the registry (same ``state_kind``), provokes the property it is about and reports pass or
fail with the evidence. In a plugin's test suite::

    from psmsearch.testing import assert_component_ok

    def test_my_aggregator_keeps_the_contract():
        assert_component_ok(MyAggregator)

Checks: determinism (two calls on identical inputs agree bitwise), shapes and dtypes, finite outputs, gradients (and a float64 ``gradcheck`` of each component's own
backward against finite differences), token-locality of encoder features, causality, chunk
locality and partial chunks of heads, tree == sequential == online scans, associativity where
claimed (and the fast ``scan`` against the tree, outputs and gradients, from 1 to 65 chunks),
streaming == parallel for a whole layer (at batch 2 and 1), sequences of a batch computed
independently, the layer in float64, ``state_nbytes`` matching the bytes streaming really holds,
causality in ``train()`` mode, and no tensors a component keeps of its own growing as it runs. Components are checked in
``eval()`` mode, so dropout does not make equal paths differ.

Every check runs twice: on the component as it is built, and again after its parameters have been
randomised (:func:`_randomise_parameters`). A property that holds only at initialisation (a
zero-initialised branch that reads future tokens, an identity matrix that makes a non-associative
combine associative until the first training step) passes the first run and fails the second; the
failure then says so.

This module is the suite's entry point: it runs the checks and reports them (:func:`check_component`,
:class:`CheckResult`). The parts live in focused modules, whose names are re-exported here: the
component built beside its partners and the suite's sizes (:mod:`psmsearch.contract_assembly`), the
measures checks take (:mod:`psmsearch.contract_measures`), and the checks of each kind
(:mod:`psmsearch.contract_checks_encoder`, :mod:`psmsearch.contract_checks_aggregator`,
:mod:`psmsearch.contract_checks_head`) and of a whole layer (:mod:`psmsearch.contract_checks_layer`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from traceback import format_exception
from typing import Any, Callable, Iterable, Mapping

import torch

from psmsearch.components import Aggregator, Component, Encoder, Head
from psmsearch.contract_assembly import (ATOL, BATCH, CHUNK, D_MODEL, FAST_SCAN_CHUNKS, ContractViolation, _Assembly,
                                         _assemble)
from psmsearch.contract_checks_aggregator import (_aggregator_associativity, _aggregator_finite, _aggregator_gradients,
                                                  _aggregator_scan_paths, _aggregator_shapes)
from psmsearch.contract_checks_determinism import _aggregator_deterministic, _encoder_deterministic, _head_deterministic
from psmsearch.contract_checks_encoder import _encoder_gradients, _encoder_shapes, _encoder_token_local
from psmsearch.contract_checks_head import (_head_causal, _head_chunk_local, _head_forward_last, _head_fused_equals_generic,
                                            _head_gradients, _head_partial, _head_shapes)
from psmsearch.contract_checks_layer import (CHUNK_COUNTS, _layer_batch_independent, _layer_chunk_size_invariance,
                                             _layer_float64, _layer_meta_build, _layer_state_nbytes,
                                             _layer_stream_equals_parallel)
from psmsearch.contract_checks_leaks import _layer_causal_in_training, _layer_no_hidden_state
from psmsearch.contract_measures import tuple_requires_grad
from psmsearch.errors import where_raised
from psmsearch.registry import ComponentInfo, Registry, get_registry

__all__ = [
    "ATOL", "BATCH", "CHECKS", "CHUNK", "CHUNK_COUNTS", "Check", "CheckResult", "ContractViolation", "D_MODEL",
    "FAST_SCAN_CHUNKS", "LAYER_CHECKS", "assert_component_ok", "check_component", "check_components",
    "tuple_requires_grad",
]


@dataclass(frozen=True)
class CheckResult:
    """One check of one component: passed or not, and why; ``traceback`` is the full traceback where
    the check failed on an exception it did not expect (``psmsearch check --traceback`` prints it)."""

    component: str
    check: str
    passed: bool
    message: str = ""
    traceback: str = ""

    def line(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        detail = f": {self.message}" if self.message else ""
        return f"{status}  {self.component:<28} {self.check}{detail}"


Check = Callable[[_Assembly], str]

CHECKS: dict[str, list[tuple[str, Check]]] = {
    "encoder": [
        ("deterministic", _encoder_deterministic),
        ("shapes", _encoder_shapes),
        ("token_local_features", _encoder_token_local),
        ("gradients", _encoder_gradients),
    ],
    "aggregator": [
        ("deterministic", _aggregator_deterministic),
        ("shapes", _aggregator_shapes),
        ("finite_outputs", _aggregator_finite),
        ("gradients", _aggregator_gradients),
        ("tree_equals_online", _aggregator_scan_paths),
        ("associativity", _aggregator_associativity),
    ],
    "head": [
        ("deterministic", _head_deterministic),
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
    ("causal_in_training", _layer_causal_in_training),
    ("no_hidden_state", _layer_no_hidden_state),
    ("chunk_size_invariance", _layer_chunk_size_invariance),
]


def check_component(component: type[Component] | ComponentInfo, registry: Registry | None = None, seed: int = 0,
                    partners: Mapping[str, str] | None = None,
                    hyperparameters: Mapping[str, Any] | None = None) -> list[CheckResult]:
    """Run every contract check for one encoder, aggregator or head class; never raises.

    ``partners`` (kind -> registered name) chooses the components it runs beside; by default each is the
    first registered of its state kind. A partner of the component's own kind is not used.
    ``hyperparameters`` are the component's own (``check --set``; its declared defaults for the rest): a
    contract may hold at the defaults and break at another value a search draws.
    """
    registry = registry or get_registry()
    cls = component.cls if isinstance(component, ComponentInfo) else component
    if not (isinstance(cls, type) and issubclass(cls, (Encoder, Aggregator, Head))):
        return [CheckResult(repr(cls), "build", False, "not a subclass of psmsearch.Encoder, Aggregator or Head")]
    label = f"{cls.kind}:{cls.name or cls.__name__}"
    try:
        assembly = _assemble(cls, registry, seed, partners, hyperparameters)
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        return [CheckResult(label, "build", False, f"{type(err).__name__}: {err}{where_raised(err)}")]
    given = "".join(f", {key}={value}" for key, value in (hyperparameters or {}).items())
    results = [CheckResult(label, "build", True, f"with {_partners(assembly, cls)}" + (f"; at {given[2:]}" if given else ""))]
    try:
        randomised: _Assembly | None = copy.deepcopy(assembly, {id(assembly.registry): assembly.registry})
        _randomise_parameters(getattr(randomised, cls.kind), seed)
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        randomised = None
        results.append(CheckResult(label, "randomised_copy", False, f"copy.deepcopy of the component raised "
                                   f"{type(err).__name__}: {err}; every check also runs on a copy with randomised "
                                   "parameters, so a component must be deep-copyable (as torch modules are)"))
    nondeterministic = False
    for check_name, check in CHECKS[cls.kind] + LAYER_CHECKS:
        passed, message, trace = _run_check(check, assembly)
        if passed and randomised is not None:
            passed, failure, trace = _run_check(check, randomised)
            if not passed:
                message = f"with randomised parameters: {failure}"
        if not passed and nondeterministic:
            message += " (this component is not deterministic, see 'deterministic': fix that first)"
        nondeterministic |= check_name == "deterministic" and not passed and not trace  # differed, did not raise
        results.append(CheckResult(label, check_name, passed, message, trace))
    return results


def _run_check(check: Check, assembly: _Assembly) -> tuple[bool, str, str]:
    """``(passed, message, traceback)``: the traceback of an exception the check did not expect, else ``""``.

    Such an exception's message names the innermost line of plugin code it came through (``at
    FILE:LINE in FUNCTION``), a built-in plugin's included, so that a shape error raised inside torch
    says which component's code made the call.
    """
    try:
        return True, check(assembly), ""
    except ContractViolation as err:
        return False, str(err), ""
    except Exception as err:  # noqa: BLE001 - report, do not crash the suite
        return False, f"raised {type(err).__name__}: {err}{where_raised(err)}", "".join(format_exception(err))


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


def check_components(infos: Iterable[ComponentInfo], registry: Registry | None = None,
                     partners: Mapping[str, str] | None = None,
                     hyperparameters: Mapping[str, Any] | None = None) -> list[CheckResult]:
    """Run the suite for several registered components (beside ``partners``, with ``hyperparameters``,
    see :func:`check_component`)."""
    registry = registry or get_registry()
    return [result for info in infos
            for result in check_component(info, registry, partners=partners, hyperparameters=hyperparameters)]


def assert_component_ok(component: type[Component], registry: Registry | None = None) -> None:
    """Raise ``AssertionError`` listing every failed check (for plugin authors' pytest suites)."""
    failures = [r for r in check_component(component, registry) if not r.passed]
    if failures:
        raise AssertionError("contract violated:\n" + "\n".join(r.line() for r in failures))
