"""``PackedExamples``: a task split's encoded examples kept in flat int32 buffers, handed out as ``EncodedExample``s.

Python int lists hold a token in an 8-byte list slot in each of two lists and a 28-byte int object per token id above
256, and every rank holds its own copy of every split; here a token takes 4 bytes in each buffer it is in (measured:
BENCHMARKS.md, "Data module setup"). A loader's lookup rebuilds the example with fresh lists, so encoders, collators
and samplers keep working with ``EncodedExample`` as it is.
"""

from __future__ import annotations

import dataclasses
from array import array
from collections.abc import Iterable, Sequence

from malora_lightning.data.collate import EncodedExample
from malora_lightning.scoring import IGNORE_INDEX

_INT32 = "i"  # a C int: 32 bits on every platform torch supports
_INDEX = "q"


class _Rows:
    """Rows of ints of any length, one after another in one int32 buffer."""

    def __init__(self) -> None:
        self.values = array(_INT32)
        self.ends = array(_INDEX, [0])

    def append(self, row: array) -> None:
        self.values.extend(row)
        self.ends.append(len(self.values))

    def __getitem__(self, index: int) -> list[int]:
        return self.values[self.ends[index]:self.ends[index + 1]].tolist()

    def __len__(self) -> int:
        return len(self.ends) - 1


class _RowGroups:
    """Groups of rows (each example's choice rows, none for an example without any)."""

    def __init__(self) -> None:
        self.rows = _Rows()
        self.ends = array(_INDEX, [0])

    def append(self, group: Sequence[array]) -> None:
        for row in group:
            self.rows.append(row)
        self.ends.append(len(self.rows))

    def __getitem__(self, index: int) -> tuple[list[int], ...]:
        return tuple(self.rows[row] for row in range(self.ends[index], self.ends[index + 1]))


class PackedExamples(Sequence[EncodedExample]):
    """Encoded examples in order, each one's token lists (``input_ids``, ``labels``, the choice rows) stored as int32
    and the rest of it as given. ``packed[i]`` is equal to the i-th example appended."""

    def __init__(self, examples: Iterable[EncodedExample] = ()) -> None:
        self._input_ids = _Rows()
        self._labels = _Rows()
        self._choice_input_ids = _RowGroups()
        self._choice_labels = _RowGroups()
        self._rest: list[EncodedExample] = []  # each example with its token lists left empty
        self.extend(examples)

    def extend(self, examples: Iterable[EncodedExample]) -> None:
        for example in examples:
            self.append(example)

    def append(self, example: EncodedExample) -> None:
        """Store ``example``. A token that is not an int32 is an error that names the example and the field; the
        store is left as it was."""
        input_ids = _int32(example, "input_ids", example.input_ids)
        labels = _int32(example, "labels", example.labels)
        choice_input_ids = _int32_rows(example, "choice_input_ids", example.choice_input_ids)
        choice_labels = _int32_rows(example, "choice_labels", example.choice_labels)
        self._input_ids.append(input_ids)
        self._labels.append(labels)
        self._choice_input_ids.append(choice_input_ids or ())
        self._choice_labels.append(choice_labels or ())
        # () keeps an example with choice rows apart from one without (None), without a list per example
        self._rest.append(dataclasses.replace(
            example, input_ids=(), labels=(), choice_input_ids=None if choice_input_ids is None else (),
            choice_labels=None if choice_labels is None else ()))

    def __len__(self) -> int:
        return len(self._rest)

    def __getitem__(self, index: int) -> EncodedExample:  # type: ignore[override]  (no slices)
        index = range(len(self._rest))[index]  # a negative index counted from the end; IndexError past either end
        rest = self._rest[index]
        return dataclasses.replace(
            rest, input_ids=self._input_ids[index], labels=self._labels[index],
            choice_input_ids=None if rest.choice_input_ids is None else self._choice_input_ids[index],
            choice_labels=None if rest.choice_labels is None else self._choice_labels[index])


def _int32(example: EncodedExample, field: str, values: Sequence[int]) -> array:
    """``values``, a token list of ``example``'s ``field``, as int32."""
    try:
        return array(_INT32, values)
    except (TypeError, OverflowError) as error:
        raise ValueError(f"task {example.task_name!r}, row {example.row}: EncodedExample.{field} must hold token "
                         f"ids (and the label {IGNORE_INDEX}), ints from {-2 ** 31} to {2 ** 31 - 1} ({error})"
                         ) from error


def _int32_rows(example: EncodedExample, field: str, rows: Sequence[Sequence[int]] | None) -> list[array] | None:
    return None if rows is None else [_int32(example, field, row) for row in rows]
