"""Multi-task quality of LoRA, MoLoRA and MALoRA on the built-in offline suite, as named studies (issue 14).

Each (configuration, seed) is one run of the default job (`recipes/default.yaml`: SmolLM2-135M in nf4, the nine
built-in tasks) in its own process, with only the adapter, the seed and the study's budget changed. The validation
items are the same for every run (the data seed is fixed); the seed changes the adapter initialisation, dropout and
the training order, so runs with the same seed see the same batches. Every run records each validation item's
correctness at each evaluation, from which `quality_report` derives intervals and paired comparisons.

    python -m benchmarks.quality --study noise conflict neutral rank rank_paper router budget --jobs 2 --threads 1
    python -m benchmarks.quality --study budget --report-only   # rewrite a report from the kept runs
    python -m benchmarks.quality --quick                         # 2 configurations, 1 seed, a few steps

The first command takes hours. Each finished run is kept under benchmarks/results/tmp/quality/, in a folder named by
its settings (studies that share a run share its result), and the reports are rewritten after every run. An
interrupted benchmark started again with the same arguments reuses what it had, and a run stopped mid-way continues
from its last checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from transformers import AutoConfig, AutoModelForCausalLM

from benchmarks.common import REPO_ROOT, RESULTS_DIR, machine_info, machine_markdown, write_report
from benchmarks.quality_report import StudyRuns, study_report
from malora_lightning.adapters import AdapterConfig, count_parameters, inject_adapters
from malora_lightning.atomic import atomic_write_text
from malora_lightning.callbacks.per_task_metrics import Evaluation, TaskScore
from malora_lightning.callbacks.seesaw import track
from malora_lightning.data import BUILTIN_TASKS, CONFLICT_TASKS, NEUTRAL_TASKS
from malora_lightning.offline_models import resolve_model_path

MODEL = "offline:SmolLM2-135M-Instruct"
RECIPE = Path("recipes/default.yaml")  # relative to the repository root, where the runs start
DATA_SEED = 0  # every run's: the same validation items (the data module's default, which the runs always had)
LOST_EVALUATION = "lost-evaluation-step"  # a checkpoint kept aside to restore the evaluation a resume skips

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
    # the rank sweep (Fig. 4a/5): alpha = 2 r and beta 1.0 throughout (the paper's Tab. 11 raises beta with rank:
    # 0.3/1.0/3.5/5.0 for r-bar 6/12/24/48)
    "lora_r16": {"adapter": {"method": "lora", "rank": 16, "alpha": 32}},
    "lora_r256": {"adapter": {"method": "lora", "rank": 256, "alpha": 512}},
    "malora_r8_d32": {"adapter": {**MALORA, "rank": 8, "alpha": 16}},
    "malora_r24_d64": {"adapter": {**MALORA, "rank": 24, "shared_rank": 64, "alpha": 48}},
    # the paper's Tab. 11 columns 8/16/32 as printed: MoLoRA r against MALoRA r-bar = 1.5 r, d = 4 r, beta scaled
    "molora_r16": {"adapter": {"method": "molora", "rank": 16, "alpha": 32, "num_experts": 8, "top_k": 2}},
    "molora_r32": {"adapter": {"method": "molora", "rank": 32, "alpha": 64, "num_experts": 8, "top_k": 2}},
    "malora_r24_d64_b3.5": {"adapter": {**MALORA, "rank": 24, "shared_rank": 64, "alpha": 48, "beta": 3.5}},
    "malora_r48_d128_b5": {"adapter": {**MALORA, "rank": 48, "shared_rank": 128, "alpha": 96, "beta": 5.0}},
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


@functools.cache
def trainable_parameters(name: str) -> int:
    """Exact trainable count of a configuration on SmolLM2, from shapes only."""
    return count_parameters(adapted_model_on_meta(CONFIGURATIONS[name]["adapter"])).trainable


def run_settings(name: str, seed: int, args: argparse.Namespace) -> dict[str, object]:
    """What decides a run's result: a cached result is reused only when all of this matches."""
    return {"configuration": name, **CONFIGURATIONS[name], "seed": seed, "steps": args.steps,
            "val_every": args.val_every, "eval_examples": args.eval_examples, "tasks": args.tasks}


def newest(run_dir: Path, pattern: str) -> Path | None:
    """The most recently written file of that name in a run (a resumed run writes a new log version)."""
    return max(run_dir.rglob(pattern), key=lambda path: path.stat().st_mtime, default=None)


def run_command(subcommand: str, name: str, seed: int, args: argparse.Namespace, root_dir: Path) -> list[str]:
    """The `malora_lightning` command of one run (`fit`), or of validating one of its checkpoints (`validate`)."""
    configuration = CONFIGURATIONS[name]
    overrides = [f"--model.adapter.{key}={json.dumps(value) if isinstance(value, bool) else value}"
                 for key, value in configuration["adapter"].items()]
    overrides += [f"--model.{key}={value}" for key, value in configuration.get("model", {}).items()]
    command = [sys.executable, "-m", "malora_lightning", subcommand, "--config", str(RECIPE), *overrides,
               f"--seed_everything={seed}", f"--data.seed={seed}", f"--data.data_seed={DATA_SEED}",
               f"--trainer.max_steps={args.steps}",
               f"--trainer.val_check_interval={args.val_every}", f"--data.max_eval_examples_per_task={args.eval_examples}",
               f"--trainer.default_root_dir={root_dir}", "--trainer.enable_progress_bar=false",
               "--trainer.enable_model_summary=false", "--trainer.callbacks+=benchmarks.example_record.ExampleRecorder"]
    if args.tasks:
        command.append(f"--data.tasks=[{', '.join(args.tasks)}]")
    return command


def run_process(command: list[str], args: argparse.Namespace, what: str) -> None:
    """Run one `run_command` from the repository root, `--threads` as OMP_NUM_THREADS when given; a failure raises
    with `what` failed and the end of its error output."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    completed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=environment)
    if completed.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")


def mean_seesaw_index(points: list[dict[str, object]]) -> float | None:
    """A run's seesaw index: the mean over its evaluation intervals (the points after the first) that have one."""
    intervals = [point["seesaw_index"] for point in points[1:] if point["seesaw_index"] is not None]
    return statistics.mean(intervals) if intervals else None


def final_accuracy(points: list[dict[str, object]]) -> dict[str, float]:
    """Each task's accuracy at a run's last evaluation (seesaw-tracker points)."""
    return {task: score["accuracy"] for task, score in points[-1]["tasks"].items()}


def run_once(name: str, seed: int, args: argparse.Namespace, run_dir: Path) -> dict[str, object]:
    """One default-job run in a fresh process; returns its evaluations, per-example results and wall time.

    The result is kept in `run_dir/result.json`, so an interrupted benchmark resumes where it stopped; a run
    interrupted mid-way continues from its last checkpoint (written as each evaluation ends), as an exact resume.
    """
    settings = run_settings(name, seed, args)
    if not args.fresh and (kept := kept_result(run_dir, name, seed, args)) is not None:
        return kept
    settings_path = run_dir / "settings.json"
    resume = None
    if not args.fresh and settings_path.exists() and json.loads(settings_path.read_text()) == settings:
        resume = newest(run_dir, "last.ckpt")
    if resume is None:
        shutil.rmtree(run_dir, ignore_errors=True)  # an outdated run, or one stopped before its first checkpoint
        run_dir.mkdir(parents=True)
        atomic_write_text(settings_path, json.dumps(settings, indent=2) + "\n")
    command = run_command("fit", name, seed, args, run_dir)
    resumed_from_step = 0
    if resume is not None:  # no second "before training" evaluation: the restored history has it
        saved = torch.load(resume, map_location="cpu", weights_only=True)
        resumed_from_step = saved["global_step"]
        recorded = [record["step"] for record in saved["callbacks"].get("ExampleRecorder", {}).get("evaluations", [])]
        if resumed_from_step % args.val_every == 0 and resumed_from_step not in recorded:
            # written before its step's evaluation (the recipe until 2026-12-05), which the resume will not run:
            # kept aside to validate once the run has finished
            shutil.copyfile(resume, run_dir / f"{LOST_EVALUATION}{resumed_from_step}.ckpt")
        command += [f"--ckpt_path={resume}", "--trainer.num_sanity_val_steps=0"]
    start = time.perf_counter()
    run_process(command, args, f"run {name} seed {seed}")
    seconds = time.perf_counter() - start
    seesaw = json.loads(newest(run_dir, "seesaw.json").read_text())["stages"]["val"]
    examples = json.loads(newest(run_dir, "examples_val.json").read_text())
    result = {
        "settings": settings,
        "seed": seed,
        "accuracy": final_accuracy(seesaw),
        "seesaw_index": mean_seesaw_index(seesaw),
        "evaluations": seesaw,
        "examples": examples,
        # a resumed run's time is its last attempt's, scaled to the whole run; unknown when it resumed at its end
        "seconds": seconds * args.steps / (args.steps - resumed_from_step) if resumed_from_step < args.steps else None,
        "resumed_from_step": resumed_from_step,
        "threads": args.threads or torch.get_num_threads(),
        "concurrent_jobs": args.jobs,
    }
    atomic_write_text(run_dir / "result.json", json.dumps(result, indent=2) + "\n")
    for step in sorted(int(path.stem.removeprefix(LOST_EVALUATION)) for path in run_dir.glob(f"{LOST_EVALUATION}*")):
        result = restore_evaluation(run_dir, name, seed, args, step, run_dir / f"{LOST_EVALUATION}{step}.ckpt")
    for checkpoint in run_dir.rglob("*.ckpt"):  # 220 MB each for MALoRA; the scores, reports and adapter stay
        checkpoint.unlink()
    return result


@dataclass(frozen=True)
class Study:
    """One question of the quality study: which configurations, at which budget, on which tasks."""

    configurations: tuple[str, ...]
    steps: int = 160  # the default job's budget (recipes/default.yaml)
    val_every: int = 80
    eval_examples: int = 100  # the built-in validation split: one example is one point of a task
    tasks: tuple[str, ...] | None = None  # None: the default recipe's suite


MAIN = ("lora_r64", "molora_r8", "malora")
QUICK_STUDY = Study(QUICK_CONFIGURATIONS, steps=6, val_every=6, eval_examples=4, tasks=("add_2digit", "parity"))
STUDIES: dict[str, Study] = {
    "noise": Study(MAIN),  # the default budget, measured on 100 examples per task
    "conflict": Study(MAIN, tasks=BUILTIN_TASKS + CONFLICT_TASKS),
    "neutral": Study(MAIN, tasks=BUILTIN_TASKS + NEUTRAL_TASKS),  # the conflict study's control
    "rank": Study(("lora_r16", "lora_r64", "lora_r256", "malora_r8_d32", "malora", "malora_r24_d64")),
    "rank_paper": Study(("molora_r8", "molora_r16", "molora_r32", "malora", "malora_r24_d64_b3.5",
                         "malora_r48_d128_b5")),
    "router": Study(("malora", "malora_router_lr5e-3", "malora_aux0.1", "malora_aux0")),
    "budget": Study(MAIN, steps=960, val_every=160),  # 6x the default budget, evaluated every 1x
    "ablations": Study(("malora", "malora_frozen_SA_r16", "malora_frozen_P", "malora_symmetric_r8_d64")),
}
STUDY_QUESTIONS = {
    "quick": "A check of the pipeline (6 steps, 2 tasks, 4 items each): its numbers mean nothing.",
    "noise": "LoRA r = 64, MoLoRA 8 x r8 and MALoRA 8 x r̄12 (d 32), all top-2 where routed, at matched trainable "
             "budgets and the default job's budget, measured on 100 validation items per task: which differences "
             "are larger than the noise?",
    "conflict": "The same three methods on the suite plus its conflict group (four tasks that ask the suite's "
                "inputs for contradicting answers): which method loses least on the suite, and how each copes "
                "with the group.",
    "neutral": "The conflict study's control: the same three methods on the suite plus its neutral group (four "
               "tasks of the same kinds that contradict nothing in the suite). What the group costs the suite is "
               "what four more tasks cost; the conflict study's cost beyond it is the conflict's.",
    "rank": "The paper's rank claim (Fig. 4a/5): LoRA at r 16/64/256 and MALoRA at r̄ 8/12/24 (d 32/32/64), at the "
            "default budget.",
    "rank_paper": "The paper's Tab. 11 as printed, columns 8/16/32: MoLoRA at r 8/16/32 against MALoRA at "
                  "(r̄, d, β) = (12, 32, 1.0), (24, 64, 3.5), (48, 128, 5.0), at the default budget. Does MoLoRA "
                  "fall past r = 16 while MALoRA, its β scaled with rank, keeps gaining?",
    "router": "The router levers the paper leaves open, on MALoRA only: a 10x router learning rate, and the "
              "load-balance loss coefficient at 0.1 and 0 (default 0.01).",
    "budget": "The three methods at 6x the default budget (960 steps), evaluated every 160 steps: does the ordering "
              "change with training?",
    "ablations": "The paper's Table 3 ablations against MALoRA at the default budget.",
}


# the studies whose runs a study's report compares with
REFERENCES: dict[str, tuple[str, ...]] = {"conflict": ("noise", "neutral"), "neutral": ("noise",), "budget": ("noise",)}


def study_arguments(study: Study, args: argparse.Namespace) -> argparse.Namespace:
    """The per-run arguments of `run_once` for one study."""
    return argparse.Namespace(**{**vars(args), "configurations": list(study.configurations), "steps": study.steps,
                                 "val_every": study.val_every, "eval_examples": study.eval_examples,
                                 "tasks": list(study.tasks) if study.tasks else None})


def run_directory(name: str, seed: int, run_args: argparse.Namespace) -> Path:
    """Where a run is kept: named by its settings, so studies that share a run (same settings) share its result."""
    digest = hashlib.sha256(json.dumps(run_settings(name, seed, run_args), sort_keys=True).encode()).hexdigest()[:10]
    return RESULTS_DIR / "tmp" / "quality" / f"{name}-seed{seed}-{digest}"


def write_study_report(name: str, study: Study, args: argparse.Namespace, results: dict[Path, dict[str, object]],
                       load_at_start: tuple[float, float, float], wall_minutes: float) -> str:
    """Rewrite `quality_<study>.md/.json` from the runs kept so far (it refers to the studies it compares with
    when their runs are kept too: `REFERENCES`). With no kept run the report is left as it is: the runs stay on the
    machine that made them, and `--report-only` elsewhere replaced a study's numbers with "No runs yet". Returns the
    report's text, empty when none was written."""
    def study_runs(study_name: str, current: Study) -> StudyRuns:
        run_args = study_arguments(current, args)
        runs: dict[str, dict[int, dict[str, object]]] = {}
        pending = []
        for configuration in current.configurations:
            for seed in args.seeds:
                directory = run_directory(configuration, seed, run_args)
                result = results.get(directory) or kept_result(directory, configuration, seed, run_args)
                if result is None:
                    pending.append(f"{configuration} seed {seed}")
                else:
                    runs.setdefault(configuration, {})[seed] = result
        return StudyRuns(study_name, current.steps, current.val_every, current.eval_examples, list(args.seeds), runs,
                         {c: trainable_parameters(c) for c in current.configurations}, pending, DATA_SEED)

    this = study_runs(name, study)
    if not this.runs:
        print(f"{name}: no kept run under {RESULTS_DIR / 'tmp' / 'quality'}, so quality_{name}.md and .json are left "
              "as they are", flush=True)
        return ""
    others = {other: study_runs(other, STUDIES[other]) for other in REFERENCES.get(name, ())}
    info = machine_info(load_at_start)
    body, payload, _ = study_report(this, others)
    kept = [run for by_seed in this.runs.values() for run in by_seed.values()]
    how = sorted({(run["concurrent_jobs"], run["threads"]) for run in kept})
    text = "\n\n".join([f"# Quality study: {name}", STUDY_QUESTIONS[name], body,
                         "Runs made with " + " or ".join(f"{jobs} run(s) at a time, {threads} thread(s) each"
                                                         for jobs, threads in how) +
                         " (other work may have shared the cores: min/run is not a speed measurement). Wall time of "
                         f"this invocation {wall_minutes:.0f} min. The machine below is where this report was written.",
                         machine_markdown(info)])
    write_report(f"quality_{name}", {"machine": info, "study": name, "settings": vars(study_arguments(study, args)),
                                     "pending": this.pending, **payload}, text)
    return text


def kept_result(directory: Path, name: str, seed: int, run_args: argparse.Namespace) -> dict[str, object] | None:
    """A finished run's result from an earlier invocation, if its settings match."""
    path = directory / "result.json"
    if not path.exists():
        return None
    result = json.loads(path.read_text())
    if result["settings"] != run_settings(name, seed, run_args):
        return None
    # the seesaw figures as the tracker now defines them, from the per-item records (a run keeps what it had)
    result["evaluations"] = seesaw_points(result["examples"], recipe_tolerance())
    result["seesaw_index"] = mean_seesaw_index(result["evaluations"])
    return result


def recipe_tolerance() -> float:
    """The default recipe's seesaw tolerance, which every run of the study uses."""
    return yaml.safe_load((REPO_ROOT / RECIPE).read_text())["seesaw"]["init_args"]["tolerance"]


def seesaw_points(examples: list[dict[str, object]], tolerance: float) -> list[dict[str, object]]:
    """`SeesawTracker`'s figures of every recorded evaluation, from the per-item records. Accuracies are rounded to
    float32 as the tracker's metrics compute them, so that a change of exactly the tolerance counts as it does there.
    """
    def accuracy(bits: str) -> float:
        return float(np.float32(bits.count("1")) / np.float32(len(bits)))

    evaluations = [Evaluation(stage="val", step=record["step"], sanity_check=record["sanity_check"],
                              tasks={task: TaskScore(loss=float("nan"), accuracy=accuracy(bits), count=len(bits))
                                     for task, bits in record["correct"].items()})
                   for record in examples]
    return [asdict(point) for point in track(evaluations, tolerance)]


def restore_evaluation(directory: Path, name: str, seed: int, run_args: argparse.Namespace, step: int,
                       checkpoint: Path) -> dict[str, object]:
    """Put back into a finished run the evaluation at `step` that it lost when it resumed from the checkpoint of that
    step: until 2026-12-05 the recipe checkpointed at the end of the training batch, before that step's validation,
    which Lightning does not rerun on resume. Validates `checkpoint` (that step's, kept aside) as the run would have,
    inserts its record, recomputes the run's seesaw figures from its records, and returns the updated result."""
    result = kept_result(directory, name, seed, run_args)
    if result is None:
        raise SystemExit(f"{name} seed {seed}: no finished run in {directory}")
    if any(record["step"] == step for record in result["examples"]):
        raise SystemExit(f"{name} seed {seed} already has its evaluation at step {step}")
    saved_step = torch.load(checkpoint, map_location="cpu", weights_only=True)["global_step"]
    if saved_step != step:
        raise SystemExit(f"{checkpoint} was written at step {saved_step}, not {step}")
    with tempfile.TemporaryDirectory() as scratch:
        command = run_command("validate", name, seed, run_args, Path(scratch)) + [f"--ckpt_path={checkpoint}"]
        run_process(command, run_args, f"validating {checkpoint}")
        record = json.loads(newest(Path(scratch), "examples_val.json").read_text())[-1]
    record["step"] = step  # `validate` restores the weights, not the step counter
    result["examples"] = sorted([*result["examples"], record], key=lambda entry: entry["step"])
    result["evaluations"] = seesaw_points(result["examples"], recipe_tolerance())
    result["accuracy"] = final_accuracy(result["evaluations"])  # the restored step may be the last
    result["seesaw_index"] = mean_seesaw_index(result["evaluations"])
    result["restored_evaluations"] = [*result.get("restored_evaluations", []), step]
    atomic_write_text(directory / "result.json", json.dumps(result, indent=2) + "\n")
    return result


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
    parser.add_argument("--report-only", action="store_true", help="rewrite the reports from the kept runs; run "
                        "nothing")
    parser.add_argument("--restore-evaluation", nargs=4, metavar=("CONFIGURATION", "SEED", "STEP", "CHECKPOINT"),
                        help="put back the evaluation at STEP that a finished run of the (one) --study lost on a "
                        "resume, from its CHECKPOINT of that step (see `restore_evaluation`), then report")
    args = parser.parse_args()
    studies = {name: STUDIES[name] for name in args.study}
    if args.restore_evaluation:
        if len(studies) != 1:
            parser.error("--restore-evaluation works on one --study")
        configuration, seed, step, checkpoint = args.restore_evaluation
        run_args = study_arguments(next(iter(studies.values())), args)
        restore_evaluation(run_directory(configuration, int(seed), run_args), configuration, int(seed), run_args,
                           int(step), Path(checkpoint).resolve())
        args.report_only = True
    if args.quick:
        studies = {"quick": QUICK_STUDY}
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

    def report_all() -> list[str]:
        """The studies whose reports were written (those with kept runs)."""
        return [study_name for study_name, study in studies.items()
                if write_study_report(study_name, study, args, results, load_at_start,
                                      (time.perf_counter() - start) / 60)]

    if not args.report_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            futures = {pool.submit(run_once, name, seed, run_args, directory): directory
                       for directory, (name, seed, run_args) in jobs.items()}
            for future in as_completed(futures):
                directory = futures[future]
                results[directory] = run = future.result()
                name, seed = jobs[directory][:2]
                took = "time unknown" if run["seconds"] is None else f"in {run['seconds'] / 60:.1f} min"
                print(f"{name} seed {seed} ({directory.name}): average "
                      f"{100 * statistics.mean(run['accuracy'].values()):.1f}% {took}", flush=True)
                report_all()  # after every run, so an interrupted benchmark still leaves its numbers
    for study_name in report_all():
        print("written:", RESULTS_DIR / f"quality_{study_name}.md")


if __name__ == "__main__":
    main()
