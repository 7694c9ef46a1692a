"""Scoring causal-LM outputs: per-row target log-likelihoods, losses, and multiple-choice decisions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def target_log_likelihoods(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(label) over each row's target tokens, and how many target tokens the row has.

    `logits[:, t]` predicts `labels[:, t + 1]`; positions labelled -100 (prompt, padding) do not count.
    """
    shifted_logits = logits[:, :-1].float()
    shifted_labels = labels[:, 1:]
    mask = shifted_labels != IGNORE_INDEX
    token_nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted_labels.masked_fill(~mask, 0),
                                reduction="none")
    return -(token_nll * mask).sum(dim=1), mask.sum(dim=1)


def choose_choices(row_scores: torch.Tensor, example_index: torch.Tensor, num_examples: int) -> torch.Tensor:
    """Index (within its example) of the best-scoring choice row for every example.

    Rows are grouped by `example_index` in order, as the data collator lays out (example, choice) pairs.
    """
    best = torch.full((num_examples,), float("-inf"), dtype=row_scores.dtype, device=row_scores.device)
    best = best.scatter_reduce(0, example_index, row_scores, reduce="amax")
    first_row = torch.full((num_examples,), row_scores.numel(), dtype=torch.long, device=row_scores.device)
    rows = torch.arange(row_scores.numel(), device=row_scores.device)
    first_row = first_row.scatter_reduce(0, example_index, rows, reduce="amin")
    is_best = row_scores == best[example_index]
    # the first row that reaches the maximum wins ties, so the result does not depend on float noise ordering
    winner = torch.full((num_examples,), row_scores.numel(), dtype=torch.long, device=row_scores.device)
    winner = winner.scatter_reduce(0, example_index[is_best], rows[is_best], reduce="amin")
    return winner - first_row
