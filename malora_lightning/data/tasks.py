"""Tasks: where rows come from, how a row becomes a prompt and a target, how answers are compared, and the registry.

A task is data (a source), a formatter (row -> ``Example``) and how it is scored. Sources are a Hugging Face Hub
dataset (fetched only when a task using it is loaded), local JSONL/JSON/CSV/Parquet files, or a Python generator.
Users add tasks from Python (``register_task(Task(...))``) or from a plain dict / YAML file (``task_from_spec``,
``tasks_from_yaml``) without writing a class.
"""

from __future__ import annotations

import codecs
import contextlib
import contextvars
import csv
import dataclasses
import io
import json
import random
import re
import string
import sys
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import yaml

from malora_lightning.values import check_switch, is_finite_number, is_int, user_path

SPLITS = ("train", "validation", "test")
TASK_KINDS = ("generative", "multiple_choice")
FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_TASK_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # used with fullmatch: a name becomes a folder name and a metric key


class TaskDataError(ValueError):
    """A task's data cannot be used; the message names the task, the split and, where it applies, the row."""


def _require(ok: bool, key: str, value: Any, valid: str) -> None:
    """A task setting is valid or a ValueError names it, its value and what would be valid (a YAML spec's mistyped
    value, such as ``max_new_tokens: "5"``, would otherwise fail later as a TypeError deep in the code)."""
    if not ok:
        raise ValueError(f"{key}={value!r:.80} is invalid: expected {valid}")


def _is_text(value: Any) -> bool:
    return isinstance(value, str)


# the widest format-spec width or precision a template may give: ``{q:>2000000000}`` wrote a 2 GB string per row
MAX_FORMAT_WIDTH = 1000


def has_text(value: str) -> bool:
    """Whether ``value`` holds a visible character: not only whitespace or invisible format characters (a zero-width
    space or a byte-order mark, left by a spreadsheet export), which ``str.strip`` keeps and a tokenizer encodes."""
    return any(not character.isspace() and unicodedata.category(character) != "Cf" for character in value)


def _check_template(key: str, template: str) -> None:
    """A template ``str.format`` fills from a row's fields by plain name, or a ValueError names the part that is not:
    a template with no text would make every example's prompt or target empty; a lone brace ("{q") fails on every
    row; an attribute, index or conversion (``{q.upper}``, ``{q[0]}``, ``{q!r}``) would insert a Python method, a
    character or a repr, not the text in the file; a positional field (``{}``, ``{0}``) reads no column. A format
    spec (``{a:.1f}``, ``{q:>5}``) formats the value and is allowed up to a width and precision of
    `MAX_FORMAT_WIDTH`."""
    if not has_text(template):
        raise ValueError(f"{key}={template!r:.80} is invalid: expected a template with text, like '{{answer}}'")
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError:
        raise ValueError(f"{key}={template!r:.80} is invalid: expected a template whose fields are {{name}} and whose "
                         "literal braces are doubled, {{ and }}") from None
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        written = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        if "." in name or "[" in name:
            problem = (f"'.' and '[' read an attribute or item of a value (a Python method, a character), not a "
                       f"column; for a column named {name!r}, give it a plain name: fields: {{x: {name!r}}} and {{x}} "
                       "in the template")
        elif not name:
            problem = "an empty field is a positional argument and reads no column; name one, like {question}"
        elif name.isdigit():
            problem = (f"a number is a positional argument and reads no column; for a column named {name!r}, give "
                       f"it a plain name: fields: {{x: {name!r}}} and {{x}} in the template")
        elif conversion:
            problem = f"a conversion (!r, !s, !a) writes Python's rendering of a value, not its text; write {{{name}}}"
        elif "{" in spec:
            problem = "a format spec must be fixed text, like {name:>5}, not another field"
        elif any(int(number) > MAX_FORMAT_WIDTH for number in re.findall(r"\d+", spec)):
            problem = (f"a width or precision over {MAX_FORMAT_WIDTH} would write that many characters into every "
                       "example")
        else:
            continue
        raise ValueError(f"{key}={template!r:.80} is invalid: field {written}: {problem}")


# why a NaN or infinite value is refused (after "field 'a' holds NaN, "): its text would be read as data
NON_FINITE = "not a value (json.dumps and pandas write a missing number as NaN; NaN and Infinity are not JSON values)"


def is_non_finite(value: Any) -> bool:
    """Whether a row value is a float NaN or infinity: a JSON ``NaN``/``Infinity``/``-Infinity`` (non-standard JSON
    that Python's json.dumps writes for a missing float) or such a float in a Parquet or hub dataset column."""
    return isinstance(value, float) and not is_finite_number(value)


def repeated(names: Iterable[str]) -> list[str]:
    """The names that occur more than once, sorted: for errors about a field, column, choice or task given twice."""
    names = list(names)
    return sorted({name for name in names if names.count(name) > 1})


# ----------------------------------------------------------------------------------------------------- examples


@dataclass(frozen=True)
class Example:
    """One formatted row. For multiple choice the target is ``choices[gold]``, so that what the model is trained to
    write and what log-likelihood scoring compares are the same strings."""

    prompt: str
    target: str
    choices: tuple[str, ...] | None = None
    gold: int | None = None
    row: int | None = None  # index of the source row it came from (set by ``Task.examples``)

    def __post_init__(self) -> None:
        if not isinstance(self.prompt, str) or not isinstance(self.target, str):
            raise ValueError(f"prompt and target must be strings (got {type(self.prompt).__name__} and "
                             f"{type(self.target).__name__})")
        if not has_text(self.prompt):  # the answer would be trained after an empty user turn
            raise ValueError("the prompt is empty; every example needs prompt text")
        if not has_text(self.target):
            raise ValueError("the target is empty")
        if self.choices is None:
            if self.gold is not None:
                raise ValueError("gold is set but there are no choices")
            return
        object.__setattr__(self, "choices", tuple(self.choices))
        if len(self.choices) < 2:
            raise ValueError(f"a multiple-choice example needs at least two choices (got {list(self.choices)})")
        for index, choice in enumerate(self.choices):
            if not isinstance(choice, str) or not has_text(choice):  # nothing to score: it would beat every choice
                raise ValueError(f"choice {index} is {choice!r:.60} in {list(self.choices)!r:.200}; every choice must "
                                 "be non-empty text")
        twice = repeated(self.choices)
        if twice:  # equal texts score equally and a tie goes to the first: a later copy could never be chosen
            raise ValueError(f"choices {', '.join(map(repr, twice))} appear more than once in {list(self.choices)}; "
                             "each choice must be different")
        if self.gold is None or not 0 <= self.gold < len(self.choices):
            raise ValueError(f"gold index {self.gold!r} is not in 0..{len(self.choices) - 1}")
        if self.target != self.choices[self.gold]:
            raise ValueError(f"target {self.target!r} differs from the gold choice {self.choices[self.gold]!r}")

    @classmethod
    def multiple_choice(cls, prompt: str, choices: Sequence[str], gold: int) -> Example:
        """A multiple-choice example whose target is the gold choice."""
        if not 0 <= gold < len(choices):
            raise ValueError(f"gold index {gold} is not in 0..{len(choices) - 1}")
        return cls(prompt=prompt, target=choices[gold], choices=tuple(choices), gold=gold)


# ------------------------------------------------------------------------------------------------ answer checks


def first_line(text: str) -> str:
    """The first non-empty line with whitespace collapsed: generations often continue past the answer. Once the text
    is stripped its first line is that one: every break `str.splitlines` splits at is whitespace `str.strip` removes."""
    lines = text.strip().splitlines()
    return " ".join(lines[0].split()) if lines else ""


_GSM8K_MARKER = "####"
_ANSWER_IS = re.compile(r"the answer is:?", re.IGNORECASE)  # MetaMathQA's "The answer is:", as models also write it
# a number as answers write it: 1,000 (thousands groups of three, so 1,2,3 is three numbers), 18.00, .5, -3; a minus
# right after a letter or digit is a hyphen (10-12, x-1), not a sign
_NUMBER = re.compile(r"(?:(?<!\w)-)?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)")
# a number, or a fraction of two (3/4, 1 / 4) taken whole, so that a fraction's denominator is never read as the answer
_NUMBER_OR_FRACTION = re.compile(rf"{_NUMBER.pattern}(?:[ \t]*/[ \t]*{_NUMBER.pattern})?")


def _normalised(answer: str) -> str:
    return answer.replace(",", "").replace("$", "").rstrip(".").strip()


def _marked_line(text: str) -> str | None:
    """The first line after the last final-answer marker (GSM8K's ``####`` before any "the answer is", in any case);
    None when the text has no marker."""
    if _GSM8K_MARKER in text:
        return first_line(text.rsplit(_GSM8K_MARKER, 1)[1])
    matches = list(_ANSWER_IS.finditer(text))
    return first_line(text[matches[-1].end():]) if matches else None


def _marked_answer(text: str) -> str | None:
    """What follows the last final-answer marker, normalised; None when the text has no marker."""
    line = _marked_line(text)
    return None if line is None else _normalised(line)


def _as_value(answer: str) -> Fraction | None:
    """The answer's value when it is one number (``1,000``, ``$18.00``, ``.5``, ``-3.``) or a fraction of two
    (``3/4``, ``6 / 8``), else None. Exact (``Fraction`` of the written decimals), so that ``18.00`` equals ``18`` and
    ``0.75`` equals ``3/4``, and no two different answers round to one float. Commas are dropped only after the
    match, which takes them as thousands separators alone: ``1,2,3`` is a list, not 123."""
    text = answer.replace("$", "").rstrip(".").strip()
    if _NUMBER.fullmatch(text):
        return Fraction(Decimal(text.replace(",", "")))
    if not _NUMBER_OR_FRACTION.fullmatch(text):
        return None
    numerator, denominator = (Fraction(Decimal(part.replace(",", "").strip())) for part in text.split("/"))
    return None if denominator == 0 else numerator / denominator


def final_answer(text: str) -> str:
    """The final answer of a worked solution: what follows GSM8K's ``####`` or MetaMathQA's ``The answer is:``,
    else the last number (a fraction such as ``3/4`` counts as one); commas, ``$`` and a trailing period are dropped
    so ``1,000.`` matches ``1000``. A task scores with ``final_answer_matches``, which reduces only the prediction to
    its last number, and only against a number."""
    marked = _marked_answer(text)
    if marked is not None:
        return marked
    numbers = _NUMBER_OR_FRACTION.findall(text)
    return _normalised(numbers[-1] if numbers else first_line(text))


def final_answer_matches(prediction: str, target: str) -> bool:
    """Whether a prediction gives a reference's final answer: the reference's marked answer (``#### 72``), or the
    whole reference when it has no marker; either way the same rule follows.

    A number or a fraction of two (``72``, ``1,000``, ``18.00``, ``.5``, ``3/4``) is compared by value with the last
    number or fraction of the prediction's final answer: the line after its last marker (``The answer is 72
    apples.``, ``#### 0.75``), or with no marker the whole prediction (``She has 72 apples``); a fraction there
    (``1/4``) is one answer, never its last number. Any other reference ("2:30", "x = 7", "\\frac{3}{4}") is compared
    as text, commas, ``$`` and a trailing period aside, with the prediction's marked answer or else its first line,
    since reducing both to their last number would count ``4:30`` as ``2:30``."""
    marked = _marked_line(target)
    reference = " ".join(target.split()) if marked is None else marked
    expected = _as_value(reference)
    if expected is not None:
        given = _marked_line(prediction)
        answers = _NUMBER_OR_FRACTION.findall(prediction if given is None else given)
        return bool(answers) and _as_value(answers[-1]) == expected
    given = _marked_answer(prediction)
    return (given if given is not None else _normalised(first_line(prediction))) == _normalised(reference)


ANSWER_EXTRACTORS: dict[str, Callable[[str], str]] = {"first_line": first_line, "final_answer": final_answer}


# ------------------------------------------------------------------------------------------------------ sources


@runtime_checkable
class Source(Protocol):
    """Where a task's rows come from. ``splits`` are the roles it provides (a subset of ``SPLITS``)."""

    @property
    def splits(self) -> tuple[str, ...]: ...

    def load(self, split: str, seed: int) -> Sequence[Mapping[str, Any]]: ...

    def describe(self, split: str) -> str:
        """Where that split's rows come from, for error messages (a file path, a hub dataset)."""
        ...


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face Hub dataset. ``split_map`` maps our roles to the dataset's split names, which may use the
    datasets slicing syntax (``"train[:500]"``); datasets without a labelled test split map ``test`` to their
    validation split. ``revision``: a branch, tag or commit of the dataset's repository, such as the Hub's own
    Parquet conversion ``refs/convert/parquet`` of a dataset that still ships a loading script, which datasets 4
    and later refuse to run."""

    path: str
    name: str | None = None
    split_map: Mapping[str, str] = field(default_factory=lambda: {split: split for split in SPLITS})
    revision: str | None = None

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.split_map)

    def describe(self, split: str) -> str:
        revision = f" at revision {self.revision!r}" if self.revision else ""
        return (f"hub dataset {self.path}{f' ({self.name})' if self.name else ''}{revision}, split "
                f"{self.split_map[split]!r}")

    def load(self, split: str, seed: int) -> Sequence[Mapping[str, Any]]:
        from datasets import load_dataset  # imported here: only tasks that name a hub dataset pay for it

        try:
            return load_dataset(self.path, self.name, split=self.split_map[split], revision=self.revision)
        except RuntimeError as error:
            if "Dataset scripts are no longer supported" not in str(error):
                raise
            raise TaskDataError(f"{self.describe(split)} could not be loaded: {error}. The dataset ships a loading "
                                "script, which datasets 4 and later never run; the Hub's Parquet conversion of it "
                                "loads without one: give the task spec revision: refs/convert/parquet (its "
                                "configuration may then be named 'default')") from error
        except OSError as error:  # not cached while offline, unreachable, not found (ConnectionError is an OSError)
            raise TaskDataError(f"{self.describe(split)} could not be loaded: {error}. Offline (HF_HUB_OFFLINE=1) "
                                "only a dataset cached by an earlier online run loads: run once online to cache it, "
                                "or give the task local files (a task spec with path: {train: ..., test: ...})"
                                ) from error


def not_a_file(path: Path) -> str:
    """Why `path`, which is not a file, cannot be read: a folder, or nothing there (and where a relative path was looked
    for: a recipe's relative path is read from where the command runs, not the recipe's folder)."""
    if path.is_dir():
        return "is a folder, not a file"
    return "does not exist" + ("" if path.is_absolute() else
                               f" (a relative path is read from the current directory, {Path.cwd()})")


# byte-order marks of text that is not UTF-8, as a "Unicode" export writes it; UTF-32's first, which start as UTF-16's
_OTHER_BYTE_ORDER_MARKS = {codecs.BOM_UTF32_LE: "UTF-32", codecs.BOM_UTF32_BE: "UTF-32", codecs.BOM_UTF16_LE: "UTF-16",
                           codecs.BOM_UTF16_BE: "UTF-16"}
_SAVE_AS_UTF8 = "task and predict files are read as UTF-8: save it as UTF-8 (in Excel, as \"CSV UTF-8\")"

# rows already read, by resolved path, inside `reading_files_once`
_FILE_READS: contextvars.ContextVar[dict[str, Sequence[Mapping[str, Any]]] | None] = contextvars.ContextVar(
    "file_reads", default=None)


@contextlib.contextmanager
def reading_files_once() -> Iterator[None]:
    """Inside it, `FileSource` reads and parses each file once: a data module's setup reads the train file of a task
    validated on held-out rows up to four times (its row count, its train rows, its validation rows and their answer
    lengths). Outside, every load reads the file again, so an edited file is seen."""
    token = _FILE_READS.set({})
    try:
        yield
    finally:
        _FILE_READS.reset(token)


@dataclass(frozen=True)
class FileSource:
    """Local files, one per split: JSON lines, a JSON array of objects, CSV or Parquet.

    JSON and CSV are read here, not through a dataframe library, so that every value keeps the text the user wrote:
    no float inference turning a column of "2" into "2.0" around an empty cell, no nulls filled in for keys a row
    lacks, a JSON ``1e3`` inserted as ``1e3``. A CSV cell that is empty, like a JSON null, is a missing value, which
    the formatter rejects by name, as it does a JSON ``NaN`` or ``Infinity``. A name given twice (CSV header, JSON
    object) is an error, never a dropped value. JSON and CSV files are UTF-8 text, with or without a byte-order mark;
    other text (Latin-1, UTF-16 with or without its mark) is refused by name.
    """

    files: Mapping[str, str]

    def __post_init__(self) -> None:
        for split, path in self.files.items():
            if split not in SPLITS:
                raise ValueError(f"unknown split {split!r} for file {path}; valid splits: {', '.join(SPLITS)}")
            _require(isinstance(path, (str, Path)), f"path of split {split!r}", path, "a file path")
            if Path(path).suffix.lower() not in FILE_FORMATS:
                raise ValueError(f"cannot read {path}: supported file types are {', '.join(FILE_FORMATS)}")

    @property
    def splits(self) -> tuple[str, ...]:
        return tuple(self.files)

    def describe(self, split: str) -> str:
        return str(self.files[split])

    def path(self, split: str) -> Path:
        """The file of `split` as it is read: a leading `~` is the home folder (`user_path`)."""
        return Path(user_path(self.files[split]))

    def load(self, split: str, seed: int) -> Sequence[Mapping[str, Any]]:
        path = self.path(split)
        reads = _FILE_READS.get()
        if reads is None:
            return self._read(split, path)
        key = str(path.resolve())
        if key not in reads:
            reads[key] = self._read(split, path)
        return reads[key]

    def _read(self, split: str, path: Path) -> Sequence[Mapping[str, Any]]:
        if not path.is_file():
            raise FileNotFoundError(f"{split} file {path} {not_a_file(path)}")
        kind = FILE_FORMATS[path.suffix.lower()]
        if kind == "parquet":  # typed columns: nulls arrive as None and are rejected where used
            # pyarrow (which datasets installs) reads the file itself: datasets' load_dataset pinged the hub and
            # wrote a cached copy of a local file
            import pyarrow
            import pyarrow.parquet

            try:
                return pyarrow.parquet.read_table(path).to_pylist()
            except pyarrow.ArrowException as error:
                raise TaskDataError(f"{path}: not a readable Parquet file ({error})") from None
        try:  # utf-8-sig: a byte-order mark (Excel's "CSV UTF-8") is not part of the first field's name
            text = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as error:
            with path.open("rb") as start:
                head = start.read(4)
            other = next((name for mark, name in _OTHER_BYTE_ORDER_MARKS.items() if head.startswith(mark)), None)
            found = (f"{other} text (it starts with a {other} byte-order mark, as a \"Unicode\" export writes it)"
                     if other else f"not UTF-8 text (byte {error.start}: {error.reason})")
            raise TaskDataError(f"{path}: {found}; {_SAVE_AS_UTF8}") from None
        if "\0" in text:  # UTF-16 without a byte-order mark decodes as UTF-8: "q\0,\0a\0", then "missing field 'q'"
            line = text.count("\n", 0, text.index("\0")) + 1
            raise TaskDataError(f"{path}, line {line}: holds a NUL character, which text files do not (UTF-16 text "
                                f"without a byte-order mark has one in every ASCII character); {_SAVE_AS_UTF8}")
        if kind == "csv":
            return _csv_rows(text, path)
        return _json_rows(text, path)


class _JSONNumber(float):
    """A JSON number written with a fraction or an exponent: the float it is, whose text (``str``, or a template
    field without a format spec) is what the file says, so ``1e3`` and ``2.50`` stay ``1e3`` and ``2.50``, not
    Python's ``1000.0`` and ``2.5``. (JSON integers need no such care: Python writes them back as they were.)"""

    text: str

    def __new__(cls, text: str) -> _JSONNumber:
        number = super().__new__(cls, text)
        number.text = text
        return number

    def __str__(self) -> str:
        return self.text

    def __format__(self, spec: str) -> str:
        return self.text if not spec else super().__format__(spec)


class DuplicateKeyError(ValueError):
    """A JSON object names a key twice (``json.loads`` would keep the last value and drop the others)."""


def unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A ``json.loads`` ``object_pairs_hook`` that refuses a repeated key (`DuplicateKeyError`)."""
    twice = repeated(key for key, _ in pairs)
    if twice:
        raise DuplicateKeyError(f"an object names {', '.join(map(repr, twice))} more than once; each field needs "
                                "its own name (json would keep only the last value)")
    return dict(pairs)


def _parse_json(text: str) -> Any:
    return json.loads(text, object_pairs_hook=unique_keys, parse_float=_JSONNumber, parse_constant=_JSONNumber)


def _has_lone_surrogate(value: Any) -> bool:
    """Whether a parsed JSON value holds a string that is not text: a lone surrogate escape such as ``"\\ud83d"``
    (half of an emoji's pair), valid JSON but no character, which tokenizers reject."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


# what ends a line of a JSON lines file: \n (with \r before it, or \r alone). Not `str.splitlines`, which also
# splits at U+2028, U+2029 and U+0085, characters a JSON string may hold as they are (json.dumps(ensure_ascii=False)
# writes them so, as `PredictionWriter` does): a line holding one was cut in two and refused as "not a JSON object"
_JSON_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _json_rows(text: str, path: Path) -> list[dict[str, Any]]:
    """Rows of a JSON lines file (`.jsonl`: one object per line, blank lines skipped), or of a `.json` file holding
    an array of objects (a `.json` file that is not one JSON value is read as JSON lines). A key repeated in an
    object and a string holding a lone surrogate are errors: the first would lose a value, the second is not text."""
    numbered, unit = None, "item"
    if path.suffix.lower() == ".json":
        try:
            value = _parse_json(text)
        except DuplicateKeyError as error:
            raise TaskDataError(f"{path}: {error}") from None
        except json.JSONDecodeError:
            value = None  # not one JSON value: JSON lines
        if isinstance(value, list):
            numbered = list(enumerate(value, start=1))
        elif value is not None:
            raise TaskDataError(f"{path}: expected an array of objects (or one object per line), got "
                                f"{type(value).__name__}")
    if numbered is None:
        numbered, unit = [], "line"
        for number, line in enumerate(_JSON_LINE_BREAK.split(text), start=1):
            if not line.strip():
                continue
            try:
                numbered.append((number, _parse_json(line)))
            except DuplicateKeyError as error:
                raise TaskDataError(f"{path}, line {number}: {error}") from None
            except json.JSONDecodeError as error:
                raise TaskDataError(f"{path}, line {number}: not a JSON object ({error.msg}); a JSON lines file holds "
                                    "one complete object per line") from None
    for number, row in numbered:
        if not isinstance(row, dict):
            raise TaskDataError(f"{path}, {unit} {number}: expected an object of fields, got "
                                f"{type(row).__name__} {row!r:.60}")
        for key, value in row.items():
            if _has_lone_surrogate(key) or _has_lone_surrogate(value):
                raise TaskDataError(f"{path}, {unit} {number}: field {key!r} holds a lone surrogate escape (like "
                                    "\\ud83d, half of a character's UTF-16 pair), which is not text; write the "
                                    "character itself or its complete pair (\\ud83d\\ude00)")
    return [row for _, row in numbered]


# the csv module refuses cells over 128 KiB by default; a long document is a normal cell. 2**31 - 1 is the largest
# limit every platform's C long holds (sys.maxsize overflows it on Windows)
_CSV_FIELD_LIMIT = min(sys.maxsize, 2 ** 31 - 1)


def _csv_rows(text: str, path: Path) -> list[dict[str, Any]]:
    """CSV rows as text; an empty cell (or a cell a short row lacks) is None: missing. A header naming a column twice
    is an error (the row would keep only the last column's cell); unnamed columns (trailing commas) cannot be used
    by a task and may repeat."""
    csv.field_size_limit(_CSV_FIELD_LIMIT)
    reader = csv.DictReader(io.StringIO(text))
    rows = []
    try:
        header = reader.fieldnames or []
        twice = repeated(name for name in header if name)
        if twice:
            raise TaskDataError(f"{path}, line 1: the header names {', '.join(map(repr, twice))} more than once; "
                                "each column needs its own name")
        for row in reader:
            if None in row:  # DictReader keys the surplus cells of a long row with None
                raise TaskDataError(f"{path}, line {reader.line_num}: more cells than the {len(header)} columns of "
                                    f"the header ({', '.join(header)})")
            rows.append({key: value if value not in ("", None) else None for key, value in row.items()})
    except csv.Error as error:  # the inner reader's count: DictReader's own is updated only after a good row
        raise TaskDataError(f"{path}, line {reader.reader.line_num}: not readable as CSV ({error})") from None
    return rows


@dataclass(frozen=True)
class GeneratorSource:
    """Rows from a Python function ``generate(split, seed)``; the seed lets generated data be reproducible."""

    generate: Callable[[str, int], Iterable[Mapping[str, Any]]]
    splits: tuple[str, ...] = SPLITS

    def describe(self, split: str) -> str:
        return f"generated {split} rows"

    def load(self, split: str, seed: int) -> Sequence[Mapping[str, Any]]:
        return list(self.generate(split, seed))


# --------------------------------------------------------------------------------------------------------- task


@dataclass(frozen=True)
class Task:
    """A named task: its data, its formatter, and how its answers are scored.

    ``kind`` is ``generative`` (scored by exact match of ``answer(prediction)`` against ``answer(target)``; with
    ``final_answer``, by ``final_answer_matches``: a number or fraction by value, any other answer as text) or
    ``multiple_choice`` (scored by log-likelihood accuracy over the choices). ``chance_rate`` is the score of
    guessing, or of always giving the most common answer, to read scores against. ``max_new_tokens`` is the
    generation length; ``None`` means "the longest target in tokens plus the end token", which the datamodule
    measures with the model's tokenizer.
    """

    name: str
    source: Source
    formatter: Callable[[Mapping[str, Any]], Example]
    kind: str = "generative"
    chance_rate: float | None = None
    max_new_tokens: int | None = None
    answer: Callable[[str], str] = first_line
    description: str = ""

    def __post_init__(self) -> None:
        _require(_is_text(self.name) and bool(_TASK_NAME.fullmatch(self.name)) and self.name.strip(".") != "",
                 "name", self.name, "a task name: non-empty text of ASCII letters and digits (A-Z, a-z, 0-9), '_', "
                 "'.', '-', not only dots (it names a folder: '.' and '..' are paths) (quote a number: name: '2024')")
        try:
            _require(_is_text(self.kind) and self.kind in TASK_KINDS, "kind", self.kind,
                     f"one of {', '.join(TASK_KINDS)}")
            _require(self.chance_rate is None or (is_finite_number(self.chance_rate) and 0 <= self.chance_rate <= 1),
                     "chance_rate", self.chance_rate, "a number in [0, 1], or null")
            _require(self.max_new_tokens is None or (is_int(self.max_new_tokens) and self.max_new_tokens >= 1),
                     "max_new_tokens", self.max_new_tokens,
                     "an integer >= 1, or null (then the longest target in tokens, plus the end token)")
            _require(_is_text(self.description), "description", self.description, "text")
            # what the data module calls on every task: a path given as the source failed later with AttributeError:
            # 'str' object has no attribute 'splits', naming no task
            _require(isinstance(self.source, Source), "source", self.source,
                     "a FileSource, HubSource or GeneratorSource (an object with splits, load and describe, the "
                     "Source protocol); for files, FileSource({'train': 'train.jsonl', 'test': ...})")
            _require(callable(self.formatter), "formatter", self.formatter,
                     "a function of a row (a mapping of field to value) that returns an Example")
            _require(callable(self.answer), "answer", self.answer,
                     "a function of a text returning the answer to compare, like first_line or final_answer")
        except ValueError as error:
            raise ValueError(f"task {self.name!r}: {error}") from None

    @property
    def metric(self) -> str:
        return "accuracy" if self.kind == "multiple_choice" else "exact_match"

    def has_split(self, split: str) -> bool:
        return split in self.source.splits

    def is_correct(self, prediction: str, target: str) -> bool:
        """Exact match after this task's answer extraction (first line), or for a worked solution's final answer
        ``final_answer_matches`` (numbers and fractions compared by value). Both texts are compared in one Unicode
        form (NFC): "é" written as one character or as "e" and a combining accent is the same text, shown alike, and a
        file saved on another system (or a tokenizer's normalisation) may give the target one and the model's answer
        the other. Only canonical equivalents are one: "ＡＢＣ" and "ABC", "x²" and "x2" stay different answers."""
        prediction, target = unicodedata.normalize("NFC", prediction), unicodedata.normalize("NFC", target)
        if self.answer is final_answer:
            return final_answer_matches(prediction, target)
        return self.answer(prediction) == self.answer(target)

    def num_rows(self, split: str, seed: int = 0) -> int:
        return len(self.source.load(split, seed))

    def examples(self, split: str, *, seed: int = 0, limit: int | None = None,
                 only_rows: Sequence[int] | None = None) -> list[Example]:
        """The formatted examples of ``split``; with ``only_rows``, of those row indices only; with ``limit``, a
        random subset of them (fixed by ``seed``), in source order."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        if not self.has_split(split):
            raise TaskDataError(f"task {self.name!r} has no {split!r} split; it provides: "
                                f"{', '.join(self.source.splits) or 'none'}")
        rows = self.source.load(split, seed)
        if len(rows) == 0:
            raise TaskDataError(f"task {self.name!r}: the {split!r} split is empty ({self.source.describe(split)})")
        indices = range(len(rows)) if only_rows is None else sorted(only_rows)
        if limit is not None and limit < len(indices):
            indices = sorted(random.Random(f"{seed}:{self.name}:{split}").sample(indices, limit))
        return [self._format(rows[index], split, index) for index in indices]

    def _format(self, row: Mapping[str, Any], split: str, index: int) -> Example:
        where = f"task {self.name!r}, {split} row {index}"
        source = f" [{self.source.describe(split)}]"
        try:
            example = self.formatter(row)
        except KeyError as error:
            # quoted as the missing one is: a name with an invisible character ('q\\u200b', 'q\\xa0') shows it
            raise TaskDataError(f"{where}: missing field {error.args[0]!r} (the row has: "
                                f"{', '.join(map(repr, row))}){source}") from error
        except (ValueError, TypeError, IndexError, AttributeError) as error:  # AttributeError: a null text's .strip()
            raise TaskDataError(f"{where}: {error}{source}") from error
        if not isinstance(example, Example):  # a tuple, a dict, None (no return): `.choices` below named nothing
            raise TaskDataError(f"{where}: the formatter returned {type(example).__name__} {example!r:.60}, not an "
                                "Example; a task's formatter returns Example(prompt=..., target=...), or for multiple "
                                f"choice Example.multiple_choice(prompt, choices, gold){source}")
        if (example.choices is not None) != (self.kind == "multiple_choice"):
            raise TaskDataError(f"{where}: a {self.kind} task's formatter returned "
                                f"{'choices' if example.choices else 'no choices'}{source}")
        return dataclasses.replace(example, row=index)


# ----------------------------------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Task] = {}
# why a task this process does not know may be known elsewhere: the registry is filled by the modules a process imports
NOT_IMPORTED = ("a task registered from Python (register_task) is known only in a process that imports the module "
                "registering it, which the malora and malora-task-export commands never do: run them from an entry "
                "point of your own that imports it (README, Extending it), or give the task as a data.task_specs "
                "entry")


def register_task(task: Task, *, overwrite: bool = False) -> Task:
    """Make ``task`` available by name (``get_task``, the datamodule's ``tasks`` list)."""
    check_switch("register_task overwrite", overwrite)
    if not isinstance(task, Task):  # a spec dict failed with AttributeError: 'dict' object has no attribute 'name'
        raise ValueError(f"register_task takes a Task, got {type(task).__name__} {task!r:.60}; for a task spec (a "
                         "mapping of name, path, prompt, ...), register_task(task_from_spec(spec))")
    if task.name in _REGISTRY and not overwrite:
        raise ValueError(f"a task named {task.name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[task.name] = task
    return task


def get_task(name: str) -> Task:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; registered tasks: {', '.join(registered_tasks())}; "
                         f"{NOT_IMPORTED}") from None


def registered_tasks() -> list[str]:
    return sorted(_REGISTRY)


# ------------------------------------------------------------------------------------------- tasks from a spec


@dataclass(frozen=True)
class TemplateFormatter:
    """Formats a row with ``str.format`` templates over its fields; ``fields`` renames template names to columns. A
    template field is a plain name, optionally with a format spec (``{question}``, ``{price:.2f}``).

    Generative: ``prompt`` and ``target`` templates. Multiple choice: ``prompt`` plus the column holding the list of
    choice strings (``choices``) and the column holding the gold index (``gold``, an int or a digit string).
    """

    prompt: str
    target: str | None = None
    choices: str | None = None
    gold: str | None = None
    fields: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _require(_is_text(self.prompt), "prompt", self.prompt, "a template, like 'Q: {question}'")
        _require(self.target is None or _is_text(self.target), "target", self.target,
                 "a template, like '{answer}' (quote a fixed text: target: '7')")
        for key, template in (("prompt", self.prompt), ("target", self.target)):
            if template is not None:
                _check_template(key, template)
        for key, column in (("choices", self.choices), ("gold", self.gold)):
            _require(column is None or _is_text(column), key, column, "the name of a column")
        _require(isinstance(self.fields, Mapping) and all(map(_is_text, [*self.fields, *self.fields.values()])),
                 "fields", self.fields, "a mapping of template name to column name, like {question: q}")
        object.__setattr__(self, "fields", dict(self.fields))
        if (self.choices is None) != (self.gold is None):
            raise ValueError("multiple choice needs both 'choices' and 'gold'")
        if self.choices is not None and self.target is not None:  # it was never read: which one was meant?
            raise ValueError(f"target={self.target!r:.80} is invalid with choices: a multiple-choice target is the "
                             "choice that gold names; remove target, or choices and gold for a generative task")
        if self.choices is None and self.target is None:
            raise ValueError("a generative task needs a 'target' template")

    def __call__(self, row: Mapping[str, Any]) -> Example:
        view = _FieldView(row, self.fields)
        prompt = self.prompt.format_map(view)
        if self.choices is None:
            return Example(prompt=prompt, target=self.target.format_map(view))
        choices = view.value(self.choices)
        if isinstance(choices, str) and choices.lstrip().startswith("["):  # a JSON list in a CSV cell
            try:
                choices = json.loads(choices)
            except json.JSONDecodeError as error:
                raise ValueError(f"choices field {self.choices!r} is not a JSON list ({error.msg})") from None
        if isinstance(choices, (list, tuple)):
            for index, choice in enumerate(choices):
                if is_non_finite(choice):
                    raise ValueError(f"choices field {self.choices!r}: choice {index} is {json.dumps(choice)}, "
                                     f"{NON_FINITE}; every choice must be text or a number")
        if not isinstance(choices, (list, tuple)) or not all(isinstance(c, (str, int, float)) and
                                                              not isinstance(c, bool) for c in choices):
            raise ValueError(f"choices field {self.choices!r} must hold a list of choice texts, like [\"yes\", "
                             f"\"no\"] (in CSV, that JSON list in the cell); got {choices!r:.80}")
        gold = view.value(self.gold)
        if isinstance(gold, str) and gold.strip().lstrip("-").isdecimal():  # isdigit() took "²", which int() refuses
            gold = int(gold)
        if not is_int(gold):
            raise ValueError(f"gold field {self.gold!r} must hold an integer index, the right choice's "
                             f"position (got {gold!r})")
        return Example.multiple_choice(prompt, [str(choice) for choice in choices], gold)


class _FieldView(Mapping[str, Any]):
    """A row seen through a renaming: ``view.value(name)`` reads column ``fields.get(name, name)``; ``view[name]`` is
    what a template inserts, text or a number. A missing column raises ``KeyError(column)`` so the error names the
    field the row lacks; a null, NaN or infinity is refused, and so is a boolean, list or object in a template, which
    would be written as Python's ``True``, ``['x', None]`` or ``{'k': None}``, not as anything in the file."""

    def __init__(self, row: Mapping[str, Any], fields: Mapping[str, str]) -> None:
        self._row, self._fields = row, fields

    def value(self, name: str) -> Any:
        column = self._fields.get(name, name)
        value = self._row[column]
        if value is None:
            raise ValueError(f"field {column!r} is empty (null); every field a template or the task reads needs a value")
        if is_non_finite(value):
            raise ValueError(f"field {column!r} holds {json.dumps(value)}, {NON_FINITE}; every field a template or "
                             "the task reads needs a value (a string, \"NaN\", if that text is meant)")
        return value

    def __getitem__(self, name: str) -> Any:
        value = self.value(name)
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            kind = {bool: "a boolean", list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
            shown = json.dumps(value, ensure_ascii=False, default=str)  # as the file writes it: null, not None
            raise ValueError(f"field {self._fields.get(name, name)!r} holds {kind} ({shown:.60}), which a template "
                             "cannot insert as text; a template field must hold a string or a number (write this "
                             "value as a string in the file)")
        return value

    def __iter__(self):
        return iter(self._row)

    def __len__(self) -> int:
        return len(self._row)


SPEC_KEYS = ("name", "path", "hub", "config", "revision", "splits", "prompt", "target", "choices", "gold", "fields",
             "kind", "chance_rate", "max_new_tokens", "answer", "description")


def task_from_spec(spec: Mapping[str, Any]) -> Task:
    """A task from a plain mapping (one YAML entry), e.g.::

        name: capitals
        path: {train: data/capitals_train.jsonl, test: data/capitals_test.jsonl}   # or one file: its train split
        prompt: "What is the capital of {country}?"
        target: "{capital}"

    Multiple choice: ``choices: <column with the list of options>`` and ``gold: <column with the gold index>``.
    A hub dataset instead of files: ``hub: org/name``, optional ``config``, ``revision`` and
    ``splits: {train: train, ...}``.
    Optional: ``fields`` (template name -> column), ``kind``, ``chance_rate``, ``max_new_tokens``,
    ``answer`` (``first_line`` or ``final_answer``), ``description``.
    """
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise ValueError(f"task spec {spec.get('name', '?')!r}: unknown keys {unknown}; valid keys: "
                         f"{', '.join(SPEC_KEYS)}")
    for key in ("name", "prompt"):
        if key not in spec:
            raise ValueError(f"task spec {spec.get('name', '?')!r} needs {key!r}")
    answer = spec.get("answer", "first_line")
    try:
        _require(_is_text(answer) and answer in ANSWER_EXTRACTORS, "answer", answer,
                 f"one of {', '.join(ANSWER_EXTRACTORS)}")
        formatter = TemplateFormatter(prompt=spec["prompt"], target=spec.get("target"), choices=spec.get("choices"),
                                      gold=spec.get("gold"), fields=spec.get("fields") or {})
        source = _source_from_spec(spec)
    except ValueError as error:
        raise ValueError(f"task spec {spec['name']!r}: {error}") from error
    implied = "generative" if formatter.choices is None else "multiple_choice"
    kind = spec.get("kind", implied)
    if kind in TASK_KINDS and kind != implied:  # every row failed at setup: "a ... task's formatter returned choices"
        given = "a target template" if implied == "generative" else "choices and gold"
        raise ValueError(f"task spec {spec['name']!r}: kind={kind!r} is invalid with {given}: a multiple-choice spec "
                         "gives choices and gold (columns), a generative one a target template; the kind follows from "
                         "them, so remove kind")
    return Task(name=spec["name"], source=source, formatter=formatter, kind=kind, chance_rate=spec.get("chance_rate"),
                max_new_tokens=spec.get("max_new_tokens"), answer=ANSWER_EXTRACTORS[answer],
                description=spec.get("description") or "")  # Task's checks name the task


def _source_from_spec(spec: Mapping[str, Any]) -> Source:
    if ("path" in spec) == ("hub" in spec):
        raise ValueError("needs exactly one of 'path' (local files) and 'hub' (a hub dataset)")
    if "hub" in spec:
        _require(_is_text(spec["hub"]) and spec["hub"].strip() != "", "hub", spec["hub"],
                 "a hub dataset id, like 'google/boolq'")
        _require(spec.get("config") is None or _is_text(spec["config"]), "config", spec.get("config"),
                 "the name of one of the dataset's configurations, or null")
        splits = spec.get("splits") or {split: split for split in SPLITS}
        _require(isinstance(splits, Mapping) and all(split in SPLITS and _is_text(name) for split, name in
                                                     splits.items()),
                 "splits", splits, f"a mapping of split ({', '.join(SPLITS)}) to the dataset's split name, like "
                                   "{train: 'train[:500]'}")
        _require(spec.get("revision") is None or _is_text(spec["revision"]), "revision", spec.get("revision"),
                 "a branch, tag or commit of the dataset's repository (like 'refs/convert/parquet'), or null")
        return HubSource(path=spec["hub"], name=spec.get("config"), split_map=dict(splits),
                         revision=spec.get("revision"))
    path = spec["path"]
    _require(isinstance(path, (str, Path, Mapping)), "path", path,
             "a file path (the train split), or a mapping of split to file path, like {train: a.jsonl, test: b.jsonl}")
    return FileSource(files={"train": path} if isinstance(path, (str, Path)) else dict(path))


def tasks_from_yaml(path: str | Path) -> list[Task]:
    """Tasks from a YAML file holding a list of specs (or ``{tasks: [...]}``); register them with ``register_task``."""
    try:
        content = yaml.safe_load(Path(user_path(path)).read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not a readable YAML file of task specs ({error})") from None
    specs = content.get("tasks") if isinstance(content, dict) else content
    if not isinstance(specs, list):
        raise ValueError(f"{path}: expected a list of task specs (or a 'tasks:' list)")
    for number, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"{path}: task spec #{number} is a {type(spec).__name__}, not a mapping of name, path, "
                             "prompt, ...")
    tasks = [task_from_spec(spec) for spec in specs]
    twice = repeated([task.name for task in tasks])
    if twice:  # registering them all, the later spec of a name would replace the earlier one (or be refused)
        raise ValueError(f"{path}: more than one task spec is named {', '.join(map(repr, twice))}; give each task its "
                         "own name")
    return tasks
