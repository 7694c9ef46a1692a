"""Adapter export and import: `adapter_config.json` + `adapter_model.safetensors`, adapter tensors only."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from malora_lightning.adapters.config import AdapterConfig
from malora_lightning.adapters.inject import inject_adapters
from malora_lightning.adapters.model import adapter_layers, get_adapter_config
from malora_lightning.atomic import STAGING_FOLDER, recover_replace, replace_files

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
FORMAT = "malora_lightning"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (frozen ablation tensors such as a fixed S_A included), keyed "<module>.<tensor>"."""
    return {f"{layer_name}.{tensor_name}": param
            for layer_name, layer in adapter_layers(model).items()
            for tensor_name, param in layer.adapter_parameters().items()}


def save_adapters(model: nn.Module, path: str | Path, write: bool = True) -> Path:
    """Write the adapters of `model` into the folder `path`: `adapter_config.json` and `adapter_model.safetensors`.

    Only those two files are replaced; anything else in the folder (a user's notes, scores) stays. A folder that
    exists, holds files and is not an adapter folder is refused. The replace is recoverable: a crash at any point
    leaves the old adapter, the new one, or a committed staging folder that the next save or load completes
    (`atomic.replace_files`). With sharded (FSDP2) adapters every rank must call this, since gathering the shards
    is collective; pass `write=False` on all ranks but one.
    """
    config = get_adapter_config(model)
    tensors = {key: _full_tensor(value).detach().cpu().contiguous() for key, value in adapter_state_dict(model).items()}
    path = Path(path)
    if not write:
        return path
    _check_writable_adapter_folder(path)
    _remove_legacy_leftovers(path)
    with replace_files(path) as staging:
        (staging / CONFIG_NAME).write_text(config.to_json())
        save_file(tensors, str(staging / WEIGHTS_NAME), metadata={"format": FORMAT, "method": config.method})
    return path


def _check_writable_adapter_folder(path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save_adapters writes a folder: choose a folder path")
    if not path.is_dir():
        return
    others = sorted(child.name for child in path.iterdir() if child.name not in (*ADAPTER_FILES, STAGING_FOLDER))
    if others and not (path / CONFIG_NAME).is_file() and not (path / STAGING_FOLDER).is_dir():
        raise FileExistsError(f"{path} holds files that are not an adapter ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); save_adapters writes into a new or empty folder, "
                              f"or replaces {CONFIG_NAME} and {WEIGHTS_NAME} in an adapter folder: choose another path")


def _remove_legacy_leftovers(path: Path) -> None:
    """Folders that the earlier save scheme (a whole-folder swap beside `path`) left when killed mid-save: a staged
    new adapter moves into place if `path` is gone, and every leftover holding adapter files only is removed."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[A-Za-z0-9_]+\.(tmp|old)")
    if not path.parent.is_dir():
        return
    for leftover in sorted(path.parent.iterdir(), key=lambda p: p.name.endswith(".old")):
        if not (leftover.is_dir() and pattern.fullmatch(leftover.name)):
            continue
        if any(child.name not in ADAPTER_FILES for child in leftover.iterdir()):
            continue  # not ours: leave it
        complete = all((leftover / name).is_file() for name in ADAPTER_FILES)
        if not path.exists() and complete:
            leftover.rename(path)  # the earlier scheme died between its two renames: finish it
        else:
            shutil.rmtree(leftover)


def load_adapters(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject the saved adapters into a base model (or fill a model injected with the same method) and load them.

    Every tensor must be present with its saved shape; a mismatch raises `ValueError` naming the tensor. With
    `trainable=False` (inference) all adapter tensors are frozen; with True the saved config's switches apply.
    """
    path = Path(path)
    _remove_legacy_leftovers(path)
    recover_replace(path)  # a save that was killed mid-replace is completed (or dropped) first
    for required in ADAPTER_FILES:
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
    try:
        stored_file = safe_open(str(path / WEIGHTS_NAME), framework="pt")
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for empty/truncated/foreign files
        raise ValueError(f"{path / WEIGHTS_NAME}: not a readable safetensors file ({error})") from None
    with stored_file as stored:
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
                if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{path / WEIGHTS_NAME}: tensor {key!r} holds NaN or infinite values")
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
