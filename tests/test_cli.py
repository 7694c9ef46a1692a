"""The `malora` LightningCLI: recipes parse, a tiny fit runs end to end, bad input fails early and clearly."""

import csv
import functools
import inspect
import json
import logging
import os
import re
import runpy
import signal
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import lightning as L
import yaml
from lightning.pytorch.callbacks import Callback, OnExceptionCheckpoint
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.strategies import SingleDeviceStrategy

import malora_lightning.cli as cli_file
import malora_lightning.module as module_file
from malora_lightning.cli import (CONFIG_HEADER, CheckedSaveConfigCallback, MALoRAArgumentParser, MALoRACLI,
                                  claim_version_folder, dump_with_unset, main, remove_empty_folders, run_command,
                                  version_folder)
from malora_lightning.data import BUILTIN_TASKS, CONFLICT_TASKS, NEUTRAL_TASKS, MultiTaskDataModule
from malora_lightning.module import MALoRAModule
from tests.recipe_stacks import DOCUMENTED_RUNS, RECIPE_DIR, ROOT, stack_files

# The LLaMA-2-7B recipes as single files, before they became stacks of fragments (commit dd92526)
FORMER_RECIPES = {path.stem: path for path in (ROOT / "tests/fixtures/llama2-7b-recipes-dd92526").glob("*.yaml")}


class ParseOnlyCLI(MALoRACLI):
    """Validates a config exactly as `malora fit` would, without building the trainer, model or data."""

    def instantiate_classes(self) -> None:
        pass


def parse(args: list[str]) -> ParseOnlyCLI:
    return ParseOnlyCLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False, args=args)


def test_there_are_recipes_for_the_default_job_and_the_paper():
    assert {"default", "default-gpu"} <= set(DOCUMENTED_RUNS)
    for setting in ("commonsense", "inter-domain"):
        for method in ("malora", "molora", "lora"):
            assert f"{setting}-{method}" in DOCUMENTED_RUNS, (setting, method)


def test_every_recipe_file_is_used_by_a_documented_run():
    """A fragment no documented command stacks would never be parsed by the tests below."""
    used = {Path(path).resolve() for args in DOCUMENTED_RUNS.values() for path in stack_files(args)}
    assert {path.resolve() for path in RECIPE_DIR.rglob("*.yaml")} <= used


@pytest.mark.parametrize("run", sorted(DOCUMENTED_RUNS))
def test_every_recipe_parses(run):
    cli = parse(DOCUMENTED_RUNS[run])
    config = cli.config
    assert config.model.model_name_or_path
    assert config.model.adapter.method in ("lora", "molora", "malora")
    assert config.data.tokenizer is None  # unset: the model's (a recipe names the model once)


def test_an_unset_tokenizer_is_the_models_and_stays_unset_in_the_saved_config():
    """config.yaml recorded the model's path as data.tokenizer (the value filled in for the data module), so a rerun
    of it with another --model.model_name_or_path kept the first run's tokenizer."""
    def tokenizers(args: list[str]) -> tuple[str | None, str | None]:
        cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                        args=["--config", "recipes/default.yaml", *args])
        return cli.datamodule.tokenizer_name, cli.config.data.tokenizer

    assert tokenizers([]) == ("offline:SmolLM2-135M-Instruct", None)
    assert tokenizers(["--model.model_name_or_path=other/model"]) == ("other/model", None)
    assert tokenizers(["--data.tokenizer=my-tokenizer"]) == ("my-tokenizer", "my-tokenizer")


def test_a_tokenizer_given_in_a_recipe_or_a_flag_is_the_one_used(tmp_path):
    """data.tokenizer was the target of a link from the model: a recipe's own was dropped without a word, and the
    flag failed with "str | None is not callable"."""
    recipe = tmp_path / "tokenizer.yaml"
    recipe.write_text("data:\n  tokenizer: my-tokenizer\n")
    assert parse(["--config", "recipes/default.yaml", "--config", str(recipe)]).config.data.tokenizer == "my-tokenizer"
    assert parse(["--config", "recipes/default.yaml", "--data.tokenizer=other"]).config.data.tokenizer == "other"


def flat(tree, prefix: str = "") -> dict:
    """A parsed config as {"model.adapter.rank": 12, ...}, so two configs' differences are named key by key."""
    if isinstance(tree, dict):
        return {key: value for name, child in tree.items() for key, value in flat(child, f"{prefix}{name}.").items()}
    return {prefix.rstrip("."): tree}


def test_the_former_single_file_recipes_are_all_documented_runs():
    assert set(FORMER_RECIPES) == set(DOCUMENTED_RUNS) - {"default", "default-gpu", "default-conflict",
                                                          "default-neutral"}


@pytest.mark.parametrize(("run", "group"), [("default-conflict", CONFLICT_TASKS), ("default-neutral", NEUTRAL_TASKS)])
def test_the_task_group_fragments_add_their_group_to_the_default_job(run, group):
    config = parse(DOCUMENTED_RUNS[run]).config
    assert config.data.tasks == [*BUILTIN_TASKS, *group]
    default = flat(parse(DOCUMENTED_RUNS["default"]).config.as_dict())
    differences = {key for key, value in flat(config.as_dict()).items() if default.get(key, KeyError) != value}
    assert differences == {"config", "data.tasks", "trainer.default_root_dir"}


# settings changed on purpose since the fixtures: both FSDP strategies failed when they wrapped the model (FSDP1 cannot
# flatten a decoder layer's bf16 base with its float32 adapters), so fsdp.yaml shards with FSDP2 and fsdp-qlora.yaml
# makes the 4-bit linears FSDP1 units of their own (tests/test_fsdp_units.py); and both write checkpoint files, as
# sharded ones cannot be resumed without the frozen base (tests/test_distributed.py). The inter-domain runs validate
# 1,024 examples a task: since their train-only tasks validate on held-out train rows, each validation generated
# answers for about 67,000 of them. They also leave out the examples whose target does not fit 1,024 tokens
# (Magicoder's longest code answers), which stopped the setup, and read E2E NLG from the Hub's Parquet conversion
# (its main revision ships a loading script, which datasets >= 4 refuse).
CHANGED_SINCE_THE_FIXTURES = {"multi-gpu-fsdp-malora": ("trainer.strategy.",),
                              "multi-gpu-fsdp-qlora-malora": ("trainer.strategy.",),
                              **dict.fromkeys(["inter-domain-malora", "inter-domain-malora-small", "inter-domain-molora",
                                               "inter-domain-lora"],
                                              ("data.max_val_examples_per_task", "data.long_targets",
                                               "data.task_specs"))}


@pytest.mark.parametrize("name", sorted(FORMER_RECIPES))
def test_a_stacked_run_has_exactly_the_settings_of_the_recipe_it_replaced(name):
    """Each LLaMA-2-7B run used to be one file (kept as a fixture, as of commit dd92526); its documented stack of
    fragments and flags must parse to the same value for every key, the run folder included, except the settings
    changed on purpose since (`CHANGED_SINCE_THE_FIXTURES`)."""
    before = flat(parse(["--config", str(FORMER_RECIPES[name])]).config.as_dict())
    after = flat(parse(DOCUMENTED_RUNS[name]).config.as_dict())
    before.pop("config"), after.pop("config")  # the list of files read, not a setting
    changed = CHANGED_SINCE_THE_FIXTURES.get(name)
    differences = {key: (before.get(key), after.get(key)) for key in before.keys() | after.keys()
                   if before.get(key, KeyError) != after.get(key, KeyError)
                   and (changed is None or not key.startswith(changed))}
    assert not differences, differences
    assert after["trainer.default_root_dir"] == f"runs/llama2-7b/{name}"


def test_the_inter_domain_runs_leave_out_targets_that_cannot_fit_and_read_e2e_from_parquet():
    """Magicoder's longest code answers do not fit 1,024 tokens: one such row stopped the setup. E2E NLG's main
    revision ships a loading script, which the datasets versions we accept refuse."""
    runs = [name for name in DOCUMENTED_RUNS if name.startswith("inter-domain")]
    assert len(runs) == 4
    for name in runs:
        config = flat(parse(DOCUMENTED_RUNS[name]).config.as_dict())
        assert (config["data.long_targets"], config["data.max_length"]) == ("skip", 1024), name
        e2e = next(spec for spec in config["data.task_specs"] if spec["name"] == "e2e_nlg")
        assert (e2e["hub"], e2e["revision"]) == ("tuetschek/e2e_nlg", "refs/convert/parquet"), name


def test_default_recipe_is_the_embedded_offline_job():
    config = parse(["--config", "recipes/default.yaml"]).config
    assert config.model.model_name_or_path == "offline:SmolLM2-135M-Instruct"
    assert config.model.quantization == "nf4" and config.model.adapter.method == "malora"
    assert config.trainer.accelerator == "cpu" and config.trainer.num_sanity_val_steps == -1
    for key in ("per_task_metrics", "seesaw", "routing_stats", "run_report", "predictions"):
        assert config[key] is not None and config[key].class_path.startswith("malora_lightning.callbacks.")


def callback_types(args: list[str]) -> set[str]:
    cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    args=["--config", "recipes/default.yaml", *args])
    return {type(callback).__name__ for callback in cli.trainer.callbacks}


def test_default_callbacks_are_on_and_each_can_be_switched_off_or_tuned():
    assert {"PerTaskMetrics", "SeesawTracker", "RoutingStats", "RunReport", "PredictionWriter",
            "ModelCheckpoint"} <= callback_types([])
    remaining = callback_types(["--routing_stats", "null", "--seesaw", "null"])
    assert "RoutingStats" not in remaining and "SeesawTracker" not in remaining and "PerTaskMetrics" in remaining
    cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    args=["--config", "recipes/default.yaml", "--seesaw.tolerance", "0.05"])
    seesaw = next(c for c in cli.trainer.callbacks if type(c).__name__ == "SeesawTracker")
    assert seesaw.tolerance == 0.05


def test_fit_through_the_cli_on_a_tiny_model(tiny_model_dir, tmp_path, capsys, caplog, monkeypatch):
    for variable in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):  # output to a file (capsys), with Rich's own width
        monkeypatch.delenv(variable, raising=False)
    main([
        "fit", "--config", "recipes/default.yaml",
        f"--model.model_name_or_path={tiny_model_dir}", "--model.quantization=null",
        "--model.adapter.rank=2", "--model.adapter.shared_rank=4", "--model.adapter.num_experts=4",
        "--data.tasks=[parity, add_2digit]", "--data.max_train_examples_per_task=16",
        "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=2",
        "--trainer.max_steps=2", "--trainer.val_check_interval=2", "--trainer.log_every_n_steps=1",
        f"--trainer.default_root_dir={tmp_path}",
        # Lightning picks TensorBoard where it is installed; this test reads the CSV logger's metrics.csv
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ])
    version = next((tmp_path / "lightning_logs").iterdir())
    printed, logged = capsys.readouterr(), caplog.text  # our INFO lines go to pytest's handlers, not ours
    assert f"Exported adapters to {version / 'checkpoints' / 'adapter'}" in logged
    # PEFT's parameter line, not Lightning's summary (4-bit weights counted by their packed bytes, FLOPs 0)
    assert "trainable params: " in logged and "Total FLOPs" not in printed.out + printed.err + logged
    saved = yaml.safe_load((version / "config.yaml").read_text())
    assert saved["model"]["model_name_or_path"] == str(tiny_model_dir)
    assert saved["data"]["tokenizer"] is None  # the model's, as --print_config shows it: a rerun follows the model
    checkpoints = version / "checkpoints"
    assert (checkpoints / "last.ckpt").is_file()
    assert (checkpoints / "adapter" / "adapter_config.json").is_file()
    report = (checkpoints / "report.md").read_text()
    assert "| parity |" in report and "| add_2digit |" in report
    metrics = (version / "metrics.csv").read_text().splitlines()
    assert "train/loss" in metrics[0] and "val/parity/acc" in metrics[0]

    # the exported folder, evaluated from the CLI, scores what the fit's last evaluation scored
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["validate", "--config", "recipes/default.yaml", f"--model.model_name_or_path={tiny_model_dir}",
              "--model.quantization=null", f"--model.adapter_path={checkpoints / 'adapter'}",
              "--data.tasks=[parity, add_2digit]", "--data.max_train_examples_per_task=16",
              "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=2",
              f"--trainer.default_root_dir={tmp_path}", "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
              f"--trainer.logger.save_dir={tmp_path}"])
    # it prints and saves the run report, not Lightning's table of a column of the same values per task's dataloader
    printed = capsys.readouterr()
    heading = "## Validation accuracy (%) per task, outside training (trainer.validate)"
    validate_report = tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "report_validate.md"
    assert heading in caplog.text and f"Report saved to {validate_report}" in caplog.text
    assert "Validate metric" not in printed.out + printed.err and "DataLoader 1" not in printed.out + printed.err
    assert heading in validate_report.read_text() and "| parity |" in validate_report.read_text()
    fitted, validated = (list(csv.DictReader((v / "metrics.csv").open()))
                         for v in sorted((tmp_path / "lightning_logs").iterdir()))
    last_fit = [row for row in fitted if row.get("val/macro_acc")][-1]
    assert float(validated[-1]["val/macro_acc"]) == pytest.approx(float(last_fit["val/macro_acc"]))
    assert float(validated[-1]["val/parity/loss"]) == pytest.approx(float(last_fit["val/parity/loss"]), rel=1e-5)

    # both an adapter folder and a checkpoint: the checkpoint's tensors are scored, and the run says so
    caplog.clear()
    with caplog.at_level(logging.INFO):
        main(["validate", "--config", "recipes/default.yaml", f"--model.model_name_or_path={tiny_model_dir}",
              "--model.quantization=null", f"--model.adapter_path={checkpoints / 'adapter'}",
              f"--ckpt_path={checkpoints / 'last.ckpt'}", "--data.tasks=[parity, add_2digit]",
              "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=2", "--trainer.logger=false",
              f"--trainer.default_root_dir={tmp_path / 'both'}", "--verbose=true"])
    # --verbose true adds Lightning's table of results, which off a terminal names each metric in full: Rich drew it
    # 80 wide, for the 120 columns Lightning laid it out for, and read "val/routing/dead_expe…"
    printed = capsys.readouterr()
    assert "Validate metric" in printed.out and "val/routing/dead_experts" in printed.out and heading in caplog.text
    assert f"malora validate scores the adapter tensors of --ckpt_path {checkpoints / 'last.ckpt'}: they replace " \
           f"those of model.adapter_path {checkpoints / 'adapter'}" in caplog.text


def test_predict_through_the_cli_writes_the_users_prompts_answers_into_the_run_folder(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,task,target\nIs 12 even or odd?,parity,even\nWhat is 2 + 3?,,\n")
    main([
        "predict", "--config", "recipes/default.yaml",
        f"--model.model_name_or_path={tiny_model_dir}", "--model.quantization=null", "--model.max_new_tokens=4",
        "--model.adapter.rank=2", "--model.adapter.shared_rank=4", "--model.adapter.num_experts=4",
        "--data.tasks=[parity, add_2digit]", "--data.max_eval_examples_per_task=2", f"--data.predict_file={prompts}",
        f"--trainer.default_root_dir={tmp_path}",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={tmp_path}",
    ])
    written = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "predictions.jsonl"  # beside the reports
    rows = [json.loads(line) for line in written.read_text().splitlines()]
    assert [(row["task"], row["prompt"], row["target"]) for row in rows] == \
        [("parity", "Is 12 even or odd?", "even"), (None, "What is 2 + 3?", None)]
    assert isinstance(rows[0]["correct"], bool) and rows[1]["correct"] is None


@pytest.fixture
def model_loading_forbidden(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the model was loaded although the config is invalid")

    monkeypatch.setattr(module_file, "load_base_model", forbidden)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("--model.adapter.experts=8", "experts"),  # unknown key
        ("--model.learning_rate=fast", "learning_rate"),  # wrong type
        ("--model.adapter.method=dora", "method"),  # not an allowed value
        ("--data.batch_size=[8]", "batch_size"),
        ("--trainer.max_step=10", "max_step"),  # a prefix of max_steps: no abbreviation matching
    ],
)
def test_bad_overrides_fail_before_any_model_loads_naming_the_key(override, named, capsys, model_loading_forbidden):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", "recipes/default.yaml", override])
    assert exit_info.value.code != 0
    assert named in capsys.readouterr().err


def config_test_recipe(tiny_model_dir) -> dict:
    """A recipe on the tiny model without a logger or checkpoints: the run folder, where config.yaml goes, is the
    current directory."""
    return {"trainer": {"logger": False, "enable_checkpointing": False},
            "model": {"model_name_or_path": str(tiny_model_dir), "quantization": None},
            "data": {"tasks": ["parity"], "max_eval_examples_per_task": 2}}


EARLIER_CONFIG = f"{CONFIG_HEADER}2.6.0\nseed_everything: 1\n"  # what an earlier run saved


def test_a_config_yaml_in_the_run_folder_is_replaced_only_when_a_run_saved_it(tiny_model_dir, tmp_path, monkeypatch,
                                                                           model_loading_forbidden):
    """Without a logger the run folder is default_root_dir, the current directory unless set: Lightning's config
    saving replaced the user's config.yaml there with the run's full config, even the recipe being run."""
    monkeypatch.chdir(tmp_path)
    mine = "# my own recipe\n" + yaml.safe_dump(config_test_recipe(tiny_model_dir))
    (tmp_path / "config.yaml").write_text(mine)
    with pytest.raises(FileExistsError, match=r"config\.yaml is a config file this run reads \(--config\)"):
        main(["test", "-c", "config.yaml"])
    (tmp_path / "recipe.yaml").write_text(mine)
    with pytest.raises(FileExistsError, match=r"config\.yaml was not written by malora \(its first line is not "
                                              r"'# lightning\.pytorch==<version>'"):
        main(["test", "-c", "recipe.yaml"])
    assert (tmp_path / "config.yaml").read_text() == mine  # both refused before the model loaded

    # an earlier run's, and the empty file a run killed while Lightning wrote its config leaves (it was refused)
    for earlier in (EARLIER_CONFIG, ""):
        (tmp_path / "config.yaml").write_text(earlier)
        with pytest.raises(AssertionError, match="model was loaded"):  # saved before the model loads, then stopped
            main(["test", "-c", "recipe.yaml"])
        saved = (tmp_path / "config.yaml").read_text()
        assert saved.startswith(CONFIG_HEADER)
        assert yaml.safe_load(saved)["model"]["model_name_or_path"] == str(tiny_model_dir)


def test_a_run_stopped_while_saving_its_config_leaves_the_earlier_config(tiny_model_dir, tmp_path, monkeypatch,
                                                                         model_loading_forbidden):
    """Lightning opened config.yaml for writing (emptying it) before it had the text to write: a run stopped there
    left an empty file in place of the earlier run's config."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config_test_recipe(tiny_model_dir)))
    (tmp_path / "config.yaml").write_text(EARLIER_CONFIG)

    dump = MALoRAArgumentParser.dump

    def stopped_while_saving(*args, **kwargs):  # the CLI also dumps its config while it builds the classes
        if any(frame.function == "setup" for frame in inspect.stack()):  # the config callback's setup writes it
            raise RuntimeError("stopped while saving the config")
        return dump(*args, **kwargs)

    monkeypatch.setattr(MALoRAArgumentParser, "dump", stopped_while_saving)
    with pytest.raises(RuntimeError, match="stopped while saving the config"):
        main(["test", "-c", "recipe.yaml"])
    assert (tmp_path / "config.yaml").read_text() == EARLIER_CONFIG
    assert [path.name for path in tmp_path.iterdir() if path.name.startswith(".config.yaml")] == []


def test_the_config_is_written_once_and_never_in_place(tiny_model_dir, tmp_path, monkeypatch, model_loading_forbidden):
    """The callback writes config.yaml atomically and leaves Lightning's own save (the parser's, in place) unrun: had
    both run, Lightning's write would again empty the earlier file before it had the text, as a stop there shows."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config_test_recipe(tiny_model_dir)))
    (tmp_path / "config.yaml").write_text(EARLIER_CONFIG)

    def in_place_then_stopped(parser, config, path, *args, **kwargs):
        Path(path).write_text("")  # opened for writing: emptied
        raise RuntimeError("stopped while saving the config in place")

    monkeypatch.setattr(MALoRAArgumentParser, "save", in_place_then_stopped)
    with pytest.raises(AssertionError, match="model was loaded"):  # saved before the model loads, then stopped
        main(["test", "-c", "recipe.yaml"])
    saved = (tmp_path / "config.yaml").read_text()
    assert saved.startswith(CONFIG_HEADER)
    assert yaml.safe_load(saved)["model"]["model_name_or_path"] == str(tiny_model_dir)


def test_the_config_is_saved_without_a_deprecated_jsonargparse_argument(tiny_model_dir, tmp_path, monkeypatch,
                                                                         model_loading_forbidden):
    """The config callback dumped with `skip_none`, which jsonargparse 4.49 renamed `skip_unset`: the old name warns
    (JsonargparseDeprecationWarning) and jsonargparse 5 drops it. The entries left None are still saved."""
    monkeypatch.setenv("JSONARGPARSE_DEPRECATION_WARNINGS", "all")  # otherwise each kind warns once a process
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config_test_recipe(tiny_model_dir)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AssertionError, match="model was loaded"):  # saved before the model loads, then stopped
            main(["test", "-c", "recipe.yaml"])
    ours = [str(w.message) for w in caught
            if issubclass(w.category, DeprecationWarning) and Path(w.filename) == Path(cli_file.__file__)]
    assert ours == []
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert "quantization" in saved["model"] and saved["model"]["quantization"] is None


def test_the_config_of_a_run_whose_logger_saves_under_the_home_folder_is_saved_there(tiny_model_dir, tmp_path,
                                                                                      monkeypatch,
                                                                                      model_loading_forbidden):
    """--trainer.logger.save_dir ~/runs: the logger writes into the home folder, and config.yaml belongs beside its
    files, not in a folder named `~` in the current directory (Lightning leaves `~` in trainer.log_dir)."""
    home = tmp_path / "hóme dir"
    home.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "cwd")
    recipe = config_test_recipe(tiny_model_dir)
    recipe["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                   "init_args": {"save_dir": "~/runs"}}
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    with pytest.raises(AssertionError, match="model was loaded"):  # saved before the model loads
        main(["test", "-c", str(tmp_path / "recipe.yaml")])
    saved = home / "runs" / "lightning_logs" / "version_0" / "config.yaml"
    assert yaml.safe_load(saved.read_text())["model"]["model_name_or_path"] == str(tiny_model_dir)
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_config_callback_told_not_to_save_in_the_run_folder_writes_nothing_there(tiny_model_dir, tmp_path,
                                                                                      monkeypatch,
                                                                                      model_loading_forbidden):
    """save_config_kwargs={"save_to_log_dir": False} (a project that keeps its config elsewhere) writes no config.yaml,
    as Lightning's callback does; ours writes the file itself, so it must read that setting too."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config_test_recipe(tiny_model_dir)))
    elsewhere = []

    class ConfigElsewhere(CheckedSaveConfigCallback):
        def save_config(self, trainer, pl_module, stage):
            elsewhere.append(dump_with_unset(self.parser, self.config))

    cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    save_config_callback=ConfigElsewhere, save_config_kwargs={"save_to_log_dir": False},
                    args=["--config", "recipe.yaml"])
    with pytest.raises(AssertionError, match="model was loaded"):  # past the config callback's setup, then stopped
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert not (tmp_path / "config.yaml").exists()
    assert len(elsewhere) == 1 and yaml.safe_load(elsewhere[0])["model"]["model_name_or_path"] == str(tiny_model_dir)


def test_a_config_callback_told_not_to_overwrite_refuses_an_earlier_config(tiny_model_dir, tmp_path, monkeypatch,
                                                                           model_loading_forbidden):
    """save_config_kwargs={"overwrite": False} refuses a config.yaml already there, as Lightning's callback does; the
    atomic write skipped Lightning's check and replaced it."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(config_test_recipe(tiny_model_dir)))
    (tmp_path / "config.yaml").write_text(EARLIER_CONFIG)
    cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    save_config_callback=CheckedSaveConfigCallback, save_config_kwargs={"overwrite": False},
                    args=["--config", "recipe.yaml"])
    with pytest.raises(RuntimeError, match=r"config\.yaml to NOT exist"):
        cli.trainer.test(cli.model, datamodule=cli.datamodule)
    assert (tmp_path / "config.yaml").read_text() == EARLIER_CONFIG


def test_a_saved_config_reads_back_text_that_looks_like_an_exponent_number(tmp_path):
    """PyYAML writes the text 5e-4 unquoted (no YAML 1.1 float) and jsonargparse reads it back as 0.0005 (a YAML 1.2
    float): the config.yaml of a run whose logger was named 5e-4 was refused by `malora fit --config`, and an inline
    task spec's revision 25921e05 came back as the number 2.5921e9. The run's config is this dump (the config
    callback's, and `--print_config`'s)."""
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text('trainer:\n  logger:\n    class_path: lightning.pytorch.loggers.CSVLogger\n'
                      '    init_args: {save_dir: runs, name: "5e-4", version: "1.5e3", prefix: "-1E3"}\n'
                      'data:\n  tasks: [mine]\n  task_specs:\n'
                      '    - {name: mine, hub: org/data, revision: "25921e05", prompt: "{q}", target: "{a}"}\n')
    first = parse(["--config", "recipes/default.yaml", "--config", str(recipe)])
    saved = tmp_path / "config.yaml"
    saved.write_text(dump_with_unset(first.parser, first.config))
    again = parse(["--config", str(saved)]).config
    logger = again.trainer.logger.init_args
    assert (logger.name, logger.version) == ("5e-4", "1.5e3")
    assert logger.prefix == "-1E3"  # a sign and a capital E: a YAML 1.2 float too (-1000.0)
    assert again.data.task_specs == first.config.data.task_specs
    assert again.data.task_specs[0]["revision"] == "25921e05"
    assert yaml.safe_load(saved.read_text())["trainer"]["max_steps"] == 160  # numbers stay numbers


@pytest.mark.parametrize(("given", "named"), [
    ("runs/x/checkpoints/lats.ckpt", r"checkpoint runs/x/checkpoints/lats\.ckpt does not exist: give the path of a "
                                     r"checkpoint file \(\.ckpt\)"),
    ("recipes", r"checkpoint recipes is a folder: give a checkpoint file .*checkpoints/last\.ckpt"),
])
def test_a_ckpt_path_that_is_no_file_is_named_before_the_data_or_model_loads(given, named, monkeypatch,
                                                                           model_loading_forbidden):
    """A mistyped --ckpt_path was reported only after data setup and the base model's load; a folder as a bare
    '[Errno 21] Is a directory'."""
    def forbidden(*args, **kwargs):
        raise AssertionError("the data was set up before the ckpt_path was checked")

    monkeypatch.setattr(MultiTaskDataModule, "setup", forbidden)
    with pytest.raises(OSError, match=named):
        main(["test", "--config", "recipes/default.yaml", f"--ckpt_path={given}"])


@pytest.mark.parametrize("given", ["s3://bucket/run/last.ckpt", "https://example.org/run/last.ckpt"])
def test_a_remote_ckpt_path_is_passed_on_to_lightning_not_refused_as_a_missing_file(given, monkeypatch,
                                                                                  model_loading_forbidden):
    """Lightning reads a URL through fsspec: checked as a local path, it was refused as a file that does not exist."""
    def reached(*args, **kwargs):
        raise AssertionError("the data was set up: the ckpt_path went on to Lightning")

    monkeypatch.setattr(MultiTaskDataModule, "setup", reached)
    with pytest.raises(AssertionError, match="the ckpt_path went on to Lightning|the model was loaded"):
        main(["test", "--config", "recipes/default.yaml", f"--ckpt_path={given}"])


def test_unknown_key_in_a_recipe_file_is_named(tmp_path, capsys, model_loading_forbidden):
    recipe = yaml.safe_load(Path("recipes/default.yaml").read_text())
    recipe["model"]["adapter"]["shard_rank"] = 16  # typo of shared_rank
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(recipe))
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(path)])
    assert "shard_rank" in capsys.readouterr().err


@pytest.mark.parametrize("given", [
    {"model": {"class_path": "my_project.MyModule", "init_args": {"learning_rate": 0.001}}},
    {"data": {"class_path": "my_project.MyData"}},
])
def test_a_recipe_naming_a_class_path_is_pointed_to_main_with_model_class(given, tmp_path, capsys,
                                                                          model_loading_forbidden):
    """The CLI takes the classes' arguments directly (no subclass mode): a recipe naming a subclass got only
    "does not accept option 'model.init_args.learning_rate'", which says nothing of how a subclass runs."""
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(given))
    for args in (["fit", "--config", str(path)], ["fit", "--model.class_path=my_project.MyModule"]):
        with pytest.raises(SystemExit):
            main(args)
        assert "main(model_class=MyModule, datamodule_class=MyData)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # any other unknown key: no such hint
        main(["fit", "--config", "recipes/default.yaml", "--model.learning_rat=3"])
    assert "main(model_class" not in capsys.readouterr().err


def test_invalid_adapter_values_are_explained_before_loading(model_loading_forbidden):
    with pytest.raises(ValueError, match=r"AdapterConfig.top_k=9 is invalid: expected an integer in \[1, num_experts=8\]"):
        main(["fit", "--config", "recipes/default.yaml", "--model.adapter.top_k=9"])


def test_missing_model_path_says_what_is_expected(tmp_path):
    module = MALoRAModule(model_name_or_path=str(tmp_path / "missing-model"), quantization=None)
    with pytest.raises(OSError, match="could not load model .*missing-model.*local folder with config.json"):
        module.configure_model()


@pytest.mark.parametrize("connection", [["-f", "/tmp/tmpq2n8s1.json"], ["--f=/run/user/1000/kernel-v3.json"]])
def test_main_without_args_in_a_notebook_asks_for_the_command_not_the_kernels_argv(connection, monkeypatch,
                                                                                   model_loading_forbidden):
    """In a notebook `sys.argv` is the kernel's (`ipykernel_launcher.py -f <connection file>`, VS Code's `--f=`):
    `main()` and `MALoRACLI(...)` without args read it, and stopped with jsonargparse's usage and "invalid choice:
    '/tmp/tmpq2n8s1.json'", and a SystemExit."""
    monkeypatch.setitem(sys.modules, "ipykernel", SimpleNamespace())
    monkeypatch.setattr(sys, "argv", ["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", *connection])
    with pytest.raises(ValueError, match=r"no command given: .* sys.argv, which in a notebook is the Jupyter kernel's "
                                         r"own .*main\(\['fit', '--config', 'recipes/default.yaml'\]\)"):
        main()
    with pytest.raises(ValueError, match="no command given"):
        MALoRACLI(MALoRAModule, MultiTaskDataModule)
    # a command given as a list runs as ever
    assert parse(["--config", "recipes/default.yaml"]).config.model.adapter.method == "malora"


@pytest.mark.parametrize("argv, notebook, warned", [
    (["/venv/lib/python3.11/site-packages/ipykernel_launcher.py", "-f", "/tmp/tmpq2n8s1.json"], True, False),
    (["my_cli.py", "--trainer.max_steps=5"], True, True),  # a script's own flags, which `args` replaces: it warns
    (["my_cli.py", "-f", "settings.json"], False, True),  # a script's own -f, outside Jupyter: not a kernel's
])
def test_main_with_args_in_a_notebook_does_not_warn_that_the_kernels_argv_is_ignored(argv, notebook, warned,
                                                                                     monkeypatch):
    """Every `main([...])` of a notebook warned "it is not recommended to provide both args and command line
    arguments, got: sys.argv[1:]=['-f', '/tmp/tmpq2n8s1.json']": the kernel's connection file, never the user's."""
    if notebook:
        monkeypatch.setitem(sys.modules, "ipykernel", SimpleNamespace())
    else:
        monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "argv", argv)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert parse(["--config", "recipes/default.yaml"]).config.model.adapter.method == "malora"
    assert any("args parameter is intended" in str(warning.message) for warning in caught) == warned


def test_the_console_script_prints_the_config():
    script = Path(sys.executable).parent / "malora"  # installed by pip install -e . (pyproject [project.scripts])
    result = subprocess.run([str(script), "fit", "--config", "recipes/default.yaml", "--print_config"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = yaml.safe_load(result.stdout)
    assert printed["model"]["adapter"]["shared_rank"] == 32 and printed["data"]["batch_size"] == 8


def test_running_the_cli_module_as_a_script_says_which_commands_run():
    """`python -m malora_lightning.cli fit ...` ran nothing and exited 0."""
    result = subprocess.run([sys.executable, "-m", "malora_lightning.cli", "fit", "--config", "recipes/default.yaml"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "run `malora <subcommand>` or `python -m malora_lightning <subcommand>`" in result.stderr


def test_gpu_recipe_is_the_default_job_on_cuda():
    """The two recipes may differ only where the hardware does, so the GPU job cannot drift from the default one."""
    default = parse(["--config", "recipes/default.yaml"]).config.as_dict()
    gpu = parse(["--config", "recipes/default-gpu.yaml"]).config.as_dict()
    assert gpu["trainer"]["accelerator"] == "gpu"
    assert gpu["trainer"]["plugins"][0]["init_args"]["device"] == "cuda"
    for config in (default, gpu):
        config.pop("config", None)
        del config["trainer"]["accelerator"], config["trainer"]["plugins"], config["trainer"]["default_root_dir"]
    assert gpu == default


def test_an_evaluation_of_untrained_adapters_or_with_a_predict_file_says_so(tiny_model_dir, tmp_path, capsys):
    """`malora test` without --ckpt_path or --model.adapter_path scored the base model; only "step 0" hinted at it.
    Given a predict file it scored the test splits, and said nothing of the file it did not read. Its scores are the
    run report's: Lightning's table had a column of the same values for each task's dataloader (`--verbose true`)."""
    flags = tiny_run_settings(tiny_model_dir, tmp_path)
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "12 + 30 ="}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        main(["test", *flags, f"--data.predict_file={tmp_path / 'prompts.jsonl'}"])
    messages = [str(w.message) for w in caught]
    assert any(re.search(r"malora test without --ckpt_path or --model\.adapter_path evaluates freshly initialised "
                         "adapters", message) for message in messages)
    assert f"malora test scores the test splits: data.predict_file ({tmp_path / 'prompts.jsonl'}) is read by " \
           "malora predict alone" in messages
    assert "Test metric" not in capsys.readouterr().out


SLURM_JOB = {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "train", "SLURM_JOB_ID": "4242", "SLURM_PROCID": "0",
             "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}  # what Lightning's SLURMEnvironment.detect() reads


def test_an_evaluation_without_ckpt_path_on_slurm_loads_no_auto_requeue_checkpoint(tiny_model_dir, tmp_path,
                                                                                    monkeypatch, caplog):
    """On SLURM Lightning took an unset ckpt_path for the newest hpc_ckpt_N.ckpt in default_root_dir, which a
    preempted fit there wrote and left behind: `malora validate --model.adapter_path ...` as a SLURM job scored that
    fit's mid-training tensors instead of the adapter folder's, saying nothing. (Here the file is no checkpoint at all,
    so loading it is an error naming it.)"""
    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"a preempted fit's checkpoint")
    with caplog.at_level(logging.INFO):
        main(["validate", *tiny_run_settings(tiny_model_dir, tmp_path)])
    assert f"malora validate without --ckpt_path loads no checkpoint: SLURM's auto-requeue checkpoint " \
           f"{tmp_path / 'hpc_ckpt_1.ckpt'} is left alone (--ckpt_path hpc loads it)" in caplog.text
    assert "Restoring states" not in caplog.text
    with pytest.raises(ValueError, match="hpc_ckpt_1.ckpt is not a complete checkpoint file"):  # as asked for
        main(["validate", *tiny_run_settings(tiny_model_dir, tmp_path), "--ckpt_path=hpc"])


class TrainerCalled(Exception):
    """Raised in place of the trainer's fit or validate, with the `ckpt_path` the command handed it."""


@pytest.mark.parametrize("args, slurm, handed", [
    # off SLURM Lightning leaves an hpc_ckpt_N.ckpt that a SLURM job left in default_root_dir alone, and so does
    # malora fit: it starts afresh rather than resuming that job
    (["fit"], False, None),
    # --ckpt_path hpc where there is no hpc_ckpt_N.ckpt stays "hpc", which Lightning refuses ("no HPC checkpoint was
    # found"): None would evaluate freshly initialised adapters as if none had been asked for
    (["validate", "--ckpt_path=hpc"], True, "hpc"),
])
def test_slurms_auto_requeue_checkpoint_is_only_loaded_on_slurm_and_only_where_it_exists(tiny_model_dir, tmp_path,
                                                                                         monkeypatch, args, slurm,
                                                                                         handed):
    for name, value in SLURM_JOB.items():
        if slurm:
            monkeypatch.setenv(name, value)
        else:
            monkeypatch.delenv(name, raising=False)
    if not slurm:
        (tmp_path / "hpc_ckpt_1.ckpt").write_bytes(b"a SLURM job's checkpoint")

    @functools.wraps(getattr(L.Trainer, args[0]))  # its signature, from which the command's parser is built
    def called(self, *arguments, **kwargs):
        raise TrainerCalled(kwargs.get("ckpt_path"))

    monkeypatch.setattr(L.Trainer, args[0], called)
    with pytest.raises(TrainerCalled) as call:
        main([*args, *tiny_run_settings(tiny_model_dir, tmp_path)])
    assert call.value.args == (handed,)


@pytest.mark.parametrize("subcommand, verb", [("fit", "resuming from"), ("validate", "loading")])
def test_the_auto_requeue_checkpoint_a_command_loads_is_named(subcommand, verb, tmp_path, monkeypatch):
    """Lightning loads it without a word of its own beyond "Restoring states": the command names the file and says
    whether it resumes the fit or loads the weights to evaluate; where there is none it says nothing."""
    said = []
    monkeypatch.setattr(cli_file, "rank_zero_info", said.append)
    path = str(tmp_path / "hpc_ckpt_3.ckpt")
    trainer = SimpleNamespace(_checkpoint_connector=SimpleNamespace(_hpc_resume_path=path), default_root_dir=tmp_path)
    assert cli_file.auto_requeue_checkpoint(trainer, subcommand) == path
    assert said == [f"malora {subcommand}: {verb} SLURM's auto-requeue checkpoint {path}, the newest hpc_ckpt_N.ckpt "
                    f"in {tmp_path}"]
    trainer._checkpoint_connector._hpc_resume_path = None
    assert cli_file.auto_requeue_checkpoint(trainer, subcommand) is None and len(said) == 1


def test_ctrl_c_ends_a_command_with_one_line_and_the_sigint_status(capsys, monkeypatch):
    """malora-task-export printed a KeyboardInterrupt traceback (Lightning handles Ctrl-C inside a fit itself)."""
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.delenv("MALORA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_command("malora-task-export", interrupted)
    assert exit_info.value.code == 130 and capsys.readouterr().err == "malora-task-export: interrupted\n"
    monkeypatch.setenv("MALORA_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        run_command("malora-task-export", interrupted)


@pytest.mark.parametrize("error", [ValueError("--data.batch_size=0 is invalid"), FileNotFoundError("no x.yaml")])
def test_a_named_error_ends_a_command_with_its_message_and_status_2(capsys, monkeypatch, error):
    def failing():
        raise error

    monkeypatch.delenv("MALORA_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        run_command("malora", failing)
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == f"malora: error: {error}\n(MALORA_TRACEBACK=1 shows where it was raised)\n"
    monkeypatch.setenv("MALORA_TRACEBACK", "1")
    with pytest.raises(type(error)) as raised:
        run_command("malora", failing)
    assert raised.value is error


def test_ckpt_path_last_looks_only_where_every_checkpoint_callback_writes(tmp_path):
    """With a dirpath on every ModelCheckpoint, the run folder's default checkpoints/ is none of this run's."""
    import os

    from lightning.pytorch.callbacks import ModelCheckpoint

    from malora_lightning.cli import resolve_last_checkpoint

    (tmp_path / "mine").mkdir()
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "mine" / "last.ckpt").write_bytes(b"ours")
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"newer, of another run")
    os.utime(tmp_path / "mine" / "last.ckpt", (1, 1))
    trainer = L.Trainer(logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "mine")])
    assert resolve_last_checkpoint(trainer, "fit") == str(tmp_path / "mine" / "last.ckpt")
    trainer = L.Trainer(logger=False, default_root_dir=str(tmp_path), enable_progress_bar=False,
                        callbacks=[ModelCheckpoint(dirpath=tmp_path / "mine"), ModelCheckpoint(every_n_train_steps=2)])
    assert resolve_last_checkpoint(trainer, "fit") == str(tmp_path / "checkpoints" / "last.ckpt")


def test_ckpt_path_last_is_slurms_auto_requeue_checkpoint_where_that_is_the_newest(tmp_path, monkeypatch):
    """A `malora fit --ckpt_path last` that SLURM preempted (Lightning writes hpc_ckpt_N.ckpt into default_root_dir)
    and requeued ran `--ckpt_path last` again, which ignored that checkpoint: it resumed from the last validation's
    last.ckpt and trained every step since again, at each requeue."""
    from malora_lightning.cli import resolve_last_checkpoint

    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    (tmp_path / "lightning_logs" / "version_0" / "checkpoints").mkdir(parents=True)
    last = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    for age, path in ((3, tmp_path / "hpc_ckpt_1.ckpt"), (2, last), (1, tmp_path / "hpc_ckpt_2.ckpt")):
        path.write_bytes(b"a checkpoint")
        os.utime(path, (1000 - age, 1000 - age))
    trainer = L.Trainer(default_root_dir=str(tmp_path), logger=CSVLogger(tmp_path), enable_progress_bar=False)
    assert resolve_last_checkpoint(trainer, "fit") == str(tmp_path / "hpc_ckpt_2.ckpt")  # the one Lightning resumes
    os.utime(last, (2000, 2000))  # a validation's after the preemption: the newest
    assert resolve_last_checkpoint(trainer, "fit") == str(last)


def test_ckpt_path_last_passes_over_a_link_whose_checkpoint_was_removed_in_an_earlier_run_folder(tmp_path):
    """`save_last="link"` makes last.ckpt a link to a top-k file; one run folder's link whose file was removed since
    (the top-k files deleted to free space) made `--ckpt_path last` fail with FileNotFoundError in every later run,
    although a newer run folder held a last.ckpt. Where the broken link is the newest, its missing file is named."""
    from malora_lightning.checkpoints import check_checkpoint_file
    from malora_lightning.cli import resolve_last_checkpoint

    runs = tmp_path / "lightning_logs"
    for version in (0, 1):
        (runs / f"version_{version}" / "checkpoints").mkdir(parents=True)
    broken = runs / "version_0" / "checkpoints" / "last.ckpt"
    broken.symlink_to("epoch=0-step=4.ckpt")
    os.utime(broken, (1000, 1000), follow_symlinks=False)
    last = runs / "version_1" / "checkpoints" / "last.ckpt"
    last.write_bytes(b"a checkpoint")
    os.utime(last, (2000, 2000))
    trainer = L.Trainer(default_root_dir=str(tmp_path), logger=CSVLogger(tmp_path), enable_progress_bar=False)
    assert resolve_last_checkpoint(trainer, "fit") == str(last)
    os.utime(broken, (3000, 3000), follow_symlinks=False)  # the newest: chosen, and refused naming what is gone
    assert resolve_last_checkpoint(trainer, "fit") == str(broken)
    with pytest.raises(FileNotFoundError, match=rf"checkpoint {broken} is a link to epoch=0-step=4.ckpt, which does "
                                                r"not exist \(removed since the link was made\)"):
        check_checkpoint_file(broken)
    # a link whose checkpoint exists is dated by that checkpoint, as Lightning dates it, not by the link's own time
    (runs / "version_2" / "checkpoints").mkdir(parents=True)
    kept = runs / "version_2" / "checkpoints" / "epoch=1-step=8.ckpt"
    kept.write_bytes(b"an older checkpoint")
    os.utime(kept, (2500, 2500))
    linked = runs / "version_2" / "checkpoints" / "last.ckpt"
    linked.symlink_to(kept.name)
    os.utime(linked, (4000, 4000), follow_symlinks=False)
    assert resolve_last_checkpoint(trainer, "fit") == str(broken)


class SignalAtStep(Callback):
    """Sends the process `signum` in its second training step, as a scheduler's preemption or Ctrl-C would."""

    def __init__(self, signum: int) -> None:
        self.signum = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == 1:
            handler = signal.getsignal(self.signum)
            assert handler not in (signal.SIG_DFL, signal.SIG_IGN, None)  # Lightning's or Python's, not death
            os.kill(os.getpid(), self.signum)


@pytest.mark.parametrize("signum,status,line", [(signal.SIGTERM, 143, "terminated (SIGTERM) before the run finished"),
                                                (signal.SIGINT, 130, "interrupted")])
def test_a_fit_ended_by_a_signal_exits_with_its_status_and_one_line(signum, status, line, tmp_path, capsys,
                                                                    monkeypatch):
    """Lightning ends a fit on SIGTERM with a SystemExit without a code: `malora fit` exited 0, and the command after
    `&&` ran on a fit that never finished. On Ctrl-C it exits 1."""
    monkeypatch.delenv("MALORA_TRACEBACK", raising=False)
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=50, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[SignalAtStep(signum)])
    # Python's Ctrl-C handler, which a process started with SIGINT ignored (a background job of a script) lacks;
    # put back after, as Lightning ignores Ctrl-C once it handled one
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    with pytest.raises(SystemExit) as exit_info:
        try:
            run_command("malora", lambda: trainer.fit(BoringModel()))
        finally:
            signal.signal(signal.SIGINT, sigint)
    assert exit_info.value.code == status and capsys.readouterr().err.endswith(f"malora: {line}\n")
    assert trainer.global_step < 50
    with pytest.raises(SystemExit) as exit_info:  # a command's own exit status passes through as it is
        run_command("malora", lambda: sys.exit(3))
    assert exit_info.value.code == 3


def _data_error() -> None:
    raise ValueError("task file tasks/qa.jsonl, row 3: no 'target'")


def _ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)


class StopInSetup(Callback):
    def __init__(self, stop) -> None:
        self.stop = stop

    def setup(self, trainer, pl_module, stage) -> None:
        self.stop()


@pytest.mark.parametrize("stop,status,line", [(_data_error, 2, "error: task file tasks/qa.jsonl, row 3: no 'target'"),
                                              (_ctrl_c, 130, "interrupted")], ids=["data error", "Ctrl-C"])
def test_a_run_stopped_before_its_model_is_built_ends_as_it_was_stopped_with_on_exception_checkpoint(
        stop, status, line, tiny_model_dir, tmp_path, capsys, monkeypatch):
    """OnExceptionCheckpoint saves when the run stops, also in setup (a data error) or while the base loads
    (Ctrl-C), before the module has a model: saving it raised AttributeError: 'NoneType' object has no attribute
    'named_modules', a traceback in place of the command's one line. Nothing is written."""
    from tests.test_module import make_data, make_module

    monkeypatch.delenv("MALORA_TRACEBACK", raising=False)
    on_exception = OnExceptionCheckpoint(tmp_path / "ckpt")
    trainer = L.Trainer(default_root_dir=tmp_path, max_steps=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[StopInSetup(stop), on_exception])
    sigint = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in the test above
    with pytest.raises(SystemExit) as exit_info:
        try:
            run_command("malora", lambda: trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir)))
        finally:
            signal.signal(signal.SIGINT, sigint)
    err = capsys.readouterr().err
    assert exit_info.value.code == status and f"malora: {line}\n" in err and "Traceback" not in err
    assert not os.path.exists(on_exception.ckpt_path)


def test_the_module_entry_point_prints_a_bad_settings_message_without_a_traceback(monkeypatch, capsys):
    """`python -m malora_lightning` runs its `__main__` (here in this process, as runpy runs it for `-m`)."""
    monkeypatch.setattr(sys, "argv", ["malora", "fit", "--config", "recipes/default.yaml", "--model.adapter.top_k=9"])
    monkeypatch.setenv("MALORA_TRACEBACK", "")
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_module("malora_lightning", run_name="__main__", alter_sys=True)
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    assert "malora: error: " in stderr and "AdapterConfig.top_k=9 is invalid" in stderr and "Traceback" not in stderr


def test_a_sharded_checkpoint_folder_is_refused_saying_why_before_anything_loads(tmp_path, model_loading_forbidden):
    """Lightning loads a sharded checkpoint (a folder of shards plus meta.pt) into every tensor of the model, the
    frozen base included, which an adapter-only checkpoint leaves out: it failed after the model loaded with
    "Missing key in checkpoint state_dict: ...embed_tokens.weight". The FSDP recipes write checkpoint files."""
    folder = tmp_path / "epoch=0-step=3.ckpt"
    folder.mkdir()
    (folder / ".metadata").write_bytes(b"")
    torch.save({"hyper_parameters": {}}, folder / "meta.pt")
    with pytest.raises(IsADirectoryError, match=r"is a sharded checkpoint .* Write checkpoint files instead, as the "
                                                 r"FSDP recipes do: ModelParallelStrategy\(save_distributed_checkpoint"):
        main(["test", "--config", "recipes/default.yaml", f"--ckpt_path={folder}"])


PINNED_BASE = ""  # set by the test: the base a project's module fixes


class PinnedBaseModule(MALoRAModule):
    """A project's module that always fine-tunes one base, so its CLI has no model.model_name_or_path."""

    def __init__(self, learning_rate: float = 1e-2, **kwargs):
        super().__init__(model_name_or_path=PINNED_BASE, quantization=None, learning_rate=learning_rate, **kwargs)


def test_a_cli_of_a_subclass_that_fixes_its_base_fits_and_resumes(tiny_model_dir, tmp_path, monkeypatch):
    """The link model.model_name_or_path -> data.tokenizer raised 'No action for key' for such a subclass (the
    README's own-CLI recipe), and the resume check read the missing key."""
    monkeypatch.setattr(sys.modules[__name__], "PINNED_BASE", str(tiny_model_dir))
    settings = ["--model.adapter.rank=2", "--model.adapter.shared_rank=4", "--model.adapter.num_experts=4",
                f"--data.tokenizer={tiny_model_dir}", "--data.tasks=[parity]", "--data.max_train_examples_per_task=8",
                "--data.max_eval_examples_per_task=2", "--data.batch_size=2", "--data.eval_batch_size=2",
                "--trainer.accelerator=cpu", "--trainer.limit_val_batches=0", "--trainer.logger=false",
                "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={tmp_path}"]
    main(["fit", *settings, "--trainer.max_steps=2", "--trainer.callbacks+=ModelCheckpoint",
          f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}", "--trainer.callbacks.save_last=true"],
         model_class=PinnedBaseModule)
    assert (tmp_path / "ckpt" / "last.ckpt").is_file()
    # its checkpoints load into the subclass, which passes the base itself (stored, it was passed twice)
    loaded = PinnedBaseModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert loaded.settings.model_name_or_path == str(tiny_model_dir) and loaded.adapter_config.num_experts == 4
    assert "model_name_or_path" not in loaded.hparams  # the subclass passes it; a second one was a TypeError
    main(["fit", *settings, "--trainer.max_steps=3", f"--ckpt_path={tmp_path / 'ckpt' / 'last.ckpt'}"],
         model_class=PinnedBaseModule)
    assert [path.name for path in (tmp_path / "checkpoints").glob("*.ckpt")] == ["epoch=1-step=3.ckpt"]


def tiny_run_settings(tiny_model_dir, root: Path) -> list[str]:
    """A tiny fit in `root` with the versioned CSV logger every recipe gets (lightning_logs/version_N)."""
    return ["--config", "recipes/default.yaml", f"--model.model_name_or_path={tiny_model_dir}",
            "--model.quantization=null", "--model.adapter.rank=2", "--model.adapter.shared_rank=4",
            "--model.adapter.num_experts=4", "--data.tasks=[parity]", "--data.max_train_examples_per_task=8",
            "--data.max_eval_examples_per_task=2", "--data.batch_size=2", "--data.eval_batch_size=2",
            "--trainer.val_check_interval=1", "--trainer.num_sanity_val_steps=0", "--trainer.log_every_n_steps=1",
            "--trainer.enable_progress_bar=false", f"--trainer.default_root_dir={root}",
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger", f"--trainer.logger.save_dir={root}"]


def test_ckpt_path_last_resumes_the_newest_earlier_run_of_the_run_folder(tiny_model_dir, tmp_path, caplog):
    """Lightning looked for `last` only in the new run's empty version_1/checkpoints, warned, and trained from step 0
    with exit 0."""
    settings = tiny_run_settings(tiny_model_dir, tmp_path)
    main(["fit", *settings, "--trainer.max_steps=2"])
    first = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    with caplog.at_level("INFO"):
        main(["fit", *settings, "--trainer.max_steps=3", "--ckpt_path=last"])
    resumed = list(csv.DictReader((tmp_path / "lightning_logs" / "version_1" / "metrics.csv").open()))
    assert {int(row["step"]) for row in resumed if row.get("train/loss")} == {2}  # only the third step trained
    assert f"--ckpt_path last: resuming from {first}" in caplog.text
    assert torch.load(tmp_path / "lightning_logs" / "version_1" / "checkpoints" / "last.ckpt",
                      weights_only=True)["global_step"] == 3


@pytest.mark.parametrize("subcommand", ["fit", "validate"])
def test_ckpt_path_last_without_any_last_checkpoint_is_an_error_naming_where_it_looked(subcommand, tiny_model_dir,
                                                                                       tmp_path):
    """Lightning warned 'no last checkpoint available' and ran on fresh adapters."""
    with pytest.raises(FileNotFoundError, match=rf"--ckpt_path last: no last checkpoint \(last\*\.ckpt\) in "
                                                rf"{tmp_path}/lightning_logs/\*/checkpoints, so the {subcommand} "
                                                r"would start from fresh adapters; give the checkpoint's path"):
        main([subcommand, *tiny_run_settings(tiny_model_dir, tmp_path), "--ckpt_path=last"])
    assert not list(tmp_path.rglob("metrics.csv"))  # nothing ran


def test_a_run_that_fails_in_setup_leaves_no_empty_version_folder(tiny_model_dir, tmp_path):
    """Lightning makes the logger's version_0 as setup begins; a bad data row found there left it empty, and the
    corrected run was version_1."""
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c"}\n')
    spec = {"name": "mine", "path": {"train": str(tmp_path / "rows.jsonl")}, "prompt": "{prompt}",
            "target": "{target}"}
    flags = [*tiny_run_settings(tiny_model_dir, tmp_path), "--data.tasks=[mine]",
             f"--data.task_specs=[{json.dumps(spec)}]"]
    with pytest.raises(ValueError, match="task 'mine', train row 1: missing field 'target'"):
        main(["fit", *flags])
    assert (tmp_path / "lightning_logs").is_dir() and not list((tmp_path / "lightning_logs").iterdir())
    (tmp_path / "rows.jsonl").write_text('{"prompt": "a", "target": "b"}\n{"prompt": "c", "target": "d"}\n')
    main(["fit", *flags, "--trainer.max_steps=1"])
    assert [path.name for path in (tmp_path / "lightning_logs").iterdir()] == ["version_0"]


def test_runs_started_together_get_version_folders_of_their_own(tiny_model_dir, tmp_path, monkeypatch):
    """Lightning's versioned loggers take one more than the highest version_N they list and make that folder only as
    setup begins: a run started meanwhile (a SLURM array, a sweep: another run's whole fit here, inside this one's
    prepare_data) listed the same folder, and both wrote into version_0 (one config.yaml, both runs' rows in one
    metrics.csv, the report and adapters of the last to end), silently."""
    settings = [*tiny_run_settings(tiny_model_dir, tmp_path), "--trainer.max_steps=1"]
    prepare_data = MultiTaskDataModule.prepare_data

    def another_run_meanwhile(self):
        monkeypatch.setattr(MultiTaskDataModule, "prepare_data", prepare_data)
        main(["fit", *settings, "--seed_everything=2"])
        prepare_data(self)

    monkeypatch.setattr(MultiTaskDataModule, "prepare_data", another_run_meanwhile)
    main(["fit", *settings, "--seed_everything=1"])
    folders = sorted((tmp_path / "lightning_logs").iterdir())
    assert [folder.name for folder in folders] == ["version_0", "version_1"]
    assert {yaml.safe_load((folder / "config.yaml").read_text())["seed_everything"] for folder in folders} == {1, 2}
    for folder in folders:  # one training step each
        assert [row["step"] for row in csv.DictReader((folder / "metrics.csv").open()) if row["train/loss"]] == ["0"]


def test_a_version_another_run_made_since_the_listing_moves_the_run_to_the_next(tmp_path, monkeypatch):
    root = tmp_path / "lightning_logs"
    first, second = CSVLogger(tmp_path), CSVLogger(tmp_path)
    listing = CSVLogger._get_next_version

    def another_run_claims_after_the_listing(logger):
        version = listing(logger)
        if logger is second and first._version is None:
            assert claim_version_folder(first) == root / "version_0"
        return version

    monkeypatch.setattr(CSVLogger, "_get_next_version", another_run_claims_after_the_listing)
    assert claim_version_folder(second) == root / "version_1"
    assert second.log_dir == str(root / "version_1") and first.log_dir == str(root / "version_0")
    given = CSVLogger(tmp_path, version="version_1")  # a version the user names is used as it is, and is not ours
    assert claim_version_folder(given) is None and given.version == "version_1"
    # TensorBoard's events go to a sub_dir of the version folder, which is the one claimed
    assert version_folder(SimpleNamespace(log_dir=str(root / "version_3" / "a" / "b"), sub_dir="a/b")) == \
        root / "version_3"


def test_a_logger_save_dir_under_the_home_folder_is_claimed_and_searched_there(tmp_path, monkeypatch):
    """--trainer.logger.save_dir ~/runs: Lightning writes the logger's files into the home folder (fsspec expands `~`)
    and leaves `~` in its log_dir; the version folder was made in a folder named `~` in the current directory, and
    `--ckpt_path last` looked only there."""
    from malora_lightning.cli import resolve_last_checkpoint

    home = tmp_path / "hóme dir"
    home.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "cwd")
    version = home / "runs" / "lightning_logs" / "version_0"
    assert claim_version_folder(CSVLogger("~/runs")) == version and version.is_dir()
    (version / "checkpoints").mkdir()
    (version / "checkpoints" / "last.ckpt").write_bytes(b"ours")
    trainer = L.Trainer(logger=CSVLogger("~/runs"), enable_progress_bar=False)
    assert resolve_last_checkpoint(trainer, "test") == str(version / "checkpoints" / "last.ckpt")
    # an OnExceptionCheckpoint under ~, newer: found, and its modification time read in the home folder
    (home / "stopped").mkdir()
    (home / "stopped" / "on_exception.ckpt").write_bytes(b"ours, newer")
    os.utime(version / "checkpoints" / "last.ckpt", (1, 1))
    trainer = L.Trainer(logger=CSVLogger("~/runs"), enable_progress_bar=False,
                        callbacks=[OnExceptionCheckpoint("~/stopped")])
    assert resolve_last_checkpoint(trainer, "test") == str(home / "stopped" / "on_exception.ckpt")
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_version_folder_is_claimed_only_where_it_can_be_made_here(tmp_path, monkeypatch):
    """A logger writing to a URL makes no folder here (a `memory:` or `s3:` path made as a local folder), and a
    version_N that Lightning's listing does not count (a file by that name: it lists folders) leaves Lightning's
    choice as it is, without listing again and again."""
    monkeypatch.chdir(tmp_path)
    remote = CSVLogger("memory://runs")
    assert claim_version_folder(remote) is None and remote.log_dir == "memory://runs/lightning_logs/version_0"
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "lightning_logs").mkdir()
    (tmp_path / "lightning_logs" / "version_0").write_text("not a run")
    listing, listings = CSVLogger._get_next_version, []

    def counted_listing(logger):
        listings.append(logger)
        assert len(listings) <= 2, "the versions were listed again and again"
        return listing(logger)

    monkeypatch.setattr(CSVLogger, "_get_next_version", counted_listing)
    local = CSVLogger(tmp_path)
    assert claim_version_folder(local) is None and local.version == 0


def test_only_rank_zero_makes_or_cleans_up_log_folders(tmp_path):
    """Every rank picks its loggers' versions, but only rank zero makes a version folder (another rank's claim made a
    folder of its own, left empty) and removes the folders of a failed run; a folder that was there before the run,
    which the user may have made, is not the run's to remove."""
    existing = tmp_path / "mine"
    existing.mkdir()
    for rank_zero in (False, True):
        loggers = [CSVLogger(tmp_path / "csv"), SimpleNamespace(log_dir=str(existing)),
                   SimpleNamespace(log_dir=str(tmp_path / "new"))]
        cli = SimpleNamespace(trainer=SimpleNamespace(loggers=loggers, is_global_zero=rank_zero))
        made = MALoRACLI._new_log_dirs(cli)
        assert loggers[0].version == 0
        if rank_zero:
            assert made == [tmp_path / "csv" / "lightning_logs" / "version_0", tmp_path / "new"]
        else:
            assert made == [] and not (tmp_path / "csv").exists()


def test_only_folders_without_a_file_are_removed(tmp_path):
    (tmp_path / "empty" / "inner").mkdir(parents=True)
    (tmp_path / "kept" / "inner").mkdir(parents=True)
    (tmp_path / "kept" / "notes.txt").write_text("mine")
    remove_empty_folders(tmp_path / "empty")
    remove_empty_folders(tmp_path / "kept")
    assert not (tmp_path / "empty").exists()
    assert (tmp_path / "kept" / "notes.txt").read_text() == "mine"


def test_ckpt_path_best_is_refused_before_anything_loads(model_loading_forbidden):
    """A new process has no best checkpoint: Lightning refused it as 'ModelCheckpoint is not configured to save the
    best model' once the model was built."""
    with pytest.raises(ValueError, match=r"--ckpt_path best means the best checkpoint of a fit earlier in the same "
                                         r"process, which a malora command never has: give the checkpoint's path"):
        main(["test", "--config", "recipes/default.yaml", "--ckpt_path=best"])


def test_ckpt_path_last_is_found_in_a_bracketed_run_folder_and_checked_before_the_model_loads(
        tiny_model_dir, tmp_path, model_loading_forbidden):
    """`runs/[ablation]` was a glob pattern (no checkpoint found), and the file `last` resolved to skipped the checks a
    given path gets before the model loads."""
    root = tmp_path / "[ablation]"
    cut_off = root / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    cut_off.parent.mkdir(parents=True)
    cut_off.write_bytes(b"PK\x03\x04 not a whole checkpoint")
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(cut_off))} is not a complete checkpoint file"):
        main(["validate", *tiny_run_settings(tiny_model_dir, root), "--ckpt_path=last"])


class LoadsTensorsItself(SingleDeviceStrategy):
    """Loads a checkpoint's tensors into the module as it reads the file, after setup, as FSDPStrategy and
    ModelParallelStrategy do with a whole-file checkpoint: before the module's on_load_checkpoint could convert them."""

    @property
    def restore_checkpoint_after_setup(self) -> bool:
        return True

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        checkpoint = super().load_checkpoint(checkpoint_path, weights_only)
        self.lightning_module.load_state_dict(checkpoint.pop("state_dict"), strict=False)
        return checkpoint

    def load_model_state_dict(self, checkpoint, strict=True):
        pass  # loaded above, as FSDPStrategy's does nothing here


def test_a_checkpoint_of_an_earlier_format_that_the_strategy_loads_itself_is_refused_naming_it(tiny_model_dir,
                                                                                            tmp_path):
    """A mixture's checkpoint written before lora_B became [N, r, m] is converted as the module loads it, except where
    the strategy copies its tensors first (the FSDP recipes): that failed in the copy, naming nothing. The current
    format resumes under such a strategy."""
    settings = [*tiny_run_settings(tiny_model_dir, tmp_path), f"--trainer.strategy.class_path={__name__}.LoadsTensorsItself"]
    main(["fit", *settings, "--trainer.max_steps=2"])
    current = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    main(["fit", *settings, "--trainer.max_steps=3", f"--ckpt_path={current}"])
    checkpoint = torch.load(current, weights_only=True)
    del checkpoint["malora_lightning_format"]
    checkpoint["state_dict"] = {name: value.transpose(1, 2).contiguous() if name.endswith(".lora_B") else value
                                for name, value in checkpoint["state_dict"].items()}
    torch.save(checkpoint, tmp_path / "format-1.ckpt")
    with pytest.raises(ValueError, match=r"format-1.ckpt holds the mixtures' lora_B as \[N, m, r\].*this strategy "
                                         r"loads a checkpoint's tensors itself.*MALoRAModule.load_from_checkpoint"):
        main(["fit", *settings, "--trainer.max_steps=3", f"--ckpt_path={tmp_path / 'format-1.ckpt'}"])


def test_a_checkpoint_that_trained_other_tensors_is_refused_for_a_fit_only(tiny_model_dir, tmp_path,
                                                                          model_loading_forbidden):
    """train_P (and train_A, train_shared_A) decide the optimizer state's shape, which a fit loads and an evaluation
    does not: `malora fit` refuses such a checkpoint before the model loads; `malora validate` goes on to load it."""
    from malora_lightning.checkpoints import SETTINGS_KEY

    settings = tiny_run_settings(tiny_model_dir, tmp_path)
    trained = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                        args=settings).model
    path = tmp_path / "trained.ckpt"
    torch.save({SETTINGS_KEY: trained.settings_record(), "state_dict": {}}, path)
    frozen_p = [*settings, "--model.adapter.train_P=false", f"--ckpt_path={path}"]
    with pytest.raises(ValueError, match=r"trained\.ckpt does not fit this run: model\.adapter\.train_P: checkpoint "
                                         r"True, this run False"):
        main(["fit", *frozen_p])
    with pytest.raises(AssertionError, match="the model was loaded"):  # past the checks
        main(["validate", *frozen_p])


def test_a_one_process_checkpoint_resumed_under_fsdp2_is_refused_naming_it(tiny_model_dir, tmp_path):
    """Lightning's FSDP2 loading takes an optimizer state's integer keys for positions among all the model's
    parameters (as its own checkpoints store them); one process and DDP store positions in the optimizer. The resume
    failed in set_optimizer_state_dict with "The size of tensor a (32) must match the size of tensor b (4)"."""
    settings = tiny_run_settings(tiny_model_dir, tmp_path)
    main(["fit", *settings, "--trainer.max_steps=1"])
    checkpoint = tmp_path / "lightning_logs" / "version_0" / "checkpoints" / "last.ckpt"
    with pytest.raises(ValueError, match=r"last\.ckpt holds its optimizer state as one process or DDP writes it .*"
                                         r"ModelParallelStrategy \(FSDP2\) reads it by position among all the model's "
                                         r"parameters"):
        main(["fit", *settings, "--trainer.strategy.class_path=tests.helpers.TwoProcessFSDP2Strategy",
              "--trainer.devices=2", "--trainer.max_steps=2", f"--ckpt_path={checkpoint}"])


def test_an_fsdp2_checkpoints_optimizer_layout_passes_the_check():
    """Positions among the model's parameters, frozen ones skipped (those of a 2-rank FSDP2 fit of a tiny MALoRA)."""
    from malora_lightning.checkpoints import check_fsdp2_optimizer_layout

    fsdp2 = {"optimizer_states": [{"param_groups": [{"params": [1, 2, 3, 6, 7, 8]}, {"params": [5, 10]}]}]}
    check_fsdp2_optimizer_layout(fsdp2, "fsdp2.ckpt")
    one_process = {"optimizer_states": [{"param_groups": [{"params": [0, 1, 2, 3, 4, 5]}, {"params": [6, 7]}]}]}
    with pytest.raises(ValueError, match="one-process.ckpt holds its optimizer state as one process or DDP writes it"):
        check_fsdp2_optimizer_layout(one_process, "one-process.ckpt")


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict"])
def test_subcommand_help_describes_ckpt_path_and_weights_only_as_the_command_treats_them(subcommand, capsys,
                                                                                           monkeypatch):
    """`malora <subcommand> --help` showed Lightning's text: `best` loaded (refused here), without --ckpt_path the
    best checkpoint of an earlier fit (fresh adapters here), weights_only "Defaults to None" with
    `weights_only=False` advised for trusted files (the default is true and false is refused)."""
    import rich

    from malora_lightning.terminal import file_console_kwargs

    for variable in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)
    reconfigured = []
    monkeypatch.setattr(rich, "reconfigure", lambda **kwargs: reconfigured.append(kwargs))
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, "--help"])
    assert exit_info.value.code == 0
    # the commands size Rich's console off a terminal (capsys) before the Trainer, whatever its progress bar
    assert reconfigured == [file_console_kwargs()] and reconfigured != [{}]
    text = " ".join(capsys.readouterr().out.split())
    assert "`best` is refused" in text and "`last`: the newest last*.ckpt" in text
    assert "Defaults to ``None``" not in text and "use ``weights_only=False``" not in text
    assert "false or null is refused" in text
    assert "best model checkpoint from the previous" not in text
    # validate and test print the run report, not Lightning's table of one column per task's dataloader
    assert ("print Lightning's table of the logged metrics too (default: false)" in text) == \
        (subcommand in ("validate", "test"))
    if subcommand in ("validate", "test"):
        split = "validation" if subcommand == "validate" else "test"
        assert f"The run report that malora {subcommand} prints at its end (--run_report) gives the same {split} " \
               "scores per task" in text


def test_a_cli_let_go_of_frees_its_trainer_model_and_data(tiny_model_dir, model_loading_forbidden):
    """jsonargparse leaves its last parser in a context variable it never resets, and through the parser's
    instantiators the CLI kept its trainer, model and data module alive after `main` returned: a notebook or a
    sweep held the last run's base model until the next command parsed."""
    import gc
    import weakref

    cli = MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    args=["--config", "recipes/default.yaml", f"--model.model_name_or_path={tiny_model_dir}",
                          "--model.quantization=null", "--trainer.logger=false"])
    built = [weakref.ref(made) for made in (cli, cli.trainer, cli.model, cli.datamodule)]
    del cli
    gc.collect()
    assert [ref() for ref in built] == [None] * 4
