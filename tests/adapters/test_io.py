import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import malora_lightning.adapters.io as adapter_io
from malora_lightning.adapters import (
    AdapterConfig,
    adapter_state_dict,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from tests.helpers import tiny_model


def trained_model(method="malora", **overrides):
    settings = dict(method=method, rank=2, shared_rank=4, num_experts=4, train_shared_A=False)
    settings.update(overrides)
    model = inject_adapters(tiny_model("llama"), AdapterConfig(**settings))
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(torch.randn_like(param))  # make every tensor distinct from its initialisation
    return model


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_round_trip_is_bit_exact_and_holds_adapter_tensors_only(tmp_path, method):
    model = trained_model(method)
    save_adapters(model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                         "adapter_model.safetensors"]
    stored = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(stored) == set(adapter_state_dict(model))
    assert not any("base_layer" in key or "embed" in key for key in stored)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["method"] == method

    fresh = load_adapters(tiny_model("llama"), tmp_path / "adapter")
    for key, value in adapter_state_dict(model).items():
        assert torch.equal(adapter_state_dict(fresh)[key], value), key
    ids = torch.randint(3, 200, (2, 6))
    assert torch.equal(fresh(ids).logits, model(ids).logits)
    assert not any(p.requires_grad for p in fresh.parameters())  # loaded for inference


def test_frozen_ablation_tensors_are_saved_and_trainable_reload_respects_switches(tmp_path):
    model = trained_model("malora", train_shared_A=False)
    save_adapters(model, tmp_path / "a")
    assert any(key.endswith("shared_A") for key in load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    fresh = load_adapters(tiny_model("llama"), tmp_path / "a", trainable=True)
    trainable = {name.rsplit(".", 1)[-1] for name, p in fresh.named_parameters() if p.requires_grad}
    assert trainable == {"lora_P", "lora_B", "weight"}  # router.weight; S_A stays frozen


def test_load_into_an_already_injected_model(tmp_path):
    model = trained_model()
    save_adapters(model, tmp_path / "a")
    target = inject_adapters(tiny_model("llama"), AdapterConfig(**json.loads(
        (tmp_path / "a" / "adapter_config.json").read_text())))
    load_adapters(target, tmp_path / "a")
    assert all(torch.equal(adapter_state_dict(target)[k], v) for k, v in adapter_state_dict(model).items())


def test_method_mismatch_is_named(tmp_path):
    save_adapters(trained_model("malora"), tmp_path / "a")
    lora_model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    with pytest.raises(ValueError, match="adapter method 'malora' does not match the model's injected adapters 'lora'"):
        load_adapters(lora_model, tmp_path / "a")


def rewrite_tensors(path, edit):
    file = path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file), metadata={"format": "malora_lightning", "method": "malora"})


def test_missing_tensor_is_named(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t.pop("model.layers.1.mlp.down_proj.lora_P"))
    with pytest.raises(ValueError, match="missing adapter tensor 'model.layers.1.mlp.down_proj.lora_P'"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_shape_mismatch_is_named(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")

    def grow(tensors):
        tensors["model.layers.0.self_attn.k_proj.lora_B"] = torch.zeros(4, 16, 3)

    rewrite_tensors(tmp_path / "a", grow)
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.self_attn.k_proj.lora_B' has shape \(4, 16, 3\), "
                                         r"the model expects \(4, 16, 2\)"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_unexpected_tensor_is_named(tmp_path):
    save_adapters(trained_model(), tmp_path / "a")
    rewrite_tensors(tmp_path / "a", lambda t: t.update({"model.layers.7.mlp.up_proj.lora_B": torch.zeros(1)}))
    with pytest.raises(ValueError, match="tensor 'model.layers.7.mlp.up_proj.lora_B' does not belong"):
        load_adapters(tiny_model("llama"), tmp_path / "a")


def test_missing_files_are_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="adapter_config.json not found"):
        load_adapters(tiny_model("llama"), tmp_path / "empty")


def test_save_requires_adapters(tmp_path):
    with pytest.raises(ValueError, match="has no adapters"):
        save_adapters(tiny_model("llama"), tmp_path / "a")


def test_a_crash_while_saving_leaves_the_previous_adapter_intact(tmp_path, monkeypatch):
    first = trained_model()
    save_adapters(first, tmp_path / "a")
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}

    def crash_midway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(adapter_io, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_adapters(trained_model(), tmp_path / "a")
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]  # no staging debris left behind
