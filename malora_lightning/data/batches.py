"""The contracts between the data module, the LightningModule and the callbacks: the training batch, the evaluation
batch and the evaluation output, as typed classes (Lightning moves dataclasses between devices like dicts).

Shapes: B examples, L tokens (right-padded), P prompt tokens (left-padded), R (example, choice) rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from lightning_utilities.core.apply_func import apply_to_collection


@dataclass
class TrainingBatch:
    """What training reads; every batch has these fields."""

    input_ids: torch.Tensor  # [B, L] long: prompt + answer, right-padded
    attention_mask: torch.Tensor  # [B, L] long
    labels: torch.Tensor  # [B, L] long: IGNORE_INDEX on prompt and padding (the loss covers the answer and its end)
    task_id: torch.Tensor  # [B] long: index into the data module's `tasks`; -1 for a predict prompt without a task
    task_name: list[str | None]  # None for a predict prompt without a task
    # `target_pairs(labels)`, the (rows, positions) the loss reads, made by the collator on the CPU and moved with the
    # batch: made on the device they are a data-dependent shape, which waits for every kernel queued before it. None
    # (evaluation batches, and batches built by hand or by a collator of your own): `compute_lm_loss` makes them from
    # `labels`. Labels changed after collation need them made again (or set to None), else the loss reads the old ones.
    # Keyword-only, so that the fields above keep their positions and `EvaluationBatch`'s follow them.
    pairs: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, kw_only=True)

    def pin_memory(self) -> TrainingBatch:
        """A copy with every tensor in pinned memory. A DataLoader with ``pin_memory=True`` pins a batch through this
        method (it does not look inside dataclasses). Lightning moves a batch with ``non_blocking=True``, which is
        asynchronous from pinned memory only: from pageable memory the driver stages the copy and may wait for the
        kernels queued before it."""
        return apply_to_collection(self, torch.Tensor, lambda tensor: tensor.pin_memory())


@dataclass
class ChoiceRows:
    """A multiple-choice batch's rows, one per (example, choice): the prompt followed by that choice."""

    input_ids: torch.Tensor  # [R, L'] long, right-padded
    attention_mask: torch.Tensor  # [R, L'] long
    labels: torch.Tensor  # [R, L'] long: IGNORE_INDEX except on the choice's tokens
    example_index: torch.Tensor  # [R] long: row -> example
    gold: torch.Tensor  # [B] long: the index of each example's right choice
    num_choices: torch.Tensor  # [B] long


@dataclass
class EvaluationBatch(TrainingBatch):
    """What evaluation and prediction read: the training fields plus the prompts for generation and the choices."""

    prompts: list[str]  # the prompt texts before any chat template
    targets: list[str | None]  # the reference answers; None for a predict prompt without one
    prompt_input_ids: torch.Tensor  # [B, P] long: the prompts LEFT-padded, ending where the answer starts
    prompt_attention_mask: torch.Tensor  # [B, P] long
    # [B] bool: False for padding that evens out the ranks' evaluation batches (`EvaluationShardSampler`): computed
    # like the rest, so every rank runs the same forwards, but left out of the step's outputs
    counted: torch.Tensor
    choices: ChoiceRows | None = None  # multiple-choice tasks only
    # where each example came from (`EncodedExample.row`): what its `Prediction.row` says; None from a collator that
    # does not say (last and optional, so that collators written before it keep working)
    rows: list[int | None] | None = None


@dataclass
class EvaluationOutput:
    """Per-example results of one evaluation batch, the raw material of `PerTaskMetrics` and the run report."""

    task_name: list[str]
    loss: torch.Tensor  # [B]: mean token NLL of the target (multiple choice: of the gold choice)
    correct: torch.Tensor | None = None  # [B] bool; None for a task without an answer check
    predictions: list[str] | list[int] | None = None  # generated answers, or the chosen choice indices


_TENSOR_FIELDS = ("input_ids", "attention_mask", "labels", "task_id")
# what evaluation and prediction read besides `_TENSOR_FIELDS` and task_name
_EVALUATION_FIELDS = ("prompts", "targets", "prompt_input_ids", "prompt_attention_mask", "counted", "choices")


def check_batch(batch: object, *, training: bool) -> None:
    """Raise a TypeError (a missing field, another type or dtype) or a ValueError (another shape) naming the field
    when ``batch`` (a collator's, perhaps of its own class) breaks the `TrainingBatch` contract that every step reads:
    ``input_ids`` [B, L] of integers, ``attention_mask`` [B, L] (or None), ``labels`` [B, L] long, ``task_id`` [B] and
    ``task_name`` a list of B names (None only outside training). Outside training (evaluation and prediction) also
    the `EvaluationBatch` fields, with ``counted`` [B] bool and ``prompts``, ``targets`` and ``prompt_input_ids`` one
    per row. Otherwise the step failed deep in the model, or trained and scored on a silently wrong loss: labels
    narrower than input_ids were read against the wrong tokens, a ``task_name`` string gave a per-task loss to each
    letter, a training batch from a collator that ignored ``eval_fields`` failed as an AttributeError on ``choices``,
    and a ``counted`` of ones (long) picked row 1's loss and correctness for every row. Reads shapes and dtypes only,
    so nothing waits for the device."""
    kind = type(batch).__name__
    for name in (*_TENSOR_FIELDS, "task_name"):
        if not hasattr(batch, name):
            raise TypeError(f"the batch ({kind}) has no field {name!r}: every batch has "
                            f"{', '.join(_TENSOR_FIELDS)} and task_name (TrainingBatch, malora_lightning.data.batches)")
    for name in _TENSOR_FIELDS:
        value = getattr(batch, name)
        if not isinstance(value, torch.Tensor) and not (name == "attention_mask" and value is None):
            raise TypeError(f"the batch's {name} ({kind}.{name}) is a {type(value).__name__}: it must be a tensor")
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    labels, task_id, task_name = batch.labels, batch.task_id, batch.task_name
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"the batch's input_ids ({kind}.input_ids) is a {input_ids.dtype} tensor: token ids must be "
                        "of an integer dtype (long)")
    if labels.dtype != torch.long:
        raise TypeError(f"the batch's labels ({kind}.labels) is a {labels.dtype} tensor: labels must be long (token "
                        "ids, IGNORE_INDEX where no loss is taken)")
    if input_ids.dim() != 2:
        raise ValueError(f"the batch's input_ids ({kind}.input_ids) has shape {list(input_ids.shape)}: it must be "
                         "[B, L]")
    shape = list(input_ids.shape)
    for name, value, meaning in (("attention_mask", attention_mask, "a flag for each token"),
                                 ("labels", labels, "label t for token t, which position t - 1 predicts")):
        if value is not None and list(value.shape) != shape:
            raise ValueError(f"the batch's {name} ({kind}.{name}) has shape {list(value.shape)}: it must have "
                             f"input_ids' shape {shape}, {meaning}")
    if list(task_id.shape) != shape[:1]:
        raise ValueError(f"the batch's task_id ({kind}.task_id) has shape {list(task_id.shape)}: it must be "
                         f"{shape[:1]}, one task index per row of input_ids")
    if not isinstance(task_name, (list, tuple)):
        raise TypeError(f"the batch's task_name ({kind}.task_name) is a {type(task_name).__name__}: it must be a "
                        f"list of one task name per row ({shape[0]})")
    if len(task_name) != shape[0]:
        raise ValueError(f"the batch's task_name ({kind}.task_name) has {len(task_name)} names: it must have one per "
                         f"row of input_ids ({shape[0]})")
    for row, name in enumerate(task_name):
        if not isinstance(name, str) and (training or name is not None):
            allowed = "a str" if training else "a str, or None for a predict prompt without a task"
            raise TypeError(f"the batch's task_name[{row}] ({kind}.task_name) is {name!r}: each row's task name must "
                            f"be {allowed}")
    if not training:
        _check_evaluation_fields(batch, kind, shape[0])


def _check_evaluation_fields(batch: object, kind: str, rows: int) -> None:
    """`check_batch`'s part for evaluation and prediction batches: the `EvaluationBatch` fields they read."""
    for name in _EVALUATION_FIELDS:
        if not hasattr(batch, name):
            raise TypeError(f"the evaluation batch ({kind}) has no field {name!r}: evaluation and prediction also read "
                            f"{', '.join(_EVALUATION_FIELDS)} (EvaluationBatch, malora_lightning.data.batches), which "
                            "the collator that build_collator(eval_fields=True) returns must give")
    counted = batch.counted
    if not isinstance(counted, torch.Tensor) or counted.dtype != torch.bool or list(counted.shape) != [rows]:
        found = f"a {counted.dtype} tensor of shape {list(counted.shape)}" if isinstance(counted, torch.Tensor) \
            else f"a {type(counted).__name__}"
        raise TypeError(f"the batch's counted ({kind}.counted) is {found}: it must be a bool tensor of shape [{rows}], "
                        "True for each row to score (False for padding), since it selects the rows of the scores")
    for name, kinds, expected in (("prompts", (list, tuple), "a list of one prompt text"),
                                  ("targets", (list, tuple), "a list of one target (or None)"),
                                  ("prompt_input_ids", torch.Tensor, "a [B, P] tensor of one prompt")):
        value = getattr(batch, name)
        if not isinstance(value, kinds):
            raise TypeError(f"the batch's {name} ({kind}.{name}) is a {type(value).__name__}: it must be {expected} "
                            f"per row of input_ids ({rows})")
        length = len(value) if isinstance(value, (list, tuple)) else value.shape[0] if value.dim() == 2 else None
        if length != rows:
            found = f"{length} rows" if length is not None else f"shape {list(value.shape)}"
            raise ValueError(f"the batch's {name} ({kind}.{name}) has {found}: it must be {expected} per row of "
                             f"input_ids ({rows})")


def check_task_ids(batch: object, task_names: Sequence[str]) -> None:
    """Raise a ValueError naming the row when an evaluation or predict batch's ``task_id`` is not the index of its
    ``task_name`` in ``task_names`` (the data module's tasks, in `MultiTaskDataModule.tasks` order), or not -1 beside
    no task name. Metrics go by the name and `RoutingStats` by the id: from a collator of one's own, an id out of range
    stopped it with an IndexError (on CUDA a device-side assert), and the id of another task put this row's routing
    under that task, silently. Reads the ids, so call it on the CPU batch, before it moves; a batch without these
    fields, or with a name that is not a task of the data module, is left to `check_batch` and the step."""
    task_id, task_name = getattr(batch, "task_id", None), getattr(batch, "task_name", None)
    if not isinstance(task_id, torch.Tensor) or task_id.dim() != 1 or not isinstance(task_name, (list, tuple)) \
            or len(task_name) != task_id.shape[0]:
        return
    numbers = {name: number for number, name in enumerate(task_names)}
    for row, (number, name) in enumerate(zip(task_id.tolist(), task_name)):
        expected = -1 if name is None else numbers.get(name)
        if expected is not None and number != expected:
            kind = type(batch).__name__
            raise ValueError(f"the batch's task_id[{row}] ({kind}.task_id) is {number}, but its task_name is "
                             f"{name!r}: it must be {expected}, " + (
                                 "as a row without a task has" if name is None else
                                 f"that task's index in the data module's tasks ({', '.join(task_names)})") +
                             ", by which RoutingStats counts the row's routing")
