import json
import re

import pandas as pd
import pytest

from malora_lightning.data import (
    Example,
    FileSource,
    GeneratorSource,
    Task,
    TaskDataError,
    final_answer,
    first_line,
    get_task,
    register_task,
    registered_tasks,
    task_from_spec,
    tasks_from_yaml,
)
from malora_lightning.data import tasks as tasks_module

ROWS = [{"question": "2+2", "answer": "4"}, {"question": "3+3", "answer": "6"}, {"question": "1+5", "answer": "6"}]


def qa_formatter(row):
    return Example(prompt=f"Q: {row['question']}", target=str(row["answer"]))  # CSV reads "4" as a number


def generated(rows, splits=("train", "validation", "test")) -> GeneratorSource:
    return GeneratorSource(lambda split, seed: rows, splits=splits)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so tests can register freely."""
    monkeypatch.setattr(tasks_module, "_REGISTRY", dict(tasks_module._REGISTRY))


def test_register_and_get_a_python_task(registry):
    task = register_task(Task(name="qa", source=generated(ROWS), formatter=qa_formatter))
    assert get_task("qa") is task and "qa" in registered_tasks()
    with pytest.raises(ValueError, match="already registered; pass overwrite=True"):
        register_task(Task(name="qa", source=generated(ROWS), formatter=qa_formatter))
    replacement = register_task(Task(name="qa", source=generated(ROWS[:1]), formatter=qa_formatter), overwrite=True)
    assert get_task("qa") is replacement
    with pytest.raises(ValueError, match="register_task overwrite='no' is invalid: expected True or False"):
        register_task(Task(name="qa", source=generated(ROWS), formatter=qa_formatter), overwrite="no")  # was truthy
    assert get_task("qa") is replacement
    # a spec given where the Task goes: AttributeError 'dict' object has no attribute 'name'
    with pytest.raises(ValueError, match=r"register_task takes a Task, got dict \{'name': 'qa'.*; for a task spec "
                                         r"\(a mapping of name, path, prompt, \.\.\.\), "
                                         r"register_task\(task_from_spec\(spec\)\)"):
        register_task({"name": "qa", "path": "qa.jsonl", "prompt": "{q}", "target": "{a}"})


def test_unknown_task_lists_the_registered_ones():
    with pytest.raises(ValueError,
                       match="unknown task 'no_such_task'; registered tasks: .*add_2digit.*arc_easy") as error:
        get_task("no_such_task")
    assert all(name in str(error.value) for name in registered_tasks())


def test_an_unknown_task_says_that_a_python_registered_task_is_known_only_where_its_module_is_imported():
    """A task registered from the user's module was 'unknown' to `malora`, a resume, a rerun of the run's config.yaml
    and malora-task-export, which import no module of the user's; the error listed the built-in tasks alone."""
    with pytest.raises(ValueError, match=r"unknown task 'mine'; registered tasks: .*; a task registered from Python "
                                         r"\(register_task\) is known only in a process that imports the module "
                                         r"registering it, which the malora and malora-task-export commands never "
                                         r"do: run them from an entry point of your own that imports it"):
        get_task("mine")


def test_missing_field_names_task_split_row_and_field():
    rows = [ROWS[0], ROWS[1], {"question": "9+1"}]
    task = Task(name="qa", source=generated(rows), formatter=qa_formatter)
    with pytest.raises(TaskDataError, match=r"task 'qa', validation row 2: missing field 'answer' \(the row has: "
                                            r"'question'\)"):
        task.examples("validation")


@pytest.mark.parametrize(("rows", "splits", "split", "message"), [
    ([], ("train",), "train", r"task 'qa': the 'train' split is empty \(generated train rows\)$"),
    (ROWS, ("train",), "test", r"task 'qa' has no 'test' split; it provides: train"),
    (ROWS, ("train",), "dev", r"unknown split 'dev'; valid splits: train, validation, test"),
])
def test_empty_or_missing_splits_say_which(rows, splits, split, message):
    task = Task(name="qa", source=generated(rows, splits), formatter=qa_formatter)
    with pytest.raises((TaskDataError, ValueError), match=message):
        task.examples(split)


def test_a_formatter_returning_the_wrong_kind_is_reported():
    mc = Task(name="mc", source=generated(ROWS), formatter=qa_formatter, kind="multiple_choice")
    with pytest.raises(TaskDataError, match="task 'mc', train row 0: a multiple_choice task's formatter returned no "
                                            "choices"):
        mc.examples("train")


@pytest.mark.parametrize(("formatter", "returned"), [
    (lambda row: (row["question"], row["answer"]), r"tuple \('2\+2', '4'\)"),  # prompt and target, unwrapped
    (lambda row: {"prompt": row["question"], "target": row["answer"]}, r"dict \{'prompt': '2\+2'"),
    (lambda row: None, "NoneType None"),  # a formatter without `return`
])
def test_a_formatter_returning_no_example_is_named_with_its_task_and_row(formatter, returned):
    """It failed with AttributeError: 'tuple' object has no attribute 'choices', naming neither task, row nor what a
    formatter must return."""
    task = Task(name="qa", source=generated(ROWS), formatter=formatter)
    with pytest.raises(TaskDataError, match=rf"task 'qa', train row 0: the formatter returned {returned}.*, not an "
                                            r"Example; a task's formatter returns "
                                            r"Example\(prompt=\.\.\., target=\.\.\.\)"):
        task.examples("train")


def test_limit_takes_a_seeded_random_subset_in_source_order():
    rows = [{"question": str(index), "answer": str(index)} for index in range(50)]
    task = Task(name="qa", source=generated(rows), formatter=qa_formatter)
    subset = task.examples("train", seed=1, limit=10)
    assert len(subset) == 10 and [example.row for example in subset] == sorted(example.row for example in subset)
    assert all(example.target == str(example.row) for example in subset)  # rows keep their source index
    assert subset == task.examples("train", seed=1, limit=10)
    assert subset != task.examples("train", seed=2, limit=10)
    assert len(task.examples("train", limit=500)) == 50


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"target": " "}, "the target is empty"),
    ({"prompt": "\n"}, "the prompt is empty"),
    # invisible format characters (a zero-width space, a byte-order mark) were text: the tokenizer encodes them
    ({"prompt": "\u200b\ufeff "}, "the prompt is empty"),
    ({"target": "\u200b"}, "the target is empty"),
    ({"choices": ("A", "B"), "gold": 2}, r"gold index 2 is not in 0..1"),
    ({"choices": ("A", "B"), "gold": 0}, "target 'x' differs from the gold choice 'A'"),
    ({"choices": ("A",), "gold": 0}, "at least two choices"),
    ({"gold": 0}, "gold is set but there are no choices"),
    ({"choices": ("yes", "no", "yes"), "gold": 2, "target": "yes"},  # a tie goes to index 0: gold 2 is never chosen
     r"choices 'yes' appear more than once in \['yes', 'no', 'yes'\]"),
    ({"choices": ("x", ""), "gold": 0}, r"choice 1 is '' in \['x', ''\]; every choice must be non-empty text"),
    ({"choices": (" \n", "x"), "gold": 1}, r"choice 0 is ' \\n' in"),  # whitespace only: no tokens either
    # a Python formatter's row value: the collator would tokenize the number's text, or fail on None
    ({"prompt": 7}, r"prompt and target must be strings \(got int and str\)"),
    ({"target": None}, r"prompt and target must be strings \(got str and NoneType\)"),
])
def test_example_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Example(**({"prompt": "p", "target": "x"} | kwargs))


@pytest.mark.parametrize("gold", [2, -1])
def test_a_multiple_choice_example_with_a_gold_index_outside_its_choices_is_refused(gold):
    """Checked before the target is looked up: choices[2] raised a bare IndexError, naming neither index nor choices."""
    with pytest.raises(ValueError, match=rf"gold index {gold} is not in 0\.\.1"):
        Example.multiple_choice("Sky?", ["green", "blue"], gold)
    assert Example.multiple_choice("Sky?", ["green", "blue"], 1).target == "blue"


def test_invalid_task_definitions_are_rejected():
    with pytest.raises(ValueError, match="task 't': kind='ranking' is invalid: expected one of generative, "
                                         "multiple_choice"):
        Task(name="t", source=generated(ROWS), formatter=qa_formatter, kind="ranking")
    with pytest.raises(ValueError, match="name='a b' is invalid: expected a task name"):
        Task(name="a b", source=generated(ROWS), formatter=qa_formatter)


class NoDescribeSource:
    """A source of one's own with splits and load but no describe: it has part of the Source protocol only."""

    splits = ("train",)

    def load(self, split):
        return ROWS

    def __repr__(self) -> str:
        return "NoDescribeSource()"


@pytest.mark.parametrize(("settings", "message"), [
    # a path where the source goes (as a task spec's `path`): AttributeError 'str' object has no attribute 'splits'
    ({"source": "data/train.jsonl"}, r"source='data/train\.jsonl' is invalid: expected a FileSource, HubSource or "
                                     r"GeneratorSource .*FileSource\(\{'train': 'train\.jsonl'"),
    ({"source": {"train": "data/train.jsonl"}}, r"source=\{'train': 'data/train\.jsonl'\} is invalid: expected a "
                                                "FileSource"),
    # a Source of one's own lacking one member (describe, which names the source in every data error)
    ({"source": NoDescribeSource()}, r"source=NoDescribeSource\(\) is invalid: expected a FileSource, HubSource or "
                                     r"GeneratorSource \(an object with splits, load and describe"),
    ({"formatter": "Q: {question}"}, r"formatter='Q: \{question\}' is invalid: expected a function of a row"),
    ({"answer": "first_line"}, r"answer='first_line' is invalid: expected a function of a text"),
])
def test_a_task_whose_source_formatter_or_answer_is_of_the_wrong_kind_is_named_when_made(settings, message):
    """They failed on first use, in the data module's setup, with an AttributeError or TypeError naming no task."""
    with pytest.raises(ValueError, match=f"task 'qa': {message}"):
        Task(**({"name": "qa", "source": generated(ROWS), "formatter": qa_formatter} | settings))


@pytest.mark.parametrize(("prediction", "target", "expected"), [
    ("  paris\nThe capital of France.", "paris", True),
    ("sun  dog cat", "sun dog cat", True),
    ("Sun dog cat", "sun dog cat", False),
    ("", "x", False),
    # one text in two Unicode forms (NFD, as macOS writes names, and NFC): an identical-looking answer scored wrong
    ("cafe\u0301", "caf\u00e9", True),
    ("caf\u00e9", "cafe\u0301", True),  # and the other way round: a target file saved in NFD, an answer in NFC
    ("Ａ", "A", False),  # a full-width letter is another character, not another form of the same one
])
def test_first_line_exact_match(prediction, target, expected):
    task = Task(name="t", source=generated(ROWS), formatter=qa_formatter)
    assert task.is_correct(prediction, target) is expected
    assert first_line("\n\n  a   b \nc") == "a b"


@pytest.mark.parametrize(("text", "answer"), [
    ("Natalia sold 24.\n#### 72", "72"),
    ("so the total is $1,000.\nThe answer is: 1,000.", "1000"),
    ("The answer is 18", "18"),
    ("We get 3 then 7 apples", "7"),
    ("The answer is: \\frac{3}{4}", "\\frac{3}{4}"),
    ("the answer is: 5\nso 6 are left", "5"),  # markers in any case: this read 6
    ("THE ANSWER IS 5.\nCheck: 5 + 1 = 6", "5"),
    ("It takes 10-12 minutes", "12"),  # a hyphen, not a minus: this read -12
    ("so x = -3", "-3"),
    ("so each gets 3/4", "3/4"),  # a fraction is one answer: this read 4
    ("At first the answer is 5, I thought.\nRechecking, the answer is: 7", "7"),  # the last marker's answer
])
def test_final_answer_extraction(text, answer):
    assert final_answer(text) == answer


@pytest.mark.parametrize(("target", "prediction", "correct"), [
    ("3/4", "1/4", False),  # each of these five was counted correct: both sides were cut to their last number
    ("2:30", "4:30", False),
    ("(2, 3)", "(5, 3)", False),
    ("1.5e3", "2.5e3", False),
    ("x = 7", "y = 7", False),
    ("3/4", "3/4", True),
    ("3/4", "So the share is\nThe answer is: 3/4", True),
    ("(2, 3)", "(2, 3)\nThe point lies on both lines.", True),
    ("72", "She has 72 apples.", True),  # against one number, the prediction's last number
    ("$1,000", "1000.", True),
    ("-0.5", "0.5", False),
    ("3/4", "the answer is: 3/4", True),  # a lower-case marker: this compared the whole line
    ("caf\u00e9", "The answer is: cafe\u0301", True),  # one text in two Unicode forms (NFC, NFD)
])
def test_final_answer_compares_a_target_without_a_marker_as_a_whole(target, prediction, correct):
    task = Task(name="t", source=generated(ROWS), formatter=qa_formatter, answer=final_answer)
    assert task.is_correct(prediction, target) is correct


@pytest.mark.parametrize(("target", "prediction", "correct"), [
    ("#### 18", "#### 18.00", True),  # each True here was counted wrong: numbers were compared as strings
    ("#### 3", "So 3.0 in all.\n#### 3.0", True),
    ("#### .5", "#### 0.5", True),
    ("#### 10.5", "It costs 10.50", True),
    ("#### 72", "The answer is 72 apples.", True),  # the marked line's last number, not the whole line
    ("#### 72", "#### 72 dollars", True),
    ("The answer is: 72", "The answer is $\\boxed{72}$", True),
    ("#### 3", "1,2,3", True),  # a list, not the thousands-separated 123
    ("#### 2500000", "total: 2,500,000 people", True),
    ("#### 72", "I first got 72.\n#### 70", False),  # a marked answer is the prediction's answer
    ("#### 72", "#### 72\n#### 73", False),
    ("#### 0.3", "#### 0.30000000000000001", False),  # exact: no float rounding
    ("#### 72", "The answer is", False),
    ("72", "#### 72.0", True),
    ("#### 72", "the answer is 72.\nCheck: 72 + 1 = 73", True),  # each of these four was scored the other way
    ("#### 12", "Between 10-12", True),
    ("#### -12", "Between 10-12", False),
    ("#### 7", "pages 5-7", True),
    ("#### 4", "3/4", False),  # each of these three was counted correct: a fraction was read as its denominator
    ("4", "1/4", False),
    ("#### 4", "The answer is 1 / 4", False),
    ("#### 24", "48/2 = 24", True),
    ("#### 0.75", "The answer is 3/4", True),  # each of these five was counted wrong: a fraction was compared as text
    ("#### 3/4", "#### 0.75", True),
    ("3/4", "6 / 8", True),
    ("#### 3/4", "She ate 3/4 of the pie.", True),
    ("#### -1/2", "#### -0.50", True),
    ("#### 3/4", "#### 4/3", False),
    ("#### 1/0", "#### 1/0", True),  # no value: compared as text
    ("#### 1/0", "#### 2/0", False),
    ("#### 0", "#### 0/0", False),
    ("#### 1,2,3", "#### 1,2,3", True),  # a list, not 123: compared as text (the fractions' change read it as 123)
    ("#### 1,2,3", "#### 123", True),
    ("#### 12,34", "#### 12,34", True),
])
def test_final_answer_compares_a_number_by_value_with_the_predictions_final_answer(target, prediction, correct):
    task = Task(name="t", source=generated(ROWS), formatter=qa_formatter, answer=final_answer)
    assert task.is_correct(prediction, target) is correct


@pytest.mark.parametrize(("answer", "prediction", "correct"), [
    ("3/4", "3/4", True),  # against "#### 3/4" these three were False: the prediction was cut to its last number
    ("2:30", "2:30", True),
    ("x = 7", "x = 7\nsince 2x = 14", True),
    ("3/4", "So the share is\nThe answer is: 3/4", True),
    ("3/4", "1/4", False),
    ("2:30", "It is 2:30", False),
])
@pytest.mark.parametrize("marker", ["", "#### ", "The answer is: "])
def test_final_answer_scores_a_marked_target_like_the_same_answer_unmarked(marker, answer, prediction, correct):
    task = Task(name="t", source=generated(ROWS), formatter=qa_formatter, answer=final_answer)
    assert task.is_correct(prediction, f"Worked steps.\n{marker}{answer}" if marker else answer) is correct


def write_rows(path, rows):
    path.write_text("\n".join(json.dumps(row) for row in rows))
    return path


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".parquet"])
def test_file_sources_read_jsonl_csv_and_parquet(tmp_path, suffix):
    path = tmp_path / f"train{suffix}"
    frame = pd.DataFrame(ROWS)
    if suffix == ".jsonl":
        write_rows(path, ROWS)
    elif suffix == ".csv":
        frame.to_csv(path, index=False)
    else:
        frame.to_parquet(path)
    task = Task(name="qa", source=FileSource({"train": str(path)}), formatter=qa_formatter)
    assert [(example.prompt, example.target) for example in task.examples("train")] == [
        ("Q: 2+2", "4"), ("Q: 3+3", "6"), ("Q: 1+5", "6")]


def test_file_source_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"cannot read data.txt: supported file types are .jsonl, .json, .csv, "
                                         r"\.parquet"):
        FileSource({"train": "data.txt"})
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        FileSource({"dev": "data.jsonl"})
    task = Task(name="qa", source=FileSource({"train": str(tmp_path / "missing.jsonl")}), formatter=qa_formatter)
    with pytest.raises(FileNotFoundError, match="train file .*missing.jsonl does not exist"):
        task.examples("train")


def test_a_missing_relative_file_names_the_folder_it_was_looked_for_in(tmp_path, monkeypatch):
    """A recipe's relative path is read from where the command runs, not from the recipe's folder: the error named
    the path alone."""
    monkeypatch.chdir(tmp_path)
    task = Task(name="qa", source=FileSource({"train": "data/train.jsonl"}), formatter=qa_formatter)
    with pytest.raises(FileNotFoundError, match=rf"train file data/train.jsonl does not exist \(a relative path is "
                                                rf"read from the current directory, {re.escape(str(tmp_path))}\)"):
        task.examples("train")
    (tmp_path / "data" / "train.jsonl").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match=r"train file data/train.jsonl is a folder, not a file"):
        task.examples("train")


def test_generative_task_from_a_spec_with_a_field_mapping(tmp_path):
    train = write_rows(tmp_path / "train.jsonl", [{"country": "France", "city": "Paris"}])
    test = write_rows(tmp_path / "test.jsonl", [{"country": "Italy", "city": "Rome"}])
    task = task_from_spec({"name": "capitals", "path": {"train": str(train), "test": str(test)},
                           "prompt": "Capital of {place}?", "target": "{city}", "fields": {"place": "country"},
                           "chance_rate": 0.0})
    assert (task.kind, task.metric, task.chance_rate, task.source.splits) == ("generative", "exact_match", 0.0,
                                                                             ("train", "test"))
    assert task.examples("test")[0] == Example(prompt="Capital of Italy?", target="Rome", row=0)


def test_multiple_choice_task_from_yaml(tmp_path):
    data = write_rows(tmp_path / "mc.jsonl", [{"q": "Sky colour?", "options": ["green", "blue"], "answer": "1"},
                                              {"q": "Grass colour?", "options": ["green", "blue"], "answer": 0}])
    (tmp_path / "tasks.yaml").write_text(f"tasks:\n  - name: colours\n    path: {data}\n    prompt: '{{q}}'\n"
                                         f"    choices: options\n    gold: answer\n")
    (task,) = tasks_from_yaml(tmp_path / "tasks.yaml")
    assert (task.name, task.kind, task.metric) == ("colours", "multiple_choice", "accuracy")
    examples = task.examples("train")  # a single path is the train split
    assert [(example.target, example.choices, example.gold) for example in examples] == [
        ("blue", ("green", "blue"), 1), ("green", ("green", "blue"), 0)]


def test_spec_errors_are_clear(tmp_path):
    with pytest.raises(ValueError, match=r"task spec 'x': unknown keys \['promt'\]; valid keys: name, path"):
        task_from_spec({"name": "x", "path": "a.jsonl", "promt": "{q}", "target": "{a}"})
    with pytest.raises(ValueError, match="task spec 'x': a generative task needs a 'target' template"):
        task_from_spec({"name": "x", "path": "a.jsonl", "prompt": "{q}"})
    with pytest.raises(ValueError, match="task spec 'x': multiple choice needs both 'choices' and 'gold'"):
        task_from_spec({"name": "x", "path": "a.jsonl", "prompt": "{q}", "choices": "options"})
    with pytest.raises(ValueError, match="task spec 'x': needs exactly one of 'path'"):
        task_from_spec({"name": "x", "prompt": "{q}", "target": "{a}"})
    with pytest.raises(ValueError, match="task spec 'x' needs 'prompt'"):
        task_from_spec({"name": "x", "path": "a.jsonl", "target": "{a}"})
    with pytest.raises(ValueError, match=r"task spec '\?' needs 'name'"):
        task_from_spec({"path": "a.jsonl", "prompt": "{q}", "target": "{a}"})
    bad = write_rows(tmp_path / "bad.jsonl", [{"q": "?", "options": ["a", "b"], "answer": "first"}])
    task = task_from_spec({"name": "x", "path": str(bad), "prompt": "{q}", "choices": "options", "gold": "answer"})
    with pytest.raises(TaskDataError, match="task 'x', train row 0: gold field 'answer' must hold an integer index"):
        task.examples("train")


def test_spec_from_the_hub_is_not_loaded_until_used():
    task = task_from_spec({"name": "boolq_copy", "hub": "google/boolq", "splits": {"train": "train[:100]"},
                           "prompt": "{question}", "target": "{answer}"})
    assert (task.source.path, task.source.split_map, task.source.splits) == ("google/boolq",
                                                                             {"train": "train[:100]"}, ("train",))
