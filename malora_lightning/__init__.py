"""MALoRA (Mixture of Asymmetric Low-Rank Adaptation) for multi-task fine-tuning with PyTorch Lightning."""

from malora_lightning.adapters import (
    AdapterConfig,
    add_routing_observer,
    aux_loss,
    count_parameters,
    inject_adapters,
    load_adapted_model,
    load_adapters,
    load_base_model,
    save_adapters,
)

__all__ = [
    "AdapterConfig",
    "add_routing_observer",
    "aux_loss",
    "count_parameters",
    "inject_adapters",
    "load_adapted_model",
    "load_adapters",
    "load_base_model",
    "save_adapters",
]
