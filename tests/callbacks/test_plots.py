"""The pictures stay readable and bounded in size with many tasks and layers (drawn from hand-built figures)."""

import random
import warnings
from pathlib import Path

import pytest

from malora_lightning.callbacks import Evaluation, TaskScore, plots

pytest.importorskip("matplotlib")


@pytest.fixture
def drawn(monkeypatch):
    """The figures the plotting functions save, in order; any warning while drawing them is an error."""
    figures = []
    save = plots.save_figure

    def keep(figure, path: Path) -> Path:
        figures.append(figure)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            return save(figure, path)

    monkeypatch.setattr(plots, "save_figure", keep)
    return figures


def history(tasks: list[str], steps: int = 4) -> list[Evaluation]:
    generator = random.Random(0)
    return [Evaluation(stage="val", step=10 * step, sanity_check=False,
                       tasks={name: TaskScore(loss=1.0, accuracy=generator.random(), count=8) for name in tasks})
            for step in range(steps)]


def legend_names(figure) -> list[str]:
    return [text.get_text() for text in figure.axes[0].get_legend().get_texts()]


def test_accuracy_curves_of_a_few_tasks_name_every_task(tmp_path, drawn):
    tasks = [f"task_{index}" for index in range(4)]
    plots.plot_task_curves(history(tasks), tmp_path / "curves.png", {name: 0.25 for name in tasks}, {"task_0": 0.5})
    assert legend_names(drawn[0]) == [*tasks, "macro average", "chance", "single-task baseline"]


def test_accuracy_curves_of_200_tasks_name_the_best_and_worst_in_a_bounded_legend(tmp_path, drawn):
    tasks = [f"task_{index:03d}" for index in range(200)]
    evaluations = history(tasks)
    plots.plot_task_curves(evaluations, tmp_path / "curves.png", {name: 0.25 for name in tasks},
                           {name: 0.5 for name in tasks})  # was: 2 constrained_layout warnings, 200 entries cut off
    figure = drawn[0]
    assert tuple(figure.get_size_inches()) == (8, 4.5)
    ranked = sorted(tasks, key=lambda name: evaluations[-1].tasks[name].accuracy, reverse=True)
    named = ranked[:plots.NAMED_EXTREMES] + ranked[-plots.NAMED_EXTREMES:]
    assert legend_names(figure) == ["the other 194 tasks", *named, "macro average", "chance", "single-task baseline"]
    colours = [line.get_color() for line in figure.axes[0].get_lines() if line.get_label() in named]
    assert len(set(colours)) == len(named)  # each named task its own colour


def layer_names(blocks: int) -> list[str]:
    return [f"model.layers.{block}.{proj}" for block in range(blocks)
            for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                         "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def row_labels(axes) -> list[str]:
    return [label.get_text() for label in axes.get_yticklabels()]


def test_a_routing_picture_of_many_tasks_is_capped_in_height_and_names_every_task(tmp_path, drawn, monkeypatch):
    """Uncapped, 200 tasks made it 115 in (11,500 px) tall; a lower cap shows the same with fewer (slow) labels."""
    monkeypatch.setattr(plots, "MOST_INCHES", 12.0)
    generator = random.Random(0)
    tasks = [f"task_{index:03d}" for index in range(30)]  # 19.8 in uncapped
    names = layer_names(2)  # the height follows the tasks
    divergence = [[generator.random() for _ in names] for _ in tasks]
    details = [(name, 0.5, [[generator.random() for _ in range(8)] for _ in tasks]) for name in names[:4]]
    plots.plot_task_routing(divergence, names, tasks, details, "routing", tmp_path / "routing.png")
    figure = drawn[0]
    assert figure.get_size_inches()[1] == plots.MOST_INCHES
    kl_map, first_panel = figure.subfigs[0].axes[0], figure.subfigs[1].axes[0]
    assert row_labels(kl_map) == row_labels(first_panel) == tasks


def test_rows_too_many_for_the_cap_are_named_in_part_and_the_axis_says_so(tmp_path, drawn, monkeypatch):
    monkeypatch.setattr(plots, "MOST_INCHES", 12.0)  # a lower cap: fewer rows (tick labels are slow to draw) exceed it
    names = layer_names(24)  # 168 routed layers
    plots.plot_layer_heatmap([[1.0] * 8 for _ in names], names, ["all tasks"], 8, "load", "load / even share",
                             tmp_path / "load.png")
    figure, = drawn
    axes = figure.axes[0]
    assert figure.get_size_inches()[1] == plots.MOST_INCHES
    labels = row_labels(axes)
    assert labels == names[::2] and axes.get_ylabel() == "layer (1 in 2 of 168 named)"
    assert len(labels) * 6 / 72 <= axes.get_position().height * plots.MOST_INCHES  # 6 pt labels do not overlap
