"""The contracts between the data module, the LightningModule and the callbacks: the training batch, the evaluation
batch and the evaluation output, as typed classes (Lightning moves dataclasses between devices like dicts).

Shapes: B examples, L tokens (right-padded), P prompt tokens (left-padded), R (example, choice) rows.
"""

from __future__ import annotations

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
