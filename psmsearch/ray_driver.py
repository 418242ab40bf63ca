"""The cluster search driver: Ray Tune runs :func:`psmsearch.search.execute_trial` on a Ray cluster.

This module builds the Tuner and drives the search; the parts it puts together each have their own
module:

* :mod:`psmsearch.ray_trial`: the trial function the workers run, and what crosses to them;
* :mod:`psmsearch.ray_bookkeeping`: the Tune callback that books outcomes and closes MLflow runs;
* :mod:`psmsearch.ray_cluster`: joining or starting the cluster, and the workers' runtime environment;
* :mod:`psmsearch.ray_searchers`: Optuna sampling and the ASHA scheduler;
* :mod:`psmsearch.ray_experiment`: the experiment's folder, its driver lock and the resume checks.

``--resume`` restores the Ray experiment (``Tuner.restore``): unfinished trials run again with the
same number and parameters, and the searcher samples new trials until the experiment holds
``--trials`` trials, at most ``--jobs`` at once (the resuming command's numbers, not the first
one's). Trials that ended stay as they are and count towards ``--trials``: completed, stopped by
ASHA and failed ones alike (a failed trial is not run again, as the Optuna driver counts a failed
trial and moves on). The summary lists every trial of the experiment, earlier sessions' too.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

import optuna

from psmsearch.optuna_driver import SearchResult
from psmsearch.progress import SearchProgress
from psmsearch.ray_bookkeeping import _ACTIVE, _Book, make_bridge
from psmsearch.ray_cluster import (_check_reachable, _connect, _prepare_environment, check_shipped_names,
                                   shipped_plugin_labels)
from psmsearch.ray_experiment import (_check_new_or_resumed, _driving, _fixed_budget_error, _release_claim, results_dir,
                                      saved_with_fixed_budget)
from psmsearch.ray_searchers import _scheduler, _searcher
from psmsearch.ray_trial import NUMBER_KEY, PortableSpace, TrialContext, ray_trial
from psmsearch.registry import env_plugin_specs
from psmsearch.search import SearchOptions, open_tracking
from psmsearch.space import SearchSpace

if TYPE_CHECKING:
    from ray.tune import Tuner
    from ray.tune.experiment import Trial


def trial_name(trial: "Trial") -> str:
    """``trial-N`` with psmsearch's trial number (the MLflow run is ``<space>-trial-N``)."""
    return f"trial-{trial.config.get(NUMBER_KEY, trial.trial_id)}"


def trial_dirname(trial: "Trial") -> str:
    """A short, filesystem-safe trial directory (Tune's default embeds parameter values)."""
    return f"trial_{trial.config.get(NUMBER_KEY, 0):05d}_{trial.trial_id}"


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
    # but not that a trial waits for resources the cluster lacks (a remote cluster may never grow)
    waiting_logger = logging.getLogger("ray.tune.execution.insufficient_resources_manager")
    levels = tune_logger.level, waiting_logger.level
    tune_logger.setLevel(logging.CRITICAL)
    waiting_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        tune_logger.setLevel(levels[0])
        waiting_logger.setLevel(levels[1])


def run_ray_search(space: SearchSpace, options: SearchOptions) -> SearchResult:
    """Run (or, with ``options.resume``, continue) the search for ``space`` on a Ray cluster."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space.check_sampler()  # before the experiment's folder, its claim and the MLflow run exist
    _prepare_environment(options)
    check_shipped_names(env_plugin_specs())
    if options.address:
        _check_reachable(options.address)  # before anything is created for the search
    options = capped_to_grid(space, options)
    experiment = results_dir(options) / (options.study or space.name)
    with _driving(experiment):
        return _drive(space, options, experiment)


def capped_to_grid(space: SearchSpace, options: SearchOptions) -> SearchOptions:
    """``options`` with at most one trial per point of a grid search's space (said on stderr where it
    cuts): Optuna's grid sampler stops its study when every point ran, while Tune would go on sampling,
    and the grid sampler then trains points again."""
    if space.header.driver.sampler != "grid":
        return options
    points = math.prod(len(values) for values in space.grid().values())
    if options.trials <= points:
        return options
    if options.progress:
        print(f"sampler grid: the space has {points} points, so {points} trials run, not {options.trials}",
              file=sys.stderr)
    return dataclasses.replace(options, trials=points)


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
    try:
        connected = _connect(options, SearchProgress(space, options.trials, enabled=options.progress, name=name))
    except BaseException:  # a search that could not start keeps no claim on its name and leaves no parent run
        if not restore:
            _release_claim(experiment)
            if tracker is not None and parent is not None:
                tracker.client.delete_run(parent)
        elif tracker is not None and parent is not None:
            tracker.finish(parent, "KILLED")
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
        status = "KILLED"
        by_user = False
        try:
            if options.resume and (stale := book.close_stale()):
                progress.note(f"closed {stale} trial run(s) left RUNNING by a killed search (KILLED, interrupted)")
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
                by_user = True  # Tune returns normally on Ctrl-C
                raise KeyboardInterrupt
            status = "FINISHED"
        except KeyboardInterrupt:
            by_user = True
            raise
        finally:
            book.close_unfinished(by_user)
            _ACTIVE.remove(book)
            if tracker is not None and parent is not None:
                tracker.finish(parent, status)
            if connected:
                import ray

                ray.shutdown()
    result.outcomes = [book.outcomes[n] for n in sorted(book.outcomes)]
    return result


_PICKLED_HERE: dict[str, str] = {
    "_bridge_to_active": "psmsearch.ray_bookkeeping",
    "_search_for_active": "psmsearch.ray_searchers",
    "StartupASHA": "psmsearch.ray_searchers",
    "BudgetedSearch": "psmsearch.ray_searchers",
    "StepOnceOptunaSearch": "psmsearch.ray_searchers",
}
"""Names that experiments saved before this module was split pickled as ``psmsearch.ray_driver.<name>``
(``tuner.pkl``, the searcher's and the scheduler's state), with the module that holds each now.
(:class:`~psmsearch.ray_trial.PortableSpace`, :func:`trial_name` and :func:`trial_dirname`, pickled
the same way, are plain names of this module.)"""


def __getattr__(name: str) -> Any:
    """The names of :data:`_PICKLED_HERE`, from their new modules, so that a Ray experiment saved before
    the split still resumes. The classes derived from Ray's are built on first use there
    (:mod:`psmsearch.ray_searchers`): importing this module must not import ``ray``."""
    if name not in _PICKLED_HERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_PICKLED_HERE[name]), name)
