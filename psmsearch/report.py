"""Comparing trials: sorting by objectives, the Pareto front, and the plots ``compare`` writes."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from functools import cache
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
LINESTYLES = ("-", "-.", ":")  # finished trials; dashed is kept for trials stopped early
STOPPED_STYLE = {"linestyle": "--", "markerfacecolor": "none", "alpha": 0.7}
BINARY_UNITS = ("B", "KiB", "MiB", "GiB", "TiB")
WIDE_RANGE = 100.0  # max/min above which positive values go on a log axis


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
    for pattern, filename, xlabel, ylabel, bytes_y in (
        (LENGTH_METRIC, "accuracy_vs_length.png", "evaluation length (x training length)", "accuracy", False),
        (memory[0], "memory_vs_n.png", "tokens streamed n", memory[1], True),
    ):
        figure = curves_figure(rows[:top], pattern, xlabel, ylabel, bytes_y)
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
    (points that coincide share one label), and the Pareto front as a staircase; one objective: a bar
    per trial. Pruned and failed trials are left out: their values come from an evaluation before the
    end of training (or none), not a result, and :func:`rank` keeps them off the front. Wide-ranging
    positive objectives go on a log axis and byte counts read B/KiB/MiB (:func:`scale_objective_axis`)."""
    scored = [r for r in rows if r.status == "complete" and all(o.metric in r.metrics for o in objectives)]
    if not scored:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    if len(objectives) >= 2:
        _scatter_two_objectives(ax, scored, objectives[0], objectives[1])
    else:
        objective = objectives[0]
        values = [r.metrics[objective.metric] for r in scored]
        ax.bar(range(len(scored)), values, color=["tab:red" if r.pareto else "tab:gray" for r in scored])
        ax.set_xticks(range(len(scored)), [_short(r.name) for r in scored], rotation=90)
        ax.set_xlabel("trial (sorted)")
        ax.set_ylabel(f"{objective.metric} ({objective.direction})")
        scale_objective_axis(ax, "y", objective.metric, values)
    ax.set_title("objectives")
    fig.tight_layout()
    return fig


def _scatter_two_objectives(ax: Any, scored: Sequence[TrialRow], x_obj: Objective, y_obj: Objective) -> None:
    """Each trial at (first objective, second objective), labelled; the front as a staircase."""
    xs = [r.metrics[x_obj.metric] for r in scored]
    ys = [r.metrics[y_obj.metric] for r in scored]
    ax.scatter(xs, ys, c=["tab:red" if r.pareto else "tab:gray" for r in scored], zorder=3)
    for (x, y), names in _group_by_value(zip(xs, ys), (_short(r.name) for r in scored)):
        ax.annotate(", ".join(names), (x, y), textcoords="offset points", xytext=(4, 4), fontsize="small")
    steps = front_staircase([(x, y) for x, y, r in zip(xs, ys, scored) if r.pareto], x_obj.direction)
    ax.plot([p[0] for p in steps], [p[1] for p in steps], "r--", label="Pareto front")
    ax.set_xlabel(f"{x_obj.metric} ({x_obj.direction})")
    ax.set_ylabel(f"{y_obj.metric} ({y_obj.direction})")
    scale_objective_axis(ax, "x", x_obj.metric, xs)
    scale_objective_axis(ax, "y", y_obj.metric, ys)
    ax.legend()


def front_staircase(front: Sequence[tuple[float, float]], x_direction: str) -> list[tuple[float, float]]:
    """The vertices of a two-objective Pareto front drawn as the step function it is.

    The points are taken in increasing x; between two neighbours the corner is the one worse than both
    in both objectives. Along a front, whatever y's direction, y worsens as x improves: so when x is
    maximised the corner is ``(left x, right y)``, when it is minimised ``(right x, left y)``. The steps
    are then the edge of what the front attains: every point on them is matched or beaten by a trial
    on the front. A straight segment between two trials drew trade-offs that no trial reached.
    """
    ordered = sorted(set(front))
    vertices = ordered[:1]
    for (x0, y0), (x1, y1) in zip(ordered, ordered[1:]):
        vertices += [(x0, y1) if x_direction == "maximize" else (x1, y0), (x1, y1)]
    return vertices


def is_bytes_metric(metric: str) -> bool:
    """Whether a metric counts bytes (``peak_state_bytes_4k``, ``state_bytes_1024``): its name says so."""
    return "bytes" in metric.lower()


def wants_log_scale(values: Sequence[float]) -> bool:
    """Whether values are positive and their max/min exceeds :data:`WIDE_RANGE`. On a linear axis the
    small ones collapse onto zero (a GPT's KV cache of MiBs put every PSM state of a few KiB at "0.0",
    3,968 B and 896 B alike); on a log axis equal ratios are equal distances."""
    finite = [v for v in values if math.isfinite(v)]
    return bool(finite) and min(finite) > 0 and max(finite) / min(finite) > WIDE_RANGE


def format_bytes(value: float, _position: Any = None) -> str:
    """A byte count as a tick label in binary units: ``896 B``, ``3.88 KiB``, ``2 MiB`` (3 significant
    digits, no exponent); ``_position`` is the tick's index, which matplotlib's FuncFormatter passes."""
    power = _binary_power(value)
    scaled = value / 1024.0**power
    return f"{scaled:.0f} {BINARY_UNITS[power]}" if abs(scaled) >= 100 else f"{scaled:.3g} {BINARY_UNITS[power]}"


def _binary_power(value: float) -> int:
    """The index in :data:`BINARY_UNITS` of the largest unit not above ``|value|`` (0 below 1 KiB)."""
    power = 0
    while abs(value) >= 1024 and power < len(BINARY_UNITS) - 1:
        value /= 1024
        power += 1
    return power


def scale_objective_axis(ax: Any, which: str, metric: str, values: Sequence[float]) -> None:
    """Put one objective's axis (``which``: "x" or "y") on a log scale when :func:`wants_log_scale`
    says so, and label a byte count's ticks in B/KiB/MiB: on a log axis at powers of 2 (1 KiB, 4 KiB,
    ...), on a linear one at round numbers of the axis's unit (10 KiB, 15 KiB, not 9.77 KiB)."""
    from matplotlib import ticker

    bytes_valued = is_bytes_metric(metric)
    log = wants_log_scale(values)
    if log:
        getattr(ax, f"set_{which}scale")("log", base=2 if bytes_valued else 10)
    if not bytes_valued:
        return
    axis = getattr(ax, f"{which}axis")
    if not log:
        axis.set_major_locator(_binary_locator_class()(nbins="auto", steps=[1, 2, 2.5, 5, 10]))
    axis.set_major_formatter(ticker.FuncFormatter(format_bytes))
    axis.set_minor_formatter(ticker.NullFormatter())


@cache
def _binary_locator_class() -> type:
    """matplotlib's MaxNLocator picking round numbers of the view's binary unit (defined on first use,
    as matplotlib is imported only when plotting)."""
    from matplotlib import ticker

    class BinaryLocator(ticker.MaxNLocator):
        def tick_values(self, vmin: float, vmax: float) -> Any:
            unit = 1024.0 ** _binary_power(max(abs(vmin), abs(vmax)))
            return super().tick_values(vmin / unit, vmax / unit) * unit

    return BinaryLocator


def curves_figure(rows: Sequence[TrialRow], pattern: re.Pattern[str], xlabel: str, ylabel: str,
                  bytes_y: bool) -> Any | None:
    """One line per trial of the metrics ``pattern`` matches, against their length, or ``None`` if no
    trial has them. Trials with identical curves would draw exactly on top of each other: they are
    drawn once, labelled with all their names (``trial 0 = trial 3``), and each line has its own
    marker and line style. With ``bytes_y`` the values are byte counts (memory against n).

    A trial that did not complete (pruned, failed) is drawn dashed with hollow markers and labelled
    with how it stopped (``trial 5 (pruned at step 200)``); finished trials never use the dashed
    style. Its curve is its last evaluation before training ended (what the pruner judged), useful to
    see why it was stopped but not a result beside finished trials: objectives.png leaves such trials
    out for that reason, and memory_vs_n.png has none unless they logged memory (measured after
    training), in which case they are marked the same way.
    """
    curves = [(_short(r.name), stop_note(r), tuple(points)) for r in rows if (points := _length_curves(r, pattern))]
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=(6, 4.5))
    groups = _group_by_value(((points, note) for _, note, points in curves), (name for name, _, _ in curves))
    for index, ((points, note), names) in enumerate(groups):
        style = STOPPED_STYLE if note else {"linestyle": LINESTYLES[index % len(LINESTYLES)]}
        label = " = ".join(names) + (f" ({note})" if note else "")
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[index % len(MARKERS)], label=label, **style)
    ax.set_xscale("log", base=2)
    if bytes_y:  # as an objective axis: log where the values span > 100x (a KV cache), B/KiB/MiB ticks
        scale_objective_axis(ax, "y", "bytes", [y for points, _ in (g[0] for g in groups) for _, y in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def stop_note(row: TrialRow) -> str:
    """How a trial that did not complete stopped, for a legend: ``pruned at step 200`` (the step from
    its error, as the Optuna and Ray drivers word it), ``failed``; empty for a complete trial."""
    if row.status == "complete":
        return ""
    match = re.search(r"\bat step (\d+)", row.error)
    return f"{row.status} at step {match.group(1)}" if match else row.status


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
