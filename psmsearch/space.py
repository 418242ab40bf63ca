"""Search spaces: a trial configuration template in which any value may be a search dimension.

This module holds :class:`SearchSpace` and loads space files (:func:`load_space`). The parts live in
focused modules, whose public names are re-exported here: the file's header models
(:mod:`psmsearch.space_header`), search dimensions (:mod:`psmsearch.space_dimensions`), component
choices (:mod:`psmsearch.space_components`) and the checks a space passes before anything trains
(:mod:`psmsearch.space_validation`).

Sampling goes through Optuna's define-by-run interface (``trial.suggest_*``), so the same
:meth:`SearchSpace.sample` serves the Optuna driver, Ray Tune's ``OptunaSearch`` and
``optuna.trial.FixedTrial`` (to rebuild a trial's configuration from its flat parameters).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from psmsearch.config import KIND_FIELDS, MODEL_FIELDS, unknown_field_message
from psmsearch.registry import Registry, get_registry
from psmsearch.space_components import (COMPONENT_KINDS, _compatible, _component_options, _declared_dimension,
                                        _sample_components, _searches_components, kind_suffix)
from psmsearch.space_dimensions import (DIMENSION_HELP, DIMENSION_KEYS, DIMENSION_OPTIONS, PRIMITIVES, Dimension, _label,
                                        is_dimension, not_a_dimension, parse_dimension)
# Ray experiments pickle the header models; those saved before the split name them psmsearch.space.<name>
from psmsearch.space_header import NAME_PATTERN, DriverSettings, Objective, SpaceHeader, TrackingSettings
from psmsearch.space_validation import (_chunk_sizes_without_aggregation, _contrary_directions,
                                        _pruner_warmup_past_training, _pydantic_error, _test_set_objectives,
                                        _validate_choice_types, _validate_components, _validate_model_kinds,
                                        _validate_objectives, smoke_sample, validate_sample)
from psmsearch.yamlio import SourceMap, load_yaml

__all__ = [
    "COMPONENT_KINDS", "DIMENSION_HELP", "DIMENSION_KEYS", "DIMENSION_OPTIONS", "NAME_PATTERN", "PRIMITIVES",
    "Dimension", "DriverSettings", "Objective", "SearchSpace", "SpaceHeader", "TrackingSettings", "is_dimension",
    "kind_suffix", "load_space", "not_a_dimension", "parse_dimension", "smoke_sample", "space_from_data",
    "validate_sample",
]
"""The public names of the search-space modules, all importable from here as before the split."""


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
            by_kind: dict[str, list[str]] = {}
            for name, _, _ in encoders:
                by_kind.setdefault(self.registry.get("encoder", name).state_kind, []).append(name)
            shown = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in sorted(by_kind.items()))
            raise self.source.error("model.encoder", f"sampler 'grid' needs encoders of a single state kind, and these "
                                                     f"have {len(by_kind)} ({shown}): each kind pairs with other "
                                                     "aggregators and heads, so the grid is no product of lists; "
                                                     "use sampler 'random' or 'tpe', or one grid search per state kind")
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
        entry stands for ``search: all`` (see :func:`~psmsearch.space_components._component_options`),
        which opens exactly the declared hyperparameters the entry does not fix: with none left it
        opens nothing, and the grid is just the listed components. The error is located at the entry
        (or at the dimension written in it), names what is still open and the entry to write instead.
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


def _flow(value: Any) -> str:
    """``value`` as YAML in flow style, as a space file would write it inline (``{name: mlp, mlp_ratio: 2}``)."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf).strip()


def _and(hyperparameters: list[Any]) -> str:
    """The names of ``hyperparameters`` as a sentence lists them: ``layers, heads and mlp_ratio``."""
    names = [hp.name for hp in hyperparameters]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"


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
        config = validate_sample(space, drawn[0])
        space.warnings.extend(_contrary_directions(space, config))
        space.warnings.extend(_chunk_sizes_without_aggregation(space, config))
    space.warnings.extend(_test_set_objectives(space))
    space.warnings.extend(_pruner_warmup_past_training(space))
    return space
