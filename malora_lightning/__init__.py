"""MALoRA (Mixture of Asymmetric Low-Rank Adaptation) for multi-task fine-tuning with PyTorch Lightning.

The adapter functions need PyTorch and transformers only; `MALoRAModule` and `MultiTaskDataModule` are imported from
here on first use, so that `import malora_lightning` does not import Lightning.
"""

import importlib
from typing import Any

from malora_lightning.adapters import (
    AdapterConfig,
    TaskProfile,
    add_routing_observer,
    aux_loss,
    count_parameters,
    frozen_adapter_weights,
    inject_adapters,
    load_adapted_model,
    load_adapters,
    load_base_model,
    merge_adapters,
    merge_task,
    save_adapters,
    task_lora_model,
    task_lora_weights,
    task_profile,
)

# name -> the module that defines it, imported when the name is first read
_LIGHTNING_CLASSES = {"MALoRAModule": "malora_lightning.module", "MultiTaskDataModule": "malora_lightning.data"}


def __getattr__(name: str) -> Any:
    if name in _LIGHTNING_CLASSES:
        return getattr(importlib.import_module(_LIGHTNING_CLASSES[name]), name)
    raise AttributeError(f"module 'malora_lightning' has no attribute {name!r}")


__all__ = [
    "MALoRAModule",
    "MultiTaskDataModule",
    "AdapterConfig",
    "TaskProfile",
    "add_routing_observer",
    "aux_loss",
    "count_parameters",
    "frozen_adapter_weights",
    "inject_adapters",
    "load_adapted_model",
    "load_adapters",
    "load_base_model",
    "merge_adapters",
    "merge_task",
    "save_adapters",
    "task_lora_model",
    "task_lora_weights",
    "task_profile",
]
