"""The embedded search driver: Optuna on SQLite in the working directory, resumable, with pruning.

Trial bookkeeping that survives interruption:

* SIGINT: the running trial is marked ``interrupted`` (Optuna state FAIL, MLflow run KILLED) and
  the process exits; ``--resume`` enqueues the same parameters again as a new trial.
* SIGKILL: the trial stays RUNNING with a stale heartbeat; on ``--resume`` Optuna's heartbeat check
  fails it and :class:`optuna.storages.RetryHeartbeatStaleTrialCallback` enqueues it again; its MLflow run
  is closed as KILLED.
* A run created but not yet stored on its trial when the process stopped (inside
  :meth:`Tracker.trial_run`) is found by its trial number and closed as KILLED on ``--resume``.
* Interrupted and retried trials do not count towards ``--trials``; completed, pruned and failed
  ones do, so a resumed study ends with the number of trials asked for.
"""

from __future__ import annotations

import functools
import inspect
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from psmsearch.definition import DEFINITION_ATTR, changed_space_error, definition_changes, search_definition
from psmsearch import interrupts
from psmsearch.errors import ConfigError
from psmsearch.progress import SearchProgress
from psmsearch.search import SearchOptions, TrialOutcome, execute_trial, objective_values, open_tracking
from psmsearch.space import SearchSpace
from psmsearch.tracking import (KIND_TAG, TRIAL_TAG, Tracker, retry_locked, sqlite_folder_problem, sqlite_in_memory,
                                sqlite_init_lock, without_password)

INTERRUPTED = "interrupted"


class TrialFailed(Exception):
    """A trial failed; Optuna records it as FAIL and the search goes on."""


@dataclass
class SearchResult:
    """What a finished (or stopped) search leaves behind."""

    study_name: str
    storage: str
    experiment: str | None
    parent_run: str | None
    outcomes: list[TrialOutcome] = field(default_factory=list)


def default_storage() -> str:
    """SQLite file ``psmsearch.db`` in the working directory."""
    return f"sqlite:///{Path.cwd() / 'psmsearch.db'}"


STORAGE_EXAMPLE = "an Optuna storage URL such as sqlite:///psmsearch.db (or postgresql://..., mysql://...)"


def check_storage_url(url: str, where: str) -> None:
    """Raise a ConfigError naming ``where`` (``--storage``, the file's ``driver.storage``) unless ``url``
    is a database URL Optuna can open.

    Checked before anything is opened, since SQLAlchemy's errors name neither the option nor what it
    expects ("Could not parse SQLAlchemy URL"), and a SQLite file in a missing folder failed on the
    schema lock file beside it (``x.db.init-lock``), which the user never named.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    shown = without_password(url)
    try:
        parsed = make_url(url)
    except ArgumentError:
        folder = " (a folder is what --driver ray takes as --storage)" if Path(url).expanduser().is_dir() else ""
        raise ConfigError(f"{shown!r} is not a database URL{folder}; expected {STORAGE_EXAMPLE}", field=where) from None
    try:
        parsed.get_dialect()
    except NoSuchModuleError:
        raise ConfigError(f"{shown!r}: unknown database scheme {parsed.drivername!r}; expected {STORAGE_EXAMPLE}",
                          field=where) from None
    if parsed.get_backend_name() != "sqlite":
        return
    if sqlite_in_memory(url):
        raise ConfigError(f"{shown!r} is an in-memory database, lost when the command ends (--resume could never "
                          "find the study); use a file such as sqlite:///psmsearch.db", field=where)
    problem = sqlite_folder_problem(url)
    if problem is not None:
        raise ConfigError(f"{shown!r}: {problem}", field=where)


class QueueSafeRDBStorage(RDBStorage):
    """An :class:`~optuna.storages.RDBStorage` whose trial state changes are serialised in this process.

    Optuna takes a queued (``WAITING``) trial by reading its state and setting it ``RUNNING`` in one
    transaction, relying on ``SELECT ... FOR UPDATE``, which SQLite ignores: two threads of
    ``study.optimize(n_jobs=N)`` could both read ``WAITING`` and both run the trial. A resumed
    search re-queues its interrupted trials (and the heartbeat check its killed ones), so under
    ``--jobs 2`` a trial ran twice, and the second ``tell`` raised "Cannot tell a COMPLETE trial"
    (optuna#4002). With the lock the second thread reads ``RUNNING`` and takes the next trial.
    Processes sharing one SQLite file are not covered: use a server database for those.
    """

    _state_lock = threading.Lock()

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: Sequence[float] | None = None) -> bool:
        with self._state_lock:
            return super().set_trial_state_values(trial_id, state, values)


def _uninterrupted(method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with a Ctrl-C held back until it returns (:func:`psmsearch.interrupts.deferred`)."""
    @functools.wraps(method)
    def call(self: RDBStorage, *args: Any, **kwargs: Any) -> Any:
        with interrupts.deferred():
            return method(self, *args, **kwargs)
    return call


# Every storage call runs whole: a KeyboardInterrupt raised inside SQLAlchemy could leave a transaction
# open, holding SQLite's lock while the interrupted trial's clean-up and the heartbeat thread waited on it
# (a Ctrl-C then hung the search, about once in 10-20 runs of the SIGINT resume test).
for _name in sorted({name for cls in (RDBStorage, QueueSafeRDBStorage) for name, member in vars(cls).items()
                     if not name.startswith("_") and inspect.isfunction(member)}):
    setattr(QueueSafeRDBStorage, _name, _uninterrupted(getattr(QueueSafeRDBStorage, _name)))


def make_storage(url: str, options: SearchOptions) -> RDBStorage:
    """An RDB storage with heartbeats (to detect killed trials) and a generous SQLite lock timeout."""
    engine_kwargs = {"connect_args": {"timeout": 120}} if url.startswith("sqlite") else {}
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        with sqlite_init_lock(url):
            return retry_locked(
                lambda: QueueSafeRDBStorage(
                    url,
                    engine_kwargs=engine_kwargs,
                    heartbeat_interval=options.heartbeat_interval,
                    grace_period=options.grace_period,
                    heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
                )
            )
    except Exception as err:  # noqa: BLE001 - a bad URL or unreachable database
        shown = without_password(url)
        message = str(err).replace(url, shown)
        raise ConfigError(f"cannot open the Optuna storage {shown!r}: {message}", field="--storage") from None


def make_sampler(space: SearchSpace, trials_before: int = 0) -> optuna.samplers.BaseSampler:
    """The space's sampler, seeded with ``driver.seed`` plus the trials the study already holds.

    A resumed search must not draw the sequence it drew before: with the plain seed a random
    sampler (and TPE's random startup trials) would repeat the configurations already run. A new
    study (``trials_before=0``) samples exactly what the seed says.
    """
    settings = space.header.driver
    seed = settings.seed + trials_before
    if settings.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if settings.sampler == "grid":  # never reseeded: see ResumableGridSampler
        return ResumableGridSampler(space.grid(), seed=settings.seed)
    if settings.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    # TPE handles one objective and, as MOTPE, several.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=settings.startup_trials)


class ResumableGridSampler(optuna.samplers.GridSampler):
    """Optuna's grid sampler, for a study that is resumed.

    Two things broke an interrupted grid search run again with ``--resume`` (``make demo``'s own
    command): the grid's order is shuffled by the seed and each trial records its point as an index
    in that order, so the resumed sampler, reseeded as the others are (:func:`make_sampler`), read
    the recorded indices as other points, ran some points twice and others never; and the
    interrupted trial, enqueued again with its parameters, has no index of its own, which Optuna's
    ``after_trial`` read when one point was left (``KeyError: 'grid_id'``, seen with ``--jobs 2``).
    This sampler is always made with the space's seed, and a trial without an index stops the study
    only when no point is left unvisited, as Optuna does for the others.
    """

    def after_trial(self, study: optuna.Study, trial: optuna.trial.FrozenTrial, state: TrialState,
                    values: Sequence[float] | None) -> None:
        if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
            super().after_trial(study, trial, state, values)
        elif not self._get_unvisited_grid_ids(study):
            study.stop()


def make_pruner(space: SearchSpace) -> optuna.pruners.BasePruner:
    settings = space.header.driver
    if settings.pruner == "none" or len(space.objectives) > 1:
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(n_startup_trials=settings.startup_trials,
                                       n_warmup_steps=settings.pruner_warmup_steps)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """Trials that count towards the budget: finished, not interrupted, not retried by heartbeat."""
    if trial.state in (TrialState.COMPLETE, TrialState.PRUNED):
        return True
    if trial.state != TrialState.FAIL:
        return False
    return trial.user_attrs.get("state") == "failed"


def _requeue_interrupted(study: optuna.Study, tracker: Tracker | None) -> int:
    """Enqueue interrupted or stale trials again (once each) and close their MLflow runs as KILLED."""
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials} | {
        RetryHeartbeatStaleTrialCallback.retried_trial_number(t) for t in trials
    }
    requeued = 0
    for trial in trials:
        if trial.state != TrialState.FAIL or counted(trial):
            continue
        run_id = trial.user_attrs.get("mlflow_run_id")
        if tracker is not None and run_id:
            run = tracker.client.get_run(run_id)
            if run.info.status == "RUNNING":
                tracker.set_tags(run_id, {"psmsearch.status": INTERRUPTED})
                tracker.finish(run_id, "KILLED")
        if trial.number in retried or trial.user_attrs.get("state") not in (None, INTERRUPTED):
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        requeued += 1
    return requeued


def close_orphan_runs(study: optuna.Study, tracker: Tracker | None, parent: str | None) -> int:
    """Close the search's trial runs still RUNNING whose Optuna trial is not, as KILLED (``interrupted``).

    A Ctrl-C or SIGKILL inside :meth:`Tracker.trial_run`, after MLflow created the run but before its id
    was stored on the trial (``mlflow_run_id``), leaves a run that :func:`_requeue_interrupted` cannot
    find, RUNNING for ever. Runs of RUNNING trials are left alone: another process sharing the study may
    be running them. The runs are read before the trials: a live process closes a trial's run before
    it tells the trial, so a run still RUNNING when read again after its trial ended is an orphan.
    Returns how many runs were closed.
    """
    if tracker is None or parent is None:
        return 0
    query = f"tags.`mlflow.parentRunId` = '{parent}' and tags.`{KIND_TAG}` = 'trial' and attributes.status = 'RUNNING'"
    runs = retry_locked(lambda: tracker.client.search_runs([tracker.experiment_id], filter_string=query))
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    closed = 0
    for run in runs:
        number = run.data.tags.get(TRIAL_TAG, "")
        if not number.isdigit() or int(number) in running:
            continue
        if retry_locked(lambda run_id=run.info.run_id: tracker.client.get_run(run_id)).info.status != "RUNNING":
            continue
        tracker.set_tags(run.info.run_id, {"psmsearch.status": INTERRUPTED,
                                           "psmsearch.error": "the search stopped while the trial's run was being created"})
        tracker.finish(run.info.run_id, "KILLED")
        closed += 1
    return closed


def _wait_for_stale(study: optuna.Study, storage: RDBStorage, options: SearchOptions, progress: SearchProgress) -> None:
    """Give trials left RUNNING by a killed process time to be detected as stale (heartbeat expired)."""
    deadline = time.monotonic() + options.grace_period + options.heartbeat_interval
    while True:
        optuna.storages.fail_stale_trials(study)
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if not running or time.monotonic() > deadline:
            return
        progress.note(f"waiting for {len(running)} running trial(s) to be confirmed alive or stale ...")
        time.sleep(1.0)


def _study_exists(study_name: str, storage_url: str) -> ConfigError:
    return ConfigError(
        f"study {study_name!r} already exists in {storage_url}; pass --resume to continue (or join) it, "
        "or choose another name with --study NAME (or driver.study in the space) or another --storage",
    )


def _create_study_first(space: SearchSpace, options: SearchOptions, storage: BaseStorage, storage_url: str,
                        study_name: str) -> bool:
    """Create the new study atomically (the storage's unique name); whether this process created it.

    Two searches started at the same moment without ``--resume`` both saw no study; the second one's
    create now fails and it stops with the "already exists" error instead of joining the first.
    With ``--resume`` the loser joins the study, as ``--resume`` on an existing study does.
    """
    try:
        optuna.create_study(study_name=study_name, storage=storage,
                            directions=[o.direction for o in space.objectives], load_if_exists=False)
    except optuna.exceptions.DuplicatedStudyError:
        if not options.resume:
            raise _study_exists(study_name, storage_url) from None
        return False
    return True


def run_optuna_search(space: SearchSpace, options: SearchOptions) -> SearchResult:
    """Run (or resume, or join) the study for ``space`` until it holds ``options.trials`` counted trials."""
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # psmsearch reports trial failures itself, without tracebacks
    space.check_sampler()  # before the storage, the study and the MLflow run exist
    storage_url = options.storage or default_storage()
    check_storage_url(storage_url, options.storage_field)
    storage = make_storage(storage_url, options)
    study_name = options.study or space.name
    exists = study_name in optuna.get_all_study_names(storage)
    if exists and not options.resume:
        raise _study_exists(study_name, storage_url)
    trials_before = 0
    if exists:  # a mismatch is reported before the search's MLflow run is opened
        existing = optuna.load_study(study_name=study_name, storage=storage)
        _check_directions(existing, space, study_name)
        _check_definition(existing, space, storage_url)
        trials_before = len(existing.get_trials(deepcopy=False))
    created = not exists and _create_study_first(space, options, storage, storage_url, study_name)
    if not exists:  # created here, or joined (--resume) after another process created it a moment ago
        _check_definition(optuna.load_study(study_name=study_name, storage=storage), space, storage_url)
    try:
        tracker, parent = open_tracking(space, options, "optuna", storage=storage_url,
                                        fresh=lambda: _trial_count(storage, study_name) == 0)
    except BaseException:
        if created:  # a tracking error leaves no empty study behind that would then need --resume
            optuna.delete_study(study_name=study_name, storage=storage)
        raise
    directions = [o.direction for o in space.objectives]
    study = optuna.create_study(
        study_name=study_name, storage=storage, directions=directions,
        sampler=make_sampler(space, trials_before), pruner=make_pruner(space), load_if_exists=True,
    )
    _check_directions(study, space, study_name)
    _record_objectives(study, space)
    study.set_user_attr("mlflow_parent_run", parent or "")
    result = SearchResult(study_name, storage_url, tracker.experiment if tracker else None, parent)
    with SearchProgress(space, options.trials, enabled=options.progress, name=study_name) as progress:
        if options.resume and not exists:
            progress.console.print(f"--resume: no study {study_name!r} in {storage_url} yet; starting it",
                                   highlight=False, markup=False)
        if options.resume and exists:
            _wait_for_stale(study, storage, options, progress)
            _requeue_interrupted(study, tracker)
            if orphans := close_orphan_runs(study, tracker, parent):
                progress.note(f"closed {orphans} trial run(s) left RUNNING by an interrupted search (KILLED, interrupted)")
        progress.refresh(study)
        try:
            _optimize(space, options, study, tracker, parent, progress, result)
        except KeyboardInterrupt:
            if tracker is not None and parent is not None:
                tracker.finish(parent, "KILLED")
            raise
    if tracker is not None and parent is not None:
        tracker.finish(parent, "FINISHED")
    result.outcomes = study_outcomes(study)
    return result


def study_outcomes(study: optuna.Study) -> list[TrialOutcome]:
    """Every counted trial of the study (this process's and earlier or concurrent ones), by number."""
    states = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned", TrialState.FAIL: "failed"}
    return [
        TrialOutcome(
            t.number, states[t.state], dict(t.user_attrs.get("metrics", {})), dict(t.params),
            error=t.user_attrs.get("error", t.user_attrs.get("reason", "")), run_id=t.user_attrs.get("mlflow_run_id"),
        )
        for t in study.get_trials(deepcopy=False)
        if counted(t)
    ]


def _trial_count(storage: RDBStorage, study_name: str) -> int:
    """Trials of the study now (0 when it does not exist yet)."""
    if study_name not in optuna.get_all_study_names(storage):
        return 0
    return len(optuna.load_study(study_name=study_name, storage=storage).get_trials(deepcopy=False))


OBJECTIVES_ATTR = "psmsearch_objectives"  # the metrics a study's values are, in order


def _wait_until_told(study: optuna.Study, trial_ids: set[int], timeout: float = 60.0) -> None:
    """Wait for this process's running trials to be told to the study after a Ctrl-C.

    With ``--jobs N`` the interrupt reaches the main thread while it waits for the worker threads;
    it stops waiting there, and the process would exit before a worker recorded its interrupted
    trial as failed, leaving it RUNNING until its heartbeat went stale. The workers stop within a
    training step (:mod:`psmsearch.interrupts`), so this wait is short.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(study._storage.get_trial(trial_id).state != TrialState.RUNNING for trial_id in trial_ids):
            return
        time.sleep(0.1)


def _check_directions(study: optuna.Study, space: SearchSpace, name: str) -> None:
    """The space's objectives must be the study's: its directions, and the metrics its values hold
    (recorded on the study; a study from before the record is compared by directions only)."""
    expected = [optuna.study.StudyDirection.MAXIMIZE if o.direction == "maximize" else optuna.study.StudyDirection.MINIMIZE for o in space.objectives]
    if list(study.directions) != expected:
        raise ConfigError(
            f"study {name!r} was created with directions {[d.name.lower() for d in study.directions]}, "
            f"but the space's objectives ask for {[o.direction for o in space.objectives]}; use another study name",
            field="objectives",
        )
    recorded = study.user_attrs.get(OBJECTIVES_ATTR)
    metrics = [o.metric for o in space.objectives]
    if recorded is not None and recorded != metrics:
        raise ConfigError(
            f"study {name!r} holds values of the objectives {recorded}, but the space asks for {metrics}; "
            "a study's values of one metric cannot be ranked against another's: use another study name",
            field="objectives",
        )


def _check_definition(study: optuna.Study, space: SearchSpace, storage_url: str) -> None:
    """Record what defines the search on a study that has no record yet; refuse a space that differs
    from the recorded one (see :mod:`psmsearch.definition`).

    Without it a ``--resume`` with, say, another ``train.steps`` silently trained the study's later
    trials otherwise than its first ones, and ranked them together. A study created before the record
    was kept adopts the resuming space's definition.
    """
    recorded = study.user_attrs.get(DEFINITION_ATTR)
    if recorded is None:
        study.set_user_attr(DEFINITION_ATTR, search_definition(space))
        return
    changes = definition_changes(recorded, space)
    if changes:
        raise changed_space_error(f"study {study.study_name!r} in {without_password(storage_url)}", changes, space)


def _record_objectives(study: optuna.Study, space: SearchSpace) -> None:
    if OBJECTIVES_ATTR not in study.user_attrs:
        study.set_user_attr(OBJECTIVES_ATTR, [o.metric for o in space.objectives])


def _optimize(
    space: SearchSpace,
    options: SearchOptions,
    study: optuna.Study,
    tracker: Tracker | None,
    parent: str | None,
    progress: SearchProgress,
    result: SearchResult,
) -> None:
    single = len(space.objectives) == 1
    metric = space.objectives[0].metric

    started: set[int] = set()

    def objective(trial: optuna.Trial) -> Any:
        started.add(trial._trial_id)
        progress.started(trial.number)
        sampled = space.sample(trial)

        def report(step: int, metrics: dict[str, float]) -> None:
            from psmsearch.trainer import TrialPruned

            if single and metric in metrics:
                trial.report(float(metrics[metric]), step)
                if trial.should_prune():
                    raise TrialPruned(f"pruned at step {step} with {metric}={metrics[metric]:.4g} (median rule)")

        try:
            outcome = execute_trial(
                space, sampled, trial.number, trial.params, tracker, parent, "optuna", report,
                on_run=lambda run_id: trial.set_user_attr("mlflow_run_id", run_id), search=study.study_name,
            )
        except KeyboardInterrupt:
            trial.set_user_attr("state", INTERRUPTED)
            raise
        trial.set_user_attr("state", outcome.state)
        trial.set_user_attr("metrics", {k: float(v) for k, v in outcome.metrics.items()})
        result.outcomes.append(outcome)
        progress.finished(outcome)
        if outcome.state == "pruned":
            trial.set_user_attr("reason", outcome.error)
            raise optuna.TrialPruned(outcome.error)
        if outcome.state == "failed":
            trial.set_user_attr("error", outcome.error)
            raise TrialFailed(outcome.error)
        values = objective_values(space, outcome.metrics)
        return values[0] if single else values

    def stop_when_done(study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        progress.refresh(study)
        if sum(counted(t) for t in study.get_trials(deepcopy=False)) >= options.trials:
            study.stop()

    done = sum(counted(t) for t in study.get_trials(deepcopy=False))
    if done >= options.trials:
        progress.note(f"study already holds {done} trials (asked for {options.trials}); nothing to run")
        return
    # At most the remaining count from this process, so --jobs N cannot overshoot by running N at
    # the end; the callback stops it earlier where another process joined the study.
    try:
        study.optimize(
            objective, n_trials=options.trials - done, n_jobs=options.jobs, catch=(TrialFailed,),
            callbacks=[stop_when_done], gc_after_trial=False, show_progress_bar=False,
        )
    except KeyboardInterrupt:
        _wait_until_told(study, started)
        raise
