"""Multi-task data: tasks and their registry, the paper datasets' formatters, the offline built-in suite,
task-balanced sampling, tokenisation/batching and the ``MultiTaskDataModule``."""

from malora_lightning.data.batches import EvaluationBatch, EvaluationOutput, TrainingBatch
from malora_lightning.data.builtin import BUILTIN_TASKS, CONFLICT_TASKS, NEUTRAL_TASKS, build_builtin_tasks
from malora_lightning.data.collate import (
    EncodedExample,
    MultiTaskCollator,
    PromptEncoder,
    TruncationStats,
)
from malora_lightning.data.datamodule import MultiTaskDataModule
from malora_lightning.data.formatters import PAPER_TASKS
from malora_lightning.data.sampling import SAMPLING_STRATEGIES, TaskBalancedSampler, mixing_weights
from malora_lightning.data.tasks import (
    SPLITS,
    Example,
    FileSource,
    GeneratorSource,
    HubSource,
    Task,
    TaskDataError,
    TemplateFormatter,
    final_answer,
    first_line,
    get_task,
    register_task,
    registered_tasks,
    task_from_spec,
    tasks_from_yaml,
)
from malora_lightning.scoring import IGNORE_INDEX

__all__ = [
    "BUILTIN_TASKS",
    "CONFLICT_TASKS",
    "NEUTRAL_TASKS",
    "IGNORE_INDEX",
    "PAPER_TASKS",
    "SAMPLING_STRATEGIES",
    "SPLITS",
    "EncodedExample",
    "EvaluationBatch",
    "EvaluationOutput",
    "Example",
    "FileSource",
    "GeneratorSource",
    "HubSource",
    "MultiTaskCollator",
    "MultiTaskDataModule",
    "PromptEncoder",
    "Task",
    "TaskBalancedSampler",
    "TaskDataError",
    "TrainingBatch",
    "TemplateFormatter",
    "TruncationStats",
    "build_builtin_tasks",
    "final_answer",
    "first_line",
    "get_task",
    "mixing_weights",
    "register_task",
    "registered_tasks",
    "task_from_spec",
    "tasks_from_yaml",
]
