"""What the callbacks' summaries share: the mean of the values that are present, and accuracy as a Markdown cell."""

from __future__ import annotations

from collections.abc import Iterable


def mean_of_present(values: Iterable[float | None]) -> float | None:
    """The mean of the values that are not None; None when there are none."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def percent(value: float | None, signed: bool = False) -> str:
    """A fraction as a percentage with one decimal ("+" on gains when `signed`), "-" for a missing value."""
    if value is None:
        return "-"
    return f"{100 * value:+.1f}" if signed else f"{100 * value:.1f}"
