"""One process and two (DDP, gloo) give the same per-task metrics and routing statistics.

With 4 evaluation examples per task each rank evaluates 2, one batch of 2. With 5, rank 1 evaluates 2 and a padding
example (`EvaluationShardSampler`), which must count neither in the metrics nor in the routing statistics.
"""

import json
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from malora_lightning.adapters import AdapterConfig
from malora_lightning.callbacks import PerTaskMetrics, RoutingStats
from malora_lightning.data.batches import EvaluationOutput
from malora_lightning.module import MALoRAModule
from tests.callbacks.test_per_task_metrics import HandBuiltPredictions, expected_metrics, trainer_for
from tests.helpers import TwoProcessDDPStrategy, counting_collectives
from tests.test_module import TASKS, make_data, make_trainer

pytestmark = pytest.mark.slow


class SeededAdapters(MALoRAModule):
    """Adapters (routers included) drawn from a fixed generator, so every process builds the same model."""

    def build_model(self) -> torch.nn.Module:
        model = super().build_model()
        generator = torch.Generator().manual_seed(1234)
        with torch.no_grad():
            for param in model.parameters():
                if param.requires_grad:
                    param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        return model


def validate(model_dir, root, devices: int, examples: int) -> tuple[dict[str, float], dict]:
    module = SeededAdapters(model_name_or_path=str(model_dir), quantization=None,
                            adapter=AdapterConfig(rank=2, shared_rank=4, num_experts=4, top_k=2, dropout=0.0))
    trainer = make_trainer(root, devices=devices, strategy=TwoProcessDDPStrategy() if devices > 1 else "auto",
                           limit_val_batches=None, callbacks=[PerTaskMetrics(), RoutingStats(plots=False)])
    data = make_data(model_dir, max_eval_examples_per_task=examples, eval_batch_size=2)
    trainer.validate(module, data, verbose=False)
    metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    return metrics, json.loads((root / "routing_validate.json").read_text())


@pytest.mark.parametrize("examples", [4, 5])
def test_metrics_and_routing_agree_between_one_and_two_processes(tiny_model_dir, tmp_path, examples):
    single, single_routing = validate(tiny_model_dir, tmp_path / "one", devices=1, examples=examples)
    double, double_routing = validate(tiny_model_dir, tmp_path / "two", devices=2, examples=examples)
    assert {f"val/{task}/loss" for task in TASKS} | {"val/macro_acc", "val/routing/load_cv"} <= set(single)
    assert double.keys() == single.keys()
    assert double == pytest.approx(single, rel=1e-5)
    assert double_routing["health"]["tokens"] == single_routing["health"]["tokens"] > 0
    for name, layer in single_routing["layers"].items():
        other = double_routing["layers"][name]
        assert other["task_load"] == layer["task_load"], name  # every token counted once, on one of the ranks
        assert other["entropy"] == pytest.approx(layer["entropy"], rel=1e-5), name


class WithAOneExampleTask(HandBuiltPredictions):
    """Adds a task "solo" of one example, whose copy on the second rank is padding that the step leaves out (as
    `counted_rows` does): that rank never scores the task, and without a data module makes no meters for it."""

    def val_dataloader(self) -> dict[str, DataLoader]:
        return {**super().val_dataloader(), "solo": DataLoader([{"index": 0, "task": "solo"}], batch_size=2)}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if batch["task"][0] != "solo":
            return super().validation_step(batch, batch_idx, dataloader_idx)
        scored = [7.0] if self.global_rank == 0 else []
        return EvaluationOutput(task_name=["solo"] * len(scored), loss=torch.tensor(scored), correct=None)


def test_hand_built_metrics_are_synchronised_across_two_processes(tmp_path):
    """Each rank synchronised the meters it had made, one by one: a task that one rank never scored paired the other
    tasks' meters across ranks (wrong figures), then the ranks hung."""
    trainer = trainer_for(tmp_path, strategy=TwoProcessDDPStrategy(), devices=2, callbacks=[PerTaskMetrics()])
    trainer.validate(WithAOneExampleTask(batch_size=2), verbose=False)
    logged = {key: value.item() for key, value in trainer.callback_metrics.items()}
    expected = expected_metrics() | {"val/solo/loss": 7.0, "val/macro_loss": (13.0 / 8 + 12.0 / 4 + 4.0 / 2 + 7.0) / 4}
    assert logged == pytest.approx(expected)


class ManyTasks(HandBuiltPredictions):
    """Adds `extra` tasks of two examples, losses 1 + i and 2 + i, the first answered right: one example per rank."""

    def __init__(self, extra: int) -> None:
        super().__init__(batch_size=2)
        self.extra = extra

    def val_dataloader(self) -> dict[str, DataLoader]:
        extra = {f"extra{i}": DataLoader([{"index": index, "task": f"extra{i}"} for index in range(2)], batch_size=2)
                 for i in range(self.extra)}
        return {**super().val_dataloader(), **extra}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        task = batch["task"][0]
        if not task.startswith("extra"):
            return super().validation_step(batch, batch_idx, dataloader_idx)
        indices = batch["index"]
        return EvaluationOutput(task_name=batch["task"], loss=indices.float() + 1 + int(task[5:]), correct=indices == 0)


class CountedPerTaskMetrics(PerTaskMetrics):
    """Counts each rank's collectives at a validation's end: `_finish`'s own, and those Lightning makes afterwards to
    log its figures; writes them, with the figures the rank holds, to `rank<r>.json` in `out_dir`."""

    def __init__(self, out_dir: str) -> None:
        super().__init__()
        self.out_dir = out_dir
        self.finish = 0
        self.logging = None

    def _finish(self, trainer, pl_module, stage: str) -> None:
        with counting_collectives() as counts:
            super()._finish(trainer, pl_module, stage)
        self.finish = sum(counts.values())
        self.logging = counting_collectives()
        self.logged = self.logging.__enter__()

    def on_validation_end(self, trainer, pl_module) -> None:
        self.logging.__exit__(None, None, None)
        figures = {key: value.item() for key, value in trainer.callback_metrics.items()}
        Path(self.out_dir, f"rank{trainer.global_rank}.json").write_text(json.dumps(
            {"finish": self.finish, "logging": sum(self.logged.values()), "figures": figures}))


def test_an_evaluations_collectives_do_not_grow_with_the_number_of_tasks(tmp_path):
    """Each task's three torchmetrics means synchronised their states one by one (several all_gathers per task and
    figure): 200 tasks made over a thousand collectives per validation, each a network round trip between nodes."""
    counts = {}
    for extra in (0, 6):
        root = tmp_path / str(extra)
        root.mkdir()
        trainer = trainer_for(root, strategy=TwoProcessDDPStrategy(), devices=2,
                              callbacks=[CountedPerTaskMetrics(str(root))])
        trainer.validate(ManyTasks(extra), verbose=False)
        ranks = [json.loads((root / f"rank{rank}.json").read_text()) for rank in (0, 1)]
        expected = expected_metrics()
        for i in range(extra):
            expected |= {f"val/extra{i}/loss": 1.5 + i, f"val/extra{i}/acc": 0.5}
        expected["val/macro_acc"] = sum(value for key, value in expected.items() if key.endswith("/acc")) / (2 + extra)
        expected["val/macro_loss"] = sum(value for key, value in expected.items() if key.endswith("/loss")) / (3 + extra)
        assert ranks[0]["figures"] == pytest.approx(expected)
        counts[extra] = [rank["finish"] for rank in ranks]
    assert counts[6] == counts[0]
