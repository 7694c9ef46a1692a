"""Two CPU processes (gloo): DDP training with per-task metrics synchronised across ranks, FSDP2 sharding, and FSDP2
validation on shards of uneven size."""

import hashlib
import json
import math
import socket
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import pytest
import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.demos.boring_classes import BoringModel
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from malora_lightning.adapters.io import peft_key, routed_up_projections
from malora_lightning.adapters import adapter_state_dict
from malora_lightning.callbacks import PerTaskMetrics, RoutingStats, SeesawTracker
from malora_lightning.module import MALoRAModule
from tests.helpers import HostWaits, TwoProcessDDPStrategy, TwoProcessFSDP2Strategy, counting_collectives, run_ranks
from tests.ranks import step_task_losses
from tests.test_module import TASKS, RecordingLMLoss, _StepLogger, make_data, make_module, make_trainer, short_names

pytestmark = pytest.mark.slow


class DumpRankState(Callback):
    """Each rank writes what it ended with: its final evaluation, a fingerprint of its adapter tensors and the
    warnings it was given from its setup on."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.recording: warnings.catch_warnings | None = None  # made in the rank's process: it cannot be pickled
        self.warnings: list[warnings.WarningMessage] = []

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.recording = warnings.catch_warnings(record=True)
        self.warnings = self.recording.__enter__()
        warnings.simplefilter("always")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.recording.__exit__(None, None, None)

    def on_fit_end(self, trainer, pl_module) -> None:
        torch.distributed.barrier()  # on_fit_end runs after the strategy's teardown: the group must still be there
        metrics = next(c for c in trainer.callbacks if isinstance(c, PerTaskMetrics))
        final = metrics.evaluations("val")[-1]
        digest = hashlib.sha256()
        for key, value in sorted(adapter_state_dict(pl_module.model).items()):
            tensor = value.full_tensor() if hasattr(value, "full_tensor") else value
            digest.update(key.encode() + tensor.detach().cpu().numpy().tobytes())
        state = {"tasks": {name: vars(score) for name, score in final.tasks.items()}, "adapters": digest.hexdigest(),
                 "warnings": [str(warning.message) for warning in self.warnings]}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(state, handle)


class CountedStep(RecordingLMLoss):
    """Counts, by global step, the collectives (by name) and the host reads ("host_reads") the package's code made
    in the optimizer step's training steps and in the check after its backward (`check_step_losses`)."""

    def training_step(self, batch, batch_idx):
        return self._counted(super().training_step, batch, batch_idx)

    def check_step_losses(self) -> None:
        self._counted(super().check_step_losses)

    def _counted(self, method, *args):
        with counting_collectives() as collectives, HostWaits() as waits:
            result = method(*args)
        self.step_counts = getattr(self, "step_counts", {})
        counts = self.step_counts.setdefault(self.global_step, Counter())
        counts.update(collectives)
        counts["host_reads"] += sum(waits.in_package().values())
        return result


class DumpTrainLoss(Callback):
    """Each rank writes, per step, the losses its training_step computed (overall, and per task with its target
    tokens), those it logged, and its collectives and host reads (`CountedStep`)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.steps: list[dict] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        latest = pl_module.latest
        logged = trainer.callback_metrics
        self.steps.append({
            "own": outputs["loss"].item(), "logged": logged["train/loss"].item(),
            "own_tasks": {name: [value.item(), latest.per_task_tokens[name].item()]
                          for name, value in latest.per_task.items()},
            "logged_tasks": {name: float(logged[f"train/{name}/lm_loss"]) for name in TASKS
                             if f"train/{name}/lm_loss" in logged},
            "counts": pl_module.step_counts[trainer.global_step - 1]})  # the step this batch ended

    def on_train_end(self, trainer, pl_module) -> None:
        with open(f"{self.out_dir}/loss{trainer.global_rank}.json", "w") as handle:
            json.dump(self.steps, handle)


def test_ddp_two_processes_share_weights_and_metrics(tiny_model_dir, tmp_path):
    callbacks = [PerTaskMetrics(), SeesawTracker(plots=False), RoutingStats(plots=False), DumpRankState(str(tmp_path)),
                 DumpTrainLoss(str(tmp_path))]
    trainer = make_trainer(tmp_path, strategy=TwoProcessDDPStrategy(), devices=2, max_steps=3, limit_val_batches=None,
                           val_check_interval=3, callbacks=callbacks)
    module = CountedStep(**make_module(tiny_model_dir).hparams)
    trainer.fit(module, make_data(tiny_model_dir, max_eval_examples_per_task=7))
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["adapters"] == ranks[1]["adapters"]  # DDP kept the replicas identical
    assert ranks[0]["tasks"] == ranks[1]["tasks"]  # metrics were synchronised, not per-rank
    assert set(ranks[0]["tasks"]) == set(TASKS)
    # the ranks scored 4 and 3 of the 7 examples per task: synchronised, every example counts exactly once
    assert all(score["count"] == 7 for score in ranks[0]["tasks"].values())
    # the callbacks log values synchronised already: Lightning warned of every one (about 20 in a 2-process run)
    # that it was "recommended to use `self.log('val/parity/loss', ..., sync_dist=True)`"
    assert [message for rank in ranks for message in rank["warnings"] if "sync_dist=True" in message] == []
    # train/loss is the step's (the mean of the ranks' losses, as their gradients are averaged), on every rank: each
    # logged its own before, and the progress bar and a ModelCheckpoint(monitor="train/loss") read rank zero's
    losses = [json.loads((tmp_path / f"loss{rank}.json").read_text()) for rank in (0, 1)]
    assert len(losses[0]) == 3 and losses[0][0]["own"] != losses[1][0]["own"]
    for first, second in zip(*losses):
        assert first["logged"] == second["logged"] == pytest.approx((first["own"] + second["own"]) / 2, rel=1e-6)
    # train/<task>/lm_loss is the task's over both ranks' batches, weighted by target tokens, on every rank: each
    # logged its own before (rank zero's was written), and a task drawn on rank one only was missing from the step
    tasks_on_one_rank_only = 0
    for first, second in zip(*losses):
        drawn = set(first["own_tasks"]) | set(second["own_tasks"])
        tasks_on_one_rank_only += len(set(first["own_tasks"]) ^ set(second["own_tasks"]))
        assert set(first["logged_tasks"]) == set(second["logged_tasks"]) >= drawn
        for name in drawn:
            parts = [rank["own_tasks"][name] for rank in (first, second) if name in rank["own_tasks"]]
            expected = sum(loss * tokens for loss, tokens in parts) / sum(tokens for _, tokens in parts)
            assert first["logged_tasks"][name] == second["logged_tasks"][name] == pytest.approx(expected, rel=1e-6)
    assert tasks_on_one_rank_only > 0  # the case the gathering is for happened
    # one all_reduce and one read on the host per step, however many tasks its batches hold: the strategy's reduce (a
    # barrier and an all_reduce), an object gather (two all_gathers) and a host read per task part and rank before
    assert [step["counts"] for rank in losses for step in rank] == [{"all_reduce": 1, "host_reads": 1}] * 6


# what each rank's loggers were given at each step by the code before the check and the logging moved after the
# backward (91562c5: the step's sums reduced and read at its last batch, before the backward), in the fit of
# `test_ddp_logs_each_step_as_before_after_one_all_reduce`: "loss" is train/loss, "parity" train/parity/lm_loss
LOGGED_BEFORE = {
    0: {"loss": 6.021585, "lm_loss": 6.011515, "aux_loss": 0.01007026, "load_balance": 1.007026, "add_2digit": 5.904030,
        "double_number": 5.585454, "parity": 6.158874, "reverse_words": 6.129268, "sort_words": 6.045362, "epoch": 0},
    1: {"loss": 5.964024, "lm_loss": 5.953839, "aux_loss": 0.01018419, "load_balance": 1.018419, "add_2digit": math.nan,
        "double_number": math.nan, "parity": math.nan, "reverse_words": 6.228752, "sort_words": math.nan,
        "last_word": 6.164856, "unlisted_add_2digit": 5.164340, "unlisted_last_word": 5.956049, "epoch": 0},
    2: {"loss": 5.919280, "lm_loss": 5.909025, "aux_loss": 0.01025473, "load_balance": 1.025473, "add_2digit": 4.818387,
        "double_number": 5.342745, "parity": 5.277742, "reverse_words": 6.076638, "sort_words": 6.333110,
        "last_word": 5.815937, "unlisted_add_2digit": math.nan, "unlisted_last_word": math.nan, "epoch": 1},
    3: {"loss": 6.176486, "lm_loss": 6.166244, "aux_loss": 0.01024162, "load_balance": 1.024162, "add_2digit": math.nan,
        "double_number": 6.262473, "parity": math.nan, "reverse_words": math.nan, "sort_words": 6.069675,
        "last_word": 6.071914, "unlisted_add_2digit": math.nan, "unlisted_last_word": math.nan, "epoch": 1},
}


class UnlistedOnRankOne(CountedStep):
    """Rank one's tasks at global step 1 are ones the data module does not list: the step's task losses fall back
    to the object gather."""

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        if self.global_step == 1 and self.global_rank == 1:
            result.per_task = {f"unlisted_{name}": value for name, value in result.per_task.items()}
            result.per_task_tokens = {f"unlisted_{name}": value for name, value in result.per_task_tokens.items()}
        return result


class DumpStepLogs(Callback):
    """Each rank writes what its `_StepLogger` was given at each step, and its module's counts (`CountedStep`)."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer, pl_module) -> None:
        logger = next(logger for logger in trainer.loggers if isinstance(logger, _StepLogger))
        with open(f"{self.out_dir}/logs{trainer.global_rank}.json", "w") as handle:
            json.dump({"steps": logger.steps, "counts": pl_module.step_counts}, handle)


def test_ddp_logs_each_step_as_before_after_one_all_reduce(tiny_model_dir, tmp_path):
    """Each optimizer step's losses, task sums and non-finite count go in one all_reduce, started at the step's last
    batch and read once after its backward (`check_step_losses`), which logs them: the step's sums, reduced and read
    before the backward, and the non-finite count, reduced and read after it, took two collectives and two waits.
    What the loggers are given is what they were given before, at the same steps, on both ranks: with gradient
    accumulation, epochs of 3 batches (the last step of each has one), tasks absent from a step (NaN, once per epoch)
    and a step whose task losses the object gather sums."""
    torch.manual_seed(0)
    logger = _StepLogger()
    trainer = make_trainer(tmp_path, strategy=TwoProcessDDPStrategy(), devices=2, max_steps=-1, max_epochs=2,
                           limit_train_batches=3, accumulate_grad_batches=2, logger=logger, log_every_n_steps=1,
                           callbacks=[DumpStepLogs(str(tmp_path))])
    module = UnlistedOnRankOne(**make_module(tiny_model_dir).hparams)
    trainer.fit(module, make_data(tiny_model_dir, batch_size=2, max_train_examples_per_task=8,
                                  tasks=TASKS + ["double_number", "last_word", "sort_words"]))
    ranks = [json.loads((tmp_path / f"logs{rank}.json").read_text()) for rank in (0, 1)]
    assert json.dumps(ranks[0]["steps"]) == json.dumps(ranks[1]["steps"])  # as written, NaNs included
    logged = short_names(ranks[0]["steps"])
    assert logged.keys() == LOGGED_BEFORE.keys()
    for step, values in logged.items():
        # bit for bit here; pinned to 7 digits, and 1e-4 leaves room for float summation order (another BLAS, thread
        # count or torch version), far below what a step's batches or ranks averaged otherwise would move
        assert values == pytest.approx(LOGGED_BEFORE[step], rel=1e-4, nan_ok=True), step
    for rank in ranks:
        counts = {int(step): count for step, count in rank["counts"].items()}
        assert {step: count["all_reduce"] for step, count in counts.items()} == {0: 1, 1: 1, 2: 1, 3: 1}
        assert counts[1]["all_gather"] == 2  # the object gather: two all_gathers
        assert [counts[step] for step in (0, 2, 3)] == [{"all_reduce": 1, "host_reads": 1}] * 3


class PoisonOnRankOne(MALoRAModule):
    """Rank one's loss at step 1 is NaN; each rank writes the error it stopped with (both, before either raises)."""

    def compute_lm_loss(self, batch):
        result = super().compute_lm_loss(batch)
        if self.global_step == 1 and self.global_rank == 1:
            result.loss = result.loss * float("nan")
        return result

    def check_step_losses(self) -> None:
        try:
            super().check_step_losses()
        except FloatingPointError as error:
            Path(self.trainer.default_root_dir, f"error{self.global_rank}.txt").write_text(str(error))
            torch.distributed.barrier()
            raise


@pytest.mark.parametrize("accumulate", [1, 2])
def test_a_non_finite_loss_on_one_rank_stops_every_rank_before_the_update(tiny_model_dir, tmp_path, accumulate):
    """The check runs after the backward, which averages the ranks' gradients: a NaN loss on rank one made NaN
    gradients on rank zero too, so rank zero, whose own loss was finite, must not step either. With gradient
    accumulation the non-finite count of the step's batches goes in the all_reduce of the step's losses."""
    trainer = make_trainer(tmp_path, strategy=TwoProcessDDPStrategy(), devices=2, max_steps=3,
                           accumulate_grad_batches=accumulate)
    module = PoisonOnRankOne(**make_module(tiny_model_dir).hparams)
    with pytest.raises(Exception, match="non-finite training loss at global step 1"):
        trainer.fit(module, make_data(tiny_model_dir))
    assert (tmp_path / "error0.txt").read_text().startswith(
        "non-finite training loss at global step 1 (epoch 0) on another rank; training stopped before this update")
    assert (tmp_path / "error1.txt").read_text().startswith(
        f"non-finite training loss at global step 1 (epoch 0, batch {accumulate}): lm_loss=nan")


def test_fsdp2_on_cpu_shards_trains_and_exports_full_adapters(tiny_model_dir, tmp_path):
    trainer = make_trainer(tmp_path, strategy=TwoProcessFSDP2Strategy(), devices=2, max_steps=3,
                           enable_checkpointing=True)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))

    exported = load_file(str(tmp_path / "checkpoints" / "adapter" / "adapter_model.safetensors"))
    reference = make_module(tiny_model_dir)
    reference.configure_model()
    adapters = adapter_state_dict(reference.model)
    up = routed_up_projections(reference.model)  # stored B_t [m, r], as PEFT stores B
    expected = {peft_key(key): tensor.transpose(1, 2) if key in up else tensor  # the export uses PEFT's names
                for key, tensor in adapters.items()}
    assert set(exported) == set(expected)
    for key, tensor in exported.items():
        assert tensor.shape == expected[key].shape, key  # gathered, not a shard
    assert any(key.endswith("lora_B.weight") and tensor.abs().sum() > 0 for key, tensor in exported.items())

    checkpoint = tmp_path / "checkpoints" / "epoch=0-step=3.ckpt"
    stored = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model_keys = {key.removeprefix("state_dict.") for key in stored if key.startswith("state_dict.")}
    assert model_keys == {f"model.{key}" for key in adapters}  # adapters only, no base weights


def test_fsdp2_as_the_recipe_sets_it_up_resumes_from_its_adapter_only_checkpoint(tiny_model_dir, tmp_path):
    """Lightning's sharded checkpoints (ModelParallelStrategy's default) ask for every tensor of the model when
    loaded, the frozen base included: a resume failed with "Missing key in checkpoint state_dict". The recipe writes
    checkpoint files, gathered on rank 0, which resume (with the recipe setting's bf16 base and gradient clipping).

    Run as a script, through the launcher Lightning gives `ModelParallelStrategy` (it relaunches the command), as a
    recipe's run starts."""
    script = Path(__file__).parent / "scripts" / "fsdp2_resume.py"
    result = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(tmp_path)], capture_output=True,
                            text=True, timeout=300, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(tmp_path / "fit" / "checkpoints" / "epoch=0-step=3.ckpt", weights_only=True)
    reference = make_module(tiny_model_dir)
    reference.configure_model()
    assert set(checkpoint["state_dict"]) == {f"model.{key}" for key in adapter_state_dict(reference.model)}
    assert json.loads((tmp_path / "resume.json").read_text()) == {"global_step": 5}


class OwnInit(MALoRAModule):
    """Draws from a random state of this rank's own (as processes without a common seed_everything do), and saves
    the adapters it initialised before anything else touches them."""

    def __init__(self, out_dir: str, **settings) -> None:
        super().__init__(**settings)
        self.out_dir = out_dir

    def build_model(self):
        torch.manual_seed(1000 + self.global_rank)
        model = super().build_model()
        tensors = {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}
        torch.save(tensors, f"{self.out_dir}/own{self.global_rank}.pt")
        return model


class SaveWhole(Callback):
    """Rank zero saves the whole (gathered) adapters the first step trains from."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir

    def on_train_start(self, trainer, pl_module) -> None:
        adapters = adapter_state_dict(pl_module.model)
        whole = {key: value.full_tensor().detach().clone() for key, value in adapters.items()}
        if trainer.is_global_zero:
            torch.save(whole, f"{self.out_dir}/whole.pt")


def test_fsdp2_trains_rank_zeros_initial_adapters_whatever_each_ranks_random_state(tiny_model_dir, tmp_path):
    """FSDP2 keeps each rank's shard of that rank's own tensors and, unlike DDP, broadcasts nothing: ranks without a
    common seed trained adapters stitched from two random inits, whose S_A rows were no longer orthonormal (paper
    Eq. 8: S_A = beta V_0; max |S_A S_A^T / beta^2 - I| was 0.36 instead of 3e-8). Now every rank starts from rank
    zero's."""
    trainer = make_trainer(tmp_path, strategy=TwoProcessFSDP2Strategy(), devices=2, max_steps=1,
                           callbacks=[SaveWhole(str(tmp_path))])
    trainer.fit(OwnInit(str(tmp_path), **make_module(tiny_model_dir).hparams), make_data(tiny_model_dir))
    own = [torch.load(tmp_path / f"own{rank}.pt", weights_only=True) for rank in (0, 1)]
    whole = torch.load(tmp_path / "whole.pt", weights_only=True)
    assert any(not torch.equal(own[0][key], own[1][key]) for key in own[0])  # the ranks did initialise differently
    assert set(whole) == set(own[0])
    for key, tensor in whole.items():
        assert torch.equal(tensor, own[0][key]), key
        if key.endswith("shared_A"):
            gram = tensor.double() @ tensor.double().T
            beta_squared = gram.diagonal().mean()
            assert torch.allclose(gram / beta_squared, torch.eye(gram.shape[0], dtype=torch.float64), atol=1e-6), key


def test_a_tensor_parallel_mesh_is_refused_naming_the_setting(tiny_model_dir, tmp_path):
    """With Lightning's default sizes ("auto": on one node, data_parallel_size 1 and tensor_parallel_size the number
    of devices) the mesh is (data_parallel=1, tensor_parallel=2): FSDP2 sharded over one rank, so nothing
    synchronised the gradients, each rank trained on its own batches, and the two ranks ended 3 steps with different
    adapters (rank zero's checkpointed) without a word."""
    strategy = TwoProcessFSDP2Strategy(data_parallel_size="auto", tensor_parallel_size="auto")
    trainer = make_trainer(tmp_path, strategy=strategy, devices=2, max_steps=1)
    with pytest.raises(Exception, match=r"tensor_parallel_size=2 .* Set data_parallel_size to the number of devices "
                                        r"and tensor_parallel_size=1"):
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))


class DumpRankValidation(Callback):
    """Each rank writes how many validation batches it ran and the evaluation it ended with."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir = out_dir
        self.batches = 0

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        self.batches += 1

    def on_validation_end(self, trainer, pl_module) -> None:
        final = PerTaskMetrics.attached(trainer).evaluations("val")[-1]
        state = {"batches": self.batches, "tasks": {name: vars(score) for name, score in final.tasks.items()}}
        with open(f"{self.out_dir}/rank{trainer.global_rank}.json", "w") as handle:
            json.dump(state, handle)


def test_fsdp2_validates_uneven_shards_and_scores_every_example_once(tiny_model_dir, tmp_path):
    """5 examples per task in batches of 2 on 2 ranks: exact shards (3 and 2 examples) gave rank 0 a batch more, whose
    forward all-gathers parameters that rank 1 never sent (a deadlock). Rank 1 now evaluates a padding example as
    well, which counts nowhere: each task's 5 examples are scored once, as by one process."""
    def data():
        return make_data(tiny_model_dir, max_eval_examples_per_task=5, eval_batch_size=2)

    trainer = make_trainer(tmp_path / "two", strategy=TwoProcessFSDP2Strategy(), devices=2, limit_val_batches=None,
                           callbacks=[PerTaskMetrics(), DumpRankValidation(str(tmp_path))])
    trainer.validate(make_module(tiny_model_dir), data(), verbose=False)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["batches"] for rank in ranks] == [2 * len(TASKS)] * 2
    assert ranks[0]["tasks"] == ranks[1]["tasks"]
    assert {name: score["count"] for name, score in ranks[0]["tasks"].items()} == {name: 5 for name in TASKS}

    single = PerTaskMetrics()
    make_trainer(tmp_path / "one", limit_val_batches=None, callbacks=[single]).validate(
        make_module(tiny_model_dir), data(), verbose=False)
    for name, score in single.evaluations("val")[-1].tasks.items():
        assert ranks[0]["tasks"][name]["loss"] == pytest.approx(score.loss, rel=1e-5), name
        assert ranks[0]["tasks"][name]["accuracy"] == score.accuracy, name


def test_each_two_process_run_takes_a_port_of_its_own(monkeypatch):
    """Lightning's multiprocessing launcher leaves the port it chose in this process's MASTER_PORT, so every later
    run of the session (and the scripts it starts, which inherit it) listened on that one port: once anything else
    held it (a concurrent job's socket), each of them failed with EADDRINUSE."""
    def fit() -> L.Trainer:
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy=TwoProcessDDPStrategy(), max_steps=1, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(BoringModel())
        return trainer

    monkeypatch.delenv("MASTER_PORT", raising=False)  # a port set for the session is every run's, as it should be
    port = fit().strategy.cluster_environment.main_port
    with socket.socket() as holder:  # another job's socket on the first run's port
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the first run's connections may be in TIME_WAIT
        holder.bind(("127.0.0.1", port))
        holder.listen()
        assert fit().strategy.cluster_environment.main_port != port


def test_the_step_task_losses_of_listed_and_unlisted_tasks_are_summed_over_the_ranks():
    """Every task the data module lists is summed in one all_reduce; the object gather remains for tasks it does not
    list (dataloaders given to the trainer, a `compute_lm_loss` of one's own), with the same figures."""
    run_ranks(step_task_losses.run)
