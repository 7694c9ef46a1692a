"""The random state training draws from (torch's CPU generator, and CUDA's where present), captured and restored.

Dropout draws from these global generators, and so does every DataLoader iterator without a generator of its own
as it starts (it takes a base seed from torch's generator; `MultiTaskDataModule`'s loaders have their own).
`MALoRAModule` saves the state in checkpoints for an exact resume, one per rank (each process's dropout draws its
own numbers), and puts it back after each validation inside a fit, so that evaluating never shifts the random
numbers the next training steps get.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

RandomState = dict[str, Any]


def capture_rng_state() -> RandomState:
    """torch's CPU state and, with CUDA, the current device's: the one this process computes on. (Every visible GPU's
    state, as `get_rng_state_all` gives, failed to restore where fewer GPUs are visible.)"""
    state: RandomState = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: RandomState) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if isinstance(cuda, list):  # checkpoints before 2026-12-05 hold every visible device's state
            index = torch.cuda.current_device()
            cuda = cuda[index] if index < len(cuda) else None
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)


def gather_by_rank(state: RandomState) -> list[RandomState]:
    """Every process's ``state``, listed by rank (every rank must call this, as every rank writes a checkpoint);
    ``[state]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [state]
    states: list[RandomState | None] = [None] * dist.get_world_size()
    dist.all_gather_object(states, state)
    return states
