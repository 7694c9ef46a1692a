"""Scoring causal-LM outputs: per-row target log-likelihoods, losses, and multiple-choice decisions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label of positions no loss is taken on (prompt, padding); the collator writes it


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Positions t whose next token is a target in at least one row: the only logits the loss needs."""
    return (labels[:, 1:] != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)


def token_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the sum of log p(label) over positions whose label is not -100, and how many there are.

    `logits[:, i]` scores `labels[:, i]` (already aligned: shift before calling).
    """
    mask = labels != IGNORE_INDEX
    token_nll = F.cross_entropy(logits.float().transpose(1, 2), labels.masked_fill(~mask, 0), reduction="none")
    return -(token_nll * mask).sum(dim=1), mask.sum(dim=1)


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
