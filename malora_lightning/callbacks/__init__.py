"""Callbacks that show what multi-task training does: per-task metrics, the seesaw effect, routing telemetry, plots
and the run report; the writer of predictions; and what every fit of `MALoRAModule` attaches itself (exact resume,
the adapter export)."""

from malora_lightning.callbacks.export import AdapterExport
from malora_lightning.callbacks.per_task_metrics import Evaluation, PerTaskMetrics, TaskScore
from malora_lightning.callbacks.predictions import Prediction, PredictionWriter
from malora_lightning.callbacks.random_state import TrainingRandomState
from malora_lightning.callbacks.report import RunReport
from malora_lightning.callbacks.routing_stats import LayerRouting, RoutingStats, RoutingSummary
from malora_lightning.callbacks.seesaw import SeesawPoint, SeesawTracker, TaskMovement, load_baseline_scores

__all__ = [
    "AdapterExport",
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
    "TrainingRandomState",
    "load_baseline_scores",
]
