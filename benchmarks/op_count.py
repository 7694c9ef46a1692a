"""Count the work one adapted layer dispatches per training step and per generated token: top-level aten ops (with
each launch of the fused routing's Triton kernels, and of inductor's generated kernels when compiled, as one op),
and on CUDA the kernels launched.

On a GPU each op costs Python and dispatcher time plus, unless it only makes a view, a kernel launch; at the token
counts of fine-tuning that fixed cost exceeds the adapter's arithmetic, so the op count is the floor of the eager step
time there. Counts are deterministic (no timing), so `tests/test_op_count.py` pins them.

    python -m benchmarks.op_count                       # CPU: fp32 and bf16 autocast, dropout 0 and 0.05
    python -m benchmarks.op_count --device cuda         # adds the CUDA kernels launched, eager and compiled
    TRITON_INTERPRET=1 python -m benchmarks.op_count --fused
                                                        # adds the mixtures with kernel="fused" (Triton routing;
                                                        # interpreted on CPU, each launch counted as one op)

A step is: set_to_none zero-grad, forward under the setting's autocast, backward of the output and (mixtures) of the
balance statistics with fixed upstream gradients, built before the counted step (the loss itself, summed over all
layers, is not the layer's work). The base is a frozen `nn.Linear` in the compute dtype; the input needs a gradient,
as inside a model. A generated token is one eval-mode forward without gradients over one token for each of 2 rows,
inside `frozen_adapter_weights` as the module evaluates (`--training-only` skips it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from collections import Counter
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch._inductor import config as inductor_config

from benchmarks.common import add_run_arguments, machine_info, machine_markdown, markdown_table, run_env_tag, \
    start_run, write_report
from malora_lightning.adapters import AdapterConfig, compile_adapters, frozen_adapter_weights
from malora_lightning.adapters.layers import ADAPTER_CLASSES

METHODS = ("lora", "molora", "malora")
# ops that only make a new view of existing memory, or allocate without writing: dispatch cost, no kernel
VIEW_OPS = frozenset(f"aten::{name}" for name in (
    "t", "view", "reshape", "_reshape_alias", "unsqueeze", "squeeze", "expand", "expand_as", "flatten", "unflatten",
    "permute", "transpose", "slice", "split", "split_with_sizes", "select", "narrow", "as_strided", "view_as", "unbind",
    "detach", "alias", "lift_fresh", "result_type", "promote_types", "empty_like", "empty", "new_empty"))


@dataclass
class OpCount:
    top_level: int  # counted ops (`is_counted`) called from Python or the autograd engine, not from inside another
    launching: int  # of those, the ones that are not pure views (each launches at least one kernel on a GPU)
    kernels: int | None  # CUDA kernels launched (None on CPU)
    by_name: dict[str, int]


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def build_layer(method: str, in_features: int, out_features: int, dtype: torch.dtype, dropout: float,
                device: torch.device, classes: dict[str, type[nn.Module]] = ADAPTER_CLASSES,
                kernel: str = "dense") -> nn.Module:
    """The layer with the benchmarks' settings (LoRA r=64; MoLoRA 8 x r8; MALoRA 8 x r12, d 32; top-2); `classes`:
    the library's, or a git revision's (kernel_ab.revision_classes)."""
    base = nn.Linear(in_features, out_features, bias=False, dtype=dtype, device=device).requires_grad_(False)
    settings = {"lora": dict(rank=64), "molora": dict(rank=8), "malora": dict(rank=12, shared_rank=32)}[method]
    config = AdapterConfig(method=method, dropout=dropout, kernel=kernel, **settings)
    return classes[method](base, config, name="layer").train()


TRITON_OP = "triton::"  # profiler label of one Triton kernel launch
# inductor's generated kernels, which run outside any aten op: on CPU C++ functions, labelled "graph_<id>_cpp_..."
# under `cpp.enable_kernel_profile`; on CUDA Triton launches, which its launcher labels "triton_<kind>_..." (the GPU
# side is not yet checked on a GPU)
INDUCTOR_CPP_KERNEL = re.compile(r"graph_\d+_cpp_")
INDUCTOR_TRITON_KERNEL = re.compile(r"triton_[a-z]+_")


def is_counted(name: str) -> bool:
    """An aten op, a labelled Triton launch or one of inductor's kernels: each is one op of the step."""
    return name.startswith(("aten::", TRITON_OP)) or any(
        pattern.match(name) is not None for pattern in (INDUCTOR_CPP_KERNEL, INDUCTOR_TRITON_KERNEL))


@contextlib.contextmanager
def triton_launches_labelled() -> Iterator[None]:
    """Run each launch of the fused routing's Triton kernels inside a profiler label, so that it counts as one op
    (one kernel on a GPU) and what the interpreter does inside it on CPU does not count."""
    from malora_lightning.adapters import fused_routing

    class Labelled:
        def __init__(self, kernel: Any, name: str) -> None:
            self.kernel, self.name = kernel, name

        def __getitem__(self, grid: Any) -> Any:
            def launch(*args: Any, **kwargs: Any) -> Any:
                with torch.profiler.record_function(TRITON_OP + self.name):
                    return self.kernel[grid](*args, **kwargs)
            return launch

    names = ("_route_forward_kernel", "_route_backward_kernel")
    originals = {name: getattr(fused_routing, name) for name in names}
    try:
        for name, kernel in originals.items():
            setattr(fused_routing, name, Labelled(kernel, name.strip("_")))
        yield
    finally:
        for name, kernel in originals.items():
            setattr(fused_routing, name, kernel)


class LayerStep:
    """set_to_none zero-grad, forward, backward of the output and (mixtures) the balance statistics with fixed
    upstream gradients, so that only the layer's own ops run: the gradients are built by the first (warm-up) call
    and reused, outside the counted step."""

    def __init__(self) -> None:
        self.upstream: list[torch.Tensor] | None = None

    def __call__(self, layer: nn.Module, x: torch.Tensor, autocast: bool) -> None:
        layer.zero_grad(set_to_none=True)
        x.grad = None
        context = getattr(layer, "routing_context", None)  # duck-typed: --rev passes another revision's classes,
        forward = context.begin_forward() if hasattr(context, "begin_forward") else None  # which may predate forwards
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
            out = layer(x)
        outputs = [out]
        if forward is not None:
            outputs.append(forward.statistics[0].balance)
        elif hasattr(layer, "last_router_losses"):  # a revision that stashed its losses on the layer (--rev)
            outputs.append(layer.last_router_losses.load_balance)
        if self.upstream is None:
            self.upstream = [torch.ones_like(out), *(torch.full_like(router, 0.01) for router in outputs[1:])]
        torch.autograd.backward(outputs, self.upstream)


def generation_step(layer: nn.Module, x: torch.Tensor, autocast: bool) -> None:
    """One eval-mode forward without gradients: what every generated token costs each adapted layer (inside
    `frozen_adapter_weights` when the caller holds one, as the module's evaluation does)."""
    if hasattr(getattr(layer, "routing_context", None), "begin_forward"):
        layer.routing_context.begin_forward()
    with torch.no_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        layer(x)


def count_step(layer: nn.Module, x: torch.Tensor, autocast: bool, step: Callable[[nn.Module, torch.Tensor, bool], None]
               ) -> OpCount:
    """Ops of one step (a `LayerStep` or `generation_step`), after two warm-up steps (compilation, autocast caches,
    lazy init, upstream gradients)."""
    for _ in range(2):
        step(layer, x, autocast)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if x.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=activities) as profiler:
        step(layer, x, autocast)
        if x.device.type == "cuda":
            torch.cuda.synchronize()
    events = list(profiler.events())
    # host-side events only: a GPU kernel event carries its launch's name but no parent, and would count twice
    top = [e for e in events if e.device_type == torch.autograd.DeviceType.CPU and is_counted(e.name)
           and not any(is_counted(a.name) for a in _ancestors(e))]
    kernels = None
    if x.device.type == "cuda":
        kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA
                      and not e.name.startswith("Memcpy") and not e.name.startswith("Memset"))
    names = Counter(e.name for e in top)
    return OpCount(top_level=len(top), launching=sum(1 for e in top if e.name not in VIEW_OPS), kernels=kernels,
                   by_name=dict(names.most_common()))


def count_method(method: str, device: torch.device, autocast: bool, dropout: float, tokens: int = 64,
                 in_features: int = 64, out_features: int = 96, compile_mode: str | None = None,
                 classes: dict[str, type[nn.Module]] = ADAPTER_CLASSES, kernel: str = "dense",
                 generation: bool = False) -> OpCount:
    """A training step, or with `generation` one new token for each of 2 rows in eval mode. `kernel="fused"` on CPU
    needs TRITON_INTERPRET=1 in the environment before the first fused forward."""
    torch.manual_seed(0)
    dtype = torch.bfloat16 if autocast else torch.float32
    layer = build_layer(method, in_features, out_features, dtype, dropout, device, classes, kernel)
    if compile_mode is not None:
        compile_adapters(layer, compile_mode)
    if generation:
        layer.eval()
    x = torch.randn(2, 1 if generation else tokens // 2, in_features, dtype=dtype, device=device,
                    requires_grad=not generation)
    step = generation_step if generation else LayerStep()
    with contextlib.ExitStack() as stack:
        if compile_mode is not None:  # on CPU inductor's kernels are C++ functions the profiler sees only with this,
            torch._dynamo.reset()  # and a graph compiled earlier in the process without it would be reused
            stack.enter_context(inductor_config.patch({"cpp.enable_kernel_profile": True}))
        if generation:  # as `MALoRAModule` generates: the weights cast once per generate call, not per token
            stack.enter_context(frozen_adapter_weights(layer))
        if kernel == "fused":
            stack.enter_context(triton_launches_labelled())
        return count_step(layer, x, autocast, step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--compiled", action="store_true", help="also count with compiled adapters (CUDA: kernels)")
    parser.add_argument("--rev", help="also count this git revision's layers (eager), as kernel_ab loads them")
    parser.add_argument("--training-only", action="store_true",
                        help="only the training setting (bf16 autocast, dropout 0.05): a quarter of the compiling")
    parser.add_argument("--fused", action="store_true",
                        help="also count the mixtures with kernel='fused' (on CPU through Triton's interpreter)")
    add_run_arguments(parser)
    args = parser.parse_args()
    if args.fused and args.device != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton decides at import whether its own helpers run interpreted, and torch imports Triton before main runs
        raise SystemExit("--fused on CPU runs the Triton kernels in Triton's interpreter, which must be on before "
                         "Triton is imported: TRITON_INTERPRET=1 python -m benchmarks.op_count --fused")
    device, load_at_start = start_run(args)
    rows, results = [], []
    modes = [None, "default"] if args.compiled or device.type == "cuda" else [None]
    variants: list[tuple[str, str | None, dict, str]] = [("eager", None, ADAPTER_CLASSES, "dense")]
    if args.fused:
        variants.append(("eager, kernel fused", None, ADAPTER_CLASSES, "fused"))
    if args.rev:
        from benchmarks.kernel_ab import revision_classes
        variants.append((f"eager at {args.rev}", None, revision_classes(args.rev), "dense"))
    if "default" in modes:
        variants.append(("compiled", "default", ADAPTER_CLASSES, "dense"))
    autocasts = (True,) if args.training_only else (False, True)
    settings = [(False, autocast, dropout) for autocast in autocasts
                for dropout in ((0.05,) if args.training_only else (0.0, 0.05))]
    if not args.training_only:
        settings += [(True, autocast, 0.05) for autocast in autocasts]  # eval mode: no dropout
    for variant, compile_mode, classes, kernel in variants:
        for generation, autocast, dropout in settings:
            counts = {m: count_method(m, device, autocast, dropout, compile_mode=compile_mode, classes=classes,
                                      kernel=kernel if m != "lora" else "dense", generation=generation)
                      for m in METHODS}
            precision = "bf16 autocast" if autocast else "fp32"
            label = f"one generated token, {precision}, {variant}" if generation else \
                f"training step, {precision}, dropout {dropout:g}, {variant}"
            lora = counts["lora"]
            for method, count in counts.items():
                rows.append([label, method, count.top_level, count.launching,
                             "–" if count.kernels is None else count.kernels,
                             f"{count.top_level / lora.top_level:.2f}", f"{count.launching / lora.launching:.2f}",
                             "–" if count.kernels is None else f"{count.kernels / lora.kernels:.2f}"])
                results.append({"setting": label, "method": method, **asdict(count)})
    table = markdown_table(["setting", "method", "top-level ops", "non-view ops", "CUDA kernels",
                            "ops / LoRA", "non-view / LoRA", "kernels / LoRA"], rows)
    env = run_env_tag()
    payload = {"env": env, "device": device.type, "results": results, "machine": machine_info(load_at_start)}
    markdown = "\n\n".join([f"# Ops per adapted layer: a training step, and one generated token ({env}, "
                            f"{device.type})",
                            machine_markdown(payload["machine"]),
                            "- Top-level ops: aten ops not called from another, each fused-routing Triton launch "
                            "(`triton::`) and each of inductor's generated kernels (compiled rows: C++ functions on "
                            "CPU, Triton launches on CUDA); the upstream gradients are built before the counted step.",
                            table])
    print(markdown)
    for path in write_report(f"op_count_{device.type}_{env}{'_' + args.tag if args.tag else ''}", payload, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
