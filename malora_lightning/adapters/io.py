"""Adapter export and import: `adapter_config.json` + `adapter_model.safetensors`, adapter tensors only."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.inject import inject_adapters
from malora_lightning.adapters.model import adapter_layers, get_adapter_config
from malora_lightning.atomic import atomic_directory

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "malora_lightning"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (frozen ablation tensors such as a fixed S_A included), keyed "<module>.<tensor>"."""
    return {f"{layer_name}.{tensor_name}": param
            for layer_name, layer in adapter_layers(model).items()
            for tensor_name, param in layer.adapter_parameters().items()}


def save_adapters(model: nn.Module, path: str | Path, write: bool = True) -> Path:
    """Write the adapters of `model` to the folder `path`, atomically (a crash never leaves half an adapter).

    With sharded (FSDP2) adapters every rank must call this, since gathering the shards is collective; pass
    `write=False` on all ranks but one.
    """
    config = get_adapter_config(model)
    tensors = {key: _full_tensor(value).detach().cpu().contiguous() for key, value in adapter_state_dict(model).items()}
    if not write:
        return Path(path)
    with atomic_directory(path) as staging:
        (staging / CONFIG_NAME).write_text(config.to_json())
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT, "method": config.method})
    return Path(path)


def load_adapters(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject the saved adapters into a base model (or fill a model injected with the same method) and load them.

    Every tensor must be present with its saved shape; a mismatch raises `ValueError` naming the tensor. With
    `trainable=False` (inference) all adapter tensors are frozen; with True the saved config's switches apply.
    """
    path = Path(path)
    for required in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path / required} not found: an adapter folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} (written by save_adapters)")
    config = AdapterConfig.from_file(path / CONFIG_NAME)
    if adapter_layers(model):
        current = get_adapter_config(model)
        if current.method != config.method:
            raise ValueError(f"{path}: adapter method {config.method!r} does not match the model's injected "
                             f"adapters {current.method!r}")
    else:
        inject_adapters(model, config)
    expected = adapter_state_dict(model)
    with safe_open(str(path / WEIGHTS_NAME), framework="pt") as stored:
        method = (stored.metadata() or {}).get("method")
        if method is not None and method != config.method:
            raise ValueError(f"{path / WEIGHTS_NAME}: tensors are for method {method!r} but {CONFIG_NAME} says "
                             f"{config.method!r}")
        stored_keys = set(stored.keys())
        missing = sorted(set(expected) - stored_keys)
        unexpected = sorted(stored_keys - set(expected))
        if missing:
            raise ValueError(f"{path / WEIGHTS_NAME}: missing adapter tensor {missing[0]!r}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}")
        if unexpected:
            raise ValueError(f"{path / WEIGHTS_NAME}: tensor {unexpected[0]!r} does not belong to any adapter of this "
                             f"model{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}; was it "
                             "saved from a different base model?")
        with torch.no_grad():
            for key, param in expected.items():
                value = stored.get_tensor(key)
                if value.shape != param.shape:
                    raise ValueError(f"{path / WEIGHTS_NAME}: tensor {key!r} has shape {tuple(value.shape)}, the "
                                     f"model expects {tuple(param.shape)}")
                param.copy_(value)
    if not trainable:
        for param in expected.values():
            param.requires_grad_(False)
    return model


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Gather a sharded (FSDP2 DTensor) parameter; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
