"""PNG pictures of a run: per-task accuracy curves, layer x expert heatmaps and how each task is routed by depth.

Matplotlib is imported only when a picture is drawn, and only its object-oriented API is used (a `Figure` rendered by
the Agg canvas, no pyplot): importing the package needs no display, and a user's own pyplot backend and open figures
are left alone. Files are written atomically, so a viewer never sees half a PNG. Every PNG carries the text chunk
`PLOT_MARK`, by which a later run knows it may replace it (`refuse_foreign_plot`).
"""

from __future__ import annotations

import io
import math
import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from malora_lightning.atomic import atomic_write_bytes
from malora_lightning.callbacks.per_task_metrics import Evaluation
from malora_lightning.run_paths import OWN_FOLDER, refuse_foreign_file

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

PLOTS_FOLDER = "plots"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# a PNG tEXt chunk (keyword, text) in every picture drawn here
PLOT_MARK = ("Comment", "drawn by malora_lightning, which replaces it in its next run in this folder")
# the tallest picture, in inches (6,000 px at 100 dpi): more rows (layers, tasks) make thinner rows, not a bigger file
MOST_INCHES = 60.0


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks (keyword: text) of PNG `data`; none when it is no PNG."""
    text: dict[str, str] = {}
    position = len(PNG_SIGNATURE) if data.startswith(PNG_SIGNATURE) else len(data)
    while position + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        if kind == b"tEXt":
            keyword, _, value = data[position + 8:position + 8 + length].partition(b"\0")
            text[keyword.decode("latin-1")] = value.decode("latin-1")
        position += length + 12  # length, type, data, CRC
    return text


def is_our_plot(path: Path) -> bool:
    keyword, value = PLOT_MARK
    return png_text(path.read_bytes()).get(keyword) == value


def refuse_foreign_plot(path: Path, writer: str, remedy: str) -> None:
    """Raise FileExistsError when the picture `path` exists without `PLOT_MARK` (a user's, or one drawn before the
    mark existed, which can be deleted), or when its folder is a file (found by the first picture, after training)."""
    if path.parent.is_file():
        raise FileExistsError(f"{path.parent} is a file, where {writer} makes a folder for its pictures: move it, "
                              f"{OWN_FOLDER}, or {remedy}")
    keyword, value = PLOT_MARK
    refuse_foreign_file(path, is_our_plot, writer, f"it lacks the PNG text {keyword}: {value!r}, which every picture "
                        "malora_lightning draws carries; delete it if an earlier version drew it", remedy)


def new_figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("plots need matplotlib (`pip install matplotlib`), or pass plots=False to the callback") \
            from error
    return Figure(figsize=(width, height), layout="constrained")


def rows_height(fixed: float, rows: int, row_inches: float) -> tuple[float, float]:
    """The height of a figure of `rows` rows of `row_inches` each plus `fixed` inches of titles and labels, at most
    `MOST_INCHES`, and the height a row gets in it."""
    height = min(MOST_INCHES, fixed + row_inches * rows)
    return height, (height - fixed) / max(rows, 1)


def label_rows(axes: Axes, labels: Sequence[str], row_inches: float, fontsize: float, noun: str) -> None:
    """Name the rows of `axes`: each one while a row is as tall as the font, else every k-th (labels would overlap),
    and then say so on the axis."""
    stride = max(1, math.ceil(fontsize / 72 / row_inches))
    axes.set_yticks(range(0, len(labels), stride), labels=labels[::stride], fontsize=fontsize)
    if stride > 1:
        axes.set_ylabel(f"{noun} (1 in {stride} of {len(labels)} named)", fontsize=fontsize)


def save_figure(figure: Figure, path: Path) -> Path:
    buffer = io.BytesIO()
    keyword, value = PLOT_MARK
    figure.savefig(buffer, format="png", dpi=100, metadata={keyword: value})
    atomic_write_bytes(path, buffer.getvalue())
    return path


# the accuracy curves give up to this many tasks a colour and a legend entry each: the colours of matplotlib's cycle
MOST_CURVES = 10
# beyond MOST_CURVES tasks, the curves name this many best and this many worst (by their last accuracy)
NAMED_EXTREMES = 3
OTHER_CURVES_COLOUR = "0.75"


def plot_task_curves(evaluations: Sequence[Evaluation], path: Path, chance: Mapping[str, float | None],
                     baseline: Mapping[str, float] | None = None) -> Path:
    """Accuracy of every task against the training step, the macro average in black.

    Up to `MOST_CURVES` tasks, each has its colour and legend entry. With more, a legend of every task is cut off and
    colours repeat: every task is a thin grey line, and only the `NAMED_EXTREMES` best and worst at their last
    evaluation are coloured and named. Dotted lines are chance rates, dashed lines single-task baselines (same colour
    as their task), of the named tasks.
    """
    figure = new_figure(8, 4.5)
    axes = figure.subplots()
    tasks = list(dict.fromkeys(name for evaluation in evaluations for name, score in evaluation.tasks.items()
                               if score.accuracy is not None))
    curves = {name: [(e.step, 100 * e.tasks[name].accuracy) for e in evaluations
                     if name in e.tasks and e.tasks[name].accuracy is not None] for name in tasks}
    many = len(tasks) > MOST_CURVES
    named = tasks
    if many:
        ranked = sorted(tasks, key=lambda name: curves[name][-1][1], reverse=True)
        named = ranked[:NAMED_EXTREMES] + ranked[-NAMED_EXTREMES:]
        for name in tasks:
            if name not in named:
                axes.plot(*zip(*curves[name]), color=OTHER_CURVES_COLOUR, linewidth=0.8)
        axes.plot([], [], color=OTHER_CURVES_COLOUR, label=f"the other {len(tasks) - len(named)} tasks")
    for index, name in enumerate(named):
        colour = f"C{index}"
        axes.plot(*zip(*curves[name]), marker="o", color=colour, label=name)
        if chance.get(name) is not None:
            axes.axhline(100 * chance[name], color=colour, linestyle=":", linewidth=1)
        if baseline and name in baseline:
            axes.axhline(100 * baseline[name], color=colour, linestyle="--", linewidth=1)
    macro = [(e.step, e.macro_accuracy) for e in evaluations if e.macro_accuracy is not None]
    axes.plot([step for step, _ in macro], [100 * value for _, value in macro], color="black", linewidth=2.5,
              label="macro average")
    if any(chance.get(name) is not None for name in named):
        axes.plot([], [], color="grey", linestyle=":", label="chance")
    if baseline and any(name in baseline for name in named):
        axes.plot([], [], color="grey", linestyle="--", label="single-task baseline")
    axes.set(xlabel="training step", ylabel="accuracy (%)", title="Validation accuracy per task")
    axes.grid(alpha=0.3)
    legend_title = f"{len(tasks)} tasks: the {NAMED_EXTREMES} best\nand worst at the end" if many else None
    axes.legend(fontsize="small", loc="center left", bbox_to_anchor=(1.0, 0.5), title=legend_title,
                title_fontsize="small")
    return save_figure(figure, path)


def plot_layer_heatmap(values: Sequence[Sequence[float]], layer_names: Sequence[str], groups: Sequence[str],
                       experts: int, title: str, colour_label: str, path: Path) -> Path:
    """One row per layer; columns are `experts` per group (e.g. one group per task), separated by white lines."""
    rows = len(layer_names)
    columns = len(groups) * experts
    height, row_inches = rows_height(2.0, rows, 0.16)
    figure = new_figure(min(24.0, 3.0 + 0.3 * columns), height)
    axes = figure.subplots()
    image = axes.imshow(values, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0)
    label_rows(axes, layer_names, row_inches, 6 if rows > 24 else 8, "layer")
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


def depth_ticks(layer_names: Sequence[str], most: int = 32) -> tuple[list[int], list[str]]:
    """Tick positions and labels for layers in model order: the first layer of every block ("model.layers.12.mlp"
    -> 12, the first number in the name), thinned to at most `most` ticks; every layer's index without numbers."""
    blocks = [re.search(r"\d+", name) for name in layer_names]
    if not all(blocks):
        positions = list(range(len(layer_names)))
        labels = [str(position) for position in positions]
    else:
        positions = [column for column, block in enumerate(blocks)
                     if column == 0 or block.group() != blocks[column - 1].group()]
        labels = [blocks[column].group() for column in positions]
    stride = -(-len(positions) // most)
    return positions[::stride], labels[::stride]


def plot_task_routing(divergence: Sequence[Sequence[float]], layer_names: Sequence[str], tasks: Sequence[str],
                      details: Sequence[tuple[str, float, Sequence[Sequence[float]]]], title: str, path: Path) -> Path:
    """Top: task x layer, KL (nats) of the task's expert use from the layer's overall use, layers in model order.
    Below: for a few layers (name, NMI, [task][expert] share / even share) the full task x expert matrix.

    A task x expert matrix of every layer (180 rows x 72 columns on SmolLM2) shows no pattern; one number per task
    and layer does, and the layers where tasks differ most are the ones worth reading expert by expert.
    """
    rows = len(tasks)
    # the task rows appear twice with details: in the KL map, and in the detail panels below it
    height, row_inches = rows_height(3.0 if details else 1.6, 2 * rows if details else rows, 0.28)
    top_height = 1.6 + row_inches * rows
    figure = new_figure(12.0, height)
    top, bottom = (figure.subfigures(2, 1, height_ratios=[top_height, height - top_height]) if details
                   else (figure, None))
    axes = top.subplots()
    image = axes.imshow(divergence, aspect="auto", interpolation="nearest", cmap="magma", vmin=0.0)
    positions, labels = depth_ticks(layer_names)
    axes.set_xticks(positions, labels=labels, fontsize=7)
    label_rows(axes, tasks, row_inches, 8, "task")
    axes.set(xlabel=f"block (each column one of {len(layer_names)} routed layers, in model order)", title=title)
    top.colorbar(image, ax=axes, label="KL from the layer's use (nats)")
    if details:
        panels = bottom.subplots(1, len(details), sharey=True, squeeze=False)[0]
        shares = [value for _, _, matrix in details for row in matrix for value in row]
        for panel, (name, nmi, matrix) in zip(panels, details):
            image = panel.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0.0,
                                 vmax=max(shares))
            panel.set_title(f"{name}\nNMI {nmi:.3f}", fontsize=8)
            panel.set_xticks(range(len(matrix[0])))
            panel.set_xlabel("expert", fontsize=8)
        label_rows(panels[0], tasks, row_inches, 8, "task")
        bottom.suptitle("Most task-specific layers: expert use per task", fontsize=10)
        bottom.colorbar(image, ax=list(panels), label="share / even share")
    return save_figure(figure, path)
