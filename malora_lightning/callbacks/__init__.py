"""Callbacks that show what multi-task training does: per-task metrics, the seesaw effect, routing telemetry, plots
and the run report; and the writer of predictions."""

from malora_lightning.callbacks.per_task_metrics import Evaluation, PerTaskMetrics, TaskScore
from malora_lightning.callbacks.predictions import Prediction, PredictionWriter
from malora_lightning.callbacks.report import RunReport
from malora_lightning.callbacks.routing_stats import LayerRouting, RoutingStats, RoutingSummary
from malora_lightning.callbacks.seesaw import SeesawPoint, SeesawTracker, TaskMovement, load_baseline_scores

__all__ = [
    "Evaluation",
    "LayerRouting",
    "PerTaskMetrics",
    "Prediction",
    "PredictionWriter",
    "RoutingStats",
    "RoutingSummary",
    "RunReport",
    "SeesawPoint",
    "SeesawTracker",
    "TaskMovement",
    "TaskScore",
    "load_baseline_scores",
]
