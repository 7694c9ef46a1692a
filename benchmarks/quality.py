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
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, machine_markdown, markdown_table, write_report
from malora_lightning.adapters import AdapterConfig, count_parameters, inject_adapters
from malora_lightning.atomic import atomic_write_text
from malora_lightning.data.builtin import build_builtin_tasks
from malora_lightning.offline_models import resolve_model_path

MODEL = "offline:SmolLM2-135M-Instruct"

# The paper's configurations (scale 2 throughout); on SmolLM2 the three main ones have 17-19 M trainable parameters.
CONFIGURATIONS: dict[str, dict[str, object]] = {
    "lora_r64": {"method": "lora", "rank": 64, "alpha": 128},
    "molora_r8": {"method": "molora", "rank": 8, "alpha": 16, "num_experts": 8, "top_k": 2},
    "malora": {"method": "malora", "rank": 12, "shared_rank": 32, "alpha": 24, "num_experts": 8, "top_k": 2},
    "malora_frozen_SA_r16": {"method": "malora", "rank": 16, "shared_rank": 32, "alpha": 32, "num_experts": 8,
                             "top_k": 2, "train_shared_A": False},
    "malora_frozen_P": {"method": "malora", "rank": 12, "shared_rank": 32, "alpha": 24, "num_experts": 8, "top_k": 2,
                        "train_P": False},
    "malora_symmetric_r8_d64": {"method": "malora", "rank": 8, "shared_rank": 64, "alpha": 16, "num_experts": 8,
                                "top_k": 2},
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
    return {"configuration": name, "adapter": CONFIGURATIONS[name], "seed": seed, "steps": args.steps,
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
    overrides = [f"--model.adapter.{key}={json.dumps(value) if isinstance(value, bool) else value}"
                 for key, value in CONFIGURATIONS[name].items()]
    command = [sys.executable, "-m", "malora_lightning", "fit", "--config", "recipes/default.yaml", *overrides,
               f"--seed_everything={seed}", f"--data.seed={seed}", f"--trainer.max_steps={args.steps}",
               f"--trainer.val_check_interval={args.val_every}", f"--data.max_eval_examples_per_task={args.eval_examples}",
               f"--trainer.default_root_dir={run_dir}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false"]
    if args.tasks:
        command.append(f"--data.tasks=[{', '.join(args.tasks)}]")
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    start = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        raise RuntimeError(f"run {name} seed {seed} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    seesaw = json.loads(next(run_dir.rglob("seesaw.json")).read_text())["stages"]["val"]
    final = seesaw[-1]
    intervals = [point["seesaw_index"] for point in seesaw[1:] if point["seesaw_index"] is not None]
    result = {
        "settings": settings,
        "seed": seed,
        "accuracy": {task: score["accuracy"] for task, score in final["tasks"].items()},
        "before": {task: score["accuracy"] for task, score in seesaw[0]["tasks"].items()},
        "seesaw_index": statistics.mean(intervals) if intervals else None,
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
        "adapter": CONFIGURATIONS[name],
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
    chance = {task.name: task.chance_rate for task in build_builtin_tasks()}
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 configurations, 1 seed, 6 steps, 2 tasks, always "
                        "rerun (< 2 minutes)")
    parser.add_argument("--configurations", nargs="+", choices=list(CONFIGURATIONS), default=list(CONFIGURATIONS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    # the defaults are the default job's budget (recipes/default.yaml)
    parser.add_argument("--steps", type=int, default=160)
    parser.add_argument("--val-every", type=int, default=80)
    parser.add_argument("--eval-examples", type=int, default=32)
    parser.add_argument("--tasks", nargs="+", help="default: the built-in suite of the default recipe")
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each in its own process)")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS of each run (default: torch's choice); on 2 "
                        "cores, --jobs 2 --threads 1 finishes the suite ~1.3x sooner than --jobs 1")
    parser.add_argument("--fresh", action="store_true", help="rerun runs whose results are already kept")
    parser.add_argument("--tag", default="", help="appended to the result file names")
    args = parser.parse_args()
    if args.quick:
        args.configurations, args.seeds, args.steps, args.val_every = list(QUICK_CONFIGURATIONS), [0], 6, 6
        args.eval_examples, args.tasks = 4, args.tasks or ["add_2digit", "parity"]
        args.fresh = True  # a check of the pipeline as it is now, never of kept results
    load_at_start = os.getloadavg()
    stem = f"quality{'_quick' if args.quick else ''}{'_' + args.tag if args.tag else ''}"
    work_dir = RESULTS_DIR / "tmp" / stem
    start = time.perf_counter()
    jobs = [(name, seed) for name in args.configurations for seed in args.seeds]
    results: dict[tuple[str, int], dict[str, object]] = {}
    trainable = {name: trainable_parameters(CONFIGURATIONS[name]) for name in args.configurations}

    def report() -> str:
        summaries = [summarise(name, [results[(name, seed)] for seed in args.seeds if (name, seed) in results],
                               trainable[name])
                     for name in args.configurations if any((name, seed) in results for seed in args.seeds)]
        pending = [f"{name} seed {seed}" for name, seed in jobs if (name, seed) not in results]
        wall_minutes = (time.perf_counter() - start) / 60
        info = machine_info(load_at_start)
        text = markdown(summaries, info, args, wall_minutes, pending)
        write_report(stem, {"machine": info, "settings": vars(args), "wall_minutes": wall_minutes,
                            "pending": pending, "configurations": summaries}, text)
        return text

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = {pool.submit(run_once, name, seed, args, work_dir / f"{name}-seed{seed}"): (name, seed)
                   for name, seed in jobs}
        for future in as_completed(futures):
            name, seed = futures[future]
            results[(name, seed)] = run = future.result()
            print(f"{name} seed {seed}: average {100 * statistics.mean(run['accuracy'].values()):.1f}% "
                  f"in {run['seconds'] / 60:.1f} min", flush=True)
            report()  # after every run, so an interrupted benchmark still leaves its numbers
    print(report())
    print("written:", RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md")


if __name__ == "__main__":
    main()
