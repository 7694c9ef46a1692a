"""Statistics of the quality study: accuracies with 95 % intervals, paired comparisons between configurations, and
curves over training, all from each run's per-example results (`benchmarks/example_record.py`).

Two things make a measured accuracy uncertain here: the training run (the seed sets the initialisation, dropout and
data order) and the finite validation set (100 items per task, the same items for every run). Intervals come from a
two-level bootstrap that resamples both: seeds with replacement, and each task's items with replacement (one item
resample shared by every seed and every configuration, because the items are shared). Comparisons are paired: the
same resample of seeds and items is applied to both configurations, and runs with the same seed saw the same batches
in the same order. With 3 seeds, the seed level of the bootstrap has only 10 distinct draws and understates the
spread between seeds; the per-seed differences are printed beside each paired interval so a reader can see it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BOOTSTRAP_DRAWS = 4000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Estimate:
    """A mean with its 95 % bootstrap interval (fractions in [0, 1], or differences of them)."""

    mean: float
    low: float
    high: float

    def percent(self, signed: bool = False) -> str:
        sign = "+" if signed else ""
        return f"{100 * self.mean:{sign}.1f} [{100 * self.low:{sign}.1f}, {100 * self.high:{sign}.1f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def evaluation_at(run: dict, step: int | None = None) -> dict:
    """One run's recorded evaluation at `step` (default: the last one)."""
    evaluations = [evaluation for evaluation in run["examples"] if step is None or evaluation["step"] == step]
    if not evaluations:
        raise ValueError(f"run seed {run['seed']} has no evaluation at step {step}")
    return evaluations[-1]


def correctness(run: dict, step: int | None = None) -> dict[str, np.ndarray]:
    """Each task's per-item correctness (0/1) at the evaluation of `step` (default: the last one) of one run."""
    return {task: np.frombuffer(bits.encode(), dtype=np.uint8) - ord("0")
            for task, bits in evaluation_at(run, step)["correct"].items()}


def stack(runs: list[dict], tasks: list[str], step: int | None = None) -> dict[str, np.ndarray]:
    """Per task, a [seeds, items] 0/1 array over the runs (one per seed, in the order given)."""
    per_run = [correctness(run, step) for run in runs]
    return {task: np.stack([results[task] for results in per_run]).astype(np.float64) for task in tasks}


class Bootstrap:
    """One fixed set of resamples (seed indices and, per task, item indices), shared by every quantity computed
    from it, so that paired comparisons use the same draws for both sides."""

    def __init__(self, seeds: int, items: dict[str, int], draws: int = BOOTSTRAP_DRAWS, seed: int = 0) -> None:
        generator = np.random.default_rng(seed)
        self.seed_draws = generator.integers(0, seeds, size=(draws, seeds))
        self.item_draws = {task: generator.integers(0, count, size=(draws, count)) for task, count in items.items()}

    def task_means(self, results: np.ndarray, task: str) -> np.ndarray:
        """[draws] resampled means of one task's [seeds, items] results."""
        per_seed = np.take_along_axis(results[:, None, :].repeat(len(self.seed_draws), axis=1),
                                      self.item_draws[task][None, :, :].repeat(results.shape[0], axis=0),
                                      axis=2).mean(axis=2)  # [seeds, draws]
        return np.take_along_axis(per_seed.T, self.seed_draws, axis=1).mean(axis=1)

    def estimate(self, point: float, draws: np.ndarray) -> Estimate:
        tail = (1 - CONFIDENCE) / 2
        low, high = np.quantile(draws, [tail, 1 - tail])
        return Estimate(float(point), float(low), float(high))


def task_estimates(results: dict[str, np.ndarray], bootstrap: Bootstrap) -> dict[str, Estimate]:
    """Each task's accuracy (mean over seeds and items) with its interval."""
    return {task: bootstrap.estimate(values.mean(), bootstrap.task_means(values, task))
            for task, values in results.items()}


def macro_estimate(results: dict[str, np.ndarray], bootstrap: Bootstrap,
                   tasks: list[str] | None = None) -> Estimate:
    """The mean over tasks (each task weighs the same) with its interval."""
    tasks = tasks or list(results)
    draws = np.mean([bootstrap.task_means(results[task], task) for task in tasks], axis=0)
    return bootstrap.estimate(np.mean([results[task].mean() for task in tasks]), draws)


@dataclass(frozen=True)
class PairedComparison:
    """A minus B on the macro average over the same seeds and items."""

    difference: Estimate
    per_seed: list[float]  # A - B of each seed's macro average

    @property
    def wins(self) -> int:
        return sum(difference > 0 for difference in self.per_seed)

    def describe(self) -> str:
        seeds = ", ".join(f"{100 * difference:+.1f}" for difference in self.per_seed)
        return f"{self.difference.percent(signed=True)} (per seed {seeds})"


def paired_comparison(a: dict[str, np.ndarray], b: dict[str, np.ndarray], bootstrap: Bootstrap,
                      tasks: list[str] | None = None) -> PairedComparison:
    tasks = tasks or list(a)
    draws = np.mean([bootstrap.task_means(a[task] - b[task], task) for task in tasks], axis=0)
    point = np.mean([(a[task] - b[task]).mean() for task in tasks])
    per_seed = np.mean([(a[task] - b[task]).mean(axis=1) for task in tasks], axis=0)
    return PairedComparison(bootstrap.estimate(point, draws), [float(value) for value in per_seed])
