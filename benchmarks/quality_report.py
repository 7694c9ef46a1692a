"""The quality study's reports: one Markdown + JSON per study from its kept runs, with intervals and paired
comparisons (`quality_stats`), the budget curves plotted, the routing health over training, and for the conflict
and neutral studies what adding their group costs the suite's own tasks (and the conflict's cost beyond the
neutral group's).
"""

from __future__ import annotations

import hashlib
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, markdown_table
from benchmarks.quality_stats import (Bootstrap, Estimate, correctness, evaluation_at, macro_estimate,
                                      paired_comparison, stack, task_estimates)
from malora_lightning.callbacks.plots import new_figure, save_figure
from malora_lightning.data import BUILTIN_TASKS, CONFLICT_TASKS, NEUTRAL_TASKS, get_task
from malora_lightning.data.builtin import majority_rate

# the comparisons each study is about: (A, B) reads "A minus B"
PAIRS: dict[str, list[tuple[str, str]]] = {
    "noise": [("malora", "lora_r64"), ("malora", "molora_r8"), ("molora_r8", "lora_r64")],
    "conflict": [("malora", "lora_r64"), ("malora", "molora_r8"), ("molora_r8", "lora_r64")],
    "neutral": [("malora", "lora_r64"), ("malora", "molora_r8"), ("molora_r8", "lora_r64")],
    "budget": [("malora", "lora_r64"), ("malora", "molora_r8"), ("molora_r8", "lora_r64")],
    "rank": [("lora_r16", "lora_r64"), ("lora_r256", "lora_r64"), ("malora_r8_d32", "malora"),
             ("malora_r24_d64", "malora"), ("malora_r24_d64", "lora_r256")],
    "rank_paper": [("malora", "molora_r8"), ("malora_r24_d64_b3.5", "molora_r16"), ("malora_r48_d128_b5", "molora_r32"),
                   ("molora_r16", "molora_r8"), ("molora_r32", "molora_r16"), ("malora_r24_d64_b3.5", "malora"),
                   ("malora_r48_d128_b5", "malora_r24_d64_b3.5")],
    "router": [("malora_router_lr5e-3", "malora"), ("malora_aux0.1", "malora"), ("malora_aux0", "malora")],
    "ablations": [("malora_frozen_SA_r16", "malora"), ("malora_frozen_P", "malora"),
                  ("malora_symmetric_r8_d64", "malora")],
}


@dataclass
class StudyRuns:
    """A study's finished runs: per configuration, one run per seed (in seed order)."""

    name: str
    steps: int
    val_every: int
    eval_examples: int
    seeds: list[int]
    runs: dict[str, dict[int, dict[str, Any]]]  # configuration -> seed -> kept result
    trainable: dict[str, int]
    pending: list[str]
    data_seed: int = 0  # the runs' --data.data_seed: which validation items they evaluated

    @property
    def tasks(self) -> list[str]:
        first = next(iter(next(iter(self.runs.values())).values()))
        return list(first["examples"][-1]["correct"])

    def complete(self) -> dict[str, list[dict[str, Any]]]:
        """The configurations that have every seed, with their runs in seed order."""
        return {name: [by_seed[seed] for seed in self.seeds] for name, by_seed in self.runs.items()
                if all(seed in by_seed for seed in self.seeds)}


def evaluation_steps(run: dict[str, Any]) -> list[int]:
    return [evaluation["step"] for evaluation in run["examples"]]


def prompts_digest(prompts: list[str]) -> str:
    """`ExampleRecorder`'s digest of a task's evaluated prompts (in validation order)."""
    return hashlib.sha256("\0".join(prompts).encode()).hexdigest()[:16]


@dataclass
class Majority:
    """Each task's accuracy of always giving its most common answer on the items the runs evaluated (rebuilt from
    their data seed and item limit, checked against the prompts digests they recorded): the baseline their accuracies
    are read against. `Task.chance_rate` is the test split's rate, other items (51.5 % against 64 % on
    compare_numbers); it stands in only for a task whose evaluated items cannot be rebuilt (`from_test_split`)."""

    rates: dict[str, float]
    from_test_split: list[str]

    @classmethod
    def of(cls, study: StudyRuns, runs: list[dict[str, Any]]) -> Majority:
        rates, fallback = {}, []
        for name in study.tasks:
            task = get_task(name)
            recorded = {record.get("prompts_digest", {}).get(name) for run in runs for record in run["examples"]}
            items = (task.examples("validation", seed=study.data_seed, limit=study.eval_examples)
                     if task.has_split("validation") else [])
            if items and recorded == {prompts_digest([item.prompt for item in items])}:
                rates[name] = majority_rate([item.target for item in items])
            else:
                rates[name] = task.chance_rate or 0.0
                fallback.append(name)
        return cls(rates, fallback)


def worst_task(estimates: dict[str, Estimate], majority: dict[str, float]) -> tuple[str, float]:
    """The task furthest below what it could gain: lowest accuracy above its majority-answer rate."""
    name = min(estimates, key=lambda task: estimates[task].mean - majority[task])
    return name, estimates[name].mean


def routing_at(runs: list[dict[str, Any]], step: int | None = None) -> dict[str, float] | None:
    """Mean over seeds of the routing health logged at that evaluation (default: the last); None for LoRA."""
    health = [evaluation_at(run, step)["routing"] for run in runs]
    if not health or not all(health):
        return None
    return {key: statistics.mean(entry[key] for entry in health) for key in health[0]}


def study_report(study: StudyRuns, other: dict[str, StudyRuns],
                 figure_dir: Path = RESULTS_DIR) -> tuple[str, dict[str, Any], list[Path]]:
    """Markdown, JSON payload and written figures of one study; `other` gives the studies it refers to (the
    conflict study compares the suite's tasks with the noise study's runs)."""
    complete = study.complete()
    if not complete:
        return "No configuration has all its seeds yet.", {}, []
    tasks = study.tasks
    bootstrap = Bootstrap(len(study.seeds), {task: study.eval_examples for task in tasks})
    results = {name: stack(runs, tasks) for name, runs in complete.items()}
    per_task = {name: task_estimates(values, bootstrap) for name, values in results.items()}
    macro = {name: macro_estimate(values, bootstrap) for name, values in results.items()}
    majority = Majority.of(study, [run for runs in complete.values() for run in runs])
    unknown = set(majority.from_test_split)
    label = "chance: majority answer on the evaluated items"
    if unknown:
        label += " (* the test split's: evaluated items unknown)"
    rows = [[label, "–", *(f"{100 * majority.rates[t]:.1f}{'*' if t in unknown else ''}" for t in tasks),
             f"{100 * statistics.mean(majority.rates.values()):.1f}", "–", "–", "–"]]
    before = correctness(next(iter(complete.values()))[0], step=0)  # adapters start at zero: the same in every run
    before_means = [before[task].mean() for task in tasks]
    rows.append(["before training", "–", *(f"{100 * mean:.1f}" for mean in before_means),
                 f"{100 * np.mean(before_means):.1f}", "–", "–", "–"])
    # the kept runs themselves (every item's correctness at every evaluation), so the JSON can be analysed anew
    payload: dict[str, Any] = {"tasks": tasks, "majority_rate": majority.rates,
                               "majority_rate_from_test_split": majority.from_test_split, "configurations": {},
                               "runs": complete}
    for name, runs in complete.items():
        seesaw = [run["seesaw_index"] for run in runs if run["seesaw_index"] is not None]
        worst = worst_task(per_task[name], majority.rates)
        timed = [run["seconds"] for run in runs if run["seconds"] is not None]  # None: resumed at its last step
        minutes = statistics.mean(timed) / 60 if timed else None
        rows.append([name, f"{study.trainable[name] / 1e6:.2f} M", *(per_task[name][t].percent() for t in tasks),
                     f"**{macro[name].percent()}**", f"{statistics.mean(seesaw):.2f}" if seesaw else "–",
                     f"{worst[0]} {100 * worst[1]:.1f}", "–" if minutes is None else f"{minutes:.1f}"])
        payload["configurations"][name] = {
            "trainable_parameters": study.trainable[name],
            "per_task": {t: vars(e) for t, e in per_task[name].items()}, "macro": vars(macro[name]),
            "per_seed_macro": [macro_of_run(run, None, tasks) for run in runs],
            "seesaw_index": statistics.mean(seesaw) if seesaw else None, "worst_task": worst,
            "routing_last": routing_at(runs), "minutes_per_run": minutes}
    sections = [
        f"{len(study.seeds)} seeds ({', '.join(map(str, study.seeds))}), {study.steps} steps, evaluations every "
        f"{study.val_every} steps on {study.eval_examples} validation items per task (one item is "
        f"{100 / study.eval_examples:g} point(s)). Accuracy in %: mean over seeds and items [95 % interval, bootstrap "
        "over seeds and items]. Chance: the accuracy of always giving the task's most common answer on the same items. "
        "Seesaw index: fraction of task pairs moving in opposite directions by more than 4 points between consecutive "
        "evaluations, averaged over the intervals and seeds. Worst task: the lowest accuracy above its chance. "
        "min/run: wall minutes of one run.",
        markdown_table(["configuration", "trainable", *tasks, "average", "seesaw index", "worst task", "min/run"],
                       rows)]
    comparisons = [(a, b) for a, b in PAIRS.get(study.name, []) if a in results and b in results]
    if comparisons:
        lines = ["Paired differences of the average (points; same seeds, batches and items on both sides):", "",
                 "| A − B | difference [95 % interval] (per seed) | A ahead in seeds |", "|---|---|---|"]
        payload["paired"] = {}
        for a, b in comparisons:
            comparison = paired_comparison(results[a], results[b], bootstrap)
            lines.append(f"| {a} − {b} | {comparison.describe()} | {comparison.wins} of {len(study.seeds)} |")
            payload["paired"][f"{a} - {b}"] = {**vars(comparison.difference), "per_seed": comparison.per_seed}
        sections.append("\n".join(lines))
    routing = {name: routing_at(runs) for name, runs in complete.items()}
    if any(routing.values()):
        lines = ["Routing at the last evaluation (mean over seeds): task-expert NMI (0: experts do not specialise by "
                 "task), dead experts (of all layers' experts), load coefficient of variation.", "",
                 "| configuration | task-expert NMI | dead experts | load CV |", "|---|---|---|---|"]
        lines += [f"| {name} | {health['task_nmi']:.3f} | {health['dead_experts']:.1f} | {health['load_cv']:.2f} |"
                  for name, health in routing.items() if health]
        sections.append("\n".join(lines))
    figures: list[Path] = []
    if study.name in GROUPS and "noise" in other:
        sections.append(group_section(study, other, results, bootstrap, payload))
    if study.name == "budget":
        text, figures = budget_section(study, complete, other.get("noise"), payload, figure_dir)
        sections.append(text)
    restored = [f"{name} seed {run['seed']} at step(s) {', '.join(map(str, run['restored_evaluations']))}"
                for name, runs in complete.items() for run in runs if run.get("restored_evaluations")]
    if restored:
        sections.append("Evaluations a resume skipped (its checkpoint was written before that step's evaluation) and "
                        "that were restored by validating that checkpoint (`quality.restore_evaluation`): "
                        + "; ".join(restored) + ".")
    if study.pending:
        sections.insert(0, f"**Incomplete: {len(study.pending)} run(s) still to do** ({', '.join(study.pending)}); "
                           "configurations without every seed are left out.")
    return "\n\n".join(sections), payload, figures


GROUPS = {"conflict": CONFLICT_TASKS, "neutral": NEUTRAL_TASKS}  # the studies that add a group to the suite


def same_items(study: StudyRuns, reference: StudyRuns, runs: list[dict[str, Any]], tasks: list[str]) -> bool:
    """Whether two studies' `runs` can be paired item by item on `tasks`: the same seeds, data seed and item limit,
    and at their last evaluations the same prompts digests wherever runs recorded them. Pairing other items would
    give a difference with a too-narrow interval, in silence."""
    if (reference.seeds, reference.data_seed, reference.eval_examples) != \
            (study.seeds, study.data_seed, study.eval_examples):
        return False
    recorded = [run["examples"][-1].get("prompts_digest", {}) for run in runs]
    return all(len({digests[task] for digests in recorded if task in digests}) <= 1 for task in tasks)


def group_section(study: StudyRuns, other: dict[str, StudyRuns], results: dict[str, dict[str, np.ndarray]],
                  bootstrap: Bootstrap, payload: dict[str, Any]) -> str:
    """What training with the study's group costs the suite's own tasks, per method (paired with the noise study's
    runs: same seeds, same suite items, same budget), and how the group itself does. For the conflict group, also
    its suite minus the neutral group's (both take the same share of the examples: the rest is the conflict)."""
    suite = [task for task in BUILTIN_TASKS if task in study.tasks]
    group = [task for task in GROUPS[study.name] if task in study.tasks]
    # heading -> (reference study, its complete runs), each study's runs gathered once
    references = {"suite: with − without the group (per seed)": (other["noise"], other["noise"].complete())}
    neutral = other.get("neutral") if study.name == "conflict" else None
    if neutral is not None and (neutral_runs := neutral.complete()):
        references["suite: with the conflict − with the neutral group (per seed)"] = (neutral, neutral_runs)
    payload[study.name] = {}
    rows = []
    own = study.complete()
    for name, values in results.items():
        row = [name, macro_estimate(values, bootstrap, suite).percent()]
        payload[study.name][name] = {}
        for reference, runs in references.values():
            if name not in runs or not same_items(study, reference, own[name] + runs[name], suite):
                row.append("–")
                continue
            comparison = paired_comparison({t: values[t] for t in suite}, stack(runs[name], suite), bootstrap, suite)
            row.append(comparison.describe())
            payload[study.name][name][f"minus {reference.name}"] = {"difference": vars(comparison.difference),
                                                                   "per_seed": comparison.per_seed}
        rows.append([*row, macro_estimate(values, bootstrap, group).percent()])
    headers = ["configuration", "suite average, with the group", *references, f"{study.name} group average"]
    return "\n\n".join([f"The suite's {len(suite)} tasks trained with the {study.name} group against the same runs "
                         f"without it (the noise study: same seeds, items and budget), and the group's {len(group)} "
                         "tasks:", markdown_table(headers, rows)])


def budget_section(study: StudyRuns, complete: dict[str, list[dict[str, Any]]], noise: StudyRuns | None,
                   payload: dict[str, Any], figure_dir: Path) -> tuple[str, list[Path]]:
    """Accuracy, seesaw index and routing NMI at every evaluation of the long runs, as a table and a figure."""
    tasks = study.tasks
    steps = evaluation_steps(next(iter(complete.values()))[0])
    curves: dict[str, dict[str, list[list[float | None]]]] = {}
    for name, runs in complete.items():
        accuracy = [[macro_of_run(run, step, tasks) for step in steps] for run in runs]
        seesaw = [[None] + [point["seesaw_index"] for point in run["evaluations"][1:]] for run in runs]
        nmi = [[entry["routing"].get("task_nmi") for entry in run["examples"]] for run in runs]
        dead = [[entry["routing"].get("dead_experts") for entry in run["examples"]] for run in runs]
        curves[name] = {"accuracy": accuracy, "seesaw_index": seesaw, "task_nmi": nmi, "dead_experts": dead}
    payload["curves"] = {"steps": steps, "configurations": curves}
    header = ["step", *(f"{name} average (min–max)" for name in curves), *(f"{name} seesaw" for name in curves)]
    rows = []
    for index, step in enumerate(steps):
        cells = [f"{100 * statistics.mean(c[index] for c in curve['accuracy']):.1f} "
                 f"({100 * min(c[index] for c in curve['accuracy']):.1f}–"
                 f"{100 * max(c[index] for c in curve['accuracy']):.1f})" for curve in curves.values()]
        seesaw = [mean_or_dash([c[index] for c in curve["seesaw_index"]], 2) for curve in curves.values()]
        rows.append([step, *cells, *seesaw])
    routed = [name for name, curve in curves.items() if any(v is not None for c in curve["task_nmi"] for v in c)]
    routing_rows = [[step, *(" / ".join(mean_or_dash([c[index] for c in curves[name][key]], digits)
                                        for key, digits in (("task_nmi", 3), ("dead_experts", 1)))
                             for name in routed)] for index, step in enumerate(steps)]
    text = ["Over training (mean over seeds, min–max in brackets; cosine decay over all "
            f"{study.steps} steps, so an early point is not a run trained to that budget):",
            markdown_table(header, rows)]
    if routed:
        text += ["Routing over training (mean over seeds): task-expert NMI / dead experts.",
                 markdown_table(["step", *routed], routing_rows)]
    annealed = {}
    if noise is not None:
        annealed = {name: statistics.mean(macro_of_run(run, None, tasks) for run in runs)
                    for name, runs in noise.complete().items() if name in curves}
        if annealed:
            text.append("Trained to the default budget instead (the noise study's runs, decayed over "
                        f"{noise.steps} steps): " + ", ".join(f"{name} {100 * value:.1f}"
                                                             for name, value in annealed.items()) + ".")
    figure = plot_curves(steps, curves, annealed, noise.steps if noise else None, figure_dir / "quality_budget.png")
    text.append(f"![accuracy, seesaw index and routing NMI over training]({figure.name})")
    return "\n\n".join(text), [figure]


def mean_or_dash(values: list[float | None], digits: int) -> str:
    return "–" if any(value is None for value in values) else f"{statistics.mean(values):.{digits}f}"


def macro_of_run(run: dict[str, Any], step: int | None, tasks: list[str]) -> float:
    """One run's average accuracy over `tasks` at the evaluation of `step` (default: the last)."""
    results = correctness(run, step)
    return float(np.mean([results[task].mean() for task in tasks]))


def plot_curves(steps: list[int], curves: dict[str, dict[str, list[list[float | None]]]],
                annealed: dict[str, float], annealed_step: int | None, path: Path) -> Path:
    """Three panels (accuracy, seesaw index, NMI) against steps: one line per configuration, a band over seeds."""
    figure = new_figure(15, 4.2)
    axes = figure.subplots(1, 3)
    panels = (("accuracy", "average accuracy (%)", 100), ("seesaw_index", "seesaw index", 1),
              ("task_nmi", "task-expert NMI", 1))
    for color, (name, curve) in zip(("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"),
                                    curves.items()):
        for axis, (key, label, scale) in zip(axes, panels):
            points = [(step, [c[index] for c in curve[key]]) for index, step in enumerate(steps)
                      if all(c[index] is not None for c in curve[key])]
            if not points:
                continue  # LoRA has no routing
            x = [step for step, _ in points]
            axis.plot(x, [scale * statistics.mean(v) for _, v in points], color=color, label=name, marker="o")
            axis.fill_between(x, [scale * min(v) for _, v in points], [scale * max(v) for _, v in points],
                              color=color, alpha=0.15)
            axis.set_xlabel("training step")
            axis.set_ylabel(label)
        if name in annealed and annealed_step is not None:
            axes[0].scatter([annealed_step], [100 * annealed[name]], color=color, marker="*", s=140, zorder=3)
    axes[0].legend(title="bands: min–max over seeds; * trained to that budget", fontsize=8, title_fontsize=8)
    return save_figure(figure, path)
