"""What the `malora` command keeps off the terminal, what it still shows, and its progress bar."""

import contextlib
import logging
import re
import subprocess
import sys
import warnings
from collections.abc import Iterator
from types import SimpleNamespace

import pytest

from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.rank_zero import rank_zero_only

import malora_lightning.terminal
from malora_lightning.callbacks import PerTaskMetrics
from malora_lightning.cli import MALoRACLI
from malora_lightning.terminal import (
    KNOWN_HARMLESS_WARNINGS,
    LIBRARY_LOGGER,
    StepProgressBar,
    quiet_known_notes,
    show_library_logs,
    size_file_console,
)
from tests.test_module import make_data, make_module, make_trainer

# what each filtered note looks like as Lightning issues it: (message, category, issuing module)
ISSUED = [
    ("Starting from v1.9.0, `tensorboardX` has been removed as a dependency of the `lightning.pytorch` package",
     UserWarning, "lightning.pytorch.trainer.connectors.logger_connector.logger_connector"),
    ("Precision bf16-mixed is not supported by the model summary.  Estimated model size in MB will not be accurate.",
     UserWarning, "lightning.pytorch.utilities.model_summary.model_summary"),
    ("`isinstance(treespec, LeafSpec)` is deprecated, use `isinstance(treespec, TreeSpec) and treespec.is_leaf()` "
     "instead.", FutureWarning, "lightning.pytorch.utilities._pytree"),
]


def issue(message: str, category: type[Warning], module: str) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notes()
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)
    return caught


def test_every_filter_has_an_issued_example():
    assert len(ISSUED) == len(KNOWN_HARMLESS_WARNINGS)


@pytest.mark.parametrize("message, category, module", ISSUED)
def test_known_harmless_warnings_are_filtered(message, category, module):
    assert issue(message, category, module) == []


@pytest.mark.parametrize("message, category, module", [
    ("something else went wrong", UserWarning, "lightning.pytorch.utilities.model_summary.model_summary"),
    # a known message from another module, or with another category, is not the known note
    (ISSUED[0][0], UserWarning, "my_project.training"),
    (ISSUED[2][0], DeprecationWarning, "lightning.pytorch.utilities._pytree"),
])
def test_unrelated_warnings_still_show(message, category, module):
    assert [str(caught.message) for caught in issue(message, category, module)] == [message]


class RunOnly(MALoRACLI):
    """MALoRACLI's `_run_subcommand` alone: no parsing, trainer, model or log folder."""

    def __init__(self) -> None:
        pass

    def _new_log_dirs(self) -> list:
        return []


@pytest.mark.parametrize("subcommand, shown", [("fit", True), ("validate", False), ("test", False),
                                               ("predict", False)])
def test_the_checkpoint_folders_note_shows_on_a_resumed_fit_alone(subcommand, shown, tmp_path, monkeypatch):
    """Every `malora validate/test/predict --ckpt_path` gets a version folder of its own, and Lightning restores the
    callbacks' state for evaluations too: each warned that ModelCheckpoint's dirpath had changed and its top-k
    tracking would not be restored, which an evaluation never uses. A fit resumed into a new folder keeps the note
    (its top-k tracking restarts), and so does anything after an evaluation in the process."""
    def restore_checkpoint_state(cli, subcommand: str) -> None:  # what Lightning does as it loads a checkpoint
        state = ModelCheckpoint(dirpath=tmp_path / "version_0").state_dict()
        ModelCheckpoint(dirpath=tmp_path / "version_1").load_state_dict(state)

    monkeypatch.setattr(LightningCLI, "_run_subcommand", restore_checkpoint_state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notes()
        RunOnly()._run_subcommand(subcommand)
        run = len(caught)
        restore_checkpoint_state(None, "fit")  # after the run: the filters are as they were
    notes = ["The dirpath has changed from" in str(warning.message) for warning in caught]
    assert (sum(notes[:run]), sum(notes[run:])) == (1 if shown else 0, 1)


@pytest.mark.parametrize("message, category, module", [
    # ModelCheckpoint's other notes, and the known message from another module or of another category
    ("Checkpoint directory /runs/version_0/checkpoints exists and is not empty.", UserWarning,
     "lightning.pytorch.callbacks.model_checkpoint"),
    ("The dirpath has changed from 'a' to 'b'", UserWarning, "my_project.callbacks"),
    ("The dirpath has changed from 'a' to 'b'", DeprecationWarning, "lightning.pytorch.callbacks.model_checkpoint"),
])
def test_an_evaluation_still_shows_unrelated_warnings(message, category, module, monkeypatch):
    def warn(cli, subcommand: str) -> None:
        warnings.warn_explicit(message, category, f"{module.replace('.', '/')}.py", 1, module=module)

    monkeypatch.setattr(LightningCLI, "_run_subcommand", warn)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_known_notes()
        RunOnly()._run_subcommand("validate")
    assert [str(warning.message) for warning in caught] == [message]


class Collected(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.mark.parametrize("name, line", [
    ("lightning.pytorch.utilities.rank_zero",
     "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]"),
    # SLURM's auto-requeue save, which reads as if checkpoints were loaded unsafely
    ("lightning.pytorch.trainer.connectors.checkpoint_connector", "`weights_only` was not set, defaulting to `False`."),
])
def test_known_log_lines_are_dropped_and_other_lightning_info_kept(name, line):
    quiet_known_notes()
    logger = logging.getLogger(name)
    # a handler on the logger itself: Lightning may stop its loggers propagating to the root (where pytest's caplog
    # listens), depending on whether the root had a handler when Lightning was imported
    collected, level = Collected(), logger.level
    logger.addHandler(collected)
    logger.setLevel(logging.INFO)
    try:
        logger.info(line)
        logger.info("GPU available: False, used: False")
    finally:
        logger.removeHandler(collected)
        logger.setLevel(level)
    assert collected.messages == ["GPU available: False, used: False"]


def test_bitsandbytes_imports_without_the_hub_kernel_lookup():
    # a fresh interpreter, so that bitsandbytes really is imported; `kernels` there records any lookup
    script = """
import logging, sys, types
logging.basicConfig(level=logging.WARNING)
looked_up = []
sys.modules["kernels"] = types.SimpleNamespace(get_kernel=lambda *args, **kwargs: looked_up.append(args))
from malora_lightning.adapters.quantization import import_bitsandbytes
assert import_bitsandbytes().nn.Linear4bit is not None
assert looked_up == [], looked_up
assert isinstance(sys.modules["kernels"], types.SimpleNamespace)  # put back for whoever else uses it
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "kernels-community" not in result.stderr


def progress_bar(max_epochs: int | None, max_steps: int) -> StepProgressBar:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_epochs=max_epochs, max_steps=max_steps)
    return bar


@pytest.mark.parametrize("max_epochs, max_steps, expected", [
    (-1, 160, "Epoch 0, max_steps 160"),  # what Lightning sets for max_steps without max_epochs
    (3, -1, "Epoch 0/2"),
    (-1, -1, "Epoch 0"),
])
def test_progress_bar_description(max_epochs, max_steps, expected):
    assert progress_bar(max_epochs, max_steps)._get_train_description(0).strip() == expected


def test_progress_bar_shows_the_logger_version_as_text(tmp_path):
    """The Rich bar prints numbers with three decimals: an int version read "v_num: 0.000"."""
    bar = StepProgressBar()
    trainer = SimpleNamespace(loggers=[CSVLogger(tmp_path)], progress_bar_metrics={"train/loss": 0.25})
    assert bar.get_metrics(trainer, None) == {"v_num": "0", "train/loss": 0.25}


@contextlib.contextmanager
def bare_logging() -> Iterator[None]:
    """The library's logger and the root logger without handlers inside the block, as a fresh process (a notebook
    kernel too) has them: pytest's capturing handlers on the root logger would count as the program's own, and a
    command run earlier in this process left the library's. A block in the test's body, not a fixture: pytest puts
    a capturing handler on the root logger for each phase of a test, after a fixture's setup."""
    root = logging.getLogger()
    level, handlers, roots = LIBRARY_LOGGER.level, list(LIBRARY_LOGGER.handlers), list(root.handlers)
    LIBRARY_LOGGER.handlers.clear()
    root.handlers.clear()
    try:
        yield
    finally:
        root.handlers[:] = roots
        LIBRARY_LOGGER.setLevel(level)
        LIBRARY_LOGGER.handlers[:] = handlers


def test_the_commands_print_the_librarys_info_lines_on_rank_zero(capsys, monkeypatch):
    """Without a handler Python shows warnings alone: the settings a resume applied, the folder a fit exported to and
    a task spec replacing a registered task were logged and never printed."""
    with bare_logging():
        LIBRARY_LOGGER.setLevel(logging.NOTSET)
        logging.getLogger("malora_lightning.module").info("before")
        show_library_logs()
        show_library_logs()  # idempotent: one line per record
        logging.getLogger("malora_lightning.module").info("settings %s", "applied")
        monkeypatch.setattr(rank_zero_only, "rank", 1)
        logging.getLogger("malora_lightning.module").info("on rank 1")
    assert capsys.readouterr().err == "settings applied\n"


@pytest.mark.parametrize("where", ["", "malora_lightning"])  # the root logger's (basicConfig), the library's
def test_a_programs_own_logging_setup_prints_the_librarys_lines_once(where, capsys):
    """A script that sets up logging (`logging.basicConfig`) and then calls `main` printed each of the library's
    lines twice: once through the root logger's handler, in its format, and once through the library's own. A
    handler the program puts on the library's logger itself counts as its own too."""
    import io

    programs = logging.StreamHandler(io.StringIO())
    programs.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    with bare_logging():
        logging.getLogger(where).addHandler(programs)
        LIBRARY_LOGGER.addHandler(malora_lightning.terminal._LIBRARY_HANDLER)  # as a command run earlier leaves it
        show_library_logs()
        logging.getLogger("malora_lightning.module").info("settings %s", "applied")
    assert programs.stream.getvalue() == "INFO:malora_lightning.module:settings applied\n"
    assert capsys.readouterr().err == ""


def test_logging_a_notebook_sets_up_after_main_prints_the_librarys_lines_once(capsys):
    """A notebook that ran `main` in one cell and `logging.basicConfig` in a later one printed every later line of
    the library twice (`save_adapters`, a plain Trainer's fit): the library's handler, added while the root logger had
    none, stayed. Each line goes to the program's handlers while it has some, and to the library's alone otherwise."""
    import io

    root = logging.getLogger()
    programs = logging.StreamHandler(io.StringIO())
    programs.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    with bare_logging():
        show_library_logs()  # the `main` of an earlier cell
        logging.getLogger("malora_lightning.module").info("first")
        root.addHandler(programs)  # the notebook's `logging.basicConfig()`
        logging.getLogger("malora_lightning.adapters.io").info("second")
        root.removeHandler(programs)
        logging.getLogger("malora_lightning.module").info("third")
    assert programs.stream.getvalue() == "INFO:malora_lightning.adapters.io:second\n"
    assert capsys.readouterr().err == "first\nthird\n"


@pytest.mark.parametrize("environment, width", [
    ({}, 133),  # a file: Lightning's 120 columns, and Rich's padding and borders of its (up to 4) table columns
    ({"COLUMNS": "200"}, None),  # the user's width, Rich's and Lightning's
    ({"FORCE_COLOR": "1"}, None),  # Rich told it writes to a terminal
])
def test_output_off_a_terminal_is_as_wide_as_lightnings_table_of_results(environment, width, monkeypatch, capsys):
    """Lightning lays its evaluation table out for 120 columns off a terminal, and Rich drew it 80 wide: `malora test
    > log` cut the names to "test/routing/dead_ex…". The bar sets the width too: Lightning's bar replaces the console
    it prints that table on."""
    import rich
    from lightning.pytorch.loops.evaluation_loop import _EvaluationLoop

    for variable in ("COLUMNS", "FORCE_COLOR", "TTY_COMPATIBLE"):
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    assert StepProgressBar()._console_kwargs.get("width") == width
    assert StepProgressBar(console_kwargs={"width": 90})._console_kwargs == {"width": 90}
    console = rich.get_console()
    kept, own_width = dict(console.__dict__), console.width
    try:
        size_file_console()
        assert console.width == (own_width if width is None else width)
        if width is not None:  # Lightning's table for three dataloaders (as many columns as 120 hold)
            _EvaluationLoop._print_results([{"test/routing/dead_experts": 0.0, "test/parity/loss": 0.5}] * 3, "test")
            assert "│ test/routing/dead_experts │" in capsys.readouterr().out
    finally:
        console.__dict__ = kept


BARS = {"train_progress_bar": "train_progress_bar_id", "val_sanity_check_bar": "val_sanity_progress_bar_id",
        "val_progress_bar": "val_progress_bar_id", "test_progress_bar": "test_progress_bar_id"}


@pytest.mark.parametrize("bar_property, id_attribute", BARS.items())
def test_each_bar_is_found_by_its_id_after_others_are_removed_and_refused_before_it_is_shown(bar_property,
                                                                                              id_attribute):
    from rich.progress import Progress

    bar = StepProgressBar()
    with pytest.raises(RuntimeError, match="^this progress bar has not been shown yet$"):
        getattr(bar, bar_property)
    bar.progress = Progress()
    with pytest.raises(RuntimeError, match="^this progress bar has not been shown yet$"):
        getattr(bar, bar_property)  # the progress display is up, but not this bar
    removed, wanted = bar.progress.add_task("removed"), bar.progress.add_task("wanted")
    setattr(bar, id_attribute, wanted)
    bar.progress.remove_task(removed)  # `wanted` is now at position 0, not at its id (1)
    assert getattr(bar, bar_property).description == "wanted"


class RichTasksAtValidationEnd(Callback):
    def __init__(self) -> None:
        self.counts: list[int] = []
        self.rendered: list[int] = []  # the bars Rich's columns keep a render of
        self.bars: list[tuple[str, bool]] = []  # the training bar's description, the validation bar is the current
        self.descriptions: list[str] = []  # the sanity check's bar's and the test bar's, each read in its run

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        trainer.progress_bar_callback.progress.get_renderable()  # what a terminal's refresh draws: every shown bar

    def on_validation_end(self, trainer, pl_module) -> None:
        bar = trainer.progress_bar_callback
        if trainer.sanity_checking:
            self.descriptions.append(bar.val_sanity_check_bar.description)
        else:
            self.counts.append(len(bar.progress.tasks))
            self.rendered.append(len({bar_id for column in bar.progress.columns
                                      for bar_id in getattr(column, "_renderable_cache", {})}))
            self.bars.append((bar.train_progress_bar.description, bar.val_progress_bar.id == bar.val_progress_bar_id))

    def on_test_end(self, trainer, pl_module) -> None:
        self.descriptions.append(trainer.progress_bar_callback.test_progress_bar.description)


def test_the_progress_bar_keeps_no_bar_of_a_finished_validation_dataloader(tiny_model_dir, tmp_path):
    """Lightning hides a validation dataloader's bar when the next one starts and never removes it: each validation
    of a fit added one hidden Rich task per task of the data module, 3 more here at each of 3 validations. Nor do
    Rich's columns forget a removed bar: each kept its last render of every bar it drew (about 1 KB per bar and
    column), 3 more bars at each validation. The bar properties a subclass reads give each run's own bar (sanity
    check, training, validation, test)."""
    counts = RichTasksAtValidationEnd()
    trainer = make_trainer(tmp_path, max_steps=3, val_check_interval=1, limit_val_batches=1, num_sanity_val_steps=1,
                           enable_progress_bar=True, callbacks=[StepProgressBar(), counts])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    # the training bar, the sanity check's last bar and the running validation's last bar
    assert counts.counts == [3, 3, 3]
    assert counts.rendered == [3, 3, 3]  # those same bars: each validation added 3 (7, 10, 13)
    # Lightning's properties indexed the task list by id: once bars were removed they read another bar
    assert [(description.startswith("Epoch 0"), current) for description, current in counts.bars] == [(True, True)] * 3
    trainer.test(trainer.lightning_module, make_data(tiny_model_dir), verbose=False)
    assert counts.descriptions == ["Sanity Checking", "Testing"]


@pytest.mark.parametrize("terminal", [False, True])
def test_a_fit_off_a_terminal_writes_a_progress_line_every_log_every_n_steps_and_after_each_validation(
        terminal, tiny_model_dir, tmp_path, caplog, monkeypatch):
    """Off a terminal Rich's live bar draws nothing until it stops: `malora fit > log` read nothing from start-up to
    the end of the fit. There a line is written every `log_every_n_steps` optimizer steps (once a step under
    gradient accumulation) and after each validation; on a terminal the bar is the progress, and nothing is."""
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TERM", "xterm")  # not a dumb terminal, where Rich draws nothing either
    caplog.set_level(logging.INFO, logger="malora_lightning")
    bar = StepProgressBar(console_kwargs={"force_terminal": terminal})
    # 2 batches a step, 6 an epoch: steps 1-3 in epoch 0, 4-6 in epoch 1, and the validation after batch 8 (step 4)
    trainer = make_trainer(tmp_path, max_steps=6, accumulate_grad_batches=2, log_every_n_steps=2,
                           val_check_interval=8, check_val_every_n_epoch=None, limit_val_batches=1,
                           enable_progress_bar=True, logger=CSVLogger(tmp_path), callbacks=[bar, PerTaskMetrics()])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    lines = [record.getMessage() for record in caplog.records if record.name == "malora_lightning.terminal"]
    if terminal:
        assert lines == []
        return
    loss = r"train/loss \d[\d.]{0,4}"  # 4 significant digits, no v_num, no ANSI codes or carriage returns
    times = r"\d:\d\d:\d\d elapsed, \d:\d\d:\d\d left"
    expected = [rf"step 2/6 \(epoch 0\), {times}: {loss}", rf"step 4/6 \(epoch 1\), {times}: {loss}",
                rf"step 4/6 \(epoch 1\), after validation, {times}: {loss}, val/macro_acc \d[\d.]{{0,5}}",
                rf"step 6/6 \(epoch 1\), \d:\d\d:\d\d elapsed, 0:00:00 left: {loss}, val/macro_acc \d[\d.]{{0,5}}"]
    assert len(lines) == len(expected), lines
    for line, pattern in zip(lines, expected):
        assert re.fullmatch(pattern, line), line


def bar_without_lightning(monkeypatch, terminal: bool, term: str = "xterm",
                          clock: list[float] | None = None) -> StepProgressBar:
    """A `StepProgressBar` whose Lightning hooks do nothing, on a console that is a terminal or not, for a stand-in
    trainer: where it writes progress lines, without a model. Its clock reads `clock`'s times in turn (default: 10 s
    apart from 0): the fit's start, then one a line."""
    import io

    from lightning.pytorch.callbacks import RichProgressBar
    from rich.console import Console

    for hook in ("on_train_start", "on_train_batch_end", "on_validation_end"):
        monkeypatch.setattr(RichProgressBar, hook, lambda *args: None)
    for variable in ("FORCE_COLOR", "TTY_COMPATIBLE", "NO_COLOR"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("TERM", term)
    times = iter(clock or range(0, 1000, 10))
    monkeypatch.setattr(malora_lightning.terminal, "time", SimpleNamespace(monotonic=lambda: float(next(times))))
    bar = StepProgressBar()
    bar._console = Console(force_terminal=terminal, file=io.StringIO())
    bar.get_metrics = lambda trainer, module: {}
    return bar


def stand_in_trainer(**fields) -> SimpleNamespace:
    return SimpleNamespace(**{"is_global_zero": True, "log_every_n_steps": 2, "global_step": 0, "current_epoch": 0,
                              "estimated_stepping_batches": 6, "sanity_checking": False,
                              "state": SimpleNamespace(fn="fit"), **fields})


def progress_lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "malora_lightning.terminal"]


@pytest.mark.parametrize("terminal, term, fields, lines", [
    (False, "xterm", {}, ["step 2/6 (epoch 0), 0:00:10 elapsed, 0:00:20 left"]),
    (True, "dumb", {}, ["step 2/6 (epoch 0), 0:00:10 elapsed, 0:00:20 left"]),  # where Rich's live display draws none
    (True, "xterm", {}, []),
    (False, "xterm", {"is_global_zero": False}, []),  # global rank 0 alone
    (False, "xterm", {"log_every_n_steps": 0}, []),  # no lines (and no modulo by zero)
    (False, "xterm", {"estimated_stepping_batches": float("inf")}, ["step 2 (epoch 0), 0:00:10 elapsed"]),  # length unknown
])
def test_where_a_fit_writes_progress_lines(terminal, term, fields, lines, monkeypatch, caplog):
    """`StepProgressBar.on_train_start`'s choice, without a model: lines off a terminal or on a dumb one, on global
    rank 0, where `log_every_n_steps` is set; without a total where the fit's length is unknown."""
    caplog.set_level(logging.INFO, logger="malora_lightning")
    bar, trainer = bar_without_lightning(monkeypatch, terminal, term), stand_in_trainer(**fields)
    bar.on_train_start(trainer, None)
    trainer.global_step = 2
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert progress_lines(caplog) == lines


@pytest.mark.parametrize("ipywidgets, lines", [
    (None, ["step 2/6 (epoch 0), 0:00:10 elapsed, 0:00:20 left"]),  # not installed: Rich's bar draws nothing
    (SimpleNamespace(), []),  # Rich draws the bar in an ipywidgets Output
])
def test_a_fit_in_a_notebook_writes_progress_lines_where_rich_cannot_draw_its_bar(ipywidgets, lines, monkeypatch,
                                                                                   caplog):
    """In Jupyter without ipywidgets Rich's live display only warns 'install "ipywidgets" for Jupyter support', and
    the bar wrote no lines either (it took every notebook for one where Rich draws): no progress until the fit ended."""
    import io

    from rich.console import Console

    caplog.set_level(logging.INFO, logger="malora_lightning")
    monkeypatch.setitem(sys.modules, "ipywidgets", ipywidgets)  # None: its import raises ImportError
    bar, trainer = bar_without_lightning(monkeypatch, terminal=False), stand_in_trainer()
    bar._console = Console(force_jupyter=True, file=io.StringIO())
    bar.on_train_start(trainer, None)
    trainer.global_step = 2
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert progress_lines(caplog) == lines


def test_progress_lines_of_a_resumed_fit_and_of_validations_that_are_not_a_fits(monkeypatch, caplog):
    """A fit resumed at step 2 wrote its line before it stopped; a sanity check (a second `fit` of the trainer) and a
    `trainer.validate` after the fit write none."""
    caplog.set_level(logging.INFO, logger="malora_lightning")
    bar, trainer = bar_without_lightning(monkeypatch, terminal=False), stand_in_trainer(global_step=2)
    bar.on_train_start(trainer, None)
    for step in (2, 3, 3, 4, 4):  # 2 batches a step: the first only accumulates
        trainer.global_step = step
        bar.on_train_batch_end(trainer, None, None, None, 0)
    for sanity_checking, fn in ((True, "fit"), (False, "validate"), (False, "fit")):
        trainer.sanity_checking, trainer.state.fn = sanity_checking, fn
        bar.on_validation_end(trainer, None)
    # elapsed since the resume, and what is left at the time per step since then (10 s for 2 steps, then 20 s)
    assert progress_lines(caplog) == ["step 4/6 (epoch 0), 0:00:10 elapsed, 0:00:10 left",
                                      "step 4/6 (epoch 0), after validation, 0:00:20 elapsed, 0:00:20 left"]


@pytest.mark.parametrize("started_step, step, clock, line", [
    # 62.7 s for the first 40 of 160 steps: 188.1 s left, in whole seconds as the live bar shows them
    (0, 40, [100.0, 162.7], "step 40/160 (epoch 0), 0:01:02 elapsed, 0:03:08 left"),
    # resumed at step 80: the time per step of the 40 this process made (the run's 120 steps would give 0:20:41)
    (80, 120, [0.0, 3725.0], "step 120/160 (epoch 0), 1:02:05 elapsed, 1:02:05 left"),
    # past the estimated length (`estimated_stepping_batches` of epochs a resumed fit's earlier epochs outgrew): no
    # time left, not "-1 day, 23:59:47"
    (0, 200, [0.0, 62.7], "step 200/160 (epoch 0), 0:01:02 elapsed, 0:00:00 left"),
])
def test_progress_lines_say_the_time_elapsed_and_left(started_step, step, clock, line, monkeypatch, caplog):
    """A log file has no clock of its own, and the live bar's elapsed and remaining times were not in the lines."""
    caplog.set_level(logging.INFO, logger="malora_lightning")
    bar = bar_without_lightning(monkeypatch, terminal=False, clock=clock)
    trainer = stand_in_trainer(estimated_stepping_batches=160, log_every_n_steps=40, global_step=started_step)
    bar.on_train_start(trainer, None)
    trainer.global_step = step
    bar.on_train_batch_end(trainer, None, None, None, 0)
    assert progress_lines(caplog) == [line]


@pytest.mark.parametrize("started_step", [0, 2])
def test_a_validation_before_the_first_step_of_the_fit_says_the_time_elapsed_alone(started_step, monkeypatch, caplog):
    """A validation before this fit's first optimizer step (a fit resumed at step 2, or `val_check_interval` batches
    under `accumulate_grad_batches`) has no time per step to tell what is left: its line must not divide by the
    steps made since the start, none."""
    caplog.set_level(logging.INFO, logger="malora_lightning")
    bar, trainer = bar_without_lightning(monkeypatch, terminal=False), stand_in_trainer(global_step=started_step)
    bar.on_train_start(trainer, None)
    bar.on_validation_end(trainer, None)
    assert progress_lines(caplog) == [f"step {started_step}/6 (epoch 0), after validation, 0:00:10 elapsed"]
