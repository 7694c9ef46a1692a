"""Folding adapters into the base weights: LoRA directly, MoLoRA/MALoRA through a task profile.

A LoRA update scaling * B A is static, so `merge_adapters` adds it to the base weight and the model becomes a plain
transformers model again. A mixture's update depends on each token's gates, so no static merge reproduces it. For
a model serving one task, `task_profile` measures the mean gate vector of every routed layer over that task's real
tokens, and the mixture collapses to one static low-rank update, the one the layer applies when every token gets
those mean gates:

    delta_W = scaling * sum_t g_t B_t D_t        (D_t = P_t S_A for MALoRA, A_t for MoLoRA)

It is exact for the mixture with its gates fixed to the profile, and an approximation of the routed model (the
closer, the more uniform the routing over the task). `task_lora_weights` expresses it as LoRA factors of the
smallest rank the structure gives (a LoRA adapter file), `task_lora_model` as an in-memory LoRA model, and
`merge_task` folds it into the base weights.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters.bnb_cpu import disable_bnb_cpu_weight_packing
from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.layers import LoRALinear, RoutedAdapterLayer
from malora_lightning.adapters.model import (
    CONFIG_ATTRIBUTE,
    CONTEXT_ATTRIBUTE,
    add_routing_observer,
    adapter_layers,
    get_adapter_config,
    replace_module,
    routed_layers,
    routing_context,
)
from malora_lightning.adapters.routing import RoutingRecord, kept_gates, scatter_gates
from malora_lightning.values import check_switch

MERGE_DTYPE = torch.float64  # updates are formed and added in float64, then cast to the weight's dtype


@dataclass(frozen=True)
class TaskProfile:
    """The routing of one task: per routed layer (module name) the mean gate vector [N] over the task's real tokens.

    The gates are those the forward applies (renormalised or raw per the layer's config, zero for unselected
    experts, without the scaling factor), in float64.
    """

    gates: dict[str, torch.Tensor]
    num_tokens: int


@dataclass(frozen=True)
class LoRAFactors:
    """A static update scaling * lora_B @ lora_A for one base layer (lora_A [r, n], lora_B [m, r], float64)."""

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    scaling: float

    def delta_weight(self) -> torch.Tensor:
        """[m, n] in float64."""
        return self.scaling * (self.lora_B.to(MERGE_DTYPE) @ self.lora_A.to(MERGE_DTYPE))


# ---------------------------------------------------------------------------------------------------- LoRA
def merge_adapters(model: nn.Module, dequantize: bool = False) -> nn.Module:
    """Fold every LoRA (or AsyLoRA) update into its base weight and unwrap the adapter layers, in place.

    The result is a plain transformers model (`save_pretrained` writes a folder `from_pretrained` loads). A
    bitsandbytes 4-/8-bit base cannot hold the update: `dequantize=True` replaces it by a plain `nn.Linear` holding
    the dequantized weight plus the update, and every other bitsandbytes layer by its dequantized weight, so the
    model is plain throughout. Mixtures have no static update: use `task_profile` and `merge_task`.
    """
    config = get_adapter_config(model)
    if config.is_routed:
        raise ValueError(f"merge_adapters folds static LoRA updates, but the model has {config.method} adapters, "
                         "whose update depends on each token's routing: measure a task's routing with "
                         "task_profile(model, batches) and merge it with merge_task(model, profile), or get a LoRA "
                         "adapter with task_lora_weights / task_lora_model")
    factors = {name: LoRAFactors(layer.lora_A.detach(), layer.lora_B.detach(), layer.scaling)
               for name, layer in adapter_layers(model).items()}
    return _fold(model, factors, dequantize)


# ---------------------------------------------------------------------------------------------------- task profile
class ProfileBatch(Protocol):
    """What `task_profile` reads of a batch object (the data module's `TrainingBatch` is one)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None


def task_profile(model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor] | ProfileBatch]) -> TaskProfile:
    """Mean gate vector of every routed layer over the real tokens (attention_mask 1) of `batches`.

    Each batch holds `input_ids` and optionally `attention_mask`: a mapping, or a batch with those attributes (the
    `TrainingBatch` of `MultiTaskDataModule.task_dataloader`, which says it is for this). The model runs in evaluation
    mode without gradients; its modules' train/eval modes are restored and the observer removed afterwards.
    """
    layers = _routed_layers_of(model, "task_profile")
    module_names = {layer.name: name for name, layer in layers.items()}  # records carry the layer's own name
    sums = {name: torch.zeros(layer.num_experts, dtype=MERGE_DTYPE) for name, layer in layers.items()}
    counts = dict.fromkeys(layers, 0)

    def observe(record: RoutingRecord) -> None:
        name = module_names[record.layer_name]
        layer = layers[name]
        gates = scatter_gates(kept_gates(record.probs.gather(1, record.experts), layer.renormalize_top_k),
                              record.experts, layer.num_experts)
        if record.token_mask is not None:
            gates = gates[record.token_mask]
        sums[name] += gates.sum(dim=0).to(device="cpu", dtype=MERGE_DTYPE)
        counts[name] += gates.shape[0]

    modes = {module: module.training for module in model.modules()}
    device = next(model.parameters()).device
    num_tokens = 0
    handle = add_routing_observer(model, observe)
    try:
        model.eval()
        with torch.no_grad():
            for batch in batches:
                input_ids, mask = _profile_inputs(batch)
                model(input_ids=input_ids.to(device), attention_mask=None if mask is None else mask.to(device))
                num_tokens += input_ids.numel() if mask is None else int(mask.sum())
    finally:
        handle.remove()
        for module, training in modes.items():
            module.training = training
    unseen = [name for name, count in counts.items() if count == 0]
    if unseen:
        raise ValueError(f"task_profile: routed layer {unseen[0]!r} saw no real token ({len(unseen)} layers in "
                         "all); pass at least one batch with a non-zero attention_mask through model(input_ids=..., "
                         "attention_mask=...)")
    return TaskProfile(gates={name: sums[name] / counts[name] for name in layers}, num_tokens=num_tokens)


def _profile_inputs(batch: Mapping[str, torch.Tensor] | ProfileBatch
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(input_ids, attention_mask or None) of a `task_profile` batch: a mapping's keys, or a batch's attributes (the
    data module's `TrainingBatch`: it has no `get`, and a loader of them failed with an AttributeError)."""
    if isinstance(batch, Mapping):
        return batch["input_ids"], batch.get("attention_mask")
    return batch.input_ids, batch.attention_mask


# ---------------------------------------------------------------------------------------------------- task collapse
def task_lora_weights(model: nn.Module, profile: TaskProfile) -> tuple[AdapterConfig, dict[str, torch.Tensor]]:
    """The mixture with gates fixed to `profile`, as a LoRA adapter: its config and tensors keyed
    "<module>.lora_A" / "<module>.lora_B" (the keys `adapter_state_dict` gives a LoRA model), in the adapter dtype.

    Alpha is scaling * rank, so the LoRA scaling equals the mixture's.
    """
    config, factors = _task_factors(model, profile)
    tensors: dict[str, torch.Tensor] = {}
    for name, factor in factors.items():
        tensors[f"{name}.lora_A"] = factor.lora_A.to(config.torch_dtype)
        tensors[f"{name}.lora_B"] = factor.lora_B.to(config.torch_dtype)
    return config, tensors


def task_lora_model(model: nn.Module, profile: TaskProfile) -> nn.Module:
    """Replace every mixture layer by a `LoRALinear` on the same base layer holding the task's collapsed update, in
    place: a LoRA model that `save_adapters` saves and `merge_adapters` merges."""
    config, factors = _task_factors(model, profile)
    for name, factor in factors.items():
        layer = model.get_submodule(name)
        lora = LoRALinear(layer.base_layer, config, name=layer.name)
        with torch.no_grad():
            lora.lora_A.copy_(factor.lora_A)
            lora.lora_B.copy_(factor.lora_B)
        replace_module(model, name, lora)
    _remove_routing_hooks(model)
    setattr(model, CONFIG_ATTRIBUTE, config)
    setattr(model, CONTEXT_ATTRIBUTE, None)  # as inject_adapters leaves an unrouted model
    return model


def merge_task(model: nn.Module, profile: TaskProfile, dequantize: bool = False) -> nn.Module:
    """Fold the task's collapsed update (`task_lora_weights`) into every base weight and unwrap, in place, as
    `merge_adapters` does for LoRA (same `dequantize` rule for bitsandbytes bases)."""
    _, factors = _task_factors(model, profile)
    return _fold(model, factors, dequantize)


def _task_factors(model: nn.Module, profile: TaskProfile) -> tuple[AdapterConfig, dict[str, LoRAFactors]]:
    """The LoRA config and per-layer float64 factors of the mixture with its gates fixed to `profile`.

    With gates g: delta_W = scaling * sum_t g_t B_t E_t S, E_t the expert down-projection and S the shared one
    (MALoRA; the identity for MoLoRA). When S exists and its rank d is at most N*r, A' = S and
    B' = sum_t g_t B_t E_t (rank d); otherwise A' stacks the N full down-projections and B' = [g_1 B_1, ..., g_N B_N]
    (rank N*r).
    """
    layers = _routed_layers_of(model, "merge_task / task_lora_weights / task_lora_model")
    _check_profile(layers, profile)
    source = get_adapter_config(model)
    factors: dict[str, LoRAFactors] = {}
    for name, layer in layers.items():
        gates = profile.gates[name].to(device=layer.lora_B.device, dtype=MERGE_DTYPE)
        up = layer.lora_B.detach().to(MERGE_DTYPE)  # [N, r, m], each B_t transposed
        shared_A, expert_down = layer.down_weights()
        down = expert_down.detach().to(MERGE_DTYPE)  # [N, r, d] (MALoRA's lora_P) or [N, r, n] (MoLoRA's lora_A)
        shared = None if shared_A is None else shared_A.detach().to(MERGE_DTYPE)  # [d, n]
        if shared is not None and shared.shape[0] <= layer.num_experts * layer.rank:
            lora_A = shared
            lora_B = torch.einsum("t,trm,trd->md", gates, up, down)
        else:
            lora_A = (down if shared is None else down @ shared).flatten(0, 1)  # [N*r, n]
            lora_B = (gates[:, None, None] * up).flatten(0, 1).t().contiguous()  # [m, N*r]
        factors[name] = LoRAFactors(lora_A, lora_B, layer.scaling)
    rank = next(iter(factors.values())).lora_A.shape[0]
    config = AdapterConfig(method="lora", rank=rank, shared_rank=None, alpha=source.scaling * rank, dropout=0.0,
                           target_modules=list(factors), adapter_dtype=source.adapter_dtype)
    return config, factors


def _check_profile(layers: Mapping[str, RoutedAdapterLayer], profile: TaskProfile) -> None:
    missing = sorted(set(layers) - set(profile.gates))
    extra = sorted(set(profile.gates) - set(layers))
    if missing or extra:
        problem = f"lacks routed layer {missing[0]!r}" if missing else f"has layer {extra[0]!r}, which is not routed"
        raise ValueError(f"TaskProfile {problem} ({len(missing)} missing, {len(extra)} extra): a profile holds exactly "
                         f"the model's routed layers, e.g. {next(iter(layers))!r}; measure it with "
                         "task_profile(model, batches) on this model")
    for name, layer in layers.items():
        if profile.gates[name].shape != (layer.num_experts,):
            raise ValueError(f"TaskProfile.gates[{name!r}] has shape {tuple(profile.gates[name].shape)}, but the "
                             f"layer has num_experts={layer.num_experts}: expected shape ({layer.num_experts},)")
        if not bool(torch.isfinite(profile.gates[name]).all()):  # it went into every collapsed weight unseen
            raise ValueError(f"TaskProfile.gates[{name!r}] holds NaN or infinite values "
                             f"({profile.gates[name].tolist()}): expected the mean gates task_profile measures")


def _routed_layers_of(model: nn.Module, caller: str) -> dict[str, RoutedAdapterLayer]:
    config = get_adapter_config(model)
    if not config.is_routed:
        raise ValueError(f"{caller} collapses a mixture's routing, but the model has {config.method} adapters, whose "
                         "update is static: merge them with merge_adapters(model)")
    return routed_layers(model)


# ---------------------------------------------------------------------------------------------------- folding
def _fold(model: nn.Module, factors: Mapping[str, LoRAFactors], dequantize: bool) -> nn.Module:
    """Add each update to its base weight, put the base layers back in place of the adapter layers and drop the
    adapter attributes. Every update and every quantized base is checked before anything changes."""
    check_switch("dequantize", dequantize)  # "false" replaced every quantized layer by its dequantized weight
    layers = adapter_layers(model)
    for name, factor in factors.items():  # a diverged fit's adapters: NaN base weights, saved as a model
        if not all(bool(torch.isfinite(tensor).all()) for tensor in (factor.lora_A, factor.lora_B)):
            raise ValueError(f"adapter layer {name!r} holds NaN or infinite values, which merging would write into "
                             "its base weight: merge adapters from a checkpoint before the training diverged")
    quantized = {name: layer.base_layer for name, layer in layers.items() if _is_bnb(layer.base_layer)}
    if quantized and not dequantize:
        name, base = next(iter(quantized.items()))
        raise ValueError(f"adapter layer {name!r} wraps a bitsandbytes {type(base).__name__} ({len(quantized)} "
                         "quantized layers in all), whose quantized weight cannot hold the merged update: pass "
                         "dequantize=True to replace it by a plain nn.Linear holding the dequantized weight plus the "
                         "update, or load the base model unquantized, load the adapters into it and merge that")
    dequantizing = dequantize and any(_is_bnb(module) for module in model.modules())
    if dequantizing:  # checked before the first merge: a refusal midway left the earlier layers merged
        for name, base in quantized.items():
            _check_dequantizable(f"adapter layer {name!r} wraps", base)
        bases = {id(base) for base in quantized.values()}
        for name, module in model.named_modules():
            if _is_bnb(module) and id(module) not in bases:
                _check_dequantizable(f"layer {name!r} is", module)
        disable_bnb_cpu_weight_packing(model)  # undo a CPU repacking, so the weights dequantize as stored
        dtype = _unquantized_dtype(model)
    shared = _shared_parameters(model)
    for name, layer in layers.items():
        delta = factors[name].delta_weight()
        base = layer.base_layer
        if name in quantized:
            base = _dequantized_linear(base, delta, dtype)
        else:
            if id(base.weight) in shared:
                _untie(model, base)
            weight = base.weight
            update = delta.t() if isinstance(base, Conv1D) else delta  # Conv1D stores [n, m]
            with torch.no_grad():
                weight.copy_((weight.to(MERGE_DTYPE) + update.to(weight.device)).to(weight.dtype))
        replace_module(model, name, base)
    if dequantizing:  # the layers without an adapter too: a model half in 4-bit saves as one nothing can load
        for name, module in [(name, module) for name, module in model.named_modules() if _is_bnb(module)]:
            replace_module(model, name, _dequantized_linear(module, None, dtype))
    _remove_routing_hooks(model)
    for attribute in (CONFIG_ATTRIBUTE, CONTEXT_ATTRIBUTE):
        if hasattr(model, attribute):
            delattr(model, attribute)
    hf_quantizer = getattr(model, "hf_quantizer", None)
    if hf_quantizer is not None and not any(_is_bnb(module) for module in model.modules()):
        hf_quantizer.remove_quantization_config(model)  # nothing is quantized any more: save as a plain model
    return model


def _shared_parameters(model: nn.Module) -> set[int]:
    """The ids of the parameters registered under more than one name (tied weights, such as an output head tied to
    the input embeddings)."""
    names = Counter(id(parameter) for _, parameter in model.named_parameters(remove_duplicate=False))
    return {identity for identity, count in names.items() if count > 1}


def _untie(model: nn.Module, base: nn.Module) -> None:
    """Give `base` its own copy of a weight it shares with another module, so that the update reaches this layer
    only: a LoRA on `lm_head` of a model with tied input and output embeddings (SmolLM2's) would otherwise change
    the input embeddings too. The config then stops tying them, so a saved merged model loads them apart."""
    base.weight = nn.Parameter(base.weight.detach().clone(), requires_grad=base.weight.requires_grad)
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "tie_word_embeddings", False):
        config.tie_word_embeddings = False


def _is_bnb(obj: nn.Module | torch.Tensor) -> bool:
    """A bitsandbytes layer or parameter (checked by module path, so bitsandbytes is only imported when one is
    present)."""
    return type(obj).__module__.startswith("bitsandbytes")


def _check_dequantizable(layer: str, module: nn.Module) -> None:
    """Refuse a bitsandbytes module `_dequantized_linear` cannot turn into a plain nn.Linear; `layer` names it
    ("adapter layer 'x' wraps", "layer 'y' is")."""
    import bitsandbytes as bnb

    if not isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
        raise ValueError(f"{layer} a bitsandbytes {type(module).__name__}; only Linear4bit and Linear8bitLt layers "
                         "can be dequantized for merging")
    if isinstance(module, bnb.nn.Linear8bitLt) and module.weight.SCB is None and module.state.SCB is None:
        raise ValueError(f"{layer} a Linear8bitLt with no quantization scale (SCB) yet; move the model to its device "
                         "(which quantizes it) before merging")


def _dequantized_linear(base: nn.Module, delta: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A frozen nn.Linear in `dtype` holding the dequantized weight of the bitsandbytes layer `base` plus `delta`
    (None: the weight alone); `_check_dequantizable` passed it."""
    import bitsandbytes as bnb

    weight = base.weight
    if isinstance(base, bnb.nn.Linear4bit):
        dense = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
    else:  # Linear8bitLt
        scale = weight.SCB if weight.SCB is not None else base.state.SCB
        dense = bnb.functional.int8_vectorwise_dequant(weight.data, scale)
    merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, dtype=dtype,
                       device=dense.device)
    with torch.no_grad():
        merged.weight.copy_(dense if delta is None else dense.to(MERGE_DTYPE) + delta.to(dense.device))
        if base.bias is not None:
            merged.bias.copy_(base.bias)
    merged.requires_grad_(False)
    return merged


def _unquantized_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's unquantized weights: the dtype its hidden states reach a quantized layer in (a
    bitsandbytes layer computes in its compute dtype but returns its input's dtype; a plain layer must take and
    return that dtype itself)."""
    for param in model.parameters():
        if param.is_floating_point() and not _is_bnb(param):
            return param.dtype
    raise ValueError(f"{type(model).__name__} has no unquantized floating-point weight to take a dtype from")


def _remove_routing_hooks(model: nn.Module) -> None:
    """Detach the forward-pre-hooks that began each routed forward (a mixture model has them; LoRA has none)."""
    context = routing_context(model)
    if context is not None:
        for hook in context.hooks:
            hook.remove()
        context.hooks.clear()
