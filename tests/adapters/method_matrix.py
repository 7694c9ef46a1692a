"""The adapter method matrix, stated once: each method's settings, layer class and trainable tensors.

`tests/adapters/test_method_matrix.py` runs every method over every base (dtype or quantization) through one battery;
other adapter tests take the method -> class mapping from `METHOD_CLASSES` instead of restating it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from malora_lightning.adapters import LoRALinear, MALoRALinear, MoLoRALinear

METHOD_CLASSES = {"lora": LoRALinear, "molora": MoLoRALinear, "malora": MALoRALinear}


@dataclass(frozen=True)
class MethodCase:
    name: str
    settings: dict[str, Any]  # AdapterConfig fields
    layer_class: type
    trainable: frozenset[str]  # the adapter tensors that get gradients, by name inside a layer
    frozen: frozenset[str] = field(default_factory=frozenset)  # adapter tensors an ablation switch keeps fixed


METHOD_CASES = [
    MethodCase("lora", {"method": "lora"}, LoRALinear, frozenset({"lora_A", "lora_B"})),
    MethodCase("asylora", {"method": "lora", "train_A": False}, LoRALinear, frozenset({"lora_B"}),
               frozenset({"lora_A"})),
    MethodCase("molora-dense", {"method": "molora", "kernel": "dense"}, MoLoRALinear,
               frozenset({"lora_A", "lora_B", "router.weight"})),
    MethodCase("molora-sparse", {"method": "molora", "kernel": "sparse"}, MoLoRALinear,
               frozenset({"lora_A", "lora_B", "router.weight"})),
    MethodCase("malora-dense", {"method": "malora", "kernel": "dense"}, MALoRALinear,
               frozenset({"shared_A", "lora_P", "lora_B", "router.weight"})),
    MethodCase("malora-sparse", {"method": "malora", "kernel": "sparse"}, MALoRALinear,
               frozenset({"shared_A", "lora_P", "lora_B", "router.weight"})),
    # Triton routing (interpreted on CPU; float64 bases run the dense kernel's plain ops)
    MethodCase("molora-fused", {"method": "molora", "kernel": "fused"}, MoLoRALinear,
               frozenset({"lora_A", "lora_B", "router.weight"})),
    MethodCase("malora-fused", {"method": "malora", "kernel": "fused"}, MALoRALinear,
               frozenset({"shared_A", "lora_P", "lora_B", "router.weight"})),
]
