"""What the callbacks' summaries share: the mean of the values that are present, accuracy and text as Markdown
cells, the training step of the weights an evaluation scores, and the series an evaluation belongs to."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
from lightning.pytorch.trainer.states import TrainerFn


def mean_of_present(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


# the most decimals `percent` shows: closer than that to 0 or 100 %, a value is float rounding (1e-6 of a fraction)
PERCENT_DECIMALS = 4


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal ("+" on gains when `signed`), "-" for a missing value. One that
    would round to 0 or (-)100 without being it gets the decimals that tell it apart (up to `PERCENT_DECIMALS`):
    99.96 % of the items right is no "100.0", and 0.04 % no "0.0"."""
    if value is None:
        return "-"
    number = 100 * value
    decimals = 1
    while abs(round(number, decimals)) in (0.0, 100.0) and round(number, decimals) != round(number, PERCENT_DECIMALS):
        decimals += 1
    return f"{number:+.{decimals}f}" if signed else f"{number:.{decimals}f}"


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
