"""``psmsearch search`` and ``psmsearch compare``."""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import click
from rich.table import Table

from psmsearch import jsonout
from psmsearch.errors import ConfigError
from psmsearch.report import TrialRow, fixed_differences, format_param, objectives_from_parent, rank, rows_from_runs
from psmsearch.report_plots import write_plots
from psmsearch.search import SearchOptions, repeated_trials_note
from psmsearch.search_picking import PickedSearch, label_searches, others_line, pick_search, refuse_repeats
from psmsearch.space import Objective


@click.command("search")
@click.argument("space_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--driver", type=click.Choice(["optuna", "ray"]), default=None, help="Default: the space's driver.name (optuna).")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Trials the study should hold when done.")
@click.option("--jobs", type=click.IntRange(min=1), default=None, help="Trials run at once.")
@click.option("--storage", default=None, help="optuna: storage URL (default sqlite:///psmsearch.db in the working directory); ray: results folder (default ./psmsearch_ray_results).")
@click.option("--study", default=None, callback=lambda ctx, param, value: _check_study_name(value),
              help="Study name (default: the space's name; letters, digits, '_', '.', '-').")
@click.option("--address", default=None, help="Ray cluster address (ray driver; default: start a local cluster).")
@click.option("--gpus-per-trial", type=click.FloatRange(min=0), default=None)
@click.option("--cpus-per-trial", type=click.FloatRange(min=0, min_open=True), default=None)
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db).")
@click.option("--experiment", default=None, help="MLflow experiment (default: the space's name).")
@click.option("--resume", is_flag=True, help="Continue (or join) an existing study without repeating completed trials.")
@click.option("--no-progress", is_flag=True, help="No live display and no per-trial start/end lines; failed trials' errors are still printed.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as one JSON object instead of the table (stdout holds only that object).")
def search(space_file: Path, driver: str | None, trials: int | None, jobs: int | None, storage: str | None, study: str | None,
           address: str | None, gpus_per_trial: float | None, cpus_per_trial: float | None, tracking_uri: str | None,
           experiment: str | None, resume: bool, no_progress: bool, as_json: bool) -> None:
    """Run a search over the space in SPACE_FILE and print the trials, best first.

    Exits 1 when the search holds trials and none of them completed (after printing them), 2 on bad
    input, 130 when interrupted; otherwise 0.
    """
    from psmsearch.registry import require_loaded_plugins
    from psmsearch.space import load_space

    require_loaded_plugins("the search", warn=lambda message: click.echo(f"warning: {message}", err=True))
    space = load_space(space_file)
    for warning in space.warnings:
        click.echo(f"warning: {warning}", err=True)
    settings = space.header.driver
    options = SearchOptions(
        trials=trials or settings.trials, jobs=jobs or settings.jobs, storage=storage or settings.storage,
        storage_field="--storage" if storage or not settings.storage else f"{space.source.where('driver.storage')}: driver.storage",
        study=study or settings.study, resume=resume, tracking_uri=tracking_uri, experiment=experiment,
        address=address or settings.address,
        gpus_per_trial=settings.gpus_per_trial if gpus_per_trial is None else gpus_per_trial,
        cpus_per_trial=cpus_per_trial or settings.cpus_per_trial, progress=not no_progress,
        heartbeat_interval=settings.heartbeat_interval, grace_period=settings.grace_period,
    )
    driver = driver or settings.name
    try:
        if driver == "ray":
            from psmsearch.ray_driver import run_ray_search

            result = run_ray_search(space, options)
        else:
            from psmsearch.optuna_driver import run_optuna_search

            result = run_optuna_search(space, options)
    except KeyboardInterrupt:
        click.echo("interrupted: completed trials are kept; run the same command with --resume to continue", err=True)
        sys.exit(130)
    rows = [
        TrialRow(f"{result.study_name}-trial-{o.number}", space.name, o.state, {k: str(v) for k, v in o.params.items()}, o.metrics, error=o.error,
                 run_id=o.run_id or "")
        for o in result.outcomes
    ]
    ranked = rank(rows, space.objectives)
    summary = {
        "study": result.study_name, "storage": result.storage, "experiment": result.experiment,
        "parent_run": result.parent_run, "objectives": [o.model_dump() for o in space.objectives],
        "trials": [_row_json(r, space.objectives) for r in ranked],
    }
    if as_json:
        click.echo(jsonout.dumps(summary))
    else:
        print_rows(ranked, space.objectives, title=f"search {result.study_name}: {len(ranked)} trials, best first")
        for row in ranked:
            if row.error and row.status != "failed":  # a failure's error went to stderr once, as it happened
                click.echo(f"{row.name} {row.status}: {row.error}")
    repeats = repeated_trials_note(result.outcomes, space)
    if repeats:
        click.echo(f"note: {repeats}", err=True)
    if result.outcomes and not any(o.state == "complete" for o in result.outcomes):
        click.echo(f"error: {none_completed(result, tracking_uri)}", err=True)
        sys.exit(1)


def none_completed(result: Any, tracking_uri: str | None) -> str:
    """Why ``search`` exits 1: the search holds trials and none of them completed, so it has no result.

    Everything is recorded as usual (the summary was printed, Optuna and MLflow hold every trial);
    the exit status lets a script tell such a search (a plugin aggregator that fails every trial)
    from one that found something. Says how many failed and were pruned, and where to read why.
    """
    counts = {state: sum(o.state == state for o in result.outcomes) for state in ("failed", "pruned")}
    parts = ", ".join(f"{count} {state}" for state, count in counts.items() if count)
    where = "this command's failures are above ('trial N failed: ...')"
    if result.parent_run:
        uri = f" --tracking-uri {tracking_uri}" if tracking_uri else ""
        where += (f", and `psmsearch compare --search {result.study_name}{uri}` lists every trial with its error "
                  "(as its MLflow run holds it: tag psmsearch.error, artifact error.txt)")
    return f"no trial of search {result.study_name!r} completed ({parts}, of {len(result.outcomes)}): {where}"


def _check_study_name(value: str | None) -> str | None:
    import re

    from psmsearch.space import NAME_PATTERN

    if value is not None and not re.fullmatch(NAME_PATTERN, value):
        raise click.BadParameter(f"{value!r}: use letters, digits, '_', '.' and '-' only (it names MLflow runs "
                                 "and folders)")
    return value


def _row_json(row: TrialRow, objectives: Sequence[Objective]) -> dict[str, Any]:
    return {
        "name": row.name, "run_id": row.run_id, "status": row.status, "pareto": row.pareto, "params": row.params,
        "objectives": {o.metric: row.metrics.get(o.metric) for o in objectives}, "metrics": row.metrics,
        **({"error": row.error} if row.error else {}),
    }


def print_rows(rows: Sequence[TrialRow], objectives: Sequence[Objective], title: str, show_search: bool = False) -> None:
    """A table of trials: objectives, the Pareto mark, the searched parameters and the status (and,
    ``show_search``, the search each trial belongs to: ``compare`` of several searches)."""
    from psmsearch.cli import print_table
    from psmsearch.cli_train import format_metric

    table = Table(title=title)
    if show_search:
        table.add_column("search")
    table.add_column("trial")
    table.add_column("status")
    table.add_column("front")
    for objective in objectives:
        table.add_column(f"{objective.metric} ({'max' if objective.direction == 'maximize' else 'min'})", justify="right")
    table.add_column("parameters")
    for row in rows:
        values = [format_metric(o.metric, row.metrics[o.metric]) if o.metric in row.metrics else "-" for o in objectives]
        searched = {k.removeprefix("search."): v for k, v in row.params.items() if k.startswith("search.")} or row.params
        params = ", ".join(f"{k}={format_param(v)}" for k, v in sorted(searched.items()))
        table.add_row(*([row.search] if show_search else []), row.name, row.status, "*" if row.pareto else "", *values, params)
    print_table(table)


@click.command("compare")
@click.option("--experiment", default=None, help="MLflow experiment (default: the most recent psmsearch search's; "
              "with --search, each named search's own).")
@click.option("--search", "search_names", multiple=True, metavar="NAME|RUN_ID",
              help="Only trials of this search: its name (study; the latest search of that name) or its parent "
                   "run's ID or the ID's first 8+ characters (any search); repeat it to rank several searches "
                   "together.")
@click.option("--tracking-uri", default=None, help="MLflow tracking URI (default: MLflow's own, sqlite:///mlflow.db).")
@click.option("--objective", "objective_specs", multiple=True, metavar="METRIC:max|min", help="Override the objectives logged by the search.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("psmsearch_compare"), help="Where to write the PNG plots.")
@click.option("--json", "as_json", is_flag=True, help="Print the ranked trials as JSON.")
def compare(experiment: str | None, search_names: Sequence[str], tracking_uri: str | None, objective_specs: Sequence[str],
            out_dir: Path, as_json: bool) -> None:
    """Rank the trials of an MLflow experiment, mark the Pareto front and write plots.

    ``--search`` repeated ranks the trials of several searches together (one table, one Pareto
    front, a ``search`` column), each search found in ``--experiment`` or, without it, in the
    experiment of its latest run; their objectives must agree unless ``--objective`` sets them.
    """
    from psmsearch.tracking import absolute_uri, check_tracking_uri, default_tracking_uri

    uri = absolute_uri(tracking_uri) if tracking_uri else default_tracking_uri()
    where = "--tracking-uri" if tracking_uri else "the default tracking URI"
    check_tracking_uri(uri, where)
    database = _sqlite_path(uri)
    if database is not None and not database.exists():  # compare only reads: never create an empty store
        raise ConfigError(f"no MLflow database at {database} ({where}); run `psmsearch search SPACE.yaml` here "
                          "first, or pass --tracking-uri", field="--tracking-uri")
    repeated = sorted({name for name in search_names if search_names.count(name) > 1})
    if repeated:
        raise ConfigError(f"search {repeated[0]!r} is named twice; name each search once (repeat --search to "
                          "compare several searches)", field="--search")
    given = list(search_names) or [None]
    picked = [pick_search(uri, experiment, name) for name in given]
    refuse_repeats(picked, given)
    label_searches(picked)
    objectives = [_parse_objective(s) for s in objective_specs] or _shared_objectives(picked)
    names = [p.label for p in picked]
    trials = [replace(row, search=p.label)
              for p in picked for row in rows_from_runs(p.tracker.runs(p.name, parent=p.parent.info.run_id))]
    if objective_specs:
        _check_reported(objectives, trials, names)
    rows = rank(trials, objectives)
    several = len(picked) > 1
    plots = _write_plots(_plot_rows(rows) if several else rows, objectives, out_dir)
    for p in picked:  # several searches' plots go beside each one's own, in a folder naming them all
        for path in plots:
            p.tracker.log_artifact(p.parent.info.run_id, path, "compare_" + "+".join(names) if several else None)
    experiments = list(dict.fromkeys(p.experiment for p in picked))
    differences = fixed_differences(trials) if several else {}
    if as_json:
        click.echo(jsonout.dumps({
            "experiment": experiments[0] if len(experiments) == 1 else None, "search": None if several else names[0],
            "searches": [{"search": p.name, "label": p.label, "experiment": p.experiment,
                          "parent_run": p.parent.info.run_id, "searches_of_this_name": p.count} for p in picked],
            "objectives": [o.model_dump() for o in objectives],
            "trials": [{**_row_json(r, objectives), "search": r.search} for r in rows], "plots": [str(p) for p in plots],
            "fixed_differences": differences,
        }))
        return
    if several:
        title = f"{', '.join(f'search {p.label} (experiment {p.experiment})' for p in picked)}: ranked together"
    else:
        (only,) = picked
        which = f"run {only.parent.info.run_id}, one of" if only.by_run_id else "the latest of"
        latest = f" ({which} {only.count} searches of this name)" if only.count > 1 else ""
        title = f"experiment {only.experiment}, search {only.name}, run {only.parent.info.run_id}{latest}"
    print_rows(rows, objectives, title=title, show_search=several)
    for row in rows:
        if row.error:  # ranked together, two searches' trials may share a name: the table's search column says which
            click.echo(f"{row.name}{f' ({row.search})' if several else ''} {row.status}: {row.error}")
    for line in filter(None, map(others_line, picked)):
        click.echo(line)
    if differences:
        shown = "; ".join(f"{key}: {', '.join(f'{s} {format_param(v)}' for s, v in held.items())}"
                          for key, held in differences.items())
        click.echo(f"note: the searches held settings they do not search at different values, so their trials "
                   f"differ in more than their parameters: {shown}", err=True)
    for path in plots:
        click.echo(f"plot: {path}")


def _shared_objectives(picked: Sequence[PickedSearch]) -> list[Objective]:
    """The objectives the searches logged, which must be the same for them to be ranked together."""
    logged = [objectives_from_parent(p.parent) for p in picked]
    if not logged[0]:
        raise ConfigError(f"the search {picked[0].name!r} in experiment {picked[0].experiment!r} logged no objectives; "
                          "pass --objective METRIC:max|min", field="--objective")
    if any(objectives != logged[0] for objectives in logged[1:]):
        listed = "; ".join(f"{p.label}: {_shown_objectives(o)}" for p, o in zip(picked, logged))
        raise ConfigError(f"the searches were run with other objectives ({listed}); pass --objective METRIC:max|min "
                          "(repeatable) to rank them together on the same ones", field="--objective")
    return logged[0]


def _shown_objectives(objectives: Sequence[Objective]) -> str:
    """``acc_2x:max, params:min`` (as ``--objective`` takes them), or ``none``."""
    return ", ".join(f"{o.metric}:{'max' if o.direction == 'maximize' else 'min'}" for o in objectives) or "none"


PLOT_SEARCH_CHARS = 10
"""The longest search name written on the plots of several searches (longer ones are cut)."""


def _plot_rows(rows: Sequence[TrialRow]) -> list[TrialRow]:
    """Rows of several searches, named for the plots ``SEARCH N``: the plots name a single search's
    trials ``trial N``, which would not tell apart trial 0 of two searches. Search names are cut to
    :data:`PLOT_SEARCH_CHARS` characters, or numbered ``#1``, ``#2`` (in ``--search`` order) where cut ones coincide."""
    from psmsearch.report import trial_number

    searches = list(dict.fromkeys(row.search for row in rows))
    cut = {s: s if len(s) <= PLOT_SEARCH_CHARS else s[: PLOT_SEARCH_CHARS - 1] + "…" for s in searches}
    if len(set(cut.values())) < len(searches):
        cut = {s: f"#{i + 1}" for i, s in enumerate(searches)}
    return [replace(row, name=f"{cut[row.search]} {trial_number(row.name)}") for row in rows]


def _check_reported(objectives: Sequence[Objective], trials: Sequence[TrialRow], names: Sequence[str]) -> None:
    """Refuse an ``--objective`` that no trial of the search reported (a mistyped metric).

    Only overrides are checked: a search's own objectives are missing from a trial that failed
    (a NaN objective is not stored), and such a search is shown with its failures, not refused.
    """
    reported = sorted({metric for row in trials for metric in row.metrics})
    missing = [o.metric for o in objectives if trials and not any(o.metric in row.metrics for row in trials)]
    if missing:
        searches = f"search {names[0]!r}" if len(names) == 1 else f"searches {', '.join(repr(n) for n in names)}"
        raise ConfigError(f"no trial of {searches} reported {', '.join(repr(m) for m in missing)}; "
                          f"metrics reported: {', '.join(reported) or 'none'}", field="--objective")


def _write_plots(rows: Sequence[Any], objectives: Sequence[Objective], out_dir: Path) -> list[Path]:
    """:func:`write_plots`, with a folder that cannot be made or written reported as ``--out``."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        return write_plots(rows, objectives, out_dir)
    except OSError as err:
        raise ConfigError(f"cannot write plots to {str(out_dir)!r}: {err.strerror or err}", field="--out") from None


def _parse_objective(spec: str) -> Objective:
    metric, _, direction = spec.rpartition(":")
    names = {"max": "maximize", "min": "minimize", "maximize": "maximize", "minimize": "minimize"}
    if not metric or direction not in names:
        raise ConfigError(f"{spec!r} is not METRIC:max or METRIC:min", field="--objective")
    return Objective(metric=metric, direction=names[direction])  # type: ignore[arg-type]


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI, or ``None`` for other stores."""
    prefix = "sqlite:///"
    return Path(uri[len(prefix):]) if uri.startswith(prefix) and uri != f"{prefix}:memory:" else None
