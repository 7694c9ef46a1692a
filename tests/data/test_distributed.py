"""Two CPU processes (gloo): Lightning keeps the task sampler (no second DistributedSampler wrapped around it), so the
ranks train on disjoint halves of the same epoch."""

import json

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer

from malora_lightning.data import MultiTaskDataModule
from tests.helpers import SpawnDDPStrategy, tiny_tokenizer


class RankRecorder(LightningModule):
    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []

    def training_step(self, batch, batch_idx):
        for ids, mask in zip(batch.input_ids, batch.attention_mask):
            self.seen.append(ids[mask.bool()].tolist())
        return (self.weight - 1.0).pow(2).sum()

    def on_train_end(self) -> None:
        with open(f"{self.out_dir}/rank{self.global_rank}.json", "w") as handle:
            json.dump({"seen": self.seen, "sampler": type(self.trainer.train_dataloader.sampler).__name__}, handle)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def make_data() -> MultiTaskDataModule:
    data = MultiTaskDataModule(tasks=["add_2digit", "parity"], max_length=64, batch_size=3, sampling="proportional",
                               max_train_examples_per_task=6, max_eval_examples_per_task=1)
    data.tokenizer_object = tiny_tokenizer()
    return data


@pytest.mark.slow
def test_two_ranks_train_on_disjoint_halves_of_the_epoch(tmp_path):
    trainer = Trainer(strategy=SpawnDDPStrategy(), accelerator="cpu", devices=2, max_epochs=1, logger=False,
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
