"""MALoRA (Mixture of Asymmetric Low-Rank Adaptation) for multi-task fine-tuning with PyTorch Lightning."""

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

__all__ = [
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
