"""Callbacks that show what multi-task training does: per-task metrics and the run report."""

from malora_lightning.callbacks.per_task_metrics import Evaluation, PerTaskMetrics, TaskScore
from malora_lightning.callbacks.report import RunReport

__all__ = ["Evaluation", "PerTaskMetrics", "RunReport", "TaskScore"]
