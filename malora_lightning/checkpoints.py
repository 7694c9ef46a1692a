"""Reading Lightning checkpoints as data: their settings with `weights_only=True`, and a file that cannot be a
checkpoint (truncated by a kill or a full disk, or not a checkpoint at all) refused by path before anything loads it.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins import TorchCheckpointIO


def check_checkpoint_file(path: str | Path) -> None:
    """Refuse, naming the path, a file that is not a complete `torch.save` archive.

    `torch.save` writes a zip archive whose directory sits at its end, so a cut-off file fails here by reading only
    that directory, without loading any tensor; torch's own error for it ("PytorchStreamReader failed reading zip
    archive") names no file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        with zipfile.ZipFile(path) as archive:
            archive.infolist()
    except zipfile.BadZipFile as error:
        raise ValueError(f"checkpoint {path} is not a complete checkpoint file ({error}): it may have been cut off "
                         "while being written; use an earlier checkpoint, e.g. the one before it") from error


class CheckedCheckpointIO(TorchCheckpointIO):
    """Lightning's default checkpoint IO, except that a local file that is not a complete checkpoint is refused by
    its path before torch reads it (`MALoRAModule.setup` puts it in place of the default)."""

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(path, (str, Path)) and Path(path).is_file():  # remote and missing paths: Lightning's errors
            check_checkpoint_file(path)
        return super().load_checkpoint(path, *args, **kwargs)


def checkpoint_hyperparameters(path: str | Path) -> dict[str, Any]:
    """The hyperparameters a checkpoint stores, read as data (`weights_only=True`: nothing in the file runs)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - a truncated, foreign or pickled-object file: say which one
        raise ValueError(f"checkpoint {path} cannot be read as a malora checkpoint ({type(error).__name__}: "
                         f"{error})") from error
    return checkpoint.get("hyper_parameters") or {}


def adapter_conflicts(stored: Mapping[str, Any], adapter: Any, fields: Iterable[str], prefix: str) -> list[str]:
    """``<prefix><field>: checkpoint <value>, this run <value>`` for each of ``fields`` that a checkpoint's stored
    adapter settings (``hyper_parameters["adapter"]``) set otherwise than the run's ``adapter``."""
    return [f"{prefix}{field}: checkpoint {stored[field]!r}, this run {getattr(adapter, field)!r}"
            for field in fields if field in stored and stored[field] != getattr(adapter, field)]
