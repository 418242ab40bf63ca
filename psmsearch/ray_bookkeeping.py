"""The driver's record of a Ray search: a Tune callback that books each trial's outcome into MLflow.

A Tune callback on the driver keeps the console progress, collects the outcomes and closes the
MLflow runs of trials that Ray ended without the trial function finishing (ASHA stops, crashed
workers, an interrupted search), so no trial run is left RUNNING.

Tune saves the experiment's state only every ~10 s, so after the search process was killed
(SIGKILL, a crash) the restored state may be older than MLflow: a trial run left RUNNING by the
killed process is closed as KILLED (``interrupted``) before any trial starts
(:meth:`_Book.close_stale`).

:data:`_ACTIVE` holds the searches running in this process: what Tune unpickles on restore (the
callback bridge here, the search generator of :mod:`psmsearch.ray_searchers`) refers to the newest.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from psmsearch.progress import SearchProgress, pareto_text
from psmsearch.ray_trial import METRICS_KEY, NUMBER_KEY, RUN_KEY, STATE_KEY, STEP_KEY, TrialFailed, _flat
from psmsearch.report import TrialRow, rank
from psmsearch.search import SearchOptions, TrialOutcome
from psmsearch.space import SearchSpace
from psmsearch.tracking import KIND_TAG, Tracker, retry_locked

if TYPE_CHECKING:
    from ray.tune import Callback
    from ray.tune.experiment import Trial


def _reported_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The metrics a flattened Tune result carries under ``METRICS_KEY``: every metric of the final
    report, or of the last evaluation before ASHA stopped the trial."""
    prefix = f"{METRICS_KEY}/"
    return {k[len(prefix):]: float(v) for k, v in result.items() if k.startswith(prefix)}


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

    def close_unfinished(self, by_user: bool) -> None:
        """Runs of trials that started but never ended here (an interrupted search) become KILLED, saying
        the step their shown values are from where the user stopped the search (``by_user``), else only
        that the search stopped (an error ended it)."""
        for trial_id, number in self.started.items():
            if number in self.outcomes:
                continue
            last = _flat(self.last.get(trial_id) or {})
            run_id = str(last.get(RUN_KEY) or "") or None
            step = last.get(STEP_KEY)  # its last evaluation's, whose values the run shows (as the Optuna driver says)
            if not by_user:
                reason = "search stopped" + (f" after step {step}; the values shown are that evaluation's"
                                             if step is not None else "")
            elif step is not None:
                reason = f"interrupted by the user after step {step}; the values shown are that evaluation's"
            else:
                reason = "interrupted by the user before its first evaluation"
            self._close_runs(number, run_id, "KILLED", {"psmsearch.status": "interrupted", "psmsearch.error": reason})

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
