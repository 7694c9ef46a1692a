"""Model-level views of injected adapters: which layers, which config, the router losses and routing observers."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.layers import AdapterLayer, RoutedAdapterLayer
from malora_lightning.adapters.routing import ObserverHandle, RoutingContext, RoutingObserver

CONFIG_ATTRIBUTE = "malora_config"
CONTEXT_ATTRIBUTE = "malora_routing_context"


def adapter_layers(model: nn.Module) -> dict[str, AdapterLayer]:
    """Adapted modules by their name in `model` (the names `save_adapters` uses as tensor-key prefixes)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, AdapterLayer)}


def routed_layers(model: nn.Module) -> dict[str, RoutedAdapterLayer]:
    return {name: module for name, module in model.named_modules() if isinstance(module, RoutedAdapterLayer)}


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
    """Average the per-layer losses of the latest forward; None for unrouted methods or before any forward.

    Only layers that ran in the latest forward of `model` count, so a stale loss can never leak into a step.
    """
    context = routing_context(model)
    current = None if context is None else context.forward_count
    fresh = [layer.last_router_losses for layer in routed_layers(model).values()
             if layer.last_router_losses is not None and layer.last_router_losses.forward_id == current]
    if not fresh:
        return None
    load_balance = torch.stack([losses.load_balance for losses in fresh]).mean()
    z_terms = [losses.z_loss for losses in fresh if losses.z_loss is not None]
    z_loss = torch.stack(z_terms).mean() if z_terms else None
    return RouterLossSummary(load_balance=load_balance, z_loss=z_loss, num_layers=len(fresh))


def aux_loss(model: nn.Module) -> torch.Tensor:
    """aux_loss_coef * mean load-balance loss (+ router_z_loss_coef * mean z-loss) of the most recent forward.

    Uniform routing gives exactly `aux_loss_coef`. Returns a zero tensor for LoRA or when nothing was routed.
    """
    summary = router_losses(model)
    if summary is None:
        return torch.zeros(())
    config = get_adapter_config(model)
    total = config.aux_loss_coef * summary.load_balance
    if summary.z_loss is not None:
        total = total + config.router_z_loss_coef * summary.z_loss
    return total


def release_router_losses(model: nn.Module) -> None:
    """Drop the router losses the routed layers keep from their latest forward.

    Under grad mode each kept loss references the autograd graph of that forward. A backward frees the graph's saved
    activations, so training steps keep almost nothing; after a forward that no backward follows (a benchmark, a
    scoring pass under grad mode), the whole graph would stay alive until the next forward has run every layer.
    """
    for layer in routed_layers(model).values():
        layer.last_router_losses = None


def add_routing_observer(model: nn.Module, observer: RoutingObserver) -> ObserverHandle:
    """Call `observer(record)` for every routed layer's forward until the handle is removed.

    Nothing is recorded, and nothing costs memory, while no observer is attached.
    """
    context = routing_context(model)
    if context is None:
        raise ValueError("the model has no routed adapters (method 'molora' or 'malora'); nothing to observe")
    context.observers.append(observer)
    return ObserverHandle(context, observer)
