"""`AdapterExport`: at the end of a fit, the adapters go to `<run folder>/adapter` (`save_adapters`: PEFT's format,
with a model card that lists the per-task validation accuracy of the exported weights, when the fit's last validation
scored them). `MALoRAModule(export_adapters=True)` attaches it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from malora_lightning.adapters import adapter_state_dict, save_adapters
from malora_lightning.adapters.io import WEIGHTS_NAME, check_writable_adapter_folder
from malora_lightning.adapters.model import trained_tensor_names
from malora_lightning.callbacks.per_task_metrics import PerTaskMetrics
from malora_lightning.run_paths import refuse_on_every_rank, run_directory

logger = logging.getLogger(__name__)

EXPORT_FOLDER = "adapter"


def final_scores(trainer: L.Trainer) -> dict[str, float | None] | None:
    """Per-task accuracy of the weights the fit ends with: its last validation's, when that ran after the last
    training step; else None (training went on after it, or only the sanity check before training validated)."""
    metrics = PerTaskMetrics.attached(trainer)
    evaluations = metrics.evaluations("val", during_fit=True) if metrics is not None else []
    if not evaluations:
        return None
    last = evaluations[-1]
    if last.step != trainer.global_step:
        logger.info("The last validation scored the weights of step %d, not the exported ones of step %d: the model "
                    "card lists no accuracy", last.step, trainer.global_step)
        return None
    return {name: score.accuracy for name, score in last.tasks.items()}


class AdapterExport(Callback):
    """Args:
        base_model: recorded as the folder's `base_model_name_or_path` (the name the run loaded its base under).
    """

    def __init__(self, base_model: str | None = None) -> None:
        self.base_model = base_model

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        return run_directory(trainer) / EXPORT_FOLDER

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Refuse a folder that `save_adapters` would refuse now, not after the whole training."""
        folder = self.folder(trainer)

        def check() -> None:
            try:
                check_writable_adapter_folder(folder)
            except FileExistsError as error:
                raise FileExistsError(
                    f"{error}. AdapterExport writes the adapters there at the end of the fit: give the run a folder of "
                    "its own (Trainer(default_root_dir=...), a logger, or ModelCheckpoint(dirpath=...)), or pass "
                    "MALoRAModule(export_adapters=False)") from error

        refuse_on_every_rank(trainer, check)
        if trainer.ckpt_path is None and (folder / WEIGHTS_NAME).is_file():
            rank_zero_warn(f"{folder} holds the adapters an earlier fit exported, which this fit replaces when it ends, "
                           "beside that fit's checkpoints and run files in the same folder: give each run a folder "
                           "of its own (a logger versions them) to keep both apart")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # every rank takes part (gathering sharded adapters is collective); rank zero writes
        path = save_adapters(pl_module.model, self.folder(trainer), write=trainer.is_global_zero,
                             base_model=self.base_model, task_scores=final_scores(trainer),
                             sharded_root=trainer.strategy.model)
        if trainer.is_global_zero:
            logger.info("Exported adapters to %s", path)
            left_out = trained_outside_adapters(pl_module)
            if left_out:
                rank_zero_warn(f"The adapter folder {path} holds the adapters only, not the other tensors this fit "
                               f"trained ({', '.join(left_out[:3])}{', ...' if len(left_out) > 3 else ''}; "
                               f"{len(left_out)} in all): they are in the fit's checkpoints, which "
                               "load_from_checkpoint restores")


def trained_outside_adapters(pl_module: L.LightningModule) -> list[str]:
    """The names of the tensors `pl_module` trains that an adapter folder does not hold: a subclass's own parameters,
    a base layer it unfroze."""
    return sorted(trained_tensor_names(pl_module) - {f"model.{key}" for key in adapter_state_dict(pl_module.model)})
