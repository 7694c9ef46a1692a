"""What the callbacks' summaries share: the mean of the values that are present, text as a Markdown cell, the
training step of the weights an evaluation scores, and the series an evaluation belongs to (accuracy as a percentage:
`values.percent`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


def mean_of_present(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def markdown_cell(text: str) -> str:
    """`text` as one cell of a Markdown table: a task name is free text without a data module (the names of
    `EvaluationOutput`), and a "|" in it split its row into more cells, each number under another column."""
    return " ".join(text.split()).replace("|", "\\|")


def evaluation_series(trainer: L.Trainer) -> str:
    """"val" for a fit's validations (the training curve), "validate" or "test" for an evaluation of trainer.validate
    or test: it follows no training, so its figures are kept apart and never replace the fit's."""
    return "val" if trainer.state.fn == TrainerFn.FITTING else trainer.state.fn.value


class WeightsStep:
    """The training step of the weights being evaluated. `validate`/`test(ckpt_path=...)` load a checkpoint's weights
    but leave the trainer's step as it was (0 in a fresh trainer, the end of the fit after one), which would label the
    checkpoint's scores with another step. The owning callback calls `forget` from `setup` (Lightning loads the
    checkpoint after it) and `loaded` from `on_load_checkpoint`."""

    def __init__(self) -> None:
        self.checkpoint_step: int | None = None  # the step of the checkpoint that validate/test loaded, if any

    def forget(self) -> None:
        self.checkpoint_step = None

    def loaded(self, trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
        """A fit resumed from a checkpoint goes on from its step, which the trainer then holds."""
        if trainer.state.fn != TrainerFn.FITTING:
            self.checkpoint_step = checkpoint["global_step"]

    def of(self, trainer: L.Trainer) -> int:
        return trainer.global_step if self.checkpoint_step is None else self.checkpoint_step
