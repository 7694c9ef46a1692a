"""`MALoRAModule`: a LightningModule that fine-tunes a (4-bit) Hugging Face causal LM with LoRA, MoLoRA or MALoRA.

This file builds the model, steps and optimises; evaluation and prediction live in `evaluation.py` (a mixin), the
schedule and AdamW choice in `optim.py`, exact resume, the stop at a non-finite loss and the adapter export in callbacks
the module attaches (`configure_callbacks`). Extension points (small methods to override in a subclass): `build_model`,
`compute_lm_loss`, `evaluate_batch`, `score_choices`, `generate_predictions`, `trainable_parameter_groups`.
"""

from __future__ import annotations

import contextvars
import functools
import io
import logging
import math
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal, get_args

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Callback, GradientAccumulationScheduler
from lightning.pytorch.plugins.io.wrapper import _WrappingCheckpointIO
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy, Strategy
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import AttributeDict, rank_zero_warn
from torch import nn
from torch.distributed.fsdp import fully_shard

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_state_dict,
    compile_adapters,
    count_parameters,
    inject_adapters,
    load_adapters,
    load_base_model,
    read_adapter_folder,
    router_losses,
)
from malora_lightning.adapters.layers import RoutedAdapterLayer
from malora_lightning.adapters.model import (
    COMPILE_MODES,
    drop_routing_record,
    enable_activation_checkpointing,
    get_adapter_config,
    routed_layers,
    trained_tensor_names,
    unwrapped_name,
    weighted_router_loss,
)
from malora_lightning.adapters.quantization import (
    DtypeName,
    Quantization,
    StorageDtypeName,
    check_quant_storage_has_4bit,
)
from malora_lightning.callbacks.export import AdapterExport
from malora_lightning.callbacks.random_state import TrainingRandomState
from malora_lightning.callbacks.summary import HeldWeights
from malora_lightning.checkpoints import (
    CHECKPOINT_FORMAT,
    CHECKPOINT_FORMAT_KEY,
    SETTINGS_KEY,
    CheckedCheckpointIO,
    check_checkpoint_file,
    check_checkpoint_format,
    check_checkpoint_settings,
    check_fsdp2_optimizer_layout,
    check_strategy_loadable,
    computed_otherwise,
    is_remote,
    load_arguments,
    read_checkpoint,
    stored_adapter_settings,
    stored_settings,
    upgrade_checkpoint,
)
from malora_lightning.data.batches import TrainingBatch, check_batch
from malora_lightning.data.datamodule import MultiTaskDataModule
from malora_lightning.evaluation import EvaluationMixin
from malora_lightning.fsdp_units import check_fsdp1_units, wrapped_classes
from malora_lightning.hardware import resolve_compute_dtype
from malora_lightning.hyperparameters import constructor_arguments
from malora_lightning.offline_models import (
    recorded_model_name,
    relative_record_note,
    resolve_model_path,
    same_model,
)
from malora_lightning.optim import (
    SCHEDULES,
    AdapterSchedule,
    Schedule,
    adamw_options,
    estimated_stepping_batches,
    lr_multiplier,
    schedule_length,
)
from malora_lightning.scoring import pair_log_likelihoods, target_pairs, task_means
from malora_lightning.values import is_finite_number, is_int, user_path

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "offline:SmolLM2-135M-Instruct"
# AdapterConfig fields that decide which adapter tensors train, hence AdamW's parameter groups: a resumed fit must
# agree with its checkpoint on them, or the checkpoint's optimizer state does not fit the optimizer
TRAINING_FIELDS = ("train_A", "train_P", "train_shared_A")
# the 4-bit layers' compute dtype: `load_base_model`'s, or "auto" (`resolve_compute_dtype`)
ComputeDtype = Literal["auto", DtypeName]
# the file `MALoRAModule.load_from_checkpoint` is loading, for `on_load_checkpoint`'s errors (no trainer names it)
_LOADED_FILE: contextvars.ContextVar[str | Path | None] = contextvars.ContextVar("loaded_file", default=None)
# the arguments the caller of `MALoRAModule.load_from_checkpoint` gave by name (None outside it): the others come from
# the file, which may not choose code (`_refuse_hub_kernel_from_a_file`)
_CALLER_ARGUMENTS: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("caller_arguments",
                                                                                          default=None)
# Trainer precisions that convert the whole module (adapters included) to a half dtype
TRUE_HALF_PRECISIONS = {"bf16-true": "bfloat16", "16-true": "float16"}


def compile_mode(setting: bool | str) -> str | None:
    """The torch.compile mode for `MALoRAModule(compile_adapters=setting)`, None for eager."""
    if setting is True:
        return "default"
    return setting or None


@dataclass(frozen=True)
class ModuleSettings:
    """The settings `MALoRAModule.__init__` received (its adapter is `MALoRAModule.adapter_config`; a local base
    folder by its absolute path, `recorded_model_name`). The module runs on these, not on `hparams`: those record how
    to rebuild the object, by a subclass's own arguments, which may fix some of ours or change one before passing it
    on. A checkpoint stores them as they ran (`SETTINGS_KEY`)."""

    model_name_or_path: str
    quantization: Quantization | None
    compute_dtype: ComputeDtype
    dtype: DtypeName | None
    quant_storage: StorageDtypeName | None
    learning_rate: float
    weight_decay: float
    router_learning_rate: float | None
    router_weight_decay: float | None
    warmup_ratio: float
    lr_schedule: Schedule
    gradient_checkpointing: bool
    attn_implementation: str | None
    trust_remote_code: bool
    max_new_tokens: int | None
    export_adapters: bool
    adapter_path: str | None
    compile_adapters: bool | str


def context_length(text_config: Any) -> int | None:
    """The positions a base handles: ``max_position_embeddings``, or its RoPE scaling factor times the original length
    where that is longer (Qwen2.5's YaRN recipe keeps ``max_position_embeddings`` at the original 32,768 and sets
    factor 4); None when the config names no length."""
    context = getattr(text_config, "max_position_embeddings", None)
    rope = getattr(text_config, "rope_parameters", None) or {}
    factor = rope.get("factor") if isinstance(rope, Mapping) else None  # per-layer-type parameters are not stretched
    if not is_int(context) or not is_finite_number(factor) or factor <= 1:
        return context
    original = rope.get("original_max_position_embeddings", context)
    return max(context, int(factor * original)) if is_int(original) else context


@dataclass
class LMLoss:
    """Token-mean LM loss of a batch and its per-task parts (for logging). ``per_task_tokens`` weighs a task's parts
    from the batches of one optimizer step (gradient accumulation, DDP or FSDP ranks); a part without an entry (an
    override that gives none) weighs 1."""

    loss: torch.Tensor
    per_task: dict[str, torch.Tensor]
    per_task_tokens: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class _StepEnd:
    """An optimizer step's losses as its last batch leaves them (`MALoRAModule.training_step`), for
    `MALoRAModule.check_step_losses` to read on the host and log once the step's backward is queued."""

    keys: list[str]  # the names the step's losses are logged under, in `sums` order: train/loss, train/lm_loss, ...
    batch_size: int  # the step's last batch's, as Lightning is told it
    tasks: list[str]  # on several ranks, the data module's tasks, whose sums `sums` holds in this order
    sums: torch.Tensor  # `MALoRAModule._step_sums`


class MALoRAModule(EvaluationMixin, L.LightningModule):
    """Fine-tune a causal LM's adapters on a multi-task mixture.

    Args:
        model_name_or_path: local folder, hub id, or offline model ("offline:SmolLM2-135M-Instruct"). A folder given
            by a relative path is recorded (checkpoints, the exported adapter folder) by its absolute path, so that
            they load from any directory.
        quantization: bitsandbytes quantization of the frozen base: "nf4", "fp4", "int8" or None.
        compute_dtype: dtype the 4-bit layers compute in; "auto" picks bfloat16 where the device runs bf16 fast
            (CUDA GPUs from Ampere on, CPUs with AVX512-BF16 or AMX) and float32 elsewhere (far faster on plain AVX2
            CPUs: BENCHMARKS.md).
        dtype: dtype the base's weights are loaded in (None: compute_dtype when quantized, else float32). An
            unquantized base stays in it; a quantized base's other weights (norms, embeddings, head) are rounded
            through it and then kept in float32 for training (`prepare_for_adapter_training`).
        quant_storage: storage dtype of packed 4-bit weights; set it to `dtype` for FSDP with a 4-bit base.
        adapter: which adapters to inject (LoRA, MoLoRA, MALoRA) and their hyperparameters.
        learning_rate: AdamW learning rate of the adapters.
        weight_decay: AdamW weight decay of the adapters.
        router_learning_rate: learning rate of the routers; None uses `learning_rate`.
        router_weight_decay: weight decay of the routers; None uses `weight_decay`.
        warmup_ratio: fraction of the training steps spent in linear warm-up.
        lr_schedule: decay after warm-up: "linear", "cosine" or "constant". The LLaMA-2 recipes use linear, the
            paper setting's usual HF default (it states none); the default job and this default, cosine.
        gradient_checkpointing: recompute activations in backward (non-reentrant, so router losses keep gradients).
        attn_implementation: attention kernel for transformers ("sdpa", "eager"); None lets it choose.
        trust_remote_code: allow model code from the hub; only for code you trust.
        max_new_tokens: cap on generated tokens per answer; None uses each task's own length (for a prompt without
            a task, `evaluation.DEFAULT_MAX_NEW_TOKENS`).
        export_adapters: at the end of fit, save the adapters (`save_adapters`) next to the checkpoints.
        adapter_path: an adapter folder to start from (written by `save_adapters`, or a LoRA folder PEFT saved): its
            adapters are loaded instead of fresh ones, with the folder's own adapter settings (`adapter` is then
            ignored), so `validate`, `test` and `predict` evaluate an exported adapter and `fit` trains it further.
            The folder must name the same base model as `model_name_or_path` when it names one.
        compile_adapters: run each adapted layer's adapter path through torch.compile (`compile_adapters`): True
            (inductor's default mode) or a torch.compile mode name ("reduce-overhead" for CUDA graphs); False runs
            eagerly, which measured as fast or faster for the default job on CPU, and on an H200 for a 4-bit LLaMA-2-7B
            shape (BENCHMARKS.md).
            The first steps of training and of evaluation pay the compilation.
    """

    def __init__(
        self,
        model_name_or_path: str = DEFAULT_MODEL,
        quantization: Quantization | None = "nf4",
        compute_dtype: ComputeDtype = "auto",
        dtype: DtypeName | None = None,
        quant_storage: StorageDtypeName | None = None,
        adapter: AdapterConfig | None = None,
        learning_rate: float = 5e-4,
        weight_decay: float = 0.01,
        router_learning_rate: float | None = None,
        router_weight_decay: float | None = None,
        warmup_ratio: float = 0.1,
        lr_schedule: Schedule = "cosine",
        gradient_checkpointing: bool = False,
        attn_implementation: str | None = None,
        trust_remote_code: bool = False,
        max_new_tokens: int | None = None,
        export_adapters: bool = True,
        adapter_path: str | None = None,
        compile_adapters: bool | Literal["default", "reduce-overhead", "max-autotune",
                                         "max-autotune-no-cudagraphs"] = False,
    ) -> None:
        arguments = dict(locals())
        if not isinstance(model_name_or_path, str) or not model_name_or_path:
            raise ValueError(f"MALoRAModule model_name_or_path={model_name_or_path!r} is invalid: expected a local "
                             "folder, a hub id or an offline model ('offline:SmolLM2-135M-Instruct')")
        # the base as checkpoints and the exported adapter folder record it: usable from any directory
        arguments["model_name_or_path"] = recorded_model_name(model_name_or_path)
        super().__init__()
        _check_settings(learning_rate=learning_rate, weight_decay=weight_decay,
                        router_learning_rate=router_learning_rate, router_weight_decay=router_weight_decay,
                        warmup_ratio=warmup_ratio, lr_schedule=lr_schedule, max_new_tokens=max_new_tokens,
                        quantization=quantization, compute_dtype=compute_dtype, dtype=dtype,
                        quant_storage=quant_storage, compile_adapters=compile_adapters, adapter=adapter,
                        adapter_path=adapter_path, attn_implementation=attn_implementation,
                        gradient_checkpointing=gradient_checkpointing, trust_remote_code=trust_remote_code,
                        export_adapters=export_adapters)
        if adapter_path is not None:  # recorded as text (a checkpoint read as data cannot give back a Path) and
            # absolute: a relative path names the folder only from the directory the run started in
            arguments["adapter_path"] = adapter_path = os.path.abspath(user_path(adapter_path))
        if isinstance(adapter, dict):  # from a checkpoint's hyperparameters
            adapter = AdapterConfig.from_dict(adapter)
        self.adapter_config = adapter if adapter is not None else AdapterConfig()
        if adapter_path is not None:
            self.adapter_config = self._adapter_folder_config(adapter_path, model_name_or_path)
        _refuse_hub_kernel_from_a_file(attn_implementation)
        self.settings = ModuleSettings(**{field.name: arguments[field.name] for field in fields(ModuleSettings)})
        # hyperparameters: how `load_from_checkpoint` rebuilds this object, i.e. the arguments of its class's own
        # `__init__` (a subclass's, which need not name ours), as plain data that torch.load(weights_only=True) reads
        recorded = _as_stored(constructor_arguments(self, {name: value for name, value in arguments.items()
                                                             if name not in ("self", "__class__")}))
        if "adapter" in recorded:
            recorded["adapter"] = self.adapter_config.to_dict()  # an adapter_path folder's, when there is one
        if isinstance(recorded.get("model_name_or_path"), str):  # ours, or a subclass's own argument of that name
            recorded["model_name_or_path"] = recorded_model_name(recorded["model_name_or_path"])
        if isinstance(recorded.get("adapter_path"), (str, Path)) and recorded["adapter_path"]:  # a subclass's too
            recorded["adapter_path"] = os.path.abspath(user_path(recorded["adapter_path"]))
        self.save_hyperparameters(recorded)
        self.strict_loading = False  # checkpoints hold adapters only; on_load_checkpoint checks they are complete
        self.model: nn.Module | None = None
        self._tokenizer = None
        # the tasks whose training loss this process has logged (one missing from a later step is logged as NaN
        # there), and the current optimizer step's per-task losses with their target tokens, by batch (`training_step`)
        self._logged_tasks: set[str] = set()
        # the epoch and the tasks whose latest logged training loss in it is that NaN (`training_step`)
        self._nan_tasks: tuple[int, set[str]] = (-1, set())
        self._step_task_parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._step_losses: list[torch.Tensor] = []  # the step's batches' train/loss, lm_loss, ... (`training_step`)
        # (batch_idx, loss, lm_loss, aux_loss) of each batch since the last `check_step_losses`, on the device
        self._unchecked_losses: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        # the ended optimizer step's losses, from its last batch until `check_step_losses` reads and logs them
        self._step_end: _StepEnd | None = None
        # a resumed fit's checkpoint step: until the trainer's step reaches it, its step and optimizer are not restored
        self._resume_step: int | None = None
        # the gradient accumulations whose validations inside windows this fit has judged (`on_train_epoch_start`)
        self._judged_accumulations: set[int] = set()
        # which weights the module holds, for the run outputs to name the weights an evaluation scored, whichever
        # trainer evaluates them: set when `configure_model` builds the model (from an adapter folder, or
        # initialised), when a checkpoint replaces them (`on_load_checkpoint`, `load_from_checkpoint` too) and after
        # each optimizer step of a fit (`on_train_batch_end`)
        self.held_weights = HeldWeights(step=0)
        self._fit_start_step = 0  # the trainer's step when the current fit began training (`on_train_start`)

    @property
    def hparams_initial(self) -> AttributeDict:
        """Lightning's, as checkpoints store it (`on_save_checkpoint`): an `AdapterConfig` (put back by a subclass's own
        `save_hyperparameters()`) as its dict. The loggers record these: a logger's hparams.yaml held the object as a
        Python tag, which `load_from_checkpoint(hparams_file=...)` refuses, and TensorBoard its repr as one value."""
        return AttributeDict(_as_stored(super().hparams_initial))

    @property
    def learning_rate(self) -> float:
        """The adapters' AdamW learning rate the module runs with (`settings.learning_rate`; the routers' too unless
        `router_learning_rate` is set). Settable, for Lightning's learning-rate finder (`Tuner.lr_find`,
        `LearningRateFinder`): it sets a module's `learning_rate` and `hparams.learning_rate`, and with `hparams` alone
        the fit trained at the old rate while the finder logged "Learning rate set to" the new one."""
        return self.settings.learning_rate

    @learning_rate.setter
    def learning_rate(self, value: float) -> None:
        if not is_finite_number(value) or value < 0:
            raise ValueError(f"MALoRAModule learning_rate={value!r} is invalid: expected a finite number >= 0")
        self.settings = replace(self.settings, learning_rate=float(value))

    def _adapter_folder_config(self, adapter_path: str, model_name_or_path: str) -> AdapterConfig:
        folder = read_adapter_folder(adapter_path)
        if folder.base_model is not None and not same_model(folder.base_model, model_name_or_path):
            raise ValueError(f"adapter_path {adapter_path} holds adapters for base model {folder.base_model!r}, but "
                             f"model_name_or_path is {model_name_or_path!r}"
                             f"{relative_record_note(folder.base_model, model_name_or_path)}: set model_name_or_path "
                             "to the folder's base (or pass an adapter trained on this one)")
        differing = [f"{name}: folder {value!r}, given {getattr(self.adapter_config, name)!r}"
                     for name, value in folder.config.to_dict().items() if value != getattr(self.adapter_config, name)]
        if differing:  # as PEFT's from_pretrained takes a folder's config, whatever the run's recipe says
            logger.info("adapter_path %s: the folder's adapter settings apply, not the model.adapter given (%s)",
                        adapter_path, "; ".join(differing))
        return folder.config

    @classmethod
    def load_from_checkpoint(cls, checkpoint_path: str | Path, map_location: Any = None,
                             hparams_file: str | Path | None = None, strict: bool | None = None,
                             weights_only: bool = True, trust_remote_code: bool = False,
                             **kwargs: Any) -> MALoRAModule:
        """`LightningModule.load_from_checkpoint`, with the checkpoint read as data (`weights_only=True`), no class
        imported by its hyperparameters, and `trust_remote_code` taken from the caller (default False) or the class's
        own code, never from the file's hyperparameters (`checkpoints.load_arguments`), and no attention kernel from
        the Hub unless the caller names it (`_refuse_hub_kernel_from_a_file`)."""
        named, arguments = load_arguments(cls, checkpoint_path, hparams_file, trust_remote_code, kwargs)
        token, given = _LOADED_FILE.set(named), _CALLER_ARGUMENTS.set(frozenset(arguments))
        try:
            with warnings.catch_warnings():  # the frozen base is never in a checkpoint; on_load_checkpoint checks it
                warnings.filterwarnings("ignore", message="Found keys that are in the model state dict but not in "
                                                          "the checkpoint", category=UserWarning)
                return super().load_from_checkpoint(checkpoint_path, map_location, hparams_file, strict,
                                                    weights_only=weights_only, **arguments)
        finally:
            _LOADED_FILE.reset(token)
            _CALLER_ARGUMENTS.reset(given)

    # ------------------------------------------------------------------ model
    def prepare_data(self) -> None:
        """Convert an offline base (`resolve_model_path`) once per node: Lightning calls this on one process before
        the others build the model, where each rank converted it again."""
        resolve_model_path(self.settings.model_name_or_path)

    def setup(self, stage: str) -> None:
        """Before Lightning restores a `ckpt_path`: with the default checkpoint IO (also under Lightning's
        `AsyncCheckpointIO`: `use_checked_checkpoint_io`), a cut-off or foreign file is refused by its path (torch's
        own error names none) and read as data, and saves are atomic (`CheckedCheckpointIO`); a strategy that
        reads the file itself, or a checkpoint IO of one's own, gets it checked and read as data first, as the `malora`
        commands do (`read_as_data_before_loading`). A fit
        also warns of settings that quietly break what the run asks for: no validation after training begins (an
        interval beyond max_steps; beyond max_epochs, and validations inside an accumulation window:
        `on_train_start`), and a true half precision that overrides `adapter_dtype`."""
        self._resume_step = None  # an earlier fit of this module may have stopped while restoring
        if stage == "fit":  # Lightning writes both classes' hyperparameters into every checkpoint
            _check_loadable_hyperparameters(_as_stored(self.hparams), "hyperparameter")
            if self.trainer.datamodule is not None:
                _check_loadable_hyperparameters(self.trainer.datamodule.hparams, "data module hyperparameter")
        strategy = self.trainer.strategy
        use_checked_checkpoint_io(strategy)
        # a strategy that reads files without its checkpoint IO, or a checkpoint IO of one's own
        if type(strategy).load_checkpoint is not Strategy.load_checkpoint or not loads_as_data(strategy.checkpoint_io):
            read_as_data_before_loading(strategy)
        # a duration (val_check_interval="00:00:10:00") leaves Lightning 2.6's trainer without `val_check_interval`
        interval = getattr(self.trainer, "val_check_interval", None)
        accumulate = max(scheduled_accumulations(self.trainer))  # the most batches max_steps can take
        batches = self.trainer.max_steps * accumulate  # without per-epoch validation, the interval counts these
        if stage == "fit" and isinstance(interval, int) and self.trainer.check_val_every_n_epoch is None \
                and 0 < batches < interval:
            warn_never_validates(f"val_check_interval={interval} exceeds the fit's {batches} training batches "
                                 f"(max_steps={self.trainer.max_steps})", "val_check_interval", batches)
        precision = str(self.trainer.precision)
        half = TRUE_HALF_PRECISIONS.get(precision)
        if stage == "fit" and half is not None and self.adapter_config.adapter_dtype != half:
            rank_zero_warn(f"precision={precision!r} converts the whole module to {half}, the adapters too: "
                           f"adapter_dtype={self.adapter_config.adapter_dtype!r} does not hold, and AdamW's moments "
                           f"and the checkpoints' adapter tensors are {half} as well (AdamW on {half} weights loses "
                           f"small updates). precision={precision.replace('-true', '-mixed')!r} keeps the adapters "
                           "in adapter_dtype")

    def configure_model(self) -> None:
        if self.model is None:
            self.model = self.build_model()
            folder = self.settings.adapter_path
            self.held_weights = HeldWeights(step=0, adapter_folder=None if folder is None else Path(folder).name)
            logger.info("%s", count_parameters(self.model))  # before a sharding strategy splits the parameters
            self._check_context_length()
            self._check_vocabulary()
            strategy = self.trainer.strategy if self._trainer is not None else None
            if isinstance(strategy, (ModelParallelStrategy, FSDPStrategy)):
                self._same_initial_adapters_on_every_rank()
            if isinstance(strategy, ModelParallelStrategy):
                self.shard_model()
            elif isinstance(strategy, FSDPStrategy):  # Lightning wraps after this: refuse what FSDP1 cannot flatten
                mixed_precision = strategy.mixed_precision_config
                check_fsdp1_units(self.model, wrapped_classes(strategy.kwargs.get("auto_wrap_policy")),
                                  None if mixed_precision is None else mixed_precision.param_dtype,
                                  strategy.kwargs.get("ignored_modules") or ())

    def _check_context_length(self) -> None:
        """Warn when the data module's ``max_length`` exceeds the base model's context (`context_length` of the text
        config: a multimodal base's own config has none): the longer sequences would get positions the model never
        saw, and nothing said so."""
        datamodule = self.trainer.datamodule if self._trainer is not None else None
        if isinstance(datamodule, MultiTaskDataModule):
            max_length = datamodule.settings.max_length  # what it runs on (a subclass's hparams may differ)
        else:
            max_length = datamodule.hparams.get("max_length") if datamodule is not None else None
        text_config = self.model.config.get_text_config()
        context = context_length(text_config)
        if is_int(max_length) and is_int(context) and max_length > context:
            stretch = "" if context == text_config.max_position_embeddings else " after its RoPE scaling"
            rank_zero_warn(f"data max_length={max_length} exceeds the base model's context of {context} tokens "
                           f"(max_position_embeddings={text_config.max_position_embeddings}{stretch}; "
                           f"{self.settings.model_name_or_path}): a sequence longer than {context} tokens gets "
                           "positions the model was not trained on (a model with learned position embeddings, such "
                           f"as GPT-2, stops with an index error); set data max_length to at most {context}")

    def _check_vocabulary(self) -> None:
        """Refuse a data module's tokenizer with more tokens than the base model has embeddings (one not the model's:
        the CLI's `data.tokenizer`, or the API's): its higher ids would fail inside the embedding lookup with an index
        error that names neither."""
        tokenizer = getattr(self._datamodule, "tokenizer", None)
        embeddings = self.model.get_input_embeddings()
        rows = getattr(embeddings, "num_embeddings", None)
        if tokenizer is not None and is_int(rows) and len(tokenizer) > rows:
            raise ValueError(f"the data module's tokenizer ({getattr(tokenizer, 'name_or_path', '')!r}) has "
                             f"{len(tokenizer)} tokens and the base model {self.settings.model_name_or_path!r} embeds "
                             f"{rows}: give data.tokenizer the model's own tokenizer (leave it unset in the CLI)")

    def _same_initial_adapters_on_every_rank(self) -> None:
        """Give every rank rank zero's freshly initialised adapters (and any other trained tensor of the model)
        before FSDP shards them. FSDP keeps each rank's own shard of its own tensors, and unlike DDP does not
        broadcast them: ranks whose random states differ (no common seed_everything) trained a model stitched from
        several random inits, with an S_A whose rows are no longer orthonormal (paper Eq. 8). The frozen base is
        loaded from the same files on every rank and is left as it is."""
        if not torch.distributed.is_available() or not torch.distributed.is_initialized() \
                or torch.distributed.get_world_size() == 1:
            return
        device = self.trainer.strategy.root_device  # where the backend communicates (CUDA for NCCL)
        tensors = {id(tensor): tensor for tensor in [*adapter_state_dict(self.model).values(),
                                                     *(p for p in self.model.parameters() if p.requires_grad)]}
        with torch.no_grad():
            for tensor in tensors.values():
                if tensor.is_meta:  # materialised later, by whoever initialises it
                    continue
                own = tensor.detach()
                carrier = own.to(device)  # `own` itself where it is on that device already
                torch.distributed.broadcast(carrier, src=0)
                if carrier is not own:
                    own.copy_(carrier)

    def shard_model(self) -> None:
        """FSDP2 under `ModelParallelStrategy`: each decoder layer is one unit, then the rest of the model.

        The frozen base and the adapters of a layer share a unit (FSDP2 allows mixed requires_grad). A tensor-parallel
        mesh dimension is refused: there is no tensor-parallel plan, and its ranks' replicas would train apart.
        """
        if self.settings.quantization is not None:
            raise ValueError("ModelParallelStrategy (FSDP2) cannot shard bitsandbytes 4/8-bit layers; use "
                             "quantization=null with dtype=bfloat16, or for FSDP-QLoRA FSDPStrategy with the 4-bit "
                             "linears as units of their own and quant_storage (recipes/llama2-7b/hardware/"
                             "fsdp-qlora.yaml)")
        names = self.device_mesh.mesh_dim_names or ()
        tensor_parallel = self.device_mesh["tensor_parallel"].size() if "tensor_parallel" in names else 1
        if tensor_parallel > 1:  # no tensor-parallel plan: each tensor-parallel rank would train a replica of its own
            raise ValueError(f"ModelParallelStrategy has tensor_parallel_size={tensor_parallel} (Lightning's default "
                             "'auto' is the number of devices), but MALoRAModule shards with FSDP2 over the "
                             "data-parallel ranks only and has no tensor-parallel plan: those ranks would each train "
                             "a replica of their own on other batches, never synchronised. Set data_parallel_size to "
                             "the number of devices and tensor_parallel_size=1 (recipes/llama2-7b/hardware/fsdp.yaml)")
        mesh = self.device_mesh["data_parallel"] if "data_parallel" in names else self.device_mesh
        layer_classes = set(getattr(self.model, "_no_split_modules", None) or [])
        for module in self.model.modules():
            if type(module).__name__ in layer_classes:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)

    def build_model(self) -> nn.Module:
        """Load the (quantized) base, inject the adapters; override to customise either step."""
        settings = self.settings
        device = self.trainer.strategy.root_device if self._trainer is not None else torch.device("cpu")
        device_map = {"": device} if settings.quantization is not None and device.type != "cpu" else None
        model = load_base_model(settings.model_name_or_path, quantization=settings.quantization,
                                compute_dtype=resolve_compute_dtype(settings.compute_dtype, device.type),
                                dtype=settings.dtype,
                                quant_storage=settings.quant_storage, device_map=device_map,
                                attn_implementation=settings.attn_implementation,
                                trust_remote_code=settings.trust_remote_code,
                                input_grads=False)  # its activation checkpointing is non-reentrant
        if settings.adapter_path is not None:
            load_adapters(model, settings.adapter_path, trainable=True)
        else:
            inject_adapters(model, self.adapter_config)
        mode = compile_mode(settings.compile_adapters)
        if mode is not None:
            compile_adapters(model, mode)
        model.train()  # from_pretrained returns eval mode; Lightning keeps modules' modes, and dropout must be on
        if settings.gradient_checkpointing:
            enable_activation_checkpointing(model, use_reentrant=False)
            model.disable_input_require_grads()  # transformers turns them on for reentrant checkpointing's sake
            model.config.use_cache = False
        return model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits at every position (`target_log_likelihoods` runs the head only where the loss needs it)."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    def target_log_likelihoods(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                               pairs: tuple[torch.Tensor, torch.Tensor] | None = None
                               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per row: summed log-likelihood of the target tokens and their count (logits from `target_logits`).
        ``pairs``: `target_pairs(labels)` when the caller has them (`TrainingBatch.pairs`); made here otherwise, on the
        labels' device (a GPU waits there for every kernel queued before)."""
        rows, positions = target_pairs(labels) if pairs is None else pairs
        logits = self.target_logits(input_ids, attention_mask, rows, positions)
        return pair_log_likelihoods(logits, labels[rows, positions + 1], rows, labels.shape[0])

    def target_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, rows: torch.Tensor,
                      positions: torch.Tensor) -> torch.Tensor:
        """Logits [K, V] at the K (row, position) pairs that predict a target (`target_pairs`).

        The output head runs only at those pairs: a few of a mostly-prompt batch, and with a 49k vocabulary the head
        is a large share of a small model's compute. A forward pre-hook hands the head those hidden states alone, so
        the model's own logit post-processing still applies. A routed head (`target_modules` naming it) runs at every
        position instead: a routed layer knows which of its tokens are padding from the forward's attention mask,
        which says nothing of a gathered subset.
        """
        head = self.model.get_output_embeddings()
        if isinstance(head, RoutedAdapterLayer):
            return self(input_ids, attention_mask)[rows, positions]
        hook = head.register_forward_pre_hook(lambda _, args: (args[0][rows, positions].unsqueeze(0), *args[1:]))
        try:
            return self(input_ids, attention_mask)[0]  # [1, K, V]: one row of the pairs
        finally:
            hook.remove()

    # ------------------------------------------------------------------ training
    def compute_lm_loss(self, batch: TrainingBatch) -> LMLoss:
        """Token-mean cross-entropy over this batch's target tokens, plus the same per task present in the batch.
        Accumulation and DDP average these batch means (README, the training loss); override to normalise otherwise."""
        check_batch(batch, training=True)  # a collator of your own: its mistakes named, not read into a wrong loss
        # getattr: a collator of your own may give a batch class without `pairs`
        row_log_likelihood, row_tokens = self.target_log_likelihoods(batch.input_ids, batch.attention_mask,
                                                                     batch.labels, getattr(batch, "pairs", None))
        loss = -row_log_likelihood.sum() / row_tokens.sum().clamp(min=1)
        per_task, per_task_tokens = task_means(row_log_likelihood, row_tokens, batch.task_name)
        return LMLoss(loss=loss, per_task=per_task, per_task_tokens=per_task_tokens)

    def training_step(self, batch: TrainingBatch, batch_idx: int) -> torch.Tensor:
        lm = self.compute_lm_loss(batch)
        if not isinstance(lm, LMLoss):
            raise TypeError(f"{type(self).__name__}.compute_lm_loss returned a {type(lm).__name__}: it must return an "
                            "LMLoss (malora_lightning.module), e.g. LMLoss(loss=loss, per_task={}) for a scalar loss")
        summary = router_losses(self.model)  # once: the step adds their weighted sum and logs the load balance
        # without router losses (LoRA) a zero made on the loss's device: `aux_loss` makes its zero on the CPU, and the
        # blocking copy of it to a GPU waited for every kernel queued before it (a host-device sync per batch)
        router = torch.zeros((), device=lm.loss.device) if summary is None else \
            weighted_router_loss(summary, get_adapter_config(self.model)).to(lm.loss.device)
        loss = lm.loss + router
        # checked, and the step's losses logged, once the optimizer step's backward is queued (`NonFiniteLossCheck`),
        # not here: reading the loss on the host waits for the whole forward before the backward can even be
        # launched, and did so for every batch of an accumulated step
        self._unchecked_losses.append((batch_idx, loss.detach(), lm.loss.detach(), router.detach()))
        batch_size = batch.input_ids.shape[0]
        logged = {"train/loss": loss, "train/lm_loss": lm.loss, "train/aux_loss": router}
        if summary is not None:
            logged["train/load_balance"] = summary.load_balance
        # logged once per optimizer step, over all its batches: Lightning writes a step's logs after its last batch,
        # so logging each batch's showed the last micro-batch's alone under gradient accumulation
        self._step_losses.append(torch.stack([value.detach().float() for value in logged.values()]))
        for name, value in lm.per_task.items():
            tokens = lm.per_task_tokens.get(name)
            weight = torch.ones((), device=value.device) if tokens is None else tokens.detach()
            self._step_task_parts.setdefault(name, []).append((value.detach(), weight))
        ends_step = not self.trainer.fit_loop._should_accumulate()
        if ends_step:
            # the step's values: the mean of its batches' (and ranks'), as the gradients average them (each rank
            # logged its own, and a ModelCheckpoint monitoring train/loss read rank zero's share). On several ranks
            # their all_reduce starts here; `check_step_losses` reads it
            tasks, sums = self._step_sums(torch.stack(self._step_losses).mean(0))
            self._step_end = _StepEnd(list(logged), batch_size, tasks, sums)
            self._step_losses = []
        # checked here, before the backward, where the check after it would not come in time: in anomaly mode the
        # backward would stop at a NaN first, naming an op instead of the batch, so each batch is checked; and at the
        # step's last batch when nothing checks after its backward (`_checked_after_backward`)
        if torch.is_anomaly_enabled() or ends_step and not self._checked_after_backward():
            self.check_step_losses()
        return loss

    def check_step_losses(self) -> None:
        """Log the optimizer step's losses once its last batch has run (`_log_step_losses`), and raise
        FloatingPointError, naming the step, epoch, batch and both loss parts, if the loss of a batch since the last
        check, on any rank, is not finite. `NonFiniteLossCheck` calls it before each optimizer step, once the step's
        backward is queued, so that a non-finite loss never updates the adapters and the last saved checkpoint is the
        last good one (`training_step` calls it itself where that call would come too late, or not at all). At a
        step's end it reads on the host once, and runs no collective of its own: the step's last batch started the one
        all_reduce of the step's losses, task sums and non-finite count (`_step_sums`)."""
        unchecked, self._unchecked_losses = self._unchecked_losses, []
        step_end, self._step_end = self._step_end, None
        if step_end is not None:
            non_finite = self._log_step_losses(step_end)
        elif unchecked:
            # a batch inside an accumulation window, checked by itself: in anomaly mode (`training_step`), or where
            # Lightning steps the optimizer at every batch (a strategy that accumulates the gradients itself)
            count = _non_finite_count(unchecked)
            if self.trainer.world_size > 1:
                torch.distributed.all_reduce(count)  # every rank stops, or none (`_step_sums`)
            non_finite = bool(count)
        else:
            return
        if not non_finite:
            return
        drop_routing_record(self.model)  # the model would keep the latest forward's record (and its graph)
        stopped = ("training stopped before this update, so the last saved checkpoint is the last good one. Lower the "
                   "learning rate or check the data")
        for batch_idx, loss, lm_loss, router in unchecked:
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"non-finite training loss at global step {self.global_step} (epoch {self.current_epoch}, batch "
                    f"{batch_idx}): lm_loss={lm_loss.item()}, aux_loss={router.item()}; {stopped}")
        raise FloatingPointError(f"non-finite training loss at global step {self.global_step} (epoch "
                                 f"{self.current_epoch}) on another rank; {stopped}")

    def _checked_after_backward(self) -> bool:
        """Whether `NonFiniteLossCheck` calls `check_step_losses` once this optimizer step's backward is queued: it
        is attached (`configure_callbacks` attaches it; a user may take it out) and Lightning steps the optimizer
        (under manual optimisation the training step decides when, or whether, `optimizer.step()` comes). Otherwise
        `training_step` checks and logs the step at its last batch: the same values, logged at the same step, with
        the host's one wait of the step before that batch's backward instead of after it."""
        return self.automatic_optimization and any(isinstance(callback, NonFiniteLossCheck)
                                                   for callback in self.trainer.callbacks)

    def _log_step_losses(self, step_end: _StepEnd) -> bool:
        """Log the optimizer step's losses and each task's (`_step_task_losses`); return whether any of its batches'
        losses, on any rank, is not finite."""
        step, per_task, non_finite = self._step_task_losses(step_end)
        self._step_task_parts = {}
        batch_size = step_end.batch_size
        for key, value in zip(step_end.keys, step):
            self.log(key, value, prog_bar=key == "train/loss", batch_size=batch_size)
        for name, task_loss in per_task.items():
            self.log(f"train/{name}/lm_loss", task_loss, batch_size=batch_size)
        # a task logged earlier but in none of this step's batches is logged as NaN: Lightning writes every key
        # logged so far in the epoch at each step, so an earlier step's loss would be written again as this one's.
        # A NaN tensor on the device, not math.nan: Lightning makes a logged number a tensor with torch.tensor on
        # the device, a blocking copy from the host (a CUDA sync per missing task and step). Lightning keeps a
        # logged value until the key is logged again or the epoch ends, so a task whose NaN it holds this epoch
        # is not logged again: a `self.log` for every absent task at every step made the step's cost grow with the
        # number of tasks (BENCHMARKS.md, "Many tasks, long predict files")
        epoch, nan_tasks = self._nan_tasks
        if epoch != self.current_epoch:  # Lightning has reset the epoch's logged values
            nan_tasks = set()
        missing = sorted(self._logged_tasks - set(per_task) - nan_tasks)
        nan = torch.full((), math.nan, device=self.device) if missing else None
        for name in missing:
            self.log(f"train/{name}/lm_loss", nan, batch_size=batch_size)
        self._nan_tasks = (self.current_epoch, (nan_tasks | set(missing)) - set(per_task))
        self._logged_tasks |= set(per_task)
        return non_finite

    def _step_sums(self, step: torch.Tensor) -> tuple[list[str], torch.Tensor]:
        """The optimizer step's losses (`step`: this rank's mean over its batches), its task parts
        (``_step_task_parts``) and how many of its batches' losses are not finite (``_unchecked_losses``: every
        batch's since the last check), as one tensor for `_step_task_losses` to read, with the tasks it has rows for.

        On one process: [step | non-finite count], float32, without tasks. On several ranks: float64 sums over the
        ranks, [step | per listed task: token-weighted loss sum, tokens, parts | parts of unlisted tasks | non-finite
        count], the task rows in the data module's task order, the same on every rank. Their all_reduce starts here,
        at the step's last batch (NCCL queues it without making the host wait), and is read once the step's backward
        is queued: one collective and one wait of the host per optimizer step, whatever the number of tasks (the
        losses and the non-finite count, each reduced and read on its own, cost two; a strategy `reduce`, a barrier
        and an all_reduce, and an object gather with a host read per task part cost waits that grew with the tasks).
        The non-finite count is summed so that every rank stops, or none: the backward averages the ranks' gradients,
        so one rank's non-finite loss reaches every rank's update. torch's all_reduce, not the strategy's `reduce`,
        whose barrier waits for the GPU."""
        non_finite = _non_finite_count(self._unchecked_losses)
        if self.trainer.world_size == 1:
            return [], torch.cat([step, non_finite.to(step.dtype).unsqueeze(0)])
        datamodule = self.trainer.datamodule
        names = [task.name for task in getattr(datamodule, "tasks", [])] if datamodule is not None else []
        row = {name: index for index, name in enumerate(names)}
        sums = torch.zeros(step.numel() + 3 * len(names) + 2, dtype=torch.float64, device=step.device)
        sums[:step.numel()] = step
        task_sums = sums[step.numel():-2].view(len(names), 3)
        for name, values in self._step_task_parts.items():
            if name not in row:
                sums[-2] += len(values)
                continue
            # in the order, and the precision, of the Python floats these sums were before
            task_sums[row[name], :2] = torch.stack([sum(value.double() * weight.double() for value, weight in values),
                                                    sum(weight.double() for _, weight in values)])
            task_sums[row[name], 2] = len(values)
        sums[-1] = non_finite
        torch.distributed.all_reduce(sums)
        return names, sums

    def _step_task_losses(self, step_end: _StepEnd) -> tuple[torch.Tensor, dict[str, torch.Tensor | float], bool]:
        """From `_step_sums`, read on the host once: the step's losses averaged over the ranks, each task's loss over
        the optimizer step's batches (``_step_task_parts``; all of them under gradient accumulation) on every rank,
        and whether any of the step's losses, on any rank, is not finite. A task's loss is its batches' per-task
        losses weighted by their target tokens (by 1 where an override gives none). The ranks' batches hold different
        tasks, so one rank's would leave out the tasks drawn elsewhere. One batch on one process logs its own value,
        as computed.

        A task the data module does not list (dataloaders given to the trainer, a `compute_lm_loss` of your own)
        cannot have a row in the sums: when any rank has one, the ranks gather their task sums as Python objects."""
        losses, sums = len(step_end.keys), step_end.sums
        world_size = self.trainer.world_size
        if world_size == 1:
            own = {name: values[0][0] if len(values) == 1 else
                   sum(value * weight for value, weight in values) / sum(weight for _, weight in values).clamp(min=1)
                   for name, values in sorted(self._step_task_parts.items())}
            return sums[:losses], own, bool(sums[-1])  # the one read on the host
        names = step_end.tasks
        task_sums = sums[losses:-2].view(len(names), 3)
        step = (sums[:losses] / world_size).float()
        task_losses = (task_sums[:, 0] / task_sums[:, 1].clamp(min=1)).float()
        *counted, unlisted, non_finite = torch.cat([task_sums[:, 2], sums[-2:]]).tolist()  # the one read on the host
        if unlisted:
            return step, self._gathered_task_losses(), bool(non_finite)
        row = {name: index for index, name in enumerate(names)}
        return step, {name: task_losses[row[name]] for name, count in sorted(zip(names, counted)) if count}, \
            bool(non_finite)

    def _gathered_task_losses(self) -> dict[str, float]:
        """`_step_task_losses` by a gather of every rank's task sums as Python objects: the task names differ by rank,
        and some are not the data module's."""
        own = {name: (sum(float(value) * float(weight) for value, weight in values),
                      sum(float(weight) for _, weight in values)) for name, values in self._step_task_parts.items()}
        gathered: list[dict[str, tuple[float, float]] | None] = [None] * self.trainer.world_size
        torch.distributed.all_gather_object(gathered, own)
        totals: dict[str, tuple[float, float]] = {}
        for rank_parts in gathered:
            for name, (weighted, weight) in rank_parts.items():
                total = totals.get(name, (0.0, 0.0))
                totals[name] = (total[0] + weighted, total[1] + weight)
        return {name: weighted / max(weight, 1.0) for name, (weighted, weight) in sorted(totals.items())}

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Lightning's, except under `FSDPStrategy` (FSDP1), whose precision plugin refuses to clip by norm: there the
        root unit's `clip_grad_norm_` clips by the norm over every rank's shards."""
        if (isinstance(self.trainer.strategy, FSDPStrategy) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            self.trainer.strategy.model.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def trainable_parameter_groups(self) -> list[dict[str, Any]]:
        """AdamW groups: adapters, routers with their own learning rate and weight decay, and (when a subclass trains
        any) the base's biases and norm scales without weight decay, as HF Trainer keeps them: decay pulls a norm's
        scale towards 0, not towards its pretrained 1. A tensor of fewer than two dimensions counts as one."""
        settings = self.settings
        adapters, routers, undecayed = [], [], []
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                (routers if ".router." in name else undecayed if param.ndim < 2 else adapters).append(param)
        groups = [{"params": adapters, "lr": settings.learning_rate, "weight_decay": settings.weight_decay}]
        if routers:
            groups.append({
                "params": routers,
                "lr": settings.learning_rate if settings.router_learning_rate is None
                else settings.router_learning_rate,
                "weight_decay": settings.weight_decay if settings.router_weight_decay is None
                else settings.router_weight_decay,
            })
        if undecayed:
            groups.append({"params": undecayed, "lr": settings.learning_rate, "weight_decay": 0.0})
        return groups

    def _parameter_groups(self) -> list[dict[str, Any]]:
        """`trainable_parameter_groups()` with each group's parameters as a list: torch takes any iterable, but a
        generator (`filter(...)`, `model.parameters()`) was used up by the first reader, and AdamW got empty groups."""
        return [{**group, "params": [group["params"]] if isinstance(group["params"], torch.Tensor)
                 else list(group["params"])} for group in self.trainable_parameter_groups()]

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self._parameter_groups()
        grouped = {id(param) for group in groups for param in group["params"]}
        left_out = [name for name, param in self.named_parameters() if param.requires_grad and id(param) not in grouped]
        if left_out:  # each would get a gradient in every step and never change
            more = f" and {len(left_out) - 3} more" if len(left_out) > 3 else ""
            raise ValueError(f"parameter {', '.join(left_out[:3])}{more}: requires grad, but no group of "
                             "trainable_parameter_groups() holds it, so it would never be trained: add it to a group "
                             "({'params': [...], 'lr': ...}), or freeze it with requires_grad_(False)")
        options = adamw_options((p for group in groups for p in group["params"]), self.trainer)
        # the run's rate and decay are also the defaults of a group that gives none (torch's would be 1e-3 and 1e-2)
        settings = self.settings
        optimizer = torch.optim.AdamW(groups, lr=settings.learning_rate, weight_decay=settings.weight_decay,
                                      **options)
        total_steps = schedule_length(estimated_stepping_batches(self.trainer), settings.warmup_ratio,
                                      settings.lr_schedule)
        warmup_steps = math.ceil(settings.warmup_ratio * total_steps)
        schedule = functools.partial(lr_multiplier, warmup_steps=warmup_steps, total_steps=total_steps,
                                     schedule=settings.lr_schedule)
        scheduler = AdapterSchedule(optimizer, schedule)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ------------------------------------------------------------------ checkpoints and export
    def configure_callbacks(self) -> list[Callback]:
        """What every fit with this module needs: exact resume (`TrainingRandomState`), the stop at a non-finite loss
        (`NonFiniteLossCheck`) and, with `export_adapters`, the adapter folder at the end (`AdapterExport`)."""
        callbacks: list[Callback] = [TrainingRandomState(), NonFiniteLossCheck()]
        if self.settings.export_adapters:
            callbacks.append(AdapterExport(base_model=self.settings.model_name_or_path))
        return callbacks

    def checkpoint_keys(self) -> set[str]:
        """The tensors a checkpoint holds: the adapters (a frozen ablation tensor such as a fixed S_A included), every
        other tensor the module trains (a base layer a subclass unfroze, a parameter of its own) and the persistent
        buffers a subclass registers, on the module or on a submodule of its own. A frozen module, the base or a
        subclass's teacher, is rebuilt by its code, never copied."""
        keys = {f"model.{key}" for key in adapter_state_dict(self.model)} | trained_tensor_names(self)
        return keys | self._own_buffer_names()

    def _own_buffer_names(self) -> set[str]:
        """The persistent buffers outside the base model and outside frozen submodules (all parameters frozen)."""
        names: set[str] = set()

        def visit(module: nn.Module, prefix: str) -> None:
            names.update(unwrapped_name(prefix + name) for name, buffer in module._buffers.items()
                         if buffer is not None and name not in module._non_persistent_buffers_set)
            for child_name, child in module._modules.items():
                parameters = [] if child is None else list(child.parameters())
                frozen = bool(parameters) and not any(param.requires_grad for param in parameters)
                if child is not None and child is not self.model and not frozen:
                    visit(child, f"{prefix}{child_name}.")

        visit(self, "")
        return names

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the `checkpoint_keys` tensors only, the settings the module ran with (`SETTINGS_KEY`, checked when it
        loads), and the hyperparameters as plain data: an `AdapterConfig` (under any name, or put back by a subclass's
        own `save_hyperparameters()`) as its dict, which `__init__` takes back, since `weights_only` loading refuses
        the object.

        Nothing is written before the model is built (no adapter tensor yet), nor while a resumed fit restores its
        checkpoint (Lightning puts the tensors back, runs setup and `on_fit_start`, and only then the step and the
        optimizer state: a checkpoint then would hold step 0 and a fresh optimizer, over the very file being resumed
        from, as `OnExceptionCheckpoint` wrote it). `OnExceptionCheckpoint` saves when an error or Ctrl-C stops the
        run there: that error then goes on, where an AttributeError of this method took its place (a traceback for
        Ctrl-C, and for a data error that the command prints as one line)."""
        restoring = self._resume_step is not None and self.trainer.global_step < self._resume_step
        if self.model is None or restoring:
            stopped = sys.exc_info()[1]
            if stopped is not None and self._trainer is not None and self.trainer.interrupted:
                raise stopped
            raise RuntimeError("no checkpoint can be saved " + (
                "before the model is built (configure_model, which trainer.fit, validate, test and predict call): "
                "there are no adapter tensors yet" if self.model is None else
                "while a resumed fit restores its checkpoint: its step and optimizer state are not restored yet"))
        keys = self.checkpoint_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        checkpoint[CHECKPOINT_FORMAT_KEY] = CHECKPOINT_FORMAT
        checkpoint[SETTINGS_KEY] = self.settings_record()
        if checkpoint.get("hyper_parameters") is not None:
            checkpoint["hyper_parameters"] = _as_stored(checkpoint["hyper_parameters"])

    def settings_record(self) -> dict[str, Any]:
        """The settings as a checkpoint stores them (`SETTINGS_KEY`): `settings`, and the adapter's as a dict."""
        return {**asdict(self.settings), "adapter": self.adapter_config.to_dict()}

    def check_checkpoint(self, stored: Mapping[str, Any], path: str | Path | None, fitting: bool) -> list[str]:
        """`check_checkpoint_settings` of a checkpoint's `stored_settings` against the settings this module runs with:
        raises on a base model, adapter shape or (to resume a fit, `fitting`) trained tensors that differ; returns
        the other settings that differ."""
        return check_checkpoint_settings(stored, self.settings_record(), self.adapter_config, path,
                                         TRAINING_FIELDS if fitting else ())

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose adapter tensors are not exactly this module's: loading is not strict (the base is
        not in it), so tensors the module lacks were dropped silently. Refuse one stored with another base model or
        adapter shape or, to resume a fit, that trained other tensors (`TRAINING_FIELDS`; they failed in torch's
        optimizer loading, naming nothing): `check_checkpoint_settings`, whatever path chose the checkpoint (a file,
        Lightning's `last` or `best`). Log the settings that differ (this run's apply). A strategy that loads the
        tensors itself (`ModelParallelStrategy`) hands over no `state_dict`; the settings are still checked. A
        checkpoint of an earlier format is converted (`upgrade_checkpoint`), one of a later format refused
        (`check_checkpoint_format`). A fit refuses a checkpoint without optimizer state, written outside a fit (as
        Lightning's SLURM auto-requeue writes one for a preempted evaluation, which a requeued fit then resumed from,
        at step 0 with trained adapters)."""
        path = _LOADED_FILE.get() if self._trainer is None else self.trainer.ckpt_path
        source = "" if path is None else f" ({path})"
        check_checkpoint_format(checkpoint, path)  # a later version's tensors and keys may mean something else
        if "state_dict" in checkpoint:
            expected, stored = self.checkpoint_keys(), set(checkpoint["state_dict"])
            missing, unexpected = sorted(expected - stored), sorted(stored - expected)
            if missing:
                raise ValueError(f"checkpoint lacks trained tensor {missing[0]!r} ({len(missing)} missing): it was "
                                 f"saved with a different adapter config or base model, or by a module that did not "
                                 f"train that tensor{source}")
            if unexpected:
                raise ValueError(f"checkpoint holds adapter tensors this module does not have, e.g. {unexpected[:3]} "
                                 f"({len(unexpected)} in all): it was saved with a different adapter config (e.g. "
                                 "more target_modules or layers) or base model, and loading it would drop "
                                 f"them{source}")
        fitting = self._trainer is not None and self.trainer.state.fn == TrainerFn.FITTING
        if fitting and checkpoint.get("optimizer_states") == []:
            raise ValueError(f"checkpoint {path} holds no optimizer state, so it was written outside a fit: by "
                             "Lightning's SLURM auto-requeue when a validate, test or predict job was preempted (an "
                             "hpc_ckpt_N.ckpt), or by trainer.save_checkpoint after an evaluation. Resuming a fit from "
                             "it would start over at step 0 from its trained adapters, silently: remove it from "
                             "default_root_dir (an hpc_ckpt_N.ckpt, which Lightning resumes a fit on SLURM from when "
                             "no ckpt_path is given), give another checkpoint, or start a new fit from its adapters "
                             "with adapter_path")
        self._resume_step = checkpoint.get("global_step", 0) if fitting else None
        stored = stored_settings(checkpoint)
        differences = self.check_checkpoint(stored, path, fitting)
        changed = computed_otherwise(stored_adapter_settings(stored), self.adapter_config)
        if changed:
            warnings.warn(f"checkpoint{source}: its adapters were trained computing otherwise than this run will "
                          f"({'; '.join(changed)}), so they score otherwise than the trained model did. Settings "
                          "come from your config and flags only: give the checkpoint's to evaluate it as trained",
                          stacklevel=2)
        if differences:
            logger.info("Settings that differ from the checkpoint%s, applied as this run gives them: %s", source,
                        ", ".join(differences))
        if checkpoint.get(CHECKPOINT_FORMAT_KEY, 1) < CHECKPOINT_FORMAT:
            shapes = {f"model.{name}.lora_B": torch.Size((layer.num_experts, layer.rank, layer.out_features))
                      for name, layer in routed_layers(self.model).items()}
            groups = None
            if fitting and shapes:  # the optimizer state is restored next, by position in the module's groups
                names = {param: unwrapped_name(name) for name, param in self.named_parameters()}
                groups = [[names[param] for param in group["params"]] for group in self._parameter_groups()]
            upgrade_checkpoint(checkpoint, shapes, groups, path)
        if "state_dict" in checkpoint:
            self._check_checkpoint_shapes(checkpoint["state_dict"], source)
        # the checkpoint's weights replace those held (a resumed fit's until its first step)
        self.held_weights = HeldWeights(step=checkpoint.get("global_step", 0),
                                        checkpoint=None if path is None else Path(path).name)

    def _check_checkpoint_shapes(self, state_dict: Mapping[str, Any], source: str) -> None:
        """Refuse a checkpoint tensor whose shape is not this module's: the base check compares the base's name only,
        so a checkpoint of a base of other sizes under the same name (a local folder whose model was replaced) failed
        in torch's load_state_dict with a RuntimeError listing every tensor and naming no file."""
        own = {unwrapped_name(name): tensor for name, tensor in [*self.named_parameters(), *self.named_buffers()]}
        differing = [key for key, value in state_dict.items()
                     if key in own and isinstance(value, torch.Tensor) and value.shape != own[key].shape]
        if differing:
            key = differing[0]
            raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(state_dict[key].shape)}, this module's "
                             f"{tuple(own[key].shape)} ({len(differing)} tensors differ in shape): it was saved with "
                             "a base model of other sizes (one whose folder or name now holds another model?) or "
                             f"another adapter config{source}")

    def on_train_start(self) -> None:
        """Warn of a validation inside an accumulation window (`_warn_of_validations_inside_windows`); after a resume,
        the optimiser and schedule hyperparameters are this run's, not the checkpoint's.

        Lightning restores the AdamW state with its param groups (learning rate, weight decay, and which AdamW
        implementation runs: fused, foreach) and the scheduler's base learning rates; the rule (README, Safety): the
        checkpoint supplies the moments and the step count, the run's settings supply learning rates, weight decay,
        schedule and the implementation (`adamw_options`, which depends on this run's device and precision plugin),
        as for every other setting.

        A fit starts with no partial optimizer step: one that stopped inside an accumulation window (an interrupt, an
        error) left its batches' losses, which this fit's first logged step would otherwise average in.
        """
        self._step_losses, self._step_task_parts, self._unchecked_losses, self._step_end = [], {}, [], None
        self._fit_start_step = self.trainer.global_step
        self._nan_tasks = (-1, set())  # this fit's Lightning holds no NaN an earlier fit logged
        self._warn_of_an_interval_beyond_the_epochs()
        self._judged_accumulations = {self.trainer.accumulate_grad_batches}
        self._warn_of_validations_inside_windows()
        self._resume_scheduled_accumulation()
        if self.trainer.ckpt_path is None:
            return
        groups = self._parameter_groups()
        for config in self.trainer.lr_scheduler_configs:
            scheduler = config.scheduler
            if not isinstance(scheduler, AdapterSchedule) or len(scheduler.optimizer.param_groups) != len(groups):
                continue  # a subclass's own optimiser or schedule: its restore is its own business
            defaults = scheduler.optimizer.defaults  # this run's (configure_optimizers ran before the restore)
            rates = [group.get("lr", defaults["lr"]) for group in groups]
            scheduler.base_lrs = rates
            for param_group, group, rate, factor in zip(scheduler.optimizer.param_groups, groups, rates,
                                                        scheduler.lr_lambdas):
                param_group["initial_lr"] = rate
                param_group["lr"] = rate * factor(scheduler.last_epoch)
                param_group["weight_decay"] = group.get("weight_decay", defaults["weight_decay"])
                for implementation in ("fused", "foreach"):
                    param_group[implementation] = defaults.get(implementation)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Once this fit has taken an optimizer step, the module holds the weights trained to the trainer's step
        (`held_weights`); until then, those it held before (an adapter folder's, a checkpoint's): a fit that stops
        before its first step (an error, a batch inside an accumulation window) trained nothing."""
        if self.trainer.global_step > self._fit_start_step:
            self.held_weights = HeldWeights(step=self.trainer.global_step)

    def on_train_epoch_start(self) -> None:
        """`_warn_of_validations_inside_windows` again for each accumulation a `GradientAccumulationScheduler` sets
        (callbacks' hooks run before the module's, so the trainer has this epoch's): `on_train_start` saw the trainer's
        1, and validations inside the scheduled windows went unnamed. Judged in each epoch's own batches, until one is
        named for that accumulation."""
        self._judge_this_epochs_accumulation()

    def _judge_this_epochs_accumulation(self) -> None:
        """`_warn_of_validations_inside_windows` for the current epoch's accumulation, once one is named for it."""
        accumulate = self.trainer.accumulate_grad_batches
        if accumulate not in self._judged_accumulations and self._warn_of_validations_inside_windows(this_epoch=True):
            self._judged_accumulations.add(accumulate)

    def _resume_scheduled_accumulation(self) -> None:
        """Give the trainer the accumulation a `GradientAccumulationScheduler` schedules for the epoch the fit starts
        or resumes in, and judge that epoch's windows as `on_train_epoch_start` would.

        The scheduler sets `trainer.accumulate_grad_batches` in its `on_train_epoch_start` only, which Lightning 2.6
        skips on a resume from a checkpoint written inside an epoch (a validation's, `every_n_train_steps`'): the rest
        of that epoch ran at the trainer's 1, each batch its own optimizer step (9-batch epochs scheduled {1: 3},
        resumed from a validation's checkpoint at step 10, batch 3 of epoch 1, reached max_steps=12 after 2 batches
        where the uninterrupted fit took 6), and the module's judgement of that epoch's windows never ran. Set here,
        after the loops' state is restored and before the first batch (and after the scheduler's own
        `on_train_start`, which refuses a trainer accumulation other than 1). On a fit that starts at an epoch's
        start this is what the scheduler's hook sets anyway."""
        trainer = self.trainer
        scheduler = accumulation_scheduler(trainer)
        if scheduler is not None:
            trainer.accumulate_grad_batches = scheduler.get_accumulate_grad_batches(trainer.current_epoch)
            self._judge_this_epochs_accumulation()

    def _warn_of_an_interval_beyond_the_epochs(self) -> None:
        """`setup`'s warning of an interval the fit never reaches, for a fit that `max_epochs` ends first: only the
        training data's length, known once it is loaded, says how many batches those epochs hold, and such a fit
        (max_steps=-1, or a max_steps beyond the epochs) trained to its end without ever validating. Likewise a fit
        that validates every n epochs and ends before the n-th."""
        trainer = self.trainer
        every = trainer.check_val_every_n_epoch
        if every is not None and 0 < trainer.max_epochs < every:
            warn_never_validates(f"check_val_every_n_epoch={every} exceeds max_epochs={trainer.max_epochs}",
                                 "check_val_every_n_epoch", trainer.max_epochs)
            return
        interval = getattr(trainer, "val_check_interval", None)  # absent for a duration
        if not isinstance(interval, int) or every is not None or not is_int(trainer.num_training_batches):
            return
        most = max(scheduled_accumulations(trainer))  # a scheduled accumulation stretches max_steps further
        batches = fit_batches(trainer, most)
        if 0 < trainer.max_steps * most < interval or not 0 < batches < interval:
            return  # setup warned of it already, or the fit validates
        warn_never_validates(f"val_check_interval={interval} exceeds the fit's {batches} training batches "
                             f"(max_epochs={trainer.max_epochs} of {trainer.num_training_batches} batches)",
                             "val_check_interval", batches)

    def _warn_of_validations_inside_windows(self, this_epoch: bool = False) -> bool:
        """A validation inside an accumulation window (and the checkpoint written when it ends, which holds none of
        the window's gradients) makes a resume from it skip the window's earlier batches: its losses leave the
        uninterrupted run's. Judged from the batch Lightning validates after (`val_check_batch`, which a float
        interval makes a fraction of the epoch) and the epoch's length, known once the training data is; over the
        whole fit, or with `this_epoch` over the current epoch's batches (a scheduled accumulation, which a later
        epoch may change). Returns whether it warned.

        With `this_epoch`, judged at the epoch's start (`on_train_epoch_start`: none of the epoch's batches has run
        yet), in the batches the fit still runs from there (`fit_batches(from_this_epoch=True)`); after a mid-epoch
        resume, where Lightning 2.6 skips that hook, by `on_train_start` the same way (the steps left then count
        from the resumed batch, not the epoch's start, so a validation late in that epoch may go unnamed). Counting
        the whole fit at this epoch's accumulation named validations that an epoch cut short by max_steps never
        reaches."""
        trainer = self.trainer
        accumulate, per_epoch = trainer.accumulate_grad_batches, trainer.check_val_every_n_epoch is not None
        epoch, every = trainer.num_training_batches, trainer.val_check_batch
        if accumulate == 1 or not is_int(epoch) or not is_int(every):  # an unsized loader, or no validation
            return False
        after = 0  # counted over the fit, the training batches before the judged ones
        if this_epoch:  # this epoch's own batches: those the fit still runs from its start, at its accumulation
            judged = trainer.current_epoch
            if not per_epoch:
                after = judged * epoch
            batches = after + min(fit_batches(trainer, from_this_epoch=True), epoch)
        else:  # for per-epoch validation, the first validating epoch: after check_val_every_n_epoch - 1 others
            judged = trainer.check_val_every_n_epoch - 1 if per_epoch else 0
            batches = fit_batches(trainer) - judged * epoch
        if per_epoch and (judged + 1) % trainer.check_val_every_n_epoch:
            return False
        inside = first_validation_inside_a_window(epoch, every, accumulate, per_epoch, batches, after)
        if inside is None:
            return False
        where = f"after batch {inside} of each epoch of {epoch}" if per_epoch else (
            f"after training batch {inside} of the fit (check_val_every_n_epoch=None counts them over the whole fit), "
            f"batch {(inside - 1) % epoch + 1} of an epoch of {epoch}")
        rank_zero_warn(f"The fit validates {where} (val_check_interval={trainer.val_check_interval}), inside an "
                       f"accumulation window of accumulate_grad_batches={accumulate}: the checkpoint written when "
                       "that validation ends holds none of the window's gradients, so a resume from it skips the "
                       f"window's earlier batches. Validate at multiples of {accumulate} batches into each epoch: an "
                       f"interval that is a multiple of {accumulate} and, counted over the whole fit, an epoch length "
                       "that is one too (or validation at epoch ends)")
        return True


def use_checked_checkpoint_io(strategy: Strategy) -> None:
    """Put `CheckedCheckpointIO` in place of Lightning's default checkpoint IO (`TorchCheckpointIO` itself), also where
    a wrapper holds it: Lightning's `AsyncCheckpointIO` saves in a background thread, and loads, through the IO it
    wraps, which is Lightning's default unless given one. Under `plugins=[AsyncCheckpointIO()]` that default stayed:
    saves were not atomic, and a `ckpt_path` was read unchecked, with code in the file run where torch or Lightning
    took weights_only for False (TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, an http(s) URL). A checkpoint IO of one's own is
    left in place."""
    io = strategy.checkpoint_io  # Lightning puts its default in place, as a wrapper's base too, when first asked
    if type(io) is TorchCheckpointIO:
        strategy.checkpoint_io = CheckedCheckpointIO()
    while isinstance(io, _WrappingCheckpointIO):
        if type(io.checkpoint_io) is TorchCheckpointIO:
            io._checkpoint_io = CheckedCheckpointIO()  # the wrapper's setter keeps the base it has
        io = io.checkpoint_io


def loads_as_data(io: Any) -> bool:
    """Whether checkpoint IO `io` loads through `CheckedCheckpointIO`'s loading: itself, or under wrappers that pass
    loading on as they get it (Lightning's `AsyncCheckpointIO`)."""
    while isinstance(io, _WrappingCheckpointIO) and type(io).load_checkpoint is _WrappingCheckpointIO.load_checkpoint:
        io = io.checkpoint_io
    return getattr(type(io), "load_checkpoint", None) is CheckedCheckpointIO.load_checkpoint


def read_as_data_before_loading(strategy: Strategy) -> None:
    """Make `strategy`, one that reads a checkpoint file itself and not through its checkpoint IO (FSDPStrategy,
    ModelParallelStrategy) or one whose checkpoint IO is not ours (`loads_as_data`: a Trainer's `plugins=[...]` or a
    strategy's `checkpoint_io` of one's own), check a local file as the `malora` commands do before it loads one
    (`check_checkpoint_before_loading`), and read a file with `weights_only` unset as data (True, as
    `CheckedCheckpointIO` does). FSDPStrategy reads a full checkpoint with Lightning's `_lazy_load`, a pickle
    unpickler whatever `weights_only` says: a plain Trainer's `fit(ckpt_path=...)` there ran the code the file named,
    and a checkpoint of other settings failed inside the strategy's loading, naming nothing; a `TorchCheckpointIO`
    subclass of one's own ran it under TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD, or from an http(s) URL (Lightning's
    unset weights_only is False there). The module is the strategy's at the time of loading (a trainer may run
    several). An explicit `weights_only=False` (a trusted file) skips these checks; `on_load_checkpoint` still checks
    the settings once the strategy has loaded it."""
    load = strategy.load_checkpoint
    if getattr(load, "reads_as_data_first", False):  # a second run of the same trainer
        return

    def checked_load(checkpoint_path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        trusted = kwargs.get("weights_only") is False  # the caller's choice, as `CheckedCheckpointIO` keeps it
        if isinstance(checkpoint_path, (str, Path)) and not is_remote(checkpoint_path) and not trusted:
            module = strategy.lightning_module
            fitting = module is not None and module.trainer.state.fn == TrainerFn.FITTING
            check_checkpoint_before_loading(user_path(checkpoint_path), strategy, module, fitting)
        if not args and kwargs.get("weights_only") is None:  # args: weights_only, given in place
            kwargs["weights_only"] = True
        return load(checkpoint_path, *args, **kwargs)

    checked_load.reads_as_data_first = True
    strategy.load_checkpoint = checked_load


def check_checkpoint_before_loading(path: str, strategy: Strategy, module: L.LightningModule | None,
                                    fitting: bool) -> None:
    """A local checkpoint file checked before anything loads it: a missing file, a folder or a cut-off file is named
    (`check_checkpoint_file`); it is read as data, once, memory-mapped (`read_checkpoint`); and for a MALoRAModule its
    settings are checked against the module's (`MALoRAModule.check_checkpoint`: the base, the adapter's shape, for a
    fit the trained tensors), a mixture's that the strategy loads itself for its format (`check_strategy_loadable`),
    and for a fit under FSDP2 its optimizer state's layout (`check_fsdp2_optimizer_layout`)."""
    check_checkpoint_file(path)
    checkpoint = read_checkpoint(path)
    if not isinstance(module, MALoRAModule):
        return
    module.check_checkpoint(stored_settings(checkpoint), path, fitting=fitting)
    if strategy.restore_checkpoint_after_setup and module.adapter_config.method != "lora":
        check_strategy_loadable(checkpoint, path)
    if fitting and isinstance(strategy, ModelParallelStrategy):
        check_fsdp2_optimizer_layout(checkpoint, path)


class NonFiniteLossCheck(Callback):
    """Stops a fit at a non-finite training loss before the optimizer step it would enter, and logs the step's
    losses (`check_step_losses`). Lightning calls ``on_before_optimizer_step`` once the step's backward has run (fp16's
    loss scaler has unscaled the gradients by then, and calls it also for a step the scaler then skips), also under
    manual optimisation (each ``optimizer.step()``). A callback rather than the module's own hook: a subclass that
    overrides ``on_before_optimizer_step`` to log gradient norms would turn it off without a word. `MALoRAModule`
    attaches it always; without it, `training_step` checks and logs each step itself (`_checked_after_backward`)."""

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        pl_module.check_step_losses()


def _non_finite_count(losses: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """How many of these (batch_idx, loss, lm_loss, aux_loss) losses are not finite, on their device (unread)."""
    return (~torch.isfinite(torch.stack([loss for _, loss, _, _ in losses]))).sum()


def warn_never_validates(cause: str, setting: str, limit: int) -> None:
    """Warn that a fit ends before its first validation (`cause`), naming the `setting` to lower to `limit`."""
    rank_zero_warn(f"{cause}: the fit never validates the adapters it trains (the report's final scores, if any, are "
                   f"the sanity check's, before training); set {setting} to at most {limit}")


def accumulation_scheduler(trainer: L.Trainer) -> GradientAccumulationScheduler | None:
    """The trainer's `GradientAccumulationScheduler`, if it has one (Lightning allows one)."""
    return next((callback for callback in trainer.callbacks if isinstance(callback, GradientAccumulationScheduler)),
                None)


def scheduled_accumulations(trainer: L.Trainer) -> list[int]:
    """The gradient accumulations a fit runs with: the trainer's `accumulate_grad_batches`, or every one a
    `GradientAccumulationScheduler` sets, at each epoch's start (the trainer's is 1 until then, in `setup` and
    `on_train_start` too)."""
    scheduler = accumulation_scheduler(trainer)
    if scheduler is None:
        return [trainer.accumulate_grad_batches]
    return sorted({scheduler.get_accumulate_grad_batches(epoch) for epoch in [0, *scheduler.scheduling]})


def fit_batches(trainer: L.Trainer, accumulate: int | None = None, from_this_epoch: bool = False) -> int:
    """The training batches a fit runs: its epochs' (`max_epochs`) or those `max_steps` optimizer steps take, each
    epoch ending in a partial accumulation window where its length is not a multiple of the accumulation
    (`accumulate`, by default the trainer's).

    With `from_this_epoch`, the batches it can still run from the current epoch's start: the steps left
    (`max_steps - global_step`) and the epochs left (`max_epochs - current_epoch`). Under a
    `GradientAccumulationScheduler` the accumulation holds from this epoch on, not from the fit's start: earlier
    epochs spent their steps at another (18-batch epochs scheduled {1: 3} with max_steps=19 run 18 steps of 1 batch
    and one of 3, 21 batches; counted at 3 from the fit's start, 57)."""
    epoch = trainer.num_training_batches
    accumulate = trainer.accumulate_grad_batches if accumulate is None else accumulate
    steps, epochs = trainer.max_steps, trainer.max_epochs
    if from_this_epoch:
        steps = steps - trainer.global_step if steps >= 0 else steps
        epochs = epochs - trainer.current_epoch if epochs is not None and epochs >= 0 else epochs
    limits = []
    if steps >= 0:
        steps_per_epoch = math.ceil(epoch / accumulate)
        limits.append(steps // steps_per_epoch * epoch + steps % steps_per_epoch * accumulate)
    if epochs is not None and epochs >= 0:
        limits.append(epochs * epoch)
    return min(limits) if limits else epoch


def first_validation_inside_a_window(epoch: int, every: int, accumulate: int, per_epoch: bool,
                                     batches: int, after: int = 0) -> int | None:
    """The first training batch after which Lightning validates inside an accumulation window (counted from 1 into
    the epoch for `per_epoch` validation, else over the fit), or None. Lightning validates after every `every`-th
    batch of each epoch (`per_epoch`) or of the whole fit, and steps the optimizer after every `accumulate`-th batch
    of an epoch and after its last, so a validation is at a window's end where its batch into the epoch is a
    multiple of `accumulate` or the epoch's last. The positions into the epoch repeat within `epoch` validations.
    Counted over the fit, only the validations after training batch `after` are judged."""
    for count in range(after // every + 1, after // every + epoch + 1):
        if per_epoch:
            position = count * every
            if position > min(epoch, batches):
                return None
            batch = position
        else:
            batch = count * every
            if batch > batches:
                return None
            position = (batch - 1) % epoch + 1
        if position % accumulate and position != epoch:
            return batch
    return None


def _as_stored(hyperparameters: Mapping[str, Any]) -> dict[str, Any]:
    """The module's hyperparameters as a checkpoint stores them: an `AdapterConfig` (under any name) as its dict,
    which `MALoRAModule.__init__` takes back."""
    return {name: value.to_dict() if isinstance(value, AdapterConfig) else value
            for name, value in hyperparameters.items()}


def _refuse_hub_kernel_from_a_file(attn_implementation: str | None) -> None:
    """Refuse an `attn_implementation` that names a kernel on the Hub ("org/repo", which transformers downloads and
    runs) when it comes from the hyperparameters `load_from_checkpoint` read (a checkpoint's or an `hparams_file`'s),
    not from its caller: a file never chooses what code runs, as for `trust_remote_code`."""
    given = _CALLER_ARGUMENTS.get()
    if given is None or "attn_implementation" in given or "/" not in str(attn_implementation or ""):
        return
    raise ValueError(f"the hyperparameters load_from_checkpoint read name attn_implementation="
                     f"{attn_implementation!r}, attention code from the Hub that a file does not get to choose: pass "
                     f"attn_implementation= to load_from_checkpoint ({attn_implementation!r} to run that kernel, or "
                     "None for transformers' own)")


def _check_loadable_hyperparameters(hyperparameters: Mapping[str, Any], kind: str) -> None:
    """Refuse, before training, a hyperparameter (`kind`: the module's or the data module's) that a checkpoint read as
    data (`weights_only=True`) cannot give back: a subclass's `save_hyperparameters()` of a `pathlib.Path`, say, made
    every checkpoint of the run unloadable, with torch's message naming no setting. Each value is saved and loaded as
    a checkpoint would be."""
    for name, value in hyperparameters.items():
        buffer = io.BytesIO()
        try:
            torch.save(value, buffer)
            buffer.seek(0)
            torch.load(buffer, weights_only=True)
        except Exception as error:  # torch.save and the weights_only unpickler raise several kinds
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise ValueError(f"{kind} {name!r} ({type(value).__name__}: {value!r:.80}) cannot be read back "
                             f"from a checkpoint, which is read as data (torch.load with weights_only=True): {reason}. "
                             "Pass it as plain data (a path as a str) or leave it out of "
                             "save_hyperparameters(ignore=[...])") from error


def _check_settings(learning_rate: float, weight_decay: float, router_learning_rate: float | None,
                    router_weight_decay: float | None, warmup_ratio: float, lr_schedule: str,
                    max_new_tokens: int | None, quantization: str | None, compute_dtype: str, dtype: str | None,
                    quant_storage: str | None, compile_adapters: bool | str, adapter: Any, adapter_path: Any,
                    attn_implementation: Any, gradient_checkpointing: Any, trust_remote_code: Any,
                    export_adapters: Any) -> None:
    """Refuse, by name, the settings that would otherwise fail steps later, as a non-finite loss or a generation
    error, or silently train otherwise (an unknown lr_schedule ran as cosine; the CLI checks it, Python did not), or
    fail only once the model loads inside the fit (the base-loading settings, which the CLI checks by their types).
    A switch must be a bool: "false" and None were truthy or passed on, and trust_remote_code="false" (or None, which
    transformers answers from stdin) ran a folder's own code."""
    def options(literal: Any) -> str:
        return ", ".join(repr(option) for option in get_args(literal))

    checks = [
        ("learning_rate", learning_rate, is_finite_number(learning_rate) and learning_rate >= 0,
         "a finite number >= 0"),
        ("weight_decay", weight_decay, is_finite_number(weight_decay) and weight_decay >= 0,
         "a finite number >= 0"),
        ("router_learning_rate", router_learning_rate,
         router_learning_rate is None or is_finite_number(router_learning_rate) and router_learning_rate >= 0,
         "None or a finite number >= 0 (0 freezes the routers)"),
        ("router_weight_decay", router_weight_decay,
         router_weight_decay is None or is_finite_number(router_weight_decay) and router_weight_decay >= 0,
         "None or a finite number >= 0"),
        ("warmup_ratio", warmup_ratio, is_finite_number(warmup_ratio) and 0.0 <= warmup_ratio < 1.0,
         "a float in [0, 1)"),
        ("lr_schedule", lr_schedule, lr_schedule in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
        ("max_new_tokens", max_new_tokens,
         max_new_tokens is None or is_int(max_new_tokens) and max_new_tokens >= 1,
         "None (each task's own length) or an integer >= 1"),
        ("quantization", quantization, quantization is None or quantization in get_args(Quantization),
         f"one of {options(Quantization)} or None"),
        ("compute_dtype", compute_dtype, compute_dtype in get_args(ComputeDtype), f"one of {options(ComputeDtype)}"),
        ("dtype", dtype, dtype is None or dtype in get_args(DtypeName), f"one of {options(DtypeName)} or None"),
        ("quant_storage", quant_storage, quant_storage is None or quant_storage in get_args(StorageDtypeName),
         f"one of {options(StorageDtypeName)} or None"),
        # a mode name `compile_adapters` refused only in build_model, after the base had loaded; 1 and "" passed on
        ("compile_adapters", compile_adapters, isinstance(compile_adapters, bool) or compile_adapters in COMPILE_MODES,
         f"True, False or one of {', '.join(map(repr, COMPILE_MODES))}"),
        # AdapterConfig's to_dict failed on anything else, naming nothing
        ("adapter", adapter, adapter is None or isinstance(adapter, (AdapterConfig, dict)),
         "an AdapterConfig, a dict of its fields, or None (the paper's MALoRA setting)"),
        ("adapter_path", adapter_path, adapter_path is None or isinstance(adapter_path, (str, Path)) and adapter_path,
         "None or an adapter folder's path"),
        # transformers refused other types with an AttributeError, after the fit had started
        ("attn_implementation", attn_implementation,
         attn_implementation is None or isinstance(attn_implementation, str) and attn_implementation,
         "None (transformers chooses) or a kernel name such as 'sdpa' or 'eager'"),
        *((name, value, isinstance(value, bool), "True or False")
          for name, value in (("gradient_checkpointing", gradient_checkpointing),
                              ("trust_remote_code", trust_remote_code), ("export_adapters", export_adapters))),
    ]
    for name, value, ok, allowed in checks:
        if not ok:
            raise ValueError(f"MALoRAModule {name}={value!r} is invalid: expected {allowed}")
    # settings of a quantized base that an unquantized one would ignore (it loaded in float32 whatever they said)
    if quantization is None and compute_dtype != "auto":
        raise ValueError(f"MALoRAModule compute_dtype={compute_dtype!r} applies to a quantized base (its 4-bit layers' "
                         "compute dtype and its other weights' dtype), and quantization is None: an unquantized base "
                         "loads in `dtype` (None: float32) and computes in the trainer's precision; set dtype or "
                         "trainer.precision (e.g. bf16-mixed) instead, and leave compute_dtype 'auto'")
    check_quant_storage_has_4bit(quantization, quant_storage, owner="MALoRAModule ")
