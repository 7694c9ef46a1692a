"""Where a run writes its files: next to its checkpoints, or its root folder when nothing is checkpointed (without a
logger, `default_root_dir`: the current directory unless set, so the callbacks refuse to replace a file there that
they did not write)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import lightning as L


def run_directory(trainer: L.Trainer) -> Path:
    checkpoint_callback = trainer.checkpoint_callback
    if checkpoint_callback is not None and getattr(checkpoint_callback, "dirpath", None):
        return Path(checkpoint_callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir)


def refuse_on_every_rank(trainer: L.Trainer, check: Callable[[], None]) -> None:
    """Run `check` on rank zero, the rank that writes the run's files, and raise the `OSError` it raises (say
    `FileExistsError`, or `PermissionError` for a folder it cannot list) on every rank: a rank stopping alone would
    leave the others waiting in the broadcast."""
    refusal = None
    if trainer.is_global_zero:
        try:
            check()
        except OSError as error:
            refusal = (type(error), str(error))
    refusal = trainer.strategy.broadcast(refusal)
    if refusal is not None:
        error_type, message = refusal
        raise error_type(message)
