"""Two CPU processes (gloo): Lightning keeps the task sampler (no second DistributedSampler wrapped around it), so the
ranks train on disjoint halves of the same epoch, also after a one-process checkpoint is resumed on two."""

import json
from collections import Counter

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from malora_lightning.data import MultiTaskDataModule
from tests.helpers import TwoProcessDDPStrategy, tiny_tokenizer


class RankRecorder(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.epochs: list[int] = []  # the epoch of each example in seen

    def training_step(self, batch, batch_idx):
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            self.seen.append(ids[mask.bool()].tolist())
            self.epochs.append(self.current_epoch)
        return (self.weight - 1.0).pow(2).sum()

    def on_train_end(self) -> None:
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as handle:
            json.dump({"seen": self.seen, "epochs": self.epochs,
                       "sampler": type(self.trainer.train_dataloader.sampler).__name__}, handle)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data(batch_size: int = 3) -> MultiTaskDataModule:
    data = MultiTaskDataModule(tasks=["add_2digit", "parity"], max_length=64, batch_size=batch_size,
                               sampling="proportional", max_train_examples_per_task=6, max_eval_examples_per_task=1)
    data.tokenizer_object = tiny_tokenizer()
    return data


@pytest.mark.slow
def test_two_ranks_train_on_disjoint_halves_of_the_epoch(tmp_path):
    trainer = Trainer(strategy=TwoProcessDDPStrategy(), accelerator="cpu", devices=2, max_epochs=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(RankRecorder(str(tmp_path)), datamodule=make_data())
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [rank["sampler"] for rank in ranks] == ["TaskBalancedSampler"] * 2
    seen = [[tuple(ids) for ids in rank["seen"]] for rank in ranks]
    assert len(seen[0]) == len(seen[1]) == 6  # 12 examples, proportional: each once, half per rank
    assert set(seen[0]).isdisjoint(seen[1])

    reference = make_data()
    reference.setup("fit")
    epoch = {tuple(ids) for batch in reference.train_dataloader() for ids, mask in
             zip(batch.input_ids.tolist(), batch.attention_mask.tolist()) for ids in [ids[: sum(mask)]]}
    assert set(seen[0]) | set(seen[1]) == epoch


def trained_by_epoch(out_dir, world: int) -> Counter:
    """(epoch, example) -> how often the ranks of a fit that wrote into ``out_dir`` trained it."""
    ranks = [json.loads((out_dir / f"rank{rank}.json").read_text()) for rank in range(world)]
    return Counter((epoch, tuple(ids)) for rank in ranks for epoch, ids in zip(rank["epochs"], rank["seen"]))


@pytest.mark.slow
def test_a_one_process_checkpoint_resumed_on_two_trains_the_rest_of_the_epoch_once(tmp_path):
    """Lightning restored the epoch's batch count in the one-process run's batches (1 draw each) and ended the epoch
    when it reached the two-process run's number of batches (of 2 draws): 4 of the epoch's 12 draws were skipped."""
    settings = dict(accelerator="cpu", max_epochs=2, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0)
    for name in ("whole", "first", "rest"):
        (tmp_path / name).mkdir()
    Trainer(devices=1, enable_checkpointing=False, **settings).fit(RankRecorder(str(tmp_path / "whole")),
                                                                   datamodule=make_data(batch_size=1))
    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4)
    Trainer(devices=1, max_steps=4, callbacks=[checkpoint], **settings).fit(RankRecorder(str(tmp_path / "first")),
                                                                            datamodule=make_data(batch_size=1))
    Trainer(strategy=TwoProcessDDPStrategy(), devices=2, enable_checkpointing=False, **settings).fit(
        RankRecorder(str(tmp_path / "rest")), datamodule=make_data(batch_size=1), ckpt_path=tmp_path / "step=4.ckpt")
    # 12 draws an epoch: 4 trained on one process, the other 8 in four batches on each of two
    whole = trained_by_epoch(tmp_path / "whole", 1)
    assert trained_by_epoch(tmp_path / "first", 1) + trained_by_epoch(tmp_path / "rest", 2) == whole
