"""The quality reports' chance baseline (benchmarks/quality_report.py): the majority answer's accuracy on the items the
runs evaluated, not `Task.chance_rate` (the test split's), on hand-built runs."""

import pytest

from benchmarks.quality_report import StudyRuns, prompts_digest, study_report
from malora_lightning.data import get_task

TASKS = ["compare_numbers", "odd_one_out"]
ITEMS = 20


def kept_run(seed: int, right: dict[str, int], digests: dict[str, str]) -> dict:
    """A kept run with `right[task]` of its task's 20 items right after training (none before) and these prompts
    digests recorded at both evaluations."""
    examples = [{"step": step, "sanity_check": step == 0, "prompts_digest": digests, "routing": {},
                 "correct": {task: "1" * (right[task] if step else 0) + "0" * (ITEMS - (right[task] if step else 0))
                             for task in TASKS}}
                for step in (0, 10)]
    return {"seed": seed, "examples": examples, "seesaw_index": None, "seconds": 60.0}


def study(digests: dict[str, str]) -> StudyRuns:
    # compare_numbers 13 of 20 (65 %), odd_one_out 8 of 20 (40 %)
    runs = {"malora": {0: kept_run(0, {"compare_numbers": 13, "odd_one_out": 8}, digests)}}
    return StudyRuns("noise", 10, 10, ITEMS, [0], runs, {"malora": 1}, pending=[], data_seed=0)


def evaluated_digests() -> dict[str, str]:
    return {task: prompts_digest([item.prompt for item in get_task(task).examples("validation", seed=0, limit=ITEMS)])
            for task in TASKS}


def test_chance_and_worst_task_use_the_majority_answer_on_the_evaluated_items(tmp_path):
    """On these 20 validation items always answering the majority scores 70 % (compare_numbers) and 40 %
    (odd_one_out), against test-split chance rates of 51.5 % and 28 %: 65 % on compare_numbers is 5 points below
    always-majority, the worst task, although it reads 13.5 points above the test split's rate (odd_one_out: 12)."""
    assert (get_task("compare_numbers").chance_rate, get_task("odd_one_out").chance_rate) == (0.515, 0.28)
    text, payload, _ = study_report(study(evaluated_digests()), {}, tmp_path)
    assert payload["majority_rate"] == {"compare_numbers": 0.7, "odd_one_out": 0.4}
    assert payload["majority_rate_from_test_split"] == []
    assert payload["configurations"]["malora"]["worst_task"] == ("compare_numbers", pytest.approx(0.65))
    assert "| chance: majority answer on the evaluated items | – | 70.0 | 40.0 | 55.0 |" in text
    assert "| compare_numbers 65.0 |" in text


def test_items_that_cannot_be_rebuilt_fall_back_to_the_chance_rate(tmp_path):
    """A recorded digest that the rebuilt items do not match (another data seed, limit or generator): the task's
    evaluated items are unknown, so its baseline is `Task.chance_rate`, marked in the row."""
    digests = {**evaluated_digests(), "odd_one_out": "0" * 16}
    text, payload, _ = study_report(study(digests), {}, tmp_path)
    assert payload["majority_rate"] == {"compare_numbers": 0.7, "odd_one_out": 0.28}
    assert payload["majority_rate_from_test_split"] == ["odd_one_out"]
    assert ("| chance: majority answer on the evaluated items (* the test split's: evaluated items unknown) | – | "
            "70.0 | 28.0* |") in text


def test_a_report_without_kept_runs_leaves_the_stored_report_as_it_is(monkeypatch, capsys):
    """`--report-only` on a machine without the study's kept runs replaced its report (numbers, intervals, paired
    differences) with "No runs yet"."""
    from benchmarks import quality

    def refuse(*args, **kwargs):
        raise AssertionError("a report was written")

    monkeypatch.setattr(quality, "kept_result", lambda *args: None)
    monkeypatch.setattr(quality, "write_report", refuse)
    monkeypatch.setattr("sys.argv", ["quality", "--study", "conflict", "--report-only"])
    quality.main()
    out = capsys.readouterr().out
    assert "conflict: no kept run under" in out and "quality_conflict.md and .json are left as they are" in out
    assert "written:" not in out
