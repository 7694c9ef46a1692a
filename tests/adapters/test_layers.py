import math

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters import AdapterConfig, LoRALinear, MALoRALinear
from malora_lightning.adapters.init import init_malora_
from malora_lightning.adapters.routing import route
from tests.adapters.method_matrix import METHOD_CLASSES

IN, OUT, TOKENS = 24, 20, 37


def make_layer(method: str, kernel: str = "dense", dtype=torch.float64, seed: int = 0, **overrides):
    """A layer over a random float64 base with random (non-zero) B, so every path carries signal."""
    torch.manual_seed(seed)
    base = nn.Linear(IN, OUT, dtype=dtype)
    settings = dict(method=method, rank=3, shared_rank=8, num_experts=5, top_k=2, dropout=0.0,
                    adapter_dtype="float64" if dtype == torch.float64 else "float32", kernel=kernel)
    settings.update(overrides)
    config = AdapterConfig(**settings)
    layer = METHOD_CLASSES[method](base, config, name="layer")
    with torch.no_grad():
        layer.lora_B.normal_()
        if hasattr(layer, "router"):
            layer.router.weight.normal_()
    return layer


def grads(layer: nn.Module, x: torch.Tensor, forward) -> dict[str, torch.Tensor]:
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = forward(x)
    upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).reshape(out.shape)
    (out * upstream).sum().backward()
    result = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    result["x"] = x.grad.clone()
    result["out"] = out.detach()
    return result


@pytest.mark.parametrize("method", ["molora", "malora"])
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
@pytest.mark.parametrize("renormalize", [True, False])
def test_kernels_match_the_reference_in_forward_and_gradients(method, kernel, renormalize):
    layer = make_layer(method, kernel, renormalize_top_k=renormalize)
    x = torch.randn(3, TOKENS // 3 + 1, IN, dtype=torch.float64)
    fast = grads(layer, x, layer)
    reference = grads(layer, x, layer.reference_forward)
    assert fast.keys() == reference.keys()
    assert {"lora_B", "router.weight", "x"} <= fast.keys()
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-10, atol=1e-10, msg=name)


def test_lora_matches_its_equation():
    """Eq. 1 with the scale written out as alpha / r (rank 3, alpha 5), not read back from the layer."""
    layer = make_layer("lora", alpha=5.0)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    expected = x @ layer.base_layer.weight.t() + layer.base_layer.bias + (5.0 / 3) * x @ (layer.lora_B @ layer.lora_A).t()
    torch.testing.assert_close(layer(x), expected)


def test_malora_reference_follows_equation_7_token_by_token():
    """Independent check of the reference: loop over tokens, keep the top-k experts, sum (alpha/r-bar) g_t B_t P_t S_A x,
    the scale written out (alpha 5, r-bar 3), not read back from the layer."""
    layer = make_layer("malora", renormalize_top_k=True, alpha=5.0)
    x = torch.randn(6, IN, dtype=torch.float64)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    expected = x @ layer.base_layer.weight.t() + layer.base_layer.bias
    for token in range(x.shape[0]):
        top = torch.topk(probs[token], layer.top_k)
        weights = top.values / top.values.sum()
        for weight, expert in zip(weights, top.indices):
            delta_w = layer.lora_B[expert].t() @ layer.lora_P[expert] @ layer.shared_A  # B_t = lora_B[t].T
            expected[token] += (5.0 / 3) * weight * (delta_w @ x[token])
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer.reference_forward(x), expected)


def test_malora_with_one_expert_equals_lora_with_A_equal_P_times_S_A():
    malora = make_layer("malora", num_experts=1, top_k=1, rank=3, shared_rank=8, alpha=5.0)
    lora = make_layer("lora", rank=3, alpha=5.0)
    with torch.no_grad():
        lora.base_layer.load_state_dict(malora.base_layer.state_dict())
        lora.lora_A.copy_(malora.lora_P[0] @ malora.shared_A)
        lora.lora_B.copy_(malora.lora_B[0].t())
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    torch.testing.assert_close(malora(x), lora(x), rtol=1e-12, atol=1e-12)


def test_top_k_equal_to_n_with_renormalisation_is_the_soft_mixture():
    layer = make_layer("molora", top_k=5)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    probs = torch.softmax(x @ layer.router.weight.t(), dim=-1)
    delta = sum(probs[:, t:t + 1] * (x @ (layer.lora_B[t].t() @ layer.lora_A[t]).t()) for t in range(5))
    torch.testing.assert_close(layer(x), layer.base_layer(x) + layer.scaling * delta)


def test_route_keeps_top_k_and_renormalises():
    logits = torch.tensor([[2.0, 0.0, 1.0, -1.0]])
    routing = route(logits, top_k=2, renormalize=True)
    probs = torch.softmax(logits, dim=-1)[0]
    assert routing.experts.tolist() == [[0, 2]]
    torch.testing.assert_close(routing.gates[0], probs[[0, 2]] / probs[[0, 2]].sum())
    raw = route(logits, top_k=2, renormalize=False)
    torch.testing.assert_close(raw.gates[0], probs[[0, 2]])


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_output_equals_base_at_initialisation(method):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT)
    layer = METHOD_CLASSES[method](
        base, AdapterConfig(method=method, rank=4, shared_rank=8, num_experts=4))
    x = torch.randn(5, IN)
    assert torch.equal(layer(x), base(x))


def test_malora_init_follows_equations_8_to_10():
    """P_t S_A = (U_t Sigma_t)[:r] V_0: same Gram matrix as the first r rows of K_t, all in span(V_0), S_A = beta V_0."""
    n, d, r, experts, beta = 64, 16, 6, 3, 1.7
    shared_A, lora_P, lora_B = torch.empty(d, n), torch.empty(experts, r, d), torch.ones(experts, r, 8)
    torch.manual_seed(123)
    init_malora_(shared_A, lora_P, lora_B, beta)
    torch.manual_seed(123)  # redraw K_0..K_N: N+1 Kaiming-uniform d x n matrices, in order
    kaiming = [nn.init.kaiming_uniform_(torch.empty(d, n), a=math.sqrt(5)).double() for _ in range(experts + 1)]
    v0 = torch.linalg.svd(kaiming[0], full_matrices=False).Vh
    projector = v0.t() @ v0  # sign-free view of span(V_0)
    torch.testing.assert_close(shared_A.double().t() @ shared_A.double(), beta**2 * projector, atol=1e-5, rtol=0)
    for t in range(experts):
        product = (lora_P[t] @ shared_A).double()
        first_rows = kaiming[t + 1][:r]
        torch.testing.assert_close(product @ product.t(), first_rows @ first_rows.t(), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(product @ projector, product, atol=1e-6, rtol=0)  # rows lie in span(V_0)
    torch.testing.assert_close(shared_A.norm(dim=1), torch.full((d,), beta), atol=1e-5, rtol=0)
    assert torch.count_nonzero(lora_B) == 0


def test_malora_init_can_reuse_the_first_kaiming_matrix_for_expert_one():
    n, d, r = 64, 16, 6
    shared_A, lora_P, lora_B = torch.empty(d, n), torch.empty(2, r, d), torch.zeros(2, r, 8)
    torch.manual_seed(5)
    init_malora_(shared_A, lora_P, lora_B, beta=1.0, reuse_first_kaiming=True)
    torch.manual_seed(5)
    k0 = nn.init.kaiming_uniform_(torch.empty(d, n), a=math.sqrt(5))
    # with K_0 shared, expert 1's P_1 S_A is exactly the first r rows of K_0
    torch.testing.assert_close(lora_P[0] @ shared_A, k0[:r], atol=1e-5, rtol=0)


def test_malora_init_row_norms_match_kaiming_uniform_and_ignore_beta():
    n, d, r = 1024, 32, 12
    products = {}
    for beta in (0.3, 1.0, 5.0):
        torch.manual_seed(7)
        layer = MALoRALinear(nn.Linear(n, 16), AdapterConfig(method="malora", rank=r, shared_rank=d, num_experts=8,
                                                           top_k=2, beta=beta))
        products[beta] = torch.einsum("erd,dn->ern", layer.lora_P.double(), layer.shared_A.double())
    torch.testing.assert_close(products[0.3], products[1.0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(products[5.0], products[1.0], atol=1e-6, rtol=1e-5)
    # Kaiming-uniform rows U(-1/sqrt(n), 1/sqrt(n)): squared row norm has mean 1/3 and std sqrt(n * 4/(45 n^2)).
    squared = products[1.0].square().sum(-1).flatten()
    expected_std = math.sqrt(4 / (45 * n))
    assert abs(squared.mean().item() - 1 / 3) < 4 * expected_std / math.sqrt(squared.numel())
    assert 0.7 * expected_std < squared.std().item() < 1.3 * expected_std


def test_shared_rank_larger_than_input_is_rejected_with_the_module_name():
    with pytest.raises(ValueError, match=r"shared_rank=32 exceeds in_features=16 of module 'model.tiny'"):
        MALoRALinear(nn.Linear(16, 16), AdapterConfig(), name="model.tiny")


def test_unsupported_base_layer_is_rejected():
    with pytest.raises(TypeError, match="unsupported base layer type Conv2d"):
        LoRALinear(nn.Conv2d(3, 3, 1), AdapterConfig(method="lora"))


def test_wraps_gpt2_conv1d():
    torch.manual_seed(0)
    base = Conv1D(OUT, IN)  # GPT-2 stores the weight as [in, out]
    nn.init.normal_(base.weight)
    layer = LoRALinear(base, AdapterConfig(method="lora", rank=2, dropout=0.0))
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, IN)
    torch.testing.assert_close(layer(x), base(x) + layer.scaling * x @ layer.lora_A.t() @ layer.lora_B.t())


def test_printed_layers_name_their_method_sizes_and_routing():
    config = dict(rank=3, shared_rank=8, num_experts=5, top_k=2, alpha=12.0)
    lines = {method: repr(METHOD_CLASSES[method](nn.Linear(IN, OUT), AdapterConfig(method=method, **config)))
             .splitlines()[1].strip() for method in ("lora", "molora", "malora")}
    assert lines == {
        "lora": "method=lora, in=24, out=20, rank=3, scaling=4",
        "molora": "method=molora, in=24, out=20, rank=3, scaling=4, num_experts=5, top_k=2, kernel=dense",
        "malora": "method=malora, in=24, out=20, rank=3, scaling=4, num_experts=5, top_k=2, kernel=dense, "
                  "shared_rank=8",
    }
    layer = LoRALinear(nn.Linear(IN, OUT), AdapterConfig(method="lora", rank=3, alpha=12.0))
    layer.compile_mode = "max-autotune"  # as compile_adapters sets it
    assert layer.extra_repr() == "method=lora, in=24, out=20, rank=3, scaling=4, compiled=max-autotune"


def test_inherits_train_or_eval_mode_of_the_wrapped_layer():
    base = nn.Linear(IN, OUT).eval()
    assert not MALoRALinear(base, AdapterConfig(shared_rank=8, rank=4)).training
    assert MALoRALinear(nn.Linear(IN, OUT), AdapterConfig(shared_rank=8, rank=4)).training


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_bf16_base_keeps_float32_adapters_and_bf16_output(method):
    torch.manual_seed(0)
    base = nn.Linear(IN, OUT, dtype=torch.bfloat16)
    layer = METHOD_CLASSES[method](
        base, AdapterConfig(method=method, rank=4, shared_rank=8, num_experts=4, dropout=0.0))
    assert all(p.dtype == torch.float32 for p in layer.adapter_parameters().values())
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, IN, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    # the adapter path ran in float32 and only its output was rounded to bf16: every element is within half a bf16
    # step of the float32 delta (its rounding) plus half a step of the sum (the bf16 addition) of a float64 sum.
    # (atol 0.05, rtol 0.02 also passed an adapter path computed in bf16: up to 0.05 off, 8-15 such bounds.)
    with torch.no_grad():
        delta = layer.reference_delta(x.float(), x.shape[:-1]).double()
        expected = base(x).double() + delta
    step = lambda v: torch.exp2(torch.floor(torch.log2(v.abs().clamp_min(1e-30))) - 7)  # bf16's spacing at |v|
    bound = 0.5 * step(delta) + 0.5 * step(expected.abs() + 0.5 * step(delta)) + 1e-5  # 1e-5: float32's error
    assert ((out.double() - expected).abs() <= bound).all()
    out.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == torch.float32


class MatmulDtypes(TorchDispatchMode):
    """The dtypes of the operands of every matrix product dispatched inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.dtypes: set[torch.dtype] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}:
            self.dtypes |= {arg.dtype for arg in args if isinstance(arg, torch.Tensor)}
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_autocast_runs_the_adapter_in_the_autocast_dtype(method):
    """Every matrix product under bf16 autocast is a bf16 one, the adapter's included (the output alone being bf16,
    and close to float32's within atol 0.1, also held for an adapter path that ignored autocast and ran in float32)."""
    layer = make_layer(method, dtype=torch.float32)
    x = torch.randn(6, IN)
    with torch.autocast("cpu", dtype=torch.bfloat16), MatmulDtypes() as products:
        out = layer(x)
    assert out.dtype == torch.bfloat16
    assert products.dtypes == {torch.bfloat16}
    torch.testing.assert_close(out.float(), layer(x), atol=0.1, rtol=0.05)


def test_dropout_applies_only_in_training():
    layer = make_layer("malora", dropout=0.5)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))


@pytest.mark.parametrize(("method", "kernel"), [("lora", "dense"), ("molora", "dense"), ("molora", "sparse"),
                                               ("malora", "dense"), ("malora", "sparse")])
def test_kernels_match_the_reference_with_active_dropout(method, kernel):
    """With dropout active the router reads x and the experts read dropout(x), so the router is not fused; the
    kernels apply the dropout rescale in rank space, the reference applies dropout as written."""
    layer = make_layer(method, kernel, dropout=0.5)
    layer.train()
    x = torch.randn(TOKENS, IN, dtype=torch.float64)

    def seeded(forward):
        def run(inputs):
            torch.manual_seed(7)  # both paths draw one dropout mask of the same shape
            return forward(inputs)
        return run

    fast = grads(layer, x, seeded(layer))
    reference = grads(layer, x, seeded(layer.reference_forward))
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_sparse_kernel_with_idle_experts_matches_the_reference(method):
    layer = make_layer(method, "sparse", top_k=1)
    x = torch.randn(3, IN, dtype=torch.float64)  # 3 tokens, top-1: at least 2 of the 5 experts get no token
    fast = grads(layer, x, layer)
    reference = grads(layer, x, layer.reference_forward)
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-10, atol=1e-10, msg=name)
    idle = [e for e in range(5) if torch.count_nonzero(fast["lora_B"][e]) == 0]
    assert len(idle) >= 2


@pytest.mark.parametrize("method", ["molora", "malora"])
@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_frozen_adapters_pass_the_input_gradient_the_reference_passes(method, dropout):
    """Every adapter weight frozen, the input still needing a gradient (an earlier layer training through frozen
    adapters, or enable_input_grads): the dense kernel's backward computes only the input's gradient."""
    layer = make_layer(method, "dense", dropout=dropout)
    layer.requires_grad_(False)
    layer.train()
    x = torch.randn(TOKENS, IN, dtype=torch.float64)

    def seeded(forward):
        def run(inputs):
            torch.manual_seed(7)  # one dropout mask for both paths
            return forward(inputs)
        return run

    fast = grads(layer, x, seeded(layer))
    reference = grads(layer, x, seeded(layer.reference_forward))
    assert fast.keys() == reference.keys() == {"x", "out"}
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_a_router_in_another_dtype_gets_its_gradient_in_its_own_dtype(method):
    """A router cast apart from the other adapter weights (`layer.router.float()`): the stacked router and first
    projection gradient is split and each part cast to its own parameter's dtype."""
    layer = make_layer(method, "dense")
    layer.base_layer.requires_grad_(False)
    layer.router.float()
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    fast = grads(layer, x, layer)
    layer.router.double()  # the same (float32-rounded) router values, for the float64 reference
    reference = grads(layer, x, layer.reference_forward)
    assert fast["router.weight"].dtype == torch.float32
    first = "shared_A" if method == "malora" else "lora_A"
    assert fast[first].dtype == torch.float64
    for name in fast:  # float64 to float64's precision: the float64 parts were not rounded through float32
        tolerance = 1e-10 if fast[name].dtype == torch.float64 else None
        torch.testing.assert_close(fast[name], reference[name].to(fast[name].dtype), rtol=tolerance, atol=tolerance,
                                   msg=name)


@pytest.mark.parametrize("method", ["molora", "malora"])
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_no_tokens_gives_the_base_output(method, kernel):
    layer = make_layer(method, kernel)
    x = torch.randn(0, IN, dtype=torch.float64)
    forward = layer.routing_context.begin_forward()
    assert torch.equal(layer(x), layer.base_layer(x))
    assert forward.statistics == []  # nothing routed, nothing to balance


@pytest.mark.parametrize(("method", "frozen"), [("molora", {"train_A": False}),
                                                ("malora", {"train_P": False, "train_shared_A": False})])
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_frozen_down_projections_and_an_input_without_grad_match_the_reference(method, frozen, kernel):
    """The expert hidden states then need no gradient; only B and the router do."""
    layer = make_layer(method, kernel, **frozen)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(TOKENS, IN, dtype=torch.float64)
    upstream = torch.linspace(-1, 1, TOKENS * OUT, dtype=torch.float64).reshape(TOKENS, OUT)
    results = []
    for forward in (layer, layer.reference_forward):
        layer.zero_grad(set_to_none=True)
        (forward(x) * upstream).sum().backward()
        results.append({name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None})
    fast, reference = results
    assert fast.keys() == reference.keys() == {"lora_B", "router.weight"}
    for name in fast:
        torch.testing.assert_close(fast[name], reference[name], rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_sparse_kernel_rounds_a_bf16_base_output_once(method):
    """A bf16 base with float32 adapters: the sparse kernel added each expert's output to the bf16 result, rounding
    once per selected expert, up to several bf16 steps off. Now every element is the float64 sum rounded once (within half
    a bf16 step, plus float32's error)."""
    layer = make_layer(method, kernel="sparse", dtype=torch.float32, seed=3)
    layer.base_layer.to(torch.bfloat16)
    with torch.no_grad():
        layer.lora_B.mul_(4.0)  # expert outputs as large as the base's, so that intermediate sums round coarsely
        x = torch.randn(512, IN, dtype=torch.bfloat16)
        output = layer(x)
        reference = layer.base_layer(x).double() + layer.reference_delta(x.float(), x.shape[:-1]).double()
    assert output.dtype == torch.bfloat16
    step = torch.exp2(torch.floor(torch.log2(reference.abs().clamp_min(1e-30))) - 7)  # bf16's spacing there
    assert ((output.double() - reference).abs() <= 0.5 * step + 1e-5).all()  # 1e-5: float32's, on summands ~10


@pytest.mark.parametrize("n", [576, 1536])  # SmolLM2's in_features: the default job's SVDs
def test_malora_init_takes_its_svd_on_one_thread_whatever_the_thread_count(n):
    """MKL's two-thread SVD of each layer's thin K_t crawled on two shared cores (seconds per layer instead of ~20 ms),
    so it runs on one thread (`one_cpu_thread`): the init is the one-thread SVD's at any thread count (at n = 576 also
    the two-thread one's, bit for bit; at 1536 MKL's two-thread factors differ in the last bits), and the thread count
    is given back."""
    d, r, experts = 32, 12, 8
    threads = torch.get_num_threads()
    inits = []
    try:
        for count in (2, 1):
            torch.set_num_threads(count)
            shared_A, lora_P, lora_B = torch.empty(d, n), torch.empty(experts, r, d), torch.ones(experts, r, 8)
            torch.manual_seed(7)
            init_malora_(shared_A, lora_P, lora_B, beta=1.0)
            assert torch.get_num_threads() == count
            inits.append((shared_A, lora_P))
        torch.manual_seed(7)
        kaiming = torch.stack([nn.init.kaiming_uniform_(torch.empty(d, n), a=math.sqrt(5)) for _ in range(experts + 1)])
        U, S, Vh = torch.linalg.svd(kaiming.double(), full_matrices=False)  # on one thread
    finally:
        torch.set_num_threads(threads)
    for shared_A, lora_P in inits:
        assert torch.equal(shared_A, Vh[0].float())
        assert torch.equal(lora_P, (U * S.unsqueeze(-2))[1:, :r, :].float())


@pytest.mark.parametrize("method", ["molora", "malora"])
def test_the_dense_kernel_saves_no_expert_indices_its_backward_does_not_read(method):
    """The plain ops' backward reads the [T, N] selection, not the [T, K] int64 experts (only the fused one does)."""
    layer = make_layer(method, dtype=torch.float32, dropout=0.1).train()
    saved: list[torch.dtype] = []

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.dtype)
        return tensor

    x = torch.randn(TOKENS, IN, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(watch, lambda tensor: tensor):
        out = layer(x)
    assert saved and torch.int64 not in saved
    out.sum().backward()
    assert x.grad is not None and layer.lora_B.grad is not None
