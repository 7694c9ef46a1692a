"""`count_parameters`: trainable and total parameters, PEFT's `print_trainable_parameters` convention."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ParameterCount:
    trainable: int
    total: int

    @property
    def trainable_percent(self) -> float:
        """trainable / (base + every adapter tensor, frozen ones included) * 100, as PEFT and the paper report."""
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def __str__(self) -> str:
        return f"trainable params: {self.trainable:,} || all params: {self.total:,} || " \
               f"trainable%: {self.trainable_percent:.4f}"


def parameter_numel(param: nn.Parameter) -> int:
    """Logical element count; a packed bitsandbytes 4-bit weight stores two (or more) values per storage element."""
    numel = param.numel()
    if type(param).__name__ == "Params4bit":
        storage = getattr(param, "quant_storage", None)
        numel *= 2 * (storage.itemsize if storage is not None else 1)
    return numel


def count_parameters(model: nn.Module) -> ParameterCount:
    """Trainable and all parameters of `model` (tied ones once, packed 4-bit weights by their logical size), so
    that the percent compares with PEFT's `print_trainable_parameters` and the paper; prints as PEFT's line."""
    trainable = total = 0
    for param in model.parameters():  # shared (tied) parameters are yielded once
        numel = parameter_numel(param)
        total += numel
        if param.requires_grad:
            trainable += numel
    return ParameterCount(trainable=trainable, total=total)
