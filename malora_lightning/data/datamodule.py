"""``MultiTaskDataModule``: tasks in, task-balanced training batches and per-task evaluation loaders out."""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import io
import logging
import math
import multiprocessing
import os
import pickle
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.accelerators import CUDAAccelerator
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn
from torch import Generator
from torch.utils.data import ConcatDataset, DataLoader, Dataset, Sampler
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

import malora_lightning.data.formatters  # noqa: F401  (registers the paper datasets' tasks)
from malora_lightning.checkpoints import load_arguments
from malora_lightning.data.builtin import BUILTIN_TASKS
from malora_lightning.data.collate import (
    EncodedExample,
    LongTargets,
    MultiTaskCollator,
    PromptEncoder,
    TruncationStats,
    check_long_targets,
)
from malora_lightning.data.batches import check_task_ids
from malora_lightning.data.packed import PackedExamples
from malora_lightning.data.prompts import NO_TASK, PredictPrompt, predict_source, read_prompts
from malora_lightning.data.sampling import (
    CAP_STRATEGIES,
    SAMPLING_STRATEGIES,
    EvaluationShardSampler,
    ShardIndex,
    TaskBalancedSampler,
    check_weights,
    mixing_weights,
    seeded_generator,
    unimax_epoch_length,
)
from malora_lightning.data.tasks import (
    NOT_IMPORTED,
    Example,
    FileSource,
    HubSource,
    Task,
    TaskDataError,
    get_task,
    not_a_file,
    reading_files_once,
    registered_tasks,
    repeated,
    task_from_spec,
)
from malora_lightning.hyperparameters import constructor_arguments
from malora_lightning.offline_models import resolve_model_path
from malora_lightning.values import check_switch, is_finite_number, is_int

logger = logging.getLogger(__name__)

# examples a `PromptEncoder.encode` call takes: a split is encoded in chunks, so that only a chunk of it is ever
# held as Python int lists before it is packed
ENCODE_CHUNK = 1024
_STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ("test",)}
# the split a stage evaluates on, which at least one task must have (predict: without a predict file)
_EVALUATED_SPLITS = {"validate": "validation", "test": "test", "predict": "test"}
# a trained task without a validation split of its own holds out this share of its train rows, which are never
# trained on; at most max_val_examples_per_task of them are validated on, as of any validation split
HELD_OUT_FRACTION = 0.1


@dataclasses.dataclass(frozen=True)
class HeldOutSplit:
    """A validation split carved from a task's train rows: disjoint row indices, fixed by the data seed."""

    train_rows: tuple[int, ...]
    validation_rows: tuple[int, ...]

    @property
    def digest(self) -> str:
        """A short fingerprint of the validation rows, which a checkpoint keeps (`MultiTaskDataModule.state_dict`)."""
        return hashlib.sha256(",".join(map(str, self.validation_rows)).encode()).hexdigest()[:16]


# the training sampler draws an epoch's task sequence up front, a Python list of ints on every rank: this bound
# keeps it to about 3.3 GB (0.33 GB at 10**7 draws, measured), where a larger value failed with std::bad_alloc
MAX_SAMPLES_PER_EPOCH = 10 ** 8


def _check_count(name: str, value: Any, optional: bool, minimum: int = 1, maximum: int | None = None,
                 owner: str = "MultiTaskDataModule") -> None:
    """An integer setting of `owner` in [minimum, maximum] (None allowed when optional), named in the error
    otherwise."""
    if value is None and optional:
        return
    if not is_int(value) or value < minimum or (maximum is not None and value > maximum):
        allowed = f"an integer >= {minimum}" + (f" and <= {maximum:,}" if maximum is not None else "") + \
            (", or None" if optional else "")
        raise ValueError(f"{owner} {name}={value!r} is invalid: expected {allowed}")


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """The arguments `MultiTaskDataModule.__init__` received, which the data module runs on. Not `hparams`: those
    record a subclass's own arguments (how `load_from_checkpoint` rebuilds it), which may differ from what it passes
    on (``max_length=max_length + 16``, ``system_prompt=system_prompt or "..."``)."""

    tasks: list[str]
    eval_tasks: list[str] | None
    task_specs: list[dict] | None
    tokenizer: str | None
    max_length: int
    long_targets: LongTargets
    use_chat_template: bool | None
    system_prompt: str | None
    batch_size: int
    eval_batch_size: int | None
    sampling: str
    temperature: float
    cap: int | None
    task_weights: dict[str, float] | None
    unimax_max_epochs: float
    samples_per_epoch: int | None
    max_train_examples_per_task: int | None
    max_eval_examples_per_task: int | None
    max_val_examples_per_task: int | None
    seed: int
    data_seed: int
    num_workers: int
    predict_file: str | None
    trust_remote_code: bool


class MultiTaskDataModule(LightningDataModule):
    """Multi-task data for causal-LM fine-tuning.

    Training draws tasks with the chosen mixing strategy (``sampling``: proportional, capped, temperature, uniform,
    unimax or weights; see ``malora_lightning.data.sampling``). Validation and test give one dataloader per task,
    keyed by task name, so every metric is per task. ``task_id`` is a task's position in ``tasks``: the training
    tasks in the given order, then ``eval_tasks`` (evaluated, never trained on). Predict answers the test splits'
    prompts, or with ``predict_file`` the user's own (see ``malora_lightning.data.prompts``).

    Args:
        tasks: Registered task names to train and evaluate on (default: the built-in offline suite).
        eval_tasks: Task names only evaluated, e.g. ``gsm8k`` after training on ``metamathqa``.
        task_specs: Extra tasks defined inline (see ``task_from_spec``); list their names in ``tasks``/``eval_tasks``.
        tokenizer: Tokenizer name or path (usually the model's: the CLI's default when unset); loaded in ``setup``
            by ``load_tokenizer``. `MALoRAModule` refuses one with more tokens than the model embeds.
        max_length: Longest sequence in tokens; prompts lose tokens from the left of their own text to fit (the
            chat template's turns and headers, or the plain format's BOS and ``\\nAnswer:``, stay), targets never.
            Warned of when above the tokenizer's ``model_max_length`` (and by `MALoRAModule` when above the base
            model's context, ``max_position_embeddings`` stretched by its RoPE scaling).
        long_targets: An example whose target does not fit ``max_length`` (with the prompt format's own tokens and
            one prompt token) is an error naming its row (``"error"``), or is left out of its split and counted in
            the log and the run report (``"skip"``: for instruction data with a few very long answers, such as code).
        use_chat_template: Format with the tokenizer's chat template (``None``: whenever it has one).
        system_prompt: System turn of the chat template; ``None`` keeps the template's default (SmolLM2 adds a
            20-token one to every example), ``""`` an empty system turn. Refused with the plain format, which has no
            system turn.
        batch_size: Training batch size per device.
        eval_batch_size: Evaluation batch size per device (default: ``batch_size``).
        sampling: Task mixing strategy.
        temperature: T of the ``temperature`` strategy (the others ignore it, so its default can stay in a config).
        cap: K of ``capped`` (required) and ``temperature`` (optional): task sizes are clipped to K first; refused
            with any other strategy, which would ignore it.
        task_weights: Task name -> weight, for ``sampling: weights``.
        unimax_max_epochs: UniMax's limit on passes over a task per sampler epoch.
        samples_per_epoch: Training examples per epoch over all devices (default: the sum of the task sizes); with
            ``unimax``, its budget: fewer when every task reaches ``unimax_max_epochs`` passes.
        max_train_examples_per_task: Keep a random subset of at most this many training examples per task.
        max_eval_examples_per_task: Keep a random subset of at most this many validation/test examples per task.
        max_val_examples_per_task: Keep a random subset of at most this many validation examples per task (default:
            ``max_eval_examples_per_task``): validate on a sample during training, test on the whole test splits.
        seed: Seed of the training order.
        data_seed: Seed of generated tasks' data, of the example subsets and of the dataloaders' worker seeds; keep it
            fixed to compare runs on the same items.
        num_workers: DataLoader worker processes.
        predict_file: Prompts to predict on instead of the test splits: JSON lines, JSON or CSV rows with a
            ``prompt``, an optional ``task`` (one of ``tasks``/``eval_tasks``: its generation length and answer check;
            the evaluation splits are still read to measure task lengths) and an optional ``target`` (measured,
            ``predict_target_lengths``, but never lengthening its task's generation). One predict dataloader per task
            named, in task order, then one for the prompts without a task (``"<no task>"``); each prompt keeps its
            row of the file (``PredictPrompt.row``), which its prediction names.
        trust_remote_code: let the tokenizer's folder (or hub repo) run its own code; only for code you trust. The
            CLI links it to ``model.trust_remote_code``.

    Overridable hooks: ``load_tokenizer()`` (or set ``tokenizer_object`` before ``setup``), ``build_encoder(tokenizer)``
    (the prompt format), ``build_collator(eval_fields)`` and ``build_sampler(sizes)``.
    """

    def __init__(
        self,
        tasks: list[str] = list(BUILTIN_TASKS),
        eval_tasks: list[str] | None = None,
        # plain dicts: typed dict[str, Any], the CLI (jsonargparse) parsed each value again as YAML ("7" became 7)
        task_specs: list[dict] | None = None,
        tokenizer: str | None = None,
        max_length: int = 256,
        long_targets: LongTargets = "error",
        use_chat_template: bool | None = None,
        system_prompt: str | None = None,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        sampling: str = "temperature",
        temperature: float = 2.0,
        cap: int | None = None,
        task_weights: dict[str, float] | None = None,
        unimax_max_epochs: float = 1.0,
        samples_per_epoch: int | None = None,
        max_train_examples_per_task: int | None = None,
        max_eval_examples_per_task: int | None = None,
        max_val_examples_per_task: int | None = None,
        seed: int = 0,
        data_seed: int = 0,
        num_workers: int = 0,
        predict_file: str | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        arguments = {name: value for name, value in locals().items() if name not in ("self", "__class__")}
        super().__init__()
        # how `load_from_checkpoint` rebuilds this object: the arguments of its class's own `__init__`
        self.save_hyperparameters(_paths_as_text(constructor_arguments(self, arguments)))
        # what the data module runs on: the arguments it received, not a subclass's own (`hparams`)
        self.settings = DataSettings(**{field.name: arguments[field.name]
                                        for field in dataclasses.fields(DataSettings)})
        if sampling not in SAMPLING_STRATEGIES:
            raise ValueError(f"unknown sampling {sampling!r}; valid: {', '.join(SAMPLING_STRATEGIES)}")
        check_long_targets(long_targets)
        if (task_weights is not None) != (sampling == "weights"):
            raise ValueError("task_weights goes with sampling='weights', and only with it")
        # checked here, not when train_dataloader first mixes the tasks after the model has loaded
        if sampling == "capped" and cap is None:
            raise ValueError("MultiTaskDataModule sampling='capped' needs cap: K, an integer >= 1, the most examples "
                             "a task counts as")
        if cap is not None and sampling not in CAP_STRATEGIES:
            raise ValueError(f"MultiTaskDataModule cap={cap!r} would be ignored: only sampling "
                             f"{' or '.join(map(repr, CAP_STRATEGIES))} uses it (got sampling={sampling!r}); remove "
                             "cap or choose one of those")
        for name, value, optional in (("batch_size", batch_size, False), ("eval_batch_size", eval_batch_size, True),
                                      ("max_length", max_length, False),
                                      ("max_train_examples_per_task", max_train_examples_per_task, True),
                                      ("max_eval_examples_per_task", max_eval_examples_per_task, True),
                                      ("max_val_examples_per_task", max_val_examples_per_task, True),
                                      ("cap", cap, True), ("num_workers", num_workers, False),
                                      # any other value was taken: True, "1" and 2.5 each seeded other data and orders
                                      ("seed", seed, False), ("data_seed", data_seed, False)):
            # a sequence holds at least one prompt token and one target token
            _check_count(name, value, optional,
                         minimum={"num_workers": 0, "max_length": 2, "seed": 0, "data_seed": 0}.get(name, 1))
        # switches: "false" was truthy, and trust_remote_code "false" (or None, which transformers answers from stdin)
        # ran the tokenizer folder's own code
        if use_chat_template is not None and not isinstance(use_chat_template, bool):
            raise ValueError(f"MultiTaskDataModule use_chat_template={use_chat_template!r} is invalid: expected True, "
                             "False or None (whenever the tokenizer has a chat template)")
        if tokenizer is not None and not isinstance(tokenizer, str):  # an AttributeError in setup
            loaded = isinstance(tokenizer, PreTrainedTokenizerBase)
            raise ValueError(f"MultiTaskDataModule tokenizer={type(tokenizer).__name__} is invalid: expected the name "
                             "or folder of a tokenizer as text (the checkpoint records it), or None (the model's)" +
                             ("; to use this loaded tokenizer, set data.tokenizer_object = tokenizer before setup"
                              if loaded else ""))
        if system_prompt is not None and not isinstance(system_prompt, str):  # 5 was written as the text "5"
            raise ValueError(f"MultiTaskDataModule system_prompt={system_prompt!r:.80} is invalid: expected text, or "
                             "None (the chat template's default system turn)")
        check_switch("MultiTaskDataModule trust_remote_code", trust_remote_code)
        _check_count("samples_per_epoch", samples_per_epoch, True, maximum=MAX_SAMPLES_PER_EPOCH)
        for name, value in (("temperature", temperature), ("unimax_max_epochs", unimax_max_epochs)):
            if not is_finite_number(value) or value <= 0:
                raise ValueError(f"MultiTaskDataModule {name}={value!r} is invalid: expected a finite number > 0")
        self.tokenizer_name = tokenizer
        self.tokenizer_object: PreTrainedTokenizerBase | None = None
        self.tokenizer: PreTrainedTokenizerBase | None = None  # the loaded tokenizer, after setup
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self._declared_tasks = _resolve_tasks(tasks, eval_tasks or [], task_specs or [])
        self._tasks = list(self._declared_tasks)
        self._num_train_tasks = len(tasks)
        if task_weights is not None:
            unknown = sorted(set(task_weights) - set(tasks))
            if unknown:
                raise ValueError(f"task_weights names {unknown}, which are not training tasks ({', '.join(tasks)})")
            missing = [name for name in tasks if name not in task_weights]
            if missing:  # a task left out would be listed and evaluated but never trained on
                raise ValueError(f"task_weights has no weight for training tasks {missing}; give every task in "
                                 "tasks a weight (0 leaves a task untrained; a task only to evaluate belongs in "
                                 "eval_tasks)")
            check_weights(task_weights, "task_weights")
        self.truncation: dict[str, dict[str, TruncationStats]] = {}
        self._held_out: dict[str, HeldOutSplit | None] = {}
        self._encoded: dict[str, dict[str, PackedExamples]] = {}
        self._answer_lengths: dict[str, int | None] = {}  # task name -> `_longest_answer`, measured once
        self._encoder: PromptEncoder | None = None
        self._train_sampler: Sampler[int] | None = None
        self._predict_source = predict_source(predict_file) if predict_file is not None else None
        self._predict_prompts: dict[str, PackedExamples] | None = None
        self._predict_target_lengths: dict[str, dict[int, int]] = {}

    # ------------------------------------------------------------------------------------------------ tasks

    @property
    def tasks(self) -> list[Task]:
        """All tasks in ``task_id`` order. After ``setup``, ``max_new_tokens`` is set (`_longest_answer`) where the
        task registers none."""
        return list(self._tasks)

    @property
    def predict_target_lengths(self) -> dict[str, dict[int, int]]:
        """Task name -> {predict file row: tokens of its target's answer}, for the predict file's rows with a task and
        a target, measured as a task's own answers are (`_longest_answer`); empty without a predict file or before
        ``setup("predict")``. They never set a task's generation length: `MALoRAModule` warns of the rows it cannot
        reach."""
        return dict(self._predict_target_lengths)

    @property
    def train_tasks(self) -> list[Task]:
        return self._tasks[: self._num_train_tasks]

    @property
    def encoder(self) -> PromptEncoder | None:
        """The prompt format `setup` built with ``build_encoder``; None before ``setup``."""
        return self._encoder

    @property
    def mixture(self) -> dict[str, float]:
        """Training probability of each task (available once the training split is loaded)."""
        if "train" not in self._encoded:
            raise RuntimeError("the mixture is known once setup('fit') has loaded the training data")
        examples = self._encoded["train"]
        return dict(zip(examples, self._mixing_weights([len(task_examples) for task_examples in examples.values()])))

    # ------------------------------------------------------------------------------------------------ hooks

    def load_tokenizer(self) -> PreTrainedTokenizerBase:
        """The tokenizer: ``tokenizer_object`` if set, else ``tokenizer`` loaded with ``AutoTokenizer`` (an
        ``offline:<model>`` name is resolved like the model's)."""
        if self.tokenizer_object is not None:
            return self.tokenizer_object
        if self.tokenizer_name is None:
            raise ValueError("MultiTaskDataModule needs a tokenizer: pass tokenizer=<name or path> (the CLI's default "
                             "is the model's) or set tokenizer_object before setup")
        path = resolve_model_path(self.tokenizer_name)
        try:
            # explicit: left unset, transformers asks on stdin whether to run a folder's own tokenizer code
            return AutoTokenizer.from_pretrained(path, trust_remote_code=self.settings.trust_remote_code)
        except (OSError, ValueError) as error:
            raise OSError(f"could not load the tokenizer {self.tokenizer_name!r} (resolved to {path!r}): {error}. "
                          "MultiTaskDataModule.tokenizer (in the CLI model.model_name_or_path unless set) must be a "
                          "local folder with tokenizer files, a cached hub id, or an offline model like "
                          "'offline:SmolLM2-135M-Instruct'") from error

    def build_encoder(self, tokenizer: PreTrainedTokenizerBase) -> PromptEncoder:
        return PromptEncoder(tokenizer, self.settings.max_length, self.settings.use_chat_template,
                             self.settings.system_prompt, self.settings.long_targets)

    def build_collator(self, eval_fields: bool) -> MultiTaskCollator:
        """The collate function of the training (``eval_fields`` False) or evaluation loaders. With ``num_workers``
        under spawn or forkserver, it must pickle (`check_worker_collate`)."""
        return MultiTaskCollator(self._encoder.pad_token_id, eval_fields=eval_fields)

    def _worker_collator(self, eval_fields: bool) -> Callable[[Sequence[EncodedExample]], Any]:
        """``build_collator``'s collate function for a loader with this module's workers, checked to reach them."""
        collate = self.build_collator(eval_fields=eval_fields)
        check_worker_collate(collate, self.num_workers, f"{type(self).__name__}.build_collator(eval_fields="
                                                        f"{eval_fields})")
        return collate

    def build_sampler(self, sizes: Sequence[int]) -> Sampler[int]:
        """The training sampler over the tasks' concatenated examples (``sizes``: each task's count, in order). Any
        torch ``Sampler`` works; one with ``state_dict(consumed=)`` and ``load_state_dict`` (``TaskBalancedSampler``'s
        checkpoint protocol) resumes mid-epoch where the saved run stopped, any other restarts its order on resume
        (`ResumableDataLoader` warns once)."""
        settings = self.settings
        num_samples = settings.samples_per_epoch
        if settings.sampling == "unimax":
            num_samples = unimax_epoch_length(sizes, num_samples, settings.unimax_max_epochs)
        return TaskBalancedSampler(sizes, self._mixing_weights(sizes), num_samples=num_samples, seed=settings.seed)

    def _mixing_weights(self, sizes: Sequence[int]) -> list[float]:
        settings = self.settings
        weights = None
        if settings.task_weights is not None:
            weights = [settings.task_weights[task.name] for task in self.train_tasks]
        return mixing_weights(sizes, settings.sampling, cap=settings.cap, temperature=settings.temperature,
                              weights=weights, budget=settings.samples_per_epoch, max_epochs=settings.unimax_max_epochs)

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None,
                             hparams_file: str | Path | None = None, weights_only: bool = True,
                             trust_remote_code: bool = False, **kwargs: Any) -> MultiTaskDataModule:
        """`LightningDataModule.load_from_checkpoint`, with the checkpoint read as data (`weights_only=True` unless
        the caller passes False: Lightning's default, None, unpickled an http(s) checkpoint with weights_only=False,
        running whatever code the file names) and, as `MALoRAModule.load_from_checkpoint`, a damaged file refused by
        its path, an `hparams_file` read as data, no class imported by the stored hyperparameters and
        `trust_remote_code` taken from the caller (default False), never from the file (`checkpoints.load_arguments`):
        a stored `trust_remote_code: true` beside a stored `tokenizer` ran that folder's tokenizer code in `setup`."""
        _, arguments = load_arguments(cls, checkpoint_path, hparams_file, trust_remote_code, kwargs)
        return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, weights_only=weights_only,
                                            **arguments)

    # ------------------------------------------------------------------------------------------------ setup

    def prepare_data(self) -> None:
        """Fetch hub datasets, and convert an offline tokenizer's model (`resolve_model_path`), once per node: Lightning
        calls this on one process before ``setup`` on all, where each rank converted it again."""
        if self.tokenizer_object is None and self.tokenizer_name is not None:
            resolve_model_path(self.tokenizer_name)
        for task in self._tasks:
            if isinstance(task.source, HubSource):
                for split in task.source.splits:
                    task.source.load(split, self.settings.data_seed)

    def setup(self, stage: str | None = None) -> None:
        stage = TrainerFn(stage or "fit").value  # Lightning passes a TrainerFn, which f-strings write as its name
        self._check_overfit_batches(stage)
        self._check_split_files(stage)
        with reading_files_once():
            self._check_something_to_evaluate(stage)
            if self._encoder is None:
                self.tokenizer = self.load_tokenizer()
                self._check_model_max_length(self.tokenizer)
                self._encoder = self.build_encoder(self.tokenizer)
            trained_prompts: dict[str, dict[str, int | None]] = {}  # per task, of the train split encoded here
            for split in self._encoded_splits(stage):
                if split not in self._encoded:
                    self._encoded[split] = self._encode_split(split, trained_prompts)
            self._tasks = [self._with_generation_length(task) for task in self._declared_tasks]
        if stage == "predict" and self._predict_source is not None and self._predict_prompts is None:
            prompts = read_prompts(self._predict_source, [task.name for task in self._tasks])
            self._predict_prompts = self._encode_prompts(prompts)
            self._predict_target_lengths = self._target_lengths(prompts)

    def _encoded_splits(self, stage: str) -> tuple[str, ...]:
        """The splits ``stage`` encodes: none for predict with a predict file, whose prompts replace the test splits
        (`_longest_answer` still reads them for the tasks' generation lengths); encoding them tokenised every test
        row, which nothing read, and a test row that does not fit stopped a predict run it takes no part in."""
        if stage == "predict" and self._predict_source is not None:
            return ()
        return _STAGE_SPLITS[stage]

    def _check_split_files(self, stage: str) -> None:
        """Refuse a fit when a file a task names for any split does not exist, naming each: setup reads only the
        stage's splits (and the evaluation splits for a generation length the task spec does not give), so a
        mistyped test file was found by ``malora test``, after the whole fit. Existence only: reading a large file
        here would cost time, and its rows are checked where it is read. Not for validate, test or predict, which
        need no train file."""
        if stage != "fit":
            return
        missing = [f"task {task.name!r}, {split} file {path} {not_a_file(path)}"
                   for task in self._declared_tasks if isinstance(task.source, FileSource)
                   for split in task.source.splits for path in [task.source.path(split)] if not path.is_file()]
        if missing:
            raise FileNotFoundError("; ".join(missing) + ": every split file a task names is checked before a fit, "
                                    "not only when its split is read (a test file's by malora test, after training); "
                                    "fix the path in the task spec (path: {train: ..., test: ...}), or in the "
                                    "FileSource of a task registered from Python")

    def _check_model_max_length(self, tokenizer: PreTrainedTokenizerBase) -> None:
        """Warn when ``max_length`` exceeds the longest sequence the tokenizer's model takes (``model_max_length``,
        ``VERY_LARGE_INTEGER`` where the tokenizer records none): the longer sequences would reach the model
        with positions it never saw."""
        limit, max_length = tokenizer.model_max_length, self.settings.max_length
        if is_int(limit) and limit < VERY_LARGE_INTEGER and max_length > limit:
            rank_zero_warn(f"MultiTaskDataModule max_length={max_length} exceeds the tokenizer's "
                           f"model_max_length={limit}: a sequence longer than {limit} tokens gets positions the model "
                           "was not trained on (a model with learned position embeddings stops with an index error); "
                           f"set max_length to at most {limit}")

    def _check_overfit_batches(self, stage: str) -> None:
        """Refuse a fit under Lightning's ``overfit_batches``: it swaps every loader's sampler for a
        ``SequentialSampler`` over its dataset, so training read the concatenated tasks in order (the first task's
        examples alone, silently, whatever the sampling) and validation failed in `EvaluationShard` with an
        AttributeError, since that sampler yields plain ints instead of `ShardIndex`."""
        trainer = self.trainer
        if trainer is None or stage != "fit" or not trainer.overfit_batches:
            return
        first = self.train_tasks[0].name if self.train_tasks else "the first task"
        raise ValueError(f"Trainer(overfit_batches={trainer.overfit_batches}) cannot run with MultiTaskDataModule: "
                         "Lightning replaces its samplers with sequential ones, so training would see only the first "
                         f"task's examples ({first!r}), not the task mixture, and validation could not read its "
                         "loaders. Set overfit_batches=0; to fit a few fixed examples of every task, set "
                         "max_train_examples_per_task (and limit_train_batches, limit_val_batches)")

    def _check_something_to_evaluate(self, stage: str) -> None:
        """validate, test and predict (without a predict file) need a task with the split they evaluate: without one,
        the model would load and Lightning run nothing, writing no metrics or predictions, and exit as a success.
        (fit without validation rows still trains, and says which tasks are not validated.)"""
        split = _EVALUATED_SPLITS.get(stage)
        if split is None or (stage == "predict" and self._predict_source is not None):
            return
        if any(self._evaluates(task, split) for task in self._tasks):
            return
        provided = "; ".join(f"{task.name}: {', '.join(task.source.splits) or 'none'}" for task in self._tasks)
        advice = ""
        if split == "validation":
            advice = ("; a trained task without one is validated on rows held out from its train split when it has "
                      "two or more")
        elif stage == "predict":
            advice = ", or run predict with predict_file=<your prompts>"
        raise TaskDataError(f"{stage} has nothing to evaluate: no task has a {split} split (tasks and the splits they "
                            f"provide: {provided}); give a task a {split} file (in a task spec, path: {{train: ..., "
                            f"{split}: ...}}) or list a task that has one{advice}")

    def _evaluates(self, task: Task, split: str) -> bool:
        """Whether ``task`` is evaluated on an evaluation split: its own, or for validation rows held out from train."""
        return task.has_split(split) or (split == "validation" and self.held_out(task) is not None)

    def held_out(self, task: Task) -> HeldOutSplit | None:
        """The validation split carved from a trained task's train rows when it has none of its own (and at least
        two train rows): `HELD_OUT_FRACTION` of them, at least one. It does not depend on
        `max_val_examples_per_task`, which only picks the held-out rows evaluated (`_encode_split`): otherwise a
        later ``validate`` with another limit would move the boundary and validate on rows the fit trained on."""
        if task.name in self._held_out:
            return self._held_out[task.name]
        split = None
        trained = task.name in {train_task.name for train_task in self.train_tasks}
        if trained and task.has_split("train") and not task.has_split("validation"):
            count = task.num_rows("train", self.settings.data_seed)
            held = max(1, round(HELD_OUT_FRACTION * count))
            if count >= 2:
                order = list(range(count))
                random.Random(f"{self.settings.data_seed}:{task.name}:held-out").shuffle(order)
                split = HeldOutSplit(train_rows=tuple(sorted(order[held:])),
                                     validation_rows=tuple(sorted(order[:held])))
        self._held_out[task.name] = split
        return split

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the data: the training tasks, the data seed and, for each task validated on rows
        held out from its train rows, those rows' `HeldOutSplit.digest`, so that a run from the checkpoint can tell
        when it would train on other tasks or validate on rows the checkpoint's fit trained on (`load_state_dict`)."""
        carved = {name: split.digest for name, split in self._held_out.items() if split is not None}
        return {"train_tasks": [task.name for task in self.train_tasks], "data_seed": self.settings.data_seed,
                "held_out_rows": carved}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Warn when a fit resumes on other training tasks (the sampler restores its position by task sizes alone,
        so tasks of the same sizes resumed without a word), and when a task's held-out validation rows differ from
        those of the checkpoint's run (another ``data_seed``, or another train file): some of them were trained on
        there, so the scores overstate. Not in a test or predict run, which scores no validation rows."""
        trainer = self.trainer
        if trainer is not None and trainer.state.fn not in (TrainerFn.FITTING, TrainerFn.VALIDATING):
            return
        stored_tasks = state_dict.get("train_tasks")  # None in checkpoints written before it was kept
        current_tasks = [task.name for task in self.train_tasks]
        if (trainer is None or trainer.state.fn == TrainerFn.FITTING) and stored_tasks not in (None, current_tasks):
            rank_zero_warn(f"Resuming a fit that trained on tasks {stored_tasks} with tasks {current_tasks}: training "
                           "goes on from that run's step, epoch, learning-rate schedule and sampler position, now on "
                           "these tasks; to start a new training stage from its adapters instead, fit without "
                           "ckpt_path and with the model's adapter_path set to that run's adapter folder")
        stored = state_dict.get("held_out_rows", {})
        moved = [task.name for task in self.train_tasks if task.name in stored
                 and (split := self.held_out(task)) is not None and split.digest != stored[task.name]]
        if moved:
            seed, stored_seed = self.settings.data_seed, state_dict.get("data_seed")
            cause = f"data_seed {stored_seed} there, {seed} here" if stored_seed != seed else \
                "the same data_seed, so their train files changed"
            rank_zero_warn(f"Tasks {moved} are validated on rows held out from their train rows, and these are not "
                           f"the rows the checkpoint's run held out ({cause}): this run validates partly on rows "
                           f"that run trained on, so their scores overstate; give data_seed={stored_seed} to "
                           "validate on the rows it held out")

    def _limit_setting(self, split: str) -> str:
        """The ``max_*_examples_per_task`` setting that caps ``split``."""
        if split == "train":
            return "max_train_examples_per_task"
        if split == "validation" and self.settings.max_val_examples_per_task is not None:
            return "max_val_examples_per_task"
        return "max_eval_examples_per_task"

    def _limit(self, split: str) -> int | None:
        """The most examples per task of ``split`` kept: its ``max_*_examples_per_task``."""
        return getattr(self.settings, self._limit_setting(split))

    def _evaluated_count(self, rows: int) -> int:
        """How many of a validation split's ``rows`` are evaluated (``_limit``)."""
        limit = self._limit("validation")
        return rows if limit is None else min(rows, limit)

    def report_sections(self) -> list[str]:
        """What the run report should say about the data: validation splits carved from train rows, and examples
        left out because their targets do not fit (``long_targets="skip"``), which the scores exclude."""
        sections = []
        carved = {name: split for name, split in self._held_out.items() if split is not None}
        if carved:
            rows = [f"| {name} | {len(split.validation_rows)} | "
                    f"{self._evaluated_count(len(split.validation_rows))} | {len(split.train_rows)} |"
                    for name, split in carved.items()]
            header = ("## Validation splits held out from training data\n\nThese tasks have no validation split of "
                      f"their own; {HELD_OUT_FRACTION:.0%} of their train rows are held out and never trained on, "
                      "whatever max_val_examples_per_task is; at most max_val_examples_per_task (default: "
                      "max_eval_examples_per_task) of them are validated on."
                      "\n\n| task | held-out rows | validated rows | train rows left |\n|---|---|---|---|")
            sections.append("\n".join([header, *rows]))
        skipped = [f"| {name} | {split} | {stats.skipped} | {stats.examples} | {stats.longest_skipped} |"
                   for split, per_task in self.truncation.items() for name, stats in per_task.items() if stats.skipped]
        if skipped:
            header = (f"## Examples left out: targets longer than max_length={self.settings.max_length} allows\n\n"
                      "With long_targets='skip', these examples were neither trained on nor scored: the scores of "
                      "these splits are over the rest.\n\n| task | split | left out | of | longest target or choice "
                      "(tokens) |"
                      "\n|---|---|---|---|---|")
            sections.append("\n".join([header, *skipped]))
        return sections

    def _split_tasks(self, split: str) -> list[tuple[int, Task]]:
        if split == "train":
            missing = [task.name for task in self.train_tasks if not task.has_split("train")]
            if missing:
                raise TaskDataError(f"tasks {missing} have no train split; list them under eval_tasks")
            return list(enumerate(self.train_tasks))
        evaluated = [(task_id, task) for task_id, task in enumerate(self._tasks) if self._evaluates(task, split)]
        evaluated_ids = {task_id for task_id, _ in evaluated}
        skipped = [task.name for task_id, task in enumerate(self._tasks) if task_id not in evaluated_ids]
        if skipped:
            logger.warning("Tasks %s have no %s split and are not evaluated on it.", skipped, split)
        return evaluated

    def _encode_split(self, split: str, trained_prompts: dict[str, dict[str, int | None]]
                      ) -> dict[str, PackedExamples]:
        """Encode each task's examples of `split`. Encoding train records each task's prompts (with their first row)
        in `trained_prompts`; encoding an evaluated split afterwards warns of the examples whose prompt is there."""
        settings = self.settings
        limit = self._limit(split)
        encoded, self.truncation[split], cut = {}, {}, []
        for task_id, task in self._split_tasks(split):
            held_out = self.held_out(task) if split in ("train", "validation") else None
            if held_out is None:
                examples = task.examples(split, seed=settings.data_seed, limit=limit)
                rows = task.num_rows(split, settings.data_seed) if len(examples) == limit else len(examples)
            else:  # the cap samples the rows left to this split by the held-out split, and is named like any other
                kept = held_out.train_rows if split == "train" else held_out.validation_rows
                if split == "validation":  # said where the rows are validated on, not where a test run sizes answers
                    held, count = len(kept), len(kept) + len(held_out.train_rows)
                    logger.warning("Task %r has no validation split: %d of its %d train rows are held out and not "
                                   "trained on; %d of them are validated on.", task.name, held, count,
                                   self._evaluated_count(held))
                examples = task.examples("train", seed=settings.data_seed, limit=limit, only_rows=kept)
                rows = len(kept)
            if rows > len(examples):
                cut.append(f"{task.name} {len(examples)} of {rows}")
            if split == "train":
                trained_prompts[task.name] = {}
                for example in examples:
                    trained_prompts[task.name].setdefault(example.prompt, example.row)
            elif task.name in trained_prompts:
                warn_of_trained_prompts(task.name, split if held_out is None else "held-out train", examples,
                                        trained_prompts[task.name])
            packed, stats = pack_in_chunks(examples, lambda chunk: self._encoder.encode(
                chunk, task_id, task.name, split, with_eval_fields=split != "train"))
            encoded[task.name] = packed
            if stats.skipped and stats.skipped == stats.examples:
                raise TaskDataError(f"task {task.name!r} {split}: the targets of all {stats.examples} examples chosen "
                                    f"(up to {stats.longest_skipped} tokens) do not fit max_length="
                                    f"{settings.max_length} with the prompt format's own tokens and a prompt token, "
                                    "so long_targets='skip' left every one out; raise max_length (or the split's "
                                    "max_*_examples_per_task, if it has shorter rows)")
            self._count_truncation(split, task.name, stats)
        if cut:  # the default recipe's cap scored `malora test` on 32 rows of a larger test file without a word
            logger.info("%s: at most %d examples per task (%s), a random subset fixed by data_seed: %s", split,
                        limit, self._limit_setting(split), ", ".join(cut))
        return encoded

    def _encode_prompts(self, prompts: list[PredictPrompt]) -> dict[str, PackedExamples]:
        """A predict file's prompts grouped into one loader per task (task order), then those without a task. Each
        group is encoded in chunks of `ENCODE_CHUNK`, as a task's split is: encoded whole, a group's prompts were all
        held as Python int lists at once (BENCHMARKS.md, "Many tasks, long predict files")."""
        groups = [(task_id, task.name, task.max_new_tokens or 0) for task_id, task in enumerate(self._tasks)]
        encoded = {}
        for task_id, name, answer_room in groups + [(-1, None, 0)]:
            group = [prompt for prompt in prompts if prompt.task == name]
            if group:
                key = NO_TASK if name is None else name
                encoded[key], stats = pack_in_chunks(
                    group, lambda chunk: self._encoder.encode_prompts(chunk, task_id, answer_room))
                self._count_truncation("predict", key, stats)
        return encoded

    def _target_lengths(self, prompts: list[PredictPrompt]) -> dict[str, dict[int, int]]:
        """`predict_target_lengths` of a predict file's rows, with ``PromptEncoder.answer_lengths`` (end-of-turn
        token included), as `_longest_answer` measures a task's answers."""
        scored = [prompt for prompt in prompts if prompt.task is not None and prompt.target is not None]
        lengths: dict[str, dict[int, int]] = {}
        answers = self._measure_answers([Example(prompt.prompt, prompt.target) for prompt in scored])
        for prompt, length in zip(scored, answers):
            lengths.setdefault(prompt.task, {})[prompt.row] = length
        return lengths

    def _measure_answers(self, examples: Sequence[Example], where: str = "example") -> list[int]:
        """``PromptEncoder.answer_lengths`` of ``examples``, in chunks of `ENCODE_CHUNK`: in one call every answer's
        rendering and token ids were held at once, to keep one number (BENCHMARKS.md, "Many tasks, long predict
        files")."""
        return [length for chunk in in_chunks(examples) for length in self._encoder.answer_lengths(chunk, where)]

    def _count_truncation(self, split: str, name: str, stats: TruncationStats) -> None:
        self.truncation.setdefault(split, {})[name] = stats
        if stats.skipped:
            logger.warning("Task %r %s: %d of %d examples left out (long_targets='skip'): their targets, up to %d "
                           "tokens, do not fit max_length=%d.", name, split, stats.skipped, stats.examples,
                           stats.longest_skipped, self.settings.max_length)
        if stats.truncated:
            logger.warning("Task %r %s: %d of %d prompts were cut from the left to fit max_length=%d "
                           "(%d tokens dropped).", name, split, stats.truncated, stats.examples,
                           self.settings.max_length, stats.tokens_dropped)

    def _with_generation_length(self, task: Task) -> Task:
        """A registered length wins; otherwise `_longest_answer`."""
        if task.max_new_tokens is not None:
            return task
        if task.name not in self._answer_lengths:
            self._answer_lengths[task.name] = self._longest_answer(task)
        length = self._answer_lengths[task.name]
        return task if length is None else dataclasses.replace(task, max_new_tokens=length)

    def _longest_answer(self, task: Task) -> int | None:
        """A task's generation budget: its longest answer in tokens (end-of-turn token included) over every row of
        its evaluation splits, validation and test, whatever the stage and ``max_eval_examples_per_task`` (a
        validation split held out from train rows counts as carved, by ``held_out``), so that a checkpoint generates
        the same answers in fit, validate and test. ``None`` for a task without evaluation rows.

        Measured with ``PromptEncoder.answer_lengths``: ``encode`` would refuse a row whose target does not fit
        ``max_length`` though it may never be evaluated."""
        seed = self.settings.data_seed
        held_out = self.held_out(task)
        splits = [] if held_out is None else [("train", task.examples("train", seed=seed,
                                                                      only_rows=held_out.validation_rows))]
        splits += [(split, task.examples(split, seed=seed)) for split in ("validation", "test")
                   if task.has_split(split)]
        longest = max((length for split, examples in splits
                       for length in self._measure_answers(examples, f"task {task.name!r}, {split}")),
                      default=None)
        # an answer trains with at least one prompt token: a longer one is left out (long_targets="skip") or refused
        return None if longest is None else min(longest, self.settings.max_length - 1)

    # ------------------------------------------------------------------------------------------------ loaders

    def train_dataloader(self) -> DataLoader:
        per_task = list(self._loaded("train").values())
        self._train_sampler = self.build_sampler([len(examples) for examples in per_task])
        self._start_at_fit_epoch(self._train_sampler)
        return ResumableDataLoader(ConcatDataset(per_task),
                                   batch_size=self.batch_size, sampler=self._train_sampler,
                                   collate_fn=self._worker_collator(eval_fields=False), num_workers=self.num_workers,
                                   pin_memory=self._pins_training_batches(),
                                   persistent_workers=self.num_workers > 0, consumed=self._consumed_this_epoch,
                                   restored=self._restored_training_loader,
                                   generator=self._loader_generator("train"))

    def _pins_training_batches(self) -> bool:
        """Whether the training loader pins its batches (`TrainingBatch.pin_memory`): on CUDA, where Lightning's
        ``non_blocking`` copy of a batch to the GPU is asynchronous only from pinned memory (Lightning pins nothing
        itself). Not elsewhere: pinning needs a GPU."""
        return isinstance(getattr(self.trainer, "accelerator", None), CUDAAccelerator)

    def _start_at_fit_epoch(self, sampler: Sampler[int]) -> None:
        """Set a new training sampler to the epoch the fit loop is about to give it. Lightning 2.6 starts the loader's
        iterator before it sets the epoch, and keeps that iterator for the first epoch of a fit resumed from a
        checkpoint written after an epoch's end: DataLoader workers fetch ahead as it starts, so that epoch trained on
        epoch 0's draws (Lightning-AI/pytorch-lightning#21938). Same epoch as Lightning's `_set_sampler_epoch`."""
        trainer = self.trainer
        set_epoch = getattr(sampler, "set_epoch", None)
        if trainer is None or trainer.state.fn != TrainerFn.FITTING or not callable(set_epoch):
            return
        set_epoch(trainer.fit_loop.epoch_progress.current.processed)

    def val_dataloader(self) -> dict[str, DataLoader]:
        return self._eval_loaders(self._loaded("validation"))

    def test_dataloader(self) -> dict[str, DataLoader]:
        return self._eval_loaders(self._loaded("test"))

    def predict_dataloader(self) -> dict[str, DataLoader]:
        """The predict file's prompts when there is one, else the test splits."""
        if self._predict_source is None:
            return self._eval_loaders(self._loaded("test"))
        if self._predict_prompts is None:
            raise RuntimeError("the predict file is not loaded: call setup('predict') first")
        return self._eval_loaders(self._predict_prompts)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """An evaluation or predict batch's task ids checked against its task names (`check_task_ids`) while it is
        still on the CPU, so that reading them waits for nothing. Training batches pass unchecked: training reads
        the names alone. The data module's hook, not the model's: Lightning warns on every run where a model's
        overrides it beside a data module, and ignores it where the data module's does."""
        if not self.trainer.training:
            check_task_ids(batch, [task.name for task in self.tasks])
        return batch

    def _eval_loaders(self, examples_by_name: dict[str, PackedExamples]) -> dict[str, DataLoader]:
        """One loader per task, each rank its `EvaluationShardSampler` shard (padded: the same number of batches on
        every rank)."""
        collator = self._worker_collator(eval_fields=True)
        return {name: DataLoader(EvaluationShard(examples), batch_size=self.eval_batch_size, collate_fn=collator,
                                 sampler=EvaluationShardSampler(len(examples)), num_workers=self.num_workers,
                                 generator=self._loader_generator(name))
                for name, examples in examples_by_name.items()}

    def _loader_generator(self, purpose: str) -> Generator:
        """A loader's own generator. Each iterator a DataLoader starts takes its workers' base seed from it, or from
        torch's global generator, which dropout draws from, when it has none: the training loader starts one at each
        epoch, after the checkpoint written at the end of the last, so that draw made a resume from such a
        checkpoint differ from the uninterrupted run."""
        return seeded_generator(self.settings.data_seed, "loader", purpose)

    def _loaded(self, split: str) -> dict[str, PackedExamples]:
        if split not in self._encoded:
            raise RuntimeError(f"the {split} split is not loaded: call setup() with a stage that uses it first")
        return self._encoded[split]

    def task_dataloader(self, task: str, split: str = "train", max_examples: int | None = None) -> DataLoader:
        """One task's examples of a loaded split, in order, with the training fields (input_ids, attention_mask,
        labels): what a pass over one task's data needs, e.g. its routing profile (`merge.task_profile`). With
        `max_examples`, a random subset of them fixed by the data seed (the first ones of a file sorted by topic or
        length would stand for the whole task)."""
        # 0 gave an empty loader, -1 random.sample's error
        _check_count("max_examples", max_examples, optional=True, owner="MultiTaskDataModule.task_dataloader")
        examples = self._loaded(split)
        if task not in examples:
            raise ValueError(f"task {task!r} has no {split} examples loaded; loaded: {sorted(examples)}")
        chosen = examples[task]
        if max_examples is not None and max_examples < len(chosen):
            rows = random.Random(f"{self.settings.data_seed}:{task}:{split}:subset").sample(range(len(chosen)),
                                                                                            max_examples)
            chosen = [chosen[row] for row in sorted(rows)]
        return DataLoader(chosen, batch_size=self.eval_batch_size, collate_fn=self.build_collator(eval_fields=False),
                          generator=self._loader_generator(task))

    def _consumed_this_epoch(self) -> int | None:
        """Examples this rank has trained on in the current epoch, from the fit loop's batch progress; ``None``
        outside a fit (then the sampler's own count is all there is)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return None
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if progress.processed >= trainer.num_training_batches:
            return len(self._train_sampler)  # the epoch is over (possibly cut short by limit_train_batches)
        return progress.processed * self.batch_size

    def _restored_training_loader(self, state: Mapping[str, Any]) -> None:
        """Lightning has just given the training loader its checkpointed ``state`` (a fit resumed mid-epoch, or with
        ``max_steps``)."""
        trainer = self.trainer
        if trainer is None or trainer.state.fn != TrainerFn.FITTING:
            return
        complete_epoch_end_restore(trainer)
        if isinstance(self._train_sampler, TaskBalancedSampler):
            rebase_restored_batches(trainer, self._train_sampler, self.batch_size, state)


class _WorkerPickler(pickle.Pickler):
    """Pickles a collate function as a worker start does, refusing the Lightning objects it would drag along."""

    def reducer_override(self, obj: Any) -> Any:
        if isinstance(obj, (LightningDataModule, lightning.LightningModule, Trainer)):
            raise TypeError(f"it holds a {type(obj).__name__} (the data module, the trainer or the model, through a "
                            "bound method or an attribute), which would be copied into each worker with everything "
                            "it holds")
        return NotImplemented


def check_worker_collate(collate: Callable[..., Any], num_workers: int, where: str) -> None:
    """Refuse, naming ``where``, a collate function that DataLoader workers cannot receive: spawn and forkserver
    (the default start methods on macOS and Windows, and on Linux from Python 3.14) pickle it for each worker. A lambda
    or a local function failed inside the worker start, and Lightning's teardown then raised "Please call
    `iter(combined_loader)` first." in its place; a bound method of the data module pickled the trainer and the model
    into each worker, which died ("DataLoader worker ... exited unexpectedly"). fork copies the process and pickles
    nothing, so any collate function works there and is not checked. Pickled with plain pickle, which copies tensors
    instead of moving them to shared memory as the workers' pickler does."""
    if num_workers == 0:
        return
    # allow_none: asking otherwise fixes the start method, and a later set_start_method of the user's would fail
    method = multiprocessing.get_start_method(allow_none=True) or multiprocessing.get_all_start_methods()[0]
    if method == "fork":
        return
    try:
        _WorkerPickler(io.BytesIO()).dump(collate)
    except Exception as error:  # noqa: BLE001 - pickling raises several kinds (PicklingError, AttributeError, ...)
        raise TypeError(f"{where} returned a collate function ({collate!r:.100}) that the DataLoader workers "
                        f"(num_workers={num_workers}, started by {method!r}) cannot receive, since {method} pickles "
                        f"it for each worker: {error}. Return one that pickles and holds only what collating needs "
                        "(the pad token id, a tokenizer): an instance of a class defined at a module's top level, a "
                        "top-level function, or a functools.partial of one; or set num_workers=0") from error


def in_chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    """`items` in slices of `ENCODE_CHUNK`, in order: what is encoded is only ever held a chunk at a time."""
    return (items[start:start + ENCODE_CHUNK] for start in range(0, len(items), ENCODE_CHUNK))


def pack_in_chunks(items: Sequence[Any], encode: Callable[[Sequence[Any]], tuple[list[EncodedExample],
                                                                                  TruncationStats]]
                   ) -> tuple[PackedExamples, TruncationStats]:
    """`encode` (a `PromptEncoder` call) over `items` a chunk at a time (`in_chunks`), packed as each chunk is made,
    with the chunks' truncation counts added up."""
    packed, stats = PackedExamples(), TruncationStats()
    for chunk in in_chunks(items):
        encoded, chunk_stats = encode(chunk)
        packed.extend(encoded)
        stats.add(chunk_stats)
    return packed, stats


def warn_of_trained_prompts(task: str, split: str, examples: Sequence[Example],
                            trained_prompts: Mapping[str, int | None]) -> None:
    """Warn when evaluated examples of `task` have the prompt of one of its training examples: their scores would
    measure recall of answers trained on, not generalisation, and nothing else shows it."""
    seen = [(example.row, trained_prompts[example.prompt]) for example in examples
            if example.prompt in trained_prompts]
    if seen:
        pairs = ", ".join(f"{split} row {row} = train row {trained}" for row, trained in seen[:3])
        logger.warning("Task %r %s: %d of %d evaluated examples have the prompt of a training example (%s%s): their "
                       "scores measure recall of the trained answers; remove them from one of the splits.", task,
                       split, len(seen), len(examples), pairs, ", ..." if len(seen) > 3 else "")


class EvaluationShard(Dataset[EncodedExample]):
    """A task's evaluation examples, looked up by the `ShardIndex` its `EvaluationShardSampler` yields: a padding
    index gives its example marked ``counted=False``, which the collator carries into `EvaluationBatch.counted`."""

    def __init__(self, examples: Sequence[EncodedExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, key: ShardIndex) -> EncodedExample:
        example = self.examples[key.index]
        return example if key.counted else dataclasses.replace(example, counted=False)


class ResumableDataLoader(DataLoader):
    """The training DataLoader, which Lightning checkpoints and restores (before iterating) because it has
    ``state_dict``/``load_state_dict``. Its state is the sampler's position counted in batches trained on, given by
    ``consumed()``: Lightning and DataLoader workers fetch ahead, so the sampler's own count runs early. Outside a fit
    (``consumed()`` None) with workers, it is counted from the batches this loader's latest iterator has handed out
    (`_handed_out`). It also holds the batch size that count was made in (see `rebase_restored_batches`). A sampler
    without that protocol (`resumable`; e.g. a plain ``WeightedRandomSampler`` from ``build_sampler``) has an empty
    state: the fit still checkpoints and resumes, with the sampler's order started afresh, which one warning says."""

    def __init__(self, *args: Any, consumed: Callable[[], int | None],
                 restored: Callable[[Mapping[str, Any]], None] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.consumed = consumed
        self.restored = restored  # called with the state once it is loaded: see `complete_epoch_end_restore`
        self._warned = False
        # with workers: the latest iterator, the sampler epoch it iterates and the draw (across ranks) it started at
        self._latest: tuple[Any, int, int] | None = None

    def __iter__(self) -> Any:
        iterator = super().__iter__()
        start = getattr(self.sampler, "iteration_start", None)
        if self.num_workers > 0 and start is not None:  # the workers have already drawn from this iteration
            self._latest = (iterator, self.sampler.epoch, start)
        return iterator

    def state_dict(self) -> dict[str, Any]:
        if not resumable(self.sampler):
            self._warn_unresumable()
            return {}
        consumed = self.consumed()
        if consumed is None:
            consumed = self._handed_out()
        return {**self.sampler.state_dict(consumed=consumed), "batch_size": self.batch_size}

    def _handed_out(self) -> int | None:
        """This rank's draws of the epoch in the batches the latest iterator has handed out, when workers fetched
        ahead of them (None otherwise: the sampler's own count is exact without workers)."""
        if self._latest is None:
            return None
        iterator, epoch, start = self._latest
        if epoch != self.sampler.epoch:  # set_epoch since: that iteration says nothing of this epoch
            return None
        # `_num_yielded`: the batches a torch DataLoader iterator has returned (it warns with it past an iterable
        # dataset's length)
        handed_out = start // self.sampler.num_replicas + iterator._num_yielded * self.batch_size
        return min(handed_out, len(self.sampler))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._latest = None
        if resumable(self.sampler):
            self.sampler.load_state_dict(state_dict)
        else:
            self._warn_unresumable()
        if self.restored is not None:
            self.restored(state_dict)

    def _warn_unresumable(self) -> None:
        if not self._warned:
            self._warned = True
            rank_zero_warn(f"The training sampler {type(self.sampler).__name__} has no state_dict(consumed=...) and "
                           "load_state_dict (TaskBalancedSampler's checkpoint protocol), so checkpoints do not hold "
                           "its position: a resumed fit restarts its order instead of continuing where the saved run "
                           "stopped.")


def resumable(sampler: Any) -> bool:
    """Whether ``sampler`` speaks the checkpoint protocol of `TaskBalancedSampler`: ``state_dict(consumed=)`` (the
    position counted in draws trained on) and ``load_state_dict(state)``."""
    state_dict = getattr(sampler, "state_dict", None)
    if not callable(state_dict) or not callable(getattr(sampler, "load_state_dict", None)):
        return False
    return "consumed" in inspect.signature(state_dict).parameters


# The Lightning release (major, minor) whose loop restore `complete_epoch_end_restore` was checked against (2.6.6).
_EPOCH_END_RESTORE_VERIFIED = (2, 6)


def complete_epoch_end_restore(trainer: Trainer) -> None:
    """Resume a checkpoint written in ``on_train_epoch_end`` (ModelCheckpoint's save at a training epoch's end) at
    the next epoch's first batch, as the uninterrupted run goes on, when Lightning restores it with ``max_steps``.

    Lightning marks an epoch completed only after its ``on_train_epoch_end`` hooks, so such a checkpoint's fit loop
    says "epoch N processed, not completed" and its batch progress "last batch done". Without ``max_steps`` Lightning
    counts the epoch completed on load (``RESUMED_ON_EPOCH_END``) and all is well. With ``max_steps`` (iteration-based
    training: the fit loop is always "restarting") Lightning 2.6 restarts *inside* epoch N (``RESTARTED_ON_EPOCH_END``
    with the epoch loop ``RESTARTED_ON_LAST``): the epoch loop waits for a validation that was not saved as run, so
    without validation it trains one more batch as epoch N's (a plain DataLoader gives its first batch again; this
    sampler, already at epoch N+1, its first draws), and either way it runs epoch N's ``on_train_epoch_end`` hooks
    again and counts epoch N processed twice, so the sampler is next set to epoch N+2: epoch N+1's draws are skipped
    (all of them with validation, all but the extra batch's without). A neighbouring upstream report:
    Lightning-AI/pytorch-lightning#19617 (resuming is not correct when max_steps falls at an epoch's end).

    Called when Lightning hands the training loader its state (``FitLoop.setup_data``, before the loops work out
    where they restart), it completes what the checkpoint interrupted: epoch N is counted completed and the epoch
    loop starts afresh, as at every epoch start; the sampler's state (epoch N+1, position 0) already matches. Only a
    state that finished its epoch's last batch and no more is touched, and only on the Lightning versions checked;
    on others such a resume warns that its batches will differ.
    """
    fit_loop = trainer.fit_loop
    epochs, batches = fit_loop.epoch_progress.total, fit_loop.epoch_loop.batch_progress.current
    epoch_end = (epochs.ready == epochs.started == epochs.processed == epochs.completed + 1
                 and batches.ready == batches.started == batches.processed == batches.completed)
    if not epoch_end:
        return
    if tuple(int(part) for part in lightning.__version__.split(".")[:2]) != _EPOCH_END_RESTORE_VERIFIED:
        rank_zero_warn(f"Checkpoint {trainer.ckpt_path} was written at the end of training epoch {epochs.completed}, "
                       f"and Lightning {lightning.__version__} restores such a checkpoint with max_steps by going "
                       f"back into that epoch (2.6 trained an extra batch there and skipped the next epoch's draws); "
                       f"the correction is checked for Lightning 2.6 only, so the resumed run's batches and losses "
                       f"may differ from the uninterrupted run's.")
        return
    fit_loop.epoch_progress.increment_completed()
    fit_loop.epoch_loop.restarting = False  # its reset() then starts the next epoch as every other epoch starts


def rebase_restored_batches(trainer: Trainer, sampler: TaskBalancedSampler, batch_size: int,
                            state: Mapping[str, Any]) -> None:
    """Count the restored epoch's progress in this run's batches when the checkpoint's were of another size (another
    world size or ``batch_size``), and say what the change means.

    Lightning restores how many of the epoch's batches were trained, in the saved run's batches; it ends the epoch when
    that count reaches this run's number of batches, and `MultiTaskDataModule._consumed_this_epoch` turns it into the
    next checkpoint's position with this run's batch. Left as saved, a resume on more processes cut the epoch short
    (draws skipped), and one on fewer saved positions short of the draws trained (draws trained twice on the next
    resume). So the counters move to the number of this run's batches the sampler's position amounts to, all by the
    same shift (their differences tell Lightning at which hook of the batch the checkpoint was written), or to a
    finished epoch's count when the checkpoint followed the epoch's last batch; a position inside one of this run's
    batches goes back to that batch's start (`TaskBalancedSampler.resume_at_batch_start`). A checkpoint from before
    the state held its world and batch size is taken as counted in this run's."""
    saved_world, saved_batch = state.get("num_replicas"), state.get("batch_size")
    world = sampler.num_replicas
    if saved_world is None or saved_batch is None or (saved_world, saved_batch) == (world, batch_size):
        return
    finished = sampler.epoch > trainer.current_epoch  # the sampler state has moved on to the next epoch
    if finished:
        batches, repeated = math.ceil(len(sampler) / batch_size), 0
    else:
        batches, repeated = sampler.resume_at_batch_start(batch_size)
    progress = trainer.fit_loop.epoch_loop.batch_progress
    progress.increment_by(batches - progress.current.processed, is_last_batch=progress.is_last_batch)
    saved_step, step = saved_world * saved_batch, world * batch_size
    if finished or batches + repeated == 0:
        where = f"epoch {sampler.epoch} starts from its first draw"
    else:
        start = batches * step
        where = (f"it stopped epoch {sampler.epoch} after {start + repeated} draws, and the epoch goes on from draw "
                 f"{start} as this run's batch {batches}")
        if repeated == 1:
            where += f"; draw {start} of epoch {sampler.epoch} is trained again, since it falls inside that batch"
        elif repeated:
            where += (f"; draws {start} to {start + repeated - 1} of epoch {sampler.epoch} ({repeated}) are trained "
                      "again, since they fall inside that batch")
    if step == saved_step:
        consequence = (f"A step still trains {step} examples, the same ones, so max_steps, val_check_interval and the "
                       "learning-rate schedule cover the saved run's examples; the losses differ from the saved run's "
                       "as its batches do (each batch's loss is its own token mean, and each process draws its own "
                       "dropout).")
    else:
        consequence = (f"From here a step trains {step} examples instead of {saved_step}, so max_steps, "
                       "val_check_interval, gradient accumulation and the learning-rate schedule, counted in steps or "
                       "batches, cover other examples than the saved run's; to continue that run exactly, resume on "
                       f"{saved_world} process(es) with batch_size={saved_batch}.")
    rank_zero_warn(f"Checkpoint {trainer.ckpt_path} was counted in batches of {saved_batch} on {saved_world} "
                   f"process(es), {saved_step} examples a step, and this run has batches of {batch_size} on {world}, "
                   f"{step} a step: {where}. {consequence}")


def _path_as_text(value: Any) -> Any:
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _paths_as_text(hyperparameters: dict[str, Any]) -> dict[str, Any]:
    """The data module's hyperparameters with a `pathlib.Path` (`predict_file`, a task spec's `path` or a split's
    file in it) as its text, as `MALoRAModule` records `adapter_path`: both take a Path, but a checkpoint, read as
    data (weights_only), cannot give one back, and the fit refused it before training
    (`_check_loadable_hyperparameters`)."""
    recorded = dict(hyperparameters)
    if "predict_file" in recorded:  # a subclass's own argument of that name too
        recorded["predict_file"] = _path_as_text(recorded["predict_file"])
    specs = recorded.get("task_specs")
    if isinstance(specs, list):
        recorded["task_specs"] = [
            {**spec, "path": ({split: _path_as_text(file) for split, file in spec["path"].items()}
                              if isinstance(spec["path"], Mapping) else _path_as_text(spec["path"]))}
            if isinstance(spec, Mapping) and "path" in spec else spec for spec in specs]
    return recorded


def _resolve_tasks(tasks: list[str], eval_tasks: list[str], specs: list[dict[str, Any]]) -> list[Task]:
    """The named tasks, looked up among the inline specs first, then the registry."""
    for setting, named in (("tasks", tasks), ("eval_tasks", eval_tasks)):
        if isinstance(named, str):  # its letters were looked up as task names: "unknown task 'p'"
            raise ValueError(f"MultiTaskDataModule {setting}={named!r} is invalid: expected a list of task names "
                             f"([{named!r}])")
    if not tasks:
        raise ValueError("MultiTaskDataModule needs at least one training task")
    inline, numbers = {}, {}
    for number, spec in enumerate(specs):
        if not isinstance(spec, Mapping):
            raise ValueError(f"task_specs[{number}] is a {type(spec).__name__}: each task spec is a mapping such as "
                             "{name: ..., path: ..., prompt: ..., target: ...}")
        task = task_from_spec(spec)
        if task.name in inline:  # the later spec would replace the earlier one, and its files would go unread
            raise ValueError(f"task_specs[{numbers[task.name]}] and task_specs[{number}] are both named "
                             f"{task.name!r}; give each task spec its own name")
        if task.name in registered_tasks():
            logger.info("task_specs[%d] %r is used in place of the registered task of that name", number, task.name)
        inline[task.name], numbers[task.name] = task, number
    names = list(tasks) + list(eval_tasks)
    twice = repeated(names)
    if twice:
        raise ValueError(f"tasks listed more than once (in tasks or eval_tasks): {twice}")
    unknown = [name for name in names if name not in inline and name not in registered_tasks()]
    if unknown and inline:  # get_task lists the registered tasks alone: a misspelled spec name was not among them
        raise ValueError(f"unknown task {unknown[0]!r}; task_specs: {', '.join(inline)}; registered tasks: "
                         f"{', '.join(registered_tasks())}; {NOT_IMPORTED}")
    unused = [name for name in inline if name not in names]
    if unused:  # a recipe of specs without `tasks` trained the built-in suite, never naming the specs it left out
        logger.warning("task_specs %s are named in neither tasks nor eval_tasks, so this run does not use them: list "
                       "them in data.tasks to train on (it replaces the built-in suite) or data.eval_tasks to evaluate "
                       "only", unused)
    return [inline[name] if name in inline else get_task(name) for name in names]
