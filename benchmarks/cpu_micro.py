"""Micro-benchmarks behind four CPU choices of the library: the dropout mask, the AdamW kernel, routing's cost and
the attention backend left to torch.

Each group times its variants round-robin in one process (medians of `--rounds`), so the ratios inside a group hold
on a noisy machine:

* dropout: `F.dropout` against `LaneDropout` (the library's) on one adapter input, forward and forward + backward;
* adamw: one optimiser step over the adapter tensors of SmolLM2-135M (the paper's module set) for LoRA r=64 and
  MALoRA, with torch's per-tensor loop, foreach and fused kernels;
* routing: the routed layers' routing (softmax, top-k, renormalised gates, dense gate matrix, load-balance loss)
  forward + backward, against a bare softmax with autograd: the most a fused routing kernel could save;
* attention: SDPA's flash and math backends on SmolLM2's heads (9 query, 3 key/value, 64 wide), bf16, causal
  mask, forward + backward and forward alone, at several sequence lengths: math wins the short training
  sequences only, so the library does not pick a backend.

    python -m benchmarks.cpu_micro --quick     # a few seconds
    python -m benchmarks.cpu_micro             # the numbers in BENCHMARKS.md
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import (
    add_run_arguments,
    machine_info,
    machine_markdown,
    markdown_table,
    median,
    round_robin,
    run_env_tag,
    start_run,
    write_report,
)
from benchmarks.quality import CONFIGURATIONS, adapted_model_on_meta
from malora_lightning.adapters.dropout import LaneDropout
from malora_lightning.adapters.routing import dense_gates, load_balance_loss, route


def dropout_group(tokens: int, features: int, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    x = torch.randn(tokens, features, dtype=dtype, requires_grad=True)
    upstream = torch.randn_like(x)
    native, lane = torch.nn.Dropout(0.05).train(), LaneDropout(0.05).train()

    def forward_backward(module: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            module(x).backward(upstream)
        return run

    return {"F.dropout forward": lambda: native(x), "LaneDropout forward": lambda: lane(x),
            "F.dropout forward+backward": forward_backward(native),
            "LaneDropout forward+backward": forward_backward(lane)}


def adamw_group(configuration: str) -> dict[str, Callable[[], object]]:
    """One AdamW step over CPU copies of the trainable tensors this quality configuration has on SmolLM2."""
    shapes = [p.shape for p in adapted_model_on_meta(CONFIGURATIONS[configuration]["adapter"]).parameters() if p.requires_grad]
    variants = {}
    for kind, options in (("loop", {"foreach": False}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [torch.nn.Parameter(0.01 * torch.randn(shape)) for shape in shapes]
        for param in params:
            param.grad = torch.randn_like(param)
        variants[f"{configuration} AdamW {kind}"] = torch.optim.AdamW(params, lr=1e-4, **options).step
    return variants


def routing_group(tokens: int, experts: int, top_k: int) -> dict[str, Callable[[], object]]:
    logits = torch.randn(tokens, experts, requires_grad=True)
    mask = torch.ones(tokens, dtype=torch.bool)
    upstream = torch.randn(tokens, experts)

    def routing() -> None:
        result = route(logits, top_k, True)
        loss = (dense_gates(result, 2.0) * upstream).sum() + 0.01 * load_balance_loss(result.probs, result.experts, mask)
        loss.backward()

    def softmax_only() -> None:
        (logits.softmax(-1) * upstream).sum().backward()

    return {"routing forward+backward": routing, "bare softmax forward+backward": softmax_only}


def attention_group(batch: int, tokens: int, backward: bool) -> dict[str, Callable[[], object]]:
    query = torch.randn(batch, 9, tokens, 64, dtype=torch.bfloat16, requires_grad=backward)
    key, value = (torch.randn(batch, 3, tokens, 64, dtype=torch.bfloat16, requires_grad=backward) for _ in range(2))
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()
    upstream = torch.randn_like(query)

    def attention(backend: SDPBackend) -> Callable[[], None]:
        def run() -> None:
            with sdpa_kernel(backend):
                output = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, enable_gqa=True)
            if backward:
                query.grad = key.grad = value.grad = None
                output.backward(upstream)
        return run

    return {f"{backend.name.lower()} {'forward+backward' if backward else 'forward'}": attention(backend)
            for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds (a few seconds)")
    parser.add_argument("--rounds", type=int)
    add_run_arguments(parser)
    args = parser.parse_args()
    rounds = args.rounds or (5 if args.quick else 60)
    device, load_at_start = start_run(args)
    groups = {
        "dropout, [512, 576] float32": dropout_group(512, 576, torch.float32),
        "dropout, [512, 576] bfloat16": dropout_group(512, 576, torch.bfloat16),
        "AdamW step, LoRA r=64 on SmolLM2 (360 tensors)": adamw_group("lora_r64"),
        "AdamW step, MALoRA on SmolLM2 (720 tensors)": adamw_group("malora"),
        "routing of one layer, T=512, N=8, top-2": routing_group(512, 8, 2),
        **{f"attention, [8, 9, {tokens}, 64] bf16{', with backward' if backward else ''}":
           attention_group(8, tokens, backward) for backward in (True, False) for tokens in (64, 256, 1024)},
    }
    results = {}
    for title, variants in groups.items():
        warmup = 1 if "AdamW" in title else 3
        times = round_robin(variants, warmup, max(3, rounds // 6) if "AdamW" in title else rounds, device)
        results[title] = {name: 1e6 * median(values) for name, values in times.items()}
        print(title, {name: round(us) for name, us in results[title].items()}, flush=True)
    env = run_env_tag()
    info = machine_info(load_at_start)
    sections = [f"# CPU micro-benchmarks ({env})", machine_markdown(info)]
    for title, medians in results.items():
        fastest = min(medians.values())
        rows = [[name, f"{us:.0f}", f"{us / fastest:.2f}"] for name, us in medians.items()]
        sections += [f"## {title}", markdown_table(["variant", "median µs", "× fastest"], rows)]
    markdown = "\n\n".join(sections)
    print(markdown)
    stem = f"cpu_micro{'_quick' if args.quick else ''}_{env}{'_' + args.tag if args.tag else ''}"
    for path in write_report(stem, {"machine": info, "args": vars(args), "results": results}, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
