"""PNG pictures of a run: per-task accuracy curves and layer x expert heatmaps.

Matplotlib is imported only when a picture is drawn, and only its object-oriented API is used (a `Figure` rendered by
the Agg canvas, no pyplot): importing the package needs no display, and a user's own pyplot backend and open figures
are left alone. Files are written atomically, so a viewer never sees half a PNG.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from malora_lightning.atomic import atomic_write_bytes
from malora_lightning.callbacks.per_task_metrics import Evaluation

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PLOTS_FOLDER = "plots"


def new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib (`pip install matplotlib`), or pass plots=False to the callback") \
            from error
    return Figure(figsize=(width, height), layout="constrained")


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def plot_task_curves(evaluations: Sequence[Evaluation], path: Path, chance: Mapping[str, float | None],
                     baseline: Mapping[str, float] | None = None) -> Path:
    """Accuracy of every task against the training step, the macro average in black.

    Dotted lines are chance rates, dashed lines single-task baselines (same colour as their task).
    """
    figure = new_figure(8, 4.5)
    axes = figure.subplots()
    tasks = list(dict.fromkeys(name for evaluation in evaluations for name, score in evaluation.tasks.items()
                               if score.accuracy is not None))
    for index, name in enumerate(tasks):
        points = [(e.step, e.tasks[name].accuracy) for e in evaluations
                  if name in e.tasks and e.tasks[name].accuracy is not None]
        colour = f"C{index % 10}"
        axes.plot([step for step, _ in points], [100 * value for _, value in points], marker="o", color=colour,
                  label=name)
        if chance.get(name) is not None:
            axes.axhline(100 * chance[name], color=colour, linestyle=":", linewidth=1)
        if baseline and name in baseline:
            axes.axhline(100 * baseline[name], color=colour, linestyle="--", linewidth=1)
    macro = [(e.step, e.macro_accuracy) for e in evaluations if e.macro_accuracy is not None]
    axes.plot([step for step, _ in macro], [100 * value for _, value in macro], color="black", linewidth=2.5,
              label="macro average")
    if any(value is not None for value in chance.values()):
        axes.plot([], [], color="grey", linestyle=":", label="chance")
    if baseline:
        axes.plot([], [], color="grey", linestyle="--", label="single-task baseline")
    axes.set(xlabel="training step", ylabel="accuracy (%)", title="Validation accuracy per task")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5))
    return save_figure(figure, path)


def plot_layer_heatmap(values: Sequence[Sequence[float]], layer_names: Sequence[str], groups: Sequence[str],
                       experts: int, title: str, colour_label: str, path: Path) -> Path:
    """One row per layer; columns are `experts` per group (e.g. one group per task), separated by white lines."""
    rows = len(layer_names)
    columns = len(groups) * experts
    height = min(60.0, 2.0 + 0.16 * rows)
    figure = new_figure(min(24.0, 3.0 + 0.3 * columns), height)
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    axes.set_yticks(range(rows), labels=layer_names, fontsize=6 if rows > 24 else 8)
    if len(groups) > 1:
        for boundary in range(1, len(groups)):
            axes.axvline(boundary * experts - 0.5, color="white", linewidth=2)
        axes.set_xticks([g * experts + (experts - 1) / 2 for g in range(len(groups))], labels=groups, rotation=30,
                        ha="right")
    else:
        axes.set_xticks(range(experts))
        axes.set_xlabel("expert")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label=colour_label, shrink=min(1.0, 6.0 / height))
    return save_figure(figure, path)
