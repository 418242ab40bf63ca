"""A trial: task + model config + training budget -> flat metrics (DESIGN.md §6).

:class:`TrialConfig` is loaded from YAML (:mod:`psmsearch.yamlio`) and validated; every error is a
:class:`~psmsearch.errors.ConfigError` naming the file, the field path, the value and what is
allowed. :func:`run_trial` is a pure function of the config (plus the evaluation callback), which
is what the Optuna and Ray drivers call. Example::

    task: {name: group, group: S3, train_length: 16}
    model: {kind: psm, d_model: 64, chunk_size: 4, aggregator: {name: attention, layers: 1}}
    train: {steps: 600, batch_size: 64, lr: 0.003}
    metrics: {memory_lengths: [1024, 4096], latency_lengths: [1024]}
    seed: 0
    device: auto
"""

from __future__ import annotations

import json
import re
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from psmsearch import distributed as dist
from psmsearch.composer import validate_model_config
from psmsearch.config import KIND_FIELDS, ComponentSpec, ModelConfig, model_at, unknown_field_message, unread_model_field_message
from psmsearch.errors import ConfigError, PSMSearchError, UnknownComponentError, suggest, where_raised
from psmsearch.metrics import MetricsConfig, inference_metrics
from psmsearch.plugin_digest import plugin_digest
from psmsearch.registry import Registry, get_registry
from psmsearch.tasks import TEST_PREFIX, Task
from psmsearch.trainer import Callback, TrainConfig, Trainer, TrialStopped, seeded_global_rng
from psmsearch.yamlio import SourceMap, parse_value, parse_yaml

_BUILD_LOCK = threading.Lock()
DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class UnknownTaskError(UnknownComponentError, ConfigError):
    """An unregistered task name: a ConfigError (file and field) with close-match suggestions."""

    def __init__(self, name: str, known: Sequence[str], source: str | None, hint: str = "") -> None:
        UnknownComponentError.__init__(self, "task", name, known)
        self.source, self.field, self.detail = source, "task.name", f"{self.args[0]}{hint}"
        where = f"{source}: task.name" if source else "task.name"
        self.args = (f"{where}: {self.detail}",)


PLUGIN_FIELDS = ("task", "model.encoder", "model.aggregator", "model.head")
"""The fields of a trial config that name a task or component, the keys of its ``plugins`` record."""


class PluginRecord(BaseModel):
    """Where the task or component a trial config names at one field came from: ``{name: my_agg,
    plugin: /path/my_agg.py, sha256: ...}`` (a plugin file or folder as given, or a module or
    entry-point name; ``sha256`` is the digest of a file's or folder's code as the trial's process
    loaded it, see :mod:`psmsearch.plugin_digest`)."""

    model_config = ConfigDict(extra="forbid")

    name: str
    plugin: str
    sha256: str | None = None
    distribution: str | None = None
    """``NAME==VERSION`` of the installed package whose entry point the plugin is (None for a file,
    folder or module named for the run)."""


class TaskSpec(ComponentSpec):
    """A registered task by name plus its parameters: ``task: {name: group, group: S5}`` or ``task: lm``."""


class TrialConfig(BaseModel):
    """Everything that defines a trial; see the module docstring for a YAML example."""

    model_config = ConfigDict(extra="forbid")

    task: TaskSpec
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    seed: int = Field(0, ge=0, lt=2**63)
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N (auto: cuda when available)")
    threads: int | None = Field(
        1, ge=1, le=1024,
        description="torch intra-op CPU threads during the trial (null: torch's default). Small models run "
        "many tiny ops; on a 2-core CPU one thread trained a 100k-parameter T-PSM 4.4x faster than two.",
    )

    plugins: dict[str, PluginRecord] = Field(
        default_factory=dict,
        description="the name and plugin of each task or component that is not built in, by the field naming it "
        "(task, model.encoder, model.aggregator, model.head): written into a search trial's trial_config.yaml so "
        "that `psmsearch train` can say which --plugin to pass; it loads nothing itself",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        if not DEVICE_PATTERN.match(value):
            raise ValueError("expected auto, cpu, mps, cuda or cuda:N")
        return value

    @field_validator("plugins")
    @classmethod
    def _plugin_fields(cls, value: dict[str, PluginRecord]) -> dict[str, PluginRecord]:
        unknown = sorted(set(value) - set(PLUGIN_FIELDS))
        if unknown:
            raise ValueError(f"{unknown[0]!r} names no component; the keys are {', '.join(PLUGIN_FIELDS)}")
        return value

    def resolved(self) -> dict[str, Any]:
        """The whole config as plain data (``trial_config.yaml``), the model with only the fields its kind
        reads, so that the file runs with ``psmsearch train`` and says nothing that had no effect."""
        data = self.model_dump(mode="json")
        data["model"] = {k: v for k, v in data["model"].items() if k in KIND_FIELDS[self.model.kind]}
        if not data["plugins"]:
            del data["plugins"]
        else:  # a module or entry point has no digest: no sha256 line rather than "sha256: null"
            data["plugins"] = {field: {k: v for k, v in entry.items() if v is not None}
                               for field, entry in data["plugins"].items()}
        return data

    def flat_params(self) -> dict[str, Any]:
        """Flat ``{"task": ..., "task.group": ..., "model.d_model": ..., "train.lr": ...}`` for tracking."""
        out: dict[str, Any] = {"task": self.task.name}
        out.update({f"task.{k}": v for k, v in self.task.params.items()})
        out.update(self.model.flat_params())
        out.update({f"train.{k}": v for k, v in self.train.model_dump().items()})
        out.update({f"metrics.{k}": v for k, v in self.metrics.model_dump().items()})
        out.update({"seed": self.seed, "device": self.device, "threads": self.threads})
        return out

    @classmethod
    def from_dict(cls, raw: Any, source: str = "<config>", registry: Registry | None = None) -> "TrialConfig":
        """Validate a parsed YAML mapping: schema, task name and parameters, model components."""
        if not isinstance(raw, dict):
            raise ConfigError(f"expected a mapping with keys task, model, train, ...; got {type(raw).__name__}", source=source)
        try:
            config = cls.model_validate(raw)
        except ValidationError as err:
            raise _config_error(err, source) from None
        config.check(source, registry)
        return config

    def check(self, source: str = "<config>", registry: Registry | None = None) -> None:
        """Registry-level validation: the task exists and accepts its parameters; the model composes.

        Errors keep the field they name (``task.group``, ``model.aggregator``), so the caller can
        point at the line (or the ``--set``) that gave it.
        """
        registry = registry or get_registry()
        task = make_task(self, registry, source)
        try:
            task.check()
        except ConfigError as err:
            raise ConfigError(err.detail, source=source, field=err.field) from None
        length = task.train_sequence_length
        if self.model.kind == "psm" and length is not None and self.model.chunk_size > length[0]:
            raise ConfigError(
                f"{self.model.chunk_size} exceeds the training sequence length {length[0]} (task.{length[1]}); "
                f"allowed: 1..{length[0]}",
                source=source,
                field="model.chunk_size",
            )
        try:
            validate_model_config(self.model, registry)
            if self.model.kind != "psm":
                from psmsearch.baselines import validate_baseline_config

                validate_baseline_config(self.model)
        except ConfigError as err:
            raise ConfigError(err.detail, source=source, field=err.field) from None
        except PSMSearchError as err:
            raise ConfigError(str(err), source=source, field="model") from None


def chunks_per_sequence(chunk_size: int, length: int) -> int:
    """Chunks of ``chunk_size`` tokens in a sequence of ``length`` (the last one may be partial)."""
    return -(-length // chunk_size)


def unused_aggregator_message(chunk_sizes: Sequence[int], length: int, length_field: str) -> str | None:
    """Why the chunk sizes among ``chunk_sizes`` that leave under 3 chunks in a training sequence train no
    aggregator, or None where every one leaves 3 or more.

    The aggregator first combines two chunk states for the prefix of the third chunk (``p_2 = x_0 x_1``;
    ``p_1`` is ``x_0`` itself): with fewer chunks it is never called, what it computes gets no gradient
    (only ``initial_state`` is read), and trials that differ only in it train the same function.
    """
    unused = sorted({c for c in chunk_sizes if chunks_per_sequence(c, length) < 3})
    if not unused:
        return None
    shown = ", ".join(map(str, unused))
    sizes = "chunk size " + shown if len(unused) == 1 else "chunk sizes " + shown
    largest = (length - 1) // 2
    fix = f"chunk sizes up to {largest} give 3 chunks or more" if largest >= 1 else "no chunk size gives 3 chunks"
    return (f"{sizes} leave{'s' if len(unused) == 1 else ''} fewer than 3 chunks in a training sequence of {length} "
            f"tokens (task.{length_field}), so the aggregator is never called in training (it first combines chunks "
            f"0 and 1, for the prefix of chunk 2): what agg computes gets no gradient (only its initial_state, the "
            f"prefix of chunk 0, is read), and trials that differ only in the aggregator train the same function; "
            f"{fix}")


def make_task(config: TrialConfig, registry: Registry | None = None, source: str | None = None) -> Task:
    """Instantiate the config's task (cheap: data loads lazily); a bad parameter's error keeps its field."""
    registry = registry or get_registry()
    try:
        info = registry.get("task", config.task.name)
    except UnknownComponentError:
        raise UnknownTaskError(config.task.name, registry.names("task"), source,
                               registry.failed_plugins_hint(config.task.name)) from None
    try:
        return info.cls(seed=config.seed, **config.task.params)
    except ConfigError as err:
        raise ConfigError(err.detail, source=source, field=err.field) from None


def parse_overrides(overrides: Sequence[str]) -> list[tuple[list[str], Any]]:
    """``["model.chunk_size=4"]`` -> ``[(["model", "chunk_size"], 4)]``; values are YAML, read as config files are."""
    parsed = []
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip() or any(not part for part in key.strip().split(".")):
            raise ConfigError(f"{item!r} is not of the form dotted.key=value (e.g. model.chunk_size=4)", source="--set")
        value = parse_value(text, f"--set {key.strip()}") if text.strip() else None
        parsed.append((key.strip().split("."), value))
    return parsed


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Set dotted keys in a parsed config; a bare component name (``aggregator: mlp``) becomes a mapping."""
    for path, value in parse_overrides(overrides):
        node = raw
        for i, part in enumerate(path[:-1]):
            child = node.get(part)
            if isinstance(child, str):  # short form `aggregator: attention` -> {name: attention}
                child = {"name": child}
            elif child is None:
                child = {}
            elif not isinstance(child, dict):
                where = ".".join(path[: i + 1])
                raise ConfigError(f"cannot set {'.'.join(path)}: {where} is {child!r}, not a mapping", source="--set")
            node[part] = child
            node = child
        node[path[-1]] = value
    return raw


def load_trial_config(path: str | Path, overrides: Sequence[str] = (), registry: Registry | None = None,
                      warn: Callable[[str], None] | None = None) -> TrialConfig:
    """Read, override and validate a trial YAML file.

    ``warn`` receives one located message (``FILE:LINE: model.n_heads: ...`` or ``--set ...``) per
    model field that the trial's kind ignores and that differs from its default: not an error, since
    switching a config's kind with ``--set model.kind=gpt`` leaves the other kind's fields behind.
    """
    path = Path(path)
    source = str(path)
    try:
        text = path.read_text()
    except OSError as err:
        raise ConfigError(f"cannot read the config file: {err.strerror or err}", source=source) from None
    raw, lines = parse_yaml(text, source)
    raw = {} if raw is None else raw
    if isinstance(raw, dict):
        _refuse_a_search_space(raw, source, lines)
        raw = apply_overrides(raw, overrides)
    try:
        config = TrialConfig.from_dict(raw, source, registry)
    except ConfigError as err:
        if not err.field or err.source != source:
            raise
        hint = recorded_plugin_hint(raw, err.field, source, registry)
        if hint:  # in place of the registry's suggestions: a close name there ("did you mean 'gated'?") misleads
            err.detail = hint
        err.field = _as_written(err.field, raw)
        origin = _origin(err.field, overrides, lines)
        err.located(origin)
        if origin == f"--set {err.field}":  # "--set task.path: ..." names the field once, not twice
            err.args = (f"{origin}: {err.detail}", *err.args[1:])
        raise err from None
    if warn is not None:
        for key, message in unread_model_fields(raw.get("model"), config.model.kind):
            origin = _origin(f"model.{key}", overrides, lines)
            warn(f"{origin}: {message}" if origin.startswith("--set") else f"{origin}: model.{key}: {message}")
        for key, message in other_plugins(config, registry):
            warn(f"{lines.where(f'plugins.{key}')}: plugins.{key}: {message}")
        length = make_task(config, registry, source).train_sequence_length
        unused = None if config.model.kind != "psm" or length is None else \
            unused_aggregator_message([config.model.chunk_size], *length)
        if unused:
            origin = _origin("model.chunk_size", overrides, lines)
            warn(f"{origin}: {unused}" if origin.startswith("--set") else f"{origin}: model.chunk_size: {unused}")
    return config


def _named_component(raw: dict[str, Any], key: str) -> str | None:
    """The task or component name a raw config gives at ``key`` (a :data:`PLUGIN_FIELDS` entry)."""
    node: Any = raw.get("task") if key == "task" else (raw.get("model") or {}).get(key.split(".")[1])
    if isinstance(node, dict):
        node = node.get("name")
    return node if isinstance(node, str) else None


def recorded_plugin_hint(raw: Any, field: str, source: str, registry: Registry | None = None) -> str:
    """The error for a task or component at ``field`` that is not registered when the config's ``plugins``
    record (written into a search trial's ``trial_config.yaml``) names the plugin it came from, saying
    what to do; else ``""``.

    ``train`` never loads a plugin a config names (a file could run any code): it says which
    ``--plugin`` to pass.
    """
    plugins = raw.get("plugins") if isinstance(raw, dict) else None
    key = "task" if field in ("task", "task.name") else field
    if key not in PLUGIN_FIELDS:
        return ""  # an error about no one component (model: incompatible state kinds, ...)
    entry = plugins.get(key) if isinstance(plugins, dict) else None
    name = _named_component(raw, key)
    if not isinstance(entry, dict) or not isinstance(entry.get("plugin"), str) or entry.get("name") != name:
        return ""  # nothing recorded for the component the config names now (a --set may have changed it)
    kind = "task" if key == "task" else key.split(".")[1]
    try:
        (registry or get_registry()).get(kind, name or "")
        return ""  # registered: the error is about something else
    except UnknownComponentError:
        pass
    plugin = entry["plugin"]
    distribution = entry.get("distribution")
    if isinstance(distribution, str) and distribution:
        return (f"unknown {kind} {name!r}. This config's plugins field records that {kind} {name!r} came from the "
                f"installed package {distribution} (entry point {plugin!r}): install it (pip install "
                f"{distribution}) and run it again")
    if "/" in plugin or plugin.endswith(".py") or Path(plugin).exists():
        missing = "" if Path(plugin).exists() else " (no such file or folder here: pass the plugin's path on this machine)"
        action = f"run psmsearch --plugin {plugin} train {source}{missing}"
    else:
        action = (f"install the package that provides it, or, if it is a module on the Python path, run "
                  f"psmsearch --plugin {plugin} train {source}")
    return (f"unknown {kind} {name!r}. This config's plugins field records that {kind} {name!r} came from the "
            f"plugin {plugin!r}: {action}")


def other_plugins(config: TrialConfig, registry: Registry | None = None) -> list[tuple[str, str]]:
    """``(field, why)`` for each entry of ``config.plugins`` whose task or component is registered here
    from another plugin than the one recorded (the same name may be another implementation), or from
    the recorded plugin file or folder whose code changed since (its ``sha256`` differs). Entries
    for a name the config no longer gives there (a ``--set`` changed it) say nothing."""
    registry = registry or get_registry()
    found = []
    for key, recorded in config.plugins.items():
        if key != "task" and config.model.kind != "psm":
            continue
        kind = "task" if key == "task" else key.split(".")[1]
        name = config.task.name if key == "task" else getattr(config.model, kind).name
        current = registry.get(kind, name).plugin
        if recorded.name != name:
            continue
        if current != recorded.plugin:
            found.append((key, f"the trial ran {kind} {name!r} from the plugin {recorded.plugin!r}; here {name!r} "
                               f"comes from {current!r}, which may be another implementation"))
            continue
        now = (registry.plugin_digests.get(current) or plugin_digest(current)) if recorded.sha256 else None
        if now is not None and now != recorded.sha256:
            found.append((key, f"the plugin {current!r} changed since the trial ran (sha256 {recorded.sha256[:12]}... "
                               f"then, {now[:12]}... now): {kind} {name!r} runs as the plugin is now"))
    return found


def unread_model_fields(model: Any, kind: str) -> list[tuple[str, str]]:
    """``(field, why)`` for each field of a raw model mapping that ``kind`` ignores and that is not its default.

    ``n_heads: 8`` under ``kind: psm`` validated and then changed nothing. A default value is not
    reported: a trial's own resolved config (``trial_config.yaml``) may hold every field.
    """
    if not isinstance(model, dict):
        return []
    found = []
    for key, value in model.items():
        message = unread_model_field_message(key, [kind], "", "it changes nothing")
        if message and not _is_default_model_value(key, value):
            found.append((key, message))
    return found


def _is_default_model_value(key: str, value: Any) -> bool:
    default = ModelConfig.model_fields[key].default
    if isinstance(default, ComponentSpec):
        given = {"name": value} if isinstance(value, str) else value
        return isinstance(given, dict) and given == default.flat()
    return value == default


SEARCH_SPACE_KEYS = ("objectives", "driver", "tracking")
"""Top-level keys of a search-space file that a trial config never has."""


def _refuse_a_search_space(raw: dict[str, Any], source: str, lines: SourceMap) -> None:
    """A search-space file given to ``train`` failed on its first ``{choice: ...}`` with a type error;
    it is recognised by its header keys and named as what it is."""
    header = [key for key in SEARCH_SPACE_KEYS if key in raw]
    if header:
        raise ConfigError(
            f"this is a search space (it has {', '.join(header)}), not a trial config: run it with "
            f"`psmsearch search {source}`; `psmsearch train` takes one trial (task, model, train, ...; "
            "see examples/configs/)", source=lines.where(header[0]),
        )


def _as_written(field: str, raw: Any) -> str:
    """A component hyperparameter's field as the config spells it: ``model.encoder.params.heads`` where
    the component is written ``{name: ..., params: {...}}`` (as a search trial's ``trial_config.yaml``
    is), ``model.encoder.heads`` where it is written flat (``{name: ..., heads: 4}``).

    Validation names it flat, as a search space writes it; the spelling in the config is the key a
    ``--set`` must give and the line to show.
    """
    match = re.fullmatch(r"model\.(encoder|aggregator|head)\.([^.]+)", field)
    if match is None or match.group(2) in ("name", "params"):
        return field
    model = raw.get("model") if isinstance(raw, dict) else None
    node = model.get(match.group(1)) if isinstance(model, dict) else None
    params = node.get("params") if isinstance(node, dict) else None
    # only a key that is written under params (and not beside it, where a flat --set put it)
    nested = isinstance(params, dict) and match.group(2) in params and match.group(2) not in node
    return f"model.{match.group(1)}.params.{match.group(2)}" if nested else field


def _origin(field: str, overrides: Sequence[str], lines: SourceMap) -> str:
    """Where a field's value came from: the ``--set`` that gave it, else ``file:line`` in the config."""
    for override in reversed(overrides):  # the last --set of a field wins, as in apply_overrides
        key = override.partition("=")[0].strip()
        if key and (field == key or field.startswith(key + ".")):
            return f"--set {key}"
    return lines.where(field)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; an unavailable CUDA device is a ConfigError."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{name!r} requested but CUDA is not available here; use cpu or auto", field="device")
    return device


def run_trial(
    config: TrialConfig,
    callback: Callback | None = None,
    *,
    progress: bool = False,
    checkpoint_path: str | Path | None = None,
    resume: bool = False,
    registry: Registry | None = None,
    on_resume: Callable[[int], None] | None = None,
) -> dict[str, float]:
    """Train and evaluate one trial; returns every metric as a flat ``{name: float}``.

    The metrics are the last periodic evaluation (the task's validation metrics), training
    throughput, the task's test-set metrics prefixed ``test_`` (computed once after training, see
    :meth:`~psmsearch.tasks.Task.test_metrics`) and the streaming inference measurements.
    ``callback(step, metrics)`` receives each periodic evaluation (never a ``test_`` metric) and may raise
    :class:`~psmsearch.trainer.TrialPruned`; a diverging run raises
    :class:`~psmsearch.trainer.TrialDiverged`. With ``checkpoint_path`` (and
    ``train.checkpoint_every``) checkpoints are written; ``resume=True`` continues from one, and
    ``on_resume(step)`` is told the step once the file has been checked and loaded (a file written by
    another trial raises first).
    """
    if config.threads is not None and torch.get_num_threads() != config.threads:
        # Process-wide, and deliberately not restored: trials run as threads of one process
        # (``--jobs N``) would otherwise reset each other's setting mid-run.
        torch.set_num_threads(config.threads)
    return _run(config, callback, progress, checkpoint_path, resume, registry, on_resume)


def _run(
    config: TrialConfig,
    callback: Callback | None,
    progress: bool,
    checkpoint_path: str | Path | None,
    resume: bool,
    registry: Registry | None,
    on_resume: Callable[[int], None] | None = None,
) -> dict[str, float]:
    from psmsearch.model import build_model  # the model module pulls in the composer and plugins

    device = resolve_device(config.device)
    task = make_task(config, registry)
    with _phase("building the model", {}), _BUILD_LOCK, seeded_global_rng(config.seed):
        # Seeded initialisation from the global generator, one trial at a time: concurrent trials
        # (threads of one process) would otherwise draw from each other's random stream.
        model = build_model(config.model, task.vocab_size, registry)
    trainer = Trainer(
        model, task, config.train, seed=config.seed, device=device, callback=callback,
        progress=progress, checkpoint_path=checkpoint_path, identity=resume_identity(config),
    )
    if resume and checkpoint_path and Path(checkpoint_path).is_file():
        trainer.load_checkpoint(checkpoint_path)
        if on_resume is not None:
            on_resume(trainer.step)
    with _phase("training and evaluation", {}):
        result = trainer.fit()
    metrics = dict(result.metrics)
    metrics.update(
        train_steps=float(result.steps), train_seconds=result.seconds, train_tokens_per_s=result.tokens_per_s
    )
    if dist.rank() == 0:  # one rank scores the test set and measures inference; the others would only repeat it
        with _phase("computing test metrics", metrics):
            metrics.update(trainer.test_metrics())  # once, after training: no callback or pruner sees these
        with _phase("measuring streaming inference", metrics):
            metrics.update(inference_metrics(model, task.vocab_size, config.metrics, device))
    return metrics


class TrialPhaseError(Exception):
    """A trial failed in ``phase``; ``metrics`` holds what it measured before (kept by a search).

    The original exception is the ``__cause__`` (its traceback is the trial's ``error.txt``).
    """

    def __init__(self, phase: str, metrics: dict[str, float], cause: Exception) -> None:
        self.phase = phase
        self.metrics = dict(metrics)
        super().__init__(f"{phase}: {type(cause).__name__}: {cause}{where_raised(cause)}")


@contextmanager
def _phase(phase: str, metrics: dict[str, float]) -> Iterator[None]:
    """Re-raise a bug in ``phase`` as :class:`TrialPhaseError`; the trial's own stops pass through."""
    try:
        yield
    except (TrialStopped, ConfigError, KeyboardInterrupt):
        raise
    except Exception as err:  # noqa: BLE001 - a component's or task's bug, reported with where it happened
        raise TrialPhaseError(phase, metrics, err) from err


RESUMABLE_CHANGES = ("train.steps", "train.time_budget_s", "train.eval_every", "train.eval_batch_size",
                     "train.checkpoint_every", "metrics.", "device", "threads")
"""Settings that may differ between the run that wrote a checkpoint and the one resuming it: the budget
(a longer run: the cosine schedule stretches to the new budget from the resumed step on), evaluation
and checkpoint cadence, inference metrics, and where and with how many threads it runs. Everything else
(task, model, seed, optimiser and schedule shape, batch size) defines the trial and must match."""


def resume_identity(config: TrialConfig) -> dict[str, Any]:
    """``config``'s flat settings that a resumed run must share with the one that wrote its checkpoint
    (all but :data:`RESUMABLE_CHANGES`), JSON-ready: compared by :meth:`Trainer.load_checkpoint`."""
    flat = json.loads(json.dumps(config.flat_params(), default=str))
    return {k: v for k, v in flat.items()
            if not any(k == allowed or (allowed.endswith(".") and k.startswith(allowed)) for allowed in RESUMABLE_CHANGES)}


def run_trial_data_parallel(config: TrialConfig, world_size: int, checkpoint_path: str | Path | None = None,
                            resume: bool = False, callback: Callback | None = None,
                            on_resume: Callable[[int], None] | None = None) -> dict[str, float]:
    """:func:`run_trial` in ``world_size`` local data-parallel processes; rank 0's metrics.

    Gloo on CPU, NCCL on CUDA (rank ``r`` uses ``cuda:r``). The global batch is ``train.batch_size``
    whatever the process count, so without training-time randomness the result matches a
    single-process run up to float rounding; with dropout each rank draws its own masks, so the
    result depends on the process count (and is reproducible for a given one). Rank 0 writes the
    checkpoints; every rank resumes from the same file. Rank 0's evaluations reach ``callback`` in
    this process (which may raise :class:`~psmsearch.trainer.TrialPruned` to stop every worker); a
    worker's :class:`~psmsearch.errors.PSMSearchError`, :class:`~psmsearch.trainer.TrialStopped` or
    :class:`TrialPhaseError` (with the metrics measured before it) is raised here as the same type and
    message, as :func:`run_trial` would raise it.
    """
    backend = dist.default_backend(resolve_device(config.device))
    if resume and checkpoint_path and Path(checkpoint_path).is_file():
        step = _check_checkpoint(config, checkpoint_path)  # a bad file is reported here, not as a worker traceback
        if on_resume is not None:
            on_resume(step)
    checkpoint = str(Path(checkpoint_path).resolve()) if checkpoint_path else None

    def on_message(message: tuple[str, int, dict[str, float]]) -> None:
        if message[0] == "eval" and callback is not None:
            callback(message[1], message[2])

    with tempfile.TemporaryDirectory(prefix="psmsearch-ddp-") as tmp:
        dist.launch(_data_parallel_worker, world_size, config.model_dump(mode="json"), tmp, checkpoint, resume,
                    backend=backend, on_message=on_message,
                    forward=(PSMSearchError, TrialStopped, TrialPhaseError))
        result = Path(tmp) / "metrics.json"
        if not result.is_file():  # a worker was stopped on its own (a signal sent to it, not to us)
            raise KeyboardInterrupt("a data-parallel worker stopped before the trial ended")
        return json.loads(result.read_text())


def _check_checkpoint(config: TrialConfig, checkpoint_path: str | Path) -> int:
    """Load ``checkpoint_path`` into a throwaway trainer for ``config``: its step, or its ConfigError if it does not fit."""
    from psmsearch.model import build_model

    task = make_task(config)
    trainer = Trainer(build_model(config.model, task.vocab_size), task, config.train, seed=config.seed,
                      identity=resume_identity(config))
    with torch.random.fork_rng(devices=[]):
        trainer.load_checkpoint(checkpoint_path)
    return trainer.step


def _report_to_parent(step: int, metrics: dict[str, float]) -> None:
    """Rank 0's evaluation callback: the parent hands it to the caller's callback (see :func:`dist.send`)."""
    dist.send(("eval", step, metrics))


def _data_parallel_worker(rank: int, raw: dict[str, Any], out_dir: str, checkpoint_path: str | None,
                          resume: bool) -> None:
    config = TrialConfig.model_validate(raw)
    if resolve_device(config.device).type == "cuda":
        config = config.model_copy(update={"device": f"cuda:{rank % torch.cuda.device_count()}"})
    callback = _report_to_parent if rank == 0 else None
    metrics = run_trial(config, callback, checkpoint_path=checkpoint_path, resume=resume)
    if rank == 0:
        (Path(out_dir) / "metrics.json").write_text(json.dumps(metrics))


def metric_directions(config: TrialConfig) -> dict[str, str]:
    """Every metric :func:`run_trial` reports for ``config`` that a search may optimise, with its direction."""
    task = make_task(config)
    directions: dict[str, str] = dict(task.metric_directions())
    directions.update({f"{TEST_PREFIX}{name}": d for name, d in task.test_metric_directions().items()})
    directions.update(train_tokens_per_s="maximize", params="minimize")
    if config.metrics.enabled:
        from psmsearch.tasks import count_tag

        for n in config.metrics.memory_lengths:
            directions[f"state_bytes_{count_tag(n)}"] = "minimize"
            directions[f"peak_state_bytes_{count_tag(n)}"] = "minimize"
        for n in config.metrics.latency_lengths:
            directions[f"latency_ms_{count_tag(n)}"] = "minimize"
            directions[f"latency_max_ms_{count_tag(n)}"] = "minimize"
    return directions


def _config_error(err: ValidationError, source: str) -> ConfigError:
    """The first pydantic error as a ConfigError naming the field path, the value and what is allowed."""
    first = err.errors()[0]
    loc = [str(part) for part in first["loc"]]
    field = ".".join(loc)
    message = first["msg"]
    if first["type"] == "extra_forbidden":
        parent = model_at(TrialConfig, loc[:-1])
        message = unknown_field_message(loc[-1], list(parent.model_fields) if parent else [])
        if parent is ComponentSpec and not suggest(loc[-1], list(parent.model_fields)):  # not a typo of name/params:
            # a hyperparameter, which a component written {name, params: {...}} takes under params
            message += (f" Its hyperparameters go under params: {'.'.join([*loc[:-1], 'params', loc[-1]])} "
                        "(this component is written with a params mapping, as a search trial's config is)")
    elif first["type"] == "missing":
        message = "this field is required"
    else:
        message = f"{first.get('input')!r} is not allowed: {message}"
        parent = model_at(TrialConfig, loc[:-1])
        described = parent.model_fields.get(loc[-1]) if parent else None
        if described is not None and described.description:
            message += f" ({loc[-1]}: {described.description})"
    others = list(dict.fromkeys(".".join(str(p) for p in e["loc"]) for e in err.errors()[1:]))
    if others:
        message += f" (and {len(err.errors()) - 1} more: {', '.join(others)})"
    return ConfigError(message, source=source, field=field)


__all__ = [
    "TaskSpec",
    "TrialConfig",
    "UnknownTaskError",
    "apply_overrides",
    "load_trial_config",
    "make_task",
    "metric_directions",
    "run_trial",
    "resume_identity",
    "run_trial_data_parallel",
]
