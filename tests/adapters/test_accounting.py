import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from malora_lightning.adapters import AdapterConfig, count_parameters, inject_adapters
from malora_lightning.adapters.accounting import ParameterCount

LLAMA2_7B = LlamaConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                        num_attention_heads=32, num_key_value_heads=32)


@pytest.mark.parametrize(
    ("settings", "trainable", "percent"),
    [
        ({"method": "malora", "rank": 12, "shared_rank": 32}, 158_859_264, 2.30),
        ({"method": "malora", "rank": 8, "shared_rank": 22}, 109_142_016, 1.59),  # MALoRA-Small
        ({"method": "molora", "rank": 8}, 151_191_552, 2.19),
        ({"method": "molora", "rank": 12}, 222_756_864, 3.20),  # MALoRA has 28.7 % fewer ("30 %")
        ({"method": "molora", "rank": 16}, 294_322_176, 4.19),  # accuracy-matched: MALoRA 46.0 % fewer ("48 %")
        ({"method": "lora", "rank": 64}, 143_130_624, 2.08),
        ({"method": "lora", "rank": 128, "train_A": False}, 157_286_400, 2.24),  # AsyLoRA (paper table: 157.29 M)
    ],
)
def test_llama2_7b_counts_match_the_paper(settings, trainable, percent):
    with torch.device("meta"):  # shapes only, no memory
        model = AutoModelForCausalLM.from_config(LLAMA2_7B)
    assert count_parameters(model).total == 6_738_415_616
    inject_adapters(model, AdapterConfig(**settings))
    count = count_parameters(model)
    assert count.trainable == trainable
    assert round(count.trainable_percent, 2) == percent


def test_hand_counted_tiny_layer():
    model = torch.nn.Sequential(torch.nn.Linear(10, 6, bias=False))
    model.get_submodule("0").weight.requires_grad_(False)
    inject_adapters(model, AdapterConfig(method="malora", rank=2, shared_rank=3, num_experts=4, target_modules=["0"]))
    # S_A 3*10 + P 4*2*3 + B 4*6*2 + router 4*10 = 30 + 24 + 48 + 40
    assert count_parameters(model).trainable == 142
    assert count_parameters(model).total == 142 + 60


@pytest.mark.parametrize("storage", [torch.uint8, torch.bfloat16, torch.float32])
def test_a_4bit_weight_counts_its_logical_values_whatever_its_storage_dtype(storage):
    """FSDP QLoRA stores the packed 4-bit values in bfloat16 (4 to an element), not uint8 (2 to an element)."""
    bnb = pytest.importorskip("bitsandbytes")
    layer = bnb.nn.Linear4bit(16, 8, bias=False, quant_storage=storage).to("cpu")  # quantized on the move
    assert type(layer.weight).__name__ == "Params4bit" and layer.weight.numel() == 128 // (2 * storage.itemsize)
    assert count_parameters(layer) == ParameterCount(trainable=0, total=16 * 8)


def test_tied_parameters_are_counted_once():
    model = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    model[1].weight = model[0].weight  # an output head tied to the input embeddings
    assert count_parameters(model) == ParameterCount(trainable=40, total=40)
