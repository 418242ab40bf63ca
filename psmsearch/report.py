"""Comparing trials: sorting by objectives, the Pareto front, and the plots ``compare`` writes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence


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


def _length_curves(row: TrialRow, pattern: re.Pattern[str]) -> list[tuple[float, float]]:
    points = []
    for name, value in row.metrics.items():
        match = pattern.match(name)
        if match:
            x = float(match.group(1)) * (1024 if len(match.groups()) > 1 and match.group(2) else 1)
            points.append((x, value))
    return sorted(points)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")


def write_plots(rows: list[TrialRow], objectives: Sequence[Objective], out_dir: Path, top: int = 8) -> list[Path]:
    """PNG plots: objective vs objective (with the front), accuracy vs length, memory vs n."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    figure = objectives_figure(rows, objectives)
    if figure is not None:
        written.append(_save(figure, out_dir / "objectives.png"))
    peak = any(PEAK_MEMORY_METRIC.match(name) for row in rows for name in row.metrics)
    memory = (PEAK_MEMORY_METRIC, "most state bytes held streaming up to n") if peak else \
        (MEMORY_METRIC, "retained state bytes at n")
    for pattern, filename, xlabel, ylabel, logy in (
        (LENGTH_METRIC, "accuracy_vs_length.png", "evaluation length (x training length)", "accuracy", False),
        (memory[0], "memory_vs_n.png", "tokens streamed n", memory[1], True),
    ):
        figure = curves_figure(rows[:top], pattern, xlabel, ylabel, logy)
        if figure is not None:
            written.append(_save(figure, out_dir / filename))
    return written


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    return plt


def objectives_figure(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> Any | None:
    """The completed trials' objectives: a scatter of the first two, each point labelled with its trial
    (points that coincide share one label), and the Pareto front; one objective: a bar per trial."""
    scored = [r for r in rows if r.status == "complete" and all(o.metric in r.metrics for o in objectives)]
    if not scored:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    if len(objectives) >= 2:
        x_obj, y_obj = objectives[0], objectives[1]
        xs = [r.metrics[x_obj.metric] for r in scored]
        ys = [r.metrics[y_obj.metric] for r in scored]
        ax.scatter(xs, ys, c=["tab:red" if r.pareto else "tab:gray" for r in scored])
        for (x, y), names in _group_by_value(zip(xs, ys), (_short(r.name) for r in scored)):
            ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
        front = sorted((x, y) for x, y, r in zip(xs, ys, scored) if r.pareto)
        ax.plot([p[0] for p in front], [p[1] for p in front], "r--", label="Pareto front")
        ax.set_xlabel(f"{x_obj.metric} ({x_obj.direction})")
        ax.set_ylabel(f"{y_obj.metric} ({y_obj.direction})")
        ax.legend()
    else:
        objective = objectives[0]
        ax.bar(range(len(scored)), [r.metrics[objective.metric] for r in scored], color=["tab:red" if r.pareto else "tab:gray" for r in scored])
        ax.set_xticks(range(len(scored)), [_short(r.name) for r in scored], rotation=90)
        ax.set_xlabel("trial (sorted)")
        ax.set_ylabel(f"{objective.metric} ({objective.direction})")
    ax.set_title("objectives")
    fig.tight_layout()
    return fig


def curves_figure(rows: Sequence[TrialRow], pattern: re.Pattern[str], xlabel: str, ylabel: str, logy: bool) -> Any | None:
    """One line per trial of the metrics ``pattern`` matches, against their length, or ``None`` if no
    trial has them. Trials with identical curves would draw exactly on top of each other: they are
    drawn once, labelled with all their names (``trial 0 = trial 3``), and each line has its own
    marker and line style."""
    curves = [(_short(r.name), points) for r in rows if (points := _length_curves(r, pattern))]
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    for index, (points, names) in enumerate(_group_by_value((tuple(p) for _, p in curves), (n for n, _ in curves))):
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[index % len(MARKERS)],
                linestyle=LINESTYLES[index % len(LINESTYLES)], label=" = ".join(names))
    ax.set_xscale("log", base=2)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def _group_by_value(values: Any, names: Any) -> list[tuple[Any, list[str]]]:
    """``(value, names)`` for each distinct value, in first-seen order: what would be drawn on one spot."""
    groups: dict[Any, list[str]] = {}
    for value, name in zip(values, names):
        groups.setdefault(value, []).append(name)
    return list(groups.items())


def _short(name: str) -> str:
    """``quick-s3-trial-4`` -> ``trial 4`` for plot labels."""
    _, _, number = name.rpartition("trial-")
    return f"trial {number}" if number.isdigit() else name


def _save(fig: Any, path: Path) -> Path:
    from matplotlib import pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_learning_curves(history: Sequence[tuple[int, dict[str, float]]], metrics: Sequence[str], path: Path) -> Path | None:
    """One trial's evaluation metrics against training step (the trial run's ``curves.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    names = [m for m in metrics if any(m in values for _, values in history)]
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(step, values[name]) for step, values in history if name in values]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    ax.set_xlabel("training step")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return _save(fig, path)
