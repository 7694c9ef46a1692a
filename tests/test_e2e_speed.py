"""benchmarks/e2e_speed.py's methods on a tiny model: each prepares and takes steps (never timed here), with the
configuration the report names; the fused methods through Triton's interpreter (tests/conftest.py)."""

import pytest
import torch

from benchmarks.e2e_speed import (
    OUR_CONFIGURATIONS,
    Prepared,
    ScopeMarker,
    Setting,
    autocast_for,
    categorise,
    evaluation_steps,
    make_batch,
    make_optimizer,
    mark_scopes,
    prepare,
    prepare_ours,
    ratios,
    training_step,
)
from benchmarks.quality import CONFIGURATIONS
from malora_lightning.adapters import adapter_layers
from tests.helpers import tiny_model


@pytest.mark.parametrize("method", ["base", "lora", "molora", "malora", "molora_fused", "malora_fused"])
def test_each_method_prepares_its_configuration_and_trains(method):
    base = tiny_model("llama")
    prepared = prepare(method, base)
    family = method.removesuffix("_fused")
    layers = adapter_layers(prepared.model)
    if method == "base":
        assert not layers and not prepared.trainable
    else:
        expected = CONFIGURATIONS[OUR_CONFIGURATIONS[family]]["adapter"]
        assert {layer.method for layer in layers.values()} == {expected["method"]}
        assert {layer.rank for layer in layers.values()} == {expected["rank"]}
        assert {layer.kernel for layer in layers.values()} == {"fused" if method.endswith("_fused") else "dense"}
    setting = Setting("fp32", 2, 8)
    device = torch.device("cpu")
    before = [p.detach().clone() for p in prepared.trainable]
    phases = []
    step = training_step(prepared, make_optimizer(prepared, "default"), make_batch(setting, 200, device),
                         autocast_for(setting, device), device, phases)
    for _ in range(2):
        step()
    assert len(phases) == 2
    assert all(not torch.equal(b, p) for b, p in zip(before, prepared.trainable))  # every adapter tensor trained


def test_ratios_compare_malora_with_each_method_in_its_own_mode():
    totals = {"base": 1.0, "lora": 2.0, "molora": 4.0, "malora": 3.0, "molora_fused": 2.5, "malora_fused": 2.0,
              "peft_lora": 2.0}
    out = ratios(totals)
    assert out["malora/lora"] == 1.5 and out["malora/molora"] == 0.75 and out["malora/peft_lora"] == 1.5
    assert out["malora_fused/lora"] == 1.0  # LoRA has no routing to fuse: compared with eager LoRA
    assert out["malora_fused/molora"] == 0.8  # fused over fused
    assert out["malora/base"] == 3.0


@pytest.mark.parametrize("method", ["base", "lora", "molora", "malora", "peft_lora", "mixlora"])
def test_every_tensor_a_method_reads_sits_on_the_base_models_device(method):
    """A meta base stands in for a CUDA one: a tensor created without a device lands on the CPU (MixLoRA's routers
    did), where each forward copies it over and AdamW takes its per-tensor loop for every tensor."""
    pytest.importorskip({"peft_lora": "peft", "mixlora": "mixlora"}.get(method, "torch"))
    prepared = prepare(method, tiny_model("llama").to("meta"))
    assert {p.device.type for p in prepared.all_parameters} == {"meta"}
    assert {p.device.type for p in prepared.trainable} <= {"meta"}


def test_prepare_refuses_a_method_that_leaves_a_tensor_off_the_run_device(monkeypatch):
    def with_a_cpu_tensor(method: str, model: torch.nn.Module) -> Prepared:
        prepared = prepare_ours(method, model)
        prepared.all_parameters.append(torch.nn.Parameter(torch.zeros(2)))
        return prepared

    monkeypatch.setattr("benchmarks.e2e_speed.prepare_ours", with_a_cpu_tensor)
    with pytest.raises(RuntimeError, match="lora: tensors on \\['cpu'\\]"):
        prepare("lora", tiny_model("llama").to("meta"))


def test_our_methods_generate_with_their_weights_frozen_as_the_library_does():
    prepared = {"malora": prepare("malora", tiny_model("llama")), "base": prepare("base", tiny_model("llama"))}
    layer = next(iter(adapter_layers(prepared["malora"].model).values()))
    frozen_during_forwards = []
    layer.register_forward_pre_hook(lambda module, _: frozen_during_forwards.append(module.frozen_weights is not None))
    setting, device = Setting("fp32", 2, 8), torch.device("cpu")
    steps = evaluation_steps(prepared, make_batch(setting, 200, device), autocast_for(setting, device), device)
    prepared["malora"].model.eval()
    steps["malora:generate"]()
    steps["base:generate"]()  # nothing to freeze: runs as it is
    assert frozen_during_forwards and all(frozen_during_forwards)
    assert layer.frozen_weights is None  # the span ends with the call


def test_the_profile_attributes_a_routed_models_step_to_its_scopes():
    """`--profile` scoped a routing method that the fused dense kernel no longer has (AttributeError)."""
    prepared = prepare("malora", tiny_model("llama"))
    setting, device = Setting("fp32", 2, 8), torch.device("cpu")
    step = training_step(prepared, make_optimizer(prepared, "default"), make_batch(setting, 200, device),
                         autocast_for(setting, device), device, [])
    step()
    marker = ScopeMarker()
    mark_scopes(prepared.model, marker)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        step()
    marker.remove()
    categories = categorise(list(profiler.events()))
    assert {"forward: adapter", "backward: adapter", "forward: base linear (GEMM + rest)",
            "optimizer (AdamW step + zero_grad)"} <= set(categories)


def test_a_whole_model_method_is_its_method_compiled_whole():
    """`malora_whole` is `malora` on its own copy of the base, called through torch.compile of the whole model, and
    compared with LoRA compiled whole (not run here: inductor compiles a whole model for minutes on a CPU)."""
    prepared = prepare("malora_whole", tiny_model("llama"))
    assert isinstance(prepared.model, torch._dynamo.eval_frame.OptimizedModule)
    layers = adapter_layers(prepared.model._orig_mod)
    assert {layer.method for layer in layers.values()} == {"malora"} and prepared.router_loss is not None
    assert {id(p) for p in prepared.trainable} == {id(p) for p in prepared.model.parameters() if p.requires_grad}
    out = ratios({"lora": 2.0, "lora_whole": 1.0, "malora_whole": 1.2, "peft_lora_whole": 1.0, "molora": 4.0})
    assert out["malora_whole/lora"] == 1.2 and out["malora_whole/peft_lora"] == 1.2  # whole over whole
    assert out["malora_whole/molora"] == 0.3  # MoLoRA has no whole-model run: compared with eager
