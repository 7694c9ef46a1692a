import copy
import gc
import io
import warnings
import weakref

import pytest
import torch

from malora_lightning.adapters import (
    AdapterConfig,
    MALoRALinear,
    add_routing_observer,
    aux_loss,
    inject_adapters,
    load_balance_loss,
    router_losses,
    router_z_loss,
)
from malora_lightning.adapters.model import drop_routing_record, enable_activation_checkpointing
from malora_lightning.adapters.routing import ForwardRouting
from tests.helpers import activation_checkpointing_on, tiny_model


def test_load_balance_is_one_for_perfectly_balanced_routing():
    num_experts = 4
    probs = torch.full((8, num_experts), 1 / num_experts)
    experts = torch.tensor([[0, 1], [2, 3], [1, 0], [3, 2], [0, 2], [1, 3], [2, 0], [3, 1]])
    assert load_balance_loss(probs, experts).item() == pytest.approx(1.0)


def test_load_balance_is_n_for_total_collapse_with_top_1():
    probs = torch.zeros(10, 8)
    probs[:, 3] = 1.0
    experts = torch.full((10, 1), 3)
    assert load_balance_loss(probs, experts).item() == pytest.approx(8.0)


def test_load_balance_hand_computed_top_2_collapse():
    # every token sends both slots to experts {0, 1}, with probabilities 0.9 and 0.1:
    # f = [0.5, 0.5, 0, 0], P = [0.9, 0.1, 0, 0] -> 4 * (0.45 + 0.05) = 2
    probs = torch.tensor([[0.9, 0.1, 0.0, 0.0]]).repeat(6, 1)
    experts = torch.tensor([[0, 1]]).repeat(6, 1)
    assert load_balance_loss(probs, experts).item() == pytest.approx(2.0)


def test_load_balance_ignores_masked_tokens():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    experts = torch.tensor([[0], [1], [0]])
    mask = torch.tensor([True, True, False])
    assert load_balance_loss(probs, experts, mask).item() == pytest.approx(1.0)
    # unmasked, the third token tilts the balance: f = [2/3, 1/3], P = [2/3, 1/3] -> 2 * (4/9 + 1/9)
    assert load_balance_loss(probs, experts).item() == pytest.approx(10 / 9)


def test_router_losses_are_zero_when_no_token_is_real():
    """As documented: a mask without a real token gives 0 (not 0/0 = NaN, which stops a fit as a non-finite loss),
    and no gradient reaches the router through it."""
    logits = torch.randn(4, 3, requires_grad=True)
    experts = torch.tensor([[0], [1], [2], [0]])
    none_real = torch.zeros(4, dtype=torch.bool)
    balance = load_balance_loss(logits.softmax(-1), experts, none_real)
    z_loss = router_z_loss(logits, none_real)
    assert balance.item() == 0.0 and z_loss.item() == 0.0
    (balance + z_loss).backward()
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_load_balance_gradient_flows_through_probabilities_only():
    logits = torch.randn(5, 3, requires_grad=True)
    experts = torch.tensor([[0], [0], [1], [2], [0]])
    load_balance_loss(logits.softmax(-1), experts).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_router_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, 1.0], [5.0, -5.0]])
    lse = torch.log(torch.tensor([2.0, 2 * torch.e, torch.exp(torch.tensor(5.0)) + torch.exp(torch.tensor(-5.0))]))
    assert router_z_loss(logits).item() == pytest.approx((lse[:2] ** 2).mean().item() * 2 / 3 + lse[2].item() ** 2 / 3)
    mask = torch.tensor([True, True, False])
    assert router_z_loss(logits, mask).item() == pytest.approx((lse[:2] ** 2).mean().item())


def routed_model(method="malora", **overrides):
    config = AdapterConfig(method=method, rank=2, shared_rank=4, num_experts=4, top_k=2, **overrides)
    return inject_adapters(tiny_model("llama"), config).train()


def counted_load_balance(record, num_experts):
    """Independent reference from one layer's recorded routing: count assignments of real tokens with bincount."""
    real = record.token_mask if record.token_mask is not None else torch.ones(record.probs.shape[0], dtype=torch.bool)
    counts = torch.bincount(record.experts[real].reshape(-1), minlength=num_experts).double()
    fraction = counts / counts.sum()
    mean_prob = record.probs[real].double().mean(0)
    return num_experts * (fraction * mean_prob).sum()


@pytest.mark.parametrize("std", [0.0, 0.3])
def test_routers_start_as_normal_with_router_init_std(std):
    """Every router weight is drawn from N(0, router_init_std): over the 1,664 weights of the 12 routers the sample
    mean and standard deviation are within 6 standard errors of 0 and of `std` (exactly 0 for std 0)."""
    model = routed_model(router_init_std=std)
    routed = [layer for layer in model.modules() if hasattr(layer, "router")]
    weights = torch.cat([layer.router.weight.reshape(-1) for layer in routed]).double()
    assert len(routed) == 12 and weights.numel() == 4 * sum(layer.in_features for layer in routed) == 1664
    if std == 0.0:
        assert torch.equal(weights, torch.zeros_like(weights))
        return
    error = std / weights.numel() ** 0.5
    assert abs(weights.mean().item()) < 6 * error
    assert weights.std().item() == pytest.approx(std, abs=6 * error / 2 ** 0.5)


def test_aux_loss_is_the_coefficient_times_the_mean_over_layers():
    model = routed_model(aux_loss_coef=0.5)
    ids = torch.randint(0, 200, (2, 9))
    records = []
    with add_routing_observer(model, records.append):
        model(ids)
    assert len(records) == 2 * 6  # two decoder layers x six target projections
    expected = torch.stack([counted_load_balance(record, 4) for record in records]).mean()
    # the library sums in float32: compare at float32's tolerance, not at the float64 reference's
    torch.testing.assert_close(aux_loss(model).double(), 0.5 * expected, rtol=1e-6, atol=1e-7)


def test_uniform_routing_gives_exactly_the_coefficient():
    model = routed_model(aux_loss_coef=0.01)
    for layer in (m for m in model.modules() if hasattr(m, "router")):
        torch.nn.init.zeros_(layer.router.weight)  # every token: uniform probabilities
    # with equal probabilities top-k picks the same experts for every token, yet P_e is uniform: N * sum f_e / N = 1
    model(torch.randint(0, 200, (2, 9)))
    assert aux_loss(model).item() == pytest.approx(0.01)


def test_z_loss_enters_the_aux_loss_when_enabled():
    model = routed_model(aux_loss_coef=0.0, router_z_loss_coef=2.0)
    model(torch.randint(0, 200, (2, 9)))
    summary = router_losses(model)
    assert summary is not None and summary.z_loss is not None and summary.num_layers == 12
    torch.testing.assert_close(aux_loss(model), 2.0 * summary.z_loss)


def forward_recording_router_inputs(model) -> tuple[dict, dict[str, torch.Tensor], torch.Tensor]:
    """A forward of 2 rows of 9 tokens, row 1 left-padded by 3 (its padding counts in no layer's statistics):
    the routed layers by name, each one's input, and which of the 18 tokens are real."""
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    inputs = {}
    layers = {name: layer for name, layer in model.named_modules() if hasattr(layer, "router")}
    hooks = [layer.register_forward_pre_hook(lambda layer, args, name=name: inputs.__setitem__(name, args[0]))
             for name, layer in layers.items()]
    model(ids, attention_mask=mask)
    for hook in hooks:
        hook.remove()
    return layers, inputs, mask.reshape(-1).bool()


def test_z_loss_is_the_mean_over_layers_of_each_layers_mean_squared_logsumexp():
    """Independent float64 reference: every routed layer's router logits from its recorded input, logsumexp squared
    and averaged over the real tokens, then averaged (not summed) over the 12 routed layers."""
    model = routed_model(aux_loss_coef=0.0, router_z_loss_coef=2.0, router_init_std=1.0)
    layers, inputs, real = forward_recording_router_inputs(model)
    per_layer = []
    for name, layer in layers.items():
        logits = inputs[name].reshape(-1, layer.in_features).double() @ layer.router.weight.double().t()
        per_layer.append((torch.logsumexp(logits, dim=-1)[real] ** 2).mean())
    assert len(per_layer) == 12
    expected = torch.stack(per_layer).mean()
    torch.testing.assert_close(router_losses(model).z_loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(aux_loss(model).double(), 2.0 * expected, rtol=1e-5, atol=0)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_router_gradients_of_the_aux_loss_follow_the_equations(kernel):
    """The kernels' own backward of the balance and z statistics against a float64 autograd reference written from
    the equations: per routed layer, N sum_e f_e P_e (f_e the share of real tokens' top-k assignments, without a
    gradient; P_e their mean router probability) and the mean of logsumexp^2 over real tokens, each averaged over the
    12 layers. With B = 0 (its initialisation) a router reaches the loss only through its own layer's statistics,
    so each layer's recorded input is all the reference needs."""
    model = routed_model(kernel=kernel, dropout=0.0, aux_loss_coef=0.5, router_z_loss_coef=2.0, router_init_std=1.0)
    layers, inputs, real = forward_recording_router_inputs(model)
    aux_loss(model).backward()

    weights = {name: layer.router.weight.detach().double().requires_grad_() for name, layer in layers.items()}
    balances, z_losses = [], []
    for name, layer in layers.items():
        x = inputs[name].detach().reshape(-1, layer.in_features)[real]
        experts = (x @ layer.router.weight.detach().t()).topk(2, dim=-1).indices  # the layer's own (float32) choice
        logits = x.double() @ weights[name].t()
        shares = torch.bincount(experts.reshape(-1), minlength=4).double() / experts.numel()
        balances.append(4 * (shares * logits.softmax(-1).mean(0)).sum())
        z_losses.append((torch.logsumexp(logits, dim=-1) ** 2).mean())
    assert len(balances) == 12
    (0.5 * torch.stack(balances).mean() + 2.0 * torch.stack(z_losses).mean()).backward()
    for name, layer in layers.items():
        assert weights[name].grad.abs().max() > 1e-3, name
        torch.testing.assert_close(layer.router.weight.grad.double(), weights[name].grad, rtol=1e-4, atol=1e-7,
                                   msg=name)


def test_padding_tokens_do_not_count_in_the_aux_loss():
    model = routed_model()
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding in row 1
    records = []
    with add_routing_observer(model, records.append):
        model(ids, attention_mask=mask)
    assert len(records) == 12 and all(r.token_mask.sum().item() == 14 for r in records)
    expected = torch.stack([counted_load_balance(record, 4) for record in records])
    torch.testing.assert_close(router_losses(model).load_balance.double(), expected.mean(), rtol=1e-6, atol=1e-7)
    for record in records:  # the library's own formula, given the mask, agrees layer by layer
        torch.testing.assert_close(load_balance_loss(record.probs, record.experts, record.token_mask).double(),
                                   counted_load_balance(record, 4), rtol=1e-6, atol=1e-7)
    model(ids)  # no mask: the padding's routing counts too
    unmasked = router_losses(model).load_balance
    assert not torch.allclose(unmasked.double(), expected.mean())


def test_float64_routing_weighs_real_tokens_in_float64():
    """The real tokens' weights 1/T were float32 whatever the routing dtype: float64 adapters' masked load balance
    was off by about 1e-8 from the float64 count, and from their own unmasked value under a mask of ones."""
    config = AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4, top_k=2, adapter_dtype="float64",
                           router_init_std=1.0)
    model = inject_adapters(tiny_model("llama").double(), config).train()
    ids = torch.randint(0, 200, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    records = []
    with add_routing_observer(model, records.append):
        model(ids, attention_mask=mask)
    expected = torch.stack([counted_load_balance(record, 4) for record in records]).mean()
    torch.testing.assert_close(router_losses(model).load_balance, expected, rtol=0, atol=1e-14)
    model(ids)
    unmasked = router_losses(model).load_balance
    model(ids, attention_mask=torch.ones_like(ids))
    torch.testing.assert_close(router_losses(model).load_balance, unmasked, rtol=0, atol=1e-14)


def test_an_all_real_mask_is_kept_and_weighs_every_token_alike():
    """`ForwardRouting.tokens` said it gave (None, None) when every token is real; telling would read the mask on the
    host, so it keeps the mask, whose weights are the plain mean's 1/T."""
    forward = ForwardRouting(attention_mask=torch.ones(2, 3, dtype=torch.long), input_shape=(2, 3))
    token_mask, weights = forward.tokens((2, 3), torch.float32)
    assert token_mask.tolist() == [True] * 6
    torch.testing.assert_close(weights, torch.full((6,), 1 / 6))
    assert ForwardRouting(attention_mask=None).tokens((2, 3), torch.float32) == (None, None)


def test_a_mask_that_does_not_cover_the_input_gives_no_token_weights():
    """A mask of another batch size, or shorter than the input, says nothing about its tokens: every token then
    counts alike, as without a mask. A longer one (past + new tokens in cached generation) gives its last columns."""
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 0, 1]])
    forward = ForwardRouting(attention_mask=mask)
    assert forward.tokens((3, 5), torch.float32) == (None, None)  # batch 3, mask 2
    assert forward.tokens((2, 6), torch.float32) == (None, None)  # 6 tokens, mask 5
    token_mask, weights = forward.tokens((2, 2), torch.float32)
    assert token_mask.tolist() == [True, True, False, True]
    torch.testing.assert_close(weights, torch.tensor([1 / 3, 1 / 3, 0.0, 1 / 3]))


def test_a_call_the_forward_signature_cannot_bind_begins_a_forward_and_leaves_the_error_to_the_model():
    model = routed_model()
    context = model.malora_routing_context
    context.current = None
    ids = torch.randint(0, 200, (1, 4))
    with pytest.raises(TypeError, match="got multiple values for argument 'input_ids'"):
        model(ids, input_ids=ids)
    assert context.current is not None and context.current.attention_mask is None


def test_removing_an_observer_twice_is_harmless():
    model = routed_model()
    records = []
    with add_routing_observer(model, records.append) as handle:
        handle.remove()  # then once more on leaving the block
        model(torch.randint(0, 200, (1, 3)))
    handle.remove()
    assert records == [] and model.malora_routing_context.observers == []


def test_drop_routing_record_drops_the_latest_forwards_router_losses_and_ignores_a_lora_model():
    model = routed_model()
    model(torch.randint(0, 200, (1, 3)))
    assert router_losses(model) is not None
    drop_routing_record(model)
    assert router_losses(model) is None
    lora = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    drop_routing_record(lora)  # no routing context: nothing to drop
    assert aux_loss(lora).item() == 0.0


def test_positional_attention_mask_is_seen_too():
    model = routed_model()
    ids = torch.randint(0, 200, (1, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1]])
    records = []
    with add_routing_observer(model, records.append):
        model(ids, mask)
    assert records[0].token_mask.tolist() == [False, False, True, True, True, True]


def test_each_forward_replaces_the_statistics_of_the_last():
    model = routed_model()
    model(torch.randint(0, 200, (1, 5)))
    assert router_losses(model).num_layers == 12
    model.malora_routing_context.begin_forward()  # as if another forward ran without reaching the routed layers
    assert router_losses(model) is None
    assert aux_loss(model).item() == 0.0


@pytest.mark.parametrize("mode", ["eval", "no_grad", "generate"])
def test_no_statistics_are_computed_outside_training(mode):
    model = routed_model(router_z_loss_coef=1.0)
    ids = torch.randint(3, 200, (2, 4))
    if mode == "eval":
        model.eval()(ids)
    elif mode == "no_grad":
        with torch.no_grad():
            model(ids)
    else:
        model.eval().generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, do_sample=False,
                              pad_token_id=0)
    assert model.malora_routing_context.current.statistics == []
    assert router_losses(model) is None


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_activation_checkpointing_is_enabled_through_transformers_current_name(use_reentrant):
    """MALoRAModule and the tests called `gradient_checkpointing_enable`, which transformers renamed
    `activation_checkpointing_enable`: the old name warns FutureWarning (transformers 6 drops it)."""
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="malora", rank=2, shared_rank=4))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    assert [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))] == []
    assert activation_checkpointing_on(model)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_reentrant_checkpointing_warns_that_it_leaves_no_router_losses(use_reentrant):
    """Reentrant activation checkpointing runs the forward under no_grad: the layers collect nothing, and aux_loss
    would silently be 0 without this warning. Non-reentrant checkpointing (what MALoRAModule uses) collects them."""
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="malora", rank=2, shared_rank=4,
                                                               num_experts=4, dropout=0.0)).train()
    enable_activation_checkpointing(model, use_reentrant=use_reentrant)
    ids = torch.randint(3, 200, (2, 6))
    model(input_ids=ids, labels=ids, use_cache=False)
    if use_reentrant:
        with pytest.warns(UserWarning, match="routed in training mode with gradients off.*use_reentrant"):
            assert float(aux_loss(model)) == 0.0
    else:
        assert router_losses(model).num_layers == 12 and aux_loss(model).requires_grad


def test_recomputation_in_backward_adds_no_router_statistics():
    """Non-reentrant checkpointing runs each layer's forward again inside backward: that second forward hands over
    nothing (it appended its statistics and notified observers a second time: 12 layers became 22 after backward)."""
    model = routed_model(dropout=0.0, router_z_loss_coef=0.1)
    enable_activation_checkpointing(model)
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # token weights: the recomputation must save what the first forward saved
    records = []
    with add_routing_observer(model, records.append):
        output = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False)
        before = router_losses(model)
        (output.loss + aux_loss(model)).backward()
    after = router_losses(model)
    assert before.num_layers == after.num_layers == 12 and len(records) == 12
    assert torch.equal(before.load_balance, after.load_balance)


def test_calling_the_decoder_alone_begins_a_forward_of_its_own():
    """`model.model(...)` (`get_decoder()`) skips the top-level model's hook: its layers appended to the previous
    call's record, under that call's mask (24 layers, 1.169 against 1.045)."""
    model = routed_model()
    ids = torch.randint(3, 200, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    model(ids, attention_mask=mask)
    expected = router_losses(model)
    model(torch.randint(3, 200, (2, 7)))  # another call, another (absent) mask
    model.get_decoder()(ids, attention_mask=mask)
    alone = router_losses(model)
    assert alone.num_layers == expected.num_layers == 12
    torch.testing.assert_close(alone.load_balance, expected.load_balance)


def test_a_deep_copy_or_a_pickled_model_routes_on_its_own_context():
    """The forward hook is an object holding the model's context, which a copy copies (a closure kept calling the
    original's); the latest forward's record (tensors of the original's graph) and the observers are not copied:
    deepcopy after a training step raised, and a copy's forwards went to the original's record."""
    model = routed_model()
    ids = torch.randint(3, 200, (2, 6))
    output = model(input_ids=ids, labels=ids)
    (output.loss + aux_loss(model)).backward()  # the record now holds tensors of a graph
    records = []
    add_routing_observer(model, records.append)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        original = router_losses(model).load_balance.detach().clone()
        assert router_losses(clone) is None  # nothing of the original's forward
        clone(ids)
        assert router_losses(clone).num_layers == 12
        assert torch.equal(router_losses(model).load_balance.detach(), original)  # the original's record is untouched
        assert records == []  # the original's observers are not the clone's
        model(ids)
        torch.testing.assert_close(router_losses(clone).load_balance, router_losses(model).load_balance)
        records.clear()


def test_a_layer_fed_flattened_tokens_weighs_real_tokens_only():
    """OPT feeds fc1 [batch * seq, features] (so does Qwen2-MoE its shared expert): its balance statistics took the
    padding in (no mask matched its leading shape); they now equal a reference over the real tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("opt", hidden_size=32, ffn_dim=48, num_hidden_layers=1, num_attention_heads=4,
                                  word_embed_proj_dim=32, max_position_embeddings=64, vocab_size=64, pad_token_id=0)
    model = inject_adapters(AutoModelForCausalLM.from_config(config), AdapterConfig(
        method="malora", rank=2, shared_rank=4, num_experts=4, dropout=0.0, router_init_std=0.5,
        target_modules=["fc1"])).train()
    ids = torch.randint(3, 60, (3, 8))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[2, :2] = 0
    records = []
    add_routing_observer(model, records.append)
    model(input_ids=ids, attention_mask=mask)
    (record,) = records
    assert record.batch_shape == (24,)  # the flattened input
    real = mask.reshape(-1).bool()
    probs, experts = record.probs[real].double(), record.experts[real]
    shares = torch.zeros(4, dtype=torch.float64).scatter_add_(0, experts.reshape(-1),
                                                              torch.full((experts.numel(),), 0.5, dtype=torch.float64))
    expected = torch.cat([probs.mean(0), shares / real.sum()])
    (statistics,) = model.malora_routing_context.current.statistics
    torch.testing.assert_close(statistics.balance.double(), expected, rtol=1e-5, atol=1e-6)


def test_routed_layers_keep_no_tensors_between_forwards():
    model = routed_model(router_z_loss_coef=1.0)
    model(torch.randint(0, 200, (2, 5))).logits.sum().backward()
    for layer in (m for m in model.modules() if hasattr(m, "router")):
        held = [name for name, value in vars(layer).items() if isinstance(value, torch.Tensor)]
        assert held == [], held


def test_lora_has_no_aux_loss_and_nothing_to_observe():
    model = inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2))
    model(torch.randint(0, 200, (1, 5)))
    assert aux_loss(model).item() == 0.0
    with pytest.raises(ValueError, match="no routed adapters"):
        add_routing_observer(model, print)


def test_observer_records_only_while_attached():
    model = routed_model()
    records = []
    handle = add_routing_observer(model, records.append)
    model(torch.randint(0, 200, (2, 3)))
    assert len(records) == 12
    first = records[0]
    assert first.probs.shape == (6, 4) and first.experts.shape == (6, 2) and first.batch_shape == (2, 3)
    assert not first.probs.requires_grad
    assert first.layer_name == "model.layers.0.self_attn.q_proj"
    handle.remove()
    model(torch.randint(0, 200, (2, 3)))
    assert len(records) == 12


def test_generation_with_cache_masks_only_the_new_tokens():
    model = routed_model()
    records = []
    ids = torch.randint(3, 200, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    with add_routing_observer(model, records.append):
        model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    decode_step = [r for r in records if r.batch_shape == (2, 1)]
    assert decode_step and all(r.token_mask.tolist() == [True, True] for r in decode_step)
    prefill = [r for r in records if r.batch_shape == (2, 4)]
    assert prefill[0].token_mask.tolist() == [False, True, True, True, True, True, True, True]


def test_a_forward_without_backward_is_freed_when_the_next_forward_starts():
    model = routed_model()
    standing = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    freed: list[bool] = []

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.untyped_storage().data_ptr() in standing:
            return tensor  # weights live on with the model
        flag = len(freed)
        freed.append(False)
        weakref.finalize(tensor.untyped_storage(), freed.__setitem__, flag, True)
        return tensor.detach()  # returning `tensor` itself would tie saved outputs to their node in a cycle

    with torch.autograd.graph.saved_tensors_hooks(watch, lambda tensor: tensor):
        model(input_ids=torch.randint(0, 100, (2, 5))).logits.sum()  # output dropped, no backward
    gc.collect()
    assert freed and not all(freed)  # the forward's router statistics still reference its graph
    with torch.no_grad():
        model(input_ids=torch.randint(0, 100, (1, 3)))  # a side pass (training mode, no_grad) keeps the record
    gc.collect()
    assert not all(freed)
    with torch.no_grad():
        model.eval()(input_ids=torch.randint(0, 100, (1, 3)))  # the next forward, as validation runs it, replaces it
    gc.collect()
    assert all(freed)


def test_a_side_pass_under_no_grad_keeps_the_training_forwards_router_losses():
    """A teacher or metric pass inside a training step (training mode, no_grad) routes without statistics; the
    step's aux_loss is still its own forward's (it was 0 with a warning about reentrant checkpointing)."""
    model = routed_model()
    ids = torch.randint(3, 200, (2, 6))
    model(ids)
    expected = aux_loss(model)
    with torch.no_grad():
        model(torch.randint(3, 200, (2, 5)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kept = aux_loss(model)
    assert kept.requires_grad and kept is not expected
    torch.testing.assert_close(kept, expected, rtol=0, atol=0)
    model(torch.randint(3, 200, (2, 5)))  # the next training forward with gradients replaces it
    assert not torch.equal(aux_loss(model), expected)


def test_a_side_pass_is_routed_and_observed_under_its_own_mask():
    """Only checkpointing's recomputation takes the step's forward (`losses_forward`): a side pass (training mode, under
    no_grad) routes under its own mask and reports to the observers as a forward of its own, not as the step's with the
    step's padding."""
    model = routed_model()
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    records = []
    with add_routing_observer(model, records.append):
        model(input_ids=ids, attention_mask=mask)  # the step's forward
        with torch.no_grad():  # a teacher pass: every token real
            model(input_ids=ids, attention_mask=torch.ones_like(ids))
    step, side = records[:12], records[12:]
    assert len(step) == len(side) == 12
    assert all(torch.equal(record.token_mask, mask.reshape(-1).bool()) for record in step)
    assert all(torch.equal(record.token_mask, torch.ones(12, dtype=torch.bool)) for record in side)
    assert {id(record.forward) for record in step}.isdisjoint(id(record.forward) for record in side)


@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_recomputation_after_a_side_pass_weighs_the_training_forwards_tokens(kernel):
    """Activation checkpointing recomputes each layer's forward inside backward, with the token weights it saves for
    the router losses' backward: after a side pass (a teacher pass under no_grad inside the step) it took that
    pass's mask, so the router gradients of the step's own aux loss were wrong (by 0.045 here)."""
    ids = torch.randint(3, 200, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = routed_model(kernel=kernel, dropout=0.0, router_z_loss_coef=0.1, router_init_std=0.5)
        if checkpointing:
            enable_activation_checkpointing(model)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss + aux_loss(model)
        if checkpointing:
            with torch.no_grad():  # every token real: other token weights than the step's
                model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
        loss.backward()
        grads.append({name: param.grad for name, param in model.named_parameters() if param.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize("method", ["molora", "malora"])
@pytest.mark.parametrize("kernel", ["dense", "sparse"])
def test_layers_reading_one_input_save_one_copy_of_it_in_the_autocast_dtype(method, kernel):
    """q, k and v read the same float32 hidden states, gate and up too: under bf16 autocast each mixture layer saves
    its input cast to bf16 for backward, and a cast per layer kept three copies (two for the MLP) until backward."""
    # the sparse kernel keeps each layer's own x after dropout as well (S_A reads it): dropout off to see x alone
    model = routed_model(method, kernel=kernel, dropout=0.0 if kernel == "sparse" else 0.05)
    layer_of = {layer: name.rsplit(".", 1)[-1] for name, layer in model.named_modules() if hasattr(layer, "router")}
    current: list[str] = []
    saved_inputs: dict[str, set[int]] = {}

    def enter(layer: torch.nn.Module, args: tuple) -> None:
        current.append(layer_of[layer])

    def leave(layer: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
        current.pop()

    handles = [hook for layer in layer_of
               for hook in (layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave))]

    def watch(tensor: torch.Tensor) -> torch.Tensor:
        if current and tensor.dtype == torch.bfloat16 and tensor.dim() == 2 and tensor.shape[0] == 2 * 6 \
                and tensor.shape[1] == 32:  # a layer input [tokens, hidden] (down_proj's is 48 wide)
            saved_inputs.setdefault(current[-1], set()).add(tensor.untyped_storage().data_ptr())
        return tensor  # as autograd keeps it (a detached copy would let the shared cast die)

    ids = torch.randint(3, 200, (2, 6))
    with torch.autograd.graph.saved_tensors_hooks(watch, lambda tensor: tensor), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(ids).logits.float().sum()
    for handle in handles:
        handle.remove()
    copies = {name: len(pointers) for name, pointers in saved_inputs.items()}
    assert copies == {"q_proj": 2, "k_proj": 2, "v_proj": 2, "gate_proj": 2, "up_proj": 2}  # one per decoder layer
    assert len(saved_inputs["q_proj"] | saved_inputs["k_proj"] | saved_inputs["v_proj"]) == 2
    assert saved_inputs["q_proj"] == saved_inputs["k_proj"] == saved_inputs["v_proj"]
    assert saved_inputs["gate_proj"] == saved_inputs["up_proj"]
    assert not saved_inputs["q_proj"] & saved_inputs["gate_proj"]
    loss.backward()  # the shared copy's gradient reaches the input once per reader
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):  # as Lightning evaluates
        model.eval()(ids)  # an inference tensor has no version counter: this raised RuntimeError


@pytest.mark.parametrize("kernel", ["dense", "sparse", "fused"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_router_losses_under_half_autocast_stay_float32_over_real_tokens(kernel, dtype):
    """The token-weighted means (a mask makes the weights) ran as matmuls, which autocast casts to half: an fp16
    z-loss overflowed to inf once a logsumexp passed 256 (lse**2 > 65504, here ~3e4), stopping a fit whose loss is
    finite, and bf16 kept 3 digits of the z-loss and, in the sparse kernel, of the balance statistics."""
    torch.manual_seed(0)
    layer = MALoRALinear(torch.nn.Linear(16, 8), AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4,
                                                               top_k=2, router_z_loss_coef=0.1, kernel=kernel))
    with torch.no_grad():
        layer.router.weight.normal_(std=40.0)  # router logits in the hundreds, well inside fp16's range
    x = torch.randn(2, 5, 16)
    mask = torch.ones(2, 5)
    mask[1, :2] = 0
    mask[0, 0] = 0  # 7 real tokens: a weight of 1/7 has no exact half value (1/8 had, and hid a half matmul)
    forward = layer.train().routing_context.begin_forward(mask)
    with torch.autocast("cpu", dtype=dtype):
        layer(x)
    statistics = forward.statistics[0]
    real = mask.reshape(-1).bool()
    # float64 reference from the router logits as the half GEMM rounds them (float32 accumulation)
    logits = (x.reshape(-1, 16)[real].to(dtype).double() @ layer.router.weight.to(dtype).double().t()).to(dtype)
    lse = torch.logsumexp(logits.double(), dim=-1)
    assert lse.max() > 256
    probs = logits.double().softmax(dim=-1)
    selected = torch.zeros_like(probs).scatter(1, logits.double().topk(2, dim=-1).indices, 0.5)
    assert statistics.z_loss.dtype == statistics.balance.dtype == torch.float32
    torch.testing.assert_close(statistics.z_loss.double(), (lse ** 2).mean(), rtol=1e-5, atol=0)
    torch.testing.assert_close(statistics.balance.double(), torch.cat([probs.mean(0), selected.mean(0)]),
                               rtol=1e-5, atol=1e-6)
    statistics.z_loss.backward()
    assert torch.isfinite(layer.router.weight.grad).all()
