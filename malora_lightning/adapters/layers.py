"""Adapter layers: a frozen base linear plus LoRA, MoLoRA or MALoRA (math only; injection lives in inject.py).

Shapes (n = in_features, m = out_features, N experts, r expert rank, d shared rank, T tokens):

* `LoRALinear`:   lora_A [r, n], lora_B [m, r]
* `MoLoRALinear`: lora_A [N, r, n], lora_B [N, r, m], router [N, n]
* `MALoRALinear`: shared_A [d, n], lora_P [N, r, d], lora_B [N, r, m], router [N, n]

A mixture's lora_B holds each expert's B_t [m, r] transposed, so that all experts' up-projection, the [N*r, m]
right operand of one GEMM, is a view of it (adapter folders store each B_t as PEFT does, [m, r]: `io.py`).

MALoRA is MoLoRA run on the shared projection S_A x (computed once for all tokens and experts) with P_t in place of
A_t, so both mixtures share one expert kernel. The layers own parameters and wiring only: the math runs in the pure
functions of `kernels.py` (compiled with `compile_adapters`), and what the router losses and observers need goes to
the model's per-forward `RoutingContext`, never onto the layer. The dense kernel (`DenseRoutedExperts`) computes every
expert and zeroes the unselected ones through the gates in rank space; N*r is small, so this beats token dispatch
(see BENCHMARKS.md). The sparse kernel dispatches each token to its top-k experts, moving d-dimensional rows for
MALoRA and n-dimensional rows for MoLoRA; its per-expert token counts are data-dependent, so it runs eagerly and
reads them on the host. `reference_forward` materialises each expert's Delta W_t and sums the gated outputs, as the
paper's Eqs. 5 and 7 are written; tests compare both kernels against it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.dropout import LaneDropout, dropout_factors
from malora_lightning.adapters.init import init_lora_, init_malora_, init_router_
from malora_lightning.adapters.kernels import (
    RoutingSpec,
    cast,
    compiled,
    fused_routing_applies,
    lora_output,
    routed_output,
    stacked_weights,
)
from malora_lightning.adapters.routing import (
    RouterStatistics,
    RoutingContext,
    RoutingRecord,
    balance_statistics,
    dense_gates,
    in_backward,
    route,
    routing_dtype,
    selection_shares,
    z_loss_from_logsumexp,
)


def is_peft_module(module: nn.Module) -> bool:
    """Whether `module` is one of PEFT's own (a PeftModel, a tuner layer or model), told by where its class lives:
    PEFT is optional, so it is never imported to check."""
    return type(module).__module__.split(".")[0] == "peft"


def base_layer_shape(base_layer: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a supported base layer (nn.Linear and bnb subclasses, GPT-2's Conv1D)."""
    if isinstance(base_layer, Conv1D):
        in_features, out_features = base_layer.weight.shape
        return in_features, out_features
    if isinstance(base_layer, nn.Linear):
        return base_layer.in_features, base_layer.out_features
    raise TypeError(f"unsupported base layer type {type(base_layer).__name__}: expected nn.Linear, a bitsandbytes "
                    "Linear4bit/Linear8bitLt or transformers Conv1D")


class AdapterLayer(nn.Module):
    """A frozen `base_layer` plus a trainable adapter path computed in one compute dtype and added to its output.

    The compute dtype is the autocast dtype under autocast, else the adapter parameters' own. `compile_mode` (set by
    `compile_adapters`) runs the adapter path through `torch.compile`; None runs it eagerly. `frozen_weights` (set by
    `frozen_adapter_weights` for a span in which the weights do not change) keeps the weights as the eager kernels
    multiply with them, made at the span's first forward without gradients, instead of casting them every forward.
    """

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
        self.dropout_rate = config.dropout
        self.dropout: nn.Module = LaneDropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.compile_mode: str | None = None
        self.compile_backend = "inductor"
        self.frozen_weights: dict[torch.dtype, object] | None = None
        self.train(base_layer.training)

    def _new_parameter(self, *shape: int, trainable: bool = True) -> nn.Parameter:
        device = self.base_layer.weight.device
        return nn.Parameter(torch.empty(shape, dtype=self.parameter_dtype, device=device), requires_grad=trainable)

    @property
    def adapter_dtype(self) -> torch.dtype:
        """The dtype of the adapter parameters: their own, so that casts such as Lightning's bf16-true conversion of
        the whole module are followed."""
        return self.lora_B.dtype

    def compute_dtype(self, device_type: str) -> torch.dtype:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
        return self.adapter_dtype

    def kernel_function(self, function: Callable) -> Callable:
        """`function` itself, or its compiled version when `compile_mode` is set."""
        return function if self.compile_mode is None else compiled(function, self.compile_mode,
                                                                    self.compile_backend)

    def reused_weights(self, dtype: torch.dtype, make: Callable[[], object]) -> object | None:
        """`make()`'s weights for `dtype`, made once per `frozen_adapter_weights` span; None outside one, with
        gradients on (a backward needs the graph of this forward's own casts) or when compiled."""
        if self.frozen_weights is None or torch.is_grad_enabled() or self.compile_mode is not None:
            return None
        if dtype not in self.frozen_weights:
            self.frozen_weights[dtype] = make()
        return self.frozen_weights[dtype]

    def kernel_weight(self, weight: torch.Tensor | None) -> torch.Tensor | None:
        """The weight as the kernel function receives it: compiled kernels get a plain-tensor view, because
        torch.compile gives every `nn.Parameter` a static shape, which would compile one graph per layer shape."""
        return weight.view_as(weight) if self.compile_mode is not None and weight is not None else weight

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """Every adapter tensor (trainable or frozen by an ablation switch), keyed by its name inside this layer."""
        return {name: param for name, param in self.named_parameters() if not name.startswith("base_layer.")}

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        adapter_input = self.adapter_input(x)
        output = self.add_adapter_output(result.reshape(-1, self.out_features),
                                         adapter_input.reshape(-1, self.in_features), x.shape[:-1])
        return output.view(result.shape)

    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """The layer input as the adapter path receives it (the base layer gets `x` itself); the kernels cast it
        to the compute dtype."""
        return x

    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer's output computed literally from the equations (slow; for tests and debugging)."""
        x2d = x.reshape(-1, self.in_features).to(self.adapter_dtype)
        delta = self.reference_delta(x2d, x.shape[:-1])
        result = self.base_layer(x)
        return result + delta.reshape(result.shape).to(result.dtype)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        """result [T, m] + the adapter's output for x [T, n], T tokens of leading shape `leading_shape`."""
        raise NotImplementedError

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        compiled_note = "" if self.compile_mode is None else f", compiled={self.compile_mode}"
        return f"method={self.method}, in={self.in_features}, out={self.out_features}, rank={self.rank}, " \
               f"scaling={self.scaling:g}{compiled_note}"


class LoRALinear(AdapterLayer):
    """y = base(x) + (alpha/r) B A dropout(x) (paper Eq. 1). `train_A=False` gives AsyLoRA."""

    def __init__(self, base_layer: nn.Module, config: AdapterConfig, name: str = "") -> None:
        super().__init__(base_layer, config, name)
        self.lora_A = self._new_parameter(self.rank, self.in_features, trainable=config.train_A)
        self.lora_B = self._new_parameter(self.out_features, self.rank)
        init_lora_(self.lora_A, self.lora_B)

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        dtype = self.compute_dtype(x.device.type)
        lora_A, lora_B = self.reused_weights(dtype, lambda: (cast(self.lora_A, dtype), cast(self.lora_B, dtype))) \
            or (self.kernel_weight(self.lora_A), self.kernel_weight(self.lora_B))
        return self.kernel_function(lora_output)(result, x, lora_A, lora_B, self.scaling, self.dropout_rate,
                                                 self.training, dtype)

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        delta_weight = self.lora_B @ self.lora_A
        return self.scaling * self.dropout(x) @ delta_weight.t()


class RoutedAdapterLayer(AdapterLayer):
    """A mixture of N low-rank experts, top-k routed per token.

    Subclasses say how a token reaches the experts (`down_weights`): through MALoRA's `shared_A` [d, n] first, then
    each expert's `lora_P` [N, r, d], or for MoLoRA straight through each expert's `lora_A` [N, r, n]; and what one
    expert's whole down-projection from x is (`expert_delta_down`). Every expert's up-projection is `lora_B` [N, r, m]
    (B_t transposed).

    Each forward hands its `RouterStatistics` to the model's current `ForwardRouting` (only in training mode with
    gradients on: nothing is computed for them in evaluation or generation) and a `RoutingRecord` to the routing
    observers, if any.
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

    def __setattr__(self, name: str, value: Any) -> None:
        """Refuse a PEFT layer in the router's place (PEFT's `target_modules="all-linear"` on a routed model): the
        kernels read `router.weight` itself, fused with the down-projection, so its LoRA would be ignored silently."""
        if name == "router" and isinstance(value, nn.Module) and is_peft_module(value):
            raise TypeError(f"{self.name or type(self).__name__}: the router cannot be wrapped by PEFT "
                            f"({type(value).__name__}), whose computation the routed kernels would skip; leave the "
                            "routers out of PEFT's target_modules (they train already: "
                            "trainable_parameter_groups, router_learning_rate)")
        super().__setattr__(name, value)

    # ------------------------------------------------------------------ to be defined by each mixture
    def down_weights(self) -> tuple[torch.Tensor | None, torch.Tensor]:
        """The down-projections as the routed kernels take them, (shared_A, expert_down): MALoRA's
        (`shared_A` [d, n], `lora_P` [N, r, d]); MoLoRA's (None, `lora_A` [N, r, n]), its experts reading x itself."""
        raise NotImplementedError

    def expert_delta_down(self, expert: int) -> torch.Tensor:
        """One expert's whole [r, n] down-projection from x, the right factor of Delta W_t = B_t @ it: `lora_A[t]`
        (MoLoRA), or `lora_P[t] @ shared_A` (MALoRA)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ forward
    def adapter_input(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in the compute dtype, cast once per forward for all the layers that read it (`shared_cast`): the
        kernels save their input for backward, so per-layer casts kept a copy per layer."""
        forward = self.routing_context.current
        if forward is None:
            return x
        return forward.shared_cast(x, self.compute_dtype(x.device.type))

    def add_adapter_output(self, result: torch.Tensor, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        if x.shape[0] == 0:
            return result
        # activation checkpointing runs the forward again inside backward: it must compute (and save for backward)
        # what the first run did, but hands nothing over, since the first run did. Its token weights are those of the
        # forward whose losses are being backpropagated: a side pass since (a teacher pass under no_grad) is `current`
        recomputed = in_backward()
        forward = self.routing_context.losses_forward if recomputed else self.routing_context.current
        dtype = self.compute_dtype(x.device.type)
        token_mask, token_weights = (forward.tokens(tuple(leading_shape), routing_dtype(dtype)) if forward is not None
                                     else (None, None))
        collect = forward is not None and self.training and torch.is_grad_enabled()
        if forward is not None and self.training and not collect:
            forward.routed_without_gradients = True
        spec = RoutingSpec(top_k=self.top_k, renormalize=self.renormalize_top_k, scaling=self.scaling,
                           dropout=self.dropout_rate, statistics=collect, z_loss=collect and self.compute_z_loss,
                           fused=self.kernel == "fused" and fused_routing_applies(x.device, dtype))
        if self.kernel == "sparse":
            output, statistics, z_loss, probs, experts = self._sparse_experts(result, x, token_weights, spec, dtype)
        else:
            shared_A, expert_down = self.down_weights()
            stacked = self.reused_weights(dtype, lambda: stacked_weights(self.router.weight, shared_A, expert_down,
                                                                         self.lora_B, dtype))
            output, statistics, z_loss, probs, experts = self.kernel_function(routed_output)(
                result, x, self.kernel_weight(self.router.weight), self.kernel_weight(shared_A),
                self.kernel_weight(expert_down), self.kernel_weight(self.lora_B), token_weights, spec,
                self.training, dtype, stacked)
        if recomputed:
            return output
        if collect:
            forward.statistics.append(RouterStatistics(balance=statistics, z_loss=z_loss))
        self.routing_context.notify(lambda: RoutingRecord(
            layer_name=self.name, probs=probs.detach(), experts=experts, token_mask=token_mask,
            batch_shape=tuple(leading_shape), forward=forward))
        return output

    def _sparse_experts(self, result: torch.Tensor, x: torch.Tensor, token_weights: torch.Tensor | None,
                        spec: RoutingSpec, dtype: torch.dtype
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """Each token's rows dispatched to its top-k experts only (d-dim rows for MALoRA, n-dim for MoLoRA).

        Assignments are sorted by expert, so every expert works on one contiguous block, and each expert's output is
        added straight into the result (no [T*K, m] concatenation) with `scatter_add_` on a broadcast row index:
        autograd keeps `index_add_`'s whole source alive for backward (only for its shape), [T*K, m] per layer.
        `unbind` splits the expert weights with one backward op, where indexing them expert by expert would build a
        zero-filled [N, ...] gradient per expert. Runs under autocast as the caller set it.
        """
        x = x.to(dtype)
        dropped, rescale = dropout_factors(x, self.dropout_rate, self.training)
        routing = route(F.linear(x, self.router.weight.to(dtype)), self.top_k, self.renormalize_top_k)
        shared_A, expert_down = self.down_weights()
        projected = dropped if shared_A is None else F.linear(dropped, shared_A.to(dtype))
        flat_experts = routing.experts.reshape(-1)
        order = torch.argsort(flat_experts, stable=True)
        token_index = order // self.top_k
        gates = routing.gates.reshape(-1)[order].to(dtype) * (self.scaling * rescale)
        counts = torch.bincount(flat_experts, minlength=self.num_experts).tolist()
        blocks = zip(expert_down.unbind(), self.lora_B.unbind(), projected[token_index].split(counts),
                     gates.split(counts), token_index.split(counts))
        # summed in the wider of the two dtypes: a bf16 base's output is rounded once, not once per expert
        output = result.to(torch.promote_types(result.dtype, dtype), copy=True)
        for down, up, rows, expert_gates, tokens in blocks:
            expert_hidden = F.linear(rows, down.to(dtype)) * expert_gates.unsqueeze(-1)
            expert_output = (expert_hidden @ up.to(dtype)).to(output.dtype)
            output.scatter_add_(0, tokens.unsqueeze(-1).expand_as(expert_output), expert_output)
        output = output.to(result.dtype)
        statistics = z_loss = None
        if spec.statistics:
            selection = selection_shares(routing.experts, self.num_experts, routing.probs.dtype)
            statistics = balance_statistics(routing.probs, selection, token_weights)
        if spec.z_loss:
            z_loss = z_loss_from_logsumexp(torch.logsumexp(routing.logits, dim=-1), token_weights)
        return output, statistics, z_loss, routing.probs, routing.experts

    def reference_delta(self, x: torch.Tensor, leading_shape: torch.Size) -> torch.Tensor:
        routing = route(self.router(x), self.top_k, self.renormalize_top_k)
        gates = dense_gates(routing).to(x.dtype)
        dropped = self.dropout(x)
        delta = torch.zeros(x.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        for expert in range(self.num_experts):
            delta_weight = self.lora_B[expert].t() @ self.expert_delta_down(expert)  # Delta W_t = B_t E_t, [m, n]
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
        self.lora_B = self._new_parameter(self.num_experts, self.rank, self.out_features)
        init_lora_(self.lora_A, self.lora_B)

    def down_weights(self) -> tuple[None, torch.Tensor]:
        return None, self.lora_A

    def expert_delta_down(self, expert: int) -> torch.Tensor:
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
        self.lora_B = self._new_parameter(self.num_experts, self.rank, self.out_features)
        init_malora_(self.shared_A, self.lora_P, self.lora_B, config.beta, config.reuse_first_kaiming)

    def down_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.shared_A, self.lora_P

    def expert_delta_down(self, expert: int) -> torch.Tensor:
        return self.lora_P[expert] @ self.shared_A

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared_rank={self.shared_rank}"


ADAPTER_CLASSES: dict[str, type[AdapterLayer]] = {
    "lora": LoRALinear,
    "molora": MoLoRALinear,
    "malora": MALoRALinear,
}
