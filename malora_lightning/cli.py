"""The `malora` command: LightningCLI over `MALoRAModule` and `MultiTaskDataModule` (fit/validate/test/predict)."""

from __future__ import annotations

import contextlib
import contextvars
import glob
import os
import re
import signal
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable

import jsonargparse
import lightning as L
import yaml
from jsonargparse import set_dumper
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint, ProgressBar
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_registry import _is_registry

from malora_lightning.atomic import atomic_write_text, first_line
from malora_lightning.callbacks import PerTaskMetrics, PredictionWriter, RoutingStats, RunReport, SeesawTracker
from malora_lightning.checkpoints import is_remote
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule, check_checkpoint_before_loading
from malora_lightning.run_paths import refuse_on_every_rank
from malora_lightning.terminal import (StepProgressBar, quiet_evaluation_notes, quiet_known_notes, show_library_logs,
                                       size_file_console)
from malora_lightning.values import user_path

# Callbacks every run gets, each under its own config key so that one can be tuned (`--seesaw.tolerance 0.05`)
# or switched off (`--routing_stats null`) without rewriting the trainer's callback list.
DEFAULT_CALLBACKS: dict[str, type[Callback]] = {
    "per_task_metrics": PerTaskMetrics,
    "seesaw": SeesawTracker,
    "routing_stats": RoutingStats,
    "run_report": RunReport,
    "predictions": PredictionWriter,  # `malora predict` writes predictions.jsonl; `--predictions.path` puts it elsewhere
}
# `ckpt_path` values that Lightning resolves to a file itself (`_CheckpointConnector._parse_ckpt_path`, Lightning 2.6),
# besides "registry" and "registry:<name>"; the CLI resolves "last" itself (`resolve_last_checkpoint`) and refuses
# "best" (`_parse_ckpt_path`)
LIGHTNING_CKPT_VALUES = ("last", "best", "hpc")
# the first line of every config file LightningCLI writes (its parser's dump header)
CONFIG_HEADER = "# lightning.pytorch=="


class ConfigDumper(yaml.SafeDumper):
    """PyYAML's safe dumper that quotes a string jsonargparse would read back as a number. PyYAML (YAML 1.1) writes
    `5e-4`, `1e3` or `25921e05` unquoted, having no float without a dot and a signed exponent, and jsonargparse's
    loader (YAML 1.2 floats) reads them back as 0.0005, 1000.0 and 2.5921e9: a saved config.yaml or `--print_config`
    output with a logger named `5e-4` was refused by `malora fit --config`, and an inline task spec's text changed."""


ConfigDumper.add_implicit_resolver("tag:yaml.org,2002:float",
                                   re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                                   list("-+0123456789"))


def dump_config(data: Any) -> str:
    """jsonargparse's YAML dump (its `dump_yaml_kwargs`) through `ConfigDumper`: every config a `malora` command saves
    or prints reads back as it was."""
    return yaml.dump(data, Dumper=ConfigDumper, default_flow_style=False, allow_unicode=True, sort_keys=False)


set_dumper("yaml", dump_config)  # jsonargparse's one YAML dumper, also used by `--print_config`


def dump_with_unset(parser: LightningArgumentParser, config: Any) -> str:
    """`parser.dump(config)` keeping the entries left None, as Lightning's SaveConfigCallback saves them.
    jsonargparse 4.49 renamed dump's `skip_none` to `skip_unset` (the old name warns, and goes in 5); our 4.39 floor
    has only `skip_none`."""
    # by version: jsonargparse wraps dump in a `(cfg, *args, **kwargs)` shim, so its signature does not tell
    if tuple(int(part) for part in jsonargparse.__version__.split(".")[:2]) >= (4, 49):
        return parser.dump(config, skip_unset=False)
    return parser.dump(config, skip_none=False)


def subcommand_help(argument: str, subcommand: str) -> str:
    """`malora <subcommand> --help`'s text for `--ckpt_path`, `--weights_only` or `--verbose`: what this command does
    with them (`MALoRACLI._parse_ckpt_path`, `resolve_last_checkpoint`, `_prepare_subcommand_kwargs`,
    `_prepare_subcommand_parser`)."""
    if argument == "verbose":
        split = "validation" if subcommand == "validate" else "test"
        return (f"print Lightning's table of the logged metrics too (default: false). The run report that malora "
                f"{subcommand} prints at its end (--run_report) gives the same {split} scores per task; Lightning's "
                "table repeats every value once per task's dataloader. With --run_report null, only this table shows "
                "the scores.")
    if argument == "weights_only":
        return ("must stay true: every checkpoint is read with torch.load(weights_only=True), tensors and plain values "
                "only; false or null is refused. Load a trusted checkpoint that holds objects in Python, with "
                "MALoRAModule.load_from_checkpoint(path, weights_only=False).")
    use = "resume from" if subcommand == "fit" else "evaluate"
    unset = ("start fresh adapters (or those of --model.adapter_path); on SLURM, resume Lightning's auto-requeue "
             "checkpoint (the newest hpc_ckpt_N.ckpt in the trainer's default_root_dir) where a preempted fit left "
             "one" if subcommand == "fit" else
             "use the adapters of --model.adapter_path, or freshly initialised ones (with a warning)")
    return (f"the checkpoint to {use}: a path or URL, read as data (--weights_only). `last`: the newest last*.ckpt in "
            "the checkpoint folders of every run under the logger's folder (or a ModelCheckpoint's dirpath) and "
            "SLURM's auto-requeue checkpoint (hpc_ckpt_N.ckpt in the trainer's default_root_dir), an error "
            "where there is none. `best` is refused: only the process that ran the fit knows its best checkpoint. "
            f"Lightning's `hpc` and `registry` keywords are passed on to it. Unset: {unset}.")


def _is_local_file(ckpt_path: Any) -> bool:
    """Whether a `ckpt_path` names a local file: not a value Lightning resolves itself (`LIGHTNING_CKPT_VALUES`, a
    model registry) and not a remote path (read by Lightning through fsspec)."""
    return bool(ckpt_path) and ckpt_path not in LIGHTNING_CKPT_VALUES and not _is_registry(ckpt_path) \
        and not is_remote(ckpt_path)


def kernel_argv() -> bool:
    """Whether `sys.argv` is a Jupyter kernel's own (`ipykernel_launcher.py -f kernel-<id>.json`, VS Code's `--f=...`):
    in a notebook it holds the kernel's connection file, never a `malora` command, and no `malora` command has `-f`."""
    return "ipykernel" in sys.modules and any(arg == "-f" or arg.startswith("--f=") for arg in sys.argv[1:])


@contextlib.contextmanager
def argv_not_the_command() -> Iterator[None]:
    """Leave out LightningCLI's warning against `args` given beside command-line arguments, where `sys.argv` holds
    no `malora` command: a notebook kernel's (`kernel_argv`), or another command's own flags
    (`task_export.recipe_modules`)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter is intended", category=UserWarning)
        yield


def _has_argument(parser: Any, key: str) -> bool:
    try:
        parser.get_default(key)
    except KeyError:  # jsonargparse: "No action for key"
        return False
    return True


def refuse_foreign_config(path: Path, run_configs: list[Path]) -> None:
    """Raise FileExistsError when `path` exists and is one of the `--config` files the run reads, or does not start
    with the header LightningCLI writes: without a logger the run folder is `default_root_dir` (the current directory
    unless set), where the user's own recipe may be. An empty file holds nothing to lose: what a run killed while
    Lightning wrote its config (with a plain open, not atomically) leaves, which was refused as not ours."""
    line = first_line(path)
    if line is None or path.stat().st_size == 0:
        return
    if any(path.resolve() == config.resolve() for config in run_configs):
        raise FileExistsError(f"{path} is a config file this run reads (--config) and would be replaced by the run's "
                              "full config: give the run a folder of its own (--trainer.default_root_dir or a "
                              "logger) or run it from another folder")
    if not line.startswith(CONFIG_HEADER):
        raise FileExistsError(f"{path} was not written by malora (its first line is not '{CONFIG_HEADER}<version>', "
                              "which starts every config a run saves) and would be replaced by this run's config: "
                              "move it, or give the run a folder of its own (--trainer.default_root_dir or a logger)")


def _last_checkpoint_folders(trainer: L.Trainer, callbacks: list[ModelCheckpoint]) -> list[str]:
    """The folders (glob patterns) where `--ckpt_path last` looks: each ModelCheckpoint's `dirpath`; where one has
    none (or there is none), every run folder of the logger (`save_dir/name/*/checkpoints`, where Lightning puts each
    run's checkpoints) or, without a logger, `default_root_dir/checkpoints`. The user's folder names are escaped
    (`runs/[ablation]` is no pattern); only the run folder's `*` matches."""
    folders = [glob.escape(user_path(callback.dirpath)) for callback in callbacks if callback.dirpath]
    if callbacks and len(folders) == len(callbacks):
        return folders
    if trainer.loggers:
        logger = trainer.loggers[0]
        root = user_path(os.path.join(logger.save_dir or trainer.default_root_dir, str(logger.name)))
        return [*folders, os.path.join(glob.escape(root), "*", "checkpoints")]
    return [*folders, os.path.join(glob.escape(trainer.default_root_dir), "checkpoints")]


def resolve_last_checkpoint(trainer: L.Trainer, subcommand: str) -> str:
    """`--ckpt_path last` as the newest (by modification time, as Lightning picks) local `last*.ckpt` in
    `_last_checkpoint_folders`, OnExceptionCheckpoint file or SLURM auto-requeue checkpoint (the `hpc_ckpt_N.ckpt` in
    `default_root_dir` that Lightning resumes a fit from when no `ckpt_path` is given). Lightning looks only in this
    run's checkpoint folder, which a versioned logger makes new and empty (lightning_logs/version_N+1), and there it
    warns and runs on fresh adapters; here the earlier runs' folders count, and finding no checkpoint is an error.
    Without the auto-requeue checkpoint, a `malora fit --ckpt_path last` that SLURM preempted and requeued resumed
    from the last validation's checkpoint, training again every step since, at each requeue."""
    callbacks = [callback for callback in trainer.checkpoint_callbacks if isinstance(callback, ModelCheckpoint)]
    names = sorted({f"{callback.CHECKPOINT_NAME_LAST}*{callback.FILE_EXTENSION}" for callback in callbacks or
                    [ModelCheckpoint]})  # the class's names where no instance has its own
    folders = _last_checkpoint_folders(trainer, callbacks)
    candidates = {path for folder in folders for name in names for path in glob.glob(os.path.join(folder, name))}
    candidates |= {user_path(callback.ckpt_path) for callback in trainer.callbacks
                   if isinstance(callback, OnExceptionCheckpoint) and os.path.isfile(user_path(callback.ckpt_path))}
    hpc = trainer._checkpoint_connector._hpc_resume_path  # Lightning's (private; checked against Lightning 2.6)
    if hpc is not None and not is_remote(hpc):
        candidates.add(user_path(hpc))
    if not candidates:
        fresh = "start a new run" if subcommand == "fit" else "evaluate the untrained adapters"
        raise FileNotFoundError(f"--ckpt_path last: no last checkpoint ({' or '.join(names)}) in {', '.join(folders)}, "
                                f"so the {subcommand} would start from fresh adapters; give the checkpoint's path "
                                "(--ckpt_path runs/<run>/lightning_logs/version_<N>/checkpoints/last.ckpt), or leave "
                                f"--ckpt_path out to {fresh}")
    newest = max(sorted(candidates), key=_modified)
    rank_zero_info(f"--ckpt_path last: {'resuming from' if subcommand == 'fit' else 'loading'} {newest}, the newest "
                   f"last checkpoint in {', '.join(folders)}"
                   + ("" if hpc is None else f" or SLURM auto-requeue checkpoint in {trainer.default_root_dir}"))
    return newest


def _modified(path: str) -> float:
    """When the checkpoint at `path` was written: its file's modification time, through a link, or for a link whose
    checkpoint is gone (`save_last="link"`'s `last.ckpt` once that file was removed) the link's own, made when
    Lightning saved it. `os.path.getmtime` raised FileNotFoundError for such a link in any run folder, and so
    `--ckpt_path last` failed even where another run folder held a newer last checkpoint."""
    return os.stat(path).st_mtime if os.path.exists(path) else os.lstat(path).st_mtime


def auto_requeue_checkpoint(trainer: L.Trainer, subcommand: str) -> str | None:
    """The file Lightning loads for `--ckpt_path hpc`, and for a fit on SLURM without `--ckpt_path`: the newest
    `hpc_ckpt_N.ckpt` in `default_root_dir`, or None where there is none. Given to the trainer as its path, it is
    checked before the base model loads, as any `--ckpt_path` is (`_prepare_subcommand_kwargs`): Lightning chose it
    inside the trainer's run, where only the checkpoint IO read it, so a file holding objects stopped `malora` with
    torch's UnpicklingError, naming no file, in a traceback, and one of other settings was refused only after the base
    had loaded."""
    hpc = trainer._checkpoint_connector._hpc_resume_path  # Lightning's (private; checked against Lightning 2.6)
    if hpc is not None:
        rank_zero_info(f"malora {subcommand}: {'resuming from' if subcommand == 'fit' else 'loading'} SLURM's "
                       f"auto-requeue checkpoint {hpc}, the newest hpc_ckpt_N.ckpt in {trainer.default_root_dir}")
    return hpc


def keep_ckpt_path_unset(trainer: L.Trainer, subcommand: str) -> None:
    """Make `validate`, `test` and `predict` without `--ckpt_path` load no checkpoint, as their help says. On SLURM,
    Lightning takes an unset `ckpt_path` for its auto-requeue checkpoint, the newest `hpc_ckpt_N.ckpt` in
    `default_root_dir`, which a preempted fit there wrote and left behind: `malora test --model.adapter_path ...`
    run as a SLURM job scored that fit's mid-training tensors in place of the adapter folder's, and said nothing.
    (Lightning's private checkpoint connector, checked against Lightning 2.6: a "user-managed" path of None loads
    nothing; `--ckpt_path hpc` still loads that checkpoint.)"""
    connector = trainer._checkpoint_connector
    if SLURMEnvironment.detect() and connector._hpc_resume_path is not None:
        rank_zero_info(f"malora {subcommand} without --ckpt_path loads no checkpoint: SLURM's auto-requeue checkpoint "
                       f"{connector._hpc_resume_path} is left alone (--ckpt_path hpc loads it)")
    connector._ckpt_path, connector._user_managed = None, True


def version_folder(logger: CSVLogger | TensorBoardLogger) -> Path:
    """The version folder of one of Lightning's versioned loggers: its `log_dir`, less TensorBoard's `sub_dir`; a
    `save_dir` of `~/runs` in the home folder, where the logger writes through fsspec (`user_path`)."""
    folder = Path(user_path(logger.log_dir))
    sub_dir = getattr(logger, "sub_dir", None)
    return folder.parents[len(Path(sub_dir).parts) - 1] if sub_dir else folder


def claim_version_folder(logger: CSVLogger | TensorBoardLogger) -> Path | None:
    """Make `logger`'s version folder and return it, or None where this call did not make it (there already, or a
    URL). Lightning's CSVLogger and TensorBoardLogger take one more than the highest `version_N` they list and make
    that folder only as setup begins: runs started together (a SLURM array, a sweep) listed the same folder and all
    wrote into one version (one config.yaml, every run's rows in one metrics.csv, the report and adapters of the last
    to end), silently. The folder is made with an exclusive mkdir, and one another run made since the listing moves
    this run on to the next version; a version the user gave is used as it is."""
    automatic = logger._version is None  # Lightning's "next version" (a private attribute of both loggers)
    while not is_remote(logger.log_dir):
        folder = version_folder(logger)
        try:
            folder.mkdir(parents=True)
            return folder
        except FileExistsError:
            if not automatic:
                return None
        taken, logger._version = logger.version, None
        if logger.version == taken:  # its listing does not show the folder that is there: Lightning's choice stands
            return None
    return None


def remove_empty_folders(folder: Path) -> None:
    """Remove `folder` and the folders inside it, innermost first, as long as they hold no file: `os.rmdir` refuses
    a folder that is not empty, so nothing written is ever removed."""
    for inner, _, _ in os.walk(folder, topdown=False):
        try:
            os.rmdir(inner)
        except OSError:
            return


class CheckedSaveConfigCallback(SaveConfigCallback):
    """Lightning's SaveConfigCallback (the run's config saved in its folder, replacing the one an earlier run saved
    there), except that a file it did not write, or a config file being run, is never replaced: the run stops first,
    on every rank. The config is written atomically (Lightning writes it in place: a run stopped meanwhile left an
    empty or cut-off `config.yaml`)."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            super().setup(trainer, pl_module, stage)
            return
        path = Path(user_path(trainer.log_dir)) / self.config_filename  # every rank: log_dir is a collective call
        # the files given to --config (an inline `--config '{...}'` is listed as None)
        run_configs = [Path(config.absolute) for config in self.config.get("config") or [] if config is not None]
        refuse_on_every_rank(trainer, lambda: refuse_foreign_config(path, run_configs))
        # Lightning's own write: multifile saves one file per nested config, and without overwrite it refuses any
        # config.yaml already there (a check inside the write this method replaces)
        if self.multifile or not self.overwrite:
            super().setup(trainer, pl_module, stage)
            return
        if trainer.is_global_zero:
            atomic_write_text(path, dump_with_unset(self.parser, self.config))  # what Lightning's save writes
        self.save_to_log_dir = False  # written: Lightning's setup does the rest (save_config, the ranks' agreement)
        try:
            super().setup(trainer, pl_module, stage)
        finally:
            self.save_to_log_dir = True


class MALoRAArgumentParser(LightningArgumentParser):
    """Lightning's parser, whose error for a recipe's `model: {class_path: ...}` also says how a subclass runs."""

    def error(self, message: str, ex: Exception | None = None):
        if re.search(r"\b(model|data)\.(class_path|init_args)\b", message):
            message += (": `model` and `data` take their classes' arguments directly, without class_path/init_args; "
                        "your own subclasses run from your own entry point, `main(model_class=MyModule, "
                        "datamodule_class=MyData)` from malora_lightning.cli (README, Extending it)")
        super().error(message, ex)


class MALoRACLI(LightningCLI):
    """LightningCLI with the tokenizer the model's unless a recipe names another (a recipe names the model once),
    `trust_remote_code` linked to the model's, default callbacks, and `MALoRAArgumentParser`'s errors."""

    def __init__(self, *args: Any, parser_class: type[LightningArgumentParser] = MALoRAArgumentParser,
                 **kwargs: Any) -> None:
        """LightningCLI's, in a copy of the caller's context (`contextvars`): jsonargparse (4.53) leaves the last parser
        it parsed with in a context variable it never resets (`subclass_arg_parser`), and that parser reaches this
        CLI with its trainer, model and data module. A notebook, a sweep or a script that called `main` (or
        `malora-task-export`'s `recipe_modules`) kept the last run's base model and data alive after it returned,
        out of reach of `del` and `gc.collect()`, until the next CLI parsed."""
        contextvars.copy_context().run(super().__init__, *args, parser_class=parser_class, **kwargs)

    def init_parser(self, **kwargs: Any):
        # no prefix matching: `--trainer.max_step=10` must be an error, not `--trainer.max_steps=10`
        kwargs.setdefault("allow_abbrev", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """LightningCLI's, refusing to read a notebook kernel's `sys.argv` as a command (`kernel_argv`): `main()` or
        `MALoRACLI(...)` without `args` in a notebook stopped with jsonargparse's usage and "invalid choice:
        '/tmp/tmp....json'", the kernel's connection file, and a SystemExit. Given `args` there, Lightning's warning
        against "both args and command line arguments" is left out: the kernel's argv was never the user's, and every
        `main([...])` of a notebook warned that it ignored it."""
        if not kernel_argv():
            super().parse_arguments(parser, args)
            return
        if args is None:
            raise ValueError(f"no command given: without `args`, the command is read from sys.argv, which in a "
                             f"notebook is the Jupyter kernel's own ({sys.argv}). Pass the command as a list, e.g. "
                             "main(['fit', '--config', 'recipes/default.yaml']) from malora_lightning.cli (or "
                             "args=[...] to MALoRACLI)")
        with argv_not_the_command():
            super().parse_arguments(parser, args)

    def add_arguments_to_parser(self, parser) -> None:
        # a subclass that fixes its base model (or a data module without that argument) has nothing to link
        if _has_argument(parser, "model.trust_remote_code") and _has_argument(parser, "data.trust_remote_code"):
            parser.link_arguments("model.trust_remote_code", "data.trust_remote_code")
        for key, callback in DEFAULT_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key, subclass_mode=True, required=False)
            parser.set_defaults({key: {"class_path": f"{callback.__module__}.{callback.__name__}"}})
        # Lightning's summary counts a 4-bit weight's packed bytes as parameters (100 M of SmolLM2-135M's 135 M), sizes
        # them as 32-bit floats and prints "Total FLOPs: 0"; the module logs PEFT's parameter line instead
        parser.set_defaults({"trainer.enable_model_summary": False})

    def instantiate_classes(self) -> None:
        """`data.tokenizer` left unset is the model's (`model.model_name_or_path`) for the data module, and stays unset
        in the config that config.yaml saves, as `--print_config` shows it: a rerun of that file with another model
        takes that model's tokenizer, not the first run's. Not a jsonargparse link: a link's target cannot be given,
        so a recipe's own tokenizer was dropped in silence (and a flag refused with a type error); `MALoRAModule`
        checks that the tokenizer's vocabulary fits the model's embeddings."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        data, model = config.get("data"), config.get("model")
        filled = data is not None and model is not None and "tokenizer" in data and data.tokenizer is None \
            and "model_name_or_path" in model
        if filled:
            data.tokenizer = model.model_name_or_path
        try:
            super().instantiate_classes()
        finally:
            if filled:
                data.tokenizer = None

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults({"weights_only": True})  # checkpoints hold tensors and plain data, never objects
        evaluates = subcommand in ("validate", "test")
        if evaluates:
            # Every metric is logged once per evaluation, with no dataloader index, so Lightning's results table gives
            # each task's dataloader a column of the same values (9 in the default recipe, in three tables). The run
            # report that RunReport prints at the end of trainer.validate and of test gives the scores per task.
            parser.set_defaults({"verbose": False})
        # Lightning's help for these describes Trainer's behaviour (`best` loaded, weights_only defaulting to None,
        # `weights_only=False` advised, the results table printed), which this command replaces
        for action in parser._actions:
            if action.dest in ("ckpt_path", "weights_only") or (action.dest == "verbose" and evaluates):
                action.help = subcommand_help(action.dest, subcommand)
        return parser

    def _parse_ckpt_path(self) -> None:
        """Replaces LightningCLI's, which let a checkpoint's stored hyperparameters override the config and flags,
        `trust_remote_code` and the base model's path included: here they are only checked against the run's
        (`_prepare_subcommand_kwargs`). A `weights_only` other than true (flag or config) is refused: every check
        reads the file as data, and with null Lightning reads an http(s) checkpoint with weights_only=False."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        config = self.config[subcommand]
        if "weights_only" in config and config.weights_only is not True:
            value = "null" if config.weights_only is None else str(config.weights_only).lower()
            raise ValueError(f"--weights_only={value}: malora commands read checkpoints as data only (torch.load with "
                             "weights_only=True), so that nothing in a checkpoint file runs. A checkpoint that needs "
                             "more holds objects besides tensors and plain values; load one you trust in Python, "
                             "with MALoRAModule.load_from_checkpoint(path, weights_only=False)")
        if config.get("ckpt_path") == "best":
            raise ValueError("--ckpt_path best means the best checkpoint of a fit earlier in the same process, which a "
                             "malora command never has: give the checkpoint's path (e.g. runs/<run>/lightning_logs/"
                             "version_<N>/checkpoints/last.ckpt), or `last` for the newest last checkpoint of the "
                             "run folder")

    def _run_subcommand(self, subcommand: str) -> None:
        """A run that fails leaves no empty version folder behind: Lightning makes its loggers' folders as setup
        begins, so a data error found in setup left `lightning_logs/version_N` empty and the next run numbered
        after it. Only folders this run made (`_new_log_dirs`) and left without a file are removed, on rank zero.
        An evaluation runs with `quiet_evaluation_notes`: the notes that say nothing of it (ModelCheckpoint's about
        the checkpoint's folder) stay off its output, and on a fit's."""
        new_folders = self._new_log_dirs()
        try:
            with quiet_evaluation_notes() if subcommand != "fit" else contextlib.nullcontext():
                super()._run_subcommand(subcommand)
        except BaseException:
            for folder in new_folders:
                remove_empty_folders(folder)
            raise

    def _new_log_dirs(self) -> list[Path]:
        """On rank zero, the loggers' folders this run makes: a versioned logger's is made here, a version of its own
        (`claim_version_folder`), another logger's counts when it does not exist yet (a logger without one, say
        MLflow's, has nothing to clean up). Every logger picks its version here, on every rank, as before."""
        folders = []
        for logger in self.trainer.loggers:
            if self.trainer.is_global_zero and isinstance(logger, (CSVLogger, TensorBoardLogger)):
                folder = claim_version_folder(logger)
            else:
                log_dir = getattr(logger, "log_dir", None)
                folder = Path(user_path(log_dir)) if log_dir and not Path(user_path(log_dir)).exists() else None
            if folder is not None and self.trainer.is_global_zero:
                folders.append(folder)
        return folders

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        """`--ckpt_path last` resolved here, where the trainer (its logger and checkpoint folders) exists. Then, before
        the base model loads, a local checkpoint is checked (`check_checkpoint_before_loading`: the file, read as
        data, its settings against those the module was built with, and what its strategy needs); a strategy that
        reads the file itself checks it again when it loads (`read_as_data_before_loading`), and `on_load_checkpoint`
        checks every checkpoint as it loads, and logs the settings that differ. An evaluation with neither a
        checkpoint nor an adapter folder warns that it scores untrained adapters; with both, says whose tensors it
        scores; validate and test given a predict file warn that they do not read it. (A private LightningCLI method,
        checked against Lightning 2.6.) An evaluation without --ckpt_path loads no checkpoint, not even SLURM's
        auto-requeue one (`keep_ckpt_path_unset`); a fit on SLURM without it, and `--ckpt_path hpc`, load that one,
        checked as a path (`auto_requeue_checkpoint`)."""
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        if subcommand != "fit" and not kwargs.get("ckpt_path") and self.model.settings.adapter_path is None:
            rank_zero_warn(f"malora {subcommand} without --ckpt_path or --model.adapter_path evaluates freshly "
                           "initialised adapters, whose up-projections are zero: the base model's own answers. Give "
                           "a checkpoint (--ckpt_path last for the newest in the run folder) or an adapter folder to "
                           "evaluate a trained adapter")
        if subcommand != "fit" and not kwargs.get("ckpt_path"):
            keep_ckpt_path_unset(self.trainer, subcommand)
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = resolve_last_checkpoint(self.trainer, subcommand)
        requeued = subcommand == "fit" and kwargs.get("ckpt_path") is None and SLURMEnvironment.detect()
        if kwargs.get("ckpt_path") == "hpc" or requeued:
            kwargs["ckpt_path"] = auto_requeue_checkpoint(self.trainer, subcommand) or kwargs.get("ckpt_path")
        predict_file = None if self.datamodule is None else self.datamodule.settings.predict_file
        if predict_file is not None and subcommand in ("validate", "test"):
            rank_zero_warn(f"malora {subcommand} scores the {'validation' if subcommand == 'validate' else 'test'} "
                           f"splits: data.predict_file ({predict_file}) is read by malora predict alone")
        path = kwargs.get("ckpt_path")
        adapter_path = self.model.settings.adapter_path
        if path and adapter_path is not None and subcommand != "fit":
            rank_zero_info(f"malora {subcommand} scores the adapter tensors of --ckpt_path {path}: they replace those "
                           f"of model.adapter_path {adapter_path}, which still gives the adapter's settings")
        if _is_local_file(path):
            # `~` expanded for Lightning too: its ModelCheckpoint keeps the file a fit resumed from only where the path
            # equals its own (expanded) one, and removed a `~/.../epoch=0-step=4.ckpt` resumed in its own folder
            kwargs["ckpt_path"] = path = user_path(path)
            check_checkpoint_before_loading(path, self.trainer.strategy, self.model, fitting=subcommand == "fit")
        return kwargs

    def _instantiate_trainer(self, config, callbacks):
        callbacks = [callback for callback in callbacks if callback is not None]
        given = config.get("callbacks") or []
        given = given if isinstance(given, list) else [given]
        if (config.get("enable_progress_bar") is not False
                and not any(isinstance(callback, ProgressBar) for callback in given + callbacks)):
            callbacks.append(StepProgressBar())  # the bar Lightning would pick, reading sensibly under max_steps
        return super()._instantiate_trainer(config, callbacks)


def main(args: list[str] | None = None, model_class: type[MALoRAModule] = MALoRAModule,
         datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule) -> None:
    """Entry point of `malora` and `python -m malora_lightning`; user projects pass their subclasses.

    Returns None: a console script exits with `sys.exit(main())`, and any other value would be an error exit.
    """
    quiet_known_notes()
    show_library_logs()
    size_file_console()
    MALoRACLI(model_class, datamodule_class, save_config_callback=CheckedSaveConfigCallback,
              save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)


def console_main() -> None:
    """The `malora` command and `python -m malora_lightning`: `main`, its named errors printed without a traceback."""
    run_command("malora", main)


def run_command(name: str, entry: Callable[[], object]) -> None:
    """Run a console command's `entry`: an error that names a bad setting, file or row (ValueError, OSError) is
    printed as its message alone, and Ctrl-C as one line (exit status 130, the shell's for SIGINT) once the files
    being written have been cleaned up; MALORA_TRACEBACK=1 shows the traceback too.

    Inside a trainer run Lightning handles both signals itself: Ctrl-C ends in its ``sys.exit(1)`` (raised while
    handling the KeyboardInterrupt), and SIGTERM in a `SIGTERMException`, a SystemExit without a code, so status 0:
    a preempted or timed-out fit looked finished to `malora fit && malora test`. They exit 130 and 143 (128 + the
    signal, as the shell reports a process the signal ended)."""
    try:
        entry()
    except (ValueError, OSError) as error:
        if os.environ.get("MALORA_TRACEBACK"):
            raise
        sys.stderr.write(f"{name}: error: {error}\n(MALORA_TRACEBACK=1 shows where it was raised)\n")
        raise SystemExit(2) from None
    except SIGTERMException:
        sys.stderr.write(f"{name}: terminated (SIGTERM) before the run finished\n")
        raise SystemExit(128 + signal.SIGTERM) from None
    except (KeyboardInterrupt, SystemExit) as stop:
        if isinstance(stop, SystemExit) and not isinstance(stop.__context__, KeyboardInterrupt):
            raise
        if os.environ.get("MALORA_TRACEBACK"):
            raise
        sys.stderr.write(f"{name}: interrupted\n")
        raise SystemExit(128 + signal.SIGINT) from None


if __name__ == "__main__":
    # Run as a file, this module would define its classes a second time, beside those of `malora_lightning.cli` that
    # recipes and checkpoints name; it ran nothing and exited 0, which read as a finished command.
    sys.exit("python -m malora_lightning.cli runs nothing: run `malora <subcommand>` or "
             "`python -m malora_lightning <subcommand>`")
