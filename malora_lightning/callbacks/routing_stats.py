"""`RoutingStats`: what the routers do on the validation and test sets, per routed layer and per task.

What is counted: the top-k expert assignments of the real prompt + answer tokens (padding excluded through the
attention mask) of each evaluation batch's scoring forward, the pass that the validation loss comes from, which the
module declares (`scoring_pass`, a `ScoringPass` with each row's task and the rows that count): for generative tasks
the teacher-forced forward over `input_ids`, for multiple-choice tasks the gold choice's rows of the single forward
over all (example, choice) rows, or of the forward over the gold rows alone when every choice is one token. A
subclass that evaluates differently declares its own scoring pass. The other choices' rows and the generation forwards
(prefill and decode) are not counted: they re-read the same prompts, so counting them would weigh tasks by how they
are scored.

Per layer with N experts and top-k (the sums are kept on the device and summed across ranks at the end):

* load: assignments per expert ("tokens per expert"; each token makes k); its share is load_e / sum(load).
* CV of the load: population standard deviation / mean over the N experts. 0 when balanced, sqrt(N/k - 1) when k
  experts take every token.
* router entropy: mean over tokens of H(p) = -sum_e p_e ln p_e over all N probabilities, in nats; normalised by ln N
  it is 1 for a uniform router and 0 for a one-hot one.
* dead experts: load share below `dead_threshold` times the even share 1/N.
* task x expert matrix: assignments per (task, expert). Specialisation: mutual information I(task; expert) over the
  assignments divided by H(task) (0: the router ignores the task; 1: the expert identifies the task), and per task
  the KL divergence of its expert distribution from the layer's overall one (I = sum_t P(t) KL_t).

Expert e of one layer has nothing to do with expert e of another, so matrices stay per layer and only the scalar
figures are averaged over layers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import Strategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from malora_lightning.adapters.model import add_routing_observer, routed_layers
from malora_lightning.adapters.routing import ObserverHandle, RoutingRecord
from malora_lightning.atomic import atomic_write_text
from malora_lightning.callbacks.per_task_metrics import log_synchronised, partial_sanity_check
from malora_lightning.callbacks.plots import PLOTS_FOLDER, plot_layer_heatmap, plot_task_routing, refuse_foreign_plot
from malora_lightning.callbacks.summary import (
    WeightsStep,
    evaluation_series,
    markdown_cell,
    mean_of_present,
    restored_note,
    weights_label,
)
from malora_lightning.run_paths import (
    RunFileWriter,
    our_json,
    refuse_foreign_json,
    refuse_on_every_rank,
    run_directory,
)
from malora_lightning.values import check_switch, is_finite_number, is_int


# how many of the most task-specific layers (highest task-expert NMI) the task routing plot shows expert by expert
DETAIL_LAYERS = 4
# the keys of `RoutingSummary.to_dict`, in order: a routing_<series>.json holding exactly these is RoutingStats'
SUMMARY_KEYS = ["stage", "step", "tasks", "dead_threshold", "health", "task_divergence", "layers"]


def summary_file(series: str) -> str:
    return f"routing_{series}.json"


def plot_files(series: str) -> list[str]:
    """The expert load heatmap and the task routing picture of a series."""
    return [f"expert_load_{series}.png", f"task_expert_{series}.png"]


# ---------------------------------------------------------------------------------------------------- statistics
def load_cv(load: torch.Tensor) -> float | None:
    """Population std / mean of the per-expert load; None when nothing was routed."""
    load = load.double()
    mean = load.mean()
    return None if mean == 0 else (load.std(correction=0) / mean).item()


def dead_experts(load: torch.Tensor, threshold: float) -> list[int] | None:
    """Experts whose load share is below `threshold` x 1/N; None when nothing was routed (no share to judge: an empty
    list would read as a healthy layer)."""
    total = load.sum()
    if total == 0:
        return None
    share = load.double() / total
    return (share < threshold / load.numel()).nonzero().flatten().tolist()


def task_divergences(task_load: torch.Tensor) -> torch.Tensor:
    """[tasks] KL(P(expert | task) || P(expert)) in nats; 0 for tasks without tokens."""
    joint = task_load.double()
    expert_marginal = joint.sum(0) / joint.sum().clamp(min=1)
    task_totals = joint.sum(1, keepdim=True)
    conditional = joint / task_totals.clamp(min=1)
    # where P(e | t) > 0, P(e) > 0 too; the other entries (0/0) are discarded by the where
    return torch.where(conditional > 0, conditional * (conditional / expert_marginal).log(), 0.0).sum(1)


def task_expert_nmi(task_load: torch.Tensor) -> float | None:
    """I(task; expert) / H(task) over the assignments; None with fewer than two tasks that have tokens."""
    joint = task_load.double()
    total = joint.sum()
    if total == 0:
        return None
    task_share = joint.sum(1) / total
    task_entropy = torch.special.entr(task_share).sum()
    if task_entropy <= 0:
        return None
    return ((task_share * task_divergences(task_load)).sum() / task_entropy).item()


@dataclass
class LayerRouting:
    """One routed layer over an evaluation pass."""

    task_load: torch.Tensor  # [tasks, N] top-k assignments of real tokens, int64 on the CPU
    entropy_sum: float  # sum over real tokens of the router entropy, nats
    top_k: int

    @property
    def load(self) -> torch.Tensor:
        return self.task_load.sum(0)

    @property
    def tokens(self) -> int:
        return int(self.task_load.sum()) // self.top_k

    @property
    def load_cv(self) -> float | None:
        return load_cv(self.load)

    @property
    def max_over_mean(self) -> float | None:
        load = self.load.double()
        return None if load.sum() == 0 else (load.max() / load.mean()).item()

    @property
    def entropy(self) -> float | None:
        return self.entropy_sum / self.tokens if self.tokens else None

    @property
    def normalized_entropy(self) -> float | None:
        num_experts = self.task_load.shape[1]
        if self.entropy is None or num_experts < 2:
            return None
        return self.entropy / math.log(num_experts)

    def to_dict(self, dead_threshold: float) -> dict[str, Any]:
        load = self.load
        total = max(1, int(load.sum()))
        return {"tokens": self.tokens, "load": load.tolist(), "load_share": [value / total for value in load.tolist()],
                "load_cv": self.load_cv, "max_over_mean": self.max_over_mean, "entropy": self.entropy,
                "normalized_entropy": self.normalized_entropy, "dead_experts": dead_experts(load, dead_threshold),
                "task_expert_nmi": task_expert_nmi(self.task_load),
                "task_divergence": task_divergences(self.task_load).tolist(), "task_load": self.task_load.tolist()}

    def state(self) -> dict[str, Any]:
        """The fields as plain numbers, for a checkpoint (`from_state` reads them back)."""
        return {"task_load": self.task_load.tolist(), "entropy_sum": self.entropy_sum, "top_k": self.top_k}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> LayerRouting:
        return cls(task_load=torch.tensor(state["task_load"], dtype=torch.long), entropy_sum=state["entropy_sum"],
                   top_k=state["top_k"])


@dataclass
class RoutingSummary:
    """Routing of one evaluation pass: every routed layer, and figures averaged over the layers."""

    stage: str
    step: int
    tasks: list[str]  # by task id, the rows of every task_load
    layers: dict[str, LayerRouting]
    dead_threshold: float
    # as `Evaluation.checkpoint` and `Evaluation.adapter_folder`: what the report and the pictures name the weights
    # by, beside or instead of the step (the JSON file keeps the step alone)
    checkpoint: str | None = None
    adapter_folder: str | None = None

    @property
    def weights(self) -> str:
        """The weights this pass routed, as the report's score tables name them (`weights_label`): "step 3",
        "step 1, step=1.ckpt" or "adapter folder adapter"."""
        return weights_label(self.step, self.checkpoint, self.adapter_folder)

    def health(self) -> dict[str, Any]:
        """Scalars summarising every layer: load CV (mean, min, max and where), entropy, dead experts (over the layers
        that routed tokens), task NMI; each None when no layer routed a token."""
        cvs = {name: layer.load_cv for name, layer in self.layers.items() if layer.load_cv is not None}
        worst = max(cvs, key=cvs.get) if cvs else None
        dead = [dead_experts(layer.load, self.dead_threshold) for layer in self.layers.values()]
        judged = [len(experts) for experts in dead if experts is not None]
        return {
            "layers": len(self.layers),
            "experts": sum(layer.task_load.shape[1] for layer in self.layers.values()),
            "tokens": max((layer.tokens for layer in self.layers.values()), default=0),
            "load_cv_mean": mean_of_present(cvs.values()),
            "load_cv_min": min(cvs.values()) if cvs else None,
            "load_cv_max": cvs[worst] if worst else None,
            "load_cv_max_layer": worst,
            "normalized_entropy_mean": mean_of_present(layer.normalized_entropy for layer in self.layers.values()),
            "dead_experts": sum(judged) if judged else None,
            "task_expert_nmi_mean": mean_of_present(task_expert_nmi(layer.task_load) for layer in self.layers.values()),
        }

    def task_rows(self) -> list[int]:
        """Task ids that had tokens in this pass."""
        first = next(iter(self.layers.values()))
        return [task for task in range(len(self.tasks)) if first.task_load[task].sum() > 0]

    def task_divergence(self) -> dict[str, float]:
        """Per task with tokens, KL of its expert distribution from the overall one, averaged over layers (nats)."""
        divergences = torch.stack([task_divergences(layer.task_load) for layer in self.layers.values()]).mean(0)
        return {self.tasks[task]: divergences[task].item() for task in self.task_rows()}

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.stage, "step": self.step, "tasks": self.tasks, "dead_threshold": self.dead_threshold,
                "health": self.health(), "task_divergence": self.task_divergence(),
                "layers": {name: layer.to_dict(self.dead_threshold) for name, layer in self.layers.items()}}

    def state(self) -> dict[str, Any]:
        """The fields as plain numbers, for a checkpoint (`from_state` reads them back); `to_dict` adds the figures
        derived from them, for the run folder's JSON."""
        return {"stage": self.stage, "step": self.step, "tasks": self.tasks, "dead_threshold": self.dead_threshold,
                "layers": {name: layer.state() for name, layer in self.layers.items()}}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RoutingSummary:
        return cls(stage=state["stage"], step=state["step"], tasks=state["tasks"],
                   layers={name: LayerRouting.from_state(layer) for name, layer in state["layers"].items()},
                   dead_threshold=state["dead_threshold"])


class RoutingAccumulator:
    """Running sums of one evaluation pass, on the model's device: no host synchronisation per batch."""

    def __init__(self, layer_names: Sequence[str], num_experts: int, num_tasks: int, device: torch.device) -> None:
        self.rows = {name: row for row, name in enumerate(layer_names)}
        self.num_experts = num_experts
        self.num_tasks = num_tasks
        self.padding_bin = num_tasks * num_experts  # padding tokens' assignments land here and are dropped
        self.counts = torch.zeros(len(layer_names), self.padding_bin + 1, dtype=torch.long, device=device)
        self.entropy = torch.zeros(len(layer_names), dtype=torch.float32, device=device)

    def add(self, record: RoutingRecord, token_tasks: torch.Tensor, token_keep: torch.Tensor | None = None) -> None:
        """Count one layer forward; `token_tasks` [T] is each token's task id, batch-major like the record's rows,
        and `token_keep` [T] (optional) drops tokens outside the counted rows."""
        row = self.rows[record.layer_name]
        bins = token_tasks.unsqueeze(1) * self.num_experts + record.experts
        entropy = torch.special.entr(record.probs).sum(dim=-1)
        mask = record.token_mask
        if token_keep is not None:
            mask = token_keep if mask is None else mask & token_keep
        if mask is not None:
            bins = bins.masked_fill(~mask.unsqueeze(1), self.padding_bin)
            entropy = entropy.masked_fill(~mask, 0.0)
        bins = bins.reshape(-1)
        self.counts[row].index_add_(0, bins, torch.ones_like(bins))
        self.entropy[row] += entropy.sum().to(self.entropy.dtype)

    def reduce(self, strategy: Strategy) -> None:
        """Sum over all ranks (a no-op with one process)."""
        self.counts = strategy.reduce(self.counts, reduce_op="sum")
        self.entropy = strategy.reduce(self.entropy, reduce_op="sum")

    def layers(self, top_k: int) -> dict[str, LayerRouting]:
        counts, entropy = self.counts.cpu(), self.entropy.cpu()
        return {name: LayerRouting(task_load=counts[row, :self.padding_bin].view(self.num_tasks, self.num_experts),
                                   entropy_sum=entropy[row].item(), top_k=top_k)
                for name, row in self.rows.items()}


# ---------------------------------------------------------------------------------------------------- callback
class RoutingStats(RunFileWriter):
    """Router telemetry over every validation and test pass; nothing is observed during training.

    Logs `<stage>/routing/load_cv` (mean over layers), `<stage>/routing/load_cv_max`, `<stage>/routing/entropy`
    (mean normalised entropy), `<stage>/routing/dead_experts` (count over all layers) and `<stage>/routing/task_nmi`
    (mean task-expert NMI), each only when a token was counted (an evaluation that declares no scoring pass counts
    none, and a dead-expert count of 0 would read as healthy routing). Writes every layer's figures (its full task x
    expert matrix included) to `routing_<series>.json`, and next to the checkpoints (rank zero) the heatmaps
    `plots/expert_load_<series>.png` (layer x expert) and `plots/task_expert_<series>.png` (task x layer KL, and the
    most task-specific layers' task x expert matrices). The series (`results`' keys) are those of `SeesawTracker`:
    `val`, the fit's latest validation; `validate` and `test`, the latest trainer.validate and test, which follow no
    training and so never replace the fit's figures (before, trainer.validate wrote `routing_val.json` too). A partial
    sanity check (Lightning's default of 2 batches per loader) is not reported: a few batches' routing is not the
    validation set's. Before any work it refuses to replace such a file that it did not write: a JSON file is its own
    when it holds an object with exactly the keys `SUMMARY_KEYS`, in order; a picture when it carries
    `plots.PLOT_MARK`.

    Args:
        dead_threshold: an expert whose load share is below this fraction of the even share 1/N is dead.
        plots: draw the heatmaps (needs matplotlib).
        report_layers: how many of the most unbalanced layers the run report lists.
    """

    def __init__(self, dead_threshold: float = 0.01, plots: bool = True, report_layers: int = 10) -> None:
        if not (is_finite_number(dead_threshold) and 0.0 <= dead_threshold <= 1.0):
            raise ValueError(f"dead_threshold={dead_threshold!r} is invalid: expected a fraction of the even share "
                             "in [0, 1]")
        if not (is_int(report_layers) and report_layers >= 1):  # a slice bound: -1 listed all layers but one
            raise ValueError(f"report_layers={report_layers!r} is invalid: expected how many layers the run report "
                             "lists, an integer >= 1")
        check_switch("plots", plots)
        self.dead_threshold = float(dead_threshold)
        self.plots = plots
        self.report_layers = report_layers
        self.results: dict[str, RoutingSummary] = {}
        self.plots_written: dict[str, list[str]] = {}
        self._accumulator: RoutingAccumulator | None = None
        self._handle: ObserverHandle | None = None
        self._top_k = 0
        self._warned = False
        self._weights = WeightsStep()
        self.restored_from: str | None = None  # as `PerTaskMetrics.restored_from`, for `results["val"]`

    # ------------------------------------------------------------------ collection
    @staticmethod
    def _routed_layers(pl_module: L.LightningModule) -> dict[str, Any]:
        model = getattr(pl_module, "model", None)
        return routed_layers(model) if isinstance(model, torch.nn.Module) else {}

    def _start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        layers = self._routed_layers(pl_module)
        if not layers:
            if not self._warned:  # a note, not a warning: the default recipes attach it to LoRA runs too
                rank_zero_info("RoutingStats: the model has no routed adapter layers (method 'lora'?); "
                               "there is no routing to report")
                self._warned = True
            return
        tasks = getattr(trainer.datamodule, "tasks", None)
        if tasks is None:
            raise ValueError("RoutingStats needs the data module's `tasks` (names in task_id order) to label the "
                             "task x expert matrix; use MultiTaskDataModule or give yours a `tasks` list")
        experts = {layer.num_experts for layer in layers.values()}
        if len(experts) != 1:
            raise ValueError(f"RoutingStats expects one expert count for every routed layer, found {sorted(experts)}")
        self._top_k = next(iter(layers.values())).top_k
        self._accumulator = RoutingAccumulator(list(layers), experts.pop(), len(tasks), pl_module.device)
        self._handle = add_routing_observer(pl_module.model, self._observe)

    def _observe(self, record: RoutingRecord) -> None:
        """Count the layers of each scoring pass (`ScoringPass`, declared by the module; see the module docstring)."""
        scoring = record.forward.scoring if record.forward is not None else None
        if scoring is None:
            return
        tokens, rows = record.experts.shape[0], scoring.row_tasks.shape[0]
        if tokens % rows:  # a layer that sees only some tokens (an expert inside an MoE block): not per row
            return
        seq = tokens // rows  # [batch, seq] inputs and layers fed them flattened alike
        token_tasks = scoring.row_tasks.to(record.experts.device).repeat_interleave(seq)
        token_keep = None if scoring.row_scored is None \
            else scoring.row_scored.to(record.experts.device).repeat_interleave(seq)
        self._accumulator.add(record, token_tasks, token_keep)

    def _detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
        self._handle = None

    def _finish(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._detach()
        accumulator, self._accumulator = self._accumulator, None
        if accumulator is None or (trainer.sanity_checking and partial_sanity_check(trainer)):
            return
        accumulator.reduce(trainer.strategy)
        weights = self._weights.held(trainer, pl_module)
        summary = RoutingSummary(stage=stage, step=weights.step,
                                 tasks=[task.name for task in trainer.datamodule.tasks],
                                 layers=accumulator.layers(self._top_k), dead_threshold=self.dead_threshold,
                                 checkpoint=weights.checkpoint, adapter_folder=weights.adapter_folder)
        series = evaluation_series(trainer)
        self.results[series] = summary
        if series == "val":
            self.restored_from = None
        health = summary.health()
        if health["tokens"] == 0:
            rank_zero_warn(f"RoutingStats: no scoring pass was seen in the {stage} batches (the module declares "
                           "it with malora_lightning.adapters.scoring_pass around the forward its loss comes from)")
        if not trainer.sanity_checking:
            self._log(pl_module, stage, health)
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        if trainer.is_global_zero:
            atomic_write_text(directory / summary_file(series), json.dumps(summary.to_dict(), indent=2) + "\n")
            if self.plots and health["tokens"] > 0:
                self.plots_written[series] = self._plot(summary, series, directory / PLOTS_FOLDER)
            if self.plots and not self._fit_validated_later(trainer, directory):
                self._draw_restored(directory / PLOTS_FOLDER)

    @staticmethod
    def _log(pl_module: L.LightningModule, stage: str, health: dict[str, Any]) -> None:
        for key, name in (("load_cv_mean", "load_cv"), ("load_cv_max", "load_cv_max"),
                          ("normalized_entropy_mean", "entropy"), ("dead_experts", "dead_experts"),
                          ("task_expert_nmi_mean", "task_nmi")):
            if health[key] is not None:
                log_synchronised(pl_module, f"{stage}/routing/{name}", float(health[key]))

    def _fit_validated_later(self, trainer: L.Trainer, directory: Path) -> bool:
        """Whether validate/test restored the fit's routing of an earlier validation than the run folder's
        `routing_val.json` (a test of an earlier checkpoint): the pictures there are then the fit's later ones, which
        drawing the checkpoint's would replace."""
        summary = self.results.get("val")
        written = our_json(directory / summary_file("val"), SUMMARY_KEYS)
        return evaluation_series(trainer) != "val" and summary is not None and written is not None \
            and written["step"] > summary.step

    def _draw_restored(self, folder: Path) -> None:
        """Draw the fit's validation routing restored from a checkpoint (a resumed fit, validate/test in a new
        process) once, so that the report links its pictures as the uninterrupted fit's does."""
        summary = self.results.get("val")
        if summary is not None and "val" not in self.plots_written and summary.health()["tokens"] > 0:
            self.plots_written["val"] = self._plot(summary, "val", folder)

    @staticmethod
    def _plot(summary: RoutingSummary, series: str, folder: Path) -> list[str]:
        """Expert load per layer (share x N, 1 = even); per task and layer the KL from the layer's overall use, with
        P(expert | task) x N of the `DETAIL_LAYERS` layers of highest task-expert NMI (the full matrices: JSON)."""
        names = list(summary.layers)
        num_experts = next(iter(summary.layers.values())).task_load.shape[1]
        load = [(layer.load.double() / layer.load.sum().clamp(min=1) * num_experts).tolist()
                for layer in summary.layers.values()]
        rows = summary.task_rows()
        divergence = torch.stack([task_divergences(layer.task_load)[rows] for layer in summary.layers.values()], 1)
        nmi = {name: task_expert_nmi(layer.task_load) for name, layer in summary.layers.items()}
        specific = sorted((name for name in names if nmi[name] is not None), key=nmi.get, reverse=True)
        details = []
        for name in specific[:DETAIL_LAYERS]:
            task_load = summary.layers[name].task_load[rows].double()
            details.append((name, nmi[name],
                            (task_load / task_load.sum(1, keepdim=True).clamp(min=1) * num_experts).tolist()))
        files = plot_files(series)
        plot_layer_heatmap(load, names, ["all tasks"], num_experts,
                           f"Expert load per layer ({series}, {summary.weights})", "load / even share",
                           folder / files[0])
        plot_task_routing(divergence.tolist(), names, [summary.tasks[task] for task in rows], details,
                          f"How differently each task is routed, by depth ({series}, {summary.weights})",
                          folder / files[1])
        return files

    # ------------------------------------------------------------------ Lightning hooks
    def refuse_foreign_files(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The files of the series this run writes (none for a model without routed layers)."""
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        if not self._routed_layers(pl_module):
            return
        series = evaluation_series(trainer)
        drawn = {series, "val"} if "val" in self.results else {series}  # "val": restored (_draw_restored)

        def check() -> None:
            refuse_foreign_json(directory / summary_file(series), SUMMARY_KEYS, "RoutingStats",
                                "run without it (--routing_stats null, or leave RoutingStats out of the callbacks)")
            for name in [name for each in sorted(drawn) for name in plot_files(each)] if self.plots else []:
                refuse_foreign_plot(directory / PLOTS_FOLDER / name, "RoutingStats",
                                    "draw no heatmaps (RoutingStats(plots=False))")

        refuse_on_every_rank(trainer, check)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._weights.forget()

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._weights.loaded(trainer, checkpoint)

    def state_dict(self) -> dict[str, Any]:
        """The fit's latest validation routing (`results["val"]`, plain numbers): a fit resumed after it, or a test of
        the checkpoint in a new process, evaluates no fit validation of its own, and its report lacked the section."""
        summary = self.results.get("val")
        return {} if summary is None else {"val": summary.state()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As `PerTaskMetrics.load_state_dict`: resuming a fit takes the checkpoint's, and so does validate/test of a
        checkpoint in a process without a fit validation of its own (after a fit, its own is the latest)."""
        saved = state_dict.get("val")
        if saved is None or (self._weights.checkpoint_step is not None and "val" in self.results):
            return
        self.results["val"] = RoutingSummary.from_state(saved)
        self.restored_from = self._weights.checkpoint_name

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "val")

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, pl_module)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._finish(trainer, pl_module, "test")

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """After the refusal of foreign files, draw what a resumed fit restored: one resumed after its last validation
        evaluates nothing in this process, and one resumed at its end does not even train (Lightning skips
        `on_train_end` then)."""
        super().on_fit_start(trainer, pl_module)
        if not self.plots:
            return
        directory = run_directory(trainer)  # on every rank: without checkpoints it is a collective call
        if trainer.is_global_zero:
            self._draw_restored(directory / PLOTS_FOLDER)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._detach()
        self._accumulator = None

    # ------------------------------------------------------------------ run report
    def report_sections(self, trainer: L.Trainer) -> list[str]:
        """One section per series, as RunReport lists the scores: the fit's validation, then trainer.validate's (in
        addition, never instead), then test's."""
        sections = []
        for series, title in (("val", "Routing health (validation)"),
                              ("validate", "Routing health (validation outside training, trainer.validate)"),
                              ("test", "Routing health (test)")):
            summary = self.results.get(series)
            if summary is not None:
                sections.append(f"## {title}\n\n{self._report(summary, series)}")
        return sections

    def _report(self, summary: RoutingSummary, series: str) -> str:
        health = summary.health()

        def number(value: float | None, digits: int = 2) -> str:
            return "-" if value is None else f"{value:.{digits}f}"

        lines = [restored_note(self.restored_from), ""] if series == "val" and self.restored_from is not None else []
        weights = summary.weights
        lines += [
            f"{weights[0].upper()}{weights[1:]}: {health['layers']} routed layers, {health['tokens']} tokens each "
            f"(padding excluded). Dead expert: load below {summary.dead_threshold:g} x the even share.", "",
            "| load CV mean | CV min | CV max (layer) | router entropy / ln N | dead experts | task-expert NMI |",
            "|---|---|---|---|---|---|",
            f"| {number(health['load_cv_mean'])} | {number(health['load_cv_min'])} | "
            f"{number(health['load_cv_max'])} ({health['load_cv_max_layer'] or '-'}) | "
            f"{number(health['normalized_entropy_mean'])} | "
            f"{number(health['dead_experts'], 0)} of {health['experts']} | "
            f"{number(health['task_expert_nmi_mean'], 3)} |",
        ]
        divergence = summary.task_divergence()
        if divergence:
            lines += ["", "How differently each task is routed: KL from the layer's overall expert use, mean over "
                          "layers (nats; 0 = like every other task).", "", "| task | KL |", "|---|---|"]
            lines += [f"| {markdown_cell(name)} | {value:.4f} |" for name, value in divergence.items()]
        ranked = sorted(((layer.load_cv, name) for name, layer in summary.layers.items() if layer.load_cv is not None),
                        reverse=True)[:self.report_layers]
        if ranked:
            lines += ["", f"Most unbalanced layers (top {len(ranked)} of {health['layers']}):", "",
                      "| layer | assignments per expert (k per token) | load CV | max / mean | entropy / ln N | dead |",
                      "|---|---|---|---|---|---|"]
            for cv, name in ranked:
                layer = summary.layers[name]
                dead = dead_experts(layer.load, summary.dead_threshold)
                lines.append(f"| {name} | {' '.join(str(count) for count in layer.load.tolist())} | {cv:.2f} | "
                             f"{number(layer.max_over_mean)} | {number(layer.normalized_entropy)} | "
                             f"{', '.join(map(str, dead)) or '-'} |")
        for title, file in zip(("Expert load per layer", "How differently each task is routed, by depth"),
                               self.plots_written.get(series, [])):
            lines += ["", f"![{title}]({PLOTS_FOLDER}/{file})"]
        return "\n".join(lines)
