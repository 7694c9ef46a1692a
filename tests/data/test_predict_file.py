"""A predict file: the user's prompts are read like task files, checked row by row, and rendered like task prompts."""

import json
import logging
import re

import pytest

from malora_lightning.data import MultiTaskDataModule, TaskDataError
from malora_lightning.data import datamodule as datamodule_module
from malora_lightning.data.collate import PromptEncoder
from malora_lightning.data.prompts import NO_TASK, PredictPrompt, predict_source, read_prompts
from malora_lightning.data.tasks import Example
from tests.helpers import record_sizes, tiny_tokenizer

TASKS = ["add_2digit", "parity"]


def make(predict_file=None, **kwargs) -> MultiTaskDataModule:
    options = {"tasks": TASKS, "max_length": 64, "eval_batch_size": 2, "max_eval_examples_per_task": 3,
               "predict_file": None if predict_file is None else str(predict_file)} | kwargs
    data = MultiTaskDataModule(**options)
    data.tokenizer_object = tiny_tokenizer(chat_template=True)
    return data


def write_prompts(path, rows: list[dict]) -> None:
    if path.suffix == ".csv":
        lines = ["prompt,task,target"] + [",".join(row.get(key) or "" for key in ("prompt", "task", "target"))
                                          for row in rows]
        path.write_text("\n".join(lines) + "\n")
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def unpadded(batch, row: int) -> list[int]:
    mask = batch.prompt_attention_mask[row].bool()
    return batch.prompt_input_ids[row][mask].tolist()


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_prompts_with_and_without_task_are_grouped_and_rendered_like_task_prompts(tmp_path, suffix):
    reference = make()
    reference.setup("test")
    test_batch = next(iter(reference.test_dataloader()["add_2digit"]))
    known_prompt, known_target = test_batch.prompts[0], test_batch.targets[0]
    rows = [{"prompt": "Tell me a joke"},
            {"prompt": known_prompt, "task": "add_2digit", "target": known_target},
            {"prompt": "Is 7 even or odd?", "task": "parity"},
            {"prompt": "What is 1 + 1?", "task": "add_2digit"},
            {"prompt": "Say hi", "target": "hi"}]
    path = tmp_path / f"prompts{suffix}"
    write_prompts(path, rows)
    data = make(path)
    data.setup("predict")
    loaders = data.predict_dataloader()
    assert list(loaders) == ["add_2digit", "parity", NO_TASK]  # task order, then the prompts without a task
    seen = {name: [(row, prompt, task, target) for batch in loader
                   for row, prompt, task, target in zip(batch.rows, batch.prompts, batch.task_name, batch.targets)]
            for name, loader in loaders.items()}
    assert seen == {"add_2digit": [(1, known_prompt, "add_2digit", known_target),
                                   (3, "What is 1 + 1?", "add_2digit", None)],
                    "parity": [(2, "Is 7 even or odd?", "parity", None)],
                    NO_TASK: [(0, "Tell me a joke", None, None), (4, "Say hi", None, "hi")]}
    first = next(iter(loaders["add_2digit"]))
    assert unpadded(first, 0) == unpadded(test_batch, 0)  # the same chat-template rendering as the task's own prompt
    assert tiny_tokenizer(chat_template=True).decode(unpadded(next(iter(loaders[NO_TASK])), 0)) == \
        "<|im_start|>user\nTell me a joke<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(("name", "content", "third", "missing"), [
    ("blank_lines.jsonl", '\n{"prompt": "a"}\n\n  \n{"prompt": "b", "task": "parity"}\n{"prompt": THIRD}\n', '"c"',
     "null"),
    ("array.json", '[{"prompt": "a"},\n {"prompt": "b", "task": "parity"},\n {"prompt": THIRD}]', '"c"', "null"),
    ("multiline.csv", 'prompt,task\n"a\nstill a",\nb,parity\nTHIRD,\n', "c", '""'),
])
def test_a_prompts_row_is_its_data_row_counted_from_zero_as_errors_count_rows(tmp_path, name, content, third,
                                                                               missing):
    """Blank lines of JSON lines are not rows, a JSON array counts items, and CSV counts records after the header
    (one cell spanning lines is one record): the row an error names is the row a prediction names."""
    path = tmp_path / name
    path.write_text(content.replace("THIRD", third))
    prompts = read_prompts(predict_source(str(path)), TASKS)
    assert [(prompt.row, prompt.prompt[0], prompt.task) for prompt in prompts] == \
        [(0, "a", None), (1, "b", "parity"), (2, "c", None)]
    path.write_text(content.replace("THIRD", missing))
    with pytest.raises(TaskDataError, match=r"row 2: field 'prompt' is missing"):
        read_prompts(predict_source(str(path)), TASKS)


def test_without_a_predict_file_predict_uses_the_test_splits():
    """Each example keeps its row of the task's test split, also when a subset of the split is kept."""
    data = make()
    data.setup("predict")
    assert list(data.predict_dataloader()) == TASKS
    rows = [row for batch in data.predict_dataloader()["parity"] for row in batch.rows]
    assert rows == [example.row for example in data.tasks[1].examples("test", seed=0, limit=3)]
    assert len(rows) == 3 and rows != [0, 1, 2]  # the split's rows, not positions in the subset


def test_predict_from_a_file_tokenises_no_test_row(tmp_path, monkeypatch):
    """The predict file's prompts replace the test splits: setup('predict') encoded every row of every test split as
    well (100,000 test rows tokenised to answer 1,000 prompts), which no loader read."""
    counted = record_sizes(monkeypatch, PromptEncoder, "encode")
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [{"prompt": "What is 1 + 1?", "task": "add_2digit"}])
    data = make(path)
    data.setup("predict")
    assert counted == []
    assert [len(loader) for loader in data.predict_dataloader().values()] == [1]
    make().setup("predict")  # without a predict file, the test splits are what it predicts
    assert sum(counted) == 2 * 3


def test_a_predict_files_prompts_are_encoded_in_chunks(tmp_path, monkeypatch):
    """A task's prompts were encoded in one call, all held as Python int lists at once (10,000 long prompts peaked
    at 2 GB): they go in chunks of ENCODE_CHUNK, as a task's split does, into the same loader, in the file's order."""
    monkeypatch.setattr(datamodule_module, "ENCODE_CHUNK", 2)
    sizes = record_sizes(monkeypatch, PromptEncoder, "encode_prompts")
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [{"prompt": f"What is {number} + 1?", "task": "add_2digit"} for number in range(5)])
    data = make(path)
    data.setup("predict")
    assert sizes == [2, 2, 1]
    rows = [row for batch in data.predict_dataloader()["add_2digit"] for row in batch.rows]
    assert rows == [0, 1, 2, 3, 4]
    assert data.truncation["predict"]["add_2digit"].examples == 5


@pytest.mark.parametrize(("name", "content", "named"), [
    ("null.jsonl", '{"prompt": "ok"}\n{"prompt": null, "task": "parity"}\n',
     [r"null.jsonl, row 1: field 'prompt' is missing or empty \(null\)"]),
    ("missing.jsonl", '{"question": "hi"}\n', [r"missing.jsonl, row 0: field 'prompt' is missing", "question"]),
    # a second byte-order mark (files joined with cat) is part of the name: it read "the row has: prompt"
    ("bom.csv", "\ufeff\ufeffprompt\nhello\n", [r"bom.csv, row 0: field 'prompt' is missing",
                                               r"the row has: '\\ufeffprompt'"]),
    ("empty_cell.csv", "prompt,task\nhello,parity\n,parity\n", [r"empty_cell.csv, row 1: field 'prompt'"]),
    ("unknown.jsonl", '{"prompt": "hi", "task": "parity"}\n{"prompt": "hi", "task": "parrot"}\n',
     [r"unknown.jsonl, row 1: field 'task' names unknown task 'parrot'; valid: add_2digit, parity"]),
    ("boolean.jsonl", '{"prompt": "hi", "target": true}\n',
     [r"boolean.jsonl, row 0: field 'target' must be non-empty text or a number, got bool True"]),
    ("empty.jsonl", "\n", [r"predict_file .*empty.jsonl has no rows", "'prompt'"]),
    ("blank.jsonl", '{"prompt": "hi"}\n{"prompt": "  \\n "}\n',
     [r"blank.jsonl, row 1: field 'prompt' must be non-empty text or a number, got str"]),
    ("invisible.jsonl", '{"prompt": "hi"}\n{"prompt": "\\u200b"}\n',  # a zero-width space alone was a prompt
     [r"invisible.jsonl, row 1: field 'prompt' must be non-empty text or a number, got str"]),
    # json.dumps writes a missing float as NaN: the reference answer, or the prompt, was the text "NaN"
    ("nan_target.jsonl", '{"prompt": "hi", "target": "hello"}\n{"prompt": "Population of Atlantis?", "target": NaN}\n',
     [r"nan_target.jsonl, row 1: field 'target' holds NaN, not a value", "or null .* for none"]),
    ("nan_prompt.json", '[{"prompt": Infinity}]',
     [r"nan_prompt.json, row 0: field 'prompt' holds Infinity, not a value", "every row needs the prompt text"]),
])
def test_bad_predict_files_are_refused_naming_file_row_and_field(tmp_path, name, content, named):
    path = tmp_path / name
    path.write_text(content)
    data = make(path)
    with pytest.raises(TaskDataError) as error:
        data.setup("predict")
    for pattern in named:
        assert error.match(pattern)


def test_a_number_in_a_predict_file_is_its_text_as_written(tmp_path):
    """As in task files: a target given as a JSON number is the text the file writes (2.50 stays 2.50)."""
    path = tmp_path / "numbers.jsonl"
    path.write_text('{"prompt": "12 + 30 =", "task": "add_2digit", "target": 42}\n'
                    '{"prompt": "cost?", "target": 2.50}\n')
    assert [prompt.target for prompt in read_prompts(predict_source(str(path)), TASKS)] == ["42", "2.50"]



def test_a_json_lines_row_holding_a_unicode_line_separator_is_one_row(tmp_path):
    """U+2028, U+2029 and U+0085 may stand as they are in a JSON string (json.dumps(ensure_ascii=False) writes them
    so, as PredictionWriter does): the line was split there and refused as "not a JSON object"."""
    rows = [{"prompt": "one\u2028two", "task": "add_2digit", "target": "1\u20292"}, {"prompt": "next\x85line"},
            {"prompt": "last"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\r\n" for row in rows), encoding="utf-8")
    prompts = read_prompts(predict_source(str(path)), TASKS)
    assert [(prompt.row, prompt.prompt, prompt.target) for prompt in prompts] == \
        [(0, "one\u2028two", "1\u20292"), (1, "next\x85line", None), (2, "last", None)]

@pytest.mark.parametrize("header,named", [
    ("prompt,Task,answer", ["field 'Task' (meant as 'task'?), field 'answer' (meant as 'target'?) not read"]),
    ("prompt,task,TARGET", ["field 'TARGET' (meant as 'target'?) not read"]),
    ("prompt,task,target,id,label,Task", []),  # beside the fields themselves they are the user's own data
])
def test_fields_that_look_meant_as_task_or_target_are_named(tmp_path, caplog, header, named):
    """A "Task" or "answer" column was ignored without a word: every row's correct came out null."""
    path = tmp_path / "prompts.csv"
    path.write_text(f"{header}\n" + ",".join(["12 + 30 ="] + ["add_2digit"] * (header.count(",") - 1) + ["42"]) + "\n")
    with caplog.at_level(logging.WARNING, logger="malora_lightning"):
        read_prompts(predict_source(str(path)), TASKS)
    warned = [record.getMessage() for record in caplog.records if "not read" in record.getMessage()]
    assert len(warned) == len(named)
    for message, pattern in zip(warned, named):
        assert pattern in message and "read by their exact names ('prompt', 'task', 'target')" in message


def test_a_missing_or_unreadable_predict_file_is_named(tmp_path, monkeypatch):
    """A folder was reported as a file that "does not exist", and a relative path without where it was looked for
    (the current directory, not the config file's folder), as a task's data file is."""
    with pytest.raises(FileNotFoundError, match=r"predict_file .*nowhere.jsonl does not exist; .*'prompt' field"):
        make(tmp_path / "nowhere.jsonl").setup("predict")
    (tmp_path / "answers.jsonl").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"predict_file answers.jsonl is a folder, not a file; .*'prompt'"):
        make("answers.jsonl").setup("predict")
    with pytest.raises(FileNotFoundError, match=rf"predict_file runs/prompts.jsonl does not exist \(a relative path is "
                                                rf"read from the current directory, {re.escape(str(tmp_path))}\)"):
        make("runs/prompts.jsonl").setup("predict")
    with pytest.raises(ValueError, match=r"predict_file: cannot read .*prompts.txt: supported file types are .jsonl"):
        make(tmp_path / "prompts.txt")


def test_a_prompt_built_by_position_keeps_its_fields():
    """`row` came first for a while, so PredictPrompt("text", "task") put the text in `row`: it is last and optional."""
    prompt = PredictPrompt("What is 2 + 2?", "add_2digit")
    assert (prompt.prompt, prompt.task, prompt.target, prompt.row) == ("What is 2 + 2?", "add_2digit", None, None)


def test_a_long_prompt_is_cut_as_in_the_tasks_own_splits(tmp_path):
    """A prompt is cut to leave room for its answer, as `encode` cuts it: for the row's target when given (the same
    tokens as the task's test split), else for the task's generation length. Cut to the whole max_length, a file's
    prompt was generated from more context than the model was trained and tested with."""
    reference = make(max_length=30)
    reference.setup("test")
    test_batch = next(iter(reference.test_dataloader()["add_2digit"]))
    prompt, target = test_batch.prompts[0], test_batch.targets[0]
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [{"prompt": prompt, "task": "add_2digit", "target": target},
                         {"prompt": prompt, "task": "add_2digit"}, {"prompt": prompt}])
    data = make(path, max_length=30)
    data.setup("predict")
    loaders = data.predict_dataloader()
    batch = next(iter(loaders["add_2digit"]))
    assert reference.truncation["test"]["add_2digit"].truncated > 0
    assert unpadded(batch, 0) == unpadded(test_batch, 0)
    budget = data.tasks[0].max_new_tokens
    assert len(unpadded(batch, 1)) == 30 - budget
    assert len(unpadded(next(iter(loaders[NO_TASK])), 0)) == 30  # no task, no answer to leave room for


def test_a_target_too_long_to_fit_or_without_a_task_never_stops_the_run(tmp_path):
    """Every row with a target reserved room for it, so a long reference answer (echoed to the output) aborted the
    whole predict run with "the target takes N tokens but max_length is ..."."""
    path = tmp_path / "prompts.jsonl"
    long_target = " ".join(["word"] * 100)
    write_prompts(path, [{"prompt": "What is 1 + 1?", "task": "add_2digit", "target": long_target},
                         {"prompt": "Say hi", "target": long_target}])
    data = make(path, max_length=32)
    data.setup("predict")
    loaders = data.predict_dataloader()
    budget = data.tasks[0].max_new_tokens
    assert len(unpadded(next(iter(loaders["add_2digit"])), 0)) <= 32 - budget  # room for the task's answers instead
    assert next(iter(loaders[NO_TASK])).targets == [long_target]


def test_targets_are_measured_as_a_tasks_answers_and_never_set_its_length(tmp_path):
    """The targets of a predict file's rows with a task are measured as the task's own answers are (end-of-turn token
    included), for `MALoRAModule` to warn of those its generation cannot reach: they were never measured, and a
    longer one was scored against an answer cut at the task's length without a word. The task's length stays the one
    its validation and test answers give, as in the other stages."""
    reference = make()
    reference.setup("test")
    long_target = " ".join(["odd"] * 30)
    path = tmp_path / "prompts.jsonl"
    write_prompts(path, [{"prompt": "Is 12 even or odd?", "task": "parity", "target": long_target},
                         {"prompt": "What is 2 + 2?", "task": "add_2digit"},
                         {"prompt": "Say it", "target": long_target},
                         {"prompt": "Is 3 even or odd?", "task": "parity", "target": "odd"}])
    data = make(path)
    assert data.predict_target_lengths == {}
    data.setup("predict")
    long, short = data.encoder.answer_lengths([Example("Is 12 even or odd?", long_target),
                                               Example("Is 3 even or odd?", "odd")])
    assert data.predict_target_lengths == {"parity": {0: long, 3: short}}  # only rows with a task and a target
    assert [task.max_new_tokens for task in data.tasks] == [task.max_new_tokens for task in reference.tasks]
    assert long > data.tasks[1].max_new_tokens >= short
