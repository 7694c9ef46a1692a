"""Token routing for mixtures of adapters: top-k gates, router losses, and the per-forward routing context.

Every forward of an adapted model starts a fresh `ForwardRouting` (a forward-pre-hook on the model creates it, the
pattern PEFT's Poly tuner uses for task ids): it carries the attention mask to the routed layers and collects what
each layer hands back for the router losses (`RouterStatistics`). Layers keep nothing tensor-valued between
forwards; `aux_loss` reads the latest forward's record, and the next forward replaces it, graph and all.

Everything on the hot path has a fixed shape: the balance statistics are means (or mask-weighted sums) over tokens
of [T, N] tensors, never counts of a data-dependent size, and nothing reads a tensor's value on the host.
"""

from __future__ import annotations

import contextlib
import inspect
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


@dataclass
class Routing:
    """One layer's routing of T tokens, as the sparse kernel and the reference forward consume it."""

    logits: torch.Tensor  # [T, N] raw router logits (float32)
    probs: torch.Tensor  # [T, N] softmax over all experts
    gates: torch.Tensor  # [T, K] weights of the kept experts (renormalised when configured)
    experts: torch.Tensor  # [T, K] indices of the kept experts


def routing_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """Routing runs in at least float32, whatever the compute dtype."""
    return torch.promote_types(compute_dtype, torch.float32)


def top_experts(logits: torch.Tensor, top_k: int) -> torch.Tensor:
    """[T, K] the experts of the K largest logits, by decreasing logit, ties to the lower expert index.

    One rule for every kernel and device (the fused Triton kernel applies it too), where `torch.topk` leaves ties
    unspecified: CPU's picks experts 2 and 4 of five equal logits. Ties are common: bf16 router logits round to
    equal values, and with `router_init_std=0` every logit ties. Chosen on the logits, not the probabilities, since
    far-apart logits underflow to equal (zero) float32 probabilities; softmax keeps the logits' order.
    """
    return logits.sort(dim=-1, descending=True, stable=True).indices[..., :top_k]


def route(logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """G = TopK(Softmax(W_g x)) (paper Eq. 4); softmax in at least float32, whatever the autocast dtype."""
    logits = logits.to(routing_dtype(logits.dtype))
    probs = logits.softmax(dim=-1)
    experts = top_experts(logits, top_k)
    kept = probs.gather(-1, experts)
    return Routing(logits=logits, probs=probs, gates=kept_gates(kept, renormalize), experts=experts)


def kept_gates(kept_probs: torch.Tensor, renormalize: bool) -> torch.Tensor:
    """[T, K] gates from the kept experts' softmax probabilities: divided by their sum when `renormalize`."""
    return kept_probs / kept_probs.sum(dim=-1, keepdim=True) if renormalize else kept_probs


def scatter_gates(gates: torch.Tensor, experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """[T, N] gate matrix from the kept experts' [T, K] gates, zero for the experts a token did not select."""
    return torch.zeros(gates.shape[0], num_experts, dtype=gates.dtype, device=gates.device).scatter(1, experts, gates)


def dense_gates(routing: Routing, scale: float = 1.0) -> torch.Tensor:
    """[T, N] gate matrix times `scale`, zero for the experts a token did not select."""
    gates = routing.gates if scale == 1.0 else routing.gates * scale
    return scatter_gates(gates, routing.experts, routing.probs.shape[-1])


def selection_shares(experts: torch.Tensor, num_experts: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[T, N]: 1/K where a token selected the expert, else 0, so that each token's row sums to 1."""
    top_k = experts.shape[-1]
    return torch.zeros(experts.shape[0], num_experts, dtype=dtype, device=experts.device).scatter(
        1, experts, 1.0 / top_k)


def balance_statistics(probs: torch.Tensor, selection: torch.Tensor,
                       token_weights: torch.Tensor | None) -> torch.Tensor:
    """[2N]: the mean router probability P_e (first N) and the share f_e of the top-k assignments (last N) over
    real tokens; `token_weights` [T] are 1/(number of real tokens) on real tokens and 0 on padding (None: all
    tokens are real). Weighted sums over tokens, whatever the number of real tokens.

    (Two products and a concatenation of their [N] results: concatenating the [T, N] inputs first let inductor
    read the selection before its scatter had run, torch 2.13 on CPU.)
    """
    selection = selection.to(probs.dtype)
    if token_weights is None:
        return torch.cat([probs.mean(dim=0), selection.mean(dim=0)])
    return torch.cat([weighted_sum(token_weights, probs), weighted_sum(token_weights, selection)])


def weighted_sum(token_weights: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """token_weights [T] @ values [T] or [T, N], in the values' dtype (the routing dtype, at least float32) with
    autocast off: under fp16/bf16 autocast the matmul ran in half precision, where a z-loss term lse**2 overflowed
    fp16 once lse > 256 (inf, or NaN on a padding token's zero weight) and bf16 kept 3 digits of every mean. The
    dense kernel calls it with autocast off already, where entering the context would only cost host time."""
    weights = token_weights.to(values.dtype)  # float32 from the mask; the values float64 with float64 adapters
    if not torch.is_autocast_enabled(values.device.type):
        return weights @ values
    with torch.autocast(values.device.type, enabled=False):
        return weights @ values


def load_balance_from_statistics(statistics: torch.Tensor) -> torch.Tensor:
    """Switch/Mixtral balance loss N * sum_e f_e * P_e from `balance_statistics` [..., 2N] (one per layer)."""
    num_experts = statistics.shape[-1] // 2
    mean_probability, assignment_share = statistics.unflatten(-1, (2, num_experts)).unbind(-2)
    return num_experts * (mean_probability * assignment_share).sum(-1)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Switch/Mixtral balance loss N * sum_e f_e * P_e for one router.

    f_e is the fraction of the T*K token-to-expert assignments that go to expert e and P_e the mean router probability
    of e, both over unmasked tokens only. It is 1 for perfectly balanced routing and N when one expert takes
    everything (top-1); 0 when no token is real. Gradients flow through P_e only.
    """
    selection = selection_shares(experts, probs.shape[-1], probs.dtype)
    weights = token_weights_of(token_mask, routing_dtype(probs.dtype))
    return load_balance_from_statistics(balance_statistics(probs, selection, weights))


def router_z_loss(logits: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: mean over real tokens of logsumexp(logits)^2; keeps router logits small."""
    weights = token_weights_of(token_mask, routing_dtype(logits.dtype))
    return z_loss_from_logsumexp(torch.logsumexp(logits, dim=-1), weights)


def z_loss_from_logsumexp(logsumexp: torch.Tensor, token_weights: torch.Tensor | None) -> torch.Tensor:
    squared = logsumexp.square()
    return squared.mean() if token_weights is None else weighted_sum(token_weights, squared)


def token_weights_of(token_mask: torch.Tensor | None, dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """[T] weights 1/(real tokens) on real tokens, 0 on padding; all zero when no token is real."""
    if token_mask is None:
        return None
    weights = token_mask.to(dtype)
    return weights / weights.sum().clamp(min=1)


@dataclass
class RouterStatistics:
    """What one routed layer's forward hands to the router losses (unweighted)."""

    balance: torch.Tensor  # [2N] `balance_statistics`: gradients flow through the mean probabilities
    z_loss: torch.Tensor | None  # scalar, when the layer's z-loss is on


@dataclass
class RoutingRecord:
    """What a routed layer reports to telemetry observers for one forward pass (all tensors detached)."""

    layer_name: str
    probs: torch.Tensor  # [T, N]
    experts: torch.Tensor  # [T, K]
    token_mask: torch.Tensor | None  # [T] bool, True for real (non-padding) tokens
    batch_shape: tuple[int, ...]  # leading shape of the layer input, e.g. (batch, seq)
    forward: ForwardRouting | None = None  # the forward pass it belongs to (None: a bare layer, no forward begun)


RoutingObserver = Callable[[RoutingRecord], None]


@dataclass(frozen=True)
class ScoringPass:
    """Marks a forward as an evaluation's scoring pass (the one its loss comes from), declared by whoever runs it
    (`MALoRAModule.evaluate_batch`) so that routing observers count exactly that pass: its rows' task ids and, when
    only some rows are scored (a multiple-choice batch's gold-choice rows), which rows count."""

    row_tasks: torch.Tensor  # [R] long: the task id of each row of the forward's input
    row_scored: torch.Tensor | None = None  # [R] bool: the rows that count (None: all)


@dataclass(eq=False)
class ForwardRouting:
    """One forward pass of the model: its attention mask, the router statistics its layers hand back, and whether
    it is an evaluation's scoring pass."""

    attention_mask: torch.Tensor | None = None
    statistics: list[RouterStatistics] = field(default_factory=list)
    scoring: ScoringPass | None = None
    input_shape: tuple[int, int] | None = None  # (batch, seq) of the model's input ids or embeddings, when known
    routed_without_gradients: bool = False  # a layer routed in training mode under no_grad: it collected nothing
    _tokens: dict[tuple[tuple[int, ...], torch.dtype], tuple[torch.Tensor | None, torch.Tensor | None]] = field(
        default_factory=dict)
    _casts: dict[tuple[int, torch.dtype], tuple[weakref.ref, int, weakref.ref]] = field(default_factory=dict)

    def shared_cast(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """`x` in `dtype`, one tensor for every layer of this forward that reads `x` (q, k and v read the same hidden
        states; gate and up too): each routed layer saves its input for backward, and a cast of its own per layer kept
        three bf16 copies of one float32 input alive until backward.

        Held by weak references only: the copy lives as long as a layer's backward keeps it, not as long as this
        record. An `x` changed in place since is cast again. Without gradients nothing is saved, so `x` is handed on
        as it is (each kernel casts it; evaluation's inference tensors have no version to check).
        """
        if x.dtype == dtype or not torch.is_grad_enabled():
            return x
        key = (id(x), dtype)
        entry = self._casts.get(key)
        if entry is not None:
            source, version, copy = entry[0](), entry[1], entry[2]()
            if source is x and version == x._version and copy is not None:
                return copy
        copy = x.to(dtype)
        self._casts[key] = (weakref.ref(x), x._version, weakref.ref(copy))
        return copy

    def tokens(self, leading_shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(bool mask [T] of real tokens, `token_weights_of` that mask in the routing `dtype`) for a layer input of
        leading shape (batch, seq); (None, None) when unknown (no 2-D attention mask, or one that does not cover the
        input). A mask whose tokens are all real is kept, not dropped: telling would read it on the host. Its weights
        are then 1/T on every token, as without a mask. Computed once per forward, shape and dtype.

        During cached generation the mask covers past + new tokens, so the last `seq` columns are the new ones. A layer
        the model feeds [batch * seq, features] (Qwen2-MoE's shared expert, OPT's fc1/fc2) has a leading shape of
        (batch * seq,): it gets the same mask, flattened as its input was.
        """
        key = (leading_shape, dtype)
        if key not in self._tokens:
            mask = self.attention_mask
            token_mask = None
            rows = leading_shape
            if len(leading_shape) == 1 and self.input_shape is not None \
                    and leading_shape[0] == self.input_shape[0] * self.input_shape[1]:
                rows = self.input_shape
            if mask is not None and mask.dim() == 2 and len(rows) == 2:
                batch, seq = rows
                if mask.shape[0] == batch and mask.shape[1] >= seq:
                    token_mask = mask[:, -seq:].reshape(-1).bool()
            self._tokens[key] = (token_mask, token_weights_of(token_mask, dtype))
        return self._tokens[key]


class RoutingContext:
    """Per-model state shared by every routed layer: the current forward's record and the routing observers."""

    def __init__(self) -> None:
        self.current: ForwardRouting | None = None
        # the forward whose router losses `router_losses` gives: the latest, except a side pass (training mode under
        # no_grad: a teacher or metric pass inside a training step), which collects none and leaves the step's own
        self.losses_forward: ForwardRouting | None = None
        self.observers: list[RoutingObserver] = []
        self.hooks: list[RemovableHandle] = []  # the forward-pre-hooks that begin each forward
        self.scoring: ScoringPass | None = None  # set by `scoring_pass` around an evaluation's scoring forward

    def __getstate__(self) -> dict[str, Any]:
        """A copy (`copy.deepcopy`, pickling) starts with no forward and no observers: the latest forward's record
        holds tensors of the original's graph, and the observers are the original's callbacks."""
        return {**self.__dict__, "current": None, "losses_forward": None, "observers": [], "scoring": None}

    def begin_forward(self, attention_mask: torch.Tensor | None = None, input_shape: tuple[int, int] | None = None,
                      side_pass: bool = False) -> ForwardRouting:
        """Start a forward pass (the model's pre-forward hook does this; call it yourself around a bare layer).
        A `side_pass` (the hook's: a model in training mode called under no_grad) keeps `losses_forward`."""
        self.current = ForwardRouting(attention_mask, scoring=self.scoring, input_shape=input_shape)
        if not side_pass:
            self.losses_forward = self.current
        return self.current

    @contextlib.contextmanager
    def scoring_pass(self, scoring: ScoringPass) -> Iterator[None]:
        """Every forward begun inside is marked as this scoring pass."""
        self.scoring = scoring
        try:
            yield
        finally:
            self.scoring = None

    def notify(self, record_factory: Callable[[], RoutingRecord]) -> None:
        if self.observers:
            record = record_factory()
            for observer in self.observers:
                observer(record)


class BeginForward:
    """A forward-pre-hook that begins a forward on `context` with the call's attention mask and input shape. An
    object rather than a closure, so that a deep copy or an unpickled model begins forwards on its own context."""

    def __init__(self, context: RoutingContext, module: nn.Module) -> None:
        self.context = context
        self.signature = inspect.signature(module.forward)

    def __call__(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        arguments = kwargs
        if args:
            try:
                arguments = self.signature.bind_partial(*args, **kwargs).arguments
            except TypeError:
                pass
        mask = arguments.get("attention_mask")
        inputs = arguments.get("input_ids")
        inputs = arguments.get("inputs_embeds") if inputs is None else inputs
        shape = tuple(inputs.shape[:2]) if isinstance(inputs, torch.Tensor) and inputs.dim() >= 2 else None
        self.context.begin_forward(mask if isinstance(mask, torch.Tensor) else None, shape,
                                   side_pass=module.training and not torch.is_grad_enabled())


def install_routing_context(model: nn.Module) -> RoutingContext:
    """Attach a `RoutingContext` to `model`: each call of the model, and of its decoder called alone
    (`model.get_decoder()`, `model.model`: its call inside the model's begins the same forward anew), begins a
    forward with its attention mask."""
    context = RoutingContext()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    modules = [model] if not isinstance(decoder, nn.Module) or decoder is model else [model, decoder]
    for module in modules:
        context.hooks.append(module.register_forward_pre_hook(BeginForward(context, module), with_kwargs=True))
    return context


def in_backward() -> bool:
    """Whether this runs inside a backward pass: activation checkpointing recomputing a layer's forward, whose
    routing the first forward already handed over. (torch's module tracker asks the same way.) False while dynamo
    traces, where asking would break the graph: a compiled forward is traced once. Activation checkpointing does not
    compile (dynamo refuses the hand-over, a side effect, inside a checkpoint) and runs eagerly around the layers,
    where this check works."""
    return not torch.compiler.is_compiling() and torch._C._current_graph_task_id() != -1


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
