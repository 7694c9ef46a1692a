"""What the `malora` command prints: the library's own log lines, third-party notes known to be harmless kept off
the terminal, and a progress bar that reads sensibly under `max_steps` and writes progress lines off a terminal.

`quiet_known_notes` is the one place where output is silenced, and `quiet_evaluation_notes` around an evaluation's
run (validate, test, predict) for the notes harmless there alone. Each filter names the message, its category and
the module that issues it, so any other warning (from that module too) still shows. The CLI installs them;
importing the library changes no filter.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import lightning as L
import rich
from lightning.pytorch.callbacks import RichProgressBar
from lightning.pytorch.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.progress import Task, TaskID

# (message regex, category, issuing module regex), each with why it is harmless
KNOWN_HARMLESS_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Without tensorboard installed Lightning logs to CSV (metrics.csv in the run folder); nothing is lost.
    (r"Starting from v1\.9\.0, `tensorboardX` has been removed", UserWarning,
     r"lightning\.pytorch\.trainer\.connectors\.logger_connector\.logger_connector"),
    # Under bf16-mixed the summary counts 32-bit parameter bytes: only its "size (MB)" estimate is off.
    (r"Precision .+ is not supported by the model summary", UserWarning,
     r"lightning\.pytorch\.utilities\.model_summary\.model_summary"),
    # Lightning's own pytree helper (every evaluation) builds torch's LeafSpec, which torch >= 2.9 marks deprecated;
    # it still works, and the fix is Lightning's to make.
    (r"`isinstance\(treespec, LeafSpec\)` is deprecated", FutureWarning, r"lightning\.pytorch\.utilities\._pytree"),
)
# (message regex, category, issuing module regex) of warnings harmless in an evaluation alone (`malora validate`,
# `test`, `predict`), each with why
KNOWN_HARMLESS_EVALUATION_WARNINGS: tuple[tuple[str, type[Warning], str], ...] = (
    # Lightning restores every callback's state for an evaluation's --ckpt_path too, and each run has a version folder
    # of its own: ModelCheckpoint then says that its top-k tracking is not restored, which an evaluation, saving no
    # checkpoint, never uses. A fit resumed into a new folder still shows it: there its top-k tracking restarts.
    (r"The dirpath has changed from ", UserWarning, r"lightning\.pytorch\.callbacks\.model_checkpoint"),
)
# (logger, message regex) of lines logged (not warned) that say nothing the user can act on, each with why
KNOWN_HARMLESS_LOG_LINES: tuple[tuple[str, str], ...] = (
    # Lightning's advertisement for its hosted logger, on every Trainer start.
    ("lightning.pytorch.utilities.rank_zero", r"💡 Tip: For seamless cloud logging"),
    # SLURM's auto-requeue save (Lightning's `trainer.save_checkpoint` without `weights_only`): the checkpoint keeps
    # the optimiser and loop state a resume needs. Nothing to do with how checkpoints are read, always as data here.
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", r"`weights_only` was not set, defaulting to `False`"),
)


class _DropMessage(logging.Filter):
    def __init__(self, message: str) -> None:
        super().__init__()
        self.message = re.compile(message)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.message.match(record.getMessage())


_LOG_LINE_FILTERS = tuple((name, _DropMessage(message)) for name, message in KNOWN_HARMLESS_LOG_LINES)


def quiet_known_notes() -> None:
    """Hide the notes listed above (idempotent); called by the CLI before it builds the Trainer."""
    for message, category, module in KNOWN_HARMLESS_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, line_filter in _LOG_LINE_FILTERS:
        logging.getLogger(name).addFilter(line_filter)


@contextmanager
def quiet_evaluation_notes() -> Iterator[None]:
    """Hide the evaluation-only notes listed above while the block runs (the CLI's validate, test and predict); the
    filters before it are restored after it, so a fit later in the process shows them."""
    with warnings.catch_warnings():
        for message, category, module in KNOWN_HARMLESS_EVALUATION_WARNINGS:
            warnings.filterwarnings("ignore", message=message, category=category, module=module)
        yield


class _RankZeroOnly(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank_zero_only.rank == 0


class _StderrHandler(logging.StreamHandler):
    """Writes to the `sys.stderr` of the moment (as Python's last-resort handler does), not to the one there when it
    was made: a test's captured stream is closed once the test ends. It writes nothing while the program has
    logging of its own (`_programs_handlers`), decided at each line, not once when `show_library_logs` ran."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def handle(self, record: logging.LogRecord) -> bool:
        if _programs_handlers():
            return False
        return super().handle(record)


LIBRARY_LOGGER = logging.getLogger("malora_lightning")
logger = logging.getLogger(__name__)
_LIBRARY_HANDLER = _StderrHandler()  # stderr, as Lightning's own lines
_LIBRARY_HANDLER.addFilter(_RankZeroOnly())


def _programs_handlers() -> bool:
    """Whether a handler other than the library's own would print the library's lines: one on its logger or, as
    they propagate, on a logger above it (the root logger's, say `logging.basicConfig`)."""
    current: logging.Logger | None = LIBRARY_LOGGER
    while current is not None:
        if any(handler is not _LIBRARY_HANDLER for handler in current.handlers):
            return True
        current = current.parent if current.propagate else None
    return False


def show_library_logs() -> None:
    """Print the library's INFO lines (settings a resume applies, the adapter folder a fit exported, a task spec that
    replaces a registered task), on rank 0 only, as Lightning prints its own (idempotent). Without a handler Python
    shows warnings alone, so these never reached a command's user; importing the library configures nothing. Where
    the program has logging of its own (a handler on the root logger, say `logging.basicConfig`), its handlers print
    them, in its format, and this one writes nothing: with both, each line was printed twice. That is decided at each
    line (`_StderrHandler.handle`): a notebook that set up its logging in a cell after `main` had run, or a script
    after its first `main`, printed every later line of the library twice."""
    LIBRARY_LOGGER.setLevel(logging.INFO)
    if _LIBRARY_HANDLER not in LIBRARY_LOGGER.handlers:
        LIBRARY_LOGGER.addHandler(_LIBRARY_HANDLER)


def file_console_kwargs() -> dict[str, Any]:
    """Rich's console width where the output goes to a file or a pipe (a SLURM .out file, `> log`, `| tee`) and
    COLUMNS sets none: as wide as Lightning's table of evaluation results. Lightning lays that table out for
    `shutil.get_terminal_size` (120 columns off a terminal) and Rich drew it 80 wide (or as wide as a terminal on
    stdin), cutting the metric names: `malora test > log` read "test/add_2digit/…" for both acc and loss. On a
    terminal, or with COLUMNS set, Rich's own width (empty: nothing to change)."""
    console = Console()
    if console.is_terminal or console.is_jupyter or os.environ.get("COLUMNS"):
        return {}
    columns = shutil.get_terminal_size(fallback=(120, 30)).columns  # Lightning's `_EvaluationLoop._print_results`
    # its columns are at least 25 characters wide and fill `columns` at most; Rich adds 3 a column (padding and
    # border) and 1 at the edge
    return {"width": columns + 3 * (columns // 25) + 1}


def size_file_console() -> None:
    """Give Rich's console `file_console_kwargs` (called by the CLI before it builds the Trainer); `StepProgressBar`
    sets them too, as Lightning's Rich bar replaces the console when it starts."""
    kwargs = file_console_kwargs()
    if kwargs:
        rich.reconfigure(**kwargs)


def draws_live(console: Console) -> bool:
    """Whether Rich's live display (the progress bar) draws on `console` while it runs, by Rich's own test
    (`Live.refresh`): on a terminal that is not dumb, or in Jupyter where ipywidgets imports. Without ipywidgets a
    notebook's bar draws nothing at all (Rich warns 'install "ipywidgets" for Jupyter support'), so a fit in a
    notebook showed no progress from its start to its end."""
    if console.is_jupyter:
        try:
            import ipywidgets  # noqa: F401  (what Rich imports to draw in Jupyter)
        except ImportError:
            return False
        return True
    return console.is_terminal and not console.is_dumb_terminal


def _clock(seconds: float) -> str:
    """Whole seconds as the live bar shows them: "0:04:12"."""
    return str(timedelta(seconds=int(seconds)))


class StepProgressBar(RichProgressBar):
    """Lightning's Rich bar, whose description reads "Epoch 0/-2" when `max_steps` ends the run (Lightning sets
    `max_epochs=-1`): there it reads "Epoch 0, max_steps 160". A validation dataloader's bar is removed once the next
    one replaces it (`on_validation_batch_start`), so the bars are looked up by their Rich task id (`_bar`), not by
    their position in Rich's task list as Lightning's properties do. Its console is `file_console_kwargs`' width
    where the output is no terminal, unless `console_kwargs` sets one, and there a fit writes progress lines
    (`on_train_start`)."""

    def __init__(self, *args: Any, console_kwargs: dict[str, Any] | None = None, **kwargs: Any) -> None:
        # Lightning's bar builds the console Lightning also prints its result tables on, from these alone
        super().__init__(*args, console_kwargs={**file_console_kwargs(), **(console_kwargs or {})}, **kwargs)
        self._progress_lines = False  # whether this fit writes `_write_progress` lines (`on_train_start`)
        self._last_written_step = 0
        self._total_steps: int | None = None
        self._started_at = 0.0  # `time.monotonic()` and the step where this fit started (a resumed fit's, past 0)
        self._started_step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's, then whether this fit writes progress lines. Off a terminal (a SLURM .out file, `> log`,
        `| tee`, CI) Rich's live display draws nothing until it stops, so a redirected fit wrote no progress from
        start-up to its end (hours for a 7B recipe): there the bar writes a plain line through the library's logger
        every `log_every_n_steps` optimizer steps and after each validation (`_write_progress`), on global rank 0.
        On a terminal, or where Rich is told it is one (FORCE_COLOR, TTY_COMPATIBLE), the live bar is the progress
        and nothing is written. Where Rich draws is Rich's test (`draws_live`), so a dumb terminal gets lines, and so
        does a notebook without ipywidgets."""
        super().on_train_start(trainer, pl_module)
        console = self._console
        self._progress_lines = (trainer.is_global_zero and console is not None and trainer.log_every_n_steps > 0
                                and not draws_live(console))
        self._last_written_step = trainer.global_step  # a resumed fit wrote its step before it stopped
        total = trainer.estimated_stepping_batches  # max_steps, or what the epochs hold; inf where unknown
        self._total_steps = None if math.isinf(total) else int(total)
        self._started_at, self._started_step = time.monotonic(), trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        """Lightning's, and a progress line where an optimizer step that is a multiple of `log_every_n_steps` ends
        (a batch that only accumulates gradients leaves `global_step` where it was: one line a step)."""
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if self._progress_lines and step != self._last_written_step and step % trainer.log_every_n_steps == 0:
            self._last_written_step = step
            self._write_progress(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Lightning's, and a progress line after each validation of a fit (not its sanity check), with its scores."""
        super().on_validation_end(trainer, pl_module)
        if self._progress_lines and trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._write_progress(trainer, pl_module, ", after validation")

    def _write_progress(self, trainer: L.Trainer, pl_module: L.LightningModule, event: str = "") -> None:
        """One plain line: "step 40/160 (epoch 0), 0:01:02 elapsed, 0:03:06 left: train/loss 1.234, val/macro_acc
        0.4567", the metrics the bar shows (without the logger's version) to 4 significant digits. The times are the
        live bar's (a log file has no clock of its own): elapsed since this fit started (a resumed one: since it
        resumed), and what is left at the mean time per step so far, validations included, where the length is
        known."""
        step, total = trainer.global_step, self._total_steps
        elapsed = time.monotonic() - self._started_at
        times = f"{_clock(elapsed)} elapsed"
        if total is not None and step > self._started_step:
            times += f", {_clock(elapsed / (step - self._started_step) * max(total - step, 0))} left"
        metrics = {name: value for name, value in self.get_metrics(trainer, pl_module).items() if name != "v_num"}
        shown = ", ".join(f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
                          for name, value in metrics.items())
        logger.info("step %d%s (epoch %d)%s, %s%s", step, "" if total is None else f"/{total}",
                    trainer.current_epoch, event, times, f": {shown}" if shown else "")

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                  batch_idx: int, dataloader_idx: int = 0) -> None:
        """Lightning's, removing the bar of the dataloader it replaces, and its renders (`_forget_renders`). Lightning
        hides that bar and adds one for the next dataloader (its "TODO: remove old tasks"), so every validation of a
        fit left a hidden Rich task per validation dataloader, one per task of the data module (9 in the default
        recipe), in the display for the rest of the fit, and each refresh went through them all."""
        finished = self._validation_bar_id(trainer)
        super().on_validation_batch_start(trainer, pl_module, batch, batch_idx, dataloader_idx)
        if finished is not None and finished != self._validation_bar_id(trainer):
            self.progress.remove_task(finished)
            self._forget_renders(finished)

    def _forget_renders(self, bar_id: TaskID) -> None:
        """Drop a removed bar's last render from every column. Rich's columns keep the latest render of each bar they
        drew, by task id (`ProgressColumn._renderable_cache`, private; checked against Rich 15), and `remove_task`
        leaves it there: a fit kept one per column (about 1 KB) for every validation dataloader of every
        validation, for the rest of the fit."""
        for column in self.progress.columns:
            cache = getattr(column, "_renderable_cache", None)
            if isinstance(cache, dict):
                cache.pop(bar_id, None)

    @property
    def train_progress_bar(self) -> Task:
        return self._bar(self.train_progress_bar_id)

    @property
    def val_sanity_check_bar(self) -> Task:
        return self._bar(self.val_sanity_progress_bar_id)

    @property
    def val_progress_bar(self) -> Task:
        return self._bar(self.val_progress_bar_id)

    @property
    def test_progress_bar(self) -> Task:
        return self._bar(self.test_progress_bar_id)

    def _bar(self, bar_id: TaskID | None) -> Task:
        """The Rich task with this id. Lightning's properties index `progress.tasks` by the id, which is the task's
        position only until a bar is removed: after a validation they returned another bar or raised IndexError."""
        if self.progress is None or bar_id is None:
            raise RuntimeError("this progress bar has not been shown yet")
        return next(task for task in self.progress.tasks if task.id == bar_id)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """Lightning's, with the logger's version as text: the Rich bar prints every number with three decimals, so
        the version read "v_num: 0.000"."""
        items = super().get_metrics(trainer, pl_module)
        if "v_num" in items:
            items["v_num"] = str(items["v_num"])
        return items

    def _validation_bar_id(self, trainer: L.Trainer) -> TaskID | None:
        """The Rich task id of the current validation (or sanity check) dataloader's bar; None before its first."""
        return self.val_sanity_progress_bar_id if trainer.sanity_checking else self.val_progress_bar_id

    def _get_train_description(self, current_epoch: int) -> str:
        max_epochs, max_steps = self.trainer.max_epochs, self.trainer.max_steps
        if max_epochs is not None and max_epochs >= 0:
            description = f"Epoch {current_epoch}/{max_epochs - 1}"
        elif max_steps >= 0:
            description = f"Epoch {current_epoch}, max_steps {max_steps}"
        else:
            description = f"Epoch {current_epoch}"
        # padded to the validation bar's description like Lightning's, so the bars do not flicker
        return f"{description:{len(self.validation_description)}}"
