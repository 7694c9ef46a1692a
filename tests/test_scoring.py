import pytest
import torch

from malora_lightning.scoring import (
    choose_choices,
    gold_rows,
    one_token_choices,
    pair_log_likelihoods,
    target_pairs,
    task_means,
)


def test_log_likelihood_of_the_target_pairs_equals_the_full_sequence_computation():
    torch.manual_seed(0)
    logits = torch.randn(3, 7, 11)
    labels = torch.full((3, 7), -100)
    labels[0, 5:] = torch.tensor([1, 2])
    labels[1, 2:4] = torch.tensor([3, 4])
    labels[2, 6] = 5
    rows, positions = target_pairs(labels)
    assert list(zip(rows.tolist(), positions.tolist())) == [(0, 4), (0, 5), (1, 1), (1, 2), (2, 5)]  # t: target t + 1
    summed, counts = pair_log_likelihoods(logits[rows, positions], labels[rows, positions + 1], rows, 3)
    log_probs = torch.log_softmax(logits, dim=-1)
    for row in range(3):
        targets = [t for t in range(1, 7) if labels[row, t] != -100]
        expected = sum(log_probs[row, t - 1, labels[row, t]] for t in targets)
        torch.testing.assert_close(summed[row], expected)
        assert counts[row].item() == len(targets)
    summed, counts = pair_log_likelihoods(logits[:0, 0], labels[:0, 0], rows[:0], 2)  # no target in the batch
    assert summed.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]


@pytest.mark.parametrize(("dtype", "expected"), [(torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                  (torch.float32, torch.float32), (torch.float64, torch.float64)])
def test_log_likelihoods_are_computed_in_at_least_float32_and_keep_float64(dtype, expected):
    """A 64-true run's loss and logit gradients were rounded to float32 (2.5e-5 off a float64 reference here)."""
    torch.manual_seed(0)
    logits = (8 * torch.randn(50, 272, dtype=torch.float64)).to(dtype).requires_grad_()
    targets, rows = torch.randint(0, 272, (50,)), torch.arange(50) // 10
    summed, _ = pair_log_likelihoods(logits, targets, rows, 5)
    summed.sum().backward()
    exact = logits.detach().double().requires_grad_()
    target_log_probabilities = torch.log_softmax(exact, -1)[range(50), targets]
    reference = torch.zeros(5, dtype=torch.float64).index_add_(0, rows, target_log_probabilities)
    reference.sum().backward()
    assert summed.dtype == expected and logits.grad.dtype == dtype
    if dtype == torch.float64:
        torch.testing.assert_close(summed, reference, rtol=1e-14, atol=1e-12)
        torch.testing.assert_close(logits.grad, exact.grad, rtol=1e-14, atol=1e-15)
    else:
        torch.testing.assert_close(summed.double(), reference, rtol=1e-5, atol=1e-4)


def test_task_means_are_each_tasks_target_token_mean_over_its_interleaved_rows():
    summed = torch.tensor([-3.0, -1.0, -2.0, -8.0, 0.0, -6.0])
    tokens = torch.tensor([3, 1, 2, 4, 0, 2])
    losses, counts = task_means(summed, tokens, ["b", "a", "b", "c", "a", "c"])
    assert list(losses) == ["a", "b", "c"] and list(counts) == ["a", "b", "c"]
    assert {name: count.item() for name, count in counts.items()} == {"a": 1, "b": 5, "c": 6}
    assert {name: loss.item() for name, loss in losses.items()} == pytest.approx({"a": 1.0, "b": 1.0, "c": 14 / 6})
    losses, counts = task_means(summed[4:5], tokens[4:5], ["a"])  # a task without targets in the batch
    assert losses["a"].item() == 0.0 and counts["a"].item() == 0


def test_choose_choices_picks_the_best_row_per_example_and_the_first_on_ties():
    scores = torch.tensor([-1.0, -0.5, -3.0, -2.0, -2.0, -0.1])
    example = torch.tensor([0, 0, 0, 1, 1, 2])
    assert choose_choices(scores, example, 3).tolist() == [1, 0, 0]


def test_a_nan_score_never_wins_and_every_chosen_index_is_a_choice_of_its_example():
    """The example's best score would be NaN, which no row equals: its example was left without a winner (an index
    past its choices)."""
    nan = float("nan")
    scores = torch.tensor([-1.0, nan, -3.0, -1.0, -2.0, nan, nan, nan, float("-inf")])
    example = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    assert choose_choices(scores, example, 4).tolist() == [0, 1, 0, 0]


def test_gold_rows_index_each_examples_gold_choice_among_all_rows():
    example_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])  # 3, 2 and 4 choices
    assert gold_rows(example_index, torch.tensor([2, 0, 3])).tolist() == [2, 3, 8]


def test_one_token_choices_needs_one_target_token_after_the_same_prompt_in_every_row_of_an_example():
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 8, 0], [9, 6, 7, 3], [9, 6, 4, 3]])  # examples [0, 0, 1, 1]
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1]])
    labels = torch.full((4, 4), -100)
    labels[:, 2] = ids[:, 2]
    example = torch.tensor([0, 0, 1, 1])
    assert one_token_choices(ids, mask, labels, example, 2)
    two_tokens = labels.clone()
    two_tokens[2:, 3] = 3
    assert not one_token_choices(ids, mask, two_tokens, example, 2)
    other_prompt = ids.clone()
    other_prompt[1, 0] = 9
    assert not one_token_choices(other_prompt, mask, labels, example, 2)
    other_position = labels.clone()
    other_position[3, 2], other_position[3, 1] = -100, 6
    assert not one_token_choices(ids, mask, other_position, example, 2)
    other_mask = mask.clone()
    other_mask[1, 3] = 1
    assert not one_token_choices(ids, other_mask, labels, example, 2)
