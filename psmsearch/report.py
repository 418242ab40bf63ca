"""Comparing trials: rows from MLflow runs, sorting by objectives and the Pareto front.

The plots ``compare`` writes from these rows are :mod:`psmsearch.report_plots`.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any, Sequence

from psmsearch.plot_labels import trial_params
from psmsearch.space import Objective

LENGTH_METRIC = re.compile(r"^acc_(\d+(?:\.\d+)?)x$")
MEMORY_METRIC = re.compile(r"^state_bytes_(\d+)(k?)$")
PEAK_MEMORY_METRIC = re.compile(r"^peak_state_bytes_(\d+)(k?)$")  # preferred: the worst case up to n


@dataclass
class TrialRow:
    """One trial as ``compare`` sees it."""

    name: str
    search: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]
    pareto: bool = False
    error: str = ""
    run_id: str = ""


def format_param(text: str) -> str:
    """A trial parameter as a table shows it: a float to 4 significant digits, as metrics are shown
    (``init_gate=0.1156``, not ``0.11557967901161792``); integers, names and the rest as given."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return text
    if re.fullmatch(r"[+-]?\d+", text.strip()) or not math.isfinite(value):
        return text
    if abs(value) >= 1e4:  # no exponent, as metrics; no thousands separator inside a comma-separated list
        return f"{float(f'{value:.4g}'):.0f}"
    return f"{value:.4g}"


def plot_params(rows: Sequence[TrialRow]) -> dict[str, str]:
    """Each trial's parameters that differ among ``rows``, the trials one plot shows, as its labels
    write them (:func:`psmsearch.plot_labels.trial_params`: ``attention c=16``). Of each trial, the
    parameters the table lists: its searched ones (``search.*``) where it has any, the others
    following from them (an mlp aggregator's ``mlp_ratio``) or being the same for all, else all of
    them. Values read as in the table (any value as its text)."""
    return trial_params({row.name: _table_params(row) for row in rows})


def _table_params(row: TrialRow) -> dict[str, str]:
    """The parameters of ``row`` the table shows, by name without ``search.``, formatted as there."""
    searched = {key.removeprefix("search."): value for key, value in row.params.items() if key.startswith("search.")}
    return {key: format_param(str(value)) for key, value in (searched or row.params).items()}


def pareto_front(values: Sequence[Sequence[float]], directions: Sequence[str]) -> list[bool]:
    """For each point, whether no other point is at least as good in every objective and better in one."""
    signs = [1.0 if d == "maximize" else -1.0 for d in directions]
    scored = [[s * v for s, v in zip(signs, point)] for point in values]
    front = []
    for i, a in enumerate(scored):
        dominated = any(
            all(bj >= aj for aj, bj in zip(a, b)) and any(bj > aj for aj, bj in zip(a, b))
            for j, b in enumerate(scored)
            if j != i
        )
        front.append(not dominated)
    return front


def rows_from_runs(runs: Sequence[Any]) -> list[TrialRow]:
    """MLflow trial runs -> rows, one per trial: the latest run of each run name.

    Ray restarts an interrupted trial under its number, so after ``--resume`` a trial has two runs of
    one name (``space-trial-4``): the interrupted one (KILLED) and the rerun. The rerun is the trial's
    result; listing both showed more rows than trials. A row's ``run_id`` says which run it is.
    """
    return [
        TrialRow(
            name=run.info.run_name or run.info.run_id,
            search=run.data.tags.get("psmsearch.search", ""),
            status=run.data.tags.get("psmsearch.status", run.info.status.lower()),
            params=dict(run.data.params),
            metrics=dict(run.data.metrics),
            error=run.data.tags.get("psmsearch.error", ""),
            run_id=run.info.run_id,
        )
        for run in latest_per_name(runs)
    ]


def latest_per_name(runs: Sequence[Any]) -> list[Any]:
    """The latest-started run of each run name (ties by run id), in the order the names first appear."""
    latest: dict[str, Any] = {}
    for run in runs:
        name = run.info.run_name or run.info.run_id
        held = latest.get(name)
        if held is None or (run.info.start_time or 0, run.info.run_id) > (held.info.start_time or 0, held.info.run_id):
            latest[name] = run
    return list(latest.values())


def objectives_from_parent(run: Any) -> list[Objective]:
    """The objectives a search logged on its parent run."""
    raw = run.data.params.get("objectives")
    return [Objective.model_validate(o) for o in json.loads(raw)] if raw else []


def rank(rows: list[TrialRow], objectives: Sequence[Objective]) -> list[TrialRow]:
    """Completed trials first, sorted by the objectives (in order); marks the Pareto front."""
    scored = [r for r in rows if r.status == "complete" and all(o.metric in r.metrics for o in objectives)]
    others = [r for r in rows if r not in scored]
    front = pareto_front([[r.metrics[o.metric] for o in objectives] for r in scored], [o.direction for o in objectives])
    for row, on_front in zip(scored, front):
        row.pareto = on_front

    def key(row: TrialRow) -> tuple:
        return tuple(-row.metrics[o.metric] if o.direction == "maximize" else row.metrics[o.metric] for o in objectives)

    # Ties go by trial number, so a search's summary and compare (which reads MLflow's order) agree.
    return sorted(scored, key=lambda r: (not r.pareto, key(r), trial_number(r.name))) + \
        sorted(others, key=lambda r: trial_number(r.name))


def trial_number(name: str) -> int:
    """The number at the end of a trial's name (``trial-3``, ``tiny-trial-3``); -1 if there is none."""
    match = re.search(r"(\d+)$", name)
    return int(match.group(1)) if match else -1


ENVIRONMENT_PARAMS = frozenset({"device", "threads", "train.checkpoint_every"})
"""Trial params that say where or how a trial ran, not what it trained: never reported as a difference
(nor are ``metrics.*``, which choose what is measured after training)."""


def searched_param(key: str) -> str:
    """The trial param a searched one (``search.`` removed) is recorded as: a component hyperparameter's
    search key names its component (``model.aggregator.mlp.mlp_ratio``) and a component choice of a
    space with several state kinds its kind (``model.aggregator-affine-diag``); the trial's own param
    is ``model.aggregator.mlp_ratio``, ``model.aggregator``."""
    parts = key.split(".")
    if len(parts) < 2 or parts[0] != "model" or parts[1].split("-", 1)[0] not in ("encoder", "aggregator", "head"):
        return key
    rest = parts[2:]
    return ".".join(["model", parts[1].split("-", 1)[0], *(rest[1:] if len(rest) >= 2 else rest)])


def fixed_differences(rows: Sequence[TrialRow]) -> dict[str, dict[str, str]]:
    """Settings that several searches ranked together each held fixed, at different values:
    ``{param: {search: value}}``.

    Ranking two searches side by side compares their trials as if only the searched parameters
    differed; one trained for 150 steps and the other for 500 is no such comparison. A param counts
    where it is searched by none of the searches (no ``search.`` copy in any row), takes one value in
    every trial of each search, and not the same value in all of them.
    """
    searched = {searched_param(key.removeprefix("search.")) for row in rows for key in row.params
                if key.startswith("search.")}
    values: dict[str, dict[str, set[str]]] = {}
    for row in rows:
        for key, value in row.params.items():
            if key.startswith(("search.", "metrics.")) or key in searched or key in ENVIRONMENT_PARAMS:
                continue
            values.setdefault(key, {}).setdefault(row.search, set()).add(value)
    searches = list(dict.fromkeys(row.search for row in rows))
    differences = {}
    for key, per_search in values.items():
        if len(per_search) < len(searches) or any(len(held) > 1 for held in per_search.values()):
            continue  # missing in a search, or not held fixed within one
        if len({next(iter(held)) for held in per_search.values()}) > 1:
            differences[key] = {search: next(iter(per_search[search])) for search in searches}
    return dict(sorted(differences.items()))
