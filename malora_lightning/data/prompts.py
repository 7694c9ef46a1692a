"""A predict file: the user's own prompts to answer (``MultiTaskDataModule(predict_file=...)``).

One row per prompt, in JSON lines, a JSON array of objects or CSV (read by ``FileSource``, so text stays text):
``prompt`` (required), ``task`` (optional: a task of the data module, whose generation length and answer check the
prompt gets) and ``target`` (optional: the reference answer, for ``correct`` in the predictions). Other fields are
ignored; one that looks meant as ``task`` or ``target`` (``Task``, ``answer``) is warned of, since ignoring it
leaves ``correct`` null without a word.

A row is a data row as ``FileSource`` reads it, numbered from 0 like task rows in errors: a JSON lines file's
non-blank lines in order (blank lines are not rows), a JSON array's items by index, a CSV file's records after the
header (a quoted cell spanning lines is still one record), a Parquet file's rows. Errors name the row (``row 2``), and
each prediction carries it (``Prediction.row``), which maps answers back to the file whatever their order. (The
reader's own errors about unparsable text name ``line`` or ``item`` numbers counted from 1, as an editor shows them.)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection
from dataclasses import dataclass

from malora_lightning.data.tasks import (NON_FINITE, FileSource, TaskDataError, has_text, is_non_finite,
                                         not_a_file)

PREDICT_FIELDS = ("prompt", "task", "target")
# field names other files give the reference answer; read as none of ours, named in a warning when there is no target
TARGET_LOOKALIKES = ("answer", "label", "output", "response", "completion", "gold", "reference")
# the dataloader of a predict file's prompts without a task; not a valid task name, so it cannot clash with one
NO_TASK = "<no task>"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictPrompt:
    """One row of a predict file; ``row`` is its data row (module docstring), which its prediction names."""

    prompt: str
    task: str | None = None
    target: str | None = None
    row: int | None = None  # set by `read_prompts`; last, so that positional construction keeps its meaning


def predict_source(path: str) -> FileSource:
    """The file as a one-split source; refuses an unsupported file type by name when the data module is built."""
    try:
        return FileSource(files={"test": path})
    except ValueError as error:
        raise ValueError(f"predict_file: {error}") from None


def read_prompts(source: FileSource, tasks: Collection[str]) -> list[PredictPrompt]:
    """The rows of a predict file, checked: every row has a prompt, a task (if any) is one of ``tasks``, and each
    value given is text. Errors name the file, the row and the field, and what would be valid."""
    path = source.describe("test")
    try:
        rows = source.load("test", seed=0)
    except FileNotFoundError:
        raise FileNotFoundError(f"predict_file {path} {not_a_file(source.path('test'))}; expected a JSON lines or CSV "
                                "file with a 'prompt' field (and optional 'task' and 'target')") from None
    if len(rows) == 0:
        raise TaskDataError(f"predict_file {path} has no rows; expected one row per prompt with a 'prompt' field "
                            "(and optional 'task' and 'target')")
    prompts = []
    for index, row in enumerate(rows):
        values = {}
        for field in PREDICT_FIELDS:
            value = row.get(field)
            if is_non_finite(value):
                need = "every row needs the prompt text" if field == "prompt" else \
                    f"write the {field} as text, or null (or no field) for none"
                raise TaskDataError(f"predict_file {path}, row {index}: field {field!r} holds {json.dumps(value)}, "
                                    f"{NON_FINITE}; {need}")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # a JSON number, as the file writes it (as in task files): "target": 42
            if value is not None and (not isinstance(value, str) or not has_text(value)):
                raise TaskDataError(f"predict_file {path}, row {index}: field {field!r} must be non-empty text or a "
                                    f"number, got {type(value).__name__} {value!r:.60}")
            values[field] = value
        if values["prompt"] is None:
            raise TaskDataError(f"predict_file {path}, row {index}: field 'prompt' is missing or empty (null); every "
                                f"row needs the prompt text (the row has: {', '.join(map(repr, row)) or 'no fields'})")
        if values["task"] is not None and values["task"] not in tasks:
            raise TaskDataError(f"predict_file {path}, row {index}: field 'task' names unknown task "
                                f"{values['task']!r}; valid: {', '.join(tasks)}, or no task (empty)")
        prompts.append(PredictPrompt(row=index, **values))
    _warn_of_lookalike_fields(path, {name for row in rows for name in row})
    return prompts


def _warn_of_lookalike_fields(path: str, fields: set[str]) -> None:
    """Name the fields that look meant as ours but are read as none: a predict field in another case (``Task``) where
    the file has no such field, or a common name of the reference answer (`TARGET_LOOKALIKES`) where it has no
    ``target``."""
    meant = {name: name.lower() for name in fields if name.lower() in PREDICT_FIELDS and name.lower() not in fields}
    if "target" not in fields:
        meant |= {name: "target" for name in fields if name.lower() in TARGET_LOOKALIKES}
    if meant:
        named = ", ".join(f"field {name!r} (meant as {ours!r}?)" for name, ours in sorted(meant.items()))
        logger.warning("predict_file %s: %s not read: a row's fields are read by their exact names (%s) and others "
                       "are ignored, so a row without 'task' gets no answer check and one without 'target' "
                       "correct=null; rename them", path, named, ", ".join(map(repr, PREDICT_FIELDS)))
