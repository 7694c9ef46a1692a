"""`AutoMixedPrecision`: bf16 autocast where the hardware runs bf16 fast, plain float32 elsewhere.

Use it in a recipe instead of `precision: bf16-mixed` when the same recipe must run well on any CPU:

    trainer:
      plugins:
        - class_path: malora_lightning.precision.AutoMixedPrecision
          init_args: {device: cpu}
"""

from __future__ import annotations

import contextlib
from collections.abc import Generator
from typing import Any, Literal

from lightning.fabric.utilities.types import Optimizable
from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_info
from torch.nn import Module
from torch.optim import Optimizer

from malora_lightning.hardware import fast_bf16_available


class AutoMixedPrecision(MixedPrecision):
    """`bf16-mixed` if `device` runs bf16 fast (CUDA with bf16, CPUs with AVX512-BF16/AMX), else `32-true`.

    Decided in each process when the strategy connects the model, not when the plugin is built: asking CUDA
    initialises it, and Lightning cannot fork processes (`ddp_fork`, `ddp_notebook`) after that.
    """

    def __init__(self, device: Literal["cpu", "cuda"] = "cpu") -> None:
        super().__init__(precision="bf16-mixed", device=device)
        self._enabled: bool | None = None

    @property
    def enabled(self) -> bool:
        if self._enabled is None:
            self._enabled = fast_bf16_available(self.device)
            if not self._enabled:
                self.precision = "32-true"  # what runs; Lightning's model summary and logs read it
            rank_zero_info(f"AutoMixedPrecision: {'bf16 autocast' if self._enabled else 'float32'} on {self.device} "
                           f"({'fast' if self._enabled else 'no fast'} bf16 on this {self.device})")
        return self._enabled

    def connect(self, model: Module, optimizers: list[Optimizer], lr_schedulers: list[Any]
                ) -> tuple[Module, list[Optimizer], list[Any]]:
        _ = self.enabled  # decided here, in the training process, before the run reads `precision`
        return super().connect(model, optimizers, lr_schedulers)

    def clip_gradients(self, optimizer: Optimizable, clip_val: int | float = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM) -> None:
        """Clip as `Precision` does. `MixedPrecision` refuses optimizers that unscale gradients in their own step
        (fused AdamW), a concern of fp16 loss scaling only: in bf16 there is no scaler and nothing to unscale."""
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)

    @contextlib.contextmanager
    def forward_context(self) -> Generator[None, None, None]:
        if self.enabled:
            with super().forward_context():
                yield
        else:
            yield
