"""`PredictionWriter`: `malora predict` writes its answers to a JSON lines file, one row per prompt.

Each row is a `Prediction` (what `MALoRAModule.predict_step` returns): `task`, `prompt` (as the task or the predict file gives it,
before any chat template), `prediction`, `target` and `correct`; every row has all five keys, `target` and `correct`
are null where unknown. Rows follow the predict dataloaders (one per task) in order, each in its data order, also
under DDP, where each rank answers a shard and rank zero writes them all.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from malora_lightning.atomic import atomic_write_text
from malora_lightning.data.sampling import ShardIndex
from malora_lightning.run_paths import run_directory

PREDICTIONS_NAME = "predictions.jsonl"


@dataclasses.dataclass  # not frozen: Lightning's precision plugins rebuild the step's outputs field by field
class Prediction:
    """One answer of `predict_step`, and one JSON line of `PredictionWriter`'s file.

    `task` is None for a predict file's prompt without one; `prompt` is the text as the task or the file gives it
    (before any chat template); `target` is None when unknown, and `correct` (the task's answer check) is None unless
    both the task and the target are known.
    """

    task: str | None
    prompt: str
    prediction: str
    target: str | None
    correct: bool | None


@dataclasses.dataclass(frozen=True)
class _Answered:
    """A prediction with its place in the data: which dataloader, which example of it."""

    dataloader_idx: int
    index: int
    prediction: Prediction


class PredictionWriter(BasePredictionWriter):
    """Write every prediction of a predict run, atomically, to `path`, or to `predictions.jsonl` in the run folder
    (next to the checkpoints and the run report). Does nothing outside predict.

    The file in the run folder is this callback's own and is replaced by the next predict run there; a file at a
    `path` you give must not exist yet (a `FileExistsError` says so before anything is predicted), so that no file
    of yours is ever overwritten.

    Args:
        path: where to write the JSON lines; None: `predictions.jsonl` in the run folder.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.path = path
        self._answered: list[_Answered] = []
        self._output: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a taken `path` before the model is built, on every rank alike (rank zero's view decides)."""
        super().setup(trainer, pl_module, stage)
        if stage != "predict" or self.path is None:
            return
        if trainer.strategy.broadcast(Path(self.path).exists(), src=0):
            raise FileExistsError(f"PredictionWriter path {self.path} already exists and is not overwritten: "
                                  "remove it, give another path, or leave path unset to write predictions.jsonl in "
                                  "the run folder")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._answered = []
        # every rank resolves the folder (known once the checkpoint callback is set up): without a checkpoint folder
        # it comes from trainer.log_dir, a collective call
        self._output = Path(self.path) if self.path is not None else run_directory(trainer) / PREDICTIONS_NAME

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int) -> None:
        # the sampler's `ShardIndex`es: a padding example (not counted) has no prediction, `predict_step` dropped it
        indices = [index.index if isinstance(index, ShardIndex) else index for index in batch_indices or []
                   if not isinstance(index, ShardIndex) or index.counted]
        if len(indices) != len(prediction) or not (indices or batch_indices):
            raise ValueError(f"PredictionWriter needs one Prediction per counted example of a DataLoader batch: got "
                             f"{len(prediction)} for batch {batch_idx} of dataloader {dataloader_idx}, whose example "
                             f"indices are {batch_indices}")
        self._answered.extend(_Answered(dataloader_idx, index, row) for index, row in zip(indices, prediction))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        answered = self._answered
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            shards: list[list[_Answered] | None] = [None] * trainer.world_size
            dist.all_gather_object(shards, answered)
            answered = [row for shard in shards for row in shard]
        self._answered = []
        if not trainer.is_global_zero:
            return
        answered.sort(key=lambda row: (row.dataloader_idx, row.index))
        atomic_write_text(self._output, "".join(json.dumps(dataclasses.asdict(row.prediction), ensure_ascii=False)
                                                + "\n" for row in answered))
        rank_zero_info(f"Wrote {len(answered)} predictions to {self._output}")
