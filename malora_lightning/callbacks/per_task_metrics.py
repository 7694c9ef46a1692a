"""`PerTaskMetrics`: per-task loss and accuracy on validation/test, synchronised across ranks, with a history.

It consumes the per-example outputs of `MALoRAModule.validation_step`/`test_step` (`task_name`, `loss`, `correct`).
With `num_sanity_val_steps=-1` the sanity check is a full validation before training; its scores are recorded (not
logged: Lightning discards sanity-check logs) as the "before training" evaluation at step 0. A partial sanity check
(Lightning's default of 2 batches per loader) is not recorded.
The evaluations of `trainer.validate`/`test` are recorded apart from a fit's (`Evaluation.during_fit`): no training
happened between them, so they are no point of the training curve. With `ckpt_path` they carry the checkpoint's step,
and the history of this process stays as it is (only resuming a fit restores the checkpoint's).
Other callbacks that derive figures from the scores (`SeesawTracker`) register with `add_listener`: they are called
right after each evaluation is recorded, from the same hook, so they may still log, whatever the callback order.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torchmetrics import MeanMetric, SumMetric

from malora_lightning.callbacks.summary import WeightsStep, mean_of_present
from malora_lightning.data.batches import EvaluationOutput

# torchmetrics' warning for a metric computed before any update
EMPTY_METER_WARNING = r"The ``compute`` method of metric \w+ was called before the ``update`` method"


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
    checkpoint: str | None = None  # the file name of the checkpoint validate/test loaded; None: the weights in memory

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


class _TaskMeters(torch.nn.Module):
    """A task's running means. A NaN is a result, not noise: torchmetrics' default drops it from the mean (a partly
    diverged evaluation read as a finite loss over its `count`); a float strategy replaces NaNs by that float, here
    NaN itself, so it shows."""

    def __init__(self) -> None:
        super().__init__()
        self.loss = MeanMetric(nan_strategy=float("nan"))
        self.accuracy = MeanMetric(nan_strategy=float("nan"))
        self.count = SumMetric()


class PerTaskMetrics(Callback):
    """Log `<stage>/<task>/loss`, `<stage>/<task>/acc` and `<stage>/macro_acc`, `<stage>/macro_loss` per evaluation."""

    def __init__(self) -> None:
        self.history: list[Evaluation] = []
        self._meters: dict[str, _TaskMeters] = {}
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
            else list(self._meters)

    def _reset(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Every rank creates the same meters in the same order, so their synchronisation cannot deadlock.
        for name in self._task_names(trainer):
            if name not in self._meters:
                self._meters[name] = _TaskMeters()
        for meters in self._meters.values():
            meters.to(pl_module.device)
            for metric in (meters.loss, meters.accuracy, meters.count):
                metric.reset()

    def _update(self, outputs: EvaluationOutput | None) -> None:
        """Count a step's examples. A step that returns None scores nothing; any other type is refused: a dict, say,
        was skipped, and an evaluation that scored nothing logged a macro loss of 0.0."""
        if outputs is None:
            return
        if not isinstance(outputs, EvaluationOutput):
            raise TypeError(f"an evaluation step returned a {type(outputs).__name__}, where PerTaskMetrics scores an "
                            "EvaluationOutput (malora_lightning.data): return one from evaluate_batch (or None from a "
                            "step that scores nothing), or run without PerTaskMetrics (--per_task_metrics null)")
        losses = outputs.loss.detach().float()
        correct = outputs.correct
        for index, name in enumerate(outputs.task_name):
            if name not in self._meters:
                self._meters[name] = _TaskMeters().to(losses.device)
            meters = self._meters[name]
            meters.loss.update(losses[index])
            meters.count.update(1.0)
            if correct is not None:
                meters.accuracy.update(correct[index].float())

    def _same_meters_on_every_rank(self, pl_module: L.LightningModule) -> None:
        """Give every rank the meters of every task any rank scored, in one order, before they synchronise one by
        one. The data module's tasks make them alike (`_reset`); without one (dataloaders given to the trainer) a
        rank makes a task's meters when it scores an example of it, and a task with fewer examples than ranks is
        only padding on some: their collectives paired other tasks' meters (wrong figures), then hung."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
                or torch.distributed.get_world_size() == 1:
            return
        names: list[list[str] | None] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(names, list(self._meters))
        meters = self._meters
        self._meters = {name: meters[name] if name in meters else _TaskMeters().to(pl_module.device)
                        for name in dict.fromkeys(name for rank_names in names for name in rank_names)}

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        evaluation = Evaluation(stage=stage, step=self._weights.of(trainer), sanity_check=trainer.sanity_checking,
                                during_fit=trainer.state.fn == TrainerFn.FITTING,
                                checkpoint=self._weights.checkpoint_name)
        self._same_meters_on_every_rank(pl_module)
        for name, meters in self._meters.items():
            # compute() synchronises across ranks, so every rank computes every meter, even an empty one (a task
            # with no example in this pass, or on this rank; the accuracy of a task scored by loss alone), for which
            # torchmetrics warns that compute ran before update
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=EMPTY_METER_WARNING, category=UserWarning)
                loss, accuracy = meters.loss.compute().item(), meters.accuracy.compute().item()
                count = int(meters.count.compute().item())
            if count == 0:
                continue  # no examples of this task in this pass
            evaluation.tasks[name] = TaskScore(loss=loss, accuracy=None if math.isnan(accuracy) else accuracy,
                                               count=count)
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
        self._update(outputs)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset(trainer, pl_module)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self._update(outputs)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def state_dict(self) -> dict[str, Any]:
        return {"history": [
            {"stage": e.stage, "step": e.step, "sanity_check": e.sanity_check, "during_fit": e.during_fit,
             "checkpoint": e.checkpoint, "tasks": {name: vars(score) for name, score in e.tasks.items()}}
            for e in self.history]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Resuming a fit takes the checkpoint's history, and so does validate/test of a checkpoint in a process that
        has none (`restored_from` then names the checkpoint: the fit's history ends there); one that has a history
        keeps it (after a fit, the whole fit's: the checkpoint's may end at an earlier, best, step)."""
        if self._weights.checkpoint_step is not None and self.history:
            return
        self.restored_from = self._weights.checkpoint_name
        # checkpoints written before `during_fit` (or `checkpoint`) existed: taken as a fit's (of the weights in memory)
        self.history = [Evaluation(stage=e["stage"], step=e["step"], sanity_check=e["sanity_check"],
                                   tasks={name: TaskScore(**score) for name, score in e["tasks"].items()},
                                   during_fit=e.get("during_fit", True), checkpoint=e.get("checkpoint"))
                        for e in state_dict["history"]]
