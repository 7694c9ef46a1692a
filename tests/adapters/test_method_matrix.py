"""One battery over the method matrix: every adapter method (tests/adapters/method_matrix.py) x every base (float64,
float32 and bfloat16 weights, nf4 and int8 bitsandbytes on CPU), as PEFT's custom-model tests run one battery over a
case table. Each case injects into a tiny Llama and checks:

- forward: each adapter layer's output equals its literal `reference_forward` (to 1e-10 in float64, else within the
  base dtype's tolerance), with random B and router so that every path carries signal;
- backward: a training loss gives gradients to exactly the case's trainable adapter tensors, non-zero, and to nothing
  else (base weights and ablation-frozen tensors get none);
- save/load: the adapters saved to a folder and loaded into a fresh copy of the same base give the same logits.
"""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_layers,
    aux_loss,
    inject_adapters,
    load_adapters,
    load_base_model,
    save_adapters,
)
from tests.adapters.method_matrix import METHOD_CASES, MethodCase
from tests.helpers import tiny_model

# base -> (kind, dtype of inputs to a layer, forward tolerance (rtol, atol))
BASES = {
    "float64": ("dense", torch.float64, (1e-10, 1e-10)),
    "float32": ("dense", torch.float32, (1e-5, 1e-5)),
    "bfloat16": ("dense", torch.bfloat16, (1.6e-2, 1e-2)),  # the sum is rounded to bf16 once on either path
    "nf4": ("bitsandbytes", torch.float32, (1e-5, 1e-5)),
    "int8": ("bitsandbytes", torch.float32, (1e-5, 1e-5)),
}
BASE_LAYER_TYPES = {"nf4": bnb.nn.Linear4bit, "int8": bnb.nn.Linear8bitLt}


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-llama-matrix")
    tiny_model("llama").save_pretrained(path)
    return path


def make_base(base: str, folder) -> torch.nn.Module:
    kind, dtype, _ = BASES[base]
    if kind == "dense":
        return tiny_model("llama").to(dtype)
    return load_base_model(str(folder), quantization=base, compute_dtype="float32")


def make_config(case: MethodCase, base: str) -> AdapterConfig:
    return AdapterConfig(**case.settings, rank=2, shared_rank=6, num_experts=4, top_k=2, dropout=0.0,
                         target_modules=["q_proj", "v_proj", "down_proj"],
                         adapter_dtype="float64" if base == "float64" else "float32")


def randomize_adapters(model: torch.nn.Module) -> None:
    """B starts at zero (the adapter adds nothing); random B and router make every path count."""
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in adapter_layers(model).values():
            layer.lora_B.normal_(std=0.5)
            if hasattr(layer, "router"):
                layer.router.weight.normal_()


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("case", METHOD_CASES, ids=lambda case: case.name)
def test_method_matrix_battery(case, base, tiny_llama_dir, tmp_path):
    run_battery(case, base, tiny_llama_dir, tmp_path)


def test_the_battery_fails_a_wrong_case_and_a_wrong_kernel(tiny_llama_dir, tmp_path, monkeypatch):
    """The battery is a real check: a case that misstates the trainable tensors, or a kernel that disagrees with its
    equations, fails it."""
    lora = next(case for case in METHOD_CASES if case.name == "lora")
    run_battery(lora, "float32", tiny_llama_dir, tmp_path / "right")
    misstated = MethodCase("lora-as-asylora", lora.settings, lora.layer_class, frozenset({"lora_B"}),
                           frozenset({"lora_A"}))
    with pytest.raises(AssertionError):
        run_battery(misstated, "float32", tiny_llama_dir, tmp_path / "misstated")
    original = lora.layer_class.reference_delta
    monkeypatch.setattr(lora.layer_class, "reference_delta", lambda self, x, shape: 2 * original(self, x, shape))
    with pytest.raises(AssertionError, match="q_proj"):
        run_battery(lora, "float32", tiny_llama_dir, tmp_path / "kernel")


def run_battery(case: MethodCase, base: str, tiny_llama_dir, tmp_path) -> None:
    _, input_dtype, (rtol, atol) = BASES[base]
    model = inject_adapters(make_base(base, tiny_llama_dir), make_config(case, base))
    randomize_adapters(model)
    layers = adapter_layers(model)
    assert len(layers) == 2 * 3 and all(type(layer) is case.layer_class for layer in layers.values())
    if base in BASE_LAYER_TYPES:
        assert all(isinstance(layer.base_layer, BASE_LAYER_TYPES[base]) for layer in layers.values())

    # forward: the layer's kernel equals its equations
    model.train()
    torch.manual_seed(2)
    for name, layer in layers.items():
        x = torch.randn(3, 5, layer.in_features, dtype=input_dtype)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), layer.reference_forward(x), rtol=rtol, atol=atol, msg=name)

    # backward: gradients reach exactly the trainable adapter tensors
    ids = torch.randint(3, 200, (2, 8))
    output = model(ids, attention_mask=torch.ones_like(ids), labels=ids)
    (output.loss + aux_loss(model)).backward()  # aux_loss is 0 without routers
    with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    expected = {f"{layer_name}.{tensor}" for layer_name in layers for tensor in case.trainable}
    assert with_grad == trainable == expected
    assert all(model.get_parameter(name).grad.abs().sum() > 0 for name in expected)
    for layer_name, layer in layers.items():
        assert set(layer.adapter_parameters()) == case.trainable | case.frozen, layer_name

    # save/load: a fresh base with the saved adapters computes the same logits
    model.eval()
    with torch.no_grad():
        expected_logits = model(ids).logits
    folder = save_adapters(model, tmp_path / "adapter")
    reloaded = load_adapters(make_base(base, tiny_llama_dir), folder).eval()
    assert {type(layer) for layer in adapter_layers(reloaded).values()} == {case.layer_class}
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, expected_logits, rtol=0, atol=0)
