"""`RunReport`: a Markdown summary of a run, printed to the terminal and saved next to the checkpoints: `report.md`
for a fit, `report_validate.md` for a `trainer.validate` and `report_test.md` for a test (`report_file`).

It is written at the end of every fit, `trainer.validate` and test (not at the validations inside a fit: the fit's
end reports them), each time with every section so far: a fit, then a validate, then a test in one process leave
`report_test.md` holding all three. An evaluation writes a file of its own, as `RoutingStats` writes
`routing_validate.json` and `routing_test.json` beside the fit's `routing_val.json`: where it shares the fit's folder
(no logger, or a logger with a fixed version), the fit's report stays as the fit wrote it, even where the evaluation
restored none of the fit's history (an adapter folder, no checkpoint). It tabulates `PerTaskMetrics`' history (each
task's chance rate, score before training, best and final) and appends the sections of every other callback that
implements `report_sections(trainer) -> list[str]` (seesaw figures, routing health).
Its first line marks it as ours: a report without it is the user's (without a logger or checkpoints the run folder
is the current directory), and the run stops before training or evaluating rather than replace it.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info

from malora_lightning.atomic import atomic_write_text, first_line
from malora_lightning.callbacks.per_task_metrics import Evaluation, PerTaskMetrics, chance_rates
from malora_lightning.callbacks.summary import (evaluation_series, markdown_cell, mean_of_present, restored_note,
                                                weights_label)
from malora_lightning.run_paths import (RunFileWriter, check_file_name, refuse_foreign_file, refuse_on_every_rank,
                                       run_directory)
from malora_lightning.values import percent

REPORT_NAME = "report.md"
REPORT_MARKER = ("<!-- malora_lightning run report: RunReport rewrites this file at the end of every run of its stage "
                 "(fit, validate or test) -->")
# the markers of former versions, whose reports are ours too: of those that wrote the report at the end of fit and
# test only, and of those that wrote one report.md for fit, validate and test alike
FORMER_REPORT_MARKERS = ("<!-- malora_lightning run report: RunReport rewrites this file at the end of every fit and "
                         "test -->",
                         "<!-- malora_lightning run report: RunReport rewrites this file at the end of every fit, "
                         "validate and test -->")
REPORT_TITLE = "# Run report"


def scores_table(evaluations: list[Evaluation], chance: dict[str, float | None], final_name: str = "final") -> str:
    """Per task (every task of the history, in order of appearance): chance, first evaluation (before training when it
    ran at step 0), best, final, final - first, and final loss; each evaluation column names the weights it scored
    (`weights_label`), and `final_name` the last one ("last" for a history that does not reach the fit's end). A
    history of one evaluation (a validate or test) has chance, accuracy and loss alone: first, best and final would
    repeat its accuracy, and the change read +0.0. The mean row averages each column over the same tasks, those
    scored in every accuracy column (a task that joined later would otherwise lift one column's mean and not the
    other's); its chance cell only when all of them have a chance rate."""
    first, final = evaluations[0], evaluations[-1]
    single = len(evaluations) == 1
    tasks = list(dict.fromkeys(name for evaluation in evaluations for name in evaluation.tasks))
    first_weights, final_weights = (weights_label(evaluation.step, evaluation.checkpoint, evaluation.adapter_folder)
                                    for evaluation in (first, final))
    if single:
        lines = [f"| task | chance | accuracy ({final_weights}) | loss |", "|---|---|---|---|"]
    else:
        lines = [f"| task | chance | first ({first_weights}) | best | {final_name} ({final_weights}) | change | "
                 f"{final_name} loss |",
                 "|---|---|---|---|---|---|---|"]
    columns: dict[str, list[float | None]] = {"chance": [], "first": [], "best": [], "final": [], "loss": []}
    for name in tasks:
        history = [e.tasks[name].accuracy for e in evaluations if name in e.tasks]
        present = [value for value in history if value is not None]
        best = max(present) if present else None
        start = first.tasks[name].accuracy if name in first.tasks else None
        end = final.tasks[name].accuracy if name in final.tasks else None
        loss = final.tasks[name].loss if name in final.tasks else None
        change = None if start is None or end is None else end - start
        for key, value in (("chance", chance.get(name)), ("first", start), ("best", best), ("final", end),
                           ("loss", loss)):
            columns[key].append(value)
        scores = percent(end) if single \
            else f"{percent(start)} | {percent(best)} | {percent(end)} | {percent(change, signed=True)}"
        lines.append(f"| {markdown_cell(name)} | {percent(chance.get(name))} | {scores} | {_loss(loss)} |")
    compared = ("final",) if single else ("first", "best", "final")
    scored = [index for index in range(len(tasks)) if any(columns[key][index] is not None for key in compared)]
    common = [index for index in scored if all(columns[key][index] is not None for key in compared)]
    means = {key: mean_of_present(values[index] for index in common) for key, values in columns.items()}
    if any(columns["chance"][index] is None for index in common):
        means["chance"] = None  # a mean of some of the tasks would read as the chance of all of them
    label = "**mean**" if len(common) == len(scored) \
        else f"**mean** of the {len(common)} tasks scored in every column (of {len(scored)})"
    scores = percent(means["final"]) if single \
        else f"{percent(means['first'])} | {percent(means['best'])} | {percent(means['final'])} |"
    lines.append(f"| {label} | {percent(means['chance'])} | {scores} | {_loss(means['loss'])} |")
    return "\n".join(lines)


def _loss(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def report_file(filename: str, series: str) -> str:
    """The report's file name for an evaluation series (`summary.evaluation_series`): `filename` for a fit ("val"),
    `<stem>_validate<suffix>` and `<stem>_test<suffix>` for trainer.validate and test, so that an evaluation in the
    fit's folder never replaces the fit's report (report.md: report_validate.md, report_test.md)."""
    if series == "val":
        return filename
    path = Path(filename)
    return f"{path.stem}_{series}{path.suffix}"


def refuse_foreign_report(path: Path) -> None:
    """Raise FileExistsError when `path` exists and its first line is neither the marker, a former version's marker
    (`FORMER_REPORT_MARKERS`) nor, from reports written before the marker, the title."""
    ours = (None, REPORT_MARKER, *FORMER_REPORT_MARKERS, REPORT_TITLE)
    refuse_foreign_file(path, lambda report: first_line(report) in ours, "RunReport",
                        f"its first line is not {REPORT_MARKER!r}",
                        "name the report differently (RunReport(filename=...))")


class RunReport(RunFileWriter):
    """Write the run report at the end of fit, of `trainer.validate` and of test (rank zero only), each to its own
    file (`report_file`: `filename` for a fit, `<stem>_validate<suffix>`, `<stem>_test<suffix>`), having refused
    before any work of each to replace such a file that it did not write (`RunFileWriter`). The validations inside a
    fit are reported at the fit's end; a `trainer.validate` is reported at its own end, as `malora validate`'s.

    Args:
        filename: the fit's report; the evaluations' are named after it.
    """

    def __init__(self, filename: str = REPORT_NAME) -> None:
        check_file_name(filename, "RunReport filename")
        self.filename = filename

    def report_path(self, trainer: L.Trainer) -> Path:
        """The report file of the trainer's stage (on every rank: without checkpoints the folder comes from
        trainer.log_dir, a collective call)."""
        return run_directory(trainer) / report_file(self.filename, evaluation_series(trainer))

    def build(self, trainer: L.Trainer) -> str:
        metrics = PerTaskMetrics.attached(trainer)
        sections = [REPORT_TITLE]
        if metrics is None:
            sections.append("Per-task scores need the `PerTaskMetrics` callback, which is not attached.")
        else:
            chance = chance_rates(trainer)
            for stage, during_fit, title in (
                    ("val", True, "Validation accuracy (%) per task"),
                    ("val", False, "Validation accuracy (%) per task, outside training (trainer.validate)"),
                    ("test", False, "Test accuracy (%) per task")):
                evaluations = metrics.evaluations(stage, during_fit=during_fit)
                if evaluations:
                    restored = metrics.restored_from if during_fit else None
                    note = "" if restored is None else f"{restored_note(restored)}\n\n"
                    table = scores_table(evaluations, chance, final_name="final" if restored is None else "last")
                    sections.append(f"## {title}\n\n{note}{table}")
        for callback in trainer.callbacks:
            if callback is not self and hasattr(callback, "report_sections"):
                sections.extend(callback.report_sections(trainer))
        if hasattr(trainer.datamodule, "report_sections"):
            sections.extend(trainer.datamodule.report_sections())
        return "\n\n".join(sections) + "\n"

    def write(self, trainer: L.Trainer) -> None:
        path = self.report_path(trainer)
        if not trainer.is_global_zero:
            return
        report = self.build(trainer)
        atomic_write_text(path, f"{REPORT_MARKER}\n{report}")
        rank_zero_info(f"\n{report}\nReport saved to {path}")

    def refuse_foreign_files(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse, before any work, to end by replacing a report that this callback did not write."""
        path = self.report_path(trainer)
        refuse_on_every_rank(trainer, lambda: refuse_foreign_report(path))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # a trainer.validate's end only: a fit's validations (its sanity check included) are reported at its end
        if trainer.state.fn == TrainerFn.VALIDATING and not trainer.sanity_checking:
            self.write(trainer)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.write(trainer)
