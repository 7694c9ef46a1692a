import json
import os
import subprocess
import sys

import pytest

from malora_lightning.adapters import AdapterConfig


def test_defaults_are_the_papers_malora_setting():
    config = AdapterConfig()
    assert (config.method, config.num_experts, config.top_k, config.rank, config.shared_rank) == ("malora", 8, 2, 12, 32)
    assert config.scaling == 2.0  # alpha = 24 for r-bar = 12 (paper Table 8)
    assert config.aux_loss_coef == 0.01 and config.router_z_loss_coef == 0 and config.renormalize_top_k
    assert config.target_modules == ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]


def test_a_config_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    """JSON is UTF-8; read in the locale's encoding (ASCII under the POSIX locale, cp1252 on Windows) a module name
    with an accent failed, or became other characters."""
    path = tmp_path / "adapter_config.json"
    # as an editor saves it: the accent as UTF-8 bytes (json.dumps would write it as the ASCII escape \u00e9)
    path.write_text(json.dumps(AdapterConfig(target_modules=["proj_é"]).to_dict(), ensure_ascii=False),
                    encoding="utf-8")
    script = f"from malora_lightning.adapters import AdapterConfig; print(AdapterConfig.from_file({str(path)!r}))"
    environment = {**os.environ, "LC_ALL": "POSIX", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
                   "PYTHONIOENCODING": "utf-8"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environment,
                            encoding="utf-8", timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "target_modules=['proj_é']" in result.stdout


def test_scaling_is_alpha_over_rank():
    assert AdapterConfig(method="lora", rank=64, alpha=128).scaling == 2.0
    assert AdapterConfig(method="lora", rank=8, alpha=4).scaling == 0.5


def test_json_round_trip(tmp_path):
    config = AdapterConfig(method="molora", rank=8, alpha=16, num_experts=4, top_k=1, exclude_modules="lm_head",
                           layers_to_transform=[0, 3], train_A=False, adapter_dtype="bfloat16", kernel="sparse")
    assert AdapterConfig.from_json(config.to_json()) == config
    path = tmp_path / "adapter_config.json"
    path.write_text(config.to_json())
    assert AdapterConfig.from_file(path) == config
    assert json.loads(config.to_json())["method"] == "molora"


@pytest.mark.parametrize(
    ("kwargs", "field", "hint"),
    [
        ({"method": "dora"}, "method", "one of ('lora', 'molora', 'malora')"),
        ({"rank": 0}, "rank", ">= 1"),
        ({"rank": -3}, "rank", ">= 1"),
        ({"rank": 2.5}, "rank", "integer"),
        ({"top_k": 9}, "top_k", "[1, num_experts=8]"),
        ({"top_k": 0}, "top_k", "[1, num_experts=8]"),
        ({"num_experts": 0, "top_k": 1}, "num_experts", ">= 1"),
        ({"rank": 40}, "rank", "[1, shared_rank=32]"),
        ({"shared_rank": None}, "shared_rank", ">= 1"),
        ({"beta": 0.0}, "beta", "> 0"),
        ({"dropout": 1.0}, "dropout", "[0, 1)"),
        ({"alpha": -1.0}, "alpha", "> 0"),
        ({"aux_loss_coef": -0.1}, "aux_loss_coef", ">= 0"),
        ({"adapter_dtype": "int8"}, "adapter_dtype", "float32"),
        ({"kernel": "triton"}, "kernel", "dense"),
        ({"target_modules": []}, "target_modules", "non-empty"),
        ({"layers_to_transform": [-1]}, "layers_to_transform", ">= 0"),
        ({"beta": float("inf")}, "beta", "finite"),
        ({"router_init_std": float("inf")}, "router_init_std", "finite"),
        ({"alpha": float("inf")}, "alpha", "finite"),
        ({"aux_loss_coef": float("inf")}, "aux_loss_coef", "finite"),
        ({"router_z_loss_coef": float("nan")}, "router_z_loss_coef", "finite"),
        ({"dropout": float("nan")}, "dropout", "[0, 1)"),
        ({"target_modules": "model.(q_proj"}, "target_modules", "does not compile"),
        ({"exclude_modules": "*_proj"}, "exclude_modules", "does not compile"),
        ({"exclude_modules": [""]}, "exclude_modules", "none of them empty"),  # excluded nothing
        ({"exclude_modules": ""}, "exclude_modules", "none of them empty"),
        ({"renormalize_top_k": "false"}, "renormalize_top_k", "True or False"),
        ({"train_A": "false"}, "train_A", "True or False"),
        ({"train_P": 0}, "train_P", "True or False"),
        ({"train_shared_A": None}, "train_shared_A", "True or False"),
        ({"reuse_first_kaiming": "false"}, "reuse_first_kaiming", "True or False"),
        ({"layers_to_transform": "0,1"}, "layers_to_transform", "list of layer indices"),
        ({"layers_to_transform": []}, "layers_to_transform", "None (every layer) or a non-empty list"),  # at inject
    ],
)
def test_invalid_values_name_the_field_value_and_range(kwargs, field, hint):
    with pytest.raises(ValueError) as error:
        AdapterConfig(**kwargs)
    message = str(error.value)
    assert f"AdapterConfig.{field}=" in message
    assert repr(next(iter(kwargs.values()))) in message or field != next(iter(kwargs))
    assert hint in message


def test_a_tuple_of_layers_is_kept_as_a_list_so_the_json_round_trip_is_equal():
    config = AdapterConfig(layers_to_transform=(0, 1))
    assert config.layers_to_transform == [0, 1] and AdapterConfig.from_json(config.to_json()) == config


def test_tuples_of_modules_and_a_single_layer_index_are_kept_as_lists():
    config = AdapterConfig(target_modules=("q_proj", "v_proj"), exclude_modules=("model.layers.0.self_attn.q_proj",),
                           layers_to_transform=1)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["model.layers.0.self_attn.q_proj"]
    assert config.layers_to_transform == [1]
    assert AdapterConfig.from_json(config.to_json()) == config


def test_mixture_fields_are_not_checked_for_lora():
    # LoRA has no experts or shared subspace: values that would be invalid for a mixture are irrelevant here.
    config = AdapterConfig(method="lora", rank=64, shared_rank=None, top_k=9)
    assert config.rank == 64


def test_unknown_json_field_is_named():
    with pytest.raises(ValueError, match="unknown field.*'experts'"):
        AdapterConfig.from_dict({"method": "malora", "experts": 8})


def test_invalid_json_file_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="adapter_config.json: not valid JSON"):
        AdapterConfig.from_file(path)


@pytest.mark.parametrize("text", ["5", "null", '"malora"', '[["rank", 4]]'])
def test_a_json_file_that_is_not_an_object_names_the_file_and_what_it_holds(tmp_path, text):
    # these raised TypeError ('int' object is not iterable, unhashable type: 'list') or a list of the string's
    # letters as unknown fields, naming no file
    path = tmp_path / "adapter_config.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"adapter_config.json: AdapterConfig: expected an object of fields.*found "
                                         + type(json.loads(text)).__name__):
        AdapterConfig.from_file(path)


def test_an_invalid_field_in_a_json_file_names_the_file(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"method": "malora", "rank": 0}')
    with pytest.raises(ValueError, match=r"adapter_config.json: AdapterConfig.rank=0 is invalid"):
        AdapterConfig.from_file(path)
