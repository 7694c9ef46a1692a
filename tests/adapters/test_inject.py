import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_layers,
    aux_loss,
    find_target_modules,
    inject_adapters,
    task_profile,
)
from tests.adapters.method_matrix import METHOD_CLASSES
from tests.helpers import tiny_config, tiny_model

FAMILY_TARGETS = {
    "llama": None,  # the paper's default module set
    "mistral": None,
    "qwen2": None,
    "gpt_neox": ["query_key_value", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_fc", "mlp.c_proj"],
}
METHODS = ["lora", "molora", "malora"]


def config_for(family: str, method: str, **overrides) -> AdapterConfig:
    targets = FAMILY_TARGETS[family]
    settings = dict(method=method, rank=2, shared_rank=4, num_experts=4, top_k=2)
    if targets is not None:
        settings["target_modules"] = targets
    settings.update(overrides)
    return AdapterConfig(**settings)


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
@pytest.mark.parametrize("method", METHODS)
def test_logits_unchanged_at_init_on_every_family(family, method):
    model = tiny_model(family)
    ids = torch.randint(3, 200, (2, 7))
    before = model(ids).logits
    inject_adapters(model, config_for(family, method))
    after = model(ids, attention_mask=torch.ones_like(ids)).logits
    assert torch.equal(before, after)
    layers = adapter_layers(model)
    assert len(layers) == 2 * (6 if FAMILY_TARGETS[family] is None else 3)
    expected_class = METHOD_CLASSES[method]
    assert all(type(layer) is expected_class for layer in layers.values())


@pytest.mark.parametrize("family", list(FAMILY_TARGETS))
def test_only_adapters_are_trainable(family):
    model = inject_adapters(tiny_model(family), config_for(family, "malora"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for name in trainable:
        assert name.rsplit(".", 1)[-1] in {"shared_A", "lora_P", "lora_B"} or name.endswith("router.weight"), name
    assert not any(p.requires_grad for n, p in model.named_parameters() if ".base_layer." in n)


def test_target_selection_by_suffix_regex_exclusion_and_layer():
    model = tiny_model("llama")
    assert find_target_modules(model, AdapterConfig(method="lora", target_modules=["q_proj"])) == [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    regex = AdapterConfig(method="lora", target_modules=r".*\.1\.mlp\.(up|down)_proj")
    assert find_target_modules(model, regex) == ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]
    excluded = AdapterConfig(method="lora", target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    assert all(name.endswith("q_proj") for name in find_target_modules(model, excluded))
    one_layer = AdapterConfig(method="lora", layers_to_transform=[1])
    names = find_target_modules(model, one_layer)
    assert len(names) == 6 and all(".layers.1." in name for name in names)
    all_linear = find_target_modules(model, AdapterConfig(method="lora", target_modules="all-linear"))
    assert len(all_linear) == 14 and "lm_head" not in all_linear  # 7 projections x 2 layers, no output head
    assert find_target_modules(model, AdapterConfig(method="lora", target_modules=["lm_head"])) == ["lm_head"]


def test_no_match_lists_the_models_linear_modules():
    with pytest.raises(ValueError) as error:
        inject_adapters(tiny_model("gpt2"), AdapterConfig(method="lora", target_modules=["q_proj"]))
    message = str(error.value)
    assert "target_modules=['q_proj']" in message and "matched no module" in message
    assert "c_attn (x2)" in message and "c_fc (x2)" in message and "lm_head (x1)" in message


def test_a_string_target_that_matches_nothing_is_explained_as_a_regex():
    with pytest.raises(ValueError, match=r"a string is a regular expression that must match a module's whole name"):
        inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules="proj"))


def test_list_entries_that_match_no_module_are_named():
    """The paper's targets on Phi-3 (fused qkv_proj, gate_up_proj) adapt down_proj alone: say which entries missed."""
    with pytest.warns(UserWarning, match=r"target_modules entries \['qkv_proj', 'gate_up_proj'\] match no linear "
                                         r"module of this model.*q_proj \(x2\)"):
        model = inject_adapters(tiny_model("llama"), AdapterConfig(
            method="lora", rank=2, target_modules=["q_proj", "qkv_proj", "gate_up_proj"]))
    assert sorted(name.rsplit(".", 1)[-1] for name in adapter_layers(model)) == ["q_proj", "q_proj"]


def test_layer_indices_that_name_no_layer_are_named():
    """A 32-layer recipe's [28, 29, 30, 31] on a 30-layer model adapted layers 28 and 29 alone, without a word."""
    with pytest.warns(UserWarning, match=r"layers_to_transform entries \[2, 7\] name no decoder layer of this model "
                                         r"\(it has layers 0 to 1\)"):
        model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2, target_modules=["q_proj"],
                                                                   layers_to_transform=[1, 2, 7]))
    assert list(adapter_layers(model)) == ["model.layers.1.self_attn.q_proj"]


def test_a_field_set_after_construction_is_checked_before_the_model_changes():
    """AdapterConfig checks its fields when built; one set later went unchecked: rank 0 was a ZeroDivisionError
    ('float division by zero') in the first layer's scaling, after every base parameter had been frozen."""
    model, config = tiny_model("llama"), AdapterConfig()
    config.rank = 0
    with pytest.raises(ValueError, match=r"AdapterConfig.rank=0 is invalid: expected an integer >= 1"):
        inject_adapters(model, config)
    assert not adapter_layers(model) and all(param.requires_grad for param in model.parameters())


def test_a_mapping_of_settings_is_refused_with_the_way_to_build_a_config():
    """A dict (as a YAML recipe's adapter section reads) was an AttributeError: 'dict' has no attribute 'validate'."""
    model = tiny_model("llama")
    with pytest.raises(TypeError, match=r"needs an AdapterConfig, not a dict; .* pass AdapterConfig\(\*\*settings\)"):
        inject_adapters(model, {"method": "lora", "rank": 2})
    assert not adapter_layers(model)


def test_injecting_twice_raises():
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    with pytest.raises(ValueError, match="already has 12 lora adapter layers"):
        inject_adapters(model, AdapterConfig(method="malora", rank=2, shared_rank=4))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"])
def test_a_model_peft_has_wrapped_is_refused(targets):
    """Injecting froze PEFT's own LoRA (its 512 trainable parameters went to 0), and "all-linear" wrapped PEFT's
    lora_A/lora_B and base_layer in adapters of ours."""
    from peft import LoraConfig, get_peft_model

    wrapped = get_peft_model(tiny_model("llama"), LoraConfig(r=4, target_modules=["q_proj"]))
    trainable = [name for name, param in wrapped.named_parameters() if param.requires_grad]
    with pytest.raises(ValueError, match=r"the model holds PEFT modules \(the model itself is a "
                                         r"PeftModel\): inject into the base model itself"):
        inject_adapters(wrapped, AdapterConfig(method="lora", rank=2, target_modules=targets))
    assert [name for name, param in wrapped.named_parameters() if param.requires_grad] == trainable
    with pytest.raises(ValueError, match=r"\('model.layers.0.self_attn.q_proj' is a Linear\)"):  # its transformers model
        inject_adapters(wrapped.base_model.model, AdapterConfig(method="lora", rank=2, target_modules=targets))


def test_peft_cannot_wrap_the_routers_of_a_mixture():
    """PEFT's all-linear wrapped every router; the routed kernels read router.weight itself, so the routers' LoRA
    changed nothing (logits exactly equal with its lora_B filled with noise)."""
    from peft import LoraConfig, get_peft_model

    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4))
    with pytest.raises(TypeError, match=r"model.layers.0.self_attn.q_proj: the router cannot be wrapped by PEFT "
                                        r"\(Linear\)"):
        get_peft_model(model, LoraConfig(r=2, target_modules="all-linear"))


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize(
    ("method", "switches", "frozen_adapter_tensors"),
    [
        ("lora", {}, set()),
        ("lora", {"train_A": False}, {"lora_A"}),  # AsyLoRA
        ("molora", {}, set()),
        ("molora", {"train_A": False}, {"lora_A"}),  # MoAsyLoRA
        ("malora", {}, set()),
        ("malora", {"train_shared_A": False}, {"shared_A"}),
        ("malora", {"train_P": False}, {"lora_P"}),
    ],
)
def test_optimizer_steps_change_exactly_the_trainable_tensors(method, switches, frozen_adapter_tensors):
    torch.manual_seed(0)
    model = inject_adapters(tiny_model("llama"), config_for("llama", method, dropout=0.0, **switches))
    model.train()
    before = snapshot(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.0)
    ids = torch.randint(3, 200, (4, 12))
    for _ in range(2):  # B starts at zero, so A/P/S_A first receive a gradient on the second step
        output = model(ids, attention_mask=torch.ones_like(ids), labels=ids)
        (output.loss + aux_loss(model)).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        tensor_name = name.rsplit(".", 1)[-1]
        is_adapter = ".base_layer." not in name and any(
            key in name for key in ("lora_A", "lora_B", "lora_P", "shared_A", "router."))
        should_change = is_adapter and tensor_name not in frozen_adapter_tensors
        assert changed == should_change, f"{name}: changed={changed}, expected {should_change}"
        assert param.requires_grad == should_change, name


def test_fused_moe_experts_the_targets_name_are_said_to_get_no_adapter():
    """transformers 5 fuses an MoE layer's experts into 3-D parameters: Qwen2-MoE's paper targets adapted its shared
    expert's gate/up/down_proj and nothing said that the routed experts (experts.down_proj) got no adapter."""
    with pytest.warns(UserWarning, match=r"selects 2 fused MoE expert weights \(e.g. "
                                         r"'model.layers.0.mlp.experts.down_proj', shape \(4, 32, 24\).*routed "
                                         r"experts get no adapter"):
        model = inject_adapters(tiny_model("qwen2_moe"), AdapterConfig(method="lora", rank=2))
    assert {name.split(".")[3] for name in adapter_layers(model)} == {"self_attn", "mlp"}
    assert all(".shared_expert." in name for name in adapter_layers(model) if ".mlp." in name)
    attention_only = tiny_model("qwen2_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # targets that leave the experts out on purpose are not warned about
        inject_adapters(attention_only, AdapterConfig(method="lora", rank=2, target_modules=["q_proj"]))


@pytest.mark.parametrize("family, routing", [
    ("phimoe", "mlp.router"),  # an nn.Linear subclass returning the routing: the forward failed on a tuple
    ("qwen2_moe", "mlp.shared_expert_gate"),  # a plain Linear [1, hidden] gating the shared expert: adapted silently
])
def test_moe_routers_and_gates_get_no_adapter(family, routing):
    model = inject_adapters(tiny_model(family), AdapterConfig(method="malora", rank=2, shared_rank=4,
                                                              target_modules="all-linear"))
    assert not any(name.endswith(routing) for name in adapter_layers(model))
    assert any(name.endswith("self_attn.o_proj") for name in adapter_layers(model))
    ids = torch.randint(3, 200, (2, 5))
    model(ids, attention_mask=torch.ones_like(ids))
    with pytest.warns(UserWarning, match=rf"selects 2 MoE routers or gates \(e.g. 'model.layers.0.{routing}'\), "
                                         "which get no adapter"):
        named = inject_adapters(tiny_model(family), AdapterConfig(method="lora", rank=2,
                                                                  target_modules=["q_proj", routing.split(".")[-1]]))
    assert all(name.endswith("q_proj") for name in adapter_layers(named))


def test_a_multimodal_base_is_adapted_in_its_language_model_alone():
    """Gemma 3 4B and up load as Gemma3ForConditionalGeneration: the paper targets also wrapped its vision tower's
    q/k/v_proj, which text never runs, so those adapters never trained and task_profile (malora-task-export) failed
    on them ("saw no real token")."""
    model = inject_adapters(tiny_model("gemma3"), AdapterConfig(method="malora", rank=2, shared_rank=4, dropout=0.0))
    layers = adapter_layers(model)
    assert len(layers) == 12 and all(name.startswith("model.language_model.layers.") for name in layers)
    profile = task_profile(model, [{"input_ids": torch.randint(3, 200, (2, 5))}])
    assert set(profile.gates) == set(layers)
    every_linear = tiny_model("gemma3")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the vision head's 3-D probe is no fused MoE expert weight
        inject_adapters(every_linear, AdapterConfig(method="lora", rank=2, target_modules="all-linear"))
    assert len(adapter_layers(every_linear)) == 14
    with pytest.raises(ValueError, match=r"matched no module.*; 15 more outside the text decoder \(e.g. "
                                         r"model.vision_tower.encoder.layers.0.self_attn.k_proj\) are never adapted"):
        inject_adapters(tiny_model("gemma3"), AdapterConfig(method="lora", target_modules=["fc1"]))


def test_a_shared_expert_as_wide_as_the_expert_count_is_adapted():
    """Qwen3-Next-80B-A3B has 512 experts and a 512-wide shared expert: its gate_proj and up_proj (one output per
    expert, by coincidence) were taken for routers, so the paper targets adapted its shared expert's down_proj
    alone, and a list naming them was told they were MoE routers or gates."""
    config = tiny_config("qwen2_moe")
    config.shared_expert_intermediate_size = config.num_experts
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match="fused MoE expert weights") as caught:
        model = inject_adapters(AutoModelForCausalLM.from_config(config), AdapterConfig(method="lora", rank=2))
    assert not [str(w.message) for w in caught if "routers or gates" in str(w.message)]
    assert sorted(name.rsplit(".", 1)[-1] for name in adapter_layers(model) if ".0.mlp." in name) == \
        ["down_proj", "gate_proj", "up_proj"]
    every_linear = inject_adapters(AutoModelForCausalLM.from_config(config),
                                   AdapterConfig(method="lora", rank=2, target_modules="all-linear"))
    assert not any(name.endswith("shared_expert_gate") for name in adapter_layers(every_linear))  # still a gate
