"""Where a run writes its files: next to its checkpoints, or its root folder when nothing is checkpointed (without a
logger, `default_root_dir`: the current directory unless set, so the callbacks refuse to replace a file there that
they did not write)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn

from malora_lightning.values import user_path

UNPORTABLE_CHARACTERS = '<>:"|?*'  # refused in file names by Windows
# Windows' device names, which it refuses as file names with any extension
RESERVED_NAMES = {"con", "prn", "aux", "nul", *(f"{port}{n}" for port in ("com", "lpt") for n in range(1, 10))}
OWN_FOLDER = ("give the run a folder of its own (Trainer(default_root_dir=...), a logger, or "
              "ModelCheckpoint(dirpath=...))")


def check_file_name(filename: str, setting: str) -> None:
    """Refuse, naming `setting`, a `filename` that is not one file's name in the run folder: an empty name, "." or
    ".." named the folder itself (an IsADirectoryError at the first write, after the fit) and a path left the run
    folder; what Windows refuses as a file name (a character of `UNPORTABLE_CHARACTERS` or a control character, a
    device name such as "con.md", a name ending in "." or a space) failed there at the first write."""
    if not (isinstance(filename, str) and filename.strip() and filename not in (".", "..")
            and Path(filename).name == filename and "\\" not in filename
            and not any(char in UNPORTABLE_CHARACTERS or ord(char) < 32 for char in filename)
            and filename.split(".")[0].strip().lower() not in RESERVED_NAMES and not filename.endswith((".", " "))):
        raise ValueError(f"{setting}={filename!r} is invalid: expected the name of a file in the run folder, like "
                         f"'report.md' (no folder, none of {UNPORTABLE_CHARACTERS} or control characters, no Windows "
                         "device name such as con or nul, not ending in '.' or a space)")


def run_directory(trainer: L.Trainer) -> Path:
    """The folder the run's checkpoints go to, else its log folder. A logger's `save_dir` given as `~/runs` stays
    unexpanded in the checkpoint folder and `log_dir` Lightning derives from it, while Lightning writes there through
    fsspec, which expands it: `user_path` puts our files beside its metrics and checkpoints, not in a folder `~`."""
    checkpoint_callback = trainer.checkpoint_callback
    if checkpoint_callback is not None and getattr(checkpoint_callback, "dirpath", None):
        return Path(user_path(checkpoint_callback.dirpath))
    return Path(user_path(trainer.log_dir or trainer.default_root_dir))


def refuse_on_every_rank(trainer: L.Trainer, check: Callable[[], None]) -> None:
    """Run `check` on rank zero, the rank that writes the run's files, and raise the `OSError` it raises (say
    `FileExistsError`, or `PermissionError` for a folder it cannot list) on every rank (`refuse_on_any_rank`)."""
    refuse_on_any_rank(trainer, lambda: check() if trainer.is_global_zero else None)


def refuse_on_any_rank(trainer: L.Trainer, check: Callable[[], None]) -> None:
    """Run `check` on every rank, each for a file of its own, and raise the lowest refusing rank's `OSError` on every
    rank alike: a rank stopping alone would leave the others waiting in the next collective."""
    refusal = None
    try:
        check()
    except OSError as error:
        refusal = (type(error), str(error))
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        refusals: list[tuple[type[OSError], str] | None] = [None] * trainer.world_size
        dist.all_gather_object(refusals, refusal)
        refusal = next((refused for refused in refusals if refused is not None), None)
    if refusal is not None:
        error_type, message = refusal
        raise error_type(message)


def our_json(path: Path, keys: list[str]) -> dict | None:
    """The JSON object `path` holds when its keys are exactly `keys`, in order (a file its writer wrote); None for
    any other file (absent, other JSON, not JSON, not UTF-8)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) and list(data) == keys else None


def refuse_foreign_file(path: Path, ours: Callable[[Path], bool], writer: str, mark: str, remedy: str) -> None:
    """Raise FileExistsError when `path` exists and `ours(path)` says `writer` did not write it; `mark` says how its
    files are known, `remedy` what else the user can do besides moving the file or giving the run its own folder."""
    if path.exists() and not ours(path):
        raise FileExistsError(f"{path} was not written by {writer} ({mark}) and this run would replace it: move "
                              f"it, {OWN_FOLDER}, or {remedy}")


def refuse_foreign_json(path: Path, keys: list[str], writer: str, remedy: str) -> None:
    """`refuse_foreign_file` for a JSON file `writer` writes, known as its own by holding an object with exactly
    `keys`, in order: a marker key would be missing from the files of earlier versions, which a rerun in the same
    folder has to replace."""
    refuse_foreign_file(path, lambda written: our_json(written, keys) is not None, writer,
                        f"it holds no JSON object with exactly the keys {', '.join(keys)}", remedy)


class RunFileWriter(Callback):
    """A callback that writes files into the run folder: `refuse_foreign_files` runs before each fit, trainer.validate
    and test does any work (not in `setup`: the checkpoint callback, which names the run folder, is set up after the
    others). It raises, on every rank alike (`refuse_on_every_rank`), for a file of the stage's that it did not write.
    """

    def refuse_foreign_files(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        raise NotImplementedError

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.refuse_foreign_files(trainer, pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # a fit's validations were checked at its start
            self.refuse_foreign_files(trainer, pl_module)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.refuse_foreign_files(trainer, pl_module)
