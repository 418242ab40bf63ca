"""The checks a search space passes before anything trains: its header (pydantic errors at their line,
objectives), model kinds, components, choice and dimension types, and smoke-sampled trial configurations.

Every error is a ConfigError located in the space file (``space.yaml:14: model.chunk_size: ...``);
doubtful but allowed settings come back as warnings for :attr:`~psmsearch.space.SearchSpace.warnings`.
"""

from __future__ import annotations

import types
from typing import TYPE_CHECKING, Any, Union, get_args, get_origin

import optuna
from pydantic import ValidationError

from psmsearch.config import KIND_FIELDS, model_at, unknown_field_message, unread_model_field_message
from psmsearch.errors import ConfigError, PSMSearchError, suggest
from psmsearch.space_components import COMPONENT_KINDS, _compatible, _component_options, _searches_components
from psmsearch.space_dimensions import is_dimension, not_a_dimension, parse_dimension
from psmsearch.space_header import SpaceHeader
from psmsearch.yamlio import SourceMap

if TYPE_CHECKING:
    from psmsearch.space import SearchSpace


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


def _chunk_sizes_without_aggregation(space: SearchSpace, sampled: Any) -> list[str]:
    """The chunk sizes the space can draw that leave under 3 chunks in a training sequence (see
    :func:`~psmsearch.trial.unused_aggregator_message`), as one warning located at ``model.chunk_size``.

    ``sampled`` is a validated trial config of the space, whose task gives the training length (a
    searched length is taken as that sample drew it).
    """
    from psmsearch.trial import make_task, unused_aggregator_message

    model = space.template.get("model")
    if not isinstance(model, dict) or "psm" not in _model_kinds(model):
        return []
    length = make_task(sampled, space.registry).train_sequence_length
    if length is None:
        return []
    value = model.get("chunk_size", _default_chunk_size())
    if is_dimension(value):
        dim = parse_dimension("model.chunk_size", value, space.source)
        sizes = [c for c in dim.choices if isinstance(c, int)] if dim.kind == "choice" else \
            list(range(int(dim.low), int(dim.high) + 1, int(dim.step or 1)))  # what suggest_int can draw
    else:
        sizes = [value] if isinstance(value, int) else []
    message = unused_aggregator_message(sizes, *length)
    return [f"{space.source.where('model.chunk_size')}: model.chunk_size: {message}"] if message else []


def _pruner_warmup_past_training(space: SearchSpace) -> list[str]:
    """A ``driver.pruner_warmup_steps`` at or past ``train.steps``: no evaluation is ever early enough to
    prune, so the pruner is in effect off (Ray's ASHA would not even start with such a grace period)."""
    driver = space.header.driver
    steps = space.template.get("train", {}).get("steps")
    if driver.pruner != "median" or len(space.objectives) > 1 or not driver.pruner_warmup_steps:
        return []
    if not isinstance(steps, int) or driver.pruner_warmup_steps < steps:
        return []
    return [f"{space.source.where('driver.pruner_warmup_steps')}: driver.pruner_warmup_steps: "
            f"{driver.pruner_warmup_steps} is not before train.steps {steps}, so no evaluation can prune a trial: "
            "the median pruner is in effect off (pruner: none says so)"]


def _model_kinds(model: dict[str, Any]) -> list[Any]:
    """The model kinds a space's model can take (``psm`` unless it says otherwise)."""
    kind = model.get("kind", "psm")
    if is_dimension(kind):
        return list(kind.get("choice", [])) if isinstance(kind, dict) else list(kind)
    return [kind]


def _default_chunk_size() -> int:
    """The chunk size a model that names none gets (:class:`~psmsearch.config.ModelConfig`'s default)."""
    from psmsearch.config import ModelConfig

    return ModelConfig.model_fields["chunk_size"].default


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
