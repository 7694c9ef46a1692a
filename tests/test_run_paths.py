"""`run_paths.refuse_on_any_rank` / `refuse_on_every_rank`: which rank's check runs, and which refusal every rank
raises; and every path setting read as the user typed it (`values.user_path`)."""

import json
import os
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from malora_lightning.run_paths import refuse_on_every_rank
from tests.helpers import run_ranks
from tests.ranks import refusals


def test_refuse_on_every_rank_runs_the_check_on_rank_zero_only():
    """Rank zero writes the run's files: another rank's view of them (another node's disk) must not decide."""
    called = []

    def check() -> None:
        called.append(True)
        raise FileExistsError("taken")

    refuse_on_every_rank(SimpleNamespace(world_size=1, global_rank=1, is_global_zero=False), check)
    assert called == []
    with pytest.raises(FileExistsError, match="taken"):
        refuse_on_every_rank(SimpleNamespace(world_size=1, global_rank=0, is_global_zero=True), check)


@pytest.mark.slow
def test_every_rank_raises_the_lowest_refusing_ranks_error(tmp_path):
    run_ranks(refusals.run, str(tmp_path))
    raised = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert raised[0] == raised[1] | {"checked": raised[0]["checked"]}
    assert raised[0]["both refuse"] == ["FileExistsError", "refused by rank 0"]
    assert raised[0]["rank one refuses"] == ["PermissionError", "refused by rank 1"]
    assert raised[0]["none refuses"] is None
    assert raised[0]["every rank, rank zero's check"] == ["FileExistsError", "refused by rank 0"]
    assert raised[0]["every rank, rank one would refuse"] is None
    assert raised[0]["checked"] == [0] * 5 and raised[1]["checked"] == [1] * 3  # refuse_on_every_rank: rank zero's


def _task_file(home: Path) -> Any:
    from malora_lightning.data import task_from_spec

    (home / "d.jsonl").write_text(json.dumps({"q": "2+2", "a": "4"}) + "\n", encoding="utf-8")
    return len(task_from_spec({"name": "mine", "path": "~/d.jsonl", "prompt": "{q}", "target": "{a}"})
               .examples("train"))


def _predict_file(home: Path) -> Any:
    from malora_lightning.data.prompts import predict_source, read_prompts

    (home / "p.jsonl").write_text(json.dumps({"prompt": "hi"}) + "\n", encoding="utf-8")
    return [prompt.prompt for prompt in read_prompts(predict_source("~/p.jsonl"), [])]


def _task_specs_yaml(home: Path) -> Any:
    from malora_lightning.data.tasks import tasks_from_yaml

    (home / "d.jsonl").write_text(json.dumps({"q": "2+2", "a": "4"}) + "\n", encoding="utf-8")
    (home / "tasks.yaml").write_text("- {name: mine, path: ~/d.jsonl, prompt: '{q}', target: '{a}'}\n",
                                     encoding="utf-8")
    return [len(task.examples("train")) for task in tasks_from_yaml("~/tasks.yaml")]


def _baseline_scores(home: Path) -> Any:
    from malora_lightning.callbacks import SeesawTracker

    (home / "b.json").write_text('{"mine": 0.5}', encoding="utf-8")
    return SeesawTracker(baseline_scores="~/b.json").baseline


def _hparams_file(home: Path) -> Any:
    from malora_lightning.checkpoints import read_hparams_file

    (home / "hparams.yaml").write_text("learning_rate: 0.01\n", encoding="utf-8")
    return read_hparams_file("~/hparams.yaml")


def _checkpoint(home: Path) -> Any:
    from malora_lightning.checkpoints import check_checkpoint_file, read_checkpoint

    torch.save({"step": 3}, home / "last.ckpt")
    check_checkpoint_file("~/last.ckpt")
    return read_checkpoint("~/last.ckpt")


def _base_folder(home: Path) -> Path:
    from tests.helpers import tiny_model, tiny_tokenizer

    tiny_model("llama").save_pretrained(home / "base")
    tiny_tokenizer(chat_template=True).save_pretrained(home / "base")
    return home / "base"


def _model_name_or_path(home: Path) -> Any:
    from malora_lightning import MALoRAModule, load_base_model

    base = _base_folder(home)
    module = MALoRAModule(model_name_or_path="~/base", quantization=None)
    load_base_model("~/base", quantization=None)  # transformers took it for a hub id: "Repo id must be in the form"
    return module.settings.model_name_or_path == module.hparams.model_name_or_path == str(base)


def _tokenizer(home: Path) -> Any:
    from malora_lightning import MultiTaskDataModule

    _base_folder(home)
    return MultiTaskDataModule(tokenizer="~/base").load_tokenizer().eos_token


def _adapter_folder(home: Path) -> Any:
    from malora_lightning import AdapterConfig, MALoRAModule, inject_adapters, load_adapters, save_adapters
    from tests.helpers import tiny_model

    base = _base_folder(home)
    save_adapters(inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2)), "~/adapter",
                  base_model="~/base")
    load_adapters(tiny_model("llama"), "~/adapter")
    module = MALoRAModule(model_name_or_path="~/base", quantization=None, adapter_path="~/adapter")
    recorded = json.loads((home / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    return module.settings.adapter_path == module.hparams.adapter_path == str(home / "adapter") \
        and recorded == str(base)


# what each path setting reads from a path typed with a leading `~`: Lightning reads `default_root_dir`, a
# ModelCheckpoint's `dirpath` and a `ckpt_path` so (fsspec); each of ours looked for a folder named `~` in the
# current directory ("does not exist"), even where Lightning would have read the file (a checkpoint, an hparams_file)
USER_PATH_CASES: dict[str, tuple[Callable[[Path], Any], Any]] = {  # name: (read through `~`, what it reads)
    "task spec path": (_task_file, 1),
    "predict_file": (_predict_file, ["hi"]),
    "tasks_from_yaml file and its task files": (_task_specs_yaml, [1]),
    "SeesawTracker baseline_scores": (_baseline_scores, {"mine": 0.5}),
    "load_from_checkpoint hparams_file": (_hparams_file, {"learning_rate": 0.01}),
    "ckpt_path": (_checkpoint, {"step": 3}),
    "model_name_or_path": (_model_name_or_path, True),
    "data tokenizer": (_tokenizer, "<|im_end|>"),
    "adapter folder: save_adapters, load_adapters, adapter_path": (_adapter_folder, True),
}


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A home folder with a space and a non-ASCII letter in its name, and a current directory beside it."""
    home = tmp_path / "hóme dir"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("USERPROFILE", str(home))  # Windows' `~`
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    return home


@pytest.mark.parametrize("case", USER_PATH_CASES, ids=list(USER_PATH_CASES))
def test_a_leading_tilde_in_a_path_setting_is_the_home_folder(home, case):
    read, expected = USER_PATH_CASES[case]
    assert read(home) == expected
    assert not Path("~").exists()


def test_user_path_expands_only_a_leading_tilde(home):
    from malora_lightning.values import user_path

    assert user_path("~/runs/a") == os.path.join(str(home), "runs", "a")
    assert user_path(Path("~")) == str(home)
    for unchanged in ("runs/~/a", "data.jsonl", "/abs/x", "offline:SmolLM2-135M-Instruct", "org/model"):
        assert user_path(unchanged) == unchanged


def test_a_subclass_records_its_own_adapter_path_under_the_home_folder_as_that_folder(home):
    """The hyperparameters of a subclass are its own `__init__`'s arguments, as it was called (`~/adapter`):
    load_from_checkpoint rebuilt it with the folder `~/adapter` under the directory it ran from."""
    from malora_lightning import AdapterConfig, MALoRAModule, inject_adapters, save_adapters
    from tests.helpers import tiny_model

    class Mine(MALoRAModule):
        def __init__(self, adapter_path: str | None = None, **kwargs: Any) -> None:
            super().__init__(adapter_path=adapter_path, **kwargs)

    _base_folder(home)
    save_adapters(inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2)), home / "adapter",
                  base_model=str(home / "base"))
    module = Mine(adapter_path="~/adapter", model_name_or_path="~/base", quantization=None)
    assert module.hparams.adapter_path == str(home / "adapter")


def test_a_checkpoint_under_the_home_folder_is_checked_before_lightning_reads_it(home):
    """A cut-off ~/last.ckpt reached torch, whose error names no file: the check before Lightning's read (which
    expands `~`) looked for a folder named `~` in the current directory and, finding none, let it through."""
    from malora_lightning.checkpoints import CheckedCheckpointIO

    torch.save({"step": 3}, home / "last.ckpt")
    assert CheckedCheckpointIO().load_checkpoint("~/last.ckpt") == {"step": 3}
    whole = (home / "last.ckpt").read_bytes()
    (home / "last.ckpt").write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match=r"checkpoint .*hóme dir/last\.ckpt is not a complete checkpoint file"):
        CheckedCheckpointIO().load_checkpoint("~/last.ckpt")


def test_a_predict_file_under_the_home_folder_that_is_a_folder_is_named_so(home):
    """It was called missing, with a note that a relative path is read from the current directory."""
    from malora_lightning.data.prompts import predict_source, read_prompts

    (home / "prompts.jsonl").mkdir()
    with pytest.raises(FileNotFoundError, match=r"^predict_file ~/prompts\.jsonl is a folder, not a file; expected"):
        read_prompts(predict_source("~/prompts.jsonl"), [])


def test_the_run_folder_of_a_logger_under_the_home_folder_without_checkpoints_is_its_log_folder(home):
    """Without a checkpoint folder the run's files (predictions.jsonl, the report) go to the logger's folder, which
    Lightning writes in the home folder (fsspec expands `~`): they went to a folder named `~` in the current
    directory."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    from malora_lightning.run_paths import run_directory

    trainer = L.Trainer(logger=CSVLogger("~/runs"), enable_checkpointing=False, enable_progress_bar=False)
    assert run_directory(trainer) == home / "runs" / "lightning_logs" / "version_0"


def test_a_fit_resumed_from_a_checkpoint_under_the_home_folder_keeps_that_checkpoint(home, tiny_model_dir):
    """ModelCheckpoint keeps the checkpoint a fit resumed from only where that path equals its own, expanded one:
    `--ckpt_path ~/ckpt/epoch=0-step=2.ckpt` resumed into the same folder (save_top_k=1) removed it at the next save."""
    from malora_lightning.cli import main

    settings = [f"--model.model_name_or_path={tiny_model_dir}", "--model.quantization=null",
                "--model.adapter.rank=2", "--model.adapter.shared_rank=4", "--model.adapter.num_experts=4",
                "--data.tasks=[parity]", "--data.max_train_examples_per_task=8", "--data.max_eval_examples_per_task=2",
                "--data.batch_size=2", "--data.eval_batch_size=2", "--trainer.accelerator=cpu",
                "--trainer.limit_val_batches=0", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
                f"--trainer.default_root_dir={home}", "--trainer.callbacks+=ModelCheckpoint",
                "--trainer.callbacks.dirpath=~/ckpt", "--trainer.callbacks.every_n_train_steps=2"]
    main(["fit", *settings, "--trainer.max_steps=2"])
    main(["fit", *settings, "--trainer.max_steps=4", "--ckpt_path=~/ckpt/epoch=0-step=2.ckpt"])
    assert sorted(path.name for path in (home / "ckpt").glob("*.ckpt")) == ["epoch=0-step=2.ckpt",
                                                                            "epoch=0-step=4.ckpt"]
