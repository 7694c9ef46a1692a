"""`PredictionWriter`: `predict` writes one JSON line per example, with the module's answers and the input row each
answers, also from two processes, and never over a file the user wrote."""

import dataclasses
import json
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from malora_lightning.adapters import AdapterConfig
from malora_lightning.atomic import atomic_write_text
from malora_lightning.callbacks import PredictionWriter
from malora_lightning.callbacks.predictions import (PARTIAL_HEADER_KEYS, PREDICTION_KEYS, PREDICTIONS_NAME,
                                                    Prediction, is_json_object_line, partial_path)
from malora_lightning.data import get_task
from malora_lightning.data.prompts import NO_TASK
from malora_lightning.evaluation import DEFAULT_MAX_NEW_TOKENS
from malora_lightning.module import MALoRAModule
from tests.helpers import TwoProcessDDPStrategy, TwoProcessFSDP2Strategy, run_ranks
from tests.ranks import prediction_partials
from tests.test_module import TASKS, make_data, make_module, make_trainer


NO_DROPOUT = AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2, dropout=0.0)
ONE_PROCESS = type("Trainer", (), {"world_size": 1, "global_rank": 0, "is_global_zero": True})()  # for hooks by hand


class Oracle(MALoRAModule):
    """Answers with the target where there is one, except to prompts that start with "trick", and "no idea" to the
    rest, so every `correct` is known in advance; records the generation length of each batch's task."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lengths: dict[str | None, int] = {}

    def generate_predictions(self, batch, max_new_tokens: int) -> list[str]:
        self.lengths[batch.task_name[0]] = max_new_tokens
        return [target if target is not None and not prompt.startswith("trick") else "no idea"
                for prompt, target in zip(batch.prompts, batch.targets)]


class Stopping(Oracle):
    """An `Oracle` whose predict_step raises at batch `stop_at` = (dataloader_idx, batch_idx), on every rank."""

    stop_at: tuple[int, int] | None = None

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        if (dataloader_idx, batch_idx) == self.stop_at:
            raise RuntimeError("stopped by the test")
        return super().predict_step(batch, batch_idx, dataloader_idx)


class Obstructing(Oracle):
    """An `Oracle` whose rank zero makes a folder where the predictions file goes, so that writing it fails."""

    def predict_step(self, batch, batch_idx: int, dataloader_idx: int = 0):
        if self.trainer.is_global_zero:
            (Path(self.trainer.default_root_dir) / PREDICTIONS_NAME).mkdir(exist_ok=True)
        return super().predict_step(batch, batch_idx, dataloader_idx)


def stopping(tiny_model_dir, stop_at: tuple[int, int]) -> Stopping:
    module = Stopping(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    module.stop_at = stop_at
    return module


def read_rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def partial_files(folder) -> list[Path]:
    return sorted(Path(folder).glob(".*.partial"))


def read_partial(path) -> list[tuple[int, int, dict]]:
    """A partial file's answers as (dataloader_idx, index, prediction), after checking its header."""
    header, *lines = path.read_text(encoding="utf-8").splitlines()
    assert list(json.loads(header)) == PARTIAL_HEADER_KEYS
    return [(row["dataloader_idx"], row["index"], row["prediction"]) for row in map(json.loads, lines)]


def expected_examples(data, count: int) -> list[tuple[str, object]]:
    return [(name, example) for name in TASKS
            for example in get_task(name).examples("test", seed=data.hparams.data_seed, limit=count)]


def predict(root, module, data, **trainer_settings) -> None:
    trainer = make_trainer(root, **{"callbacks": [PredictionWriter()], **trainer_settings})
    trainer.predict(module, data, return_predictions=False)


def test_predict_writes_one_row_per_test_example_with_the_modules_answers(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, adapter=NO_DROPOUT)
    data = make_data(tiny_model_dir, max_eval_examples_per_task=3, eval_batch_size=2)
    predict(tmp_path, module, data)
    rows = read_rows(tmp_path / PREDICTIONS_NAME)
    assert partial_files(tmp_path) == []  # the answers kept while it ran went once the file was written

    examples = expected_examples(data, 3)
    assert [(row["task"], row["row"], row["prompt"], row["target"]) for row in rows] == \
        [(name, example.row, example.prompt, example.target) for name, example in examples]  # text, not the template
    module.eval()
    answers = []
    with torch.no_grad():
        for name, loader in data.predict_dataloader().items():
            for batch in loader:
                answers += module.generate_predictions(batch, module.generation_length(module.task(name)))
    assert [row["prediction"] for row in rows] == answers
    assert [row["correct"] for row in rows] == \
        [get_task(name).is_correct(answer, example.target) for (name, example), answer in zip(examples, answers)]


def test_the_users_prompts_get_their_tasks_length_and_check(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Hello", "target": "hi"},
        {"prompt": "What is 2 + 2?", "task": "add_2digit", "target": "4"},
        {"prompt": "Is 5 even or odd?", "task": "parity"},
        {"prompt": "trick: What is 3 + 3?", "task": "add_2digit", "target": "6", "id": 7},
        {"prompt": "Hello again"},
    ]))
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    data = make_data(tiny_model_dir, predict_file=str(prompts))
    predict(tmp_path, module, data)
    assert read_rows(tmp_path / PREDICTIONS_NAME) == [  # per task in task order, then those without one
        {"row": 1, "task": "add_2digit", "prompt": "What is 2 + 2?", "prediction": "4", "target": "4", "correct": True},
        {"row": 3, "task": "add_2digit", "prompt": "trick: What is 3 + 3?", "prediction": "no idea", "target": "6",
         "correct": False},
        {"row": 2, "task": "parity", "prompt": "Is 5 even or odd?", "prediction": "no idea", "target": None,
         "correct": None},
        {"row": 0, "task": None, "prompt": "Hello", "prediction": "hi", "target": "hi", "correct": None},
        {"row": 4, "task": None, "prompt": "Hello again", "prediction": "no idea", "target": None, "correct": None},
    ]
    measured = {task.name: task.max_new_tokens for task in data.tasks}
    assert module.lengths == {"add_2digit": measured["add_2digit"], "parity": measured["parity"],
                              None: DEFAULT_MAX_NEW_TOKENS}
    assert list(data.predict_dataloader()) == ["add_2digit", "parity", NO_TASK]


@pytest.mark.parametrize(("cap", "parity_rows"), [(None, "2 rows (0, 3)"), (2, "3 rows (0, 2, 3)")])
def test_a_target_longer_than_its_row_generates_is_named_and_the_tasks_length_kept(tiny_model_dir, tmp_path, cap,
                                                                                    parity_rows):
    """A predict file's target needing more tokens than its task generates (its longest validation or test answer,
    capped by max_new_tokens) was cut short and scored wrong with nothing said. The task's length stays the one it
    has in every stage; one warning names the file, the tasks, the rows and the lengths."""
    long_answer = " ".join(["odd"] * 60)
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in [
        {"prompt": "Is 12 even or odd?", "task": "parity", "target": long_answer},
        {"prompt": "What is 2 + 2?", "task": "add_2digit", "target": "104"},
        {"prompt": "Is 7 even or odd?", "task": "parity", "target": "odd"},
        {"prompt": "Is 9 even or odd?", "task": "parity", "target": long_answer[:100]},
        {"prompt": "Say it at length", "target": long_answer},  # no task: nothing to score
    ]))
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT, max_new_tokens=cap)
    data = make_data(tiny_model_dir, predict_file=str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        predict(tmp_path, module, data)
    named = [str(w.message) for w in caught if str(path) in str(w.message)]
    measured = {task.name: task.max_new_tokens for task in data.tasks}
    budget = measured["parity"] if cap is None else cap
    assert module.lengths["parity"] == budget  # the task's own length, not the targets'
    assert len(named) == 1
    lengths = data.predict_target_lengths
    assert set(lengths) == {"parity", "add_2digit"} and set(lengths["parity"]) == {0, 2, 3}
    assert lengths["parity"][0] > measured["parity"] + 1
    assert f"task 'parity': {parity_rows}, targets of up to {lengths['parity'][0]} tokens, generated with {budget}" \
        in named[0]
    assert "max_new_tokens" in named[0]
    assert ("task 'add_2digit'" in named[0]) == (cap is not None)  # within its length, unless the cap cuts it
    assert "row 4" not in named[0] and ", 4" not in named[0]


@pytest.mark.parametrize("devices", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_every_answer_maps_back_to_its_row_of_the_file_with_duplicate_prompts(tiny_model_dir, tmp_path, devices):
    """The same prompt in one task, in two tasks and without a task: each answer's `row` is its input's row, which the
    Oracle's answer (the row's own target) confirms. Two processes split each task's prompts, padding the shorter
    shards: padding is answered but never written, and no row is written twice or lost."""
    inputs = [{"prompt": "What is 2 + 2?", "task": "add_2digit", "target": "4"},
              {"prompt": "What is 2 + 2?", "target": "four"},
              {"prompt": "hello", "target": "a"},
              {"prompt": "What is 2 + 2?", "task": "add_2digit", "target": "5"},
              {"prompt": "hello", "target": "b"},
              {"prompt": "hello", "task": "parity", "target": "even"},
              {"prompt": "What is 2 + 2?", "task": "add_2digit", "target": "6"},
              {"prompt": "hello"}]
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in inputs))
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    settings = {} if devices == 1 else {"devices": 2, "strategy": TwoProcessDDPStrategy()}
    predict(tmp_path, module, make_data(tiny_model_dir, predict_file=str(path), eval_batch_size=1), **settings)
    rows = read_rows(tmp_path / PREDICTIONS_NAME)
    assert sorted(row["row"] for row in rows) == list(range(len(inputs)))
    for row in rows:
        given = inputs[row["row"]]
        assert (row["prompt"], row["task"], row["target"]) == (given["prompt"], given.get("task"), given.get("target"))
        assert row["prediction"] == given.get("target", "no idea")
    assert [row["row"] for row in rows] == [0, 3, 6, 5, 1, 2, 4, 7]  # grouped by task, each in file order


def test_a_file_at_the_given_path_is_never_overwritten_but_the_run_folders_own_is(tiny_model_dir, tmp_path):
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    mine = tmp_path / "mine.jsonl"
    mine.write_text("my own notes\n")
    with pytest.raises(FileExistsError, match=r"PredictionWriter path .*mine.jsonl already exists"):
        predict(tmp_path, module, make_data(tiny_model_dir), callbacks=[PredictionWriter(path=str(mine))])
    assert mine.read_text() == "my own notes\n"
    assert module.lengths == {}  # refused before anything was predicted

    for count in (2, 1):  # the second run replaces the first one's file in the run folder
        predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=count))
        assert len(read_rows(tmp_path / PREDICTIONS_NAME)) == count * len(TASKS)


def test_a_path_that_cannot_be_written_is_refused_before_anything_is_predicted(tiny_model_dir, tmp_path):
    """/proc takes no new file: the write failed once every prompt was answered, naming a temporary file."""
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    with pytest.raises(PermissionError, match=r"PredictionWriter path /proc/answers\.jsonl cannot be written: making "
                                              r"a file in /proc failed"):
        predict(tmp_path, module, make_data(tiny_model_dir), callbacks=[PredictionWriter(path="/proc/answers.jsonl")])
    assert module.lengths == {}  # refused before anything was predicted

    path = tmp_path / "new" / "folders" / "answers.jsonl"  # missing folders are made, as before
    predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1),
            callbacks=[PredictionWriter(path=str(path))])
    assert len(read_rows(path)) == len(TASKS)


def test_a_path_under_the_home_folder_is_written_there_and_refused_there_when_taken(tiny_model_dir, tmp_path,
                                                                                    monkeypatch):
    """--predictions.path=~/answers.jsonl (or a recipe's) wrote into a folder named `~` in the current directory, and a
    file of the user's at ~/answers.jsonl was never seen by the check that refuses a taken path."""
    home = tmp_path / "hóme dir"
    home.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "cwd")
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1),
            callbacks=[PredictionWriter(path="~/answers.jsonl")])
    assert len(read_rows(home / "answers.jsonl")) == len(TASKS) and list((tmp_path / "cwd").iterdir()) == []
    with pytest.raises(FileExistsError, match=r"PredictionWriter path .*hóme dir/answers\.jsonl already exists"):
        predict(tmp_path, module, make_data(tiny_model_dir), callbacks=[PredictionWriter(path="~/answers.jsonl")])


def test_a_predictions_file_in_the_run_folder_is_replaced_only_when_a_predict_run_wrote_it(tiny_model_dir, tmp_path):
    """Without a path the writer replaced whatever predictions.jsonl the run folder held (the current directory, for a
    run without a logger or checkpoints): a user's prompts file of that name, or predictions the user annotated."""
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    path = tmp_path / PREDICTIONS_NAME
    predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1))
    rows = read_rows(path)
    annotated = "".join(json.dumps({**row, "note": "checked by hand"}) + "\n" for row in rows).encode()
    prompts = (json.dumps({"prompt": "What is 2 + 2?", "task": "add_2digit"}) + "\n").encode()
    for theirs in (annotated, prompts, b"my notes\n", "\xe9t\xe9\n".encode("latin-1")):
        path.write_bytes(theirs)
        module.lengths.clear()
        with pytest.raises(FileExistsError, match=r"predictions\.jsonl was not written by PredictionWriter \(not every "
                                                  r"line is a JSON object with exactly the keys row, task, prompt"):
            predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1))
        assert path.read_bytes() == theirs
        assert module.lengths == {}  # refused before anything was predicted


FORMER_LINE = {"task": "parity", "prompt": "Is 12 even or odd?", "prediction": "even", "target": "even",
               "correct": True}  # a line of the versions before `row` (FORMER_PREDICTION_KEYS)


def test_a_former_versions_predictions_file_in_the_run_folder_is_replaced_as_ours(tiny_model_dir, tmp_path):
    """The predictions.jsonl that versions before `row` wrote (lines of task, prompt, prediction, target, correct) was
    refused as 'not written by PredictionWriter': a predict run after an upgrade stopped in the folder of its earlier
    runs. Each line of the file must be one such line, as one run writes it: a user's line among them is refused."""
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    path = tmp_path / PREDICTIONS_NAME
    former = json.dumps(FORMER_LINE) + "\n" + json.dumps({**FORMER_LINE, "task": None, "target": None,
                                                          "correct": None}) + "\n"
    path.write_text(former + json.dumps({"prompt": "my own prompt"}) + "\n", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"predictions\.jsonl was not written by PredictionWriter"):
        predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1))
    assert module.lengths == {}  # refused before anything was predicted

    path.write_text(former, encoding="utf-8")
    predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1))
    rows = read_rows(path)
    assert len(rows) == len(TASKS) and all(list(row) == [field.name for field in dataclasses.fields(Prediction)]
                                           for row in rows)


@pytest.mark.slow
@pytest.mark.parametrize(("strategy", "module_class"),
                         [(TwoProcessDDPStrategy, Oracle), (TwoProcessFSDP2Strategy, MALoRAModule)])
def test_two_processes_write_each_example_once_in_data_order(tiny_model_dir, tmp_path, strategy, module_class):
    """3 examples per task, one per batch: one rank answers 2 of each, the other 1 and a padding example that is
    generated but never written. Under FSDP every forward is collective, so the module generates for real there: a
    rank a batch short left the other waiting in a forward (a deadlock)."""
    settings = dict(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    data = dict(max_eval_examples_per_task=3, eval_batch_size=1)
    predict(tmp_path / "one", module_class(**settings), make_data(tiny_model_dir, **data))
    predict(tmp_path / "two", module_class(**settings), make_data(tiny_model_dir, **data), devices=2,
            strategy=strategy())
    rows = read_rows(tmp_path / "two" / PREDICTIONS_NAME)
    assert partial_files(tmp_path / "two") == []
    assert Counter(row["task"] for row in rows) == {name: 3 for name in TASKS}
    assert len({(row["task"], row["prompt"]) for row in rows}) == len({(row["task"], row["row"]) for row in rows}) == 9
    assert rows == read_rows(tmp_path / "one" / PREDICTIONS_NAME)


@pytest.mark.parametrize("path", ["", 3, True])
def test_a_path_that_names_no_file_is_refused_when_built(path):
    """"" named the working directory, refused at predict as a path that 'already exists'; 3 failed in Path()."""
    with pytest.raises(ValueError, match=f"PredictionWriter path={path!r} is invalid: expected None"):
        PredictionWriter(path=path)


def test_a_prediction_line_has_the_keys_in_order_and_the_text_as_written(tmp_path):
    """Text is written as UTF-8, not as \\u escapes; a line with the keys in another order is not ours."""
    path = tmp_path / "out.jsonl"
    writer = PredictionWriter(path=str(path))
    writer.on_predict_start(ONE_PROCESS, None)
    answer = Prediction(row=0, task=None, prompt="Café → ?", prediction="naïve", target=None, correct=None)
    writer.write_on_batch_end(None, None, [answer], [0], None, 0, 0)
    writer.on_predict_end(ONE_PROCESS, None)
    line = path.read_text(encoding="utf-8")
    assert line == ('{"row": 0, "task": null, "prompt": "Café → ?", "prediction": "naïve", "target": null, '
                    '"correct": null}\n')
    assert is_json_object_line(line, PREDICTION_KEYS)
    reordered = json.dumps(dict(reversed(list(json.loads(line).items()))))
    assert not is_json_object_line(reordered, PREDICTION_KEYS)


@pytest.mark.parametrize("path", ["out/", "~/runs/", "/"])
def test_a_path_ending_in_a_separator_names_a_folder_and_is_refused_when_built(path):
    """pathlib drops the trailing separator: "out/", meant as a folder, wrote a file named out."""
    with pytest.raises(ValueError, match=re.escape(f"PredictionWriter path={path!r} names a folder: expected the path "
                                                   f"of a file to write, such as {path + PREDICTIONS_NAME!r}")):
        PredictionWriter(path=path)


def test_a_path_that_is_a_folder_is_taken():
    """It passed the check and the write failed after every prompt was answered."""
    with pytest.raises(FileExistsError, match=re.escape(f"already exists and is a folder: give the path of a file to "
                                                        f"write, such as {Path.cwd() / PREDICTIONS_NAME},")):
        PredictionWriter(path=str(Path.cwd()))._refuse_taken_path()


def test_a_predict_run_starts_without_the_answers_of_one_that_failed(tmp_path):
    writer = PredictionWriter(path=str(tmp_path / "out.jsonl"))
    writer.on_predict_start(ONE_PROCESS, None)
    writer.write_on_batch_end(None, None, [Prediction(0, None, "p", "a", None, None)], [0], None, 0, 0)  # then failed
    writer.on_predict_start(ONE_PROCESS, None)
    assert writer._answered == []
    assert read_partial(partial_path(tmp_path / "out.jsonl", 0)) == []


def test_each_batchs_answers_are_on_disk_once_the_batch_ends(tmp_path):
    """Written but not flushed, a batch's answers waited in the file object's buffer: a kill (OOM, time limit) lost
    them although the batch had ended."""
    writer = PredictionWriter(path=str(tmp_path / "out.jsonl"))
    writer.on_predict_start(ONE_PROCESS, None)
    writer.write_on_batch_end(None, None, [Prediction(0, None, "p", "a", None, None)], [0], None, 0, 0)
    assert read_partial(partial_path(tmp_path / "out.jsonl", 0)) == [(0, 0, dataclasses.asdict(
        Prediction(0, None, "p", "a", None, None)))]  # read from disk while the writer still holds the file open
    with pytest.warns(UserWarning, match=r"\(1 answer\)"):
        writer.on_exception(ONE_PROCESS, None, RuntimeError("stopped"))


def test_a_writer_used_again_counts_only_its_new_runs_answers(tmp_path):
    """One writer, two predict runs of a trainer: the second, stopped before its first answer, keeps no partial file
    and warns of no answer, whatever the first had kept."""
    writer = PredictionWriter(path=str(tmp_path / "out.jsonl"))
    writer.on_predict_start(ONE_PROCESS, None)
    writer.write_on_batch_end(None, None, [Prediction(0, None, "p", "a", None, None)] * 2, [0, 1], None, 0, 0)
    with pytest.warns(UserWarning, match=r"\(2 answers\)"):
        writer.on_exception(ONE_PROCESS, None, RuntimeError("stopped"))
    writer.on_predict_start(ONE_PROCESS, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer.on_exception(ONE_PROCESS, None, RuntimeError("stopped"))
    assert kept_warnings(caught) == [] and partial_files(tmp_path) == []


def kept_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "keeps what it answered so far" in str(w.message)]


def test_a_predict_run_that_stops_keeps_the_answers_of_its_completed_batches(tiny_model_dir, tmp_path):
    """All answers were held in memory until the end: an exception, a Ctrl-C or a kill after hours of generation
    left nothing. Each batch's answers are now in the partial file, and a warning names it."""
    data = make_data(tiny_model_dir, max_eval_examples_per_task=3, eval_batch_size=1)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="stopped by the test"):
        warnings.simplefilter("always")
        predict(tmp_path, stopping(tiny_model_dir, stop_at=(1, 1)), data)  # the second task's second batch
    partial = tmp_path / f".{PREDICTIONS_NAME}.rank0.partial"
    assert partial_files(tmp_path) == [partial] and not (tmp_path / PREDICTIONS_NAME).exists()
    kept = read_partial(partial)
    examples = expected_examples(data, 3)
    assert [(loader, index) for loader, index, _ in kept] == [(0, 0), (0, 1), (0, 2), (1, 0)]
    assert [(answer["task"], answer["row"], answer["prompt"], answer["prediction"]) for _, _, answer in kept] == \
        [(name, example.row, example.prompt, example.target) for name, example in examples[:4]]
    # lines of predictions.jsonl
    assert all(is_json_object_line(json.dumps(answer), PREDICTION_KEYS) for _, _, answer in kept)
    assert len(kept_warnings(caught)) == 1
    assert f"(RuntimeError) before writing {tmp_path / PREDICTIONS_NAME}; rank 0 keeps what it answered so far " \
           f"(4 answers) in {partial}:" in kept_warnings(caught)[0]


def test_a_partial_file_an_earlier_run_left_is_started_afresh_and_removed_once_written(tiny_model_dir, tmp_path):
    """The next run recomputes every answer: an old one must not mix into its partial file or its output. A run
    stopped before its first answer keeps no empty partial file, nor warns."""
    data = make_data(tiny_model_dir, max_eval_examples_per_task=3, eval_batch_size=1)
    partial = tmp_path / f".{PREDICTIONS_NAME}.rank0.partial"
    with pytest.raises(RuntimeError, match="stopped by the test"), pytest.warns(UserWarning, match=r"\(4 answers\)"):
        predict(tmp_path, stopping(tiny_model_dir, stop_at=(1, 1)), data)
    assert len(read_partial(partial)) == 4
    with pytest.raises(RuntimeError, match="stopped by the test"), pytest.warns(UserWarning, match=r"\(1 answer\)"):
        predict(tmp_path, stopping(tiny_model_dir, stop_at=(0, 1)), data)
    assert [(loader, index) for loader, index, _ in read_partial(partial)] == [(0, 0)]

    predict(tmp_path, stopping(tiny_model_dir, stop_at=None), data)
    assert partial_files(tmp_path) == []
    assert [(row["task"], row["row"]) for row in read_rows(tmp_path / PREDICTIONS_NAME)] == \
        [(name, example.row) for name, example in expected_examples(data, 3)]

    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="stopped by the test"):
        warnings.simplefilter("always")
        predict(tmp_path, stopping(tiny_model_dir, stop_at=(0, 0)), data)
    assert partial_files(tmp_path) == [] and kept_warnings(caught) == []
    assert len(read_rows(tmp_path / PREDICTIONS_NAME)) == 9  # the earlier run's file stays


@pytest.mark.parametrize("theirs", [b"my notes\n", b"", b'{"row": 0}\n', "\xe9t\xe9\n".encode("latin-1")])
@pytest.mark.parametrize("given", [False, True])
def test_a_file_at_the_partial_name_that_no_predict_run_wrote_is_never_replaced(tiny_model_dir, tmp_path, theirs,
                                                                                given):
    path = tmp_path / "answers.jsonl" if given else tmp_path / PREDICTIONS_NAME
    partial = partial_path(path, 0)
    partial.write_bytes(theirs)
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    callbacks = [PredictionWriter(path=str(path) if given else None)]
    with pytest.raises(FileExistsError, match=rf"\.{path.name}\.rank0\.partial was not written by PredictionWriter "
                                              r"\(its first line is not a JSON object with exactly the keys "
                                              r"malora_partial_predictions, rank, lines\)"):
        predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1), callbacks=callbacks)
    assert partial.read_bytes() == theirs
    assert module.lengths == {} and not path.exists()  # refused before anything was predicted


def test_a_link_at_the_partial_name_is_never_replaced(tiny_model_dir, tmp_path):
    """Even one to a partial file of ours: writing through it would change a file elsewhere."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(RuntimeError, match="stopped by the test"), pytest.warns(UserWarning, match="keeps what it"):
        predict(elsewhere, stopping(tiny_model_dir, stop_at=(1, 0)), make_data(tiny_model_dir))
    kept = partial_path(elsewhere / PREDICTIONS_NAME, 0)
    content = kept.read_bytes()
    partial_path(tmp_path / PREDICTIONS_NAME, 0).symlink_to(kept)
    with pytest.raises(FileExistsError, match="rank0.partial was not written by PredictionWriter"):
        predict(tmp_path, stopping(tiny_model_dir, stop_at=None), make_data(tiny_model_dir))
    assert kept.read_bytes() == content


def test_a_dangling_link_at_the_partial_name_is_never_replaced(tiny_model_dir, tmp_path):
    """A link to nothing is not a partial file of ours either: starting the partial file afresh would remove it."""
    partial = partial_path(tmp_path / PREDICTIONS_NAME, 0)
    partial.symlink_to(tmp_path / "nowhere")
    module = Oracle(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    with pytest.raises(FileExistsError, match="rank0.partial was not written by PredictionWriter"):
        predict(tmp_path, module, make_data(tiny_model_dir, max_eval_examples_per_task=1))
    assert partial.is_symlink() and partial.readlink() == tmp_path / "nowhere"
    assert module.lengths == {}  # refused before anything was predicted


def test_a_failed_write_of_the_file_keeps_the_partial_file(tiny_model_dir, tmp_path, monkeypatch):
    """A full disk at the end: the answers are still on disk, and the warning says where."""
    def full_disk(path, text: str) -> None:
        if Path(path).name == PREDICTIONS_NAME:
            raise OSError(28, "No space left on device", str(path))
        atomic_write_text(path, text)

    monkeypatch.setattr("malora_lightning.callbacks.predictions.atomic_write_text", full_disk)
    data = make_data(tiny_model_dir, max_eval_examples_per_task=1)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(OSError, match="No space left"):
        warnings.simplefilter("always")
        predict(tmp_path, stopping(tiny_model_dir, stop_at=None), data)
    partial = partial_path(tmp_path / PREDICTIONS_NAME, 0)
    assert [answer["row"] for _, _, answer in read_partial(partial)] == \
        [example.row for _, example in expected_examples(data, 1)]
    assert f"(OSError) before writing {tmp_path / PREDICTIONS_NAME}; rank 0 keeps what it answered so far " \
           f"(3 answers) in {partial}:" in kept_warnings(caught)[0]


@pytest.mark.slow
def test_two_processes_that_stop_keep_each_ranks_answers_and_refuse_a_foreign_one(tiny_model_dir, tmp_path):
    """3 examples per task, one per batch: rank 0 answers 0 and 2 of each task, rank 1 answers 1 and a padding
    example (never kept). Stopped at each rank's second batch of the second task."""
    data = make_data(tiny_model_dir, max_eval_examples_per_task=3, eval_batch_size=1)
    with pytest.raises(Exception, match="stopped by the test"):
        predict(tmp_path, stopping(tiny_model_dir, stop_at=(1, 1)), data, devices=2,
                strategy=TwoProcessDDPStrategy())
    output = tmp_path / PREDICTIONS_NAME
    assert partial_files(tmp_path) == [partial_path(output, 0), partial_path(output, 1)] and not output.exists()
    kept = {rank: read_partial(partial_path(output, rank)) for rank in (0, 1)}
    assert [(loader, index) for loader, index, _ in kept[0]] == [(0, 0), (0, 2), (1, 0)]
    assert [(loader, index) for loader, index, _ in kept[1]] == [(0, 1), (1, 1)]
    examples = expected_examples(data, 3)
    answers = sorted(kept[0] + kept[1], key=lambda answer: answer[:2])
    assert [(answer["task"], answer["row"], answer["prompt"]) for _, _, answer in answers] == \
        [(name, example.row, example.prompt) for name, example in examples[:5]]

    # a file of the user's at rank 1's name stops every rank before anything is predicted or replaced
    theirs = partial_path(output, 1)
    theirs.write_text("my notes\n")
    ours = partial_path(output, 0).read_bytes()
    with pytest.raises(Exception, match=r"\.predictions\.jsonl\.rank1\.partial was not written by PredictionWriter"):
        predict(tmp_path, stopping(tiny_model_dir, stop_at=None), data, devices=2, strategy=TwoProcessDDPStrategy())
    assert theirs.read_text() == "my notes\n" and partial_path(output, 0).read_bytes() == ours
    assert not output.exists()


@pytest.mark.slow
def test_every_rank_keeps_its_answers_when_rank_zero_cannot_write_the_file(tiny_model_dir, tmp_path):
    """Rank zero writes every rank's answers: the others remove their partial files only once it has, and stop too
    (rather than wait for it in a collective) when it fails."""
    module = Obstructing(model_name_or_path=str(tiny_model_dir), quantization=None, adapter=NO_DROPOUT)
    data = make_data(tiny_model_dir, max_eval_examples_per_task=3, eval_batch_size=1)
    with pytest.raises(Exception, match="is a folder|rank zero failed to write"):
        predict(tmp_path, module, data, devices=2, strategy=TwoProcessDDPStrategy())
    output = tmp_path / PREDICTIONS_NAME
    kept = read_partial(partial_path(output, 0)) + read_partial(partial_path(output, 1))
    assert sorted((loader, index) for loader, index, _ in kept) == [(loader, index) for loader in range(3)
                                                                     for index in range(3)]


@pytest.mark.slow
def test_a_rank_that_cannot_start_its_partial_file_stops_every_rank_naming_it(tmp_path):
    """Each rank writes its partial file to its own disk (node-local under multi-node DDP): a rank whose write failed
    stopped alone, and the others went on to predict and waited for it forever in `on_predict_end`'s gather. Every
    rank now raises the failing rank's error, and rank zero's started file, holding no answer, goes."""
    run_ranks(prediction_partials.run, str(tmp_path))
    failed = ["OSError", f"[Errno 28] No space left on device: '{partial_path(tmp_path / 'out.jsonl', 1)}'"]
    assert [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)] == [failed, failed]
    assert partial_files(tmp_path) == []
