"""`PredictionWriter`: `malora predict` writes its answers to a JSON lines file, one row per prompt.

Each line is a `Prediction` (what `MALoRAModule.predict_step` returns): `row` (which input it answers), `task`,
`prompt` (as the task or the predict file gives it, before any chat template), `prediction`, `target` and `correct`;
every line has all six keys, `target` and `correct` are null where unknown.

Lines follow the predict dataloaders (one per task, then a predict file's prompts without a task) in order, each in
its data order, also under DDP, where each rank answers a shard and rank zero writes them all. That groups a predict
file's prompts by task rather than keeping the file's order, so `row` is the way back to the input: the prompt's data
row in the file (counted from 0 as `malora_lightning.data.prompts` defines it; sort by it for the file's order), or
without a predict file the example's row in its task's test split (`Example.row`, the row task errors name, also when
`max_eval_examples_per_task` keeps a subset): there `(task, row)` names the example.
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

from malora_lightning.atomic import atomic_write_text, check_writable
from malora_lightning.data.sampling import ShardIndex
from malora_lightning.run_paths import refuse_foreign_file, refuse_on_every_rank, run_directory

PREDICTIONS_NAME = "predictions.jsonl"


@dataclasses.dataclass  # not frozen: Lightning's precision plugins rebuild the step's outputs field by field
class Prediction:
    """One answer of `predict_step`, and one JSON line of `PredictionWriter`'s file.

    `row` is the predict file's data row, or the test split's row, that the prompt came from (module docstring), so
    that duplicate prompts still map back to their inputs; `task` is None for a predict file's prompt without one;
    `prompt` is the text as the task or the file gives it (before any chat template); `target` is None when unknown,
    and `correct` (the task's answer check) is None unless both the task and the target are known.
    """

    row: int | None  # None only for an example not made by `Task.examples` (see `EncodedExample.row`)
    task: str | None
    prompt: str
    prediction: str
    target: str | None
    correct: bool | None


PREDICTION_KEYS = [field.name for field in dataclasses.fields(Prediction)]


def is_prediction_line(line: str) -> bool:
    """Whether `line` is a JSON object with exactly `Prediction`'s keys, in order: a line `PredictionWriter` writes."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and list(row) == PREDICTION_KEYS


def refuse_foreign_predictions(path: Path) -> None:
    """Raise FileExistsError when `path` exists and is not a predictions file as `PredictionWriter` writes it. JSON
    lines have no header to mark the file as ours (a marker line would break every reader of the rows), so it is known
    by its content: every line a `Prediction` (an empty file, as zero predictions write, holds nothing to lose)."""
    def ours(predictions: Path) -> bool:
        try:
            with predictions.open(encoding="utf-8") as lines:
                return all(is_prediction_line(line) for line in lines)
        except UnicodeDecodeError:
            return False

    refuse_foreign_file(path, ours, "PredictionWriter",
                        f"not every line is a JSON object with exactly the keys {', '.join(PREDICTION_KEYS)}",
                        "write the predictions elsewhere (PredictionWriter(path=...), --predictions.path)")


@dataclasses.dataclass(frozen=True)
class _Answered:
    """A prediction with its place in the data: which dataloader, which example of it."""

    dataloader_idx: int
    index: int
    prediction: Prediction


class PredictionWriter(BasePredictionWriter):
    """Write every prediction of a predict run, atomically, to `path`, or to `predictions.jsonl` in the run folder
    (next to the checkpoints and the run report): one `Prediction` a line, grouped by predict dataloader, each naming
    its input's `row` (module docstring). Does nothing outside predict.

    The file in the run folder is replaced by the next predict run there, but only a file that a predict run wrote
    (every line a `Prediction`); a file at a `path` you give must not exist yet, and its folder must be writable.
    Either way a `FileExistsError` (or `PermissionError`) says so before anything is predicted, so that no file of
    yours is ever overwritten and no answer is lost.

    Args:
        path: where to write the JSON lines; None: `predictions.jsonl` in the run folder.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        # "" named the working directory (refused as a path that 'already exists'), a number failed in Path()
        if path is not None and not (isinstance(path, (str, Path)) and path != ""):
            raise ValueError(f"PredictionWriter path={path!r} is invalid: expected None (predictions.jsonl in the run "
                             "folder) or the path of a file to write")
        self.path = path
        self._answered: list[_Answered] = []
        self._output: Path | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a taken `path` before the model is built, on every rank alike (rank zero's view decides)."""
        super().setup(trainer, pl_module, stage)
        if stage != "predict" or self.path is None:
            return
        refuse_on_every_rank(trainer, self._refuse_taken_path)

    def _refuse_taken_path(self) -> None:
        """Refuse a `path` that exists, or whose folder cannot be written (a read-only mount, /proc): found only when
        the file is written, after every prompt was answered, the error named a temporary file."""
        path = Path(self.path)
        if path.exists():
            raise FileExistsError(f"PredictionWriter path {path} already exists and is not overwritten: "
                                  "remove it, give another path, or leave path unset to write predictions.jsonl in "
                                  "the run folder")
        # the writer creates missing folders: the nearest one that exists is where writing has to be allowed
        folder = next(parent for parent in path.absolute().parents if parent.exists())
        try:
            check_writable(folder)
        except OSError as error:
            raise PermissionError(f"PredictionWriter path {path} cannot be written: making a file in {folder} failed "
                                  f"({error.strerror or error}); give a path in a folder you can write, or leave "
                                  "path unset to write predictions.jsonl in the run folder") from error

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._answered = []
        # every rank resolves the folder (known once the checkpoint callback is set up): without a checkpoint folder
        # it comes from trainer.log_dir, a collective call
        if self.path is None:
            output = run_directory(trainer) / PREDICTIONS_NAME
            refuse_on_every_rank(trainer, lambda: refuse_foreign_predictions(output))
            self._output = output
        else:
            self._output = Path(self.path)

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
        self._answered.extend(_Answered(dataloader_idx, index, answer) for index, answer in zip(indices, prediction))

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        answered = self._answered
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            shards: list[list[_Answered] | None] = [None] * trainer.world_size
            dist.all_gather_object(shards, answered)
            answered = [answer for shard in shards for answer in shard]
        self._answered = []
        if not trainer.is_global_zero:
            return
        answered.sort(key=lambda answer: (answer.dataloader_idx, answer.index))
        atomic_write_text(self._output, "".join(json.dumps(dataclasses.asdict(answer.prediction),
                                                           ensure_ascii=False) + "\n" for answer in answered))
        rank_zero_info(f"Wrote {len(answered)} predictions to {self._output}")
