"""PerTaskMetrics on hand-built per-example predictions: per-task means, macro averages, listeners."""

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from malora_lightning.callbacks import PerTaskMetrics
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

