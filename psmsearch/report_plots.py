"""The PNG plots ``compare`` writes (objectives, accuracy against length, memory against n) and the
learning curves each trial logs: bounded labels placed clear of each other, keys where they do not fit,
binary byte axes."""

from __future__ import annotations

import math
import re
from functools import cache
from pathlib import Path
from typing import Any, Iterable, Sequence

from psmsearch.plot_labels import KeyEntry, group_label, group_labels, key_letter, key_lines, short_name
from psmsearch.report import LENGTH_METRIC, MEMORY_METRIC, PEAK_MEMORY_METRIC, TrialRow, plot_params
from psmsearch.space import Objective


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
FIGSIZE = (6.0, 4.5)  # inches; a plot's area keeps its size in them, the figure grows for a key or legend
PAD_INCHES = 0.1  # room kept between a figure's edge and a legend or key added beside the plot
BAR_INCHES = 0.16  # width per bar of the one-objective chart, room for its rotated trial name
BARS_MARGIN_INCHES = 1.2  # the bar chart's width besides its bars (y axis, margins)
MAX_WIDTH_INCHES = 16.0  # the widest bar chart; past it only every k-th bar is named
CHAR_EM = 0.6  # width of an average character of a key, in ems, for wrapping it to the figure
LABEL_OFFSET_POINTS = 4  # from a point to its label
LABEL_GAP_POINTS = 3  # kept free around a placed label: two abutting labels read as one
NARROW_SPREAD = 0.1  # bars whose values differ by less than this fraction of the largest get a zoomed axis
MARKER_POINTS = 6  # the scatter's marker size (diameter), kept clear of other points' labels
LABEL_BACKGROUND = {"boxstyle": "square,pad=0.1", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}

PointGroup = tuple[tuple[float, float], list[str], bool]  # a scatter point, its trials, on the front


def write_plots(rows: list[TrialRow], objectives: Sequence[Objective], out_dir: Path, top: int = 8) -> list[Path]:
    """PNG plots: objective vs objective (with the front), accuracy vs length, memory vs n (the ``top``
    distinct curves of the best trials each: trials on one curve cost no more room than one)."""
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
        figure = curves_figure(rows, pattern, xlabel, ylabel, bytes_y, top=top)
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
    positive objectives go on a log axis and byte counts read B/KiB/MiB (:func:`scale_objective_axis`).

    Labels are bounded (:mod:`psmsearch.plot_labels`), placed inside the plot clear of each other and
    left out of the layout: a label naming 10 coinciding trials made ``tight_layout`` shrink the plot
    to 0.12 of the figure's width, and from 12 on it gave up and the label ran off the figure. A point whose
    trials do not fit in its label gets a key letter, and the key under the plot names them all, as it
    names the trials of points too crowded for a label of their own.

    Each label (a bar's name) also says what its trials are: the parameters that differ among the
    trials plotted (:func:`plot_params`: ``trial 4: attention c=16``). Coinciding trials that differ
    in them are keyed, the key giving each set of parameters with its trials."""
    scored = [r for r in rows if r.status == "complete" and all(o.metric in r.metrics for o in objectives)]
    if not scored:
        return None
    params = plot_params(scored)
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    points: list[PointGroup] = []
    entries: list[KeyEntry] = []
    if len(objectives) >= 2:
        points = _scatter_two_objectives(ax, scored, objectives[0], objectives[1])
    else:
        entries = _bar_per_trial(ax, scored, objectives[0], params)
    ax.set_title("objectives")
    fig.tight_layout()
    _add_key(fig, entries + _label_points(ax, points, params))
    return fig


def _bar_per_trial(ax: Any, scored: Sequence[TrialRow], objective: Objective, params: dict[str, str]) -> list[KeyEntry]:
    """One bar per trial, in rank order, each named below it with its parameters (``params``: one line
    of at most :data:`psmsearch.plot_labels.LABEL_CHARS`, keyed where they do not fit). The figure
    widens with the number of bars (up to :data:`MAX_WIDTH_INCHES`) so the names never overlap; past
    that every k-th is named; it lengthens by what the names add to bare trial names, so the plot keeps
    its height. Returns the key's entries."""
    values = [r.metrics[objective.metric] for r in scored]
    count = len(scored)
    width = min(MAX_WIDTH_INCHES, max(FIGSIZE[0], BARS_MARGIN_INCHES + count * BAR_INCHES))
    ax.figure.set_size_inches(width, FIGSIZE[1])
    every = math.ceil(count * BAR_INCHES / (width - BARS_MARGIN_INCHES))
    bars = ax.bar(range(count), values, color=["tab:red" if r.pareto else "tab:gray" for r in scored])
    entries = _name_bars(ax, {i: scored[i].name for i in range(0, count, every)}, params)
    ax.set_xlabel("trial (sorted)" if every == 1 else f"trial (sorted; every {_ordinal(every)} named)")
    ax.set_ylabel(f"{objective.metric} ({objective.direction})")
    scale_objective_axis(ax, "y", objective.metric, values)
    if ax.get_yscale() == "linear" and not is_bytes_metric(objective.metric):
        _zoom_on_narrow_values(ax, values)
    if every == 1:  # each bar's value written on it: differences of a few thousandths are not seen in its height
        ax.bar_label(bars, fmt="%.4g", fontsize="x-small", rotation=90 if count > 8 else 0, padding=2)
    return entries


def _zoom_on_narrow_values(ax: Any, values: Sequence[float]) -> None:
    """Start the y axis near the bars' values where they all lie on one side of 0 within
    :data:`NARROW_SPREAD` of the largest (bpc 4.494 against 4.567: from 0 the bars look equal); the axis's
    ticks then say where it starts, and the axis label says it does not start at 0."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite or min(finite) * max(finite) <= 0:
        return
    low, high = min(finite), max(finite)
    largest = max(abs(low), abs(high))
    if high - low >= NARROW_SPREAD * largest:
        return
    margin = (high - low) if high > low else 0.01 * largest
    ax.set_ylim(low - margin, high + margin)
    ax.set_ylabel(f"{ax.get_ylabel()}, axis not from 0")


def _name_bars(ax: Any, names: dict[int, str], params: dict[str, str]) -> list[KeyEntry]:
    """Name the bars at the positions ``names`` holds, each with its trial's ``params``, and lengthen
    the figure by as much as the longest name runs past the longest bare trial name (``trial 12``):
    ``tight_layout`` then gives the names that room and the plot the height it has without them.
    Returns the key's entries, for names whose parameters do not fit."""
    fig = ax.figure
    labels = group_labels([[name] for name in names.values()], params=params, lines=1)
    ax.set_xticks(list(names), [label.text for label in labels], rotation=90, fontsize="small")
    bare = _longest_inches(fig, map(short_name, names.values()))
    extra = _longest_inches(fig, [label.text for label in labels]) - bare
    fig.set_size_inches(fig.get_size_inches()[0], FIGSIZE[1] + max(0.0, extra))
    return [label.entry for label in labels if label.entry]


def _longest_inches(fig: Any, texts: Iterable[str]) -> float:
    """How long the longest of ``texts`` runs in the ``small`` font (a rotated bar name: how tall)."""
    probe = fig.text(0, 0, "", fontsize="small")
    renderer = fig.canvas.get_renderer()
    longest = 0.0
    for text in texts:
        probe.set_text(text)
        longest = max(longest, probe.get_window_extent(renderer).width / fig.dpi)
    probe.remove()
    return longest


def _ordinal(number: int) -> str:
    """``2`` -> ``2nd``, ``11`` -> ``11th``, ``23`` -> ``23rd``."""
    suffix = "th" if 10 <= number % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(number % 10, "th")
    return f"{number}{suffix}"


def _scatter_two_objectives(ax: Any, scored: Sequence[TrialRow], x_obj: Objective, y_obj: Objective) -> list[PointGroup]:
    """Each trial at (first objective, second objective); the front as a staircase. Returns the
    distinct points with their trials' names, for :func:`_label_points` once the layout is done."""
    xs = [r.metrics[x_obj.metric] for r in scored]
    ys = [r.metrics[y_obj.metric] for r in scored]
    ax.scatter(xs, ys, s=MARKER_POINTS**2, c=["tab:red" if r.pareto else "tab:gray" for r in scored], zorder=3)
    front = [(x, y) for x, y, r in zip(xs, ys, scored) if r.pareto]
    steps = front_staircase(front, x_obj.direction)
    ax.plot([p[0] for p in steps], [p[1] for p in steps], "r--", label="Pareto front")
    ax.set_xlabel(f"{x_obj.metric} ({x_obj.direction})")
    ax.set_ylabel(f"{y_obj.metric} ({y_obj.direction})")
    scale_objective_axis(ax, "x", x_obj.metric, xs)
    scale_objective_axis(ax, "y", y_obj.metric, ys)
    ax.legend()
    return [(point, names, point in front) for point, names in _group_by_value(zip(xs, ys), (r.name for r in scored))]


def _label_points(ax: Any, points: Sequence[PointGroup], params: dict[str, str]) -> list[KeyEntry]:
    """Label the points of a laid-out scatter, front first, then the points with most trials, then by
    rank: each where its label (its trials and their ``params``) fits inside the plot without covering
    another label or point. Returns the key's entries: the trials of each lettered label, and of the
    points left without one, with their parameters."""
    renderer = ax.figure.canvas.get_renderer()
    taken = [_marker_box(ax, point) for point, _, _ in points]
    entries: list[KeyEntry] = []
    crowded: list[str] = []
    letters = 0
    for point, names, _ in sorted(points, key=lambda p: (not p[2], -len(p[1]))):
        label = group_label(names, key_letter(letters), params=params)
        if not _place_label(ax, point, label.text, taken, renderer):
            crowded += names
        elif label.entry:
            entries.append(label.entry)
            letters += bool(label.key)
    return entries + ([KeyEntry("no room for their labels", tuple(crowded), params)] if crowded else [])


def _marker_box(ax: Any, point: tuple[float, float]) -> Any:
    """The box, in display pixels, that a scatter point's marker covers."""
    from matplotlib.transforms import Bbox

    x, y = ax.transData.transform(point)
    radius = MARKER_POINTS / 2 * ax.figure.dpi / 72
    return Bbox.from_extents(x - radius, y - radius, x + radius, y + radius)


def _place_label(ax: Any, point: tuple[float, float], text: str, taken: list[Any], renderer: Any) -> bool:
    """Write ``text`` beside a point on the first side where it lies inside the plot and clear of the
    ``taken`` boxes (which it then joins), trying first the side facing the middle of the plot (left of
    a point in the right half, below one near the top). A label is left out of the layout, which must
    never shrink the plot to make room for it, and has a light background, to stay readable where it
    crosses the front's line. False, and nothing written, where no side is free."""
    fx, fy = (ax.transData + ax.transAxes.inverted()).transform(point)
    left, below = bool(fx > 0.5), bool(fy > 0.85)
    plot = ax.get_window_extent(renderer)
    for to_left, to_below in ((left, below), (left, not below), (not left, below), (not left, not below)):
        offset = (LABEL_OFFSET_POINTS * (-1 if to_left else 1), LABEL_OFFSET_POINTS * (-1 if to_below else 1))
        annotation = ax.annotate(text, point, textcoords="offset points", xytext=offset, fontsize="small",
                                 ha="right" if to_left else "left", va="top" if to_below else "bottom",
                                 bbox=LABEL_BACKGROUND)
        annotation.set_in_layout(False)
        box = annotation.get_window_extent(renderer)
        inside = plot.x0 <= box.x0 and box.x1 <= plot.x1 and plot.y0 <= box.y0 and box.y1 <= plot.y1
        if inside and not any(box.overlaps(other) for other in taken):
            taken.append(box.padded(LABEL_GAP_POINTS * ax.figure.dpi / 72))  # the next label keeps clear of it
            return True
        annotation.remove()
    return False


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
                  bytes_y: bool, top: int | None = None) -> Any | None:
    """One line per trial of the metrics ``pattern`` matches, against their length, or ``None`` if no
    trial has them. Trials with identical curves would draw exactly on top of each other: they are
    drawn once, labelled with all their names (``trials 0, 3``), and each line has its own marker and
    line style. ``top`` keeps the first that many distinct curves (rows come ranked; ``None``: all), so
    every trial on a drawn curve is named with it. With ``bytes_y`` the values are byte counts (memory against n).

    A trial that did not complete (pruned, failed) is drawn dashed with hollow markers and labelled
    with how it stopped (``trial 5 (pruned at step 200)``); finished trials never use the dashed
    style. Its curve is its last evaluation before training ended (what the pruner judged), useful to
    see why it was stopped but not a result beside finished trials: objectives.png leaves such trials
    out for that reason, and memory_vs_n.png has none unless they logged memory (measured after
    training), in which case they are marked the same way.

    The legend stands right of the plot, never over the lines, and its entries are bounded like the
    objectives' labels (a curve whose trials do not fit gets a key letter and the key under the plot):
    the plot keeps its size whatever the number of trials. As there, an entry gives its trials'
    parameters that differ among the trials drawn (:func:`plot_params`)."""
    curves = [(r.name, stop_note(r), tuple(points)) for r in rows if (points := _length_curves(r, pattern))]
    if not curves:
        return None
    fig, ax = _pyplot().subplots(figsize=FIGSIZE)
    groups = _group_by_value(((points, note) for _, note, points in curves), (name for name, _, _ in curves))[:top]
    drawn = {name for _, names in groups for name in names}
    labels = group_labels([names for _, names in groups], params=plot_params([r for r in rows if r.name in drawn]))
    for index, (((points, note), _), label) in enumerate(zip(groups, labels)):
        style = STOPPED_STYLE if note else {"linestyle": LINESTYLES[index % len(LINESTYLES)]}
        ax.plot([p[0] for p in points], [p[1] for p in points], marker=MARKERS[index % len(MARKERS)],
                label=_with_note(label.text, note), **style)
    ax.set_xscale("log", base=2)
    if bytes_y:  # as an objective axis: log where the values span > 100x (a KV cache), B/KiB/MiB ticks
        scale_objective_axis(ax, "y", "bytes", [y for points, _ in (g[0] for g in groups) for _, y in points])
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    fig.tight_layout()
    _legend_right_of_plot(ax)
    _add_key(fig, [label.entry for label in labels if label.entry])
    return fig


def _with_note(text: str, note: str) -> str:
    """A legend entry: the label with how its trials stopped at the end of its first line (the one
    naming them: ``trial 5: mlp c=4 (pruned at step 200)``), where they did not complete."""
    first, newline, rest = text.partition("\n")
    return f"{first} ({note}){newline}{rest}" if note else text


def _legend_right_of_plot(ax: Any) -> None:
    """The legend outside the plot, to its right, with the figure widened to hold it: inside the
    plot it covered the lines (with ``loc="best"`` too, once its entries were long)."""
    fig = ax.figure
    legend = ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    right = legend.get_window_extent(fig.canvas.get_renderer()).x1 / fig.dpi
    _extend_figure(fig, right=max(0.0, right + PAD_INCHES - fig.get_size_inches()[0]))


def _add_key(fig: Any, entries: Sequence[KeyEntry]) -> None:
    """Under everything drawn, the key naming the trials of each entry and their parameters (a
    lettered label's, or those of points without a label: :func:`psmsearch.plot_labels.key_lines`),
    the figure lengthened to hold it; nothing without entries. The plot keeps its size and its place
    from the top of the figure."""
    width, height = fig.get_size_inches()
    fontsize = _small_points()
    lines = key_lines(entries, int((width - 2 * PAD_INCHES) * 72 / (fontsize * CHAR_EM)))
    if not lines:
        return
    renderer = fig.canvas.get_renderer()
    top = height - fig.get_tightbbox(renderer).y0 + 1.5 * PAD_INCHES  # the key's top, from the figure's top
    key = fig.text(PAD_INCHES / width, 0.0, "\n".join(lines), ha="left", va="top", fontsize=fontsize)
    key_height = key.get_window_extent(renderer).height / fig.dpi
    _extend_figure(fig, bottom=max(0.0, top + key_height + 1.5 * PAD_INCHES - height))
    width, height = fig.get_size_inches()
    key.set_position((PAD_INCHES / width, 1.0 - top / height))


def _small_points() -> float:
    """The size in points of matplotlib's ``small`` font, which labels and legends use."""
    from matplotlib.font_manager import FontProperties

    return FontProperties(size="small").get_size_in_points()


def _extend_figure(fig: Any, right: float = 0.0, bottom: float = 0.0) -> None:
    """Add ``right`` and ``bottom`` inches to a laid-out figure, keeping each axes' size and its place
    from the figure's top-left corner, and so everything anchored to it (labels, a legend)."""
    if right <= 0 and bottom <= 0:
        return
    width, height = fig.get_size_inches()
    boxes = [(ax, ax.get_position()) for ax in fig.axes]
    new_width, new_height = width + right, height + bottom
    fig.set_size_inches(new_width, new_height)
    for ax, box in boxes:
        ax.set_position([box.x0 * width / new_width, (box.y0 * height + bottom) / new_height,
                         box.width * width / new_width, box.height * height / new_height])


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
