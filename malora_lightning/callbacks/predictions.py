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

While predict runs, each rank also appends every batch's answers to a partial file of its own beside the output
(`partial_path`: `.predictions.jsonl.rank0.partial`), so that a run stopped by an error, a Ctrl-C, an out-of-memory
kill or a time limit keeps the answers it had produced. Its first line is a header (a JSON object with exactly the
keys of `PARTIAL_HEADER_KEYS`) that marks the file as ours; each further line is `{"dataloader_idx": ..., "index":
..., "prediction": {...}}`, the prediction being a line of the output, and sorting them by (dataloader_idx, index)
gives the output's order. A kill during a write can leave the last line incomplete. The file goes once the output is
written; the next predict run at the same place starts it afresh (it recomputes every answer, and no old one must
mix into its file), so move it first to keep its answers. Nothing resumes from it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import lightning as L
import torch.distributed as dist
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

from malora_lightning.atomic import atomic_write_text, check_writable, first_line
from malora_lightning.data.sampling import ShardIndex
from malora_lightning.run_paths import (OWN_FOLDER, refuse_foreign_file, refuse_on_any_rank, refuse_on_every_rank,
                                        run_directory)
from malora_lightning.values import user_path

PREDICTIONS_NAME = "predictions.jsonl"
# the first line of a partial file is a JSON object with exactly these keys, in order: it marks the file as ours
PARTIAL_HEADER_KEYS = ["malora_partial_predictions", "rank", "lines"]


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
# the keys of the lines of former versions, whose predictions files are ours too: of those before `row` (the
# input's row) was added
FORMER_PREDICTION_KEYS = (["task", "prompt", "prediction", "target", "correct"],)


def is_json_object_line(line: str, keys: list[str]) -> bool:
    """Whether `line` is a JSON object with exactly `keys`, in order."""
    try:
        row = json.loads(line)
    except ValueError:
        return False
    return isinstance(row, dict) and list(row) == keys


def refuse_foreign_predictions(path: Path) -> None:
    """Raise FileExistsError when `path` exists and is not a predictions file as `PredictionWriter` writes it. JSON
    lines have no header to mark the file as ours (a marker line would break every reader of the rows), so it is known
    by its content: every line a `Prediction`, or every line one of a former version's (`FORMER_PREDICTION_KEYS`),
    which a predict run in the same folder after an upgrade replaces as it did (an empty file, as zero predictions
    write, holds nothing to lose)."""
    def ours(predictions: Path) -> bool:
        try:
            with predictions.open(encoding="utf-8") as lines:
                first = next(lines, None)
                if first is None:
                    return True
                keys = next((keys for keys in (PREDICTION_KEYS, *FORMER_PREDICTION_KEYS)
                             if is_json_object_line(first, keys)), None)
                return keys is not None and all(is_json_object_line(line, keys) for line in lines)
        except UnicodeDecodeError:
            return False

    refuse_foreign_file(path, ours, "PredictionWriter",
                        f"not every line is a JSON object with exactly the keys {', '.join(PREDICTION_KEYS)}",
                        "write the predictions elsewhere (PredictionWriter(path=...), --predictions.path)")


def partial_path(output: Path, rank: int) -> Path:
    """Where rank `rank` keeps its answers for `output` while predict runs: a hidden file beside it (the same folder,
    so the same disk, and found where the output is looked for)."""
    return output.parent / f".{output.name}.rank{rank}.partial"


def is_partial_file(path: Path) -> bool:
    """Whether `path` is a plain file (not a link) whose first line is a partial file's header: one a
    `PredictionWriter` wrote, which a later run may replace."""
    return not path.is_symlink() and path.is_file() and is_json_object_line(first_line(path) or "",
                                                                            PARTIAL_HEADER_KEYS)


def refuse_foreign_partial(path: Path) -> None:
    """Raise FileExistsError when something that is not a partial file of ours is at `path`, a partial file's name."""
    if (path.exists() or path.is_symlink()) and not is_partial_file(path):
        raise FileExistsError(f"{path} was not written by PredictionWriter (its first line is not a JSON object with "
                              f"exactly the keys {', '.join(PARTIAL_HEADER_KEYS)}), and predict keeps its answers "
                              f"there while it runs: move it, {OWN_FOLDER}, or write the predictions elsewhere "
                              "(PredictionWriter(path=...), --predictions.path)")


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

    Each batch's answers also go, flushed, to the rank's partial file beside the output (module docstring): a killed
    process keeps every batch it completed there (a crash of the machine may lose the last few, not yet on disk), an
    exception says in a warning how many answers were kept and where, and a completed run removes it once the output
    is written. A partial file an earlier run left there is started afresh; anything else at its name is refused,
    as above.

    Args:
        path: the file to write the JSON lines to (a leading `~` is the home folder), such as
            `out/predictions.jsonl`; None: `predictions.jsonl` in the run folder. A folder is refused: a path ending
            in a path separator (`out/`) when the writer is built, an existing folder as any existing path.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="batch")
        # "" named the working directory (refused as a path that 'already exists'), a number failed in Path()
        if path is not None and not (isinstance(path, (str, Path)) and path != ""):
            raise ValueError(f"PredictionWriter path={path!r} is invalid: expected None (predictions.jsonl in the run "
                             "folder) or the path of a file to write")
        # pathlib drops a trailing separator: "out/", meant as a folder, wrote a file named out
        if isinstance(path, str) and path.endswith(("/", os.sep)):
            raise ValueError(f"PredictionWriter path={path!r} names a folder: expected the path of a file to write, "
                             f"such as {path + PREDICTIONS_NAME!r}, or None (predictions.jsonl in the run folder)")
        self.path = path
        self._answered: list[_Answered] = []
        self._output: Path | None = None
        self._partial: Path | None = None  # this rank's partial file while predict runs
        self._partial_file: TextIO | None = None
        self._kept = 0  # answers written to it

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Refuse a taken `path` before the model is built, on every rank alike (rank zero's view decides)."""
        super().setup(trainer, pl_module, stage)
        if stage != "predict" or self.path is None:
            return
        refuse_on_every_rank(trainer, self._refuse_taken_path)

    def _refuse_taken_path(self) -> None:
        """Refuse a `path` that exists, or whose folder cannot be written (a read-only mount, /proc): found only when
        the file is written, after every prompt was answered, the error named a temporary file."""
        path = Path(user_path(self.path))
        if path.is_dir():
            raise FileExistsError(f"PredictionWriter path {path} already exists and is a folder: give the path of a "
                                  f"file to write, such as {path / PREDICTIONS_NAME}, or leave path unset to write "
                                  "predictions.jsonl in the run folder")
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
            self._output = Path(user_path(self.path))
        self._start_partial(trainer)

    def _start_partial(self, trainer: L.Trainer) -> None:
        """Start this rank's partial file afresh, replacing one an earlier run left (atomically: a kill leaves the old
        file or the new header, so the name always holds a file recognisably ours) and refusing anything else.

        Written under `refuse_on_any_rank`: each rank writes to its own disk folder (node-local under multi-node
        DDP), and a rank whose write failed (a full or read-only disk) stopped alone, leaving the others waiting
        forever in `on_predict_end`'s gather. Every rank now stops with the failing rank's error; a rank whose own
        file was started removes it again in `on_exception` (it holds no answer)."""
        if self._partial_file is not None:  # a run this writer was not told had stopped (called by hand)
            self._partial_file.close()
            self._partial, self._partial_file = None, None
        partial = partial_path(self._output, trainer.global_rank)
        refuse_on_any_rank(trainer, lambda: refuse_foreign_partial(partial))
        header = dict(zip(PARTIAL_HEADER_KEYS, [
            f"answers kept for {self._output.name} while malora predict runs", trainer.global_rank,
            "dataloader_idx, index and prediction (a line of the output) on each further line; sorted by "
            "dataloader_idx then index they are in the output's order; the last may be incomplete"]))

        def start() -> None:
            atomic_write_text(partial, json.dumps(header, ensure_ascii=False) + "\n")
            self._partial, self._kept = partial, 0
            self._partial_file = partial.open("a", encoding="utf-8")

        refuse_on_any_rank(trainer, start)

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
        answered = [_Answered(dataloader_idx, index, answer) for index, answer in zip(indices, prediction)]
        self._answered.extend(answered)
        # flushed, not fsynced: what the process has written survives its kill; a crash of the machine is rarer
        self._partial_file.write("".join(json.dumps({"dataloader_idx": answer.dataloader_idx, "index": answer.index,
                                                     "prediction": dataclasses.asdict(answer.prediction)},
                                                    ensure_ascii=False) + "\n" for answer in answered))
        self._partial_file.flush()
        self._kept += len(answered)

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Rank zero writes every rank's answers; each rank removes its partial file only once that has succeeded."""
        answered = self._answered
        distributed = trainer.world_size > 1 and dist.is_available() and dist.is_initialized()
        if distributed:
            shards: list[list[_Answered] | None] = [None] * trainer.world_size
            dist.all_gather_object(shards, answered)
            answered = [answer for shard in shards for answer in shard]
        self._answered = []
        error: BaseException | None = None
        if trainer.is_global_zero:
            try:
                answered.sort(key=lambda answer: (answer.dataloader_idx, answer.index))
                atomic_write_text(self._output, "".join(json.dumps(dataclasses.asdict(answer.prediction),
                                                                   ensure_ascii=False) + "\n" for answer in answered))
            except BaseException as caught:  # raised below, once the other ranks know to keep their partial files
                error = caught
        failure = None if error is None else f"{type(error).__name__}: {error}"
        if distributed:
            failure = trainer.strategy.broadcast(failure)
        if error is not None:
            raise error
        if failure is not None:
            raise RuntimeError(f"PredictionWriter: rank zero failed to write {self._output} ({failure})")
        self._remove_partial()
        rank_zero_info(f"Wrote {len(answered)} predictions to {self._output}")

    def _remove_partial(self) -> None:
        """Close and remove this rank's partial file: the output now holds its answers."""
        if self._partial_file is not None:
            self._partial_file.close()
            self._partial.unlink(missing_ok=True)
        self._partial, self._partial_file = None, None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        """Keep this rank's partial file, naming it in a warning, when predict stops before its output is written;
        remove it when it holds no answer. Under a launcher that runs the ranks in subprocesses of this one
        (ddp_spawn), the ranks' own callbacks never see the exception: their partial files stay, unnamed."""
        if self._partial_file is None:
            return
        partial, kept = self._partial, self._kept
        self._partial_file.close()
        self._partial, self._partial_file = None, None
        if kept == 0:
            partial.unlink(missing_ok=True)
            return
        answers = f"{kept} answer{'' if kept == 1 else 's'}"
        warnings.warn(f"PredictionWriter: predict stopped ({type(exception).__name__}) before writing "
                      f"{self._output}; rank {trainer.global_rank} keeps what it answered so far ({answers}) in "
                      f"{partial}: after its header line, one JSON object a line with dataloader_idx, index and the "
                      f"prediction as {self._output.name} would have it. The next predict run there starts that file "
                      "afresh: move it first to keep them")
