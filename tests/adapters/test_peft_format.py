"""Adapter folders in PEFT's format, both ways; `load_adapted_model`; the model card; the save_pretrained trap.

The PEFT round trips run against the installed peft (the test extra installs it); without it they skip, saying why.
"""

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapters,
    save_adapters,
)
from malora_lightning.adapters.io import CARD_MARKER, load_adapted_model, read_adapter_folder, routed_up_projections
from malora_lightning.adapters.quantization import load_base_model
from tests.helpers import tiny_model

peft = pytest.importorskip("peft", reason="peft is not installed (pip install -e '.[dev]' installs it)")

IDS = torch.tensor([[5, 17, 99, 3, 42, 7], [8, 8, 120, 64, 1, 30]])


def randomised(model):
    """Every adapter tensor moved away from its initialisation (B starts at zero: the adapter would be a no-op)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for param in adapter_state_dict(model).values():
            param.add_(torch.randn_like(param) * 0.5)
    return model.eval()


def peft_randomised(model, config):
    """`model` under PEFT's LoRA `config`, its LoRA tensors moved away from their initialisation."""
    theirs = peft.get_peft_model(model, config)
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_" in name:
                param.add_(torch.randn_like(param) * 0.5)
    return theirs


def lora_model(family="llama", **settings):
    config = AdapterConfig(**{"method": "lora", "rank": 4, "dropout": 0.0, **settings})
    return randomised(inject_adapters(tiny_model(family), config))


def peft_load(folder, family="llama"):
    """`PeftModel.from_pretrained`, failing on any warning of PEFT's own (missing or unexpected keys, unknown config
    keys); transformers' deprecation notices to PEFT are not about the folder."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = peft.PeftModel.from_pretrained(tiny_model(family), str(folder))
    about_the_folder = [str(w.message) for w in caught if not issubclass(w.category, (FutureWarning, DeprecationWarning,
                                                                                      ResourceWarning))]
    assert about_the_folder == []
    return model.eval()


@pytest.mark.parametrize("family,settings", [
    ("llama", {}),
    ("llama", {"train_A": False, "target_modules": ["q_proj", "v_proj"]}),  # AsyLoRA
    ("llama", {"target_modules": ["up_proj"], "layers_to_transform": [1]}),  # not every up_proj: full names
    ("gpt2", {"target_modules": ["c_attn", "c_fc"]}),  # Conv1D: fan_in_fan_out
])
def test_peft_loads_our_lora_folder_with_every_key_and_equal_logits(tmp_path, family, settings):
    ours = lora_model(family, **settings)
    save_adapters(ours, tmp_path / "a", base_model="tiny-base")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "tiny-base"
    assert config["fan_in_fan_out"] == (family == "gpt2")

    theirs = peft_load(tmp_path / "a", family)
    lora_layers = [m for m in theirs.modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert len(lora_layers) == len(adapter_state_dict(ours)) // 2  # no module left without its adapter
    with torch.no_grad():
        torch.testing.assert_close(theirs(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-6)

    loaded = tiny_model(family)
    loaded.load_adapter(str(tmp_path / "a"))  # transformers' own PEFT integration
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(IDS).logits, ours(IDS).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_a_lora_folder_saved_by_peft_loads_with_equal_logits(tmp_path, use_rslora):
    config = peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "down_proj"], lora_dropout=0.1,
                             use_rslora=use_rslora, task_type="CAUSAL_LM")
    theirs = peft_randomised(tiny_model("llama"), config)
    theirs.save_pretrained(str(tmp_path / "peft"))

    ours = load_adapters(tiny_model("llama"), tmp_path / "peft")
    scaling = 16 / 2 if use_rslora else 16 / 4  # lora_alpha / sqrt(r) with rsLoRA, lora_alpha / r without
    assert {layer.scaling for layer in adapter_layers(ours).values()} == {scaling}
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS).logits, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)


def test_a_peft_folder_with_a_null_use_rslora_scales_as_plain_lora(tmp_path):
    """PEFT reads null as off: alpha / r, here 16 / 4."""
    theirs = peft_randomised(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    config_file = tmp_path / "peft" / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "use_rslora": None}))
    ours = load_adapters(tiny_model("llama"), tmp_path / "peft")
    assert {layer.scaling for layer in adapter_layers(ours).values()} == {4.0}


def test_a_peft_folder_without_lora_alpha_scales_as_peft_loads_it(tmp_path):
    """PEFT fills a config without lora_alpha with its default, 8: r = 4 scales by 8 / 4 = 2 (not alpha = r, 1)."""
    theirs = peft_randomised(tiny_model("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    theirs.save_pretrained(str(tmp_path / "peft"))
    config_file = tmp_path / "peft" / "adapter_config.json"
    config = json.loads(config_file.read_text())
    del config["lora_alpha"]
    config_file.write_text(json.dumps(config))

    ours = load_adapters(tiny_model("llama"), tmp_path / "peft")
    assert {layer.scaling for layer in adapter_layers(ours).values()} == {2.0}
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS).logits, peft_load(tmp_path / "peft")(IDS).logits, rtol=0,
                                   atol=1e-6)


def test_a_peft_lora_of_the_head_saved_with_its_base_weight_loads_and_a_changed_base_weight_is_refused(tmp_path):
    """PEFT saves an adapted lm_head's base weight beside its LoRA (save_embedding_layers="auto") and loads it over
    the base's: that extra tensor failed our load. The copy is checked against the model's own weight, never loaded."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "lm_head"], init_lora_weights=False)
    theirs = peft.get_peft_model(tiny_model("llama"), config)
    theirs.save_pretrained(str(tmp_path / "peft"))
    weights = tmp_path / "peft" / "adapter_model.safetensors"
    head = "base_model.model.lm_head.base_layer.weight"
    assert head in load_file(str(weights))  # what PEFT wrote: the case this test is about

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours = load_adapters(tiny_model("llama"), tmp_path / "peft")
    # the head's base layer is the text model's, not a vision tower's module whose tensors are skipped
    assert not [w for w in caught if "outside the text decoder" in str(w.message)]
    assert set(adapter_layers(ours)) >= {"lm_head", "model.layers.0.self_attn.q_proj"}
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS).logits, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)

    tensors = load_file(str(weights))
    tensors[head] = tensors[head] * 1.01  # a head trained or taken from another base
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=rf"adapter_model.safetensors: tensor '{head}' .* differs from this model's "
                                         r".*save_embedding_layers=False"):
        load_adapters(tiny_model("llama"), tmp_path / "peft")
    save_file({**tensors, head: tensors[head][:-1]}, str(weights))  # the head of a base with another vocabulary
    with pytest.raises(ValueError, match=rf"tensor '{head}' \(shape \(271, 32\), torch.float32\), .* differs from "
                                         r"this model's \(shape \(272, 32\), torch.float32\)"):
        load_adapters(tiny_model("llama"), tmp_path / "peft")
    save_file({key: value for key, value in tensors.items() if ".lora_B." in key}, str(weights))  # B alone
    with pytest.raises(ValueError, match=r"adapter_model.safetensors: no 'base_model\.model\.<module>\.lora_A\.weight' "
                                         r"tensor; is this a PEFT LoRA folder\?"):
        load_adapters(tiny_model("llama"), tmp_path / "peft")
    other = dict(tensors)
    other["base_model.model.model.norm.base_layer.weight"] = other.pop(head)  # a module without a LoRA: not a copy
    save_file(other, str(weights))
    with pytest.raises(ValueError, match=r"tensor '.*norm.base_layer.weight' is not a linear layer's lora_A"):
        load_adapters(tiny_model("llama"), tmp_path / "peft")


def test_a_float32_copy_of_the_heads_base_weight_matches_the_same_base_loaded_in_bfloat16(tmp_path):
    """The copy is compared in the narrower dtype: in float32 the bfloat16 base's rounded weight differed from it."""
    config = peft.LoraConfig(r=2, lora_alpha=4, target_modules=["lm_head"], init_lora_weights=False)
    peft.get_peft_model(tiny_model("llama"), config).save_pretrained(str(tmp_path / "peft"))
    assert load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))[
        "base_model.model.lm_head.base_layer.weight"].dtype == torch.float32
    model = load_adapters(tiny_model("llama").to(torch.bfloat16), tmp_path / "peft")
    assert "lm_head" in adapter_layers(model)


def test_peft_settings_we_cannot_represent_are_named(tmp_path):
    theirs = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True))
    theirs.save_pretrained(str(tmp_path / "dora"))
    with pytest.raises(ValueError, match=r"adapter_config.json: use_dora=True is not supported"):
        load_adapters(tiny_model("llama"), tmp_path / "dora")
    for init in ("pissa", "olora"):  # they change the base, which PEFT redoes on load: our load differed by 3-5
        changed = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"],
                                                                            init_lora_weights=init))
        changed.save_pretrained(str(tmp_path / init))
        with pytest.raises(ValueError, match=rf"init_lora_weights='{init}' is not supported: that init changes the "
                                             "base weights"):
            load_adapters(tiny_model("llama"), tmp_path / init)
    embedding = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["embed_tokens"]))
    embedding.save_pretrained(str(tmp_path / "embedding"))
    with pytest.raises(ValueError, match=r"tensor '.*embed_tokens.*' is not a linear layer's lora_A or "
                                         r"lora_B weight"):  # it asked whether the folder came from another base
        load_adapters(tiny_model("llama"), tmp_path / "embedding")
    ia3 = peft.get_peft_model(tiny_model("llama"), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
    ia3.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(ValueError, match=r"peft_type 'IA3' is not supported"):
        load_adapters(tiny_model("llama"), tmp_path / "ia3")


@pytest.mark.parametrize("field, value, refused", [
    ("use_qalora", True, True),  # pools the input in groups: A is not plain LoRA's
    ("use_bdlora", {"target_modules_bd_a": ["q_proj"], "nblocks": 2}, True),
    ("kasa_config", {}, False),  # an empty config is the neutral value
    ("kasa_config", {"svd_method": "full"}, True),  # truncates the base's singular values
    ("arrow_config", {"top_k": 2}, True),
    ("monteclora_config", {"num_experts": 4}, True),
    ("a_later_peft_setting", 3, False),  # unknown: warned, loaded
])
def test_peft_settings_that_change_the_tensors_meaning_are_refused_and_unknown_ones_named(tmp_path, field, value,
                                                                                           refused):
    """Settings of PEFT 0.21 missing from the refused list (QALoRA, BD-LoRA, KaSA, Arrow, MonteCLoRA) loaded as
    plain LoRA without a word; a setting this library does not know now says so."""
    peft_randomised(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "peft"))
    with warnings.catch_warnings():  # every setting PEFT 0.21 writes for a plain LoRA is known
        warnings.filterwarnings("error", message=".*which load_adapters does not know")
        load_adapters(tiny_model("llama"), tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), field: value}))
    if refused:
        with pytest.raises(ValueError, match=rf"adapter_config.json: {field}=.* is not supported"):
            load_adapters(tiny_model("llama"), tmp_path / "peft")
    elif field == "a_later_peft_setting":
        with pytest.warns(UserWarning, match=r"adapter_config.json sets a_later_peft_setting=3, which load_adapters "
                                             r"does not know"):
            load_adapters(tiny_model("llama"), tmp_path / "peft")
    else:
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*which load_adapters does not know")
            load_adapters(tiny_model("llama"), tmp_path / "peft")


def test_known_settings_at_any_value_and_a_later_setting_left_neutral_load_without_a_warning(tmp_path):
    """A default save writes most settings at their neutral value, so only a setting set otherwise shows whether it
    is known: these are read by load_adapters or leave the tensors plain LoRA's (bookkeeping, training-time only),
    set as a user would. A later PEFT's setting at a neutral value (as every save of that PEFT writes it) is not
    named either: it would be on every load."""
    peft_randomised(tiny_model("llama"), peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(
        str(tmp_path / "peft"))
    config_path = tmp_path / "peft" / "adapter_config.json"
    config_path.write_text(json.dumps({**json.loads(config_path.read_text()), **{
        "task_type": "CAUSAL_LM", "revision": "main", "inference_mode": False,
        "auto_mapping": {"base_model_class": "LlamaForCausalLM", "parent_library": "transformers"},
        "exclude_modules": ["k_proj"], "lora_dropout": 0.1, "fan_in_fan_out": True, "use_rslora": True,
        "init_lora_weights": "gaussian", "layers_to_transform": [0, 1], "layers_pattern": "layers",
        "megatron_config": {"tensor_model_parallel_size": 1}, "runtime_config": {"ephemeral_gpu_offload": True},
        "eva_config": {"rho": 2.0}, "velora_config": {"rank": 4}, "qalora_group_size": 32,
        "ensure_weight_tying": True,
        "a_later_setting": None, "a_later_flag": False, "a_later_list": [], "a_later_config": {}, "a_later_name": "",
    }}))
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*which load_adapters does not know")
        load_adapters(tiny_model("llama"), tmp_path / "peft")


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_a_mixture_folder_follows_peft_conventions_and_says_why_peft_cannot_load_it(tmp_path, method):
    model = randomised(inject_adapters(tiny_model("llama"), AdapterConfig(method=method, rank=2, shared_rank=4,
                                                                           num_experts=3)))
    save_adapters(model, tmp_path / "a", base_model="tiny-base", task_scores={"arith": 0.5, "sentiment": None})
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == method.upper() and config["base_model_name_or_path"] == "tiny-base"
    assert config["num_experts"] == 3 and config["library"] == "malora_lightning"
    keys = set(load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    assert "base_model.model.model.layers.0.mlp.up_proj.lora_B.weight" in keys
    assert "base_model.model.model.layers.0.mlp.up_proj.router.weight" in keys

    card = (tmp_path / "a" / "README.md").read_text()
    total = sum(p.numel() for p in adapter_state_dict(model).values())
    for expected in (CARD_MARKER, "tiny-base", f"{total:,}", "| arith | 50.0 % |", "| sentiment | – |",
                     f"KeyError: '{method.upper()}'", "up_proj ×2"):
        assert expected in card, expected
    with pytest.raises(KeyError, match=method.upper()):  # what the card warns about
        peft.PeftModel.from_pretrained(tiny_model("llama"), str(tmp_path / "a"))


@pytest.mark.parametrize("frozen", [(), ("train_shared_A",)])
def test_the_model_card_counts_the_adapter_tensors_that_train(tmp_path, frozen):
    """The card said "0 trainable when saved" for every folder: it counted the detached copies that are saved."""
    model = inject_adapters(tiny_model("llama"), AdapterConfig(rank=2, shared_rank=4, num_experts=3,
                                                               **{switch: False for switch in frozen}))
    save_adapters(model, tmp_path / "a")
    state = adapter_state_dict(model)
    total = sum(p.numel() for p in state.values())
    trainable = sum(p.numel() for p in state.values() if p.requires_grad)
    assert 0 < trainable < total if frozen else 0 < trainable == total
    assert f"| adapter parameters | {total:,} ({trainable:,} trainable when saved) |" in \
        (tmp_path / "a" / "README.md").read_text()


def test_a_readme_the_user_wrote_is_kept(tmp_path):
    (tmp_path / "a").mkdir()
    save_adapters(lora_model(), tmp_path / "a")
    (tmp_path / "a" / "README.md").write_text("# my notes on this adapter\n")
    save_adapters(lora_model(), tmp_path / "a")
    assert (tmp_path / "a" / "README.md").read_text() == "# my notes on this adapter\n"


def test_our_earlier_layout_still_loads(tmp_path):
    """Folders written before the PEFT format: the AdapterConfig as JSON, keys without prefix or ".weight"."""
    model = randomised(inject_adapters(tiny_model("llama"), AdapterConfig(rank=2, shared_rank=4, num_experts=3)))
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "adapter_config.json").write_text(model.malora_config.to_json())
    up = routed_up_projections(model)  # each B_t stored [m, r], as in every folder
    save_file({k: (v.transpose(1, 2) if k in up else v).detach().contiguous() for k, v in adapter_state_dict(model).items()},
              str(tmp_path / "old" / "adapter_model.safetensors"), metadata={"format": "malora_lightning"})
    loaded = load_adapters(tiny_model("llama"), tmp_path / "old")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- load_adapted_model
@pytest.mark.parametrize("method", ["lora", "malora"])
def test_load_adapted_model_reads_the_base_from_the_folder(tmp_path, tiny_model_dir, method):
    base = load_base_model(str(tiny_model_dir))
    model = randomised(inject_adapters(base, AdapterConfig(method=method, rank=2, shared_rank=4, num_experts=3)))
    save_adapters(model, tmp_path / "a")
    assert read_adapter_folder(tmp_path / "a").base_model == str(tiny_model_dir)

    loaded = load_adapted_model(tmp_path / "a")
    assert not loaded.training and not any(p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model(IDS).logits, rtol=0, atol=0)


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_load_adapted_model_rebuilds_the_quantized_base_as_it_was_trained(tmp_path, tiny_model_dir, compute_dtype):
    """It loaded a 4-bit base without training's float32 copies of the other weights (norms, embeddings, head) and
    with 'auto' compute whatever the adapter had trained with: on SmolLM2 the logits moved by up to 16 %."""
    from malora_lightning.module import MALoRAModule

    module = MALoRAModule(model_name_or_path=str(tiny_model_dir), quantization="nf4", compute_dtype=compute_dtype,
                          adapter=AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=3))
    module.configure_model()
    randomised(module.model)
    save_adapters(module.model, tmp_path / "a")
    assert read_adapter_folder(tmp_path / "a").base_compute_dtype == compute_dtype

    loaded = load_adapted_model(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, module.model.eval()(IDS).logits, rtol=0, atol=0)


def test_a_base_loaded_by_a_relative_path_is_recorded_for_loading_from_any_directory(tmp_path, tiny_model_dir,
                                                                                     monkeypatch):
    """The folder recorded the base as typed ('tiny'): from any other directory load_adapted_model failed, 'could not
    load model 'tiny''. A hub id is no folder here, and stays as given."""
    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "start" / "tiny").symlink_to(tiny_model_dir)
    monkeypatch.chdir(tmp_path / "start")
    model = randomised(inject_adapters(load_base_model("tiny"), AdapterConfig(method="lora", rank=2)))
    save_adapters(model, tmp_path / "a")
    save_adapters(model, tmp_path / "named", base_model="./tiny")
    save_adapters(model, tmp_path / "hub", base_model="HuggingFaceTB/SmolLM2-135M-Instruct")
    assert read_adapter_folder(tmp_path / "a").base_model == read_adapter_folder(tmp_path / "named").base_model \
        == str(tmp_path / "start" / "tiny")
    assert read_adapter_folder(tmp_path / "hub").base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"

    monkeypatch.chdir(tmp_path / "elsewhere")
    loaded = load_adapted_model(tmp_path / "a")
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, model.eval()(IDS).logits, rtol=0, atol=0)


def test_load_adapted_model_names_a_missing_or_wrong_base(tmp_path, tiny_model_dir):
    save_adapters(lora_model(), tmp_path / "a")  # a model built from a config: no base name to record
    with pytest.raises(ValueError, match=r"does not name its base model .* pass base_model="):
        load_adapted_model(tmp_path / "a")
    loaded = load_adapted_model(tmp_path / "a", base_model=str(tiny_model_dir), quantization=None)
    assert len(adapter_state_dict(loaded)) == len(adapter_state_dict(lora_model()))

    gpt2 = inject_adapters(tiny_model("gpt2"), AdapterConfig(method="lora", rank=2, target_modules=["c_fc"]))
    save_adapters(gpt2, tmp_path / "gpt2", base_model=str(tiny_model_dir))  # a folder that names the wrong base
    with pytest.raises(ValueError, match=r"matched no module"):
        load_adapted_model(tmp_path / "gpt2")
    other = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))
    with torch.no_grad():
        other.model.layers[0].self_attn.q_proj.lora_A.data = torch.zeros(2, 7)
    save_adapters(other, tmp_path / "shape", base_model=str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"has shape \(2, 7\), the model expects .* different base model"):
        load_adapted_model(tmp_path / "shape")


def test_a_missing_adapter_folder_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"adapter folder .*nowhere not found"):
        load_adapted_model(tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------- save trap
def test_save_pretrained_with_injected_adapters_is_refused_and_says_what_to_do(tmp_path):
    model = lora_model()
    for candidate in (model, copy.deepcopy(model)):
        with pytest.raises(ValueError, match=r"save_pretrained on a model with 12 injected lora adapter layers .* "
                                             r"save_adapters\(model, folder\)"):
            candidate.save_pretrained(tmp_path / "full")
    assert not (tmp_path / "full").exists()


def test_a_folder_with_an_moe_gate_adapter_loads_with_equal_logits(tmp_path, monkeypatch):
    """inject_adapters leaves an MoE layer's routers and gates out, but PEFT's "all-linear" on Qwen2-MoE adapts
    shared_expert_gate, and so did ours before: such folders stopped loading ("does not belong to any adapter of this
    model"). A folder's trained gate adapters load as they were saved."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    theirs = peft_randomised(tiny_model("qwen2_moe"), config)
    theirs.save_pretrained(str(tmp_path / "peft"))
    ours = load_adapters(tiny_model("qwen2_moe"), tmp_path / "peft")
    assert "model.layers.0.mlp.shared_expert_gate" in adapter_layers(ours)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(IDS).logits, theirs.eval()(IDS).logits, rtol=0, atol=1e-6)

    import malora_lightning.adapters.inject as inject  # a folder of ours from before gates were left out
    with monkeypatch.context() as patched:
        patched.setattr(inject, "moe_routing_linears", lambda model: [])
        saved = randomised(inject_adapters(tiny_model("qwen2_moe"), AdapterConfig(
            method="malora", rank=2, shared_rank=4, dropout=0.0, target_modules="all-linear")))
    save_adapters(saved, tmp_path / "ours")
    loaded = load_adapters(tiny_model("qwen2_moe"), tmp_path / "ours").eval()
    assert set(adapter_layers(loaded)) == set(adapter_layers(saved))
    with torch.no_grad():
        torch.testing.assert_close(loaded(IDS).logits, saved(IDS).logits, rtol=0, atol=1e-6)
