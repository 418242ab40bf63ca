"""compare's plots, checked on the matplotlib figures built from trial rows made here (no search, no MLflow)."""

from __future__ import annotations

from typing import Any, Iterator

import pytest
from matplotlib import pyplot as plt

from psmsearch.report import (LENGTH_METRIC, MEMORY_METRIC, TrialRow, curves_figure, format_bytes, objectives_figure,
                              rank, stop_note, wants_log_scale)
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
    assert [t.get_text() for t in memory_ax.get_legend().get_texts()] == ["trial 0 = trial 1"]
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
