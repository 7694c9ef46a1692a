"""Multi-task quality of LoRA, MoLoRA and MALoRA (and MALoRA's Table 3 ablations) on the built-in offline suite.

Each (configuration, seed) is one run of the default job (`recipes/default.yaml`: SmolLM2-135M in nf4, the nine
built-in tasks) in its own process, with only the adapter and the seed changed. The data items are the same for
every run (the data seed is fixed); the seed changes the adapter initialisation, dropout and the training order.
Reported per configuration: trainable parameters, per-task final accuracy (mean and standard deviation over seeds),
the macro average, the seesaw index, and the wall time.

    python -m benchmarks.quality --jobs 2 --threads 1   # 6 configurations x 3 seeds (hours on 2 CPU cores)
    python -m benchmarks.quality --quick                # 2 configurations, 1 seed, a few steps: checks the pipeline

Each finished run is kept under benchmarks/results/tmp/, and the report is rewritten after every run: an interrupted
benchmark, started again with the same arguments, reuses what it had and runs only the rest.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_report
from malora_lightning.adapters import AdapterConfig, count_parameters, inject_adapters
from malora_lightning.atomic import atomic_write_text
from malora_lightning.data import BUILTIN_TASKS, CONFLICT_TASKS, get_task
from malora_lightning.offline_models import resolve_model_path

MODEL = "offline:SmolLM2-135M-Instruct"

# The paper's configurations (scale 2 throughout); on SmolLM2 the three main ones have 17-19 M trainable parameters.
# Each maps to the adapter's settings and, where the study varies them, the module's (`--model.<key>`).
MALORA = {"method": "malora", "rank": 12, "shared_rank": 32, "alpha": 24, "num_experts": 8, "top_k": 2}
CONFIGURATIONS: dict[str, dict[str, dict[str, object]]] = {
    "lora_r64": {"adapter": {"method": "lora", "rank": 64, "alpha": 128}},
    "molora_r8": {"adapter": {"method": "molora", "rank": 8, "alpha": 16, "num_experts": 8, "top_k": 2}},
    "malora": {"adapter": MALORA},
    # Table 3's ablations
    "malora_frozen_SA_r16": {"adapter": {**MALORA, "rank": 16, "alpha": 32, "train_shared_A": False}},
    "malora_frozen_P": {"adapter": {**MALORA, "train_P": False}},
    "malora_symmetric_r8_d64": {"adapter": {**MALORA, "rank": 8, "shared_rank": 64, "alpha": 16}},
    # the rank sweep (Fig. 4a/5): alpha = 2 r throughout
    "lora_r16": {"adapter": {"method": "lora", "rank": 16, "alpha": 32}},
    "lora_r256": {"adapter": {"method": "lora", "rank": 256, "alpha": 512}},
    "malora_r8_d32": {"adapter": {**MALORA, "rank": 8, "alpha": 16}},
    "malora_r24_d64": {"adapter": {**MALORA, "rank": 24, "shared_rank": 64, "alpha": 48}},
    # the router levers the paper leaves open
    "malora_router_lr5e-3": {"adapter": MALORA, "model": {"router_learning_rate": 5e-3}},
    "malora_aux0.1": {"adapter": {**MALORA, "aux_loss_coef": 0.1}},
    "malora_aux0": {"adapter": {**MALORA, "aux_loss_coef": 0.0}},
}
QUICK_CONFIGURATIONS = ("lora_r64", "malora")


def adapted_model_on_meta(adapter: dict[str, object]) -> torch.nn.Module:
    """SmolLM2 with these adapters, built on the meta device: every shape, no memory, no weights read."""
    config = AutoConfig.from_pretrained(resolve_model_path(MODEL))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return inject_adapters(model, AdapterConfig(**adapter))


def trainable_parameters(adapter: dict[str, object]) -> int:
    """Exact trainable count on SmolLM2, from shapes only."""
    return count_parameters(adapted_model_on_meta(adapter)).trainable


def run_settings(name: str, seed: int, args: argparse.Namespace) -> dict[str, object]:
    """What decides a run's result: a cached result is reused only when all of this matches."""
    return {"configuration": name, **CONFIGURATIONS[name], "seed": seed, "steps": args.steps,
            "val_every": args.val_every, "eval_examples": args.eval_examples, "tasks": args.tasks}


def run_once(name: str, seed: int, args: argparse.Namespace, run_dir: Path) -> dict[str, object]:
    """One default-job run in a fresh process; returns its final per-task accuracies, seesaw index and wall time.

    The result is kept in `run_dir/result.json`, so an interrupted benchmark resumes where it stopped.
    """
    settings = run_settings(name, seed, args)
    result_path = run_dir / "result.json"
    if result_path.exists() and not args.fresh:
        cached = json.loads(result_path.read_text())
        if cached["settings"] == settings:
            return cached
    shutil.rmtree(run_dir, ignore_errors=True)  # a half-finished or outdated run
    configuration = CONFIGURATIONS[name]
    overrides = [f"--model.adapter.{key}={json.dumps(value) if isinstance(value, bool) else value}"
                 for key, value in configuration["adapter"].items()]
    overrides += [f"--model.{key}={value}" for key, value in configuration.get("model", {}).items()]
    command = [sys.executable, "-m", "malora_lightning", "fit", "--config", "recipes/default.yaml", *overrides,
               f"--seed_everything={seed}", f"--data.seed={seed}", f"--trainer.max_steps={args.steps}",
               f"--trainer.val_check_interval={args.val_every}", f"--data.max_eval_examples_per_task={args.eval_examples}",
               f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", "--trainer.callbacks+=benchmarks.example_record.ExampleRecorder"]
    if args.tasks:
        command.append(f"--data.tasks=[{', '.join(args.tasks)}]")
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"run {name} seed {seed} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    seesaw = json.loads(next(run_dir.rglob("seesaw.json")).read_text())["stages"]["val"]
    examples = json.loads(next(run_dir.rglob("examples_val.json")).read_text())
    final = seesaw[-1]
    intervals = [point["seesaw_index"] for point in seesaw[1:] if point["seesaw_index"] is not None]
    result = {
        "settings": settings,
        "seed": seed,
        "accuracy": {task: score["accuracy"] for task, score in final["tasks"].items()},
        "before": {task: score["accuracy"] for task, score in seesaw[0]["tasks"].items()},
        "seesaw_index": statistics.mean(intervals) if intervals else None,
        "evaluations": seesaw,
        "examples": examples,
        "seconds": seconds,
        "threads": args.threads or torch.get_num_threads(),
        "concurrent_jobs": args.jobs,
    }
    atomic_write_text(result_path, json.dumps(result, indent=2) + "\n")
    for checkpoint in run_dir.rglob("*.ckpt"):  # 220 MB each for MALoRA; the scores, reports and adapter stay
        checkpoint.unlink()
    return result


def summarise(name: str, runs: list[dict[str, object]], trainable: int) -> dict[str, object]:
    tasks = list(runs[0]["accuracy"])
    per_task = {task: [run["accuracy"][task] for run in runs] for task in tasks}
    averages = [statistics.mean(run["accuracy"].values()) for run in runs]
    seesaw = [run["seesaw_index"] for run in runs if run["seesaw_index"] is not None]
    return {
        "configuration": name,
        **CONFIGURATIONS[name],
        "trainable_parameters": trainable,
        "seeds": [run["seed"] for run in runs],
        "per_task_mean": {task: statistics.mean(values) for task, values in per_task.items()},
        "per_task_std": {task: statistics.pstdev(values) for task, values in per_task.items()},
        "average_mean": statistics.mean(averages),
        "average_std": statistics.pstdev(averages),
        "seesaw_index_mean": statistics.mean(seesaw) if seesaw else None,
        "minutes_per_run": statistics.mean(run["seconds"] for run in runs) / 60,
        "runs": runs,
    }


def reference_rows(summaries: list[dict[str, object]], tasks: list[str]) -> list[list[str]]:
    """Chance/majority rate and the untrained model's scores (the same for every run: adapters start at zero)."""
    chance = {task: get_task(task).chance_rate for task in tasks}
    before = summaries[0]["runs"][0]["before"]
    percent = lambda value: "–" if value is None else f"{100 * value:.1f}"  # noqa: E731
    return [["chance / majority", "–", *(percent(chance.get(t)) for t in tasks),
             percent(statistics.mean(chance[t] for t in tasks) if all(t in chance for t in tasks) else None), "–", "–"],
            ["before training", "–", *(percent(before[t]) for t in tasks),
             percent(statistics.mean(before[t] for t in tasks)), "–", "–"]]


def markdown(summaries: list[dict[str, object]], info: dict[str, object], args: argparse.Namespace,
             wall_minutes: float, pending: list[str]) -> str:
    tasks = list(summaries[0]["per_task_mean"])
    headers = ["configuration", "trainable", *tasks, "average", "seesaw index", "min/run"]
    rows = reference_rows(summaries, tasks)
    for summary in summaries:
        cells = [f"{100 * summary['per_task_mean'][t]:.1f} ± {100 * summary['per_task_std'][t]:.1f}" for t in tasks]
        seesaw = summary["seesaw_index_mean"]
        seeds = "" if len(summary["seeds"]) == len(args.seeds) else f" (seeds {', '.join(map(str, summary['seeds']))})"
        rows.append([summary["configuration"] + seeds, f"{summary['trainable_parameters'] / 1e6:.2f} M", *cells,
                     f"**{100 * summary['average_mean']:.1f} ± {100 * summary['average_std']:.1f}**",
                     "-" if seesaw is None else f"{seesaw:.2f}", f"{summary['minutes_per_run']:.1f}"])
    run_minutes = sum(run["seconds"] for summary in summaries for run in summary["runs"]) / 60
    status = f"**Incomplete: {len(pending)} run(s) still to do** ({', '.join(pending)}). " if pending else ""
    return "\n\n".join([
        "# Multi-task quality on the built-in offline suite",
        f"{status}{len(args.seeds)} seed(s) ({', '.join(map(str, args.seeds))}) per configuration, {args.steps} steps, "
        f"evaluations every {args.val_every} steps on {args.eval_examples} validation examples per task; accuracy in "
        f"% (mean ± population std over seeds) at the last evaluation; seesaw index averaged over the evaluation "
        f"intervals and seeds. {args.jobs} run(s) at a time, {args.threads or 'default'} thread(s) each. Wall time of "
        f"this invocation {wall_minutes:.0f} min; the runs shown took {run_minutes:.0f} min of process wall time in "
        "all (runs reused from an earlier invocation keep their own times).",
        markdown_table(headers, rows),
        machine_markdown(info),
    ])


@dataclass(frozen=True)
class Study:
    """One question of the quality study: which configurations, at which budget, on which tasks."""

    configurations: tuple[str, ...]
    steps: int = 160  # the default job's budget (recipes/default.yaml)
    val_every: int = 80
    eval_examples: int = 100  # the built-in validation split: one example is one point of a task
    tasks: tuple[str, ...] | None = None  # None: the default recipe's suite


MAIN = ("lora_r64", "molora_r8", "malora")
STUDIES: dict[str, Study] = {
    "noise": Study(MAIN),  # the default budget, measured on 100 examples per task
    "conflict": Study(MAIN, tasks=BUILTIN_TASKS + CONFLICT_TASKS),
    "rank": Study(("lora_r16", "lora_r64", "lora_r256", "malora_r8_d32", "malora", "malora_r24_d64")),
    "router": Study(("malora", "malora_router_lr5e-3", "malora_aux0.1", "malora_aux0")),
    "budget": Study(MAIN, steps=960, val_every=160),  # 6x the default budget, evaluated every 1x
    "ablations": Study(("malora", "malora_frozen_SA_r16", "malora_frozen_P", "malora_symmetric_r8_d64")),
}


def study_arguments(study: Study, args: argparse.Namespace) -> argparse.Namespace:
    """The per-run arguments of `run_once` for one study."""
    return argparse.Namespace(**{**vars(args), "configurations": list(study.configurations), "steps": study.steps,
                                 "val_every": study.val_every, "eval_examples": study.eval_examples,
                                 "tasks": list(study.tasks) if study.tasks else None})


def run_directory(name: str, seed: int, run_args: argparse.Namespace) -> Path:
    """Where a run is kept: named by its settings, so studies that share a run (same settings) share its result."""
    digest = hashlib.sha256(json.dumps(run_settings(name, seed, run_args), sort_keys=True).encode()).hexdigest()[:10]
    return RESULTS_DIR / "tmp" / "quality" / f"{name}-seed{seed}-{digest}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", nargs="+", choices=list(STUDIES), default=["noise"],
                        help="the studies to run, in this order (runs they share are run once)")
    parser.add_argument("--quick", action="store_true", help="2 configurations, 1 seed, 6 steps, 2 tasks, always "
                        "rerun (< 2 minutes)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's choice); on 2 "
                        "cores, --jobs 2 --threads 1 finishes the suite ~1.3x sooner than --jobs 1")
    parser.add_argument("--fresh", action="store_true", help="rerun runs whose results are already kept")
    args = parser.parse_args()
    studies = {name: STUDIES[name] for name in args.study}
    if args.quick:
        studies = {"quick": Study(QUICK_CONFIGURATIONS, steps=6, val_every=6, eval_examples=4,
                                  tasks=("add_2digit", "parity"))}
        args.seeds, args.fresh = [0], True  # a check of the pipeline as it is now, never of kept results
    load_at_start = os.getloadavg()
    start = time.perf_counter()
    jobs: dict[Path, tuple[str, int, argparse.Namespace]] = {}
    for study in studies.values():
        run_args = study_arguments(study, args)
        for name in study.configurations:
            for seed in args.seeds:
                jobs.setdefault(run_directory(name, seed, run_args), (name, seed, run_args))
    results: dict[Path, dict[str, object]] = {}
    trainable = {name: trainable_parameters(CONFIGURATIONS[name]["adapter"])
                 for study in studies.values() for name in study.configurations}

    def report(study_name: str, study: Study) -> str:
        run_args = study_arguments(study, args)
        kept = {(name, seed): results[directory] for name in study.configurations for seed in args.seeds
                if (directory := run_directory(name, seed, run_args)) in results}
        summaries = [summarise(name, [kept[(name, seed)] for seed in args.seeds if (name, seed) in kept],
                               trainable[name])
                     for name in study.configurations if any((name, seed) in kept for seed in args.seeds)]
        pending = [f"{name} seed {seed}" for name in study.configurations for seed in args.seeds
                   if (name, seed) not in kept]
        wall_minutes = (time.perf_counter() - start) / 60
        info = machine_info(load_at_start)
        text = markdown(summaries, info, run_args, wall_minutes, pending) if summaries else "no runs yet"
        write_report(f"quality_{study_name}", {"machine": info, "study": study_name, "settings": vars(run_args),
                                               "wall_minutes": wall_minutes, "pending": pending,
                                               "configurations": summaries}, text)
        return text

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_once, name, seed, run_args, directory): directory
                   for directory, (name, seed, run_args) in jobs.items()}
        for future in as_completed(futures):
            directory = futures[future]
            results[directory] = run = future.result()
            name, seed = jobs[directory][:2]
            print(f"{name} seed {seed} ({directory.name}): average "
                  f"{100 * statistics.mean(run['accuracy'].values()):.1f}% in {run['seconds'] / 60:.1f} min", flush=True)
            for study_name, study in studies.items():  # after every run, so an interrupted benchmark leaves numbers
                report(study_name, study)
    for study_name, study in studies.items():
        print(report(study_name, study))


if __name__ == "__main__":
    main()
