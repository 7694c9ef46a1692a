"""Adapter folders in PEFT's format: `adapter_config.json`, `adapter_model.safetensors` and a `README.md` model card.

Tensor keys are PEFT's: "base_model.model.<module>.<tensor>.weight" (a submodule's own parameter, the router's
"router.weight", keeps its name). A LoRA folder is a PEFT LoRA folder: its `adapter_config.json` holds only keys
that PEFT's `LoraConfig` knows, so `PeftModel.from_pretrained` and transformers' `load_adapter` read it without a
warning. A MoLoRA or MALoRA folder uses the same conventions with `peft_type` "MOLORA" / "MALORA", which PEFT does
not have (it has no routed mixture tuner): the model card says so. Our exact `AdapterConfig` travels in the
safetensors header (`METADATA_CONFIG`), which PEFT ignores; `load_adapters` reads it back, and derives the config
from PEFT's keys for a LoRA folder that PEFT saved. The header also holds a SHA-256 of the tensors
(`METADATA_TENSORS_SHA256`): safetensors has no checksum, and a file damaged after it was written loaded its changed
values silently. A mixture's "lora_B" stores each expert's B_t as PEFT stores a
LoRA B, [m, r], stacked [N, m, r]; the layers hold them transposed (`layers.py`), and saving and loading transpose.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import re
import warnings
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Literal, Mapping, get_args

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import nn

from malora_lightning.adapters.config import ADAPTER_DTYPES, AdapterConfig, config_read_from
from malora_lightning.adapters.inject import (
    inject_adapters,
    is_supported_linear,
    linears_outside_the_language_model,
    moe_routing_linears,
)
from malora_lightning.adapters.model import adapter_layers, get_adapter_config, routed_layers, trained_tensor_names
from malora_lightning.adapters.quantization import (
    QUANTIZATION_MODES,
    DtypeName,
    Quantization,
    base_compute_dtype,
    base_model_name,
    base_quantization,
    load_base_model,
)
from malora_lightning.hardware import resolve_compute_dtype
from malora_lightning.offline_models import recorded_model_name
from malora_lightning.values import check_switch, is_finite_number, is_int, percent, user_path
from malora_lightning.atomic import STAGING_FOLDER, apply_default_modes, first_line, recover_replace, replace_files

logger = logging.getLogger(__name__)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CARD_NAME = "README.md"
ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)
# the first line of every model card we write: a README.md without it is the user's, and stays untouched
CARD_MARKER = "<!-- malora_lightning model card: save_adapters rewrites this file on every save -->"
PEFT_PREFIX = "base_model.model."
PEFT_TYPES: dict[str, str] = {"lora": "LORA", "molora": "MOLORA", "malora": "MALORA"}
METADATA_CONFIG = "malora_lightning.adapter_config"
METADATA_VERSION = "malora_lightning.version"
METADATA_BASE_QUANTIZATION = "malora_lightning.base_quantization"
METADATA_BASE_COMPUTE_DTYPE = "malora_lightning.base_compute_dtype"
METADATA_BASE_MODEL_TYPE = "malora_lightning.base_model_type"
METADATA_TENSORS_SHA256 = "malora_lightning.tensors_sha256"
# PEFT LoraConfig settings that change what the tensors mean; a PEFT folder using any of them cannot be loaded here
_UNSUPPORTED_PEFT_SETTINGS: dict[str, Any] = {
    "use_dora": False, "lora_bias": False, "bias": "none", "modules_to_save": None, "rank_pattern": {},
    "alpha_pattern": {}, "layer_replication": None, "target_parameters": None, "trainable_token_indices": None,
    "alora_invocation_tokens": None, "loftq_config": {}, "corda_config": None, "lora_ga_config": None,
    "use_qalora": False, "use_bdlora": None, "kasa_config": None, "monteclora_config": None, "arrow_config": None,
}
# the other PEFT LoraConfig settings (0.21): read here, or leaving the saved tensors' meaning as plain LoRA's (a
# training-time variant such as VeLoRA's backward, an init such as EVA's, bookkeeping); a setting outside both lists
# (a later PEFT's) is named in a warning
_PLAIN_PEFT_SETTINGS = frozenset({
    "task_type", "peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
    "r", "target_modules", "exclude_modules", "lora_alpha", "lora_dropout", "fan_in_fan_out", "use_rslora",
    "init_lora_weights", "layers_to_transform", "layers_pattern", "megatron_config", "megatron_core",
    "runtime_config", "eva_config", "velora_config", "qalora_group_size", "ensure_weight_tying",
})
# PEFT inits that leave the base weights as they are; the others (PiSSA, OLoRA, LoftQ, CorDA, ...) subtract the
# initial adapter from the base, which PEFT redoes on load, so the saved factors only fit a base changed that way
_BASE_PRESERVING_INITS = (True, False, "gaussian")
# peft.LoraConfig's lora_alpha default, which PEFT applies to a folder whose config leaves it out
PEFT_DEFAULT_LORA_ALPHA = 8


def library_version() -> str:
    try:
        return version("malora_lightning")
    except PackageNotFoundError:
        return "unknown"


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor (frozen ablation tensors such as a fixed S_A included), keyed "<module>.<tensor>"."""
    return {f"{layer_name}.{tensor_name}": param
            for layer_name, layer in adapter_layers(model).items()
            for tensor_name, param in layer.adapter_parameters().items()}


def routed_up_projections(model: nn.Module) -> frozenset[str]:
    """The `adapter_state_dict` keys of the mixtures' up-projections, which the layers hold transposed (B_t [r, m])
    and adapter folders, as format-1 checkpoints did, as they are ([m, r])."""
    return frozenset(f"{name}.lora_B" for name in routed_layers(model))


def peft_key(key: str) -> str:
    """"<module>.lora_A" -> "base_model.model.<module>.lora_A.weight"; "<module>.router.weight" keeps its suffix."""
    tensor_name = key.rsplit(".", 1)[-1]
    return f"{PEFT_PREFIX}{key}" + ("" if tensor_name in ("weight", "bias") else ".weight")


# ---------------------------------------------------------------------------------------------------- reading
@dataclass(frozen=True)
class AdapterFolder:
    """What an adapter folder says about itself."""

    path: Path
    config: AdapterConfig
    base_model: str | None  # `base_model_name_or_path`, as the folder records it
    base_quantization: str | None  # how the base was quantized when the adapter was saved (None: not, or unknown)
    layout: Literal["peft", "legacy"]  # "legacy": our format before PEFT's keys (no prefix, no ".weight")
    base_compute_dtype: str | None = None  # what the 4-bit base computed in when saved (None: not 4-bit, or unknown)
    base_recorded: bool = False  # whether the folder records the two above (ours since they exist: None is "not")
    base_model_type: str | None = None  # the base's `config.model_type` when saved ("llama"; None: unknown)
    tensors_sha256: str | None = None  # `tensors_sha256` of the weights when saved (None: not recorded, as by PEFT)

    def stored_key(self, key: str) -> str:
        return peft_key(key) if self.layout == "peft" else key


def read_adapter_folder(path: str | Path) -> AdapterFolder:
    """Read an adapter folder's config: ours (any method), a LoRA folder PEFT saved, or our earlier layout."""
    path = Path(user_path(path))
    recover_replace(path)  # a save that was killed mid-replace is completed (or dropped) first
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"adapter folder {path} is a file: give the folder that holds {CONFIG_NAME} and "
                                 f"{WEIGHTS_NAME} (written by save_adapters or by PEFT's save_pretrained)")
    if not path.is_dir():
        staged = _interrupted_legacy_save(path)
        hint = "" if staged is None else (f"; {staged} looks like the complete adapter that an interrupted save of an "
                                          f"earlier malora_lightning staged: rename it to {path.name} to load it")
        raise FileNotFoundError(f"adapter folder {path} not found (a folder written by save_adapters or by PEFT's "
                                f"save_pretrained){hint}")
    for required in ADAPTER_FILES:
        if not (path / required).is_file():
            raise FileNotFoundError(f"{path / required} not found: an adapter folder holds {CONFIG_NAME} and "
                                    f"{WEIGHTS_NAME} (written by save_adapters or by PEFT)")
    try:
        stored = json.loads((path / CONFIG_NAME).read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{path / CONFIG_NAME}: not valid JSON ({error})") from None
    except UnicodeDecodeError as error:  # raised bare, naming no file
        raise ValueError(f"{path / CONFIG_NAME}: not UTF-8 text (byte {error.start}: {error.reason}); JSON files are "
                         "UTF-8") from None
    if not isinstance(stored, dict):
        raise ValueError(f"{path / CONFIG_NAME}: expected a JSON object, found {type(stored).__name__}")
    metadata, keys = _weights_header(path / WEIGHTS_NAME)
    base = stored.get("base_model_name_or_path")
    if base is not None and not isinstance(base, str):  # a number or list failed later as an AttributeError
        raise ValueError(f"{path / CONFIG_NAME}: base_model_name_or_path={base!r:.80} is invalid: expected the base "
                         "model's folder or hub id, or null when it is not recorded")
    base = base if base is None or base.strip() else None  # blank: not recorded, as null (not a model named "")
    if METADATA_CONFIG in metadata:  # ours
        with config_read_from(f"{path / WEIGHTS_NAME} (its {METADATA_CONFIG} metadata)"):
            config = AdapterConfig.from_json(metadata[METADATA_CONFIG])
        if stored.get("peft_type") != PEFT_TYPES[config.method]:
            raise ValueError(f"{path / CONFIG_NAME}: peft_type {stored.get('peft_type')!r} does not match the "
                             f"{config.method} adapter in {WEIGHTS_NAME} (expected {PEFT_TYPES[config.method]!r})")
        _check_json_agrees_with_metadata(stored, config, path)
        _check_recorded_base(metadata, path / WEIGHTS_NAME)
        return AdapterFolder(path, config, base, metadata.get(METADATA_BASE_QUANTIZATION) or None, "peft",
                             metadata.get(METADATA_BASE_COMPUTE_DTYPE) or None,
                             base_recorded=METADATA_BASE_QUANTIZATION in metadata,
                             base_model_type=metadata.get(METADATA_BASE_MODEL_TYPE) or None,
                             tensors_sha256=metadata.get(METADATA_TENSORS_SHA256) or None)
    if "peft_type" in stored:
        return AdapterFolder(path, _config_from_peft(stored, keys, path), base, None, "peft")
    if "method" in stored:  # our layout before this format: the AdapterConfig itself, unprefixed keys
        with config_read_from(str(path / CONFIG_NAME)):
            return AdapterFolder(path, AdapterConfig.from_dict(stored), None, None, "legacy")
    raise ValueError(f"{path / CONFIG_NAME}: neither a PEFT adapter config (no 'peft_type') nor a malora_lightning one")


def tensors_sha256(keys: Iterable[str], read: Callable[[str], torch.Tensor]) -> str:
    """SHA-256 of the tensors `read(key)` gives for `keys`, in key order: each key, dtype, shape and the bytes of its
    values. One tensor is held at a time (`read` may load it from a file)."""
    digest = hashlib.sha256()
    for key in sorted(keys):
        tensor = read(key).detach().cpu().contiguous()
        digest.update(f"{key}\0{str(tensor.dtype).removeprefix('torch.')}\0{list(tensor.shape)}\0".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _check_tensors_sha256(stored: Any, weights: Path, expected: str) -> None:
    """Refuse a weights file whose tensors (`stored`, an open safetensors file) are not those it was saved with."""
    found = tensors_sha256(stored.keys(), stored.get_tensor)
    if found != expected:
        raise ValueError(f"{weights}: its tensors are not those it was saved with (their SHA-256 is {found}, the file "
                         f"records {expected} under {METADATA_TENSORS_SHA256}): it was damaged or changed since it "
                         "was written; load another copy, or export the adapters again from a checkpoint")


def _weights_header(path: Path) -> tuple[dict[str, str], list[str]]:
    try:
        with safe_open(str(path), framework="pt") as stored:
            return dict(stored.metadata() or {}), list(stored.keys())
    except Exception as error:  # noqa: BLE001 - safetensors raises its own error types for empty/truncated/foreign files
        raise ValueError(f"{path}: not a readable safetensors file ({error})") from None


def _check_plain_lora_settings(stored: dict[str, Any], path: Path) -> None:
    """Refuse an adapter_config.json that sets a PEFT setting changing what the tensors mean (DoRA, rank_pattern)."""
    for field, neutral in _UNSUPPORTED_PEFT_SETTINGS.items():
        value = stored.get(field, neutral)
        if value not in (neutral, None, {}, [], False):
            raise ValueError(f"{path / CONFIG_NAME}: {field}={value!r} is not supported (plain LoRA only: "
                             f"expected {neutral!r})")


def _check_json_agrees_with_metadata(stored: dict[str, Any], config: AdapterConfig, path: Path) -> None:
    """Refuse a folder of ours whose adapter_config.json was edited after the save so that it no longer describes
    the adapter its weights' metadata holds (which is what this library loads): PEFT reads the JSON, so the one folder
    would load as two different adapters (an edited lora_alpha rescaled the update in PEFT alone)."""
    _check_plain_lora_settings(stored, path)
    saved = {**_computing_settings(config), "use_rslora": False}
    for field, value in saved.items():
        if field in stored and stored[field] != value:
            raise ValueError(f"{path / CONFIG_NAME}: {field}={stored[field]!r}, but the adapter in {WEIGHTS_NAME} was "
                             f"saved with {field}={value!r} (its {METADATA_CONFIG} metadata, which this library "
                             "loads; PEFT reads the JSON): the JSON was edited after the save. Restore "
                             f"{field}={value!r}, or change the setting where the adapter is trained and save again")


def _check_recorded_base(metadata: Mapping[str, str], weights: Path) -> None:
    """Refuse a recorded base quantization or compute dtype that `load_adapted_model` could not load the base with
    (it failed in `load_base_model`, naming a setting the user never gave and not the folder)."""
    for key, valid in ((METADATA_BASE_QUANTIZATION, QUANTIZATION_MODES),
                       (METADATA_BASE_COMPUTE_DTYPE, get_args(DtypeName))):
        value = metadata.get(key) or None
        if value is not None and value not in valid:
            raise ValueError(f"{weights}: its {key} metadata is {value!r}, which is not one of {', '.join(valid)} "
                             "(or empty): the file was changed since save_adapters wrote it")


def _config_from_peft(stored: dict[str, Any], keys: list[str], path: Path) -> AdapterConfig:
    """Our LoRA config for a LoRA folder PEFT saved: the adapted modules are the ones its tensors name."""
    peft_type = stored["peft_type"]
    if peft_type != "LORA":
        raise ValueError(f"{path / CONFIG_NAME}: peft_type {peft_type!r} is not supported; load_adapters reads PEFT "
                         f"LoRA folders and malora_lightning folders ({', '.join(PEFT_TYPES.values())})")
    _check_plain_lora_settings(stored, path)
    unknown = [f"{field}={value!r}" for field, value in stored.items() if field not in _PLAIN_PEFT_SETTINGS
               and field not in _UNSUPPORTED_PEFT_SETTINGS and value not in (None, {}, [], False, "")]
    if unknown:
        warnings.warn(f"{path / CONFIG_NAME} sets {', '.join(unknown)}, which load_adapters does not know (a later "
                      "PEFT's setting?): loaded as plain LoRA, which is the adapter PEFT loads only if they leave "
                      "what the tensors mean unchanged; check against PEFT's outputs")
    init = stored.get("init_lora_weights", True)
    if init not in _BASE_PRESERVING_INITS:
        raise ValueError(f"{path / CONFIG_NAME}: init_lora_weights={init!r} is not supported: that init changes the "
                         "base weights, which PEFT redoes when it loads the folder, so its factors do not fit the "
                         "unchanged base load_adapters uses. Save it from PEFT as a plain LoRA "
                         "(save_pretrained(..., path_initial_model_for_weight_conversion=...)); valid: "
                         f"{', '.join(map(repr, _BASE_PRESERVING_INITS))}")
    factor = re.compile(rf"{re.escape(PEFT_PREFIX)}(.+)\.lora_([AB])\.weight")
    matches = {key: factor.fullmatch(key) for key in keys}
    modules = sorted(match.group(1) for match in matches.values() if match is not None and match.group(2) == "A")
    other_kinds = sorted(key for key, match in matches.items()
                         if match is None and _saved_base_weight_owner(key, modules) is None)
    if other_kinds:  # an embedding LoRA (lora_embedding_A), a variant's extra tensors (KaSA, VeRA, ...)
        raise ValueError(f"{path / WEIGHTS_NAME}: tensor {other_kinds[0]!r} is not a linear layer's lora_A or lora_B "
                         f"weight ({len(other_kinds)} such in all); load_adapters reads plain LoRA on linear layers")
    if not modules:
        raise ValueError(f"{path / WEIGHTS_NAME}: no '{PEFT_PREFIX}<module>.lora_A.weight' tensor; is this a PEFT "
                         "LoRA folder?")
    rank = stored.get("r")
    lora_alpha = stored.get("lora_alpha", PEFT_DEFAULT_LORA_ALPHA)
    dropout = stored.get("lora_dropout", 0.0)
    # checked by type, not converted: float() took true for 1 and "0.1" for 0.1, and failed on null naming no field
    for field, value, ok, valid in (("r", rank, is_int(rank), "an integer >= 1"),
                                    ("lora_alpha", lora_alpha, is_finite_number(lora_alpha), "a number > 0"),
                                    ("lora_dropout", dropout, is_finite_number(dropout), "a number in [0, 1)")):
        if not ok:
            raise ValueError(f"{path / CONFIG_NAME}: {field}={value!r} is invalid: expected {valid}")
    use_rslora = stored.get("use_rslora", False)
    if use_rslora is not None and not isinstance(use_rslora, bool):  # "false" is truthy: it scaled as rsLoRA
        raise ValueError(f"{path / CONFIG_NAME}: use_rslora={use_rslora!r} is invalid: expected true, false or null")
    # rsLoRA scales by lora_alpha / sqrt(r); ours by alpha / r. An r below 1 is AdapterConfig's to refuse, naming the
    # rank: sqrt of a negative r failed first, with "math domain error" alone
    alpha = lora_alpha * math.sqrt(rank) if use_rslora and rank >= 1 else lora_alpha
    with config_read_from(str(path / CONFIG_NAME)):
        return AdapterConfig(method="lora", rank=rank, alpha=float(alpha),
                             dropout=float(dropout), target_modules=modules)


def _saved_base_weight_owner(key: str, adapted: Collection[str]) -> str | None:
    """The adapted module whose base weight tensor ``key`` is (``<prefix><module>.base_layer.weight``), else None.
    PEFT saves that copy beside an adapted lm_head's LoRA (``save_embedding_layers="auto"``, its default)."""
    match = re.fullmatch(rf"{re.escape(PEFT_PREFIX)}(.+)\.base_layer\.weight", key)
    return match.group(1) if match is not None and match.group(1) in adapted else None


def _check_saved_base_weight(weights: Path, key: str, saved: torch.Tensor, layer: nn.Module) -> None:
    """PEFT loads a saved base weight over the model's; we never change a base weight, so the copy must be the model's
    own, compared in the narrower of the two dtypes (a float32 base loaded in bfloat16 rounds the same way)."""
    own = layer.base_layer.weight
    if not own.is_floating_point() or not saved.is_floating_point() or own.shape != saved.shape:
        same = False
    else:
        dtype = min(own.dtype, saved.dtype, key=lambda kind: torch.finfo(kind).bits)
        same = torch.equal(own.detach().to(dtype), saved.to(own.device, dtype))
    if not same:
        raise ValueError(f"{weights}: tensor {key!r} (shape {tuple(saved.shape)}, {saved.dtype}), the base weight PEFT "
                         f"saved beside that module's LoRA, differs from this model's (shape {tuple(own.shape)}, "
                         f"{own.dtype}): load_adapters never replaces base weights, so load the folder into the base "
                         "it was saved from, or save it from PEFT without that copy (save_embedding_layers=False)")


def load_adapters(model: nn.Module, path: str | Path, trainable: bool = False) -> nn.Module:
    """Inject the saved adapters into a base model (or fill a model injected with the same method) and load them.

    Reads our folders and LoRA folders that PEFT saved. Every tensor must be present with its saved shape; a
    mismatch raises `ValueError` naming the tensor. With `trainable=False` (inference) all adapter tensors are
    frozen; with True the saved config's switches apply.
    """
    check_switch("load_adapters trainable", trainable)  # "false" made every adapter tensor trainable
    folder = read_adapter_folder(path)
    _warn_of_another_base_family(folder, model)
    _warn_of_another_base_precision(folder, model)
    config = folder.config
    if adapter_layers(model):
        current = get_adapter_config(model)
        if current.method != config.method:
            raise ValueError(f"{folder.path}: adapter method {config.method!r} does not match the model's injected "
                             f"adapters {current.method!r}")
        saved, injected = _forward_settings(config), _forward_settings(current)
        differing = [f"{name} (folder {saved[name]!r}, model {injected[name]!r})"
                     for name in saved if saved[name] != injected[name]]
        if differing:
            raise ValueError(f"{folder.path}: the model's injected adapters compute differently from the saved ones: "
                             f"{'; '.join(differing)}. Load into the base model without adapters (load_adapters "
                             "injects the folder's), or inject with the folder's settings")
        other_settings = {name: (value, getattr(current, name)) for name, value in config.to_dict().items()
                          if value != getattr(current, name)}
    else:
        inject_adapters(model, config, keep_routing=_modules_with_tensors(folder, moe_routing_linears(model)))
        other_settings = {}
    expected = {folder.stored_key(key): param for key, param in adapter_state_dict(model).items()}
    transposed = {folder.stored_key(key) for key in routed_up_projections(model)}
    weights = folder.path / WEIGHTS_NAME
    named = f" (it names {folder.base_model!r})" if folder.base_model else ""
    other_base = f"; was it saved from a different base model{named}?"
    if other_settings:  # the model was injected before: its own settings may be what differs
        other_base = ("; the model's adapters were injected with other settings than the folder's (" +
                      ", ".join(f"{name}: folder {saved!r}, model {model_value!r}"
                                for name, (saved, model_value) in other_settings.items()) +
                      f"), or the folder was saved from a different base model{named}")
    with safe_open(str(weights), framework="pt") as stored:
        stored_keys = set(stored.keys())
        missing = sorted(set(expected) - stored_keys)
        unexpected = sorted(stored_keys - set(expected))
        outside = tuple(f"{_key_prefix(folder)}{name}." for name in linears_outside_the_language_model(model))
        skipped = [key for key in unexpected if key.startswith(outside)] if outside else []
        if skipped:  # adapters went into a multimodal base's vision tower too before they went into its text alone
            warnings.warn(f"{weights}: {len(skipped)} tensors of linear modules outside the text decoder (e.g. "
                          f"{skipped[0]!r}) are not loaded: adapters go into the language model alone, and text "
                          "never runs those modules", stacklevel=2)
            unexpected = sorted(set(unexpected) - set(skipped))
        layers = adapter_layers(model)
        base_copies = {key: owner for key in unexpected if (owner := _saved_base_weight_owner(key, layers)) is not None}
        unexpected = [key for key in unexpected if key not in base_copies]
        if missing:
            raise ValueError(f"{weights}: missing adapter tensor {missing[0]!r}"
                             f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}{other_base}")
        if unexpected:
            raise ValueError(f"{weights}: tensor {unexpected[0]!r} does not belong to any adapter of this model"
                             f"{f' (and {len(unexpected) - 1} more)' if len(unexpected) > 1 else ''}{other_base}")
        if folder.tensors_sha256 is not None:
            _check_tensors_sha256(stored, weights, folder.tensors_sha256)
        with torch.no_grad():
            for stored_key, param in expected.items():
                value = stored.get_tensor(stored_key)
                if not value.is_floating_point():  # copy_ would convert it silently
                    raise ValueError(f"{weights}: tensor {stored_key!r} is {value.dtype}, where adapter weights are "
                                     "floating point")
                if not bool(torch.isfinite(value).all()):
                    raise ValueError(f"{weights}: tensor {stored_key!r} holds NaN or infinite values")
                layer_value = value.transpose(1, 2) if stored_key in transposed and value.dim() == 3 else value
                if layer_value.shape != param.shape:
                    shape = param.transpose(1, 2).shape if stored_key in transposed else param.shape
                    raise ValueError(f"{weights}: tensor {stored_key!r} has shape {tuple(value.shape)}, the model "
                                     f"expects {tuple(shape)}{other_base}")
                param.copy_(layer_value)
        for key, owner in base_copies.items():
            _check_saved_base_weight(weights, key, stored.get_tensor(key), layers[owner])
    if not trainable:
        for param in expected.values():
            param.requires_grad_(False)
    return model


def _key_prefix(folder: AdapterFolder) -> str:
    """What the folder's tensor names put before a module's name."""
    return PEFT_PREFIX if folder.layout == "peft" else ""


def _modules_with_tensors(folder: AdapterFolder, names: Iterable[str]) -> list[str]:
    """Those of the module ``names`` that the folder holds adapter tensors for."""
    prefix = _key_prefix(folder)
    owners = set()
    for key in _weights_header(folder.path / WEIGHTS_NAME)[1]:
        parts = key.removeprefix(prefix).split(".")
        owners.update(".".join(parts[:end]) for end in range(1, len(parts)))
    return [name for name in names if name in owners]


def _forward_settings(config: AdapterConfig) -> dict[str, Any]:
    """The settings that change what loaded weights compute, or which of them train, without changing a shape
    (a shape mismatch is named by tensor); the routing ones where there is a router."""
    settings: dict[str, Any] = {"scaling": config.scaling}
    if config.is_routed:
        settings |= {"top_k": config.top_k, "renormalize_top_k": config.renormalize_top_k}
    if config.method == "malora":
        settings |= {"train_shared_A": config.train_shared_A, "train_P": config.train_P}
    else:
        settings["train_A"] = config.train_A
    return settings


SAVED = "saved"  # load_adapted_model's default: a setting as the folder records it


def _model_type(model: nn.Module) -> str | None:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", None) or None


def _warn_of_another_base_family(folder: AdapterFolder, model: nn.Module) -> None:
    """Warn when a folder records a base of another architecture than `model`'s: Llama's and Mistral's (or Qwen2's)
    modules share names, so a folder of one loads into another of the same sizes without a shape mismatch, and its
    adapters then compute on weights they were never trained with."""
    running = _model_type(model)
    if folder.base_model_type is None or running is None or folder.base_model_type == running:
        return
    warnings.warn(f"{folder.path} was trained on a {folder.base_model_type!r} base model"
                  f"{f' ({folder.base_model})' if folder.base_model else ''}, and this model is a {running!r}: its "
                  f"adapters load by module name and shape, and compute on weights they were not trained with. Load "
                  f"it into {folder.base_model or f'a {folder.base_model_type} model'}", stacklevel=3)


def _warn_of_another_base_precision(folder: AdapterFolder, model: nn.Module) -> None:
    """Warn when a folder records a base quantized or computing otherwise than `model`'s (a folder trained on an
    unquantized base, evaluated under the default recipe's nf4): the adapters then run on other base weights than
    they were trained with, and score differently, which nothing said."""
    if not folder.base_recorded:
        return
    quantization, run_compute = base_quantization(model), base_compute_dtype(model)
    saved_compute = folder.base_compute_dtype if folder.base_quantization is not None else None
    if folder.base_quantization == quantization and saved_compute in (None, run_compute):
        return

    def described(scheme: str | None, computing: str | None) -> str:
        return "unquantized" if scheme is None else f"{scheme}{f', computing in {computing}' if computing else ''}"

    advice = f"quantization={folder.base_quantization!r}" + (f" and compute_dtype={saved_compute!r}"
                                                              if saved_compute else "")
    warnings.warn(f"{folder.path} was trained on a base loaded {described(folder.base_quantization, saved_compute)}, "
                  f"and this run loads it {described(quantization, run_compute)}: the adapters run on other base "
                  f"weights than they were trained with, so they score differently from the trained model. To "
                  f"evaluate it as trained, set {advice}", stacklevel=3)


def load_adapted_model(path: str | Path, base_model: str | None = None,
                       quantization: Quantization | Literal["saved"] | None = SAVED,
                       compute_dtype: str = SAVED, dtype: str | None = None,
                       device_map: str | dict | None = None, attn_implementation: str | None = None,
                       trust_remote_code: bool = False) -> nn.Module:
    """The base model an adapter folder names, loaded (`load_base_model`) as it was trained (a quantized base's other
    weights in float32, as `prepare_for_adapter_training` keeps them), with the folder's adapters injected and
    loaded: frozen, in eval mode, ready for `generate`.

    Args:
        path: a folder written by `save_adapters`, or a LoRA folder PEFT saved.
        base_model: the base to load instead of the one the folder records (`base_model_name_or_path`).
        quantization: "saved" (the default) quantizes the base as it was when the adapter was saved; None loads it
            unquantized; "nf4", "fp4" or "int8" choose.
        compute_dtype: the dtype 4-bit layers compute in: "saved" (the default) the one they computed in when the
            adapter was saved, where the folder records it, else as "auto", which picks bfloat16 where the device
            runs it fast.
        dtype, device_map, attn_implementation, trust_remote_code: as in `load_base_model` (never taken from the
            folder).
    """
    folder = read_adapter_folder(path)
    base = base_model if base_model is not None else folder.base_model
    if base is None:
        raise ValueError(f"{folder.path / CONFIG_NAME} does not name its base model (base_model_name_or_path is "
                         "empty): pass base_model=")
    if quantization == SAVED:
        quantization = folder.base_quantization  # type: ignore[assignment]
    if compute_dtype == SAVED:
        compute_dtype = folder.base_compute_dtype or "auto"
    placements = list(device_map.values()) if isinstance(device_map, dict) else [device_map]
    on_cpu = all(placement in (None, "cpu") for placement in placements) or not torch.cuda.is_available()
    # prepared as for training (frozen, a quantized base's other weights upcast), so that the logits are the trained
    # module's; without the input gradients only training needs
    model = load_base_model(base, quantization=quantization, dtype=dtype, device_map=device_map,
                            compute_dtype=resolve_compute_dtype(compute_dtype, "cpu" if on_cpu else "cuda"),
                            attn_implementation=attn_implementation, trust_remote_code=trust_remote_code,
                            prepare_for_training=True, input_grads=False)
    load_adapters(model, folder.path)
    return model.eval()


# ---------------------------------------------------------------------------------------------------- writing
def save_adapters(model: nn.Module, path: str | Path, write: bool = True, base_model: str | None = None,
                  task_scores: Mapping[str, float | None] | None = None, origin: str | None = None,
                  sharded_root: nn.Module | None = None) -> Path:
    """Write the adapters of `model` into the folder `path` in PEFT's format, with a model card.

    `base_model` is recorded as `base_model_name_or_path` (default: the name the base was loaded under), a local
    folder by its absolute path (`recorded_model_name`);
    `task_scores` (task -> accuracy, e.g. the final validation of a fit) go into the model card, and so does `origin`,
    a sentence saying where adapters that were not trained as they are come from (`malora-task-export`).

    Only the adapter files are replaced; anything else in the folder (a user's notes, scores, a README.md we did not
    write) stays. A folder that exists, holds files and is not an adapter folder is refused. The replace is
    recoverable: a crash at any point leaves the old adapter, the new one, or a committed staging folder that the
    next save or load completes (`atomic.replace_files`). With sharded (FSDP1 or FSDP2) adapters every rank must
    call this, since gathering the shards is collective; pass `write=False` on all ranks but one, and under FSDP1 the
    module it wrapped whole as `sharded_root` (`gathered_adapter_state`).
    """
    check_switch("save_adapters write", write)  # write=0.0 on the writing rank, or "False" on every rank
    state = gathered_adapter_state(model, sharded_root)
    config = config_as_stored(get_adapter_config(model), state)
    transposed = routed_up_projections(model)
    tensors = {peft_key(key): value.transpose(1, 2).contiguous() if key in transposed else value
               for key, value in state.items()}
    path = Path(user_path(path))
    if not write:
        return path
    base = base_model if base_model is not None else base_model_name(model)
    base = None if base is None else recorded_model_name(base)
    quantization = base_quantization(model)
    metadata = {"format": "pt", METADATA_CONFIG: config.to_json(), METADATA_VERSION: library_version(),
                METADATA_BASE_QUANTIZATION: quantization or "",
                METADATA_BASE_COMPUTE_DTYPE: base_compute_dtype(model) or "",
                METADATA_BASE_MODEL_TYPE: _model_type(model) or "",
                METADATA_TENSORS_SHA256: tensors_sha256(tensors, tensors.__getitem__)}
    check_writable_adapter_folder(path)
    write_card = _card_is_ours(path / CARD_NAME)
    if not write_card:
        logger.warning("%s was not written by save_adapters: left as it is, without the model card",
                       path / CARD_NAME)
    with replace_files(path) as staging:
        (staging / CONFIG_NAME).write_text(json.dumps(peft_config(config, model, base), indent=2, sort_keys=True),
                                           encoding="utf-8")
        write_safetensors(staging / WEIGHTS_NAME, tensors, metadata)
        if write_card:
            card = model_card(config, base, quantization, _target_summary(model), state, trained_tensor_names(model),
                              task_scores, origin)
            (staging / CARD_NAME).write_text(card, encoding="utf-8")
        apply_default_modes(staging)  # safetensors writes its file owner-only
    return path


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """safetensors' file of `tensors`, with the header's metadata in key order: safetensors writes that map in a
    random order (a Rust HashMap), so two saves of the same tensors differed byte for byte and no file hash of a
    rerun matched. Held in memory once (as safetensors' `save` returns it), the tensors' bytes written as they are."""
    data = memoryview(save(tensors, metadata=metadata))
    length = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8:8 + length]))
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)  # the tensors' bytes start 8-byte aligned, as safetensors pads its header
    with open(path, "wb") as handle:
        handle.write(len(text).to_bytes(8, "little"))
        handle.write(text)
        handle.write(data[8 + length:])


def peft_config(config: AdapterConfig, model: nn.Module, base: str | None) -> dict[str, Any]:
    """`adapter_config.json`: PEFT's LoraConfig for LoRA; the same conventions, plus the mixture's settings, for
    MoLoRA and MALoRA (whose `peft_type` PEFT does not know)."""
    layers = adapter_layers(model)
    common = {
        "peft_type": PEFT_TYPES[config.method],
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        **_computing_settings(config),
        "lora_dropout": config.dropout,
        "target_modules": _peft_target_modules(model),
        "bias": "none",
        "fan_in_fan_out": any(not isinstance(layer.base_layer, nn.Linear) for layer in layers.values()),
        "modules_to_save": None,
    }
    if config.method == "lora":
        return {**common, "init_lora_weights": True, "use_rslora": False, "use_dora": False,
                "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}
    return {**common, "library": "malora_lightning", "library_version": library_version()}


def _computing_settings(config: AdapterConfig) -> dict[str, Any]:
    """The `adapter_config.json` fields that say what the saved tensors compute: PEFT's `r` and `lora_alpha`, and a
    mixture's own. `peft_config` writes them; `read_adapter_folder` refuses a folder of ours whose JSON says
    otherwise than its weights' metadata (`_check_json_agrees_with_metadata`)."""
    settings: dict[str, Any] = {"r": config.rank, "lora_alpha": _plain_number(config.scaling * config.rank)}
    if config.method != "lora":
        settings |= {"num_experts": config.num_experts, "top_k": config.top_k,
                     "renormalize_top_k": config.renormalize_top_k}
    if config.method == "malora":
        settings["shared_rank"] = config.shared_rank
    return settings


def _plain_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _adapted_and_linear_names(model: nn.Module) -> tuple[set[str], set[str]]:
    """(names of the adapted modules, names of every linear module with the adapted ones under their own name)."""
    adapted = set(adapter_layers(model))
    linear = {name.removesuffix(".base_layer") for name, module in model.named_modules() if is_supported_linear(module)}
    return adapted, linear


def _peft_target_modules(model: nn.Module) -> list[str]:
    """The adapted modules as PEFT targets: their suffixes when those select exactly them, else the full names."""
    adapted, linear = _adapted_and_linear_names(model)
    suffixes = {name.rsplit(".", 1)[-1] for name in adapted}
    selected = {name for name in linear if name.rsplit(".", 1)[-1] in suffixes}
    return sorted(suffixes) if selected == adapted else sorted(adapted)


def _target_summary(model: nn.Module) -> str:
    adapted, _ = _adapted_and_linear_names(model)
    suffixes: dict[str, int] = {}
    for name in sorted(adapted):
        suffix = name.rsplit(".", 1)[-1]
        suffixes[suffix] = suffixes.get(suffix, 0) + 1
    return ", ".join(f"{suffix} ×{count}" for suffix, count in suffixes.items()) + f" ({len(adapted)} modules)"


def model_card(config: AdapterConfig, base: str | None, quantization: str | None, targets: str,
               state: Mapping[str, torch.Tensor], trained: Collection[str],
               task_scores: Mapping[str, float | None] | None, origin: str | None = None) -> str:
    """The folder's README.md: what the adapter is, what it was trained on, and how to load it. `trained` names the
    `state` tensors that train in the model: `state` holds detached copies, which never require grad."""
    total = sum(tensor.numel() for tensor in state.values())
    trainable = sum(tensor.numel() for key, tensor in state.items() if key in trained)
    method = {"lora": f"LoRA, rank {config.rank}",
              "molora": f"MoLoRA: {config.num_experts} LoRA experts of rank {config.rank}, top-{config.top_k} routed",
              "malora": f"MALoRA: {config.num_experts} experts of rank r̄={config.rank} over a shared subspace "
                        f"S_A of rank d={config.shared_rank}, top-{config.top_k} routed"}[config.method]
    title = {"lora": "LoRA", "molora": "MoLoRA", "malora": "MALoRA"}[config.method]
    lines = [CARD_MARKER, f"# {title} adapter{f' for {base}' if base else ''}", "",
             f"Written by malora_lightning {library_version()} (`save_adapters`).", "",
             *([origin, ""] if origin else []),
             "| | |", "|---|---|",
             f"| method | {method}, scale {config.scaling:g}, dropout {config.dropout:g} |",
             f"| base model | {base or 'not recorded'}{f' ({quantization} when the adapter was saved)' if quantization else ''} |",
             f"| target modules | {targets} |",
             f"| adapter parameters | {total:,} ({trainable:,} trainable when saved) |", ""]
    if task_scores:
        lines += ["## Tasks", "", "Final validation accuracy per task:", "", "| task | accuracy |", "|---|---|"]
        lines += [f"| {task} | {'–' if score is None else f'{percent(score)} %'} |" for task, score in task_scores.items()]
        lines.append("")
    lines += ["## Loading", "", "```python", "from malora_lightning import load_adapted_model",
              "model = load_adapted_model(\"path/to/this/folder\")  # the base named above, adapters loaded, eval mode",
              "```", ""]
    if config.method == "lora":
        lines += ["This is a PEFT LoRA folder: `peft.PeftModel.from_pretrained(base, folder)` and transformers' "
                  "`model.load_adapter(folder)` load it too.", ""]
    else:
        lines += [f"PEFT cannot load this folder: its `peft_type` {PEFT_TYPES[config.method]!r} is not one of PEFT's "
                  "adapter types (PEFT has no routed mixture of LoRA experts), so `PeftModel.from_pretrained` stops "
                  f"with `KeyError: '{PEFT_TYPES[config.method]}'`. Load it with malora_lightning, or collapse the "
                  "mixture for one task into a plain LoRA that PEFT loads (the task-specialised merge, README).", ""]
    return "\n".join(lines)


def _card_is_ours(path: Path) -> bool:
    return first_line(path) in (None, CARD_MARKER)


def config_as_stored(config: AdapterConfig, state: Mapping[str, torch.Tensor]) -> AdapterConfig:
    """`config` with the `adapter_dtype` the adapter tensors have: a model cast after injection (Lightning's
    `bf16-true` casts the whole module) holds adapters of another dtype than its config says, and a load must make
    them in that dtype to compute as the saved model did."""
    names = {dtype: name for name, dtype in ADAPTER_DTYPES.items()}
    dtypes = {tensor.dtype for tensor in state.values()}
    if len(dtypes) == 1 and (dtype := dtypes.pop()) in names:
        return dataclasses.replace(config, adapter_dtype=names[dtype])
    return config


def check_writable_adapter_folder(path: Path) -> None:
    """Refuse a `save_adapters` target that is a file or a folder of other files, before any work is done (the
    export callback checks its folder before training)."""
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} is a file; save_adapters writes a folder: choose a folder path")
    if not path.is_dir():
        return
    others = sorted(child.name for child in path.iterdir()
                    if child.name not in (*ADAPTER_FILES, CARD_NAME, STAGING_FOLDER))
    if others and not (path / CONFIG_NAME).is_file() and not (path / STAGING_FOLDER).is_dir():
        raise FileExistsError(f"{path} holds files that are not an adapter ({', '.join(others[:3])}"
                              f"{', ...' if len(others) > 3 else ''}); save_adapters writes into a new or empty folder, "
                              f"or replaces {CONFIG_NAME} and {WEIGHTS_NAME} in an adapter folder: choose another path")


def _interrupted_legacy_save(path: Path) -> Path | None:
    """The staged folder that the save scheme before 7056a26 (a whole-folder swap beside `path`, named as
    `tempfile.mkdtemp` names) left when killed between its renames, if it holds a complete adapter. Only named in an
    error: a load never moves or deletes a folder it cannot prove it wrote."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    if not path.parent.is_dir():
        return None
    for candidate in sorted(path.parent.iterdir()):
        if candidate.is_dir() and pattern.fullmatch(candidate.name) \
                and sorted(child.name for child in candidate.iterdir()) == sorted(ADAPTER_FILES):
            return candidate
    return None


def gathered_adapter_state(model: nn.Module, sharded_root: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """`adapter_state_dict` with every tensor whole, contiguous and a copy on the CPU: FSDP2's DTensors gathered,
    FSDP1's flat shards unsharded for the copy (wrapped by FSDP1, an adapter tensor is a view of this rank's shard,
    and empty on most ranks), one FSDP1 unit at a time, so that the model is never whole on one device (a 4-bit base
    as large as the GPU included). Both are collective: every rank must call this.

    `sharded_root` is the module FSDP1 wrapped whole when that is an ancestor of `model` (Lightning's
    `trainer.strategy.model`, which wraps the LightningModule): its own unit holds the adapters outside the wrapped
    classes (all of them without an auto_wrap_policy; an adapted lm_head), which unsharding `model` alone would leave
    as this rank's shard."""
    from torch.distributed.fsdp import FullyShardedDataParallel  # imported on use: most saves never shard

    root = model if sharded_root is None else sharded_root
    spans = [FullyShardedDataParallel.summon_full_params(unit, recurse=False, writeback=False)
             for unit in root.modules() if isinstance(unit, FullyShardedDataParallel)] or [contextlib.nullcontext()]
    state: dict[str, torch.Tensor] = {}
    for span in spans:  # inside a unit's span its own parameters are whole; every other unit's stay flat (1-D) shards
        with span:
            state.update({key: _full_tensor(value).detach().to("cpu", copy=True).contiguous()
                          for key, value in adapter_state_dict(model).items() if key not in state and value.dim() > 1})
    tensors = adapter_state_dict(model)
    for key, value in tensors.items():
        if key not in state:  # every adapter tensor is a matrix or a stack of them
            raise ValueError(f"adapter tensor {key!r} is this rank's shard of an FSDP1 flat parameter (shape "
                             f"{tuple(value.shape)}), not the whole tensor: pass the module FSDP1 wrapped whole as "
                             "sharded_root (under Lightning, trainer.strategy.model)")
    return {key: state[key] for key in tensors}


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """Gather a sharded (FSDP2 DTensor) parameter; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
