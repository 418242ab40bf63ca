"""Search spaces: a trial configuration template in which any value may be a search dimension.

A dimension is a mapping with exactly one of these keys (plus ``log`` / ``step`` for ranges, whose
bounds must be finite)::

    chunk_size: {choice: [1, 2, 4, 8]}
    lr: {float: [1.0e-4, 1.0e-2], log: true}
    d_model: {int: [32, 128], step: 32}

Components (``model.encoder``, ``model.aggregator``, ``model.head``) are special: a choice lists
component specs, each a name or a mapping with the component's own hyperparameters, which may be
dimensions themselves and are sampled only when that component is chosen (conditional parameters).
``search: all`` in a spec makes every declared hyperparameter that the spec does not fix a
dimension over its declared range. Aggregators and heads are only ever sampled among those
compatible with the chosen encoder's ``state_kind``: incompatible combinations are never trained.

Sampling goes through Optuna's define-by-run interface (``trial.suggest_*``), so the same
:meth:`SearchSpace.sample` serves the Optuna driver, Ray Tune's ``OptunaSearch`` and
``optuna.trial.FixedTrial`` (to rebuild a trial's configuration from its flat parameters).
"""

from __future__ import annotations

import json
import math
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import optuna
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from psmsearch.config import KIND_FIELDS, MODEL_FIELDS, model_at, unknown_field_message, unread_model_field_message
from psmsearch.errors import ConfigError, PSMSearchError, suggest
from psmsearch.registry import Registry, get_registry
from psmsearch.yamlio import SourceMap, load_yaml

DIMENSION_KEYS = ("choice", "int", "float")
DIMENSION_OPTIONS: dict[str, tuple[str, ...]] = {"choice": (), "int": ("log", "step"), "float": ("log", "step")}
DIMENSION_HELP = "A search dimension is a mapping with exactly one of choice, int, float (int and float ranges also take log and step)."
COMPONENT_KINDS = ("encoder", "aggregator", "head")
PRIMITIVES = (str, int, float, bool, type(None))

# Search and study names become MLflow filter values, run names and Ray folder names.
NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"

class Objective(BaseModel):
    """One metric to optimise and its direction."""

    model_config = ConfigDict(extra="forbid")

    metric: str
    direction: Literal["maximize", "minimize"] = "maximize"


class DriverSettings(BaseModel):
    """How trials are scheduled; the CLI's flags override these."""

    model_config = ConfigDict(extra="forbid")

    name: Literal["optuna", "ray"] = "optuna"
    trials: int = Field(8, ge=1)
    jobs: int = Field(1, ge=1)
    storage: str | None = None
    study: str | None = Field(None, pattern=NAME_PATTERN)
    seed: int = 0
    sampler: Literal["tpe", "random", "nsga2", "grid"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    startup_trials: int = Field(4, ge=0, description="trials before TPE and pruning kick in")
    cpus_per_trial: float = Field(1.0, gt=0)
    gpus_per_trial: float = Field(0.0, ge=0)
    address: str | None = None
    heartbeat_interval: int = Field(5, ge=1, description="seconds between a running trial's heartbeats")
    grace_period: int = Field(15, ge=2, description="a trial silent this long is stale (its process died)")


class TrackingSettings(BaseModel):
    """Where results go in MLflow."""

    model_config = ConfigDict(extra="forbid")

    experiment: str | None = None
    tracking_uri: str | None = None
    enabled: bool = True


class SpaceHeader(BaseModel):
    """The parts of a search-space file that are not the trial template."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN)
    description: str = ""
    objectives: list[Objective] = Field(min_length=1)
    driver: DriverSettings = DriverSettings()
    tracking: TrackingSettings = TrackingSettings()


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


@dataclass
class SearchSpace:
    """A validated search space: the header, the trial template and the registry it resolves against."""

    header: SpaceHeader
    template: dict[str, Any]
    source: SourceMap
    registry: Registry
    warnings: list[str] = field(default_factory=list)
    """Doubtful but allowed settings (an objective against its metric's natural direction), for the CLI to print."""

    @property
    def name(self) -> str:
        return self.header.name

    @property
    def objectives(self) -> list[Objective]:
        return self.header.objectives

    def sample(self, trial: Any) -> dict[str, Any]:
        """Resolve every dimension through ``trial.suggest_*``: a plain trial configuration dict.

        ``model.kind`` is resolved first; fields that kind does not read (``chunk_size`` and the
        components for a GPT, ``n_heads`` for a PSM) are neither sampled nor passed on, so trials of
        one kind are never told apart by parameters it ignores.
        """
        model = self.template.get("model")
        unused: frozenset[str] = frozenset()
        if isinstance(model, dict):
            kind = _resolve(model.get("kind", "psm"), "model.kind", trial, self.source)
            if isinstance(kind, str) and kind in KIND_FIELDS:
                # known fields only: a misspelled one stays, for the trial validator to name
                unused = (frozenset(model) & MODEL_FIELDS) - KIND_FIELDS[kind]
        template = self.template if not unused else \
            {**self.template, "model": {k: v for k, v in model.items() if k not in unused}}
        resolved = _resolve(template, "", trial, self.source)
        if isinstance(model, dict) and not unused & set(COMPONENT_KINDS):
            resolved["model"] = {**resolved.get("model", {}), **_sample_components(template["model"], trial, self)}
        return resolved

    def check_sampler(self) -> None:
        """Raise the ConfigError of a ``driver.sampler`` this space cannot have (see :meth:`grid`).

        Run when the space is loaded and again by each driver before it creates anything (a study,
        a Ray folder, an MLflow run): the grid was once first built after those, so a refused search
        left an empty study and a RUNNING parent run, and the fixed space then needed ``--resume``.
        """
        if self.header.driver.sampler == "grid":
            self.grid()

    def grid(self) -> dict[str, list[Any]]:
        """Every parameter and its values, for exhaustive grid search of a finite space.

        Only spaces whose dimensions are all choices, with no conditional component parameters and
        a single state kind, have a grid; otherwise this names what stands in the way. A component
        choice (``{choice: [...]}`` or a plain list) is one dimension over the component names, so
        each of its options must leave nothing to search: a plain list entry (or ``search: all``)
        qualifies when it fixes every hyperparameter its component declares, or the component
        declares none.
        """
        values: dict[str, list[Any]] = {}
        model = self.template.get("model", {})
        if isinstance(model, dict) and is_dimension(model.get("kind")):
            kinds = parse_dimension("model.kind", model["kind"], self.source).choices
            common = frozenset.intersection(*(KIND_FIELDS.get(k, frozenset()) if isinstance(k, str) else frozenset()
                                              for k in kinds))
            conditional = sorted(k for k, v in model.items() if k not in common and k != "kind"
                                 and (is_dimension(v) or (k in COMPONENT_KINDS and _searches_components(v))))
            if conditional:
                raise self.source.error(f"model.{conditional[0]}", "sampler 'grid' needs every dimension in every "
                                        "trial; this one is searched only for some model kinds")
        for dim in self.dimensions():
            if dim.kind != "choice":
                raise self.source.error(dim.path, f"sampler 'grid' needs choice dimensions only; this is a {dim.kind} range")
            values[dim.path] = [_label(c) for c in dim.choices]
        model = self.template.get("model", {})
        encoders = _component_options(model, "encoder", self.source)
        state_kinds = {self.registry.get("encoder", o[0]).state_kind for o in encoders}
        if len(state_kinds) > 1:
            raise self.source.error("model.encoder", "sampler 'grid' needs encoders of a single state kind")
        (state_kind,) = state_kinds
        for kind in COMPONENT_KINDS:
            # exactly the options sampling can pick: those of the encoders' state kind
            options = _compatible(self.registry, kind, model, self, state_kind)
            for name, params, path in options:
                self._refuse_open_component(kind, name, params, path, listed=isinstance(model.get(kind), list))
            if len(options) > 1:
                values[f"model.{kind}"] = [name for name, _, _ in options]
        return values

    def _refuse_open_component(self, kind: str, name: str, params: dict[str, Any], path: str, listed: bool) -> None:
        """Raise the ConfigError of a component option that would still search a hyperparameter under a grid.

        Such a parameter is drawn only when its component is chosen, and Optuna's grid holds one
        fixed list of parameters for every trial, so it cannot take a conditional one. A plain list
        entry stands for ``search: all`` (see :func:`_component_options`), which opens exactly the
        declared hyperparameters the entry does not fix: with none left it opens nothing, and the
        grid is just the listed components. The error is located at the entry (or at the dimension
        written in it), names what is still open and the entry to write instead.
        """
        given = {k: v for k, v in params.items() if k != "search"}
        for key, value in given.items():
            if is_dimension(value):
                raise self.source.error(f"{path}.{key}", f"sampler 'grid' needs fixed component hyperparameters; "
                                                         f"{key} is a dimension here, drawn only when {kind} {name!r} "
                                                         "is chosen (a conditional parameter, which a grid cannot hold): "
                                                         "fix it to one value, or use sampler random or tpe")
        if params.get("search") != "all":
            return
        declared = self.registry.get(kind, name).hyperparameters
        opened = [hp for hp in declared if hp.name not in given]
        if not opened:
            return
        how = ("a plain list of components searches every hyperparameter an entry does not fix" if listed
               else "search: all searches every hyperparameter the entry does not fix")
        ranges = ", ".join(f"{hp.name}: {_flow(_declared_dimension(hp.name, hp).describe())}" for hp in opened)
        entry = _flow({"name": name, **given, **{hp.name: hp.default for hp in opened}})
        defaults = "its declared default" if len(opened) == 1 else "their declared defaults"
        rewrite = entry if listed else f"{entry} (without search: all)"
        raise self.source.error(path, f"sampler 'grid' needs fixed component hyperparameters, but {how}: {kind} "
                                      f"{name!r} leaves {_and(opened)} open ({ranges}); write {rewrite} to keep it in "
                                      f"the grid ({defaults} filled in), or use sampler random or tpe to search "
                                      f"{'it' if len(opened) == 1 else 'them'}")

    def dimension_record(self) -> dict[str, dict[str, Any]]:
        """Every parameter the space can sample, by its Optuna name, with what it is drawn from (JSON-ready).

        The non-component dimensions, the component choices (their names) and each component's
        searched hyperparameters (``search: all`` ones over their declared ranges). A restored Ray
        searcher keeps sampling the space it was saved with while trials are rebuilt from the file,
        so a resume compares this record with the one saved when the search started.
        """
        record = {dim.path: dim.describe() for dim in self.dimensions()}
        model = self.template.get("model")
        if not isinstance(model, dict):
            return record
        for kind in COMPONENT_KINDS:
            options = _component_options(model, kind, self.source)
            if len(options) > 1:
                record[f"model.{kind}"] = {"choice": [name for name, _, _ in options]}
            for name, params, _ in options:
                record.update(self._component_dimensions(kind, name, params))
        return record

    def _component_dimensions(self, kind: str, name: str, params: dict[str, Any]) -> dict[str, dict[str, Any]]:
        """The searched hyperparameters of one component option, described as in :meth:`dimension_record`."""
        found = {}
        for hp in self.registry.get(kind, name).hyperparameters:
            path = f"model.{kind}.{name}.{hp.name}"
            value = params.get(hp.name)
            if is_dimension(value):
                found[path] = parse_dimension(path, value, self.source).describe()
            elif hp.name not in params and params.get("search") == "all":
                found[path] = _declared_dimension(path, hp).describe()
        return found

    def dimensions(self) -> list[Dimension]:
        """The non-component dimensions (for documentation and smoke tests)."""
        found: list[Dimension] = []
        _collect(self.template, "", self.source, found)
        return found


def _resolve(node: Any, path: str, trial: Any, where: SourceMap) -> Any:
    if is_dimension(node):
        return parse_dimension(path, node, where).suggest(trial)
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            child = f"{path}.{key}" if path else key
            if path == "model" and key in COMPONENT_KINDS:
                continue
            out[key] = _resolve(value, child, trial, where)
        return out
    if isinstance(node, list):
        return [_resolve(v, f"{path}.{i}", trial, where) for i, v in enumerate(node)]
    return node


def _collect(node: Any, path: str, where: SourceMap, found: list[Dimension]) -> None:
    if is_dimension(node):
        found.append(parse_dimension(path, node, where))
    elif isinstance(node, dict):
        for key, value in node.items():
            if not (path == "model" and key in COMPONENT_KINDS):
                _collect(value, f"{path}.{key}" if path else key, where, found)
    elif isinstance(node, list):
        for i, value in enumerate(node):
            _collect(value, f"{path}.{i}", where, found)


def _searches_components(value: Any) -> bool:
    """Whether a component field's value searches over components: ``{choice: [...]}`` or a plain list."""
    return isinstance(value, list) or (isinstance(value, dict) and "choice" in value)


def _component_options(model: dict[str, Any], kind: str, where: SourceMap) -> list[tuple[str, dict[str, Any], str]]:
    """``(name, params, path)`` for each option of a component field (a fixed spec is one option).

    A plain list (``aggregator: [attention, mlp, gla]``, DESIGN.md §3) is the short form of a search
    over components and their own hyperparameters: each entry is a choice with ``search: all``
    (its declared ranges, minus the values the entry fixes). ``{choice: [...]}`` chooses among the
    components as written (their defaults, unless an entry says ``search: all``).
    """
    default = {"encoder": "embed", "aggregator": "attention", "head": "attention"}[kind]
    value = model.get(kind, default)
    path = f"model.{kind}"
    search_all = isinstance(value, list)
    if search_all:
        if not value:
            raise where.error(path, "an empty list of components; name at least one")
        entries, paths = value, [f"{path}.{i}" for i in range(len(value))]
    elif is_dimension(value):
        if "choice" not in value:
            raise where.error(path, f"a component can only be searched with choice, got {sorted(value)}")
        entries = parse_dimension(path, value, where).choices
        paths = [f"{path}.choice.{i}" for i in range(len(entries))]
    else:
        entries, paths = [value], [path]
    options = []
    for entry, entry_path in zip(entries, paths):
        if isinstance(entry, str):
            options.append((entry, {"search": "all"} if search_all else {}, entry_path))
        elif isinstance(entry, dict) and isinstance(entry.get("name"), str):
            params = {k: v for k, v in entry.items() if k != "name"}
            options.append((entry["name"], {"search": "all", **params} if search_all else params, entry_path))
        else:
            raise where.error(entry_path, f"a component is a name or a mapping with 'name', got {entry!r}")
    names = [name for name, _, _ in options]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise where.error(path, f"component {sorted(duplicates)[0]!r} is listed twice")
    return options


def _component_params(kind: str, name: str, params: dict[str, Any], trial: Any, space: SearchSpace) -> dict[str, Any]:
    info = space.registry.get(kind, name)
    search_all = params.get("search") == "all"
    given = {k: v for k, v in params.items() if k != "search"}
    out = {}
    for hp in info.hyperparameters:
        param_path = f"model.{kind}.{name}.{hp.name}"
        if hp.name in given:
            value = given[hp.name]
            out[hp.name] = parse_dimension(param_path, value, space.source).suggest(trial) if is_dimension(value) else value
        elif search_all:
            out[hp.name] = _declared_dimension(param_path, hp).suggest(trial)
    return out


def _flow(value: Any) -> str:
    """``value`` as YAML in flow style, as a space file would write it inline (``{name: mlp, mlp_ratio: 2}``)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf).strip()


def _and(hyperparameters: list[Any]) -> str:
    """The names of ``hyperparameters`` as a sentence lists them: ``layers, heads and mlp_ratio``."""
    names = [hp.name for hp in hyperparameters]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


def _declared_dimension(path: str, hp: Any) -> Dimension:
    if hp.type == "categorical":
        return Dimension(path, "choice", choices=list(hp.choices))
    if hp.type == "bool":
        return Dimension(path, "choice", choices=[False, True])
    return Dimension(path, hp.type, low=hp.low, high=hp.high, log=hp.log)


def _pick(kind: str, options: list[tuple[str, dict[str, Any], str]], suffix: str, trial: Any) -> tuple[str, dict[str, Any], str]:
    if len(options) == 1:
        return options[0]
    names = [name for name, _, _ in options]
    chosen = trial.suggest_categorical(f"model.{kind}{suffix}", names)
    return options[names.index(chosen)]


def _sample_components(model: dict[str, Any], trial: Any, space: SearchSpace) -> dict[str, Any]:
    """Sample encoder, then a compatible aggregator and head, each with its conditional parameters."""
    registry = space.registry
    encoders = _component_options(model, "encoder", space.source)
    state_kinds = {registry.get("encoder", name).state_kind for name, _, _ in encoders}
    viable = [e for e in encoders if all(_compatible(registry, k, model, space, registry.get("encoder", e[0]).state_kind) for k in ("aggregator", "head"))]
    encoder = _pick("encoder", viable, "", trial)
    state_kind = registry.get("encoder", encoder[0]).state_kind
    suffix = kind_suffix(state_kind) if len(state_kinds) > 1 else ""
    out = {"encoder": {"name": encoder[0], **_component_params("encoder", encoder[0], encoder[1], trial, space)}}
    for kind in ("aggregator", "head"):
        options = _compatible(registry, kind, model, space, state_kind)
        name, params, _ = _pick(kind, options, suffix, trial)
        out[kind] = {"name": name, **_component_params(kind, name, params, trial, space)}
    return out


def kind_suffix(state_kind: str) -> str:
    """What tells apart the aggregator and head choices of each state kind, when the encoder choice spans several.

    The options differ per state kind, and Optuna needs one distribution per parameter name, so the
    choice is ``model.aggregator-tokens`` for encoders of state kind ``tokens``. The name must be a
    valid MLflow parameter key (alphanumerics, ``_ - . /`` and spaces; MLflow refused the former
    ``model.aggregator[tokens]``), must not contain ``/`` (Ray Tune splits config keys on it) and must
    not read as a component hyperparameter (``model.aggregator.NAME``), hence the dash. Other
    characters of a plugin's state kind become ``_``.
    """
    return "-" + re.sub(r"[^A-Za-z0-9_.-]", "_", state_kind)


def _compatible(registry: Registry, kind: str, model: dict[str, Any], space: SearchSpace, state_kind: str) -> list[tuple[str, dict[str, Any], str]]:
    return [o for o in _component_options(model, kind, space.source) if registry.get(kind, o[0]).state_kind == state_kind]


def load_space(path: str | Path, registry: Registry | None = None, smoke_samples: int = 8) -> SearchSpace:
    """Load and validate a search-space file; every error names the file, line, field and what is allowed.

    Validation resolves component names against the registry, checks every dimension, and
    smoke-samples ``smoke_samples`` random configurations through the trial validator, so a space
    that cannot produce a valid trial is rejected before anything trains.
    """
    data, where = load_yaml(path)
    return space_from_data(data, where, registry, smoke_samples)


def space_from_data(data: Any, where: SourceMap, registry: Registry | None = None, smoke_samples: int = 8) -> SearchSpace:
    """Validate already-parsed search-space data (see :func:`load_space`)."""
    from psmsearch.trial import TrialConfig

    registry = registry or get_registry()
    if not isinstance(data, dict):
        raise where.error("", f"a search space is a mapping with name, task, model, train and objectives; got {type(data).__name__}")
    header_keys = set(SpaceHeader.model_fields)
    # ``plugins`` records where a trial's components came from (trial_config.yaml); a search writes it itself
    allowed = [*header_keys, *(name for name in TrialConfig.model_fields if name != "plugins")]
    if not header_keys & set(data) and set(data) & set(TrialConfig.model_fields):
        raise where.error("", "this is a trial config (no name or objectives), not a search space: run it with "
                          f"`psmsearch train {where.source}`, or add name: and objectives: to search around it "
                          "(see search_spaces/)")
    for key in data:
        if key not in allowed:
            raise where.error(str(key), unknown_field_message(str(key), allowed))
    try:
        header = SpaceHeader.model_validate({k: v for k, v in data.items() if k in header_keys})
    except ValidationError as err:
        raise _pydantic_error(err, where) from None
    _validate_objectives(header, where)
    template = {k: v for k, v in data.items() if k not in header_keys}
    space = SearchSpace(header, template, where, registry)
    _validate_model_kinds(space)
    _validate_components(space)
    _validate_choice_types(space)  # also parses every dimension: raises on a malformed one
    space.check_sampler()
    drawn = smoke_sample(space, smoke_samples)
    if drawn:
        space.warnings.extend(_contrary_directions(space, validate_sample(space, drawn[0])))
    space.warnings.extend(_test_set_objectives(space))
    return space


def _test_set_objectives(space: SearchSpace) -> list[str]:
    """Objectives on final test-set metrics (``test_...``): allowed, but they undo what the split is for.

    Periodic evaluations never report them, so the pruner has nothing to compare, and a search that
    selects on the test set turns it into one more validation figure.
    """
    return [
        f"{space.source.where(f'objectives.{i}.metric')}: objectives.{i}.metric: {o.metric!r} is a test-set metric, "
        "computed once after training: the pruner never sees it, and selecting trials on it makes it a "
        f"validation figure; optimise {o.metric[len('test_'):]!r} and report {o.metric!r} instead"
        for i, o in enumerate(space.objectives)
        if o.metric.startswith("test_")
    ]


def _validate_objectives(header: SpaceHeader, where: SourceMap) -> None:
    """A metric may be an objective once: listed twice (say, once per direction) every trial is Pareto-optimal."""
    first: dict[str, int] = {}
    for index, objective in enumerate(header.objectives):
        if objective.metric in first:
            raise where.error(f"objectives.{index}.metric",
                              f"metric {objective.metric!r} is already objective {first[objective.metric]}; each metric "
                              "may be optimised once (listed twice, every trial would be on the Pareto front)")
        first[objective.metric] = index


def _contrary_directions(space: SearchSpace, config: Any) -> list[str]:
    """Objectives that optimise a metric against its natural direction: allowed, but usually a slip."""
    from psmsearch.trial import metric_directions

    natural = metric_directions(config)
    return [
        f"{space.source.where(f'objectives.{i}.direction')}: objectives.{i}.direction: {o.metric!r} is set to "
        f"{o.direction}, but {'higher' if natural[o.metric] == 'maximize' else 'lower'} is better for it "
        f"({natural[o.metric]}); the search will look for its worst values"
        for i, o in enumerate(space.objectives)
        if natural.get(o.metric, o.direction) != o.direction
    ]


def _validate_model_kinds(space: SearchSpace) -> None:
    """A model field that no possible ``model.kind`` reads would be ignored by every trial (or, searched,
    never sampled): an error, so that ``n_heads: 8`` under ``kind: psm`` does not silently do nothing."""
    model = space.template.get("model", {})
    if not isinstance(model, dict):
        return
    kind = model.get("kind", "psm")
    kinds = parse_dimension("model.kind", kind, space.source).choices if is_dimension(kind) else [kind]
    readers = [k for k in kinds if isinstance(k, str) and k in KIND_FIELDS]
    if not readers:
        return  # an unknown or malformed kind: the trial validator names it
    for key, value in model.items():
        searched = is_dimension(value) or (key in COMPONENT_KINDS and _searches_components(value))
        message = unread_model_field_message(key, readers, *(("searched", "fix it or drop the dimension")
                                                             if searched else ("set", "drop it")))
        if message:
            raise space.source.error(f"model.{key}", message)


def _validate_components(space: SearchSpace) -> None:
    model = space.template.get("model", {})
    if not isinstance(model, dict):
        raise space.source.error("model", f"model must be a mapping, got {model!r}")
    for kind in COMPONENT_KINDS:
        for name, params, path in _component_options(model, kind, space.source):
            try:
                info = space.registry.get(kind, name)
            except PSMSearchError as err:
                raise space.source.error(path, str(err)) from None
            declared = {hp.name: hp for hp in info.hyperparameters}
            for key, value in params.items():
                if key == "search":
                    if value != "all":
                        raise space.source.error(f"{path}.search", f"search must be 'all', got {value!r}")
                    continue
                if key not in declared:
                    raise space.source.error(f"{path}.{key}", f"{kind} {name!r} has no hyperparameter {key!r}; allowed: "
                                                              f"{', '.join(sorted(declared)) or 'none'}."
                                                              f"{suggest(str(key), declared)}")
                hp = declared[key]
                _check_dimension_type(f"{path}.{key}", hp, value, space.source)
                values = _dimension_extremes(f"{path}.{key}", value, space.source)
                for v in values:
                    try:
                        hp.validate(v)
                    except ValueError as err:
                        if isinstance(v, dict):
                            raise not_a_dimension(f"{path}.{key}", v, space.source) from None
                        raise space.source.error(f"{path}.{key}", str(err)) from None
    encoders = _component_options(model, "encoder", space.source)
    if not any(all(_compatible(space.registry, k, model, space, space.registry.get("encoder", e[0]).state_kind) for k in ("aggregator", "head")) for e in encoders):
        kinds = {k: sorted({space.registry.get(k, o[0]).state_kind for o in _component_options(model, k, space.source)}) for k in COMPONENT_KINDS}
        raise space.source.error(
            "model",
            f"no compatible encoder/aggregator/head combination: they must share one state_kind, and the choices have {kinds}",
        )
    encoder_kinds = {space.registry.get("encoder", e[0]).state_kind for e in encoders}
    for kind in ("aggregator", "head"):
        for name, _, path in _component_options(model, kind, space.source):
            state_kind = space.registry.get(kind, name).state_kind
            if state_kind not in encoder_kinds:
                raise space.source.error(
                    path,
                    f"{kind} {name!r} has state_kind {state_kind!r}, which no listed encoder produces "
                    f"(encoder state kinds: {sorted(encoder_kinds)}); it would never be sampled",
                )


def _validate_choice_types(space: SearchSpace) -> None:
    """Refuse a choice value of the wrong type for a numeric or bool trial field (``model.chunk_size``).

    The trial validator coerces, so ``chunk_size: {choice: [4, "8"]}`` passed, Optuna stored ``'8'``
    and the distribution was ``(4, '8')``: a study that a resume with ``[4, 8]`` would not match.
    Component hyperparameters are checked against their declared type by :func:`_validate_components`.
    """
    from psmsearch.trial import TrialConfig

    for dim in space.dimensions():
        parts = dim.path.split(".")
        parent = model_at(TrialConfig, parts[:-1])
        field_info = parent.model_fields.get(parts[-1]) if parent is not None else None
        if dim.kind != "choice" or field_info is None:
            continue
        allowed = _scalar_types(field_info.annotation)
        for value in dim.choices:
            if allowed and not _is_instance(value, allowed):
                names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
                raise space.source.error(dim.path, f"choice value {value!r} is a {type(value).__name__}; {dim.path} takes "
                                                   f"{names} values (numbers are written without quotes)")


def _scalar_types(annotation: Any) -> tuple[type, ...]:
    """The plain types a field of this annotation takes (``int | None`` -> int, NoneType), or () when it
    is not made of int, float, bool and None alone (a string, a mapping: left to the trial validator)."""
    members = get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)
    scalars = (int, float, bool, type(None))
    return tuple(members) if members and all(m in scalars for m in members) and set(members) != {type(None)} else ()


def _is_instance(value: Any, allowed: tuple[type, ...]) -> bool:
    """Whether ``value`` has one of the ``allowed`` types, as YAML gives them: a bool is not an int, an int is a float."""
    if isinstance(value, bool):
        return bool in allowed
    if isinstance(value, int) and float in allowed:
        return True
    return isinstance(value, tuple(t for t in allowed if t is not bool))


def _check_dimension_type(path: str, hp: Any, value: Any, where: SourceMap) -> None:
    """Refuse a range whose kind cannot draw the hyperparameter's values, at the dimension's own line.

    Only the bounds of a range are checked against the hyperparameter, so a ``float`` range on an int
    one (``{float: [8.0, 64.0]}``) passed and its first sampled value failed a trial, reported at another
    line. A range on a bool or categorical hyperparameter is refused the same way; an ``int`` range on a
    float one draws valid floats and is allowed.
    """
    if not is_dimension(value):
        return
    dim = parse_dimension(path, value, where)
    if dim.kind == "choice" or (dim.kind, hp.type) in (("int", "int"), ("float", "float"), ("int", "float")):
        return
    use = {"int": "{int: [lo, hi]}", "float": "{float: [lo, hi]}", "bool": "{choice: [false, true]}",
           "categorical": "{choice: [...]} among " + ", ".join(repr(c) for c in hp.choices or ())}[hp.type]
    article = {"int": "an", "float": "a"}
    raise where.error(path, f"{hp.name} is {article.get(hp.type, 'a')} {hp.type} hyperparameter; use {use}, "
                            f"not {article[dim.kind]} {dim.kind} range")


def _dimension_extremes(path: str, value: Any, where: SourceMap) -> list[Any]:
    if not is_dimension(value):
        return [value]
    dim = parse_dimension(path, value, where)
    return dim.choices if dim.kind == "choice" else [dim.low, dim.high]


def _pydantic_error(err: ValidationError, where: SourceMap) -> ConfigError:
    """The first error of a space header as a ConfigError at its line; an unknown field lists the allowed ones."""
    first = err.errors()[0]
    loc = [str(p) for p in first["loc"]]
    field_path = ".".join(loc)
    if first["type"] == "extra_forbidden":
        parent = model_at(SpaceHeader, loc[:-1])
        return where.error(field_path, unknown_field_message(loc[-1], list(parent.model_fields) if parent else []))
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {value!r})"
    return where.error(field_path, f"{first['msg']}{shown}")


def validate_sample(space: SearchSpace, sampled: dict[str, Any]) -> Any:
    """Validate one sampled configuration as a trial, and the objectives against what it reports.

    Errors are located in the space file: ``space.yaml:14: model.chunk_size: ...``.
    """
    from psmsearch.trial import TrialConfig, metric_directions

    try:
        config = TrialConfig.from_dict(sampled, source=space.source.source, registry=space.registry)
    except ConfigError as err:
        field_path = err.field or ""
        value = _value_at(sampled, field_path)
        if isinstance(value, dict) and field_path and model_at(TrialConfig, field_path.split(".")) is None:
            # a mapping where one value belongs: a search dimension with no choice/int/float key
            raise not_a_dimension(field_path, value, space.source) from None
        raise ConfigError(err.detail, source=space.source.where(field_path), field=field_path or None) from None
    directions = metric_directions(config)
    for index, objective in enumerate(space.objectives):
        if objective.metric not in directions:
            raise space.source.error(
                f"objectives.{index}.metric",
                f"unknown metric {objective.metric!r}.{suggest(objective.metric, directions)} "
                f"Trials of this space report: {', '.join(sorted(directions))}",
            )
    return config


def _value_at(data: Any, path: str) -> Any:
    """The value at dotted ``path`` in nested dicts and lists, or None where there is none."""
    for part in path.split(".") if path else []:
        if isinstance(data, dict):
            data = data.get(part)
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return None
    return data


def smoke_sample(space: SearchSpace, samples: int) -> list[dict[str, Any]]:
    """Draw random configurations and validate each as a trial; returns them."""

    sampler = optuna.samplers.RandomSampler(seed=space.header.driver.seed)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=sampler)
    drawn = []
    for _ in range(samples):
        trial = study.ask()
        config = space.sample(trial)
        validate_sample(space, config)
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        drawn.append(config)
    return drawn
