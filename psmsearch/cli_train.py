"""``psmsearch train CONFIG.yaml [--set key=value ...] [--json]``: run one trial from a YAML file.

Progress goes to stderr; stdout gets a metrics table, or with ``--json`` one JSON object of every
metric and nothing else (as ``search --json``, ``compare --json`` and ``plugins --json`` do). Invalid input raises
:class:`~psmsearch.errors.ConfigError`, which the main CLI turns into exit code 2 without a traceback;
a diverged or pruned run exits with code 1 and says why. A component or task that raises (a plugin's
bug) also exits with code 1: the metrics measured before the failure are still printed (as JSON alone
with ``--json``), then one line names the phase, the exception and the plugin line it came from;
``--traceback`` adds the full traceback.
"""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import click

from psmsearch import jsonout
from psmsearch.registry import require_loaded_plugins
from psmsearch.trainer import TrialStopped
from psmsearch.trial import TrialPhaseError, load_trial_config, run_trial, run_trial_data_parallel


COUNT_METRIC = re.compile(r"(^|_)(bytes|params|num_states)(_|$)")
"""Metrics that count things (bytes, parameters, states): shown as whole numbers."""


def format_metric(name: str, value: float) -> str:
    """``value`` of metric ``name`` for a table: counts and other whole numbers as integers with thousands
    separators (``11,776``, not ``1.178e+04``), the rest to 4 significant digits, without an exponent
    from 10,000 up (``12,350``)."""
    value = float(value)
    if not math.isfinite(value):
        return str(value)
    if COUNT_METRIC.search(name) or (value.is_integer() and abs(value) < 1e15):
        return f"{round(value):,}"
    if abs(value) >= 1e4:
        return f"{float(f'{value:.4g}'):,.0f}"
    return f"{value:.4g}"


def _format(value: float) -> str:
    """A metric value in an evaluation log line, as :func:`format_metric` shows it."""
    return format_metric("", value)


def print_metrics(metrics: dict[str, float], title: str) -> None:
    """A two-column rich table of metrics on stdout."""
    from rich.table import Table

    from psmsearch.cli import print_table

    table = Table(title=title)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for name, value in metrics.items():
        table.add_row(name, format_metric(name, value))
    print_table(table)


@click.command("train")
@click.argument("config", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="override a field, e.g. --set model.chunk_size=4 (repeatable; values are YAML)")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object of all metrics on stdout, and nothing else there")
@click.option("--progress/--no-progress", default=True, help="show a progress bar on stderr (only on a terminal)")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), default=None, help="checkpoint file (written every train.checkpoint_every steps and when training ends)")
@click.option("--resume", is_flag=True, help="continue from --checkpoint (from step 0 if the file does not exist yet)")
@click.option("--eval-log/--no-eval-log", default=True, help="print each periodic evaluation to stderr")
@click.option("--nproc", type=click.IntRange(1, 1024), default=1, help="data-parallel processes on this machine (gloo on CPU, NCCL on CUDA)")
@click.option("--traceback", "show_traceback", is_flag=True, help="when a component or task raises, print the full traceback too")
def train(
    config: Path, overrides: tuple[str, ...], as_json: bool, progress: bool, checkpoint: Path | None,
    resume: bool, eval_log: bool, nproc: int, show_traceback: bool,
) -> None:
    """Train and evaluate one trial described by CONFIG (a trial YAML file)."""
    if resume and checkpoint is None:
        raise click.UsageError("--resume needs --checkpoint PATH, the file to continue from")
    require_loaded_plugins("training", warn=lambda message: click.echo(f"warning: {message}", err=True))
    trial = load_trial_config(config, overrides, warn=lambda message: click.echo(f"warning: {message}", err=True))
    if resume and not checkpoint.is_file():
        click.echo(f"no checkpoint at {checkpoint} yet: training from step 0", err=True)

    def resumed(step: int) -> None:  # said once the file is checked: a refused file said "resuming" first
        click.echo(f"resuming from step {step} ({checkpoint})", err=True)

    def log(step: int, metrics: dict[str, float]) -> None:
        if eval_log:
            shown = ", ".join(f"{k}={_format(v)}" for k, v in metrics.items())
            click.echo(f"step {step}: {shown}", err=True)

    try:
        if nproc > 1:
            metrics = run_trial_data_parallel(trial, nproc, checkpoint_path=checkpoint, resume=resume, callback=log,
                                              on_resume=resumed)
        else:
            metrics = run_trial(trial, log, progress=progress, checkpoint_path=checkpoint, resume=resume,
                                on_resume=resumed)
    except TrialStopped as err:
        click.echo(f"trial stopped: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo(_interrupted_message(checkpoint), err=True)
        sys.exit(130)
    except TrialPhaseError as err:
        _report_failure(err, f"{config.name}: {trial.task.name} / {trial.model.kind}", as_json, show_traceback)
        sys.exit(1)
    if as_json:
        click.echo(jsonout.dumps(metrics, sort_keys=True))
    else:
        print_metrics(metrics, f"{config.name}: {trial.task.name} / {trial.model.kind}")


def checkpoint_step(path: Path) -> int | str:
    """The training step a checkpoint file holds, or ``"?"`` where it cannot be read (the run says why)."""
    import torch

    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:  # noqa: BLE001 - only a message depends on it; loading the file reports the fault
        return "?"


def _interrupted_message(checkpoint: Path | None) -> str:
    """What Ctrl-C or SIGTERM left behind and how to continue."""
    if checkpoint is None:
        return "interrupted: nothing was saved (pass --checkpoint FILE to be able to continue an interrupted run)"
    if not checkpoint.is_file():
        return (f"interrupted before the first checkpoint: {checkpoint} was not written "
                "(train.checkpoint_every sets how often it is)")
    return (f"interrupted: {checkpoint} holds step {checkpoint_step(checkpoint)}; "
            "run the same command with --resume to continue from there")


def _report_failure(err: TrialPhaseError, title: str, as_json: bool, show_traceback: bool) -> None:
    """What the trial measured before it failed (stdout, as a successful run shows its metrics: a table,
    or with ``--json`` their JSON object alone), then one line naming the phase, the exception and where
    it was raised (stderr); the traceback on request."""
    if err.metrics and as_json:
        click.echo(jsonout.dumps(err.metrics, sort_keys=True))
    elif err.metrics:
        click.echo(f"{title}: the trial failed; what it measured before the failure:")
        print_metrics(err.metrics, title)
    if err.__cause__ is not None:
        import traceback

        full = "".join(traceback.format_exception(err.__cause__)).rstrip()
    else:
        full = getattr(err, "worker_traceback", "")  # raised in a data-parallel worker (--nproc)
    if show_traceback and full:
        click.echo(full, err=True)
    hint = " (--traceback shows the full traceback)" if full and not show_traceback else ""
    click.echo(f"trial failed in {err}{hint}", err=True)


def main() -> None:
    """Run ``train`` standalone (the package CLI adds it to ``psmsearch``)."""
    from psmsearch.errors import PSMSearchError

    try:
        train.main(standalone_mode=False)
    except PSMSearchError as err:
        click.echo(f"error: {err}", err=True)
        sys.exit(err.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)


if __name__ == "__main__":
    main()
