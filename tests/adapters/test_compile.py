"""The adapter paths compile whole (fullgraph) in every mode, match eager, and never synchronise with the host."""

import pytest
import torch

from malora_lightning.adapters import AdapterConfig, aux_loss, compile_adapters, inject_adapters
from malora_lightning.adapters.kernels import DenseRoutedExperts
from malora_lightning.adapters.model import enable_activation_checkpointing
from tests.helpers import SYNCING_OPS, OpRecorder, tiny_model

METHODS = ["lora", "molora", "malora"]
TWO_PROJECTIONS = ["q_proj", "down_proj"]


def adapted_model(method: str, dropout: float = 0.1, layers: int | None = None, **overrides) -> torch.nn.Module:
    config = AdapterConfig(method=method, rank=2, shared_rank=4, num_experts=4, top_k=2, dropout=dropout,
                           router_z_loss_coef=0.1, **overrides)
    return inject_adapters(tiny_model("llama", layers=layers), config).train()


def batch(seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 200, (2, seq_len))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    return ids, mask


def train_step(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    loss = model(ids, attention_mask=mask, labels=ids).loss + aux_loss(model)
    loss.backward()
    return loss.detach()


@pytest.mark.parametrize("method", METHODS)
def test_train_eval_and_generation_compile_whole(method):
    """fullgraph=True raises at the first graph break, so running at all proves there is none. One decoder layer and
    two projections of other input widths, as in the whole-model test below: every adapted projection runs the same
    code, and each width class compiles its own graphs."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = compile_adapters(adapted_model(method, layers=1, target_modules=TWO_PROJECTIONS), backend="aot_eager")
    for seq_len in (7, 9, 5):  # varying token counts: symbolic after the first change, no recompile after that
        train_step(model, *batch(seq_len))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        train_step(model, *batch(6))
    model.eval()
    with torch.no_grad():
        model(batch(6)[0])
        model.generate(batch(4)[0], attention_mask=batch(4)[1], max_new_tokens=3, do_sample=False, pad_token_id=0)
    counters = torch._dynamo.utils.counters
    assert dict(counters["graph_break"]) == {}
    assert 0 < counters["stats"]["unique_graphs"] <= 12  # bounded: shape classes x modes, not one per call


@pytest.mark.parametrize("method", METHODS)
def test_compiled_training_matches_eager(method):
    """Same loss, router loss and gradients, compiled (aot_eager: the traced forward and backward graphs) or not."""
    torch._dynamo.reset()
    results = []
    for compiled in (False, True):
        model = adapted_model(method, dropout=0.0)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.1)  # B starts at zero; give every path signal
        if compiled:
            compile_adapters(model, backend="aot_eager")
        torch.manual_seed(3)
        ids, mask = batch(8)
        loss = train_step(model, ids, mask)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss, grads))
    (eager_loss, eager_grads), (compiled_loss, compiled_grads) = results
    torch.testing.assert_close(compiled_loss, eager_loss)
    assert eager_grads.keys() == compiled_grads.keys() and len(eager_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(compiled_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("method", METHODS)
def test_the_whole_model_compiles_into_one_graph_and_matches_eager(method):
    """torch.compile of the whole model, as a user (or Lightning's module compile) does it, with fullgraph: a training
    step with dropout and a padding mask, and an evaluation forward, trace without a graph break (a routed layer's
    `in_backward` check, a torch._C call, used to split every layer's graph in two: 36 graphs here). With dropout off,
    the loss, the router loss that `aux_loss` reads afterwards from the routing context, and every gradient equal
    eager's. One decoder layer, two projections, one attention and one MLP (of another input width): every adapted
    projection and every decoder layer runs the same code, and each adds to the time the three whole-model compiles
    take."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = adapted_model(method, dropout=0.1, layers=1, target_modules=TWO_PROJECTIONS)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    train_step(compiled, *batch(8))
    model.eval()
    with torch.no_grad():
        compiled(batch(8)[0], attention_mask=batch(8)[1])
    assert dict(torch._dynamo.utils.counters["graph_break"]) == {}

    results = []
    for whole in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = adapted_model(method, dropout=0.0, layers=1, target_modules=TWO_PROJECTIONS)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.1)  # B starts at zero; give every path signal
        run = torch.compile(model, fullgraph=True, backend="aot_eager") if whole else model
        torch.manual_seed(3)
        ids, mask = batch(8)
        lm_loss = run(ids, attention_mask=mask, labels=ids).loss
        router_loss = aux_loss(model)
        (lm_loss + router_loss).backward()
        results.append((lm_loss.detach(), router_loss.detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (eager_lm, eager_router, eager_grads), (whole_lm, whole_router, whole_grads) = results
    torch.testing.assert_close(whole_lm, eager_lm)
    torch.testing.assert_close(whole_router, eager_router)
    assert (eager_router > 0) == (method != "lora")
    assert eager_grads.keys() == whole_grads.keys() and len(eager_grads) > 0
    for name in eager_grads:
        torch.testing.assert_close(whole_grads[name], eager_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_a_model_compiled_whole_with_activation_checkpointing_hands_its_routing_over_once():
    """Dynamo refuses side effects inside a checkpoint, so the checkpointed layers run eagerly (graph breaks) inside
    the compiled model: the loss equals eager's, and the recompute in backward adds no router statistics."""
    results = []
    for whole in (False, True):
        torch._dynamo.reset()
        torch.manual_seed(0)
        model = adapted_model("malora", dropout=0.0, layers=1)
        enable_activation_checkpointing(model)
        run = torch.compile(model, backend="aot_eager") if whole else model
        torch.manual_seed(3)
        ids, mask = batch(8)
        loss = run(ids, attention_mask=mask, labels=ids).loss + aux_loss(model)
        forward = model.model.layers[0].mlp.down_proj.routing_context.losses_forward
        handed_over = len(forward.statistics)
        loss.backward()
        assert len(forward.statistics) == handed_over == 6  # 6 routed projections in the one layer
        results.append(loss.detach())
    torch.testing.assert_close(results[1], results[0])


def test_inductor_kernels_match_eager():
    """The generated kernels themselves (inductor on CPU), for the method with the most ops."""
    torch._dynamo.reset()
    outputs = []
    for compiled in (False, True):
        model = adapted_model("malora", dropout=0.0, layers=1)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(std=0.1)
        if compiled:
            compile_adapters(model)
        ids, mask = batch(8)
        torch.manual_seed(3)
        ids, mask = batch(8)
        loss = train_step(model, ids, mask)
        outputs.append((loss, model.model.layers[0].mlp.down_proj.shared_A.grad.clone()))
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-4, atol=1e-6)


def test_sparse_kernel_refuses_to_compile():
    model = adapted_model("malora", kernel="sparse")
    with pytest.raises(ValueError, match="kernel='sparse'.*data-dependent"):
        compile_adapters(model)


def test_unknown_compile_mode_is_rejected():
    with pytest.raises(ValueError, match="compile mode 'fast' is invalid"):
        compile_adapters(adapted_model("lora"), "fast")


def test_a_model_without_adapters_is_refused():
    with pytest.raises(ValueError, match=r"^LlamaForCausalLM has no adapters: call inject_adapters\(model, config\) "
                                         r"first$"):
        compile_adapters(tiny_model("llama"))


@pytest.mark.parametrize(("method", "kernel", "syncs"), [("lora", "dense", False), ("molora", "dense", False),
                                                       ("malora", "dense", False), ("malora", "sparse", True)])
def test_adapter_training_step_never_reads_a_tensor_on_the_host(method, kernel, syncs):
    """No .item()/.tolist()/nonzero/bincount/boolean indexing in an adapted layer's forward and backward, padding
    mask, dropout, balance statistics and z-loss included (on a GPU each would stall the launch queue). The sparse
    kernel, which reads its per-expert token counts on the host, shows that the check sees a sync."""
    model = adapted_model(method, kernel=kernel)
    layer = model.model.layers[1].mlp.down_proj
    x = torch.randn(2, 8, layer.in_features, requires_grad=True)
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[0, :3] = 0
    recorder = OpRecorder()
    with recorder:
        if method != "lora":
            forward = layer.routing_context.begin_forward(mask)
        loss = layer(x).square().mean()
        if method != "lora":
            loss = loss + forward.statistics[0].balance.sum() + forward.statistics[0].z_loss
        loss.backward()
    assert {"aten.mm", "aten.addmm"} & recorder.ops  # the recorder saw the adapter's work
    assert bool(recorder.ops & SYNCING_OPS) == syncs, recorder.ops & SYNCING_OPS


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("renormalize", [True, False])
@pytest.mark.parametrize("with_dropout", [True, False])
def test_dense_routed_experts_backward_passes_gradcheck(shared, renormalize, with_dropout):
    """The hand-written backward against finite differences of its forward, every input and every output
    (output, balance statistics with a padding mask, logsumexp), in float64."""
    torch.manual_seed(0)
    tokens, n, m, experts, rank, d = 7, 6, 5, 4, 2, 3
    double = dict(dtype=torch.float64, requires_grad=True)
    x = torch.randn(tokens, n, **double)
    keep = torch.rand(tokens, n) > 0.3 if with_dropout else None  # dropout's mask: x reaches S_A or A through it
    router = torch.randn(experts, n, **double)
    shared_A = torch.randn(d, n, **double) if shared else None
    expert_down = torch.randn(experts, rank, d if shared else n, **double)
    lora_B = torch.randn(experts, rank, m, **double)  # each B_t [m, r] transposed, as the layers hold it
    weights = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1], dtype=torch.float64) / 5  # two padding tokens
    result = torch.randn(tokens, m, **double)

    def function(result, x, keep, router, shared_A, expert_down, lora_B):
        out, balance, lse, _, _ = DenseRoutedExperts.apply(result, x, keep, router, shared_A, expert_down, lora_B,
                                                           weights, 2, renormalize, 1.5, True, True, False, None)
        return out, balance, lse

    inputs = (result, x, keep, router, shared_A, expert_down, lora_B)
    assert torch.autograd.gradcheck(function, inputs, eps=1e-6, atol=1e-6)
