"""Scoring causal-LM outputs: per-row target log-likelihoods, losses, and multiple-choice decisions."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions no loss is taken on (prompt, padding); the collator writes it


def target_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, positions) of every target: position t of a row predicts its label at t + 1, which is not -100. The only
    logits the loss needs (a union of positions over the rows would be several times as many)."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


def pair_log_likelihoods(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor,
                         num_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(target) over its targets, and how many there are, from the logits [K, V] of K
    (row, position) pairs (`target_pairs`), their targets [K] and rows [K]. Counted with ``index_add_``, not
    ``bincount``, which reads the largest row on the host (a CUDA sync per step). In at least float32: half logits are
    widened, float64 ones (`64-true`) kept."""
    token_nll = F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets, reduction="none")
    summed = torch.zeros(num_rows, dtype=token_nll.dtype, device=token_nll.device).index_add_(0, rows, -token_nll)
    counts = torch.zeros(num_rows, dtype=torch.long, device=rows.device).index_add_(0, rows, torch.ones_like(rows))
    return summed, counts


def task_means(row_log_likelihood: torch.Tensor, row_tokens: torch.Tensor, task_names: Sequence[str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Each task's mean target-token NLL over its rows, and its target tokens, from the per-row sums
    (`pair_log_likelihoods`) and each row's task. One ``index_add_`` over each row's task slot, which reads nothing on
    the host; a boolean mask per task would (a CUDA sync each). The slots are copied from pinned memory, so the copy
    does not wait for the kernels queued before it either."""
    names = sorted(set(task_names))
    slot_of = {name: slot for slot, name in enumerate(names)}
    slots = torch.tensor([slot_of[name] for name in task_names], dtype=torch.long,
                         pin_memory=row_tokens.device.type == "cuda").to(row_tokens.device, non_blocking=True)
    tokens = row_tokens.new_zeros(len(names)).index_add_(0, slots, row_tokens)
    log_likelihood = row_log_likelihood.new_zeros(len(names)).index_add_(0, slots, row_log_likelihood)
    losses = -log_likelihood / tokens.clamp(min=1)
    return dict(zip(names, losses.unbind())), dict(zip(names, tokens.unbind()))


def first_rows(example_index: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Index of each example's first (example, choice) row; rows are grouped by example in order."""
    first = torch.full((num_examples,), example_index.numel(), dtype=torch.long, device=example_index.device)
    rows = torch.arange(example_index.numel(), device=example_index.device)
    return first.scatter_reduce(0, example_index, rows, reduce="amin")


def gold_rows(example_index: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """Index of each example's gold (example, choice) row: the rows its loss and routing statistics come from."""
    return first_rows(example_index, gold.shape[0]) + gold.to(example_index.device)


def choose_choices(row_scores: torch.Tensor, example_index: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Index (within its example) of the best-scoring choice row for every example; the first row wins ties. A NaN
    score (an overflowed or custom ``score_choices``) counts as -inf: it never wins, and the index stays valid."""
    row_scores = row_scores.masked_fill(row_scores.isnan(), float("-inf"))
    best = torch.full((num_examples,), float("-inf"), dtype=row_scores.dtype, device=row_scores.device)
    best = best.scatter_reduce(0, example_index, row_scores, reduce="amax")
    rows = torch.arange(row_scores.numel(), device=row_scores.device)
    is_best = row_scores == best[example_index]
    winner = torch.full((num_examples,), row_scores.numel(), dtype=torch.long, device=row_scores.device)
    winner = winner.scatter_reduce(0, example_index[is_best], rows[is_best], reduce="amin")
    return winner - first_rows(example_index, num_examples)


def one_token_choices(input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                      example_index: torch.Tensor, num_examples: int) -> bool:
    """Whether every (example, choice) row is one prompt, the same for every choice of its example, followed by one
    target token at the same position. Then the logits before that token score all of an example's choices, so one
    row per example, not one per choice, has to run through the model (`EvaluationMixin.choice_log_likelihoods`)."""
    targets = torch.zeros_like(labels, dtype=torch.bool)
    targets[:, 1:] = labels[:, 1:] != IGNORE_INDEX  # the positions `target_pairs` scores
    if not bool((targets.sum(1) == 1).all()):
        return False
    first = first_rows(example_index, num_examples)[example_index]
    prompts = input_ids.masked_fill(targets, IGNORE_INDEX)
    return bool((prompts == prompts[first]).all() and (targets == targets[first]).all()
                and (attention_mask == attention_mask[first]).all())
