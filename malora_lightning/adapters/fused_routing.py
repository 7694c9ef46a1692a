"""The routing of the dense mixture kernel as two Triton kernels, one launch each way (`AdapterConfig(kernel="fused")`).

In eager mode the routing between the mixture's GEMMs (softmax, top-k, selection, renormalised gates, gating the
experts' rank-space hidden states, balance statistics, logsumexp) is some 20 small ops forward and 15 backward,
each a kernel launch plus Python dispatch on a GPU, where they cost more than the arithmetic. Here the forward is one
kernel over blocks of tokens (plus one sum of the per-block balance partials) and the backward one kernel. The
forward keeps for the backward only what it hands back anyway (probabilities and selected experts); the backward
recomputes the selection and gates from them with the same arithmetic, which costs a few flops per token and spares
three buffers.

They compute what `kernels.dense_forward` and `DenseRoutedExperts.backward` compute with plain ops, in float32
whatever the compute dtype (tests compare the two); top-k follows `routing.top_experts`. Triton runs on CUDA
tensors; `TRITON_INTERPRET=1` (set before this module is imported) runs the same kernels on CPU, for tests.
`kernels.fused_routing_applies` decides where they run; everywhere else kernel="fused" runs the plain ops.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

BLOCK_TOKENS = 64  # tokens per program: N and r are small, so a block is a few KB of registers


@triton.jit
def _token_block(block, tokens, N: tl.constexpr, NP: tl.constexpr, BLOCK: tl.constexpr):
    """A program's block of tokens: row and expert indices, their masks, offsets into a contiguous [T, N]."""
    rows = block * BLOCK + tl.arange(0, BLOCK)
    row_ok = rows < tokens
    cols = tl.arange(0, NP)
    col_ok = cols < N
    cell_ok = row_ok[:, None] & col_ok[None, :]
    return rows, row_ok, cols, col_ok, cell_ok, rows[:, None] * N + cols[None, :]


@triton.jit
def _token_weights(weights_ptr, rows, row_ok, tokens, HAS_WEIGHTS: tl.constexpr):
    """The balance statistics' token weights: given, or 1/T on every token."""
    weights = tl.where(row_ok, 1.0 / tokens, 0.0)
    if HAS_WEIGHTS:
        weights = tl.load(weights_ptr + rows, mask=row_ok, other=0.0).to(tl.float32)
    return weights


@triton.jit
def _gates(probs, selected, scale, K: tl.constexpr, RENORMALIZE: tl.constexpr):
    """(selection, gates, total) of a block from its probabilities and 0/1 selected experts: the forward kernel and
    the backward kernel (which recomputes them from the kept probabilities and experts) run this same arithmetic."""
    selection = selected * (1.0 / K)
    kept = probs * selection
    total = tl.sum(kept, axis=1) / scale  # read by the renormalised gates only
    total = tl.where(total > 0.0, total, 1.0)  # rows past the last token, loaded as zeros, have none
    if RENORMALIZE:
        gates = kept / total[:, None]
    else:
        gates = kept * (K * scale)
    return selection, gates, total


@triton.jit
def _route_forward_kernel(
        logits_ptr, logits_stride, hidden_ptr, hidden_stride, weights_ptr,
        probs_ptr, experts_ptr, gated_ptr, lse_ptr, partial_ptr,
        tokens, scale,
        N: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
        RENORMALIZE: tl.constexpr, HAS_WEIGHTS: tl.constexpr, STATISTICS: tl.constexpr, LOGSUMEXP: tl.constexpr,
        BLOCK: tl.constexpr):
    block = tl.program_id(0)
    rows, row_ok, cols, col_ok, cell_ok, cell = _token_block(block, tokens, N, NP, BLOCK)

    logits = tl.load(logits_ptr + rows[:, None] * logits_stride + cols[None, :], mask=cell_ok, other=0.0)
    logits = tl.where(col_ok[None, :], logits.to(tl.float32), float("-inf"))  # padded experts never win
    row_max = tl.max(logits, axis=1)
    exps = tl.exp(logits - row_max[:, None])
    denominator = tl.sum(exps, axis=1)
    probs = exps / denominator[:, None]
    if LOGSUMEXP:
        tl.store(lse_ptr + rows, row_max + tl.log(denominator), mask=row_ok)

    # top-k as `routing.top_experts`: K rounds of "largest logit not yet chosen, lowest index on ties". A NaN logit
    # ranks first, as in torch's sort: compared as itself it equalled no maximum, and the expert index came out NP
    keys = tl.where(logits != logits, float("inf"), logits)
    selected = tl.zeros([BLOCK, NP], dtype=tl.float32)
    for k in tl.static_range(K):
        open_experts = col_ok[None, :] & (selected == 0.0)
        best = tl.max(tl.where(open_experts, keys, float("-inf")), axis=1)
        expert = tl.min(tl.where(open_experts & (keys == best[:, None]), cols[None, :], NP), axis=1)
        tl.store(experts_ptr + rows * K + k, expert.to(tl.int64), mask=row_ok)
        selected = tl.where(cols[None, :] == expert[:, None], 1.0, selected)
    selection, gates, total = _gates(probs, selected, scale, K, RENORMALIZE)
    tl.store(probs_ptr + cell, probs, mask=cell_ok)

    # gated[:, e*R:(e+1)*R] = hidden[:, e*R:(e+1)*R] * gate_e, the gate rounded to the compute dtype first
    rank_cols = tl.arange(0, RP)
    rank_ok = row_ok[:, None] & (rank_cols < R)[None, :]
    for e in tl.static_range(N):
        gate = tl.sum(tl.where(cols[None, :] == e, gates, 0.0), axis=1)
        hidden = tl.load(hidden_ptr + rows[:, None] * hidden_stride + e * R + rank_cols[None, :], mask=rank_ok,
                         other=0.0)
        gate = gate.to(hidden.dtype).to(tl.float32)
        gated = (hidden.to(tl.float32) * gate[:, None]).to(hidden.dtype)
        tl.store(gated_ptr + rows[:, None] * (N * R) + e * R + rank_cols[None, :], gated, mask=rank_ok)

    if STATISTICS:  # this block's share of the token-weighted means of probs and selection
        weights = _token_weights(weights_ptr, rows, row_ok, tokens, HAS_WEIGHTS)
        tl.store(partial_ptr + block * 2 * N + cols, tl.sum(probs * weights[:, None], axis=0), mask=col_ok)
        tl.store(partial_ptr + block * 2 * N + N + cols, tl.sum(selection * weights[:, None], axis=0), mask=col_ok)


@triton.jit
def _route_backward_kernel(
        grad_gated_ptr, hidden_ptr, hidden_stride, probs_ptr, experts_ptr, weights_ptr,
        grad_balance_ptr, grad_balance_stride, grad_lse_ptr, grad_lse_stride, grad_logits_ptr,
        tokens, scale,
        N: tl.constexpr, NP: tl.constexpr, R: tl.constexpr, RP: tl.constexpr, K: tl.constexpr,
        RENORMALIZE: tl.constexpr, HAS_GATED_GRAD: tl.constexpr, HAS_WEIGHTS: tl.constexpr,
        HAS_BALANCE_GRAD: tl.constexpr, HAS_LSE_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    block = tl.program_id(0)
    rows, row_ok, cols, col_ok, cell_ok, cell = _token_block(block, tokens, N, NP, BLOCK)
    probs = tl.load(probs_ptr + cell, mask=cell_ok, other=0.0)
    selected = tl.zeros([BLOCK, NP], dtype=tl.float32)
    for k in tl.static_range(K):
        expert = tl.load(experts_ptr + rows * K + k, mask=row_ok, other=-1)
        selected = tl.where(cols[None, :] == expert[:, None], 1.0, selected)
    selection, gates, total = _gates(probs, selected, scale, K, RENORMALIZE)

    # gated = hidden * gate: grad_hidden = grad_gated * gate, grad_gate = sum over the rank of grad_gated * hidden
    grad_probs = tl.zeros([BLOCK, NP], dtype=tl.float32)
    if HAS_GATED_GRAD:
        rank_cols = tl.arange(0, RP)
        rank_ok = row_ok[:, None] & (rank_cols < R)[None, :]
        grad_gates = tl.zeros([BLOCK, NP], dtype=tl.float32)
        for e in tl.static_range(N):
            gate = tl.sum(tl.where(cols[None, :] == e, gates, 0.0), axis=1)
            columns = e * R + rank_cols[None, :]
            grad_gated = tl.load(grad_gated_ptr + rows[:, None] * (N * R) + columns, mask=rank_ok, other=0.0)
            hidden = tl.load(hidden_ptr + rows[:, None] * hidden_stride + columns, mask=rank_ok, other=0.0)
            gate = gate.to(grad_gated.dtype).to(tl.float32)
            grad_hidden = (grad_gated.to(tl.float32) * gate[:, None]).to(grad_gated.dtype)
            tl.store(grad_gated_ptr + rows[:, None] * (N * R) + columns, grad_hidden, mask=rank_ok)  # in place
            grad_gate = tl.sum(grad_gated.to(tl.float32) * hidden.to(tl.float32), axis=1)
            grad_gates = tl.where(cols[None, :] == e, grad_gate[:, None], grad_gates)
        if RENORMALIZE:  # gates = kept / total, kept = probs * selection, total = sum(kept) / scale
            through_total = tl.sum(grad_gates * gates, axis=1) / scale
            grad_probs = (grad_gates - through_total[:, None]) / total[:, None] * selection
        else:  # gates = scale * K * probs * selection
            grad_probs = grad_gates * selection * (K * scale)
    if HAS_BALANCE_GRAD:  # balance[:N] = token-weighted mean of probs (its last N, the selection's, have none)
        weights = _token_weights(weights_ptr, rows, row_ok, tokens, HAS_WEIGHTS)
        grad_mean = tl.load(grad_balance_ptr + cols * grad_balance_stride, mask=col_ok, other=0.0).to(tl.float32)
        grad_probs += weights[:, None] * grad_mean[None, :]
    grad_logits = probs * (grad_probs - tl.sum(grad_probs * probs, axis=1)[:, None])
    if HAS_LSE_GRAD:  # d logsumexp / d logits = probs
        grad_lse = tl.load(grad_lse_ptr + rows * grad_lse_stride, mask=row_ok, other=0.0).to(tl.float32)
        grad_logits += grad_lse[:, None] * probs
    tl.store(grad_logits_ptr + cell, grad_logits.to(grad_logits_ptr.dtype.element_ty), mask=cell_ok)


def _launch_device(device: torch.device) -> contextlib.AbstractContextManager:
    """Triton launches on the current CUDA device and its stream, not on the tensors' device: a model spread over
    GPUs (`device_map`) would run a layer's kernel against another GPU's memory."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _require_layout(name: str, tensor: torch.Tensor | None, contiguous: bool = False) -> None:
    """The kernels index rows by one stride and columns by one (or every element contiguously): another layout
    would be read wrongly without an error."""
    if tensor is None:
        return
    if (not tensor.is_contiguous()) if contiguous else (tensor.dim() == 2 and tensor.stride(1) != 1):
        layout = "contiguous" if contiguous else "unit column stride"
        raise ValueError(f"fused routing: {name} of shape {tuple(tensor.shape)} and strides {tensor.stride()} is not "
                         f"{layout}, which the Triton kernel indexes by")


@dataclass
class FusedRouting:
    """The forward kernel's outputs: the gated hidden states and what the router losses and observers read (the
    backward kernel recomputes the selection and gates from `probs` and `experts`)."""

    gated: torch.Tensor  # [T, N*r] compute dtype: each expert's rank-space hidden times its gate
    probs: torch.Tensor  # [T, N] float32 softmax over all experts
    experts: torch.Tensor  # [T, K] int64, by decreasing probability
    lse: torch.Tensor | None  # [T] float32 router logsumexp, when asked for
    balance: torch.Tensor | None  # [2N] float32 balance statistics (`routing.balance_statistics`), when asked for


def route_forward(logits: torch.Tensor, expert_hidden: torch.Tensor, num_experts: int, rank: int,
                  token_weights: torch.Tensor | None, top_k: int, renormalize: bool, scale: float, statistics: bool,
                  logsumexp: bool) -> FusedRouting:
    """Route T tokens and gate their experts: logits [T, N] and expert_hidden [T, N*r] may be column slices of a
    wider matrix (unit column stride); `token_weights` [T] as in `routing.balance_statistics`."""
    for name, tensor in (("logits", logits), ("expert_hidden", expert_hidden)):
        _require_layout(name, tensor)
    _require_layout("token_weights", token_weights, contiguous=True)
    tokens = logits.shape[0]
    device = logits.device
    blocks = triton.cdiv(tokens, BLOCK_TOKENS)
    probs = torch.empty(tokens, num_experts, dtype=torch.float32, device=device)
    experts = torch.empty(tokens, top_k, dtype=torch.int64, device=device)
    gated = torch.empty(tokens, num_experts * rank, dtype=expert_hidden.dtype, device=device)
    lse = torch.empty(tokens, dtype=torch.float32, device=device) if logsumexp else None
    partial = torch.empty(blocks, 2 * num_experts, dtype=torch.float32, device=device) if statistics else None
    with _launch_device(device):
        _route_forward_kernel[(blocks,)](
            logits, logits.stride(0), expert_hidden, expert_hidden.stride(0), token_weights,
            probs, experts, gated, lse, partial, tokens, scale,
            N=num_experts, NP=triton.next_power_of_2(num_experts), R=rank, RP=triton.next_power_of_2(rank), K=top_k,
            RENORMALIZE=renormalize, HAS_WEIGHTS=token_weights is not None, STATISTICS=statistics,
            LOGSUMEXP=logsumexp, BLOCK=BLOCK_TOKENS)
    balance = partial.sum(0) if partial is not None else None
    return FusedRouting(gated, probs, experts, lse, balance)


def route_backward(grad_gated: torch.Tensor | None, expert_hidden: torch.Tensor, probs: torch.Tensor,
                   experts: torch.Tensor, token_weights: torch.Tensor | None, grad_balance: torch.Tensor | None,
                   grad_lse: torch.Tensor | None, top_k: int, renormalize: bool,
                   scale: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The experts' hidden gradient [T, N*r] (None without `grad_gated`) and the logits' [T, N], both in the
    compute dtype (`expert_hidden`'s), from the gradients of the gated hidden states [T, N*r], the balance
    statistics [2N] and the logsumexp [T] (each None when absent; the last two may have any stride, as autograd
    hands an expanded gradient to an output that was only summed).

    The hidden gradient is written over `grad_gated` (contiguous, and the caller's own: each element is read
    before it is written, by the same program), which spares an allocation per step."""
    _require_layout("expert_hidden", expert_hidden)
    for name, tensor in (("grad_gated", grad_gated), ("probs", probs), ("experts", experts),
                         ("token_weights", token_weights)):
        _require_layout(name, tensor, contiguous=True)
    tokens, num_experts = probs.shape
    rank = expert_hidden.shape[1] // num_experts
    grad_logits = probs.new_empty(probs.shape, dtype=expert_hidden.dtype)
    with _launch_device(probs.device):
        _route_backward_kernel[(triton.cdiv(tokens, BLOCK_TOKENS),)](
            grad_gated, expert_hidden, expert_hidden.stride(0), probs, experts, token_weights,
            grad_balance, 0 if grad_balance is None else grad_balance.stride(0),
            grad_lse, 0 if grad_lse is None else grad_lse.stride(0), grad_logits, tokens, scale,
            N=num_experts, NP=triton.next_power_of_2(num_experts), R=rank, RP=triton.next_power_of_2(rank), K=top_k,
            RENORMALIZE=renormalize, HAS_GATED_GRAD=grad_gated is not None, HAS_WEIGHTS=token_weights is not None,
            HAS_BALANCE_GRAD=grad_balance is not None, HAS_LSE_GRAD=grad_lse is not None, BLOCK=BLOCK_TOKENS)
    return grad_gated, grad_logits
