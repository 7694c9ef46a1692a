"""SeesawTracker figures on hand-built score sequences, and the baseline file's checks."""

import json

import pytest
import torch

from malora_lightning.callbacks import Evaluation, PerTaskMetrics, SeesawTracker, TaskScore, load_baseline_scores
from malora_lightning.callbacks.seesaw import direction, seesaw_index, track
from tests.callbacks.test_per_task_metrics import HandBuiltTraining, trainer_for


def evaluation(step: int, accuracies: dict[str, float | None], sanity: bool = False) -> Evaluation:
    return Evaluation(stage="val", step=step, sanity_check=sanity,
                      tasks={name: TaskScore(loss=1.0, accuracy=value, count=10) for name, value in accuracies.items()})


# "lm" has no accuracy and never takes part.
SEQUENCE = [
    evaluation(0, {"a": 0.50, "b": 0.50, "c": 0.50, "d": 0.50, "lm": None}, sanity=True),
    evaluation(10, {"a": 0.60, "b": 0.40, "c": 0.505, "d": 0.70, "lm": None}),
    evaluation(20, {"a": 0.55, "b": 0.45, "c": 0.52, "d": 0.70, "lm": None}),
]


def test_seesaw_index_counts_pairs_that_moved_in_opposite_directions():
    first, second, third = track(SEQUENCE, tolerance=0.01)
    assert first.seesaw_index is None and first.improved == first.degraded == []
    assert all(task.change is None for task in first.tasks.values()) and "lm" not in first.tasks
    # step 10: a +10, b -10, c +0.5 (inside the tolerance), d +20 points; of the 6 pairs, (a, b) and (b, d) see-saw
    assert second.seesaw_index == pytest.approx(2 / 6)
    assert (second.improved, second.degraded) == (["a", "d"], ["b"])
    assert second.tasks["c"].change == pytest.approx(0.005)
    # step 20: a -5, b +5, c +1.5, d 0 points; (a, b) and (a, c) see-saw
    assert third.seesaw_index == pytest.approx(2 / 6)
    assert (third.improved, third.degraded) == (["b", "c"], ["a"])


def test_best_and_gap_to_best_per_task():
    final = track(SEQUENCE, tolerance=0.01)[-1]
    expected = {"a": (0.60, 10, 0.05), "b": (0.50, 0, 0.05), "c": (0.52, 20, 0.0), "d": (0.70, 10, 0.0)}
    for name, (best, step, gap) in expected.items():
        task = final.tasks[name]
        assert (task.best, task.best_step) == (pytest.approx(best), step), name
        assert task.gap_to_best == pytest.approx(gap), name


def test_seesaw_index_extremes_and_a_strict_tolerance():
    assert seesaw_index({"a": 0.1, "b": -0.1}, 0.01) == 1.0
    assert seesaw_index({"a": 0.1, "b": 0.2, "c": 0.3}, 0.01) == 0.0  # all rose together
    assert seesaw_index({"a": 0.02, "b": -0.02}, 0.02) == 0.0  # a change equal to the tolerance does not count
    assert seesaw_index({"a": 0.3}, 0.01) is None


@pytest.mark.parametrize("tolerance", [0.01, 0.04])
def test_a_move_of_exactly_the_tolerance_never_counts_whatever_the_float32_rounding(tolerance):
    """Accuracies are float32 means of 100 items: k and k + 100 * tolerance items differ from `tolerance` by rounding,
    above it for about half of the k (the recipe's 0.04 counted a 4-item move in 50 of 97 starts)."""
    items = round(100 * tolerance)
    accuracy = [float(torch.tensor([1.0] * k + [0.0] * (100 - k)).mean()) for k in range(101)]
    for k in range(101 - items):  # one task rises from k items by exactly the tolerance, the other falls to k
        assert seesaw_index({"up": accuracy[k + items] - accuracy[k], "down": accuracy[k] - accuracy[k + items]},
                            tolerance) == 0.0, k
    for k in range(100 - items):  # one item more is more than the tolerance
        assert seesaw_index({"up": accuracy[k + items + 1] - accuracy[k],
                             "down": accuracy[k] - accuracy[k + items + 1]}, tolerance) == 1.0, k


@pytest.mark.parametrize("tolerance", [0.01, 0.04])
def test_a_rise_or_a_fall_of_exactly_the_tolerance_is_no_move_on_its_own(tolerance):
    """The pair test above needs both tasks to move: a margin dropped on one side only left it passing."""
    items = round(100 * tolerance)
    accuracy = [float(torch.tensor([1.0] * k + [0.0] * (100 - k)).mean()) for k in range(101)]
    for k in range(101 - items):
        assert direction(accuracy[k + items] - accuracy[k], tolerance) == 0, k
        assert direction(accuracy[k] - accuracy[k + items], tolerance) == 0, k
    for k in range(100 - items):
        assert direction(accuracy[k + items + 1] - accuracy[k], tolerance) == 1, k
        assert direction(accuracy[k] - accuracy[k + items + 1], tolerance) == -1, k


def test_a_task_missing_from_an_evaluation_moves_from_its_last_score():
    """The change of a task is against its previous evaluation, also when the one before had no score of it."""
    first, second, third = track([evaluation(0, {"a": 0.5, "b": 0.5}), evaluation(10, {"a": 0.6}),
                                  evaluation(20, {"a": 0.6, "b": 0.3})], tolerance=0.01)
    assert "b" not in second.tasks
    assert third.tasks["b"].change == pytest.approx(-0.2) and third.tasks["a"].change == pytest.approx(0.0)
    assert (third.improved, third.degraded) == ([], ["b"])


def test_a_task_at_its_baseline_is_no_negative_transfer():
    (point,) = track([evaluation(10, {"a": 0.5, "b": 0.4})], tolerance=0.01, baseline={"a": 0.5, "b": 0.5})
    assert point.tasks["a"].relative_gain == 0.0
    assert point.negative_transfer == 1  # b alone: 0.4 against 0.5


def test_a_float32_accuracy_equal_to_its_baseline_is_no_negative_transfer():
    """PerTaskMetrics' accuracies are float32 means: 7 of 10 items is 0.69999999 against a baseline file's 0.7, and a
    run that matched every single-task score reported negative transfer on every task (worst -0.0 %)."""
    accuracy = {f"k{k}": float(torch.tensor([1.0] * k + [0.0] * (100 - k)).mean()) for k in range(1, 101)}
    (point,) = track([evaluation(10, accuracy)], tolerance=0.01,
                     baseline={name: int(name[1:]) / 100 for name in accuracy})
    assert {task.relative_gain for task in point.tasks.values()} == {0.0}
    assert (point.delta_mtl, point.negative_transfer, point.worst_relative_gain) == (0.0, 0, 0.0)


def test_the_report_shows_a_validate_or_test_evaluation_only_against_a_baseline(tmp_path):
    """RunReport already lists those scores: without a baseline the tracker adds nothing for them."""
    no_trainer_callbacks = type("Trainer", (), {"callbacks": []})()
    plain = SeesawTracker(plots=False)
    plain.points["test"] = track([evaluation(10, {"a": 0.6})], tolerance=0.01)
    assert plain.report_sections(no_trainer_callbacks) == []
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"a": 0.5}))
    compared = SeesawTracker(baseline_scores=str(path), plots=False)
    compared.points["test"] = track([evaluation(10, {"a": 0.6})], tolerance=0.01, baseline={"a": 0.5})
    (section,) = compared.report_sections(no_trainer_callbacks)
    assert section.startswith("## Transfer (test)") and "| a | 60.0 | 50.0 | +20.0 |" in section


def test_evaluations_in_processes_of_their_own_keep_each_others_series(tmp_path):
    """A fit, then `malora test` and `malora validate` in its folder (no logger), each a process of its own: the
    validate wrote the fit's series and its own, and the test's was gone from seesaw.json (its routing_test.json
    and report stayed)."""
    def stages() -> dict[str, list]:
        return json.loads((tmp_path / "seesaw.json").read_text())["stages"]

    trainer_for(tmp_path, callbacks=[PerTaskMetrics(), SeesawTracker(plots=False)], max_steps=1,
                val_check_interval=1).fit(HandBuiltTraining())
    fitted = stages()["val"]
    for run in ("test", "validate", "test"):  # a fresh trainer, callbacks and module each
        if run == "test" and "validate" in stages():  # the first test's series, as if of a checkpoint of step 3
            data = json.loads((tmp_path / "seesaw.json").read_text())
            data["stages"]["test"][0].update(step=3, checkpoint="epoch=0-step=3.ckpt")
            (tmp_path / "seesaw.json").write_text(json.dumps(data))
        getattr(trainer_for(tmp_path, callbacks=[PerTaskMetrics(), SeesawTracker(plots=False)]), run)(
            HandBuiltTraining(), verbose=False)
    assert list(stages()) == ["val", "test", "validate"] and stages()["val"] == fitted
    assert [len(stages()[name]) for name in ("test", "validate")] == [1, 1]
    # the test's rerun replaced its own series with its own evaluation, not the one on file
    assert (stages()["test"][0]["step"], stages()["test"][0]["checkpoint"]) == (0, None)


def test_relative_gain_negative_transfer_and_delta_mtl():
    baseline = {"a": 0.5, "b": 0.6, "c": 0.4}  # no baseline for d: it stays out of Delta-MTL
    final = track(SEQUENCE, tolerance=0.01, baseline=baseline)[-1]
    gains = {"a": (0.55 - 0.5) / 0.5, "b": (0.45 - 0.6) / 0.6, "c": (0.52 - 0.4) / 0.4}  # +10 %, -25 %, +30 %
    assert {name: final.tasks[name].relative_gain for name in gains} == pytest.approx(gains)
    assert final.tasks["d"].relative_gain is None
    assert final.delta_mtl == pytest.approx((0.10 - 0.25 + 0.30) / 3)
    assert final.negative_transfer == 1
    assert final.worst_relative_gain == pytest.approx(-0.25)
    assert track(SEQUENCE, tolerance=0.01)[-1].delta_mtl is None


def test_negative_transfer_is_counted_out_of_the_tasks_that_have_a_baseline(tmp_path):
    """Only a task with a single-task score can transfer negatively: "1 of 5 tasks" would understate it."""
    path = tmp_path / "single_task.json"
    path.write_text(json.dumps({"a": 0.5, "b": 0.6, "c": 0.4}))  # d has none; lm has no accuracy
    tracker = SeesawTracker(baseline_scores=str(path))
    table = tracker._task_table(track(SEQUENCE, 0.01, tracker.baseline)[-1], movement=True)
    assert "negative transfer on 1 of 3 tasks with a baseline" in table


@pytest.mark.parametrize("content, message", [
    ("{not json", "is not valid JSON"),
    ('["a", 0.5]', "non-empty JSON object"),
    ("{}", "non-empty JSON object"),
    ('{"a": 0.5, "b": 1.5}', "task 'b' has score 1.5"),
    ('{"a": 0}', "task 'a' has score 0"),
    ('{"a": true}', "task 'a' has score True"),
    ('{"a": "0.5"}', "task 'a' has score '0.5'"),
    ('{"a": 0.5, "a": 0.9}', "an object names 'a' more than once"),  # the last score was kept without a word
])
def test_bad_baseline_files_are_refused_naming_the_file_and_task(tmp_path, content, message):
    path = tmp_path / "single_task.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as error:
        SeesawTracker(baseline_scores=str(path))
    assert str(path) in str(error.value)


@pytest.mark.parametrize("kind", ["missing", "folder", "latin-1"])
def test_a_baseline_file_that_cannot_be_read_is_named_as_the_baseline_scores_file(tmp_path, kind):
    """A missing file raised a bare "[Errno 2] No such file or directory: 'nofile.json'" (which the CLI wrapped in
    its type errors), a folder IsADirectoryError, non-UTF-8 bytes UnicodeDecodeError."""
    path = tmp_path / "single_task.json"
    if kind == "folder":
        path.mkdir()
    elif kind == "latin-1":
        path.write_bytes('{"t\xe2che": 0.5}'.encode("latin-1"))
    error_type, words = {"missing": (FileNotFoundError, "not found"), "folder": (FileNotFoundError, "a folder"),
                         "latin-1": (ValueError, "is not valid JSON")}[kind]
    with pytest.raises(error_type, match=f"baseline scores file .*single_task.json.*{words}"):
        SeesawTracker(baseline_scores=str(path))


@pytest.mark.parametrize("encoding", ["utf-8", "utf-8-sig"])  # with a byte-order mark, as Windows editors write
def test_baseline_scores_load_as_floats(tmp_path, encoding):
    path = tmp_path / "single_task.json"
    path.write_text(json.dumps({"a": 1, "b": 0.25}), encoding=encoding)
    assert load_baseline_scores(path) == {"a": 1.0, "b": 0.25}


@pytest.mark.parametrize("tolerance", [-0.1, 1.0, "0.1", False, float("nan")])
def test_tolerance_must_be_an_accuracy_change(tolerance):
    with pytest.raises(ValueError, match="tolerance"):
        SeesawTracker(tolerance=tolerance)


@pytest.mark.parametrize("plots", ["false", 0, None])
def test_plots_must_be_a_bool(plots):
    """'false' was truthy: the curves were drawn."""
    with pytest.raises(ValueError, match=f"plots={plots!r} is invalid: expected True or False"):
        SeesawTracker(plots=plots)


def test_without_per_task_metrics_the_tracker_says_what_to_switch_for_the_cli_and_for_a_trainer():
    """It told CLI users to add PerTaskMetrics to the trainer's callbacks after `--per_task_metrics null`."""
    from types import SimpleNamespace

    with pytest.raises(ValueError, match=r"keep per_task_metrics on \(or switch the tracker off too: --seesaw null\); "
                                         r"with a Trainer of your own add malora_lightning\.callbacks\.PerTaskMetrics"):
        SeesawTracker().setup(SimpleNamespace(callbacks=[]), None, "fit")
