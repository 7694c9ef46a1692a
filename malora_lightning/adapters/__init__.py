"""Adapter layers and model surgery in pure PyTorch + transformers (nothing here knows about Lightning)."""

from malora_lightning.adapters.accounting import ParameterCount, count_parameters
from malora_lightning.adapters.bnb_cpu import disable_bnb_cpu_weight_packing
from malora_lightning.adapters.config import PAPER_TARGET_MODULES, AdapterConfig
from malora_lightning.adapters.inject import find_target_modules, inject_adapters
from malora_lightning.adapters.io import (
    AdapterFolder,
    adapter_state_dict,
    load_adapted_model,
    load_adapters,
    read_adapter_folder,
    save_adapters,
)
from malora_lightning.adapters.layers import AdapterLayer, LoRALinear, MALoRALinear, MoLoRALinear, RoutedAdapterLayer
from malora_lightning.adapters.merge import (
    TaskProfile,
    merge_adapters,
    merge_task,
    task_lora_model,
    task_lora_weights,
    task_profile,
)
from malora_lightning.adapters.model import (
    add_routing_observer,
    adapter_layers,
    aux_loss,
    compile_adapters,
    frozen_adapter_weights,
    get_adapter_config,
    routed_layers,
    router_losses,
    scoring_pass,
)
from malora_lightning.adapters.quantization import load_base_model, prepare_for_adapter_training
from malora_lightning.adapters.routing import RoutingRecord, ScoringPass, load_balance_loss, route, router_z_loss

__all__ = [
    "PAPER_TARGET_MODULES",
    "AdapterConfig",
    "AdapterFolder",
    "AdapterLayer",
    "LoRALinear",
    "MALoRALinear",
    "MoLoRALinear",
    "ParameterCount",
    "RoutedAdapterLayer",
    "RoutingRecord",
    "ScoringPass",
    "TaskProfile",
    "adapter_layers",
    "adapter_state_dict",
    "add_routing_observer",
    "aux_loss",
    "compile_adapters",
    "count_parameters",
    "disable_bnb_cpu_weight_packing",
    "find_target_modules",
    "frozen_adapter_weights",
    "get_adapter_config",
    "inject_adapters",
    "load_adapted_model",
    "load_adapters",
    "load_balance_loss",
    "load_base_model",
    "merge_adapters",
    "merge_task",
    "prepare_for_adapter_training",
    "read_adapter_folder",
    "route",
    "routed_layers",
    "router_losses",
    "router_z_loss",
    "save_adapters",
    "scoring_pass",
    "task_lora_model",
    "task_lora_weights",
    "task_profile",
]
