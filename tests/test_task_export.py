"""`malora-task-export`: one LoRA folder (or merged model) per task, equal to collapsing the mixture by hand."""

import copy
import re
import shutil
import stat
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from malora_lightning.adapters import AdapterConfig, adapter_state_dict, inject_adapters, load_adapters, save_adapters
from malora_lightning.adapters.merge import merge_task, task_lora_model, task_profile
from malora_lightning.adapters.quantization import load_base_model
from malora_lightning.atomic import default_mode
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule
from malora_lightning.task_export import build_from_recipe, check_targets, main, profile_tasks, recipe_modules

TASKS = ["parity", "add_2digit"]


def recipe_flags(model_dir) -> list[str]:
    return ["--config", "recipes/default.yaml", f"--model.model_name_or_path={model_dir}", "--model.quantization=null",
            f"--data.tasks=[{', '.join(TASKS)}]", "--data.max_train_examples_per_task=12",
            "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=4"]


@pytest.fixture
def mixture_folder(tiny_model_dir, tmp_path):
    model = inject_adapters(load_base_model(str(tiny_model_dir)), AdapterConfig(rank=2, shared_rank=4, num_experts=4))
    torch.manual_seed(3)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(torch.randn_like(param))
    return save_adapters(model, tmp_path / "mixture")


def test_each_task_gets_the_lora_of_its_own_routing_profile(tiny_model_dir, tmp_path, mixture_folder):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exports = main(["--adapter", str(mixture_folder), "--output", str(tmp_path / "tasks"), "--profile-examples",
                        "8", *recipe_flags(tiny_model_dir)])
    # the command's own flags are in sys.argv as well: LightningCLI warned about it on every export
    assert not [w for w in caught if "args parameter is intended" in str(w.message)]
    assert [export.task for export in exports] == TASKS
    module, data = build_from_recipe(mixture_folder, recipe_flags(tiny_model_dir))
    ids = torch.randint(3, 200, (2, 9))
    outputs = {}
    for task in TASKS:
        profile = profile_tasks(module.model, data, [task], 8)[task]
        expected = task_lora_model(copy.deepcopy(module.model), profile).eval()
        exported = load_adapters(load_base_model(str(tiny_model_dir)), tmp_path / "tasks" / task).eval()
        with torch.no_grad():
            outputs[task] = exported(ids).logits
            torch.testing.assert_close(outputs[task], expected(ids).logits, rtol=0, atol=1e-5)
    assert not torch.allclose(outputs["parity"], outputs["add_2digit"])  # two tasks, two routings
    card = (tmp_path / "tasks" / "parity" / "README.md").read_text()  # it named neither the task nor the mixture
    assert "The `parity` task's LoRA, collapsed from the malora mixture in" in card and str(mixture_folder) in card


def test_a_tasks_profile_is_measured_on_a_subset_of_its_training_examples(tiny_model_dir, mixture_folder):
    """`--profile-examples` of the task's training examples, the data module's seeded subset of them: not its
    validation rows, and not every training example."""
    module, data = build_from_recipe(mixture_folder, recipe_flags(tiny_model_dir))
    profile = profile_tasks(module.model, data, ["parity"], 5)["parity"]
    subset = [dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
              for batch in data.task_dataloader("parity", "train", 5)]
    assert sum(len(batch["input_ids"]) for batch in subset) == 5 < len(data.task_dataloader("parity").dataset) == 12
    expected = task_profile(module.model, subset)
    assert profile.num_tokens == expected.num_tokens == sum(int(batch["attention_mask"].sum()) for batch in subset)
    assert all(torch.equal(profile.gates[name], expected.gates[name]) for name in expected.gates)


def test_merge_writes_a_plain_model_per_task(tiny_model_dir, tmp_path, mixture_folder):
    main(["--adapter", str(mixture_folder), "--output", str(tmp_path / "merged"), "--tasks", "parity", "--merge",
          "--profile-examples", "8", *recipe_flags(tiny_model_dir)])
    module, data = build_from_recipe(mixture_folder, recipe_flags(tiny_model_dir))
    expected = merge_task(copy.deepcopy(module.model), profile_tasks(module.model, data, ["parity"], 8)["parity"])
    assert [path.name for path in (tmp_path / "merged").iterdir()] == ["parity"]  # written by one rename, no staging
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in (tmp_path / "merged" / "parity").iterdir()}
    assert "model.safetensors" in modes and modes == dict.fromkeys(modes, default_mode())  # not owner-only weights
    assert stat.S_IMODE((tmp_path / "merged" / "parity").stat().st_mode) == default_mode(folder=True)
    card = (tmp_path / "merged" / "parity" / "README.md").read_text()  # a merged folder had no model card
    assert "The `parity` task's model, collapsed from the malora mixture in" in card and str(mixture_folder) in card
    assert f"folded into the weights of {tiny_model_dir}" in card and "AutoModelForCausalLM.from_pretrained" in card
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged" / "parity").eval()
    ids = torch.randint(3, 200, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, expected.eval()(ids).logits, rtol=0, atol=1e-5)

    # a rerun after a stop (a kill, an error in a later task) was told only to choose another --output
    before = folder_bytes(tmp_path / "merged" / "parity")
    with pytest.raises(FileExistsError, match=r"merged/parity already holds a merged model of an earlier export, "
                                              r"and --merge never writes .*: pass --tasks add_2digit to export the "
                                              r"others, delete a folder to export its task again"):
        main(["--adapter", str(mixture_folder), "--output", str(tmp_path / "merged"), "--merge",
              *recipe_flags(tiny_model_dir)])
    assert folder_bytes(tmp_path / "merged" / "parity") == before


def test_bad_inputs_are_named(tiny_model_dir, tmp_path, mixture_folder):
    lora = inject_adapters(load_base_model(str(tiny_model_dir)), AdapterConfig(method="lora", rank=2))
    save_adapters(lora, tmp_path / "lora")
    with pytest.raises(ValueError, match=r"holds a lora adapter, which is static already"):
        main(["--adapter", str(tmp_path / "lora"), "--output", str(tmp_path / "out"), *recipe_flags(tiny_model_dir)])
    (tmp_path / "taken" / "parity").mkdir(parents=True)
    (tmp_path / "taken" / "parity" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"taken/parity exists and is not empty"):
        main(["--adapter", str(mixture_folder), "--output", str(tmp_path / "taken"), "--merge",
              *recipe_flags(tiny_model_dir)])
    assert (tmp_path / "taken" / "parity" / "thesis.tex").read_text() == "mine"
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*nowhere not found"):
        main(["--adapter", str(tmp_path / "nowhere"), "--output", str(tmp_path / "out"), *recipe_flags(tiny_model_dir)])


def folder_bytes(folder) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


def test_the_adapter_folder_being_read_is_never_written_over(tiny_model_dir, tmp_path, mixture_folder):
    """A mixture kept at <output>/<task> was replaced by that task's LoRA, without a word, even with no flag."""
    shutil.copytree(mixture_folder, tmp_path / "out" / "parity")
    before = folder_bytes(tmp_path / "out" / "parity")
    for overwrite in ([], ["--overwrite"]):
        with pytest.raises(FileExistsError, match=r"out/parity is the --adapter folder .*out/parity: the export would "
                                                  r"write over the adapter it reads; choose an --output outside"):
            main(["--adapter", str(tmp_path / "out" / "parity"), "--output", str(tmp_path / "out"), "--tasks",
                  "parity", "--profile-examples", "8", *overwrite, *recipe_flags(tiny_model_dir)])
    assert folder_bytes(tmp_path / "out" / "parity") == before


def test_tasks_and_targets_are_checked_before_the_data_or_the_base_model_loads(tiny_model_dir, tmp_path,
                                                                              mixture_folder, monkeypatch):
    """Without --tasks the targets were checked only after the base model loaded, and an unknown --tasks name only
    after the tasks before it were profiled."""
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "add_2digit").write_text("a file where the task's folder would go")

    def load(*args, **kwargs):
        raise AssertionError("the data or the base model loaded before the export's tasks and targets were checked")

    monkeypatch.setattr("malora_lightning.module.load_base_model", load)
    monkeypatch.setattr(MultiTaskDataModule, "setup", load)
    flags = ["--adapter", str(mixture_folder), "--output", str(tmp_path / "out"), *recipe_flags(tiny_model_dir)]
    for tasks in ([], ["--tasks", "add_2digit"]):  # the recipe's tasks, or those named
        with pytest.raises(FileExistsError, match=r"out/add_2digit is a file"):
            main([*flags, *tasks])
    with pytest.raises(ValueError, match=r"--tasks names 'prity', which the recipe does not train: .* expected some "
                                         r"of parity, add_2digit"):
        main([*flags, "--tasks", "parity", "prity"])
    # `--output=~/out` (bash leaves a `~` after `=` as it is; cmd and PowerShell every `~`) wrote into ./~/out
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(FileExistsError, match=rf"^{re.escape(str(tmp_path / 'out' / 'add_2digit'))} is a file"):
        main([f"--adapter=~/{mixture_folder.relative_to(tmp_path)}", "--output=~/out", *recipe_flags(tiny_model_dir)])


def test_targets_inside_or_around_the_adapter_folder_are_refused(tmp_path):
    adapter = tmp_path / "runs" / "parity" / "adapter"
    adapter.mkdir(parents=True)
    with pytest.raises(FileExistsError, match=r"adapter/parity lies inside the --adapter folder"):
        check_targets(adapter, adapter, ["parity"], merge=False, overwrite=True)
    with pytest.raises(FileExistsError, match=r"runs/parity holds the --adapter folder"):
        check_targets(adapter, tmp_path / "runs", ["parity"], merge=True, overwrite=False)
    (tmp_path / "link").symlink_to(adapter.parent)
    with pytest.raises(FileExistsError, match=r"link/adapter is the --adapter folder"):
        check_targets(adapter, tmp_path / "link", ["adapter"], merge=False, overwrite=True)
    with pytest.raises(ValueError, match=r"--tasks names 'parity' more than once"):
        check_targets(adapter, tmp_path / "out", ["parity", "add", "parity"], merge=False, overwrite=False)
    # one folder where case is ignored (macOS, Windows): the second task's adapter silently replaced the first's
    with pytest.raises(ValueError, match=r"tasks 'QA' and 'qa' differ only in case, .*/out/QA and .*/out/qa are one "
                                         r"folder: .* \(--tasks QA, then --tasks qa\)"):
        check_targets(adapter, tmp_path / "out", ["QA", "parity", "qa"], merge=False, overwrite=False)
    check_targets(adapter, tmp_path / "out", ["parity"], merge=False, overwrite=False)  # beside it: fine


def test_an_existing_adapter_folder_is_replaced_only_with_overwrite(tiny_model_dir, tmp_path, mixture_folder):
    """Any adapter folder at <output>/<task> (the user's other trained adapter, say) was replaced silently. Now it
    takes --overwrite, which replaces the adapter files as save_adapters does: the user's other files stay."""
    flags = ["--adapter", str(mixture_folder), "--tasks", "parity", "--profile-examples", "8",
             *recipe_flags(tiny_model_dir)]
    theirs = inject_adapters(load_base_model(str(tiny_model_dir)), AdapterConfig(method="lora", rank=2))
    save_adapters(theirs, tmp_path / "out" / "parity")
    (tmp_path / "out" / "parity" / "notes.txt").write_text("mine")
    before = folder_bytes(tmp_path / "out" / "parity")
    with pytest.raises(FileExistsError, match=r"out/parity exists and is not empty \(an adapter folder\): pass "
                                              r"--overwrite to replace its adapter_config.json and "
                                              r"adapter_model.safetensors .* other files stay\), or choose another"):
        main(["--output", str(tmp_path / "out"), *flags])
    assert folder_bytes(tmp_path / "out" / "parity") == before
    main(["--output", str(tmp_path / "out"), "--overwrite", *flags])
    after = folder_bytes(tmp_path / "out" / "parity")
    assert sorted(after) == ["README.md", "adapter_config.json", "adapter_model.safetensors", "notes.txt"]
    assert after["notes.txt"] == b"mine" and after["adapter_model.safetensors"] != before["adapter_model.safetensors"]

    (tmp_path / "project" / "parity").mkdir(parents=True)
    (tmp_path / "project" / "parity" / "thesis.tex").write_text("mine")
    with pytest.raises(FileExistsError, match=r"project/parity exists and is not empty, and is not an adapter folder"):
        main(["--output", str(tmp_path / "project"), "--overwrite", *flags])
    with pytest.raises(FileExistsError, match=r"out/parity exists and is not empty: --merge .* \(--overwrite does "
                                              r"not apply\)"):
        main(["--output", str(tmp_path / "out"), "--merge", "--overwrite", *flags])
    assert folder_bytes(tmp_path / "project" / "parity") == {"thesis.tex": b"mine"}
    assert folder_bytes(tmp_path / "out" / "parity") == after


def test_an_export_killed_while_saving_a_task_is_recovered_by_the_next_run(tmp_path):
    """A kill inside save_adapters leaves `<task>/.malora-staging/` (hidden: the folder looks empty). The next run
    refused the folder as "not an adapter folder", with or without --overwrite. It now completes or drops the staged
    replace first, as the next save or load of that folder does."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    staging = tmp_path / "out" / "parity" / ".malora-staging"
    staging.mkdir(parents=True)
    for name in ("MALORA_STAGING", "adapter_config.json", "adapter_model.safetensors"):
        (staging / name).write_text("{}")
    check_targets(adapter, tmp_path / "out", ["parity"], merge=False, overwrite=False)  # uncommitted: dropped
    assert list((tmp_path / "out" / "parity").iterdir()) == []
    staging.mkdir()
    for name in ("MALORA_STAGING", "adapter_config.json", "adapter_model.safetensors", "COMMITTED"):
        (staging / name).write_text("{}")
    with pytest.raises(FileExistsError, match=r"parity exists and is not empty \(an adapter folder\): pass --overwrite"):
        check_targets(adapter, tmp_path / "out", ["parity"], merge=False, overwrite=False)  # committed: completed
    assert sorted(path.name for path in (tmp_path / "out" / "parity").iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]
    check_targets(adapter, tmp_path / "out", ["parity"], merge=False, overwrite=True)


def test_an_output_that_cannot_be_written_is_named_before_any_work(tmp_path, capsys, monkeypatch):
    """An --output that is a file, or under a folder that cannot be written, failed with a bare errno after the base
    model loaded and every task was profiled; an empty --output exported into the current folder."""
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (tmp_path / "file").write_text("mine")
    for output in (tmp_path / "file", tmp_path / "file" / "tasks"):
        with pytest.raises(FileExistsError, match=rf"--output {output}: {tmp_path / 'file'} is a file"):
            check_targets(adapter, output, ["parity"], merge=False, overwrite=False)
    assert (tmp_path / "file").read_text() == "mine"
    locked = tmp_path / "locked"
    locked.mkdir()
    mkdtemp = tempfile.mkdtemp  # a read-only mount, or a folder of another user's (root, as CI runs, may write anywhere)

    def refused_in_locked(*args, dir=None, **kwargs):
        if Path(dir) == locked:
            raise PermissionError(13, "Permission denied")
        return mkdtemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkdtemp", refused_in_locked)
    with pytest.raises(PermissionError, match=r"--output .*locked/tasks: .*locked cannot be written"):
        check_targets(adapter, locked / "tasks", ["parity"], merge=True, overwrite=False)
    monkeypatch.undo()
    with pytest.raises(SystemExit):
        main(["--adapter", str(adapter), "--output", ""])
    assert "--output is empty" in capsys.readouterr().err


def test_the_commands_lines_reach_the_library_logger_however_it_is_run():
    """Run as `python -m malora_lightning.task_export` the module's logger was `__main__`'s, outside the library's
    logger, so the command printed none of its "task X: ... -> folder" lines."""
    import runpy

    run = runpy.run_module("malora_lightning.task_export", run_name="as_a_script", alter_sys=True)
    assert run["logger"].name == "malora_lightning.task_export"


@pytest.mark.filterwarnings("ignore:'malora_lightning.task_export' found in sys.modules:RuntimeWarning")  # runpy's
@pytest.mark.parametrize("entry", ["console_main", "__main__"])
def test_the_console_command_refuses_a_bad_profile_size_and_prints_an_error_as_one_line(entry, tmp_path, monkeypatch,
                                                                                       capsys):
    """The installed `malora-task-export` (console_main) and `python -m malora_lightning.task_export` read sys.argv and
    print a bad setting as the parser's usage error, and a missing adapter folder as run_command's one line."""
    import runpy
    import sys

    from malora_lightning import task_export

    def run(*args: str) -> int:
        monkeypatch.setattr(sys, "argv", ["malora-task-export", *args])
        with pytest.raises(SystemExit) as exit_info:
            if entry == "console_main":
                task_export.console_main()
            else:
                runpy.run_module("malora_lightning.task_export", run_name="__main__", alter_sys=True)
        return exit_info.value.code

    monkeypatch.delenv("MALORA_TRACEBACK", raising=False)  # set, run_command raises the error instead
    output = str(tmp_path / "tasks")
    assert run("--adapter", str(tmp_path), "--output", output, "--profile-examples", "0") == 2
    assert "error: --profile-examples=0 is invalid: expected an integer >= 1" in capsys.readouterr().err
    assert run("--adapter", str(tmp_path / "missing"), "--output", output) == 2
    error = capsys.readouterr().err
    assert error.startswith("malora-task-export: error: ") and "missing" in error and "Traceback" not in error
    assert not (tmp_path / "tasks").exists()


class NotedData(MultiTaskDataModule):
    """A project's data module with a setting of its own, which `malora`'s parser does not know."""

    def __init__(self, note: str = "", **kwargs):
        super().__init__(**kwargs)
        self.note = note


class NotedModule(MALoRAModule):
    def __init__(self, note: str = "", **kwargs):
        super().__init__(**kwargs)
        self.note = note


def test_a_projects_own_classes_read_the_recipe_of_its_runs(tiny_model_dir, tmp_path, mixture_folder, capsys):
    """The export took no classes: a run made with a project's subclasses, their settings in its recipe, could not be
    exported (`malora-task-export` parses the recipe for MALoRAModule and MultiTaskDataModule)."""
    flags = ["--adapter", str(mixture_folder), "--output", str(tmp_path / "tasks"), "--tasks", "parity",
             "--profile-examples", "4", *recipe_flags(tiny_model_dir), "--model.note=m", "--data.note=d"]
    with pytest.raises(SystemExit):
        main(flags)
    # jsonargparse 4.39 writes "Unrecognized"
    assert "unrecognized arguments: --model.note=m --data.note=d" in capsys.readouterr().err.lower()
    module, data = recipe_modules(mixture_folder, flags[8:], NotedModule, NotedData)
    assert (type(module), module.note, type(data), data.note) == (NotedModule, "m", NotedData, "d")
    module, data = build_from_recipe(mixture_folder, flags[8:], NotedModule, NotedData)  # loaded, likewise
    assert (type(module), module.note, type(data), data.note) == (NotedModule, "m", NotedData, "d")
    exports = main(flags, model_class=NotedModule, datamodule_class=NotedData)
    assert [export.task for export in exports] == ["parity"]
    assert (tmp_path / "tasks" / "parity" / "adapter_config.json").is_file()
