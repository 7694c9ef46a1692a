"""kernel="fused" (the dense kernel's routing as Triton kernels) against kernel="dense" (plain ops), run on CPU
through Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1): forward, balance statistics,
z-loss and every gradient, on token counts that span several kernel blocks and expert counts and ranks that are not
powers of two."""

import pytest
import torch
from torch import nn

from benchmarks.fused_check import CASES, Case, compare, make_layer, training_step
from malora_lightning.adapters.fused_routing import BLOCK_TOKENS, route_forward
from malora_lightning.adapters.kernels import fused_routing_applies
from malora_lightning.adapters.routing import top_experts

IN, OUT = 24, 20
TOKENS = 2 * BLOCK_TOKENS + 13  # three blocks, the last one partial


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.label)
def test_fused_routing_matches_the_plain_ops(case: Case):
    """benchmarks/fused_check.py's cases, which the GPU suite runs on CUDA: float32 with a left-padded mask (the
    statistics weigh real tokens only), both gate rules, with and without dropout; bf16 autocast with dropout."""
    comparisons = compare(case, torch.device("cpu"))
    assert {"router.weight", "lora_B", "x", "balance", "z_loss"} <= {c.tensor for c in comparisons}
    assert [c for c in comparisons if not c.ok] == []


def test_fused_routing_in_evaluation_matches_and_hands_back_nothing():
    x = torch.randn(TOKENS, IN)
    outputs = []
    for kernel in ("dense", "fused"):
        layer = make_layer("malora", kernel).eval()
        forward = layer.routing_context.begin_forward()
        with torch.no_grad():
            outputs.append(layer(x))
        assert forward.statistics == []
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (4, 1), (8, 2), (6, 6)])
def test_route_forward_follows_the_routing_equations(num_experts, top_k):
    """Against a hand-written float64 reference: softmax, top-k by decreasing probability, renormalised gates
    times the scale, each expert's rank-space hidden states times its gate, balance statistics, logsumexp."""
    torch.manual_seed(num_experts)
    rank, scale = 3, 1.5
    logits_wide = torch.randn(TOKENS, num_experts + 4)  # a column slice, as the fused first projection gives it
    logits = logits_wide[:, 2:2 + num_experts]
    hidden = torch.randn(TOKENS, num_experts * rank)
    weights = torch.rand(TOKENS)
    routed = route_forward(logits, hidden, num_experts, rank, weights, top_k, True, scale, True, True)

    probs = torch.softmax(logits.double(), dim=-1)
    values, experts = probs.topk(top_k, dim=-1)
    gates = torch.zeros_like(probs).scatter(1, experts, scale * values / values.sum(-1, keepdim=True))
    selection = torch.zeros_like(probs).scatter(1, experts, 1.0 / top_k)
    gated = (hidden.double().unflatten(1, (num_experts, rank)) * gates.unsqueeze(-1)).flatten(1)

    def close(fused: torch.Tensor, reference: torch.Tensor) -> None:  # float32 kernels, float64 reference
        torch.testing.assert_close(fused.double(), reference, rtol=1e-5, atol=1e-6)

    close(routed.probs, probs)
    assert torch.equal(routed.experts, experts)
    close(routed.gated, gated)
    close(routed.balance, torch.cat([weights.double() @ probs, weights.double() @ selection]))
    close(routed.lse, torch.logsumexp(logits.double(), dim=-1))


def test_top_k_ties_go_to_the_lower_expert_index():
    logits = torch.tensor([[1.0, 3.0, 3.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    routed = route_forward(logits, torch.ones(2, 4), 4, 1, None, 2, True, 1.0, False, False)
    assert routed.experts.tolist() == [[1, 2], [0, 1]]
    assert routed.gated.tolist() == [[0.0, 0.5, 0.5, 0.0], [0.5, 0.5, 0.0, 0.0]]
    assert routed.balance is None and routed.lse is None


@pytest.mark.parametrize("num_experts", [3, 4])
def test_nan_router_logits_pick_the_experts_top_experts_picks(num_experts):
    """A NaN logit (a diverged router, an overflowed input) ranks above every number, as in torch's sort: the fused
    kernel's comparisons never matched it and handed back expert index NP (4 here: past the last expert) for an
    all-NaN row, which routing observers count into another task's bin or, past the padding bin, out of range."""
    logits = torch.randn(4, num_experts)
    logits[1] = float("nan")
    logits[2, 2] = float("nan")
    routed = route_forward(logits, torch.ones(4, 2 * num_experts), num_experts, 2, None, 2, True, 1.0, True, True)
    assert torch.equal(routed.experts, top_experts(logits, 2))
    assert routed.experts[1].tolist() == [0, 1] and routed.experts[2, 0] == 2


@pytest.mark.parametrize("case", ["all_tie", "rows_tie", "underflow"])
def test_every_kernel_picks_the_same_experts_on_ties_and_underflow(case):
    """`routing.top_experts` is the one rule (largest logit, ties to the lower index): the dense and sparse kernels,
    the fused Triton kernel and the literal reference route alike where `torch.topk` on the probabilities did not
    (CPU's picked experts 2 and 4 of five tied ones; float32 probabilities of logits -110 and -300 are both 0).
    One-hot inputs make every logit one router weight, so ties are exact whatever order a GEMM sums in."""
    torch.manual_seed(1)
    features = torch.zeros(TOKENS, dtype=torch.long) if case == "underflow" else torch.randint(0, IN, (TOKENS,))
    x = nn.functional.one_hot(features, IN).float()
    outputs, experts = {}, {}
    for kernel in ("dense", "sparse", "fused"):
        layer = make_layer("malora", kernel).eval()
        with torch.no_grad():
            if case == "all_tie":  # router_init_std=0: every logit is 0
                layer.router.weight.zero_()
            elif case == "rows_tie":  # experts 1, 2 and 4 share a router row: their logits tie on every token
                layer.router.weight[2] = layer.router.weight[4] = layer.router.weight[1]
            else:  # every token's logits are (0, -300, -120, -200, -110): only 0 survives a float32 softmax
                layer.router.weight[:, 0] = torch.tensor([0.0, -300.0, -120.0, -200.0, -110.0])
        layer.routing_context.observers.append(lambda record, kernel=kernel: experts.setdefault(kernel, record.experts))
        with torch.no_grad():
            layer.routing_context.begin_forward()
            outputs[kernel] = layer(x)
            reference = layer.reference_forward(x)
        torch.testing.assert_close(outputs[kernel], reference, rtol=1e-5, atol=1e-5, msg=kernel)
    expected = {"all_tie": [0, 1], "underflow": [0, 4]}.get(case)
    for kernel, chosen in experts.items():
        assert torch.equal(chosen, experts["dense"]), kernel
        if expected is not None:
            assert (chosen == torch.tensor(expected)).all(), kernel
    if case == "rows_tie":  # a token whose best logit is the shared one keeps experts 1 and 2, never 4
        assert not (experts["dense"] == 4).any() and (experts["dense"][:, 0] == 1).any()


@pytest.mark.parametrize("renormalize", [True, False])
def test_router_gradient_from_an_expanded_balance_gradient(renormalize):
    """A loss that only sums the balance statistics hands the kernel a stride-0 gradient: the fused backward reads
    it by its stride (it once read past its single element), as the plain ops do."""
    x = torch.randn(TOKENS, IN)
    grads = []
    for kernel in ("dense", "fused"):
        layer = make_layer("malora", kernel, renormalize_top_k=renormalize)
        forward = layer.routing_context.begin_forward()
        out = layer(x)
        loss = (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum()
        (loss + 10 * forward.statistics[0].balance.sum()).backward()
        grads.append(layer.router.weight.grad)
    assert grads[0].abs().max() > 1e-3
    torch.testing.assert_close(grads[1], grads[0], rtol=2e-5, atol=2e-6)


def test_fused_applies_only_where_triton_can_run(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert fused_routing_applies(cpu, torch.float32)  # this module interprets
    assert not fused_routing_applies(cpu, torch.float64)  # the kernels compute in float32: plain ops keep float64
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not fused_routing_applies(cpu, torch.bfloat16)  # a CPU without the interpreter runs the plain ops
    assert fused_routing_applies(cuda, torch.bfloat16)


def test_fused_kernel_with_float64_adapters_runs_the_plain_ops_exactly():
    """float64 adapters (references, tests) keep the dense kernel's float64 routing bit for bit."""
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    outputs = []
    for kernel in ("dense", "fused"):
        layer = make_layer("malora", kernel, adapter_dtype="float64").double()
        layer.routing_context.begin_forward()
        outputs.append(layer(x))
    assert torch.equal(outputs[0], outputs[1])


def test_compiled_adapters_with_the_fused_kernel_compile_the_plain_ops_whole():
    """Under `compile_adapters` inductor fuses the routing itself: kernel="fused" compiles to the dense kernel's
    plain ops, with no graph break at the Triton launch and the eager fused kernel's results."""
    from malora_lightning.adapters import adapter_layers, compile_adapters

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(2, 9, IN)
    results = []
    for compiled in (False, True):
        layer = make_layer("malora", "fused")
        if compiled:
            compile_adapters(layer, backend="aot_eager")
            assert list(adapter_layers(layer).values())[0].compile_mode is not None
        results.append(training_step(layer, x, None, autocast=False))
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for name in results[0]:
        torch.testing.assert_close(results[1][name], results[0][name], rtol=2e-5, atol=2e-5, msg=name)


def test_a_layout_the_kernel_cannot_index_is_refused():
    """The kernels index a row by one stride and a column by one: logits with another column stride gave wrong
    probabilities without an error (max |probs - softmax| 0.79 for a stride-2 view)."""
    wide = torch.randn(TOKENS, 16)
    hidden = torch.randn(TOKENS, 5 * 3)
    with pytest.raises(ValueError, match=r"logits of shape \(\d+, 8\) and strides \(16, 2\) is not unit column stride"):
        route_forward(wide[:, ::2], hidden, 5, 3, None, 2, True, 1.0, True, False)
    with pytest.raises(ValueError, match="token_weights .* is not contiguous"):
        route_forward(wide[:, :5], hidden, 5, 3, torch.rand(TOKENS, 2)[:, 0], 2, True, 1.0, True, False)
    routed = route_forward(wide[:, :5], hidden, 5, 3, None, 2, True, 1.0, True, False)  # a column slice is fine
    assert torch.allclose(routed.probs, wide[:, :5].softmax(-1), atol=1e-6)
