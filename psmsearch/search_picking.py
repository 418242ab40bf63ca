"""Which searches ``psmsearch compare`` shows: found by name or by their parent run's ID.

A search is one parent run in MLflow (tag ``psmsearch.kind = search``) with its trials nested under
it. One name can cover several searches: a study of that name in another Optuna storage, an Optuna
and a Ray search of one name, a study made again after its storage was deleted. By name, ``compare``
takes the latest of them; the others are listed with their run IDs, and ``--search RUN_ID`` picks
any one of them (or the first 8 or more characters of the ID, where no search has that name). Where the searches picked share a name, each is labelled ``NAME@RUNID8`` so that
the table, the JSON and the plots tell them apart.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

from psmsearch.errors import ConfigError

RUN_ID_PATTERN = re.compile(r"[0-9a-f]{32}")
"""An MLflow run ID: 32 lower-case hexadecimal digits (a search name of that form is looked up as a run first)."""
RUN_PREFIX_PATTERN = re.compile(r"[0-9a-f]{8,31}")
"""The start of a run ID, as ``NAME@RUNID8`` labels show it: looked up where no search has that name."""

LISTED_OTHERS = 5
"""At most this many other searches of a name are listed under the table."""


@dataclass
class PickedSearch:
    """One search ``compare`` shows: its name, experiment, tracker and parent run, and the other
    searches of its name in that experiment (newest first)."""

    name: str
    experiment: str
    tracker: Any
    parent: Any
    others: list[Any] = field(default_factory=list)
    by_run_id: bool = False
    label: str = ""

    @property
    def count(self) -> int:
        """How many searches of this name the experiment holds."""
        return 1 + len(self.others)


def pick_search(uri: str, experiment: str | None, search: str | None) -> PickedSearch:
    """The search ``search`` names: a parent run ID, else the latest search of that name (any search
    when None) in ``experiment`` or, without one, in the experiment where it ran last, else (no search
    has that name) the search whose run ID starts with it (8 characters or more)."""
    from psmsearch.space_header import NAME_PATTERN
    from psmsearch.tracking import Tracker

    if search is not None and not re.fullmatch(NAME_PATTERN, search):  # it goes into MLflow filter strings
        raise ConfigError(f"{search!r} is no search name or run ID: names use letters, digits, '_', '.' and '-'",
                          field="--search")
    if search is not None and RUN_ID_PATTERN.fullmatch(search):
        found = _search_run(uri, search)
        if found is not None:
            return _picked_by_run_id(uri, experiment, *found)
    try:
        found_in = experiment or latest_experiment(uri, search)
        tracker = Tracker(uri, found_in, create=False)
        parents = _newest_first(tracker.runs(search, kind="search"))
        if not parents:
            what = f"search {search!r}" if search else "psmsearch search"
            raise ConfigError(f"no {what} found in experiment {found_in!r} at {uri}", field="--experiment")
    except ConfigError:
        by_prefix = _search_run_by_prefix(uri, search) if search and RUN_PREFIX_PATTERN.fullmatch(search) else None
        if by_prefix is None:
            raise
        return _picked_by_run_id(uri, experiment, *by_prefix)
    name = parents[0].data.tags.get("psmsearch.search", "?")
    others = parents[1:] if search else _newest_first(tracker.runs(name, kind="search"))[1:]
    return PickedSearch(name, found_in, tracker, parents[0], others)


def label_searches(picked: Sequence[PickedSearch]) -> None:
    """Give each search its label: its name, or ``NAME@RUNID8`` where the searches picked share names."""
    names = [p.name for p in picked]
    for p in picked:
        p.label = f"{p.name}@{p.parent.info.run_id[:8]}" if names.count(p.name) > 1 else p.name


def refuse_repeats(picked: Sequence[PickedSearch], given: Sequence[str | None]) -> None:
    """Refuse one search picked twice (by its name and by its run ID, or by two spellings)."""
    seen: dict[str, str | None] = {}
    for p, asked in zip(picked, given):
        run_id = p.parent.info.run_id
        if run_id in seen:
            raise ConfigError(f"--search {seen[run_id]!r} and --search {asked!r} are one search ({p.name}, run "
                              f"{run_id}); name each search once", field="--search")
        seen[run_id] = asked


def others_line(p: PickedSearch) -> str | None:
    """The line under the table naming the other searches of ``p``'s name, or None where there are none."""
    if not p.others:
        return None
    listed = "; ".join(_described(run) for run in p.others[:LISTED_OTHERS])
    more = f"; and {len(p.others) - LISTED_OTHERS} more" if len(p.others) > LISTED_OTHERS else ""
    shown = "this one" if p.by_run_id else "the latest"
    return (f"other searches named {p.name!r} in experiment {p.experiment!r} ({shown} is shown; "
            f"--search RUN_ID picks one): {listed}{more}")


def latest_experiment(uri: str, search_name: str | None = None) -> str:
    """The experiment of the latest search tracked at ``uri`` (of the search named ``search_name``)."""
    from mlflow.tracking import MlflowClient

    from psmsearch.tracking import KIND_TAG, SEARCH_TAG, quiet_schema_setup, retry_locked, sqlite_init_lock

    with sqlite_init_lock(uri), quiet_schema_setup():
        client = MlflowClient(tracking_uri=uri)
    experiments = retry_locked(lambda: client.search_experiments())
    ids = [e.experiment_id for e in experiments]
    query = f"tags.`{KIND_TAG}` = 'search'" + (f" and tags.`{SEARCH_TAG}` = '{search_name}'" if search_name else "")
    runs = retry_locked(lambda: client.search_runs(ids, filter_string=query, max_results=1, order_by=["attributes.start_time DESC"])) if ids else []
    if not runs:
        what = f"search {search_name!r}" if search_name else "psmsearch search"
        raise ConfigError(f"no {what} has been tracked at {uri}; run `psmsearch search SPACE.yaml` first",
                          field="--search" if search_name else "--experiment")
    return client.get_experiment(runs[0].info.experiment_id).name


def _search_run(uri: str, run_id: str) -> tuple[Any, str] | None:
    """The run ``run_id`` and its experiment's name if it is a search's parent run, None if the store
    has no such run.

    A run that exists but is no search's parent (a trial, another tool's run) is refused by name.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from psmsearch.tracking import KIND_TAG, quiet_schema_setup, retry_locked, sqlite_init_lock

    with sqlite_init_lock(uri), quiet_schema_setup():
        client = MlflowClient(tracking_uri=uri)
    try:
        run = retry_locked(lambda: client.get_run(run_id))
    except MlflowException:
        return None
    kind = run.data.tags.get(KIND_TAG)
    if run.info.lifecycle_stage == "deleted":
        raise ConfigError(f"run {run_id} is deleted (in MLflow's trash); restore it (mlflow runs restore --run-id "
                          f"{run_id}) to compare it", field="--search")
    if kind != "search":
        what = f"a psmsearch {kind} run" if kind else "not a psmsearch run"
        raise ConfigError(f"run {run_id} is {what}, not a search's parent run; pass a search name or the parent "
                          "run ID a search prints (parent_run in search --json)", field="--search")
    return run, retry_locked(lambda: client.get_experiment(run.info.experiment_id)).name


def _search_run_by_prefix(uri: str, prefix: str) -> tuple[Any, str] | None:
    """The search parent run whose ID starts with ``prefix`` and its experiment's name, None where
    none does; refused, listing them, where several do."""
    from mlflow.tracking import MlflowClient

    from psmsearch.tracking import KIND_TAG, quiet_schema_setup, retry_locked, sqlite_init_lock

    with sqlite_init_lock(uri), quiet_schema_setup():
        client = MlflowClient(tracking_uri=uri)
    ids = [e.experiment_id for e in retry_locked(lambda: client.search_experiments())]
    runs = retry_locked(lambda: client.search_runs(ids, filter_string=f"tags.`{KIND_TAG}` = 'search'",
                                                   max_results=50000)) if ids else []
    matches = [run for run in runs if run.info.run_id.startswith(prefix)]
    if len(matches) > 1:
        listed = "; ".join(_described(run) for run in _newest_first(matches)[:LISTED_OTHERS])
        raise ConfigError(f"{len(matches)} searches have run IDs starting {prefix!r}: {listed}; give more of "
                          "the ID", field="--search")
    if not matches:
        return None
    return matches[0], retry_locked(lambda: client.get_experiment(matches[0].info.experiment_id)).name


def _picked_by_run_id(uri: str, experiment: str | None, parent: Any, found_in: str) -> PickedSearch:
    """The search whose parent run is ``parent`` (in experiment ``found_in``), with the other searches
    of its name there."""
    from psmsearch.tracking import Tracker

    if experiment is not None and experiment != found_in:
        raise ConfigError(f"search run {parent.info.run_id} is in experiment {found_in!r}, not "
                          f"{experiment!r}; drop --experiment or name that one", field="--experiment")
    tracker = Tracker(uri, found_in, create=False)
    name = parent.data.tags.get("psmsearch.search", "?")
    others = [run for run in _newest_first(tracker.runs(name, kind="search"))
              if run.info.run_id != parent.info.run_id]
    return PickedSearch(name, found_in, tracker, parent, others, by_run_id=True)


def _newest_first(runs: Sequence[Any]) -> list[Any]:
    return sorted(runs, key=lambda run: run.info.start_time, reverse=True)


def _described(run: Any) -> str:
    """``RUNID (started 2026-11-30 05:12, storage sqlite:///...)`` for the list of other searches."""
    from psmsearch.tracking import STORAGE_TAG

    started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M:%S")
    storage = run.data.tags.get(STORAGE_TAG)
    return f"{run.info.run_id} (started {started}{f', storage {storage}' if storage else ''})"
