"""`SeesawTracker`: does one task improve while another degrades (the seesaw effect), and does multi-task training beat
single-task training (negative transfer)?

Definitions, over the evaluations of one stage in order (with `num_sanity_val_steps=-1` the first validation is the
sanity check, "before training", at step 0); a_t(k) is task t's accuracy at evaluation k, and only tasks with an
accuracy take part:

* change: a_t(k) - a_t(k'), k' the task's previous evaluation (None at its first).
* best: max over j <= k of a_t(j), and the step where it was first reached. gap to best: best - a_t(k) >= 0; at the
  last evaluation it is the best-versus-final gap (seesaw shows up as tasks peaking at different steps).
* seesaw index: among the n tasks with a change, the fraction of the n(n-1)/2 pairs in which one task rose by more
  than `tolerance` while the other fell by more than `tolerance`, i.e. up * down / (n(n-1)/2). 0 when no pair moved in
  opposite directions; None with fewer than two tasks or before a second evaluation.
* relative gain against a single-task baseline M_t: (a_t - M_t) / M_t (accuracy: higher is better); negative transfer
  is the number of tasks with a relative gain below 0, and Delta-MTL the mean relative gain over the tasks that have a
  baseline (Maninis et al. 2019; LibMTL `count_improvement`).

Baseline file: JSON `{"task": accuracy}`, accuracies in (0, 1], measured on the split it is compared with (the
relative gains are computed for every stage, validation and test).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L

from malora_lightning.atomic import atomic_write_text
from malora_lightning.callbacks.per_task_metrics import Evaluation, PerTaskMetrics, chance_rates, log_synchronised
from malora_lightning.callbacks.plots import PLOTS_FOLDER, plot_task_curves, refuse_foreign_plot
from malora_lightning.callbacks.summary import evaluation_series, markdown_cell, restored_note, weights_label
from malora_lightning.data.tasks import DuplicateKeyError, unique_keys
from malora_lightning.run_paths import (
    RunFileWriter,
    check_file_name,
    our_json,
    refuse_foreign_json,
    refuse_on_every_rank,
    run_directory,
)
from malora_lightning.values import check_switch, is_finite_number, percent, user_path

SEESAW_NAME = "seesaw.json"
CURVES_NAME = "task_accuracy.png"


@dataclass
class TaskMovement:
    """One task at one evaluation."""

    accuracy: float
    change: float | None
    best: float
    best_step: int
    gap_to_best: float
    relative_gain: float | None


@dataclass
class SeesawPoint:
    """The seesaw figures of one evaluation."""

    stage: str
    step: int
    sanity_check: bool
    checkpoint: str | None  # as `Evaluation.checkpoint`
    adapter_folder: str | None  # as `Evaluation.adapter_folder`
    tasks: dict[str, TaskMovement]
    seesaw_index: float | None
    improved: list[str]
    degraded: list[str]
    delta_mtl: float | None
    negative_transfer: int | None
    worst_relative_gain: float | None


# Accuracies are float32 means, so a change of exactly `tolerance` (4 of 100 items at 0.04) came out above or below it
# by rounding, half the time each; "more than the tolerance" is decided with this margin.
ROUNDING_MARGIN = 1e-6


def direction(change: float, tolerance: float) -> int:
    """+1 for a rise of more than `tolerance`, -1 for a fall of more than `tolerance`, else 0."""
    if change > tolerance + ROUNDING_MARGIN:
        return 1
    if change < -tolerance - ROUNDING_MARGIN:
        return -1
    return 0


def seesaw_index(changes: Mapping[str, float], tolerance: float) -> float | None:
    """Fraction of task pairs that moved in opposite directions by more than `tolerance` each."""
    count = len(changes)
    if count < 2:
        return None
    directions = [direction(change, tolerance) for change in changes.values()]
    return directions.count(1) * directions.count(-1) / (count * (count - 1) / 2)


def relative_gain(score: float, baseline: float) -> float:
    """(score - baseline) / baseline; 0 for a score within `ROUNDING_MARGIN` of the baseline: a float32 accuracy of 7 of
    10 items is 0.69999999 against a baseline file's 0.7, and counted as negative transfer."""
    return 0.0 if abs(score - baseline) <= ROUNDING_MARGIN else (score - baseline) / baseline


def relative_gains(scores: Mapping[str, float], baseline: Mapping[str, float]) -> dict[str, float]:
    """`relative_gain` of every task that has both a score and a baseline."""
    return {name: relative_gain(score, baseline[name]) for name, score in scores.items() if name in baseline}


def track(evaluations: Sequence[Evaluation], tolerance: float,
          baseline: Mapping[str, float] | None = None) -> list[SeesawPoint]:
    """The seesaw figures of every evaluation of one stage, in order."""
    points: list[SeesawPoint] = []
    previous: dict[str, float] = {}
    best: dict[str, tuple[float, int]] = {}
    for evaluation in evaluations:
        scores = {name: score.accuracy for name, score in evaluation.tasks.items() if score.accuracy is not None}
        changes = {name: value - previous[name] for name, value in scores.items() if name in previous}
        for name, value in scores.items():
            if name not in best or value > best[name][0]:
                best[name] = (value, evaluation.step)
        gains = relative_gains(scores, baseline or {})
        tasks = {name: TaskMovement(accuracy=value, change=changes.get(name), best=best[name][0],
                                    best_step=best[name][1], gap_to_best=best[name][0] - value,
                                    relative_gain=gains.get(name))
                 for name, value in scores.items()}
        points.append(SeesawPoint(
            stage=evaluation.stage, step=evaluation.step, sanity_check=evaluation.sanity_check,
            checkpoint=evaluation.checkpoint, adapter_folder=evaluation.adapter_folder, tasks=tasks,
            seesaw_index=seesaw_index(changes, tolerance),
            improved=[name for name, change in changes.items() if direction(change, tolerance) == 1],
            degraded=[name for name, change in changes.items() if direction(change, tolerance) == -1],
            delta_mtl=sum(gains.values()) / len(gains) if gains else None,
            negative_transfer=sum(gain < 0 for gain in gains.values()) if gains else None,
            worst_relative_gain=min(gains.values()) if gains else None,
        ))
        previous.update(scores)
    return points


def load_baseline_scores(path: str | Path) -> dict[str, float]:
    """Read `{"task": accuracy}` single-task scores; every error names the file and the task."""
    path = Path(user_path(path))
    if not path.is_file():
        raise FileNotFoundError(f"baseline scores file {path} ({'a folder' if path.is_dir() else 'not found'}): give "
                                "a JSON file of single-task scores, {\"task\": accuracy}, or leave baseline_scores "
                                "unset")
    try:
        # utf-8-sig: the byte-order mark some Windows editors write (Notepad, PowerShell 5) is no JSON error
        data = json.loads(path.read_text(encoding="utf-8-sig"), object_pairs_hook=unique_keys)
    except DuplicateKeyError as error:  # json would keep the last score of a task and drop the others
        raise ValueError(f"baseline scores file {path}: {error}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"baseline scores file {path} is not valid JSON: {error}") from error
    if not isinstance(data, dict) or not data:
        raise ValueError(f"baseline scores file {path} must hold a non-empty JSON object {{task: accuracy}}, "
                         f"not {json.dumps(data)[:80]}")
    for name, score in data.items():
        if not is_finite_number(score) or not 0.0 < score <= 1.0:
            raise ValueError(f"baseline scores file {path}: task {name!r} has score {score!r}; expected an accuracy "
                             "in (0, 1] (relative gains divide by it)")
    return {name: float(score) for name, score in data.items()}


def _stages_on_file(path: Path, keys: list[str]) -> dict[str, list[dict[str, Any]]]:
    """The series in `path` by name, where it is a seesaw file of ours (`keys`: those of `SeesawTracker.to_dict`);
    none otherwise."""
    written = our_json(path, keys)
    return written["stages"] if written is not None else {}


class SeesawTracker(RunFileWriter):
    """Per-task movement, seesaw index, best-vs-final gaps and transfer against single-task baselines.

    Reads the scores of the attached `PerTaskMetrics` after each evaluation (whatever the callback order). Logs
    `<stage>/seesaw_index`, `<stage>/<task>/acc_change` and `<stage>/<task>/gap_to_best` (from the second
    evaluation on), and with baselines `<stage>/<task>/rel_gain`, `<stage>/delta_mtl`, `<stage>/negative_transfer`.
    Writes the figures to `seesaw.json` (the fit's validations under `val`; the latest trainer.validate and test,
    which follow no training, under `validate` and `test`) and the fit's validation accuracy curves to
    `plots/task_accuracy.png`, next to the checkpoints (rank zero). Before any work it refuses to replace such a
    file that it did not write: a `seesaw.json` is its own when it holds a JSON object with exactly the keys
    `to_dict` writes, in order; the picture when it carries `plots.PLOT_MARK`.

    Args:
        tolerance: accuracy change (0.01 = one point) a task must exceed to count as moving in the seesaw index.
            Raise it when evaluation sets are small: one example of 64 is already 1.6 points.
        baseline_scores: JSON file of single-task accuracies `{"task": accuracy}`, for relative gains and Delta-MTL.
        filename: name of the JSON file.
        plots: draw the accuracy curves (needs matplotlib).
    """

    def __init__(self, tolerance: float = 0.01, baseline_scores: str | None = None, filename: str = SEESAW_NAME,
                 plots: bool = True) -> None:
        if not (is_finite_number(tolerance) and 0.0 <= tolerance < 1.0):
            raise ValueError(f"tolerance={tolerance!r} is invalid: expected an accuracy change in [0, 1)")
        self.tolerance = float(tolerance)
        self.baseline_file = baseline_scores
        self.baseline = load_baseline_scores(baseline_scores) if baseline_scores is not None else None
        check_file_name(filename, "SeesawTracker filename")
        check_switch("plots", plots)
        self.filename = filename
        self.plots = plots
        self.points: dict[str, list[SeesawPoint]] = {}
        self.curves_written = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        metrics = PerTaskMetrics.attached(trainer)
        if metrics is None:
            raise ValueError("SeesawTracker reads the scores of PerTaskMetrics, which this run does not have: with "
                             "the malora command keep per_task_metrics on (or switch the tracker off too: --seesaw "
                             "null); with a Trainer of your own add malora_lightning.callbacks.PerTaskMetrics() to its "
                             "callbacks")
        known = [task.name for task in getattr(trainer.datamodule, "tasks", [])]
        unknown = sorted(set(self.baseline or {}) - set(known)) if known else []
        if unknown:
            raise ValueError(f"baseline scores file {self.baseline_file} names task(s) {unknown} that this run does "
                             f"not have (tasks: {', '.join(known)})")
        metrics.add_listener(self.on_evaluation)

    def refuse_foreign_files(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        keys = list(self.to_dict())
        draws_curves = self.plots and (evaluation_series(trainer) == "val" or bool(self._fit_history(trainer)))

        def check() -> None:
            refuse_foreign_json(directory / self.filename, keys, "SeesawTracker",
                                "name the file differently (SeesawTracker(filename=...))")
            if draws_curves:
                refuse_foreign_plot(directory / PLOTS_FOLDER / CURVES_NAME, "SeesawTracker",
                                    "draw no curves (SeesawTracker(plots=False))")

        refuse_on_every_rank(trainer, check)

    def on_evaluation(self, trainer: L.Trainer, pl_module: L.LightningModule, evaluation: Evaluation) -> None:
        """Called by `PerTaskMetrics` on every rank once it has recorded (and logged) an evaluation. A fit's
        validations make one series (`val`), movement from one to the next included; an evaluation of
        trainer.validate or test follows no training, so it stands alone under `validate` or `test`.

        The `val` series is a function of PerTaskMetrics' history alone, so it is computed again from that history at
        every evaluation: validate/test of a checkpoint in a new process (`malora test --ckpt_path ...`) restore the
        fit's history, and the `val` series then stays in `seesaw.json`, the report and its curves instead of being
        dropped. That history ends at the checkpoint: where the run folder holds the fit's later validations
        (`_later_fit`), they stay in `seesaw.json` and its curves. The other evaluation's series that an earlier
        process left there (`_other_evaluations`) stays too."""
        series = evaluation_series(trainer)
        fit = self._track_fit(trainer)
        if series != "val":
            self.points[series] = track([evaluation], self.tolerance, self.baseline)
        points = self.points[series]
        if not trainer.sanity_checking:
            self._log(pl_module, points[-1])
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        if not trainer.is_global_zero:
            return
        data = self.to_dict()
        later: list[dict[str, Any]] = []
        if series != "val":  # an evaluation keeps what earlier processes left in the file
            saved = _stages_on_file(directory / self.filename, list(data))
            later = self._later_fit(saved)
            if later:
                data["stages"] = {"val": later, **{name: kept for name, kept in data["stages"].items()
                                                   if name != "val"}}
            data["stages"].update(self._other_evaluations(saved))
        atomic_write_text(directory / self.filename, json.dumps(data, indent=2) + "\n")
        if self.plots and fit and not later and (series == "val" or not self.curves_written):
            self._draw_curves(trainer, directory, fit)

    def _later_fit(self, saved: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
        """The fit's `val` series of the file's series `saved` when it ends at a later step than the one this process
        holds (none otherwise): validate/test of an earlier checkpoint restore the fit's history up to that
        checkpoint, and writing it would drop the fit's later validations from the file, and from the curves drawn
        over them."""
        fit = saved.get("val", [])
        held = self.points.get("val", [])
        return fit if fit and fit[-1]["step"] > (held[-1].step if held else -1) else []

    def _other_evaluations(self, saved: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
        """The series of trainer.validate and test among the file's `saved` that this process holds none of: a
        `malora test` and a `malora validate` in one folder (the fit's, without a logger) each run in a process of
        their own, and the later one dropped the earlier one's series, while its `routing_<series>.json` and report
        stayed."""
        return {name: points for name, points in saved.items() if name != "val" and name not in self.points}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the refusal of foreign files, draw the curves of the history a resumed fit restored: one resumed
        after its last validation evaluates nothing in this process, and one resumed at its end does not even train
        (Lightning skips `on_train_end` then), yet its report links the curves as the uninterrupted fit's does."""
        super().on_fit_start(trainer, pl_module)
        if not self.plots:
            return
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        fit = self._track_fit(trainer)
        if trainer.is_global_zero and fit:
            self._draw_curves(trainer, directory, fit)

    def _draw_curves(self, trainer: L.Trainer, directory: Path, fit: list[Evaluation]) -> None:
        plot_task_curves(fit, directory / PLOTS_FOLDER / CURVES_NAME, chance_rates(trainer), self.baseline)
        self.curves_written = True

    @staticmethod
    def _fit_history(trainer: L.Trainer) -> list[Evaluation]:
        """PerTaskMetrics' history of the fit's validations (which a resumed fit, or validate/test of a checkpoint,
        restores from the checkpoint)."""
        metrics = PerTaskMetrics.attached(trainer)
        return metrics.evaluations("val", during_fit=True) if metrics is not None else []

    def _track_fit(self, trainer: L.Trainer) -> list[Evaluation]:
        """Compute the `val` series again from the fit's history; return its validations."""
        fit = self._fit_history(trainer)
        if fit:
            self.points["val"] = track(fit, self.tolerance, self.baseline)
        return fit

    @staticmethod
    def _log(pl_module: L.LightningModule, point: SeesawPoint) -> None:
        stage = point.stage
        if point.seesaw_index is not None:
            log_synchronised(pl_module, f"{stage}/seesaw_index", point.seesaw_index)
        for name, task in point.tasks.items():
            if task.change is not None:  # a task's first evaluation has neither a change nor a gap to show
                log_synchronised(pl_module, f"{stage}/{name}/acc_change", task.change)
                log_synchronised(pl_module, f"{stage}/{name}/gap_to_best", task.gap_to_best)
            if task.relative_gain is not None:
                log_synchronised(pl_module, f"{stage}/{name}/rel_gain", task.relative_gain)
        if point.delta_mtl is not None:
            log_synchronised(pl_module, f"{stage}/delta_mtl", point.delta_mtl)
            log_synchronised(pl_module, f"{stage}/negative_transfer", float(point.negative_transfer))

    def to_dict(self) -> dict[str, Any]:
        return {"tolerance": self.tolerance, "baseline_file": self.baseline_file, "baseline": self.baseline,
                "stages": {stage: [asdict(point) for point in points] for stage, points in self.points.items()}}

    # ------------------------------------------------------------------ run report
    def report_sections(self, trainer: L.Trainer) -> list[str]:
        """The fit's series from the restored history too: a fit resumed after its last validation evaluates nothing
        in this process, and its report lacked "Seesaw over training" that the uninterrupted run's has. Restored by
        validate/test of a checkpoint, it ends at that checkpoint, and says so."""
        self._track_fit(trainer)
        metrics = PerTaskMetrics.attached(trainer)
        restored = metrics.restored_from if metrics is not None else None
        sections = []
        for series, title in (("val", "Seesaw over training (validation)"),
                              ("validate", "Transfer (validation outside training)"), ("test", "Transfer (test)")):
            points = self.points.get(series)
            if points and (series == "val" or self.baseline is not None):  # RunReport already lists the scores
                body = [restored_note(restored)] if series == "val" and restored is not None else []
                body.append(self._task_table(points[-1], movement=len(points) > 1))
                if len(points) > 1:
                    body.append(self._evaluations_table(points))
                if series == "val" and self.curves_written:
                    body.append(f"![Validation accuracy per task]({PLOTS_FOLDER}/{CURVES_NAME})")
                sections.append(f"## {title}\n\n" + "\n\n".join(body))
        return sections

    def _task_table(self, point: SeesawPoint, movement: bool) -> str:
        """Each task at the last evaluation: how far below its best and its last move (`movement`, when there were
        earlier evaluations), and its gain over the single-task baseline."""
        with_baseline = self.baseline is not None
        header, rule = "| task | accuracy |", "|---|---|"
        if movement:
            header += " best (step) | best - final | last change |"
            rule += "---|---|---|"
        if with_baseline:
            header += " single-task | relative gain |"
            rule += "---|---|"
        weights = weights_label(point.step, point.checkpoint, point.adapter_folder)
        lines = [f"Accuracies in %, at {weights}; changes in points, relative gains in %.", "", header, rule]
        for name, task in point.tasks.items():
            line = f"| {markdown_cell(name)} | {percent(task.accuracy)} |"
            if movement:
                line += (f" {percent(task.best)} ({task.best_step}) | {percent(task.gap_to_best)} | "
                         f"{percent(task.change, signed=True)} |")
            if with_baseline:
                line += f" {percent(self.baseline.get(name))} | {percent(task.relative_gain, signed=True)} |"
            lines.append(line)
        if point.delta_mtl is not None:
            compared = sum(task.relative_gain is not None for task in point.tasks.values())
            lines += ["", f"Delta-MTL (mean relative gain): **{percent(point.delta_mtl, signed=True)} %**; "
                          f"negative transfer on {point.negative_transfer} of {compared} tasks with a baseline "
                          f"(worst {percent(point.worst_relative_gain, signed=True)} %)."]
        return "\n".join(lines)

    def _evaluations_table(self, points: list[SeesawPoint]) -> str:
        """The seesaw index of each evaluation against the one before, with the tasks that rose and fell."""
        lines = [f"Seesaw index: fraction of task pairs where one rose and the other fell by more than "
                 f"{100 * self.tolerance:g} accuracy point(s) since the previous evaluation.", "",
                 "| step | seesaw index | improved | degraded | Delta-MTL (%) |", "|---|---|---|---|---|"]
        for point in points[1:]:
            index = "-" if point.seesaw_index is None else f"{point.seesaw_index:.2f}"
            improved, degraded = (markdown_cell(", ".join(names)) or "-" for names in (point.improved, point.degraded))
            lines.append(f"| {point.step} | {index} | {improved} | {degraded} | "
                         f"{percent(point.delta_mtl, signed=True)} |")
        indices = [point.seesaw_index for point in points if point.seesaw_index is not None]
        if indices:
            lines += ["", f"Mean seesaw index over {len(indices)} interval(s): **{sum(indices) / len(indices):.2f}**"
                          f" (max {max(indices):.2f})."]
        return "\n".join(lines)
