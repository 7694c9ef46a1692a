"""Initialisers: LoRA's (Kaiming-uniform A, zero B) and MALoRA's beta-scaled SVD init (paper Eqs. 8-10)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def kaiming_uniform_rows_(matrix: torch.Tensor) -> torch.Tensor:
    """PEFT/`nn.Linear` init of an [out, in] matrix: U(-1/sqrt(in), 1/sqrt(in))."""
    return nn.init.kaiming_uniform_(matrix, a=math.sqrt(5))


@torch.no_grad()
def init_lora_(lora_A: torch.Tensor, lora_B: torch.Tensor) -> None:
    """A Kaiming-uniform (per expert when stacked [N, r, in]), B zero: the adapter starts as the identity."""
    if lora_A.is_meta:
        return
    for matrix in lora_A.reshape(-1, *lora_A.shape[-2:]):
        kaiming_uniform_rows_(matrix)
    lora_B.zero_()


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops on one thread inside (nothing changes on another device). MKL's threaded SVD of a thin
    [d, n] matrix synchronises its threads at every small BLAS step: on two cores that another process shares, each
    of MALoRA's per-layer SVDs took seconds instead of ~20 ms, so SmolLM2's 180 routed layers took minutes to build.
    It also makes the init independent of the thread count: MKL's factors of a [32, 1536] matrix differ in their last
    bits between one and two threads (those of a [32, 576] one do not)."""
    threads = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@torch.no_grad()
def init_malora_(shared_A: torch.Tensor, lora_P: torch.Tensor, lora_B: torch.Tensor, beta: float,
                 reuse_first_kaiming: bool = False) -> None:
    """MALoRA init (paper Eqs. 8-10).

    Draw Kaiming-uniform K_0..K_N (d x n), take thin SVDs K_t = U_t Sigma_t V_t, set S_A = beta * V_0 and
    P_t = (U_t Sigma_t)[:r-bar] / beta, B_t = 0. Each P_t S_A then has the Gram matrix (so the row norms) of the first
    r-bar rows of a fresh Kaiming-uniform matrix, all experts share span(V_0), and beta cancels in the product.
    """
    if shared_A.is_meta:
        return
    num_experts, expert_rank, shared_rank = lora_P.shape
    num_draws = num_experts if reuse_first_kaiming else num_experts + 1
    kaiming = torch.empty(num_draws, shared_rank, shared_A.shape[1], dtype=torch.float32, device=shared_A.device)
    for matrix in kaiming:
        kaiming_uniform_rows_(matrix)
    with one_cpu_thread(kaiming.device):
        U, S, Vh = torch.linalg.svd(kaiming.double(), full_matrices=False)
    US = U * S.unsqueeze(-2)  # U_t @ diag(Sigma_t), [num_draws, d, d]
    expert_US = US[:num_experts] if reuse_first_kaiming else US[1:]
    shared_A.copy_(beta * Vh[0])
    lora_P.copy_(expert_US[:, :expert_rank, :] / beta)
    lora_B.zero_()


@torch.no_grad()
def init_router_(weight: torch.Tensor, std: float) -> None:
    if not weight.is_meta:
        nn.init.normal_(weight, mean=0.0, std=std)
