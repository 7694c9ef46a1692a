"""The optimiser's choices: the learning-rate schedule and which AdamW implementation runs."""

from __future__ import annotations

import math
from typing import Iterable, Literal, get_args

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from torch.distributed.tensor import DTensor

from malora_lightning.precision import AutoMixedPrecision

Schedule = Literal["linear", "cosine", "constant"]
SCHEDULES: tuple[Schedule, ...] = get_args(Schedule)


def lr_multiplier(step: int, warmup_steps: int, total_steps: int, schedule: Schedule) -> float:
    """Linear warm-up over `warmup_steps` (the first step at 1/warmup_steps of the peak: unlike HF's schedule, no
    step at rate 0), then linear or cosine decay to 0 at `total_steps` (or constant)."""
    if schedule not in SCHEDULES:
        raise ValueError(f"lr_schedule={schedule!r} is invalid: expected one of {', '.join(SCHEDULES)}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


class AdapterSchedule(torch.optim.lr_scheduler.LambdaLR):
    """The schedule `MALoRAModule.configure_optimizers` builds, by its type: on a resume only this one, and its
    AdamW, take the run's settings (`MALoRAModule.on_train_start`); a subclass's own schedule is left as restored."""


def estimated_stepping_batches(trainer: L.Trainer) -> float:
    """`trainer.estimated_stepping_batches`, without costing a resumed fit its place in the data.

    Under `max_epochs` the estimate builds the training loader (`FitLoop.setup_data`) while the optimizers are set up,
    before the checkpoint is restored; Lightning 2.6 then keeps that loader and never gives it the checkpoint's state
    (Lightning-AI/pytorch-lightning#20550), so a fit resumed mid-epoch restarted the epoch's draws. For a fit that
    restores a checkpoint, the loader built here is dropped, and the fit loop builds it again once the checkpoint is
    loaded, as it does when nothing asked for it early."""
    fit_loop = trainer.fit_loop
    built_before = fit_loop._combined_loader is not None
    estimate = trainer.estimated_stepping_batches
    if trainer.ckpt_path is not None and not built_before:
        fit_loop._combined_loader = None
    return estimate


def schedule_length(estimated_stepping_batches: float, warmup_ratio: float, schedule: Schedule) -> int:
    """The optimizer steps the schedule spans: the trainer's estimate, which is infinite when only `max_time` (or
    max_steps=-1 with max_epochs=-1) ends the run, and -1 (Lightning returns max_steps) for a training loader without
    a length under max_steps=-1; then only a constant rate without warm-up is defined."""
    unbounded, unsized = math.isinf(estimated_stepping_batches), estimated_stepping_batches < 0
    if unbounded or unsized:
        if schedule == "constant" and warmup_ratio == 0:
            return 1
        why = ("unbounded (max_steps=-1 and max_epochs=-1, as when only max_time is set)" if unbounded else
               "unknown (the training loader has no length, e.g. an IterableDataset, and max_steps=-1)")
        raise ValueError(f"lr_schedule={schedule!r} with warmup_ratio={warmup_ratio} needs the run's length, but the "
                         f"trainer's is {why}: set trainer.max_steps{' or max_epochs' if unbounded else ''}, or use "
                         "lr_schedule='constant' with warmup_ratio=0")
    return max(1, int(estimated_stepping_batches))


def adamw_options(parameters: Iterable[torch.Tensor], trainer: L.Trainer | None = None) -> dict[str, bool]:
    """`fused=True` when every parameter is a plain CPU tensor and `trainer` can clip a fused optimizer, else torch's
    defaults (foreach on CUDA).

    For CPU tensors torch defaults to its per-tensor loop, which costs 2-3x the fused kernel for MALoRA's 720
    adapter tensors on SmolLM2 (benchmarks/cpu_micro.py). Lightning's `MixedPrecision` refuses to clip the gradients
    of a fused optimizer (under fp16 loss scaling its step unscales them itself), even in bf16, where nothing is
    scaled; `AutoMixedPrecision` clips them. Sharded (DTensor) parameters are left to torch's choice.
    """
    on_cpu = all(p.device.type == "cpu" and not isinstance(p, DTensor) for p in parameters)
    clipping_refused = (trainer is not None and bool(trainer.gradient_clip_val)
                        and isinstance(trainer.precision_plugin, MixedPrecision)
                        and not isinstance(trainer.precision_plugin, AutoMixedPrecision))
    return {"fused": True} if on_cpu and not clipping_refused else {}
