"""Task-balanced sampling: how often each task is seen, and a resumable, distributed sampler that applies it.

Mixing strategies (n_t = number of training examples of task t, K = cap, T = temperature):

* ``proportional``: p_t ∝ n_t (plain concatenation).
* ``capped``: p_t ∝ min(n_t, K), T5's examples-proportional mixing with an artificial size limit.
* ``temperature``: p_t ∝ min(n_t, K)^(1/T), seqio's ``mixing_rate_num_examples``: the cap applies before the
  temperature; T = 1 is (capped) proportional, T → ∞ uniform; K is optional here.
* ``uniform``: p_t = 1 / #tasks.
* ``unimax``: UniMax (Chung et al., 2023): spread a budget of examples uniformly over the tasks, never giving a task
  more than ``max_epochs`` passes over its data, and hand what small tasks cannot use to the larger ones; what no
  task can take is not drawn (``unimax_epoch_length``: an epoch then has fewer draws than the budget).
* ``weights``: explicit, user-given weights (normalised).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from fractions import Fraction
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from malora_lightning.values import is_finite_number, is_int

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = ("proportional", "capped", "temperature", "uniform", "unimax", "weights")
CAP_STRATEGIES = ("capped", "temperature")  # those that clip task sizes to a cap K; the others ignore it


def mixing_weights(
    sizes: Sequence[int],
    strategy: str = "proportional",
    *,
    cap: int | None = None,
    temperature: float | None = None,
    weights: Sequence[float] | None = None,
    budget: int | None = None,
    max_epochs: float = 1.0,
) -> list[float]:
    """Sampling probability of each task (same order as ``sizes``; sums to 1).

    ``cap`` is K for ``capped`` (required) and ``temperature`` (optional); ``temperature`` is T for ``temperature``;
    ``weights`` are the explicit weights for ``weights``; ``budget`` (default: the sum of sizes) and ``max_epochs``
    are UniMax's total number of examples and its limit on passes over one task.
    """
    if not sizes:
        raise ValueError("mixing_weights needs at least one task size")
    for position, size in enumerate(sizes):
        if size < 1:
            raise ValueError(f"task at position {position} has {size} examples; every task needs at least one")
    if strategy == "proportional":
        raw = [float(size) for size in sizes]
    elif strategy == "capped":
        if not is_int(cap) or cap < 1:  # True was a cap of 1 (every task alike), NaN no cap at all
            raise ValueError(f"strategy 'capped' needs cap, an integer >= 1 (got {cap!r})")
        raw = [float(min(size, cap)) for size in sizes]
    elif strategy == "temperature":
        if not is_finite_number(temperature) or temperature <= 0:  # True was T = 1
            raise ValueError(f"strategy 'temperature' needs temperature > 0 (got {temperature!r}), a finite number "
                             "(the limit T -> inf is strategy 'uniform')")
        if cap is not None and (not is_int(cap) or cap < 1):
            raise ValueError(f"cap must be an integer >= 1 or None (got {cap!r})")
        limit = cap if cap is not None else max(sizes)
        # in log space: min(n, K) ** (1 / T) overflows a float for small T (1000 ** 100)
        logs = [math.log(min(size, limit)) for size in sizes]
        peak_log = max(logs)
        if math.isfinite(peak_log / temperature):  # to the bit as before: a resumed sampler compares its weights
            raw = [math.exp(value / temperature - peak_log / temperature) for value in logs]
        else:  # T below about 1e-308: log(n) / T overflowed to inf, and inf - inf made every weight NaN
            raw = [math.exp((value - peak_log) / temperature) for value in logs]
    elif strategy == "uniform":
        raw = [1.0] * len(sizes)
    elif strategy == "unimax":
        raw = _unimax_allocation(sizes, budget, max_epochs)
    elif strategy == "weights":
        raw = _checked_weights(weights, len(sizes))
    else:
        raise ValueError(f"unknown sampling strategy {strategy!r}; valid: {', '.join(SAMPLING_STRATEGIES)}")
    peak = max(raw)
    scaled = [value / peak for value in raw]  # huge finite weights (1e308) would sum to inf
    total = sum(scaled)
    return [value / total for value in scaled]


def unimax_epoch_length(sizes: Sequence[int], budget: int | None = None, max_epochs: float = 1.0) -> int:
    """Draws per epoch under UniMax: the budget (default: the sum of sizes), or fewer when every task reaches its
    ``max_epochs`` passes. Filling the budget anyway would repeat tasks more often than the limit allows."""
    return round(sum(_unimax_allocation(sizes, budget, max_epochs)))


def _unimax_allocation(sizes: Sequence[int], budget: int | None, max_epochs: float) -> list[float]:
    """UniMax's Algorithm 1: smallest task first, each takes its uniform share of what is left, capped by its epochs
    (in whole examples, so that no task exceeds its passes once draws are counted)."""
    if budget is not None and (not is_int(budget) or budget < 1):  # NaN gave NaN probabilities, True a budget of 1
        raise ValueError(f"unimax budget must be an integer >= 1 or None (got {budget!r})")
    budget = budget if budget is not None else sum(sizes)
    if not is_finite_number(max_epochs) or max_epochs <= 0:  # inf was an OverflowError naming nothing
        raise ValueError(f"unimax max_epochs must be a finite number > 0 (got {max_epochs!r})")
    allocation = [0.0] * len(sizes)
    remaining = float(budget)
    order = sorted(range(len(sizes)), key=lambda position: sizes[position])
    for done, position in enumerate(order):
        share = remaining / (len(sizes) - done)
        allocation[position] = min(share, math.floor(max_epochs * sizes[position]))
        remaining -= allocation[position]
    if sum(allocation) < 1:
        raise ValueError(f"unimax max_epochs={max_epochs} allows no task a single example (sizes {list(sizes)}): "
                         "raise it to at least 1 / the largest task's size")
    return allocation


def check_weights(weights: Mapping[Any, Any], name: str = "weights") -> None:
    """Explicit mixing weights, keyed by task (name or position): each a finite number >= 0, at least one > 0. The
    error names the setting and the task, e.g. ``task_weights['parity']=-1.0``."""
    for task, weight in weights.items():
        if not is_finite_number(weight) or weight < 0:
            raise ValueError(f"{name}[{task!r}]={weight!r} is invalid: expected a finite number >= 0")
    if not any(weight > 0 for weight in weights.values()):
        raise ValueError(f"{name} are all 0 ({dict(weights)}): at least one task needs a weight > 0")


def _checked_weights(weights: Sequence[float] | None, count: int) -> list[float]:
    if weights is None:
        raise ValueError("strategy 'weights' needs weights (one per task)")
    if len(weights) != count:
        raise ValueError(f"got {len(weights)} weights for {count} tasks")
    check_weights(dict(enumerate(weights)))
    return [float(weight) for weight in weights]


def epoch_counts(weights: Sequence[float], total: int, offset: Fraction = Fraction(0)) -> list[int]:
    """How many of ``total`` draws each task gets: its exact share ``weights × total`` rounded down or up, the counts
    summing to ``total``. Systematic rounding, in exact fractions: task t gets the integers in
    ``(S_{t-1} + offset, S_t + offset]``, S_t the exact shares of tasks 0..t summed. With ``offset`` uniform in [0, 1)
    a share is rounded up with a probability equal to its fractional part, so that over epochs, each with its own
    offset (`TaskBalancedSampler`), every task's frequency converges to its weight; one fixed rounding gave the same
    tasks the spare draws in every epoch (20 uniform tasks, 64 draws an epoch: the first 4 trained 4/3 as often)."""
    if not 0 <= offset < 1:
        raise ValueError(f"offset must be in [0, 1) (got {offset})")
    shares = [Fraction(weight) for weight in weights]
    scale = Fraction(total) / sum(shares)
    counts, cumulative, below = [], Fraction(0), 0
    for share in shares:
        cumulative += share * scale
        reached = math.floor(cumulative + offset)
        counts.append(reached - below)
        below = reached
    return counts


def whole_shares(weights: Sequence[float], total: int) -> bool:
    """Whether every task's share of ``total`` draws is a whole number (to float precision: weights computed from task
    sizes are rarely exact), so that any rounding of it gives the same counts."""
    scale = total / sum(weights)
    return all(abs(weight * scale - round(weight * scale)) < 1e-6 for weight in weights)


def seeded_generator(*parts: object) -> torch.Generator:
    """A generator seeded from a tuple, so every (seed, purpose, ...) stream is independent and reproducible."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))


def replica_and_rank(num_replicas: int | None, rank: int | None) -> tuple[int, int]:
    """The given world size and rank, each None filled in from torch.distributed when it is initialised (else 1, 0)."""
    distributed = dist.is_available() and dist.is_initialized()
    if num_replicas is None:
        num_replicas = dist.get_world_size() if distributed else 1
    if rank is None:
        rank = dist.get_rank() if distributed else 0
    return num_replicas, rank


class ProcessGroupSampler(DistributedSampler):
    """A ``DistributedSampler`` over ``length`` positions whose world size and rank, each where not given, are the
    process group's when the sampler is used, not when it is made. A script makes a datamodule's loader for
    ``trainer.fit(train_dataloaders=...)`` or ``trainer.validate(dataloaders=...)`` before DDP starts the group, and
    Lightning keeps a ``DistributedSampler`` as it is: fixed at a world of one, every rank took all the data.
    Subclasses call `_follow_world` before using the shard attributes."""

    def __init__(self, length: int, *, num_replicas: int | None, rank: int | None, shuffle: bool, seed: int = 0,
                 drop_last: bool = False) -> None:
        # DistributedSampler took a world of 2.5 (a TypeError at iteration) and a rank of True (rank 1)
        if num_replicas is not None and (not is_int(num_replicas) or num_replicas < 1):
            raise ValueError(f"num_replicas must be an integer >= 1 or None (got {num_replicas!r})")
        if rank is not None and (not is_int(rank) or rank < 0):
            raise ValueError(f"rank must be an integer >= 0 or None (got {rank!r})")
        self._given = (num_replicas, rank)
        num_replicas, rank = replica_and_rank(num_replicas, rank)
        super().__init__(range(length), num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)

    def _follow_world(self) -> None:
        """Set ``num_replicas`` and ``rank`` to the current world's, and the shard sizes that follow from them (as
        ``DistributedSampler`` computes them)."""
        self.num_replicas, self.rank = replica_and_rank(*self._given)
        length = len(self.dataset)
        self.num_samples = length // self.num_replicas if self.drop_last else math.ceil(length / self.num_replicas)
        self.total_size = self.num_samples * self.num_replicas


# how `TaskBalancedSampler` splits an epoch between tasks, saved in its state: each epoch's shares rounded with an
# offset of their own (`epoch_counts`); states without it come from the fixed rounding of earlier versions
ROUNDING = "per-epoch offset"


class TaskBalancedSampler(ProcessGroupSampler):
    """Yields global indices into the concatenation of the task datasets (task 0's examples first, then task 1's...).

    Each epoch holds ``num_samples`` draws (default: the sum of the task sizes) split between tasks by ``weights``,
    each task's exact share rounded down or up (`epoch_counts`, with an offset drawn per epoch), so the task
    frequencies are exact to within one draw an epoch rather than noisy, and converge to the weights over epochs.
    Within a task, examples come from an endless stream of reshuffled passes over its data, continued across epochs:
    a down-weighted task sees new examples each epoch and an up-weighted one repeats only after a full pass. The
    epoch's draws are then shuffled together. Everything is a function of (seed, epoch), so any epoch can be rebuilt
    exactly (epoch e after counting the draws of epochs 0 to e - 1, a few tasks' worth of arithmetic each).

    It is a ``DistributedSampler`` so that Lightning (``use_distributed_sampler=True``) keeps it instead of wrapping it
    again; rank r takes every ``num_replicas``-th draw, and the epoch is padded by repeating its first draws (or cut,
    with ``drop_last``) so that all ranks get the same number. ``state_dict`` stores how far the epoch has gone, in
    draws across all ranks, so a resumed run (even with another world size) continues the same sequence; it also
    stores the world size, since a trainer counts that progress in batches of the saved run's size, which a resume on
    another world size must count again (`resume_at_batch_start`, and the datamodule's `rebase_restored_batches`).
    A world size or rank left None is the process group's when the sampler is iterated, measured or checkpointed
    (`ProcessGroupSampler`).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float],
        *,
        num_samples: int | None = None,
        seed: int = 0,
        num_replicas: int | None = None,
        rank: int | None = None,
        drop_last: bool = False,
    ) -> None:
        if len(sizes) != len(weights):
            raise ValueError(f"got {len(weights)} weights for {len(sizes)} task sizes")
        if any(size < 1 for size in sizes):
            raise ValueError(f"every task needs at least one example (sizes: {list(sizes)})")
        check_weights(dict(enumerate(weights)))  # a negative or non-finite weight would corrupt the epoch counts
        self.sizes = [int(size) for size in sizes]
        self.weights = [float(weight) for weight in weights]
        # int() took True as 1, "3" as 3 and cut 2.5 to 2
        if num_samples is not None and (not is_int(num_samples) or num_samples < 1):
            raise ValueError(f"num_samples must be an integer >= 1 or None (got {num_samples!r})")
        if not is_int(seed):  # the order is hashed from its repr: True and "1" gave other orders than 1
            raise ValueError(f"seed must be an integer (got {seed!r})")
        self.epoch_length = num_samples if num_samples is not None else sum(self.sizes)
        super().__init__(self.epoch_length, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed,
                         drop_last=drop_last)
        self._stream_starts_at: tuple[int, list[int]] = (0, [0] * len(self.sizes))  # see `_stream_starts`
        self._offsets = [sum(self.sizes[:position]) for position in range(len(self.sizes))]
        self._resume_at = 0  # draw (across ranks) where the next iteration starts; set by load_state_dict
        self.iteration_start = 0  # draw (across ranks) where the latest iteration started (`ResumableDataLoader`)
        self._position = 0  # draws (across ranks) handed out so far in this epoch

    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch`` from its beginning; setting the current epoch again keeps a restored position."""
        if epoch != self.epoch:
            self._resume_at = 0
            self._position = 0
        super().set_epoch(epoch)

    def epoch_sequence(self, epoch: int) -> list[int]:
        """All draws of ``epoch`` for all ranks, before padding and sharding."""
        counts, starts = self.task_counts(epoch), self._stream_starts(epoch)
        parts = [self._task_stream(task, start, count) + offset
                 for task, (start, count, offset) in enumerate(zip(starts, counts, self._offsets))]
        draws = torch.cat(parts)
        order = torch.randperm(len(draws), generator=seeded_generator(self.seed, "epoch", epoch))
        return draws[order].tolist()

    def task_counts(self, epoch: int) -> list[int]:
        """How many of ``epoch``'s draws each task gets (`epoch_counts`, with that epoch's own rounding offset)."""
        offset = torch.randint(2 ** 53, (1,), generator=seeded_generator(self.seed, "rounding", epoch)).item()
        return epoch_counts(self.weights, self.epoch_length, Fraction(offset, 2 ** 53))

    def _stream_starts(self, epoch: int) -> list[int]:
        """Each task's draws in the epochs before ``epoch``: where its stream goes on. Counted forward from the last
        epoch asked for (from epoch 0 when going back), since the counts vary from epoch to epoch."""
        counted, starts = self._stream_starts_at
        if epoch < counted:
            counted, starts = 0, [0] * len(self.sizes)
        for past in range(counted, epoch):
            starts = [start + count for start, count in zip(starts, self.task_counts(past))]
        self._stream_starts_at = (epoch, starts)
        return starts

    def _task_stream(self, task: int, start: int, count: int) -> torch.Tensor:
        """Task-local indices at positions [start, start + count) of the task's stream of reshuffled passes."""
        size = self.sizes[task]
        first_pass, last_pass = start // size, (start + count - 1) // size
        passes = [torch.randperm(size, generator=seeded_generator(self.seed, "task", task, cycle))
                  for cycle in range(first_pass, last_pass + 1)]
        stream = torch.cat(passes) if passes else torch.empty(0, dtype=torch.long)
        return stream[start - first_pass * size: start - first_pass * size + count]

    def __iter__(self) -> Iterator[int]:
        self._follow_world()
        sequence = self.epoch_sequence(self.epoch)
        if self.drop_last:
            sequence = sequence[: self.total_size]
        start, self._resume_at = self._resume_at, 0
        self.iteration_start = start
        rest = sequence[start:]
        # pad like DistributedSampler: repeat the first draws, as often as needed when there are more ranks than draws
        padding = (-len(rest)) % self.num_replicas
        rest += (sequence * math.ceil(padding / len(sequence)))[:padding]
        self._position = start
        return self._advance(rest[self.rank:: self.num_replicas])

    def _advance(self, share: list[int]) -> Iterator[int]:
        for index in share:
            self._position += self.num_replicas
            yield index

    def __len__(self) -> int:
        # The full per-rank length, also when resuming mid-epoch: Lightning counts the batches already done.
        self._follow_world()
        return self.num_samples

    def state_dict(self, consumed: int | None = None) -> dict[str, Any]:
        """Where this epoch stands. ``consumed``: draws this rank has really used since the epoch began (default: how
        many it has yielded, which runs ahead of training when a DataLoader prefetches)."""
        self._follow_world()
        position = self._position if consumed is None else consumed * self.num_replicas
        epoch = self.epoch
        if position >= self.total_size:
            epoch, position = epoch + 1, 0
        return {"epoch": epoch, "position": position, "seed": self.seed, "epoch_length": self.epoch_length,
                "sizes": list(self.sizes), "weights": list(self.weights), "num_replicas": self.num_replicas,
                "rounding": ROUNDING}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``: the next iteration starts where the saved run stopped."""
        saved = {key: state[key] for key in ("seed", "epoch_length", "sizes", "weights")}
        current = {"seed": self.seed, "epoch_length": self.epoch_length, "sizes": self.sizes, "weights": self.weights}
        if saved != current:
            logger.warning("Restoring a task sampler built for %s into one built for %s: the resumed order will not "
                           "repeat the saved run's sequence.", saved, current)
        elif state.get("rounding") != ROUNDING and not whole_shares(self.weights, self.epoch_length):
            logger.warning("Restoring a task sampler saved by an earlier version, which rounded each task's share of "
                           "an epoch's %d draws the same way in every epoch; this one rounds every epoch's shares on "
                           "its own (`epoch_counts`), so the resumed order will not repeat the saved run's sequence "
                           "(the tasks' weights are kept).", self.epoch_length)
        self._follow_world()
        super().set_epoch(int(state["epoch"]))
        self._resume_at = min(int(state["position"]), self.total_size)
        self._position = self._resume_at

    def resume_at_batch_start(self, batch_size: int) -> tuple[int, int]:
        """Move the restored position back to the start of the global batch (``batch_size`` draws on each of the
        ``num_replicas`` ranks) it falls in, so that a trainer counting whole batches can say where the epoch stands.
        Returns the whole batches before it and the draws that are therefore trained again."""
        self._follow_world()
        batches, repeated = divmod(self._resume_at, batch_size * self.num_replicas)
        self._resume_at -= repeated
        self._position = self._resume_at
        return batches, repeated


class ShardIndex(NamedTuple):
    """What `EvaluationShardSampler` yields: an example's index in its task's evaluation examples, and whether it
    counts (False for padding: computed like the others so that every rank does the same work, scored by no one)."""

    index: int
    counted: bool


class EvaluationShardSampler(ProcessGroupSampler):
    """Rank r evaluates examples r, r + world, r + 2*world, ... in order, then, where its shard is one short, one
    padding example that is computed but not counted.

    Every rank gets ceil(size / world) examples, hence the same number of batches: under FSDP every forward
    all-gathers the parameters, so a rank with a batch more than the others would wait for them forever. Padding
    position p (>= size) evaluates example p mod size, as ``DistributedSampler`` pads, but is yielded with
    ``counted=False`` and evaluation drops it from its outputs, so every real example is scored exactly once across
    the ranks (Lightning's default sampler pads without saying so, and per-task metrics counted the repeats twice).
    Being a ``DistributedSampler``, Lightning keeps it as it is. A world size or rank left None is the process
    group's when the sampler is iterated (`ProcessGroupSampler`): a script makes `datamodule.val_dataloader()` for
    `trainer.validate(dataloaders=...)` before the group exists, and every rank then scored every example.
    """

    def __init__(self, size: int, num_replicas: int | None = None, rank: int | None = None) -> None:
        super().__init__(size, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.size = size

    def _positions(self) -> range:
        """This rank's positions in the current world."""
        self._follow_world()
        return range(self.rank, self.total_size, self.num_replicas)

    def __iter__(self) -> Iterator[ShardIndex]:
        return (ShardIndex(position % self.size, position < self.size) for position in self._positions())

    def __len__(self) -> int:
        return len(self._positions())
