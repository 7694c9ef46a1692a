"""Model-level views of injected adapters: which layers, which config, the router losses, routing observers,
compilation and frozen weights for evaluation."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.layers import AdapterLayer, RoutedAdapterLayer
from malora_lightning.adapters.routing import (
    ObserverHandle,
    RoutingContext,
    RoutingObserver,
    ScoringPass,
    load_balance_from_statistics,
)

logger = logging.getLogger(__name__)

CONFIG_ATTRIBUTE = "malora_config"
CONTEXT_ATTRIBUTE = "malora_routing_context"


# Modules that FSDP1 and activation-checkpoint wrapping put between a module and its children; their name segments are
# in neither a (full) state dict's keys nor an adapter folder's.
WRAPPER_SEGMENTS = frozenset({"_fsdp_wrapped_module", "_checkpoint_wrapped_module"})


def unwrapped_name(name: str) -> str:
    """A module's or tensor's name as the unwrapped model has it ("layers.0._fsdp_wrapped_module.mlp" ->
    "layers.0.mlp"), the name its state-dict key and adapter-folder key carry."""
    return ".".join(segment for segment in name.split(".") if segment not in WRAPPER_SEGMENTS)


def trained_tensor_names(module: nn.Module) -> set[str]:
    """The (unwrapped) names of the parameters of `module` that train: the adapters, and whatever else a user unfroze
    or added (a base layer, a subclass's own parameter)."""
    return {unwrapped_name(name) for name, param in module.named_parameters() if param.requires_grad}


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Adapted modules by their name in `model`, wrappers left out (`unwrapped_name`): the names `save_adapters` and
    checkpoints use as tensor-key prefixes, which on a wrapped model (FSDP1, activation checkpointing) are not module
    paths for `get_submodule`."""
    return {unwrapped_name(name): module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def routed_layers(model: nn.Module) -> dict[str, RoutedAdapterLayer]:
    return {unwrapped_name(name): module for name, module in model.named_modules()
            if isinstance(module, RoutedAdapterLayer)}


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` where the submodule `name` ("model.layers.0.mlp.up_proj") is: wrapping a base layer in an
    adapter layer, or putting the base layer back."""
    parent_name, _, child_name = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child_name, module)


def get_adapter_config(model: nn.Module) -> AdapterConfig:
    config = getattr(model, CONFIG_ATTRIBUTE, None)
    if config is None:
        raise ValueError(f"{type(model).__name__} has no adapters: call inject_adapters(model, config) first")
    return config


def routing_context(model: nn.Module) -> RoutingContext | None:
    return getattr(model, CONTEXT_ATTRIBUTE, None)


@dataclass
class RouterLossSummary:
    """Router losses of the most recent forward pass, each averaged over the routed layers (unweighted)."""

    load_balance: torch.Tensor
    z_loss: torch.Tensor | None
    num_layers: int


def router_losses(model: nn.Module) -> RouterLossSummary | None:
    """Average the per-layer losses of the model's latest forward; None for unrouted methods, before any forward, or
    when the latest forward collected none (evaluation mode, or gradients off).

    The statistics live in that forward's `ForwardRouting`, which the next forward replaces: a stale loss can never
    leak into a step, and a forward that no backward follows leaves nothing alive after the next forward starts
    (other than a side pass). A side pass, the model in training mode under no_grad (a teacher pass inside
    `compute_lm_loss`, say), collects nothing and leaves the step's own forward, and its losses, in place.
    """
    context = routing_context(model)
    forward = None if context is None else context.losses_forward
    if forward is not None and not forward.statistics and forward.routed_without_gradients:
        warnings.warn("the latest forward routed in training mode with gradients off inside, so it has no router "
                      "losses (reentrant activation checkpointing runs the layers under no_grad: pass "
                      "gradient_checkpointing_kwargs={'use_reentrant': False})", stacklevel=2)
    if forward is None or not forward.statistics:
        return None
    load_balance = load_balance_from_statistics(torch.stack([s.balance for s in forward.statistics])).mean()
    z_terms = [s.z_loss for s in forward.statistics if s.z_loss is not None]
    z_loss = torch.stack(z_terms).mean() if z_terms else None
    return RouterLossSummary(load_balance=load_balance, z_loss=z_loss, num_layers=len(forward.statistics))


def drop_routing_record(model: nn.Module) -> None:
    """Drop the latest forward's routing record, and with its router statistics the graph they reach (every
    activation that forward saved): for a forward that no backward will follow, such as a training step stopped by
    an error, whose graph the record kept alive until a next forward. A model without routed adapters has none."""
    context = routing_context(model)
    if context is not None:
        context.current = context.losses_forward = None


def aux_loss(model: nn.Module) -> torch.Tensor:
    """aux_loss_coef * mean load-balance loss (+ router_z_loss_coef * mean z-loss) of the most recent forward.

    Uniform routing gives exactly `aux_loss_coef`. Returns a zero tensor for LoRA or when nothing was routed.
    """
    summary = router_losses(model)
    return torch.zeros(()) if summary is None else weighted_router_loss(summary, get_adapter_config(model))


def weighted_router_loss(summary: RouterLossSummary, config: AdapterConfig) -> torch.Tensor:
    """`aux_loss` of a `router_losses` summary already at hand (a training step logs its parts too)."""
    total = config.aux_loss_coef * summary.load_balance
    if summary.z_loss is not None:
        total = total + config.router_z_loss_coef * summary.z_loss
    return total


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Graphs per kernel function: one per combination of autocast state, input dtype, whether x needs a gradient (only
# the first layer's inputs do not), training / evaluation / generation (0/1 specialisation at batch 1) and duck-sized
# equal dimensions; torch's default limit of 8 is too few for a model that trains, evaluates and generates.
RECOMPILE_LIMIT = 64


def compile_adapters(model: nn.Module, mode: str | None = "default", backend: str = "inductor") -> nn.Module:
    """Run every adapter layer's adapter path through `torch.compile` (`fullgraph=True`, symbolic shapes);
    `mode=None` switches back to eager. The frozen base layers stay eager (bitsandbytes' kernels are their own).
    `backend` is torch.compile's (e.g. "aot_eager" to check tracing without generating kernels).

    Compilation happens at the first forward of each shape class, training and evaluation separately.
    """
    if mode is not None and mode not in COMPILE_MODES:
        raise ValueError(f"compile mode {mode!r} is invalid: expected one of {COMPILE_MODES} or None (eager)")
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no adapters: call inject_adapters(model, config) first")
    sparse = [name for name, layer in layers.items() if layer.kernel == "sparse"]
    if mode is not None and sparse:
        raise ValueError(f"AdapterConfig.kernel='sparse' (e.g. {sparse[0]!r}) cannot be compiled whole: it dispatches "
                         "a data-dependent number of tokens to each expert. Use kernel='dense' to compile, or leave "
                         "the adapters eager")
    if mode is not None and torch._dynamo.config.recompile_limit < RECOMPILE_LIMIT:
        logger.info("compile_adapters: raising torch._dynamo.config.recompile_limit from %d to %d",
                    torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    for layer in layers.values():
        layer.compile_mode = mode
        layer.compile_backend = backend
    return model


def enable_activation_checkpointing(model: nn.Module, use_reentrant: bool = False) -> None:
    """Turn on a transformers model's activation checkpointing. transformers renamed `gradient_checkpointing_enable`
    to `activation_checkpointing_enable` (the old name warns FutureWarning, and goes in 6); our 5.18 floor has only
    the old one."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})


@contextlib.contextmanager
def frozen_adapter_weights(model: nn.Module) -> Iterator[None]:
    """For a span in which the adapter weights do not change, such as one `generate` call (a forward per new
    token): forwards without gradients make each layer's compute-dtype weights once and
    reuse them, rather than casting and stacking them every forward (on a GPU each is a kernel launch, per layer
    and token). Do not change the weights inside the span: whether a later forward sees a change is undefined (a
    weight the compute dtype needs no copy of is used as it is, the others stay as they were); on exit the copies
    go."""
    layers = list(adapter_layers(model).values())
    for layer in layers:
        layer.frozen_weights = {}
    try:
        yield
    finally:
        for layer in layers:
            layer.frozen_weights = None


def scoring_pass(model: nn.Module, scoring: ScoringPass) -> contextlib.AbstractContextManager[None]:
    """Mark the forwards run inside as an evaluation's scoring pass (`ScoringPass`), for routing observers such as
    `RoutingStats`; a model without routed adapters has nothing to mark."""
    context = routing_context(model)
    return contextlib.nullcontext() if context is None else context.scoring_pass(scoring)


def add_routing_observer(model: nn.Module, observer: RoutingObserver) -> ObserverHandle:
    """Call `observer(record)` for every routed layer's forward until the handle is removed.

    Nothing is recorded, and nothing costs memory, while no observer is attached.
    """
    context = routing_context(model)
    if context is None:
        raise ValueError("the model has no routed adapters (method 'molora' or 'malora'); nothing to observe")
    context.observers.append(observer)
    return ObserverHandle(context, observer)
