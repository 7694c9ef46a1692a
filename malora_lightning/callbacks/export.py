"""`AdapterExport`: at the end of a fit, the adapters go to `<run folder>/adapter` (`save_adapters`: PEFT's format,
with a model card that lists the last validation's per-task accuracy). `MALoRAModule(export_adapters=True)` attaches
it."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

from malora_lightning.adapters import save_adapters
from malora_lightning.callbacks.per_task_metrics import PerTaskMetrics
from malora_lightning.run_paths import run_directory

logger = logging.getLogger(__name__)

EXPORT_FOLDER = "adapter"


class AdapterExport(Callback):
    """Args:
        base_model: recorded as the folder's `base_model_name_or_path` (the name the run loaded its base under).
    """

    def __init__(self, base_model: str | None = None) -> None:
        self.base_model = base_model

    @staticmethod
    def folder(trainer: L.Trainer) -> Path:
        return run_directory(trainer) / EXPORT_FOLDER

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        metrics = PerTaskMetrics.attached(trainer)
        evaluations = metrics.evaluations("val") if metrics is not None else []
        scores = {name: score.accuracy for name, score in evaluations[-1].tasks.items()} if evaluations else None
        # every rank takes part (gathering sharded adapters is collective); rank zero writes
        path = save_adapters(pl_module.model, self.folder(trainer), write=trainer.is_global_zero,
                             base_model=self.base_model, task_scores=scores)
        if trainer.is_global_zero:
            logger.info("Exported adapters to %s", path)
