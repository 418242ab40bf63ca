"""Component choices of a search space: the options a space lists, and sampling a compatible combination.

Components (``model.encoder``, ``model.aggregator``, ``model.head``) are special: a choice lists
component specs, each a name or a mapping with the component's own hyperparameters, which may be
dimensions themselves and are sampled only when that component is chosen (conditional parameters).
``search: all`` in a spec makes every declared hyperparameter that the spec does not fix a
dimension over its declared range. Aggregators and heads are only ever sampled among those
compatible with the chosen encoder's ``state_kind``: incompatible combinations are never trained.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from psmsearch.registry import Registry
from psmsearch.space_dimensions import Dimension, is_dimension, parse_dimension
from psmsearch.yamlio import SourceMap

if TYPE_CHECKING:
    from psmsearch.space import SearchSpace

COMPONENT_KINDS = ("encoder", "aggregator", "head")


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
