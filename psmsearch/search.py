"""What every search driver shares: the objectives, one trial's execution and its MLflow run.

:func:`execute_trial` turns sampled parameters into a trial configuration, opens the trial's
nested MLflow run, trains with a callback that logs step metrics and lets the driver prune, and
closes the run as FINISHED (complete or pruned: the pruner's deliberate early stop, tagged
``psmsearch.status=pruned``), KILLED (interrupted) or FAILED with the error recorded.
The Optuna and Ray drivers only differ in how they schedule calls to it.
"""

from __future__ import annotations

import math
import tempfile
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import yaml

from psmsearch.errors import ConfigError, PSMSearchError
from psmsearch.registry import Registry
from psmsearch.space import SearchSpace
from psmsearch.tracking import ParamsRefused, Tracker, absolute_uri, check_tracking_uri, default_tracking_uri

Report = Callable[[int, dict[str, float]], None]


@dataclass
class SearchOptions:
    """Resolved command-line and file settings of one search."""

    trials: int
    jobs: int = 1
    storage: str | None = None
    storage_field: str = "--storage"  # where ``storage`` was given, for its errors: the option or the file's field
    study: str | None = None
    resume: bool = False
    tracking_uri: str | None = None
    experiment: str | None = None
    address: str | None = None
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    progress: bool = True
    heartbeat_interval: int = 5
    grace_period: int = 15
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrialOutcome:
    """The end of one trial as the drivers and the summary see it."""

    number: int
    state: str  # complete, pruned, failed
    metrics: dict[str, float]
    params: dict[str, Any]
    error: str = ""
    run_id: str | None = None


def repeated_trials_note(outcomes: Sequence[TrialOutcome], space: SearchSpace) -> str | None:
    """Which trials drew the parameters of an earlier completed trial again, or None where none did.

    A trial's training is a function of its parameters (its seed among them), so such a repeat
    spends its budget on a result the search already holds; samplers such as TPE draw repeats
    readily in small spaces of choices. Says how many distinct configurations a space of choices
    has and that ``sampler: grid`` trains each once.
    """
    first_complete: dict[str, int] = {}
    repeats: list[tuple[int, int]] = []
    for outcome in sorted(outcomes, key=lambda o: o.number):
        key = repr(sorted((k, str(v)) for k, v in outcome.params.items()))
        if key in first_complete:
            repeats.append((outcome.number, first_complete[key]))
        elif outcome.state == "complete":
            first_complete[key] = outcome.number
    if not repeats:
        return None
    pairs = ", ".join(f"trial {number} those of trial {earlier}" for number, earlier in repeats)
    note = (f"{len(repeats)} trial{'s' if len(repeats) > 1 else ''} drew the parameters of an earlier completed "
            f"trial again ({pairs}): a trial's training follows from its parameters, seed included, so a repeat adds "
            "no result")
    try:
        points = math.prod(len(values) for values in space.grid().values())
    except PSMSearchError:
        return note
    return (f"{note}; this space has {points} distinct configuration{'s' if points != 1 else ''}, and "
            "driver.sampler: grid trains each once")


def objective_problem(space: SearchSpace, metrics: Mapping[str, float]) -> str | None:
    """Why a finished trial's metrics cannot be ranked, or ``None``: an objective it did not report,
    or one that is NaN or infinite (MLflow cannot store an infinity, and one infinite trial would
    dominate every Pareto front)."""
    for objective in space.objectives:
        value = metrics.get(objective.metric)
        if value is None:
            return f"the trial reported no value for objective {objective.metric!r}"
        if not math.isfinite(float(value)):
            return f"objective {objective.metric!r} is {float(value)}; objectives must be finite numbers"
    return None


def objective_values(space: SearchSpace, metrics: Mapping[str, float]) -> list[float]:
    """The objective metrics of a finished trial, in the space's order; see :func:`objective_problem`."""
    problem = objective_problem(space, metrics)
    if problem is not None:
        raise ConfigError(problem, field="objectives")
    return [float(metrics[objective.metric]) for objective in space.objectives]


def trial_tags(config: Any, driver: str, registry: Registry, plugin_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """Tags that let MLflow filter trials: driver, model kind, state kind, associativity, and the
    plugin each component and the task came from (see :func:`component_plugins`)."""
    plugins = component_plugins(config, registry, plugin_labels)
    tags = {"psmsearch.driver": driver, "psmsearch.model_kind": config.model.kind, "psmsearch.task": config.task.name,
            "psmsearch.plugin.task": plugins["task"]}
    if config.model.kind == "psm":
        aggregator = registry.get("aggregator", config.model.aggregator.name)
        tags["psmsearch.state_kind"] = str(aggregator.state_kind)
        tags["psmsearch.associative"] = str(aggregator.associative).lower()
        for kind in ("encoder", "aggregator", "head"):
            tags[f"psmsearch.plugin.{kind}"] = plugins[f"model.{kind}"]
    return tags


def component_plugins(config: Any, registry: Registry, plugin_labels: Mapping[str, str] | None = None) -> dict[str, str]:
    """The plugin the task and each component of ``config`` came from, by the field that names it
    (``task``, and ``model.encoder`` / ``aggregator`` / ``head`` for a PSM): a module name, or the
    plugin file or folder as the user gave it (made absolute).

    ``plugin_labels`` maps the name a plugin was loaded under to the one to record: Ray workers
    import a shipped plugin file by its bare module name (``my_agg``, see
    :func:`psmsearch.ray_cluster.worker_runtime_env`), while the search named ``/path/my_agg.py``,
    as the Optuna driver's tags and ``trial_config.yaml`` say.
    """
    labels = plugin_labels or {}
    fields = [("task", "task", config.task.name)]
    if config.model.kind == "psm":
        fields += [(f"model.{kind}", kind, getattr(config.model, kind).name) for kind in ("encoder", "aggregator", "head")]
    out = {}
    for field_name, kind, name in fields:
        plugin = registry.get(kind, name).plugin
        out[field_name] = labels.get(plugin, plugin)
    return out


def trial_config_text(config: Any, registry: Registry, plugin_labels: Mapping[str, str] | None = None,
                      title: str = "") -> str:
    """A trial's ``trial_config.yaml``: its resolved configuration, which ``psmsearch train`` runs again.

    Components and a task that are not built in are recorded in the ``plugins`` field (field ->
    ``{name, plugin, sha256, distribution}``: the digest of the plugin's code as this process loaded it,
    where it is a file, folder or module with a file, and for an installed package's entry point the
    package's ``NAME==VERSION``), and a comment header says which ``--plugin`` to pass: without the plugin
    ``train`` knows no such aggregator, and its error names the recorded plugin.
    """
    from psmsearch.registry import DEFAULT_PLUGINS

    names = {"task": config.task.name}
    if config.model.kind == "psm":
        names.update({f"model.{kind}": getattr(config.model, kind).name for kind in ("encoder", "aggregator", "head")})
    loaded = component_plugins(config, registry)  # as this process loaded them (a Ray worker: by module)
    plugins = {field_name: {"name": names[field_name], "plugin": plugin,
                            **({"sha256": digest} if (digest := registry.plugin_digests.get(loaded[field_name])) else {}),
                            **({"distribution": dist} if (dist := registry.distributions.get(loaded[field_name])) else {})}
               for field_name, plugin in component_plugins(config, registry, plugin_labels).items()
               if plugin not in DEFAULT_PLUGINS}
    text = yaml.safe_dump(config.model_validate({**config.model_dump(), "plugins": plugins}).resolved(), sort_keys=False)
    if not plugins:
        return text
    local = {*registry.local_plugins, *(plugin_labels or {}).values()}
    lines = [f"# {title}" if title else "# A trial's configuration, as it ran.",
             "# Components that are not built in, from these plugins (the plugins field below):"]
    for field_name, entry in plugins.items():
        plugin = entry["plugin"]
        how = (f"--plugin {plugin}" if plugin in local else
               f"the installed package {entry['distribution']} (entry point {plugin!r})" if "distribution" in entry else
               f"the installed plugin package {plugin!r} (entry point)")
        lines.append(f"#   {field_name} {entry['name']!r}: {how}")
    passed = " ".join(f"--plugin {p}" for p in dict.fromkeys(e["plugin"] for e in plugins.values()) if p in local)
    lines.append(f"# Run it again with: psmsearch {passed + ' ' if passed else ''}train trial_config.yaml")
    return "\n".join(lines) + "\n" + text


def build_trial_config(space: SearchSpace, sampled: dict[str, Any]) -> Any:
    """Validate a sampled configuration dict as a TrialConfig (errors located in the space file)."""
    from psmsearch.trial import TrialConfig

    return TrialConfig.from_dict(sampled, source=space.source.source, registry=space.registry)


def execute_trial(
    space: SearchSpace,
    sampled: dict[str, Any] | Callable[[], dict[str, Any]],
    number: int,
    params: Mapping[str, Any],
    tracker: Tracker | None,
    parent_run: str | None,
    driver: str,
    report: Report | None = None,
    on_run: Callable[[str], None] | None = None,
    search: str | None = None,
    plugin_labels: Mapping[str, str] | None = None,
) -> TrialOutcome:
    """Run one trial end to end; never raises for a failing trial (the outcome says what failed).

    ``report(step, metrics)`` is called at each evaluation and may raise
    :class:`psmsearch.trainer.TrialPruned`. KeyboardInterrupt is re-raised after the run is closed
    as KILLED, so the caller can stop the search and resume later. ``search`` names the search in the
    trial's MLflow run (the study name, ``--study``; default the space's name), as the parent run is named.
    ``plugin_labels`` maps the names plugins were loaded under here to the ones the search gave
    (:func:`component_plugins`), for the run's plugin tags and ``trial_config.yaml``. ``sampled`` may be
    a function that samples the configuration, so that a failure there is the trial's too. A trial
    that fails before its run exists (its configuration cannot be sampled or built) gets a FAILED run
    with its parameters and error all the same: the search's summary and ``compare`` read MLflow.
    """
    from psmsearch.trainer import TrialDiverged, TrialPruned
    from psmsearch.trial import TrialPhaseError, run_trial, where_raised

    run_id = None
    history: list[tuple[int, dict[str, float]]] = []
    failure_trace = ""
    try:
        config = build_trial_config(space, sampled() if callable(sampled) else sampled)
        if tracker is not None and parent_run is not None:
            run_id, refused = _open_run(tracker, parent_run, search or space.name, number,
                                        {**config.flat_params(), **_prefixed(params)},
                                        trial_tags(config, driver, space.registry, plugin_labels))
            if refused is not None:
                raise refused
            config_yaml = trial_config_text(config, space.registry, plugin_labels,
                                            title=f"Trial {number} of search {search or space.name!r}, as it ran.")
            _best_effort(number, "log its configuration", lambda: tracker.log_text(run_id, config_yaml, "trial_config.yaml"))
            if on_run is not None:
                on_run(run_id)

        def callback(step: int, metrics: dict[str, float]) -> None:
            history.append((step, dict(metrics)))
            if tracker is not None and run_id is not None:
                tracker.log_metrics(run_id, metrics, step)
            if report is not None:
                report(step, metrics)

        metrics = run_trial(config, callback=callback, registry=space.registry)
        problem = objective_problem(space, metrics)  # a failure, but its measured metrics are kept
        outcome = TrialOutcome(number, "complete" if problem is None else "failed", metrics, dict(params),
                               error=problem or "", run_id=run_id)
    except TrialPruned as err:
        last_evaluation = dict(history[-1][1]) if history else {}  # what MLflow shows as the run's latest metrics
        outcome = TrialOutcome(number, "pruned", last_evaluation, dict(params), error=str(err) or "pruned", run_id=run_id)
    except TrialDiverged as err:
        outcome = TrialOutcome(number, "failed", {}, dict(params), error=str(err), run_id=run_id)
    except KeyboardInterrupt:
        # its run's latest metrics are those of its last evaluation: say which step they are from
        reason = (f"interrupted by the user after step {history[-1][0]}; the values shown are that evaluation's"
                  if history else "interrupted by the user before its first evaluation")
        _close(tracker, run_id, "KILLED", {"psmsearch.status": "interrupted", "psmsearch.error": reason})
        raise
    except TrialPhaseError as err:  # the phase and place are named; what it measured before is kept
        outcome = TrialOutcome(number, "failed", err.metrics, dict(params), error=str(err), run_id=run_id)
        failure_trace = traceback.format_exc()
    except Exception as err:  # noqa: BLE001 - a failing trial must not end the search
        message = f"{type(err).__name__}: {err}{where_raised(err)}"
        outcome = TrialOutcome(number, "failed", {}, dict(params), error=message, run_id=run_id)
        failure_trace = traceback.format_exc()
    if tracker is not None and parent_run is not None and run_id is None and outcome.state == "failed":
        def open_failed() -> None:
            opened, _ = _open_run(tracker, parent_run, search or space.name, number, _prefixed(params),
                                  {"psmsearch.driver": driver})
            outcome.run_id = opened
            if on_run is not None:  # the Optuna driver records the run on the study through it
                on_run(opened)

        _best_effort(number, "record its failure", open_failed)
        run_id = outcome.run_id
    if tracker is not None and run_id is not None:
        _finish_run(tracker, run_id, outcome, history, [o.metric for o in space.objectives], failure_trace)
    return outcome


def _open_run(tracker: Tracker, parent: str, search: str, number: int, params: Mapping[str, Any],
              tags: Mapping[str, str]) -> tuple[str, Exception | None]:
    """The trial's MLflow run, and the trial's failure when MLflow refused its parameters.

    The run exists then (RUNNING, without parameters): the caller closes it FAILED with the error,
    which names the phase as other trial failures do (MLflow's bare message did not).
    """
    from psmsearch.trial import TrialPhaseError

    try:
        return tracker.trial_run(parent, search, number, params, tags), None
    except ParamsRefused as err:
        return err.run_id, TrialPhaseError("logging its parameters to MLflow", {}, err.cause)


def _finish_run(
    tracker: Tracker,
    run_id: str,
    outcome: TrialOutcome,
    history: list[tuple[int, dict[str, float]]],
    objectives: list[str],
    failure_trace: str,
) -> None:
    """Final metrics, plots and the run's status. The trial's result exists already, so trouble
    with the tracking store here is reported as a warning and never ends the search."""
    status = {"complete": "FINISHED", "pruned": "FINISHED", "failed": "FAILED"}[outcome.state]  # KILLED: interrupted
    tags = {"psmsearch.status": outcome.state}
    if outcome.error:
        tags["psmsearch.error"] = outcome.error
    if outcome.state != "pruned" and outcome.metrics:  # a pruned trial's metrics are its logged evaluations
        step, final = final_metrics_to_log(outcome.metrics, history)
        _best_effort(outcome.number, "log its results", lambda: tracker.log_metrics(run_id, final, step))
    if failure_trace:
        _best_effort(outcome.number, "log its results", lambda: tracker.log_text(run_id, failure_trace, "error.txt"))
    if history:
        _best_effort(outcome.number, "log its results", lambda: _log_curves(tracker, run_id, history, objectives))
    _best_effort(outcome.number, "close its run", lambda: _close(tracker, run_id, status, tags))


def final_metrics_to_log(metrics: dict[str, float],
                         history: list[tuple[int, dict[str, float]]]) -> tuple[int, dict[str, float]]:
    """The step to log a trial's final metrics at, and those of them not already logged there.

    The final metrics are the last evaluation plus what is measured once (throughput, test set,
    streaming). Logged at step 0 they gave every learning curve in MLflow a last point drawn at its
    start; at the last evaluated step, each value already logged there is left out (no duplicate point).
    """
    step, logged = history[-1] if history else (0, {})
    return step, {k: v for k, v in metrics.items() if logged.get(k) != v}


def _best_effort(number: int, what: str, action: Callable[[], Any]) -> None:
    """Run a tracking action; on failure warn (naming the trial) instead of failing the trial."""
    try:
        action()
    except Exception as err:  # noqa: BLE001 - the tracking store's trouble is not the trial's
        warnings.warn(f"trial {number}: could not {what} to MLflow: {type(err).__name__}: {err}", stacklevel=2)


def _log_curves(tracker: Tracker, run_id: str, history: list[tuple[int, dict[str, float]]], objectives: list[str]) -> None:
    """Plot the trial's evaluations (objectives first, then every accuracy) and attach the PNG."""
    from psmsearch.report_plots import write_learning_curves

    names = list(dict.fromkeys([*objectives, *sorted(k for k in history[-1][1] if k.startswith("acc"))]))
    with tempfile.TemporaryDirectory() as directory:
        path = write_learning_curves(history, names, Path(directory) / "curves.png")
        if path is not None:
            tracker.log_artifact(run_id, path)


def _prefixed(params: Mapping[str, Any]) -> dict[str, Any]:
    return {f"search.{k}": v for k, v in params.items()}


def _close(tracker: Tracker | None, run_id: str | None, status: str, tags: Mapping[str, str]) -> None:
    if tracker is None or run_id is None:
        return
    tracker.set_tags(run_id, tags)
    tracker.finish(run_id, status)


def open_tracking(space: SearchSpace, options: SearchOptions, driver: str,
                  storage: str = "", fresh: Callable[[], bool] = lambda: False) -> tuple[Tracker | None, str | None]:
    """The MLflow tracker and the search's parent run (reopened on resume), unless tracking is off.

    ``storage`` (the Optuna storage URL or the Ray results folder) tells apart searches of one name;
    ``fresh()`` says whether the study holds no trials yet (see :meth:`Tracker.parent_run`).
    """
    if not space.header.tracking.enabled:
        return None, None
    uri = absolute_uri(options.tracking_uri or space.header.tracking.tracking_uri or default_tracking_uri())
    if options.tracking_uri:
        where = "--tracking-uri"
    elif space.header.tracking.tracking_uri:
        where = f"{space.source.source}: tracking.tracking_uri"
    else:
        where = "the default tracking URI (MLFLOW_TRACKING_URI or MLflow's own)"
    check_tracking_uri(uri, where)
    experiment = options.experiment or space.header.tracking.experiment or space.name
    tracker = Tracker(uri, experiment)
    params = {"space": space.source.source, "objectives": [o.model_dump() for o in space.objectives], "trials": options.trials}
    parent = tracker.parent_run(options.study or space.name, {"psmsearch.driver": driver}, params, storage=storage,
                                fresh=fresh)
    return tracker, parent
