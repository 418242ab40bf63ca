"""Live display of a running search: trials done, running, failed and the best so far.

On a terminal this is a rich progress bar with a status line. Elsewhere (a log file, a pipe, CI)
it is a log: one line when a trial starts and one when it ends, the latter with its outcome (its
objective values, the pruning reason or the error) and the search's counts and best so far.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from psmsearch.report import pareto_front
from psmsearch.space import SearchSpace


def pareto_text(count: int) -> str:
    """How a multi-objective search's standing reads: ``1 trial on the Pareto front``, ``3 trials ...``
    (it read ``best 1 on the Pareto front``)."""
    return f"{count} trial{'' if count == 1 else 's'} on the Pareto front"


class SearchProgress:
    """A rich progress bar over the trial budget with a status line; plain log lines when not a TTY.

    A failed trial's error is printed exactly once, as it happens, even with the display disabled:
    it is the log of what went wrong.

    Drivers either keep :attr:`counts` and :attr:`best` themselves and then call :meth:`finished`
    (Ray), or call :meth:`refresh` with the study after each trial (Optuna). In the second case the
    study counts a trial only after :meth:`finished`, so a trial's end line waits for the refresh
    that counts it; otherwise it would show the counts from before the trial.
    """

    def __init__(self, space: SearchSpace, total: int, enabled: bool = True, name: str | None = None) -> None:
        self.space = space
        self.name = name or space.name  # the search's name (--study), which its lines and bar show
        self.total = total
        self.console = Console(stderr=True)
        self.console.soft_wrap = not self.console.is_terminal  # a logged message stays one line, not cut at 80 columns
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.running: set[int] = set()
        self.best: str = "best -"  # or "best acc_4x=0.99 (trial 3)", or "2 trials on the Pareto front"
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
        )
        self._task: Any = None
        self._counted_by_study = False
        self._waiting: list[Any] = []  # ended trials whose log line waits for the study to count them

    def __enter__(self) -> "SearchProgress":
        if self.live:
            self._progress.start()
            self._task = self._progress.add_task(self.name, total=self.total, status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self._progress.stop()
        self._log_waiting(list(self._waiting))  # the search stopped before the study counted them

    def _status(self) -> str:
        c = self.counts
        return f"done {c['complete']}  pruned {c['pruned']}  failed {c['failed']}  running {len(self.running)}  {self.best}"

    def _update_bar(self) -> None:
        if self.live:
            self._progress.update(self._task, completed=sum(self.counts.values()), status=self._status())

    def _line(self, text: str) -> None:
        self.console.print(f"[{self.name}] {text}", highlight=False, markup=False)

    def _log_end(self, outcome: Any) -> None:
        """The one log line of an ended trial: what came out of it, then where the search stands."""
        if outcome.state == "complete":
            values = [(o.metric, outcome.metrics.get(o.metric)) for o in self.space.objectives]
            detail = ", ".join(f"{metric}={value:.4g}" for metric, value in values if value is not None)
        else:
            detail = outcome.error
        c = self.counts
        standing = (f"{sum(c.values())}/{self.total}  done {c['complete']}  pruned {c['pruned']}  failed {c['failed']}"
                    f"  running {len(self.running)}  {self.best}")
        self._line(f"trial {outcome.number} {outcome.state}{': ' + detail if detail else ''}  [{standing}]")

    def note(self, message: str) -> None:
        """A message for the user (above the bar on a terminal); nothing when the display is disabled."""
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)

    def holding(self) -> None:
        """The log line of a resumed search that keeps its own counts (Ray): what it already holds, as
        :meth:`refresh` says it for a study (``the study holds 2/8 trials: done 2 ...``)."""
        if self.enabled and not self.live and sum(self.counts.values()):
            self._line(f"the study holds {sum(self.counts.values())}/{self.total} trials: {self._status()}")

    def started(self, number: int) -> None:
        """Trial ``number`` started in this process."""
        self.running.add(number)
        if self.live:
            self._update_bar()
        elif self.enabled:
            self._line(f"trial {number} started")

    def finished(self, outcome: Any) -> None:
        """A trial of this process ended (complete, pruned or failed).

        A trial whose end line waits for the study to count it stays among the running until then:
        otherwise another trial's end line, printed first, showed it neither done nor running
        (``[1/6  done 1 ... running 0]`` with two trials started).
        """
        logged = not (self.live or not self.enabled)
        if logged and self._counted_by_study:
            self._waiting.append(outcome)
            return
        self.running.discard(outcome.number)
        if logged:
            self._log_end(outcome)
            return
        if outcome.state == "failed":
            self.console.print(f"trial {outcome.number} failed: {outcome.error}", highlight=False, markup=False)
        self._update_bar()

    def refresh(self, study: Any) -> None:
        """Recount from the study (covers trials of other processes and resumed ones)."""
        from optuna.trial import TrialState

        trials = study.get_trials(deepcopy=False)
        self.counts = {
            "complete": sum(t.state == TrialState.COMPLETE for t in trials),
            "pruned": sum(t.state == TrialState.PRUNED for t in trials),
            "failed": sum(t.state == TrialState.FAIL and t.user_attrs.get("state") == "failed" for t in trials),
        }
        complete = [t for t in trials if t.state == TrialState.COMPLETE]
        if complete and len(self.space.objectives) == 1:
            objective = self.space.objectives[0]
            pick = max if objective.direction == "maximize" else min
            best = pick(complete, key=lambda t: t.value)
            self.best = f"best {objective.metric}={best.value:.4g} (trial {best.number})"
        elif complete:  # from the same snapshot as the counts: the study may have more trials by now
            directions = [o.direction for o in self.space.objectives]
            self.best = pareto_text(sum(pareto_front([t.values for t in complete], directions)))
        if self.live:
            self._update_bar()
        elif self.enabled:
            if not self._counted_by_study and sum(self.counts.values()):
                self._line(f"the study holds {sum(self.counts.values())}/{self.total} trials: {self._status()}")
            ended = {t.number for t in trials if t.state.is_finished()}
            self._log_waiting([o for o in self._waiting if o.number in ended])
        self._counted_by_study = True

    def _log_waiting(self, outcomes: list[Any]) -> None:
        """End lines of these waiting trials; all of them leave the running first, as the counts
        printed with each line already include them all."""
        for outcome in outcomes:
            self._waiting.remove(outcome)
            self.running.discard(outcome.number)
        for outcome in outcomes:
            self._log_end(outcome)
