"""A benchmark method that fails (a compile or CUDA-graph error on a GPU, a peer that cannot run) is left out of its
setting's timings with its error in the report; the other methods are still timed. Before, the first failure ended
the whole script, and a GPU run lost every number of its step."""

import argparse
import dataclasses

import torch

from benchmarks import e2e_speed, layer_speed
from benchmarks.common import working_steps
from tests.helpers import tiny_model

CPU = torch.device("cpu")


def test_working_steps_keep_the_steps_that_ran_and_name_each_failure():
    calls = []

    def fine() -> None:
        calls.append("fine")

    def broken() -> None:
        raise RuntimeError("CUDA graph capture failed\nsecond line")

    ran, failed = working_steps({"a": fine, "b": broken}, CPU)
    assert list(ran) == ["a"] and calls == ["fine"]  # each step called once
    assert failed == {"b": "RuntimeError: CUDA graph capture failed"}


def test_a_failing_method_leaves_the_layer_benchmarks_other_methods_timed(monkeypatch):
    prepare = layer_speed.prepare

    def failing_malora(method, inputs, *args, **kwargs):
        prepared = prepare(method, inputs, *args, **kwargs)
        if method != "malora_dense":
            return prepared

        def forward(x):
            raise RuntimeError("compiled step failed")

        return dataclasses.replace(prepared, forward=forward)

    monkeypatch.setattr(layer_speed, "prepare", failing_malora)
    setting = layer_speed.Setting(32, 48, 16, "fp32", True)
    args = argparse.Namespace(dropout=0.0, aux_loss_coef=0.01, warmup=1, rounds=2)
    result = layer_speed.run_setting(setting, ["base", "lora", "malora_dense"], args, CPU)
    assert result["failed"] == {"malora_dense": "RuntimeError: compiled step failed"}
    assert set(result["median_ms"]) == set(result["memory"]) == {"base", "lora"}
    assert len(result["times_ms"]["lora"]) == 2
    assert "malora_best/lora" not in result["ratios"] and "overhead_lora" in result["ratios"]
    result["floor_overhead"] = {}
    payload = {"preset": "test", "env": "test", "device": "cpu", "machine": {}, "bandwidth_gbs": 1.0,
               "cost_table": "", "results": [result],
               "args": {"methods": ["base", "lora", "malora_dense"], "warmup": 1, "rounds": 2, "dropout": 0.0,
                        "aux_loss_coef": 0.01, "notes": []}}
    monkeypatch.setattr(layer_speed, "machine_markdown", lambda info: "")
    report = layer_speed.markdown_report(payload)
    row = next(line for line in report.splitlines() if line.startswith(f"| {setting.label}"))
    assert row.split(" | ")[3] == "failed"
    assert f"- {setting.label}, MA dense: RuntimeError: compiled step failed" in report


def test_a_failing_method_leaves_the_end_to_end_benchmarks_other_methods_timed():
    base = tiny_model("llama")
    prepared = {method: e2e_speed.prepare(method, base) for method in ("base", "lora", "malora")}

    def broken(*args, **kwargs):
        raise RuntimeError("whole-model compile failed")

    prepared["malora"].model.forward = broken
    optimizers = {method: e2e_speed.make_optimizer(p, "default") for method, p in prepared.items()}
    setting = e2e_speed.Setting("fp32", 2, 8)
    result = e2e_speed.run_setting(setting, prepared, optimizers, 1, 2, 200, CPU, measure_memory=True,
                                   evaluate=True)
    assert result["failed"] == {"malora": "RuntimeError: whole-model compile failed"}
    assert set(result["median"]) == set(result["memory"]) == set(result["evaluation"]) == {"base", "lora"}
    assert [len(phases) for phases in result["phases_ms"].values()] == [2, 2]  # the trial call is not a round
    medians = result["median"]
    assert result["ratios"] == {"lora/base": medians["lora"]["total_ms"] / medians["base"]["total_ms"]}
    table = e2e_speed.setting_table(result, ["base", "lora", "malora"], {"base": 0, "lora": 1, "malora": 2})
    assert "| failed: RuntimeError: whole-model compile failed |" in table
    assert len(e2e_speed.evaluation_table(result, ["base", "lora", "malora"]).splitlines()) == 4  # header, rule, 2
