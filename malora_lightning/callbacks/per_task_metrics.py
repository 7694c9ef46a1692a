"""`PerTaskMetrics`: per-task loss and accuracy on validation/test, synchronised across ranks, with a history.

It consumes the per-example outputs of `MALoRAModule.validation_step`/`test_step` (`task_name`, `loss`, `correct`).
With `num_sanity_val_steps=-1` the sanity check is a full validation before training; its scores are recorded (not
logged: Lightning discards sanity-check logs) as the "before training" evaluation at step 0. A partial sanity check
(Lightning's default of 2 batches per loader) is not recorded.
The evaluations of `trainer.validate`/`test` are recorded apart from a fit's (`Evaluation.during_fit`): no training
happened between them, so they are no point of the training curve. They carry the weights the module holds
(`WeightsStep`): the step it was trained to, or the checkpoint (its step and file name) that `ckpt_path` or
`load_from_checkpoint` loaded; with `ckpt_path` the history of this process stays as it is (only resuming a fit
restores the checkpoint's).
Other callbacks that derive figures from the scores (`SeesawTracker`) register with `add_listener`: they are called
right after each evaluation is recorded, from the same hook, so they may still log, whatever the callback order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from malora_lightning.callbacks.summary import WeightsStep, mean_of_present
from malora_lightning.data.batches import EvaluationOutput

# the columns of a task's sums (`PerTaskMetrics._sums`): its examples' losses, its examples, its examples' correct
# answers and its examples with an answer to judge (none for a task scored by loss alone)
LOSS, EXAMPLES, CORRECT, JUDGED = range(4)


@dataclass
class TaskScore:
    loss: float
    accuracy: float | None  # None for tasks without an accuracy (no choices, no generation target)
    count: int


@dataclass
class Evaluation:
    """Scores of one full evaluation pass."""

    stage: str  # "val" or "test"
    step: int  # the training step of the weights scored
    sanity_check: bool
    tasks: dict[str, TaskScore] = field(default_factory=dict)
    during_fit: bool = True  # False for trainer.validate/test: no point of the training curve
    # the file name of the checkpoint whose weights validate/test scored (`HeldWeights.checkpoint`: loaded by it, or
    # earlier into the module); None: weights trained or initialised in this process, or an adapter folder's
    checkpoint: str | None = None
    # the name of the adapter folder whose adapters validate/test scored as loaded (`HeldWeights.adapter_folder`): no
    # step names them; None: a checkpoint's, or weights this process trained or initialised
    adapter_folder: str | None = None

    @property
    def macro_accuracy(self) -> float | None:
        return mean_of_present(score.accuracy for score in self.tasks.values())

    @property
    def macro_loss(self) -> float | None:
        """None when no task was scored (a 0.0 would read as the best loss a monitor ever saw)."""
        return mean_of_present(score.loss for score in self.tasks.values())


EvaluationListener = Callable[[L.Trainer, L.LightningModule, Evaluation], None]


def log_synchronised(pl_module: L.LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """Log a figure every rank already holds, computed from values gathered over all ranks. Lightning warns of an
    epoch-level value logged without `sync_dist` on every multi-process run; a max over equal values leaves each
    rank the same value, exactly, which ModelCheckpoint's monitor needs. Every rank must log the same names in the
    same order (each is a collective): the callbacks' figures are identical on every rank."""
    pl_module.log(name, value, sync_dist=True, reduce_fx="max", **kwargs)


def partial_sanity_check(trainer: L.Trainer) -> bool:
    """Whether the sanity check ran only some validation batches (Lightning's default runs 2 per loader): its
    figures then describe a few examples, not the validation before training. Decided by all ranks alike."""
    partial = sum(trainer.num_sanity_val_batches) < sum(trainer.num_val_batches)
    return trainer.strategy.reduce_boolean_decision(partial, all=False)


def chance_rates(trainer: L.Trainer) -> dict[str, float | None]:
    """Each task's chance rate, from the data module's tasks (empty without them)."""
    datamodule = trainer.datamodule
    tasks = getattr(datamodule, "tasks", []) if datamodule is not None else []
    return {task.name: getattr(task, "chance_rate", None) for task in tasks}


class PerTaskMetrics(Callback):
    """Log `<stage>/<task>/loss`, `<stage>/<task>/acc` and `<stage>/macro_acc`, `<stage>/macro_loss` per evaluation."""

    def __init__(self) -> None:
        self.history: list[Evaluation] = []
        # each task's sums over this rank's examples of the evaluation (columns LOSS, EXAMPLES, CORRECT, JUDGED), on
        # the module's device; summed over the ranks once, in `_finish`. A NaN loss is a result, not noise: it makes
        # the task's loss NaN (torchmetrics' default dropped it: a partly diverged evaluation read as a finite loss)
        self._sums: dict[str, torch.Tensor] = {}
        self._listeners: list[EvaluationListener] = []
        self._weights = WeightsStep()
        # the checkpoint validate/test restored the fit's history from: it ends there, not at the fit's end
        self.restored_from: str | None = None

    def add_listener(self, listener: EvaluationListener) -> None:
        """Call `listener(trainer, pl_module, evaluation)` on every rank after each evaluation (sanity check too)."""
        if listener not in self._listeners:
            self._listeners.append(listener)

    # ------------------------------------------------------------------ bookkeeping
    def _task_names(self, trainer: L.Trainer) -> list[str]:
        datamodule = trainer.datamodule
        return [task.name for task in datamodule.tasks] if datamodule is not None and hasattr(datamodule, "tasks") \
            else list(self._sums)

    def _reset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        names = dict.fromkeys([*self._sums, *self._task_names(trainer)])
        self._sums = {name: self._zeros(pl_module.device) for name in names}

    @staticmethod
    def _zeros(device: torch.device) -> torch.Tensor:
        """A task's sums before any example: in the default float dtype (float32), accumulated one example at a time,
        as torchmetrics' MeanMetric did, so the figures are those it gave."""
        return torch.zeros(4, dtype=torch.get_default_dtype(), device=device)

    def _update(self, outputs: EvaluationOutput | None, device: torch.device) -> None:
        """Count a step's examples. A step that returns None scores nothing; any other type is refused: a dict, say,
        was skipped, and an evaluation that scored nothing logged a macro loss of 0.0."""
        if outputs is None:
            return
        if not isinstance(outputs, EvaluationOutput):
            raise TypeError(f"an evaluation step returned a {type(outputs).__name__}, where PerTaskMetrics scores an "
                            "EvaluationOutput (malora_lightning.data): return one from evaluate_batch (or None from a "
                            "step that scores nothing), or run without PerTaskMetrics (--per_task_metrics null)")
        losses = outputs.loss.detach().to(torch.get_default_dtype())
        judged = torch.zeros_like(losses) if outputs.correct is None else torch.ones_like(losses)
        correct = torch.zeros_like(losses) if outputs.correct is None else outputs.correct.to(losses)
        # by column: LOSS, EXAMPLES, CORRECT, JUDGED; on the module's device, where `_reset` made the sums
        rows = torch.stack([losses, torch.ones_like(losses), correct, judged], dim=1).to(device)
        for index, name in enumerate(outputs.task_name):
            if name not in self._sums:
                self._sums[name] = self._zeros(device)
            self._sums[name] += rows[index]  # on the device, without a wait: the ranks' sums are read in `_finish`

    def _same_meters_on_every_rank(self, pl_module: L.LightningModule) -> None:
        """Give every rank the sums of every task any rank scored, in one order, before they are summed over the
        ranks. The data module's tasks make them alike (`_reset`); without one (dataloaders given to the trainer) a
        rank makes a task's sums when it scores an example of it, and a task with fewer examples than ranks is
        only padding on some: their rows would pair other tasks' across ranks (wrong figures, or a hang)."""
        names: list[list[str] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, list(self._sums))
        sums = self._sums
        self._sums = {name: sums[name] if name in sums else self._zeros(pl_module.device)
                      for name in dict.fromkeys(name for rank_names in names for name in rank_names)}

    def _scores(self, pl_module: L.LightningModule) -> dict[str, TaskScore]:
        """Every task's score over all ranks, from one all_reduce of the ranks' sums and one read on the host, however
        many tasks there are (a torchmetrics mean per figure synchronised its states task by task: several
        all_gathers and a host wait per task and figure)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
            and torch.distributed.get_world_size() > 1
        if distributed:
            self._same_meters_on_every_rank(pl_module)
        if not self._sums:
            return {}
        sums = torch.stack(list(self._sums.values()))
        if distributed:
            torch.distributed.all_reduce(sums)
        # the means in the sums' dtype, as MeanMetric divided; an accuracy of no judged example is 0/0, NaN
        means = sums[:, [LOSS, CORRECT]] / sums[:, [EXAMPLES, JUDGED]]
        scores = {}
        for name, (loss, accuracy, count) in zip(self._sums, torch.cat([means, sums[:, [EXAMPLES]]], 1).tolist()):
            if count > 0:  # else no examples of this task in this pass (on any rank)
                scores[name] = TaskScore(loss=loss, accuracy=None if math.isnan(accuracy) else accuracy,
                                         count=int(count))
        return scores

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        weights = self._weights.held(trainer, pl_module)
        evaluation = Evaluation(stage=stage, step=weights.step, sanity_check=trainer.sanity_checking,
                                during_fit=trainer.state.fn == TrainerFn.FITTING, checkpoint=weights.checkpoint,
                                adapter_folder=weights.adapter_folder, tasks=self._scores(pl_module))
        if trainer.sanity_checking and partial_sanity_check(trainer):
            # a few examples' accuracy would stand in every report's first and best columns and the seesaw figures
            rank_zero_info("The sanity check ran part of the validation data: not kept as the evaluation before "
                           "training (num_sanity_val_steps: -1 runs it whole)")
            return
        self.history.append(evaluation)
        if not trainer.sanity_checking:
            self._log(pl_module, evaluation)
        for listener in self._listeners:
            listener(trainer, pl_module, evaluation)

    @staticmethod
    def _log(pl_module: L.LightningModule, evaluation: Evaluation) -> None:
        stage = evaluation.stage
        for name, score in evaluation.tasks.items():
            log_synchronised(pl_module, f"{stage}/{name}/loss", score.loss)
            if score.accuracy is not None:
                log_synchronised(pl_module, f"{stage}/{name}/acc", score.accuracy)
        if evaluation.macro_accuracy is not None:
            log_synchronised(pl_module, f"{stage}/macro_acc", evaluation.macro_accuracy, prog_bar=True)
        if evaluation.macro_loss is not None:
            log_synchronised(pl_module, f"{stage}/macro_loss", evaluation.macro_loss)

    # ------------------------------------------------------------------ queries
    def evaluations(self, stage: str = "val", during_fit: bool | None = None) -> list[Evaluation]:
        """Those of `stage` in order; with `during_fit`, only a fit's (True: the training curve) or only those of
        trainer.validate/test (False)."""
        return [evaluation for evaluation in self.history if evaluation.stage == stage
                and (during_fit is None or evaluation.during_fit == during_fit)]

    @staticmethod
    def attached(trainer: L.Trainer) -> PerTaskMetrics | None:
        """The `PerTaskMetrics` among the trainer's callbacks, if any."""
        return next((callback for callback in trainer.callbacks if isinstance(callback, PerTaskMetrics)), None)

    # ------------------------------------------------------------------ Lightning hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._weights.forget()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._weights.loaded(trainer, checkpoint)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """A fit after validate/test restored another fit's history from a checkpoint (`restored_from`) keeps only
        its own: appended to that history, its validations read as the checkpoint's fit going on, under the note
        that the history ends at the checkpoint. (Resuming a fit restores the checkpoint's history as its own.)"""
        if self.restored_from is not None:
            self.history = [evaluation for evaluation in self.history if not evaluation.during_fit]
            self.restored_from = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Say when a resume lost an evaluation: a checkpoint written at the end of a training batch (say
        `ModelCheckpoint(every_n_train_steps=...)`) precedes that step's validation, which Lightning does not run
        again, so the history, the seesaw figures and the report would silently lack it."""
        step = trainer.global_step
        # a duration (val_check_interval="00:00:10:00") leaves Lightning 2.6's trainer without `val_check_interval`
        interval = getattr(trainer, "val_check_interval", None)
        if step == 0 or not isinstance(interval, int) or trainer.accumulate_grad_batches != 1:
            return  # validation by epoch fraction or by time, or batches that are not steps: not judged here
        # Lightning counts an int interval in training batches: of the whole run without per-epoch validation,
        # else of the current epoch
        batches = step if trainer.check_val_every_n_epoch is None \
            else trainer.fit_loop.epoch_loop.batch_progress.current.processed
        if batches % interval == 0 \
                and all(evaluation.step != step for evaluation in self.evaluations("val", during_fit=True)):
            rank_zero_warn(f"Resumed from a checkpoint written at step {step} before that step's validation, which "
                           "Lightning does not run again: the per-task history, seesaw figures and report lack it. "
                           "Checkpoint when a validation ends: ModelCheckpoint(save_on_train_epoch_end=False) without "
                           "every_n_train_steps, as recipes/default.yaml does")

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, pl_module.device)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs, pl_module.device)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"history": [
            {"stage": e.stage, "step": e.step, "sanity_check": e.sanity_check, "during_fit": e.during_fit,
             "checkpoint": e.checkpoint, "adapter_folder": e.adapter_folder,
             "tasks": {name: vars(score) for name, score in e.tasks.items()}}
            for e in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming a fit takes the checkpoint's history, and so does validate/test of a checkpoint in a process that
        has none (`restored_from` then names the checkpoint: the fit's history ends there); one that has a history
        keeps it (after a fit, the whole fit's: the checkpoint's may end at an earlier, best, step)."""
        if self._weights.checkpoint_step is not None and self.history:
            return
        self.restored_from = self._weights.checkpoint_name
        # checkpoints written before `during_fit` (or `checkpoint`, `adapter_folder`) existed: taken as a fit's (of the
        # weights in memory)
        self.history = [Evaluation(stage=e["stage"], step=e["step"], sanity_check=e["sanity_check"],
                                   tasks={name: TaskScore(**score) for name, score in e["tasks"].items()},
                                   during_fit=e.get("during_fit", True), checkpoint=e.get("checkpoint"),
                                   adapter_folder=e.get("adapter_folder"))
                        for e in state_dict["history"]]
