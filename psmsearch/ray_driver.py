"""The cluster search driver: Ray Tune runs :func:`psmsearch.search.execute_trial` on a Ray cluster.

Optuna samples (``OptunaSearch`` over the same define-by-run :meth:`SearchSpace.sample` the embedded
driver uses) and, for one objective, ASHA stops unpromising trials early from the objective reported
at each evaluation. With several objectives there is no scheduler and Optuna gets metric lists.

What crosses to the workers, and why:

* the search space without its registry (:class:`PortableSpace`): plugin classes live in modules a
  worker can only import after loading the plugins, so the worker rebuilds the space against its own
  registry;
* the plugins: ``PSMSEARCH_PLUGINS`` in the job's ``runtime_env``, with plugin files and folders
  uploaded as ``py_modules`` and named by module, so remote nodes need no shared file system;
* the absolute MLflow tracking URI, experiment and parent run: each worker opens its own nested
  trial run, exactly as the embedded driver does.

A Tune callback on the driver keeps the console progress, collects the outcomes and closes the
MLflow runs of trials that Ray ended without the trial function finishing (ASHA stops, crashed
workers, an interrupted search), so no trial run is left RUNNING.

``--resume`` restores the Ray experiment (``Tuner.restore``): unfinished trials run again with the
same number and parameters, and the searcher samples new trials until the experiment holds
``--trials`` trials, at most ``--jobs`` at once (the resuming command's numbers, not the first
one's). Trials that ended stay as they are and count towards ``--trials``: completed, stopped by
ASHA and failed ones alike (a failed trial is not run again, as the Optuna driver counts a failed
trial and moves on). The summary lists every trial of the experiment, earlier sessions' too.
A resume whose space differs from the one the experiment was started with (other than in
:data:`psmsearch.definition.RESUMABLE_FIELDS`) is refused before anything runs, as an Optuna study's is.
A Ray experiment has one driving process at a time (Tune cannot share it as Optuna shares a study):
the driver holds a lock in the experiment's folder for the whole search, and a second command on
the same experiment, ``--resume`` or not, is refused while the first one runs.
Tune saves the experiment's state only every ~10 s, so after the search process was killed
(SIGKILL, a crash) the restored state may be older than MLflow:

* a trial run left RUNNING by the killed process is closed as KILLED (``interrupted``) before any
  trial starts;
* a trial that completed after Tune's last snapshot is run again by Ray; the worker finds its
  FINISHED run (same trial number, same parameters) and reports the recorded metrics instead of
  training again, so MLflow keeps one FINISHED run per trial.

Without ``--address`` a private local cluster is started and bound to the loopback interface; with
a loopback ``--address`` (``127.0.0.1:PORT``) the driver joins a single-machine cluster started with
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 ray start --head --node-ip-address=127.0.0.1``.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import optuna

try:
    import fcntl
except ImportError:  # Windows: no driver lock
    fcntl = None  # type: ignore[assignment]

from psmsearch.definition import changed_space_error, definition_changes, search_definition
from psmsearch.errors import ConfigError
from psmsearch.optuna_driver import SearchResult, make_sampler
from psmsearch.progress import SearchProgress, pareto_text
from psmsearch.registry import ENV_VAR as PLUGINS_ENV_VAR
from psmsearch.registry import env_plugin_specs, get_registry
from psmsearch.report import TrialRow, rank
from psmsearch.search import SearchOptions, TrialOutcome, execute_trial, open_tracking
from psmsearch.space import SearchSpace
from psmsearch.tasks import LAUNCH_DIR_ENV
from psmsearch.tracking import KIND_TAG, TRIAL_TAG, Tracker, param_text, retry_locked

if TYPE_CHECKING:
    from ray.tune import Callback, Tuner
    from ray.tune.experiment import Trial

DEFAULT_RESULTS_DIR = "psmsearch_ray_results"
NUMBER_KEY = "psmsearch_trial_number"
RUN_KEY = "psmsearch_run_id"
STATE_KEY = "psmsearch_state"
STEP_KEY = "psmsearch_step"
METRICS_KEY = "psmsearch_metrics"
# Ray's single-machine mode: node address 127.0.0.1 and every Ray server bound to loopback. Read when
# ``ray`` is imported, so it is set before the first import.
LOOPBACK_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S": "0",
}
DB_SCHEMES = ("sqlite:", "postgresql", "mysql", "oracle", "mssql")


class TrialFailed(Exception):
    """A trial failed (already recorded FAILED in MLflow); Ray marks it errored and the search goes on."""


class PortableSpace:
    """A :class:`SearchSpace` that pickles without its registry and rebuilds it where it is unpickled.

    Called with an Optuna trial it is the define-by-run space of ``OptunaSearch``: it samples every
    dimension and returns the trial number as a constant, so each Ray trial carries a stable number
    (Optuna's, which survives a restored searcher) into its config.
    """

    def __init__(self, space: SearchSpace) -> None:
        self._parts = (space.header, space.template, space.source)
        self._space: SearchSpace | None = space

    def __getstate__(self) -> dict[str, Any]:
        return {"parts": self._parts}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self._parts = state["parts"]
        self._space = None

    def get(self) -> SearchSpace:
        """The space, resolved against this process's registry (plugins from ``PSMSEARCH_PLUGINS``)."""
        if self._space is None:
            header, template, source = self._parts
            self._space = SearchSpace(header, template, source, get_registry())
        return self._space

    def __call__(self, trial: optuna.Trial) -> dict[str, int]:
        self.get().sample(trial)
        return {NUMBER_KEY: int(trial.number)}


@dataclass(frozen=True)
class TrialContext:
    """What every worker needs besides the sampled parameters (shipped once via ``tune.with_parameters``)."""

    space: PortableSpace
    tracking_uri: str | None
    experiment: str | None
    parent_run: str | None
    step_metric: str | None  # the objective reported at each evaluation (one objective only)
    resumed: bool = False  # a restored experiment: a trial may already have a FINISHED run
    search: str | None = None  # the search's name in MLflow (the study name; default the space's)
    plugin_labels: Mapping[str, str] = field(default_factory=dict)  # shipped module name -> the path the user gave


def ray_trial(config: dict[str, Any], context: TrialContext) -> None:
    """The Tune function trainable: one trial through :func:`execute_trial`, reported to Tune.

    With one objective, each evaluation reports it (ASHA decides on it; a stopped trial never
    returns from ``tune.report``, and the driver closes its run). The final report carries every
    metric. A failed trial raises :class:`TrialFailed` after its MLflow run is closed as FAILED.
    In a restored experiment, a trial that already has a FINISHED run reports that run's metrics.
    """
    from ray import tune

    space = context.space.get()
    number = int(config[NUMBER_KEY])
    params = {k: v for k, v in _flat(config).items() if k != NUMBER_KEY}
    tracker = Tracker(context.tracking_uri, context.experiment) if context.tracking_uri and context.experiment else None
    if context.resumed and tracker is not None and context.parent_run is not None:
        done = finished_run(tracker, context.parent_run, number, params)
        recorded = {k: float(v) for k, v in done.data.metrics.items()} if done is not None else {}
        if done is not None and all(o.metric in recorded for o in space.objectives):
            objectives = {o.metric: recorded[o.metric] for o in space.objectives}
            tune.report({**objectives, METRICS_KEY: recorded, STATE_KEY: "complete", NUMBER_KEY: number, RUN_KEY: done.info.run_id})
            return
    run: dict[str, str] = {}

    def report(step: int, metrics: dict[str, float]) -> None:
        metric = context.step_metric
        if metric is not None and metric in metrics:
            numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
            tune.report({metric: float(metrics[metric]), METRICS_KEY: numeric, STEP_KEY: step, NUMBER_KEY: number, RUN_KEY: run.get("id", "")})

    sampled = space.sample(optuna.trial.FixedTrial(params))
    outcome = execute_trial(
        space, sampled, number, params, tracker, context.parent_run, "ray", report,
        on_run=lambda run_id: run.update(id=run_id), search=context.search, plugin_labels=context.plugin_labels,
    )
    if outcome.state != "complete":
        raise TrialFailed(outcome.error or outcome.state)
    metrics = {k: float(v) for k, v in outcome.metrics.items() if isinstance(v, (int, float))}
    objectives = {o.metric: metrics[o.metric] for o in space.objectives}
    tune.report({**objectives, METRICS_KEY: metrics, STATE_KEY: "complete", NUMBER_KEY: number, RUN_KEY: outcome.run_id or ""})


def finished_run(tracker: Tracker, parent: str, number: int, params: Mapping[str, Any]) -> Any | None:
    """The search's FINISHED run of trial ``number`` with these sampled parameters, if there is one.

    After the search process was killed, Tune's restored state can be older than MLflow (it is saved
    every ~10 s) and Ray runs a trial again that had completed; its run is then reused, not repeated.
    """
    query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{TRIAL_TAG}` = '{number}' and attributes.status = 'FINISHED'"
    runs = retry_locked(lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query))
    wanted = {f"search.{k}"[:250]: param_text(v) for k, v in params.items()}
    return next((r for r in runs if all(r.data.params.get(k) == v for k, v in wanted.items())), None)


def _flat(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Undo Tune's ``unflatten_dict`` (it splits parameter names on ``/``)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        out.update(_flat(value, name) if isinstance(value, dict) else {name: value})
    return out


def _reported_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a flattened Tune result carries under ``METRICS_KEY``: every metric of the final
    report, or of the last evaluation before ASHA stopped the trial."""
    prefix = f"{METRICS_KEY}/"
    return {k[len(prefix):]: float(v) for k, v in result.items() if k.startswith(prefix)}


def trial_name(trial: "Trial") -> str:
    """``trial-N`` with psmsearch's trial number (the MLflow run is ``<space>-trial-N``)."""
    return f"trial-{trial.config.get(NUMBER_KEY, trial.trial_id)}"


def trial_dirname(trial: "Trial") -> str:
    """A short, filesystem-safe trial directory (Tune's default embeds parameter values)."""
    return f"trial_{trial.config.get(NUMBER_KEY, 0):05d}_{trial.trial_id}"


@dataclass
class _Book:
    """Driver-side bookkeeping of one search: progress, outcomes, and runs Ray ended early."""

    space: SearchSpace
    options: SearchOptions
    tracker: Tracker | None
    parent: str | None
    progress: SearchProgress
    outcomes: dict[int, TrialOutcome] = field(default_factory=dict)
    started: dict[str, int] = field(default_factory=dict)
    last: dict[str, dict[str, Any]] = field(default_factory=dict)

    def on_start(self, trial: "Trial") -> None:
        number = int(trial.config[NUMBER_KEY])
        self.started[trial.trial_id] = number
        self.progress.started(number)

    def on_result(self, trial: "Trial", result: Mapping[str, Any]) -> None:
        self.last[trial.trial_id] = dict(result)

    def on_complete(self, trial: "Trial") -> None:
        outcome = _terminated(self._number(trial), _flat(self.last.get(trial.trial_id) or trial.last_result or {}), _params(trial))
        if outcome.state == "pruned":
            self._close_runs(outcome.number, outcome.run_id, "FINISHED", {"psmsearch.status": "pruned", "psmsearch.error": outcome.error})
        self._finish(outcome)

    def on_error(self, trial: "Trial") -> None:
        number = self._number(trial)
        run_id = str(_flat(self.last.get(trial.trial_id) or {}).get(RUN_KEY) or "") or None
        error, trial_failure = _error_text(trial)
        if not trial_failure:
            self.progress.note(f"trial {number}: Ray reported an error outside the trial (full text in {trial.path}/error.txt):")
        tags = {"psmsearch.status": "failed", "psmsearch.error": error or "unknown error"}
        recorded, run_id = self._close_runs(number, run_id, "FAILED", tags)
        self._finish(TrialOutcome(number, "failed", {}, _params(trial), error=error or recorded or "unknown error", run_id=run_id))

    def restore_ended(self, trials: list["Trial"]) -> None:
        """Record the trials a restored experiment holds as ended; Tune does not run them again.

        They count towards ``--trials``, the progress and the summary as this session's trials do.
        A failed trial keeps the error its FAILED MLflow run recorded (Ray's own text when there is none).
        """
        for trial in trials:
            if trial.status not in ("TERMINATED", "ERROR"):
                continue
            number, params = self._number(trial), _params(trial)
            result = _flat(trial.last_result or {})
            if trial.status == "TERMINATED":
                self._record(_terminated(number, result, params))
                continue
            run_id = str(result.get(RUN_KEY) or "") or None
            runs = self._runs_of(number) if self.tracker is not None and self.parent is not None else []
            failed = [r for r in runs if r.info.run_id == run_id or (run_id is None and r.info.status == "FAILED")]
            recorded = failed[0] if failed else None
            error = recorded.data.tags.get("psmsearch.error", "") if recorded is not None else ""
            error = error or _error_text(trial)[0] or "unknown error"
            self._record(TrialOutcome(number, "failed", {}, params, error=error,
                                      run_id=run_id or (recorded.info.run_id if recorded is not None else None)))
        self.progress.best = self._best()

    def unfinished(self) -> bool:
        """Whether a trial started in this session never ended here."""
        return any(number not in self.outcomes for number in self.started.values())

    def interrupted(self, trials: int) -> bool:
        """Whether Tune stopped early on Ctrl-C (it returns normally): a started trial never ended here,
        or the experiment holds fewer ended trials than were asked for."""
        return self.unfinished() or len(self.outcomes) < trials

    def close_unfinished(self) -> None:
        """Runs of trials that started but never ended here (an interrupted search) become KILLED."""
        for trial_id, number in self.started.items():
            if number in self.outcomes:
                continue
            run_id = str(_flat(self.last.get(trial_id) or {}).get(RUN_KEY) or "") or None
            self._close_runs(number, run_id, "KILLED", {"psmsearch.status": "interrupted", "psmsearch.error": "search stopped"})

    def close_stale(self) -> int:
        """Close this search's trial runs still RUNNING as KILLED (``interrupted``); returns how many.

        Called when a search is resumed, before any trial starts: such runs were left by a search
        process that was killed (SIGKILL, a crash) and nothing else will close them. One Ray
        experiment has one driver at a time, so no live trial owns them.
        """
        if self.tracker is None or self.parent is None:
            return 0
        tracker = self.tracker
        query = f"tags.`mlflow.parentRunId` = '{self.parent}' and tags.`{KIND_TAG}` = 'trial' and attributes.status = 'RUNNING'"
        runs = retry_locked(lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query))
        for run in runs:
            tracker.set_tags(run.info.run_id, {"psmsearch.status": "interrupted", "psmsearch.error": "the search process was killed"})
            tracker.finish(run.info.run_id, "KILLED")
        return len(runs)

    def _number(self, trial: "Trial") -> int:
        return self.started.get(trial.trial_id, int(trial.config.get(NUMBER_KEY, -1)))

    def _finish(self, outcome: TrialOutcome) -> None:
        self._record(outcome)
        self.progress.best = self._best()
        self.progress.finished(outcome)

    def _record(self, outcome: TrialOutcome) -> None:
        self.outcomes[outcome.number] = outcome
        self.progress.counts[outcome.state] = self.progress.counts.get(outcome.state, 0) + 1

    def _best(self) -> str:
        complete = [o for o in self.outcomes.values() if o.state == "complete"]
        if not complete:
            return "best -"
        rows = [TrialRow(f"trial {o.number}", self.space.name, o.state, {}, o.metrics) for o in complete]
        ranked = rank(rows, self.space.objectives)
        if len(self.space.objectives) > 1:
            return pareto_text(sum(r.pareto for r in ranked))
        metric = self.space.objectives[0].metric
        return f"best {metric}={ranked[0].metrics[metric]:.4g} ({ranked[0].name})"

    def _close_runs(self, number: int, run_id: str | None, status: str, tags: dict[str, str]) -> tuple[str, str | None]:
        """Close this trial's runs still RUNNING. Returns the error the worker recorded, if any, and
        the trial's run: ``run_id``, else the newest run closed here (a worker that died before its
        first report never told the driver its run), else its newest run (a trial that failed before
        its first report closed its run itself: the summary's row named no run)."""
        if self.tracker is None or self.parent is None:
            return "", run_id
        tracker = self.tracker
        runs = [retry_locked(lambda: tracker.client.get_run(run_id))] if run_id else self._runs_of(number)
        recorded, closed = "", None
        for run in runs:
            recorded = recorded or run.data.tags.get("psmsearch.error", "")
            if run.info.status == "RUNNING":
                closed = closed or run.info.run_id
                tracker.set_tags(run.info.run_id, tags)
                tracker.finish(run.info.run_id, status)
        return recorded, run_id or closed or (runs[0].info.run_id if runs else None)

    def _runs_of(self, number: int) -> list[Any]:
        """This search's runs of trial ``number``, newest first (a resumed trial has several)."""
        tracker, parent = self.tracker, self.parent
        assert tracker is not None and parent is not None
        query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`psmsearch.trial` = '{number}'"
        return retry_locked(
            lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query, order_by=["attributes.start_time DESC"])
        )


def _params(trial: "Trial") -> dict[str, Any]:
    return {k: v for k, v in _flat(trial.config).items() if k != NUMBER_KEY}


def _terminated(number: int, result: Mapping[str, Any], params: dict[str, Any]) -> TrialOutcome:
    """The outcome of a trial Tune terminated, from its last flattened result: complete after its
    final report, else stopped by ASHA (with its last evaluation's metrics)."""
    run_id = str(result.get(RUN_KEY) or "") or None
    if result.get(STATE_KEY) == "complete":
        return TrialOutcome(number, "complete", _reported_metrics(result), params, run_id=run_id)
    reason = f"stopped by ASHA at step {result.get(STEP_KEY, '?')}"
    return TrialOutcome(number, "pruned", _reported_metrics(result), params, error=reason, run_id=run_id)


def _error_text(trial: "Trial") -> tuple[str, bool]:
    """A trial's error as one line (empty when Ray has none), and whether it is a trial failure
    (rather than Ray or a worker failing).

    Tune writes the error into the trial's folder on the driver (``trial.error_file``) before it
    tells the callbacks; the copy in the experiment folder, which ``get_error`` and
    ``get_pickled_error`` read, appears only at Tune's next sync. A worker that died (no MLflow
    error recorded) is only known by that text.
    """
    error = _local_error(trial) or trial.get_pickled_error() or trial.get_error()
    lines = [line.strip() for line in str(error or "").splitlines() if line.strip()]
    ours = [line for line in lines if f"{TrialFailed.__name__}: " in line]
    if ours:
        return ours[-1].split(f"{TrialFailed.__name__}: ", 1)[1][:2000], True
    return (lines[-1] if lines else "")[:2000], False


def _local_error(trial: "Trial") -> str:
    """The text of the trial's error file in its folder on the driver; empty when there is none."""
    path = trial.error_file
    try:
        return Path(path).read_text(errors="replace") if path else ""
    except OSError:
        return ""


_ACTIVE: list[_Book] = []


def _bridge_to_active() -> "Callback":
    """Unpickling target of the callback: the bridge to the search running in this process."""
    return make_bridge(_ACTIVE[-1])


def make_bridge(book: _Book) -> "Callback":
    """A Tune callback forwarding trial events to ``book``.

    Tune pickles its run config (callbacks included) into the experiment directory and unpickles it
    on restore; the bridge pickles as a reference to the search active at that moment.
    """
    from ray.tune import Callback

    class _Bridge(Callback):
        def on_trial_start(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
            book.on_start(trial)

        def on_trial_result(self, iteration: int, trials: list, trial: "Trial", result: dict, **info: Any) -> None:
            book.on_result(trial, result)

        def on_trial_complete(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
            book.on_complete(trial)

        def on_trial_error(self, iteration: int, trials: list, trial: "Trial", **info: Any) -> None:
            book.on_error(trial)

        def __reduce__(self) -> tuple[Any, tuple]:
            return _bridge_to_active, ()

    return _Bridge()


def results_dir(options: SearchOptions) -> Path:
    """Where Ray keeps the experiment: ``--storage`` (a folder) or ``./psmsearch_ray_results``, absolute."""
    storage = options.storage
    if storage and storage.lower().startswith(DB_SCHEMES):
        raise ConfigError(
            f"the ray driver keeps its state in a folder, not a database: got --storage {storage!r}; "
            f"pass a folder (default ./{DEFAULT_RESULTS_DIR})",
            field="--storage",
        )
    return Path(storage or DEFAULT_RESULTS_DIR).expanduser().resolve()


def is_loopback(address: str | None) -> bool:
    """True for no address (a private local cluster) and for ``127.x.x.x:PORT`` / ``localhost:PORT``."""
    if address is None:
        return True
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def worker_runtime_env(specs: list[str]) -> dict[str, Any]:
    """The job's ``runtime_env``: plugin files and folders uploaded as ``py_modules``, named by module.

    A module name passes through unchanged: it must be installed on the cluster (as entry-point
    plugins are). Workers record the plugins by the names given here (:func:`shipped_plugin_labels`
    maps them back). The directory the command started in goes along (``PSMSEARCH_LAUNCH_DIR``): a
    Ray trial runs in a working directory of its own, and workers of a cluster joined with
    ``--address`` do not inherit the driver's environment, so a relative ``task.path`` is looked for
    there (it must exist on every node).
    """
    modules: list[str] = []
    names: list[str] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            path = path.resolve()
            modules.append(str(path))
            names.append(_shipped_name(path))
        else:
            names.append(spec)
    env_vars = {LAUNCH_DIR_ENV: os.environ.get(LAUNCH_DIR_ENV) or os.getcwd()}
    if names:
        env_vars[PLUGINS_ENV_VAR] = ",".join(names)
    env: dict[str, Any] = {"env_vars": env_vars}
    if modules:
        env["py_modules"] = modules
    return env


def _shipped_name(path: Path) -> str:
    """The module name a worker imports a shipped plugin file or folder under: ``my_agg`` for ``/x/my_agg.py``."""
    return path.stem if path.is_file() else path.name


def shipped_plugin_labels(specs: list[str]) -> dict[str, str]:
    """For each plugin file or folder shipped to the workers, its module name there -> the path the user
    gave (absolute), so that a trial's plugin tags and ``trial_config.yaml`` name the file under either
    driver: the Optuna driver's registry knows it by its path, a Ray worker's by its module name."""
    labels: dict[str, str] = {}
    for spec in specs:
        path = Path(spec).expanduser()
        if path.exists():
            labels[_shipped_name(path.resolve())] = spec
    return labels


def _prepare_environment(options: SearchOptions) -> None:
    """Quiet Ray and, for a local cluster, keep it on loopback; must run before ``ray`` is imported."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    if is_loopback(options.address):
        os.environ.setdefault(LOOPBACK_ENV, "0")


def _connect(options: SearchOptions, progress: SearchProgress) -> bool:
    """Join ``options.address`` or start a private loopback cluster; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    runtime_env = worker_runtime_env(env_plugin_specs())
    common: dict[str, Any] = {"runtime_env": runtime_env or None, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if options.address:
            progress.note(f"joining the Ray cluster at {options.address}")
            ray.init(address=options.address, **common)
        else:
            progress.note("starting a local Ray cluster (loopback only)")
            # "local" always starts a new cluster; no address would join the one Ray's temp dir names
            # (ray_current_cluster, left by `ray start` or by a dead head) or RAY_ADDRESS.
            ray.init(address="local", include_dashboard=False, **common)
    except (ConnectionError, ray.exceptions.AuthenticationError) as err:
        hint = (
            "; if the cluster uses token authentication (Ray's default), set RAY_AUTH_MODE=token and "
            "RAY_AUTH_TOKEN (or ~/.ray/auth_token) as for `ray start`"
        )
        raise ConfigError(f"cannot reach a Ray cluster at {options.address!r}: {err}{hint}", field="--address") from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """A TCP connection to ``HOST:PORT`` (or ``ray://HOST:PORT``) within ``timeout`` seconds.

    Ray itself retries an unreachable GCS for minutes, printing only its own warnings. Addresses
    without a port (``auto``, ``local``) are left to Ray.
    """
    import socket

    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not host or not port.isdigit():
        return
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as err:
        raise ConfigError(f"cannot reach a Ray cluster at {address!r} within {timeout:g} s ({err.strerror or err}); "
                          "start it with `ray start --head` or check the address", field="--address") from None


def _searcher(space: SearchSpace, portable: PortableSpace, options: SearchOptions) -> Any:
    """Optuna behind Tune's concurrency limit (``--jobs``), in a search generator of ``--trials`` trials."""
    from ray.tune.search import ConcurrencyLimiter

    metrics = [o.metric for o in space.objectives]
    modes = ["max" if o.direction == "maximize" else "min" for o in space.objectives]
    single = len(metrics) == 1
    optuna_search = __getattr__("StepOnceOptunaSearch")(
        space=portable, metric=metrics[0] if single else metrics, mode=modes[0] if single else modes,
        sampler=make_sampler(space), study_name=space.name,
    )
    return __getattr__("BudgetedSearch")(ConcurrencyLimiter(optuna_search, max_concurrent=options.jobs), options.trials, options.jobs)


def _search_for_active() -> Any:
    """Unpickling target of the search generator: a new one with the active search's ``--trials``
    and ``--jobs`` (Tune then restores the sampler's state into it from the experiment)."""
    book = _ACTIVE[-1]
    return _searcher(book.space, PortableSpace(book.space), book.options)


def _build_budgeted_search() -> type:
    from ray.tune.search import SearchGenerator

    class BudgetedSearch(SearchGenerator):
        """Tune's search generator, with the running command's ``--trials`` and ``--jobs`` on restore.

        Tune restores a search generator's trial budget (``num_samples``) and its concurrency limit
        from the experiment, and ``Tuner.restore`` takes neither, so on its own a resume ignores a
        larger ``--trials`` or ``--jobs``. This generator applies them once its state is restored,
        and it pickles (in the experiment's ``tuner.pkl``) as a reference to the search active in
        the unpickling process, as the callback bridge does. Trials already created are kept
        whatever ``--trials`` says: unfinished ones run, ended ones count.
        """

        def __init__(self, searcher: Any, trials: int, jobs: int) -> None:
            super().__init__(searcher)
            self.trials = trials
            self.jobs = jobs

        def restore_from_dir(self, dirpath: str) -> None:
            super().restore_from_dir(dirpath)
            state = self.get_state()
            budget = max(self.trials, state["counter"])
            raised = budget > state["total_samples"]
            self.set_state({**state, "total_samples": budget, "finished": state["finished"] and not raised})
            self.searcher.set_max_concurrency(self.jobs)

        def __reduce__(self) -> tuple[Any, tuple]:
            return _search_for_active, ()

    BudgetedSearch.__module__ = __name__
    BudgetedSearch.__qualname__ = "BudgetedSearch"
    return BudgetedSearch


def _scheduler(space: SearchSpace) -> Any:
    """ASHA on the objective reported at each evaluation; none for several objectives or ``pruner: none``."""
    from ray.tune.schedulers import FIFOScheduler

    settings = space.header.driver
    if len(space.objectives) > 1 or settings.pruner == "none":
        return FIFOScheduler()
    objective = space.objectives[0]
    return startup_asha(
        settings.startup_trials, metric=objective.metric, mode="max" if objective.direction == "maximize" else "min",
        max_t=_max_reports(space), grace_period=1, reduction_factor=3, stop_last_trials=False,
    )


def startup_asha(startup_trials: int, **asha: Any) -> Any:
    """ASHA that stops no trial before ``startup_trials`` trials have completed.

    The embedded driver's median pruner waits for ``driver.startup_trials`` the same way; plain ASHA
    would stop the second trial of a search on its first evaluation.
    """
    return __getattr__("StartupASHA")(startup_trials, **asha)


def _build_startup_asha() -> type:
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    class StartupASHA(ASHAScheduler):
        """ASHA with a startup period (see :func:`startup_asha`)."""

        def __init__(self, startup_trials: int, **asha: Any) -> None:
            super().__init__(**asha)
            self.startup_trials = startup_trials
            self.completed = 0

        def on_trial_result(self, tune_controller: Any, trial: "Trial", result: dict) -> str:
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and self.completed < self.startup_trials:
                return TrialScheduler.CONTINUE
            return action

        def on_trial_complete(self, tune_controller: Any, trial: "Trial", result: dict) -> None:
            self.completed += 1
            super().on_trial_complete(tune_controller, trial, result)

    StartupASHA.__module__ = __name__
    StartupASHA.__qualname__ = "StartupASHA"
    return StartupASHA


def _build_step_once_optuna_search() -> type:
    from ray.tune.search.optuna import OptunaSearch

    class StepOnceOptunaSearch(OptunaSearch):
        """Tune's ``OptunaSearch`` that reports each step of a trial to Optuna once.

        A trial that Ray runs again after ``--resume`` (it was interrupted) starts over at iteration
        1, while its Optuna trial, restored with the searcher, already holds the steps reported
        before the interrupt; Optuna ignores a step reported twice but warns each time (a pair of
        warning lines per evaluation). The values first reported are kept, as Optuna would keep them.
        """

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            from ray.tune.result import TRAINING_ITERATION

            ot_trial = self._ot_trials.get(trial_id)
            single = not isinstance(self.metric, list)
            if single and ot_trial is not None and trial_id not in self._completed_trials \
                    and result.get(TRAINING_ITERATION) in _reported_steps(ot_trial):
                return
            super().on_trial_result(trial_id, result)

    StepOnceOptunaSearch.__module__ = __name__
    StepOnceOptunaSearch.__qualname__ = "StepOnceOptunaSearch"
    return StepOnceOptunaSearch


def _reported_steps(trial: optuna.Trial) -> set[int]:
    """The steps an Optuna trial has intermediate values for, as its storage holds them."""
    return next(set(t.intermediate_values) for t in trial.study.get_trials(deepcopy=False) if t.number == trial.number)


_LAZY_CLASSES: dict[str, Callable[[], type]] = {"StartupASHA": _build_startup_asha, "BudgetedSearch": _build_budgeted_search,
                                                "StepOnceOptunaSearch": _build_step_once_optuna_search}
_BUILT: dict[str, type] = {}


def __getattr__(name: str) -> Any:
    """Classes derived from Ray's, built on first use: importing this module must not import ``ray``
    (the loopback setting is read when ``ray`` is imported). Pickles refer to them by this name."""
    if name not in _LAZY_CLASSES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name not in _BUILT:
        _BUILT[name] = _LAZY_CLASSES[name]()
    return _BUILT[name]


def _max_reports(space: SearchSpace) -> int:
    """Reports a trial makes (evaluations plus the final one) when the step budget is fixed; else large."""
    train = space.template.get("train", {})
    steps, every = train.get("steps"), train.get("eval_every", 200)
    if isinstance(steps, int) and isinstance(every, int) and train.get("time_budget_s") is None:
        return math.ceil(steps / every) + 1
    return 10_000


TUNER_FILE = "tuner.pkl"
"""Where Tune pickles a Tuner (its search generator included) in the experiment's folder."""


CLAIM_FILE = ".psmsearch-started"
"""Created in a new Ray experiment's folder before anything else: the search's name is taken. It
records the search's objectives, dimensions and definition (JSON; see :mod:`psmsearch.definition`), which
a resume must share."""
LOCK_FILE = ".psmsearch-driver.lock"
"""Locked (``flock``) by the process driving a Ray experiment, for as long as it drives it."""


@contextmanager
def _driving(experiment: Path) -> Iterator[None]:
    """Hold the experiment's driver lock for the whole search; refuse when another process holds it.

    A Ray experiment has one driver at a time: two Tuners in one folder each sample and run their
    own trials (same numbers, one MLflow parent) and overwrite each other's state. The lock is taken
    before anything is checked or created, by new and resumed searches alike, so of two commands
    started together (``--resume`` or not) exactly one runs. The kernel drops it when the process
    dies, so a killed search never blocks its ``--resume``. Without ``fcntl`` (Windows), or on a
    file system that cannot lock (NFS mounted ``nolock``, some FUSE and Lustre mounts), the search
    runs without the lock and says so: those searches ran before the lock existed.
    """
    experiment.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    fd = os.open(experiment / LOCK_FILE, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise _driven_elsewhere(experiment, os.pread(fd, 64, 0).decode(errors="replace").strip()) from None
        except OSError as err:
            print(f"warning: cannot lock {experiment / LOCK_FILE} ({err.strerror or err}): nothing stops a second "
                  "process from driving this Ray search at the same time", file=sys.stderr)
            yield
            return
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _driven_elsewhere(experiment: Path, holder: str) -> ConfigError:
    """The error for a Ray search another live process is running (it holds :data:`LOCK_FILE`, which
    names it as ``PID@HOST``: on shared storage the holder may be another machine)."""
    pid, _, host = holder.partition("@")
    who = (f"process {pid}" + (f" on {host}" if host else "")) if pid.isdigit() else "another process"
    return ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} is being run by {who} now; a Ray search has "
        "one driving process at a time (Tune cannot share an experiment as an Optuna study is shared): wait "
        "for it to end and then pass --resume to add trials, or choose another name with --study / another "
        "folder with --storage",
    )


def _check_new_or_resumed(experiment: Path, options: SearchOptions, space: SearchSpace) -> bool:
    """Whether the Ray experiment exists; an existing one needs ``--resume`` and the same objectives
    (as an Optuna study does).

    Called under :func:`_driving`. A new search creates :data:`CLAIM_FILE` in its folder first,
    exclusively without ``--resume`` (a search whose earlier process stopped before Tune first saved
    its state is refused then, and ``--resume`` starts it anew), and records its objectives there.
    Existence is what ``Tuner.can_restore`` checks (a saved ``tuner.pkl``), read without importing Ray.
    """
    exists = (experiment / TUNER_FILE).is_file()
    if exists and not options.resume:
        raise ConfigError(
            f"a Ray search {experiment.name!r} already exists in {experiment.parent}; pass --resume to continue it, "
            "or choose another name with --study / another folder with --storage",
        )
    if exists:
        _check_objectives(experiment, space)
        _check_definition(experiment, space)
        return True
    flags = os.O_CREAT | os.O_WRONLY | os.O_TRUNC | (0 if options.resume else os.O_EXCL)
    try:
        fd = os.open(experiment / CLAIM_FILE, flags, 0o644)
    except FileExistsError:
        raise ConfigError(
            f"a Ray search {experiment.name!r} was already started in {experiment.parent} (by a process "
            "that stopped before Tune saved any state); pass --resume to restart it, "
            "or choose another name with --study / another folder with --storage",
        ) from None
    with os.fdopen(fd, "w") as claim:
        json.dump({"objectives": _objectives(space), "dimensions": space.dimension_record(),
                   "definition": search_definition(space)}, claim)
    return False


def _objectives(space: SearchSpace) -> list[dict[str, str]]:
    """The space's objectives as recorded in the claim file."""
    return [o.model_dump() for o in space.objectives]


def _shown(objectives: list[dict[str, str]]) -> str:
    """``acc_2x (maximize), state_bytes_64 (minimize)``."""
    return ", ".join(f"{o.get('metric')} ({o.get('direction')})" for o in objectives)


def _check_objectives(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's objectives, recorded in its claim, must be the space's.

    Tune restores the searcher and the scheduler with the objectives they were made with: a resume
    with others failed in Tune's loop, with a traceback, once the first new trial reported. An
    experiment without the record (made before it was written) is not checked.
    """
    try:
        recorded = json.loads((experiment / CLAIM_FILE).read_text())["objectives"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if recorded != _objectives(space):
        raise ConfigError(
            f"the Ray search {experiment.name!r} in {experiment.parent} was started with the objectives "
            f"{_shown(recorded)}, but the space asks for {_shown(_objectives(space))}; a restored search keeps "
            "ranking by its own: resume it with those objectives, or choose another name with --study",
            field="objectives",
        )


RAY_RESTORE_REASON = ("Trials of one search must be trained and sampled alike to be ranked together, and a restored "
                      "Ray search samples from the space it was saved with (Tune restores its searcher and takes no other).")


def _check_definition(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's definition, recorded in its claim, must be the space's (see
    :mod:`psmsearch.definition`): the Optuna driver checks its studies the same way.

    Tune restores the searcher with the dimensions it was saved with, while each trial is built
    from the file: a changed ``train.steps`` trained the new trials otherwise than the first ones,
    and a new or re-ranged dimension failed them with Optuna's FixedTrial error. A claim without the
    record (written before it was kept) is checked on its dimensions, and the record is added to it.
    """
    claim_path = experiment / CLAIM_FILE
    try:
        claim = json.loads(claim_path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(claim, dict):
        return
    recorded = claim.get("definition")
    if not isinstance(recorded, dict):
        _check_dimensions(experiment, space)
        claim["definition"] = search_definition(space)
        claim_path.write_text(json.dumps(claim))  # under the driver lock: no other process writes it now
        return
    changes = definition_changes(recorded, space)
    if changes:
        raise changed_space_error(f"the Ray search {experiment.name!r} in {experiment.parent}", changes, space,
                                  why=RAY_RESTORE_REASON)


def _check_dimensions(experiment: Path, space: SearchSpace) -> None:
    """A resumed experiment's dimensions, recorded in its claim, must be the space's (claims written
    before the whole definition was recorded; see :func:`_check_definition`).

    Tune restores the searcher, which samples from the space it was saved with, while each trial's
    configuration is rebuilt from the file: a new or re-ranged dimension made trials fail with
    Optuna's FixedTrial error about a parameter or value it did not know. ``Tuner.restore`` takes no
    other searcher, so a changed space is refused by name before anything runs. An experiment
    without the record (started before it was written) is not checked.
    """
    try:
        recorded = json.loads((experiment / CLAIM_FILE).read_text())["dimensions"]
    except (OSError, ValueError, KeyError, TypeError):
        return
    current = json.loads(json.dumps(space.dimension_record()))  # as the claim holds it
    changes = _dimension_changes(recorded, current)
    if not changes:
        return
    first = next((path for path in current if recorded.get(path) != current[path]), None)
    raise ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} was started with another search space: "
        f"{'; '.join(changes)}. {RAY_RESTORE_REASON} Restore the space file as it was to resume it, or start a "
        "new search with --study NAME",
        source=space.source.where(first) if first else space.source.source, field=first,
    )


def _dimension_changes(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs between two dimension records, one phrase per parameter, in the space's order."""
    changes = [f"{path} is new ({_shown_dimension(spec)})" if path not in recorded else
               f"{path} was {_shown_dimension(recorded[path])}, now {_shown_dimension(spec)}"
               for path, spec in current.items() if recorded.get(path) != spec]
    changes += [f"{path} ({_shown_dimension(spec)}) was removed" for path, spec in recorded.items() if path not in current]
    return changes


def _shown_dimension(spec: Any) -> str:
    """``{choice: [1, 2, 4]}`` or ``{float: [0.001, 0.1], log: true}``, as a space file writes it."""
    if not isinstance(spec, dict):
        return json.dumps(spec)
    return "{" + ", ".join(f"{key}: {json.dumps(value)}" for key, value in spec.items()) + "}"


def _release_claim(experiment: Path) -> None:
    """Give the name back when a new search stops before Tune has saved anything (a tracking error)."""
    (experiment / CLAIM_FILE).unlink(missing_ok=True)


def saved_with_fixed_budget(experiment: Path) -> bool:
    """Whether a restorable Ray experiment was saved by a psmsearch from before ``--resume`` could raise
    its budget (commit 9e2c35e): its ``tuner.pkl`` then holds a plain ``OptunaSearch``, where every
    later one holds a reference to :func:`_search_for_active` (how :class:`BudgetedSearch` pickles).

    Tune restores such a search with its first command's ``--trials`` and ``--jobs``, and
    ``Tuner.restore`` takes no other search algorithm, so a larger ``--trials`` samples nothing.
    """
    pickled = experiment / TUNER_FILE
    return pickled.is_file() and _search_for_active.__name__.encode() not in pickled.read_bytes()


def _fixed_budget_error(experiment: Path, held: int, asked: int) -> ConfigError:
    """The error for a resume that asked an old-format experiment for more trials than it can sample."""
    return ConfigError(
        f"the Ray search {experiment.name!r} in {experiment.parent} was saved by a psmsearch from before "
        f"--resume could add trials (commit 9e2c35e): its saved searcher keeps its first command's --trials and "
        f"--jobs, so it holds {held} ended trials and samples no more (asked for {asked}); start a new search "
        "with --study NAME to run more trials (compare shows each search's trials)",
        field="--trials",
    )


def _tuner(space: SearchSpace, options: SearchOptions, context: TrialContext, experiment: Path, restore: bool) -> "Tuner":
    """A new Tuner, or the experiment's restored one: unfinished trials run again, errored ones do not
    (they count as failed), and its search generator takes this command's ``--trials`` and ``--jobs``."""
    from ray import tune

    trainable = tune.with_resources(
        tune.with_parameters(ray_trial, context=context),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    if restore:
        return tune.Tuner.restore(str(experiment), trainable, resume_unfinished=True, resume_errored=False)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_searcher(space, context.space, options), scheduler=_scheduler(space), num_samples=options.trials,
            reuse_actors=True, trial_name_creator=trial_name, trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=experiment.name, storage_path=str(experiment.parent), verbose=0, callbacks=[make_bridge(_ACTIVE[-1])],
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )


@contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune logs each failed trial's traceback; the progress line and MLflow's ``error.txt`` say it instead."""
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        tune_logger.setLevel(level)


def run_ray_search(space: SearchSpace, options: SearchOptions) -> SearchResult:
    """Run (or, with ``options.resume``, continue) the search for ``space`` on a Ray cluster."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space.check_sampler()  # before the experiment's folder, its claim and the MLflow run exist
    _prepare_environment(options)
    if options.address:
        _check_reachable(options.address)  # before anything is created for the search
    experiment = results_dir(options) / (options.study or space.name)
    with _driving(experiment):
        return _drive(space, options, experiment)


def _drive(space: SearchSpace, options: SearchOptions, experiment: Path) -> SearchResult:
    """The search itself, run while this process holds the experiment's driver lock."""
    name = experiment.name
    restore = _check_new_or_resumed(experiment, options, space)
    fixed_budget = restore and saved_with_fixed_budget(experiment)
    try:
        tracker, parent = open_tracking(space, options, "ray", storage=str(experiment), fresh=lambda: not restore)
    except BaseException:
        if not restore:
            _release_claim(experiment)
        raise
    context = TrialContext(
        PortableSpace(space), tracker.tracking_uri if tracker else None, tracker.experiment if tracker else None,
        parent, space.objectives[0].metric if len(space.objectives) == 1 else None, resumed=restore, search=name,
        plugin_labels=shipped_plugin_labels(env_plugin_specs()),
    )
    result = SearchResult(name, str(experiment), tracker.experiment if tracker else None, parent)
    with SearchProgress(space, options.trials, enabled=options.progress, name=name) as progress:
        book = _Book(space, options, tracker, parent, progress)
        _ACTIVE.append(book)
        connected = False
        status = "KILLED"
        try:
            if options.resume and (stale := book.close_stale()):
                progress.note(f"closed {stale} trial run(s) left RUNNING by a killed search (KILLED, interrupted)")
            connected = _connect(options, progress)
            with _quiet_tune():
                tuner = _tuner(space, options, context, experiment, restore)
                if restore:
                    from ray.tune import ExperimentAnalysis

                    book.restore_ended(ExperimentAnalysis(str(experiment)).trials)
                    progress.holding()
                    if (held := len(book.outcomes)) >= options.trials:
                        progress.note(f"the search already holds {held} ended trials (asked for {options.trials}); "
                                      "no new trial is sampled")
                tuner.fit()
            if fixed_budget and not book.unfinished() and len(book.outcomes) < options.trials:
                status = "FINISHED"  # the search ran all it could; the command asked for more than it can give
                raise _fixed_budget_error(experiment, len(book.outcomes), options.trials)
            if book.interrupted(options.trials):
                raise KeyboardInterrupt
            status = "FINISHED"
        finally:
            book.close_unfinished()
            _ACTIVE.remove(book)
            if tracker is not None and parent is not None:
                tracker.finish(parent, status)
            if connected:
                import ray

                ray.shutdown()
    result.outcomes = [book.outcomes[n] for n in sorted(book.outcomes)]
    return result
