"""`frozen_adapter_weights`: within a span, forwards without gradients reuse each layer's compute-dtype weights
instead of casting and stacking them every forward, with the same outputs; with gradients nothing is reused."""

import pytest
import torch

from benchmarks.op_count import build_layer, count_step, generation_step
from malora_lightning.adapters import frozen_adapter_weights

CASES = [("lora", "dense"), ("molora", "dense"), ("malora", "dense"), ("malora", "fused")]


def forward(layer: torch.nn.Module, x: torch.Tensor, autocast: bool) -> torch.Tensor:
    if hasattr(layer, "routing_context"):
        layer.routing_context.begin_forward()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return layer(x)


@pytest.mark.parametrize(("method", "kernel"), CASES)
@pytest.mark.parametrize("autocast", [False, True])
def test_reused_weights_give_the_same_outputs_and_go_with_the_span(method, kernel, autocast):
    layer = build_layer(method, 64, 96, torch.float32, 0.05, torch.device("cpu"), kernel=kernel).eval()
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 3, 64)
    with torch.no_grad():
        expected = [forward(layer, x[:, :k], autocast) for k in (3, 1)]
        with frozen_adapter_weights(layer):
            reused = [forward(layer, x[:, :k], autocast) for k in (3, 1)]  # a scoring forward, then a token
            assert len(layer.frozen_weights) == 1  # made once, for the compute dtype
    assert layer.frozen_weights is None
    for got, want in zip(reused, expected):
        assert torch.equal(got, want)


@pytest.mark.parametrize(("method", "kernel"), CASES)
def test_a_generated_token_no_longer_casts_or_stacks_the_weights(method, kernel):
    layer = build_layer(method, 64, 96, torch.bfloat16, 0.05, torch.device("cpu"), kernel=kernel).eval()
    x = torch.randn(2, 1, 64, dtype=torch.bfloat16)
    plain = count_step(layer, x, True, generation_step)
    with frozen_adapter_weights(layer):
        reused = count_step(layer, x, True, generation_step)
    weight_casts = {"lora": 2, "molora": 2, "malora": 3}[method]  # A, B; [router; A], B; [router; S_A], P, B
    assert plain.by_name["aten::to"] - reused.by_name.get("aten::to", 0) == weight_casts
    assert "aten::cat" not in reused.by_name and "aten::permute" not in reused.by_name  # nothing stacked either
    assert reused.top_level <= plain.top_level - (2 if method == "lora" else 5)


def test_with_gradients_nothing_is_reused():
    """Training inside a span: each forward casts afresh (its backward needs the graph of its own casts)."""
    layer = build_layer("malora", 64, 96, torch.float32, 0.0, torch.device("cpu")).train()
    x = torch.randn(2, 3, 64)
    grads = []
    for frozen in (False, True):
        layer.zero_grad(set_to_none=True)
        with frozen_adapter_weights(layer) if frozen else torch.enable_grad():
            forward(layer, x, False).square().sum().backward()
            if frozen:
                assert layer.frozen_weights == {}
        grads.append({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name
