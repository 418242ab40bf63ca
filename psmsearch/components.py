"""Component contracts: Encoder, Aggregator, Head (DESIGN.md §3) and their hyperparameters.

A PSM layer cuts a sequence into chunks of ``c`` tokens. The encoder turns each chunk into a state,
the aggregator combines two states (``forward(older, newer)``) and the head predicts a chunk's
outputs from the exclusive prefix state of all earlier chunks. Components are ``torch.nn.Module``
subclasses that declare, as class attributes, what the registry, the composer and the search
need to know about them: ``name``, ``state_kind``, ``hyperparameters`` and (aggregators)
``associative``.

Every component is constructed as ``Component(context, **hyperparameters)``: the
:class:`ComponentContext` carries the layer's width and chunk size and, for aggregators and heads,
the already-built encoder, whose ``state_shape`` tells them what states look like.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Sequence, get_args

import torch
from torch import nn

from psmsearch.errors import HyperParameterError, suggest
from psmsearch.states import State, nbytes

ParamType = Literal["int", "float", "categorical", "bool"]
_PARAM_TYPES: tuple[str, ...] = get_args(ParamType)


@dataclass(frozen=True)
class HyperParameter:
    """One hyperparameter a component declares: its type, default and search range.

    ``low``/``high`` (and ``log``) bound numeric parameters; ``choices`` lists categorical ones.
    The search space samples inside these bounds unless the user narrows them.
    """

    name: str
    type: ParamType
    default: Any
    low: float | int | None = None
    high: float | int | None = None
    log: bool = False
    choices: tuple[Any, ...] | None = None
    help: str = ""
    origin: tuple[str, int] | None = field(default=None, init=False, compare=False, repr=False)
    """``(file, line)`` of the ``HyperParameter(...)`` call, for the registry's error messages."""

    def __post_init__(self) -> None:
        """Remember where the declaration was written; nothing is checked here.

        A check raising here would raise while the plugin's module is imported, and take every
        other component of that plugin with it, unnamed: :meth:`declaration_problems` runs when the
        component is registered and is reported with its name and this line.
        """
        frame = sys._getframe(1)  # the dataclass's generated __init__, or dataclasses.replace()
        while frame is not None and (frame.f_code.co_filename == __file__
                                     or frame.f_code.co_filename.endswith(("dataclasses.py", "<string>"))):
            frame = frame.f_back
        if frame is not None:
            object.__setattr__(self, "origin", (frame.f_code.co_filename, frame.f_lineno))

    def declaration_problems(self) -> list[str]:
        """What is wrong with this declaration (empty if nothing): an unknown type, missing bounds or
        choices, bounds that are not finite numbers, ``low > high``, a log scale from ``low <= 0``, a
        default it does not allow.

        The registry reports these as a failure of the plugin that declared the parameter, naming
        the component and the line of the declaration, so a search never meets them as a sampler error.
        """
        if self.type not in _PARAM_TYPES:
            return [f"type {self.type!r} is not one of {', '.join(_PARAM_TYPES)}"]
        if self.type == "categorical" and not self.choices:
            return ["a categorical parameter needs choices=(...), the values it may take"]
        problems = []
        if self.type in ("int", "float"):
            missing = [bound for bound in ("low", "high") if getattr(self, bound) is None]
            if missing:
                return [f"{' and '.join(missing)} missing: {self.type} parameters need low= and high=, the range a "
                        "search samples from"]
            for bound in ("low", "high"):
                value = getattr(self, bound)
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                    problems.append(f"{bound}={value!r} is not a finite number")
                elif self.type == "int" and not float(value).is_integer():
                    problems.append(f"{bound}={value!r} is not an integer, as an int parameter's bounds must be")
            if problems:
                return problems
            if self.low > self.high:  # type: ignore[operator]
                problems.append(f"low={self.low!r} is greater than high={self.high!r}")
            if self.log and self.low <= 0:  # type: ignore[operator]
                problems.append(f"log=True needs low > 0, got low={self.low!r}")
            if problems:
                return problems
        try:
            self.validate(self.default)
        except ValueError as err:
            problems.append(f"default {err}")
        return problems

    def allowed(self) -> str:
        """Human-readable description of the allowed values, for error messages."""
        if self.type == "categorical":
            return "one of " + ", ".join(repr(c) for c in self.choices or ())
        if self.type == "bool":
            return "true or false"
        scale = ", log scale" if self.log else ""
        return f"{self.type} in [{self.low}, {self.high}]{scale}"

    def validate(self, value: Any) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise ``ValueError`` saying why."""
        if self.type == "categorical":
            for choice in self.choices or ():
                if _is_choice(value, choice):
                    return choice
            raise ValueError(f"{value!r} is not allowed; expected {self.allowed()}")
        if self.type == "bool":
            if not isinstance(value, bool):
                raise ValueError(f"{value!r} is not a bool; expected {self.allowed()}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{value!r} is not a number; expected {self.allowed()}")
        if self.type == "int":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(f"{value!r} is not an integer; expected {self.allowed()}")
            value = int(value)
        else:
            value = float(value)
        if not (self.low <= value <= self.high):  # type: ignore[operator]
            raise ValueError(f"{value!r} is out of range; expected {self.allowed()}")
        return value

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready description (used by ``psmsearch plugins --json``)."""
        out: dict[str, Any] = {"name": self.name, "type": self.type, "default": self.default}
        if self.type in ("int", "float"):
            out["range"] = [self.low, self.high]
            out["log"] = self.log
        if self.choices is not None:
            out["choices"] = list(self.choices)
        if self.help:
            out["help"] = self.help
        return out


def _is_choice(value: Any, choice: Any) -> bool:
    """``value == choice`` without Python's numeric coercions that would build a broken component:
    ``True == 1`` and ``4.0 == 4`` are not the choice (``4.0`` breaks ``view``); ``1`` is ``1.0``."""
    if isinstance(value, bool) or isinstance(choice, bool):
        return type(value) is type(choice) and value == choice
    if isinstance(value, float) and isinstance(choice, int):
        return False
    return bool(value == choice)


@dataclass
class ComponentContext:
    """What a component needs to know about the layer it is built into."""

    d_model: int
    chunk_size: int
    encoder: "Encoder | None" = None
    extra: dict[str, Any] = field(default_factory=dict)


class Component(nn.Module):
    """Base of all PSM components: metadata shared by encoders, aggregators and heads."""

    kind: ClassVar[str] = "component"
    name: ClassVar[str] = ""
    state_kind: ClassVar[str] = ""
    hyperparameters: ClassVar[Sequence[HyperParameter]] = ()
    description: ClassVar[str] = ""

    def __init__(self, context: ComponentContext, **hparams: Any) -> None:
        super().__init__()
        self.context = context
        self.hparams = self.resolve_hyperparameters(hparams)

    @classmethod
    def resolve_hyperparameters(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Defaults filled in, values validated; unknown names are an error naming the allowed ones."""
        declared = {hp.name: hp for hp in cls.hyperparameters}
        unknown = sorted(set(given) - set(declared))
        if unknown:
            allowed = ", ".join(sorted(declared)) or "none"
            raise HyperParameterError(
                f"{cls.kind} {cls.name!r} has no hyperparameter {unknown[0]!r}; allowed: {allowed}."
                f"{suggest(unknown[0], declared)}", unknown[0]
            )
        resolved: dict[str, Any] = {}
        for name, hp in declared.items():
            value = given.get(name, hp.default)
            try:
                resolved[name] = hp.validate(value)
            except ValueError as err:
                raise HyperParameterError(f"{cls.kind} {cls.name!r} hyperparameter {name!r}: {err}", name) from None
        return resolved


class Encoder(Component):
    """``Enc = summarize ∘ features``.

    ``features(x[*, c', d], offset) -> f[*, c', ...]`` is token-local: output ``j`` depends only on
    input ``j`` and its chunk-local position ``offset + j``, so streaming can compute it one token
    at a time. ``summarize(f[*, c, ...]) -> state[*]`` reduces a complete chunk to one state.
    """

    kind: ClassVar[str] = "encoder"
    chunk_size_invariant: ClassVar[bool] = False
    """True where the layers this encoder feeds compute an exact token-by-token recurrence whose outputs
    do not depend on the chunk size ``c`` (the affine family: ``c`` only decides how the work is split).
    The contract suite then checks that a layer's outputs agree at several chunk sizes, which catches a
    chunk summary that disagrees with the head's intra-chunk readout (streaming and the parallel pass
    share both, so they agree with each other all the same). It checks the aggregator and head beside
    such an encoder too, unless the aggregator is not associative or the aggregator or head sets
    ``chunk_size_invariant = False`` itself (one not meant to keep the recurrence exact)."""

    def features(self, x: torch.Tensor, offset: int = 0) -> Any:
        raise NotImplementedError(_missing(self, "features"))

    def summarize(self, f: Any) -> State:
        raise NotImplementedError(_missing(self, "summarize"))

    def forward(self, x: torch.Tensor) -> State:
        return self.summarize(self.features(x))

    @property
    def state_shape(self) -> Any:
        """Shape of one state without batch dims: a tuple of ints, or a tuple of such tuples."""
        raise NotImplementedError(_missing(self, "state_shape"))

    def state_nbytes(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes one state occupies for ``batch_size`` sequences: the component's own accounting.

        The contract suite compares it with the bytes of the tensors streaming really holds.
        """
        itemsize = torch.empty((), dtype=dtype).element_size()
        shape = self.state_shape
        shapes = shape if shape and isinstance(shape[0], tuple) else (shape,)
        return sum(batch_size * math.prod(s) * itemsize for s in shapes)


class Aggregator(Component):
    """``forward(older, newer) -> state``: combines two states (operand order is fixed).

    ``associative`` lets the engine use any parenthesization and a single running state while
    streaming. ``initial_state(batch_shape)`` is what the head sees before any chunk (the prefix of
    chunk 0); the scan never passes it to ``forward``: the identity is a bypass.
    """

    kind: ClassVar[str] = "aggregator"
    associative: ClassVar[bool] = False

    def forward(self, older: State, newer: State) -> State:  # noqa: D102
        raise NotImplementedError(_missing(self, "forward"))

    def initial_state(self, batch_shape: tuple[int, ...]) -> State:
        raise NotImplementedError(_missing(self, "initial_state"))

    def scan(self, states: State) -> State | None:
        """Optional fast exclusive scan over dim 1 of ``states[B, N]`` (used only if associative).

        Returns ``None`` to fall back to the generic tree scan.
        """
        return None


class Head(Component):
    """``forward(prefix[*], f[*, c', ...]) -> y[*, c', d]``, causal within the chunk.

    Output ``j`` may depend on ``prefix`` and chunk positions ``<= j`` only, and any ``c' <= c``
    must work (streaming feeds partial chunks).
    """

    kind: ClassVar[str] = "head"

    def forward(self, prefix: State, f: Any) -> torch.Tensor:  # noqa: D102
        raise NotImplementedError(_missing(self, "forward"))

    def forward_last(self, prefix: State, f: Any) -> torch.Tensor:
        """Optional: only the newest position's output, ``forward(prefix, f)[..., -1, :]`` as ``[*, d]``.

        Streaming calls this once per token on the partial chunk ``f[*, c', ...]``, where all
        ``c'`` rows of ``forward`` would be computed to keep one. A head that can compute the last
        row alone (O(c') instead of O(c'^2) for the affine readouts; one query row instead of
        ``c'`` for attention) overrides it; it must equal the default up to rounding, which the
        contract suite's stream == parallel checks hold it to.
        """
        return self(prefix, f)[..., -1, :]

    def fused_forward(self, encoder: Encoder, aggregator: Aggregator, f: Any, *,
                      required: bool = False) -> torch.Tensor | None:
        """Optional: the whole training pass in one fused computation, or ``None``.

        ``f[B, N, c, ...]`` are ``encoder``'s features of every chunk; the result ``y[B, N, c, d]``
        must equal ``forward(prefix_scan(aggregator, encoder.summarize(f)), f)``. A head that
        recognises its encoder and aggregator and knows a kernel computing summaries, scan and
        readout at once (the affine heads: chunkwise gated linear attention) returns it; ``None``
        means "use the generic path". With ``required=False`` (the layer's default) a head may also
        decline where its kernel would not pay; ``required=True`` asks for it wherever it is correct.
        Streaming never uses it. The layer calls this method directly, so module hooks registered
        on the head (``register_forward_hook``) do not run on the fused path.
        """
        return None


def state_bytes(state: State) -> int:
    """Logical bytes of a state (re-exported for component authors)."""
    return nbytes(state)


COMPONENT_KINDS: dict[str, type[Component]] = {
    "encoder": Encoder,
    "aggregator": Aggregator,
    "head": Head,
}


def _missing(component: Component, method: str) -> str:
    """Why a required method raised: which class, which method, and where the contract is described."""
    cls = type(component)
    return (f"{cls.__qualname__} ({cls.kind} {cls.name!r}, in {_defined_in(cls)}) does not implement {method}(), "
            f"which every {cls.kind} must; see the docstring of psmsearch.{cls.kind.capitalize()}")


def _defined_in(cls: type) -> str:
    """The file that defines ``cls`` (a plugin loaded from a path has a generated module name)."""
    module = sys.modules.get(cls.__module__)
    return getattr(module, "__file__", None) or cls.__module__
