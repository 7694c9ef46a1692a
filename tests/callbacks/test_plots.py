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
