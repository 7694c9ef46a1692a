"""Reading Lightning checkpoints as data: their settings with `weights_only=True`, and a file that cannot be a
checkpoint (truncated by a kill or a full disk, or not a checkpoint at all) refused by path before anything loads it.
"""

from __future__ import annotations

import inspect
import io
import os
import zipfile
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.core.saving import load_hparams_from_tags_csv

from malora_lightning.atomic import atomic_write_bytes
from malora_lightning.offline_models import relative_record_note, same_model
from malora_lightning.values import user_path

# AdapterConfig fields that decide the adapter tensors' names and shapes: a checkpoint and the run must agree on them
ADAPTER_SHAPE_FIELDS = ("method", "rank", "shared_rank", "num_experts", "target_modules", "exclude_modules",
                        "layers_to_transform")


# beside a sharded checkpoint's shards (a folder) Lightning writes the rest of the state into this file
SHARDED_METADATA = "meta.pt"

# the checkpoint key of the layout its tensors have; a checkpoint without it has format 1
CHECKPOINT_FORMAT_KEY = "malora_lightning_format"
# 2: a mixture's lora_B is [N, r, m], each expert's B_t transposed (format 1: [N, m, r], B_t as it is)
CHECKPOINT_FORMAT = 2
# how a checkpoint's temporary file is named while it is written (`CheckedCheckpointIO.save_checkpoint`): without
# "ckpt_", which Lightning looks for in file names to number SLURM's auto-requeue checkpoints
CHECKPOINT_TEMPORARY_PREFIX = ".malora-checkpoint-save."
# the checkpoint key of the settings the module ran with (`MALoRAModule.settings_record`), which a subclass's
# hyperparameters need not name
SETTINGS_KEY = "malora_lightning_settings"


def is_remote(path: str | Path) -> bool:
    """Whether a checkpoint path is a URL ("s3://", "https://"), which Lightning reads through fsspec: no local file
    to check."""
    return "://" in str(path)


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, naming the path, a file that is not a complete `torch.save` archive, or a folder.

    `torch.save` writes a zip archive whose directory sits at its end, so a cut-off file fails here; torch's own
    error for it ("PytorchStreamReader failed reading zip archive") names no file. Every record is also checked
    against the CRC-32 the archive stores for it (`_check_records`): torch's reader never checks them, so a file
    damaged inside (bytes changed on a disk or in a copy) loaded its tensors with the damaged values, silently. A
    sharded checkpoint (a folder of shards and `meta.pt`) cannot be resumed: Lightning's sharded loading asks for
    every tensor of the model, the frozen base included, which an adapter-only checkpoint leaves out ("Missing key
    in checkpoint state_dict").
    """
    path = Path(user_path(path))  # as Lightning reads it (fsspec expands `~`)
    if path.is_dir() and (path / SHARDED_METADATA).is_file():
        raise IsADirectoryError(f"checkpoint {path} is a sharded checkpoint (a folder of shards), which cannot be "
                                "loaded: Lightning loads one into every tensor of the model, the frozen base "
                                "included, and malora's checkpoints hold the adapters only. Write checkpoint files "
                                "instead, as the FSDP recipes do: ModelParallelStrategy(save_distributed_checkpoint="
                                "False), FSDPStrategy(state_dict_type='full')")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint {path} is a folder: give a checkpoint file (a run writes its .ckpt files "
                                "into its checkpoints/ folder, e.g. checkpoints/last.ckpt)")
    if path.is_symlink() and not path.exists():  # `save_last="link"`'s last.ckpt, its checkpoint removed since
        raise FileNotFoundError(f"checkpoint {path} is a link to {os.readlink(path)}, which does not exist (removed "
                                "since the link was made): give the path of a checkpoint file (.ckpt)")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist: give the path of a checkpoint file (.ckpt)")
    try:
        with zipfile.ZipFile(path) as archive:
            _check_records(archive)
    except (zipfile.BadZipFile, NotImplementedError) as error:  # NotImplementedError: a damaged version field
        raise ValueError(f"checkpoint {path} is not a complete checkpoint file ({error}): it may have been cut off "
                         "while being written, or damaged since; use an earlier checkpoint, e.g. the one before "
                         "it") from error


def _check_records(archive: zipfile.ZipFile) -> None:
    """Read every record of a `torch.save` archive, which makes `zipfile` raise `BadZipFile` for one whose bytes do
    not match its stored CRC-32. A record stored with CRC 0 is not checked: `torch.save` writes 0 for every record
    when its CRC is switched off (`torch.serialization.set_crc32_options(False)`). A record whose directory entry is
    damaged (flags, compression or an offset that torch never writes) makes `zipfile` raise other errors, which are
    raised as `BadZipFile` naming the record."""
    for record in archive.infolist():
        if record.CRC == 0:
            continue
        try:
            with archive.open(record) as stream:
                while stream.read(1 << 24):
                    pass
        except (NotImplementedError, RuntimeError, OSError, EOFError, zlib.error) as error:
            raise zipfile.BadZipFile(f"record {record.filename!r} cannot be read: {type(error).__name__}: "
                                     f"{error}") from error


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's default checkpoint IO, except that a local file that is not a complete checkpoint is refused by
    its path before torch reads it, and a local file is written atomically (`MALoRAModule.setup` puts it in place of
    the default)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        """A local checkpoint as every file we write (`atomic_write_bytes`: a temporary file beside it, fsynced, then
        renamed over it). Lightning's staged it in the system's temporary folder, never fsynced, and moved it: where
        that folder is another file system (a tmpfs, a node-local disk beside shared storage) the move copied it over
        the old `last.ckpt`, so a kill during the copy left neither the old checkpoint nor the new one. A symbolic
        link at `path` is replaced by the rename, as Lightning's move replaced it, not written through:
        `ModelCheckpoint(save_last="link")` makes `last.ckpt` a link to another checkpoint, which a save of
        `last.ckpt` must not overwrite (removing the link first left no `last.ckpt` where the write was stopped). A
        leading `~` (a logger's `save_dir`, which Lightning leaves unexpanded in the checkpoint folder) is the home
        folder, where Lightning's own fsspec writes put it (`user_path`). The folder is made first, as Lightning's
        save makes it: under `AsyncCheckpointIO` (a background thread saving) `ModelCheckpoint(save_last="link")`
        links `last.ckpt` into it as soon as the save is handed over, and failed where the folder was not there yet.
        The temporary file's name holds no checkpoint's (`CHECKPOINT_TEMPORARY_PREFIX`): Lightning numbers SLURM's
        auto-requeue checkpoints by the digits of every file name in `default_root_dir` holding `hpc_ckpt_`, so the
        `.hpc_ckpt_2.ckpt.x7k2ab9q.tmp` that a kill during that save left made every later fit there resume from a
        `hpc_ckpt_2729.ckpt` that does not exist (and `--ckpt_path last` fail) instead of from `hpc_ckpt_1.ckpt`."""
        if storage_options is not None or is_remote(path):  # Lightning's refusal, or a URL written through fsspec
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        Path(user_path(path)).parent.mkdir(parents=True, exist_ok=True)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        atomic_write_bytes(user_path(path), buffer.getvalue(), replace_link=True,
                           temporary_prefix=CHECKPOINT_TEMPORARY_PREFIX)

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """A `weights_only` left unset (a plain Trainer's `fit`/`validate`/`test`/`predict(ckpt_path=...)`) is True,
        as every `malora` command passes it: Lightning's None unpickled an http(s) checkpoint with weights_only=False,
        and torch's a local one too under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, so a file ran the code it named. An
        explicit False (a trusted checkpoint holding objects) is the caller's choice."""
        # remote and missing paths: Lightning's errors
        if isinstance(path, (str, Path)) and Path(user_path(path)).exists():
            check_checkpoint_file(path)
        if len(args) < 2 and kwargs.get("weights_only") is None:  # args: map_location, weights_only
            kwargs["weights_only"] = True
        return super().load_checkpoint(path, *args, **kwargs)


def stored_settings(checkpoint: Mapping[str, Any]) -> Mapping[str, Any]:
    """The settings a checkpoint was trained with: its `SETTINGS_KEY` or, written before there was one, its
    hyperparameters (a subclass's may leave out the ones it fixes)."""
    return checkpoint.get(SETTINGS_KEY) or checkpoint.get("hyper_parameters") or {}


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint file `path` read as data (`weights_only=True`: nothing in the file runs) and memory-mapped (its
    tensors are read only where used), for its settings and format before the run loads it."""
    try:
        return torch.load(user_path(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - a truncated, foreign or pickled-object file: say which one
        raise ValueError(f"checkpoint {path} cannot be read as a malora checkpoint ({type(error).__name__}: "
                         f"{error})") from error


def without_instantiator(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`load_from_checkpoint`'s keyword arguments with Lightning's `_instantiator` set to None. A module or data
    module built by LightningCLI stores `_instantiator` among its hyperparameters, and Lightning then builds the
    loaded object through jsonargparse, which imports the module of any `class_path` a stored value names (say
    `adapter: {class_path: some_module.X}`): a file picking code to run. Given as None, it is dropped, and the class
    is called with the plain values, as for an object built in Python."""
    return {**kwargs, "_instantiator": None}


def passes_trust_remote_code(cls: type, path: str | Path | None, from_file: Mapping[str, Any] | None,
                             trust_remote_code: bool) -> bool:
    """Whether `load_from_checkpoint` (`MALoRAModule`'s, `MultiTaskDataModule`'s) passes the caller's
    `trust_remote_code` to `cls`: where the caller allows remote code, where `cls` names the argument, and where the
    stored hyperparameters (an `hparams_file`'s, `from_file`, which replace the checkpoint's) may hold it, so that the
    file never decides it. Otherwise `cls` takes it through `**kwargs` only, and the file holds none: then the class's
    own code decides, as a subclass that fixes it (``super().__init__(trust_remote_code=True, **kwargs)``) must, since
    a second value is a TypeError."""
    if trust_remote_code or "trust_remote_code" in inspect.signature(cls.__init__).parameters:
        return True
    if from_file is not None:
        return "trust_remote_code" in from_file
    if path is None:
        return True
    return "trust_remote_code" in (read_checkpoint(path).get(cls.CHECKPOINT_HYPER_PARAMS_KEY) or {})


def load_arguments(cls: type, checkpoint_path: Any, hparams_file: str | Path | None, trust_remote_code: bool,
                   kwargs: dict[str, Any]) -> tuple[str | Path | None, dict[str, Any]]:
    """What `MALoRAModule` and `MultiTaskDataModule`'s `load_from_checkpoint` do before Lightning reads the file:
    refuse a damaged local file by its path (`check_checkpoint_file`; a URL is Lightning's to read), read an
    `hparams_file` as data (`read_hparams_file`), pass the caller's `trust_remote_code` (`passes_trust_remote_code`)
    and import no class the stored hyperparameters name (`without_instantiator`). Returns the checkpoint's path (None
    for a file object) and the keyword arguments for Lightning's `load_from_checkpoint`."""
    named = checkpoint_path if isinstance(checkpoint_path, (str, Path)) else None
    if named is not None and not is_remote(named):
        check_checkpoint_file(named)
    from_file = read_hparams_file(hparams_file) if hparams_file is not None else None
    if passes_trust_remote_code(cls, named, from_file, trust_remote_code):
        kwargs = {**kwargs, "trust_remote_code": trust_remote_code}
    return named, without_instantiator(kwargs)


def read_hparams_file(path: str | Path) -> dict[str, Any]:
    """The hyperparameters of a `load_from_checkpoint(hparams_file=...)`, read as data, before Lightning reads the
    file again: Lightning reads YAML with `yaml.full_load`, which turns a tag such as `!!python/name:os.system` into a
    Python function passed to `__init__`, and takes a missing file for no hyperparameters at all (with a warning)."""
    path = Path(user_path(path))
    valid = "give a .yaml, .yml or .csv file of hyperparameters (Lightning's hparams.yaml)"
    if path.suffix.lower() not in (".yaml", ".yml", ".csv"):
        raise ValueError(f"hparams_file {path}: {valid}")
    if not path.is_file():
        raise FileNotFoundError(f"hparams_file {path} does not exist: {valid}")
    if path.suffix.lower() == ".csv":
        return load_hparams_from_tags_csv(path)  # values read with ast.literal_eval: literals only
    try:
        hyperparameters = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ValueError(f"hparams_file {path} is not plain YAML data ({reason}): it is read as data, so Python "
                         "tags (!!python/...) are refused") from error
    if not isinstance(hyperparameters, dict):
        raise ValueError(f"hparams_file {path} holds a {type(hyperparameters).__name__}, not a mapping of "
                         f"hyperparameter names to values: {valid}")
    return hyperparameters


def adapter_conflicts(stored: Mapping[str, Any], adapter: Any, fields: Iterable[str], prefix: str) -> list[str]:
    """``<prefix><field>: checkpoint <value>, this run <value>`` for each of ``fields`` that a checkpoint's stored
    adapter settings (``hyper_parameters["adapter"]``) set otherwise than the run's ``adapter``."""
    return [f"{prefix}{field}: checkpoint {stored[field]!r}, this run {getattr(adapter, field)!r}"
            for field in fields if field in stored and stored[field] != getattr(adapter, field)]


def stored_adapter_settings(stored: Mapping[str, Any]) -> Mapping[str, Any]:
    """The adapter settings among a checkpoint's `stored_settings`, as a dict."""
    adapter = stored.get("adapter") or {}
    # load_from_checkpoint(adapter=AdapterConfig(...)) merges the object in as it is
    return adapter.to_dict() if hasattr(adapter, "to_dict") else adapter


def computed_otherwise(stored: Mapping[str, Any], adapter: Any) -> list[str]:
    """``model.adapter.<field>: checkpoint <value>, this run <value>`` for each setting with which a checkpoint's
    adapter tensors (``stored``: its stored adapter settings, of the same shape as the run's ``adapter``) compute
    otherwise in this run: the scaling ``alpha`` (None is 2 * rank) and, for a mixture, ``top_k`` and
    ``renormalize_top_k``. They load, and score otherwise than the trained model did."""
    if "alpha" not in stored or "rank" not in stored:
        return []
    stored_alpha = 2.0 * stored["rank"] if stored["alpha"] is None else float(stored["alpha"])
    changed = [] if stored_alpha / stored["rank"] == adapter.scaling else [
        f"model.adapter.alpha: checkpoint {stored['alpha']!r}, this run {adapter.alpha!r}"]
    if adapter.is_routed:
        changed += adapter_conflicts(stored, adapter, ("top_k", "renormalize_top_k"), prefix="model.adapter.")
    return changed


def check_checkpoint_settings(stored: Mapping[str, Any], settings: Mapping[str, Any], adapter: Any,
                              path: str | Path | None, training_fields: Sequence[str] = ()) -> list[str]:
    """Compare a checkpoint's `stored_settings` with the run's module settings: `settings`, what the module runs with
    (`MALoRAModule.settings_record`), and `adapter`, its adapter settings (an `adapter_path` folder's, when it has
    one).

    The run's settings always apply: the checkpoint contributes tensors and training state only, never where the base
    comes from, never `trust_remote_code`. It must agree on the base model, on the adapter's shape
    (`ADAPTER_SHAPE_FIELDS`) and on `training_fields` (to resume a fit: which adapter tensors train, hence the
    optimizer state's shape), or this raises `ValueError` naming both values; returns the other settings that differ
    (the run's values apply to them), as `model.<name>`. A checkpoint's hyperparameters of a subclass that fixed its
    base (`stored_settings`, before `SETTINGS_KEY`) may not name the base; it is then not compared.
    """
    stored_adapter = stored_adapter_settings(stored)
    conflicts, differences = [], []
    if "model_name_or_path" in stored and "model_name_or_path" in settings \
            and not same_model(stored["model_name_or_path"], settings["model_name_or_path"]):
        conflicts.append(f"model.model_name_or_path: checkpoint {stored['model_name_or_path']!r}, this run "
                         f"{settings['model_name_or_path']!r}"
                         + relative_record_note(stored["model_name_or_path"], settings["model_name_or_path"]))
    conflicts += adapter_conflicts(stored_adapter, adapter, ADAPTER_SHAPE_FIELDS, prefix="model.adapter.")
    trained = adapter_conflicts(stored_adapter, adapter, training_fields, prefix="model.adapter.")
    if conflicts or trained:
        named = "the checkpoint" if path is None else f"checkpoint {path}"
        why = "" if not trained else (" (which adapter tensors train decides AdamW's parameter groups, and a resumed "
                                      "fit takes the checkpoint's optimizer state: resume with its values, or start "
                                      "a new fit from its adapters with adapter_path)")
        raise ValueError(f"{named} does not fit this run: " + "; ".join(conflicts + trained) + why + ". Settings "
                         "come from your config and flags (or the module's arguments) only, never from a "
                         "checkpoint: give the ones the checkpoint was trained with")
    checked = ADAPTER_SHAPE_FIELDS + tuple(training_fields)
    for key, value in stored.items():
        if key == "adapter":
            differences += [f"model.adapter.{field}" for field, stored_value in stored_adapter.items()
                            if field not in checked and stored_value != getattr(adapter, field, None)]
        elif key != "model_name_or_path" and key in settings and value != settings[key]:
            differences.append(f"model.{key}")
    return differences


def _format_1(path: str | Path | None) -> str:
    named = "the checkpoint" if path is None else f"checkpoint {path}"
    return (f"{named} holds the mixtures' lora_B as [N, m, r], as malora_lightning wrote them before checkpoint "
            f"format {CHECKPOINT_FORMAT}")


def _loaded_by_the_strategy(path: str | Path | None) -> ValueError:
    return ValueError(f"{_format_1(path)}, and this strategy loads a checkpoint's tensors itself, so they cannot be "
                      "converted: load it once without the strategy (MALoRAModule.load_from_checkpoint) and save its "
                      "adapters (save_adapters), then start from them with adapter_path")


def check_checkpoint_format(checkpoint: Mapping[str, Any], path: str | Path | None) -> None:
    """Refuse a checkpoint of a later format than this version reads (`CHECKPOINT_FORMAT`), naming both: only an
    earlier one is converted (`upgrade_checkpoint`), so a later one loaded its tensors as this version lays them out,
    whatever the writer meant, or failed on a key or shape naming neither the format nor the version."""
    found = checkpoint.get(CHECKPOINT_FORMAT_KEY, 1)
    if not isinstance(found, int) or isinstance(found, bool) or found > CHECKPOINT_FORMAT:
        named = "the checkpoint" if path is None else f"checkpoint {path}"
        raise ValueError(f"{named} has {CHECKPOINT_FORMAT_KEY}={found!r}, and this malora_lightning reads formats 1 "
                         f"to {CHECKPOINT_FORMAT}: it was written by a later version, so load it with that version "
                         "(or a later one)")


def check_strategy_loadable(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """For a mixture's checkpoint that a strategy will load itself (FSDPStrategy, ModelParallelStrategy: they copy the
    file's tensors into the module before `on_load_checkpoint` could convert them, and the copy's error names
    nothing), refuse one of an earlier format."""
    if checkpoint.get(CHECKPOINT_FORMAT_KEY, 1) < CHECKPOINT_FORMAT:
        raise _loaded_by_the_strategy(path)


def check_fsdp2_optimizer_layout(checkpoint: Mapping[str, Any], path: str | Path) -> None:
    """Refuse, for a fit resumed under `ModelParallelStrategy` (FSDP2), a checkpoint whose optimizer state a single
    process or DDP wrote. Torch keys that state by position in the optimizer's groups (0, 1, ... in group order);
    Lightning's FSDP2 loading takes the keys for positions among all the model's parameters, the frozen base
    included, as its own checkpoints store them, and failed on the first mismatched shape, naming nothing."""
    for optimizer_state in checkpoint.get("optimizer_states", []):
        positions = [index for group in optimizer_state.get("param_groups", []) for index in group["params"]]
        if positions and positions == list(range(len(positions))):
            raise ValueError(f"checkpoint {path} holds its optimizer state as one process or DDP writes it (by "
                             "position in the optimizer), and ModelParallelStrategy (FSDP2) reads it by position "
                             "among all the model's parameters, so AdamW's state cannot be restored: resume it with "
                             "the strategy that wrote it (DDP or one process), or start a new FSDP2 fit from its "
                             "adapters (the run's exported adapter folder, or save_adapters after "
                             "MALoRAModule.load_from_checkpoint) with adapter_path")


def upgrade_checkpoint(checkpoint: dict[str, Any], up_projections: Mapping[str, torch.Size],
                       optimizer_groups: Sequence[Sequence[str]] | None, path: str | Path | None) -> None:
    """Bring a checkpoint without `CHECKPOINT_FORMAT_KEY` to `CHECKPOINT_FORMAT` in place: transpose the mixtures'
    up-projections (their state-dict keys, with the module's shapes, `up_projections`) and, to resume a fit, their
    optimizer state too. A tensor that already has the module's shape is left as it is (a checkpoint built by hand
    from the module's state dict), unless that shape is square (N, r, r), where only the missing key tells.
    `optimizer_groups` names the parameters of each of the module's optimizer groups in order (torch keys their state
    by position in them), or is None when the optimizer state is not used (not fitting). A state the module's groups
    do not describe is refused, as is a checkpoint whose tensors the strategy loads itself (no `state_dict`): neither
    can be converted here. Marks the checkpoint converted, so a second call changes nothing."""

    def upgraded(value: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """[N, m, r] transposed to `shape` [N, r, m]; a square one is taken for format 1 as the checkpoint says."""
        square = value.shape == shape and shape[1] == shape[2]
        untransposed = value.dim() == 3 and value.shape != shape and value.shape == (shape[0], shape[2], shape[1])
        return value.transpose(1, 2).contiguous() if square or untransposed else value

    if checkpoint.get(CHECKPOINT_FORMAT_KEY, 1) >= CHECKPOINT_FORMAT:
        return
    if up_projections and "state_dict" not in checkpoint:
        raise _loaded_by_the_strategy(path)
    state_dict = checkpoint.get("state_dict", {})
    for key, shape in up_projections.items():
        if key in state_dict:
            state_dict[key] = upgraded(state_dict[key], shape)
    for optimizer_state in checkpoint.get("optimizer_states", []) if up_projections and optimizer_groups else []:
        stored_groups = [group["params"] for group in optimizer_state["param_groups"]]
        if [len(group) for group in stored_groups] != [len(group) for group in optimizer_groups]:
            raise ValueError(f"{_format_1(path)}, and its optimizer state is not the module's AdamW groups, so it "
                             "cannot be converted: resume it with the malora_lightning version that wrote it, or "
                             "start a new fit from its adapters (MALoRAModule.load_from_checkpoint converts them)")
        names = {index: name for stored, ours in zip(stored_groups, optimizer_groups)
                 for index, name in zip(stored, ours)}
        for index, state in optimizer_state["state"].items():
            if names.get(index) in up_projections:
                shape = up_projections[names[index]]
                for entry, value in state.items():  # AdamW's moments; its step count is not 3-D
                    if isinstance(value, torch.Tensor):
                        state[entry] = upgraded(value, shape)
    checkpoint[CHECKPOINT_FORMAT_KEY] = CHECKPOINT_FORMAT  # converted: a second call leaves it as it is
