"""A resumed ``lightning.Trainer`` fit must train on exactly the examples the uninterrupted fit trained on next.

Lightning fetches a batch ahead and DataLoader workers prefetch more, so a sampler that saved "what it has yielded"
would skip batches on resume; these tests run real fits and compare the examples seen.
"""

import re
import warnings

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import WeightedRandomSampler

from malora_lightning.data import MultiTaskDataModule
from malora_lightning.data.sampling import TaskBalancedSampler
from tests.helpers import tiny_tokenizer

BATCH = 4
BATCHES_PER_EPOCH = 6  # 3 tasks x 8 examples, uniform mixing


class Recorder(LightningModule):
    """Trains nothing useful; records every example that reaches training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[tuple[int, ...]] = []

    def training_step(self, batch, batch_idx):
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            self.seen.append(tuple(ids[mask.bool()].tolist()))
        return (self.weight - 1.0).pow(2).sum()

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def datamodule(num_workers: int, tasks=("add_2digit", "reverse_words", "parity")) -> MultiTaskDataModule:
    data = MultiTaskDataModule(tasks=list(tasks), max_length=64, batch_size=BATCH,
                               sampling="uniform", max_train_examples_per_task=8, max_eval_examples_per_task=2,
                               num_workers=num_workers, seed=11)
    data.tokenizer_object = tiny_tokenizer()
    return data


def fit(num_workers: int, checkpoint_dir=None, ckpt_path=None, on_validation: bool = False,
        tasks=("add_2digit", "reverse_words", "parity")) -> list[tuple[int, ...]]:
    """Two epochs; with ``checkpoint_dir``, a checkpoint every 3 steps, taken after the training batch or, with
    ``on_validation``, after a validation run every 3 batches."""
    callbacks = []
    if checkpoint_dir is not None:
        every = {"save_on_train_epoch_end": False} if on_validation else {"every_n_train_steps": 3}
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", save_top_k=-1, **every))
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, val_check_interval=3,
                      limit_val_batches=1 if on_validation else 0, enable_checkpointing=bool(callbacks),
                      callbacks=callbacks)
    module = Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
        trainer.fit(module, datamodule=datamodule(num_workers, tasks), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize(("num_workers", "on_validation"), [(0, False), (2, False), (0, True)])
def test_resumed_fit_sees_exactly_what_the_uninterrupted_fit_saw(tmp_path, num_workers, on_validation):
    uninterrupted = fit(num_workers, checkpoint_dir=tmp_path, on_validation=on_validation)
    assert len(uninterrupted) == 2 * BATCHES_PER_EPOCH * BATCH
    assert uninterrupted[:24] != uninterrupted[24:]  # the second epoch is reshuffled
    # step 3: mid first epoch; step 6: end of the first epoch; step 9: mid second epoch
    for step in (3, 6, 9):
        resumed = fit(num_workers, ckpt_path=tmp_path / f"step={step}.ckpt", on_validation=on_validation)
        assert resumed == uninterrupted[step * BATCH:], f"resume from step {step}"


def fit_by_epochs(num_workers: int, checkpoint_dir=None, ckpt_path=None) -> list[tuple[int, ...]]:
    """Two epochs under ``max_epochs``; with ``checkpoint_dir``, a checkpoint at each training epoch's end."""
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", save_top_k=-1,
                                         save_on_train_epoch_end=True))
    trainer = Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      enable_checkpointing=bool(callbacks), callbacks=callbacks)
    module = Recorder()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*(does not have many workers|num_workers).*")
        trainer.fit(module, datamodule=datamodule(num_workers), ckpt_path=ckpt_path)
    return module.seen


@pytest.mark.parametrize("num_workers", [0, 2])
def test_a_fit_resumed_from_an_epoch_end_checkpoint_trains_the_next_epochs_draws(tmp_path, num_workers):
    """Lightning 2.6 starts the training loader's iterator before it sets the sampler's epoch, and keeps that
    iterator for the first epoch of a fit resumed from a checkpoint written after an epoch's end. DataLoader workers
    fetch ahead as the iterator starts, so with workers the resumed epoch 1 trained on epoch 0's draws again
    (Lightning-AI/pytorch-lightning#21938); without, the sampler is read only after its epoch is set."""
    uninterrupted = fit_by_epochs(num_workers, checkpoint_dir=tmp_path)
    assert uninterrupted[:24] != uninterrupted[24:]  # the second epoch is reshuffled
    resumed = fit_by_epochs(num_workers, ckpt_path=tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt")
    assert resumed == uninterrupted[BATCHES_PER_EPOCH * BATCH:]


def fit_by_steps(checkpoint_dir=None, ckpt_path=None, validation: bool = False):
    """12 steps (two epochs) under ``max_steps``; with ``checkpoint_dir``, a checkpoint at each training epoch's end
    (``on_train_epoch_end``), taken after that epoch's validation when there is one."""
    callbacks = []
    if checkpoint_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}", save_top_k=-1,
                                         save_on_train_epoch_end=True))
    trainer = Trainer(max_steps=2 * BATCHES_PER_EPOCH, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=1 if validation else 0, enable_checkpointing=bool(callbacks),
                      callbacks=callbacks)
    module = Recorder()
    trainer.fit(module, datamodule=datamodule(0), ckpt_path=ckpt_path)
    return module.seen, trainer


@pytest.mark.parametrize("validation", [False, True])
def test_a_max_steps_fit_resumed_from_an_epoch_end_checkpoint_sees_what_the_uninterrupted_fit_saw(tmp_path,
                                                                                                   validation):
    """Lightning 2.6 restored a checkpoint written in on_train_epoch_end under max_steps as an epoch not yet done:
    without validation it trained one more batch (the next epoch's first draws), and either way it counted the
    epoch twice, so the sampler jumped to epoch 2 and skipped epoch 1's draws."""
    uninterrupted, full = fit_by_steps(checkpoint_dir=tmp_path, validation=validation)
    resumed, trainer = fit_by_steps(ckpt_path=tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt", validation=validation)
    assert resumed == uninterrupted[BATCHES_PER_EPOCH * BATCH:]
    assert trainer.global_step == full.global_step and trainer.current_epoch == full.current_epoch
    assert trainer.fit_loop.epoch_progress.total.completed == full.fit_loop.epoch_progress.total.completed


def test_an_epoch_end_resume_on_an_unchecked_lightning_version_says_its_batches_will_differ(tmp_path, monkeypatch):
    """The loop-state correction is checked against Lightning 2.6 only; elsewhere the resume names the checkpoint."""
    import malora_lightning.data.datamodule as datamodule_file

    fit_by_steps(checkpoint_dir=tmp_path)
    monkeypatch.setattr(datamodule_file, "_EPOCH_END_RESTORE_VERIFIED", (0, 0))
    with pytest.warns(UserWarning, match=rf"step={BATCHES_PER_EPOCH}\.ckpt was written at the end of training epoch 0"
                                         r".*may differ from the uninterrupted run's"):
        fit_by_steps(ckpt_path=tmp_path / f"step={BATCHES_PER_EPOCH}.ckpt")


class WeightedData(MultiTaskDataModule):
    """`build_sampler` returning an ordinary torch sampler, without TaskBalancedSampler's checkpoint protocol."""

    def build_sampler(self, sizes):
        weights = [3.0 if index < sizes[0] else 1.0 for index in range(sum(sizes))]
        return WeightedRandomSampler(weights, num_samples=sum(sizes), generator=torch.Generator().manual_seed(0))


def fit_weighted(max_steps: int, checkpoint_dir=None, ckpt_path=None) -> tuple[list[tuple[int, ...]], Trainer]:
    callbacks = [] if checkpoint_dir is None else [ModelCheckpoint(dirpath=checkpoint_dir, filename="{step}",
                                                                   save_top_k=-1, every_n_train_steps=3)]
    trainer = Trainer(max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      enable_checkpointing=bool(callbacks), callbacks=callbacks)
    data = WeightedData(tasks=["add_2digit", "reverse_words", "parity"], max_length=64, batch_size=BATCH,
                        max_train_examples_per_task=8, max_eval_examples_per_task=2, seed=11)
    data.tokenizer_object = tiny_tokenizer()
    module = Recorder()
    trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    return module.seen, trainer


def test_a_plain_torch_sampler_from_build_sampler_checkpoints_and_resumes_with_one_warning(tmp_path):
    """A WeightedRandomSampler crashed the first checkpoint save (after training) with "no attribute 'state_dict'"."""
    restarts = r"The training sampler WeightedRandomSampler has no state_dict\(consumed=...\).*restarts its order"
    with pytest.warns(UserWarning, match=restarts) as saved:
        first, _ = fit_weighted(6, checkpoint_dir=tmp_path)
    assert sum("WeightedRandomSampler" in str(warning.message) for warning in saved) == 1  # not one per save
    assert (tmp_path / "step=3.ckpt").is_file() and len(first) == 6 * BATCH
    with pytest.warns(UserWarning, match=restarts):
        resumed, trainer = fit_weighted(6, ckpt_path=tmp_path / "step=3.ckpt")
    assert trainer.global_step == 6
    assert resumed == first[:3 * BATCH]  # the sampler's order starts afresh, as the warning says


class RankData(MultiTaskDataModule):
    """Rank ``rank`` of a ``world``-process run, played in this one process: its sampler takes that rank's share of
    each epoch, as under DDP (no gradients are shared, which a test of which examples are trained does not need)."""

    def __init__(self, world: int, rank: int, batch_size: int) -> None:
        super().__init__(tasks=["add_2digit", "reverse_words", "parity"], max_length=64, batch_size=batch_size,
                         sampling="uniform", max_train_examples_per_task=8, max_eval_examples_per_task=2, seed=11)
        self.tokenizer_object = tiny_tokenizer()
        self.world, self.rank = world, rank

    def build_sampler(self, sizes):
        return TaskBalancedSampler(sizes, self._mixing_weights(sizes), seed=self.settings.seed,
                                   num_replicas=self.world, rank=self.rank)


class EpochRecorder(Recorder):
    """Also notes the epoch of every example that reaches training_step."""

    def __init__(self) -> None:
        super().__init__()
        self.epochs: list[int] = []

    def training_step(self, batch, batch_idx):
        self.epochs += [self.current_epoch] * len(batch.input_ids)
        return super().training_step(batch, batch_idx)


def fit_in_segments(tmp_path, segments: list[tuple[int, int, int | None]]) -> dict[int, list[tuple[int, ...]]]:
    """Two epochs trained in segments of (world size, batch size per rank, global step to stop at; None: to the end),
    each resumed from the checkpoint its predecessor's rank 0 wrote at its last step. Returns the examples trained in
    each epoch, over all segments and ranks."""
    trained: dict[int, list[tuple[int, ...]]] = {0: [], 1: []}
    checkpoint = None
    for number, (world, batch_size, stop) in enumerate(segments):
        for rank in range(world):
            callbacks = []
            if rank == 0 and stop is not None:
                callbacks.append(ModelCheckpoint(dirpath=tmp_path / str(number), filename="{step}", save_top_k=-1,
                                                 every_n_train_steps=1))
            trainer = Trainer(max_epochs=2, max_steps=-1 if stop is None else stop, accelerator="cpu", devices=1,
                              logger=False, enable_progress_bar=False, enable_model_summary=False,
                              num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=bool(callbacks),
                              callbacks=callbacks)
            module = EpochRecorder()
            trainer.fit(module, datamodule=RankData(world, rank, batch_size), ckpt_path=checkpoint)
            for epoch, example in zip(module.epochs, module.seen):
                trained[epoch].append(example)
        if stop is not None:
            checkpoint = tmp_path / str(number) / f"step={stop}.ckpt"
    return trained


@pytest.mark.parametrize("segments", [
    [(1, BATCH, 2), (2, BATCH, None)],  # 8 draws done: one batch of 2 x 4
    [(2, BATCH, 2), (1, BATCH, 3), (1, BATCH, None)],  # 16 draws done: four batches of 4; then 20
    [(1, BATCH, 3), (1, 2, 5), (1, BATCH, None)],  # batch size 4 -> 2 -> 4: 12 draws done, then 16
    [(2, BATCH, 3), (1, BATCH, None)],  # after the epoch's last batch
    [(2, BATCH, 3), (1, 5, None)],  # after it, into batches of 5: 24 draws make 5 batches, the last of 4
])
def test_a_fit_resumed_on_another_world_or_batch_size_trains_every_draw_of_each_epoch_once(tmp_path, segments):
    """Lightning restores the epoch's batch count in the saved run's batches and ends the epoch when it reaches this
    run's number of batches: 1 -> 2 processes cut the epoch short (draws skipped); after 2 -> 1 or another batch size
    the next checkpoint's position was counted in the wrong batches (draws trained twice on the next resume); and
    2 -> 1 after the epoch's last batch trained the next epoch's first half as the end of this one."""
    uninterrupted = fit_in_segments(tmp_path / "whole", [(1, BATCH, None)])
    with pytest.warns(UserWarning) as caught:
        resumed = fit_in_segments(tmp_path, segments)
    for epoch in (0, 1):
        assert sorted(resumed[epoch]) == sorted(uninterrupted[epoch]), f"epoch {epoch}"
    messages = [str(warning.message) for warning in caught]
    for (saved_world, saved_batch, _), (world, batch, _) in zip(segments, segments[1:]):
        change = (rf"counted in batches of {saved_batch} on {saved_world} process.*"
                  rf"this run has batches of {batch} on {world},")
        # once per resumed fit: each faked rank here is its process's rank zero
        expected = 0 if (saved_world, saved_batch) == (world, batch) else world
        assert sum(bool(re.search(change, message)) for message in messages) == expected, messages


@pytest.mark.parametrize(("first", "repeated", "message"), [
    ((1, BATCH, 3), slice(8, 12), r"draws 8 to 11 of epoch 0 \(4\) are trained again"),  # 12 draws done
    ((1, 3, 3), slice(8, 9), r"draw 8 of epoch 0 is trained again, since it falls inside that batch"),  # 9 done
], ids=["four draws", "one draw"])
def test_a_resume_inside_one_of_this_runs_batches_trains_that_batch_again_and_says_so(tmp_path, first, repeated,
                                                                                       message):
    """8 draws per batch on 2 processes: the epoch goes on from draw 8, as this run's batch 1."""
    uninterrupted = fit_in_segments(tmp_path / "whole", [(1, BATCH, None)])
    with pytest.warns(UserWarning, match=message):
        resumed = fit_in_segments(tmp_path, [first, (2, BATCH, None)])
    assert sorted(resumed[0]) == sorted(uninterrupted[0] + uninterrupted[0][repeated])
    assert sorted(resumed[1]) == sorted(uninterrupted[1])


def test_a_resume_with_as_many_examples_a_step_says_the_steps_cover_the_same_examples(tmp_path):
    """2 processes x 2 -> 1 x 4: the warning said a step now trains 4 examples "instead of 4", so that max_steps and
    the schedule cover other examples than the saved run's; they cover the same ones."""
    uninterrupted = fit_in_segments(tmp_path / "whole", [(1, 4, None)])
    with pytest.warns(UserWarning) as caught:
        resumed = fit_in_segments(tmp_path, [(2, 2, 2), (1, 4, None)])
    assert sorted(resumed[0]) == sorted(uninterrupted[0]) and sorted(resumed[1]) == sorted(uninterrupted[1])
    message = next(str(warning.message) for warning in caught if "counted in batches of 2" in str(warning.message))
    assert "A step still trains 4 examples, the same ones" in message and "instead of" not in message


def test_a_fit_resumed_on_other_tasks_of_the_same_sizes_says_so(tmp_path):
    """The sampler restores its position by task sizes and weights alone: another task with as many examples took
    the place of one of the saved run's without a word."""
    fit(0, checkpoint_dir=tmp_path)
    checkpoint = str(tmp_path / "step=3.ckpt")
    with warnings.catch_warnings(record=True) as same:
        warnings.simplefilter("always")
        fit(0, ckpt_path=checkpoint)
    assert not [warning for warning in same if "Resuming a fit that trained on tasks" in str(warning.message)]
    with pytest.warns(UserWarning, match=re.escape("Resuming a fit that trained on tasks ['add_2digit', "
                                                   "'reverse_words', 'parity'] with tasks ['add_2digit', "
                                                   "'sort_words', 'parity']: training goes on from that run's step")):
        fit(0, ckpt_path=checkpoint, tasks=("add_2digit", "sort_words", "parity"))
