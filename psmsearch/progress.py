"""Live display of a running search: trials done, running, failed and the best so far."""

from __future__ import annotations

import sys
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from psmsearch.space import SearchSpace


class SearchProgress:
    """A rich progress bar over the trial budget with a status line; plain lines when not a TTY."""

    def __init__(self, space: SearchSpace, total: int, enabled: bool = True) -> None:
        self.space = space
        self.total = total
        self.console = Console(stderr=True)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.running: set[int] = set()
        self.best: str = "-"
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"), TimeElapsedColumn(), console=self.console,
        )
        self._task: Any = None

    def __enter__(self) -> "SearchProgress":
        if self.live:
            self._progress.start()
            self._task = self._progress.add_task(self.space.name, total=self.total, status="")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.live:
            self._progress.stop()

    def _status(self) -> str:
        c = self.counts
        return f"done {c['complete']}  pruned {c['pruned']}  failed {c['failed']}  running {len(self.running)}  best {self.best}"

    def _show(self) -> None:
        if not self.enabled:
            return
        done = sum(self.counts.values())
        if self.live:
            self._progress.update(self._task, completed=done, status=self._status())
        else:
            print(f"[{self.space.name}] {done}/{self.total}  {self._status()}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        if self.enabled:
            self.console.print(message, highlight=False, markup=False)

    def started(self, number: int) -> None:
        self.running.add(number)
        self._show()

    def finished(self, outcome: Any) -> None:
        self.running.discard(outcome.number)
        if outcome.state == "failed":  # reported even without the live display: it is the log of what went wrong
            self.console.print(f"trial {outcome.number} failed: {outcome.error}", highlight=False, markup=False)
        self._show()

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
            self.best = f"{objective.metric}={best.value:.4g} (trial {best.number})"
        elif complete:
            self.best = f"{len(study.best_trials)} on the Pareto front"
        self._show()
