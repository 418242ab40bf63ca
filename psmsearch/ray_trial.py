"""The worker's side of a Ray search: the Tune trial function and what it is shipped with.

What crosses to the workers, and why:

* the search space without its registry (:class:`PortableSpace`): plugin classes live in modules a
  worker can only import after loading the plugins, so the worker rebuilds the space against its own
  registry;
* the plugins: ``PSMSEARCH_PLUGINS`` in the job's ``runtime_env``, with plugin files and folders
  uploaded as ``py_modules`` and named by module, so remote nodes need no shared file system (see
  :func:`psmsearch.ray_cluster.worker_runtime_env`);
* the absolute MLflow tracking URI, experiment and parent run: each worker opens its own nested
  trial run, exactly as the embedded driver does.

Tune saves the experiment's state only every ~10 s, so after the search process was killed
(SIGKILL, a crash) the restored state may be older than MLflow: a trial that completed after Tune's
last snapshot is run again by Ray; the worker finds its FINISHED run (same trial number, same
parameters) and reports the recorded metrics instead of training again, so MLflow keeps one
FINISHED run per trial.

The ``psmsearch_*`` keys below are what a trial reports to Tune besides its objectives; the driver's
bookkeeping (:mod:`psmsearch.ray_bookkeeping`) reads them back. :func:`ray_trial`, :class:`TrialContext`
and :class:`PortableSpace` are pickled to the workers by reference: they must stay importable from this module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import optuna

from psmsearch.registry import get_registry
from psmsearch.search import execute_trial
from psmsearch.space import SearchSpace
from psmsearch.tracking import TRIAL_TAG, Tracker, param_text, retry_locked


NUMBER_KEY = "psmsearch_trial_number"
RUN_KEY = "psmsearch_run_id"
STATE_KEY = "psmsearch_state"
STEP_KEY = "psmsearch_step"
METRICS_KEY = "psmsearch_metrics"


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

    outcome = execute_trial(  # sampled inside: a trial whose configuration cannot be built still gets its run
        space, lambda: space.sample(optuna.trial.FixedTrial(params)), number, params, tracker, context.parent_run,
        "ray", report,
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
