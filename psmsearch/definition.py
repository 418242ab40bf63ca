"""What defines a search, recorded when it starts and compared when it is resumed.

A study's trials are ranked against each other, so they must all be trained and sampled alike. The
definition of a search is its resolved space, flattened to ``{field path: value}``: the trial
template with every default filled in (the trial schema's, each task's and each component's
declared ones), each search dimension as it draws (``{choice: [...]}``, ``{float: [lo, hi], log:
true}``), the component choices with each option's hyperparameters, the objectives and how trials
are sampled and pruned (``driver.seed``, ``sampler``, ``pruner``, ``startup_trials``,
``pruner_warmup_steps``).

Left out, because they change neither how a trial is trained nor how the next one is drawn, are
:data:`RESUMABLE_FIELDS`: the space's name and description, how many trials run, how many at once,
where and on what (``driver.trials``, ``jobs``, ``storage``, ``study``, ``address``, ``name``,
``cpus_per_trial``, ``gpus_per_trial``, ``heartbeat_interval``, ``grace_period``), where results are
tracked (``tracking.*``), the trial's ``device`` and ``threads`` and ``train.checkpoint_every``; the
command-line options (``--trials``, ``--jobs``, ``--no-progress``, ...) are never recorded. Everything
else (``train.steps`` included) must match on ``--resume``: the Optuna driver keeps the record on the
study (user attribute :data:`DEFINITION_ATTR`), the Ray driver in its experiment's claim file.
"""

from __future__ import annotations

import json
import math
from typing import Any

import yaml

from psmsearch.errors import ConfigError, PSMSearchError
from psmsearch.space import SearchSpace
from psmsearch.space_components import COMPONENT_KINDS, _component_options, _declared_dimension
from psmsearch.space_dimensions import is_dimension, parse_dimension

DEFINITION_ATTR = "psmsearch_definition"
"""The Optuna study user attribute that holds the definition (a JSON object)."""

RESUMABLE_FIELDS: tuple[str, ...] = (
    "name", "description",
    "driver.name", "driver.trials", "driver.jobs", "driver.storage", "driver.study", "driver.address",
    "driver.cpus_per_trial", "driver.gpus_per_trial", "driver.heartbeat_interval", "driver.grace_period",
    "tracking.", "device", "threads", "train.checkpoint_every",
)
"""Space fields that may change on ``--resume`` (a trailing dot: every field below it); see the module docstring."""

RESUMABLE_TEXT = ("the space's name and description, driver.trials, jobs, storage, study, address, name, "
                  "cpus_per_trial, gpus_per_trial, heartbeat_interval and grace_period, tracking.*, device, threads "
                  "and train.checkpoint_every")
""":data:`RESUMABLE_FIELDS` in words, for error messages and documentation."""


def search_definition(space: SearchSpace) -> dict[str, Any]:
    """The definition of ``space`` (see the module docstring), JSON-ready, in the space's field order."""
    return _definition(space)[0]


def definition_changes(recorded: dict[str, Any], space: SearchSpace) -> list[tuple[str, str]]:
    """``(field path, phrase)`` for each field whose value differs between ``recorded`` and ``space``'s
    definition, in the space's order, then the fields it no longer has.

    A field the record lacks that now holds its default is not a change: a newer psmsearch (or a
    plugin) that adds a setting at its default records it where the first command could not.
    """
    current, defaulted = _definition(space)
    current = json.loads(json.dumps(current))  # as the record holds it (tuples are lists)
    changes = []
    for path, value in current.items():
        if path not in recorded:
            if path not in defaulted:
                changes.append((path, f"{path} is new ({shown(value)})"))
        elif recorded[path] != value:
            changes.append((path, f"{path} was {shown(recorded[path])}, now {shown(value)}"))
    changes += [(path, f"{path} ({shown(value)}) was removed") for path, value in recorded.items() if path not in current]
    return changes


def changed_space_error(search: str, changes: list[tuple[str, str]], space: SearchSpace, why: str = "") -> ConfigError:
    """The error for a resume whose space differs from the one ``search`` was started with, located at
    the first changed field that the space file holds (its line), naming every change with old and new value."""
    first = changes[0][0]
    present = next((path for path, _ in changes if space.source.where(path) != space.source.source), None)
    return ConfigError(
        f"{search} was started with another search space: {'; '.join(phrase for _, phrase in changes)}. "
        f"{why or 'Trials of one search must be trained and sampled alike to be ranked together.'} Restore the "
        f"space file as it was to resume it, or start a new search with --study NAME (`psmsearch compare "
        f"--search A --search B` ranks both); on --resume only {RESUMABLE_TEXT} may change",
        source=space.source.where(present or first), field=present or first,
    )


def shown(value: Any) -> str:
    """A recorded value as a space file writes it inline: ``20``, ``embed``, ``{choice: [1, 2, 4]}``."""
    return yaml.safe_dump(value, default_flow_style=True, sort_keys=False, width=math.inf).strip().removesuffix("\n...")


def _definition(space: SearchSpace) -> tuple[dict[str, Any], set[str]]:
    """The definition and the paths in it whose value is a default (no field of the file gave it)."""
    from psmsearch.trial import TrialConfig

    record: dict[str, Any] = {}
    header = space.header.model_dump(mode="json")
    _flatten(header, "", record, space)
    defaults: dict[str, Any] = {}
    for name, info in TrialConfig.model_fields.items():
        if name == "task" or info.is_required():
            continue
        value = info.get_default(call_default_factory=True)
        defaults[name] = value.model_dump(mode="json") if hasattr(value, "model_dump") else value
    for kind in COMPONENT_KINDS:
        defaults.get("model", {}).pop(kind, None)  # recorded per option below, with the component's own defaults
    template = dict(space.template)
    model = template.get("model") if isinstance(template.get("model"), dict) else None
    if model is not None:
        template["model"] = {k: v for k, v in model.items() if k not in COMPONENT_KINDS}
    given: dict[str, Any] = {}
    _flatten(template, "", given, space)
    filled: dict[str, Any] = {}
    _flatten(defaults, "", filled, space)
    filled.update(_task_defaults(space))

    def set_by_file(path: str) -> bool:  # the file gives this field, or a field above or below it
        return any(p == path or p.startswith(path + ".") or path.startswith(p + ".") for p in given)

    defaulted = {path: value for path, value in filled.items() if not set_by_file(path)}
    record.update(given)
    record.update(defaulted)
    default_paths = set(defaulted)
    if model is not None or "model" not in space.template:
        components, component_defaults = _components(space, model or {})
        record.update(components)
        default_paths |= component_defaults
    return {path: value for path, value in record.items() if not _resumable(path)}, default_paths


def _task_defaults(space: SearchSpace) -> dict[str, Any]:
    """``task.<name>`` for each declared hyperparameter and option of a fixed task that the file leaves out."""
    task = space.template.get("task")
    name = task if isinstance(task, str) else task.get("name") if isinstance(task, dict) else None
    if not isinstance(name, str):
        return {}
    try:
        cls = space.registry.get("task", name).cls
    except PSMSearchError:  # an unknown task was refused when the space loaded; nothing to fill
        return {}
    out: dict[str, Any] = {"task.name": name}
    out.update({f"task.{hp.name}": hp.default for hp in cls.hyperparameters})
    out.update({f"task.{key}": value for key, value in cls.options.items()})
    return json.loads(json.dumps(out, default=str))


def _components(space: SearchSpace, model: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """``model.<kind>`` (a name, or ``{choice: [names]}``) and ``model.<kind>.<name>.<hyperparameter>`` for
    every option: the value or dimension its entry gives, its declared range under ``search: all``,
    else its declared default (those paths are returned as defaults too)."""
    record: dict[str, Any] = {}
    defaults: set[str] = set()
    for kind in COMPONENT_KINDS:
        options = _component_options(model, kind, space.source)
        names = [name for name, _, _ in options]
        record[f"model.{kind}"] = names[0] if len(names) == 1 else {"choice": names}
        for name, params, _ in options:
            for hp in space.registry.get(kind, name).hyperparameters:
                path = f"model.{kind}.{name}.{hp.name}"
                value = params.get(hp.name)
                if hp.name in params:
                    record[path] = parse_dimension(path, value, space.source).describe() if is_dimension(value) else value
                elif params.get("search") == "all":
                    record[path] = _declared_dimension(path, hp).describe()
                else:
                    record[path] = hp.default
                    defaults.add(path)
    return json.loads(json.dumps(record, default=str)), defaults


def _flatten(node: Any, path: str, out: dict[str, Any], space: SearchSpace) -> None:
    """Dotted paths to leaves: a search dimension (as it draws), a list or a plain value is a leaf."""
    if is_dimension(node):
        out[path] = parse_dimension(path, node, space.source).describe()
    elif isinstance(node, dict) and node:
        for key, value in node.items():
            _flatten(value, f"{path}.{key}" if path else str(key), out, space)
    elif path == "task" and isinstance(node, str):
        out["task.name"] = node
    elif node != {}:  # an empty mapping sets nothing: its fields keep their defaults
        out[path] = node


def _resumable(path: str) -> bool:
    return any(path == field or (field.endswith(".") and path.startswith(field)) for field in RESUMABLE_FIELDS)
