"""Token routing for mixtures of adapters: top-k gates, router losses, and how the attention mask reaches the layers.

The attention mask travels through a `RoutingContext` that a forward-pre-hook on the wrapped model fills on every
call, so Hugging Face forward signatures stay untouched (the pattern PEFT's Poly tuner uses for task ids).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn


@dataclass
class Routing:
    """One layer's routing of T tokens: what the expert kernels and the losses consume."""

    logits: torch.Tensor  # [T, N] raw router logits (float32)
    probs: torch.Tensor  # [T, N] softmax over all experts
    gates: torch.Tensor  # [T, K] weights of the kept experts (renormalised when configured)
    experts: torch.Tensor  # [T, K] indices of the kept experts


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """G = TopK(Softmax(W_g x)) (paper Eq. 4); softmax in at least float32, whatever the autocast dtype."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    probs = logits.softmax(dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    if renormalize:
        gates = gates / gates.sum(dim=-1, keepdim=True)
    return Routing(logits=logits, probs=probs, gates=gates, experts=experts)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral balance loss N * sum_e f_e * P_e for one router.

    f_e is the fraction of the T*K token-to-expert assignments that go to expert e and P_e the mean router probability
    of e, both over unmasked tokens only. It is 1 for perfectly balanced routing and N when one expert takes
    everything (top-1). Gradients flow through P_e only.
    """
    num_experts = probs.shape[-1]
    if token_mask is not None:
        probs = probs[token_mask]
        experts = experts[token_mask]
    if probs.shape[0] == 0:
        return probs.new_zeros(())
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    assignment_fraction = counts / experts.numel()
    mean_prob = probs.mean(dim=0)
    return num_experts * (assignment_fraction * mean_prob).sum()


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over tokens of logsumexp(logits)^2; keeps router logits small."""
    if token_mask is not None:
        logits = logits[token_mask]
    if logits.shape[0] == 0:
        return logits.new_zeros(())
    return torch.logsumexp(logits, dim=-1).square().mean()


def dense_gates(routing: Routing, scale: float = 1.0) -> torch.Tensor:
    """[T, N] gate matrix times `scale`, zero for the experts a token did not select (used by the dense kernels)."""
    gates = routing.gates if scale == 1.0 else routing.gates * scale
    return torch.zeros_like(routing.probs).scatter(1, routing.experts, gates)


@dataclass
class RoutingRecord:
    """What a routed layer reports to telemetry observers for one forward pass (all tensors detached)."""

    layer_name: str
    probs: torch.Tensor  # [T, N]
    experts: torch.Tensor  # [T, K]
    token_mask: torch.Tensor | None  # [T] bool, True for real (non-padding) tokens
    batch_shape: tuple[int, ...]  # leading shape of the layer input, e.g. (batch, seq)


RoutingObserver = Callable[[RoutingRecord], None]


class RoutingContext:
    """Per-model state shared by every routed layer: the current attention mask, a forward counter and observers."""

    def __init__(self) -> None:
        self.attention_mask: torch.Tensor | None = None
        self.forward_count = 0
        self.observers: list[RoutingObserver] = []

    def token_mask(self, leading_shape: torch.Size) -> torch.Tensor | None:
        """Boolean mask of real tokens for a layer input of leading shape (batch, seq), or None when unknown.

        During cached generation the mask covers past + new tokens, so the last `seq` columns are the new ones.
        """
        mask = self.attention_mask
        if mask is None or mask.dim() != 2 or len(leading_shape) != 2:
            return None
        batch, seq = leading_shape
        if mask.shape[0] != batch or mask.shape[1] < seq:
            return None
        return mask[:, -seq:].reshape(-1).bool()

    def notify(self, record_factory: Callable[[], RoutingRecord]) -> None:
        if self.observers:
            record = record_factory()
            for observer in self.observers:
                observer(record)


def install_routing_context(model: nn.Module) -> RoutingContext:
    """Attach a `RoutingContext` to `model`, filled with the attention mask before each forward."""
    context = RoutingContext()
    signature = inspect.signature(model.forward)

    def capture_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args:
            try:
                mask = signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
        context.attention_mask = mask if isinstance(mask, torch.Tensor) else None
        context.forward_count += 1

    model.register_forward_pre_hook(capture_mask, with_kwargs=True)
    return context


class ObserverHandle:
    """Returned by `add_routing_observer`; `remove()` detaches the observer (also usable as a context manager)."""

    def __init__(self, context: RoutingContext, observer: RoutingObserver) -> None:
        self._context = context
        self._observer = observer

    def remove(self) -> None:
        if self._observer in self._context.observers:
            self._context.observers.remove(self._observer)

    def __enter__(self) -> ObserverHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

