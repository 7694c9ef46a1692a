"""The adapter paths as pure functions of tensors: what eager mode runs and what `torch.compile` compiles.

Each function takes the base layer's output and input and returns the adapted output plus what the router losses and
observers need; none reads or writes module state, so one compiled graph serves every layer of a shape class and a
forward leaves nothing behind on the layers. Everything runs in one compute dtype `dtype` (the autocast dtype, or the
adapter parameters' own): weights are cast once per call, explicitly, with autocast off inside.

The mixtures' dense kernel is one autograd node (`DenseRoutedExperts`) with a hand-written backward. Written with
plain autograd ops it ran ~120 ops per layer and training step, each a kernel launch plus Python dispatch on a GPU;
as one node its forward and backward run only the GEMMs, the routing arithmetic and the casts they need
(BENCHMARKS.md counts them). `reference_forward` on the layers stays the literal equations; tests compare.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from malora_lightning.adapters.dropout import dropout_factors, keep_and_rescale
from malora_lightning.adapters.routing import (
    balance_statistics,
    routing_dtype,
    selection_shares,
    top_experts,
    z_loss_from_logsumexp,
)


def cast(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor.to(dtype)` without dispatching anything when it already has that dtype."""
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def add_product(result: torch.Tensor, hidden: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """result + hidden @ right for 2-D operands: one addmm when dtypes agree (no extra pass over the output)."""
    if result.dtype == hidden.dtype:
        return torch.addmm(result, hidden, right)
    return result + torch.mm(hidden, right).to(result.dtype)


def stacked_up_weight(lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[N*r, m] in `dtype`: every expert's B [N, r, m] stacked, so all experts' up-projection is one GEMM over a view
    of B (a copy only to change the dtype)."""
    return cast(lora_B.flatten(0, 1), dtype)


# ---------------------------------------------------------------------------------------------------- LoRA
def lora_output(result: torch.Tensor, x: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                dropout: float, training: bool, dtype: torch.dtype) -> torch.Tensor:
    """result + scaling * B A dropout(x) (paper Eq. 1) for x [T, n] and result [T, m]."""
    with torch.autocast(x.device.type, enabled=False):
        x = cast(x, dtype)
        dropped, rescale = dropout_factors(x, dropout, training)
        hidden = F.linear(dropped, cast(lora_A, dtype)) * (scaling * rescale)
        return add_product(result, hidden, cast(lora_B, dtype).t())


# ---------------------------------------------------------------------------------------------------- mixtures
FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def fused_routing_applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether `AdapterConfig(kernel="fused")` routes with the Triton kernels here: on a CUDA device (or on CPU under
    `TRITON_INTERPRET=1`, for tests), with Triton installed and a compute dtype they handle; elsewhere, as on a CPU
    evaluating an adapter trained on a GPU, the same math runs as plain ops."""
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    return (device.type == "cuda" or interpreted) and dtype in FUSED_DTYPES and _triton_installed()


@dataclass(frozen=True)
class RoutingSpec:
    """How a routed layer routes and scales; plain values, so a compiled graph specialises on them."""

    top_k: int
    renormalize: bool
    scaling: float
    dropout: float
    statistics: bool  # hand back the balance statistics (training)
    z_loss: bool  # hand back the router z-loss too
    fused: bool = False  # route with the Triton kernels of `fused_routing` (eager only)


@dataclass
class DenseForward:
    """The dense kernel's forward: its outputs and what the hand-written backward reuses."""

    out: torch.Tensor  # [T, m]
    balance: torch.Tensor | None  # [2N] balance statistics, when asked for
    lse: torch.Tensor | None  # [T] router logsumexp, when asked for
    probs: torch.Tensor  # [T, N]
    experts: torch.Tensor  # [T, K]
    router_weight: torch.Tensor | None  # in the compute dtype, when dropout splits the first projection
    first_weight: torch.Tensor  # [router; S_A or A] (or S_A or A alone with dropout), compute dtype
    down_weight: torch.Tensor | None  # P_t stacked [N*r, d], compute dtype (MALoRA)
    up_weight: torch.Tensor  # every B_t stacked [N*r, m], compute dtype
    hidden: torch.Tensor  # [T, d] (MALoRA: S_A x) or [T, N*r] (MoLoRA: A_t x)
    expert_hidden: torch.Tensor  # [T, N*r], expert by expert
    gated: torch.Tensor  # [T, N*r]
    # the plain ops' routing, for their backward (all None when fused: its backward recomputes them from probs and
    # experts)
    selection: torch.Tensor | None  # [T, N], 1/K on the selected experts
    gates: torch.Tensor | None  # [T, N] routing dtype, zero on unselected experts, scale included
    gates3: torch.Tensor | None  # [T, N, 1] compute dtype
    total: torch.Tensor | None  # [T, 1] sum of the kept probabilities / scale (renormalised gates only)


@dataclass(frozen=True)
class StackedWeights:
    """A mixture's weights as the dense kernel multiplies with them when dropout is off, in the compute dtype."""

    first: torch.Tensor  # [N + d, n] the router over S_A (MALoRA), or [N + N*r, n] over every A_t (MoLoRA)
    down: torch.Tensor | None  # [N*r, d] every P_t (MALoRA)
    up: torch.Tensor  # [N*r, m] every B_t stacked


def stacked_weights(router_weight: torch.Tensor, shared_A: torch.Tensor | None, expert_down: torch.Tensor,
                    lora_B: torch.Tensor, dtype: torch.dtype) -> StackedWeights:
    down = expert_down.flatten(0, 1)  # [N*r, d] (P) or [N*r, n] (A)
    first = down if shared_A is None else shared_A
    return StackedWeights(first=cast(torch.cat([router_weight, first]), dtype),
                          down=None if shared_A is None else cast(down, dtype), up=stacked_up_weight(lora_B, dtype))


def dense_forward(result: torch.Tensor, x: torch.Tensor, dropped: torch.Tensor | None, router_weight: torch.Tensor,
                  shared_A: torch.Tensor | None, expert_down: torch.Tensor, lora_B: torch.Tensor,
                  token_weights: torch.Tensor | None, top_k: int, renormalize: bool, scale: float, statistics: bool,
                  logsumexp: bool, fused: bool = False, stacked: StackedWeights | None = None) -> DenseForward:
    """Every expert on every token, the unselected ones zeroed by the gates in rank space (paper Eqs. 5 and 7); see
    `DenseRoutedExperts` for the arguments, except `dropped`: x after dropout, its rescale in `scale` (None: dropout
    off). Plain differentiable ops, with autocast off: `DenseRoutedExperts` runs it without autograd and supplies its
    own backward, `torch.compile` traces it and derives and fuses the backward. `stacked`: the weights already
    stacked and cast (`frozen_adapter_weights`; dropout off)."""
    dtype = x.dtype
    num_experts, rank = expert_down.shape[:2]
    with torch.autocast(x.device.type, enabled=False):
        if dropped is None:
            router_cast = None
            weights = stacked or stacked_weights(router_weight, shared_A, expert_down, lora_B, dtype)
            first_weight, down_weight, up_weight = weights.first, weights.down, weights.up
            logits, hidden = F.linear(x, first_weight).split([num_experts, first_weight.shape[0] - num_experts], dim=1)
        else:
            down = expert_down.flatten(0, 1)
            router_cast, first_weight = cast(router_weight, dtype), cast(down if shared_A is None else shared_A, dtype)
            logits, hidden = F.linear(x, router_cast), F.linear(dropped, first_weight)
            down_weight = None if shared_A is None else cast(down, dtype)
            up_weight = stacked_up_weight(lora_B, dtype)
        expert_hidden = hidden if down_weight is None else F.linear(hidden, down_weight)  # [T, N*r]
        if fused:  # the routing below as one Triton kernel
            from malora_lightning.adapters import fused_routing  # Triton is needed only for kernel="fused"
            routed = fused_routing.route_forward(logits, expert_hidden, num_experts, rank, token_weights, top_k,
                                                 renormalize, scale, statistics, logsumexp)
            probs, experts, lse, gated, balance = routed.probs, routed.experts, routed.lse, routed.gated, routed.balance
            selection = gates = gates3 = total = None
        else:
            logits = cast(logits, routing_dtype(logits.dtype))
            lse = torch.logsumexp(logits, dim=-1) if logsumexp else None
            probs = logits.softmax(dim=-1)
            experts = top_experts(logits, top_k)
            selection = selection_shares(experts, num_experts, logits.dtype)
            kept = probs * selection
            if renormalize:
                total = kept.sum(dim=-1, keepdim=True) / scale
                gates = kept / total  # scale * kept / sum(kept)
            else:
                total = None
                gates = kept * (top_k * scale)  # scale * probs on the selected experts
            gates3 = cast(gates, dtype).unsqueeze(-1)
            gated = (expert_hidden.unflatten(1, (num_experts, rank)) * gates3).flatten(1)
            balance = balance_statistics(probs, selection, token_weights) if statistics else None
        out = add_product(result, gated, up_weight)
    return DenseForward(out, balance, lse, probs, experts, router_cast, first_weight, down_weight, up_weight, hidden,
                        expert_hidden, gated, selection, gates, gates3, total)


class DenseRoutedExperts(torch.autograd.Function):
    """Every expert on every token, the unselected ones zeroed by the gates in rank space (paper Eqs. 5 and 7).

    Inputs: result [T, m] (the base output), x [T, n], keep [T, n] (bool: the elements dropout keeps, its rescale
    in `scale`; or None when dropout is off: then the router and the first projection share one GEMM over x), the
    router [N, n], S_A [d, n] (MALoRA; None for MoLoRA), the per-expert down-projections [N, r, d] (P_t) or
    [N, r, n] (A_t), B [N, r, m], and the token weights [T] of the balance statistics (None: all tokens real). x is
    in the compute dtype; result keeps the base layer's output dtype, which may differ (`add_product`).
    Then flags: top-k, renormalisation, scale, whether to hand back the statistics and the logsumexp, whether to
    route with the fused Triton kernels, and the `StackedWeights` to use, if already made.

    Outputs: result + sum_t g_t B_t (P_t S_A | A_t) dropout(x), the balance statistics [2N] (or None), the router
    logsumexp [T] (or None), and, not differentiable, the probabilities [T, N] and top-k experts [T, K].

    Saved for backward: x and the keep mask (the router's gradient needs x itself, so x after dropout is rebuilt
    from the two rather than kept: it would cost as much as x), the rank-space hiddens, the gated hidden [T, N*r],
    the routing tensors [T, N] and the weights in the compute dtype (the stacked up weight [N*r, m] included: what
    autocast keeps for a LoRA layer's B too), so that the backward casts nothing it already had.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, x: torch.Tensor, keep: torch.Tensor | None,
                router_weight: torch.Tensor, shared_A: torch.Tensor | None, expert_down: torch.Tensor,
                lora_B: torch.Tensor, token_weights: torch.Tensor | None, top_k: int, renormalize: bool,
                scale: float, statistics: bool, logsumexp: bool, fused: bool,
                stacked: StackedWeights | None) -> tuple[torch.Tensor, ...]:
        ctx.set_materialize_grads(False)
        dropped = None if keep is None else torch.where(keep, x, 0.0)
        f = dense_forward(result, x, dropped, router_weight, shared_A, expert_down, lora_B, token_weights, top_k,
                          renormalize, scale, statistics, logsumexp, fused, stacked)
        # the experts [T, K] (int64) only for the fused backward: the plain ops' reads the selection instead
        ctx.save_for_backward(x, keep, f.first_weight, f.router_weight, f.down_weight, f.up_weight, f.hidden,
                              f.expert_hidden, f.gated, f.probs, f.experts if fused else None, f.selection, f.gates,
                              f.gates3, f.total, token_weights)
        ctx.param_dtypes = (router_weight.dtype, None if shared_A is None else shared_A.dtype, expert_down.dtype,
                            lora_B.dtype)
        ctx.is_malora = shared_A is not None
        ctx.scale, ctx.top_k, ctx.renormalize = scale, top_k, renormalize
        ctx.statistics, ctx.logsumexp, ctx.fused = statistics, logsumexp, fused
        ctx.num_experts, ctx.rank = expert_down.shape[:2]
        ctx.mark_non_differentiable(f.probs, f.experts)
        return f.out, f.balance, f.lse, f.probs, f.experts

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor | None, grad_balance: torch.Tensor | None,
                 grad_lse: torch.Tensor | None, *_: object) -> tuple[torch.Tensor | None, ...]:
        (x, keep, first_weight, router_weight, down_weight, up, hidden, expert_hidden, gated, probs, experts,
         selection, gates, gates3, total, token_weights) = ctx.saved_tensors  # weights in the compute dtype
        router_dtype, shared_dtype, down_dtype, up_dtype = ctx.param_dtypes
        needs = ctx.needs_input_grad
        dtype = x.dtype
        num_experts, rank = ctx.num_experts, ctx.rank
        with torch.autocast(x.device.type, enabled=False):
            # up-projection: out = result + gated @ up.T
            grad_B = grad_gated = None
            if grad_out is not None:
                grad = cast(grad_out, dtype)
                if needs[6]:  # [N*r, m]: B's own layout
                    grad_B = cast(torch.mm(gated.t(), grad), up_dtype).unflatten(0, (num_experts, rank))
                grad_gated = torch.mm(grad, up.t())
            grad_balance = grad_balance if ctx.statistics else None
            grad_lse = grad_lse if ctx.logsumexp else None
            if ctx.fused:
                grad_expert_hidden, grad_logits = fused_routing_backward(
                    grad_gated, expert_hidden, probs, experts, token_weights, grad_balance, grad_lse, ctx.top_k,
                    ctx.renormalize, ctx.scale)
            else:
                grad_mean = grad_balance[:num_experts] if grad_balance is not None else None
                grad_expert_hidden, grad_logits = routing_backward_ops(
                    grad_gated, expert_hidden, probs, selection, gates, gates3, total, token_weights, grad_mean,
                    grad_lse, ctx.top_k, ctx.scale)
            # per-expert down-projection (MALoRA's P_t works on S_A x)
            grad_down = grad_hidden = None
            if grad_expert_hidden is not None and down_weight is not None:
                if needs[5]:
                    grad_down = cast(torch.mm(grad_expert_hidden.t(), hidden), down_dtype).unflatten(0, (num_experts, rank))
                grad_hidden = torch.mm(grad_expert_hidden, down_weight)
            elif grad_expert_hidden is not None:
                grad_hidden = grad_expert_hidden  # MoLoRA: the first projection is A itself
            # first projection: [router; S_A or A] over x, or the router over x and S_A or A over dropout(x)
            grad_router = grad_first = grad_x = None
            needs_first = needs[4] if ctx.is_malora else needs[5]
            if keep is None and (grad_logits is not None or grad_hidden is not None):
                first_rows = first_weight.shape[0] - num_experts
                grad_h1 = torch.cat([cast(grad_logits, dtype) if grad_logits is not None
                                     else x.new_zeros(x.shape[0], num_experts),
                                     grad_hidden if grad_hidden is not None else x.new_zeros(x.shape[0], first_rows)],
                                    dim=1)
                if needs[3] or needs_first:
                    grad_stacked = torch.mm(grad_h1.t(), x)
                    if router_dtype == (shared_dtype if ctx.is_malora else down_dtype):
                        grad_stacked = cast(grad_stacked, router_dtype)  # one cast for both
                    grad_router, grad_first = grad_stacked.split([num_experts, first_rows])
                if needs[1]:
                    grad_x = torch.mm(grad_h1, first_weight)
            elif keep is not None:
                if grad_logits is not None:
                    grad_logits = cast(grad_logits, dtype)
                    grad_router = torch.mm(grad_logits.t(), x) if needs[3] else None
                    grad_x = torch.mm(grad_logits, router_weight) if needs[1] else None
                if grad_hidden is not None:
                    grad_first = torch.mm(grad_hidden.t(), torch.where(keep, x, 0.0)) if needs_first else None
                    if needs[1]:  # through the mask, to the kept elements of x
                        grad_kept = torch.where(keep, torch.mm(grad_hidden, first_weight), 0.0)
                        grad_x = grad_kept if grad_x is None else grad_x.add_(grad_kept)
            grad_router = cast(grad_router, router_dtype) if grad_router is not None and needs[3] else None
            grad_shared = None
            if grad_first is not None and needs_first and ctx.is_malora:
                grad_shared = cast(grad_first, shared_dtype)
            elif grad_first is not None and needs_first:
                grad_down = cast(grad_first, down_dtype).unflatten(0, (num_experts, rank))
        grad_result = grad_out if needs[0] else None
        return (grad_result, grad_x, None, grad_router, grad_shared, grad_down, grad_B,
                None, None, None, None, None, None, None, None)


def routing_backward_ops(grad_gated: torch.Tensor | None, expert_hidden: torch.Tensor, probs: torch.Tensor,
                         selection: torch.Tensor, gates: torch.Tensor, gates3: torch.Tensor | None,
                         total: torch.Tensor | None, token_weights: torch.Tensor | None,
                         grad_mean: torch.Tensor | None, grad_lse: torch.Tensor | None, top_k: int,
                         scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The backward of `dense_forward`'s routing with plain ops: from the gated hidden's gradient [T, N*r], the
    mean probabilities' [N] and the logsumexp's [T] (each None when absent) back to the expert hidden and logits."""
    grad_expert_hidden = grad_probs = grad_logits = None
    if grad_gated is not None:
        expert_hidden3 = expert_hidden.unflatten(1, (probs.shape[1], -1))
        grad_gated3 = grad_gated.view_as(expert_hidden3)
        grad_expert_hidden = (grad_gated3 * gates3).flatten(1)
        grad_gates = cast((grad_gated3 * expert_hidden3).sum(-1), probs.dtype)
        if total is None:  # gates = scale * K * probs * selection
            grad_probs = grad_gates * selection * (top_k * scale)
        else:  # gates = kept / total, kept = probs * selection, total = sum(kept) / scale
            grad_kept = (grad_gates - (grad_gates * gates).sum(-1, keepdim=True).div_(scale)) / total
            grad_probs = grad_kept.mul_(selection)
    if grad_mean is not None:  # balance[:N] = weighted mean of probs over tokens
        from_balance = torch.outer(token_weights, grad_mean) if token_weights is not None \
            else (grad_mean / probs.shape[0]).expand_as(probs)
        grad_probs = from_balance if grad_probs is None else grad_probs.add_(from_balance)
    if grad_probs is not None:
        grad_logits = torch._softmax_backward_data(grad_probs, probs, -1, probs.dtype)
    if grad_lse is not None:  # d logsumexp / d logits = probs
        from_lse = grad_lse.unsqueeze(-1) * probs
        grad_logits = from_lse if grad_logits is None else grad_logits.add_(from_lse)
    return grad_expert_hidden, grad_logits


def fused_routing_backward(grad_gated: torch.Tensor | None, expert_hidden: torch.Tensor, probs: torch.Tensor,
                           experts: torch.Tensor, token_weights: torch.Tensor | None,
                           grad_balance: torch.Tensor | None, grad_lse: torch.Tensor | None, top_k: int,
                           renormalize: bool, scale: float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`routing_backward_ops` as one Triton kernel, from the balance statistics' whole gradient [2N]; the logits'
    gradient comes in the compute dtype."""
    from malora_lightning.adapters import fused_routing
    if grad_gated is None and grad_balance is None and grad_lse is None:
        return None, None
    return fused_routing.route_backward(grad_gated, expert_hidden, probs, experts, token_weights, grad_balance,
                                        grad_lse, top_k, renormalize, scale)


def routed_output(result: torch.Tensor, x: torch.Tensor, router_weight: torch.Tensor, shared_A: torch.Tensor | None,
                  expert_down: torch.Tensor, lora_B: torch.Tensor, token_weights: torch.Tensor | None,
                  spec: RoutingSpec, training: bool, dtype: torch.dtype, stacked: StackedWeights | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """The dense mixture kernel over x [T, n] and result [T, m]: (output, statistics, z-loss, probs, experts);
    `stacked`: the weights already stacked and cast, for forwards without dropout or gradients.

    Eagerly it runs as one autograd node (`DenseRoutedExperts`), its routing fused into Triton kernels when
    `spec.fused`; compiled, as the plain ops of `dense_forward`, whose backward inductor derives and fuses (torch
    2.11's dynamo failed to trace the custom node in training).
    """
    x = cast(x, dtype)
    dropout = training and spec.dropout > 0
    weights = (router_weight, shared_A, expert_down, lora_B, token_weights if spec.statistics or spec.z_loss else None)
    routing = (spec.top_k, spec.renormalize)
    if torch.compiler.is_compiling():  # inductor derives and fuses the backward of the plain ops
        dropped, rescale = dropout_factors(x, spec.dropout, training) if dropout else (None, 1.0)
        f = dense_forward(result, x, dropped, *weights, *routing, spec.scaling * rescale, spec.statistics, spec.z_loss)
        out, balance, lse, probs, experts = f.out, f.balance, f.lse, f.probs.detach(), f.experts
    else:  # eager: one autograd node with the hand-written backward
        keep, rescale = keep_and_rescale(x, spec.dropout) if dropout else (None, 1.0)
        out, balance, lse, probs, experts = DenseRoutedExperts.apply(
            result, x, keep, *weights, *routing, spec.scaling * rescale, spec.statistics, spec.z_loss, spec.fused,
            stacked)
    z_loss = z_loss_from_logsumexp(lse, token_weights) if spec.z_loss else None
    return out, balance, z_loss, probs, experts


# ---------------------------------------------------------------------------------------------------- compilation
_COMPILED: dict[tuple[Callable, str, str], Callable] = {}


def compiled(function: Callable, mode: str, backend: str = "inductor") -> Callable:
    """`function` compiled whole (`fullgraph=True`), once per process, mode and backend.

    Shapes start static and turn symbolic where a later call differs (torch's automatic dynamic shapes): after the
    first change of token count or layer shape one graph serves them all, while plain ints such as top-k stay
    constants. (`dynamic=True` would make those symbolic too, which inductor cannot always lower.)
    """
    key = (function, mode, backend)
    if key not in _COMPILED:
        _COMPILED[key] = torch.compile(function, fullgraph=True, backend=backend,
                                       mode=None if mode == "default" or backend != "inductor" else mode)
    return _COMPILED[key]
