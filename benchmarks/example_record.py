"""`ExampleRecorder`: every validation example's correctness at every evaluation of a run, for paired statistics.

The quality benchmark compares methods example by example (the same validation items in the same order for every run:
the data seed is fixed), which the per-task means that the library logs cannot give. It is a benchmark tool, attached
through the CLI (`--trainer.callbacks+=benchmarks.example_record.ExampleRecorder`), and writes
`<log_dir>/examples_val.json`: one entry per evaluation with its step, each task's correctness as a string of 0/1 in
validation order, a digest of each task's prompts (to check that two runs saw the same items), and the routing
health `RoutingStats` logged for that evaluation (task-expert NMI, dead experts, load CV, entropy).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback

from malora_lightning.atomic import atomic_write_text
from malora_lightning.data.batches import EvaluationBatch, EvaluationOutput


class ExampleRecorder(Callback):
    def __init__(self) -> None:
        self.evaluations: list[dict[str, Any]] = []
        self._correct: dict[str, list[str]] = {}
        self._prompts: dict[str, list[str]] = {}

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._correct, self._prompts = {}, {}

    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                batch: EvaluationBatch, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not isinstance(outputs, EvaluationOutput) or outputs.correct is None:
            return
        for name, correct, prompt in zip(outputs.task_name, outputs.correct.tolist(), batch.prompts):
            self._correct.setdefault(name, []).append("1" if correct else "0")
            self._prompts.setdefault(name, []).append(prompt)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After every callback's epoch-end hook, so the routing health of this evaluation is already logged."""
        if trainer.world_size != 1:
            raise RuntimeError("ExampleRecorder records one process's examples; run the benchmark on one device")
        routing = {key.removeprefix("val/routing/"): float(value) for key, value in trainer.callback_metrics.items()
                   if key.startswith("val/routing/")}
        self.evaluations.append({
            "step": trainer.global_step,
            "sanity_check": trainer.sanity_checking,
            "correct": {name: "".join(values) for name, values in self._correct.items()},
            "prompts_digest": {name: hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]
                               for name, prompts in self._prompts.items()},
            "routing": {} if trainer.sanity_checking else routing,  # Lightning keeps no sanity-check logs
        })
        atomic_write_text(Path(trainer.log_dir) / "examples_val.json", json.dumps(self.evaluations, indent=1) + "\n")

    def state_dict(self) -> dict[str, Any]:
        """Kept in checkpoints, so a resumed run's file holds the evaluations before the resume too."""
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.evaluations = state_dict["evaluations"]
