"""MALoRAModule on a tiny random Llama: training, evaluation, checkpoints, resume, export, precision, subclassing."""

import copy
import dataclasses
import gc
import json
import logging
import math
import re
import unittest.mock
import warnings
import weakref
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import yaml
import transformers
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import Logger

from malora_lightning.adapters import (
    AdapterConfig,
    adapter_state_dict,
    add_routing_observer,
    load_adapters,
    load_base_model,
    router_losses,
)
from malora_lightning.adapters.model import routing_context
from malora_lightning.callbacks import PerTaskMetrics, RunReport
from malora_lightning.data import MultiTaskDataModule, TrainingBatch, get_task
from malora_lightning.data.collate import PromptEncoder
from malora_lightning.checkpoints import CHECKPOINT_FORMAT_KEY, check_checkpoint_format, upgrade_checkpoint
from malora_lightning.evaluation import DEFAULT_MAX_NEW_TOKENS, EvaluationMixin
from malora_lightning.module import (
    MALoRAModule,
    NonFiniteLossCheck,
    _check_loadable_hyperparameters,
    compile_mode,
    context_length,
    first_validation_inside_a_window,
    fit_batches,
)
from malora_lightning.optim import adamw_options, lr_multiplier, schedule_length
from malora_lightning.precision import AutoMixedPrecision
from malora_lightning.scoring import IGNORE_INDEX, gold_rows, one_token_choices
from tests.helpers import (SYNCING_OPS, HostWaits, OpRecorder, activation_checkpointing_on, tiny_config, tiny_model,
                           tiny_tokenizer)
from tests.recipe_stacks import RECIPE_DIR, SINGLE_FILE_RECIPES

TASKS = ["add_2digit", "parity", "reverse_words"]  # generative, multiple choice, generative


def make_module(model_dir, **overrides) -> MALoRAModule:
    settings = dict(model_name_or_path=str(model_dir), quantization=None,
                    adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2, dropout=0.1),
                    learning_rate=1e-2, warmup_ratio=0.2)
    settings.update(overrides)
    return MALoRAModule(**settings)


def make_data(model_dir, **overrides) -> MultiTaskDataModule:
    settings = dict(tasks=TASKS, tokenizer=str(model_dir), max_length=64, batch_size=4, eval_batch_size=4,
                    max_train_examples_per_task=24, max_eval_examples_per_task=4, sampling="uniform", seed=3)
    settings.update(overrides)
    return MultiTaskDataModule(**settings)


def make_trainer(root, **overrides) -> L.Trainer:
    settings = dict(accelerator="cpu", devices=1, max_steps=4, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                    limit_val_batches=0, default_root_dir=str(root))
    settings.update(overrides)
    return L.Trainer(**settings)


class _StopAfter(Callback):
    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step >= self.steps:
            trainer.should_stop = True


class LossRecorder(Callback):
    def __init__(self) -> None:
        self.losses: dict[int, float] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = outputs["loss"].item()


def test_lr_schedule_warms_up_then_decays_to_zero():
    assert lr_multiplier(0, 4, 20, "linear") == pytest.approx(0.25)
    assert lr_multiplier(3, 4, 20, "linear") == pytest.approx(1.0)
    assert lr_multiplier(12, 4, 20, "linear") == pytest.approx(0.5)
    assert lr_multiplier(12, 4, 20, "cosine") == pytest.approx(0.5)
    assert lr_multiplier(8, 4, 20, "cosine") == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert lr_multiplier(20, 4, 20, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(15, 4, 20, "constant") == 1.0
    with pytest.raises(ValueError, match="lr_schedule='none' is invalid"):  # was cosine
        lr_multiplier(15, 4, 20, "none")


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_steps_past_the_schedules_end_stay_at_rate_zero(schedule):
    """A step beyond total_steps (a resumed fit given more steps than the schedule spans): linear went negative, cosine
    rose again."""
    assert [lr_multiplier(step, 4, 20, schedule) for step in (20, 21, 30, 36)] == pytest.approx([0.0] * 4, abs=1e-12)


def test_a_run_of_unknown_length_takes_only_a_constant_rate_without_warm_up():
    assert schedule_length(math.inf, 0.0, "constant") == 1 and schedule_length(-1, 0.0, "constant") == 1
    for length in (math.inf, -1):
        with pytest.raises(ValueError, match=r"lr_schedule='constant' with warmup_ratio=0.1 needs the run's length"):
            schedule_length(length, 0.1, "constant")
    assert schedule_length(37.0, 0.1, "cosine") == 37 and schedule_length(0.0, 0.0, "linear") == 1


@pytest.mark.parametrize(("registered", "cap", "expected"), [(10, 4, 4), (10, 20, 10), (10, None, 10), (None, 6, 6),
                                                             (None, None, DEFAULT_MAX_NEW_TOKENS)])
def test_the_generation_length_is_the_tasks_capped_by_max_new_tokens(registered, cap, expected):
    task = dataclasses.replace(get_task("parity"), max_new_tokens=registered)
    module = SimpleNamespace(settings=SimpleNamespace(max_new_tokens=cap))
    assert EvaluationMixin.generation_length(module, task) == expected
    assert EvaluationMixin.generation_length(module, None) == (cap or DEFAULT_MAX_NEW_TOKENS)


@pytest.mark.parametrize("limits", [dict(max_steps=-1, max_time={"seconds": 60}), dict(max_steps=-1, max_epochs=-1)])
def test_an_unbounded_run_trains_at_a_constant_rate_and_refuses_a_schedule_that_needs_its_length(
        tiny_model_dir, tmp_path, limits):
    """Lightning estimates infinite steps for a run that only max_time ends; int(inf) raised OverflowError."""
    data = make_data(tiny_model_dir, tasks=["parity"], max_train_examples_per_task=8)
    module = make_module(tiny_model_dir, warmup_ratio=0.0, lr_schedule="constant")
    trainer = make_trainer(tmp_path / "constant", limit_train_batches=2, callbacks=[_StopAfter(steps=2)], **limits)
    trainer.fit(module, data)
    assert trainer.global_step == 2
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(module.hparams.learning_rate)
    with pytest.raises(ValueError, match=r"lr_schedule='cosine' with warmup_ratio=0.2 needs the run's length"):
        make_trainer(tmp_path / "cosine", **limits).fit(make_module(tiny_model_dir), data)


class _Stream(torch.utils.data.IterableDataset):
    """A streamed training set: its loader has no length."""

    def __init__(self, batches: list) -> None:
        self.batches = batches

    def __iter__(self):
        return iter(self.batches)


def test_a_training_loader_without_a_length_is_not_taken_for_a_one_step_run(tiny_model_dir, tmp_path):
    """Lightning estimates max_steps (-1) for an unsized loader under max_epochs: the schedule took it for one step,
    and a linear schedule trained at rate 0 from step 1 on (lr 0.01, then 0.0 for 11 of 12 steps)."""
    data = make_data(tiny_model_dir, tasks=["parity"], max_train_examples_per_task=8)
    data.setup("fit")
    batches = list(data.train_dataloader())
    loader = torch.utils.data.DataLoader(_Stream(batches), batch_size=None)
    rates = LearningRateRecorder()
    trainer = make_trainer(tmp_path / "constant", max_steps=-1, max_epochs=2, callbacks=[rates])
    trainer.fit(make_module(tiny_model_dir, warmup_ratio=0.0, lr_schedule="constant"), train_dataloaders=loader)
    assert trainer.global_step == 2 * len(batches) and trainer.estimated_stepping_batches == -1
    assert [rates.rates[step][0] for step in range(trainer.global_step)] == [1e-2] * trainer.global_step
    with pytest.raises(ValueError, match=r"lr_schedule='linear' with warmup_ratio=0.0 needs the run's length, but the "
                                         r"trainer's is unknown \(the training loader has no length"):
        make_trainer(tmp_path / "linear", max_steps=-1, max_epochs=2).fit(
            make_module(tiny_model_dir, warmup_ratio=0.0, lr_schedule="linear"), train_dataloaders=loader)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model_name_or_path": None}, "model_name_or_path=None is invalid: expected a local folder, a hub id or an "
                                   "offline model"),
    ({"model_name_or_path": ""}, "model_name_or_path='' is invalid"),
    ({"learning_rate": -1e-4}, "learning_rate=-0.0001 is invalid: expected a finite number >= 0"),
    ({"learning_rate": math.inf}, "learning_rate=inf is invalid"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1 is invalid: expected a finite number >= 0"),
    ({"router_learning_rate": math.nan}, "router_learning_rate=nan is invalid: expected None or a finite number"),
    ({"router_weight_decay": -1}, "router_weight_decay=-1 is invalid"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0 is invalid: expected a float in \[0, 1\)"),
    ({"max_new_tokens": 0}, "max_new_tokens=0 is invalid: expected None .* or an integer >= 1"),
    ({"max_new_tokens": -3}, "max_new_tokens=-3 is invalid"),
    ({"max_new_tokens": 2.5}, "max_new_tokens=2.5 is invalid"),
    ({"max_new_tokens": True}, "max_new_tokens=True is invalid"),
    ({"lr_schedule": "Constant"}, "lr_schedule='Constant' is invalid: expected one of linear, cosine, constant"),
    ({"quantization": "nf8"}, "quantization='nf8' is invalid: expected one of 'nf4', 'fp4', 'int8' or None"),
    ({"compute_dtype": "float64"}, "compute_dtype='float64' is invalid: expected one of 'auto', 'bfloat16', "
                                   "'float16', 'float32'$"),
    ({"compute_dtype": None}, "compute_dtype=None is invalid"),
    ({"dtype": "uint8"}, "dtype='uint8' is invalid: expected one of 'bfloat16', 'float16', 'float32' or None"),
    ({"quant_storage": "int4"}, "quant_storage='int4' is invalid"),
    ({"compile_adapters": "max_autotune"}, "compile_adapters='max_autotune' is invalid: expected True, False or one "
                                           "of 'default', 'reduce-overhead', 'max-autotune', "),
    ({"compile_adapters": 1}, "compile_adapters=1 is invalid"),
    # were truthy: trust_remote_code 'false' (or None, which transformers answers from stdin) ran a folder's code
    ({"trust_remote_code": "false"}, "trust_remote_code='false' is invalid: expected True or False"),
    ({"trust_remote_code": None}, "trust_remote_code=None is invalid"),
    ({"gradient_checkpointing": "false"}, "gradient_checkpointing='false' is invalid: expected True or False"),
    ({"export_adapters": 0}, "export_adapters=0 is invalid"),
    # AttributeErrors naming nothing: 'to_dict' at construction, transformers' 'startswith' inside the fit
    ({"adapter": "malora"}, "adapter='malora' is invalid: expected an AdapterConfig, a dict of its fields, or None"),
    ({"attn_implementation": True}, "attn_implementation=True is invalid: expected None .* or a kernel name"),
    ({"attn_implementation": ""}, "attn_implementation='' is invalid"),
    ({"adapter_path": 3}, "adapter_path=3 is invalid: expected None or an adapter folder's path"),  # a TypeError
    ({"adapter_path": ""}, "adapter_path='' is invalid"),  # read the current directory as the adapter folder
    # a quantized base's settings that an unquantized one ignored: it loaded and computed in float32
    ({"quantization": None, "compute_dtype": "bfloat16"},
     "compute_dtype='bfloat16' applies to a quantized base .* set dtype or trainer.precision"),
    ({"quantization": None, "quant_storage": "bfloat16"},
     r"quant_storage='bfloat16' is the storage dtype of packed 4-bit weights, and quantization is None"),
    ({"quantization": "int8", "quant_storage": "bfloat16"}, "quant_storage='bfloat16' .* quantization is 'int8'"),
])
def test_bad_settings_are_named_when_the_module_is_built(kwargs, message):
    """Before any model loads: each would otherwise surface steps later (a non-finite loss blamed on the data, a
    generation that transformers refuses)."""
    with pytest.raises(ValueError, match="MALoRAModule " + message):
        MALoRAModule(**kwargs)


@pytest.mark.parametrize("compile_adapters", [True, False, "default", "reduce-overhead", "max-autotune",
                                              "max-autotune-no-cudagraphs"])
def test_every_compile_mode_is_a_valid_setting_when_the_module_is_built(compile_adapters):
    assert MALoRAModule(compile_adapters=compile_adapters).settings.compile_adapters == compile_adapters


def test_building_the_model_logs_the_trainable_parameter_count(tiny_model_dir, caplog):
    """PEFT's line, in place of Lightning's summary (which the CLI turns off): a tiny float model's counts by hand."""
    module = make_module(tiny_model_dir)
    with caplog.at_level(logging.INFO, logger="malora_lightning.module"):
        module.configure_model()
    trainable = sum(param.numel() for param in module.model.parameters() if param.requires_grad)
    total = sum(param.numel() for param in module.model.parameters())
    assert 0 < trainable < total
    assert f"trainable params: {trainable:,} || all params: {total:,} || trainable%: " \
           f"{100 * trainable / total:.4f}" in caplog.messages


def test_training_lowers_the_loss_and_logs_per_task(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, adapter=AdapterConfig(rank=4, shared_rank=8, num_experts=4, dropout=0.0),
                         learning_rate=3e-2, warmup_ratio=0.0, lr_schedule="constant")
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, max_steps=30, callbacks=[recorder], log_every_n_steps=1)
    trainer.fit(module, make_data(tiny_model_dir, tasks=["parity"], max_train_examples_per_task=8))
    losses = list(recorder.losses.values())
    assert sum(losses[-5:]) / 5 < 0.95 * sum(losses[:5]) / 5
    metrics = trainer.callback_metrics
    assert {"train/loss", "train/lm_loss", "train/aux_loss", "train/load_balance", "train/parity/lm_loss"} <= set(metrics)
    assert metrics["train/loss"].item() == pytest.approx(metrics["train/lm_loss"].item()
                                                         + metrics["train/aux_loss"].item(), rel=1e-5)


class _StepLogger(Logger):
    """Keeps what each step's log_metrics call wrote, as a CSV or TensorBoard logger would write it."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: dict[int, dict[str, float]] = {}

    @property
    def name(self) -> str:
        return "steps"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.steps.setdefault(step, {}).update(metrics)


def short_names(steps: dict[int | str, dict[str, float]]) -> dict[int, dict[str, float]]:
    """`_StepLogger.steps` (or their JSON) with short names: "loss" for train/loss, "parity" for
    train/parity/lm_loss."""
    return {int(step): {key.removeprefix("train/").removesuffix("/lm_loss"): value for key, value in values.items()}
            for step, values in steps.items()}


class _BatchTasks(Callback):
    """The tasks of each optimizer step's batches, and of its last batch."""

    def __init__(self) -> None:
        self.tasks: dict[int, set[str]] = {}
        self.last_batch: dict[int, set[str]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.tasks.setdefault(trainer.global_step, set()).update(batch.task_name)
        self.last_batch[trainer.global_step] = set(batch.task_name)


class RecordingLMLoss(MALoRAModule):
    """Keeps each batch's LM loss and per-task LM losses and target tokens, by global step (and its latest LMLoss)."""

    def compute_lm_loss(self, batch):
        self.latest = super().compute_lm_loss(batch)
        self.parts = getattr(self, "parts", {})
        self.parts.setdefault(self.global_step, []).append(
            {name: (value.item(), self.latest.per_task_tokens[name].item())
             for name, value in self.latest.per_task.items()})
        self.batch_losses = getattr(self, "batch_losses", {})
        self.batch_losses.setdefault(self.global_step, []).append(self.latest.loss.item())
        return self.latest


def token_weighted(parts: list[dict[str, tuple[float, float]]], name: str) -> float:
    """A task's loss over batches: their per-task losses weighted by target tokens."""
    present = [batch[name] for batch in parts if name in batch]
    return sum(loss * tokens for loss, tokens in present) / sum(tokens for _, tokens in present)


@pytest.mark.parametrize(("batch_size", "accumulate"), [(2, 1), (1, 2), (2, 3)])
def test_a_task_missing_from_a_step_logs_no_loss_at_that_step(tiny_model_dir, tmp_path, batch_size, accumulate):
    """Lightning writes a step's metrics from every key logged so far in the epoch: a task absent from a batch had
    its last batch's loss written again under this step, a value no batch of this step gave (and a resumed run,
    whose keys start fresh, wrote nothing there, so the two runs' metrics differed). With gradient accumulation a
    task's loss is the step's, over all its batches: the last batch's was written (and a task in an earlier batch
    only, that batch's), as was train/lm_loss."""
    logger, tasks = _StepLogger(), _BatchTasks()
    trainer = make_trainer(tmp_path, max_steps=6, logger=logger, log_every_n_steps=1, callbacks=[tasks],
                           accumulate_grad_batches=accumulate)
    module = RecordingLMLoss(**make_module(tiny_model_dir).hparams)
    trainer.fit(module, make_data(tiny_model_dir, batch_size=batch_size))
    assert any(len(present) < len(TASKS) for present in tasks.tasks.values())  # the case under test occurs
    if accumulate > 1:  # and a task of the step's first batch is missing from its last
        assert any(tasks.tasks[step] - tasks.last_batch[step] for step in tasks.tasks)
    in_several_batches = 0
    for step, present in tasks.tasks.items():
        logged = logger.steps[step]
        # the step's LM loss is the mean of its batches' (as the gradient averages them), not its last batch's
        losses = module.batch_losses[step]
        assert len(losses) == accumulate and logged["train/lm_loss"] == pytest.approx(sum(losses) / accumulate,
                                                                                     rel=1e-6)
        for name in TASKS:
            value = logged.get(f"train/{name}/lm_loss", math.nan)
            assert math.isfinite(value) == (name in present), (step, name, present, value)
            if name in present:
                assert value == pytest.approx(token_weighted(module.parts[step], name), rel=1e-6), (step, name)
                in_several_batches += sum(name in batch for batch in module.parts[step]) > 1
    assert in_several_batches > 0 or accumulate == 1


class _LogCalls(MALoRAModule):
    """Keeps every `self.log` call: (epoch, step, name, value)."""

    def log(self, name, value, *args, **kwargs) -> None:
        self.calls = getattr(self, "calls", [])
        self.calls.append((self.current_epoch, self.global_step, name, value))
        super().log(name, value, *args, **kwargs)


def test_a_task_absent_from_consecutive_steps_is_logged_nan_once_and_written_nan_at_each(tiny_model_dir, tmp_path):
    """Every step logged NaN for every task absent from it, a `self.log` (0.5 ms) per task and step: with 200 tasks
    and batches of 4 a 26 ms step took 134 ms. Lightning keeps a logged value until its key is logged again or the
    epoch ends, so a task's NaN is logged when it goes missing (or again in a new epoch), and every step still writes
    NaN for each absent task logged before, across epochs too."""
    logger, tasks = _StepLogger(), _BatchTasks()
    names = TASKS + ["double_number", "last_word", "sort_words"]
    trainer = make_trainer(tmp_path, max_steps=30, logger=logger, log_every_n_steps=1, callbacks=[tasks])
    module = _LogCalls(**make_module(tiny_model_dir).hparams)
    trainer.fit(module, make_data(tiny_model_dir, batch_size=1, tasks=names, max_train_examples_per_task=2))
    assert trainer.current_epoch >= 2  # epoch ends crossed
    nan_logged = {}
    for epoch, step, name, value in module.calls:
        if name.endswith("/lm_loss") and name != "train/lm_loss" and torch.isnan(value):
            nan_logged.setdefault(step, (epoch, set()))[1].add(name)
    for step, (epoch, logged) in nan_logged.items():
        if step - 1 in nan_logged and nan_logged[step - 1][0] == epoch:
            assert not logged & nan_logged[step - 1][1], step  # Lightning still holds the previous step's NaN
    # exactly once per run of absent steps in an epoch: at a step where a task seen before is absent, unless it was
    # already absent (and seen) at the previous step of the same epoch
    epochs = {step: epoch for epoch, step, name, _ in module.calls if name == "train/loss"}
    steps = sorted(tasks.tasks)
    seen_before = {step: set().union(*(tasks.tasks[earlier] for earlier in steps if earlier < step)) for step in steps}
    for step in steps:
        held = set() if step - 1 not in tasks.tasks or epochs[step - 1] != epochs[step] else \
            seen_before[step - 1] - tasks.tasks[step - 1]
        expected = {f"train/{name}/lm_loss" for name in seen_before[step] - tasks.tasks[step] - held}
        assert nan_logged.get(step, (epochs[step], set()))[1] == expected, step
    seen = set()
    for step in sorted(tasks.tasks):
        seen |= tasks.tasks[step]
        written = {key: value for key, value in logger.steps[step].items()
                   if key.endswith("/lm_loss") and key != "train/lm_loss"}
        assert set(written) == {f"train/{name}/lm_loss" for name in seen}, step
        assert all(math.isfinite(written[f"train/{name}/lm_loss"]) == (name in tasks.tasks[step]) for name in seen)


def test_a_second_fit_of_the_module_writes_nan_for_each_absent_task_from_its_first_step(tiny_model_dir, tmp_path):
    """A fit's Lightning holds no logged value of an earlier fit: the tasks whose NaN the first fit left logged in
    its epoch 0 were not logged again in the second fit's epoch 0, so its steps wrote nothing for them."""
    module = make_module(tiny_model_dir)
    names = TASKS + ["double_number", "last_word", "sort_words"]
    for run in ("first", "second"):
        trained_before = set(module._logged_tasks)
        logger, tasks = _StepLogger(), _BatchTasks()
        trainer = make_trainer(tmp_path / run, max_steps=4, logger=logger, log_every_n_steps=1, callbacks=[tasks])
        trainer.fit(module, make_data(tiny_model_dir, batch_size=1, tasks=names, max_train_examples_per_task=8))
        assert trainer.num_training_batches > 4  # both fits end inside their epoch 0
    assert trained_before  # the first fit trained tasks that some step of the second lacks
    for step, present in tasks.tasks.items():  # the second fit's steps
        written = {key for key, value in logger.steps[step].items() if key.endswith("/lm_loss") and math.isnan(value)}
        assert {f"train/{name}/lm_loss" for name in trained_before - present} <= written, step


# what the loggers were given at each step of `test_each_steps_losses_are_logged_as_before_wherever_checked`'s fit
# by the code that logged them in `training_step`, at the step's last batch, before its backward (91562c5)
LOGGED_BEFORE = {
    0: {"loss": 6.010537, "lm_loss": 6.000469, "aux_loss": 0.01006846, "load_balance": 1.006846,
        "double_number": 5.882041, "parity": 6.158874, "sort_words": 6.063951, "epoch": 0},
    1: {"loss": 5.957381, "lm_loss": 5.947324, "aux_loss": 0.01005813, "load_balance": 1.005813,
        "double_number": 4.963871, "parity": math.nan, "sort_words": 6.020801, "add_2digit": 5.851637,
        "reverse_words": 6.121165, "epoch": 0},
    2: {"loss": 6.145308, "lm_loss": 6.13517, "aux_loss": 0.01013797, "load_balance": 1.013797,
        "double_number": math.nan, "parity": math.nan, "sort_words": math.nan, "add_2digit": math.nan,
        "reverse_words": 6.187378, "last_word": 5.935035, "epoch": 0},
    3: {"loss": 6.212278, "lm_loss": 6.202101, "aux_loss": 0.01017721, "load_balance": 1.01772,
        "double_number": math.nan, "parity": math.nan, "sort_words": 6.302382, "add_2digit": math.nan,
        "reverse_words": 6.013453, "last_word": 5.777618, "epoch": 1},
    4: {"loss": 5.712058, "lm_loss": 5.701838, "aux_loss": 0.01021955, "load_balance": 1.021955,
        "double_number": 5.327987, "parity": 5.212031, "sort_words": 6.454203, "add_2digit": 4.955632,
        "reverse_words": math.nan, "last_word": math.nan, "epoch": 1},
    5: {"loss": 6.05422, "lm_loss": 6.044, "aux_loss": 0.01022021, "load_balance": 1.022021,
        "double_number": 5.915748, "parity": math.nan, "sort_words": 6.066902, "add_2digit": math.nan,
        "reverse_words": math.nan, "last_word": math.nan, "epoch": 1},
}


def _without_the_check(module: MALoRAModule) -> MALoRAModule:
    """The module as a user who took `NonFiniteLossCheck` out of its callbacks would fit it."""
    callbacks = [callback for callback in module.configure_callbacks() if not isinstance(callback, NonFiniteLossCheck)]
    module.configure_callbacks = lambda: callbacks
    return module


@pytest.mark.parametrize("checked", ["after the backward", "without the callback", "in anomaly mode"])
def test_each_steps_losses_are_logged_as_before_wherever_checked(tiny_model_dir, tmp_path, checked):
    """The check after the step's backward (`NonFiniteLossCheck`) logs the step's losses, which were logged at the
    step's last batch, before its backward: Lightning writes both with the step's logs, at the same step, as before.
    Epochs of 5 batches (the last step has one batch) and tasks absent from a step (NaN, once per epoch). Without the
    callback, and in anomaly mode, `training_step` checks and logs, with the same figures. In float32: pinned
    bf16-mixed figures moved by 2.5e-4 under the lowest supported torch (every precision plugin calls the hook after
    the closure, fp16's also for a step its loss scaler then skips)."""
    torch.manual_seed(0)
    logger = _StepLogger()
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=5, accumulate_grad_batches=2,
                           logger=logger, log_every_n_steps=1, detect_anomaly=checked == "in anomaly mode")
    module = make_module(tiny_model_dir)
    trainer.fit(_without_the_check(module) if checked == "without the callback" else module,
                make_data(tiny_model_dir, batch_size=2, max_train_examples_per_task=8,
                          tasks=TASKS + ["double_number", "last_word", "sort_words"]))
    logged = short_names(logger.steps)
    assert logged.keys() == LOGGED_BEFORE.keys()
    for step, values in logged.items():
        # bit for bit here; pinned to 7 digits, and 1e-4 leaves room for float summation order (another BLAS, thread
        # count or torch version), far below what a step's batches averaged otherwise would move
        assert values == pytest.approx(LOGGED_BEFORE[step], rel=1e-4, nan_ok=True), step


class _ManualEveryOtherBatch(RecordingLMLoss):
    """Manual optimisation, stepping the optimizer at every second batch (gradient accumulation of its own)."""

    def __init__(self, **settings) -> None:
        super().__init__(**settings)
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.manual_backward(loss)
        if batch_idx % 2:
            self.optimizers().step()
            self.optimizers().zero_grad()
        return loss


def test_under_manual_optimisation_each_batch_is_checked_and_logged_at_once(tiny_model_dir, tmp_path):
    """Under manual optimisation the training step decides when `optimizer.step()`, and with it the check after the
    backward, comes: each batch is a step of its own to Lightning, which writes its logs after it, so
    `training_step` checks and logs it itself. Left to the check at `optimizer.step()`, a batch without one was
    never logged."""
    logger = _StepLogger()
    trainer = make_trainer(tmp_path, max_steps=2, logger=logger, log_every_n_steps=1)
    module = _ManualEveryOtherBatch(**make_module(tiny_model_dir).hparams)
    trainer.fit(module, make_data(tiny_model_dir))
    losses = [loss for step in sorted(module.batch_losses) for loss in module.batch_losses[step]]
    assert len(losses) == 4 and sorted(logger.steps) == [0, 1, 2, 3]
    assert [logger.steps[step]["train/lm_loss"] for step in range(4)] == pytest.approx(losses, rel=1e-6)


class _StopAfterFirstBatch(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        raise RuntimeError("stopped inside the accumulation window")


def test_a_fit_after_one_stopped_inside_an_accumulation_window_logs_only_its_own_batches(tiny_model_dir, tmp_path):
    """The stopped fit's first batch stayed in the step buffers, and the next fit of the same module averaged it into
    its first logged step."""
    module = RecordingLMLoss(**make_module(tiny_model_dir).hparams)
    stopped = make_trainer(tmp_path / "stopped", max_steps=2, accumulate_grad_batches=2,
                           callbacks=[_StopAfterFirstBatch()])
    with pytest.raises(RuntimeError, match="stopped inside the accumulation window"):
        stopped.fit(module, make_data(tiny_model_dir, batch_size=2))
    assert len(module.batch_losses[0]) == 1  # the window was left half done
    module.batch_losses = {}
    logger = _StepLogger()
    trainer = make_trainer(tmp_path / "again", max_steps=1, logger=logger, log_every_n_steps=1,
                           accumulate_grad_batches=2)
    trainer.fit(module, make_data(tiny_model_dir, batch_size=2))
    losses = module.batch_losses[0]
    assert len(losses) == 2 and logger.steps[0]["train/lm_loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)


class _PoisonedWhileSet(MALoRAModule):
    """The training loss is NaN while `poison` is set."""

    poison = False

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        if self.poison:
            result.loss = result.loss * float("nan")
        return result


def test_a_fit_after_one_stopped_inside_a_window_with_a_nan_loss_checks_only_its_own_losses(tiny_model_dir, tmp_path):
    """The stopped fit's NaN batch was never checked (its window's optimizer step never came): the next fit of the
    same module, on good data, stopped at its first step naming that old batch."""
    module = _PoisonedWhileSet(**make_module(tiny_model_dir).hparams)
    module.poison = True
    stopped = make_trainer(tmp_path / "stopped", max_steps=2, accumulate_grad_batches=2,
                           callbacks=[_StopAfterFirstBatch()])
    with pytest.raises(RuntimeError, match="stopped inside the accumulation window"):
        stopped.fit(module, make_data(tiny_model_dir, batch_size=2))
    module.poison = False
    trainer = make_trainer(tmp_path / "again", max_steps=1, accumulate_grad_batches=2)
    trainer.fit(module, make_data(tiny_model_dir, batch_size=2))
    assert trainer.global_step == 1


class _UncheckedAtBatchEnd(Callback):
    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.counts.append(len(pl_module._unchecked_losses))


def test_each_optimizer_steps_check_reads_only_the_losses_since_the_last(tiny_model_dir, tmp_path):
    """The losses kept for the check are let go once checked: kept, they grew by one device tensor a batch for the
    whole fit, and each step's check stacked them all."""
    unchecked = _UncheckedAtBatchEnd()
    trainer = make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[unchecked])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, batch_size=2))
    assert unchecked.counts == [1, 0] * 3


def test_each_tasks_lm_loss_is_its_token_mean_and_reading_it_waits_for_nothing(tiny_model_dir):
    """A task's loss is the mean NLL of its rows' target tokens (a float64 reference from the full logits), however
    its rows interleave with other tasks'. Besides the target positions (`target_pairs`), computing the losses reads
    nothing on the host (each read is a CUDA sync): a boolean mask per task read its rows, and bincount the largest
    row, at every step."""
    module = make_module(tiny_model_dir)
    module.configure_model()
    module.eval()  # no dropout: the forwards agree
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (5, 12))
    mask = torch.ones(5, 12, dtype=torch.long)
    mask[1, 9:] = 0
    labels = torch.full((5, 12), IGNORE_INDEX)
    for row, (start, end) in enumerate([(6, 12), (4, 9), (10, 12), (2, 12), (7, 8)]):
        labels[row, start:end] = ids[row, start:end]
    names = ["b", "a", "b", "c", "a"]
    batch = TrainingBatch(ids, mask, labels, torch.tensor([1, 0, 1, 2, 0]), names)
    with torch.no_grad():
        plain, computed = OpRecorder(), OpRecorder()
        with plain:
            log_probs = torch.log_softmax(module(ids, mask).double(), dim=-1)
        with computed:
            result = module.compute_lm_loss(batch)
    target = labels[:, 1:] != IGNORE_INDEX
    token_nll = -log_probs[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1)).squeeze(-1) * target
    for name in "abc":
        rows = [row for row, task in enumerate(names) if task == name]
        assert result.per_task_tokens[name].item() == target[rows].sum().item()
        expected = token_nll[rows].sum() / target[rows].sum()
        assert result.per_task[name].item() == pytest.approx(expected.item(), rel=1e-5), name
    assert result.loss.item() == pytest.approx((token_nll.sum() / target.sum()).item(), rel=1e-5)
    syncs = {op: count - plain.calls[op] for op, count in computed.calls.items() if op in SYNCING_OPS}
    assert {op: count for op, count in syncs.items() if count} == {"aten.nonzero": 1}


class _StepHostWaits(Callback):
    """`HostWaits` of each optimizer step's training batches (forward, backward, optimizer step; not Lightning's
    logging after them), and every value the module logs."""

    def __init__(self) -> None:
        self.steps: list[Counter] = []
        self.logged: list[tuple[str, object]] = []
        self._recorder: HostWaits | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        log = pl_module.log

        def recording_log(name, value, *args, **kwargs):
            self.logged.append((name, value))
            return log(name, value, *args, **kwargs)

        pl_module.log = recording_log

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if len(self.steps) == trainer.global_step:
            self.steps.append(Counter())
        self._recorder = HostWaits()
        self._recorder.__enter__()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._recorder.__exit__(None, None, None)
        self.steps[-1].update(self._recorder.in_package())


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_a_training_step_makes_the_host_wait_only_for_the_finiteness_check(tiny_model_dir, tmp_path, method):
    """On a GPU, each read of a tensor's value and each blocking copy from the host waits for every kernel queued
    before it. A training step of two micro-batches needs one wait: the finiteness check of both batches' losses
    (the error comes before the update), once the backward is queued (`NonFiniteLossCheck`); it was made in
    `training_step`, before each batch's backward. The target positions (`target_pairs`, a data-dependent shape) were
    made on the device before each forward; the collator makes them on the CPU (`TrainingBatch.pairs`). LoRA's zero
    aux loss was made on the CPU and copied to the device (a wait per batch), and a task missing from a step was
    logged as math.nan, which Lightning turns into a tensor from host data on the device (a wait per task and
    step)."""
    adapter = AdapterConfig(method=method, rank=2, dropout=0.1, **(
        {} if method == "lora" else dict(num_experts=4, top_k=2, shared_rank=4 if method == "malora" else None)))
    recorder = _StepHostWaits()
    trainer = make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, log_every_n_steps=1,
                           callbacks=[recorder])
    trainer.fit(make_module(tiny_model_dir, adapter=adapter),
                make_data(tiny_model_dir, batch_size=2,
                          tasks=TASKS + ["double_number", "last_word", "sort_words"]))
    expected = Counter({("bool", "malora_lightning/module.py:_step_task_losses"): 1})
    assert recorder.steps == [expected] * 3
    numbers = [name for name, value in recorder.logged if not isinstance(value, torch.Tensor)]
    assert numbers == []  # LightningModule.log copies each onto the device with torch.tensor
    assert any(torch.isnan(value) for _, value in recorder.logged)  # some step missed a task that an earlier one had


def test_a_max_length_beyond_the_base_models_context_is_named(tiny_model_dir, tmp_path):
    """The tiny Llama has 128 positions: longer sequences get positions it never saw (a GPT-2 base fails with an index
    error), and nothing said so."""
    with pytest.warns(UserWarning, match=r"data max_length=256 exceeds the base model's context of 128 tokens \(max_position_embeddings=128;"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(tiny_model_dir),
                                                datamodule=make_data(tiny_model_dir, max_length=256))


def test_a_tokenizer_with_more_tokens_than_the_model_embeds_is_refused_naming_both(tiny_model_dir, tmp_path):
    """A data.tokenizer other than the model's (the CLI takes one now) failed inside the embedding lookup."""
    small = tmp_path / "small-vocab"
    transformers.AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=200)).save_pretrained(small)
    with pytest.raises(ValueError, match=rf"the data module's tokenizer .* has 261 tokens and the base model "
                                         rf"'{small}' embeds 200: give data.tokenizer the model's own tokenizer"):
        make_trainer(tmp_path, limit_val_batches=1).validate(make_module(small), make_data(tiny_model_dir))


def test_a_multimodal_base_is_checked_against_its_text_context(tmp_path):
    """Gemma 3 4B and up keep max_position_embeddings in their text config: the check found none and said nothing."""
    model_dir = tmp_path / "gemma3"
    tiny_model("gemma3").save_pretrained(model_dir)
    tiny_tokenizer(chat_template=True).save_pretrained(model_dir)
    with pytest.warns(UserWarning, match=r"data max_length=256 exceeds the base model's context of 128 tokens \(max_position_embeddings=128;"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(model_dir), datamodule=make_data(model_dir, max_length=256))


@pytest.mark.parametrize("rope, expected", [
    (None, 32768),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}, 131072),  # Qwen2.5's recipe
    ({"rope_type": "linear", "factor": 8.0}, 262144),  # position interpolation over max_position_embeddings
    ({"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}, 32768),  # shorter: kept
    ({"rope_type": "yarn", "factor": 0.5}, 32768),  # a factor below 1 shrinks nothing here
    ({"rope_type": "default"}, 32768),
])
def test_the_context_length_follows_rope_scaling(rope, expected):
    """The check warned at every max_length above 32,768 on a base configured for 131,072 tokens with YaRN."""
    config = transformers.LlamaConfig(max_position_embeddings=32768, rope_scaling=rope)
    assert context_length(config) == expected


def test_router_parameters_get_their_own_learning_rate_and_weight_decay(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, router_learning_rate=1e-4, router_weight_decay=0.0, weight_decay=0.05)
    module.configure_model()
    groups = module.trainable_parameter_groups()
    assert [g["lr"] for g in groups] == [1e-2, 1e-4] and [g["weight_decay"] for g in groups] == [0.05, 0.0]
    router_ids = {id(p) for n, p in module.model.named_parameters() if ".router." in n}
    assert {id(p) for p in groups[1]["params"]} == router_ids and len(router_ids) == 12
    assert not router_ids & {id(p) for p in groups[0]["params"]}


def test_the_learning_rate_finder_sets_the_rate_the_fit_trains_at(tiny_model_dir, tmp_path):
    """Lightning's finder sets a module's `learning_rate` or `hparams.learning_rate`: the module runs on its settings,
    so with hparams alone the next fit trained at the old rate while the finder logged "Learning rate set to"."""
    from lightning.pytorch.tuner import Tuner

    module, data = make_module(tiny_model_dir, router_learning_rate=1e-4), make_data(tiny_model_dir)
    trainer = make_trainer(tmp_path, max_steps=1)
    found = Tuner(trainer).lr_find(module, datamodule=data, min_lr=1e-4, max_lr=1e-2, num_training=16,
                                   early_stop_threshold=None).suggestion()
    assert found is not None and found != 1e-2
    assert module.learning_rate == module.settings.learning_rate == module.hparams.learning_rate == found
    trainer.fit(module, data)
    assert [group["initial_lr"] for group in trainer.optimizers[0].param_groups] == [found, 1e-4]
    with pytest.raises(ValueError, match="learning_rate=nan is invalid"):
        module.learning_rate = math.nan


@pytest.mark.parametrize("method", ["lora", "molora", "malora"])
def test_the_librarys_adapters_and_routers_are_all_decayed(tiny_model_dir, method):
    module = make_module(tiny_model_dir, adapter=AdapterConfig(method=method, rank=2, shared_rank=4, num_experts=4,
                                                               top_k=2), weight_decay=0.05)
    module.configure_model()
    groups = module.trainable_parameter_groups()
    assert [g["weight_decay"] for g in groups] == [0.05] * (1 if method == "lora" else 2)


def test_a_subclasss_trained_norm_scales_get_no_weight_decay(tiny_model_dir):
    """HF Trainer's rule: AdamW's decay (lr * wd * w per step) pulled a trained RMSNorm scale from 1 towards 0."""
    class NormsToo(MALoRAModule):
        def build_model(self):
            model = super().build_model()
            model.model.norm.weight.requires_grad_(True)
            model.model.layers[0].input_layernorm.weight.requires_grad_(True)
            return model

    module = NormsToo(**{**make_module(tiny_model_dir).hparams, "weight_decay": 0.5})
    module.configure_model()
    groups = module.trainable_parameter_groups()
    assert [g["weight_decay"] for g in groups] == [0.5, 0.5, 0.0]
    assert {id(p) for p in groups[2]["params"]} == {id(module.model.model.norm.weight),
                                                    id(module.model.model.layers[0].input_layernorm.weight)}
    norm = module.model.model.norm.weight
    optimizer = torch.optim.AdamW(groups, lr=0.1)
    norm.grad = torch.zeros_like(norm)  # no gradient: only decay could move it
    optimizer.step()
    assert torch.equal(norm, torch.ones_like(norm))  # 1 - 0.1 * 0.5 = 0.95 with decay


def test_adamw_is_fused_for_cpu_parameters_and_left_to_torch_elsewhere():
    cpu = [torch.nn.Parameter(torch.zeros(3))]
    assert adamw_options(cpu) == {"fused": True}
    assert adamw_options([torch.nn.Parameter(torch.zeros(3, device="meta"))]) == {}


def test_the_fused_optimizer_steps_like_torchs_default_one(tiny_model_dir, tmp_path):
    """The fused CPU AdamW that configure_optimizers picks updates the adapters as the per-tensor loop does."""
    updated = {}
    for options in ({}, {"fused": True}):
        torch.manual_seed(0)  # the same adapter init and gradients for both
        module = make_module(tiny_model_dir)
        module.configure_model()
        params = [p for group in module.trainable_parameter_groups() for p in group["params"]]
        for param in params:
            param.grad = torch.randn_like(param)
        optimizer = torch.optim.AdamW(module.trainable_parameter_groups(), **options)
        for _ in range(3):
            optimizer.step()
        updated[bool(options)] = [p.detach().clone() for p in params]
    for loop, fused in zip(updated[False], updated[True]):
        torch.testing.assert_close(fused, loop, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("precision", "fused"), [("auto", True), ("32-true", True), ("bf16-mixed", False)])
def test_configure_optimizers_fuses_adamw_where_the_trainer_can_clip_it(tiny_model_dir, tmp_path, precision, fused):
    """With gradient clipping, as in the default recipe: Lightning's MixedPrecision refuses fused optimizers, so only
    AutoMixedPrecision (the default recipe's plugin) and plain float32 get one, and every run trains."""
    module = make_module(tiny_model_dir)
    settings = {"plugins": [AutoMixedPrecision("cpu")]} if precision == "auto" else {"precision": precision}
    trainer = make_trainer(tmp_path, max_steps=2, gradient_clip_val=1.0, **settings)
    trainer.fit(module, make_data(tiny_model_dir))
    assert bool(trainer.optimizers[0].defaults["fused"]) is fused
    assert trainer.global_step == 2


class _GradientNorms(Callback):
    """The trained tensors' total gradient norm before clipping (`on_before_optimizer_step`) and as the optimizer
    stepped with it (`on_before_zero_grad`: the next step's closure calls it before clearing the gradients)."""

    def __init__(self) -> None:
        self.before: list[float] = []
        self.stepped: list[float] = []

    @staticmethod
    def norm(pl_module) -> float | None:
        grads = [p.grad.double().reshape(-1) for p in pl_module.parameters() if p.grad is not None]
        return torch.cat(grads).norm().item() if grads else None

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.before.append(self.norm(pl_module))

    def on_before_zero_grad(self, trainer, pl_module, optimizer) -> None:
        norm = self.norm(pl_module)
        if norm is not None:
            self.stepped.append(norm)


@pytest.mark.parametrize("plugins", [[], [AutoMixedPrecision("cpu")]], ids=["32-true", "auto-mixed"])
def test_a_fit_steps_with_gradients_clipped_to_gradient_clip_val(tiny_model_dir, tmp_path, plugins):
    """`configure_gradient_clipping` hands every strategy but FSDP1 on to Lightning's clipping; skipping it trained
    on unclipped gradients and no test noticed. The norm the optimizer steps with is the clip value (float64
    reference over every trained tensor's gradient) wherever the unclipped norm exceeds it."""
    norms = _GradientNorms()
    trainer = make_trainer(tmp_path, max_steps=3, gradient_clip_val=1e-3, callbacks=[norms], plugins=plugins)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    assert len(norms.before) == 3 and len(norms.stepped) == 2  # steps 1 and 2, seen before step 2's and 3's clear
    assert all(norm > 1e-2 for norm in norms.before)  # the clip value is far below the unclipped norm
    assert norms.stepped == pytest.approx([1e-3, 1e-3], rel=1e-4)


def test_auto_mixed_precision_clips_the_gradients_of_a_fused_optimizer():
    params = [torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(3))]
    for param in params:
        param.grad = torch.full_like(param, 10.0)
    optimizer = torch.optim.AdamW(params, fused=True)
    AutoMixedPrecision("cpu").clip_gradients(optimizer, clip_val=1.0)
    total = torch.cat([p.grad for p in params]).norm().item()
    assert total == pytest.approx(1.0, rel=1e-5)


def test_evaluation_scores_every_task_and_the_report_is_written(tiny_model_dir, tmp_path):
    metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=None, num_sanity_val_steps=-1,
                           val_check_interval=2, callbacks=[metrics, RunReport()], enable_checkpointing=True)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    before, after = metrics.evaluations("val")
    assert before.sanity_check and before.step == 0 and not after.sanity_check and after.step == 2
    assert set(after.tasks) == set(TASKS)
    for score in after.tasks.values():
        assert score.count == 4 and 0.0 <= score.accuracy <= 1.0 and score.loss > 0
    assert {f"val/{task}/acc" for task in TASKS} | {"val/macro_acc"} <= set(trainer.callback_metrics)
    report = (tmp_path / "checkpoints" / "report.md").read_text()
    assert "| parity |" in report and "| **mean** |" in report
    assert (tmp_path / "checkpoints" / "adapter" / "adapter_model.safetensors").is_file()
    card = (tmp_path / "checkpoints" / "adapter" / "README.md").read_text()  # the model card: base and final scores
    assert f"for {tiny_model_dir}" in card
    for task, score in after.tasks.items():
        assert f"| {task} | {100 * score.accuracy:.1f} % |" in card


def test_an_adapter_folder_loaded_on_a_base_quantized_otherwise_says_so(tiny_model_dir, tmp_path):
    """A folder trained on an unquantized base, evaluated under the default recipe's nf4 (or the other way round),
    ran on other base weights without a word: its logits differed by up to 3.5 on a tiny model."""
    from malora_lightning.adapters import save_adapters

    trained = make_module(tiny_model_dir)
    trained.configure_model()
    save_adapters(trained.model, tmp_path / "adapter")
    with pytest.warns(UserWarning, match=r"adapter was trained on a base loaded unquantized, and this run loads it "
                                         r"nf4, computing in float32: .* set quantization=None"):
        make_module(tiny_model_dir, quantization="nf4", compute_dtype="float32",
                    adapter_path=str(tmp_path / "adapter")).configure_model()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*was trained on a base loaded.*")
        make_module(tiny_model_dir, adapter_path=str(tmp_path / "adapter")).configure_model()  # as trained: silent


def test_an_adapter_folder_is_evaluated_with_its_own_settings_and_must_name_the_same_base(tiny_model_dir, tmp_path,
                                                                                          caplog):
    module = make_module(tiny_model_dir)
    make_trainer(tmp_path, max_steps=2).fit(module, make_data(tiny_model_dir))
    with caplog.at_level(logging.INFO, logger="malora_lightning"):
        lora = make_module(tiny_model_dir, adapter=AdapterConfig(method="lora", dropout=0.3),
                           adapter_path=str(tmp_path / "adapter"))
    assert lora.adapter_config == module.adapter_config and lora.hparams.adapter == module.adapter_config.to_dict()
    # the recipe's adapter settings that the folder's replace are named, with both values (they were not shown)
    assert re.search(r"the folder's adapter settings apply, not the model.adapter given \(method: folder 'malora', "
                     r"given 'lora'; .*dropout: folder 0.1, given 0.3", caplog.text)
    lora.configure_model()
    module.model.eval()
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        assert torch.equal(lora.model.eval()(ids).logits, module.model(ids).logits)
    with pytest.raises(ValueError, match=r"holds adapters for base model .* but model_name_or_path is 'elsewhere'"):
        make_module("elsewhere", adapter_path=str(tmp_path / "adapter"))
    # the same folder however written: with a trailing slash, or through a link (the strings were compared)
    (tmp_path / "link").symlink_to(tiny_model_dir)
    for spelling in (f"{tiny_model_dir}/", str(tmp_path / "link")):
        assert make_module(spelling, adapter_path=str(tmp_path / "adapter")).adapter_config == module.adapter_config


def test_a_relative_base_path_is_recorded_absolute_and_an_older_folders_one_says_where_it_resolves(tiny_model_dir,
                                                                                                      tmp_path,
                                                                                                      monkeypatch):
    """The module records (settings, hyperparameters) a local base given by a relative path as its absolute path. A
    folder saved before that names its base as typed: the same base from the directory it names it in; from another
    the refusal says so, and where."""
    from malora_lightning.adapters import inject_adapters, save_adapters

    (tmp_path / "start").mkdir()
    (tmp_path / "elsewhere").mkdir()
    base = tmp_path / "start" / "tiny"
    base.symlink_to(tiny_model_dir)
    save_adapters(inject_adapters(tiny_model("llama"), AdapterConfig(method="lora", rank=2)), tmp_path / "adapter",
                  base_model="tiny")  # a name here, not a folder: kept as given
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "tiny"
    monkeypatch.chdir(tmp_path / "start")
    module = make_module("tiny", adapter_path=str(tmp_path / "adapter"))
    assert module.settings.model_name_or_path == module.hparams.model_name_or_path == str(base)
    monkeypatch.chdir(tmp_path / "elsewhere")
    with pytest.raises(ValueError, match=rf"holds adapters for base model 'tiny', but model_name_or_path is "
                                         rf"'{base}' \('tiny' names no folder from the current directory .*; if so, "
                                         rf"run from that directory, {tmp_path / 'start'}, where it names {base}\)"):
        make_module(base, adapter_path=str(tmp_path / "adapter"))


class FixedAdapterFolder(MALoRAModule):
    """A subclass that starts from an adapter folder of its own, passed on as a `pathlib.Path`."""

    def __init__(self, folder: str, **kwargs):
        super().__init__(adapter_path=Path(folder), **kwargs)


class KeywordsPassedOn(MALoRAModule):
    """A subclass that passes our arguments on through `**kwargs`: they are recorded from its frame, as given."""

    def __init__(self, note: int = 0, **kwargs):
        super().__init__(**kwargs)


def test_an_adapter_path_is_recorded_as_absolute_text_and_its_checkpoints_load_from_anywhere(tiny_model_dir, tmp_path,
                                                                                               monkeypatch):
    """`adapter_path` accepts a `pathlib.Path`, which the module recorded as it was: in its hyperparameters the fit
    refused it (naming its own argument, to be left out of save_hyperparameters), and in the checkpoint's settings
    (a subclass passing one on) every checkpoint was unreadable as data (weights_only). A relative path was recorded
    as typed, naming the folder only from the directory the fit started in: its checkpoints did not load from
    another (FileNotFoundError)."""
    from malora_lightning.adapters import inject_adapters, save_adapters

    folder = tmp_path / "adapter"
    save_adapters(inject_adapters(tiny_model("llama"), AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2)),
                  folder, base_model=str(tiny_model_dir))
    settings = {name: value for name, value in make_module(tiny_model_dir).hparams.items() if name != "adapter_path"}
    monkeypatch.chdir(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fixed = FixedAdapterFolder(folder=str(folder), **{**settings, "export_adapters": False})
    # a relative path a subclass passes on through **kwargs is recorded from its frame, as given
    passed_on = KeywordsPassedOn(**{**settings, "adapter_path": "adapter", "export_adapters": False})
    assert fixed.settings.adapter_path == str(folder)
    for run, built in (("path", make_module(tiny_model_dir, adapter_path=folder, export_adapters=False)),
                       ("relative", make_module(tiny_model_dir, adapter_path="adapter", export_adapters=False)),
                       ("fixed", fixed), ("kwargs", passed_on)):
        assert built.hparams.get("adapter_path", str(folder)) == built.settings.adapter_path == str(folder)
        checkpoints = ModelCheckpoint(dirpath=tmp_path / run, every_n_train_steps=1)
        make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
            built, make_data(tiny_model_dir))
        monkeypatch.chdir(elsewhere)
        loaded = type(built).load_from_checkpoint(checkpoints.best_model_path)  # weights_only=True
        monkeypatch.chdir(tmp_path)
        assert loaded.settings == built.settings


def test_multiple_choice_accuracy_follows_length_normalised_log_likelihood(tiny_model_dir, tmp_path):
    """Recompute the parity decisions by scoring each choice's tokens by hand."""
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"])
    make_trainer(tmp_path).validate(module, data, verbose=False)  # builds the model and loads the data
    batch = next(iter(data.val_dataloader()["parity"]))
    module.eval()
    with torch.no_grad():
        output = module.evaluate_batch(batch)
        logits = module(batch.choices.input_ids, batch.choices.attention_mask)
    log_probs = torch.log_softmax(logits.float(), dim=-1)
    expected, gold_scores = [], []
    for example in range(batch.choices.gold.shape[0]):
        scores = []
        for row in (batch.choices.example_index == example).nonzero().flatten().tolist():
            labels = batch.choices.labels[row]
            positions = [t for t in range(1, labels.shape[0]) if labels[t] != -100]
            total = sum(log_probs[row, t - 1, labels[t]].item() for t in positions)
            scores.append(total / len(positions))
        expected.append(max(range(len(scores)), key=scores.__getitem__))
        gold_scores.append(scores)
    assert output.predictions == expected
    assert output.correct.tolist() == [p == g for p, g in zip(expected, batch.choices.gold.tolist())]
    for example, gold in enumerate(batch.choices.gold.tolist()):  # the loss is the gold choice's mean token NLL
        torch.testing.assert_close(output.loss[example], -torch.tensor(gold_scores[example][gold]))


def test_a_generative_examples_loss_is_its_target_tokens_mean_nll(tiny_model_dir, tmp_path):
    """The per-example loss `PerTaskMetrics` averages, for a generative task: the mean NLL of the example's target
    tokens (answer and closing), recomputed in float64 from the full forward's logits."""
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["add_2digit"])
    make_trainer(tmp_path).validate(module, data, verbose=False)  # builds the model and loads the data
    batch = next(iter(data.val_dataloader()["add_2digit"]))
    assert batch.choices is None
    module.eval()
    with torch.no_grad():
        output = module.evaluate_batch(batch)
        log_probs = torch.log_softmax(module(batch.input_ids, batch.attention_mask).double(), dim=-1)
    expected = []
    for row, labels in enumerate(batch.labels):
        positions = [t for t in range(1, labels.shape[0]) if labels[t] != IGNORE_INDEX]
        assert len(positions) > 1  # a mean over several tokens: a sum would differ
        expected.append(-sum(log_probs[row, t - 1, labels[t]] for t in positions) / len(positions))
    torch.testing.assert_close(output.loss.double(), torch.stack(expected), rtol=1e-5, atol=0)


def test_one_token_choices_are_scored_from_the_gold_rows_as_from_every_choice_row(tiny_model_dir, tmp_path):
    """Every choice row of a one-token-choice task ran through the model, though the rows of an example differ only
    in the token scored (four times the tokens on odd_one_out); one row per example gives the same log-likelihoods,
    decisions and losses, and its scoring pass routes the tokens the full forward's scored rows held."""
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["odd_one_out", "compare_numbers"])
    make_trainer(tmp_path).validate(module, data, verbose=False)  # builds the model and loads the data
    module.eval()
    for name, loader in data.val_dataloader().items():
        batch = dataclasses.replace(next(iter(loader)), counted=torch.tensor([True, False, True, True]))
        choices = batch.choices
        assert one_token_choices(choices.input_ids, choices.attention_mask, choices.labels, choices.example_index, 4)
        routed: dict[str, list[torch.Tensor]] = {"gold rows": [], "every row": []}
        path = "gold rows"

        def observe(record) -> None:
            scoring = record.forward.scoring
            keep = scoring.row_scored.repeat_interleave(record.experts.shape[0] // scoring.row_scored.shape[0])
            routed[path].append(record.experts[keep & record.token_mask])

        with torch.no_grad(), add_routing_observer(module.model, observe):
            new = module.evaluate_batch(batch)
            path = "every row"
            with unittest.mock.patch("malora_lightning.evaluation.one_token_choices", return_value=False):
                old = module.evaluate_batch(batch)
        assert torch.equal(new.loss, old.loss) and torch.equal(new.correct, old.correct), name
        assert new.predictions == old.predictions
        assert len(routed["gold rows"]) == len(routed["every row"]) > 0
        assert all(torch.equal(a, b) for a, b in zip(routed["gold rows"], routed["every row"]))
        with torch.no_grad():
            every_row = module.target_log_likelihoods(choices.input_ids, choices.attention_mask, choices.labels)
            gold_only = module.choice_log_likelihoods(choices, gold_rows(choices.example_index, choices.gold))
        assert all(torch.equal(a, b) for a, b in zip(gold_only, every_row))


def test_padding_examples_are_computed_but_neither_output_nor_scored(tiny_model_dir, tmp_path):
    """An example flagged not counted (`EvaluationShardSampler`'s padding) goes through the forwards but not into
    the outputs, the predictions or the scoring pass's scored rows (for multiple choice: its gold-choice row)."""
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["add_2digit", "parity"])
    make_trainer(tmp_path).validate(module, data, verbose=False)  # builds the model and loads the data
    module.eval()
    kept = [0, 2, 3]
    for name, loader in data.val_dataloader().items():
        batch = next(iter(loader))
        assert batch.counted.tolist() == [True] * 4
        padded = dataclasses.replace(batch, counted=torch.tensor([True, False, True, True]))
        scored: list[torch.Tensor] = []

        def observe(record) -> None:
            if record.forward is not None and record.forward.scoring is not None:
                scored.append(record.forward.scoring.row_scored)

        with torch.no_grad():
            whole = module.evaluate_batch(batch)
            with add_routing_observer(module.model, observe):
                part = module.evaluate_batch(padded)
            answers = module.predict_step(padded, 0)
        assert part.task_name == [name] * 3
        torch.testing.assert_close(part.loss, whole.loss[kept])
        assert part.correct.tolist() == whole.correct[kept].tolist()
        assert part.predictions == [whole.predictions[row] for row in kept]
        assert [(answer.row, answer.prompt) for answer in answers] == [(batch.rows[row], batch.prompts[row])
                                                                       for row in kept]
        if batch.choices is None:
            expected = torch.tensor([True, False, True, True])
        else:
            expected = torch.zeros(batch.choices.example_index.shape[0], dtype=torch.bool)
            expected[gold_rows(batch.choices.example_index, batch.choices.gold)] = True
            expected &= batch.choices.example_index != 1
        assert scored and all(torch.equal(rows, expected) for rows in scored), name


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed", "bf16-true"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_trains_under_each_precision_and_with_gradient_checkpointing(tiny_model_dir, tmp_path, precision,
                                                                     checkpointing):
    module = make_module(tiny_model_dir, gradient_checkpointing=checkpointing)
    trainer = make_trainer(tmp_path, max_steps=2, precision=precision)
    trainer.fit(module, make_data(tiny_model_dir))
    assert trainer.global_step == 2
    assert activation_checkpointing_on(module.model) == checkpointing
    trained = [p for n, p in module.model.named_parameters() if n.endswith("lora_B")]
    assert trained and all(p.abs().sum() > 0 for p in trained)  # B left zero means no update reached it
    routers = [m for m in module.model.modules() if hasattr(m, "router")]
    assert all(m.router.weight.grad is None or m.router.weight.grad.abs().sum() > 0 for m in routers)


class _FirstStepRouterGradients(Callback):
    """A copy of the model as the first step starts, that step's batch, and every router's gradient after its
    backward."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == 0:
            self.batch, self.model = batch, copy.deepcopy(pl_module.model)

    def on_after_backward(self, trainer, pl_module) -> None:
        if trainer.global_step == 0:
            self.grads = {name: layer.router.weight.grad.clone()
                          for name, layer in pl_module.model.named_modules() if hasattr(layer, "router")}


def test_the_training_step_backpropagates_the_router_losses_with_their_coefficients(tiny_model_dir, tmp_path):
    """At the first step B = 0, so the LM loss gives the routers no gradient (paper section 1.4): each router's
    gradient is that of 0.5 * load balance + 2 * z-loss (the coefficients written out) of the same batch's forward.
    A training step that logged lm_loss + aux_loss but returned the LM loss alone passed every module test: after
    the first step the LM loss reaches the routers too, so their gradients after a fit are non-zero either way."""
    module = make_module(tiny_model_dir, adapter=AdapterConfig(
        rank=2, shared_rank=4, num_experts=4, top_k=2, dropout=0.0, aux_loss_coef=0.5, router_z_loss_coef=2.0,
        router_init_std=0.5))
    recorder = _FirstStepRouterGradients()
    make_trainer(tmp_path, max_steps=1, callbacks=[recorder]).fit(module, make_data(tiny_model_dir))
    model = recorder.model.train()
    routers = {name: layer for name, layer in model.named_modules() if hasattr(layer, "router")}
    assert routers.keys() == recorder.grads.keys() and len(routers) == 12
    assert all(torch.count_nonzero(layer.lora_B) == 0 for layer in routers.values())
    model(input_ids=recorder.batch.input_ids, attention_mask=recorder.batch.attention_mask)
    summary = router_losses(model)
    (0.5 * summary.load_balance + 2.0 * summary.z_loss).backward()
    for name, layer in routers.items():
        assert layer.router.weight.grad.abs().max() > 1e-4, name
        torch.testing.assert_close(recorder.grads[name], layer.router.weight.grad, rtol=1e-4, atol=1e-7, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_the_modules_base_keeps_no_gradient_of_its_embeddings_output(tiny_model_dir, checkpointing):
    """Input gradients are for reentrant checkpointing, which the module never uses: they made the embeddings'
    output a tensor with a gradient of its own, computed each step for nothing, and (through the latest forward's
    router statistics) kept alive with it until the next step. Training with checkpointing above still reaches
    every adapter."""
    module = make_module(tiny_model_dir, gradient_checkpointing=checkpointing)
    module.configure_model()
    ids = torch.randint(3, 100, (2, 6))
    assert not module.model.get_input_embeddings()(ids).requires_grad
    assert load_base_model(str(tiny_model_dir)).get_input_embeddings()(ids).requires_grad  # the library default


def test_checkpoint_holds_adapters_only_and_resume_is_exact(tiny_model_dir, tmp_path):
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", max_steps=6, callbacks=[full, checkpoints], enable_checkpointing=True)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))

    path = tmp_path / "ckpt" / "epoch=0-step=3.ckpt"
    checkpoint = torch.load(path, weights_only=True)  # plain data: safe to load
    module = make_module(tiny_model_dir)
    module.configure_model()
    expected_keys = {f"model.{key}" for key in adapter_state_dict(module.model)}
    assert set(checkpoint["state_dict"]) == expected_keys
    base_bytes = sum(p.numel() * p.element_size() for n, p in module.model.named_parameters() if not p.requires_grad)
    stored_bytes = sum(t.numel() * t.element_size() for t in checkpoint["state_dict"].values())
    assert stored_bytes < base_bytes

    resumed = LossRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=6, callbacks=[resumed])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=path)
    assert sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[step] for step in (4, 5, 6)] == [full.losses[step] for step in (4, 5, 6)]


def test_a_checkpoint_missing_adapter_tensors_is_rejected(tiny_model_dir, tmp_path):
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "good.ckpt")
    checkpoint = torch.load(tmp_path / "good.ckpt", weights_only=True)
    key = "model.model.layers.0.mlp.up_proj.lora_P"
    del checkpoint["state_dict"][key]
    torch.save(checkpoint, tmp_path / "bad.ckpt")
    with pytest.raises(ValueError, match=f"checkpoint lacks trained tensor '{key}'"):
        MALoRAModule.load_from_checkpoint(tmp_path / "bad.ckpt", weights_only=True)


def test_exported_adapters_reload_in_plain_transformers_with_identical_logits(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    trainer = make_trainer(tmp_path, max_steps=3)
    trainer.fit(module, make_data(tiny_model_dir))
    exported = tmp_path / "adapter"
    assert (exported / "adapter_config.json").is_file()
    plain = load_adapters(load_base_model(str(tiny_model_dir)), exported).eval()
    module.model.eval()
    ids = torch.randint(3, 200, (2, 10))
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, module.model(ids).logits)


def test_non_finite_loss_stops_training_naming_the_step_and_keeps_the_last_good_checkpoint(tiny_model_dir, tmp_path):
    class PoisonAtStep(MALoRAModule):
        def compute_lm_loss(self, batch):
            result = super().compute_lm_loss(batch)
            if self.global_step == 3:
                result.loss = result.loss * float("nan")
            return result

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_last=True)
    module = PoisonAtStep(**{k: v for k, v in make_module(tiny_model_dir).hparams.items() if k != "adapter"},
                          adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4))
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[checkpoints], enable_checkpointing=True)
    with pytest.raises(FloatingPointError, match="non-finite training loss at global step 3"):
        trainer.fit(module, make_data(tiny_model_dir))
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in saved["state_dict"].values())



def test_a_step_stopped_by_a_non_finite_loss_leaves_no_graph_on_the_model(tiny_model_dir, tmp_path):
    """The routed layers' router statistics of the step's last forward, and through them its graph, stayed on the
    model until a next forward when the step raised before its backward (and the record would stay after it)."""
    class PoisonAtStep(MALoRAModule):
        def compute_lm_loss(self, batch):
            result = super().compute_lm_loss(batch)
            if self.global_step == 1:
                result.loss = result.loss * float("nan")
                self.poisoned_forward = weakref.ref(routing_context(self.model).current)  # its routing record
            return result

    module = PoisonAtStep(**{k: v for k, v in make_module(tiny_model_dir).hparams.items() if k != "adapter"},
                          adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4))
    with pytest.raises(FloatingPointError):
        make_trainer(tmp_path, max_steps=3).fit(module, make_data(tiny_model_dir))
    gc.collect()
    assert router_losses(module.model) is None
    assert module.poisoned_forward() is None  # the record, and through its statistics the graph, is gone


class PoisonFirstBatchOfStep(MALoRAModule):
    """Makes the loss of the first batch of optimizer step 1 NaN (of each accumulation window's first batch with
    accumulate_grad_batches=2: batch 2), or of each batch counted in `poisoned` (batches ready, from 1)."""

    poisoned = (3,)

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        if self.global_step == 1 and self.trainer.fit_loop.epoch_loop.batch_progress.current.ready in self.poisoned:
            result.loss = result.loss * float("nan")
        return result


class _TrainedAtStepStart(Callback):
    """The trained tensors as each optimizer step's first batch starts."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:
            self.tensors = {name: param.detach().clone() for name, param in pl_module.named_parameters()
                            if param.requires_grad}


def _poisoned_module(tiny_model_dir) -> PoisonFirstBatchOfStep:
    return PoisonFirstBatchOfStep(**{k: v for k, v in make_module(tiny_model_dir).hparams.items() if k != "adapter"},
                                  adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4))


@pytest.mark.parametrize(("poisoned", "checked"), [((3,), "after the backward"), ((3, 4), "after the backward"),
                                                   ((3,), "without the callback")])
def test_a_non_finite_loss_in_the_first_batch_of_an_accumulated_step_stops_its_update(tiny_model_dir, tmp_path,
                                                                                      poisoned, checked):
    """The check runs once per optimizer step, after the backward of its last batch: a NaN in an earlier batch must
    still stop the update, and the error names that batch (the first non-finite one, when both are). Without
    `NonFiniteLossCheck` (a user took it out) nothing checked the losses; `training_step` now checks them at the
    step's last batch, before its backward."""
    before = _TrainedAtStepStart()
    module = _poisoned_module(tiny_model_dir)
    if checked == "without the callback":
        _without_the_check(module)
    module.poisoned = poisoned
    trainer = make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, callbacks=[before])
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at global step 1 \(epoch 0, batch 2\): "
                                                 r"lm_loss=nan, aux_loss=[0-9.e-]+; training stopped before this update"):
        trainer.fit(module, make_data(tiny_model_dir))
    assert trainer.fit_loop.epoch_loop.batch_progress.current.ready == 4  # the step's second batch ran
    assert trainer.global_step == 1
    trained = {name: param.detach() for name, param in module.named_parameters() if param.requires_grad}
    assert trained.keys() == before.tensors.keys()
    assert all(torch.equal(trained[name], before.tensors[name]) for name in trained)  # no update
    assert router_losses(module.model) is None  # the routing record dropped


def test_a_non_finite_loss_under_anomaly_detection_stops_with_the_same_error(tiny_model_dir, tmp_path):
    """With detect_anomaly, the backward of a NaN loss raises autograd's error naming an op: the loss is checked in
    the step itself, before that backward."""
    trainer = make_trainer(tmp_path, max_steps=3, accumulate_grad_batches=2, detect_anomaly=True)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at global step 1 \(epoch 0, batch 2\)"):
        trainer.fit(_poisoned_module(tiny_model_dir), make_data(tiny_model_dir))
    assert trainer.fit_loop.epoch_loop.batch_progress.current.ready == 3  # stopped before the step's second batch


class ScaledLossModule(MALoRAModule):
    """A user subclass: weights the LM loss (an extension point) and records that it was used."""

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        result.loss = 0.5 * result.loss
        self.scaled = True
        return result


class ShoutingEncoder(PromptEncoder):
    def render(self, prompt, target):
        return super().render(prompt.upper(), target)


class ShoutingData(MultiTaskDataModule):
    """A user subclass: changes the prompt format through the encoder hook."""

    def build_encoder(self, tokenizer):
        return ShoutingEncoder(tokenizer, self.hparams.max_length)


def test_subclassing_the_module_and_the_data_module(tiny_model_dir, tmp_path):
    module = ScaledLossModule(**{k: v for k, v in make_module(tiny_model_dir).hparams.items() if k != "adapter"},
                              adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4))
    data = ShoutingData(**make_data(tiny_model_dir).hparams)
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(module, data)
    assert module.scaled
    batch = next(iter(data.train_dataloader()))
    prompt_ids = batch.input_ids[0][(batch.labels[0] == -100) & batch.attention_mask[0].bool()]
    prompt = data.tokenizer.decode(prompt_ids, skip_special_tokens=True)
    user_text = prompt.replace("user", "").replace("assistant", "")
    assert user_text == user_text.upper() and any(c.isupper() for c in user_text)


@pytest.mark.parametrize(("setting", "expected"), [
    (True, "default"), (False, None), ("reduce-overhead", "reduce-overhead")])
def test_compile_adapters_setting_picks_the_mode(setting, expected):
    assert compile_mode(setting) == expected


def test_compiled_adapters_train_through_lightning(tiny_model_dir, tmp_path):
    """compile_adapters=True on CPU: every adapted layer runs compiled, the fit takes its steps with finite losses."""
    module = make_module(tiny_model_dir, compile_adapters=True)
    recorder = LossRecorder()
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[recorder])
    trainer.fit(module, make_data(tiny_model_dir))
    layers = [m for m in module.model.modules() if hasattr(m, "compile_mode") and hasattr(m, "lora_B")]
    assert layers and all(layer.compile_mode == "default" for layer in layers)
    assert len(recorder.losses) == 2 and all(math.isfinite(loss) for loss in recorder.losses.values())


def test_resume_from_a_checkpoint_written_at_a_validation_step_is_exact(tiny_model_dir, tmp_path):
    """Validation runs right after the step-3 checkpoint and draws from the global RNG (each dataloader iterator
    takes a seed from it); the uninterrupted run must continue as the resumed one does, loss for loss."""
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    settings = dict(max_steps=6, limit_val_batches=None, val_check_interval=3, enable_checkpointing=True)
    trainer = make_trainer(tmp_path / "a", callbacks=[full, checkpoints], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))

    resumed = LossRecorder()
    trainer = make_trainer(tmp_path / "b", callbacks=[resumed], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[step] for step in (4, 5, 6)] == [full.losses[step] for step in (4, 5, 6)]


@pytest.mark.parametrize("recipe", SINGLE_FILE_RECIPES)
def test_a_fit_resumed_from_a_recipes_checkpoint_keeps_every_evaluation(tiny_model_dir, tmp_path, recipe):
    """The recipes checkpoint when a validation has ended, so a resumed run's per-task history (and the seesaw
    tracker and report built on it) holds the evaluation of the step it resumed from. A checkpoint taken at the end
    of a training batch precedes that step's validation, and Lightning does not rerun it on resume."""
    trainer_settings = yaml.safe_load((RECIPE_DIR / recipe).read_text())["trainer"]
    (checkpoint_settings,) = [c["init_args"] for c in trainer_settings["callbacks"]
                              if c["class_path"].endswith(".ModelCheckpoint")]
    if "every_n_train_steps" in checkpoint_settings:  # the recipe's checkpoint interval, in its validation intervals
        intervals = checkpoint_settings["every_n_train_steps"] / trainer_settings["val_check_interval"]
        checkpoint_settings = {**checkpoint_settings, "every_n_train_steps": round(2 * intervals)}
    settings = dict(max_steps=4, limit_val_batches=None, val_check_interval=2, enable_checkpointing=True)
    full = PerTaskMetrics()
    checkpoints = ModelCheckpoint(**{**checkpoint_settings, "dirpath": tmp_path / "ckpt", "save_top_k": -1})
    trainer = make_trainer(tmp_path / "a", callbacks=[full, checkpoints], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    assert [evaluation.step for evaluation in full.history] == [2, 4]

    resumed = PerTaskMetrics()
    trainer = make_trainer(tmp_path / "b", callbacks=[resumed], **settings)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                    ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert [evaluation.step for evaluation in resumed.history] == [2, 4]
    assert not [w for w in caught if "before that step's validation" in str(w.message)]  # nothing was lost


def test_a_resume_that_lost_an_evaluation_says_so(tiny_model_dir, tmp_path):
    """A checkpoint written every 2 training steps precedes step 2's validation: resumed from it, the run warns that
    the history lacks that evaluation (it did so silently)."""
    settings = dict(max_steps=4, limit_val_batches=None, val_check_interval=2, enable_checkpointing=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", callbacks=[PerTaskMetrics(), checkpoints], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    resumed = PerTaskMetrics()
    trainer = make_trainer(tmp_path / "b", callbacks=[resumed], **settings)
    with pytest.warns(UserWarning, match="written at step 2 before that step's validation"):
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                    ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert [evaluation.step for evaluation in resumed.history] == [4]


@pytest.mark.parametrize(("interval", "accumulate", "max_steps", "per_epoch", "warned"), [
    (3, 2, 2, 1, "after batch 3 of each epoch of 18"), (4, 2, 2, 1, None),
    (0.5, 2, 5, 1, "after batch 9 of each epoch of 18"),  # half of 18 batches: the int check never saw a float
    (0.5, 2, 4, 1, None),  # 8 batches: the fit ends before its batch 9
    # a multiple of 4, counted over the fit: epoch 1 (18 batches) ends in a partial window, so batch 24 of the fit is
    # batch 6 of epoch 2, mid-window
    (8, 4, 7, None, "after training batch 24 of the fit .* batch 6 of an epoch of 18"),
])
def test_validating_inside_an_accumulation_window_is_named(tiny_model_dir, tmp_path, interval, accumulate,
                                                           max_steps, per_epoch, warned):
    """Lightning counts val_check_interval in batches: with accumulation 2, a validation after batch 3 (and the
    checkpoint written when it ends) falls mid-window, and a resume from it skipped batch 3 (losses diverged). Only
    an int interval that was no multiple of the accumulation was warned of."""
    trainer = make_trainer(tmp_path, max_steps=max_steps, accumulate_grad_batches=accumulate,
                           val_check_interval=interval, check_val_every_n_epoch=per_epoch, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    named = [str(w.message) for w in caught if "inside an accumulation window" in str(w.message)]
    assert len(named) == (warned is not None)
    if warned:
        assert re.search(warned, named[0]) and f"accumulate_grad_batches={accumulate}" in named[0]


@pytest.mark.parametrize(("scheduling", "interval", "max_steps", "per_epoch", "warned"), [
    ({0: 3}, 2, 4, None,
     "after training batch 2 of the fit .* inside an accumulation window of accumulate_grad_batches=3"),
    ({1: 3}, 2, 19, None,
     "after training batch 20 of the fit .* inside an accumulation window of accumulate_grad_batches=3"),
    ({0: 4}, 8, 3, None, None),  # 12 batches: it validates after batch 8
    ({0: 2}, 8, 3, None, "val_check_interval=8 exceeds the fit's 6 training batches"),
    # 18 steps of 1 batch, then one of 3: the fit ends after batch 21, before batch 22's validation (its 19 steps
    # counted at 3 from the fit's start, 57 batches, named it); 2 steps in epoch 1 reach it
    ({1: 3}, 11, 19, None, None),
    ({1: 3}, 11, 20, None, "after training batch 22 of the fit .* batch 4 of an epoch of 18"),
    ({1: 3}, 4, 19, 1, None),  # per epoch likewise: epoch 1's 3 batches end before its batch 4
    ({1: 3}, 4, 20, 1, "after batch 4 of each epoch of 18 .* accumulate_grad_batches=3"),
])
def test_a_gradient_accumulation_schedulers_windows_are_judged(tiny_model_dir, tmp_path, scheduling, interval,
                                                                max_steps, per_epoch, warned):
    """`GradientAccumulationScheduler` sets the trainer's accumulation at each epoch's start, after `setup` and
    `on_train_start` judged the fit by its 1: validations inside the scheduled windows went unnamed, and a fit that
    validates was said never to ("val_check_interval=8 exceeds the fit's 3 training batches"). An epoch's judgement
    counts the batches the fit still runs from its start, not the whole fit's max_steps at its accumulation."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    trainer = make_trainer(tmp_path, max_steps=max_steps, val_check_interval=interval,
                           check_val_every_n_epoch=per_epoch, limit_val_batches=1,
                           callbacks=[GradientAccumulationScheduler(scheduling)])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    named = [str(w.message) for w in caught
             if "inside an accumulation window" in str(w.message) or "never validates" in str(w.message)]
    assert len(named) == (warned is not None), named
    if warned:
        assert re.search(warned, named[0])


class BatchRecorder(Callback):
    """Each training batch's (epoch, batch_idx, global_step after it, accumulation, loss as Lightning normalises it)."""

    def __init__(self) -> None:
        self.rows: list[tuple[int, int, int, int, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.rows.append((trainer.current_epoch, batch_idx, trainer.global_step, trainer.accumulate_grad_batches,
                          outputs["loss"].item()))


def test_a_fit_resumed_inside_an_epoch_runs_the_gradient_accumulation_schedulers_accumulation(tiny_model_dir,
                                                                                               tmp_path):
    """`GradientAccumulationScheduler` sets the accumulation in its `on_train_epoch_start`, which Lightning skips on a
    mid-epoch resume: resumed from the validation checkpoint after batch 3 of epoch 1 (step 10; 9-batch epochs, {1: 3}),
    the fit stepped at every batch and reached max_steps=12 after 2 batches, where the uninterrupted fit took 6. The
    module sets the epoch's scheduled accumulation in `on_train_start`, and judges that epoch's windows there."""
    from lightning.pytorch.callbacks import GradientAccumulationScheduler

    def run(ckpt_path=None, checkpoints=None) -> list[tuple[int, int, int, int, float]]:
        recorder = BatchRecorder()
        callbacks = [GradientAccumulationScheduler({1: 3}), recorder, *([checkpoints] if checkpoints else [])]
        trainer = make_trainer(tmp_path / "run", max_steps=12, limit_train_batches=9, val_check_interval=12,
                               check_val_every_n_epoch=None, limit_val_batches=1, callbacks=callbacks,
                               enable_checkpointing=checkpoints is not None)
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=ckpt_path)
        return recorder.rows

    uninterrupted = run(checkpoints=ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{epoch}-{step}",
                                                    save_top_k=-1))
    assert [row[:4] for row in uninterrupted[9:12]] == [(1, 0, 9, 3), (1, 1, 9, 3), (1, 2, 10, 3)]
    judge = MALoRAModule._warn_of_validations_inside_windows
    with unittest.mock.patch.object(MALoRAModule, "_warn_of_validations_inside_windows", autospec=True,
                                    side_effect=judge) as judged:
        resumed = run(ckpt_path=tmp_path / "ckpt" / "epoch=1-step=10.ckpt")
    assert resumed == uninterrupted[12:]  # batches 3..8 of epoch 1, 3 to a step, the same losses
    assert any(call.kwargs.get("this_epoch") for call in judged.call_args_list)  # epoch 1's windows judged


@pytest.mark.parametrize(("epoch", "every", "accumulate", "per_epoch", "batches", "inside"), [
    (18, 9, 2, True, 36, 9), (18, 8, 4, True, 100, None), (12, 3, 2, True, 12, 3), (12, 4, 2, True, 12, None),
    (18, 8, 4, False, 100, 24), (18, 8, 4, False, 20, None), (16, 8, 4, False, 1000, None),
    (18, 18, 4, False, 1000, None),  # every epoch's end, where a partial window steps too
    (10, 4, 4, False, 1000, 12),  # 4 and 8 end windows; 12 is batch 2 of epoch 2
])
def test_the_first_validation_inside_a_window_is_found(epoch, every, accumulate, per_epoch, batches, inside):
    assert first_validation_inside_a_window(epoch, every, accumulate, per_epoch, batches) == inside


def test_fit_batches_count_each_epochs_partial_window():
    trainer = unittest.mock.Mock(num_training_batches=18, accumulate_grad_batches=4, max_steps=7, max_epochs=None)
    assert fit_batches(trainer) == 18 + 2 * 4  # 5 steps an epoch (the fifth of 2 batches), then 2 of 4 batches
    trainer.max_epochs = 1
    assert fit_batches(trainer) == 18
    # from epoch 1's start, after 18 steps of 1 batch (a scheduler's {1: 3}): one step of 3 batches left
    trainer = unittest.mock.Mock(num_training_batches=18, accumulate_grad_batches=3, max_steps=19, max_epochs=None,
                                 global_step=18, current_epoch=1)
    assert fit_batches(trainer) == 57 and fit_batches(trainer, from_this_epoch=True) == 3
    trainer.max_steps, trainer.max_epochs = 30, 2  # 12 steps left, 36 batches, but one epoch left: 18
    assert fit_batches(trainer, from_this_epoch=True) == 18


@pytest.mark.parametrize(("interval", "warned"), [(3, True), (2, False)])
def test_a_val_check_interval_beyond_the_fits_batches_is_named(tiny_model_dir, tmp_path, interval, warned):
    """Counted over the whole run (check_val_every_n_epoch=None, as the recipes set it), an interval longer than the
    fit never validated the trained adapters: the report's final scores were the sanity check's, and nothing said
    so."""
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval=interval, check_val_every_n_epoch=None,
                           limit_val_batches=None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    named = [w for w in caught if "val_check_interval=3 exceeds the fit's 2 training batches (max_steps=2)"
             in str(w.message)]
    assert bool(named) == warned


@pytest.mark.parametrize(("interval", "warned"), [(4, True), (3, False)])
def test_a_val_check_interval_beyond_the_fits_epochs_is_named(tiny_model_dir, tmp_path, interval, warned):
    """The same for a fit that max_epochs ends: max_epochs=1 of 3 batches with an interval of 4 trained all 3 without
    validating once, and only the max_steps form of the warning existed."""
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=1, limit_train_batches=3, val_check_interval=interval,
                           check_val_every_n_epoch=None, limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    named = [w for w in caught if "val_check_interval=4 exceeds the fit's 3 training batches (max_epochs=1 of 3 "
             "batches): the fit never validates" in str(w.message)]
    assert bool(named) == warned


@pytest.mark.parametrize(("every", "warned"), [(3, True), (2, False)])
def test_validation_every_n_epochs_beyond_the_fits_epochs_is_named(tiny_model_dir, tmp_path, every, warned):
    """check_val_every_n_epoch=3 with max_epochs=2 trained both epochs without validating once, and said nothing."""
    trainer = make_trainer(tmp_path, max_steps=-1, max_epochs=2, limit_train_batches=1, check_val_every_n_epoch=every,
                           limit_val_batches=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    named = [w for w in caught if f"check_val_every_n_epoch={every} exceeds max_epochs=2: the fit never validates"
             in str(w.message)]
    assert bool(named) == warned


def test_a_fit_validating_by_time_runs_with_the_modules_checks_and_per_task_metrics(tiny_model_dir, tmp_path):
    """A duration as val_check_interval (Lightning 2.6 validates by time then) leaves the trainer without a
    `val_check_interval` attribute: `MALoRAModule.setup` and `PerTaskMetrics.on_train_start` read it and every such
    fit stopped with an AttributeError before training. 0 seconds validates after every batch."""
    metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path, max_steps=2, val_check_interval="00:00:00:00", check_val_every_n_epoch=None,
                           accumulate_grad_batches=1, limit_val_batches=1, callbacks=[metrics])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    assert [evaluation.step for evaluation in metrics.evaluations("val")] == [1, 2]

class LearningRateRecorder(Callback):
    def __init__(self) -> None:
        self.rates: dict[int, list[float]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.rates[trainer.global_step] = [group["lr"] for group in trainer.optimizers[0].param_groups]


def test_a_resumed_fit_uses_the_learning_rate_the_run_gives(tiny_model_dir, tmp_path):
    """The checkpoint restores AdamW's moments and the step count; the learning rate and weight decay are the run's."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", max_steps=6, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(make_module(tiny_model_dir, learning_rate=1e-2), make_data(tiny_model_dir))

    rates = LearningRateRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=6, callbacks=[rates])
    module = make_module(tiny_model_dir, learning_rate=0.1, router_learning_rate=0.05, weight_decay=0.5)
    trainer.fit(module, make_data(tiny_model_dir), ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    for step in (3, 4, 5):
        factor = lr_multiplier(step, warmup_steps=2, total_steps=6, schedule="cosine")  # warmup_ratio 0.2 of 6
        assert rates.rates[step] == pytest.approx([0.1 * factor, 0.05 * factor]), step
    assert [group["weight_decay"] for group in trainer.optimizers[0].param_groups] == [0.5, 0.5]


class ImplementationRecorder(Callback):
    def __init__(self) -> None:
        self.fused: list[bool | None] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.fused.extend(group["fused"] for group in trainer.optimizers[0].param_groups)


@pytest.mark.parametrize(("first", "resumed", "fused"), [("bf16-mixed", "32-true", True),
                                                          ("32-true", "bf16-mixed", None)])
def test_a_resumed_fit_runs_the_adamw_implementation_this_run_chooses(tiny_model_dir, tmp_path, first, resumed,
                                                                      fused):
    """With clipping, Lightning's bf16-mixed plugin refuses a fused AdamW and 32-true allows it (`adamw_options`).
    The checkpoint's choice came back with its param groups: a CPU run resumed from a GPU's or bf16-mixed's checkpoint
    kept the per-tensor loop, and the reverse ran fused AdamW where the plugin refuses to clip it."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", max_steps=2, callbacks=[checkpoints], enable_checkpointing=True,
                           precision=first, gradient_clip_val=1.0)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))

    recorder = ImplementationRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=3, callbacks=[recorder], precision=resumed, gradient_clip_val=1.0)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert recorder.fused == [fused, fused]


@pytest.mark.parametrize("settings", [dict(max_steps=-1, max_epochs=2), dict(max_steps=6)],
                         ids=["max_epochs", "max_steps"])
def test_resume_from_a_checkpoint_written_at_an_epoch_end_is_exact(tiny_model_dir, tmp_path, settings):
    """The llama2-7b recipes checkpoint at epoch ends (here without validation).

    max_epochs: the uninterrupted run starts the next epoch's training iterator after the checkpoint, the resumed one
    before restoring the random state: that start must not draw from the global generator dropout uses, or every
    later loss differs. max_steps: Lightning 2.6 restored such a checkpoint as an epoch with one batch to go: step 4
    trained on epoch 1's first draws as epoch 0's, then the sampler was set to epoch 2, so steps 5-6 trained on epoch
    2's draws (`complete_epoch_end_restore`)."""
    data = dict(max_train_examples_per_task=4)  # 12 examples: 3 batches per epoch
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1)
    uninterrupted = make_trainer(tmp_path / "a", callbacks=[full, checkpoints], enable_checkpointing=True, **settings)
    uninterrupted.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, **data))

    resumed = LossRecorder()
    trainer = make_trainer(tmp_path / "b", callbacks=[resumed], enable_checkpointing=True, **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, **data),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=3.ckpt")
    assert sorted(resumed.losses) == [4, 5, 6]
    assert [resumed.losses[step] for step in (4, 5, 6)] == [full.losses[step] for step in (4, 5, 6)]
    assert trainer.current_epoch == uninterrupted.current_epoch


@pytest.mark.parametrize("settings", [dict(max_steps=-1, max_epochs=2), dict(max_steps=6)],
                         ids=["max_epochs", "max_steps"])
def test_resume_from_a_mid_epoch_checkpoint_is_exact(tiny_model_dir, tmp_path, settings):
    """max_epochs: the schedule's `estimated_stepping_batches` built the training loader before the checkpoint was
    restored, so Lightning never gave it the checkpoint's position (Lightning-AI/pytorch-lightning#20550): the
    sampler started epoch 0 again, training its first draws twice and its last never."""
    data = dict(max_train_examples_per_task=4)  # 12 examples: 3 batches per epoch
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_train_steps=1)
    make_trainer(tmp_path / "a", callbacks=[full, checkpoints], enable_checkpointing=True, **settings).fit(
        make_module(tiny_model_dir), make_data(tiny_model_dir, **data))

    resumed = LossRecorder()
    make_trainer(tmp_path / "b", callbacks=[resumed], **settings).fit(
        make_module(tiny_model_dir), make_data(tiny_model_dir, **data),
        ckpt_path=tmp_path / "ckpt" / "epoch=0-step=1.ckpt")
    assert sorted(resumed.losses) == [2, 3, 4, 5, 6]
    assert [resumed.losses[step] for step in range(2, 7)] == [full.losses[step] for step in range(2, 7)]


def test_a_checkpoint_with_adapter_tensors_the_module_lacks_is_rejected(tiny_model_dir, tmp_path):
    """Loading is not strict (the base is not in the checkpoint): validate dropped the o_proj adapters without a
    word, and fit failed in torch's optimizer loading with an error naming neither the tensors nor the file."""
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir, adapter=AdapterConfig(method="lora", rank=2,
                                                                  target_modules=["q_proj", "v_proj", "o_proj"])),
                make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "more.ckpt")
    fewer = AdapterConfig(method="lora", rank=2, target_modules=["q_proj", "v_proj"])
    message = r"checkpoint holds adapter tensors this module does not have, e.g. " \
              r"\['model\.model\.layers\.0\.self_attn\.o_proj\.lora_A'.*\(4 in all\).*more\.ckpt"
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "v", limit_val_batches=None).validate(
            make_module(tiny_model_dir, adapter=fewer), make_data(tiny_model_dir), ckpt_path=tmp_path / "more.ckpt")
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path / "f", max_steps=2).fit(make_module(tiny_model_dir, adapter=fewer),
                                                      make_data(tiny_model_dir), ckpt_path=tmp_path / "more.ckpt")


def test_a_fit_refuses_a_checkpoint_written_outside_a_fit(tiny_model_dir, tmp_path):
    """On SLURM, Lightning's auto-requeue saves hpc_ckpt_N.ckpt for a preempted validate, test or predict too, with no
    optimizer state and step 0, and a requeued `fit && test` job's fit resumed from it (Lightning's newest hpc
    checkpoint): the fit started over at step 0 from the trained adapters, with a fresh optimizer, and exited 0."""
    evaluating = make_trainer(tmp_path, limit_val_batches=1)
    evaluating.validate(make_module(tiny_model_dir), make_data(tiny_model_dir))
    evaluating.save_checkpoint(tmp_path / "hpc_ckpt_1.ckpt")  # what the signal handler saves while validating
    with pytest.raises(ValueError, match=r"checkpoint .*hpc_ckpt_1\.ckpt holds no optimizer state, so it was "
                                         r"written outside a fit"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                                                ckpt_path=tmp_path / "hpc_ckpt_1.ckpt")


class SaveAtFitStart(Callback):
    """Saves where a resumed fit has its checkpoint's tensors back, not yet its step and optimizer."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_fit_start(self, trainer, pl_module) -> None:
        trainer.save_checkpoint(self.path)


def test_a_checkpoint_is_refused_by_name_before_the_model_is_built_and_while_a_resume_restores(tiny_model_dir,
                                                                                               tmp_path):
    """A save with no adapter tensors yet, or with a resumed fit's step and optimizer not restored yet, says why, also
    when it runs while another error is handled (only an interrupted run's own error goes on in its place). A later
    fit of the same module, from step 0 without a checkpoint, restores nothing and saves, as does a trainer that
    validated a checkpoint (it restores no step)."""
    unbuilt = make_module(tiny_model_dir)
    unbuilt.trainer = make_trainer(tmp_path)
    try:
        raise ValueError("an error the caller handles")
    except ValueError:
        with pytest.raises(RuntimeError, match=r"no checkpoint can be saved before the model is built \(configure_"):
            unbuilt.on_save_checkpoint({"state_dict": {}})
    trainer = make_trainer(tmp_path / "a", max_steps=2)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "two.ckpt")
    module = make_module(tiny_model_dir)
    with pytest.raises(RuntimeError, match=r"no checkpoint can be saved while a resumed fit restores its checkpoint: "
                                           r"its step and optimizer state are not restored yet"):
        make_trainer(tmp_path / "b", max_steps=3, callbacks=[SaveAtFitStart(tmp_path / "early.ckpt")]).fit(
            module, make_data(tiny_model_dir), ckpt_path=tmp_path / "two.ckpt")
    assert not (tmp_path / "early.ckpt").exists()
    again = make_trainer(tmp_path / "c", max_steps=1)
    again.fit(module, make_data(tiny_model_dir))
    again.save_checkpoint(tmp_path / "again.ckpt")
    assert torch.load(tmp_path / "again.ckpt", weights_only=True)["global_step"] == 1
    validated = make_trainer(tmp_path / "v")
    validated.validate(module, make_data(tiny_model_dir), ckpt_path=tmp_path / "two.ckpt", verbose=False)
    validated.save_checkpoint(tmp_path / "validated.ckpt")
    assert torch.load(tmp_path / "validated.ckpt", weights_only=True)["global_step"] == 0


def test_resuming_a_fit_with_other_trained_adapter_tensors_is_refused_naming_both_values(tiny_model_dir, tmp_path):
    """train_P=False (an ablation switch) changes AdamW's parameter groups: the resume failed in torch's optimizer
    loading, naming neither the setting nor the file. Evaluating the checkpoint needs no optimizer and still works."""
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    frozen_p = dataclasses.replace(make_module(tiny_model_dir).adapter_config, train_P=False)
    with pytest.raises(ValueError, match=r"trained\.ckpt does not fit this run: model\.adapter\.train_P: checkpoint "
                                         r"True, this run False \(which adapter tensors train decides AdamW"):
        make_trainer(tmp_path / "f", max_steps=2).fit(make_module(tiny_model_dir, adapter=frozen_p),
                                                      make_data(tiny_model_dir), ckpt_path=tmp_path / "trained.ckpt")
    make_trainer(tmp_path / "v", limit_val_batches=1).validate(make_module(tiny_model_dir, adapter=frozen_p),
                                                               make_data(tiny_model_dir), verbose=False,
                                                               ckpt_path=tmp_path / "trained.ckpt")


def test_evaluating_a_checkpoint_with_other_scaling_or_routing_warns_naming_both_values(tiny_model_dir, tmp_path):
    """alpha, top_k and renormalize_top_k change what the trained tensors compute without changing a shape: a
    checkpoint evaluated under other values scored otherwise than the trained model, said only at INFO level."""
    trainer = make_trainer(tmp_path, max_steps=1)
    trained = make_module(tiny_model_dir)
    trainer.fit(trained, make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "trained.ckpt")
    config = trained.adapter_config
    for changes, named in [
        (dict(alpha=4.0 * config.rank), rf"model\.adapter\.alpha: checkpoint None, this run {4.0 * config.rank}"),
        (dict(top_k=1), r"model\.adapter\.top_k: checkpoint 2, this run 1"),
        (dict(renormalize_top_k=False), r"model\.adapter\.renormalize_top_k: checkpoint True, this run False")]:
        other = make_module(tiny_model_dir, adapter=dataclasses.replace(config, **changes))
        with pytest.warns(UserWarning, match=rf"checkpoint \(.*trained\.ckpt\): its adapters were trained computing "
                                             rf"otherwise than this run will \({named}\), so they score otherwise"):
            make_trainer(tmp_path / "v", limit_val_batches=1).validate(other, make_data(tiny_model_dir),
                                                                      verbose=False, ckpt_path=tmp_path / "trained.ckpt")
    same = make_module(tiny_model_dir, adapter=dataclasses.replace(config, alpha=2.0 * config.rank, dropout=0.3))
    with warnings.catch_warnings(record=True) as caught:  # alpha None is 2 * rank; dropout is off in evaluation
        warnings.simplefilter("always")
        make_trainer(tmp_path / "s", limit_val_batches=1).validate(same, make_data(tiny_model_dir), verbose=False,
                                                                  ckpt_path=tmp_path / "trained.ckpt")
    assert not [w for w in caught if "trained computing otherwise" in str(w.message)]


@pytest.mark.parametrize(("precision", "adapter_dtype", "warned"), [
    ("bf16-true", "float32", True), ("bf16-mixed", "float32", False), ("bf16-true", "bfloat16", False)])
def test_a_true_half_precision_that_overrides_adapter_dtype_is_named(tiny_model_dir, tmp_path, precision,
                                                                      adapter_dtype, warned):
    """Lightning converts the whole module under bf16-true, so float32 adapters, their AdamW moments and the
    checkpoints' tensors became bfloat16 without a word, though adapter_dtype defaults to float32 for AdamW's sake."""
    adapter = AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2, adapter_dtype=adapter_dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, max_steps=1, precision=precision).fit(make_module(tiny_model_dir, adapter=adapter),
                                                                     make_data(tiny_model_dir))
    named = [w for w in caught if f"precision='bf16-true' converts the whole module to bfloat16, the adapters too: "
             f"adapter_dtype='{adapter_dtype}' does not hold" in str(w.message)]
    assert len(named) == warned


def test_validate_with_plain_dataloaders_scores_every_task_as_with_the_data_module(tiny_model_dir, tmp_path):
    """Given dataloaders instead of the data module, the module finds a batch's task by its registered name: a
    generative task raised AttributeError. With generation capped below the measured budget, the scores agree."""
    module = make_module(tiny_model_dir, max_new_tokens=2)
    data = make_data(tiny_model_dir, tasks=["add_2digit", "parity"])  # generative, multiple choice
    scores = {}
    for run, source in (("data module", dict(datamodule=data)), ("dataloaders", None)):
        metrics = PerTaskMetrics()
        trainer = make_trainer(tmp_path / run, callbacks=[metrics], limit_val_batches=1.0)
        if source is None:
            source = dict(dataloaders=list(data.val_dataloader().values()))
        trainer.validate(module, **source, verbose=False)
        (evaluation,) = metrics.evaluations("val", during_fit=False)
        scores[run] = {name: (task.accuracy, task.loss) for name, task in evaluation.tasks.items()}
    assert set(scores["dataloaders"]) == {"add_2digit", "parity"}
    assert scores["dataloaders"] == scores["data module"]


def test_a_routed_output_head_counts_the_real_tokens_of_every_scored_position(tiny_model_dir):
    """The head ran only at the kept target positions, and a routed head took the attention mask's last columns for
    them (right only for cached decoding): real tokens counted as padding in its balance statistics and routing
    figures, which then depended on the batch. Its log-likelihoods are those of the full forward."""
    adapter = AdapterConfig(method="molora", rank=2, num_experts=4, top_k=1, dropout=0.0,
                            target_modules=["q_proj", "lm_head"])
    module = make_module(tiny_model_dir, adapter=adapter)
    module.configure_model()
    module.eval()
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, 6:] = 0
    labels = torch.full((2, 12), IGNORE_INDEX)
    labels[0, 8:], labels[1, 3:6] = ids[0, 8:], ids[1, 3:6]
    seen = {}
    handle = add_routing_observer(module.model, lambda record: seen.__setitem__(record.layer_name, record.token_mask))
    with torch.no_grad():
        log_likelihood, tokens = module.target_log_likelihoods(ids, mask, labels)
        handle.remove()
        full = module(ids, mask)
    assert torch.equal(seen["lm_head"], mask.reshape(-1).bool())
    log_probs = torch.log_softmax(full.double(), dim=-1)
    for row in range(2):
        targets = [t for t in range(1, 12) if labels[row, t] != IGNORE_INDEX]
        expected = sum(log_probs[row, t - 1, labels[row, t]] for t in targets)
        assert log_likelihood[row].item() == pytest.approx(expected.item(), rel=1e-5) and tokens[row] == len(targets)


@pytest.mark.parametrize("stored_format", [3, "2", None])
def test_a_checkpoint_of_a_later_format_is_refused_naming_the_file_and_both_formats(tiny_model_dir, tmp_path,
                                                                                    stored_format):
    """Only a checkpoint of an earlier format is converted; one a later version wrote (format 3) loaded its tensors as
    format 2 lays them out, without a word, where a layout change keeps the shapes (format 1's square lora_B). It is
    refused by every path that loads it, naming the file and the formats this version reads."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    checkpoint = torch.load(checkpoints.best_model_path, weights_only=True)
    checkpoint[CHECKPOINT_FORMAT_KEY] = stored_format
    renamed = next(iter(checkpoint["state_dict"]))  # a later version may rename tensors: still the format is named
    checkpoint["state_dict"][f"{renamed}_later"] = checkpoint["state_dict"].pop(renamed)
    torch.save(checkpoint, tmp_path / "later.ckpt")
    message = rf"later.ckpt has malora_lightning_format={stored_format!r}, and this malora_lightning reads formats 1 to 2"
    with pytest.raises(ValueError, match=message):
        MALoRAModule.load_from_checkpoint(tmp_path / "later.ckpt")
    with pytest.raises(ValueError, match=message):
        make_trainer(tmp_path).validate(make_module(tiny_model_dir), make_data(tiny_model_dir),
                                        ckpt_path=tmp_path / "later.ckpt")


@pytest.mark.parametrize("stored_format, refused", [(True, True), (2.0, True), (1, False), (2, False), (None, False)])
def test_a_checkpoint_format_is_read_only_as_an_integer_this_version_knows(stored_format, refused):
    """A bool is an int to Python (True == 1), yet no version writes one: a format key that is not an integer is
    refused like a later format; none stored is format 1."""
    checkpoint = {} if stored_format is None else {CHECKPOINT_FORMAT_KEY: stored_format}
    if refused:
        with pytest.raises(ValueError, match=rf"checkpoint x.ckpt has malora_lightning_format={stored_format!r}, "):
            check_checkpoint_format(checkpoint, "x.ckpt")
    else:
        check_checkpoint_format(checkpoint, "x.ckpt")


def test_load_from_checkpoint_restores_the_adapters_without_listing_the_absent_base(tiny_model_dir, tmp_path):
    """An adapter-only checkpoint lacks every frozen base weight by design; Lightning warned with the whole list
    (some 20 kB for SmolLM2), which reads as a broken checkpoint. The adapters it holds are checked and restored."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[checkpoints], enable_checkpointing=True)
    trained = make_module(tiny_model_dir)
    trainer.fit(trained, make_data(tiny_model_dir))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = MALoRAModule.load_from_checkpoint(checkpoints.best_model_path)
    assert not [w for w in caught if "not in the checkpoint" in str(w.message)]
    expected = adapter_state_dict(trained.model)
    assert all(torch.equal(tensor, expected[name]) for name, tensor in adapter_state_dict(loaded.model).items())
    # Lightning merges keyword arguments into the stored hyperparameters as they are: an AdapterConfig raised TypeError
    again = MALoRAModule.load_from_checkpoint(checkpoints.best_model_path, adapter=trained.adapter_config)
    assert again.adapter_config == trained.adapter_config


def test_the_lightning_classes_are_exported_without_importing_lightning_with_the_package():
    import subprocess
    import sys

    import malora_lightning

    assert malora_lightning.MALoRAModule is MALoRAModule
    assert malora_lightning.MultiTaskDataModule is MultiTaskDataModule
    probe = "import sys, malora_lightning; print('lightning' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True).stdout.strip() == "False"


def test_what_the_readme_has_subclasses_override_with_is_exported_where_it_says():
    """An `evaluate_batch` override needed `ScoringPass` from an internal module, and the callbacks the module attaches
    itself were not exported beside the others."""
    from pathlib import Path

    import malora_lightning.adapters
    import malora_lightning.callbacks
    import malora_lightning.data
    import malora_lightning.module

    rows = Path(__file__).parents[1].joinpath("README.md").read_text().splitlines()
    for name, package in [("LMLoss", malora_lightning.module), ("EvaluationOutput", malora_lightning.data),
                          ("ScoringPass", malora_lightning.adapters)]:
        assert hasattr(package, name)
        assert any(name in row and f"`{package.__name__}`" in row for row in rows), name
    assert {"TrainingRandomState", "AdapterExport"} <= set(malora_lightning.callbacks.__all__)


def test_the_output_head_runs_only_at_the_target_pairs_and_scores_as_the_full_forward(tiny_model_dir):
    """It ran at the union of the rows' target positions (3.9x the targets on a default-job batch) and the
    log-softmax with it; the per-row log-likelihoods are those of the full forward's logits."""
    module = make_module(tiny_model_dir, adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4, dropout=0.0))
    module.configure_model()
    module.eval()
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (3, 12))
    mask = torch.ones(3, 12, dtype=torch.long)
    labels = torch.full((3, 12), IGNORE_INDEX)
    labels[0, 9:], labels[1, 3:5], labels[2, 6] = ids[0, 9:], ids[1, 3:5], ids[2, 6]
    seen = []
    hook = module.model.get_output_embeddings().register_forward_hook(lambda _, args, out: seen.append(args[0].shape))
    with torch.no_grad():
        log_likelihood, tokens = module.target_log_likelihoods(ids, mask, labels)
        hook.remove()
        full = module(ids, mask)
    assert seen == [torch.Size([1, 6, 32])]  # 6 targets, where the union of positions is 3 rows x 6 positions
    log_probs = torch.log_softmax(full.double(), dim=-1)
    for row in range(3):
        targets = [t for t in range(1, 12) if labels[row, t] != IGNORE_INDEX]
        expected = sum(log_probs[row, t - 1, labels[row, t]] for t in targets)
        assert log_likelihood[row].item() == pytest.approx(expected.item(), rel=1e-5) and tokens[row] == len(targets)


class OwnParameterModule(MALoRAModule):
    """A subclass that trains a tensor of its own (a loss temperature) and the base's final norm (PEFT's
    modules_to_save pattern): both trained, and neither was in the checkpoint."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))
        self.teacher = torch.nn.Linear(3, 3).requires_grad_(False)  # frozen: rebuilt by the code, never copied

    def build_model(self):
        model = super().build_model()
        model.model.norm.weight.requires_grad_(True)
        return model

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        result.loss = result.loss * torch.exp(-self.log_temperature) + self.log_temperature
        return result

    def trainable_parameter_groups(self):
        return [*super().trainable_parameter_groups(), {"params": [self.log_temperature], "lr": 0.1}]


def test_a_subclasss_own_trained_tensors_are_checkpointed_and_restored(tiny_model_dir, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2)
    trainer = make_trainer(tmp_path, max_steps=2, callbacks=[checkpoints], enable_checkpointing=True)
    trained = OwnParameterModule(**make_module(tiny_model_dir).hparams)
    with pytest.warns(UserWarning, match=r"holds the adapters only.*\(log_temperature, model\.model\.norm\.weight; 2 "):
        trainer.fit(trained, make_data(tiny_model_dir))
    assert trained.log_temperature.item() != 0.0 and not torch.equal(trained.model.model.norm.weight,
                                                                     torch.ones_like(trained.model.model.norm.weight))
    stored = torch.load(checkpoints.best_model_path, weights_only=True)["state_dict"]
    assert {"log_temperature", "model.model.norm.weight"} <= set(stored)
    assert not any("embed_tokens" in key or key.endswith("q_proj.base_layer.weight") or key.startswith("teacher.")
                   for key in stored)
    loaded = OwnParameterModule.load_from_checkpoint(checkpoints.best_model_path)
    assert torch.equal(loaded.log_temperature, trained.log_temperature)
    assert torch.equal(loaded.model.model.norm.weight, trained.model.model.norm.weight)
    del stored["log_temperature"]  # a checkpoint without it is refused, not loaded with the tensor at its init
    checkpoint = torch.load(checkpoints.best_model_path, weights_only=True)
    torch.save({**checkpoint, "state_dict": stored}, tmp_path / "b.ckpt")
    with pytest.raises(ValueError, match="checkpoint lacks trained tensor 'log_temperature'"):
        OwnParameterModule.load_from_checkpoint(tmp_path / "b.ckpt")


class RMSpropModule(MALoRAModule):
    """A subclass's own optimiser and LambdaLR schedule, one group without a learning rate of its own."""

    def configure_optimizers(self):
        groups = self.trainable_parameter_groups()
        del groups[0]["lr"]
        optimizer = torch.optim.RMSprop(groups, lr=0.03)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def test_a_resume_leaves_a_subclasss_own_optimiser_and_schedule_as_restored(tiny_model_dir, tmp_path):
    """Any LambdaLR was taken for the module's own schedule: the rate was reset to hparams.learning_rate, and
    RMSprop (no `fused` default) or a group without `lr` crashed the resume with KeyError."""
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", max_steps=2, callbacks=[checkpoints], enable_checkpointing=True)
    trainer.fit(RMSpropModule(**make_module(tiny_model_dir).hparams), make_data(tiny_model_dir))
    rates = LearningRateRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=3, callbacks=[rates])
    trainer.fit(RMSpropModule(**make_module(tiny_model_dir).hparams), make_data(tiny_model_dir),
                ckpt_path=tmp_path / "ckpt" / "epoch=0-step=2.ckpt")
    assert rates.rates[2] == pytest.approx([0.015, 0.5 * 1e-2])  # RMSprop's default and the router group's rate


def test_a_parameter_group_without_a_rate_trains_at_the_runs_rate(tiny_model_dir, tmp_path):
    class GroupsWithoutRates(MALoRAModule):
        def trainable_parameter_groups(self):
            return [{"params": [p for group in super().trainable_parameter_groups() for p in group["params"]]}]

    rates = LearningRateRecorder()
    module = GroupsWithoutRates(**{**make_module(tiny_model_dir).hparams, "warmup_ratio": 0.0,
                                   "lr_schedule": "constant", "learning_rate": 0.02})
    make_trainer(tmp_path, max_steps=1, callbacks=[rates]).fit(module, make_data(tiny_model_dir))
    assert rates.rates[0] == [0.02]  # AdamW's own default, 1e-3, before
    assert module.trainer.optimizers[0].param_groups[0]["weight_decay"] == module.hparams.weight_decay


class RecordingModule(MALoRAModule):
    """The usual Lightning idiom: a subclass records its own arguments with save_hyperparameters()."""

    def __init__(self, extra=0.5, **kwargs):
        super().__init__(**kwargs)
        self.save_hyperparameters()


def test_a_subclass_that_saves_its_hyperparameters_writes_loadable_checkpoints(tiny_model_dir, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True)
    settings = {**make_module(tiny_model_dir).hparams, "adapter": AdapterConfig(rank=2, shared_rank=4, num_experts=4)}
    module = RecordingModule(extra=0.25, **settings)
    assert isinstance(module.hparams.adapter, AdapterConfig)  # save_hyperparameters() recorded the object again
    trainer.fit(module, make_data(tiny_model_dir))
    loaded = RecordingModule.load_from_checkpoint(checkpoints.best_model_path)  # UnpicklingError: AdapterConfig
    assert loaded.hparams.extra == 0.25 and loaded.adapter_config == settings["adapter"]


def test_a_subclass_that_saves_its_hyperparameters_logs_them_as_plain_data(tiny_model_dir, tmp_path):
    """The loggers record `hparams_initial`, which held the `AdapterConfig` that save_hyperparameters() put back: the
    CSV logger's hparams.yaml held it as a Python tag, which load_from_checkpoint(hparams_file=...) refuses."""
    from lightning.pytorch.loggers import CSVLogger

    from malora_lightning.checkpoints import read_hparams_file

    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=1)
    logger = CSVLogger(tmp_path)
    trainer = make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True, logger=logger)
    settings = {**make_module(tiny_model_dir).hparams, "adapter": AdapterConfig(rank=2, shared_rank=4, num_experts=4),
                "export_adapters": False}
    module = RecordingModule(extra=0.25, **settings)
    trainer.fit(module, make_data(tiny_model_dir))
    logged = read_hparams_file(tmp_path / "lightning_logs" / "version_0" / "hparams.yaml")  # plain YAML
    stored = torch.load(checkpoints.best_model_path, weights_only=True)["hyper_parameters"]
    assert logged["adapter"] == stored["adapter"] == settings["adapter"].to_dict() and logged["extra"] == 0.25
    assert isinstance(module.hparams.adapter, AdapterConfig)  # the subclass's own record is left as it is


def test_a_fit_without_export_adapters_writes_no_adapter_folder(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir, export_adapters=False)
    assert [type(callback).__name__ for callback in module.configure_callbacks()] == ["TrainingRandomState",
                                                                                      "NonFiniteLossCheck"]
    make_trainer(tmp_path, max_steps=1).fit(module, make_data(tiny_model_dir))
    assert module.trainer.global_step == 1 and not (tmp_path / "adapter").exists()


def test_fsdp2_sharding_refuses_a_quantized_base_before_touching_the_mesh(tiny_model_dir):
    """FSDP2 cannot shard bitsandbytes' 4/8-bit weights; the error says which strategy and settings can."""
    module = make_module(tiny_model_dir, quantization="nf4")
    with pytest.raises(ValueError, match=r"ModelParallelStrategy \(FSDP2\) cannot shard bitsandbytes 4/8-bit layers; "
                                         r"use quantization=null .* FSDPStrategy"):
        module.shard_model()


def test_a_hyperparameter_a_checkpoint_cannot_hold_is_named_before_training(tiny_model_dir, tmp_path):
    from pathlib import Path

    module = RecordingModule(extra=Path("/tmp/x"), **make_module(tiny_model_dir).hparams)
    with pytest.raises(ValueError, match=r"hyperparameter 'extra' \(PosixPath: PosixPath\('/tmp/x'\)\) cannot "):
        make_trainer(tmp_path, max_steps=1).fit(module, make_data(tiny_model_dir))
    # what weights_only loading does give back passes: a dtype, int keys, a set
    _check_loadable_hyperparameters({"dtype": torch.bfloat16, "weights": {1: 0.5}, "tasks": {"a", "b"}},
                                    "hyperparameter")


def test_evaluating_without_per_task_metrics_says_that_nothing_is_logged(tiny_model_dir, tmp_path):
    data = make_data(tiny_model_dir)
    with pytest.warns(UserWarning, match="no PerTaskMetrics callback is attached"):
        assert make_trainer(tmp_path, limit_val_batches=None).validate(make_module(tiny_model_dir), data) == [{}] * 3
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*PerTaskMetrics.*")
        results = make_trainer(tmp_path, limit_val_batches=None, callbacks=[PerTaskMetrics()]).validate(
            make_module(tiny_model_dir), data)
    assert "val/macro_acc" in results[0]


def as_format_1(checkpoint: dict, trained: MALoRAModule, optimizer: torch.optim.Optimizer) -> dict:
    """The checkpoint as malora_lightning wrote it before checkpoint format 2: every mixture's lora_B [N, m, r] (each
    B_t as it is), in the state dict and in AdamW's moments (keyed by position in the live optimizer's groups)."""
    legacy = {key: value for key, value in checkpoint.items() if key != CHECKPOINT_FORMAT_KEY}
    up = {name for name in checkpoint["state_dict"] if name.endswith(".lora_B")}
    legacy["state_dict"] = {name: value.transpose(1, 2).contiguous() if name in up else value
                            for name, value in checkpoint["state_dict"].items()}
    names = {param: name for name, param in trained.named_parameters()}
    positions = [names[param] for group in optimizer.param_groups for param in group["params"]]
    (stored,) = checkpoint["optimizer_states"]
    legacy["optimizer_states"] = [{**stored, "state": {
        index: {entry: value.transpose(1, 2).contiguous() if positions[index] in up and value.dim() == 3 else value
                for entry, value in state.items()}
        for index, state in stored["state"].items()}}]
    return legacy


class TrainerBoundGroups(MALoRAModule):
    """Scales the learning rate by the number of processes, so its groups need the trainer."""

    def trainable_parameter_groups(self):
        groups = super().trainable_parameter_groups()
        return [{**group, "lr": group["lr"] * self.trainer.world_size} for group in groups]


def test_a_checkpoint_written_with_b_untransposed_loads_and_resumes_exactly(tiny_model_dir, tmp_path):
    """The mixtures' lora_B is now [N, r, m] (all experts' up-projection is a view of it); a checkpoint written before
    holds [N, m, r] in its tensors and AdamW's moments, which loading refused by shape. It is converted: the resumed
    fit takes the same steps as the uninterrupted one, and a state that is not the module's AdamW is refused."""
    full = LossRecorder()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=3, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", max_steps=6, callbacks=[full, checkpoints], enable_checkpointing=True)
    trained = make_module(tiny_model_dir)
    trainer.fit(trained, make_data(tiny_model_dir))
    checkpoint = torch.load(tmp_path / "ckpt" / "epoch=0-step=3.ckpt", weights_only=True)
    assert checkpoint[CHECKPOINT_FORMAT_KEY] == 2
    legacy = as_format_1(checkpoint, trained, trainer.optimizers[0])
    torch.save(legacy, tmp_path / "legacy.ckpt")

    # loading without a fit builds no optimizer groups: a subclass's may need a trainer
    loaded = TrainerBoundGroups.load_from_checkpoint(tmp_path / "legacy.ckpt")
    assert all(torch.equal(tensor, checkpoint["state_dict"][f"model.{name}"])
               for name, tensor in adapter_state_dict(loaded.model).items())
    resumed = LossRecorder()
    trainer = make_trainer(tmp_path / "b", max_steps=6, callbacks=[resumed])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=tmp_path / "legacy.ckpt")
    assert [resumed.losses[step] for step in (4, 5, 6)] == [full.losses[step] for step in (4, 5, 6)]

    (stored,) = legacy["optimizer_states"]  # one group where the module has two (adapters, routers)
    stored["param_groups"] = [{**stored["param_groups"][0],
                               "params": [i for group in stored["param_groups"] for i in group["params"]]}]
    torch.save(legacy, tmp_path / "other-optimizer.ckpt")
    with pytest.raises(ValueError, match=r"other-optimizer.ckpt holds the mixtures' lora_B as \[N, m, r\].*optimizer "
                                         r"state is not the module's AdamW groups"):
        make_trainer(tmp_path / "c", max_steps=6).fit(make_module(tiny_model_dir), make_data(tiny_model_dir),
                                                      ckpt_path=tmp_path / "other-optimizer.ckpt")



def test_upgrading_a_checkpoint_twice_leaves_a_square_b_converted_once():
    """With B [N, r, r] only the format key tells the layouts apart: the upgrade sets it, so that a second call (a
    subclass's hook calling on_load_checkpoint again) does not transpose B back."""
    b = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    checkpoint = {"state_dict": {"model.q.lora_B": b.clone()}}
    for _ in range(2):
        upgrade_checkpoint(checkpoint, {"model.q.lora_B": torch.Size((2, 4, 4))}, None, None)
    assert torch.equal(checkpoint["state_dict"]["model.q.lora_B"], b.transpose(1, 2))
    assert checkpoint[CHECKPOINT_FORMAT_KEY] == 2


def test_upgrading_a_checkpoint_the_strategy_loads_is_refused_and_a_missing_key_is_left_to_the_load():
    """Without `state_dict` (FSDP puts the tensors in itself) the [N, m, r] lora_B cannot be transposed here; a key
    the file lacks is the state-dict load's to name."""
    with pytest.raises(ValueError, match=r"x\.ckpt holds the mixtures' lora_B as \[N, m, r\].*this strategy loads a "
                                         r"checkpoint's tensors itself"):
        upgrade_checkpoint({"optimizer_states": []}, {"model.q.lora_B": torch.Size((2, 4, 8))}, None, "x.ckpt")
    checkpoint = {"state_dict": {"model.k.lora_A": torch.ones(2, 4)}}
    upgrade_checkpoint(checkpoint, {"model.q.lora_B": torch.Size((2, 4, 8))}, None, None)
    assert list(checkpoint["state_dict"]) == ["model.k.lora_A"] and checkpoint[CHECKPOINT_FORMAT_KEY] == 2


def test_validating_a_checkpoint_on_other_held_out_rows_warns(tiny_model_dir, tmp_path):
    """A task without a validation split is validated on rows held out from its train rows, chosen by data_seed: a
    later run from the checkpoint with another data_seed validated on rows the fit trained on, silently."""
    rows = [{"q": f"{i}+1", "a": str(i + 1)} for i in range(40)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = {"name": "mine", "path": {"train": str(tmp_path / "train.jsonl")}, "prompt": "{q}", "target": "{a}"}
    data = dict(tasks=["mine", "parity"], task_specs=[spec])
    trainer = make_trainer(tmp_path / "fit", max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, **data))
    trainer.save_checkpoint(tmp_path / "fit.ckpt")
    stored = torch.load(tmp_path / "fit.ckpt", weights_only=True)["MultiTaskDataModule"]
    assert stored["data_seed"] == 0 and set(stored["held_out_rows"]) == {"mine"}  # parity has its own split

    def run(stage, **overrides):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer = make_trainer(tmp_path / stage, limit_val_batches=1, limit_test_batches=1,
                                   limit_predict_batches=1)
            getattr(trainer, stage)(make_module(tiny_model_dir), make_data(tiny_model_dir, **data, **overrides),
                                    ckpt_path=tmp_path / "fit.ckpt")
        return [str(w.message) for w in caught if "held out from their train rows" in str(w.message)]

    assert run("validate") == []
    moved = run("validate", data_seed=1)
    assert len(moved) == 1 and "['mine']" in moved[0] and "data_seed 0 there, 1 here" in moved[0]
    assert "data_seed=0" in moved[0]
    # test and predict score no validation rows: the held-out ones do not bear on them
    assert run("test", data_seed=1) == [] and run("predict", data_seed=1) == []


def test_a_max_new_tokens_cap_below_a_tasks_answers_is_named(tiny_model_dir, tmp_path):
    """A cap below a generative task's answer length cut every longer answer short, and exact match scored them
    wrong, with nothing said."""
    def warnings_of(module):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            make_trainer(tmp_path, limit_val_batches=1).validate(module, make_data(tiny_model_dir))
        return [str(w.message) for w in caught if "max_new_tokens" in str(w.message)]

    cut = warnings_of(make_module(tiny_model_dir, max_new_tokens=1))
    assert len(cut) == 1
    named = re.search(r"max_new_tokens=1 is below .* tasks \{'add_2digit': (\d+), 'reverse_words': (\d+)\}", cut[0])
    assert named
    assert warnings_of(make_module(tiny_model_dir)) == []
    # the lengths count the end-of-turn token, which decoding drops: one token less still keeps every answer whole
    longest = max(int(length) for length in named.groups())
    assert warnings_of(make_module(tiny_model_dir, max_new_tokens=longest - 1)) == []
    assert len(warnings_of(make_module(tiny_model_dir, max_new_tokens=longest - 2))) == 1
