"""compare's plots, checked on the matplotlib figures: most from trial rows made here; those about many
trials on one spot, and about the parameters the labels give, from the trials of a search written to a
real MLflow store (SQLite), as compare reads them."""

from __future__ import annotations

import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest
from matplotlib import pyplot as plt

from psmsearch.plot_labels import (KEY_LINES, LABEL_CHARS, LABEL_LINES, KeyEntry, cut_middle, cut_words, group_label,
                                   group_labels, key_lines, short_keys, short_name, trial_list, trial_params)
from psmsearch.report import (LENGTH_METRIC, MEMORY_METRIC, PEAK_MEMORY_METRIC, TrialRow, fixed_differences,
                              objectives_from_parent, plot_params, rank, rows_from_runs)
from psmsearch.report_plots import curves_figure, format_bytes, objectives_figure, stop_note, wants_log_scale, write_plots
from psmsearch.space import Objective

BYTES = "peak_state_bytes_4k"
# Two PSM trials of a few KiB at most and a GPT baseline whose KV cache holds MiBs.
PSM_AND_GPT = [(0.99, 896.0), (0.95, 3968.0), (0.20, 2_129_920.0)]


@pytest.fixture(autouse=True)
def close_figures() -> Iterator[None]:
    yield
    plt.close("all")


def rows(points: list[tuple[float, float]], x: str = "acc_4x", y: str = BYTES) -> list[TrialRow]:
    return [TrialRow(f"s-trial-{i}", "s", "complete", {}, {x: a, y: b}) for i, (a, b) in enumerate(points)]


def figure_axes(points: list[tuple[float, float]], objectives: list[Objective]) -> Any:
    x, y = (o.metric for o in objectives) if len(objectives) == 2 else ("acc_4x", objectives[0].metric)
    return objectives_figure(rank(rows(points, x, y), objectives), objectives).axes[0]


def tick_labels(axis: Any) -> list[str]:
    axis.figure.canvas.draw()
    return [t.get_text() for t in axis.get_ticklabels() if t.get_text()]


@pytest.mark.parametrize("bytes_first", [False, True])
def test_a_bytes_objective_spanning_over_100x_is_on_a_log_axis_labelled_in_binary_units(bytes_first: bool) -> None:
    """With a GPT baseline the bytes axis ran to MiBs linearly and every PSM trial sat at "0.0"."""
    acc, memory = Objective(metric="acc_4x"), Objective(metric=BYTES, direction="minimize")
    objectives = [memory, acc] if bytes_first else [acc, memory]
    points = [(b, a) for a, b in PSM_AND_GPT] if bytes_first else PSM_AND_GPT
    ax = figure_axes(points, objectives)
    bytes_axis, acc_axis = (ax.xaxis, ax.yaxis) if bytes_first else (ax.yaxis, ax.xaxis)
    assert (bytes_axis.get_scale(), acc_axis.get_scale()) == ("log", "linear")
    labels = tick_labels(bytes_axis)
    assert len(labels) >= 3 and all(label.split()[-1] in ("B", "KiB", "MiB") for label in labels), labels
    assert {"1 KiB", "1 MiB"} <= set(labels), labels
    along = 0 if bytes_first else 1
    small, large = (ax.transData.transform(p)[along] for p in (points[0], points[1]))
    assert abs(large - small) > 30, "896 B and 3,968 B are drawn apart (pixels)"


def test_byte_labels_and_which_values_go_on_a_log_axis() -> None:
    assert [format_bytes(v) for v in (0, 896, 1024, 3968, 12_032, 2_129_920, 1023 * 1024)] == \
        ["0 B", "896 B", "1 KiB", "3.88 KiB", "11.8 KiB", "2.03 MiB", "1023 KiB"]
    assert wants_log_scale([896, 2_129_920]) and wants_log_scale([0.01, 5.0])
    assert not wants_log_scale([896, 3968])  # 4.4x: linear
    assert not wants_log_scale([0.0, 2_129_920]) and not wants_log_scale([-1.0, 500.0])  # a log axis cannot show them


def test_a_narrow_bytes_objective_stays_linear_with_ticks_at_round_binary_units() -> None:
    ax = figure_axes([(0.9, 12_032.0), (0.5, 40_704.0)], [Objective(metric="acc_4x"), Objective(metric=BYTES, direction="minimize")])
    assert ax.get_yscale() == "linear"
    labels = tick_labels(ax.yaxis)
    assert all(label.endswith(" KiB") and float(label.split()[0]) % 5 == 0 for label in labels), labels


def test_one_wide_bytes_objective_draws_its_bars_on_a_log_axis() -> None:
    ax = figure_axes(PSM_AND_GPT, [Objective(metric=BYTES, direction="minimize")])
    assert ax.get_yscale() == "log"
    assert all(label.split()[-1] in ("B", "KiB", "MiB") for label in tick_labels(ax.yaxis))


def front_line(ax: Any) -> list[tuple[float, float]]:
    (line,) = [line for line in ax.get_lines() if line.get_label() == "Pareto front"]
    assert line.get_drawstyle() == "default", "the vertices themselves are the steps"
    return [tuple(p) for p in line.get_xydata()]


def weakly_dominates(a: tuple[float, float], b: tuple[float, float], signs: tuple[float, float]) -> bool:
    return all(s * ai >= s * bi for s, ai, bi in zip(signs, a, b))


@pytest.mark.parametrize("x_direction", ["maximize", "minimize"])
@pytest.mark.parametrize("y_direction", ["maximize", "minimize"])
def test_the_pareto_front_is_a_staircase_through_the_corners_it_attains(x_direction: str, y_direction: str) -> None:
    """A straight segment between two front trials drew trade-offs that no trial reaches; the front
    of two objectives is a step function whose corners each front neighbour matches or beats."""
    signs = tuple(1.0 if d == "maximize" else -1.0 for d in (x_direction, y_direction))
    # A front (1,5) (2,3) (4,1) and a dominated point, for maximize/maximize; mirrored for minimize.
    base = [(1.0, 5.0), (2.0, 3.0), (4.0, 1.0), (1.5, 1.5)]
    points = [(x if signs[0] > 0 else 10 - x, y if signs[1] > 0 else 10 - y) for x, y in base]
    ax = figure_axes(points, [Objective(metric="a", direction=x_direction), Objective(metric="b", direction=y_direction)])
    vertices = front_line(ax)
    front = sorted(points[:3])
    assert vertices[0::2] == front and len(vertices) == 2 * len(front) - 1
    segments = list(zip(vertices, vertices[1:]))
    assert all((p[0] == q[0]) != (p[1] == q[1]) for p, q in segments), f"only horizontal or vertical steps: {vertices}"
    for before, corner, after in zip(vertices[0::2], vertices[1::2], vertices[2::2]):
        assert weakly_dominates(before, corner, signs) and weakly_dominates(after, corner, signs), vertices


def test_a_pruned_or_failed_trial_is_dashed_and_named_how_it_stopped_in_accuracy_vs_length() -> None:
    """accuracy_vs_length drew a pruned trial's early evaluation as if it were a result; objectives.png
    and memory_vs_n.png leave it out, so here it is set apart (and never merged with a finished curve)."""
    curve = {"acc_1x": 0.4, "acc_2x": 0.3, "acc_4x": 0.2}
    trials = [
        TrialRow("s-trial-0", "s", "complete", {}, {**curve, "acc_4x": 0.9, "state_bytes_1k": 896.0}),
        TrialRow("s-trial-1", "s", "complete", {}, {**curve, "state_bytes_1k": 896.0}),
        TrialRow("s-trial-2", "s", "pruned", {}, curve, error="pruned at step 200 with acc_4x=0.2 (median rule)"),
        TrialRow("s-trial-3", "s", "failed", {}, {**curve, "acc_4x": 0.1}, error="loss is nan"),
    ]
    ranked = rank(trials, [Objective(metric="acc_4x")])
    ax = curves_figure(ranked, LENGTH_METRIC, "length", "accuracy", bytes_y=False).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == ["trial 0", "trial 1", "trial 2 (pruned at step 200)", "trial 3 (failed)"]
    lines = {line.get_label(): line for line in ax.get_lines()}
    for label in labels[2:]:
        assert (lines[label].get_linestyle(), lines[label].get_markerfacecolor()) == ("--", "none"), label
    assert all(lines[label].get_linestyle() != "--" for label in labels[:2])
    memory_ax = curves_figure(ranked, MEMORY_METRIC, "n", "bytes", bytes_y=True).axes[0]
    assert [t.get_text() for t in memory_ax.get_legend().get_texts()] == ["trials 0, 1"]
    scatter = objectives_figure(ranked, [Objective(metric="acc_4x")]).axes[0]
    assert [t.get_text() for t in scatter.get_xticklabels()] == ["trial 0", "trial 1"]


def test_a_stop_note_takes_the_step_from_either_drivers_wording() -> None:
    def note(status: str, error: str) -> str:
        return stop_note(TrialRow("s-trial-0", "s", status, {}, {}, error=error))

    assert note("pruned", "pruned at step 200 with acc_4x=0.1959 (median rule)") == "pruned at step 200"
    assert note("pruned", "stopped by ASHA at step 300") == "pruned at step 300"
    assert (note("pruned", "pruned"), note("failed", "loss is nan"), note("complete", "")) == ("pruned", "failed", "")


@pytest.mark.parametrize(("memory", "scale"), [
    ({"state_bytes_1k": 2816.0, "state_bytes_4k": 2816.0}, "linear"),           # a PSM's constant state
    ({"state_bytes_1k": 266_240.0, "state_bytes_4k": 1_064_960.0}, "log"),      # with a KV cache beside it
])
def test_memory_vs_n_labels_bytes_in_binary_units(memory: dict[str, float], scale: str) -> None:
    """memory_vs_n.png labelled its axis 3x10^3; it now scales and labels bytes as objectives.png does."""
    trials = [TrialRow("s-trial-0", "s", "complete", {}, {"state_bytes_1k": 896.0, "state_bytes_4k": 896.0}),
              TrialRow("s-trial-1", "s", "complete", {}, memory)]
    ax = curves_figure(trials, MEMORY_METRIC, "n", "bytes", bytes_y=True).axes[0]
    assert ax.get_yscale() == scale
    labels = tick_labels(ax.yaxis)
    assert labels and all(label.endswith(("B", "KiB", "MiB")) for label in labels), labels


# Many trials on one spot: a search of 41 trials in a real MLflow store. 30 of them (every number but
# 1, 5, 9, ...: not one run of consecutive numbers) solve the task with the same state size, so they
# share one point of objectives.png and one curve of each curves plot; 10 others are spread out; the
# last one was pruned.
SEARCH = "crowded"
COINCIDING = [i for i in range(40) if i % 4 != 1]
SPREAD = [i for i in range(40) if i % 4 == 1]
PRUNED = 40
LONGEST_LABEL = 40  # characters: a label that names more trials than that says how many it leaves out
MIN_AXES_FRACTION = 0.6  # of the figure's width and height, whatever the number of trials


def trial_metrics(number: int) -> dict[str, float]:
    if number in COINCIDING:
        return {"acc_1x": 1.0, "acc_2x": 1.0, "acc_4x": 1.0, "peak_state_bytes_1k": 6144.0, "peak_state_bytes_4k": 6144.0}
    if number == PRUNED:
        return {"acc_1x": 0.5, "acc_2x": 0.3, "acc_4x": 0.2}
    k = SPREAD.index(number)
    acc = 0.3 + 0.06 * k
    memory = 1024.0 * (1 + k % 5)
    return {"acc_1x": 1.0, "acc_2x": (1 + acc) / 2, "acc_4x": acc, "peak_state_bytes_1k": memory, "peak_state_bytes_4k": memory}


TWO_OBJECTIVES = [{"metric": "acc_4x", "direction": "maximize"}, {"metric": "peak_state_bytes_4k", "direction": "minimize"}]
Trial = tuple[dict[str, Any], dict[str, float], str]  # a trial's logged params, its metrics and its status


def tracked_search(path: Path, name: str, trials: list[Trial], objectives: list[dict[str, str]] = TWO_OBJECTIVES
                   ) -> tuple[list[TrialRow], list[Objective]]:
    """Write a search's trials (numbered in order) to an MLflow store at ``path`` as a search does, and
    read them back as compare does: ranked rows and the search's objectives."""
    from psmsearch.tracking import Tracker

    tracker = Tracker(f"sqlite:///{path / 'mlflow.db'}", name)
    parent = tracker.parent_run(name, {}, {"objectives": objectives})
    for number, (params, metrics, status) in enumerate(trials):
        run = tracker.trial_run(parent, name, number, params, {})
        tracker.log_metrics(run, metrics)
        pruned = {"psmsearch.error": "pruned at step 200 with acc_4x=0.2 (median rule)"} if status == "pruned" else {}
        tracker.set_tags(run, {"psmsearch.status": status, **pruned})
        tracker.finish(run)
    tracker.finish(parent)
    [search] = tracker.runs(name, kind="search")
    read_objectives = objectives_from_parent(search)
    rows = rows_from_runs(tracker.runs(name, parent=search.info.run_id))
    assert len(rows) == len(trials)
    return rank(rows, read_objectives), read_objectives


@pytest.fixture(scope="module")
def crowded(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[TrialRow], list[Objective]]:
    """The search's trials as compare reads them back from MLflow (ranked), and its objectives."""
    return tracked_search(tmp_path_factory.mktemp("mlflow"), SEARCH, [
        ({"search.model.chunk_size": chunk_size(number)}, trial_metrics(number), "pruned" if number == PRUNED else "complete")
        for number in [*range(40), PRUNED]])


def chunk_size(number: int) -> int:
    """The crowded search's one parameter, which tells apart trials that share a point."""
    return 2 + number % 3


def only(rows: list[TrialRow], numbers: list[int]) -> list[TrialRow]:
    return [row for row in rows if int(row.name.rsplit("-", 1)[1]) in numbers]


def axes_inches(fig: Any) -> tuple[float, float]:
    fig.canvas.draw()
    box, (width, height) = fig.axes[0].get_position(), fig.get_size_inches()
    return box.width * width, box.height * height


def assert_plot_keeps_its_size(fig: Any, baseline: Any) -> None:
    """The plot is as large (inches) as when each of its points or curves is one trial's, and a large
    part of the figure."""
    assert axes_inches(fig) == pytest.approx(axes_inches(baseline), rel=0.01)
    box = fig.axes[0].get_position()
    assert box.width >= MIN_AXES_FRACTION and box.height >= MIN_AXES_FRACTION, box


def assert_inside(inner: Any, outer: Any, what: str) -> None:
    assert outer.x0 - 0.5 <= inner.x0 and inner.x1 <= outer.x1 + 0.5 and outer.y0 - 0.5 <= inner.y0 and \
        inner.y1 <= outer.y1 + 0.5, f"{what} {inner} is not inside {outer}"


def assert_nothing_off_the_figure(fig: Any) -> None:
    """Everything drawn (plot, ticks, axis labels, title, legend, key) lies inside the figure."""
    fig.canvas.draw()
    (width, height), drawn = fig.get_size_inches(), fig.get_tightbbox(fig.canvas.get_renderer())
    assert -0.01 <= drawn.x0 and drawn.x1 <= width + 0.01 and -0.01 <= drawn.y0 and drawn.y1 <= height + 0.01, \
        f"drawn over {drawn.bounds} (inches), the figure is {width} x {height}"


def assert_bounded(label: str, longest: int = LONGEST_LABEL) -> None:
    lines = label.split("\n")
    assert len(lines) <= LABEL_LINES and all(len(line) <= longest for line in lines), label


def named_trials(texts: list[str]) -> set[int]:
    """The trial numbers the texts name: ``trial 4``, ``trials 0, 2–4, 6`` (a key entry wrapped over
    lines included); ``(+N more)`` names none."""
    numbers: set[int] = set()
    for text in texts:
        for listed in re.findall(r"trials? ([\d, –]+)", re.sub(r"\n\s+", " ", text)):
            for item in filter(None, (part.strip() for part in listed.split(","))):
                first, _, last = item.partition("–")
                numbers.update(range(int(first), int(last or first) + 1))
    return numbers


def figure_texts(fig: Any) -> list[str]:
    return [text.get_text() for text in fig.texts]


@pytest.mark.parametrize("coinciding", [8, 30])
def test_objectives_plot_keeps_its_size_when_many_trials_share_a_point(crowded, coinciding: int) -> None:
    """All the coinciding trials' names were joined on their point: with 8 the label made tight_layout
    shrink the plot to 0.29 of the figure's width (0.12 with 10), from 12 on tight_layout gave up and
    the label ran off the figure. Labels are now bounded and inside the plot, which keeps its size."""
    rows, objectives = crowded
    fig = objectives_figure(only(rows, SPREAD + COINCIDING[:coinciding]), objectives)
    baseline = objectives_figure(only(rows, SPREAD + COINCIDING[:1]), objectives)  # the same points, one trial each
    assert_plot_keeps_its_size(fig, baseline)
    assert_nothing_off_the_figure(fig)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    boxes = [label.get_window_extent(renderer) for label in ax.texts]
    for label, box in zip(ax.texts, boxes):
        assert_bounded(label.get_text())
        assert_inside(box, ax.get_window_extent(renderer), repr(label.get_text()))
    assert not any(a.overlaps(b) for i, a in enumerate(boxes) for b in boxes[i + 1:]), "labels overlap"


def test_every_trial_on_the_objectives_plot_is_named_on_its_point_or_in_the_key(crowded) -> None:
    rows, objectives = crowded
    fig = objectives_figure(rows, objectives)
    point_labels = [label.get_text() for label in fig.axes[0].texts]
    assert named_trials(point_labels + figure_texts(fig)) == set(range(40)), "each complete trial, the pruned one left out"
    [crowded_label] = [text for text in point_labels if "more)" in text]
    key, _, shown = crowded_label.partition(": ")
    assert re.fullmatch(r"[A-Z]", key) and re.fullmatch(r"trials [\d, –]+ \(\+\d+ more\)", shown), crowded_label
    [key_text] = figure_texts(fig)
    assert named_trials([key_text]) == set(COINCIDING), key_text
    assert key_text.startswith(f"{key}: trials 0, 3, 6, 12,"), "the key lists the point's trials by chunk size"
    parts = re.sub(r"\n\s+", " ", key_text).removeprefix(f"{key}: ").split("; ")
    assert sorted(part.rpartition(": ")[2] for part in parts) == ["c=2", "c=3", "c=4"], parts
    for part in parts:
        trials, _, params = part.rpartition(": ")
        assert {f"c={chunk_size(n)}" for n in named_trials([trials])} == {params}, part


@pytest.mark.parametrize("coinciding", [12, 30])
@pytest.mark.parametrize(("pattern", "bytes_y"), [(LENGTH_METRIC, False), (PEAK_MEMORY_METRIC, True)],
                         ids=["accuracy_vs_length", "memory_vs_n"])
def test_curves_keep_the_plot_clear_and_its_size_when_many_trials_share_a_curve(crowded, pattern: Any, bytes_y: bool,
                                                                                coinciding: int) -> None:
    """accuracy_vs_length and memory_vs_n named coinciding trials ``trial 0 = trial 2 = ...`` in a
    legend inside the plot, over the lines; the legend grew with the number of trials and the plot
    shrank (to 0.46 of the figure's width with 12; from 20 on tight_layout gave up). The legend is
    now beside the plot, its entries bounded, and the key names every trial."""
    rows, _ = crowded
    fig = curves_figure(only(rows, SPREAD + COINCIDING[:coinciding] + [PRUNED]), pattern, "n", "y", bytes_y)
    baseline = curves_figure(only(rows, SPREAD + COINCIDING[:1] + [PRUNED]), pattern, "n", "y", bytes_y)  # the same curves
    assert_plot_keeps_its_size(fig, baseline)
    assert_nothing_off_the_figure(fig)
    ax = fig.axes[0]
    renderer = fig.canvas.get_renderer()
    legend = ax.get_legend()
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1, "the legend covers the plot"
    entries = [text.get_text() for text in legend.get_texts()]
    for entry in entries:
        assert_bounded(entry)
    drawn = set(SPREAD + COINCIDING[:coinciding]) | ({PRUNED} if pattern is LENGTH_METRIC else set())
    assert named_trials(entries + figure_texts(fig)) == drawn
    assert f"trial {PRUNED}: c=3 (pruned at step 200)" in entries or pattern is not LENGTH_METRIC


def test_curves_keep_the_best_distinct_curves_and_name_every_trial_on_them(crowded) -> None:
    """``top`` counted trials, so the 30 trials of one curve took its places, and the legend named
    only the first of them: it now counts curves."""
    rows, _ = crowded
    fig = curves_figure(rows, PEAK_MEMORY_METRIC, "n", "bytes", bytes_y=True, top=2)
    ax = fig.axes[0]
    assert len(ax.get_lines()) == 2
    entries = [text.get_text() for text in ax.get_legend().get_texts()]
    assert named_trials(entries + figure_texts(fig)) == set(COINCIDING) | {17, 37}, entries  # 17 and 37: same memory


def test_one_objective_names_every_bar_without_overlap_and_keeps_the_plot(crowded) -> None:
    """40 bars' names overlapped on a 6-inch figure: the figure widens with the bars instead."""
    rows, objectives = crowded
    fig = objectives_figure(rows, objectives[:1])
    baseline = objectives_figure(only(rows, SPREAD[:3]), objectives[:1])
    assert_nothing_off_the_figure(fig)
    fig.canvas.draw()
    ax = fig.axes[0]
    width, height = axes_inches(fig)
    assert width >= axes_inches(baseline)[0] and height >= 0.95 * axes_inches(baseline)[1]
    assert ax.get_position().height >= MIN_AXES_FRACTION
    renderer = fig.canvas.get_renderer()
    ticks = [t for t in ax.get_xticklabels() if t.get_text()]
    assert named_trials([t.get_text() for t in ticks]) == set(range(40))
    boxes = [t.get_window_extent(renderer) for t in ticks]
    assert not any(a.overlaps(b) for a, b in zip(boxes, boxes[1:])), "bar names overlap"


@pytest.mark.filterwarnings("error::UserWarning")  # matplotlib's "Tight layout not applied": a label did not fit
def test_write_plots_writes_the_crowded_search_without_a_layout_warning(crowded, tmp_path: Path) -> None:
    rows, objectives = crowded
    written = write_plots(rows, objectives, tmp_path)
    assert [p.name for p in written] == ["objectives.png", "accuracy_vs_length.png", "memory_vs_n.png"]


def test_a_label_names_its_trials_in_bounded_text() -> None:
    consecutive = [f"s-trial-{i}" for i in range(3, 33)]
    spread = [f"s-trial-{i}" for i in range(0, 200, 2)]
    assert trial_list(consecutive, 32) == "trials 3–32"
    assert trial_list(["s-trial-4"], 32) == "trial 4" and trial_list(["s-trial-2", "s-trial-0"], 32) == "trials 0, 2"
    assert trial_list(spread, 32) == "trials 0, 2, 4, 6, 8 (+95 more)"
    assert short_name("0123456789abcdef0123456789abcdef") == "0123456789abcde…" and short_name("s-trial-7") == "trial 7"
    labels = group_labels([["s-trial-1"], spread, consecutive, spread[:50]])
    assert [(label.text, label.key) for label in labels] == [
        ("trial 1", ""), ("A: trials 0, 2, 4, 6 (+96 more)", "A"), ("trials 3–32", ""),
        ("B: trials 0, 2, 4, 6 (+46 more)", "B")]
    assert all(len(label.text) <= 32 for label in labels)


def test_the_key_shares_its_bounded_lines_among_its_entries() -> None:
    many = tuple(f"s-trial-{i}" for i in range(0, 2000, 3))
    lines = key_lines([KeyEntry("A", many), KeyEntry("B", many[:5]), KeyEntry("no room for their labels", many[:40])],
                      width=60)
    assert lines == [  # one line each, then one more in turn to those that need more, while lines are left
        "A: trials 0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36,",
        "   39, 42, 45, 48, 51, 54, 57, 60, 63, 66, 69, 72, 75, 78,",
        "   81, 84, 87, 90, 93, 96, 99, 102, 105, 108 (+630 more)",
        "B: trials 0, 3, 6, 9, 12",
        "no room for their labels: trials 0, 3, 6, 9, 12, 15, 18, 21,",
        "    24, 27, 30, 33, 36, 39, 42, 45, 48, 51, 54 (+21 more)"]
    overflowing = key_lines([KeyEntry(chr(65 + i), many[:3]) for i in range(9)], width=60)
    assert len(overflowing) == 6 and overflowing[-1].startswith("… 4 more:"), overflowing


def test_a_trial_is_described_by_the_parameters_that_tell_it_apart() -> None:
    """Only what differs among the trials given, names shortened, components by name where that is
    unambiguous, components first; a parameter a trial lacks (a GPT's chunk size) differs too."""
    grid = {f"s-trial-{i}": {"model.aggregator": aggregator, "model.chunk_size": size, "train.lr": "0.003"}
            for i, (aggregator, size) in enumerate([("attention", "16"), ("mlp", "16"), ("attention", "4")])}
    assert trial_params(grid) == {"s-trial-0": "attention c=16", "s-trial-1": "mlp c=16", "s-trial-2": "attention c=4"}
    assert trial_params({"a": {"model.kind": "gpt"}, "b": {"model.kind": "psm", "model.chunk_size": "4"}}) == \
        {"a": "gpt", "b": "psm c=4"}
    # "attention" could be the aggregator or the head: both are named
    assert trial_params({"a": {"model.aggregator": "attention", "model.head": "linear"},
                         "b": {"model.aggregator": "mlp", "model.head": "attention"}}) == \
        {"a": "aggregator=attention head=linear", "b": "aggregator=mlp head=attention"}
    assert trial_params({"a": {"model.encoder": "linear_readout_diag", "task.path": "/data/x"},
                         "b": {"model.encoder": "linear_readout_dense", "task.path": "/data/y"}}) == \
        {"a": "linear_r…ut_diag path=/data/x", "b": "linear_r…t_dense path=/data/y"}
    assert trial_params({"only": {"model.chunk_size": "4"}}) == {"only": ""}


def test_parameter_names_are_short_and_distinct() -> None:
    keys = ["model.n_layers", "model.aggregator.attention.layers", "model.head.attention.layers", "model.chunk_size",
            "train.lr", "model.d_model", "seed"]
    assert short_keys(keys) == {"model.n_layers": "n_layers", "model.aggregator.attention.layers": "aggregator.layers",
                                "model.head.attention.layers": "head.layers", "model.chunk_size": "c", "train.lr": "lr",
                                "model.d_model": "d", "seed": "seed"}
    assert short_keys(["model.n_layers", "train.lr"]) == {"model.n_layers": "layers", "train.lr": "lr"}


def test_values_and_parameters_are_cut_around_an_ellipsis() -> None:
    assert cut_middle("linear_readout_diag", 16) == "linear_r…ut_diag" and cut_middle("attention", 16) == "attention"
    assert cut_words("psm pool aggregator=affine_dense head=attention", 20) == "psm pool …"
    assert cut_words("aggregator=affine_dense", 10) == "aggregato…" and cut_words("c=4", 10) == "c=4"


def test_a_label_gives_its_trials_parameters_in_bounded_text() -> None:
    params = {"s-trial-0": "attention c=16", "s-trial-1": "mlp c=4", "s-trial-2": "mlp c=4",
              "s-trial-3": "psm gla aggregator=affine_dense head=linear_readout c=2 lr=0.003",
              **{f"s-trial-{i}": f"c={i % 3}" for i in range(4, 40)}}

    def label(numbers: list[int], lines: int = LABEL_LINES) -> tuple[str, str, list[str]]:
        """The label's text, its key letter and the key's lines for it."""
        made = group_label([f"s-trial-{i}" for i in numbers], "A", params=params, lines=lines)
        return made.text, made.key, key_lines([made.entry] if made.entry else [], width=60)

    assert label([0]) == ("trial 0: attention c=16", "", [])
    assert label([1, 2]) == ("trials 1, 2: mlp c=4", "", [])
    assert label([0, 1]) == ("trial 0: attention c=16\ntrial 1: mlp c=4", "", [])  # a line each
    whole = ["trial 3: psm gla aggregator=affine_dense head=linear_readout", "    c=2 lr=0.003"]
    assert label([3]) == ("trial 3\npsm gla …", "", whole)  # cut on the plot, whole in the key
    assert label([3], lines=1) == ("trial 3: psm gla …", "", whole)
    assert label([0, 1, 2]) == ("A: trials 0–2", "A", ["A: trial 0: attention c=16; trials 1, 2: mlp c=4"])
    assert label([*range(4, 40, 2), 1]) == ("A: trials 1, 4, 6, 8 (+15 more)", "A", [
        "A: trials 4, 10, 16, 22, 28, 34: c=1; trials 6, 12, 18, 24,",
        "   30, 36: c=0; trials 8, 14, 20, 26, 32, 38: c=2;",
        "   trial 1: mlp c=4"])
    assert label([*range(4, 40, 3)]) == ("A: trials 4, 7, 10, 13 (+8 more)\nc=1", "A",
                                         ["A: trials 4, 7, 10, 13, 16, 19, 22, 25, 28, 31, 34, 37: c=1"])


def test_a_key_entry_cut_to_its_lines_says_so() -> None:
    names = tuple(f"s-trial-{i}" for i in range(30))
    entry = KeyEntry("A", names, {name: f"psm gla aggregator=affine_dense head=linear_readout lr=0.00{i}"
                                  for i, name in enumerate(names)})
    assert key_lines([entry], width=60, max_lines=1) == ["A: trial 0: psm gla aggregator=affine_dense …; (+29 more)"]
    assert key_lines([entry], width=60, max_lines=2) == ["A: trial 0: psm gla aggregator=affine_dense",
                                                         "   head=linear_readout lr=0.000; (+29 more)"]


# A grid search in a real MLflow store, logged as a search logs it: every trial's flat parameters and
# the searched ones (search.*). Trial n is GRID[n]. The three at chunk size 64 stay at chance with one
# state size and share a point and a curve; so do trials 6 and 10 (mlp and gla at 16).
AGGREGATORS = ("attention", "mlp", "gla")
GRID = [(aggregator, size) for aggregator in AGGREGATORS for size in (1, 4, 16, 64)]
AT_CHANCE = [3, 7, 11]
PAIR = [6, 10]
SINGLE = [n for n in range(12) if n not in AT_CHANCE + PAIR]


def grid_trial(number: int) -> Trial:
    aggregator, size = GRID[number]
    if size == 64:
        acc, memory = 0.2, 65536.0
    elif number in PAIR:
        acc, memory = 0.5, 16384.0
    else:
        acc, memory = 0.96 - 0.05 * number, 512.0 * size * (1 + AGGREGATORS.index(aggregator))
    params = {"task": "group", "model.d_model": 64, "train.lr": 0.003, "model.aggregator": aggregator,
              "model.chunk_size": size, "search.model.aggregator": aggregator, "search.model.chunk_size": size}
    return params, {"acc_1x": 1.0, "acc_2x": (1 + acc) / 2, "acc_4x": acc, "peak_state_bytes_1k": memory,
                    "peak_state_bytes_4k": memory}, "complete"


def described(number: int) -> str:
    """How the grid's plots name trial ``number`` among all twelve."""
    aggregator, size = GRID[number]
    return f"trial {number}: {aggregator} c={size}"


@pytest.fixture(scope="module")
def grid(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[TrialRow], list[Objective]]:
    return tracked_search(tmp_path_factory.mktemp("grid"), "grid", [grid_trial(n) for n in range(12)])


def all_texts(fig: Any) -> list[str]:
    """Every text a figure writes about its trials: point labels, legend entries, bar names and the key."""
    ax = fig.axes[0]
    fig.canvas.draw()
    legend = [text.get_text() for text in ax.get_legend().get_texts()] if ax.get_legend() else []
    return [text.get_text() for text in ax.texts] + legend + tick_labels(ax.xaxis) + figure_texts(fig)


def assert_only_what_differs(texts: list[str]) -> None:
    """Parameters every trial shares (task, d_model, lr) and the search.* / model.* paths are never shown."""
    joined = "\n".join(texts)
    for absent in ("group", "d=", "d_model", "lr", "0.003", "search", "model.", "aggregator=", "chunk_size"):
        assert absent not in joined, (absent, texts)


def test_plot_params_takes_the_searched_parameters_as_the_table_formats_them(grid) -> None:
    rows, _ = grid
    params = plot_params(rows)
    assert {params[f"grid-trial-{n}"] for n in (0, 11)} == {"attention c=1", "gla c=64"}
    floats = [TrialRow(f"s-trial-{i}", "s", "complete", {"search.train.lr": lr, "model.d_model": "64"}, {})
              for i, lr in enumerate(["0.0035065754", "0.001"])]
    assert plot_params(floats) == {"s-trial-0": "lr=0.003507", "s-trial-1": "lr=0.001"}
    unsearched = [TrialRow(f"s-trial-{i}", "s", "complete", {"model.chunk_size": size, "seed": "0"}, {})
                  for i, size in enumerate(["4", "8"])]
    assert plot_params(unsearched) == {"s-trial-0": "c=4", "s-trial-1": "c=8"}


def test_plot_params_of_trials_with_and_without_searched_parameters_follow_the_table() -> None:
    """Each row as the table lists it: a trial of another search, with no ``search.*`` parameters, was
    labelled with nothing because another row had some. Values that are not text (API callers) read as text."""
    rows = [TrialRow("a-trial-0", "a", "complete", {"search.model.chunk_size": "4", "model.d_model": "64"}, {}),
            TrialRow("b-trial-0", "b", "complete", {"model.chunk_size": 8, "seed": None}, {})]
    assert plot_params(rows) == {"a-trial-0": "c=4", "b-trial-0": "c=8 seed=None"}


def test_values_that_differ_only_in_their_middle_stay_apart() -> None:
    """Cut to the same text, two paths made two trials read as sharing one value the table shows as two."""
    params = {"s-trial-0": {"task.path": "/data/corpora/wikitext-2/wiki.train.tokens"},
              "s-trial-1": {"task.path": "/data/corpora/wikitext-103/wiki.train.tokens"},
              "s-trial-2": {"task.path": "/data/tiny.txt"}}
    assert trial_params(params) == {"s-trial-0": "path=/data/corpora/wikit…2/wiki.train.tokens",
                                    "s-trial-1": "path=/data/corpora/wikit…3/wiki.train.tokens",
                                    "s-trial-2": "path=/data/tiny.txt"}
    alike = {f"s-trial-{i}": {"model.aggregator": f"my_lab_gated_v{i}_linear_attention"} for i in (2, 3)}
    assert trial_params(alike) == {"s-trial-2": "my_lab_gated_v2…near_attention", "s-trial-3": "my_lab_gated_v3…near_attention"}


def test_the_objectives_plot_says_what_each_trial_is(grid) -> None:
    """Points were labelled ``trial 3`` only: which aggregator and chunk size it was took the table."""
    rows, objectives = grid
    fig = objectives_figure(rows, objectives)
    labels = [text.get_text() for text in fig.axes[0].texts]
    [key] = figure_texts(fig)
    assert_only_what_differs(labels + [key])
    named = "\n".join(labels + [key])
    assert all(described(n) in named for n in SINGLE), (labels, key)
    assert "trial 6: mlp c=16\ntrial 10: gla c=16" in labels, "two coinciding trials, a line each"
    # three coinciding trials that differ: a key letter on the point, the key says what each is
    assert "A: trials 3, 7, 11" in labels
    assert key == "A: trial 3: attention c=64; trial 7: mlp c=64; trial 11: gla c=64", key
    for label in labels:
        assert_bounded(label, LABEL_CHARS)


def test_the_curves_legend_says_what_each_trial_is(grid) -> None:
    rows, _ = grid
    for pattern, bytes_y in ((LENGTH_METRIC, False), (PEAK_MEMORY_METRIC, True)):
        fig = curves_figure(rows, pattern, "n", "y", bytes_y)
        entries = [text.get_text() for text in fig.axes[0].get_legend().get_texts()]
        assert_only_what_differs(entries + figure_texts(fig))
        assert entries == [*(described(n) for n in SINGLE), "trial 6: mlp c=16\ntrial 10: gla c=16", "A: trials 3, 7, 11"]
        assert figure_texts(fig) == ["A: trial 3: attention c=64; trial 7: mlp c=64; trial 11: gla c=64"]


def test_a_parameter_the_trials_on_a_plot_share_is_left_out(grid) -> None:
    """What differs among the trials one plot shows: the curves of the trials of one chunk size name
    their aggregators only, those of one aggregator their chunk sizes only."""
    rows, _ = grid
    one_size = curves_figure(only(rows, [1, 5, 9]), LENGTH_METRIC, "n", "y", False)
    assert [t.get_text() for t in one_size.axes[0].get_legend().get_texts()] == \
        ["trial 1: attention", "trial 5: mlp", "trial 9: gla"]
    one_aggregator = curves_figure(only(rows, [4, 5, 6, 7]), LENGTH_METRIC, "n", "y", False)
    assert [t.get_text() for t in one_aggregator.axes[0].get_legend().get_texts()] == \
        ["trial 4: c=1", "trial 5: c=4", "trial 6: c=16", "trial 7: c=64"]
    best_two = curves_figure(rows, LENGTH_METRIC, "n", "y", False, top=2)  # trials 0 and 1: attention both
    assert [t.get_text() for t in best_two.axes[0].get_legend().get_texts()] == ["trial 0: c=1", "trial 1: c=4"]


def test_the_bars_of_one_objective_say_what_each_trial_is_and_keep_the_plots_height(grid) -> None:
    rows, objectives = grid
    fig = objectives_figure(rows, objectives[:1])
    names = tick_labels(fig.axes[0].xaxis)
    assert sorted(names) == sorted(described(n) for n in range(12))
    baseline = objectives_figure([replace(row, params={}) for row in rows], objectives[:1])
    assert tick_labels(baseline.axes[0].xaxis)[0] == "trial 0"
    assert axes_inches(fig) == pytest.approx(axes_inches(baseline), rel=0.01)
    assert_nothing_off_the_figure(fig)


# Many trials with many parameters and long values (plugin components): 40 trials, 20 of them on one
# point and one curve.
LONG_NAMES = ("my_lab_gated_linear_attention_v2", "my_lab_gated_linear_attention_v3", "attention")


def sprawling_trial(number: int) -> Trial:
    acc, memory = (0.2, 4096.0) if number % 2 else (0.3 + 0.015 * number, 1024.0 + 64 * number)
    params = {"model.aggregator": LONG_NAMES[number % 3], "model.head": LONG_NAMES[(number // 3) % 3],
              "model.encoder": ("embed", "gla", "deltanet")[number % 3 - 1], "model.chunk_size": 2 ** (number % 4),
              "model.aggregator.attention.layers": 1 + number % 2, "train.lr": 0.001 + number * 1.37e-5,
              "task.path": f"/data/corpora/wikitext-{number % 5}/wiki.train.tokens"}
    return ({f"search.{key}": value for key, value in params.items()},
            {"acc_1x": 1.0, "acc_2x": (1 + acc) / 2, "acc_4x": acc, "peak_state_bytes_1k": memory,
             "peak_state_bytes_4k": memory}, "complete")


@pytest.fixture(scope="module")
def sprawling(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[TrialRow], list[Objective]]:
    return tracked_search(tmp_path_factory.mktemp("sprawling"), "sprawling", [sprawling_trial(n) for n in range(40)])


@pytest.mark.parametrize("plot", ["objectives", "one objective", "accuracy_vs_length", "memory_vs_n"])
def test_labels_and_key_stay_bounded_with_many_parameters_and_long_values(sprawling, plot: str) -> None:
    rows, objectives = sprawling

    def figure(shown: list[TrialRow]) -> Any:
        if plot.startswith("o"):
            return objectives_figure(shown, objectives if plot == "objectives" else objectives[:1])
        pattern = LENGTH_METRIC if plot == "accuracy_vs_length" else PEAK_MEMORY_METRIC
        return curves_figure(shown, pattern, "n", "y", pattern is PEAK_MEMORY_METRIC)

    fig = figure(rows)
    assert axes_inches(fig) == pytest.approx(axes_inches(figure([replace(row, params={}) for row in rows])), rel=0.01)
    assert_nothing_off_the_figure(fig)
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts() if t.get_text() != "Pareto front"] \
        if ax.get_legend() else []
    labels = [t.get_text() for t in ax.texts] + legend + tick_labels(ax.xaxis)
    for label in labels:
        assert_bounded(label, LABEL_CHARS)
    assert any("…" in label for label in labels), "long parameters are cut on the plot"
    key = figure_texts(fig)
    assert len(key) == 1 and len(key[0].split("\n")) <= KEY_LINES, key
    assert "my_lab_g…tion_v2" in "\n".join(labels + key), "a long value keeps its start and its end"


def test_fixed_differences_name_settings_two_searches_held_at_different_values() -> None:
    """Two searches ranked together, one trained 150 steps and the other 500: the table compared their
    trials as if only the searched parameters differed. Reported: a setting each search holds fixed, at
    different values. Not reported: a searched one (in either search), one that varies within a search,
    one a search lacks, one equal in both, and where a trial ran (device, threads)."""
    def row(search: str, number: int, **params: str) -> TrialRow:
        return TrialRow(name=f"{search}-trial-{number}", search=search, status="complete", params=params, metrics={})

    rows = [
        row("a", 0, **{"train.steps": "150", "train.lr": "0.01", "search.train.lr": "0.01", "seed": "0",
                       "task.seq_len": "32", "device": "cpu", "model.d_model": "64", "model.n_layers": "2"}),
        row("a", 1, **{"train.steps": "150", "train.lr": "0.02", "search.train.lr": "0.02", "seed": "1",
                       "task.seq_len": "32", "device": "cpu", "model.d_model": "64", "model.n_layers": "2"}),
        row("b", 0, **{"train.steps": "500", "train.lr": "0.005", "seed": "0", "task.seq_len": "32",
                       "device": "cuda", "model.d_model": "64"}),
    ]
    assert fixed_differences(rows) == {"train.steps": {"a": "150", "b": "500"}}
    assert fixed_differences(rows[:2]) == {}, "one search alone differs from nothing"
    # searched under another key: a component's hyperparameter names its component, a choice over several
    # state kinds its kind; metrics.* choose what is measured, not what is trained
    rows = [row("a", 0, **{"search.model.aggregator.mlp.mlp_ratio": "2", "model.aggregator.mlp_ratio": "2",
                           "search.model.encoder-tokens": "embed", "model.encoder": "embed",
                           "metrics.memory_lengths": "[64]"}),
            row("b", 0, **{"search.model.aggregator.mlp.mlp_ratio": "4", "model.aggregator.mlp_ratio": "4",
                           "search.model.encoder-affine-diag": "gla", "model.encoder": "gla",
                           "metrics.memory_lengths": "[1024]"})]
    assert fixed_differences(rows) == {}


def test_bars_of_values_close_together_get_a_zoomed_axis_and_their_values_written() -> None:
    """bpc 4.494 against 4.567 looked equal on an axis from 0 (a walkthrough's plot); the axis now starts
    near the values and says so, and each bar carries its value. Values far apart keep the axis from 0."""
    objectives = [Objective(metric="bpc", direction="minimize")]
    ax = figure_axes([(0.0, 4.494), (0.0, 4.567), (0.0, 4.498)], objectives)
    low, high = ax.get_ylim()
    assert 4.4 < low < 4.494 and 4.567 < high < 4.7
    assert ax.get_ylabel() == "bpc (minimize), axis not from 0"
    assert sorted(text.get_text() for text in ax.texts) == ["4.494", "4.498", "4.567"]
    wide = figure_axes([(0.0, 0.2), (0.0, 0.99)], [Objective(metric="acc_4x", direction="maximize")])
    assert wide.get_ylim()[0] <= 0 and wide.get_ylabel() == "acc_4x (maximize)"


def test_a_label_is_not_placed_against_another() -> None:
    """Two labels side by side abutted and read as one ("trial 1: xattn_gate c=16trial 4: mlp c=16", a
    walkthrough's plot): here a second label whose first choice of side would start 1 point after the
    first label ends must go elsewhere."""
    from psmsearch.report_plots import LABEL_OFFSET_POINTS, _place_label

    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    taken: list[Any] = []
    assert _place_label(ax, (0.05, 0.5), "trial 1: xattn_gate c=16", taken, renderer)
    first = ax.texts[0].get_window_extent(renderer)
    points = fig.dpi / 72
    start = first.x1 + 1 * points - LABEL_OFFSET_POINTS * points  # display x of a point whose label would start there
    second_point = ax.transData.inverted().transform((start, ax.transData.transform((0.05, 0.5))[1]))
    assert second_point[0] < 0.5  # its label's first choice is to the right, at the same height
    _place_label(ax, tuple(second_point), "trial 4: mlp c=16", taken, renderer)
    if len(ax.texts) == 2:
        second = ax.texts[1].get_window_extent(renderer)
        horizontal = max(first.x0, second.x0) - min(first.x1, second.x1)
        vertical = max(first.y0, second.y0) - min(first.y1, second.y1)
        assert max(horizontal, vertical) >= 2 * points, (first, second)
