"""Where a run writes its files: next to its checkpoints, or its root folder when nothing is checkpointed."""

from __future__ import annotations

from pathlib import Path

import lightning as L


def run_directory(trainer: L.Trainer) -> Path:
    checkpoint_callback = trainer.checkpoint_callback
    if checkpoint_callback is not None and getattr(checkpoint_callback, "dirpath", None):
        return Path(checkpoint_callback.dirpath)
    return Path(trainer.log_dir or trainer.default_root_dir)
