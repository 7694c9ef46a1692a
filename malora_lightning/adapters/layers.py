"""Adapter layers: a frozen base linear plus LoRA, MoLoRA or MALoRA (math only; injection lives in inject.py).

Shapes (n = in_features, m = out_features, N experts, r expert rank, d shared rank, T tokens):

* `LoRALinear`:   lora_A [r, n], lora_B [m, r]
* `MoLoRALinear`: lora_A [N, r, n], lora_B [N, m, r], router [N, n]
* `MALoRALinear`: shared_A [d, n], lora_P [N, r, d], lora_B [N, m, r], router [N, n]

MALoRA is MoLoRA run on the shared projection S_A x (computed once for all tokens and experts) with P_t in place of
A_t, so both mixtures share one expert kernel. The dense kernel computes every expert and zeroes the unselected ones
through the gates (N*r is small, so this beats token dispatch on CPU; see BENCHMARKS.md); the sparse kernel dispatches
each token to its top-k experts, moving d-dimensional rows for MALoRA and n-dimensional rows for MoLoRA.
`reference_forward` materialises each expert's Delta W_t and sums the gated outputs, as the paper's Eqs. 5 and 7 are
written; tests compare both kernels against it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters.config import AdapterConfig
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


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus a trainable adapter path computed in the adapter dtype and cast back."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer_shape(base_layer)
        self.name = name
        self.method = config.method
        self.rank = config.rank
        self.scaling = config.scaling
        self.adapter_dtype = config.torch_dtype
        self.kernel = config.kernel
        self.dropout: nn.Module = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.train(base_layer.training)

    def _new_parameter(self, *shape: int, trainable: bool = True) -> nn.Parameter:
        device = self.base_layer.weight.device
        return nn.Parameter(torch.empty(shape, dtype=self.adapter_dtype, device=device), requires_grad=trainable)

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
        hidden = F.linear(self.dropout(x), self.lora_A) * self.scaling
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
    """A mixture of N low-rank experts applied to `expert_input(x)`, top-k routed per token.

    Subclasses define the per-expert down-projection `expert_down` [N, r, k] acting on `expert_input(x)` [T, k];
    every expert's up-projection is `lora_B` [N, m, r].
    """

    lora_B: nn.Parameter

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "",
                 context: RoutingContext | None = None) -> None:
        super().__init__(base_layer, config, name)
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.renormalize_top_k = config.renormalize_top_k
        self.compute_z_loss = config.router_z_loss_coef > 0
        self.router = nn.Linear(self.in_features, self.num_experts, bias=False, dtype=self.adapter_dtype,
                                device=self.base_layer.weight.device)
        init_router_(self.router.weight, config.router_init_std)
        self.routing_context = context if context is not None else RoutingContext()
        self.last_router_losses: RouterLosses | None = None

    # ------------------------------------------------------------------ to be defined by each mixture
    @property
    def expert_down(self) -> torch.Tensor:
        raise NotImplementedError

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def expert_down_weight(self, expert: int) -> torch.Tensor:
        """The full [r, n] down-projection of one expert (A_t, or P_t S_A for MALoRA)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ routing
    def compute_routing(self, x: torch.Tensor, leading_shape: torch.Size) -> Routing:
        routing = route(self.router(x), self.top_k, self.renormalize_top_k)
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

    # ------------------------------------------------------------------ kernels
    def stacked_up_weight(self) -> torch.Tensor:
        """[m, N*r]: every expert's B side by side, so the up-projection of all experts is one GEMM."""
        return self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_experts * self.rank)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        routing = self.compute_routing(x, leading_shape)
        hidden = self.expert_input(self.dropout(x))
        if hidden.shape[0] == 0:
            return result
        if self.kernel == "sparse":
            return self._sparse_experts(result, hidden, routing)
        return self._dense_experts(result, hidden, routing)

    def _dense_experts(self, result: torch.Tensor, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        down = self.expert_down.reshape(self.num_experts * self.rank, -1)
        expert_hidden = F.linear(hidden, down).view(num_tokens, self.num_experts, self.rank)
        gates = dense_gates(routing).to(expert_hidden.dtype) * self.scaling
        gated = (expert_hidden * gates.unsqueeze(-1)).view(num_tokens, self.num_experts * self.rank)
        return add_matmul(result, gated, self.stacked_up_weight())

    def _sparse_experts(self, result: torch.Tensor, hidden: torch.Tensor, routing: Routing) -> torch.Tensor:
        flat_experts = routing.experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_index = order // self.top_k
        gates = routing.gates.reshape(-1)[order].to(hidden.dtype) * self.scaling
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        rows = hidden[token_index]
        down, up = self.expert_down, self.lora_B
        outputs = []
        for expert, (expert_rows, expert_gates) in enumerate(zip(rows.split(counts), gates.split(counts))):
            if expert_rows.shape[0]:
                expert_hidden = F.linear(expert_rows, down[expert]) * expert_gates.unsqueeze(-1)
                outputs.append(F.linear(expert_hidden, up[expert]))
        return result.index_add(0, token_index, torch.cat(outputs).to(result.dtype))

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
    def expert_down(self) -> torch.Tensor:
        return self.lora_A

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        return x

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
    def expert_down(self) -> torch.Tensor:
        return self.lora_P

    def expert_input(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.shared_A)

    def expert_down_weight(self, expert: int) -> torch.Tensor:
        return self.lora_P[expert] @ self.shared_A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_rank={self.shared_rank}"


ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "lora": LoRALinear,
    "molora": MoLoRALinear,
    "malora": MALoRALinear,
}
