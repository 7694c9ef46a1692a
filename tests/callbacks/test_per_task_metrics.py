"""PerTaskMetrics on hand-built per-example predictions: per-task means, macro averages, listeners, and which
evaluations make the training curve."""

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from malora_lightning.callbacks import PerTaskMetrics, RunReport, SeesawTracker
from malora_lightning.callbacks.per_task_metrics import Evaluation, TaskScore
from malora_lightning.data.batches import EvaluationOutput

# Per-example loss and correctness of every evaluation example, by task; "lm" has no accuracy (no `correct`).
LOSSES = {"alpha": [0.5, 1.5, 2.0, 4.0, 0.25, 0.75, 3.0, 1.0], "beta": [2.0, 2.0, 3.0, 5.0], "lm": [1.0, 3.0]}
CORRECT = {"alpha": [True, False, True, True, False, False, True, True], "beta": [False, False, True, False]}


class HandBuiltPredictions(L.LightningModule):
    """Returns the tabled loss and correctness of each example instead of running a model."""

    def __init__(self, batch_size: int = 2) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.unused = torch.nn.Linear(1, 1)

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {task: DataLoader([{"index": index, "task": task} for index in range(len(losses))],
                                 batch_size=self.batch_size) for task, losses in LOSSES.items()}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        task = batch["task"][0]
        indices = batch["index"].tolist()
        correct = torch.tensor([CORRECT[task][i] for i in indices]) if task in CORRECT else None
        return EvaluationOutput(task_name=batch["task"], loss=torch.tensor([LOSSES[task][i] for i in indices]),
                                correct=correct)

    test_dataloader = val_dataloader
    test_step = validation_step


def expected_metrics() -> dict[str, float]:
    """The same figures computed from the tables with plain Python."""
    expected = {}
    for task, losses in LOSSES.items():
        expected[f"val/{task}/loss"] = sum(losses) / len(losses)
    for task, correct in CORRECT.items():
        expected[f"val/{task}/acc"] = sum(correct) / len(correct)
    expected["val/macro_acc"] = (5 / 8 + 1 / 4) / 2  # tasks without an accuracy do not count
    expected["val/macro_loss"] = (13.0 / 8 + 12.0 / 4 + 4.0 / 2) / 3
    return expected


def trainer_for(root, **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, default_root_dir=str(root))
    settings.update(overrides)
    return L.Trainer(**settings)


def test_hand_built_predictions_give_per_task_means_and_macro_averages(tmp_path):
    metrics = PerTaskMetrics()
    heard = []
    metrics.add_listener(lambda trainer, module, evaluation: heard.append(evaluation))
    trainer = trainer_for(tmp_path, callbacks=[metrics])
    trainer.validate(HandBuiltPredictions(), verbose=False)
    logged = {key: value.item() for key, value in trainer.callback_metrics.items()}
    assert logged == pytest.approx(expected_metrics())
    evaluation = metrics.history[-1]
    assert heard == [evaluation]
    assert {task: score.count for task, score in evaluation.tasks.items()} == {"alpha": 8, "beta": 4, "lm": 2}
    assert evaluation.tasks["lm"].accuracy is None and "val/lm/acc" not in logged


def test_a_nan_example_loss_makes_its_tasks_loss_nan(tmp_path, monkeypatch):
    """torchmetrics' default dropped it: alpha's loss read 1.43, the mean of 7 examples, beside count 8."""
    monkeypatch.setitem(LOSSES, "alpha", [0.5, float("nan"), *LOSSES["alpha"][2:]])
    metrics = PerTaskMetrics()
    trainer_for(tmp_path, callbacks=[metrics]).validate(HandBuiltPredictions(), verbose=False)
    scores = metrics.history[-1].tasks
    assert scores["alpha"].count == 8 and scores["alpha"].loss != scores["alpha"].loss  # NaN
    assert scores["beta"].loss == 3.0 and scores["alpha"].accuracy == 5 / 8


class HandBuiltTraining(HandBuiltPredictions):
    """The tabled predictions, plus a training step that changes nothing they report."""

    def train_dataloader(self) -> DataLoader:
        return DataLoader(torch.zeros(4, 1), batch_size=1)

    def training_step(self, batch, batch_idx):
        return self.unused(batch).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


@pytest.mark.parametrize(("sanity_steps", "recorded"), [(2, [1]), (-1, [0, 1])])
def test_only_a_whole_sanity_check_is_recorded_as_the_evaluation_before_training(tmp_path, sanity_steps, recorded):
    """Lightning's default sanity check scores 2 batches per loader (4 of alpha's 8 examples): kept as the step-0
    evaluation, its accuracy (2 of 4 right) would stand in reports and seesaw figures for the whole set's (5 of 8)."""
    metrics = PerTaskMetrics()
    trainer = trainer_for(tmp_path, callbacks=[metrics], max_steps=1, val_check_interval=1,
                          num_sanity_val_steps=sanity_steps)
    trainer.fit(HandBuiltTraining())
    assert [evaluation.step for evaluation in metrics.history] == recorded
    assert all(evaluation.tasks["alpha"].count == 8 for evaluation in metrics.history)



def fit_with_a_checkpoint_per_validation(root, callbacks: list) -> tuple[L.Trainer, HandBuiltTraining]:
    """3 steps, a validation and a checkpoint (epoch=0-step=<n>.ckpt) after each."""
    checkpoints = ModelCheckpoint(dirpath=root, save_top_k=-1, save_on_train_epoch_end=False)
    trainer = trainer_for(root, callbacks=[checkpoints, *callbacks], max_steps=3, val_check_interval=1,
                          num_sanity_val_steps=0, enable_checkpointing=True)
    module = HandBuiltTraining()
    trainer.fit(module)
    return trainer, module


def test_testing_an_earlier_checkpoint_after_fit_keeps_the_fits_history_and_report(tmp_path):
    """Lightning restores the callbacks' state for test(ckpt_path=...) too: taking the checkpoint's history cut the
    fit's to the checkpoint's step, and the report written at the end of test lost the later validations."""
    metrics = PerTaskMetrics()
    trainer, module = fit_with_a_checkpoint_per_validation(tmp_path, [metrics, RunReport()])
    trainer.test(module, ckpt_path=str(tmp_path / "epoch=0-step=1.ckpt"), verbose=False)
    assert [(e.stage, e.step, e.during_fit) for e in metrics.history] == \
        [("val", 1, True), ("val", 2, True), ("val", 3, True), ("test", 1, False)]
    validation, test = (tmp_path / "report_test.md").read_text().split("## Test accuracy")
    assert "final (step 3)" in validation
    assert "| task | chance | accuracy (step 1, epoch=0-step=1.ckpt) | loss |" in test


def test_a_checkpoint_evaluated_by_a_fresh_trainer_is_labelled_with_its_step(tmp_path):
    fit_with_a_checkpoint_per_validation(tmp_path, [PerTaskMetrics()])
    metrics = PerTaskMetrics()
    fresh = trainer_for(tmp_path / "evaluation", callbacks=[metrics])
    fresh.validate(HandBuiltTraining(), ckpt_path=str(tmp_path / "epoch=0-step=2.ckpt"), verbose=False)
    fresh.test(HandBuiltTraining(), verbose=False)  # no checkpoint: the weights at hand, of the trainer's step 0
    # a process without a history of its own takes the checkpoint's (the fit's evaluations up to it), as before
    assert [(e.stage, e.step, e.during_fit) for e in metrics.history] == [
        ("val", 1, True), ("val", 2, True), ("val", 2, False), ("test", 0, False)]
    # the test scored the weights in memory, not the checkpoint validate loaded before it: no checkpoint named
    assert [e.checkpoint for e in metrics.history] == [None, None, "epoch=0-step=2.ckpt", None]


def test_a_validation_after_fit_is_no_interval_of_the_training_curve(tmp_path):
    """trainer.validate() after fit scores the same weights again: no training happened since the last validation,
    so it must not count as one more interval of the seesaw figures."""
    metrics, seesaw = PerTaskMetrics(), SeesawTracker(plots=False)
    trainer = trainer_for(tmp_path, callbacks=[metrics, seesaw, RunReport()], max_steps=2, val_check_interval=1,
                          num_sanity_val_steps=-1)
    module = HandBuiltTraining()
    trainer.fit(module)
    trainer.validate(module, verbose=False)
    trainer.test(module, verbose=False)  # writes its report, with every section so far
    assert [(e.step, e.during_fit) for e in metrics.evaluations("val")] == [(0, True), (1, True), (2, True),
                                                                           (2, False)]
    assert [point.step for point in seesaw.points["val"]] == [0, 1, 2]
    assert [point.step for point in seesaw.points["validate"]] == [2]
    report = (tmp_path / "report_test.md").read_text()
    assert "Mean seesaw index over 2 interval(s)" in report
    assert "## Validation accuracy (%) per task, outside training (trainer.validate)" in report


class AlphaTestedAlone(HandBuiltPredictions):
    def test_dataloader(self) -> dict[str, DataLoader]:
        return {"alpha": self.val_dataloader()["alpha"]}


def test_empty_meters_are_left_out_without_a_warning(tmp_path):
    """The meters of every task seen so far are computed in each pass (compute() synchronises across ranks), so a
    task with no example in this one (here a test of fewer tasks than the validation before it) computes empty
    meters, and so does the accuracy of a task scored by loss alone ("lm"): left out of the evaluation, and no
    torchmetrics warning that compute ran before update."""
    metrics = PerTaskMetrics()
    trainer = trainer_for(tmp_path, callbacks=[metrics])
    module = AlphaTestedAlone()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.validate(module)
        trainer.test(module)
    assert [str(w.message) for w in caught if "compute" in str(w.message)] == []
    assert list(metrics.evaluations("test")[0].tasks) == ["alpha"]
    assert metrics.evaluations("test")[0].tasks["alpha"].loss == pytest.approx(sum(LOSSES["alpha"]) / 8)
    assert list(metrics.evaluations("val")[0].tasks) == ["alpha", "beta", "lm"]


class LossOnlyOrNothing(HandBuiltPredictions):
    """Validates "lm" alone (scored by loss, no accuracy); with `scores=False` every step returns None."""

    def __init__(self, scores: bool) -> None:
        super().__init__()
        self.scores = scores

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {"lm": super().val_dataloader()["lm"]}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return super().validation_step(batch, batch_idx, dataloader_idx) if self.scores else None


@pytest.mark.parametrize("scores", [True, False])
def test_a_macro_figure_with_nothing_to_average_is_not_logged(tmp_path, scores):
    """Tasks scored by loss alone have no macro accuracy, and an evaluation whose steps return None scored nothing:
    no macro loss either (a 0.0 would read as the best loss ever)."""
    metrics = PerTaskMetrics()
    trainer = trainer_for(tmp_path, callbacks=[metrics])
    trainer.validate(LossOnlyOrNothing(scores), verbose=False)
    logged = {key: value.item() for key, value in trainer.callback_metrics.items()}
    assert logged == ({"val/lm/loss": 2.0, "val/macro_loss": 2.0} if scores else {})  # the mean of 1.0 and 3.0
    assert list(metrics.history[-1].tasks) == (["lm"] if scores else [])


def test_a_listener_added_again_is_called_once_per_evaluation(tmp_path):
    """Every stage's setup adds the tracker's listener again (fit, then test): it must not run twice."""
    metrics, calls = PerTaskMetrics(), []

    def listener(trainer, pl_module, evaluation):
        calls.append(evaluation.stage)

    metrics.add_listener(listener)
    metrics.add_listener(listener)
    trainer_for(tmp_path, callbacks=[metrics]).validate(HandBuiltPredictions())
    assert calls == ["val"]


def test_resuming_a_fit_takes_the_checkpoints_history_over_this_processs(tmp_path):
    """Only validate/test of a checkpoint (a checkpoint step is known) keep a history of their own process."""
    saved = PerTaskMetrics()
    # the second: a trainer.validate of a checkpoint between two fits of this process, which keeps its name
    saved.history = [Evaluation(stage="val", step=4, sanity_check=False,
                                tasks={"alpha": TaskScore(loss=1.0, accuracy=0.5, count=8)}),
                     Evaluation(stage="validate", step=2, sanity_check=False, during_fit=False,
                                checkpoint="step=2.ckpt", tasks={"alpha": TaskScore(loss=2.0, accuracy=0.25, count=8)})]
    resumed = PerTaskMetrics()
    resumed.history = [Evaluation(stage="val", step=9, sanity_check=False)]  # an earlier fit in this process
    resumed.load_state_dict(saved.state_dict())  # a fit: no checkpoint step recorded (`WeightsStep.loaded`)
    assert resumed.history == saved.history and resumed.history[1].checkpoint == "step=2.ckpt"
    earlier_format = saved.state_dict()  # a checkpoint written before evaluations named theirs
    for stored in earlier_format["history"]:
        del stored["checkpoint"]
    resumed.load_state_dict(earlier_format)
    assert [evaluation.checkpoint for evaluation in resumed.history] == [None, None]
    evaluated = PerTaskMetrics()
    evaluated.history = [Evaluation(stage="val", step=9, sanity_check=False)]
    evaluated._weights.checkpoint_step = 4  # validate/test(ckpt_path=...) after a fit
    evaluated.load_state_dict(saved.state_dict())
    assert [evaluation.step for evaluation in evaluated.history] == [9]
