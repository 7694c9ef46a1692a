"""Loading (optionally 4-bit/8-bit) base models and preparing them for adapter training.

Every model loaded here gets `disable_bnb_cpu_weight_packing` (`bnb_cpu.py`: why bitsandbytes needs it on CPU).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Literal, get_args

import torch
from torch import nn

from malora_lightning.adapters.bnb_cpu import disable_bnb_cpu_weight_packing, import_bitsandbytes
from malora_lightning.dtypes import dtypes_named
from malora_lightning.offline_models import recorded_model_name, resolve_model_path
from malora_lightning.values import check_switch

logger = logging.getLogger(__name__)

Quantization = Literal["nf4", "fp4", "int8"]
QUANTIZATION_MODES: tuple[str, ...] = get_args(Quantization)
FOUR_BIT_MODES: tuple[str, ...] = ("nf4", "fp4")  # those with a compute dtype and a packed storage dtype
# the name `load_base_model` was given ("offline:SmolLM2-135M-Instruct", a hub id, a folder by its absolute path:
# `recorded_model_name`): what an adapter folder records as its base, rather than the resolved cache path
# transformers keeps in `name_or_path`
BASE_NAME_ATTRIBUTE = "malora_base_model"
# the dtype settings' names: compute_dtype and dtype, and quant_storage (packed 4-bit bytes too)
DtypeName = Literal["bfloat16", "float16", "float32"]
StorageDtypeName = Literal["bfloat16", "float16", "float32", "uint8"]
_DTYPES = dtypes_named(*get_args(DtypeName))
_STORAGE_DTYPES = dtypes_named(*get_args(StorageDtypeName))


def as_dtype(value: str | torch.dtype, field: str) -> torch.dtype:
    """A dtype setting by name or as a torch.dtype, either checked against the field's dtypes (a Python caller's
    `torch.int8` compute dtype failed later inside bitsandbytes or transformers, naming no setting)."""
    allowed = _STORAGE_DTYPES if field == "quant_storage" else _DTYPES
    dtype = value if isinstance(value, torch.dtype) else allowed.get(value)
    if dtype not in allowed.values():
        raise ValueError(f"{field}={value!r} is invalid: expected one of {tuple(allowed)} or the torch dtypes "
                         "of those names")
    return dtype


def bnb_quantization_config(quantization: Quantization, compute_dtype: torch.dtype,
                            quant_storage: torch.dtype | None = None, double_quant: bool = True):
    """transformers' `BitsAndBytesConfig` for a quantization mode (QLoRA defaults: double quantization on)."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization in FOUR_BIT_MODES:
        extra = {} if quant_storage is None else {"bnb_4bit_quant_storage": quant_storage}
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=quantization,
                                  bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_use_double_quant=double_quant,
                                  **extra)
    raise ValueError(f"quantization={quantization!r} is invalid: expected None or one of {QUANTIZATION_MODES}")


def prepare_for_adapter_training(model: nn.Module, upcast: bool = True, enable_input_grads: bool = True) -> nn.Module:
    """Freeze the base, keep its unquantized weights (norms, embeddings, head) in float32, let gradients reach inputs.

    Mirrors PEFT's `prepare_model_for_kbit_training`. Upcasting only the norms is not enough: a float32 final norm
    feeds float32 hidden states to a bf16 output head, which fails without autocast.
    """
    for param in model.parameters():
        param.requires_grad_(False)
        if upcast and param.dtype in (torch.float16, torch.bfloat16) and type(param).__name__ != "Params4bit":
            param.data = param.data.float()
    if enable_input_grads and hasattr(model, "enable_input_require_grads"):
        # Needed for reentrant gradient checkpointing, where a block whose inputs need no grad gets none at all.
        model.enable_input_require_grads()
    disable_bnb_cpu_weight_packing(model)
    return model


def bnb_quantization_mode(quantization_config: dict | None) -> Quantization | None:
    """"nf4", "fp4" or "int8" for a bitsandbytes `quantization_config` (as stored in config.json), else None."""
    config = quantization_config or {}
    if config.get("quant_method") != "bitsandbytes":
        return None
    if config.get("load_in_8bit"):
        return "int8"
    return config.get("bnb_4bit_quant_type", "fp4") if config.get("load_in_4bit") else None


def base_model_name(model: nn.Module) -> str | None:
    """The name the base was loaded under (`load_base_model`), else transformers' `name_or_path`, else None."""
    name = getattr(model, BASE_NAME_ATTRIBUTE, None) or getattr(model, "name_or_path", None)
    return str(name) if name else None


def _quantization_config(model: nn.Module) -> dict | None:
    """The loaded base's `quantization_config`, as a dict (None: not quantized)."""
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    return config.to_dict() if config is not None and not isinstance(config, dict) else config


def base_quantization(model: nn.Module) -> Quantization | None:
    """How the loaded base is quantized by bitsandbytes (None: not quantized)."""
    return bnb_quantization_mode(_quantization_config(model))


def base_compute_dtype(model: nn.Module) -> str | None:
    """The dtype the loaded base's 4-bit layers compute in ("bfloat16", ...); None for another base."""
    config = _quantization_config(model)
    if bnb_quantization_mode(config) not in FOUR_BIT_MODES:
        return None
    return str(config.get("bnb_4bit_compute_dtype")).removeprefix("torch.")


def check_stored_quantization(path: str, quantization: Quantization | None,
                              quant_storage: torch.dtype | None = None) -> bool:
    """Whether the local folder `path` is stored quantized. Such a folder keeps its own scheme and packed storage
    dtype (transformers would load it as stored, with only a warning): asking for another one is an error naming
    both. An FSDP run needs the storage dtype it asks for."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return False  # a hub id: transformers reads the config itself
    stored = json.loads(config_file.read_text(encoding="utf-8")).get("quantization_config")
    stored_mode = bnb_quantization_mode(stored)
    if stored_mode is not None and stored_mode != quantization:
        raise ValueError(f"{config_file}: the model is stored quantized with bitsandbytes {stored_mode!r}, but "
                         f"quantization={quantization!r} was asked for; set quantization={stored_mode!r} (a quantized "
                         "folder cannot be re-quantized or de-quantized on loading)")
    stored_storage = str(stored.get("bnb_4bit_quant_storage", "uint8")) if stored_mode in FOUR_BIT_MODES else None
    asked = None if quant_storage is None else str(quant_storage).removeprefix("torch.")
    if stored_storage is not None and asked is not None and stored_storage != asked:
        raise ValueError(f"{config_file}: the model is stored in 4-bit packed as {stored_storage}, but quant_storage="
                         f"{asked!r} was asked for; set quant_storage={stored_storage!r} or leave it "
                         "unset (a quantized folder keeps its packed storage on loading)")
    return stored_mode is not None


def set_compute_dtype(model: nn.Module, compute_dtype: torch.dtype) -> None:
    """Make every 4-bit layer of `model` compute in `compute_dtype`, and its config say so. transformers loads a
    folder stored in 4-bit with the compute dtype it was saved with, whatever was asked; the compute dtype is no
    part of the stored weights, so the one asked for can apply."""
    bnb = import_bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.compute_dtype = compute_dtype
    model.config.quantization_config.bnb_4bit_compute_dtype = compute_dtype


def check_quant_storage_has_4bit(quantization: str | None, quant_storage: str | torch.dtype | None,
                                 owner: str = "") -> None:
    """Refuse a storage dtype for packed 4-bit weights without a 4-bit base: it would be accepted and do nothing.
    `owner` names what was given it ("MALoRAModule ")."""
    if quant_storage is not None and quantization not in FOUR_BIT_MODES:
        raise ValueError(f"{owner}quant_storage={quant_storage!r} is the storage dtype of packed 4-bit weights, and "
                         f"quantization is {quantization!r}: set quantization to one of {FOUR_BIT_MODES} or leave "
                         "quant_storage None")


def load_base_model(
    name_or_path: str,
    quantization: Quantization | None = None,
    compute_dtype: str | torch.dtype = "bfloat16",
    dtype: str | torch.dtype | None = None,
    quant_storage: str | torch.dtype | None = None,
    double_quant: bool = True,
    device_map: str | dict | None = None,
    attn_implementation: str | None = None,
    trust_remote_code: bool = False,
    prepare_for_training: bool = True,
    input_grads: bool = True,
) -> nn.Module:
    """Load a causal LM, optionally quantized by bitsandbytes, frozen and ready for `inject_adapters`.

    Args:
        name_or_path: a local folder, a hub id (downloads only if not cached), or an offline model such as
            "offline:SmolLM2-135M-Instruct" (see `offline_models`).
        quantization: None (no quantization), "nf4", "fp4" (4-bit) or "int8".
        compute_dtype: the dtype 4-bit layers compute in, also those of a folder stored in 4-bit (which keeps its
            own double_quant, and refuses another quant_storage).
        dtype: dtype the weights are loaded in; default compute_dtype when quantized, else float32. With
            `prepare_for_training` a quantized base's other weights are then kept in float32 (rounded through it).
        quant_storage: storage dtype of packed 4-bit weights; set it to the `dtype` of the other weights for FSDP.
        double_quant: quantize the 4-bit quantization constants too (QLoRA).
        device_map: passed to `from_pretrained` (e.g. "cpu", {"": 0}); None loads onto the CPU, also with a GPU
            visible (bitsandbytes would otherwise place a quantized model on the GPU by itself).
        attn_implementation: e.g. "sdpa" or "eager"; None lets transformers choose.
        trust_remote_code: only set it for code you trust.
        prepare_for_training: freeze, enable input gradients and, for quantized models, upcast the unquantized
            weights to float32 (`prepare_for_adapter_training`).
        input_grads: with `prepare_for_training`, make the embeddings' output require a gradient, which reentrant
            activation checkpointing needs; otherwise it only costs memory (`MALoRAModule` checkpoints
            non-reentrantly and turns it off).
    """
    from transformers import AutoModelForCausalLM

    if quantization is not None and quantization not in QUANTIZATION_MODES:
        raise ValueError(f"quantization={quantization!r} is invalid: expected None or one of {QUANTIZATION_MODES}")
    check_switch("trust_remote_code", trust_remote_code)
    check_quant_storage_has_4bit(quantization, quant_storage)
    compute = as_dtype(compute_dtype, "compute_dtype")
    weights_dtype = as_dtype(dtype, "dtype") if dtype is not None else (compute if quantization else torch.float32)
    kwargs: dict = {"dtype": weights_dtype, "trust_remote_code": trust_remote_code}
    storage = None if quant_storage is None else as_dtype(quant_storage, "quant_storage")
    path = resolve_model_path(name_or_path)
    stored_quantized = check_stored_quantization(path, quantization, storage)
    if quantization is not None:
        import_bitsandbytes()  # before transformers imports it
        if not stored_quantized:  # a stored folder loads with its own config (transformers warns it ignores ours)
            kwargs["quantization_config"] = bnb_quantization_config(quantization, compute, storage, double_quant)
    kwargs["device_map"] = device_map if device_map is not None else {"": "cpu"}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as error:
        raise OSError(f"could not load model {name_or_path!r} (resolved to {path!r}): {error}. Pass a local folder "
                      "with config.json and weights, a cached hub id, or an offline model like "
                      "'offline:SmolLM2-135M-Instruct'") from error
    except ImportError as error:  # an attention kernel whose package is missing (flash_attention_2 without flash-attn)
        if attn_implementation is None:
            raise
        raise ValueError(f"attn_implementation={attn_implementation!r} cannot load model {name_or_path!r}: {error} "
                         "Install that kernel's package (FlashAttention needs a CUDA GPU), or use 'sdpa', 'eager' or "
                         "None (transformers picks)") from error
    except ValueError as error:
        if trust_remote_code or "trust_remote_code" not in str(error):
            raise
        raise ValueError(f"model {name_or_path!r} needs model code of its own (its config names it in auto_map), "
                         "which runs only with trust_remote_code=True (the CLI: --model.trust_remote_code true); "
                         "set it only for code you trust") from error
    setattr(model, BASE_NAME_ATTRIBUTE, recorded_model_name(name_or_path))  # now, while a relative path names it
    if stored_quantized and quantization in FOUR_BIT_MODES:
        set_compute_dtype(model, compute)  # loaded with its saved compute dtype; ours applied the asked one
    if prepare_for_training:
        # float32 copies of the unquantized weights are for k-bit training; a bf16 base stays bf16
        prepare_for_adapter_training(model, upcast=quantization is not None, enable_input_grads=input_grads)
    else:
        disable_bnb_cpu_weight_packing(model)
    return model
