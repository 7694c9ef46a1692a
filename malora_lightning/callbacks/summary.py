"""What the callbacks' summaries share: the mean of the values that are present, text as a Markdown cell, the
training step (and checkpoint, or adapter folder) of the weights an evaluation scores, and the series an evaluation
belongs to (accuracy as a percentage: `values.percent`)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
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


def weights_label(step: int, checkpoint: str | None, adapter_folder: str | None = None) -> str:
    """The weights an evaluation scored, as the report's tables name them: "step 3", and the checkpoint's file name
    when validate/test loaded one ("step 1, step=1.ckpt"), since the fit may have trained past it; the adapter folder's
    name when validate/test scored an adapter folder's adapters as loaded ("adapter folder adapter"): the folder
    records no training step, and "step 0" read as the weights before training."""
    if adapter_folder is not None:
        return f"adapter folder {markdown_cell(adapter_folder)}"
    return f"step {step}" if checkpoint is None else f"step {step}, {markdown_cell(checkpoint)}"


def restored_note(checkpoint: str) -> str:
    """Said of the fit's history that validate/test of `checkpoint` restored from it: it ends where the checkpoint
    was written, and its last evaluation is not the fit's final one."""
    return (f"The fit's validations up to checkpoint {checkpoint}, restored from it: the fit's later ones, if any, "
            "are not in this section.")


class WeightsStep:
    """The training step of the weights being evaluated. `validate`/`test(ckpt_path=...)` load a checkpoint's weights
    but leave the trainer's step as it was (0 in a fresh trainer, the end of the fit after one), which would label the
    checkpoint's scores with another step. The owning callback calls `forget` from `setup` (Lightning loads the
    checkpoint after it) and `loaded` from `on_load_checkpoint`. Adapters loaded from an adapter folder have no step
    to tell: `adapter_folder` names the folder instead."""

    def __init__(self) -> None:
        self.checkpoint_step: int | None = None  # the step of the checkpoint that validate/test loaded, if any
        self.checkpoint_name: str | None = None  # and its file name

    def forget(self) -> None:
        self.checkpoint_step = self.checkpoint_name = None

    def loaded(self, trainer: L.Trainer, checkpoint: dict[str, Any]) -> None:
        """A fit resumed from a checkpoint goes on from its step, which the trainer then holds."""
        if trainer.state.fn != TrainerFn.FITTING:
            self.checkpoint_step = checkpoint["global_step"]
            self.checkpoint_name = Path(trainer.ckpt_path).name

    def of(self, trainer: L.Trainer) -> int:
        return trainer.global_step if self.checkpoint_step is None else self.checkpoint_step

    def adapter_folder(self, trainer: L.Trainer, pl_module: L.LightningModule) -> str | None:
        """The name of the adapter folder whose adapters validate/test scores as loaded (`adapter_path`: the module's
        `adapters_from_folder`), which the trainer's step 0 would label as the weights before training; None when
        they were trained in this process or a checkpoint replaced them, and for a fit's validations (a fit from an
        adapter folder trains from it: its step 0 is before training)."""
        folder = getattr(pl_module, "adapters_from_folder", None)
        if trainer.state.fn == TrainerFn.FITTING or self.checkpoint_step is not None or not folder:
            return None
        return Path(folder).name
