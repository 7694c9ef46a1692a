import math
from collections import Counter
from fractions import Fraction

import pytest
import torch.distributed
from torch.utils.data import BatchSampler

from malora_lightning.data.datamodule import MultiTaskDataModule
from malora_lightning.data.sampling import (
    EvaluationShardSampler,
    TaskBalancedSampler,
    epoch_counts,
    mixing_weights,
    unimax_epoch_length,
)

SIZES = [10000, 1000, 100]
OFFSETS = [0, 10000, 11000]


def task_of(index: int) -> int:
    return max(task for task, offset in enumerate(OFFSETS) if index >= offset)


# Hand-computed probabilities for SIZES, one case per strategy.
EXPECTED = {
    ("proportional", ()): [10000 / 11100, 1000 / 11100, 100 / 11100],
    ("capped", (("cap", 1000),)): [1000 / 2100, 1000 / 2100, 100 / 2100],
    # sqrt sizes: 100, 31.6228, 10
    ("temperature", (("temperature", 2.0),)): [100 / 141.6228, 31.6228 / 141.6228, 10 / 141.6228],
    # cap first, then temperature: sqrt(1000), sqrt(1000), sqrt(100)
    ("temperature", (("temperature", 2.0), ("cap", 1000))): [31.6228 / 73.2456, 31.6228 / 73.2456, 10 / 73.2456],
    ("uniform", ()): [1 / 3, 1 / 3, 1 / 3],
    # budget 3000, 1 epoch: task 2 takes min(1000, 100) = 100; task 1 min(1450, 1000) = 1000; task 0 the rest, 1900
    ("unimax", (("budget", 3000),)): [1900 / 3000, 1000 / 3000, 100 / 3000],
    # budget 3000, 5 epochs: task 2 min(1000, 500) = 500; task 1 min(1250, 5000) = 1250; task 0 the rest, 1250
    ("unimax", (("budget", 3000), ("max_epochs", 5.0))): [1250 / 3000, 1250 / 3000, 500 / 3000],
    ("weights", (("weights", (1.0, 2.0, 1.0)),)): [0.25, 0.5, 0.25],
}


@pytest.mark.parametrize(("strategy", "options"), list(EXPECTED))
def test_mixing_weights_match_hand_computed_values(strategy, options):
    weights = mixing_weights(SIZES, strategy, **dict(options))
    assert weights == pytest.approx(EXPECTED[strategy, options], abs=1e-5)
    assert math.fsum(weights) == pytest.approx(1.0)


def test_temperature_one_is_proportional_and_unimax_with_a_large_budget_is_too():
    proportional = mixing_weights(SIZES, "proportional")
    assert mixing_weights(SIZES, "temperature", temperature=1.0) == pytest.approx(proportional)
    assert mixing_weights(SIZES, "unimax") == pytest.approx(proportional)  # default budget: every example once


@pytest.mark.parametrize(("strategy", "options"), list(EXPECTED))
def test_empirical_task_frequencies_over_20k_draws_match_the_weights(strategy, options):
    weights = mixing_weights(SIZES, strategy, **dict(options))
    sampler = TaskBalancedSampler(SIZES, weights, num_samples=20000, seed=3)
    draws = list(sampler)
    assert len(draws) == 20000
    counts = Counter(task_of(index) for index in draws)
    for task, weight in enumerate(weights):
        # within 6 binomial standard deviations: a flat 0.02 passed a sampler that never drew a task of weight 0.009
        assert abs(counts[task] / 20000 - weight) <= 6 * math.sqrt(weight * (1 - weight) / 20000) + 1e-12, task


@pytest.mark.parametrize(("budget", "max_epochs", "draws"), [
    (5000, 1.0, [10, 1000]),  # the budget exceeds one pass over everything: an epoch is that one pass
    (None, 0.5, [5, 500]),  # half a pass each, though the default budget is the sum of sizes
    (600, 1.0, [10, 590]),  # within the limits the budget is spread as before
    (None, 0.55, [5, 550]),  # 5.5 passes' worth of a 10-example task: 5 whole examples, never above the limit
])
def test_unimax_never_gives_a_task_more_passes_than_max_epochs(budget, max_epochs, draws):
    """UniMax's limit holds in the draws the sampler makes: the data module sizes a UniMax epoch to what the tasks
    can take (it once filled the budget anyway, giving a 10-example task 5 passes at max_epochs 1)."""
    sizes = [10, 1000]
    data = MultiTaskDataModule(sampling="unimax", samples_per_epoch=budget, unimax_max_epochs=max_epochs)
    sampler = data.build_sampler(sizes)
    counts = Counter(0 if index < sizes[0] else 1 for index in sampler)
    assert [counts[0], counts[1]] == draws == sampler.task_counts(0)
    assert len(sampler) == sum(draws) == unimax_epoch_length(sizes, budget, max_epochs)


def test_unimax_that_allows_no_example_says_so():
    with pytest.raises(ValueError, match=r"unimax max_epochs=0.01 allows no task a single example"):
        unimax_epoch_length([10, 20], max_epochs=0.01)


def test_small_temperatures_approach_the_largest_task_alone():
    """p ∝ n^(1/T) in log space: 395000 ** 100 overflows a float."""
    weights = mixing_weights([395000, 30000, 1000], "temperature", temperature=0.01)
    assert weights[0] == 1.0 and 0 < weights[1] < 1e-100 and weights[2] >= 0
    assert mixing_weights([4, 1], "temperature", temperature=0.5) == pytest.approx([16 / 17, 1 / 17])
    # a temperature the data module accepts (finite, > 0) gave NaN weights: log(n) / T overflowed to inf
    assert mixing_weights([10, 1000, 1000], "temperature", temperature=1e-310) == [0.0, 0.5, 0.5]
    # to the bit as exp(log(n) / T - log(max n) / T), the formula of earlier versions: a resumed sampler compares the
    # weights it stored, and exp((log(n) - log(max n)) / T) differs in the last bit (0.056023702280218225 here)
    assert mixing_weights([3, 7], "temperature", temperature=0.3) == [0.056023702280218246, 0.9439762977197818]


def test_a_cap_of_one_weighs_every_task_alike():
    assert mixing_weights([10, 5, 1], "capped", cap=1) == [1 / 3, 1 / 3, 1 / 3]
    assert mixing_weights([10, 5], "temperature", temperature=2.0, cap=1) == [0.5, 0.5]


def test_huge_finite_weights_are_normalised():
    assert mixing_weights([3, 3], "weights", weights=[1e308, 1e308]) == [0.5, 0.5]


@pytest.mark.parametrize(("epoch_length", "world"), [(1, 3), (1, 8), (2, 8), (3, 4)])
def test_every_rank_gets_as_many_draws_as_it_reports_with_more_ranks_than_draws(epoch_length, world):
    """Padding repeats the epoch's draws as often as needed (as DistributedSampler does): with 8 ranks and one draw
    ranks 2-7 got none and reported one, and a rank with fewer batches hangs DDP."""
    shares = [list(TaskBalancedSampler([5], [1.0], num_samples=epoch_length, seed=0, num_replicas=world, rank=rank))
              for rank in range(world)]
    single = list(TaskBalancedSampler([5], [1.0], num_samples=epoch_length, seed=0))
    assert all(len(share) == math.ceil(epoch_length / world) for share in shares)
    assert {index for share in shares for index in share} == set(single)


def test_epoch_counts_round_each_share_down_or_up_by_the_offset():
    # exact shares 3.5, 1.75, 1.75, summed 3.5, 5.25, 7: a task gets the integers in [sum before + offset, sum + offset)
    assert epoch_counts([0.5, 0.25, 0.25], 7) == [3, 2, 2]
    assert epoch_counts([0.5, 0.25, 0.25], 7, Fraction(1, 2)) == [4, 1, 2]
    assert epoch_counts([0.5, 0.25, 0.25], 7, Fraction(4, 5)) == [4, 2, 1]
    # over offsets spread evenly across [0, 1), each task's mean count is its exact share
    grid = [epoch_counts([0.5, 0.25, 0.25], 7, Fraction(step, 1000)) for step in range(1000)]
    assert [Fraction(sum(counts[task] for counts in grid), 1000) for task in range(3)] == \
        [Fraction(7, 2), Fraction(7, 4), Fraction(7, 4)]
    assert epoch_counts([1 / 3, 1 / 3, 1 / 3], 20000, Fraction(1, 3)) == [6667, 6666, 6667]
    assert epoch_counts([0.6, 0.0, 0.4], 5, Fraction(99, 100)) == [3, 0, 2]  # a weight of 0 is never drawn
    for offset in (Fraction(1), Fraction(-1, 2)):
        with pytest.raises(ValueError, match=rf"offset must be in \[0, 1\) \(got {offset}\)"):
            epoch_counts([0.5, 0.5], 4, offset)


@pytest.mark.parametrize(("sizes", "weights", "epoch_length", "epochs"), [
    ([40, 40, 10], [0.45, 0.45, 0.1], 8, 2000),  # exact 3.6, 3.6, 0.8 a epoch; the old fixed rounding: 4, 3, 1
    ([30] * 20, [1 / 20] * 20, 64, 300),  # exact 3.2 each; the old fixed rounding gave tasks 0-3 4, the others 3
])
def test_task_frequencies_over_many_short_epochs_follow_the_weights(sizes, weights, epoch_length, epochs):
    """Each epoch rounds each share down or up, and the spare draws go to other tasks from epoch to epoch: with one
    fixed rounding the same tasks got them every epoch (20 equally weighted tasks: the first 4 trained 4/3 as
    often as the other 16, 1200 draws each against 900, for 960 expected)."""
    sampler = TaskBalancedSampler(sizes, weights, num_samples=epoch_length, seed=0)
    ends = [sum(sizes[: task + 1]) for task in range(len(sizes))]
    draws = Counter()
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        counts = Counter(next(task for task, end in enumerate(ends) if index < end) for index in sampler)
        exact = [weight * epoch_length for weight in weights]
        assert all(math.floor(exact[task]) <= counts[task] <= math.ceil(exact[task]) for task in range(len(sizes)))
        draws += counts
    for task, weight in enumerate(weights):
        expected = weight * epoch_length * epochs
        spread = math.sqrt(epochs * 0.25)  # the largest standard deviation of a sum of per-epoch rounding choices
        assert abs(draws[task] - expected) <= 5 * spread, (task, draws[task], expected)


def test_a_task_stream_goes_on_across_epochs_of_varying_counts():
    """A task's stream of reshuffled passes continues where the last epoch stopped though its count changes from
    epoch to epoch: after any epoch, its examples have been drawn equally often, give or take one (a pass is finished
    before one repeats); an epoch rebuilt out of order is the same."""
    sizes, weights = [5, 7], [0.3, 0.7]  # 1.2 and 2.8 draws of 4 an epoch
    sampler = TaskBalancedSampler(sizes, weights, num_samples=4, seed=3)
    seen = Counter()
    sequences = []
    for epoch in range(40):
        sequences.append(sampler.epoch_sequence(epoch))
        seen.update(sequences[-1])
        for task_examples in (range(0, 5), range(5, 12)):
            assert max(seen[index] for index in task_examples) - min(seen[index] for index in task_examples) <= 1
    assert sum(seen[index] for index in range(5)) != 40 * 1  # the counts did vary (not 1 every epoch)
    fresh = TaskBalancedSampler(sizes, weights, num_samples=4, seed=3)
    assert [fresh.epoch_sequence(epoch) for epoch in (17, 3, 39)] == [sequences[17], sequences[3], sequences[39]]


def test_examples_within_a_task_are_drawn_without_replacement_then_reshuffled():
    sampler = TaskBalancedSampler(SIZES, [1 / 3] * 3, num_samples=20000, seed=0)
    epoch0, epoch1 = sampler.epoch_sequence(0), sampler.epoch_sequence(1)
    big = [index for index in epoch0 if task_of(index) == 0]
    assert len(big) == len(set(big)) == sampler.task_counts(0)[0] in (6666, 6667)  # fewer draws than examples
    small = Counter(index for index in epoch0 if task_of(index) == 2)
    assert set(small) == set(range(11000, 11100)) and set(small.values()) <= {66, 67}  # 6666 or 6667 over 100 items
    # the big task's stream continues across epochs: two epochs (over 13332 draws) visit all 10000 examples
    big_next = {index for index in epoch1 if task_of(index) == 0}
    assert set(big) | big_next == set(range(10000))


def test_sequence_is_deterministic_for_a_seed_and_reshuffled_per_epoch():
    weights = mixing_weights(SIZES, "uniform")
    first, again = TaskBalancedSampler(SIZES, weights, seed=1), TaskBalancedSampler(SIZES, weights, seed=1)
    assert list(first) == list(again)
    other_seed = TaskBalancedSampler(SIZES, weights, seed=2)
    assert list(other_seed) != list(first)
    epoch0 = list(first)
    first.set_epoch(1)
    epoch1 = list(first)
    assert epoch1 != epoch0 and len(epoch1) == len(epoch0)


def test_two_ranks_get_disjoint_shares_that_cover_the_epoch():
    sizes = [6, 4, 2]
    weights = mixing_weights(sizes, "proportional")
    single = list(TaskBalancedSampler(sizes, weights, seed=5, num_replicas=1, rank=0))
    assert sorted(single) == list(range(12))  # proportional with the default length: a permutation of everything
    ranks = [list(TaskBalancedSampler(sizes, weights, seed=5, num_replicas=2, rank=rank)) for rank in (0, 1)]
    assert set(ranks[0]).isdisjoint(ranks[1])
    assert sorted(ranks[0] + ranks[1]) == list(range(12))
    assert ranks == [single[0::2], single[1::2]]


def test_uneven_epochs_are_padded_so_ranks_have_equal_length():
    sizes = [5, 4, 2]
    weights = mixing_weights(sizes, "proportional")
    single = list(TaskBalancedSampler(sizes, weights, seed=5))
    ranks = [TaskBalancedSampler(sizes, weights, seed=5, num_replicas=2, rank=rank) for rank in (0, 1)]
    shares = [list(sampler) for sampler in ranks]
    assert [len(share) for share in shares] == [len(sampler) for sampler in ranks] == [6, 6]
    assert set(shares[0]) | set(shares[1]) == set(range(11))
    assert shares[1][-1] == single[0]  # the padding repeats the epoch's first draw


@pytest.mark.parametrize("stop", [0, 7, 33])
def test_save_and_restore_mid_epoch_continues_the_identical_sequence(stop):
    weights = mixing_weights(SIZES, "temperature", temperature=2.0)
    sampler = TaskBalancedSampler(SIZES, weights, num_samples=60, seed=4)
    sampler.set_epoch(2)
    full = list(sampler)
    iterator = iter(sampler)
    head = [next(iterator) for _ in range(stop)]
    state = sampler.state_dict()
    assert state["epoch"] == 2 and state["position"] == stop

    restored = TaskBalancedSampler(SIZES, weights, num_samples=60, seed=4)
    restored.load_state_dict(state)
    restored.set_epoch(2)  # Lightning sets the (same) epoch again after restoring: the position must survive
    assert head + list(restored) == full
    restored.set_epoch(3)  # the next epoch starts from its beginning
    sampler.set_epoch(3)
    assert list(restored) == list(sampler)


def test_restoring_a_state_saved_with_other_settings_says_the_order_will_differ(caplog):
    state = TaskBalancedSampler([6, 4], [0.5, 0.5], seed=8).state_dict(consumed=3)
    with caplog.at_level("WARNING", logger="malora_lightning.data.sampling"):
        TaskBalancedSampler([6, 4], [0.5, 0.5], seed=8).load_state_dict(state)
    assert not caplog.text
    with caplog.at_level("WARNING", logger="malora_lightning.data.sampling"):
        TaskBalancedSampler([6, 5], [0.5, 0.5], seed=8).load_state_dict(state)
    assert "Restoring a task sampler built for" in caplog.text and "'sizes': [6, 4]" in caplog.text
    assert "'sizes': [6, 5]" in caplog.text and "will not repeat the saved run's sequence" in caplog.text


def test_drop_last_cuts_the_epoch_to_what_every_rank_can_take_whole():
    """11 draws on 2 ranks: drop_last leaves out the epoch's last draw instead of repeating its first."""
    sizes, weights = [6, 5], [0.5, 0.5]
    sequence = TaskBalancedSampler(sizes, weights, seed=3).epoch_sequence(0)
    shares = [list(TaskBalancedSampler(sizes, weights, seed=3, num_replicas=2, rank=rank, drop_last=True))
              for rank in (0, 1)]
    assert shares == [sequence[0:10:2], sequence[1:10:2]]
    padded = TaskBalancedSampler(sizes, weights, seed=3, num_replicas=2, rank=1)
    assert list(padded) == sequence[1::2] + [sequence[0]]


def test_restore_with_another_world_size_continues_the_global_sequence():
    sizes = [6, 4, 2]
    weights = mixing_weights(sizes, "uniform")
    one = TaskBalancedSampler(sizes, weights, seed=8, num_replicas=1, rank=0)
    full = list(one)
    state = one.state_dict(consumed=4)  # one rank trained on 4 draws
    shares = []
    for rank in (0, 1):
        sampler = TaskBalancedSampler(sizes, weights, seed=8, num_replicas=2, rank=rank)
        sampler.load_state_dict(state)
        shares.append(list(sampler))
    assert shares == [full[4::2], full[5::2]]


@pytest.mark.parametrize(("sizes", "epoch_length", "warned"), [
    ([5, 3, 3], 6, True),  # shares 2.73 / 1.64 / 1.64: the earlier fixed rounding drew another order
    ([1000, 2000], None, False),  # proportional, shares 1000 and 2000 up to float error: the same counts either way
    ([3, 5, 7], None, False),  # shares 2.9999999999999996 / 5.000000000000001 / 7.0: whole, just below and above
])
def test_a_state_saved_with_the_earlier_rounding_says_the_order_changes_where_it_does(sizes, epoch_length, warned,
                                                                                        caplog):
    weights = mixing_weights(sizes, "proportional")
    state = TaskBalancedSampler(sizes, weights, num_samples=epoch_length, seed=1).state_dict()
    assert state.pop("rounding") == "per-epoch offset"
    with caplog.at_level("WARNING", logger="malora_lightning.data.sampling"):
        TaskBalancedSampler(sizes, weights, num_samples=epoch_length, seed=1).load_state_dict(state)
    assert ("saved by an earlier version, which rounded each task's share" in caplog.text) == warned
    caplog.clear()
    state["rounding"] = "per-epoch offset"
    with caplog.at_level("WARNING", logger="malora_lightning.data.sampling"):
        TaskBalancedSampler(sizes, weights, num_samples=epoch_length, seed=1).load_state_dict(state)
    assert not caplog.text


def test_state_after_a_finished_epoch_points_at_the_next_one():
    sampler = TaskBalancedSampler([3, 3], [0.5, 0.5], seed=0, num_replicas=2, rank=1)
    list(sampler)
    assert (sampler.state_dict()["epoch"], sampler.state_dict()["position"]) == (1, 0)
    assert sampler.state_dict(consumed=2)["position"] == 4  # 2 draws on each of 2 ranks


def test_zero_weight_tasks_are_never_drawn():
    sampler = TaskBalancedSampler([4, 4], mixing_weights([4, 4], "weights", weights=[1.0, 0.0]), seed=0)
    assert sorted(sampler) == [0, 0, 1, 1, 2, 2, 3, 3]  # epoch of 8 draws, all from task 0


@pytest.mark.parametrize(("sizes", "strategy", "options", "message"), [
    ([], "uniform", {}, "mixing_weights needs at least one task size"),  # max() of no weights
    ([10, 0], "proportional", {}, "position 1 has 0 examples"),
    ([10], "capped", {}, "needs cap"),
    ([10], "temperature", {"temperature": 0.0}, "temperature > 0"),
    ([10], "temperature", {"temperature": float("nan")}, r"temperature > 0 \(got nan\)"),  # NaN weights before
    ([10, 5], "weights", {"weights": [1.0]}, "1 weights for 2 tasks"),
    ([10, 5], "weights", {}, r"strategy 'weights' needs weights \(one per task\)"),
    ([10, 5], "weights", {"weights": [1.0, -1.0]}, r"weights\[1\]=-1.0 is invalid: expected a finite number >= 0"),
    ([10, 5], "weights", {"weights": [0.0, 0]}, "at least one task needs a weight > 0"),
    ([10], "balanced", {}, "valid: proportional, capped, temperature, uniform, unimax, weights"),
    # taken as they came: True as a cap of 1 or T = 1, a NaN cap as none, a NaN budget gave NaN probabilities
    ([10, 5], "capped", {"cap": True}, r"needs cap, an integer >= 1 \(got True\)"),
    ([10, 5], "capped", {"cap": float("nan")}, r"needs cap, an integer >= 1 \(got nan\)"),
    ([10, 5], "temperature", {"temperature": True}, r"temperature > 0 \(got True\), a finite number"),
    ([10, 5], "temperature", {"temperature": 2.0, "cap": 2.5}, r"cap must be an integer >= 1 or None \(got 2.5\)"),
    ([10, 5], "unimax", {"budget": float("nan")}, r"budget must be an integer >= 1 or None \(got nan\)"),
    # a log(0) math domain error; a budget of 0 blamed max_epochs ("allows no task a single example")
    ([10, 5], "temperature", {"temperature": 2.0, "cap": 0}, r"cap must be an integer >= 1 or None \(got 0\)"),
    ([10, 5], "unimax", {"budget": 0}, r"budget must be an integer >= 1 or None \(got 0\)"),
    ([10, 5], "unimax", {"max_epochs": float("inf")}, r"max_epochs must be a finite number > 0 \(got inf\)"),  # Overflow
    ([10, 5], "unimax", {"max_epochs": "1"}, r"max_epochs must be a finite number > 0 \(got '1'\)"),  # TypeError
])
def test_bad_mixing_arguments_say_what_is_wrong(sizes, strategy, options, message):
    with pytest.raises(ValueError, match=message):
        mixing_weights(sizes, strategy, **options)


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_evaluation_shards_are_even_and_score_every_example_once(world):
    """Every rank gets as many examples, hence batches (under FSDP a rank with a batch more waits forever for the
    others' all-gathers); the padding that evens them out is flagged, so each real example counts exactly once."""
    for size in range(14):
        shards = [list(EvaluationShardSampler(size, num_replicas=world, rank=rank)) for rank in range(world)]
        assert [len(shard) for shard in shards] == [math.ceil(size / world)] * world, size
        assert [len(EvaluationShardSampler(size, num_replicas=world, rank=rank)) for rank in range(world)] == \
            [len(shard) for shard in shards]
        assert len({len(list(BatchSampler(shard, batch_size=4, drop_last=False))) for shard in shards}) == 1, size
        real = [[index.index for index in shard if index.counted] for shard in shards]
        assert sorted(index for indices in real for index in indices) == list(range(size)), size
        assert all(indices == sorted(indices) for indices in real), size  # in order within a rank
        padding = [index for shard in shards for index in shard if not index.counted]
        assert len(padding) == len(shards[0]) * world - size, size
        assert all(0 <= index.index < size for index in padding), size  # a real example, computed but not counted
        assert all(index.counted for shard in shards for index in shard[:-1]), size  # padding only ends a shard


@pytest.mark.parametrize("sampler", [lambda shard: EvaluationShardSampler(8, **shard),
                                     lambda shard: TaskBalancedSampler([4, 4], [0.5, 0.5], **shard)])
@pytest.mark.parametrize(("shard", "message"), [
    ({"num_replicas": 2.5, "rank": 0}, r"num_replicas must be an integer >= 1 or None \(got 2.5\)"),  # TypeError later
    ({"num_replicas": 0}, r"num_replicas must be an integer >= 1 or None \(got 0\)"),
    ({"num_replicas": 2, "rank": True}, r"rank must be an integer >= 0 or None \(got True\)"),  # was rank 1
    ({"num_replicas": 2, "rank": -1}, r"rank must be an integer >= 0 or None \(got -1\)"),
])
def test_a_bad_world_size_or_rank_is_named(sampler, shard, message):
    with pytest.raises(ValueError, match=message):
        sampler(shard)


def test_evaluation_shards_pad_short_ranks_with_a_flagged_repeat():
    padded = [list(EvaluationShardSampler(7, num_replicas=3, rank=rank)) for rank in range(3)]
    assert padded == [[(0, True), (3, True), (6, True)], [(1, True), (4, True), (0, False)],
                      [(2, True), (5, True), (1, False)]]
    assert list(EvaluationShardSampler(4)) == [(0, True), (1, True), (2, True), (3, True)]


def test_an_evaluation_sampler_made_before_the_process_group_shards_for_the_run(monkeypatch):
    """A script's `datamodule.val_dataloader()`, passed to `trainer.validate(dataloaders=...)` under DDP, is made
    before the process group exists: its sampler took a world of one, every rank scored every example and each counted
    twice (a per-task count of 10 for 5 examples on 2 ranks, duplicate predictions)."""
    sampler = EvaluationShardSampler(5)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert len(sampler) == 3
    assert list(sampler) == [(1, True), (3, True), (0, False)]
    assert list(EvaluationShardSampler(5, num_replicas=1, rank=0)) == [(index, True) for index in range(5)]  # as given


def test_a_training_sampler_made_before_the_process_group_shards_and_checkpoints_for_the_run(monkeypatch):
    """`trainer.fit(model, train_dataloaders=datamodule.train_dataloader())` under DDP makes the loader before the
    process group exists, and Lightning keeps its sampler: fixed at a world of one, every rank trained on the same
    batches. Its length, checkpoint state and resume count in the run's world as well."""
    sizes = [6, 4, 2]
    weights = mixing_weights(sizes, "uniform")
    full = list(TaskBalancedSampler(sizes, weights, seed=8))
    sampler, restored = TaskBalancedSampler(sizes, weights, seed=8), TaskBalancedSampler(sizes, weights, seed=8)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda: 2)
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    assert len(sampler) == 6
    assert list(sampler) == full[1::2]
    state = sampler.state_dict(consumed=2)
    assert (state["position"], state["num_replicas"]) == (4, 2)  # 2 draws on each of 2 ranks
    restored.load_state_dict({**state, "position": 5})
    assert restored.resume_at_batch_start(2) == (1, 1)  # batches of 2 on 2 ranks: draw 4 is trained again
    assert list(restored) == full[5::2]
    assert list(TaskBalancedSampler(sizes, weights, seed=8, num_replicas=1, rank=0)) == full  # as given


@pytest.mark.parametrize(("weights", "message"), [
    ([1.0, -0.5], r"weights\[1\]=-0.5 is invalid: expected a finite number >= 0"),
    ([float("nan"), 1.0], r"weights\[0\]=nan is invalid: expected a finite number >= 0"),
    ([float("inf"), 1.0], r"weights\[0\]=inf is invalid: expected a finite number >= 0"),
    ([0, 0], "at least one task needs a weight > 0"),
])
def test_sampler_refuses_weights_that_are_not_valid_mixing_weights(weights, message):
    with pytest.raises(ValueError, match=message):
        TaskBalancedSampler([5, 5], weights, seed=0)


@pytest.mark.parametrize(("sizes", "weights", "message"), [
    ([5, 5], [1.0], r"got 1 weights for 2 task sizes"),
    ([5, 0], [0.5, 0.5], r"every task needs at least one example \(sizes: \[5, 0\]\)"),  # nothing to draw from
])
def test_sampler_refuses_sizes_that_do_not_match_or_hold_no_example(sizes, weights, message):
    with pytest.raises(ValueError, match=message):
        TaskBalancedSampler(sizes, weights, seed=0)


@pytest.mark.parametrize(("options", "message"), [
    ({"num_samples": True}, r"num_samples must be an integer >= 1 or None \(got True\)"),  # int() made these 1, 3, 2
    ({"num_samples": "3"}, r"num_samples must be an integer >= 1 or None \(got '3'\)"),
    ({"num_samples": 2.5}, r"num_samples must be an integer >= 1 or None \(got 2.5\)"),
    ({"num_samples": 0}, r"num_samples must be an integer >= 1 or None \(got 0\)"),  # a ZeroDivisionError
    ({"seed": True}, r"seed must be an integer \(got True\)"),  # hashed by its repr: another order than seed 1
    ({"seed": "1"}, r"seed must be an integer \(got '1'\)"),
])
def test_sampler_refuses_a_draw_count_or_seed_that_is_not_an_integer(options, message):
    with pytest.raises(ValueError, match=message):
        TaskBalancedSampler([5, 5], [0.5, 0.5], **({"seed": 0} | options))
