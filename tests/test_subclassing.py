"""A project's own subclass of `MALoRAModule` (README, Extending it): what it fixes or changes is what the module
runs with, what it adds trains and is checkpointed, and its checkpoints load back into it, through Python and
through its own CLI, with the base-model check intact."""

import dataclasses
import io
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import ModelCheckpoint

import malora_lightning.module as module_file
from malora_lightning.adapters import AdapterConfig
from malora_lightning.callbacks.per_task_metrics import Evaluation
from malora_lightning.checkpoints import SETTINGS_KEY
from malora_lightning.cli import main
from malora_lightning.evaluation import batch_rows
from malora_lightning.data import MultiTaskDataModule, TrainingBatch
from malora_lightning.module import MALoRAModule
from tests.helpers import tiny_model, tiny_tokenizer
from tests.test_module import LearningRateRecorder, make_data, make_module, make_trainer

SMALL = AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2)
BASE = ""  # set by each test: the base a project's module fixes


class FixedBase(MALoRAModule):
    """Fixes the base, scales the learning rate it is given before passing it on, and names its adapter `cfg`."""

    def __init__(self, learning_rate: float = 1e-3, cfg: AdapterConfig = SMALL, **kwargs):
        super().__init__(model_name_or_path=BASE, quantization=None, learning_rate=10 * learning_rate, adapter=cfg,
                         **kwargs)


class ExplicitArguments(MALoRAModule):
    """Takes no `adapter` and no `**kwargs`: its CLI has no model.adapter."""

    def __init__(self, rank: int = 2):
        super().__init__(model_name_or_path=BASE, quantization=None,
                         adapter=AdapterConfig(rank=rank, shared_rank=4, num_experts=4), learning_rate=1e-2)


@pytest.fixture
def base(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], "BASE", str(tiny_model_dir))
    return str(tiny_model_dir)


@pytest.fixture
def other_base(tmp_path_factory):
    """A base of the same shapes as `tiny_model_dir`, with other weights: only the check tells them apart."""
    path = tmp_path_factory.mktemp("other-llama")
    tiny_model("llama", seed=1).save_pretrained(path)
    tiny_tokenizer(chat_template=True).save_pretrained(path)
    return str(path)


def fit_checkpoint(module: MALoRAModule, root: Path, callbacks: tuple = ()) -> Path:
    checkpoints = ModelCheckpoint(dirpath=root / "ckpt", save_last=True)
    make_trainer(root, max_steps=1, callbacks=[checkpoints, *callbacks], enable_checkpointing=True).fit(
        module, make_data(module.settings.model_name_or_path, tasks=["parity"]))
    return root / "ckpt" / "last.ckpt"


def test_a_subclass_runs_on_what_it_passes_and_loads_from_its_own_arguments(base, tmp_path):
    """The module read its settings from hparams, which Lightning fills with the subclass's own arguments: a learning
    rate the subclass scaled ran unscaled. Loading passed the base it fixes a second time (TypeError: multiple
    values), and an AdapterConfig under another name made every checkpoint unreadable (weights_only)."""
    module = FixedBase(learning_rate=1e-3, cfg=SMALL, warmup_ratio=0.0, lr_schedule="constant")
    assert module.settings.learning_rate == 1e-2 and module.settings.model_name_or_path == base
    assert dict(module.hparams) == {"learning_rate": 1e-3, "cfg": SMALL.to_dict(), "warmup_ratio": 0.0,
                                    "lr_schedule": "constant"}
    rates = LearningRateRecorder()
    checkpoint = fit_checkpoint(module, tmp_path, callbacks=[rates])
    assert rates.rates[0] == [1e-2, 1e-2]  # adapters, routers
    stored = torch.load(checkpoint, weights_only=True)
    assert stored["hyper_parameters"]["cfg"] == SMALL.to_dict()
    assert stored[SETTINGS_KEY]["model_name_or_path"] == base and stored[SETTINGS_KEY]["learning_rate"] == 1e-2
    loaded = FixedBase.load_from_checkpoint(checkpoint)
    assert loaded.settings == module.settings and loaded.adapter_config == SMALL
    loaded.configure_model()
    assert all(torch.equal(value, module.state_dict()[key]) for key, value in loaded.state_dict().items()
               if key in module.checkpoint_keys())


def test_a_checkpoint_of_a_subclass_that_fixed_another_base_is_refused(base, other_base, tmp_path, monkeypatch):
    """A subclass's hyperparameters do not name the base it fixes, and the check compared only names both sides had:
    the checkpoint loaded silently into the same class fixed to another base (a project that changed its base)."""
    checkpoint = fit_checkpoint(FixedBase(), tmp_path)
    monkeypatch.setattr(sys.modules[__name__], "BASE", other_base)
    refused = r"last\.ckpt does not fit this run: model\.model_name_or_path: checkpoint '.*tiny-chat-llama.*', this run " \
              r"'.*other-llama"
    with pytest.raises(ValueError, match=refused):
        FixedBase.load_from_checkpoint(checkpoint)  # the file is named, as a trainer's ckpt_path is
    with pytest.raises(ValueError, match=refused):
        make_trainer(tmp_path / "b", max_steps=2).fit(FixedBase(), make_data(other_base, tasks=["parity"]),
                                                      ckpt_path=checkpoint)


def cli_flags(base: str, root: Path) -> list[str]:
    return [f"--data.tokenizer={base}", "--data.tasks=[parity]", "--data.max_train_examples_per_task=8",
            "--data.max_eval_examples_per_task=2", "--data.batch_size=2", "--data.eval_batch_size=2",
            "--trainer.accelerator=cpu", "--trainer.logger=false", "--trainer.enable_progress_bar=false",
            f"--trainer.default_root_dir={root}"]


def test_a_cli_of_a_subclass_without_an_adapter_argument_checks_its_checkpoints(base, other_base, tmp_path,
                                                                                  monkeypatch):
    """The CLI's check read model.adapter from the parsed config (AttributeError on every --ckpt_path). It now checks
    the module it built, before the base loads: a fixed base that changed is refused there too."""
    flags = cli_flags(base, tmp_path)
    main(["fit", *flags, "--trainer.max_steps=1", "--trainer.limit_val_batches=0"], model_class=ExplicitArguments)
    (checkpoint,) = (tmp_path / "checkpoints").glob("*.ckpt")
    main(["test", *flags, f"--ckpt_path={checkpoint}"], model_class=ExplicitArguments)
    with pytest.raises(ValueError, match=r"model\.adapter\.rank: checkpoint 2, this run 3"):
        main(["test", *flags, "--model.rank=3", f"--ckpt_path={checkpoint}"], model_class=ExplicitArguments)
    monkeypatch.setattr(sys.modules[__name__], "BASE", other_base)
    monkeypatch.setattr(module_file, "load_base_model", lambda *args, **kwargs: pytest.fail("the base loaded"))
    with pytest.raises(ValueError, match=r"model\.model_name_or_path: checkpoint '.*tiny-chat-llama"):
        main(["fit", *flags, "--trainer.max_steps=2", f"--ckpt_path={checkpoint}"], model_class=ExplicitArguments)


class GeneratorGroups(MALoRAModule):
    def trainable_parameter_groups(self):
        return [{"params": filter(lambda param: param.requires_grad, self.parameters())}]


def test_parameter_groups_given_as_a_generator_train(tiny_model_dir, tmp_path):
    """Torch's optimizers take any iterable; the module read the generator first, and AdamW got empty groups."""
    module = GeneratorGroups(**make_module(tiny_model_dir).hparams)
    module.configure_model()
    before = {name: param.detach().clone() for name, param in module.named_parameters() if param.requires_grad}
    make_trainer(tmp_path, max_steps=2).fit(module, make_data(tiny_model_dir))
    assert len(module.trainer.optimizers[0].param_groups[0]["params"]) == len(before)
    trained = dict(module.named_parameters())
    changed = [name for name in before if not torch.equal(trained[name], before[name])]
    assert len(changed) == len(before)


class OwnParameterLeftOut(MALoRAModule):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.log_temperature = torch.nn.Parameter(torch.zeros(()))

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        result.loss = result.loss * torch.exp(-self.log_temperature) + self.log_temperature
        return result


def test_a_trainable_parameter_left_out_of_the_groups_is_named(tiny_model_dir, tmp_path):
    """It got a gradient in every step and never changed, silently."""
    with pytest.raises(ValueError, match=r"parameter log_temperature: requires grad, but no group of "
                                         r"trainable_parameter_groups\(\) holds it"):
        make_trainer(tmp_path, max_steps=1).fit(OwnParameterLeftOut(**make_module(tiny_model_dir).hparams),
                                                make_data(tiny_model_dir))


class LossAverage(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(()))


class WithStatistics(MALoRAModule):
    """Keeps a running loss in a submodule of its own, beside a frozen teacher that has a buffer too."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.statistics = LossAverage()
        self.teacher = torch.nn.BatchNorm1d(3).requires_grad_(False)  # frozen: rebuilt by its code, never copied

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        self.statistics.mean.copy_(0.5 * self.statistics.mean + 0.5 * result.loss.detach())
        return result


def test_a_buffer_in_a_submodule_of_a_subclass_is_checkpointed(tiny_model_dir, tmp_path):
    """Only the buffers registered on the module itself were kept: this one loaded back as 0."""
    trained = WithStatistics(**make_module(tiny_model_dir).hparams)
    checkpoint = fit_checkpoint(trained, tmp_path)
    stored = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert "statistics.mean" in stored and not any(key.startswith("teacher.") for key in stored)
    loaded = WithStatistics.load_from_checkpoint(checkpoint)
    assert loaded.statistics.mean.item() == trained.statistics.mean.item() > 0


class DataFromPath(MultiTaskDataModule):
    def __init__(self, root: Path = Path("."), **kwargs):
        super().__init__(**kwargs)


def test_a_data_module_hyperparameter_a_checkpoint_cannot_hold_is_named_before_training(tiny_model_dir, tmp_path):
    """Lightning writes the data module's hyperparameters into every checkpoint too: a Path made each one unreadable
    (weights_only), found only when loading one."""
    data = DataFromPath(root=tmp_path, tasks=["parity"], tokenizer=str(tiny_model_dir))
    with pytest.raises(ValueError, match=r"data module hyperparameter 'root' \(PosixPath: .*cannot be read back"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(tiny_model_dir), data)


class DictEvaluation(MALoRAModule):
    def evaluate_batch(self, batch):
        return {"loss": super().evaluate_batch(batch).loss}


def test_an_evaluation_that_returns_another_type_is_refused_not_logged_as_zero_loss(tiny_model_dir, tmp_path):
    """PerTaskMetrics skipped it, and the evaluation with no task logged val/macro_loss 0.0, the best a monitor could
    see."""
    from malora_lightning.callbacks import PerTaskMetrics

    with pytest.raises(TypeError, match=r"an evaluation step returned a dict, where PerTaskMetrics scores an "
                                        r"EvaluationOutput"):
        make_trainer(tmp_path, callbacks=[PerTaskMetrics()], limit_val_batches=None).validate(
            DictEvaluation(**make_module(tiny_model_dir).hparams), make_data(tiny_model_dir))
    assert Evaluation(stage="val", step=0, sanity_check=False).macro_loss is None


def test_the_settings_are_every_argument_of_the_module_but_its_adapter():
    """A new argument left out of ModuleSettings would never reach the module's code through `settings`."""
    import dataclasses
    import inspect

    arguments = set(inspect.signature(MALoRAModule.__init__).parameters) - {"self", "adapter"}
    assert {field.name for field in dataclasses.fields(module_file.ModuleSettings)} == arguments


class PassThrough(MALoRAModule):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)


def test_a_pass_through_subclass_given_positional_arguments_loads_back_with_them(tiny_model_dir, tmp_path):
    """Values passed on through *args have no name in the subclass's frame: recording only its named arguments
    rebuilt the module on the default base (refused as another base, or another quantization, silently)."""
    module = PassThrough(str(tiny_model_dir), None, adapter=SMALL, learning_rate=2e-3)
    assert module.hparams["model_name_or_path"] == str(tiny_model_dir) and module.hparams["quantization"] is None
    loaded = PassThrough.load_from_checkpoint(fit_checkpoint(module, tmp_path))
    assert loaded.settings == module.settings and loaded.adapter_config == SMALL


class Briefly(MultiTaskDataModule):
    """Changes two of the data module's arguments before passing them on."""

    def __init__(self, max_length: int = 64, system_prompt: str | None = None, **kwargs):
        super().__init__(max_length=max_length + 16, system_prompt=system_prompt or "Answer briefly.", **kwargs)


def test_a_data_module_subclass_runs_on_what_it_passes_on(tiny_model_dir):
    """The data module read its settings from hparams, which record the subclass's own arguments: the prompt format
    got max_length 64 and no system prompt, where the subclass passed on 80 and 'Answer briefly.'."""
    data = Briefly(tasks=["parity"], tokenizer=str(tiny_model_dir), max_train_examples_per_task=4,
                   max_eval_examples_per_task=2)
    assert (data.hparams.max_length, data.hparams.system_prompt) == (64, None)  # how it is rebuilt
    data.setup("fit")
    assert (data.encoder.max_length, data.encoder.system_prompt) == (80, "Answer briefly.")
    example = data.train_dataloader().dataset[0]
    assert "Answer briefly." in data.tokenizer.decode(example.input_ids)


class OnlyParity(MultiTaskDataModule):
    """Fixes the task list in its own code."""

    def __init__(self, **kwargs):
        super().__init__(tasks=["parity"], **kwargs)


def test_a_data_module_subclass_that_fixes_an_argument_loads_from_a_checkpoint(tiny_model_dir, tmp_path):
    """Lightning recorded every class's arguments as the data module's hyperparameters, so loading passed the fixed
    task list a second time (TypeError: multiple values for 'tasks')."""
    data = OnlyParity(tokenizer=str(tiny_model_dir), max_length=64, max_train_examples_per_task=8,
                      max_eval_examples_per_task=2)
    assert dict(data.hparams) == {"tokenizer": str(tiny_model_dir), "max_length": 64,
                                  "max_train_examples_per_task": 8, "max_eval_examples_per_task": 2}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    make_trainer(tmp_path, max_steps=1, callbacks=[checkpoints], enable_checkpointing=True).fit(
        make_module(tiny_model_dir), data)
    loaded = OnlyParity.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert loaded.settings == data.settings and loaded.settings.tasks == ["parity"]


def test_the_data_settings_are_every_argument_of_the_data_module():
    """A new argument left out of DataSettings would never reach the data module's code through `settings`."""
    import dataclasses
    import inspect

    from malora_lightning.data.datamodule import DataSettings

    arguments = set(inspect.signature(MultiTaskDataModule.__init__).parameters) - {"self"}
    assert {field.name for field in dataclasses.fields(DataSettings)} == arguments


class FixedRemoteCode(MALoRAModule):
    """Fixes trust_remote_code in its own code (a base whose folder needs its own model code)."""

    def __init__(self, **kwargs):
        super().__init__(model_name_or_path=BASE, quantization=None, adapter=SMALL, trust_remote_code=True, **kwargs)


def test_a_subclass_that_fixes_trust_remote_code_loads_and_a_stored_one_still_never_applies(base, tmp_path):
    """load_from_checkpoint passed the caller's trust_remote_code=False to every class: one that fixes it got it
    twice (TypeError: multiple values for keyword argument 'trust_remote_code'), and could not be loaded at all."""
    trained = FixedRemoteCode(learning_rate=2e-3)
    checkpoint = fit_checkpoint(trained, tmp_path / "fixed")
    assert "trust_remote_code" not in torch.load(checkpoint, weights_only=True)["hyper_parameters"]
    loaded = FixedRemoteCode.load_from_checkpoint(checkpoint)
    assert loaded.settings == trained.settings and loaded.settings.trust_remote_code is True  # the class's code
    # a pass-through subclass whose checkpoint holds trust_remote_code: True gets the caller's value, not the file's
    stored = torch.load(fit_checkpoint(PassThrough(base, None, adapter=SMALL, trust_remote_code=True), tmp_path / "p"),
                        weights_only=True)
    assert stored["hyper_parameters"]["trust_remote_code"] is True
    torch.save(stored, tmp_path / "stored.ckpt")
    assert PassThrough.load_from_checkpoint(tmp_path / "stored.ckpt").settings.trust_remote_code is False
    assert PassThrough.load_from_checkpoint(tmp_path / "stored.ckpt", trust_remote_code=True).settings.trust_remote_code
    # hparams_file replaces the checkpoint's hyperparameters: the same rules hold for the file's
    (tmp_path / "fixed.yaml").write_text("learning_rate: 0.005\n")
    loaded = FixedRemoteCode.load_from_checkpoint(checkpoint, hparams_file=tmp_path / "fixed.yaml")  # was TypeError
    assert loaded.settings.learning_rate == 0.005 and loaded.settings.trust_remote_code is True
    (tmp_path / "stored.yaml").write_text(yaml.safe_dump({**stored["hyper_parameters"], "learning_rate": 0.005}))
    loaded = PassThrough.load_from_checkpoint(tmp_path / "stored.ckpt", hparams_file=tmp_path / "stored.yaml")
    assert loaded.settings.learning_rate == 0.005 and loaded.settings.trust_remote_code is False
    # read from a file object, whose hyperparameters cannot be looked at first, the caller's value is passed too
    assert PassThrough.load_from_checkpoint(io.BytesIO((tmp_path / "stored.ckpt").read_bytes())
                                            ).settings.trust_remote_code is False
    # and a caller's True reaches a pass-through class whose stored hyperparameters hold none
    (tmp_path / "none.yaml").write_text(yaml.safe_dump({name: value for name, value in stored["hyper_parameters"].items()
                                                        if name != "trust_remote_code"}))
    loaded = PassThrough.load_from_checkpoint(tmp_path / "stored.ckpt", hparams_file=tmp_path / "none.yaml",
                                              trust_remote_code=True)
    assert loaded.settings.trust_remote_code is True


class TensorLoss(MALoRAModule):
    def compute_lm_loss(self, batch):
        return super().compute_lm_loss(batch).loss


class JoinedAnswers(MALoRAModule):
    """Returns one string of the batch's answers' first characters: as long as the batch, so nothing failed."""

    def generate_predictions(self, batch, max_new_tokens):
        return "".join(answer[:1] or "?" for answer in super().generate_predictions(batch, max_new_tokens))


def test_an_override_that_returns_another_type_is_named(tiny_model_dir, tmp_path):
    """compute_lm_loss returning a tensor failed as "'Tensor' object has no attribute 'loss'" in training_step;
    generate_predictions returning a string of the batch's length was scored character by character, silently."""
    with pytest.raises(TypeError, match=r"TensorLoss\.compute_lm_loss returned a Tensor: it must return an LMLoss"):
        make_trainer(tmp_path, max_steps=1).fit(TensorLoss(**make_module(tiny_model_dir).hparams),
                                                make_data(tiny_model_dir, tasks=["add_2digit"]))
    from malora_lightning.callbacks import PerTaskMetrics

    with pytest.raises(TypeError, match=r"JoinedAnswers\.generate_predictions returned a str for a batch of 2 prompts"):
        make_trainer(tmp_path, callbacks=[PerTaskMetrics()], limit_val_batches=1).validate(
            JoinedAnswers(**make_module(tiny_model_dir).hparams),
            make_data(tiny_model_dir, tasks=["add_2digit"], eval_batch_size=2, max_eval_examples_per_task=2))


@dataclasses.dataclass
class WithoutLabels:
    """A batch class of one's own (not a TrainingBatch) that forgot a field."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    task_id: torch.Tensor
    task_name: list


def narrower_labels(batch):
    return dataclasses.replace(batch, labels=batch.labels[:, 2:], pairs=None)


# (change to a collated batch, error, message): what a collator of one's own can get wrong
WRONG_BATCHES = {
    "missing field": (lambda batch: WithoutLabels(batch.input_ids, batch.attention_mask, batch.task_id,
                                                  batch.task_name),
                      TypeError, r"the batch \(WithoutLabels\) has no field 'labels': every batch has input_ids, "),
    # trained and scored silently on the labels of other tokens
    "labels narrower than input_ids": (narrower_labels, ValueError,
                                       r"labels \(\w+\.labels\) has shape \[2, \d+\]: it must have input_ids' shape"),
    "float labels": (lambda batch: dataclasses.replace(batch, labels=batch.labels.float(), pairs=None), TypeError,
                     r"labels \(\w+\.labels\) is a torch.float32 tensor: labels must be long"),
    "float input_ids": (lambda batch: dataclasses.replace(batch, input_ids=batch.input_ids.float()), TypeError,
                        r"input_ids \(\w+\.input_ids\) is a torch.float32 tensor: token ids must be of an integer"),
    "attention_mask of another width": (
        lambda batch: dataclasses.replace(batch, attention_mask=batch.attention_mask[:, 1:]), ValueError,
        r"attention_mask \(\w+\.attention_mask\) has shape \[2, \d+\]: it must have input_ids' shape"),
    "task_id of another shape": (lambda batch: dataclasses.replace(batch, task_id=batch.task_id[:, None]),
                                 ValueError, r"task_id \(\w+\.task_id\) has shape \[2, 1\]: it must be \[2\]"),
    # a per-task loss for each letter
    "task_name a string": (lambda batch: dataclasses.replace(batch, task_name="ab"), TypeError,
                           r"task_name \(\w+\.task_name\) is a str: it must be a list of one task name per row"),
    "task_name short of a row": (lambda batch: dataclasses.replace(batch, task_name=batch.task_name[:1]), ValueError,
                                 r"task_name \(\w+\.task_name\) has 1 names: it must have one per row"),
    "missing task_id": (lambda batch: SimpleNamespace(**{name: value for name, value in vars(batch).items()
                                                         if name != "task_id"}),
                        TypeError, r"the batch \(SimpleNamespace\) has no field 'task_id': every batch has "),
    "missing task_name": (lambda batch: SimpleNamespace(**{name: value for name, value in vars(batch).items()
                                                           if name != "task_name"}),
                          TypeError, r"the batch \(SimpleNamespace\) has no field 'task_name': every batch has "),
    "labels a list": (lambda batch: dataclasses.replace(batch, labels=batch.labels.tolist(), pairs=None), TypeError,
                      r"labels \(\w+\.labels\) is a list: it must be a tensor"),
    "bool input_ids": (lambda batch: dataclasses.replace(batch, input_ids=batch.input_ids.bool()), TypeError,
                       r"input_ids \(\w+\.input_ids\) is a torch.bool tensor: token ids must be of an integer"),
    "int32 labels": (lambda batch: dataclasses.replace(batch, labels=batch.labels.int(), pairs=None), TypeError,
                     r"labels \(\w+\.labels\) is a torch.int32 tensor: labels must be long"),
    "one row without its batch dimension": (
        lambda batch: dataclasses.replace(batch, input_ids=batch.input_ids[0], attention_mask=batch.attention_mask[0],
                                          labels=batch.labels[0], pairs=None), ValueError,
        r"input_ids \(\w+\.input_ids\) has shape \[\d+\]: it must be \[B, L\]"),
}


@pytest.fixture(scope="module")
def collated(tiny_model_dir):
    """A built module, and a training and a validation batch of two rows from the data module's collator."""
    module = make_module(tiny_model_dir)
    module.configure_model()
    data = make_data(tiny_model_dir, tasks=["add_2digit"], batch_size=2, eval_batch_size=2)
    data.setup("fit")
    return module, next(iter(data.train_dataloader())), next(iter(data.val_dataloader()["add_2digit"]))


@pytest.mark.parametrize("case", list(WRONG_BATCHES))
def test_a_batch_that_breaks_the_contract_is_refused_naming_the_field(collated, case):
    """A collator of one's own got a deep traceback from the model (a float, a wider tensor), or trained and scored on
    a silently wrong loss (labels narrower than input_ids, a task_name string); each step now names the field."""
    module, training, evaluation = collated
    change, error, message = WRONG_BATCHES[case]
    with torch.no_grad():
        for step, batch in ((module.training_step, training), (module.validation_step, evaluation),
                            (module.predict_step, evaluation)):
            with pytest.raises(error, match=message):
                step(change(batch), 0)


# (change to a collated evaluation batch, error, message): what a collator of one's own can get wrong in the fields
# that only evaluation and prediction read
WRONG_EVALUATION_BATCHES = {
    # a collator that ignores eval_fields: an AttributeError on `choices` from inside evaluate_batch
    "a training batch": (lambda batch: TrainingBatch(batch.input_ids, batch.attention_mask, batch.labels,
                                                     batch.task_id, batch.task_name), TypeError,
                         r"the evaluation batch \(TrainingBatch\) has no field 'prompts': evaluation and prediction "
                         r"also read prompts, targets, .*build_collator\(eval_fields=True\)"),
    # `loss[counted]` gathered row 1 for every row: each row scored with row 1's loss and correctness, silently
    "counted of ones (long)": (lambda batch: dataclasses.replace(batch, counted=torch.ones(2, dtype=torch.long)),
                               TypeError, r"counted \(EvaluationBatch\.counted\) is a torch.int64 tensor of shape "
                                          r"\[2\]: it must be a bool tensor of shape \[2\]"),
    "counted a list": (lambda batch: dataclasses.replace(batch, counted=[True, True]), TypeError,
                       r"counted \(EvaluationBatch\.counted\) is a list: it must be a bool tensor"),
    "targets short of a row": (lambda batch: dataclasses.replace(batch, targets=batch.targets[:1]), ValueError,
                               r"targets \(EvaluationBatch\.targets\) has 1 rows: it must be a list of one target"),
    "prompts a string": (lambda batch: dataclasses.replace(batch, prompts="ab"), TypeError,
                         r"prompts \(EvaluationBatch\.prompts\) is a str: it must be a list of one prompt text"),
    "prompt_input_ids of one row": (lambda batch: dataclasses.replace(batch,
                                                                      prompt_input_ids=batch.prompt_input_ids[0]),
                                    ValueError, r"prompt_input_ids \(EvaluationBatch\.prompt_input_ids\) has shape "
                                                r"\[\d+\]: it must be a \[B, P\] tensor"),
}


@pytest.mark.parametrize("case", list(WRONG_EVALUATION_BATCHES))
def test_an_evaluation_batch_that_breaks_the_contract_is_refused_naming_the_field(collated, case):
    """check_batch checked the training fields alone: the evaluation fields a collator of one's own left out or got
    wrong failed inside evaluate_batch, or scored other rows than the batch's."""
    module, _, evaluation = collated
    change, error, message = WRONG_EVALUATION_BATCHES[case]
    with torch.no_grad():
        for step in (module.validation_step, module.predict_step):
            with pytest.raises(error, match=message):
                step(change(evaluation), 0)


class ShiftedTaskIds:
    """A collate function of one's own that numbers the tasks otherwise than the data module (`shift` of the ids)."""

    def __init__(self, collate, shift):
        self.collate, self.shift = collate, shift

    def __call__(self, examples):
        batch = self.collate(examples)
        return dataclasses.replace(batch, task_id=self.shift(batch.task_id))


class OwnTaskIds(MultiTaskDataModule):
    shift = staticmethod(lambda task_id: task_id)

    def build_collator(self, eval_fields):
        return ShiftedTaskIds(super().build_collator(eval_fields), self.shift)


# (the ids a collator of one's own gives, the refusal): metrics go by task_name, RoutingStats by task_id
WRONG_TASK_IDS = {
    # RoutingStats counted the second task's routing as the first's, silently
    "the first task's id on every row": (torch.zeros_like, r"task_id\[0\] \(EvaluationBatch\.task_id\) is 0, but its "
                                                           r"task_name is 'add_2digit': it must be 1, that task's "
                                                           r"index in the data module's tasks \(parity, add_2digit\)"),
    # RoutingStats: IndexError (on CUDA a device-side assert)
    "-1 on every row": (lambda task_id: task_id * 0 - 1, r"task_id\[0\] \(EvaluationBatch\.task_id\) is -1, but its "
                                                         r"task_name is 'parity': it must be 0"),
}


@pytest.mark.parametrize("case", list(WRONG_TASK_IDS))
def test_an_evaluation_batch_whose_task_ids_disagree_with_its_task_names_is_refused(tiny_model_dir, tmp_path,
                                                                                      monkeypatch, case):
    """check_batch read shapes alone: the routing of a row whose id was another task's was counted as that task's."""
    shift, refusal = WRONG_TASK_IDS[case]
    monkeypatch.setattr(OwnTaskIds, "shift", staticmethod(shift))
    data = OwnTaskIds(**make_data(tiny_model_dir, tasks=["parity", "add_2digit"], eval_batch_size=4,
                                  max_eval_examples_per_task=2).hparams)
    with pytest.raises(ValueError, match=refusal):
        make_trainer(tmp_path, limit_val_batches=None).validate(make_module(tiny_model_dir, max_new_tokens=1), data)


def test_the_task_id_check_leaves_lightning_nothing_to_warn_about(tiny_model_dir, tmp_path, monkeypatch):
    """The check was the model's `on_before_batch_transfer`: Lightning warned on every run with a data module (the
    default job's log included) that the model's implementation would be used, and where a data module overrides
    the hook Lightning calls only that one, so the check must be the data module's."""
    import warnings

    from lightning.pytorch.trainer.connectors import data_connector

    monkeypatch.setattr(data_connector, "warning_cache", type(data_connector.warning_cache)())  # warned once before
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_trainer(tmp_path, limit_val_batches=None).validate(make_module(tiny_model_dir, max_new_tokens=1),
                                                                make_data(tiny_model_dir, tasks=["parity"],
                                                                          max_eval_examples_per_task=2))
    assert [str(warning.message) for warning in caught if "on_before_batch_transfer" in str(warning.message)] == []


def test_a_training_batch_without_a_task_name_is_refused_naming_the_row(collated):
    """None is a predict prompt's task (no task): a training row without one failed sorting the per-task losses."""
    module, training, _ = collated
    with pytest.raises(TypeError, match=r"task_name\[1\] \(TrainingBatch\.task_name\) is None: each row's task name "
                                        r"must be a str"):
        module.training_step(dataclasses.replace(training, task_name=[training.task_name[0], None]), 0)


def test_a_batch_without_an_attention_mask_or_with_a_tuple_of_task_names_keeps_the_contract(collated):
    """attention_mask may be None (attend to every token, as transformers reads it) and task_name a tuple, as
    check_batch's contract says: neither is refused, and each gives the loss of the batch it stands for."""
    module, training, _ = collated
    with torch.no_grad():
        unmasked = module.compute_lm_loss(dataclasses.replace(training, attention_mask=None))
        all_ones = module.compute_lm_loss(dataclasses.replace(training,
                                                              attention_mask=torch.ones_like(training.attention_mask)))
        as_tuple = module.compute_lm_loss(dataclasses.replace(training, task_name=tuple(training.task_name)))
        as_list = module.compute_lm_loss(training)
    assert torch.equal(unmasked.loss, all_ones.loss) and torch.equal(as_tuple.loss, as_list.loss)
    assert as_tuple.per_task.keys() == as_list.per_task.keys() == set(training.task_name)


class NarrowerLabels(MultiTaskDataModule):
    """A collator of one's own that cuts two columns from the labels after the library's collator ran."""

    def build_collator(self, eval_fields):
        collator = super().build_collator(eval_fields)
        return lambda examples: narrower_labels(collator(examples))


def test_a_fit_with_a_collator_of_ones_own_that_misaligns_the_labels_stops_naming_them(tiny_model_dir, tmp_path):
    """It trained, its losses read against other tokens than the labels were made for."""
    data = NarrowerLabels(**make_data(tiny_model_dir, tasks=["add_2digit"]).hparams)
    with pytest.raises(ValueError, match=r"the batch's labels \(TrainingBatch\.labels\) has shape \[4, \d+\]: it "
                                         r"must have input_ids' shape \[4, \d+\], label t for token t"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(tiny_model_dir), data)


@dataclasses.dataclass
class OwnEvaluationBatch:
    """An evaluation batch class of one's own (not an EvaluationBatch), from before `EvaluationBatch.rows`."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    task_id: torch.Tensor
    task_name: list
    prompts: list
    targets: list
    prompt_input_ids: torch.Tensor
    prompt_attention_mask: torch.Tensor
    counted: torch.Tensor
    choices: None = None


def test_a_batch_class_of_ones_own_without_rows_predicts(collated):
    """`rows` is optional, as `pairs` is: predict_step read `batch.rows` and failed with an AttributeError, and
    `batch_rows` (a batch mixing generation lengths) passed rows= to the class, which has no such field."""
    module, _, evaluation = collated
    own = OwnEvaluationBatch(**{field.name: getattr(evaluation, field.name)
                                for field in dataclasses.fields(OwnEvaluationBatch)})
    with torch.no_grad():
        expected = module.predict_step(evaluation, 0)
        answers = module.predict_step(own, 0)
    assert [answer.row for answer in answers] == [None, None]
    assert [answer.prediction for answer in answers] == [answer.prediction for answer in expected]
    second = batch_rows(own, [1])
    assert type(second) is OwnEvaluationBatch and second.prompts == evaluation.prompts[1:]
