"""Routing statistics on hand-built records and on a MALoRA layer whose routing is forced through its router."""

import math
import struct
from pathlib import Path

import pytest
import torch
from torch import nn

from malora_lightning.adapters import AdapterConfig, MALoRALinear
from malora_lightning.adapters.routing import ForwardRouting, RoutingRecord, ScoringPass
from malora_lightning.callbacks import LayerRouting
from malora_lightning.callbacks.routing_stats import (DETAIL_LAYERS, RoutingAccumulator, RoutingStats, RoutingSummary,
                                                      dead_experts, task_divergences, task_expert_nmi)

EXPERTS = 4


def forced_layer(router_weight: torch.Tensor, top_k: int) -> MALoRALinear:
    """A MALoRA layer over a 4-wide linear whose router weight is set, so one-hot inputs pick known experts."""
    config = AdapterConfig(method="malora", rank=2, shared_rank=2, num_experts=EXPERTS, top_k=top_k, dropout=0.0)
    layer = MALoRALinear(nn.Linear(EXPERTS, 3), config, name="probe")
    with torch.no_grad():
        layer.router.weight.copy_(router_weight)
    return layer.eval()


def route_tokens(layer: MALoRALinear, inputs: torch.Tensor, token_tasks: torch.Tensor, num_tasks: int = 2,
                 attention_mask: torch.Tensor | None = None) -> LayerRouting:
    """Run the layer on [batch, seq, 4] inputs with an accumulator observing it, as RoutingStats does."""
    accumulator = RoutingAccumulator(["probe"], EXPERTS, num_tasks, torch.device("cpu"))
    context = layer.routing_context
    context.begin_forward(attention_mask)
    context.observers.append(lambda record: accumulator.add(record, token_tasks))
    with torch.no_grad():
        layer(inputs)
    return accumulator.layers(layer.top_k)["probe"]


def one_hot_tokens(indices: list[list[int]]) -> torch.Tensor:
    return nn.functional.one_hot(torch.tensor(indices), EXPERTS).float()


def softmax_entropy(logits: list[float]) -> float:
    weights = [math.exp(value) for value in logits]
    total = sum(weights)
    return -sum(w / total * math.log(w / total) for w in weights)


def test_balanced_routing_has_zero_cv_and_no_dead_expert():
    layer = forced_layer(3.0 * torch.eye(EXPERTS), top_k=1)  # token e_i -> expert i
    inputs = one_hot_tokens([[0, 1, 2, 3], [3, 2, 1, 0]])
    routing = route_tokens(layer, inputs, token_tasks=torch.tensor([0, 0, 0, 0, 1, 1, 1, 1]))
    assert routing.load.tolist() == [2, 2, 2, 2] and routing.tokens == 8
    assert routing.load_cv == 0.0 and routing.max_over_mean == 1.0
    assert dead_experts(routing.load, 0.01) == []
    assert routing.entropy == pytest.approx(softmax_entropy([3.0, 0.0, 0.0, 0.0]), rel=1e-5)
    assert routing.normalized_entropy == pytest.approx(routing.entropy / math.log(4))
    assert task_expert_nmi(routing.task_load) == pytest.approx(0.0, abs=1e-12)  # both tasks use every expert alike


def test_collapsed_routing_leaves_one_live_expert():
    weight = torch.zeros(EXPERTS, EXPERTS)
    weight[2] = 3.0  # every (non-negative, non-zero) input prefers expert 2
    layer = forced_layer(weight, top_k=1)
    inputs = one_hot_tokens([[0, 1, 2, 3], [1, 1, 0, 3]])
    routing = route_tokens(layer, inputs, token_tasks=torch.tensor([0] * 4 + [1] * 4))
    assert routing.load.tolist() == [0, 0, 8, 0]
    assert dead_experts(routing.load, 0.01) == [0, 1, 3]
    # load [0, 0, 8, 0]: mean 2, population variance (4 + 4 + 36 + 4) / 4 = 12, so CV = sqrt(12) / 2 = sqrt(3)
    assert routing.load_cv == pytest.approx(math.sqrt(3))
    assert routing.max_over_mean == pytest.approx(4.0)
    assert routing.entropy == pytest.approx(softmax_entropy([0.0, 0.0, 3.0, 0.0]), rel=1e-5)


def test_task_specialised_routing_has_normalised_mutual_information_one():
    weight = torch.tensor([[10.0, 0, 0, 0], [9.0, 0, 0, 0], [0, 0, 10.0, 0], [0, 0, 9.0, 0]])
    layer = forced_layer(weight, top_k=2)  # e_0 -> experts {0, 1}; e_2 -> experts {2, 3}
    inputs = one_hot_tokens([[0, 0, 0], [2, 2, 2]])
    routing = route_tokens(layer, inputs, token_tasks=torch.tensor([0, 0, 0, 1, 1, 1]))
    assert routing.task_load.tolist() == [[3, 3, 0, 0], [0, 0, 3, 3]]
    assert routing.load_cv == 0.0  # balanced overall, yet every expert serves one task only
    assert task_expert_nmi(routing.task_load) == pytest.approx(1.0)


def test_padding_tokens_are_not_counted():
    layer = forced_layer(3.0 * torch.eye(EXPERTS), top_k=1)
    inputs = one_hot_tokens([[0, 1, 3], [2, 2, 3]])  # last column is padding in row 0 only
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    routing = route_tokens(layer, inputs, torch.tensor([0, 0, 0, 1, 1, 1]), attention_mask=mask)
    assert routing.task_load.tolist() == [[1, 1, 0, 0], [0, 0, 2, 1]]
    assert routing.tokens == 5
    assert routing.entropy_sum == pytest.approx(5 * softmax_entropy([3.0, 0.0, 0.0, 0.0]), rel=1e-5)


def test_hand_built_records_accumulate_per_task_and_layer():
    accumulator = RoutingAccumulator(["first", "second"], num_experts=3, num_tasks=2, device=torch.device("cpu"))
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    experts = torch.tensor([[0, 1], [0, 2], [2, 0], [2, 1]])
    mask = torch.tensor([True, True, True, False])
    tasks = torch.tensor([1, 1, 0, 0])
    accumulator.add(RoutingRecord("second", probs, experts, mask, (2, 2)), tasks)
    accumulator.add(RoutingRecord("second", probs[:1], experts[:1], None, (1, 1)), torch.tensor([0]))
    layers = accumulator.layers(top_k=2)
    assert layers["first"].tokens == 0 and layers["first"].load_cv is None and layers["first"].entropy is None
    second = layers["second"]
    # task 0: token 2 -> experts 2, 0 and the unmasked single token -> 0, 1; task 1: tokens 0, 1 -> 0, 1 and 0, 2
    assert second.task_load.tolist() == [[2, 1, 1], [2, 1, 1]]
    assert second.tokens == 4
    expected_entropy = math.log(2) + 0.0 + (2 * 0.25 * math.log(4) + 0.5 * math.log(2)) + math.log(2)
    assert second.entropy_sum == pytest.approx(expected_entropy)
    assert second.entropy == pytest.approx(expected_entropy / 4)


def test_a_scoring_pass_through_a_layer_fed_flattened_tokens_counts_like_its_batch():
    """A layer fed [batch * seq, features] (OPT's fc1, Qwen2-MoE's shared expert) reports a leading shape of
    (batch * seq,): RoutingStats took one token per row and failed (size 2 against 4); it counts as for (batch, seq)."""
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    experts = torch.tensor([[0, 1], [0, 2], [2, 0], [2, 1]])
    mask = torch.tensor([True, True, True, False])
    loads = []
    for shape in [(2, 2), (4,)]:
        stats = RoutingStats()
        stats._accumulator = RoutingAccumulator(["layer"], num_experts=3, num_tasks=2, device=torch.device("cpu"))
        forward = ForwardRouting(scoring=ScoringPass(row_tasks=torch.tensor([1, 0])))
        stats._observe(RoutingRecord("layer", probs, experts, mask, shape, forward))
        loads.append(stats._accumulator.layers(top_k=2)["layer"].task_load.tolist())
    assert loads[0] == loads[1] == [[1, 0, 1], [2, 1, 1]]


def test_dead_threshold_is_a_fraction_of_the_even_share():
    load = torch.tensor([1000, 1000, 995, 5])  # expert 3 gets 5/3000 = 0.17 % of assignments; even share is 25 %
    assert dead_experts(load, 0.01) == [3]  # 0.17 % < 1 % of 25 %
    assert dead_experts(load, 0.005) == []  # 0.17 % >= 0.5 % of 25 %
    assert dead_experts(torch.zeros(4, dtype=torch.long), 0.01) is None  # nothing routed: not judged


@pytest.mark.parametrize("setting, value", [("dead_threshold", -0.1), ("dead_threshold", True),
                                            ("dead_threshold", float("nan")), ("report_layers", 0),
                                            ("report_layers", -1), ("report_layers", 2.5), ("report_layers", True),
                                            ("plots", "false")])  # was truthy: the heatmaps were drawn
def test_bad_settings_are_refused_by_name(setting, value):
    """report_layers slices the sorted layers: -1 listed every layer but one and 0 an empty table."""
    with pytest.raises(ValueError, match=f"{setting}={value!r} is invalid"):
        RoutingStats(**{setting: value})


def test_nmi_is_undefined_with_one_task():
    assert task_expert_nmi(torch.tensor([[3, 1, 0, 0], [0, 0, 0, 0]])) is None
    assert task_expert_nmi(torch.tensor([[0, 0], [0, 0]])) is None


def test_task_divergence_is_the_kl_from_the_layers_overall_expert_use():
    # P(e) = [2, 3, 3] / 8; task 0: P(e | t) = [1/2, 1/2, 0], task 1: [0, 1/4, 3/4], task 2 has no tokens
    divergences = task_divergences(torch.tensor([[2, 2, 0], [0, 1, 3], [0, 0, 0]]))
    task_0 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.375)  # 0.4904
    task_1 = 0.25 * math.log(0.25 / 0.375) + 0.75 * math.log(0.75 / 0.375)  # 0.4185
    assert divergences.tolist() == pytest.approx([task_0, task_1, 0.0])
    assert task_0 == pytest.approx(0.490415, abs=1e-6) and task_1 == pytest.approx(0.418494, abs=1e-6)


def png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])  # the IHDR chunk: width, height


def test_task_routing_plot_of_a_smollm2_sized_model_is_readable_and_the_json_keeps_every_matrix(tmp_path):
    pytest.importorskip("matplotlib")
    generator = torch.Generator().manual_seed(0)
    names = [f"model.layers.{block}.{proj}" for block in range(30)
             for proj in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.up_proj", "mlp.down_proj")]  # 180 routed layers, as SmolLM2-135M has
    tasks = [f"task_{index}" for index in range(9)]
    layers = {name: LayerRouting(task_load=torch.randint(0, 50, (9, 8), generator=generator), entropy_sum=1.0,
                                 top_k=2) for name in names}
    specific = names[100]
    layers[specific].task_load = 40 * torch.eye(9, 8, dtype=torch.long)  # every task its own expert
    summary = RoutingSummary(stage="val", step=5, tasks=tasks, layers=layers, dead_threshold=0.01)

    files = RoutingStats._plot(summary, "val", tmp_path)
    width, height = png_size(tmp_path / files[1])
    assert width <= 1400 and height <= 1200, (width, height)  # was 2400 x 3080
    assert DETAIL_LAYERS < len(names)

    saved = summary.to_dict()["layers"]
    assert list(saved) == names
    assert all(saved[name]["task_load"] == layers[name].task_load.tolist() for name in names)
    assert saved[specific]["task_divergence"] == pytest.approx(task_divergences(layers[specific].task_load).tolist())


def test_a_task_name_holding_a_bar_stays_one_cell_of_the_kl_table():
    """As in the report's other tables: a "|" split the row into more cells, the KL under no column."""
    layers = {"layer": LayerRouting(task_load=torch.tensor([[3, 0], [0, 3]]), entropy_sum=1.0, top_k=1)}
    summary = RoutingSummary(stage="val", step=1, tasks=["a|b", "c"], layers=layers, dead_threshold=0.01)
    rows = [line for line in RoutingStats(plots=False)._report(summary, "val").splitlines() if line.startswith("| a")]
    assert rows == [f"| a\\|b | {math.log(2):.4f} |"]


def test_a_scoring_pass_counts_only_the_kept_tokens_that_are_not_padding():
    """`token_keep` (the counted rows) and the record's own mask (padding) both apply."""
    accumulator = RoutingAccumulator(["layer"], num_experts=3, num_tasks=2, device=torch.device("cpu"))
    probs = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5], [0.2, 0.3, 0.5]])
    experts = torch.tensor([[0, 1], [0, 2], [2, 0], [2, 1]])
    padding = torch.tensor([True, True, True, False])
    keep = torch.tensor([False, True, True, True])
    accumulator.add(RoutingRecord("layer", probs, experts, padding, (2, 2)), torch.tensor([1, 1, 0, 0]), keep)
    layer = accumulator.layers(top_k=2)["layer"]
    assert layer.task_load.tolist() == [[1, 0, 1], [1, 0, 1]]  # tokens 1 (task 1) and 2 (task 0) only
    assert layer.entropy_sum == pytest.approx(2 * 0.25 * math.log(4) + 0.5 * math.log(2))


def test_health_names_the_most_unbalanced_layer():
    layers = {"even": LayerRouting(torch.tensor([[2, 2]]), entropy_sum=0.0, top_k=1),
              "skewed": LayerRouting(torch.tensor([[4, 0]]), entropy_sum=0.0, top_k=1)}
    health = RoutingSummary(stage="val", step=1, tasks=["t"], layers=layers, dead_threshold=0.01).health()
    assert (health["load_cv_max_layer"], health["load_cv_max"], health["load_cv_min"]) == ("skewed", 1.0, 0.0)
    assert health["load_cv_mean"] == 0.5


def test_resuming_a_fit_takes_the_checkpoints_routing_over_this_processs():
    """As PerTaskMetrics: only validate/test of a checkpoint keep the fit validation routing of their own process."""
    def summary(step: int) -> RoutingSummary:
        return RoutingSummary(stage="val", step=step, tasks=["t"], dead_threshold=0.01,
                              layers={"layer": LayerRouting(torch.tensor([[1, 3]]), entropy_sum=0.5, top_k=1)})

    saved = {"val": summary(4).state()}
    resumed = RoutingStats()
    resumed.results["val"] = summary(9)  # an earlier fit in this process
    resumed.load_state_dict(saved)
    assert resumed.results["val"].step == 4
    evaluated = RoutingStats()
    evaluated.results["val"] = summary(9)
    evaluated._weights.checkpoint_step = 4  # validate/test(ckpt_path=...) after a fit
    evaluated.load_state_dict(saved)
    assert evaluated.results["val"].step == 9


def test_depth_ticks_mark_each_blocks_first_layer_or_every_layer_of_names_without_numbers():
    from malora_lightning.callbacks.plots import depth_ticks

    names = ["model.layers.0.q_proj", "model.layers.0.k_proj", "model.layers.1.q_proj", "model.layers.10.q_proj"]
    assert depth_ticks(names) == ([0, 2, 3], ["0", "1", "10"])
    assert depth_ticks(["model.layers.3.q_proj", "model.layers.3.v_proj"]) == ([0], ["3"])  # the first is always one
    assert depth_ticks(["encoder.q_proj", "decoder.q_proj", "lm_head"]) == ([0, 1, 2], ["0", "1", "2"])
    assert depth_ticks(["model.layers.0.q_proj", "lm_head"]) == ([0, 1], ["0", "1"])  # one name without a number
    assert depth_ticks([f"layer{i}" for i in range(70)], most=32) == (list(range(0, 70, 3)),
                                                                     [str(i) for i in range(0, 70, 3)])
