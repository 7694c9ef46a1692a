import json
import logging
import multiprocessing
import re
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator
from lightning.pytorch.cli import LightningCLI
from torch.utils.data._utils.pin_memory import pin_memory

from malora_lightning.data import BUILTIN_TASKS, MultiTaskDataModule, PromptEncoder, TaskDataError, get_task, sampling
from malora_lightning.data import datamodule as datamodule_module
from malora_lightning.data.datamodule import ResumableDataLoader
from malora_lightning.data.batches import TrainingBatch
from tests.helpers import record_sizes, tiny_tokenizer

TASKS = ["add_2digit", "reverse_words", "parity"]


def make(tokenizer=None, **kwargs) -> MultiTaskDataModule:
    options = {"tasks": TASKS, "max_length": 64, "batch_size": 4, "max_train_examples_per_task": 12,
               "max_eval_examples_per_task": 5} | kwargs
    data = MultiTaskDataModule(**options)
    data.tokenizer_object = tokenizer or tiny_tokenizer()
    return data


def task_counts(loader) -> Counter:
    return Counter(name for batch in loader for name in batch.task_name)


def test_defaults_are_the_builtin_suite():
    data = MultiTaskDataModule()
    assert [task.name for task in data.tasks] == list(BUILTIN_TASKS)
    assert (data.hparams.sampling, data.hparams.temperature) == ("temperature", 2.0)


def test_one_evaluation_loader_per_task_named_by_task():
    data = make()
    data.setup("fit")
    loaders = data.val_dataloader()
    assert list(loaders) == TASKS
    for task_id, name in enumerate(TASKS):
        batches = list(loaders[name])
        assert sum(len(batch.task_name) for batch in batches) == 5 == len(loaders[name].dataset)  # the eval cap
        for batch in batches:
            assert batch.task_name == [name] * len(batch.task_name)
            assert batch.task_id.tolist() == [task_id] * len(batch.task_name)
            assert (batch.choices is not None) == (name == "parity")  # choices kept for log-likelihood scoring
            assert batch.prompt_input_ids is not None and batch.targets is not None
    data.setup("test")
    assert list(data.test_dataloader()) == TASKS and list(data.predict_dataloader()) == TASKS


def test_a_short_rank_evaluates_padding_flagged_as_not_counted(monkeypatch):
    """Rank 1 of 2 with 5 examples per task evaluates examples 1 and 3, then example 0 again, so that both ranks run
    the same batches; the repeat reaches the batch flagged not counted. Predict shards exactly (no padding)."""
    data = make(eval_batch_size=4)
    data.setup("fit")
    data.setup("test")
    whole = {name: [prompt for batch in loader for prompt in batch.prompts]
             for name, loader in data.val_dataloader().items()}
    monkeypatch.setattr(sampling, "replica_and_rank", lambda num_replicas, rank: (2, 1))
    for name, loader in data.val_dataloader().items():
        batches = list(loader)
        assert len(batches) == 1, name
        assert batches[0].prompts == [whole[name][1], whole[name][3], whole[name][0]], name
        assert batches[0].counted.tolist() == [True, True, False], name
    for name, loader in data.predict_dataloader().items():  # predict too: under FSDP its forwards are collective
        assert [batch.counted.tolist() for batch in loader] == [[True, True, False]], name


def test_training_batches_mix_tasks_with_consistent_ids():
    data = make(sampling="uniform")
    data.setup("fit")
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableDataLoader) and len(loader.dataset) == 3 * 12  # the train cap
    seen = task_counts(loader)
    assert seen == {name: 12 for name in TASKS}  # uniform over equal sizes: every example once per epoch
    for batch in loader:
        assert [TASKS[task_id] for task_id in batch.task_id.tolist()] == batch.task_name
        assert type(batch) is TrainingBatch  # training batches carry no evaluation fields


@pytest.mark.parametrize("accelerator, pinned", [(CUDAAccelerator, True), (CPUAccelerator, False)])
def test_the_training_loader_pins_its_batches_on_cuda_only(monkeypatch, accelerator, pinned):
    """Lightning moves a batch to the GPU with non_blocking=True, which is asynchronous only from pinned memory, and
    pins nothing itself: the training loader did not ask, so each batch's copy could wait for the queued kernels."""
    data = make()
    data.setup("fit")
    data.trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False)
    monkeypatch.setattr(data.trainer.strategy, "accelerator", accelerator())
    assert data.train_dataloader().pin_memory is pinned


def test_pinning_a_training_batch_pins_every_tensor_it_holds(monkeypatch):
    """A DataLoader pins a batch that is neither a tensor nor a collection through its own ``pin_memory()``, and
    leaves one without it as it is: a dataclass batch stayed in pageable memory."""
    pinned = []

    def fake_pin(tensor):  # pinning needs a GPU: mark a copy instead
        copy = tensor.clone()
        pinned.append(copy)
        return copy

    data = make()
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    result = pin_memory(batch)  # what a DataLoader with pin_memory=True does to each batch
    tensors = [result.input_ids, result.attention_mask, result.labels, result.task_id, *result.pairs]
    assert type(result) is TrainingBatch and result.task_name == batch.task_name
    assert len(pinned) == len(tensors) and all(any(tensor is copy for copy in pinned) for tensor in tensors)
    assert all(torch.equal(getattr(result, name), getattr(batch, name))
               for name in ("input_ids", "attention_mask", "labels", "task_id"))
    assert all(torch.equal(mine, theirs) for mine, theirs in zip(result.pairs, batch.pairs))


class LambdaCollate(MultiTaskDataModule):
    def build_collator(self, eval_fields):
        collator = super().build_collator(eval_fields)
        return lambda examples: collator(examples)


class BoundCollate(MultiTaskDataModule):
    def build_collator(self, eval_fields):
        self.inner = super().build_collator(eval_fields)
        return self.collate

    def collate(self, examples):
        return self.inner(examples)


# (data module class, start method, the refusal or None): spawn and forkserver pickle the collate function for each
# worker, fork copies the process
WORKER_COLLATES = {
    "the library's collator, spawn": (MultiTaskDataModule, "spawn", None),
    # failed in the worker start, and Lightning's teardown raised "Please call `iter(combined_loader)` first."
    "a lambda, forkserver": (LambdaCollate, "forkserver",
                             r"LambdaCollate\.build_collator\(eval_fields=(False|True)\) returned a collate function "
                             r".*cannot receive, since forkserver pickles it for each worker: Can't pickle local "
                             r"object .*; or set num_workers=0"),
    # pickled the trainer and the model into each worker, which died ("DataLoader worker exited unexpectedly")
    "a bound method of the data module, spawn": (
        BoundCollate, "spawn", r"BoundCollate\.build_collator\(eval_fields=(False|True)\) returned .*it holds a "
                               r"BoundCollate \(the data module, the trainer or the model"),
    "a lambda, fork": (LambdaCollate, "fork", None),
}


@pytest.mark.parametrize("case", list(WORKER_COLLATES))
def test_a_collate_function_the_workers_cannot_receive_is_named_when_the_loader_is_built(monkeypatch, case):
    """A collate function of one's own that does not pickle failed inside the worker start under spawn or forkserver
    (macOS's default, and Linux's from Python 3.14), behind an error of Lightning's or a dead worker."""
    data_class, method, refusal = WORKER_COLLATES[case]
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: method)
    data = data_class(tasks=TASKS, max_length=64, batch_size=4, max_train_examples_per_task=12,
                      max_eval_examples_per_task=5, num_workers=1)
    data.tokenizer_object = tiny_tokenizer()
    data.setup("fit")
    data.trainer = Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                           enable_model_summary=False)  # what a bound method dragged along
    for loaders in (data.train_dataloader, data.val_dataloader):
        if refusal is None:
            loaders()  # built; no worker starts until it is iterated
        else:
            with pytest.raises(TypeError, match=refusal):
                loaders()


def test_mixture_follows_the_strategy_and_explicit_weights():
    data = make(sampling="weights", task_weights={"add_2digit": 2.0, "reverse_words": 0, "parity": 2.0})
    data.setup("fit")
    assert data.mixture == pytest.approx({"add_2digit": 0.5, "reverse_words": 0.0, "parity": 0.5})
    counts = task_counts(data.train_dataloader())
    assert counts == {"add_2digit": 18, "parity": 18}
    capped = make(sampling="capped", cap=6, max_train_examples_per_task=None, tasks=["add_2digit", "parity"])
    capped.setup("fit")
    assert capped.mixture == pytest.approx({"add_2digit": 0.5, "parity": 0.5})


def test_eval_tasks_are_evaluated_but_never_trained(tmp_path):
    data = make(tasks=["add_2digit", "parity"], eval_tasks=["next_term"], sampling="uniform")
    data.setup("fit")
    assert [task.name for task in data.tasks] == ["add_2digit", "parity", "next_term"]
    assert [task.name for task in data.train_tasks] == ["add_2digit", "parity"]
    assert set(task_counts(data.train_dataloader())) == {"add_2digit", "parity"}
    batch = next(iter(data.val_dataloader()["next_term"]))
    assert batch.task_id.tolist() == [2] * len(batch.task_name)


def test_max_new_tokens_is_measured_from_the_longest_target():
    data = make()
    assert data.tasks[0].max_new_tokens is None  # unknown before the tokenizer is loaded
    data.setup("fit")
    lengths = {}
    for name in TASKS:  # every evaluation row; byte tokenizer, plain format: " <target>" then </s>
        targets = [example.target for split in ("validation", "test") for example in get_task(name).examples(split)]
        lengths[name] = max(len(target) + 2 for target in targets)
    assert {task.name: task.max_new_tokens for task in data.tasks} == lengths


def test_answers_are_measured_in_chunks(monkeypatch):
    """Every evaluation answer was rendered and tokenised in one call, all held at once to keep one number (20,000
    answers of 900 tokens peaked 1.9 GB above the data): they go ENCODE_CHUNK at a time, to the same lengths."""
    expected = make(max_length=128)
    expected.setup("fit")
    monkeypatch.setattr(datamodule_module, "ENCODE_CHUNK", 4)
    sizes = record_sizes(monkeypatch, PromptEncoder, "answer_lengths")
    data = make(max_length=128)
    data.setup("fit")
    assert sizes and max(sizes) <= 4
    assert [task.max_new_tokens for task in data.tasks] == [task.max_new_tokens for task in expected.tasks]
    examples = get_task("reverse_words").examples("test", seed=0)
    assert len(examples) > 2 * 4
    # each answer's own length, in order (a predict file's target lengths are matched to their prompts by position)
    assert data._measure_answers(examples) == data._encoder.answer_lengths(examples)  # one call, whole


def test_max_new_tokens_is_the_same_in_every_stage_and_under_any_example_limit():
    """It was the longest answer among the splits loaded so far: 33 for reverse_words in fit (train rows too), 27 in
    validate, 29 after validate then test, so one checkpoint was scored under different generation budgets."""
    budgets = []
    for stages, limits in ((["fit"], (200, 20)), (["validate"], (200, 20)), (["validate", "test"], (200, 20)),
                           (["fit", "test"], (None, 3))):
        data = make(max_train_examples_per_task=limits[0], max_eval_examples_per_task=limits[1], max_length=128)
        for stage in stages:
            data.setup(stage)
        budgets.append({task.name: task.max_new_tokens for task in data.tasks})
    assert all(budget == budgets[0] for budget in budgets), budgets


def test_user_tasks_from_specs(tmp_path):
    rows = [{"country": "France", "capital": "Paris"}, {"country": "Peru", "capital": "Lima"}]
    for split in ("train", "validation"):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    spec = {"name": "capitals", "path": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation")},
            "prompt": "Capital of {country}?", "target": "{capital}"}
    data = make(tasks=["capitals", "parity"], task_specs=[spec])
    data.setup("fit")
    batch = next(iter(data.val_dataloader()["capitals"]))
    assert batch.targets == ["Paris", "Lima"]
    tokenizer = data.tokenizer
    assert tokenizer.decode(batch.prompt_input_ids[1], skip_special_tokens=True) == "Capital of Peru?\nAnswer:"
    # no test split, yet a measured generation length (its validation answers: " Paris" then </s>)
    assert next(task for task in data.tasks if task.name == "capitals").max_new_tokens == len(" Paris") + 1


def test_paths_given_as_pathlib_paths_are_read_and_recorded_as_text(tmp_path):
    """task_from_spec and predict_file take a pathlib.Path, but the data module recorded it as one among its
    hyperparameters, which every checkpoint holds: the fit was refused before training, as a hyperparameter a
    checkpoint read as data cannot give back (MALoRAModule records its adapter_path as text)."""
    from malora_lightning.module import _check_loadable_hyperparameters

    rows = [{"country": "France", "capital": "Paris"}, {"country": "Peru", "capital": "Lima"}]
    (tmp_path / "capitals.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "3+3"}\n')
    specs = [{"name": "capitals", "path": {"train": tmp_path / "capitals.jsonl",
                                           "validation": tmp_path / "capitals.jsonl"},
              "prompt": "Capital of {country}?", "target": "{capital}"},
             {"name": "one_file", "path": tmp_path / "capitals.jsonl", "prompt": "{country}", "target": "{capital}"}]
    data = make(tasks=["capitals", "one_file"], task_specs=specs, predict_file=tmp_path / "prompts.jsonl")
    _check_loadable_hyperparameters(data.hparams, "data module hyperparameter")  # what a fit checks first
    assert data.hparams.predict_file == str(tmp_path / "prompts.jsonl")
    assert data.hparams.task_specs[0]["path"] == {"train": str(tmp_path / "capitals.jsonl"),
                                                  "validation": str(tmp_path / "capitals.jsonl")}
    assert data.hparams.task_specs[1]["path"] == str(tmp_path / "capitals.jsonl")
    data.setup("fit")
    assert next(iter(data.val_dataloader()["capitals"])).targets == ["Paris", "Lima"]
    data.setup("predict")
    assert [prompt for batch in data.predict_dataloader()["<no task>"] for prompt in batch.prompts] == ["3+3"]


def test_a_generation_length_the_task_spec_gives_is_kept_not_measured(tmp_path):
    rows = [{"country": "France", "capital": "Paris"}, {"country": "Peru", "capital": "Lima"}]
    (tmp_path / "capitals.jsonl").write_text("\n".join(json.dumps(row) for row in rows))
    spec = {"name": "capitals", "path": {"train": str(tmp_path / "capitals.jsonl"),
                                         "validation": str(tmp_path / "capitals.jsonl")},
            "prompt": "Capital of {country}?", "target": "{capital}", "max_new_tokens": 3}
    data = make(tasks=["capitals", "parity"], task_specs=[spec])
    data.setup("fit")
    # the longest answer would be len(" Paris") + 1 = 7 tokens
    assert next(task for task in data.tasks if task.name == "capitals").max_new_tokens == 3


def test_a_missing_split_file_stops_fit_before_training_naming_its_task(tmp_path, monkeypatch):
    """A fit reads no test file when the task spec gives max_new_tokens: a mistyped one was found by malora test,
    after the whole fit. The built-in task beside it has no file to check."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "train.jsonl").write_text(json.dumps({"country": "France", "capital": "Paris"}))
    spec = {"name": "capitals", "path": {"train": "train.jsonl", "test": "tset.jsonl"},
            "prompt": "Capital of {country}?", "target": "{capital}", "max_new_tokens": 3}
    with pytest.raises(FileNotFoundError, match=re.escape(
            f"task 'capitals', test file tset.jsonl does not exist (a relative path is read from the current "
            f"directory, {tmp_path}): every split file a task names is checked before a fit") + ".* or in the "
            "FileSource of a task registered from Python"):
        make(tasks=["capitals", "parity"], task_specs=[spec]).setup("fit")


def test_a_split_file_under_the_home_folder_passes_the_fit_check(tmp_path, monkeypatch):
    """A task spec's `path: ~/train.jsonl` is read from the home folder: the check before a fit must look there too,
    not for a folder named `~` in the current directory."""
    home = tmp_path / "hóme dir"
    home.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "cwd")
    (home / "train.jsonl").write_text(json.dumps({"country": "France", "capital": "Paris"}))
    spec = {"name": "capitals", "path": {"train": "~/train.jsonl", "test": "~/train.jsonl"},
            "prompt": "Capital of {country}?", "target": "{capital}", "max_new_tokens": 3}
    data = make(tasks=["capitals"], task_specs=[spec])
    data.setup("fit")
    assert [name for batch in data.train_dataloader() for name in batch.task_name][:1] == ["capitals"]


@pytest.mark.parametrize("stage", ["test", "predict"])
def test_an_evaluation_needs_no_train_file(tmp_path, stage):
    """Only fit checks every split file: a test or predict run of a task whose train file is elsewhere goes on."""
    (tmp_path / "test.jsonl").write_text(json.dumps({"country": "France", "capital": "Paris"}))
    spec = {"name": "capitals", "path": {"train": str(tmp_path / "gone.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "prompt": "Capital of {country}?", "target": "{capital}", "max_new_tokens": 3}
    data = make(tasks=["parity"], eval_tasks=["capitals"], task_specs=[spec])
    data.setup(stage)
    loaders = data.test_dataloader() if stage == "test" else data.predict_dataloader()
    assert next(iter(loaders["capitals"])).targets == ["Paris"]


def test_what_needs_a_loaded_split_names_the_setup_to_call_first(tmp_path):
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "3+3"}\n')
    data = make(predict_file=str(tmp_path / "prompts.jsonl"))
    with pytest.raises(RuntimeError, match=re.escape("the mixture is known once setup('fit') has loaded the "
                                                     "training data")):
        data.mixture
    with pytest.raises(RuntimeError, match=r"the test split is not loaded: call setup\(\) with a stage that uses it"):
        data.test_dataloader()
    with pytest.raises(RuntimeError, match=re.escape("the predict file is not loaded: call setup('predict') first")):
        data.predict_dataloader()
    data.setup("fit")
    assert data.mixture == pytest.approx({name: 1 / 3 for name in TASKS})  # temperature mixing of 3 x 12 examples
    with pytest.raises(ValueError, match=re.escape("task 'parity ' has no train examples loaded; loaded: "
                                                   "['add_2digit', 'parity', 'reverse_words']")):
        data.task_dataloader("parity ")


def test_prepare_data_fetches_every_split_of_each_hub_task_once_with_the_data_seed(monkeypatch):
    """Lightning calls prepare_data on one process per node, so that the other ranks' setup reads the cache."""
    from malora_lightning.data.tasks import HubSource

    fetched = []
    monkeypatch.setattr(HubSource, "load", lambda source, split, seed: fetched.append((source.path, split, seed)))
    spec = {"name": "hubbed", "hub": "someone/data", "splits": {"train": "train", "test": "test[:10]"},
            "prompt": "{q}", "target": "{a}"}
    make(tasks=["hubbed", "parity"], task_specs=[spec], data_seed=5).prepare_data()
    assert fetched == [("someone/data", "train", 5), ("someone/data", "test", 5)]


def test_truncation_is_reported_per_task_and_kept_as_a_stat(caplog):
    data = make(max_length=48)  # "Reverse the order of the words: ..." never fits; the others always do
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        data.setup("fit")
    stats = data.truncation["train"]
    assert stats["reverse_words"].truncated == 12 and stats["add_2digit"].truncated == 0
    assert stats["reverse_words"].tokens_dropped > 0
    messages = [record.getMessage() for record in caplog.records]
    assert any("Task 'reverse_words' train: 12 of 12 prompts were cut from the left to fit max_length=48" in message
               for message in messages)
    assert not any("add_2digit" in message for message in messages)


def test_a_max_length_beyond_the_tokenizers_model_max_length_is_named():
    """A tokenizer that records its model's limit (model_max_length) was given longer sequences without a word."""
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 48
    with pytest.warns(UserWarning, match=r"max_length=64 exceeds the tokenizer's model_max_length=48"):
        make(tokenizer).setup("fit")
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 64  # as long as max_length: every position was trained
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*model_max_length")
        make(tokenizer).setup("fit")


def test_a_target_that_cannot_fit_stops_setup_with_the_task_named():
    data = make(max_length=40)  # a 32-token target, the plain format's 8 tokens ("\nAnswer:") and a prompt token
    with pytest.raises(ValueError, match=r"task 'reverse_words', train row \d+: the target takes 32 tokens but "
                                         r"max_length is 40"):
        data.setup("fit")


def test_a_test_target_that_the_chat_template_cannot_write_stops_fit_naming_its_split_and_row(tmp_path):
    """fit measures the test split's answers (the generation length) without encoding them: the error named no row."""
    rows = {"train": ["Paris", "Lima"], "validation": ["Rome"], "test": ["Oslo", " Bern"]}
    for split, capitals in rows.items():
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps({"country": "X", "capital": capital})
                                                           for capital in capitals))
    spec = {"name": "capitals", "path": {split: str(tmp_path / f"{split}.jsonl") for split in rows},
            "prompt": "Capital of {country}?", "target": "{capital}"}
    tokenizer = tiny_tokenizer(chat_template=True)
    tokenizer.chat_template = tokenizer.chat_template.replace("message['content']", "message['content'] | trim")
    with pytest.raises(TaskDataError, match=r"^task 'capitals', test row 1: the chat template trims the whitespace "
                                            r"around the answer, so the target ' Bern' cannot be trained"):
        make(tokenizer, tasks=["capitals"], task_specs=[spec]).setup("fit")


def test_long_targets_skip_leaves_out_examples_that_cannot_fit_and_says_so(caplog):
    """Instruction data with a few very long answers (code) stopped the whole setup at the first one."""
    data = make(max_length=30, long_targets="skip")  # reverse_words' targets take up to 32 tokens, with 8 of format
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        data.setup("fit")
    stats = data.truncation
    assert (stats["train"]["reverse_words"].skipped, stats["train"]["reverse_words"].longest_skipped) == (6, 32)
    assert stats["validation"]["reverse_words"].skipped == 2
    assert all(task_stats.skipped == 0 for split in stats.values() for name, task_stats in split.items()
               if name != "reverse_words")
    trained = Counter(example.task_name for example in data.train_dataloader().dataset)
    assert trained == {"add_2digit": 12, "parity": 12, "reverse_words": 6}
    assert all(len(example.input_ids) <= 30 for split in data._encoded.values() for examples in split.values()
               for example in examples)
    # the generation budget, measured over every evaluation row (a test row's answer takes 32 tokens), stops at the
    # longest answer that can train: it was 32
    assert next(task for task in data.tasks if task.name == "reverse_words").max_new_tokens == 29
    assert any("Task 'reverse_words' train: 6 of 12 examples left out (long_targets='skip'): their targets, up to "
               "32 tokens, do not fit max_length=30." in record.getMessage() for record in caplog.records)
    section = data.report_sections()[-1]  # the run report's: the scores are over the examples kept
    assert section.startswith("## Examples left out: targets longer than max_length=30 allows")
    assert section.endswith("| reverse_words | train | 6 | 12 | 32 |\n| reverse_words | validation | 2 | 5 | 25 |")
    # a task left with no example is named, not an empty sampler's "task at position 1 has 0 examples"
    with pytest.raises(TaskDataError, match=r"task 'reverse_words' train: the targets of all 12 examples chosen "
                                            r"\(up to 32 tokens\) do not fit max_length=20 with the prompt format's "
                                            r"own tokens and a prompt token, so long_targets='skip' left every one "
                                            r"out; raise max_length"):
        make(max_length=20, long_targets="skip").setup("fit")


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"long_targets": "cut"}, r"long_targets='cut' is invalid: expected one of 'error', 'skip'"),
    ({"tasks": ["add_2digit", "nope"]}, r"unknown task 'nope'; registered tasks: .*parity"),
    ({"tasks": ["capital"], "task_specs": [{"name": "capitals", "path": "c.jsonl", "prompt": "{q}", "target": "{a}"}]},
     r"unknown task 'capital'; task_specs: capitals; registered tasks: .*parity.*; a task registered from Python "
     r"\(register_task\) is known only in a process that imports the module registering it"),  # the specs went unnamed
    ({"tasks": ["parity"], "eval_tasks": ["parity"]}, r"listed more than once .*\['parity'\]"),
    ({"sampling": "balanced"}, "unknown sampling 'balanced'; valid: proportional, capped"),
    ({"task_weights": {"parity": 1.0}}, "task_weights goes with sampling='weights'"),
    ({"sampling": "weights", "task_weights": {"gsm8k": 1.0}}, r"task_weights names \['gsm8k'\], which are not"),
    ({"sampling": "weights", "task_weights": {"add_2digit": 1.0, "parity": 1.0}},  # was trained with weight 0
     r"task_weights has no weight for training tasks \['reverse_words'\]; give every task in tasks a weight"),
    ({"sampling": "weights", "task_weights": {"add_2digit": 1.0, "reverse_words": 1.0, "parity": -1.0}},
     r"task_weights\['parity'\]=-1.0 is invalid: expected a finite number >= 0"),
    ({"sampling": "weights", "task_weights": {"add_2digit": 1.0, "reverse_words": "2", "parity": 1.0}},
     r"task_weights\['reverse_words'\]='2' is invalid"),
    ({"sampling": "weights", "task_weights": {"add_2digit": 0, "reverse_words": 0.0, "parity": 0}},
     r"task_weights are all 0 .*: at least one task needs a weight > 0"),
    ({"tasks": ["mine"], "task_specs": [{"name": "mine", "path": "one.jsonl", "prompt": "{q}", "target": "{a}"},
                                        {"name": "mine", "path": "two.jsonl", "prompt": "{q}", "target": "{a}"}]},
     r"task_specs\[0\] and task_specs\[1\] are both named 'mine'; give each task spec its own name"),
    ({"batch_size": 0}, r"batch_size=0 is invalid: expected an integer >= 1"),
    ({"batch_size": "8"}, r"batch_size='8' is invalid"),
    ({"max_length": 1}, r"max_length=1 is invalid: expected an integer >= 2"),  # was refused only in setup
    ({"eval_batch_size": 0}, r"eval_batch_size=0 is invalid: expected an integer >= 1, or None"),
    ({"max_eval_examples_per_task": 0}, r"max_eval_examples_per_task=0 is invalid"),
    ({"max_train_examples_per_task": 0}, r"max_train_examples_per_task=0 is invalid"),
    ({"samples_per_epoch": 10 ** 12}, r"samples_per_epoch=1000000000000 is invalid: expected an integer >= 1 and "
                                      r"<= 100,000,000"),
    ({"sampling": "capped"}, r"sampling='capped' needs cap: K, an integer >= 1"),  # failed in train_dataloader
    ({"sampling": "proportional", "cap": 5},  # was ignored
     r"cap=5 would be ignored: only sampling 'capped' or 'temperature' uses it \(got sampling='proportional'\); "
     r"remove cap or choose one of those"),
    ({"sampling": "uniform", "cap": 5}, r"cap=5 would be ignored: .*got sampling='uniform'"),
    ({"sampling": "capped", "cap": 0}, r"cap=0 is invalid: expected an integer >= 1, or None"),
    ({"temperature": float("nan")}, r"temperature=nan is invalid: expected a finite number > 0"),
    ({"unimax_max_epochs": 0}, r"unimax_max_epochs=0 is invalid"),
    ({"tasks": []}, "at least one training task"),
    ({"tasks": "parity"}, r"tasks='parity' is invalid: expected a list of task names \(\['parity'\]\)"),  # 'p'
    ({"eval_tasks": "gsm8k"}, r"eval_tasks='gsm8k' is invalid: expected a list of task names"),
    # were taken as they came, each a seed of other data or another training order than the integer's
    ({"seed": True}, r"seed=True is invalid: expected an integer >= 0"),
    ({"seed": 2.5}, r"seed=2.5 is invalid"),
    ({"data_seed": "1"}, r"data_seed='1' is invalid: expected an integer >= 0"),
    ({"data_seed": None}, r"data_seed=None is invalid"),
    # were truthy: trust_remote_code 'false' (or None, which transformers answers from stdin) ran a folder's code
    ({"trust_remote_code": "false"}, r"trust_remote_code='false' is invalid: expected True or False"),
    ({"trust_remote_code": None}, r"trust_remote_code=None is invalid"),
    ({"use_chat_template": "false"}, r"use_chat_template='false' is invalid: expected True, False or None"),
    ({"system_prompt": 5}, r"system_prompt=5 is invalid: expected text, or None"),  # was the system turn "5"
    # an AttributeError in setup ("has no attribute startswith"); a Path would not load back from a checkpoint
    ({"tokenizer": tiny_tokenizer()}, r"tokenizer=\w+ is invalid: .* set data.tokenizer_object = tokenizer before"),
    ({"tokenizer": Path("tok")}, r"tokenizer=\w*Path is invalid: expected the name or folder of a tokenizer as text"),
])
def test_bad_arguments_are_rejected_when_built(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiTaskDataModule(**({"tasks": TASKS} | kwargs))


def test_a_task_spec_named_like_a_registered_task_replaces_it_and_says_so(caplog, tmp_path):
    spec = {"name": "parity", "path": str(tmp_path / "mine.jsonl"), "prompt": "{q}", "target": "{a}"}
    with caplog.at_level(logging.INFO, logger="malora_lightning.data.datamodule"):
        data = MultiTaskDataModule(tasks=["parity"], task_specs=[spec])
    assert data.tasks[0].source.files == {"train": str(tmp_path / "mine.jsonl")}
    assert "task_specs[0] 'parity' is used in place of the registered task of that name" in caplog.text


def test_training_a_task_without_a_train_split_is_an_error(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"q": "1+1", "a": "2"}\n')  # a fit checks that its split files exist first
    data = make(tasks=["eval_only"], task_specs=[{"name": "eval_only", "path": {"test": str(tmp_path / "x.jsonl")},
                                                  "prompt": "{q}", "target": "{a}"}])
    with pytest.raises(ValueError, match=r"tasks \['eval_only'\] have no train split; list them under eval_tasks"):
        data.setup("fit")


def test_no_tokenizer_is_a_clear_error():
    with pytest.raises(ValueError, match="needs a tokenizer: pass tokenizer=<name or path>"):
        MultiTaskDataModule(tasks=TASKS).setup("fit")


class Bracketed(PromptEncoder):
    def render(self, prompt, target):
        return f"[{prompt}] =>", f" {target}", self.tokenizer.eos_token


class BracketedData(MultiTaskDataModule):
    """A subclass changing the tokenizer source and the prompt format through the documented hooks."""

    def load_tokenizer(self):
        return tiny_tokenizer()

    def build_encoder(self, tokenizer):
        return Bracketed(tokenizer, self.hparams.max_length)


def test_subclass_hooks_change_tokenizer_and_format():
    data = BracketedData(tasks=["add_2digit"], max_train_examples_per_task=2, max_eval_examples_per_task=2)
    data.setup("fit")
    batch = next(iter(data.val_dataloader()["add_2digit"]))
    text = data.tokenizer.decode(batch.input_ids[0], skip_special_tokens=True)
    assert re.fullmatch(r"\[What is \d+ \+ \d+\?\] => \d+", text)


class TinyModel(LightningModule):
    def __init__(self, learning_rate: float = 0.1) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))


def test_lightning_cli_builds_the_datamodule_from_plain_arguments():
    cli = LightningCLI(TinyModel, MultiTaskDataModule, run=False, save_config_callback=None, args=[
        "--data.tasks=[add_2digit, parity]", "--data.eval_tasks=[next_term]", "--data.sampling=weights",
        '--data.task_weights={"add_2digit": 3, "parity": 1}', "--data.batch_size=2", "--data.tokenizer=some/tokenizer",
        "--data.max_train_examples_per_task=10"])
    data = cli.datamodule
    assert [task.name for task in data.tasks] == ["add_2digit", "parity", "next_term"]
    assert (data.batch_size, data.tokenizer_name, data.hparams.task_weights) == (
        2, "some/tokenizer", {"add_2digit": 3, "parity": 1})


def test_lightning_cli_keeps_task_spec_values_as_written(tmp_path):
    """Typed dict[str, Any], each spec value was parsed again as YAML: the inter-domain recipe's prompt "Write a
    restaurant description from these facts: {meaning_representation}" became a mapping, a quoted "2024" an int."""
    (tmp_path / "recipe.yaml").write_text(
        "data:\n  tasks: ['2024']\n  task_specs:\n    - name: '2024'\n      path: {train: a.jsonl}\n"
        "      prompt: 'Facts: {mr}'\n      target: 'yes'\n      description: 'true'\n")
    cli = LightningCLI(TinyModel, MultiTaskDataModule, run=False, save_config_callback=None,
                       args=["--config", str(tmp_path / "recipe.yaml"), "--data.tokenizer=some/tokenizer"])
    (task,) = cli.datamodule.tasks
    assert (task.name, task.formatter.prompt, task.formatter.target, task.description) == (
        "2024", "Facts: {mr}", "yes", "true")



class SteppingModel(TinyModel):
    def training_step(self, batch, batch_idx):
        return (self.weight ** 2).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.parametrize("overfit_batches", [2, 0.25])
def test_a_fit_under_overfit_batches_is_refused_naming_the_setting(tmp_path, overfit_batches):
    """Lightning's overfit_batches swaps every loader's sampler for a SequentialSampler: training read only the first
    task's examples, silently, and validation failed with "'int' object has no attribute 'index'"."""
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=2, overfit_batches=overfit_batches, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match=rf"^Trainer\(overfit_batches={overfit_batches}\) cannot run with "
                                         r"MultiTaskDataModule: .* only the first task's examples \('add_2digit'\)"):
        trainer.fit(SteppingModel(), datamodule=make())


def test_train_loader_state_after_set_epoch_counts_from_the_new_epochs_start():
    """With workers the state counts the batches the latest iterator handed out, which belong to the epoch it
    iterated: after set_epoch(1) they said position 8 of epoch 1, which no batch had reached."""
    data = make(sampling="uniform", num_workers=2)
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (0, 8)
    loader.sampler.set_epoch(1)
    assert (loader.state_dict()["epoch"], loader.state_dict()["position"]) == (1, 0)
    del iterator


@pytest.mark.parametrize("num_workers", [0, 2])
def test_train_loader_state_outside_a_trainer_counts_the_batches_handed_out(num_workers):
    """With workers the sampler has yielded the draws they fetched ahead: its own count said 24 after 2 batches of
    4, and a loader restored from that state skipped 4 of the 7 batches left."""
    data = make(sampling="uniform", num_workers=num_workers)
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator), next(iterator)
    state = loader.state_dict()
    assert (state["epoch"], state["position"]) == (0, 8)
    fresh = make(sampling="uniform", num_workers=num_workers)
    fresh.setup("fit")
    resumed = fresh.train_dataloader()
    resumed.load_state_dict(state)
    expected = [batch.input_ids.tolist() for batch in iterator]
    assert len(expected) == 7
    assert [batch.input_ids.tolist() for batch in resumed] == expected
    assert (resumed.state_dict()["epoch"], resumed.state_dict()["position"]) == (1, 0)  # the epoch is over
    if num_workers:  # a resumed loader counts from its restored position
        again = make(sampling="uniform", num_workers=num_workers)
        again.setup("fit")
        loader = again.train_dataloader()
        loader.load_state_dict(state)
        next(iter(loader))
        assert loader.state_dict()["position"] == 12



def test_a_task_with_only_train_and_test_is_validated_on_held_out_train_rows(tmp_path):
    """The most common shape of a user's data: the task is validated (not left out), on rows it never trains on."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "prompt": "{q}", "target": "{a}"}
    settings = dict(tasks=["mine"], task_specs=[spec], max_eval_examples_per_task=3, max_train_examples_per_task=None)
    data = make(**settings)
    data.setup("fit")
    held = data.held_out(data.tasks[0])
    assert len(held.validation_rows) == 4 and len(held.train_rows) == 36  # 10 % of 40, whatever the eval limit
    assert not set(held.validation_rows) & set(held.train_rows)
    assert len(data._loaded("validation")["mine"]) == 3 and len(data._loaded("train")["mine"]) == 36
    again = make(**settings)
    again.setup("fit")
    assert again.held_out(again.tasks[0]) == held  # fixed by the data seed
    assert "| mine | 4 | 3 | 36 |" in data.report_sections()[0]


@pytest.mark.parametrize(("stage", "announced"), [("fit", True), ("validate", True), ("test", False),
                                                  ("predict", False)])
def test_the_held_out_split_is_announced_where_it_is_validated_on(tmp_path, caplog, stage, announced):
    """Test and predict runs carve the held-out rows too, to size generation (`_longest_answer`); saying there
    that rows are held out from training was noise."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["mine"], task_specs=[spec], max_eval_examples_per_task=3)
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        data.setup(stage)
    messages = [record.getMessage() for record in caplog.records if "no validation split" in record.getMessage()]
    expected = ["Task 'mine' has no validation split: 4 of its 40 train rows are held out and not trained on; 3 of "
                "them are validated on."]
    assert messages == (expected if announced else [])
    assert data.held_out(data.tasks[0]) is not None and data.tasks[0].max_new_tokens is not None


def test_a_trained_prompt_is_named_by_its_first_train_row(tmp_path, caplog):
    """Train rows 1 and 3 share a prompt: the warning names the first of them."""
    train = [{"q": "0+1", "a": "1"}, {"q": "5+5", "a": "10"}, {"q": "2+1", "a": "3"}, {"q": "5+5", "a": "ten"}]
    for split, rows in (("train", train), ("validation", [{"q": "5+5", "a": "10"}])):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation")},
            "prompt": "{q}", "target": "{a}"}
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        make(tasks=["mine"], task_specs=[spec], max_train_examples_per_task=None).setup("fit")
    (message,) = trained_prompt_warnings(caplog)
    assert "(validation row 0 = train row 1)" in message


@pytest.mark.parametrize(("count", "held"), [(1, None), (2, 1), (4, 1), (40, 4)])
def test_a_small_task_without_a_validation_split_holds_out_at_least_one_row(tmp_path, count, held):
    """10 % of 2 to 4 rows rounds to 0: at least one row is held out, so the task is still validated; a task of one
    row trains on it and is not validated."""
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"q": f"{i}+1", "a": str(i + 1)}) + "\n"
                                                  for i in range(count)))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl")}, "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["mine"], task_specs=[spec], max_train_examples_per_task=None)
    split = data.held_out(data.tasks[0])
    if held is None:
        assert split is None
        return
    assert (len(split.validation_rows), len(split.train_rows)) == (held, count - held)
    assert sorted(split.validation_rows + split.train_rows) == list(range(count))


def trained_prompt_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records
            if "evaluated examples have the prompt of a training example" in record.getMessage()]


def test_evaluated_examples_with_a_trained_prompt_are_named(tmp_path, caplog):
    """A user's validation file that repeats training prompts scores recall of trained answers; nothing said so."""
    train = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(10)]
    validation = [train[2], {"q": "20+1", "a": "21"}, train[5], {"q": "30+1", "a": "31"}, train[7]]
    for split, rows in (("train", train), ("validation", validation)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {split: str(tmp_path / f"{split}.jsonl") for split in ("train", "validation")},
            "prompt": "{q}", "target": "{a}"}
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        make(tasks=["mine", "parity"], task_specs=[spec], max_train_examples_per_task=None).setup("fit")
    assert trained_prompt_warnings(caplog) == [
        "Task 'mine' validation: 3 of 5 evaluated examples have the prompt of a training example (validation row 0 = "
        "train row 2, validation row 2 = train row 5, validation row 4 = train row 7): their scores measure recall of "
        "the trained answers; remove them from one of the splits."]


def test_held_out_rows_whose_prompt_is_also_trained_are_named_and_the_builtin_suite_has_none(tmp_path, caplog):
    """Rows 20-39 repeat the prompts of rows 0-19: a held-out row is warned of when its twin is trained on."""
    rows = [{"q": f"{i % 20}+1", "a": str(i % 20 + 1)} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl")}, "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["mine"], task_specs=[spec], max_train_examples_per_task=None, max_eval_examples_per_task=None)
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        data.setup("fit")
    held = data.held_out(data.tasks[0])
    twins_trained = [row for row in held.validation_rows if (row + 20) % 40 in held.train_rows]
    assert twins_trained  # the data seed's draw holds out at least one row without its twin
    (message,) = trained_prompt_warnings(caplog)
    assert message.startswith(f"Task 'mine' held-out train: {len(twins_trained)} of 4 evaluated examples")
    assert f"held-out train row {sorted(held.validation_rows)[0]}" in message or len(twins_trained) < 4
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        make(tasks=BUILTIN_TASKS, max_train_examples_per_task=None, max_eval_examples_per_task=None).setup("fit")
    assert trained_prompt_warnings(caplog) == []


def test_setup_reads_each_task_file_once_and_a_later_setup_reads_it_again(tmp_path, monkeypatch):
    """A task validated on held-out train rows had its train file read and parsed four times in one setup (its row
    count, its train rows, its validation rows and their answer lengths): about a tenth of the setup's time."""
    import malora_lightning.data.tasks as tasks

    parsed = Counter()
    json_rows = tasks._json_rows
    monkeypatch.setattr(tasks, "_json_rows", lambda text, path: parsed.update([path.name]) or json_rows(text, path))
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["mine"], task_specs=[spec], max_train_examples_per_task=None)
    data.setup("fit")
    assert parsed == {"train.jsonl": 1, "test.jsonl": 1}  # the test split sets the generation budget
    assert len(data._loaded("train")["mine"]) == 36 and len(data._loaded("validation")["mine"]) == 4
    (tmp_path / "test.jsonl").write_text(json.dumps({"q": "x", "a": "a much longer answer"}) + "\n")
    data.setup("test")  # a later stage reads the files again: an edited file is seen
    assert parsed == {"train.jsonl": 1, "test.jsonl": 2}
    assert [example.target for example in data._loaded("test")["mine"]] == ["a much longer answer"]


def test_max_val_examples_per_task_caps_validation_and_leaves_the_test_splits_whole(tmp_path):
    """A fit validates on a sample and tests on everything: max_eval_examples_per_task capped both, so a recipe whose
    held-out validation rows were tens of thousands could only shrink them by sampling its test splits too."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    for split in ("train", "test"):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
            "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["mine", "parity"], task_specs=[spec], max_train_examples_per_task=None,
                max_eval_examples_per_task=None, max_val_examples_per_task=3)
    data.setup("fit")
    data.setup("test")
    validation, test = data._loaded("validation"), data._loaded("test")
    assert {name: len(examples) for name, examples in validation.items()} == {"mine": 3, "parity": 3}
    assert len(test["mine"]) == 40 and len(test["parity"]) == len(get_task("parity").examples("test"))
    assert {example.row for example in validation["mine"]} < set(data.held_out(data.tasks[0]).validation_rows)
    assert "| mine | 4 | 3 | 36 |" in data.report_sections()[0]
    both = make(tasks=["parity"], max_eval_examples_per_task=5, max_val_examples_per_task=2)
    both.setup("validate")
    both.setup("test")
    assert len(both._loaded("validation")["parity"]) == 2 and len(both._loaded("test")["parity"]) == 5
    with pytest.raises(ValueError, match=r"max_val_examples_per_task=0 is invalid"):
        make(max_val_examples_per_task=0)


def test_a_later_validate_with_another_eval_limit_never_validates_on_trained_rows(tmp_path):
    """The held-out rows do not depend on max_eval_examples_per_task: a fit capped at 2 validation rows and a
    validate without a cap split the train rows at the same place (the cap once moved it onto trained rows)."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl")}, "prompt": "{q}", "target": "{a}"}
    fit = make(tasks=["mine"], task_specs=[spec], max_eval_examples_per_task=2, max_train_examples_per_task=None)
    fit.setup("fit")
    validate = make(tasks=["mine"], task_specs=[spec], max_eval_examples_per_task=None)
    validate.setup("validate")
    trained = {example.row for example in fit._loaded("train")["mine"]}
    capped = {example.row for example in fit._loaded("validation")["mine"]}
    validated = validate._loaded("validation")["mine"]
    uncapped = {example.row for example in validated}
    assert not trained & uncapped and capped < uncapped
    assert len(trained) == 36 and len(capped) == 2 and len(uncapped) == 4 and trained | uncapped == set(range(40))
    assert {rows[row]["q"] for row in uncapped} == {example.prompt for example in validated}


def test_a_task_loaders_subset_is_a_seeded_sample_of_the_whole_split():
    """It took the split's first examples: from a file sorted by topic or length, malora-task-export profiled a
    task's routing on one end of it."""
    data = make()
    data.setup("fit")

    def examples(**limit) -> list[list[int]]:  # each example's tokens, its padding dropped
        return [ids[mask.bool()].tolist() for batch in data.task_dataloader("parity", **limit)
                for ids, mask in zip(batch.input_ids, batch.attention_mask)]

    everything, subset = examples(), examples(max_examples=5)
    assert len(everything) > 10 and len(subset) == 5 and subset == examples(max_examples=5)
    positions = [everything.index(row) for row in subset]
    assert positions == sorted(positions) and positions != list(range(5))


@pytest.mark.parametrize("max_examples", [0, -1, 2.5, "3", True])
def test_a_task_loaders_bad_max_examples_is_named(max_examples):
    """0 gave an empty loader without a word, -1 random.sample's 'Sample larger than population or is negative',
    2.5 and '3' TypeErrors naming no argument, True one example."""
    data = make()
    data.setup("fit")
    message = f"MultiTaskDataModule.task_dataloader max_examples={max_examples!r} is invalid: expected an integer " \
              ">= 1, or None"
    with pytest.raises(ValueError, match=re.escape(message)):
        data.task_dataloader("parity", max_examples=max_examples)


def test_starting_a_loader_leaves_the_global_random_state_alone():
    """A DataLoader without a generator of its own draws its workers' base seed from torch's global generator, which
    dropout draws from: the training loader's draw at each epoch start made a resume from an end-of-epoch
    checkpoint differ from the uninterrupted run."""
    data = make()
    data.setup("fit")
    data.setup("test")
    loaders = [data.train_dataloader(), *data.val_dataloader().values(), *data.test_dataloader().values(),
               data.task_dataloader("parity")]
    state = torch.get_rng_state()
    for loader in loaders:
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize(("stage", "split", "advice"), [
    ("test", "test", "list a task that has one$"),
    ("predict", "test", "or run predict with predict_file=<your prompts>"),
    ("validate", "validation", "validated on rows held out from its train split when it has two or more"),
])
def test_evaluating_with_no_task_that_has_the_split_is_refused_before_anything_loads(tmp_path, stage, split, advice):
    """Lightning loaded the model, ran nothing, wrote no metrics or predictions and exited 0."""
    (tmp_path / "one.jsonl").write_text('{"q": "1+1", "a": "2"}\n')  # one row: too few to hold any out to validate
    (tmp_path / "eval.jsonl").write_text('{"q": "2+2", "a": "4"}\n')
    specs = [{"name": "one", "path": str(tmp_path / "one.jsonl"), "prompt": "{q}", "target": "{a}"},
             {"name": "other", "path": {"validation" if split == "test" else "test": str(tmp_path / "eval.jsonl")},
              "prompt": "{q}", "target": "{a}"}]
    data = MultiTaskDataModule(tasks=["one"], eval_tasks=["other"], task_specs=specs)  # no tokenizer: not reached
    provided = f"one: train; other: {'validation' if split == 'test' else 'test'}"
    with pytest.raises(TaskDataError, match=rf"^{stage} has nothing to evaluate: no task has a {split} split \(tasks "
                                            rf"and the splits they provide: {provided}\); give a task a {split} file"):
        data.setup(stage)
    with pytest.raises(TaskDataError, match=advice):
        data.setup(stage)


def test_fit_without_validation_rows_and_predict_from_a_file_need_no_evaluation_split(tmp_path):
    """fit still trains (and says which tasks are not validated); a predict file brings its own prompts."""
    (tmp_path / "one.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "3+3"}\n')
    spec = {"name": "one", "path": str(tmp_path / "one.jsonl"), "prompt": "{q}", "target": "{a}"}
    data = make(tasks=["one"], task_specs=[spec], predict_file=str(tmp_path / "prompts.jsonl"))
    data.setup("fit")
    assert list(data._loaded("train")) == ["one"] and data._loaded("validation") == {}
    data.setup("predict")
    assert [len(loader) for loader in data.predict_dataloader().values()] == [1]


def test_task_specs_that_no_task_list_names_are_warned_of(caplog, tmp_path):
    """A recipe with task_specs but without `tasks` trained the built-in suite, and its specs were left out without a
    word."""
    spec = {"name": "capitals", "path": str(tmp_path / "capitals.jsonl"), "prompt": "{q}", "target": "{a}"}
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        data = MultiTaskDataModule(task_specs=[spec])
    assert [task.name for task in data.tasks] == list(BUILTIN_TASKS)
    assert "task_specs ['capitals'] are named in neither tasks nor eval_tasks, so this run does not use them" \
        in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="malora_lightning.data.datamodule"):
        MultiTaskDataModule(tasks=["parity"], eval_tasks=["capitals"], task_specs=[spec])
    assert "task_specs" not in caplog.text


def test_evaluating_a_subset_of_a_split_says_how_many_rows_of_how_many(caplog):
    """`max_eval_examples_per_task` (32 in the default recipe) scored `malora test` on a subset of a user's test file,
    and neither the log nor the report said so."""
    with caplog.at_level(logging.INFO, logger="malora_lightning.data.datamodule"):
        make(max_val_examples_per_task=100).setup("fit")  # all 100 validation rows: nothing to say
        make(tasks=["parity"]).setup("test")
    messages = [record.getMessage() for record in caplog.records if "random subset" in record.getMessage()]
    assert messages == ["train: at most 12 examples per task (max_train_examples_per_task), a random subset fixed by "
                        "data_seed: add_2digit 12 of 2000, reverse_words 12 of 2000, parity 12 of 2000",
                        "test: at most 5 examples per task (max_eval_examples_per_task), a random subset fixed by "
                        "data_seed: parity 5 of 200"]


def test_capping_a_task_validated_on_held_out_train_rows_says_how_many_rows_of_how_many(tmp_path, caplog):
    """A task without a validation split: the caps sample the train rows left after the held-out ones and the
    held-out rows, and the log named neither cut (only the tasks with splits of their own)."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl")}, "prompt": "{q}", "target": "{a}"}
    with caplog.at_level(logging.INFO, logger="malora_lightning.data.datamodule"):
        make(tasks=["mine", "parity"], task_specs=[spec], max_val_examples_per_task=3).setup("fit")
    messages = [record.getMessage() for record in caplog.records if "random subset" in record.getMessage()]
    assert messages == ["train: at most 12 examples per task (max_train_examples_per_task), a random subset fixed by "
                        "data_seed: mine 12 of 36, parity 12 of 2000",
                        "validation: at most 3 examples per task (max_val_examples_per_task), a random subset fixed "
                        "by data_seed: mine 3 of 4, parity 3 of 100"]
