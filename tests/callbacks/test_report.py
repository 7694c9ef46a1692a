"""RunReport's scores table, and what it refuses to replace."""

import re

import pytest
from lightning.pytorch.callbacks import Callback

from malora_lightning.callbacks import Evaluation, PerTaskMetrics, RunReport, SeesawTracker, TaskScore
from malora_lightning.callbacks.report import (FORMER_REPORT_MARKERS, REPORT_MARKER, REPORT_TITLE,
                                               refuse_foreign_report, report_file, scores_table)
from malora_lightning.callbacks.seesaw import track
from tests.callbacks.test_per_task_metrics import HandBuiltTraining, trainer_for


def evaluation(step: int, accuracies: dict[str, float | None]) -> Evaluation:
    return Evaluation(stage="val", step=step, sanity_check=step == 0,
                      tasks={name: TaskScore(loss=1.0, accuracy=value, count=10) for name, value in accuracies.items()})


def mean_row(table: str) -> list[str]:
    return [cell.strip() for cell in table.splitlines()[-1].split("|")[1:-1]]


def test_the_mean_row_compares_the_same_tasks_in_every_column():
    """Task c joined after the first evaluation: averaged into the final column alone, it would make the mean rise
    by 23 points where no task's accuracy changed."""
    table = scores_table([evaluation(0, {"a": 0.2, "b": 0.4}), evaluation(100, {"a": 0.2, "b": 0.4, "c": 0.9})], {})
    label, _, first, best, final, _, _ = mean_row(table)
    assert (first, best, final) == ("30.0", "30.0", "30.0")
    assert label == "**mean** of the 2 tasks scored in every column (of 3)"
    assert "| c | - | - | 90.0 | 90.0 |" in table


def test_the_mean_row_of_tasks_scored_throughout_is_plain():
    """A task without an accuracy ("lm") is in no column, so it changes neither the means nor the label."""
    table = scores_table([evaluation(0, {"a": 0.2, "lm": None}), evaluation(10, {"a": 0.6, "lm": None})],
                         {"a": 0.25, "lm": None})
    assert mean_row(table)[:5] == ["**mean**", "25.0", "20.0", "60.0", "60.0"]


def test_best_is_the_highest_evaluation_and_change_is_final_minus_first():
    table = scores_table([evaluation(0, {"a": 0.2}), evaluation(10, {"a": 0.8}), evaluation(20, {"a": 0.5})], {})
    assert "| a | - | 20.0 | 80.0 | 50.0 | +30.0 | 1.000 |" in table


def test_rounding_claims_no_perfect_score_and_no_zero():
    """One decimal showed 2499 of 2500 items right as 100.0 (every item) and 1 of 2500 as 0.0 (none), and a change
    of one item as +0.0; they get the decimals that tell them apart, and exact scores keep one."""
    table = scores_table([evaluation(0, {"a": 2498 / 2500, "b": 0.0, "c": 1.0}),
                          evaluation(10, {"a": 2499 / 2500, "b": 1 / 2500, "c": 1.0})], {})
    assert "| a | - | 99.9 | 99.96 | 99.96 | +0.04 |" in table
    assert "| b | - | 0.0 | 0.04 | 0.04 | +0.04 |" in table
    assert "| c | - | 100.0 | 100.0 | 100.0 | +0.0 |" in table


def test_a_report_of_a_version_before_the_marker_is_ours_by_its_title(tmp_path):
    report = tmp_path / "report.md"
    report.write_text(f"{REPORT_TITLE}\n\n## Validation accuracy (%) per task\n")
    refuse_foreign_report(report)  # replaced without a word
    # the markers of the versions that wrote the report at the end of fit and test only, and of those that wrote one
    # report.md for fit, validate and test
    assert FORMER_REPORT_MARKERS == ("<!-- malora_lightning run report: RunReport rewrites this file at the end of "
                                     "every fit and test -->",
                                     "<!-- malora_lightning run report: RunReport rewrites this file at the end of "
                                     "every fit, validate and test -->")
    for marker in FORMER_REPORT_MARKERS:
        report.write_text(f"{marker}\n{REPORT_TITLE}\n")
        refuse_foreign_report(report)
    report.write_text(f"## {REPORT_TITLE}\n")
    with pytest.raises(FileExistsError):
        refuse_foreign_report(report)


@pytest.mark.parametrize(("run", "name"), [("fit", "report.md"), ("validate", "report_validate.md"),
                                         ("test", "report_test.md")])
def test_a_report_that_run_report_did_not_write_is_refused_before_training(tmp_path, run, name):
    """Without a logger or checkpoints the run folder is the root folder (the current directory by default). A
    trainer.validate, which now writes the report too, refuses it before scoring anything, as test does; each
    refuses the file it would write."""
    mine = tmp_path / name
    mine.write_text("# My quarterly report\n")
    metrics = PerTaskMetrics()
    trainer = trainer_for(tmp_path, callbacks=[metrics, RunReport()], max_steps=1,
                          limit_val_batches=0 if run == "fit" else 1.0)
    with pytest.raises(FileExistsError, match=rf"{re.escape(name)} was not written by RunReport.*"
                                              r"RunReport\(filename=\.\.\.\)"):
        getattr(trainer, run)(HandBuiltTraining())
    assert trainer.global_step == 0 and metrics.history == [] and mine.read_text() == "# My quarterly report\n"


class ReportAtEachValidation(Callback):
    """Reads the reports after RunReport's hooks of each validation end (it comes after RunReport in the callbacks)."""

    def __init__(self, folder) -> None:
        self.folder, self.seen = folder, []

    def on_validation_end(self, trainer, pl_module) -> None:
        self.seen.append((trainer.state.fn.value, trainer.sanity_checking,
                          {path.name: path.read_text() for path in sorted(self.folder.glob("report*.md"))}))


def sections(report: str) -> dict[str, str]:
    """A report's sections by heading."""
    return {part.split("\n", 1)[0]: part for part in report.split("\n## ")[1:]}


def test_trainer_validate_writes_the_report_and_a_fits_validations_leave_it_to_the_fits_end(tmp_path):
    """RunReport wrote at the end of fit and test only: a trainer.validate (`malora validate`) printed and saved no
    report, its section "outside training" seen only once a test followed. A fit, a validate and a test in one
    process write a report each (report.md, report_validate.md, report_test.md), each with every section so far,
    the earlier ones as they were; the fit's report stays as the fit wrote it."""
    fit_report, validate_report, test_report = (tmp_path / name for name in
                                                ("report.md", "report_validate.md", "report_test.md"))
    probe = ReportAtEachValidation(tmp_path)
    trainer = trainer_for(tmp_path, callbacks=[PerTaskMetrics(), RunReport(), probe], max_steps=2,
                          val_check_interval=1, num_sanity_val_steps=-1)
    module = HandBuiltTraining()
    trainer.fit(module)
    assert [(fn, sanity, files) for fn, sanity, files in probe.seen] == \
        [("fit", True, {}), ("fit", False, {}), ("fit", False, {})]  # nothing written before the fit's end
    fitted_text = fit_report.read_text()
    fitted = sections(fitted_text)
    assert list(fitted) == ["Validation accuracy (%) per task"]
    trainer.validate(module, verbose=False)
    validated = validate_report.read_text()
    assert probe.seen[-1] == ("validate", False, {"report.md": fitted_text, "report_validate.md": validated})
    assert validated.splitlines()[:2] == [REPORT_MARKER, REPORT_TITLE]
    assert list(sections(validated)) == ["Validation accuracy (%) per task",
                                         "Validation accuracy (%) per task, outside training (trainer.validate)"]
    assert sections(validated)["Validation accuracy (%) per task"] == fitted["Validation accuracy (%) per task"]
    assert "| alpha | - | 62.5 | 1.625 |" in \
        sections(validated)["Validation accuracy (%) per task, outside training (trainer.validate)"]
    trainer.test(module, verbose=False)
    tested = sections(test_report.read_text())
    assert list(tested) == [*sections(validated), "Test accuracy (%) per task"]
    assert {heading: tested[heading] for heading in sections(validated)} == sections(validated)
    assert (fit_report.read_text(), validate_report.read_text()) == (fitted_text, validated)


def test_an_evaluation_in_the_fits_folder_leaves_the_fits_report_as_it_was(tmp_path):
    """`malora validate --model.adapter_path ...` with `--trainer.logger false` (or a logger of a fixed version)
    writes into the fit's folder: its report, without the fit's sections (no checkpoint restored them), replaced
    the fit's report.md, which was lost."""
    trainer_for(tmp_path, callbacks=[PerTaskMetrics(), RunReport()], max_steps=1, val_check_interval=1).fit(
        HandBuiltTraining())
    fitted = (tmp_path / "report.md").read_text()
    assert "## Validation accuracy (%) per task\n" in fitted
    for run in ("validate", "test"):  # a new process each: a fresh trainer, callbacks and module
        getattr(trainer_for(tmp_path, callbacks=[PerTaskMetrics(), RunReport()]), run)(HandBuiltTraining(),
                                                                                        verbose=False)
        assert (tmp_path / "report.md").read_text() == fitted
    assert list(sections((tmp_path / "report_validate.md").read_text())) == \
        ["Validation accuracy (%) per task, outside training (trainer.validate)"]
    assert list(sections((tmp_path / "report_test.md").read_text())) == ["Test accuracy (%) per task"]


@pytest.mark.parametrize(("filename", "series", "written"), [
    ("report.md", "val", "report.md"),  # a fit's
    ("report.md", "validate", "report_validate.md"),
    ("report.md", "test", "report_test.md"),
    ("my report (v2).md", "test", "my report (v2)_test.md"),
    ("notes", "validate", "notes_validate"),
])
def test_each_evaluation_writes_a_report_named_after_the_fits(filename, series, written):
    assert report_file(filename, series) == written


def test_a_report_path_that_cannot_be_read_is_refused_before_training(tmp_path):
    """Any OSError of the check (here a folder named report.md) stops the fit before training, on every rank: rank
    zero raised it alone before the broadcast the other ranks waited in."""
    (tmp_path / "report.md").mkdir()
    trainer = trainer_for(tmp_path, callbacks=[PerTaskMetrics(), RunReport()], max_steps=1, limit_val_batches=0)
    with pytest.raises(IsADirectoryError, match=r"report\.md"):
        trainer.fit(HandBuiltTraining())
    assert trainer.global_step == 0


@pytest.mark.parametrize("writer", [RunReport, SeesawTracker])
@pytest.mark.parametrize("filename", ["", " ", ".", "..", "runs/report.md", "../report.md", "a\\b.md", None,
                                      "report?.md", "run:1.md", "a\tb.md", "a<b.md", "a>b.md", 'a"b.md', "a|b.md",
                                      "a*b.md", "a\x1fb.md",
                                      "con.md", "NUL", "Com1.json", "lpt9.md", "report.", "report.md "])
def test_a_file_name_that_names_no_file_in_the_run_folder_is_refused_when_built(writer, filename):
    """"" and "." named the run folder itself: an IsADirectoryError at the first write, after the fit; Windows
    refuses each of <>:"|?* and the control characters (0x00-0x1f) in a file name, its device names (con, nul,
    com1, ... with any extension) and a name ending in "." or a space (also at the first write)."""
    with pytest.raises(ValueError, match=f"{writer.__name__} filename={re.escape(repr(filename))} is invalid: "
                                         "expected the name of a file in the run folder"):
        writer(filename=filename)


@pytest.mark.parametrize("writer", [RunReport, SeesawTracker])
@pytest.mark.parametrize("filename", ["report.md", "my report (v2).md", "seesaw-run_1.json", "r\u00e9sum\u00e9.md",
                                      "a~b'c&d.md",
                                      "console.md", "com10.md", "nul-report.md", ".hidden.md"])
def test_a_file_name_windows_accepts_is_kept_when_built(writer, filename):
    """Spaces, brackets and the other characters outside <>:"|?* and the control characters are file names on every
    system the library runs on: refused, a user's name for the report would fail where nothing is wrong with it."""
    assert writer(filename=filename).filename == filename


def test_a_report_that_run_report_wrote_is_replaced(tmp_path):
    for steps in (1, 2):  # the second fit writes into the same folder
        trainer = trainer_for(tmp_path, callbacks=[PerTaskMetrics(), RunReport()], max_steps=steps,
                              val_check_interval=1)
        trainer.fit(HandBuiltTraining())
    lines = (tmp_path / "report.md").read_text().splitlines()
    assert lines[:2] == [REPORT_MARKER, "# Run report"] and any("final (step 2)" in line for line in lines)


def test_the_mean_rows_chance_and_loss_cover_the_tasks_of_its_accuracies():
    """A task without a chance rate (a user's generative task) made the chance cell the mean of the others: 50.0 beside
    final accuracies of 60 and 40 read as 'at chance'. The loss cell was the macro loss over every task."""
    history = [evaluation(0, {"mc": 0.5, "gen": 0.0}), evaluation(10, {"mc": 0.6, "gen": 0.4})]
    assert mean_row(scores_table(history, {"mc": 0.5, "gen": None}))[:5] == ["**mean**", "-", "25.0", "50.0", "50.0"]
    assert mean_row(scores_table(history, {"mc": 0.5, "gen": 0.1}))[1] == "30.0"
    last = Evaluation(stage="val", step=100, sanity_check=False,
                      tasks={"a": TaskScore(1.0, 0.2, 10), "b": TaskScore(1.0, 0.4, 10), "c": TaskScore(10.0, 0.9, 10)})
    table = scores_table([evaluation(0, {"a": 0.2, "b": 0.4}), last], {})
    assert mean_row(table)[-1] == "1.000"  # a and b, whose accuracies the row averages (all three: 4.000)


def test_one_evaluation_is_tabulated_as_its_accuracy_and_loss_alone():
    """A validate or test scores once: its first, best and final columns repeated one accuracy, and its change read
    +0.0. The mean row covers the tasks with an accuracy (not the language-modelling one), its chance all of theirs."""
    scores = {"mc": TaskScore(loss=0.5, accuracy=0.75, count=4), "gen": TaskScore(loss=1.5, accuracy=0.25, count=4),
              "lm": TaskScore(loss=4.0, accuracy=None, count=4)}
    tested = Evaluation(stage="test", step=7, sanity_check=False, during_fit=False, tasks=scores)
    assert scores_table([tested], {"mc": 0.5, "gen": 0.1, "lm": None}).splitlines() == [
        "| task | chance | accuracy (step 7) | loss |",
        "|---|---|---|---|",
        "| mc | 50.0 | 75.0 | 0.500 |",
        "| gen | 10.0 | 25.0 | 1.500 |",
        "| lm | - | - | 4.000 |",
        "| **mean** | 30.0 | 50.0 | 1.000 |",
    ]


def test_a_task_missing_from_the_final_evaluation_keeps_its_row():
    table = scores_table([evaluation(0, {"a": 0.5, "b": 0.2}), evaluation(10, {"a": 0.6, "b": 0.9}),
                          evaluation(20, {"a": 0.7})], {})
    assert "| b | - | 20.0 | 90.0 | - | - | - |" in table
    assert mean_row(table)[0] == "**mean** of the 1 tasks scored in every column (of 2)"


def table_cells(row: str) -> list[str]:
    """A Markdown table row's cells as a GitHub renderer splits them: at every "|" not escaped as "\\|"."""
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", row)[1:-1]]


def test_a_task_name_with_a_pipe_stays_in_its_cell():
    """Without a data module task names are the evaluation step's free text: "left|right" split its row into 8 cells,
    every number one column to the right of its heading."""
    evaluations = [evaluation(0, {"left|right": 0.25, "b": 0.5}), evaluation(10, {"left|right": 0.75, "b": 0.25})]
    for table in (scores_table(evaluations, {}),
                  SeesawTracker(tolerance=0.1)._task_table(track(evaluations, 0.1)[-1], movement=True),
                  SeesawTracker(tolerance=0.1)._evaluations_table(track(evaluations, 0.1))):
        rows = [table_cells(line) for line in table.splitlines() if line.startswith("|")]
        assert {len(row) for row in rows} == {len(rows[0])}, table
    assert table_cells(scores_table(evaluations, {}).splitlines()[2])[:5] == ["left\\|right", "-", "25.0", "75.0",
                                                                                "75.0"]
    (interval,) = [line for line in SeesawTracker()._evaluations_table(track(evaluations, 0.1)).splitlines()
                   if line.startswith("| 10 |")]
    assert table_cells(interval)[2:4] == ["left\\|right", "b"]  # improved, degraded


def test_a_checkpoint_name_with_a_pipe_stays_in_its_heading_cell():
    """ModelCheckpoint(filename=...) is free text: a "|" in the checkpoint's name split the heading into more cells
    than the rows have."""
    evaluations = [Evaluation(stage="test", step=1, sanity_check=False, during_fit=False, checkpoint="a|b.ckpt",
                              tasks={"parity": TaskScore(loss=1.0, accuracy=0.5, count=10)})]
    assert table_cells(scores_table(evaluations, {}).splitlines()[0]) == ["task", "chance",
                                                                          "accuracy (step 1, a\\|b.ckpt)", "loss"]
    heading = scores_table(evaluations * 2, {}).splitlines()[0]
    assert table_cells(heading) == ["task", "chance", "first (step 1, a\\|b.ckpt)", "best",
                                    "final (step 1, a\\|b.ckpt)", "change", "final loss"]
    seesaw_table = SeesawTracker()._task_table(track(evaluations, 0.01)[-1], movement=False)  # names it too
    assert seesaw_table.startswith("Accuracies in %, at step 1, a\\|b.ckpt; changes in points")


@pytest.mark.parametrize("final_name", ["final", "last"])
def test_the_heading_names_the_weights_of_the_first_and_final_columns(final_name):
    """Each evaluation column names the weights it scored: the first column the first evaluation's step, the final one
    (named "last" for a history that does not reach the fit's end) the final evaluation's, and so does its loss."""
    history = [evaluation(0, {"a": 0.2}), evaluation(50, {"a": 0.8}), evaluation(100, {"a": 0.6})]
    assert table_cells(scores_table(history, {}, final_name=final_name).splitlines()[0]) == \
        ["task", "chance", "first (step 0)", "best", f"{final_name} (step 100)", "change", f"{final_name} loss"]
