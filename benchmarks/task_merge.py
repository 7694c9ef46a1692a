"""Per-task accuracy of a trained MoLoRA/MALoRA adapter: routed, collapsed to a task LoRA, and merged into the base.

For every task of the recipe, on that task's validation examples (the recipe's evaluation, one task at a time):

* routed: the adapter as trained, per-token routing;
* task LoRA: the mixture with every layer's gates fixed to the task's routing profile (its mean gates over at most
  `--profile-examples` training examples), as the plain LoRA that `malora-task-export` writes;
* task-merged: that update folded into the dequantized base weights (`malora-task-export --merge`).

    python -m benchmarks.task_merge --adapter runs/default/lightning_logs/version_0/checkpoints/adapter

Accuracy only (no timing): the question is what fixing the gates to a task profile costs.
"""

from __future__ import annotations

import argparse
import os
import time

import lightning as L

from benchmarks.common import add_run_arguments, machine_info, machine_markdown, markdown_table, start_run, \
    write_report
from malora_lightning.callbacks import PerTaskMetrics
from malora_lightning.callbacks.summary import mean_of_present
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule
from malora_lightning.precision import AutoMixedPrecision
from malora_lightning.task_export import DEFAULT_PROFILE_EXAMPLES, build_from_recipe, profile_tasks, task_model
from malora_lightning.values import percent

VARIANTS = ("routed", "task LoRA", "task-merged")


def task_accuracy(module: MALoRAModule, data: MultiTaskDataModule, task: str) -> float | None:
    """The recipe's validation of one task (a data module of that task alone, same settings and seeds)."""
    settings = {key: value for key, value in data.hparams.items() if not key.startswith("_")}  # not jsonargparse's
    single = MultiTaskDataModule(**{**settings, "tasks": [task], "eval_tasks": None})
    metrics = PerTaskMetrics()
    trainer = L.Trainer(accelerator="cpu", devices=1, plugins=[AutoMixedPrecision(device="cpu")], logger=False,
                        callbacks=[metrics], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.validate(module, datamodule=single, verbose=False)
    return metrics.evaluations("val")[-1].tasks[task].accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="a MoLoRA/MALoRA adapter folder (a fit's checkpoints/adapter)")
    parser.add_argument("--config", default="recipes/default.yaml", help="the recipe the adapter was trained with")
    parser.add_argument("--profile-examples", type=int, default=DEFAULT_PROFILE_EXAMPLES)
    parser.add_argument("--tasks", nargs="+", help="default: every task the recipe trains")
    add_run_arguments(parser)
    args = parser.parse_args()
    _, load_at_start = start_run(args)
    started = time.perf_counter()
    module, data = build_from_recipe(args.adapter, ["--config", args.config])
    routed = module.model
    tasks = args.tasks or [task.name for task in data.train_tasks]
    profiles = profile_tasks(routed, data, tasks, args.profile_examples)
    scores: dict[str, dict[str, float | None]] = {}
    for task in tasks:
        scores[task] = {"routed": task_accuracy(module, data, task)}
        for variant, merge in (("task LoRA", False), ("task-merged", True)):
            module.model = task_model(routed, profiles[task], merge)
            scores[task][variant] = task_accuracy(module, data, task)
        module.model = routed
        print(task, scores[task], flush=True)

    rows = [[task, *(percent(scores[task][v]) for v in VARIANTS), profiles[task].num_tokens] for task in tasks]
    rows.append(["**mean**", *(percent(mean_of_present(s[v] for s in scores.values())) for v in VARIANTS), ""])
    table = markdown_table(["task", *(f"{v} acc %" for v in VARIANTS), "profile tokens"], rows)
    payload = {"adapter": os.path.abspath(args.adapter), "config": args.config,
               "profile_examples": args.profile_examples, "scores": scores,
               "profile_tokens": {task: profiles[task].num_tokens for task in tasks},
               "seconds": time.perf_counter() - started, "machine": machine_info(load_at_start)}
    markdown = "\n\n".join([f"# Routed vs task-collapsed accuracy ({args.config})", machine_markdown(payload["machine"]),
                            table])
    print(markdown)
    for path in write_report(f"task_merge{'_' + args.tag if args.tag else ''}", payload, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
