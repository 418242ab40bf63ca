"""How a Ray search picks and stops trials: the Optuna search algorithm and the ASHA scheduler.

Optuna samples (``OptunaSearch`` over the same define-by-run :meth:`SearchSpace.sample` the embedded
driver uses) and, for one objective, ASHA stops unpromising trials early from the objective reported
at each evaluation. With several objectives there is no scheduler and Optuna gets metric lists.

The classes derived from Ray's (:class:`StartupASHA`, :class:`BudgetedSearch`,
:class:`StepOnceOptunaSearch`) are built on first access through this module's ``__getattr__``, so
that importing it does not import ``ray``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Callable

import optuna

from psmsearch.optuna_driver import make_sampler
from psmsearch.ray_bookkeeping import _ACTIVE
from psmsearch.ray_trial import PortableSpace
from psmsearch.search import SearchOptions
from psmsearch.space import SearchSpace

if TYPE_CHECKING:
    from ray.tune.experiment import Trial


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
        max_t=_max_reports(space), grace_period=min(_grace_reports(space), _max_reports(space)), reduction_factor=3,
        stop_last_trials=False,
    )


def _grace_reports(space: SearchSpace) -> int:
    """The first report ASHA may stop a trial at: the first evaluation at or after ``driver.pruner_warmup_steps``
    (evaluations every ``train.eval_every`` steps; where that is searched, its smallest value counts)."""
    warmup = space.header.driver.pruner_warmup_steps
    if warmup == 0:
        return 1
    every: Any = space.template.get("train", {}).get("eval_every", 200)
    searched = next((dim for dim in space.dimensions() if dim.path == "train.eval_every"), None)
    if searched is not None:  # reports come fastest at the shortest interval: no trial may be stopped earlier
        every = min(searched.choices) if searched.kind == "choice" else searched.low
    return max(1, math.ceil(warmup / max(1, int(every))))


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
