import copy
import math
import re

import bitsandbytes as bnb
import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

from malora_lightning.adapters import (
    AdapterConfig,
    AdapterLayer,
    LoRALinear,
    MALoRALinear,
    TaskProfile,
    adapter_layers,
    adapter_state_dict,
    inject_adapters,
    load_adapters,
    load_base_model,
    merge_adapters,
    merge_task,
    routed_layers,
    save_adapters,
    task_lora_model,
    task_lora_weights,
    task_profile,
)
from malora_lightning.adapters.model import CONFIG_ATTRIBUTE, CONTEXT_ATTRIBUTE, routing_context
from malora_lightning.data import MultiTaskDataModule
from tests.helpers import tiny_config, tiny_model, tiny_tokenizer

Q_PROJ = "model.layers.0.self_attn.q_proj"


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero B and a spread-out router, so every expert and gate carries signal."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.2)
            if hasattr(layer, "router"):
                layer.router.weight.normal_()
    return model


def adapted(method: str, family: str = "llama", **overrides) -> nn.Module:
    settings = dict(method=method, rank=2, shared_rank=6, num_experts=4, top_k=2, dropout=0.0)
    settings.update(overrides)
    return randomised(inject_adapters(tiny_model(family), AdapterConfig(**settings)))


def task_batches() -> list[dict[str, torch.Tensor]]:
    torch.manual_seed(1)
    padded = torch.ones(2, 6, dtype=torch.long)
    padded[1, 4:] = 0
    return [{"input_ids": torch.randint(5, 260, (2, 6)), "attention_mask": padded},
            {"input_ids": torch.randint(5, 260, (1, 5)), "attention_mask": torch.ones(1, 5, dtype=torch.long)}]


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def assert_plain(model: nn.Module) -> None:
    assert not adapter_layers(model)
    assert not hasattr(model, CONFIG_ATTRIBUTE) and not hasattr(model, CONTEXT_ATTRIBUTE)
    assert not model._forward_pre_hooks  # the routing hook is gone too


# ---------------------------------------------------------------------------------------------------- LoRA
@pytest.mark.parametrize("family", ["llama", "gpt2"])  # gpt2: Conv1D bases, weight stored [n, m]
def test_merged_lora_computes_the_adapted_function(family):
    model = adapted("lora", family, target_modules="all-linear", train_A=False)
    batch = task_batches()[0]
    expected = logits(model, batch)
    merge_adapters(model)
    assert_plain(model)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_merged_model_saves_and_reloads_as_a_plain_transformers_model(tmp_path):
    model = merge_adapters(adapted("lora"))
    batch = task_batches()[0]
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert not adapter_layers(reloaded)
    torch.testing.assert_close(logits(reloaded, batch), logits(model, batch), rtol=0, atol=0)


def test_a_lora_on_a_tied_output_head_merges_into_the_head_only(tmp_path):
    """SmolLM2 ties lm_head to the input embeddings: the merge gives the head its own weight (adding in place would
    change the embeddings as well: logits off by ~17 on this model), and the saved model keeps them apart."""
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.tie_word_embeddings = True
    model = AutoModelForCausalLM.from_config(config).eval()
    assert model.lm_head.weight is model.model.embed_tokens.weight
    embeddings = model.model.embed_tokens.weight.detach().clone()
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0,
                                                    target_modules=["lm_head", "q_proj"])))
    batch = task_batches()[0]
    expected = logits(model, batch)
    merge_adapters(model)
    assert_plain(model)
    assert torch.equal(model.model.embed_tokens.weight, embeddings)
    assert model.config.tie_word_embeddings is False  # what other loaders read: the head is its own weight now
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert reloaded.lm_head.weight is not reloaded.model.embed_tokens.weight
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method, factor, value", [("lora", "lora_B", math.nan), ("molora", "lora_B", math.nan),
                                                    ("lora", "lora_A", math.inf), ("molora", "lora_A", -math.inf)])
def test_adapters_holding_nan_are_refused_by_layer_before_anything_is_merged(method, factor, value):
    """A diverged fit's adapters were folded in: the base weights became NaN, and save_pretrained wrote them. Either
    factor of the update is checked (a check of B alone merged a NaN or infinite A)."""
    model = adapted(method)
    layers = adapter_layers(model)
    with torch.no_grad():
        getattr(layers[Q_PROJ], factor)[0, 0] = value
    with pytest.raises(ValueError, match=f"adapter layer '{Q_PROJ}' holds NaN or infinite values"):
        if method == "lora":
            merge_adapters(model)
        else:
            merge_task(model, TaskProfile({name: torch.full((4,), 0.25, dtype=torch.float64) for name in layers}, 1))
    assert adapter_layers(model).keys() == layers.keys()  # nothing unwrapped


@pytest.mark.parametrize("dequantize", ["false", 0, None])
def test_a_dequantize_that_is_not_a_bool_is_refused(dequantize):
    """dequantize="false" was truthy: it replaced every quantized layer by a plain one holding its dequantized
    weight."""
    model = adapted("lora")
    with pytest.raises(ValueError, match=f"dequantize={dequantize!r} is invalid: expected True or False"):
        merge_adapters(model, dequantize=dequantize)
    assert isinstance(model.get_submodule(Q_PROJ), LoRALinear)  # nothing merged


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_merge_adapters_refuses_a_mixture_and_points_to_the_task_merge(method):
    model = adapted(method)
    with pytest.raises(ValueError, match=f"{method} adapters.*task_profile.*merge_task"):
        merge_adapters(model)
    assert adapter_layers(model)  # untouched


# ---------------------------------------------------------------------------------------------------- bitsandbytes
@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_model("llama").save_pretrained(path)
    return path


def test_4bit_merge_needs_dequantize_and_names_the_layer(tiny_llama_dir):
    model = load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype="float32")
    inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0))
    with pytest.raises(ValueError, match=rf"'{Q_PROJ}' wraps a bitsandbytes Linear4bit.*dequantize=True.*unquantized"):
        merge_adapters(model)
    assert isinstance(model.get_submodule(Q_PROJ), LoRALinear)  # nothing changed


def test_4bit_dequantize_merge_equals_dequantized_base_plus_adapter(tiny_llama_dir):
    model = load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype="float32")
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0, target_modules="all-linear")))
    layer = model.get_submodule(Q_PROJ)
    weight = layer.base_layer.weight
    expected_weight = bnb.functional.dequantize_4bit(weight.data, weight.quant_state) \
        + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    batch = task_batches()[0]
    expected = logits(model, batch)  # a float32 Linear4bit on CPU computes with its dequantized weight
    merge_adapters(model, dequantize=True)
    assert_plain(model)
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert not getattr(model, "is_quantized", False) and not hasattr(model.config, "quantization_config")
    merged = model.get_submodule(Q_PROJ)
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.float32 and not merged.weight.requires_grad
    torch.testing.assert_close(merged.weight, expected_weight, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_dequantize_merge_leaves_no_4bit_layer_and_saves_a_loadable_model(tiny_llama_dir, tmp_path):
    """The paper's targets leave o_proj without an adapter: it is dequantized too, so the saved model is plain (it
    kept one 4-bit layer and the quantization config, and could not run once reloaded)."""
    model = load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype="float32")
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0)))  # q,k,v,gate,up,down
    batch = task_batches()[0]
    expected = logits(model, batch)
    merge_adapters(model, dequantize=True)
    assert not any(type(module).__module__.startswith("bitsandbytes") for module in model.modules())
    assert not hasattr(model.config, "quantization_config")
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(reloaded, batch), expected, rtol=1e-5, atol=1e-5)


def test_dequantized_layer_takes_the_dtype_its_inputs_arrive_in(tiny_llama_dir):
    """k-bit preparation keeps the hidden states float32 while nf4 computes in bf16: a bf16 plain layer would fail."""
    model = load_base_model(str(tiny_llama_dir), quantization="nf4", compute_dtype="bfloat16")
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0)))
    batch = task_batches()[0]
    expected = logits(model, batch)
    merge_adapters(model, dequantize=True)
    assert model.get_submodule(Q_PROJ).weight.dtype == torch.float32
    torch.testing.assert_close(logits(model, batch), expected, rtol=0.05, atol=0.1)  # its bf16 matmuls vs float32


def test_int8_dequantize_merge_holds_the_dequantized_weight_plus_the_update(tiny_llama_dir):
    model = load_base_model(str(tiny_llama_dir), quantization="int8")
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0, target_modules=["q_proj"])))
    layer = model.get_submodule(Q_PROJ)
    expected_weight = bnb.functional.int8_vectorwise_dequant(layer.base_layer.weight.data, layer.base_layer.weight.SCB) \
        + layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    merge_adapters(model, dequantize=True)
    merged = model.get_submodule(Q_PROJ)
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged.weight, expected_weight, rtol=1e-6, atol=1e-6)
    assert not getattr(model, "is_quantized", False)  # the other projections are dequantized too: a plain model
    assert not any(isinstance(module, bnb.nn.Linear8bitLt) for module in model.modules())
    assert logits(model, task_batches()[0]).isfinite().all()


class PlainThenQuantized(nn.Module):
    """A plain linear and a bitsandbytes module after it: the plain layer's adapter merges first."""

    def __init__(self, second: nn.Module) -> None:
        super().__init__()
        self.first = nn.Linear(8, 8)
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(self.first(x))


@pytest.mark.parametrize("second, targets, message", [
    (lambda: bnb.nn.Linear8bitLt(8, 8, has_fp16_weights=False), ["first", "second"],  # never moved: not quantized
     "adapter layer 'second' wraps a Linear8bitLt with no quantization scale (SCB) yet; move the model to its device"),
    (lambda: bnb.nn.OutlierAwareLinear(8, 8), ["first", "second"],
     "adapter layer 'second' wraps a bitsandbytes OutlierAwareLinear; only Linear4bit and Linear8bitLt layers can be "
     "dequantized for merging"),
    (lambda: bnb.nn.StableEmbedding(8, 8), ["first"],
     "layer 'second' is a bitsandbytes StableEmbedding; only Linear4bit and Linear8bitLt layers can be dequantized"),
])
def test_a_bitsandbytes_layer_that_cannot_be_dequantized_is_refused_before_anything_is_merged(second, targets, message):
    """The refusal came when the merge reached that layer, after the plain layer before it had been merged: the model
    was left half merged, its first adapter gone."""
    model = inject_adapters(PlainThenQuantized(second()),
                            AdapterConfig(method="lora", rank=2, dropout=0.0, target_modules=targets))
    randomised(model)
    weight = model.first.base_layer.weight.detach().clone()
    with pytest.raises(ValueError, match=re.escape(message)):
        merge_adapters(model, dequantize=True)
    assert list(adapter_layers(model)) == targets and isinstance(model.first, LoRALinear)
    assert torch.equal(model.first.base_layer.weight, weight) and hasattr(model, CONFIG_ATTRIBUTE)


def test_a_4bit_base_with_a_bias_keeps_it_when_dequantized(tmp_path):
    """Qwen2's q, k and v projections have a bias, which the plain nn.Linear that replaces the 4-bit layer copies."""
    qwen2 = tiny_model("qwen2")
    with torch.no_grad():
        for block in qwen2.model.layers:
            block.self_attn.q_proj.bias.normal_()  # initialised to zeros
    qwen2.save_pretrained(tmp_path)
    model = load_base_model(str(tmp_path), quantization="nf4", compute_dtype="float32")
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0, target_modules=["q_proj"])))
    bias = model.get_submodule(Q_PROJ).base_layer.bias.detach().clone()
    assert bias.count_nonzero() > 0
    batch = task_batches()[0]
    expected = logits(model, batch)
    merge_adapters(model, dequantize=True)
    merged = model.get_submodule(Q_PROJ)
    assert type(merged) is nn.Linear and torch.equal(merged.bias, bias)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


def test_a_weight_shared_in_a_model_without_a_config_is_untied_for_the_merge():
    """Two layers of a plain module sharing one weight: only the adapted layer takes the update."""
    model = PlainThenQuantized(nn.Linear(8, 8))
    model.second.weight = model.first.weight
    shared = model.first.weight.detach().clone()
    randomised(inject_adapters(model, AdapterConfig(method="lora", rank=2, dropout=0.0, target_modules=["first"])))
    layer = model.first
    update = layer.scaling * layer.lora_B.detach() @ layer.lora_A.detach()
    merge_adapters(model)
    assert model.first.weight is not model.second.weight
    assert torch.equal(model.second.weight, shared)
    torch.testing.assert_close(model.first.weight, shared + update, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- task profile
class ToyLM(nn.Module):
    """Embedding -> one linear: the routed layer's input is the embedding row of each token, chosen by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 3)
        self.proj = nn.Linear(3, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.proj(self.embed(input_ids))


# Router = identity, so each token's router probabilities are the rows below (embedding = their logs).
A_PROBS, B_PROBS, PAD_PROBS = [4 / 7, 2 / 7, 1 / 7], [0.1, 0.6, 0.3], [0.1, 0.2, 0.7]


@pytest.mark.parametrize("renormalize", [True, False])
def test_task_profile_is_the_mean_gate_over_real_tokens(renormalize):
    model = inject_adapters(ToyLM(), AdapterConfig(method="molora", rank=1, num_experts=3, top_k=2, dropout=0.0,
                                                   target_modules=["proj"], renormalize_top_k=renormalize))
    with torch.no_grad():
        model.embed.weight.copy_(torch.tensor([A_PROBS, B_PROBS, PAD_PROBS]).log())
        model.proj.router.weight.copy_(torch.eye(3))
    a, b, pad = 0, 1, 2
    batches = [{"input_ids": torch.tensor([[a, b, pad], [b, b, a]]), "attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]])},
               {"input_ids": torch.tensor([[a, pad]]), "attention_mask": torch.tensor([[1, 0]])}]
    # top-2 of a: experts 0 and 1; of b: experts 1 and 2. Real tokens: a three times, b three times.
    a_gates = [4 / 6, 2 / 6, 0.0] if renormalize else [4 / 7, 2 / 7, 0.0]
    b_gates = [0.0, 0.6 / 0.9, 0.3 / 0.9] if renormalize else [0.0, 0.6, 0.3]
    expected = [(3 * ga + 3 * gb) / 6 for ga, gb in zip(a_gates, b_gates)]
    model.train()
    model.embed.eval()

    profile = task_profile(model, batches)

    assert profile.num_tokens == 6 and set(profile.gates) == {"proj"}
    assert profile.gates["proj"].dtype == torch.float64
    torch.testing.assert_close(profile.gates["proj"], torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=1e-7)
    assert model.training and model.proj.training and not model.embed.training  # each module's mode restored
    assert routing_context(model).observers == []


# ---------------------------------------------------------------------------------------------------- task merge
def fixed_gate_reference(model: nn.Module, profile: TaskProfile, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of a float64 copy whose routed layers compute base(x) + scaling * sum_t g_t B_t D_t x, g the profile."""
    reference = copy.deepcopy(model).double()
    for name, layer in routed_layers(reference).items():
        gates = profile.gates[name]
        with torch.no_grad():
            delta = sum(gates[t] * layer.lora_B[t].t()
                        @ (layer.lora_P[t] @ layer.shared_A if isinstance(layer, MALoRALinear) else layer.lora_A[t])
                        for t in range(layer.num_experts))
        layer.forward = lambda x, base=layer.base_layer, delta=layer.scaling * delta: base(x) + x @ delta.t()
    with torch.no_grad():
        return reference(**batch).logits


@pytest.mark.parametrize("method, overrides, rank", [
    ("malora", dict(num_experts=4, rank=2, shared_rank=6), 6),  # d <= N*r: A' = S_A, rank d
    ("malora", dict(num_experts=2, rank=2, shared_rank=6), 4),  # d > N*r: stacked experts, rank N*r
    ("molora", dict(num_experts=3, rank=2), 6),
])
def test_task_merge_equals_the_mixture_with_gates_fixed_to_the_profile(method, overrides, rank):
    model = adapted(method, **overrides)
    batches = task_batches()
    profile = task_profile(model, batches)
    assert profile.num_tokens == sum(int(batch["attention_mask"].sum()) for batch in batches)
    expected = [fixed_gate_reference(model, profile, batch) for batch in batches]

    config, tensors = task_lora_weights(model, profile)
    assert (config.method, config.rank, config.dropout) == ("lora", rank, 0.0)
    assert math.isclose(config.scaling, model.malora_config.scaling)
    assert config.target_modules == list(routed_layers(model))
    lora = task_lora_model(copy.deepcopy(model), profile)
    assert lora.malora_config == config and getattr(lora, CONTEXT_ATTRIBUTE) is None
    assert all(type(layer) is LoRALinear for layer in adapter_layers(lora).values())
    assert not lora._forward_pre_hooks
    state = adapter_state_dict(lora)
    assert state.keys() == tensors.keys()
    assert all(torch.equal(state[key], tensors[key]) for key in tensors)
    merged = merge_task(copy.deepcopy(model), profile)
    assert_plain(merged)

    for batch, reference in zip(batches, expected):
        torch.testing.assert_close(logits(lora, batch), reference.float(), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(logits(merged, batch), reference.float(), rtol=1e-4, atol=1e-4)


def test_task_lora_model_saves_as_a_lora_adapter(tmp_path):
    model = adapted("malora")
    lora = task_lora_model(model, task_profile(model, task_batches()))
    save_adapters(lora, tmp_path / "task")
    reloaded = load_adapters(tiny_model("llama"), tmp_path / "task")
    batch = task_batches()[0]
    torch.testing.assert_close(logits(reloaded, batch), logits(lora, batch), rtol=0, atol=0)


def test_merge_task_refuses_lora_and_points_to_merge_adapters():
    model = adapted("lora")
    profile = TaskProfile(gates={}, num_tokens=0)
    for function in (merge_task, task_lora_weights, task_lora_model):
        with pytest.raises(ValueError, match="lora adapters.*merge_adapters"):
            function(model, profile)
    with pytest.raises(ValueError, match="lora adapters.*merge_adapters"):
        task_profile(model, task_batches())


def test_a_profile_that_does_not_match_the_model_is_refused_by_name():
    model = adapted("molora")
    profile = task_profile(model, task_batches()[:1])
    missing = TaskProfile({name: g for name, g in profile.gates.items() if name != Q_PROJ}, profile.num_tokens)
    extra = TaskProfile({**profile.gates, "lm_head": torch.full((4,), 0.25, dtype=torch.float64)}, profile.num_tokens)
    wrong_n = TaskProfile({**profile.gates, Q_PROJ: torch.full((5,), 0.2, dtype=torch.float64)}, profile.num_tokens)
    with pytest.raises(ValueError, match=f"TaskProfile lacks routed layer '{Q_PROJ}'"):
        merge_task(model, missing)
    with pytest.raises(ValueError, match="TaskProfile has layer 'lm_head', which is not routed"):
        task_lora_weights(model, extra)
    with pytest.raises(ValueError, match=rf"TaskProfile.gates\['{Q_PROJ}'\] has shape \(5,\).*num_experts=4"):
        task_lora_model(model, wrong_n)
    # merged into the base weight as NaN, and into a LoRA that save_adapters wrote and load_adapters refused
    # one non-finite gate among finite ones is refused as well (a check that some gate is finite let it through)
    for gates in ([math.nan] * 4, [0.5, 0.25, math.inf, 0.25]):
        not_finite = TaskProfile({**profile.gates, Q_PROJ: torch.tensor(gates, dtype=torch.float64)},
                                 profile.num_tokens)
        for function in (merge_task, task_lora_weights, task_lora_model):
            with pytest.raises(ValueError, match=rf"TaskProfile.gates\['{Q_PROJ}'\] holds NaN or infinite values"):
                function(model, not_finite)
    assert all(not isinstance(layer, LoRALinear) for layer in adapter_layers(model).values())
    assert isinstance(model.get_submodule(Q_PROJ), AdapterLayer)


def test_task_profile_takes_the_data_modules_task_loader():
    """`MultiTaskDataModule.task_dataloader` says it is for `task_profile`, but gives `TrainingBatch`es, which have no
    `get`: profiling its loader failed with an AttributeError. Its batches profile as the same tensors in a dict."""
    data = MultiTaskDataModule(tasks=["parity", "add_2digit"], max_length=64, batch_size=4,
                               max_train_examples_per_task=12)
    data.tokenizer_object = tiny_tokenizer()
    data.setup("fit")
    model = adapted("malora")
    loader = data.task_dataloader("parity", max_examples=5)
    as_dicts = [{"input_ids": batch.input_ids, "attention_mask": batch.attention_mask} for batch in loader]

    profile, expected = task_profile(model, loader), task_profile(model, as_dicts)

    assert profile.num_tokens == expected.num_tokens > 0
    assert all(torch.equal(profile.gates[name], expected.gates[name]) for name in expected.gates)


def test_task_profile_without_a_real_token_is_refused():
    model = adapted("molora")
    padding_only = {"input_ids": torch.randint(5, 260, (1, 4)), "attention_mask": torch.zeros(1, 4, dtype=torch.long)}
    with pytest.raises(ValueError, match=f"routed layer '{Q_PROJ}' saw no real token"):
        task_profile(model, [padding_only])
