"""Adapter layers: a frozen base linear plus LoRA, MoLoRA or MALoRA (math only; injection lives in inject.py).

Shapes (n = in_features, m = out_features, N experts, r expert rank, d shared rank, T tokens):

* `LoRALinear`:   lora_A [r, n], lora_B [m, r]
* `MoLoRALinear`: lora_A [N, r, n], lora_B [N, m, r], router [N, n]
* `MALoRALinear`: shared_A [d, n], lora_P [N, r, d], lora_B [N, m, r], router [N, n]

MALoRA is MoLoRA run on the shared projection S_A x (computed once for all tokens and experts) with P_t in place of
A_t, so both mixtures share one expert kernel. The router reads the same x as the first projection (S_A, or every A_t
in MoLoRA's dense kernel), so both come from one GEMM unless dropout is active. The dense kernel computes every expert
and zeroes the unselected ones through the gates in rank space, then runs all up-projections as one GEMM
(`GatedUpProjection`); N*r is small, so this beats token dispatch on CPU (see BENCHMARKS.md). The sparse kernel
dispatches each token to its top-k experts, moving d-dimensional rows for MALoRA and n-dimensional rows for MoLoRA.
`reference_forward` materialises each expert's Delta W_t and sums the gated outputs, as the paper's Eqs. 5 and 7 are
written; tests compare both kernels against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.dropout import LaneDropout
from malora_lightning.adapters.init import init_lora_, init_malora_, init_router_
from malora_lightning.adapters.routing import (
    Routing,
    RoutingContext,
    RoutingRecord,
    dense_gates,
    load_balance_loss,
    route,
    router_z_loss,
)


def base_layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer (nn.Linear and bnb subclasses, GPT-2's Conv1D)."""
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    raise TypeError(f"unsupported base layer type {type(base_layer).__name__}: expected nn.Linear, a bitsandbytes "
                    "Linear4bit/Linear8bitLt or transformers Conv1D")


def add_matmul(result: torch.Tensor, hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """result + hidden @ weight.T, fused into one addmm when dtypes agree (no extra pass over the [T, m] output)."""
    if result.dtype == hidden.dtype or torch.is_autocast_enabled(result.device.type):
        return torch.addmm(result, hidden, weight.t()).to(result.dtype)
    return result + (hidden @ weight.t()).to(result.dtype)


def stacked_up_weight(lora_B: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[m, N*r] in `dtype`: every expert's B [N, m, r] side by side, so all experts' up-projection is one GEMM.

    One copy does both the reordering and the cast (e.g. to the autocast dtype).
    """
    num_experts, out_features, rank = lora_B.shape
    stacked = lora_B.permute(1, 0, 2)
    if dtype != stacked.dtype:
        stacked = stacked.to(dtype, memory_format=torch.contiguous_format)
    return stacked.reshape(out_features, num_experts * rank)


class GatedUpProjection(torch.autograd.Function):
    """result + sum_t gates[:, t] * Z_t B_t^T for all N experts in one GEMM, keeping only Z, gates and B for backward.

    Inputs: result [T, m], expert_hidden Z [T, N, r], gates [T, N] (zero for unselected experts, in Z's dtype),
    lora_B [N, m, r]. Autograd on the plain ops would also keep the gated copy of Z and the [m, N*r] stacked copy of
    B alive until backward (about 4 MB per layer at m = 11008, N*r = 96, float32); both are cheap to recompute,
    and the backward applies the gates to dZ and reduces dgates in rank space without further graph nodes.
    """

    @staticmethod
    def forward(ctx, result: torch.Tensor, expert_hidden: torch.Tensor, gates: torch.Tensor,
                lora_B: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(expert_hidden, gates, lora_B)
        gated = (expert_hidden * gates.unsqueeze(-1)).flatten(1)
        return add_matmul(result, gated, stacked_up_weight(lora_B, gated.dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        expert_hidden, gates, lora_B = ctx.saved_tensors
        needs_result, needs_hidden, needs_gates, needs_B = ctx.needs_input_grad
        grad_out = grad.to(expert_hidden.dtype)
        grad_hidden = grad_gates = grad_B = None
        if needs_hidden or needs_gates:
            grad_gated = (grad_out @ stacked_up_weight(lora_B, grad_out.dtype)).view_as(expert_hidden)
            grad_hidden = grad_gated * gates.unsqueeze(-1) if needs_hidden else None
            grad_gates = (grad_gated * expert_hidden).sum(-1) if needs_gates else None
        if needs_B:
            gated = (expert_hidden * gates.unsqueeze(-1)).flatten(1)
            num_experts, out_features, rank = lora_B.shape
            grad_stacked = grad_out.t() @ gated  # [m, N*r]
            grad_B = grad_stacked.view(out_features, num_experts, rank).permute(1, 0, 2).to(lora_B.dtype)
        return grad if needs_result else None, grad_hidden, grad_gates, grad_B


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus a trainable adapter path computed in the adapter dtype and cast back."""

    lora_B: nn.Parameter  # every method has an up-projection B

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer_shape(base_layer)
        self.name = name
        self.method = config.method
        self.rank = config.rank
        self.scaling = config.scaling
        self.parameter_dtype = config.torch_dtype  # for creating parameters; `adapter_dtype` follows later casts
        self.kernel = config.kernel
        self.dropout: nn.Module = LaneDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.train(base_layer.training)

    def dropout_factors(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """dropout(x) as (masked x, rescale): the kernels fold the 1/(1-p) rescale into the scaling of their rank-space
        hidden, which saves a pass over the [T, n] input in forward and one over its gradient in backward."""
        if isinstance(self.dropout, LaneDropout):
            return self.dropout.masked(x)
        return self.dropout(x), 1.0

    def _new_parameter(self, *shape: int, trainable: bool = True) -> nn.Parameter:
        device = self.base_layer.weight.device
        return nn.Parameter(torch.empty(shape, dtype=self.parameter_dtype, device=device), requires_grad=trainable)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype the adapter path runs in: its parameters' own, so that casts such as Lightning's bf16-true
        conversion of the whole module are followed."""
        return self.lora_B.dtype

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter tensor (trainable or frozen by an ablation switch), keyed by its name inside this layer."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("base_layer.")}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        leading_shape = x.shape[:-1]
        x2d = x.reshape(-1, self.in_features)
        if not torch.is_autocast_enabled(x.device.type):
            x2d = x2d.to(self.adapter_dtype)
        output = self.add_adapter_output(result.reshape(-1, self.out_features), x2d, leading_shape)
        return output.reshape(result.shape)

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output computed literally from the equations (slow; for tests and debugging)."""
        x2d = x.reshape(-1, self.in_features).to(self.adapter_dtype)
        delta = self.reference_delta(x2d, x.shape[:-1])
        result = self.base_layer(x)
        return result + delta.reshape(result.shape).to(result.dtype)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, rank={self.rank}, " \
               f"scaling={self.scaling:g}"


class LoRALinear(AdapterLayer):
    """y = base(x) + (alpha/r) B A dropout(x) (paper Eq. 1). `train_A=False` gives AsyLoRA."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        self.lora_A = self._new_parameter(self.rank, self.in_features, trainable=config.train_A)
        self.lora_B = self._new_parameter(self.out_features, self.rank)
        init_lora_(self.lora_A, self.lora_B)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        dropped, rescale = self.dropout_factors(x)
        hidden = F.linear(dropped, self.lora_A) * (self.scaling * rescale)
        return add_matmul(result, hidden, self.lora_B)

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        delta_weight = self.lora_B @ self.lora_A
        return self.scaling * self.dropout(x) @ delta_weight.t()


@dataclass
class RouterLosses:
    """A routed layer's unweighted losses from its most recent forward pass."""

    load_balance: torch.Tensor
    z_loss: torch.Tensor | None
    forward_id: int


class RoutedAdapterLayer(AdapterLayer):
    """A mixture of N low-rank experts, top-k routed per token.

    Subclasses say how a token reaches the experts: `shared_down` is the [k, n] projection every token goes through
    first (MALoRA's S_A; None for MoLoRA, whose experts read x itself), and `expert_down` [N, r, k] the per-expert
    down-projection of that input. Every expert's up-projection is `lora_B` [N, m, r].
    """

    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "",
                 context: RoutingContext | None = None) -> None:
        super().__init__(base_layer, config, name)
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.renormalize_top_k = config.renormalize_top_k
        self.compute_z_loss = config.router_z_loss_coef > 0
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, dtype=self.parameter_dtype,
                                device=self.base_layer.weight.device)
        init_router_(self.router.weight, config.router_init_std)
        self.routing_context = context if context is not None else RoutingContext()
        self.last_router_losses: RouterLosses | None = None

    # ------------------------------------------------------------------ to be defined by each mixture
    @property
    def shared_down(self) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def expert_down(self) -> torch.Tensor:
        raise NotImplementedError

    def expert_down_weight(self, expert: int) -> torch.Tensor:
        """The full [r, n] down-projection of one expert (A_t, or P_t S_A for MALoRA)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ routing
    def compute_routing(self, logits: torch.Tensor, leading_shape: torch.Size) -> Routing:
        """Top-k routing from router logits; records the router losses and notifies routing observers."""
        routing = route(logits, self.top_k, self.renormalize_top_k)
        context = self.routing_context
        token_mask = context.token_mask(leading_shape)
        self.last_router_losses = RouterLosses(
            load_balance=load_balance_loss(routing.probs, routing.experts, token_mask),
            z_loss=router_z_loss(routing.logits, token_mask) if self.compute_z_loss else None,
            forward_id=context.forward_count,
        )
        context.notify(lambda: RoutingRecord(
            layer_name=self.name,
            probs=routing.probs.detach(),
            experts=routing.experts.detach(),
            token_mask=token_mask,
            batch_shape=tuple(leading_shape),
        ))
        return routing

    def router_and_projection(self, x: torch.Tensor,
                              weight: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Router logits [T, N], masked(x) @ weight.T ([T, k]; masked x itself when weight is None) and the dropout
        rescale that the expert kernels still have to apply (see `dropout_factors`).

        Without active dropout the router and the projection read the same x, so one GEMM on the stacked weights
        [router; weight] reads x once instead of twice, and its backward gives their dX in one GEMM instead of two
        GEMMs plus an add over [T, n].
        """
        dropout_active = self.training and isinstance(self.dropout, nn.Dropout)
        if weight is None or dropout_active:
            dropped, rescale = self.dropout_factors(x)
            return self.router(x), dropped if weight is None else F.linear(dropped, weight), rescale
        logits, projected = F.linear(x, torch.cat([self.router.weight, weight])).split(
            [self.num_experts, weight.shape[0]], dim=-1)
        return logits, projected, 1.0

    # ------------------------------------------------------------------ kernels
    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        all_experts_down = self.expert_down.flatten(0, 1)  # [N*r, k]
        if self.shared_down is not None:
            first_weight = self.shared_down
        else:  # MoLoRA: the dense kernel applies every A_t to every token; the sparse one only after dispatch
            first_weight = all_experts_down if self.kernel == "dense" else None
        logits, projected, rescale = self.router_and_projection(x, first_weight)
        routing = self.compute_routing(logits, leading_shape)
        if x.shape[0] == 0:
            return result
        if self.kernel == "sparse":
            return self._sparse_experts(result, projected, routing, self.scaling * rescale)
        expert_hidden = projected if self.shared_down is None else F.linear(projected, all_experts_down)
        return self._dense_experts(result, expert_hidden, routing, self.scaling * rescale)

    def _dense_experts(self, result: torch.Tensor, expert_hidden: torch.Tensor, routing: Routing,
                       scale: float) -> torch.Tensor:
        """Every expert on every token, unselected experts zeroed by the gates in rank space, one up GEMM."""
        num_tokens = expert_hidden.shape[0]
        gates = dense_gates(routing, scale).to(expert_hidden.dtype)
        return GatedUpProjection.apply(result, expert_hidden.view(num_tokens, self.num_experts, self.rank), gates,
                                       self.lora_B)

    def _sparse_experts(self, result: torch.Tensor, projected: torch.Tensor, routing: Routing,
                        scale: float) -> torch.Tensor:
        """Each token's rows dispatched to its top-k experts only (d-dim rows for MALoRA, n-dim for MoLoRA).

        Assignments are sorted by expert, so every expert works on one contiguous block, and each expert's output is
        added straight into the result (no [T*K, m] concatenation) with `scatter_add_` on a broadcast row index:
        autograd keeps `index_add_`'s whole source alive for backward (only for its shape), [T*K, m] per layer.
        `unbind` splits the expert weights with one backward op, where indexing them expert by expert would build a
        zero-filled [N, ...] gradient per expert.
        """
        flat_experts = routing.experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_index = order // self.top_k
        gates = routing.gates.reshape(-1)[order].to(projected.dtype) * scale
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        blocks = zip(self.expert_down.unbind(), self.lora_B.unbind(), projected[token_index].split(counts),
                     gates.split(counts), token_index.split(counts))
        output = result.clone()
        for down, up, rows, expert_gates, tokens in blocks:
            expert_hidden = F.linear(rows, down) * expert_gates.unsqueeze(-1)
            expert_output = F.linear(expert_hidden, up).to(output.dtype)
            output.scatter_add_(0, tokens.unsqueeze(-1).expand_as(expert_output), expert_output)
        return output

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        routing = route(self.router(x), self.top_k, self.renormalize_top_k)
        gates = dense_gates(routing).to(x.dtype)
        dropped = self.dropout(x)
        delta = torch.zeros(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for expert in range(self.num_experts):
            delta_weight = self.lora_B[expert] @ self.expert_down_weight(expert)  # Delta W_t, [m, n]
            delta = delta + gates[:, expert:expert + 1] * (dropped @ delta_weight.t())
        return self.scaling * delta

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_experts={self.num_experts}, top_k={self.top_k}, kernel={self.kernel}"


class MoLoRALinear(RoutedAdapterLayer):
    """y = base(x) + (alpha/r) sum_{t in TopK(x)} g_t B_t A_t dropout(x) (paper Eqs. 3-5)."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "",
                 context: RoutingContext | None = None) -> None:
        super().__init__(base_layer, config, name, context)
        self.lora_A = self._new_parameter(self.num_experts, self.rank, self.in_features, trainable=config.train_A)
        self.lora_B = self._new_parameter(self.num_experts, self.out_features, self.rank)
        init_lora_(self.lora_A, self.lora_B)

    @property
    def shared_down(self) -> None:
        return None

    @property
    def expert_down(self) -> torch.Tensor:
        return self.lora_A

    def expert_down_weight(self, expert: int) -> torch.Tensor:
        return self.lora_A[expert]


class MALoRALinear(RoutedAdapterLayer):
    """y = base(x) + (alpha/r-bar) sum_{t in TopK(x)} g_t B_t P_t S_A dropout(x) (paper Eq. 7).

    S_A x is computed once per token and shared by all experts, which then work in the d-dimensional subspace.
    """

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "",
                 context: RoutingContext | None = None) -> None:
        super().__init__(base_layer, config, name, context)
        assert config.shared_rank is not None  # guaranteed by AdapterConfig.validate for method="malora"
        if config.shared_rank > self.in_features:
            raise ValueError(f"AdapterConfig.shared_rank={config.shared_rank} exceeds in_features="
                             f"{self.in_features} of module {name!r}: S_A needs d <= n; lower shared_rank or "
                             "exclude this module")
        self.shared_rank = config.shared_rank
        self.shared_A = self._new_parameter(self.shared_rank, self.in_features, trainable=config.train_shared_A)
        self.lora_P = self._new_parameter(self.num_experts, self.rank, self.shared_rank, trainable=config.train_P)
        self.lora_B = self._new_parameter(self.num_experts, self.out_features, self.rank)
        init_malora_(self.shared_A, self.lora_P, self.lora_B, config.beta, config.reuse_first_kaiming)

    @property
    def shared_down(self) -> torch.Tensor:
        return self.shared_A

    @property
    def expert_down(self) -> torch.Tensor:
        return self.lora_P

    def expert_down_weight(self, expert: int) -> torch.Tensor:
        return self.lora_P[expert] @ self.shared_A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_rank={self.shared_rank}"


ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "lora": LoRALinear,
    "molora": MoLoRALinear,
    "malora": MALoRALinear,
}
