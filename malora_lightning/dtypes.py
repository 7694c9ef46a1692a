"""Dtype names as configs and the command line spell them, and the one map from such a name to its `torch.dtype`.

Each setting accepts its own subset (`AdapterConfig.adapter_dtype`, the base model's dtypes in `load_base_model`).
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
    "uint8": torch.uint8,
}


def dtypes_named(*names: str) -> dict[str, torch.dtype]:
    """The part of `DTYPES` a setting accepts, in the order given (error messages list them in it)."""
    return {name: DTYPES[name] for name in names}
