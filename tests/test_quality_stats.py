"""The quality study's statistics (benchmarks/quality_stats.py) on hand-built results, and its per-example recorder
on a tiny fit: what the study's intervals and paired comparisons are computed from."""

import json
import math

import numpy as np
import pytest

from dataclasses import asdict

from benchmarks.example_record import ExampleRecorder
from benchmarks.quality import seesaw_points
from benchmarks.quality_report import prompts_digest
from benchmarks.quality_stats import Bootstrap, correctness, macro_estimate, paired_comparison, task_estimates
from malora_lightning.callbacks import PerTaskMetrics, RoutingStats, SeesawTracker
from malora_lightning.data import get_task
from tests.test_module import make_data, make_module, make_trainer


def results(*seeds: str) -> np.ndarray:
    return np.array([[int(bit) for bit in seed] for seed in seeds], dtype=np.float64)


def test_a_run_without_variation_has_a_point_interval():
    bootstrap = Bootstrap(seeds=2, items={"t": 4})
    estimate = task_estimates({"t": results("1111", "1111")}, bootstrap)["t"]
    assert (estimate.mean, estimate.low, estimate.high) == (1.0, 1.0, 1.0)


def test_one_seed_interval_matches_the_binomial_normal_approximation():
    generator = np.random.default_rng(1)
    bits = (generator.random(400) < 0.3).astype(np.float64)[None, :]
    estimate = task_estimates({"t": bits}, Bootstrap(seeds=1, items={"t": 400}))["t"]
    p = bits.mean()
    half_width = 1.96 * math.sqrt(p * (1 - p) / 400)
    assert estimate.mean == pytest.approx(p)
    assert estimate.low == pytest.approx(p - half_width, abs=0.01)
    assert estimate.high == pytest.approx(p + half_width, abs=0.01)


def test_seed_spread_widens_the_interval():
    """Two seeds that disagree completely on the same items: the interval spans both seeds' accuracies."""
    bootstrap = Bootstrap(seeds=2, items={"t": 100})
    agree = task_estimates({"t": results("1" * 50 + "0" * 50, "1" * 50 + "0" * 50)}, bootstrap)["t"]
    disagree = task_estimates({"t": results("1" * 80 + "0" * 20, "1" * 20 + "0" * 80)}, bootstrap)["t"]
    assert agree.mean == disagree.mean == 0.5
    assert disagree.high - disagree.low > 2 * (agree.high - agree.low)
    assert disagree.low <= 0.25 and disagree.high >= 0.75  # draws that take one seed twice


def test_macro_average_weighs_tasks_equally():
    bootstrap = Bootstrap(seeds=1, items={"a": 2, "b": 8})
    estimate = macro_estimate({"a": results("11"), "b": results("00000000")}, bootstrap)
    assert estimate.mean == 0.5


def test_paired_comparison_cancels_the_noise_both_sides_share():
    """B is A with one item flipped per seed: the paired difference is exactly that item, whatever the items'
    own spread, and the interval is far narrower than either side's."""
    generator = np.random.default_rng(0)
    a = (generator.random((3, 100)) < 0.5).astype(np.float64)
    b = a.copy()
    b[:, 0] = 1 - a[:, 0]
    bootstrap = Bootstrap(seeds=3, items={"t": 100})
    comparison = paired_comparison({"t": a}, {"t": b}, bootstrap)
    assert comparison.per_seed == pytest.approx([(a[seed, 0] - b[seed, 0]) / 100 for seed in range(3)])
    own = task_estimates({"t": a}, bootstrap)["t"]
    assert comparison.difference.high - comparison.difference.low < (own.high - own.low) / 4
    identical = paired_comparison({"t": a}, {"t": a}, bootstrap)
    assert (identical.difference.low, identical.difference.high) == (0.0, 0.0) and identical.wins == 0


def test_a_consistent_win_excludes_zero_and_counts_seeds():
    bootstrap = Bootstrap(seeds=3, items={"t": 100})
    a = np.ones((3, 100))
    b = np.ones((3, 100))
    b[:, :30] = 0
    comparison = paired_comparison({"t": a}, {"t": b}, bootstrap)
    assert comparison.difference.mean == pytest.approx(0.3)
    assert comparison.difference.excludes_zero and comparison.wins == 3


def test_recorder_keeps_each_example_and_agrees_with_the_logged_accuracy(tiny_model_dir, tmp_path):
    recorder = ExampleRecorder()
    seesaw = SeesawTracker(tolerance=0.04, plots=False)
    trainer = make_trainer(tmp_path, max_steps=4, callbacks=[PerTaskMetrics(), seesaw, RoutingStats(plots=False), recorder],
                           num_sanity_val_steps=-1, limit_val_batches=None, val_check_interval=2, logger=True)
    data = make_data(tiny_model_dir)
    trainer.fit(make_module(tiny_model_dir), data)
    written = json.loads((tmp_path / "lightning_logs" / "version_0" / "examples_val.json").read_text())
    assert written == recorder.evaluations
    assert [(entry["step"], entry["sanity_check"]) for entry in written] == [(0, True), (2, False), (4, False)]
    # the seesaw figures the quality study recomputes from the records are the tracker's
    tracked = [asdict(point) for point in seesaw.points["val"]]
    assert seesaw_points(written, tolerance=0.04) == tracked
    history = PerTaskMetrics.attached(trainer).evaluations("val")
    for entry, evaluation in zip(written, history):
        assert set(entry["correct"]) == set(evaluation.tasks)
        for task, bits in entry["correct"].items():
            assert len(bits) == evaluation.tasks[task].count == 4
            assert bits.count("1") / len(bits) == pytest.approx(evaluation.tasks[task].accuracy)
    assert written[0]["prompts_digest"] == written[1]["prompts_digest"]  # the same items each time
    # the report rebuilds the evaluated items from the data seed and limit, and knows them by this digest
    assert written[0]["prompts_digest"] == {
        task: prompts_digest([item.prompt for item in get_task(task).examples(
            "validation", seed=data.hparams.data_seed, limit=data.hparams.max_eval_examples_per_task)])
        for task in written[0]["correct"]}
    assert written[0]["routing"] == {}  # Lightning keeps no sanity-check logs
    assert {"task_nmi", "dead_experts", "load_cv"} <= set(written[1]["routing"])
    run = {"seed": 0, "examples": written}
    assert {task: bits.tolist() for task, bits in correctness(run).items()} == \
        {task: [int(bit) for bit in bits] for task, bits in written[1]["correct"].items()}
    restored = ExampleRecorder()
    restored.load_state_dict(recorder.state_dict())
    assert restored.evaluations == recorder.evaluations


def test_seesaw_points_from_records_follow_the_trackers_definition():
    """From per-item records: a task counts as moving when its accuracy changed by more than the tolerance."""
    def bits(right: int) -> str:
        return "1" * right + "0" * (25 - right)

    records = [{"step": 0, "sanity_check": True, "correct": {"a": bits(0), "b": bits(25), "c": bits(0), "d": bits(10)}},
               {"step": 80, "sanity_check": False, "correct": {"a": bits(5), "b": bits(20), "c": bits(1), "d": bits(9)}}]
    before, after = seesaw_points(records, tolerance=0.04)
    assert (before["step"], before["sanity_check"], before["seesaw_index"]) == (0, True, None)
    assert after["tasks"]["a"]["accuracy"] == pytest.approx(0.2) and after["tasks"]["a"]["change"] == pytest.approx(0.2)
    # a rose and b fell by 5 items; c and d moved by one item (0.04), not more than the tolerance: 1 of 6 pairs
    assert (after["improved"], after["degraded"]) == (["a"], ["b"])
    assert after["seesaw_index"] == pytest.approx(1 / 6)
    assert after["tasks"]["b"]["best"] == 1.0 and after["tasks"]["b"]["gap_to_best"] == pytest.approx(0.2)


def fake_run(seed: int, tasks: list[str], correct_per_step: dict[int, int], routed: bool) -> dict:
    """A kept run whose every task has `correct_per_step[step]` of 10 items right at each evaluation."""
    examples = [{"step": step, "sanity_check": step == 0,
                 "correct": {task: "1" * right + "0" * (10 - right) for task in tasks},
                 "routing": {"task_nmi": 0.01 * step, "dead_experts": 2.0, "load_cv": 0.5} if routed and step else {}}
                for step, right in correct_per_step.items()]
    evaluations = [{"step": step, "seesaw_index": None if step == 0 else 0.25} for step in correct_per_step]
    return {"seed": seed, "examples": examples, "evaluations": evaluations, "seesaw_index": 0.25, "seconds": 60.0}


def test_budget_and_conflict_reports_from_kept_runs(tmp_path):
    """The report's numbers follow from hand-built runs: paired differences, the curve table, the conflict cost."""
    from benchmarks.quality_report import StudyRuns, study_report

    suite = ["add_2digit", "parity"]
    steps = {0: 0, 10: 5, 20: 8}
    budget = StudyRuns("budget", 20, 10, 10, [0, 1],
                       {"lora_r64": {s: fake_run(s, suite, steps, False) for s in (0, 1)},
                        "malora": {s: fake_run(s, suite, {**steps, 20: 9}, True) for s in (0, 1)}},
                       {"lora_r64": 1, "malora": 2}, pending=[])
    budget.runs["malora"][1]["restored_evaluations"] = [10]
    budget.runs["malora"][0]["seconds"], budget.runs["malora"][1]["seconds"] = None, 120.0  # 0: resumed at its end
    noise = StudyRuns("noise", 10, 10, 10, [0, 1],
                      {name: {s: fake_run(s, suite, {0: 0, 10: 7}, name == "malora") for s in (0, 1)}
                       for name in ("lora_r64", "malora")}, {"lora_r64": 1, "malora": 2}, pending=[])
    text, payload, figures = study_report(budget, {"noise": noise}, tmp_path)
    assert payload["paired"]["malora - lora_r64"]["mean"] == pytest.approx(0.1)
    assert payload["paired"]["malora - lora_r64"]["per_seed"] == pytest.approx([0.1, 0.1])
    assert payload["curves"]["steps"] == [0, 10, 20]
    assert payload["configurations"]["malora"]["minutes_per_run"] == 2.0  # the run with a known time
    assert payload["curves"]["configurations"]["malora"]["accuracy"] == [[0.0, 0.5, 0.9]] * 2
    assert "| 20 | 80.0 (80.0–80.0) | 90.0 (90.0–90.0) | 0.25 | 0.25 |" in text
    assert "| 20 | 0.200 / 2.0 |" in text  # routing over training: MALoRA only
    assert "lora_r64 70.0, malora 70.0" in text  # the runs trained to the default budget
    assert figures == [tmp_path / "quality_budget.png"] and figures[0].read_bytes()[:4] == b"\x89PNG"
    assert "restored by validating that checkpoint (`quality.restore_evaluation`): malora seed 1 at step(s) 10." in text

    conflict_tasks = suite + ["compare_numbers_smaller"]
    conflict = StudyRuns("conflict", 10, 10, 10, [0, 1],
                         {name: {s: fake_run(s, conflict_tasks, {0: 0, 10: 6}, name == "malora") for s in (0, 1)}
                          for name in ("lora_r64", "malora")}, {"lora_r64": 1, "malora": 2},
                         pending=["malora seed 2"])
    text, payload, _ = study_report(conflict, {"noise": noise}, tmp_path)
    assert payload["conflict"]["malora"]["minus noise"]["difference"]["mean"] == pytest.approx(-0.1)  # 60 vs 70 %
    assert text.startswith("**Incomplete: 1 run(s) still to do** (malora seed 2)")
    assert "with the conflict − with the neutral group" not in text  # no neutral runs: no such column

    # the neutral control: the suite at 65 % with the neutral group, so the conflict costs 5 points beyond it
    neutral_tasks = suite + ["longest_word"]
    neutral = StudyRuns("neutral", 10, 10, 10, [0, 1],
                        {name: {s: fake_run(s, neutral_tasks, {0: 0, 10: 6 if s == 0 else 7}, name == "malora")
                                for s in (0, 1)} for name in ("lora_r64", "malora")},
                        {"lora_r64": 1, "malora": 2}, pending=[])
    text, payload, _ = study_report(neutral, {"noise": noise}, tmp_path)
    assert payload["neutral"]["lora_r64"]["minus noise"]["per_seed"] == pytest.approx([-0.1, 0.0])
    text, payload, _ = study_report(conflict, {"noise": noise, "neutral": neutral}, tmp_path)
    beyond = payload["conflict"]["malora"]["minus neutral"]
    assert beyond["per_seed"] == pytest.approx([0.0, -0.1]) and beyond["difference"]["mean"] == pytest.approx(-0.05)
    assert "| suite: with the conflict − with the neutral group (per seed) |" in text

    # runs of other items are not paired: another data seed, or recorded prompts that differ on a suite task
    other_seed = StudyRuns("noise", 10, 10, 10, [0, 1], noise.runs, noise.trainable, pending=[], data_seed=1)
    _, payload, _ = study_report(conflict, {"noise": other_seed}, tmp_path)
    assert payload["conflict"] == {"lora_r64": {}, "malora": {}}
    for runs, items in ((noise.runs, "noise items"), (conflict.runs, "conflict items")):
        for run in runs["malora"].values():
            run["examples"][-1]["prompts_digest"] = {"parity": items}
    _, payload, _ = study_report(conflict, {"noise": noise}, tmp_path)
    assert "minus noise" not in payload["conflict"]["malora"] and "minus noise" in payload["conflict"]["lora_r64"]
