"""What the callbacks' summaries share: the mean of the values that are present, text as a Markdown cell, the
training step (and checkpoint, or adapter folder) of the weights an evaluation scores, and the series an evaluation
belongs to (accuracy as a percentage: `values.percent`)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class HeldWeights:
    """Which weights a module holds, as the run outputs name them (`weights_label`): trained to `step` (0: as
    initialised), or loaded from the checkpoint file `checkpoint` (at its step), or from the adapter folder
    `adapter_folder` (no step recorded: 0). `MALoRAModule.held_weights` keeps it where its weights change, as the
    module outlives its trainer: a new trainer's step is 0, whatever weights the module holds."""

    step: int
    checkpoint: str | None = None  # the checkpoint's file name
    adapter_folder: str | None = None  # the adapter folder's name


class WeightsStep:
    """The weights an evaluation scores (`held`). A fit's validations score the weights at the trainer's step (a fit
    from an adapter folder validates at step 0 before training; a resumed fit at its step). Outside a fit, the
    module's own record names them (`MALoRAModule.held_weights`), whichever trainer trained or loaded them. For a
    module without one, the trainer's step, or the checkpoint's that `validate`/`test(ckpt_path=...)` loaded (they
    leave the trainer's step as it was: 0 in a fresh trainer, the end of the fit after one). The owning callback calls
    `forget` from `setup` (Lightning loads the checkpoint after it) and `loaded` from `on_load_checkpoint`;
    `checkpoint_step` also tells its `load_state_dict` that validate/test, not a resumed fit, loaded the checkpoint."""

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

    def held(self, trainer: L.Trainer, pl_module: L.LightningModule) -> HeldWeights:
        """The weights the current evaluation scores (the class's docstring says whose record names them)."""
        if trainer.state.fn == TrainerFn.FITTING:
            return HeldWeights(step=trainer.global_step)
        held = getattr(pl_module, "held_weights", None)
        if isinstance(held, HeldWeights):
            return held
        if self.checkpoint_step is not None:
            return HeldWeights(step=self.checkpoint_step, checkpoint=self.checkpoint_name)
        return HeldWeights(step=trainer.global_step)
