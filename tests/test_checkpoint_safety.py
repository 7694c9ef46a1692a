"""Checkpoints are data: their stored settings never choose the base model, never turn on remote code, never override
the run's config and flags; a checkpoint that disagrees on the base or the adapter's shape is refused by name."""

import json
import os
import re
import shutil
import sys
from pathlib import Path

import lightning
import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO, TorchCheckpointIO
from lightning.pytorch.strategies import SingleDeviceStrategy

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_state_dict,
    inject_adapters,
    read_adapter_folder,
    save_adapters,
)
from malora_lightning.adapters.io import load_adapted_model
from malora_lightning.checkpoints import SETTINGS_KEY, read_checkpoint, stored_settings
from malora_lightning.cli import MALoRACLI, main
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule
from tests.test_cli import parse
from tests.test_module import make_data, make_module, make_trainer
from tests.helpers import tiny_model, tiny_tokenizer

MARKER = "remote-code-ran.txt"
RECIPE = str(Path(__file__).parents[1] / "recipes" / "default.yaml")  # from any current directory


@pytest.fixture
def code_folder(tmp_path):
    """A loadable tiny Llama folder whose config also points to model code that writes a marker when imported."""
    folder = tmp_path / "folder-with-code"
    tiny_model("llama").save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "planted.PlantedConfig", "AutoModelForCausalLM": "planted.PlantedModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig as PlantedConfig, LlamaForCausalLM as PlantedModel\n")
    return folder


def planted_checkpoint(path, state_dict=None, **hyper_parameters):
    stored = dict(model_name_or_path="elsewhere", trust_remote_code=True, adapter=AdapterConfig().to_dict())
    stored.update(hyper_parameters)
    torch.save({"hyper_parameters": stored, "state_dict": state_dict or {},
                "pytorch-lightning_version": lightning.__version__}, path)
    return path


def built_module(args: list[str]) -> MALoRAModule:
    """The module `malora` builds from these flags: its settings, no model loaded."""
    return MALoRACLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False, args=args).model


def test_cli_never_takes_the_base_or_remote_code_from_a_checkpoint(code_folder, tiny_model_dir, tmp_path):
    checkpoint = planted_checkpoint(tmp_path / "planted.ckpt", model_name_or_path=str(code_folder))
    with pytest.raises(ValueError, match=r"model\.model_name_or_path: checkpoint '.*folder-with-code', this run "
                                         r"'.*tiny-chat-llama"):
        main(["test", "--config", "recipes/default.yaml", f"--model.model_name_or_path={tiny_model_dir}",
              "--model.quantization=null", f"--ckpt_path={checkpoint}", f"--trainer.default_root_dir={tmp_path}"])
    assert not (tmp_path / MARKER).exists()


def test_ckpt_path_last_is_checked_like_a_file(tiny_model_dir, tmp_path):
    """`--ckpt_path last` (resolved by Lightning, in a fixed checkpoint folder) skipped the settings check: a
    checkpoint of another base model loaded silently, one of another rank failed in torch naming nothing."""
    other = tmp_path / "other-llama"
    tiny_model("llama", seed=1).save_pretrained(other)
    tiny_tokenizer(chat_template=True).save_pretrained(other)
    flags = ["--config", "recipes/default.yaml", "--model.quantization=null", "--model.adapter.rank=2",
             "--model.adapter.shared_rank=4", "--model.adapter.num_experts=4", "--data.tasks=[parity]",
             "--data.max_train_examples_per_task=8", "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=2",
             "--trainer.logger=false", f"--trainer.default_root_dir={tmp_path}"]  # checkpoints in <root>/checkpoints
    main(["fit", *flags, f"--model.model_name_or_path={tiny_model_dir}", "--trainer.max_steps=1",
          "--trainer.val_check_interval=1"])
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    with pytest.raises(ValueError, match=r"checkpoint .*last\.ckpt does not fit this run: model\.model_name_or_path: "
                                         r"checkpoint '.*tiny-chat-llama.*', this run '.*other-llama'"):
        main(["test", *flags, f"--model.model_name_or_path={other}", "--ckpt_path=last"])
    with pytest.raises(ValueError, match=r"last\.ckpt does not fit this run: model\.adapter\.rank: checkpoint 2, "
                                         r"this run 3"):
        main(["test", *flags, f"--model.model_name_or_path={tiny_model_dir}", "--model.adapter.rank=3",
              "--ckpt_path=last"])


def test_a_base_given_by_a_relative_path_is_recorded_for_use_from_any_directory(tiny_model_dir, tmp_path,
                                                                                 monkeypatch):
    """A fit given `--model.model_name_or_path=tiny` (a folder in its directory) recorded 'tiny' in its checkpoints and
    its adapter folder: from any other directory the adapter folder did not load, and the checkpoint and the folder
    were refused for the same base named by its absolute path. config.yaml keeps what the user typed."""
    (tmp_path / "start").mkdir()
    base = tmp_path / "start" / "tiny"
    shutil.copytree(tiny_model_dir, base)
    flags = ["--config", RECIPE, "--model.quantization=null", "--model.adapter.rank=2", "--model.adapter.shared_rank=4",
             "--model.adapter.num_experts=4", "--data.tasks=[parity]", "--data.max_train_examples_per_task=8",
             "--data.max_eval_examples_per_task=2", "--data.eval_batch_size=2", "--trainer.logger=false",
             f"--trainer.default_root_dir={tmp_path / 'run'}"]
    monkeypatch.chdir(tmp_path / "start")
    main(["fit", *flags, "--model.model_name_or_path=tiny", "--trainer.max_steps=1", "--trainer.val_check_interval=1"])
    checkpoint, adapter = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "run" / "checkpoints" / "adapter"
    stored = read_checkpoint(checkpoint)
    assert stored["hyper_parameters"]["model_name_or_path"] == stored[SETTINGS_KEY]["model_name_or_path"] == str(base)
    assert read_adapter_folder(adapter).base_model == str(base)
    assert "model_name_or_path: tiny\n" in (tmp_path / "run" / "config.yaml").read_text()

    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    main(["test", *flags, f"--model.model_name_or_path={base}", f"--ckpt_path={checkpoint}"])
    main(["validate", *flags, f"--model.model_name_or_path={base}", f"--model.adapter_path={adapter}"])
    assert MALoRAModule.load_from_checkpoint(checkpoint).settings.model_name_or_path == str(base)
    assert len(adapter_state_dict(load_adapted_model(adapter))) == len(stored["state_dict"])


def test_load_from_checkpoint_ignores_a_stored_trust_remote_code(code_folder, tmp_path):
    trained = MALoRAModule(model_name_or_path=str(code_folder), quantization=None)
    trained.configure_model()  # the folder's own weights load as a plain Llama; its code never runs
    tensors = {f"model.{key}": value for key, value in adapter_state_dict(trained.model).items()}
    checkpoint = planted_checkpoint(tmp_path / "planted.ckpt", tensors, model_name_or_path=str(code_folder),
                                    quantization=None)
    module = MALoRAModule.load_from_checkpoint(checkpoint)  # builds the model on loading: no code may run there
    assert module.hparams.trust_remote_code is False
    assert not (tmp_path / MARKER).exists()


def test_load_from_checkpoint_runs_no_attention_kernel_from_the_hub_that_the_file_names(tiny_model_dir, tmp_path):
    """transformers 5 downloads and runs an attn_implementation of the form "org/repo": a stored one chose code."""
    kernel = "kernels-community/planted"
    trained = MALoRAModule(model_name_or_path=str(tiny_model_dir), quantization=None)
    trained.configure_model()
    tensors = {f"model.{key}": value for key, value in adapter_state_dict(trained.model).items()}
    checkpoint = planted_checkpoint(tmp_path / "planted.ckpt", tensors, model_name_or_path=str(tiny_model_dir),
                                    attn_implementation=kernel, quantization=None)
    with pytest.raises(ValueError, match=re.escape(f"name attn_implementation={kernel!r}, attention code from the "
                                                   "Hub that a file does not get to choose")):
        MALoRAModule.load_from_checkpoint(checkpoint)
    hparams = tmp_path / "hparams.yaml"
    hparams.write_text(f"model_name_or_path: elsewhere\nattn_implementation: {kernel}\n")
    with pytest.raises(ValueError, match="attention code from the Hub that a file does not get to choose"):
        MALoRAModule.load_from_checkpoint(planted_checkpoint(tmp_path / "plain.ckpt"), hparams_file=hparams)
    module = MALoRAModule.load_from_checkpoint(checkpoint, attn_implementation="eager")  # the caller's choice applies
    assert module.settings.attn_implementation == "eager" and module.model.config._attn_implementation == "eager"


def test_a_hub_kernel_the_caller_names_is_used_on_load_and_in_python(tiny_model_dir, tmp_path, monkeypatch):
    """The refusal is of a kernel the file chose: one the caller passes to load_from_checkpoint, or gives the module
    in Python (no file read), reaches the base's load, also after a load_from_checkpoint has run."""
    kernel = "kernels-community/planted"
    checkpoint = planted_checkpoint(tmp_path / "planted.ckpt", model_name_or_path=str(tiny_model_dir),
                                    attn_implementation=kernel, quantization=None)
    with pytest.raises(ValueError, match="attention code from the Hub that a file does not get to choose"):
        MALoRAModule.load_from_checkpoint(checkpoint)
    module = MALoRAModule(model_name_or_path=str(tiny_model_dir), quantization=None, attn_implementation=kernel)
    assert module.settings.attn_implementation == kernel

    class BaseLoaded(Exception):
        pass

    def load_base_model(*args, attn_implementation=None, **kwargs):  # the download would start here
        raise BaseLoaded(attn_implementation)

    monkeypatch.setattr("malora_lightning.module.load_base_model", load_base_model)
    with pytest.raises(BaseLoaded, match=f"^{kernel}$"):
        MALoRAModule.load_from_checkpoint(checkpoint, attn_implementation=kernel)


@pytest.mark.parametrize(("text", "named"), [
    ("model_name_or_path: !!python/name:os.system\n", r"is not plain YAML data .*Python tags \(!!python/\.\.\.\) are "
                                                       r"refused"),
    ("- 1\n- 2\n", r"holds a list, not a mapping of hyperparameter names"),
    (None, r"does not exist: give a \.yaml, \.yml or \.csv file"),
])
def test_an_hparams_file_is_read_as_data_and_named(text, named, tmp_path):
    """Lightning reads hparams_file with yaml.full_load: `!!python/name:os.system` reached __init__ as the function
    os.system, and a missing file loaded with no hyperparameters at all."""
    checkpoint = planted_checkpoint(tmp_path / "a.ckpt", model_name_or_path="offline:SmolLM2-135M-Instruct")
    hparams = tmp_path / "hparams.yaml"
    if text is not None:
        hparams.write_text(text)
    for loaded in (MALoRAModule, MultiTaskDataModule):
        with pytest.raises((ValueError, FileNotFoundError), match=rf"hparams_file {re.escape(str(hparams))} {named}"):
            loaded.load_from_checkpoint(checkpoint, hparams_file=hparams)


def test_an_hparams_file_of_another_kind_is_refused_and_lightnings_csv_is_read(tmp_path):
    from lightning.pytorch.core.saving import save_hparams_to_tags_csv

    from malora_lightning.checkpoints import read_hparams_file

    with pytest.raises(ValueError, match=r"hparams_file .*hparams\.json: give a \.yaml, \.yml or \.csv file"):
        read_hparams_file(tmp_path / "hparams.json")
    save_hparams_to_tags_csv(tmp_path / "hparams.csv", {"learning_rate": 0.01, "quantization": "nf4", "rank": 8})
    assert read_hparams_file(tmp_path / "hparams.csv") == {"learning_rate": 0.01, "quantization": "nf4", "rank": 8}


def test_settings_a_checkpoint_computes_with_are_compared_where_it_records_them():
    """Without a recorded rank and alpha there is nothing to compare; top_k and renormalize_top_k route mixtures
    only, so a LoRA checkpoint's stored values for them change nothing."""
    from malora_lightning.checkpoints import computed_otherwise

    lora = AdapterConfig(method="lora", rank=4)  # alpha None: 2 * rank
    assert computed_otherwise({}, lora) == []
    assert computed_otherwise({"rank": 4}, lora) == computed_otherwise({"alpha": 8.0}, lora) == []  # one of the two
    assert computed_otherwise({"rank": 4, "alpha": 8.0, "top_k": 1, "renormalize_top_k": False}, lora) == []
    assert computed_otherwise({"rank": 4, "alpha": 4.0}, lora) == ["model.adapter.alpha: checkpoint 4.0, this run None"]
    mixture = AdapterConfig(method="molora", rank=4, num_experts=4, top_k=2)
    assert computed_otherwise({"rank": 4, "alpha": None, "top_k": 1}, mixture) == [
        "model.adapter.top_k: checkpoint 1, this run 2"]


def test_a_missing_checkpoint_file_is_lightnings_error_naming_it(tmp_path):
    from malora_lightning.checkpoints import CheckedCheckpointIO

    with pytest.raises(FileNotFoundError, match=r"Checkpoint file not found: .*missing\.ckpt"):
        CheckedCheckpointIO().load_checkpoint(tmp_path / "missing.ckpt")


def test_load_from_checkpoint_imports_no_class_a_stored_hyperparameter_names(tmp_path, monkeypatch):
    """A checkpoint of a CLI run stores Lightning's `_instantiator`, which built the loaded object through
    jsonargparse: a stored `adapter: {class_path: planted_module.X}` imported planted_module (its code ran) before
    the value was refused."""
    (tmp_path / "planted_module.py").write_text(f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r})"
                                                ".write_text('ran')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    planted = {"_instantiator": "lightning.pytorch.cli.instantiate_module",
               "adapter": {"class_path": "planted_module.Config", "init_args": {}}}
    checkpoint = planted_checkpoint(tmp_path / "a.ckpt", model_name_or_path="offline:SmolLM2-135M-Instruct",
                                    **planted)
    with pytest.raises(ValueError, match=r"AdapterConfig: unknown field\(s\) \['class_path', 'init_args'\]"):
        MALoRAModule.load_from_checkpoint(checkpoint)
    data_checkpoint = tmp_path / "data.ckpt"
    torch.save({"datamodule_hyper_parameters": {"_instantiator": planted["_instantiator"],
                                                "tasks": {"class_path": "planted_module.Tasks"}},
                "pytorch-lightning_version": lightning.__version__}, data_checkpoint)
    with pytest.raises(ValueError, match="unknown task 'class_path'"):  # the value as given, refused as a task list
        MultiTaskDataModule.load_from_checkpoint(data_checkpoint)
    assert not (tmp_path / MARKER).exists() and "planted_module" not in sys.modules


class Planted:
    """Unpickling an instance calls into this module: exactly what a checkpoint must never make us do."""


def test_checkpoint_holding_objects_is_refused_with_its_path(tmp_path):
    path = tmp_path / "objects.ckpt"
    torch.save({"hyper_parameters": {"loader": Planted()}}, path)
    with pytest.raises(ValueError, match=r"objects\.ckpt cannot be read as a malora checkpoint"):
        read_checkpoint(path)


def test_resume_with_another_adapter_method_is_refused_naming_both_values(tmp_path):
    checkpoint = planted_checkpoint(tmp_path / "lora.ckpt", model_name_or_path="offline:SmolLM2-135M-Instruct",
                                    adapter=AdapterConfig(method="lora", rank=8).to_dict())
    module = built_module(["--config", "recipes/default.yaml"])
    with pytest.raises(ValueError, match=r"model\.adapter\.method: checkpoint 'lora', this run 'malora'.*"
                                         r"model\.adapter\.rank: checkpoint 8, this run 12"):
        module.check_checkpoint(stored_settings(read_checkpoint(checkpoint)), checkpoint, fitting=True)


def test_resuming_a_fit_with_other_trained_adapter_tensors_is_refused_naming_both_values(tmp_path):
    """train_A/train_P/train_shared_A decide AdamW's parameter groups: a fit resumed with another value failed in
    torch's optimizer loading with an error naming nothing. Evaluating needs no optimizer: there they only differ."""
    stored = built_module(["--config", "recipes/default.yaml"]).settings_record()
    resumed = built_module(["--config", "recipes/default.yaml", "--model.adapter.train_P=false"])
    with pytest.raises(ValueError, match=r"x\.ckpt does not fit this run: model\.adapter\.train_P: checkpoint True, "
                                         r"this run False"):
        resumed.check_checkpoint(stored, "x.ckpt", fitting=True)
    assert resumed.check_checkpoint(stored, "x.ckpt", fitting=False) == ["model.adapter.train_P"]


def test_settings_that_keep_the_adapters_shape_apply_as_the_run_gives_them(tmp_path):
    stored = built_module(["--config", "recipes/default.yaml", "--model.adapter.dropout=0.05"]).settings_record()
    resumed = built_module(["--config", "recipes/default.yaml", "--model.learning_rate=0.1",
                            "--model.lr_schedule=linear", "--model.adapter.dropout=0.2"])
    assert sorted(resumed.check_checkpoint(stored, "x.ckpt", fitting=True)) == [
        "model.adapter.dropout", "model.learning_rate", "model.lr_schedule"]


def test_a_run_started_from_an_adapter_folder_resumes_with_its_own_flags(tmp_path):
    """With `--model.adapter_path` the module takes its adapter settings from the folder, and so does the check: the
    same command plus `--ckpt_path` was refused (checkpoint 'lora', this run 'malora': the recipe's unused adapter)."""
    lora = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=8))
    save_adapters(lora, tmp_path / "adapter")
    flags = ["--config", "recipes/default.yaml", f"--model.adapter_path={tmp_path / 'adapter'}"]
    stored = built_module(flags).settings_record()
    assert stored["adapter"] == read_adapter_folder(tmp_path / "adapter").config.to_dict()
    assert built_module(flags).check_checkpoint(stored, "x.ckpt", fitting=True) == []
    with pytest.raises(ValueError, match=r"model\.adapter\.method: checkpoint 'lora', this run 'malora'"):
        built_module(flags[:2]).check_checkpoint(stored, "x.ckpt", fitting=True)  # without the folder


def test_every_subcommand_reads_checkpoints_as_data(capsys):
    with pytest.raises(SystemExit):
        main(["validate", "--config", "recipes/default.yaml", "--print_config"])
    assert "weights_only: true" in capsys.readouterr().out
    assert MultiTaskDataModule  # the CLI's data class is the one the recipes name


@pytest.mark.parametrize(("value", "in_config"), [("false", False), ("null", False), ("false", True),
                                                 ("null", True)])
def test_a_command_asked_to_read_a_checkpoint_as_objects_is_refused_before_it_builds_anything(tmp_path, value,
                                                                                               in_config):
    """--weights_only=false was accepted, then every check read the file as data anyway: a checkpoint holding an
    object failed with torch's advice to retry with weights_only=False, which the user had just done. With null
    (a flag or a config's `weights_only: null`), Lightning reads an http(s) checkpoint with weights_only=False."""
    checkpoint = planted_checkpoint(tmp_path / "any.ckpt")
    setting = [f"--weights_only={value}"]
    if in_config:
        (tmp_path / "reads.yaml").write_text(f"weights_only: {value}\n")
        setting = ["--config", str(tmp_path / "reads.yaml")]
    with pytest.raises(ValueError, match=rf"^--weights_only={value}: malora commands read checkpoints as data only.*"
                                         r"MALoRAModule\.load_from_checkpoint\(path, weights_only=False\)$"):
        main(["validate", "--config", "recipes/default.yaml", *setting, f"--ckpt_path={checkpoint}",
              f"--trainer.default_root_dir={tmp_path}"])
    assert sorted(path.name for path in tmp_path.iterdir()) == ["any.ckpt"] + (["reads.yaml"] if in_config else [])


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = planted_checkpoint(tmp_path / "cut.ckpt")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.ckpt cannot be read as a malora checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("how", ["cut", "not a checkpoint"])
def test_a_truncated_checkpoint_is_named_by_the_python_api(tiny_model_dir, tmp_path, how):
    """`Trainer.fit(ckpt_path=...)` and `load_from_checkpoint` name the file before torch reads it."""
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    path = tmp_path / "cut.ckpt"
    trainer.save_checkpoint(path)
    path.write_bytes(path.read_bytes()[:-200] if how == "cut" else b"a text file, not a checkpoint\n")
    message = r"checkpoint .*cut\.ckpt is not a complete checkpoint file"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "resumed", max_steps=2).fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                                                            ckpt_path=path)
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "tested").validate(make_module(tiny_model_dir), make_data(tiny_model_dir),
                                                   ckpt_path=path)
    with pytest.raises(ValueError, match=message):
        MALoRAModule.load_from_checkpoint(path)
    with pytest.raises(ValueError, match=message):  # torch's error named no file
        MultiTaskDataModule.load_from_checkpoint(path)


def damaged_inside(path: Path, record_suffix: str) -> Path:
    """`path` with the first 8 bytes of one record's data zeroed, the archive's directory (and its CRCs) kept."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        record = next(info for info in archive.infolist() if info.filename.endswith(record_suffix))
    data = bytearray(path.read_bytes())
    # a local file header is 30 bytes, then the name and the extra field, whose lengths sit at its bytes 26-29
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    data_start = record.header_offset + 30 + name_length + extra_length
    data[data_start:data_start + 8] = bytes(8)
    damaged = path.with_name(f"damaged-{path.name}")
    damaged.write_bytes(bytes(data))
    return damaged


@pytest.mark.parametrize("crc32", [True, False])
def test_a_checkpoint_damaged_inside_is_named_not_loaded_with_wrong_values(tmp_path, crc32):
    """torch's reader never checks the archive's CRC-32s: a checkpoint whose bytes changed inside a tensor loaded that
    tensor with the changed values, and the run resumed or scored them without a word. A file saved without CRCs has
    nothing to check against, and passes."""
    from malora_lightning.checkpoints import check_checkpoint_file

    expected = torch.arange(1.0, 65.0, dtype=torch.float64)
    torch.serialization.set_crc32_options(crc32)
    try:
        planted_checkpoint(tmp_path / "good.ckpt", state_dict={"model.lora_A": expected})
    finally:
        torch.serialization.set_crc32_options(True)
    check_checkpoint_file(tmp_path / "good.ckpt")
    damaged = damaged_inside(tmp_path / "good.ckpt", "data/0")
    loaded = torch.load(damaged, weights_only=True)["state_dict"]["model.lora_A"]
    assert loaded[0] == 0.0 and torch.equal(loaded[1:], expected[1:])  # torch reads the damaged value as it is
    if crc32:
        with pytest.raises(ValueError, match=r"checkpoint .*damaged-good\.ckpt is not a complete checkpoint file "
                                             r"\(Bad CRC-32 for file '.*data/0'\).*or damaged since"):
            check_checkpoint_file(damaged)
    else:
        check_checkpoint_file(damaged)


@pytest.mark.parametrize(("entry", "offset", "value", "cause"), [
    (b"PK\x01\x02", 6, b"\xff\x00", r"zip file version 25\.5"),  # data.pkl's version needed to extract
    (b"PK\x01\x02", 8, b"\x09\x08", r"record '.*data\.pkl' cannot be read: RuntimeError: .*encrypted"),  # flags
    (b"PK\x01\x02", 10, b"\x63\x00", r"record '.*data\.pkl' cannot be read: NotImplementedError"),  # compression
    # the low byte of the directory's offset in the zip64 end record: every record's offset moves
    (b"PK\x06\x06", 48, b"\xff", r"record '.*data\.pkl' cannot be read: OSError"),
])
def test_a_checkpoint_whose_directory_is_damaged_is_named(tmp_path, entry, offset, value, cause):
    """Reading every record for its CRC met a damaged directory entry with zipfile's other errors (an encryption
    flag: RuntimeError, an offset past the end: OSError 'Invalid argument', an unknown compression or version:
    NotImplementedError), which named neither the file nor the record."""
    from malora_lightning.checkpoints import check_checkpoint_file

    path = planted_checkpoint(tmp_path / "good.ckpt", state_dict={"model.lora_A": torch.ones(4)})
    data = bytearray(path.read_bytes())
    start = data.find(entry)  # data.pkl's directory entry, or the zip64 end record
    data[start + offset:start + offset + len(value)] = value
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"checkpoint .*damaged\.ckpt is not a complete checkpoint file \({cause}"):
        check_checkpoint_file(damaged)


def test_a_checkpoint_of_a_base_of_other_sizes_under_the_same_name_is_named(tiny_model_dir, tmp_path):
    """The base check compares names: a checkpoint trained on a base folder whose model was replaced by one of other
    sizes failed in torch's load_state_dict with a RuntimeError listing every tensor, naming no file."""
    from transformers import AutoModelForCausalLM

    from tests.helpers import tiny_config

    base = tmp_path / "base"
    config = tiny_config("llama")
    config.hidden_size, config.intermediate_size = 64, 96  # the tiny model's are 32 and 48
    AutoModelForCausalLM.from_config(config).save_pretrained(base)
    tiny_tokenizer(chat_template=True).save_pretrained(base)
    trainer = make_trainer(tmp_path / "fit", max_steps=1)
    trainer.fit(make_module(base), make_data(base))
    path = tmp_path / "wider.ckpt"
    trainer.save_checkpoint(path)
    shutil.rmtree(base)
    shutil.copytree(tiny_model_dir, base)  # the same folder now holds the 32-wide model
    message = (r"checkpoint tensor 'model\.model\.layers\.0\.self_attn\.q_proj\.shared_A' has shape \(4, 64\), this "
               r"module's \(4, 32\) \(\d+ tensors differ in shape\): it was saved with a base model of other sizes.* "
               r"\(.*wider\.ckpt\)")
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "tested").validate(make_module(base), make_data(base), ckpt_path=path)
    with pytest.raises(ValueError, match=message):
        MALoRAModule.load_from_checkpoint(path)


def test_the_same_base_named_another_way_is_the_same_base(tmp_path, monkeypatch):
    """An offline model's name and its converted folder, or a folder written relative and absolute, load the same
    weights: a checkpoint of one was refused for the other. Another folder is still refused."""
    from malora_lightning.checkpoints import check_checkpoint_settings
    from malora_lightning.offline_models import cache_root

    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    converted = cache_root() / "models" / "SmolLM2-135M-Instruct"
    converted.mkdir(parents=True)
    (tmp_path / "mine").mkdir()
    monkeypatch.chdir(tmp_path)
    adapter = AdapterConfig()
    for stored, given in (("offline:SmolLM2-135M-Instruct", str(converted)), ("mine", str(tmp_path / "mine"))):
        check_checkpoint_settings({"model_name_or_path": stored}, {"model_name_or_path": given}, adapter, "x.ckpt")
    with pytest.raises(ValueError, match="model.model_name_or_path: checkpoint 'mine', this run 'cache'"):
        check_checkpoint_settings({"model_name_or_path": "mine"}, {"model_name_or_path": "cache"}, adapter, "x.ckpt")
    with pytest.raises(ValueError, match="checkpoint 'offline:Retired-1B', this run 'mine'"):  # not "unknown offline"
        check_checkpoint_settings({"model_name_or_path": "offline:Retired-1B"}, {"model_name_or_path": "mine"},
                                  adapter, "x.ckpt")


def test_a_checkpoint_that_recorded_a_relative_base_path_says_where_it_resolves(tmp_path, monkeypatch):
    """Checkpoints written before local folders were recorded by absolute path hold the path as typed: it is the
    run's base from the directory it names that folder in; from another directory the refusal says so, and where."""
    from malora_lightning.checkpoints import check_checkpoint_settings

    (tmp_path / "start" / "tiny").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    given, adapter = {"model_name_or_path": str(tmp_path / "start" / "tiny")}, AdapterConfig()
    monkeypatch.chdir(tmp_path / "start")
    assert check_checkpoint_settings({"model_name_or_path": "tiny"}, given, adapter, "x.ckpt") == []
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=rf"checkpoint 'tiny', this run '.*tiny' \('tiny' names no folder from the "
                                         rf"current directory {tmp_path / 'elsewhere'}: .*relative to the directory "
                                         rf"its run started in; if so, run from that directory, {tmp_path / 'start'}, "
                                         rf"where it names {tmp_path / 'start' / 'tiny'}\)"):
        check_checkpoint_settings({"model_name_or_path": "tiny"}, given, adapter, "x.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint 'other/tiny', this run '.*tiny' \('other/tiny' names no folder "
                                         r".*; if so, run from that directory\)"):
        check_checkpoint_settings({"model_name_or_path": "other/tiny"}, given, adapter, "x.ckpt")
    with pytest.raises(ValueError, match=r"checkpoint 'org/model', this run 'org/other'\. Settings"):  # hub ids
        check_checkpoint_settings({"model_name_or_path": "org/model"}, {"model_name_or_path": "org/other"}, adapter,
                                  "x.ckpt")


@pytest.fixture
def tokenizer_code_folder(tmp_path):
    """A tiny model folder of a model type only its own code defines, which writes a marker when imported; loading its
    tokenizer reads its config."""
    folder = tmp_path / "tokenizer-with-code"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer(chat_template=True).save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="planted", auto_map={"AutoConfig": "planted.PlantedConfig"})
    (folder / "config.json").write_text(json.dumps(config))
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    settings["auto_map"] = {"AutoTokenizer": [None, "planted.PlantedTokenizer"]}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "planted.py").write_text(
        f"import pathlib\npathlib.Path({str(tmp_path / MARKER)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, PreTrainedTokenizerFast as PlantedTokenizer\n"
        "class PlantedConfig(LlamaConfig):\n    model_type = 'planted'\n")
    return folder


def test_a_tokenizers_own_code_never_runs_unless_the_run_trusts_remote_code(tokenizer_code_folder, tmp_path,
                                                                           monkeypatch):
    """Left unset, transformers asked on stdin whether to run it: a 'y' there (piped input) ran the folder's code
    although the run said trust_remote_code false."""
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    # the folder's tokenizer class is also a built-in one, which loads instead
    assert MultiTaskDataModule(tokenizer=str(tokenizer_code_folder), tasks=["parity"]).load_tokenizer() is not None
    assert MALoRAModule(model_name_or_path=str(tokenizer_code_folder), quantization=None).tokenizer is not None
    assert not (tmp_path / MARKER).exists()
    parsed = parse(["--config", "recipes/default.yaml", "--model.trust_remote_code=true"])
    assert parsed.config.data.trust_remote_code is True  # the run's one setting applies to the tokenizer too


def test_a_model_that_needs_its_own_code_is_refused_naming_the_setting(tokenizer_code_folder, tmp_path):
    """transformers' message named neither the CLI flag nor that it is a choice to trust the code."""
    from malora_lightning.adapters import load_base_model

    with pytest.raises(ValueError, match=r"needs model code of its own .*--model\.trust_remote_code true"):
        load_base_model(str(tokenizer_code_folder))
    assert not (tmp_path / MARKER).exists()


def test_a_data_modules_checkpoint_never_turns_on_remote_code(tokenizer_code_folder, tmp_path):
    """MultiTaskDataModule.load_from_checkpoint took `trust_remote_code: true` from the checkpoint's stored
    hyperparameters, and its `tokenizer` beside it: the tokenizer's load then ran that folder's own code."""
    checkpoint = tmp_path / "data.ckpt"
    torch.save({"datamodule_hyper_parameters": {"tokenizer": str(tokenizer_code_folder), "trust_remote_code": True,
                                                "tasks": ["parity"]},
                "pytorch-lightning_version": lightning.__version__}, checkpoint)
    data = MultiTaskDataModule.load_from_checkpoint(checkpoint)
    assert data.settings.trust_remote_code is False
    assert data.load_tokenizer() is not None  # the folder's tokenizer class is also a built-in one
    assert not (tmp_path / MARKER).exists()
    assert MultiTaskDataModule.load_from_checkpoint(checkpoint, trust_remote_code=True).settings.trust_remote_code


def plant_marker(path: str) -> str:
    """What an unpickled checkpoint calls: any code a file names would run as this does."""
    Path(path).write_text("ran")
    return "planted"


class RunsOnUnpickling:
    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return plant_marker, (self.marker,)


@pytest.fixture
def served_planted_checkpoint(tmp_path, monkeypatch):
    """The URL of a checkpoint served over http whose hyperparameters run code (write MARKER) when unpickled."""
    import functools
    import http.server
    import threading

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # where torch.hub keeps the download
    served = tmp_path / "served"
    served.mkdir()
    planted = {"tasks": ["parity"], "system_prompt": RunsOnUnpickling(tmp_path / MARKER)}
    torch.save({"datamodule_hyper_parameters": planted, "hyper_parameters": planted,
                "pytorch-lightning_version": lightning.__version__}, served / "data.ckpt")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/data.ckpt"
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("cls", [MultiTaskDataModule, MALoRAModule])
def test_a_checkpoint_from_a_url_is_read_as_data(tmp_path, served_planted_checkpoint, cls):
    """MultiTaskDataModule.load_from_checkpoint left weights_only to Lightning, whose None unpickles an http(s)
    checkpoint with weights_only=False: a served file ran the code it named. MALoRAModule's refused every URL as a
    local file that "does not exist"."""
    import pickle

    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        cls.load_from_checkpoint(served_planted_checkpoint)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("where", ["url", "local file, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"])
def test_a_plain_trainers_ckpt_path_is_read_as_data(tiny_model_dir, tmp_path, served_planted_checkpoint,
                                                     monkeypatch, where):
    """`trainer.validate(ckpt_path=...)` (and fit, test, predict) of a plain Lightning Trainer passes weights_only=None,
    which Lightning reads as False for an http(s) checkpoint, and torch as False for a local one under
    TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: the file ran the code it named, where `malora validate` refused it."""
    import pickle

    path = served_planted_checkpoint
    if where != "url":
        path = tmp_path / "served" / "data.ckpt"
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        make_trainer(tmp_path).validate(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]),
                                        ckpt_path=path)
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("args", [["fit"], ["validate", "--ckpt_path=hpc"]], ids=["fit on SLURM", "--ckpt_path hpc"])
def test_slurms_auto_requeue_checkpoint_is_checked_as_a_path_before_anything_loads_it(tiny_model_dir, tmp_path,
                                                                                       monkeypatch, args):
    """Lightning chose the newest hpc_ckpt_N.ckpt in default_root_dir inside the trainer's run (for a fit on SLURM
    without --ckpt_path, or --ckpt_path hpc), unchecked before the base model loaded: a file holding objects ran
    nothing, but stopped `malora` with torch's UnpicklingError naming no file, in a traceback."""
    from tests.test_cli import SLURM_JOB, tiny_run_settings

    for name, value in SLURM_JOB.items():
        monkeypatch.setenv(name, value)
    planted = tmp_path / "hpc_ckpt_1.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"loader": RunsOnUnpickling(tmp_path / MARKER)}}, planted)
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(planted))} cannot be read as a malora checkpoint "
                                         r"\(UnpicklingError: Weights only load failed"):
        main([*args, *tiny_run_settings(tiny_model_dir, tmp_path)])
    assert not (tmp_path / MARKER).exists()


def test_a_checkpoint_is_on_disk_beside_its_path_before_it_replaces_the_old_one(tiny_model_dir, tmp_path, monkeypatch):
    """Lightning staged a checkpoint in the system's temporary folder, never fsynced, and moved it over the old one:
    from another file system (a tmpfs /tmp) the move copied it over `last.ckpt`, so a kill mid-copy lost both."""
    from tests.test_atomic import record_fsyncs_and_replaces

    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    path = tmp_path / "last.ckpt"
    path.write_bytes(b"the previous checkpoint")
    events = record_fsyncs_and_replaces(monkeypatch)
    trainer.save_checkpoint(path)
    (replaced,) = [index for index, event in enumerate(events) if event[0] == "replace" and event[2] == str(path)]
    temporary = events[replaced][1]
    assert Path(temporary).parent == tmp_path and ("fsync", temporary) in events[:replaced]
    assert ("fsync", str(tmp_path)) in events[replaced:]
    assert read_checkpoint(path)["global_step"] == 1


def test_a_checkpoint_save_killed_before_its_rename_leaves_slurms_auto_requeue_checkpoint_in_use(tmp_path,
                                                                                                  monkeypatch):
    """Lightning numbers SLURM's auto-requeue checkpoints by the digits of every name in default_root_dir holding
    `hpc_ckpt_`: the temporary `.hpc_ckpt_2.ckpt.<random>.tmp` that a kill during the requeue save left made every
    later fit there resume from a `hpc_ckpt_2<digits of the random part>.ckpt` that does not exist, not hpc_ckpt_1."""
    from malora_lightning.checkpoints import CheckedCheckpointIO

    checkpoint_io = CheckedCheckpointIO()
    checkpoint_io.save_checkpoint({"global_step": 1}, tmp_path / "hpc_ckpt_1.ckpt")
    with monkeypatch.context() as patched:
        patched.setattr(os, "replace", lambda source, target: None)  # killed before the rename: the temporary stays
        checkpoint_io.save_checkpoint({"global_step": 2}, tmp_path / "hpc_ckpt_2.ckpt")
    assert len(list(tmp_path.iterdir())) == 2
    # hidden, as every temporary file the library writes (`atomic_write_bytes`): not listed beside the checkpoints
    (left,) = [path.name for path in tmp_path.iterdir() if path.name != "hpc_ckpt_1.ckpt"]
    assert left.startswith(".") and left.endswith(".tmp"), left
    connector = make_trainer(tmp_path)._checkpoint_connector
    assert connector._hpc_resume_path == str(tmp_path / "hpc_ckpt_1.ckpt")
    assert connector.hpc_save_path(str(tmp_path)) == str(tmp_path / "hpc_ckpt_2.ckpt")


def test_a_checkpoint_saved_over_a_link_replaces_the_link_not_the_checkpoint_it_points_to(tmp_path, monkeypatch):
    """`ModelCheckpoint(save_last="link")` makes last.ckpt a link to another checkpoint: a save of last.ckpt
    replaced the link under Lightning's own writer, and must not write the new state into the checkpoint linked. The
    link was removed before the write, so a save stopped midway left no last.ckpt."""
    from malora_lightning.checkpoints import CheckedCheckpointIO

    best = planted_checkpoint(tmp_path / "epoch=0-step=2.ckpt")
    kept = best.read_bytes()
    (tmp_path / "last.ckpt").symlink_to(best.name)

    def interrupted(fd):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", interrupted)
        with pytest.raises(KeyboardInterrupt):
            CheckedCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "last.ckpt")
    assert os.readlink(tmp_path / "last.ckpt") == best.name and sorted(tmp_path.iterdir()) == [best,
                                                                                             tmp_path / "last.ckpt"]
    CheckedCheckpointIO().save_checkpoint({"global_step": 5}, tmp_path / "last.ckpt")
    assert best.read_bytes() == kept
    assert not (tmp_path / "last.ckpt").is_symlink() and read_checkpoint(tmp_path / "last.ckpt")["global_step"] == 5


def test_a_checkpoint_saved_under_the_home_folder_makes_its_folders_there(tmp_path, monkeypatch):
    """A logger's `~/runs` save_dir leaves `~` in the checkpoint folder: the folders (two new here) are made in the
    home folder, where the checkpoint is written, and none named `~` in the current directory."""
    from malora_lightning.checkpoints import CheckedCheckpointIO

    (tmp_path / "home").mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path / "cwd")
    CheckedCheckpointIO().save_checkpoint({"global_step": 5}, "~/runs/checkpoints/last.ckpt")
    assert read_checkpoint(tmp_path / "home" / "runs" / "checkpoints" / "last.ckpt")["global_step"] == 5
    assert list((tmp_path / "cwd").iterdir()) == []


def test_a_checkpoint_saved_to_a_url_is_written_through_fsspec_not_to_a_local_path(tmp_path, monkeypatch):
    """A URL is no local path: written as one, "memory://ckpts/last.ckpt" became a folder "memory:" in the current
    directory and the store never received the checkpoint."""
    import fsspec

    from malora_lightning.checkpoints import CheckedCheckpointIO

    monkeypatch.chdir(tmp_path)
    url = f"memory://{tmp_path.name}/last.ckpt"
    CheckedCheckpointIO().save_checkpoint({"global_step": 5}, url)
    assert list(tmp_path.iterdir()) == []
    with fsspec.open(url, "rb") as stored:
        assert torch.load(stored, weights_only=True) == {"global_step": 5}


def test_the_checkpoint_io_leaves_an_explicit_weights_only_to_the_caller(tmp_path):
    """An unset weights_only is read as True; an explicit False (a trusted file holding objects: a plain Trainer's
    `validate(ckpt_path=..., weights_only=False)`, or given in place after map_location) is the caller's choice and
    loads the objects (given in place, it must not be set by name too: "got multiple values for argument")."""
    import pickle

    from malora_lightning.checkpoints import CheckedCheckpointIO

    marker, path = tmp_path / MARKER, tmp_path / "objects.ckpt"
    torch.save({"loader": RunsOnUnpickling(marker)}, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        CheckedCheckpointIO().load_checkpoint(path)
    assert not marker.exists()
    assert CheckedCheckpointIO().load_checkpoint(path, weights_only=False) == {"loader": "planted"}
    marker.unlink()
    assert CheckedCheckpointIO().load_checkpoint(path, None, False) == {"loader": "planted"}
    assert marker.exists()


def test_lightnings_async_checkpoint_io_saves_atomically_and_reads_as_data(tiny_model_dir, tmp_path, monkeypatch):
    """`plugins=[AsyncCheckpointIO()]` (Lightning's saver in a background thread) saves and loads through the IO it
    wraps, Lightning's default, which stayed in place under it: saves were not atomic, a cut-off file was torch's
    error naming none, and a file's code ran under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD (or from an http(s) URL). The
    folder is made before the checkpoint is serialised, as Lightning's save makes it first."""
    import pickle

    from tests.test_atomic import record_fsyncs_and_replaces

    strategy = SingleDeviceStrategy(torch.device("cpu"), checkpoint_io=AsyncCheckpointIO())
    set_up_under(strategy, make_module(tiny_model_dir))
    path, serialise, folder_made = tmp_path / "checkpoints" / "last.ckpt", torch.save, []
    with monkeypatch.context() as patch:
        events = record_fsyncs_and_replaces(patch)
        # ModelCheckpoint(save_last="link") links into the folder once the save is handed to the thread
        patch.setattr(torch, "save", lambda *args: (folder_made.append(path.parent.is_dir()), serialise(*args))[1])
        strategy.save_checkpoint({"global_step": 5}, path)
        strategy.checkpoint_io.teardown()  # waits for the background thread's save, and raises its error
    assert [event[2] for event in events if event[0] == "replace"] == [str(path)] and folder_made == [True]
    assert read_checkpoint(path)["global_step"] == 5

    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.ckpt is not a complete checkpoint file"):
        strategy.load_checkpoint(tmp_path / "cut.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({"state_dict": {}, "hyper_parameters": {"loader": RunsOnUnpickling(tmp_path / MARKER)}},
               tmp_path / "planted.ckpt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        strategy.load_checkpoint(tmp_path / "planted.ckpt")
    assert not (tmp_path / MARKER).exists()


class OwnCheckpointIO(TorchCheckpointIO):
    """A checkpoint IO of one's own (a Trainer's `plugins=[...]`, a strategy's `checkpoint_io`), which loads as
    Lightning's does and which the module leaves in place."""


@pytest.mark.parametrize(("checkpoint_io", "where"), [
    (OwnCheckpointIO, "url"),
    (lambda: AsyncCheckpointIO(OwnCheckpointIO()), "local file, TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"),
], ids=["TorchCheckpointIO subclass, url", "AsyncCheckpointIO of one, local file"])
def test_a_checkpoint_io_of_ones_own_gets_files_read_as_data_first(tiny_model_dir, tmp_path, served_planted_checkpoint,
                                                                   monkeypatch, checkpoint_io, where):
    """A checkpoint IO of one's own was left to read a `ckpt_path` as it does: Lightning's loading, with weights_only
    unset, unpickled an http(s) checkpoint, and under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD a local one, so a plain
    Trainer's fit or validate ran the code the file named. The file is now read as data and checked first, and an
    unset weights_only is passed on as True; a checkpoint of plain data still loads through the IO."""
    import pickle

    module = make_module(tiny_model_dir)
    strategy = SingleDeviceStrategy(torch.device("cpu"), checkpoint_io=checkpoint_io())
    set_up_under(strategy, module)
    io = strategy.checkpoint_io
    assert type(getattr(io, "checkpoint_io", io)) is OwnCheckpointIO  # left in place, under a wrapper too
    path = served_planted_checkpoint
    if where != "url":
        path = tmp_path / "served" / "data.ckpt"
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for unset in ({}, {"weights_only": None}):  # None: as a Trainer's restore passes an unset weights_only on
        with pytest.raises((ValueError, pickle.UnpicklingError), match="Weights only load failed"):
            strategy.load_checkpoint(path, **unset)
    assert not (tmp_path / MARKER).exists()
    torch.save({SETTINGS_KEY: module.settings_record(), "state_dict": {}}, tmp_path / "data.ckpt")
    assert strategy.load_checkpoint(tmp_path / "data.ckpt")["state_dict"] == {}


def test_a_checkpoint_io_loads_as_data_through_ours_alone_or_under_wrappers_that_pass_loading_on():
    from malora_lightning.checkpoints import CheckedCheckpointIO
    from malora_lightning.module import loads_as_data

    class LoadsItsOwnWay(AsyncCheckpointIO):
        def load_checkpoint(self, *args, **kwargs):
            return {}

    class OursLoadingItsOwnWay(CheckedCheckpointIO):
        def load_checkpoint(self, *args, **kwargs):
            return {}

    assert loads_as_data(CheckedCheckpointIO()) and loads_as_data(AsyncCheckpointIO(CheckedCheckpointIO()))
    assert not loads_as_data(TorchCheckpointIO()) and not loads_as_data(AsyncCheckpointIO(OwnCheckpointIO()))
    assert not loads_as_data(LoadsItsOwnWay(CheckedCheckpointIO()))
    assert not loads_as_data(OursLoadingItsOwnWay()) and not loads_as_data(AsyncCheckpointIO(OursLoadingItsOwnWay()))


class ReadsCheckpointsItself(SingleDeviceStrategy):
    """A strategy of one's own that overrides `load_checkpoint` (as FSDPStrategy and ModelParallelStrategy do), here
    reading the file through its checkpoint IO, URLs and `~` included."""

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        return super().load_checkpoint(checkpoint_path, weights_only=weights_only)


def set_up_under(strategy, module):
    """`module.setup` as a trainer under `strategy` runs it before restoring a checkpoint, without a GPU or a trainer:
    the stand-in's `state.fn` (validating) may be changed afterwards."""
    from types import SimpleNamespace

    from lightning.pytorch.trainer.states import TrainerFn

    trainer = SimpleNamespace(strategy=strategy, callbacks=[], accumulate_grad_batches=1, max_steps=-1,
                              val_check_interval=1.0, check_val_every_n_epoch=1, precision="32-true",
                              state=SimpleNamespace(fn=TrainerFn.VALIDATING))
    module._trainer = trainer
    module.setup("validate")
    strategy.model, strategy._lightning_module = torch.nn.Linear(1, 1), module  # as the trainer connects them
    return trainer


@pytest.mark.parametrize(("planted", "refusal"), [
    ("code", r"planted\.ckpt cannot be read as a malora checkpoint"),
    ("another base", r"planted\.ckpt does not fit this run: model\.model_name_or_path: checkpoint 'elsewhere'"),
], ids=["code", "another base"])
def test_a_strategy_that_reads_checkpoints_itself_gets_them_checked_first(tiny_model_dir, tmp_path, planted, refusal):
    """FSDPStrategy reads a `ckpt_path` itself, past the checkpoint IO, a full checkpoint with Lightning's `_lazy_load`
    (a pickle unpickler, whatever weights_only says): a plain Trainer's fit or validate under it ran the code the file
    named, and loaded a checkpoint of other settings unchecked, where `malora` read it as data and checked it first.
    The module's setup (before the restore) makes the strategy do so; here without a GPU, the trainer stood in for."""
    from lightning.pytorch.strategies import FSDPStrategy

    strategy = FSDPStrategy()
    set_up_under(strategy, make_module(tiny_model_dir))
    path = tmp_path / "planted.ckpt"
    if planted == "code":
        torch.save({"state_dict": {}, "hyper_parameters": {"loader": RunsOnUnpickling(tmp_path / MARKER)}}, path)
    else:
        planted_checkpoint(path)
    with pytest.raises(ValueError, match=refusal):
        strategy.load_checkpoint(path)
    assert not (tmp_path / MARKER).exists()


def test_a_strategy_that_reads_checkpoints_itself_loads_urls_trusted_files_and_home_paths(tiny_model_dir, tmp_path,
                                                                                           monkeypatch):
    """The checks before such a strategy's loading leave a URL to Lightning's reading (there is no local file to
    check: it was refused as missing) and an explicit weights_only=False (a trusted file holding objects: it was read
    as data and refused) to the caller; a `~` path is checked as the file it names (it was refused as missing)."""
    import fsspec

    strategy = ReadsCheckpointsItself(torch.device("cpu"))
    set_up_under(strategy, make_module(tiny_model_dir))
    url = f"memory://{tmp_path.name}/elsewhere.ckpt"
    with fsspec.open(url, "wb") as stored:
        stored.write(planted_checkpoint(tmp_path / "elsewhere.ckpt").read_bytes())
    assert strategy.load_checkpoint(url)["hyper_parameters"]["model_name_or_path"] == "elsewhere"

    trusted = tmp_path / "trusted.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"loader": RunsOnUnpickling(tmp_path / MARKER)}}, trusted)
    assert strategy.load_checkpoint(trusted, weights_only=False)["hyper_parameters"] == {"loader": "planted"}

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ValueError, match=rf"checkpoint {re.escape(str(tmp_path))}/elsewhere\.ckpt does not fit this "
                                         r"run: model\.model_name_or_path"):
        strategy.load_checkpoint("~/elsewhere.ckpt")


def test_a_strategy_that_reads_checkpoints_itself_checks_each_file_once_for_the_module_and_run_it_loads_for(
        tiny_model_dir, tmp_path, monkeypatch):
    """The module's setup runs for each of a trainer's runs (fit, then validate, ...): the strategy is wrapped once,
    and checks a file once per loading. Whether the trained tensors must match (train_A, train_P, train_shared_A:
    only to resume a fit) is the run's at loading time; a module of another class on the same strategy gets the file
    checked, not its settings."""
    import dataclasses

    import lightning.pytorch as pl
    from lightning.pytorch.trainer.states import TrainerFn

    from malora_lightning import module as module_file

    reads = []
    monkeypatch.setattr(module_file, "read_checkpoint", lambda path: reads.append(path) or read_checkpoint(path))
    trained = make_module(tiny_model_dir)
    path = tmp_path / "trained.ckpt"
    torch.save({SETTINGS_KEY: trained.settings_record(), "state_dict": {}}, path)
    frozen_p = make_module(tiny_model_dir, adapter=dataclasses.replace(trained.adapter_config, train_P=False))
    strategy = ReadsCheckpointsItself(torch.device("cpu"))
    set_up_under(strategy, frozen_p)
    trainer = set_up_under(strategy, frozen_p)  # a second run of the same trainer
    assert strategy.load_checkpoint(path)["state_dict"] == {} and reads == [str(path)]
    trainer.state.fn = TrainerFn.FITTING
    with pytest.raises(ValueError, match=r"trained\.ckpt does not fit this run: model\.adapter\.train_P: "
                                         r"checkpoint True, this run False"):
        strategy.load_checkpoint(path)

    another = pl.LightningModule()
    another._trainer = trainer
    strategy._lightning_module = another
    planted_checkpoint(tmp_path / "elsewhere.ckpt")
    assert strategy.load_checkpoint(tmp_path / "elsewhere.ckpt")["hyper_parameters"]["model_name_or_path"] == \
        "elsewhere"
    (tmp_path / "cut.ckpt").write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"cut\.ckpt is not a complete checkpoint file"):
        strategy.load_checkpoint(tmp_path / "cut.ckpt")


def test_what_the_strategy_needs_of_a_checkpoint_is_checked_only_where_it_needs_it(tiny_model_dir, tmp_path):
    """A mixture's checkpoint of an earlier format is refused only where the strategy copies its tensors before the
    module converts them (FSDPStrategy, ModelParallelStrategy); a one-process optimizer layout only for a fit under
    FSDP2, which alone loads optimizer state (an evaluation loads none)."""
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    from malora_lightning.checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_FORMAT_KEY
    from malora_lightning.module import check_checkpoint_before_loading

    one_process = [{"param_groups": [{"params": [0, 1, 2, 3, 4, 5]}, {"params": [6, 7]}]}]
    mixture, lora = make_module(tiny_model_dir), make_module(tiny_model_dir, adapter=AdapterConfig(method="lora",
                                                                                                    rank=2))
    single = SingleDeviceStrategy(torch.device("cpu"))
    for module in (mixture, lora):
        format_1 = tmp_path / f"{module.adapter_config.method}-format-1.ckpt"
        torch.save({SETTINGS_KEY: module.settings_record(), "state_dict": {}}, format_1)
        check_checkpoint_before_loading(str(format_1), single, module, fitting=True)
        if module is lora:
            check_checkpoint_before_loading(str(format_1), FSDPStrategy(), module, fitting=True)
    with pytest.raises(ValueError, match=r"malora-format-1\.ckpt holds the mixtures' lora_B as \[N, m, r\]"):
        check_checkpoint_before_loading(str(tmp_path / "malora-format-1.ckpt"), FSDPStrategy(), mixture, fitting=False)

    path = tmp_path / "one-process.ckpt"
    torch.save({SETTINGS_KEY: mixture.settings_record(), "state_dict": {}, CHECKPOINT_FORMAT_KEY: CHECKPOINT_FORMAT,
                "optimizer_states": one_process}, path)
    check_checkpoint_before_loading(str(path), ModelParallelStrategy(), mixture, fitting=False)
    check_checkpoint_before_loading(str(path), single, mixture, fitting=True)
    with pytest.raises(ValueError, match=r"one-process\.ckpt holds its optimizer state as one process or DDP"):
        check_checkpoint_before_loading(str(path), ModelParallelStrategy(), mixture, fitting=True)
