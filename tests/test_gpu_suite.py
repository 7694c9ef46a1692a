"""The GPU suite's steps, checked where no GPU is: every method a step names is one its script knows, and a step
without the fused methods keeps everything else (device time is scarce: a typo would cost a whole lease)."""

import sys

import pytest

from benchmarks import e2e_speed, layer_speed
from benchmarks.gpu_suite import FULL, FUSED_PROBE, QUICK, tagged, without_fused

KNOWN = {"benchmarks.e2e_speed": set(e2e_speed.METHODS),
         "benchmarks.layer_speed": set(layer_speed.METHODS + layer_speed.GPU_METHODS)}


def methods_of(command: list[str]) -> list[str]:
    return command[command.index("--methods") + 1].split(",") if "--methods" in command else []


@pytest.mark.parametrize("command", FULL + QUICK + [FUSED_PROBE], ids=lambda command: command[0])
def test_every_step_names_methods_its_script_knows(command):
    assert set(methods_of(command)) <= KNOWN.get(command[0], set())


def test_without_fused_drops_only_the_fused_methods():
    def other_arguments(command: list[str]) -> list[str]:
        return [a for i, a in enumerate(command) if a != "--fused" and command[i - 1] != "--methods"]

    for command in FULL + QUICK:
        kept = without_fused(command)
        assert methods_of(kept) == [m for m in methods_of(command) if not m.endswith("_fused")]
        assert other_arguments(kept) == other_arguments(command)
    assert any(m.endswith("_fused") for m in methods_of(FULL[0]))  # the suite does time them


@pytest.mark.parametrize("steps", [FULL, QUICK], ids=["full", "quick"])
def test_no_two_steps_write_the_same_report(steps, monkeypatch):
    """The suite runs every step with its tag (`tagged`); e2e_speed's report name must then tell its steps apart."""
    stems = []
    for command in steps:
        if command[0] == "benchmarks.e2e_speed":
            monkeypatch.setattr(sys, "argv", ["e2e_speed", *tagged(command, "gpu-suite")[1:]])
            args = e2e_speed.parse_args()
            stems.append(e2e_speed.report_stem(f"e2e_speed_{args.preset}", args, "default-16threads"))
    assert len(set(stems)) == len(stems)
