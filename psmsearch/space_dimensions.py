"""Search dimensions: parsing and checking the mappings that make a template value searched.

A dimension is a mapping with exactly one of these keys (plus ``log`` / ``step`` for ranges, whose
bounds must be finite)::

    chunk_size: {choice: [1, 2, 4, 8]}
    lr: {float: [1.0e-4, 1.0e-2], log: true}
    d_model: {int: [32, 128], step: 32}
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from psmsearch.errors import ConfigError, suggest
from psmsearch.yamlio import SourceMap

DIMENSION_KEYS = ("choice", "int", "float")
DIMENSION_OPTIONS: dict[str, tuple[str, ...]] = {"choice": (), "int": ("log", "step"), "float": ("log", "step")}
DIMENSION_HELP = "A search dimension is a mapping with exactly one of choice, int, float (int and float ranges also take log and step)."
PRIMITIVES = (str, int, float, bool, type(None))


@dataclass
class Dimension:
    """One search dimension at ``path`` (the Optuna parameter name)."""

    path: str
    kind: str
    choices: list[Any] = field(default_factory=list)
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None

    def suggest(self, trial: Any) -> Any:
        if self.kind == "choice":
            labels = [_label(c) for c in self.choices]
            picked = trial.suggest_categorical(self.path, labels)
            return self.choices[labels.index(picked)]
        if self.kind == "int":
            return trial.suggest_int(self.path, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(self.path, float(self.low), float(self.high), step=self.step, log=self.log)

    def describe(self) -> dict[str, Any]:
        """What this dimension draws from, JSON-ready and as a space file writes it: ``{"choice": [...]}``
        (choices as Optuna labels them) or ``{"int": [low, high]}`` with ``log`` / ``step`` where set."""
        if self.kind == "choice":
            return {"choice": [_label(c) for c in self.choices]}
        described: dict[str, Any] = {self.kind: [self.low, self.high]}
        if self.log:
            described["log"] = True
        if self.step is not None:
            described["step"] = self.step
        return described


def _label(value: Any) -> Any:
    """Optuna categorical values must be primitives; other choices are labelled by their JSON."""
    return value if isinstance(value, PRIMITIVES) else json.dumps(value, sort_keys=True)


def is_dimension(value: Any) -> bool:
    """True for a mapping meant as a dimension: one with a ``choice``, ``int`` or ``float`` key (and no ``name``).

    A malformed one (two kinds, a misspelled ``log``/``step``) counts too, so that
    :func:`parse_dimension` names what is wrong with it instead of the field's validator rejecting a mapping.
    """
    return isinstance(value, dict) and "name" not in value and bool(set(value) & set(DIMENSION_KEYS))


def parse_dimension(path: str, spec: dict[str, Any], where: SourceMap) -> Dimension:
    """Validate a dimension mapping; errors name the field and what is allowed."""
    kinds = [k for k in DIMENSION_KEYS if k in spec]
    if len(kinds) != 1:
        got = f"both {' and '.join(kinds)}" if kinds else f"none of them, only {', '.join(map(str, spec))}"
        raise where.error(path, f"this dimension has {got}. {DIMENSION_HELP}")
    kind = kinds[0]
    value = spec[kind]
    unknown = [k for k in spec if k not in (kind, *DIMENSION_OPTIONS[kind])]
    if kind == "choice" and unknown and set(unknown) <= {"log", "step"}:
        raise where.error(path, "choice takes no log/step")
    if unknown:
        allowed = [kind, *DIMENSION_OPTIONS[kind]]
        raise where.error(f"{path}.{unknown[0]}", f"unknown key {unknown[0]!r} in this {kind} dimension."
                                                  f"{suggest(str(unknown[0]), allowed)} Allowed: {', '.join(allowed)}")
    if kind == "choice":
        if not isinstance(value, list) or not value:
            raise where.error(path, f"choice must be a non-empty list, got {value!r}")
        _check_distinct_choices(path, value, where)
        return Dimension(path, "choice", choices=value)
    if not (isinstance(value, list) and len(value) == 2 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)):
        raise where.error(path, f"{kind} range must be [low, high] numbers, got {value!r}")
    low, high = value
    if not (_finite(low) and _finite(high) and _finite(float(high) - float(low))):
        raise where.error(path, f"{kind} range needs finite bounds less than 1.8e308 apart (a sampler draws between "
                                f"them), got [{low}, {high}]")
    if kind == "int" and not all(float(v).is_integer() for v in value):
        raise where.error(path, f"int range must hold integers, got {value!r}")
    if not low < high:
        raise where.error(path, f"{kind} range needs low < high, got [{low}, {high}]")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise where.error(f"{path}.log", f"log must be true or false, got {log!r}")
    if log and low <= 0:
        raise where.error(path, f"a log-scale range needs low > 0, got {low}")
    step = spec.get("step")
    if step is not None:
        _check_step(path, kind, step, log, where)
    return Dimension(path, kind, low=low, high=high, log=log, step=step)


def _check_step(path: str, kind: str, step: Any, log: bool, where: SourceMap) -> None:
    """Refuse a range's ``step`` that is not a valid step, or that comes with ``log: true``.

    Optuna draws a log-scale range without steps, so the pair is refused on its own terms: one
    message for both once said "step must be an integer >= 1 (and not used with log), got 8",
    which read as if 8 were the fault.
    """
    if log:
        raise where.error(f"{path}.step", f"step and log cannot be combined in one {kind} range (here step: {step!r} "
                                          "with log: true): Optuna draws a log-scale range without steps; keep one of them")
    numeric = isinstance(step, (int, float)) and not isinstance(step, bool)
    if kind == "int" and not (numeric and float(step).is_integer() and step >= 1):
        raise where.error(f"{path}.step", f"an int range's step must be an integer >= 1 (and not used with log), got {step!r}")
    if kind == "float" and not (numeric and _finite(step) and step > 0):
        raise where.error(f"{path}.step", f"a float range's step must be a finite number > 0 (and not used with log), got {step!r}")


def _check_distinct_choices(path: str, choices: list[Any], where: SourceMap) -> None:
    """Refuse two choices of different types that compare equal: Optuna stores a categorical value as
    the index of the first equal choice, so of ``[1, true]`` (``True == 1``) or ``[2, 2.0]`` only the
    first is ever sampled. (A value listed twice is left to the component check, which names it.)"""
    for choice in choices:
        if isinstance(choice, float) and math.isnan(choice):
            raise where.error(path, "a choice is NaN, which equals nothing (Optuna could not store it as a choice); "
                                    "list real values")
    labels = [_label(c) for c in choices]
    for i, label in enumerate(labels):
        first = next(j for j, other in enumerate(labels) if other == label)
        if first != i and type(labels[first]) is not type(label):
            raise where.error(path, f"choice values {choices[first]!r} and {choices[i]!r} are equal as Optuna compares "
                                    "them, so only the first could ever be sampled; list each value once")


def _finite(value: float) -> bool:
    """A finite number that fits a float (a huge int does not)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def not_a_dimension(path: str, value: dict[Any, Any], where: SourceMap) -> ConfigError:
    """The error for a mapping where a single value (or a search dimension) belongs, naming its keys."""
    allowed = [*DIMENSION_KEYS, "log", "step"]
    unknown = [str(k) for k in value if k not in allowed]
    problem = f"unknown key {unknown[0]!r}.{suggest(unknown[0], allowed)}" if unknown else "it has no choice, int or float key."
    return where.error(path, f"{value!r} is neither a value for this field nor a search dimension: {problem} {DIMENSION_HELP}")
