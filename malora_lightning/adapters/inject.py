"""`inject_adapters`: wrap the targeted linear layers of any causal LM and freeze everything else."""

from __future__ import annotations

import functools
import logging
import re
import warnings
from collections import Counter
from collections.abc import Collection
from typing import Any

from torch import nn
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters.bnb_cpu import disable_bnb_cpu_weight_packing
from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.layers import (
    ADAPTER_CLASSES,
    AdapterLayer,
    RoutedAdapterLayer,
    base_layer_shape,
    is_peft_module,
)
from malora_lightning.adapters.model import CONFIG_ATTRIBUTE, CONTEXT_ATTRIBUTE, adapter_layers, replace_module
from malora_lightning.adapters.routing import install_routing_context

logger = logging.getLogger(__name__)

ALL_LINEAR = "all-linear"
_LAYER_INDEX = re.compile(r"\.(\d+)(?:\.|$)")


def is_supported_linear(module: nn.Module) -> bool:
    """nn.Linear (bitsandbytes Linear4bit/Linear8bitLt subclass it) and GPT-2's Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D)) and not isinstance(module, AdapterLayer)


def _decoder_prefix(model: nn.Module) -> str:
    """The name of the text decoder (`get_decoder()`) in `model`: "" when that is the model itself or unknown."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    return next((name for name, module in model.named_modules() if module is decoder), "")


def _in_decoder(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def language_model_linears(model: nn.Module) -> dict[str, nn.Module]:
    """The linear modules adapters may wrap, by name: the text decoder's and the output head (the head's base layer
    once an adapter wraps it). A multimodal base's vision or audio tower is left out: the tasks are text, which never
    runs it, so its adapters would never train (and `task_profile` would find routed layers that saw no token)."""
    prefix = _decoder_prefix(model)
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((name for name, module in model.named_modules() if module is output_layer), None)
    return {name: module for name, module in model.named_modules() if is_supported_linear(module)
            and (_in_decoder(name, prefix) or head is not None and _in_decoder(name, head))}


def linear_module_names(model: nn.Module) -> list[str]:
    return list(language_model_linears(model))


def linears_outside_the_language_model(model: nn.Module) -> list[str]:
    """Linear modules that adapters never go into (`language_model_linears`): a multimodal base's vision tower."""
    inside = language_model_linears(model)
    return [name for name, module in model.named_modules() if is_supported_linear(module) and name not in inside]


def layer_index(module_name: str) -> int | None:
    """Decoder-layer index in a module name ("model.layers.3.mlp.up_proj" -> 3), None outside the layer stack."""
    match = _LAYER_INDEX.search(module_name)
    return int(match.group(1)) if match else None


def name_matches(name: str, patterns: list[str] | str) -> bool:
    """PEFT semantics: a string is a full-match regex; a list matches exact names or dot-separated suffixes."""
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == pattern or name.endswith("." + pattern) for pattern in patterns)


def is_selected(name: str, config: AdapterConfig) -> bool:
    """Whether the config's target_modules (any name for "all-linear"), exclude_modules and layers_to_transform
    select the module or parameter `name`."""
    if config.target_modules != ALL_LINEAR and not name_matches(name, config.target_modules):
        return False
    if config.exclude_modules is not None and name_matches(name, config.exclude_modules):
        return False
    return config.layers_to_transform is None or layer_index(name) in config.layers_to_transform


def find_target_modules(model: nn.Module, config: AdapterConfig, *,
                        keep_routing: Collection[str] = ()) -> list[str]:
    """Names of the linear modules the config selects, in model order: the language model's
    (`language_model_linears`), never an MoE layer's router or gate (`moe_routing_linears`) but those in
    ``keep_routing`` (`load_adapters`: a folder that adapted them)."""
    output_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    routing = set(moe_routing_linears(model)) - set(keep_routing)
    return [name for name, module in language_model_linears(model).items()
            if is_selected(name, config) and name not in routing
            and not (config.target_modules == ALL_LINEAR and module is output_layer)]


def fused_expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The text decoder's parameters of 3 or more dimensions outside torch's own layers: an MoE layer's experts fused
    into one tensor [experts, ...] (transformers 5's Mixtral, Qwen-MoE, OLMoE, GPT-OSS), the weights of no linear
    module, so no adapter can wrap them. A convolution's kernel (torch's nn.Conv1d in Mamba layers) is not one."""
    prefix = _decoder_prefix(model)
    return {f"{module_name}.{name}" if module_name else name: param
            for module_name, module in model.named_modules()
            if _in_decoder(module_name, prefix) and not type(module).__module__.startswith("torch.")
            for name, param in module.named_parameters(recurse=False) if param.dim() >= 3}


def moe_routing_linears(model: nn.Module) -> list[str]:
    """Linear modules that route an MoE layer's tokens rather than transform them: in the module holding a layer's
    fused experts, each linear outside the experts that is the only linear of its part of the block (the block's own
    child, or a router module around it) with one output per expert (a router: PhiMoE's, AfMoE's) or a single output
    (the gate on a shared expert: Qwen2-MoE's shared_expert_gate). An adapter there would change which experts each
    token reaches and how much of the shared expert it gets, and PhiMoE's router (an nn.Linear subclass) returns the
    routing, not a linear's output. A shared expert's projections are not: Qwen3-Next's are as wide as its 512
    experts."""
    routing = []
    for fused_name, param in fused_expert_parameters(model).items():
        experts_name = fused_name.rpartition(".")[0]
        block_name = experts_name.rpartition(".")[0]
        for child_name, child in model.get_submodule(block_name).named_children():
            prefix = f"{block_name}.{child_name}" if block_name else child_name
            if prefix == experts_name:
                continue
            linears = [(name, module) for name, module in child.named_modules(prefix=prefix)
                       if is_supported_linear(module)]
            if len(linears) == 1 and linears[0][0] not in routing \
                    and base_layer_shape(linears[0][1])[1] in (param.shape[0], 1):
                routing.append(linears[0][0])
    return routing


def _describe_linear_modules(model: nn.Module) -> str:
    names = linear_module_names(model)
    suffixes = Counter(name.rsplit(".", 1)[-1] for name in names)
    listed = ", ".join(f"{suffix} (x{count})" for suffix, count in suffixes.items())
    examples = ", ".join(names[:4])
    outside = linears_outside_the_language_model(model)
    never = f"; {len(outside)} more outside the text decoder (e.g. {outside[0]}) are never adapted" if outside else ""
    return f"linear modules of this model by suffix: {listed}; full names look like: {examples}{never}"


def inject_adapters(model: nn.Module, config: AdapterConfig, *, keep_routing: Collection[str] = ()) -> nn.Module:
    """Replace every targeted linear layer with an adapter layer wrapping it, freeze all non-adapter parameters.

    Works on any Hugging Face causal LM, 4-bit and 8-bit bitsandbytes bases included. The model is modified in place
    and returned; `adapter_layers(model)` lists what was adapted (also logged at INFO level). An MoE router or gate
    is adapted only when named in ``keep_routing`` (`load_adapters`, for a folder whose adapters include one: PEFT's
    "all-linear", and ours before they were left out, adapt Qwen2-MoE's shared_expert_gate).
    """
    if not isinstance(config, AdapterConfig):  # a dict (a YAML recipe's adapter section) failed at config.validate
        raise TypeError(f"inject_adapters needs an AdapterConfig, not a {type(config).__name__}; for a mapping of "
                        "settings, pass AdapterConfig(**settings)")
    config.validate()  # a dataclass field set after construction (`config.rank = 0`) failed inside a layer
    existing = adapter_layers(model)
    if existing:
        raise ValueError(f"the model already has {len(existing)} {_adapter_method(existing)} adapter layers (e.g. "
                         f"{next(iter(existing))!r}); inject into a fresh base model instead of injecting twice")
    peft_module = next((name for name, module in model.named_modules() if is_peft_module(module)), None)
    if peft_module is not None:  # freezing every parameter froze PEFT's adapters; "all-linear" wrapped its lora_A/B
        where = repr(peft_module) if peft_module else "the model itself"
        kind = type(model.get_submodule(peft_module)).__name__
        raise ValueError(f"the model holds PEFT modules ({where} is a {kind}): inject into the base model itself, not "
                         "one PEFT has wrapped (its merge_and_unload() or unload() gives it back), or load a PEFT LoRA "
                         "folder into a fresh base with load_adapters")
    routing = [name for name in moe_routing_linears(model) if is_selected(name, config) and name not in keep_routing]
    if routing and config.target_modules != ALL_LINEAR:
        warnings.warn(f"AdapterConfig.target_modules={config.target_modules!r} selects {len(routing)} MoE routers or "
                      f"gates (e.g. {routing[0]!r}), which get no adapter: an adapter there would change which experts "
                      "each token reaches rather than what the layer computes; leave them out of target_modules to "
                      "silence this", stacklevel=2)
    targets = find_target_modules(model, config, keep_routing=keep_routing)
    regex_note = " (a string is a regular expression that must match a module's whole name, e.g. '.*q_proj'; a list " \
                 "matches names and name endings, e.g. ['q_proj'])" if isinstance(config.target_modules, str) else ""
    if not targets:
        raise ValueError(f"AdapterConfig.target_modules={config.target_modules!r} (exclude_modules="
                         f"{config.exclude_modules!r}, layers_to_transform={config.layers_to_transform!r}) matched "
                         f"no module{regex_note}; {_describe_linear_modules(model)}")
    if isinstance(config.target_modules, list):
        names = linear_module_names(model)
        unmatched = [pattern for pattern in config.target_modules if not any(name_matches(n, [pattern]) for n in names)]
        if unmatched:  # the paper's q/k/v/gate/up/down on Phi-3 (fused qkv_proj) adapt down_proj alone
            warnings.warn(f"AdapterConfig.target_modules entries {unmatched} match no linear module of this model, so "
                          f"those layers get no adapter; {_describe_linear_modules(model)}", stacklevel=2)
    fused = [name for name in fused_expert_parameters(model) if is_selected(name, config)]
    if fused:  # Qwen2-MoE's paper targets adapted its shared expert alone, without a word about the routed experts
        shape = tuple(model.get_parameter(fused[0]).shape)
        warnings.warn(f"AdapterConfig.target_modules={config.target_modules!r} selects {len(fused)} fused MoE expert "
                      f"weights (e.g. {fused[0]!r}, shape {shape}: all experts of a layer in one parameter, not linear "
                      "modules), which adapters cannot wrap, so the routed experts get no adapter and stay frozen. "
                      f"The adapters go to linear modules alone ({_target_summary(targets)}); name just those in "
                      "target_modules (the attention projections, a shared expert's) to silence this", stacklevel=2)
    if config.layers_to_transform is not None:
        layers = {layer_index(name) for name in linear_module_names(model)} - {None}
        missing = sorted(set(config.layers_to_transform) - layers)
        if missing:  # a deeper model's recipe: only the layers this model has get adapters
            warnings.warn(f"AdapterConfig.layers_to_transform entries {missing} name no decoder layer of this model "
                          f"(it has layers {min(layers)} to {max(layers)}), so they get no adapter", stacklevel=2)

    for param in model.parameters():
        param.requires_grad_(False)
    disable_bnb_cpu_weight_packing(model)
    layer_class = ADAPTER_CLASSES[config.method]
    context = install_routing_context(model) if config.is_routed else None
    for name in targets:
        base_layer = model.get_submodule(name)
        if issubclass(layer_class, RoutedAdapterLayer):
            wrapped = layer_class(base_layer, config, name=name, context=context)
        else:
            wrapped = layer_class(base_layer, config, name=name)
        replace_module(model, name, wrapped)

    setattr(model, CONFIG_ATTRIBUTE, config)
    setattr(model, CONTEXT_ATTRIBUTE, context)
    if hasattr(model, "save_pretrained"):
        # a partial of a module-level function: `copy.deepcopy` and pickling rebind it to the copy (a bound method
        # unpickles by looking its function's name up on the model, which has no attribute of that name)
        model.save_pretrained = functools.partial(_save_pretrained_without_adapters, model)
    logger.info("Injected %s adapters into %d modules: %s", config.method, len(targets), _target_summary(targets))
    return model


def _target_summary(targets: list[str]) -> str:
    suffixes = Counter(name.rsplit(".", 1)[-1] for name in targets)
    return ", ".join(f"{suffix} x{count}" for suffix, count in suffixes.items())


def _save_pretrained_without_adapters(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """transformers' `save_pretrained` would write the wrapped layers under names no base model has: the folder
    reloads with the adapted layers' weights freshly initialised and no error. Refuse while adapters are injected;
    once they are merged away (`merge_adapters`, `merge_task`) the model saves as usual."""
    layers = adapter_layers(model)
    if layers:
        raise ValueError(f"save_pretrained on a model with {len(layers)} injected {_adapter_method(layers)} adapter layers "
                         "would write a folder that reloads with those layers randomly initialised. Save the adapters "
                         "with save_adapters(model, folder) (load them back with load_adapted_model), or merge them "
                         "into the base first (merge_adapters for LoRA, merge_task for MoLoRA/MALoRA)")
    return type(model).save_pretrained(model, *args, **kwargs)


def _adapter_method(layers: dict[str, AdapterLayer]) -> str:
    return next(iter(layers.values())).method
