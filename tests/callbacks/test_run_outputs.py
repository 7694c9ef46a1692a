"""The callbacks together on a tiny random Llama: what is logged, the JSON files, the PNGs and the run report."""

import csv
import io
import json
import logging
import re
import warnings
from dataclasses import asdict

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from malora_lightning.adapters import AdapterConfig, save_adapters
from malora_lightning.adapters.model import routing_context
from malora_lightning.callbacks import PerTaskMetrics, RoutingStats, RunReport, SeesawTracker
from malora_lightning.callbacks.plots import is_our_plot
from malora_lightning.callbacks.seesaw import track
from malora_lightning.callbacks.summary import restored_note, weights_label
from malora_lightning.data.batches import EvaluationOutput
from malora_lightning.module import MALoRAModule
from tests.test_module import TASKS, make_data, make_module, make_trainer

BASELINE = {"add_2digit": 0.5, "parity": 0.5, "reverse_words": 0.25}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


class ObserversDuringTraining(Callback):
    """Records how many routing observers are attached at every training batch (training must pay nothing)."""

    def __init__(self) -> None:
        self.counts: list[int] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.counts.append(len(routing_context(pl_module.model).observers))


def scoring_tokens(batch) -> int:
    """Non-padding tokens of the rows the loss comes from: input_ids, or each multiple-choice example's gold row."""
    if batch.choices is None:
        return int(batch.attention_mask.sum())
    gold_rows = [int((batch.choices.example_index < example).sum()) + int(gold)
                 for example, gold in enumerate(batch.choices.gold)]
    return int(batch.choices.attention_mask[gold_rows].sum())


def real_tokens_per_task(data) -> dict[str, int]:
    """Scoring tokens of every validation batch, counted from the data itself."""
    return {name: sum(scoring_tokens(batch) for batch in loader) for name, loader in data.val_dataloader().items()}


def assert_png(path) -> None:
    content = path.read_bytes()
    assert content.startswith(PNG_SIGNATURE) and len(content) > 2000, path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dir, tmp_path_factory):
    """Fit for 2 steps with a validation after each (plus the sanity check), then test; shared by the tests below."""
    root = tmp_path_factory.mktemp("run")
    baseline_file = root / "single_task.json"
    baseline_file.write_text(json.dumps(BASELINE))
    # SeesawTracker comes before PerTaskMetrics on purpose: it must not depend on the callback order
    seesaw, metrics, routing = SeesawTracker(baseline_scores=str(baseline_file)), PerTaskMetrics(), RoutingStats()
    observers = ObserversDuringTraining()
    trainer = make_trainer(root, max_steps=2, limit_val_batches=None, num_sanity_val_steps=-1, val_check_interval=1,
                           enable_checkpointing=True, logger=CSVLogger(root), log_every_n_steps=1,
                           callbacks=[seesaw, metrics, routing, RunReport(), observers])
    data = make_data(tiny_model_dir)
    module = make_module(tiny_model_dir)
    trainer.fit(module, data)
    validation_metrics = {key: value.item() for key, value in trainer.callback_metrics.items()}
    trainer.test(module, data, verbose=False)
    return dict(trainer=trainer, data=data, module=module, seesaw=seesaw, metrics=metrics, routing=routing,
                observers=observers, validation_metrics=validation_metrics,
                run_dir=root / "lightning_logs" / "version_0" / "checkpoints")


def test_routing_counts_every_real_scoring_token_once_per_layer(finished_run):
    summary = finished_run["routing"].results["val"]
    tokens = real_tokens_per_task(finished_run["data"])
    top_k = finished_run["module"].adapter_config.top_k
    assert summary.tasks == TASKS and len(summary.layers) == 12  # 2 layers x 6 projections
    for name, layer in summary.layers.items():
        # prompt + answer tokens of the scoring forward only: choice scoring and generation are not counted
        assert {task: int(layer.task_load[i].sum()) for i, task in enumerate(TASKS)} == \
            {task: top_k * tokens[task] for task in TASKS}, name
        assert 0.0 < layer.normalized_entropy <= 1.0


def test_no_observer_is_attached_outside_evaluation(finished_run):
    assert finished_run["observers"].counts == [0, 0]
    assert routing_context(finished_run["module"].model).observers == []


def test_json_files_hold_the_seesaw_and_routing_figures(finished_run):
    run_dir, metrics = finished_run["run_dir"], finished_run["metrics"]
    saved = json.loads((run_dir / "seesaw.json").read_text())
    expected = [asdict(point) for point in track(metrics.evaluations("val"), 0.01, BASELINE)]
    assert len(expected) == 3 and saved["stages"]["val"] == expected
    assert saved["baseline"] == BASELINE and len(saved["stages"]["test"]) == 1

    routing = json.loads((run_dir / "routing_val.json").read_text())
    summary = finished_run["routing"].results["val"]
    assert routing["step"] == 2 and set(routing["layers"]) == set(summary.layers)
    first = next(iter(summary.layers))
    assert routing["layers"][first]["task_load"] == summary.layers[first].task_load.tolist()
    assert routing["health"]["load_cv_mean"] == pytest.approx(
        sum(layer.load_cv for layer in summary.layers.values()) / len(summary.layers))
    assert (run_dir / "routing_test.json").is_file()


def test_scalars_reach_the_logger(finished_run):
    logged = finished_run["validation_metrics"]
    for task, baseline in BASELINE.items():
        assert logged[f"val/{task}/rel_gain"] == pytest.approx((logged[f"val/{task}/acc"] - baseline) / baseline)
    assert logged["val/delta_mtl"] == pytest.approx(sum(logged[f"val/{task}/rel_gain"] for task in TASKS) / 3)
    assert logged["val/routing/dead_experts"] == sum(
        len(layer["dead_experts"]) for layer in json.loads(
            (finished_run["run_dir"] / "routing_val.json").read_text())["layers"].values())
    log_dir = finished_run["run_dir"].parent
    with open(log_dir / "metrics.csv") as handle:
        columns = set(next(csv.reader(handle)))
    assert {"val/seesaw_index", "val/delta_mtl", "val/parity/acc_change", "val/routing/load_cv",
            "val/routing/task_nmi", "test/routing/load_cv", "test/delta_mtl"} <= columns


def test_pngs_and_report_are_written(finished_run):
    run_dir = finished_run["run_dir"]
    for name in ("task_accuracy.png", "expert_load_val.png", "task_expert_val.png", "expert_load_test.png",
                 "task_expert_test.png"):
        assert_png(run_dir / "plots" / name)
    report = (run_dir / "report_test.md").read_text()  # the test's, after the fit's: every section so far
    for heading in ("## Seesaw over training (validation)", "## Transfer (test)", "## Routing health (validation)",
                    "## Routing health (test)"):
        assert heading in report
    assert "![Validation accuracy per task](plots/task_accuracy.png)" in report
    assert "(plots/expert_load_val.png)" in report and "Delta-MTL" in report
    final = finished_run["seesaw"].points["val"][-1]
    assert f"{100 * final.delta_mtl:+.1f} %" in report


def test_seesaw_needs_per_task_metrics(tiny_model_dir, tmp_path):
    trainer = make_trainer(tmp_path, callbacks=[SeesawTracker()])
    with pytest.raises(ValueError, match="add malora_lightning.callbacks.PerTaskMetrics"):
        trainer.validate(make_module(tiny_model_dir), make_data(tiny_model_dir), verbose=False)


def test_a_baseline_for_an_unknown_task_is_refused(tiny_model_dir, tmp_path):
    path = tmp_path / "single_task.json"
    path.write_text(json.dumps({"parity": 0.5, "parrity": 0.6}))
    trainer = make_trainer(tmp_path, callbacks=[PerTaskMetrics(), SeesawTracker(baseline_scores=str(path))])
    with pytest.raises(ValueError, match=r"names task\(s\) \['parrity'\]"):
        trainer.validate(make_module(tiny_model_dir), make_data(tiny_model_dir), verbose=False)


def test_lora_has_no_routing_to_report(tiny_model_dir, tmp_path, caplog):
    """Said as a note: the default recipes attach RoutingStats to the README's LoRA runs too, where it warned."""
    routing = RoutingStats()
    trainer = make_trainer(tmp_path, callbacks=[routing], limit_val_batches=None)
    module = make_module(tiny_model_dir, adapter=AdapterConfig(method="lora", rank=2))
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO):
        warnings.simplefilter("always")
        trainer.validate(module, make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    assert "no routed adapter layers" in caplog.text
    assert not [w for w in caught if "no routed adapter layers" in str(w.message)]
    assert routing.results == {} and routing.report_sections(trainer) == []


def test_routing_figures_do_not_depend_on_the_eval_batch_size(tiny_model_dir, tmp_path):
    """Padding differs with the batch composition; the counts over real tokens must not."""
    results = []
    for batch_size in (1, 4):
        routing = RoutingStats(plots=False)
        torch.manual_seed(0)
        trainer = make_trainer(tmp_path / str(batch_size), callbacks=[routing], limit_val_batches=None)
        trainer.validate(make_module(tiny_model_dir), make_data(tiny_model_dir, eval_batch_size=batch_size,
                                                                tasks=["add_2digit"]), verbose=False)
        results.append(routing.results["validate"])
    for name, layer in results[0].layers.items():
        assert torch.equal(layer.task_load, results[1].layers[name].task_load), name
        assert layer.entropy_sum == pytest.approx(results[1].layers[name].entropy_sum, rel=1e-4)


class ExtraForwardModule(MALoRAModule):
    """Evaluates with an extra forward of the same shape first (as a calibration pass might): RoutingStats must count
    the declared scoring pass only, not guess it from shapes."""

    def evaluate_batch(self, batch):
        with torch.no_grad():
            self.model(input_ids=batch.input_ids.flip(1), attention_mask=batch.attention_mask)
        return super().evaluate_batch(batch)


def test_routing_counts_the_declared_scoring_pass_only(tiny_model_dir, tmp_path):
    results = []
    for module_class in (MALoRAModule, ExtraForwardModule):
        routing = RoutingStats(plots=False)
        torch.manual_seed(0)
        module = module_class(**make_module(tiny_model_dir).hparams)  # the same settings, the adapter as a dict
        trainer = make_trainer(tmp_path / module_class.__name__, callbacks=[routing], limit_val_batches=None)
        trainer.validate(module, make_data(tiny_model_dir, tasks=["parity", "add_2digit"]), verbose=False)
        results.append(routing.results["validate"])
    for name, layer in results[0].layers.items():
        assert layer.task_load.sum() > 0
        assert torch.equal(layer.task_load, results[1].layers[name].task_load), name


class UndeclaredScoringModule(MALoRAModule):
    """Evaluates through its own forward without declaring it a scoring pass: RoutingStats counts no token."""

    def evaluate_batch(self, batch):
        with torch.no_grad():
            self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
        names = batch.task_name
        return EvaluationOutput(names, loss=torch.ones(len(names)), correct=torch.zeros(len(names), dtype=torch.bool))


def test_routing_without_a_counted_token_reports_no_dead_expert_count(tiny_model_dir, tmp_path):
    """It logged val/routing/dead_experts = 0 and the report said "0 of 48" dead experts, which reads as healthy."""
    routing = RoutingStats(plots=False)
    trainer = make_trainer(tmp_path, callbacks=[PerTaskMetrics(), routing], limit_val_batches=None)
    module = UndeclaredScoringModule(**make_module(tiny_model_dir).hparams)
    with pytest.warns(UserWarning, match="no scoring pass was seen in the val batches"):
        trainer.validate(module, make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    health = routing.results["validate"].health()
    assert health["tokens"] == 0 and health["dead_experts"] is None and health["load_cv_mean"] is None
    assert "val/routing/dead_experts" not in trainer.callback_metrics and "val/parity/loss" in trainer.callback_metrics
    assert "| - of 48 |" in routing.report_sections(trainer)[0]
    saved = json.loads((tmp_path / "routing_validate.json").read_text())
    assert saved["health"]["dead_experts"] is None
    assert {layer["dead_experts"] for layer in saved["layers"].values()} == {None}


def test_trainer_validate_after_a_fit_keeps_the_fits_routing_apart(tiny_model_dir, tmp_path):
    """trainer.validate (here on parity alone) after the fit replaced the fit's results["val"], routing_val.json, its
    heatmaps and the report's "Routing health (validation)"; it now has a series of its own, as in seesaw.json."""
    routing = RoutingStats()
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, val_check_interval=1,
                           callbacks=[PerTaskMetrics(), routing])
    module = make_module(tiny_model_dir)
    trainer.fit(module, make_data(tiny_model_dir))
    fit_files = {name: (tmp_path / name).read_bytes() for name in
                 ("routing_val.json", "plots/expert_load_val.png", "plots/task_expert_val.png")}
    trainer.validate(module, make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    assert routing.results["val"].tasks == TASKS and routing.results["validate"].tasks == ["parity"]
    assert {name: (tmp_path / name).read_bytes() for name in fit_files} == fit_files
    assert json.loads((tmp_path / "routing_validate.json").read_text())["tasks"] == ["parity"]
    assert_png(tmp_path / "plots" / "expert_load_validate.png")
    assert "val/routing/load_cv" in trainer.callback_metrics  # logged under the Lightning stage, as before
    fit_section, validate_section = routing.report_sections(trainer)
    assert fit_section.startswith("## Routing health (validation)\n") and "| add_2digit |" in fit_section
    assert validate_section.startswith("## Routing health (validation outside training, trainer.validate)\n")
    assert "| add_2digit |" not in validate_section and "(plots/expert_load_validate.png)" in validate_section


def test_a_test_in_a_folder_without_a_fits_files_writes_its_own(tiny_model_dir, tmp_path):
    """`malora test` in a folder of its own: the check for the fit's later validations reads seesaw.json and
    routing_val.json, which are not there, and finds none (not a FileNotFoundError after the test had run)."""
    trainer = make_trainer(tmp_path, limit_test_batches=None,
                           callbacks=[PerTaskMetrics(), SeesawTracker(), RoutingStats(), RunReport()])
    trainer.test(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    assert list(json.loads((tmp_path / "seesaw.json").read_text())["stages"]) == ["test"]
    assert json.loads((tmp_path / "routing_test.json").read_text())["tasks"] == ["parity"]
    assert not (tmp_path / "routing_val.json").exists()
    assert_png(tmp_path / "plots" / "expert_load_test.png")
    assert "## Test accuracy (%) per task" in (tmp_path / "report_test.md").read_text()
    # a rerun: the seesaw.json there now holds no fit's series to keep
    trainer = make_trainer(tmp_path, limit_test_batches=None, callbacks=[PerTaskMetrics(), SeesawTracker()])
    trainer.test(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    stages = json.loads((tmp_path / "seesaw.json").read_text())["stages"]
    assert list(stages) == ["test"] and len(stages["test"]) == 1


def test_a_test_without_a_checkpoint_in_the_fits_folder_keeps_the_fits_routing_and_seesaw(tiny_model_dir, tmp_path):
    """A new process tests the weights at hand (no --ckpt_path) where a fit wrote routing_val.json and seesaw.json:
    it holds no routing or validation of the fit's, which is no earlier validation than the files' to compare (nor
    a reason to fail), and the fit's series stays in seesaw.json."""
    fit = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, val_check_interval=1,
                       callbacks=[PerTaskMetrics(), SeesawTracker(), RoutingStats()])
    fit.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    fit_files = {name: (tmp_path / name).read_bytes() for name in ("routing_val.json", "plots/expert_load_val.png",
                                                                     "plots/task_accuracy.png")}
    fit_series = json.loads((tmp_path / "seesaw.json").read_text())["stages"]["val"]
    routing = RoutingStats()
    make_trainer(tmp_path, limit_test_batches=None, callbacks=[PerTaskMetrics(), SeesawTracker(), routing]).test(
        make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    assert list(routing.results) == ["test"]
    assert {name: (tmp_path / name).read_bytes() for name in fit_files} == fit_files
    assert json.loads((tmp_path / "routing_test.json").read_text())["step"] == 0
    stages = json.loads((tmp_path / "seesaw.json").read_text())["stages"]
    assert [point["step"] for point in fit_series] == [1]
    assert list(stages) == ["val", "test"] and stages["val"] == fit_series


def test_routing_of_a_checkpoint_is_labelled_with_its_step(tiny_model_dir, tmp_path):
    """validate(ckpt_path=...) loads the checkpoint's weights and leaves the trainer's step (0 here) as it was. The
    section and the pictures' titles name the checkpoint as the score tables do: they said "Step 1" alone."""
    make_trainer(tmp_path, max_steps=1, enable_checkpointing=True).fit(make_module(tiny_model_dir),
                                                                       make_data(tiny_model_dir, tasks=["parity"]))
    routing = RoutingStats(plots=False)
    trainer = make_trainer(tmp_path / "evaluation", callbacks=[routing], limit_val_batches=None)
    trainer.validate(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]),
                     ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=1.ckpt"), verbose=False)
    assert routing.results["validate"].step == 1
    assert routing.results["validate"].weights == "step 1, epoch=0-step=1.ckpt"  # the pictures' titles
    (section,) = routing.report_sections(trainer)
    assert section.startswith("## Routing health (validation outside training, trainer.validate)\n\n"
                              "Step 1, epoch=0-step=1.ckpt: ")
    assert "ckpt" not in (tmp_path / "evaluation" / "routing_validate.json").read_text()  # its JSON is unchanged


def test_a_fit_after_a_validation_of_a_checkpoint_reports_its_own_routing_as_not_restored(tiny_model_dir, tmp_path):
    """validate(ckpt_path=...) in a fresh process restores the fit's routing and names the checkpoint; a fit in that
    process then validates and replaces it, and its section must not say it was restored from the checkpoint."""
    routing = RoutingStats(plots=False)
    routing.restored_from = "step=1.ckpt"  # what the validation of a checkpoint with the fit's routing leaves
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, val_check_interval=1,
                           callbacks=[PerTaskMetrics(), routing])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    (section,) = routing.report_sections(trainer)
    assert routing.restored_from is None and section.startswith("## Routing health (validation)\n\nStep 1: ")


def test_a_fit_after_a_validation_of_a_checkpoint_reports_its_own_history(tiny_model_dir, tmp_path):
    """validate(ckpt_path=...) in a fresh process restores the checkpoint's fit history; a fit in that process starts
    again at step 0, and its history must not continue the restored one nor say it was restored."""
    make_trainer(tmp_path, max_steps=1, enable_checkpointing=True, limit_val_batches=None, val_check_interval=1,
                 callbacks=[PerTaskMetrics()]).fit(make_module(tiny_model_dir),
                                                   make_data(tiny_model_dir, tasks=["parity"]))
    metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path / "evaluation", max_steps=1, limit_val_batches=None, val_check_interval=1,
                           callbacks=[metrics, RunReport()])
    module, data = make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"])
    trainer.validate(module, data, ckpt_path=str(tmp_path / "checkpoints" / "epoch=0-step=1.ckpt"), verbose=False)
    assert metrics.restored_from == "epoch=0-step=1.ckpt" and metrics.evaluations("val", during_fit=True)
    trainer.fit(module, data)
    assert metrics.restored_from is None
    assert [(e.step, e.checkpoint) for e in metrics.evaluations("val", during_fit=True)] == [(1, None)]
    assert [e.checkpoint for e in metrics.evaluations("val", during_fit=False)] == ["epoch=0-step=1.ckpt"]
    validation = report_sections_of(tmp_path / "evaluation")["Validation accuracy (%) per task"]
    assert "| accuracy (step 1) |" in validation and "restored" not in validation


def test_routing_of_a_partial_sanity_check_is_not_reported(tiny_model_dir, tmp_path):
    """1 of parity's 2 validation batches, and no validation during the fit: nothing describes the validation set."""
    routing = RoutingStats(plots=False)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, num_sanity_val_steps=1,
                           val_check_interval=5, check_val_every_n_epoch=None, callbacks=[routing, RunReport()])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"], max_eval_examples_per_task=8))
    assert routing.results == {} and not (tmp_path / "routing_val.json").exists()
    assert "Routing health" not in (tmp_path / "report.md").read_text()


def unmarked_png() -> bytes:
    """A picture drawn by matplotlib, as a user's own would be: without malora_lightning's mark."""
    from matplotlib.figure import Figure
    figure = Figure(figsize=(2, 2))
    figure.subplots().plot([0, 1], [1, 0])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


SEESAW_NOT_OURS = r"seesaw\.json was not written by SeesawTracker \(it holds no JSON object with exactly the keys " \
                  r"tolerance, baseline_file, baseline, stages\).*SeesawTracker\(filename=\.\.\.\)"
ROUTING_NOT_OURS = r"was not written by RoutingStats \(it holds no JSON object with exactly the keys stage, step"
PLOT_NOT_OURS = r"was not written by {} \(it lacks the PNG text Comment: 'drawn by malora_lightning.*plots=False"


@pytest.mark.parametrize(("run", "name", "content", "message"), [
    ("fit", "seesaw.json", b'{"my": "notes"}\n', SEESAW_NOT_OURS),
    ("fit", "routing_val.json", b"mine\n", r"routing_val\.json " + ROUTING_NOT_OURS),
    ("fit", "plots/task_accuracy.png", b"png\n", r"task_accuracy\.png " + PLOT_NOT_OURS.format("SeesawTracker")),
    ("fit", "plots/task_expert_val.png", None, r"task_expert_val\.png " + PLOT_NOT_OURS.format("RoutingStats")),
    ("validate", "routing_validate.json", b'{"stage": "val"}', r"routing_validate\.json " + ROUTING_NOT_OURS),
    ("test", "seesaw.json", b"[1, 2]", SEESAW_NOT_OURS),
    # its keys in another order: a file that names them, not one SeesawTracker wrote
    ("test", "seesaw.json", b'{"stages": {}, "baseline": null, "baseline_file": null, "tolerance": 0.01}',
     SEESAW_NOT_OURS),
    ("test", "plots/expert_load_test.png", None, r"expert_load_test\.png " + PLOT_NOT_OURS.format("RoutingStats")),
])
def test_a_file_the_callbacks_did_not_write_is_refused_before_any_work(tiny_model_dir, tmp_path, run, name, content,
                                                                        message):
    """Without a logger or checkpoints the run folder is the root folder, where the user's own files may be: they
    were replaced without a check."""
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    content = unmarked_png() if content is None else content
    path.write_bytes(content)
    metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, val_check_interval=1,
                           callbacks=[metrics, SeesawTracker(), RoutingStats()])
    with pytest.raises(FileExistsError, match=message):
        getattr(trainer, run)(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    assert path.read_bytes() == content
    assert trainer.global_step == 0 and metrics.history == []  # refused before training or evaluating


@pytest.mark.parametrize(("name", "writer"), [("task_accuracy.png", "SeesawTracker"),
                                              ("expert_load_val.png", "RoutingStats")])
def test_a_test_of_a_checkpoint_refuses_to_draw_the_fits_pictures_over_a_users(tiny_model_dir, tmp_path, name,
                                                                               writer):
    """A test of a fit's checkpoint draws the fit's validation pictures it restored into its own folder: one there
    that is not ours is refused before any work, as the fit itself refuses it."""
    fit = make_trainer(tmp_path / "fit", max_steps=1, limit_val_batches=None, val_check_interval=1,
                       enable_checkpointing=True, callbacks=[PerTaskMetrics(), SeesawTracker(), RoutingStats()])
    fit.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    checkpoint = next((tmp_path / "fit" / "checkpoints").glob("*.ckpt"))
    path = tmp_path / "test" / "plots" / name
    path.parent.mkdir(parents=True)
    path.write_bytes(unmarked_png())
    metrics = PerTaskMetrics()
    tester = make_trainer(tmp_path / "test", limit_test_batches=None,
                          callbacks=[metrics, SeesawTracker(), RoutingStats()])
    with pytest.raises(FileExistsError, match=re.escape(name) + " " + PLOT_NOT_OURS.format(writer)):
        tester.test(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]),
                    ckpt_path=str(checkpoint), verbose=False)
    assert path.read_bytes() == unmarked_png()
    assert [evaluation.stage for evaluation in metrics.history] == ["val"]  # the fit's, restored; nothing tested


def test_a_rerun_in_the_same_folder_replaces_the_files_it_wrote_and_says_so(tiny_model_dir, tmp_path):
    written = {}
    for steps in (1, 2):
        trainer = make_trainer(tmp_path, max_steps=steps, limit_val_batches=None, val_check_interval=1,
                               callbacks=[PerTaskMetrics(), SeesawTracker(), RoutingStats()])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
        replaced = [str(w.message) for w in caught if "holds the adapters an earlier fit exported" in str(w.message)]
        assert len(replaced) == (steps - 1)  # the second fit's outputs mixed with the first's without a word
        names = ("seesaw.json", "routing_val.json", "plots/task_accuracy.png", "plots/expert_load_val.png")
        written[steps] = {name: (tmp_path / name).read_bytes() for name in names}
    assert json.loads(written[2]["routing_val.json"])["step"] == 2
    assert len(json.loads(written[2]["seesaw.json"])["stages"]["val"]) == 2
    assert all(written[1][name] != written[2][name] for name in written[1])


def test_a_test_of_the_fits_checkpoint_in_a_new_process_keeps_the_fits_seesaw(tiny_model_dir, tmp_path):
    """`malora test --ckpt_path last` in the fit's folder, without a logger: the new callbacks know no fit, so
    seesaw.json was replaced by one with the test alone and the report lost "Seesaw over training"."""
    fit_metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=None, num_sanity_val_steps=-1, val_check_interval=1,
                           enable_checkpointing=True, callbacks=[fit_metrics, SeesawTracker(plots=False)])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    run_dir = tmp_path / "checkpoints"
    fit_series = json.loads((run_dir / "seesaw.json").read_text())["stages"]["val"]
    assert len(fit_series) == 3

    tester = make_trainer(tmp_path, limit_test_batches=None, enable_checkpointing=True,
                          callbacks=[PerTaskMetrics(), SeesawTracker(plots=False), RunReport()])
    tester.test(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=str(run_dir / "epoch=0-step=2.ckpt"),
                verbose=False)
    saved = json.loads((run_dir / "seesaw.json").read_text())["stages"]
    assert list(saved) == ["val", "test"] and saved["val"] == fit_series
    assert "## Seesaw over training (validation)" in (run_dir / "report_test.md").read_text()


@pytest.mark.parametrize(("steps", "scored"), [(2, True), (3, False)])
def test_the_model_card_lists_the_accuracy_of_the_exported_weights_only(tiny_model_dir, tmp_path, steps, scored):
    """Validation every 2 steps: after 3 steps the last validation scored step 2's weights, not the exported ones."""
    trainer = make_trainer(tmp_path, max_steps=steps, limit_val_batches=None, num_sanity_val_steps=-1,
                           val_check_interval=2, enable_checkpointing=True, callbacks=[PerTaskMetrics()])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    card = (tmp_path / "checkpoints" / "adapter" / "README.md").read_text()
    assert ("| parity |" in card) == scored


def test_a_folder_the_adapters_cannot_go_to_is_refused_before_training(tiny_model_dir, tmp_path):
    """Without a logger or checkpoints the adapters go to <root folder>/adapter: here a user's Python package."""
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "__init__.py").write_text("# user code\n")
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.raises(FileExistsError, match=r"not an adapter \(__init__\.py\).*export_adapters=False"):
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    assert trainer.global_step == 0 and [path.name for path in (tmp_path / "adapter").iterdir()] == ["__init__.py"]


def test_a_logger_folder_under_the_home_folder_holds_every_file_of_the_run(tiny_model_dir, tmp_path, monkeypatch):
    """CSVLogger("~/runs") (a recipe's save_dir: ~/runs): Lightning wrote the metrics and the exported adapter into
    the home folder (fsspec expands `~`), while the checkpoints and the run files went to a folder named `~` in the
    current directory, the unexpanded folder Lightning names as the run's checkpoint folder."""
    home = tmp_path / "hóme dir"
    home.mkdir()
    (tmp_path / "cwd").mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path / "cwd")
    trainer = make_trainer(tmp_path / "cwd", max_steps=1, enable_checkpointing=True, logger=CSVLogger("~/runs"),
                           log_every_n_steps=1, callbacks=[RunReport()])
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    version = home / "runs" / "lightning_logs" / "version_0"
    written = sorted(str(path.relative_to(version)) for path in version.rglob("*") if path.is_file())
    assert written == ["checkpoints/adapter/README.md", "checkpoints/adapter/adapter_config.json",
                       "checkpoints/adapter/adapter_model.safetensors", "checkpoints/epoch=0-step=1.ckpt",
                       "checkpoints/report.md", "hparams.yaml", "metrics.csv"]
    assert list((tmp_path / "cwd").iterdir()) == []


def report_sections_of(run_dir, name: str = "report.md") -> dict[str, str]:
    """The sections of the report `name` in `run_dir` by heading, after checking that each picture it links is
    there."""
    report = (run_dir / name).read_text()
    links = re.findall(r"^!\[[^]]*\]\(([^)]+)\)$", report, flags=re.MULTILINE)
    missing = [link for link in links if not is_our_plot(run_dir / link)]
    assert not missing, f"{run_dir / name} links pictures that are not in {run_dir}: {missing}"
    sections = {}
    for section in report.split("\n## ")[1:]:
        heading, _, body = section.partition("\n")
        sections[heading] = body.strip()
    return sections


def full_and_resumed_reports(model_dir, root, max_steps: int = 3) -> tuple[dict[str, str], dict[str, str]]:
    """Validation every 2 of 3 steps; the resumed fit starts from the checkpoint of the step-2 validation, so it
    validates nothing itself (with `max_steps=2` it does not even train)."""
    reports = {}
    for run, ckpt_path in (("full", None), ("resumed", root / "full" / "ckpt" / "step=2.ckpt")):
        callbacks = [PerTaskMetrics(), SeesawTracker(), RoutingStats(), RunReport(),
                     ModelCheckpoint(dirpath=root / run / "ckpt", save_top_k=-1, save_on_train_epoch_end=False,
                                     filename="{step}")]
        trainer = make_trainer(root / run, max_steps=max_steps, limit_val_batches=None, num_sanity_val_steps=-1,
                               val_check_interval=2, check_val_every_n_epoch=None, enable_checkpointing=True,
                               callbacks=callbacks)
        trainer.fit(make_module(model_dir), make_data(model_dir, tasks=["parity", "add_2digit"]),
                    ckpt_path=ckpt_path)
        reports[run] = report_sections_of(root / run / "ckpt")
    return reports["full"], reports["resumed"]


def test_a_fit_resumed_after_its_last_validation_reports_its_seesaw(tiny_model_dir, tmp_path):
    """The tracker computed the fit's series at evaluations only: the resumed fit's report had no seesaw section,
    and then no curves (drawn at evaluations only, and the resumed fit writes into a folder of its own)."""
    full, resumed = full_and_resumed_reports(tiny_model_dir, tmp_path)
    title = "Seesaw over training (validation)"
    assert title in full and resumed[title] == full[title]
    assert "![Validation accuracy per task](plots/task_accuracy.png)" in resumed[title]


def test_a_fit_resumed_at_its_end_reports_its_pictures(tiny_model_dir, tmp_path):
    """A fit resumed from the checkpoint of its last step does not train, and Lightning then calls no
    `on_train_end`, where the restored pictures were drawn: its report had the sections without their pictures."""
    full, resumed = full_and_resumed_reports(tiny_model_dir, tmp_path, max_steps=2)
    for title in ("Seesaw over training (validation)", "Routing health (validation)"):
        assert title in full and "](plots/" in full[title] and resumed[title] == full[title], title


def test_the_fits_routing_survives_a_resume_and_a_test_in_a_new_process(tiny_model_dir, tmp_path):
    """RoutingStats kept no state: the resumed fit's report had no routing section, and a test of the fit's
    checkpoint in a new process rewrote the fit's report without "Routing health (validation)"."""
    full, resumed = full_and_resumed_reports(tiny_model_dir, tmp_path)
    title = "Routing health (validation)"
    assert title in full and resumed[title] == full[title]
    assert "(plots/expert_load_val.png)" in resumed[title] and "(plots/task_expert_val.png)" in resumed[title]

    run_dir = tmp_path / "full" / "ckpt"
    routing = RoutingStats()
    tester = make_trainer(tmp_path / "full", limit_test_batches=None, enable_checkpointing=True,
                          callbacks=[PerTaskMetrics(), routing, RunReport(),
                                     ModelCheckpoint(dirpath=run_dir, filename="{step}")])
    tester.test(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity", "add_2digit"]),
                ckpt_path=str(run_dir / "step=2.ckpt"), verbose=False)
    saved = json.loads((run_dir / "routing_val.json").read_text())
    restored = routing.results["val"]
    assert restored.step == saved["step"] == 2
    for name, layer in saved["layers"].items():  # the same matrices and figures as the fit wrote
        assert restored.layers[name].to_dict(restored.dead_threshold) == layer, name
    assert report_sections_of(run_dir, "report_test.md")[title] == f"{restored_note('step=2.ckpt')}\n\n{full[title]}"


def test_a_file_named_like_the_plots_folder_is_refused_before_any_work(tiny_model_dir, tmp_path):
    """Found when the first picture was drawn, after training, as "[Errno 17] File exists: .../plots"."""
    (tmp_path / "plots").write_text("my notes\n")
    metrics = PerTaskMetrics()
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=None, val_check_interval=1,
                           callbacks=[metrics, SeesawTracker(), RoutingStats()])
    with pytest.raises(FileExistsError, match=r"plots is a file, where SeesawTracker makes a folder for its pictures"
                                              r".*draw no curves \(SeesawTracker\(plots=False\)\)"):
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=["parity"]))
    assert (tmp_path / "plots").read_text() == "my notes\n"
    assert trainer.global_step == 0 and metrics.history == []


@pytest.fixture(scope="module")
def earlier_checkpoint_tested(tiny_model_dir, tmp_path_factory):
    """A fit of 3 steps validating after each and keeping every checkpoint, then `malora test --ckpt_path` of its
    step-1 checkpoint in a new process (fresh trainer, callbacks and module), in the fit's folder: the run files the
    fit wrote (name: content) and those after the test."""
    root = tmp_path_factory.mktemp("earlier")
    run_dir = root / "ckpt"
    tasks = ["parity", "add_2digit"]

    def make(**settings):
        callbacks = [PerTaskMetrics(), SeesawTracker(), RoutingStats(), RunReport(),
                     ModelCheckpoint(dirpath=run_dir, save_top_k=-1, every_n_train_steps=1, filename="{step}")]
        return make_trainer(root, enable_checkpointing=True, callbacks=callbacks, **settings)

    make(max_steps=3, limit_val_batches=None, num_sanity_val_steps=-1, val_check_interval=1).fit(
        make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=tasks))
    names = ["seesaw.json", "routing_val.json", "report.md"] + [f"plots/{name}" for name in (
        "task_accuracy.png", "expert_load_val.png", "task_expert_val.png")]
    fit = {name: (run_dir / name).read_bytes() for name in names}
    make(limit_test_batches=None).test(make_module(tiny_model_dir), make_data(tiny_model_dir, tasks=tasks),
                                       ckpt_path=str(run_dir / "step=1.ckpt"), verbose=False)
    return dict(run_dir=run_dir, fit=fit, tested={name: (run_dir / name).read_bytes() for name in names})


def test_a_test_of_an_earlier_checkpoint_keeps_the_fits_later_validations(earlier_checkpoint_tested):
    """The checkpoint restores the fit's history up to step 1 only: seesaw.json's `val` went from the fit's 4
    validations to that checkpoint's, and the fit's curves and routing pictures were drawn again from it. The test's
    report goes to report_test.md: the fit's report.md stays as it was."""
    fit, tested = earlier_checkpoint_tested["fit"], earlier_checkpoint_tested["tested"]
    fit_stages, tested_stages = (json.loads(files["seesaw.json"])["stages"] for files in (fit, tested))
    assert [point["step"] for point in fit_stages["val"]] == [0, 1, 2, 3]
    assert list(tested_stages) == ["val", "test"] and tested_stages["val"] == fit_stages["val"]
    assert [point["step"] for point in tested_stages["test"]] == [1]
    for name in ("report.md", "routing_val.json", "plots/task_accuracy.png", "plots/expert_load_val.png",
                 "plots/task_expert_val.png"):
        assert tested[name] == fit[name], name
    sections = report_sections_of(earlier_checkpoint_tested["run_dir"], "report_test.md")  # no other figures' pictures
    for title in ("Seesaw over training (validation)", "Routing health (validation)"):
        assert "](plots/" not in sections[title], title


def test_the_report_of_a_test_of_an_earlier_checkpoint_names_it(earlier_checkpoint_tested):
    """The test scored step=1.ckpt, and the fit's history restored from it ends there, at its step-0 validation: the
    report called that "final (step 0)" beside "final (step 1)" for the test, though the fit went on to step 3."""
    run_dir = earlier_checkpoint_tested["run_dir"]
    sections = report_sections_of(run_dir, "report_test.md")
    assert "| accuracy (step 1, step=1.ckpt) | loss |" in sections["Test accuracy (%) per task"]
    validation = sections["Validation accuracy (%) per task"]
    assert validation.startswith(restored_note("step=1.ckpt")) and "| accuracy (step 0) |" in validation
    assert "final" not in validation
    for title in ("Seesaw over training (validation)", "Routing health (validation)"):
        assert sections[title].startswith(restored_note("step=1.ckpt")), title
    test_points = json.loads((run_dir / "seesaw.json").read_text())["stages"]["test"]
    assert [(point["step"], point["checkpoint"]) for point in test_points] == [(1, "step=1.ckpt")]


def test_the_run_outputs_name_an_adapter_folder_evaluated_as_loaded(tiny_model_dir, tmp_path):
    """`malora validate --model.adapter_path <folder>` without --ckpt_path scores the folder's (trained) adapters, and
    the report, seesaw.json and the routing section and pictures labelled them "step 0", the weights before training;
    they name the folder, which records no step. A fit from the folder trains from it (its sanity check is step 0,
    before training), and the same module validated after it scores the fit's weights, at its step; a checkpoint
    loaded over the folder's adapters is named as a checkpoint."""
    exported = make_module(tiny_model_dir)
    exported.configure_model()
    save_adapters(exported.model, tmp_path / "adapter")
    baseline = tmp_path / "single_task.json"
    baseline.write_text(json.dumps({"parity": 0.5}))

    def evaluate(folder, run, module, ckpt_path=None, **settings):
        metrics, routing = PerTaskMetrics(), RoutingStats(plots=False)  # `weights` gives the pictures' titles
        trainer = make_trainer(tmp_path / folder, limit_val_batches=None, enable_checkpointing=True,
                               callbacks=[metrics, SeesawTracker(baseline_scores=str(baseline), plots=False), routing,
                                          RunReport()],
                               **settings)
        getattr(trainer, run)(module, make_data(tiny_model_dir, tasks=["parity"]), ckpt_path=ckpt_path,
                              **({} if run == "fit" else {"verbose": False}))
        return trainer, metrics, routing

    _, metrics, routing = evaluate("validate", "validate", make_module(tiny_model_dir,
                                                                        adapter_path=str(tmp_path / "adapter")))
    sections = report_sections_of(tmp_path / "validate" / "checkpoints", "report_validate.md")
    assert "| accuracy (adapter folder adapter) | loss |" in \
        sections["Validation accuracy (%) per task, outside training (trainer.validate)"]
    assert sections["Transfer (validation outside training)"].startswith("Accuracies in %, at adapter folder adapter;")
    assert sections["Routing health (validation outside training, trainer.validate)"].startswith(
        "Adapter folder adapter: 12 routed layers")
    assert routing.results["validate"].weights == "adapter folder adapter"
    assert [(e.step, e.checkpoint, e.adapter_folder) for e in metrics.history] == [(0, None, "adapter")]
    (point,) = json.loads((tmp_path / "validate" / "checkpoints" / "seesaw.json").read_text())["stages"]["validate"]
    assert (point["step"], point["checkpoint"], point["adapter_folder"]) == (0, None, "adapter")

    module = make_module(tiny_model_dir, adapter_path=str(tmp_path / "adapter"))
    trainer, metrics, routing = evaluate("fit", "fit", module, max_steps=1, num_sanity_val_steps=-1,
                                         val_check_interval=1)
    trainer.validate(module, make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    assert [(e.step, e.during_fit, e.adapter_folder) for e in metrics.history] == \
        [(0, True, None), (1, True, None), (1, False, None)]
    assert routing.results["validate"].weights == "step 1"
    _, metrics, _ = evaluate("checkpoint", "validate", make_module(tiny_model_dir,
                                                                   adapter_path=str(tmp_path / "adapter")),
                             ckpt_path=str(tmp_path / "fit" / "checkpoints" / "epoch=0-step=1.ckpt"))
    assert [(e.step, e.checkpoint, e.adapter_folder) for e in metrics.evaluations("val", during_fit=False)] == \
        [(1, "epoch=0-step=1.ckpt", None)]


FITTED = "epoch=0-step=2.ckpt"  # the checkpoint of `fitted`


class FailBeforeTheFirstStep(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        raise RuntimeError("stopped before the first step")


def fitted(model_dir, root) -> MALoRAModule:
    """A module trained for 2 steps by a trainer that checkpoints."""
    module = make_module(model_dir)
    make_trainer(root, max_steps=2, enable_checkpointing=True).fit(module, make_data(model_dir, tasks=["parity"]))
    return module


def loaded_from_checkpoint(model_dir, root) -> MALoRAModule:
    fitted(model_dir, root)
    return MALoRAModule.load_from_checkpoint(root / "checkpoints" / FITTED)


def validated_from_checkpoint(model_dir, root) -> MALoRAModule:
    """validate(ckpt_path=...) loads the checkpoint into the module, which keeps its weights afterwards."""
    fitted(model_dir, root)
    module = make_module(model_dir)
    make_trainer(root / "first", limit_val_batches=1).validate(module, make_data(model_dir, tasks=["parity"]),
                                                               ckpt_path=str(root / "checkpoints" / FITTED),
                                                               verbose=False)
    return module


def folder_fit_stopped_before_its_first_step(model_dir, root) -> MALoRAModule:
    exported = make_module(model_dir)
    exported.configure_model()
    save_adapters(exported.model, root / "adapter")
    module = make_module(model_dir, adapter_path=str(root / "adapter"))
    with pytest.raises(RuntimeError, match="stopped before the first step"):
        make_trainer(root / "fit", max_steps=2, callbacks=[FailBeforeTheFirstStep()]).fit(
            module, make_data(model_dir, tasks=["parity"]))
    return module


@pytest.mark.parametrize(("prepare", "weights"), [
    (fitted, (2, None, None)),
    (loaded_from_checkpoint, (2, FITTED, None)),
    (validated_from_checkpoint, (2, FITTED, None)),
    (folder_fit_stopped_before_its_first_step, (0, None, "adapter")),
], ids=["fitted", "load_from_checkpoint", "validated_from_checkpoint", "folder_fit_stopped"])
def test_a_new_trainer_names_the_weights_the_module_holds(tiny_model_dir, tmp_path, prepare, weights):
    """The module outlives its trainer: a test by a new trainer (a notebook's fit, then `L.Trainer().test(module)`;
    a module from `load_from_checkpoint`; one a validate(ckpt_path=...) loaded; one whose fit from an adapter folder
    stopped before its first step) labelled its weights with that trainer's step, "step 0", the weights before
    training, and named no checkpoint or folder. The module's `held_weights` names them."""
    module = prepare(tiny_model_dir, tmp_path)
    metrics, routing = PerTaskMetrics(), RoutingStats(plots=False)
    make_trainer(tmp_path / "evaluation", limit_test_batches=None, callbacks=[metrics, routing]).test(
        module, make_data(tiny_model_dir, tasks=["parity"]), verbose=False)
    (evaluation,) = metrics.history
    assert (evaluation.step, evaluation.checkpoint, evaluation.adapter_folder) == weights
    assert routing.results["test"].weights == weights_label(*weights)
