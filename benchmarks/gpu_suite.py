"""The GPU suite: every GPU measurement BENCHMARKS.md quotes, in one command, with no download (random weights).

    python -m benchmarks.gpu_suite            # one H200: steps 1 and 2 took 252 s there (BENCHMARKS.md, GPU)
    python -m benchmarks.gpu_suite --quick    # each step on a small setting: checks the pipeline in about a minute

Runs, most important first, each in its own process and each writing its usual JSON + Markdown to
benchmarks/results (tag `gpu-suite`). A probe first checks the fused routing's Triton kernels against the dense
kernel's plain ops, outputs and gradients, on small layers and on a 1024->2048 one (`fused_check`, seconds); if they
fail or disagree there (on CPU they run through Triton's interpreter only), the steps below run without the
`_fused` methods rather than losing every number of a step to them, or timing wrong results.

1. `e2e_speed` on a LLaMA-2-7B-shaped model (4 decoder layers), nf4-bf16 and bf16, 4 x 512 tokens: training step,
   evaluation forward and generation, our three methods eager, compiled and (mixtures) with `kernel="fused"` next to
   PEFT LoRA and MixLoRA.
2. `layer_speed`: one adapted 4096->11008 linear, T=2048, bf16 autocast, x.grad: the base, our LoRA, MoLoRA and
   MALoRA eager, fused, compiled (`compile_adapters`) and with CUDA graphs (compile mode "reduce-overhead").
3. `e2e_speed` as in 1, training steps only, with the whole model compiled (`_whole`: torch.compile(model), one
   graph per mode and shape) next to the same methods eager: the base, PEFT LoRA, our LoRA and MALoRA.
4. `op_count --device cuda --training-only --fused`: ops and CUDA kernels per adapted layer and training step, eager,
   fused and compiled.
5. `e2e_speed` on SmolLM2-135M's shape, nf4-bf16, 8 x 256 tokens (fewer methods).

Needs CUDA, bitsandbytes and (for the peers) peft and mixlora.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

FUSED_PROBE = ["benchmarks.fused_check", "--device", "cuda"]
FULL = [  # most important first: a run cut short by --deadline keeps what it finished
    ["benchmarks.e2e_speed", "--device", "cuda", "--model", "llama2-7b-shape:4",
     "--settings", "nf4-bf16:4x512,bf16:4x512", "--eval", "--no-memory", "--warmup", "3", "--rounds", "8",
     "--methods", "base,lora,molora,malora,molora_fused,malora_fused,lora_compiled,molora_compiled,malora_compiled,"
     "peft_lora,mixlora"],
    ["benchmarks.layer_speed", "--device", "cuda", "--shapes", "4096x11008", "--tokens", "2048", "--dtypes", "bf16",
     "--x-grad", "yes", "--warmup", "3", "--rounds", "15", "--methods",
     "base,lora,molora_dense,malora_dense,molora_fused,malora_fused,lora_compiled,molora_compiled,malora_compiled,"
     "malora_cudagraphs"],
    ["benchmarks.e2e_speed", "--device", "cuda", "--model", "llama2-7b-shape:4", "--settings",
     "nf4-bf16:4x512,bf16:4x512", "--no-memory", "--warmup", "3", "--rounds", "8", "--methods",
     "base,base_whole,peft_lora,peft_lora_whole,lora,lora_whole,malora,malora_whole", "--tag", "whole"],
    ["benchmarks.op_count", "--device", "cuda", "--training-only", "--fused"],
    ["benchmarks.e2e_speed", "--device", "cuda", "--model", "smollm2-shape", "--settings", "nf4-bf16:8x256",
     "--methods", "base,lora,malora,malora_fused,malora_compiled,peft_lora,mixlora", "--eval", "--no-memory",
     "--warmup", "2", "--rounds", "5"],
]
QUICK = [
    ["benchmarks.op_count", "--device", "cuda", "--training-only", "--fused"],
    ["benchmarks.layer_speed", "--device", "cuda", "--shapes", "1024x2048", "--tokens", "512", "--dtypes", "bf16",
     "--x-grad", "yes", "--warmup", "2", "--rounds", "3", "--methods",
     "base,lora,malora_dense,malora_fused,malora_compiled"],
    ["benchmarks.e2e_speed", "--device", "cuda", "--model", "llama2-7b-shape:1", "--settings", "nf4-bf16:2x64",
     "--eval", "--no-memory", "--warmup", "2", "--rounds", "2", "--methods", "base,lora,malora,malora_fused"],
]


def without_fused(command: list[str]) -> list[str]:
    """The step without the `_fused` methods and op_count's `--fused`."""
    kept = [argument for argument in command if argument != "--fused"]
    if "--methods" in kept:
        index = kept.index("--methods") + 1
        kept[index] = ",".join(m for m in kept[index].split(",") if not m.endswith("_fused"))
    return kept


def tagged(command: list[str], tag: str) -> list[str]:
    """The step's arguments with `--tag`: the suite's, followed by the step's own where it names one (two steps of
    one script on one model would otherwise write reports of the same name)."""
    if "--tag" not in command:
        return [*command, "--tag", tag]
    index = command.index("--tag")
    return [*command[:index], "--tag", f"{tag}-{command[index + 1]}", *command[index + 2:]]


def run_step(command: list[str], tag: str, started: float, deadline: float | None) -> int | str:
    """Run one step in its own process with what is left of the deadline: its exit code, "timeout" or "skipped"."""
    step_started = time.perf_counter()
    left = None if deadline is None else deadline - (step_started - started)
    if left is not None and left < 20:
        print(f"=== skipped (deadline): python -m {' '.join(command)}", flush=True)
        return "skipped"
    arguments = tagged(command, tag)
    print(f"=== python -m {' '.join(arguments)}", flush=True)
    try:
        code: int | str = subprocess.run([sys.executable, "-m", *arguments], timeout=left).returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    print(f"=== exit {code} after {time.perf_counter() - step_started:.0f} s", flush=True)
    return code


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small settings: check the pipeline")
    parser.add_argument("--tag", default="gpu-suite")
    parser.add_argument("--deadline", type=float, help="seconds for the whole suite: each step gets what is left "
                        "(scripts write their reports as they go, so a step cut short keeps its finished settings)")
    args = parser.parse_args()
    started = time.perf_counter()
    failed = []
    steps = QUICK if args.quick else FULL
    if run_step(FUSED_PROBE, f"{args.tag}-fused-probe", started, args.deadline) != 0:
        print("=== the fused routing failed on this GPU: the steps below run without the _fused methods", flush=True)
        failed.append("fused probe")
        steps = [without_fused(command) for command in steps]
    for command in steps:
        if run_step(command, args.tag, started, args.deadline) != 0:
            failed.append(command[0])
    print(f"=== GPU suite: {time.perf_counter() - started:.0f} s in all; failed: {failed or 'none'}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
