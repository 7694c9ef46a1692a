"""Forward+backward time and memory of ONE adapted linear: frozen base alone, LoRA, MoLoRA and MALoRA.

Every adapter is the library's own layer class (`LoRALinear`, `MoLoRALinear`, `MALoRALinear` built from an
`AdapterConfig` around a frozen `nn.Linear`), run as in training: set_to_none zero-grad, forward (router losses
included), the load-balance term added to a fixed upstream gradient, backward. A MixLoRA/MoE-PEFT-style per-expert
loop is timed next to our kernels as a peer-style reference; it is written here and is not a library kernel.

    python -m benchmarks.layer_speed --quick                 # 2048<->5504 shapes, < 2 minutes on 2 CPU cores
    python -m benchmarks.layer_speed                         # LLaMA-2-7B shapes 4096<->11008
    python -m benchmarks.layer_speed --quick --tuned-malloc  # re-executes itself with glibc malloc tuned
    python -m benchmarks.layer_speed --device cuda --methods base,lora,malora_dense,lora_compiled,malora_compiled

Methods ending in `_compiled` run the dense kernel through `compile_adapters` (torch.compile, inductor),
`_cudagraphs` through its "reduce-overhead" mode (CUDA graphs); warm-up rounds compile. Methods ending in `_fused`
run `kernel="fused"` (the dense kernel with its routing in Triton kernels; CUDA only, like the compiled ones).

"bf16" means Lightning's bf16-mixed: a bf16 base and bf16 inputs, float32 adapter weights, forward under
`torch.autocast(dtype=bfloat16)`. "fp32" runs everything in float32.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    add_run_arguments,
    fmt_pct,
    fmt_ratio,
    geomean,
    machine_info,
    machine_markdown,
    markdown_table,
    median,
    peak_step_bytes,
    refuse_fused_off_gpu,
    round_robin,
    run_env_tag,
    saved_tensor_bytes,
    start_run,
    synchronize,
    working_steps,
    write_report,
)
from malora_lightning.adapters import (
    AdapterConfig,
    AdapterLayer,
    LoRALinear,
    MALoRALinear,
    MoLoRALinear,
    compile_adapters,
)
from malora_lightning.adapters.routing import load_balance_from_statistics, load_balance_loss, route
from malora_lightning.hardware import fast_bf16_available

LORA_RANK = 64
NUM_EXPERTS, TOP_K = 8, 2
MOLORA_RANK = 8
MALORA_RANK, MALORA_SHARED_RANK = 12, 32
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METHODS = ("base", "lora", "molora_dense", "molora_sparse", "molora_loop", "malora_dense", "malora_sparse")
COMPILED_METHODS = ("lora_compiled", "molora_compiled", "malora_compiled", "lora_cudagraphs", "malora_cudagraphs")
FUSED_METHODS = ("molora_fused", "malora_fused")  # Triton: CUDA only (on CPU "fused" runs the dense kernel's ops)
GPU_METHODS = COMPILED_METHODS + FUSED_METHODS
COMPILE_MODES = {"compiled": "default", "cudagraphs": "reduce-overhead"}
COLUMN_NAMES = {"base": "base", "lora": "LoRA64", "molora_dense": "MO dense", "molora_sparse": "MO sparse",
                "molora_loop": "MO loop (peer)", "malora_dense": "MA dense", "malora_sparse": "MA sparse",
                "lora_compiled": "LoRA64 compiled", "molora_compiled": "MO compiled", "malora_compiled": "MA compiled",
                "lora_cudagraphs": "LoRA64 CUDA graphs", "malora_cudagraphs": "MA CUDA graphs",
                "molora_fused": "MO fused", "malora_fused": "MA fused"}
MIB = 2 ** 20


@dataclass(frozen=True)
class Setting:
    in_features: int
    out_features: int
    tokens: int
    dtype: str
    x_grad: bool

    @property
    def label(self) -> str:
        return f"{self.in_features}->{self.out_features} T={self.tokens} {self.dtype} x.grad={'yes' if self.x_grad else 'no'}"


# ---------------------------------------------------------------------------------------------------- work counts
def macs_per_token(method: str, n: int, m: int, x_grad: bool) -> tuple[int, int]:
    """(forward, backward) multiply-accumulates per token of the adapter path alone, or of the frozen base.

    The backward of a frozen base is dX only (no dW), and none at all when x needs no gradient. Dense kernels compute
    all N experts; sparse kernels and the loop compute the K selected ones. The router is N*n forward, N*n for its
    weight gradient, plus N*n for dX.
    """
    if method == "base":
        return n * m, n * m if x_grad else 0
    if method == "lora":
        r = LORA_RANK
        return r * (n + m), r * m * 2 + r * n + (r * n if x_grad else 0)
    experts = NUM_EXPERTS if method.endswith(("dense", "fused")) else TOP_K
    router_fwd, router_bwd = NUM_EXPERTS * n, NUM_EXPERTS * n * (2 if x_grad else 1)
    if method.startswith("molora"):
        width = experts * MOLORA_RANK  # A_t over x, then B_t
        forward = width * (n + m)
        backward = 2 * width * m + width * n + (width * n if x_grad else 0)
    else:
        d, width = MALORA_SHARED_RANK, experts * MALORA_RANK
        forward = d * n + width * d + width * m
        backward = 2 * width * m + 2 * width * d + d * n + (d * n if x_grad else 0)
    return forward + router_fwd, backward + router_bwd


def floor_elements_per_token(method: str, n: int, m: int, tokens: int, x_grad: bool) -> int:
    """Elements the method must move per token at the least (a model: each wide tensor read or written once).

    Base: read x and write y, plus its weight read once per GEMM (amortised over the tokens); with x.grad, read the
    upstream gradient and write dX. An adapter that is not fused into the base GEMM reads x again, and
    reads + writes y to add its output; in backward it reads the upstream gradient again, reads x once more for the
    gradient of its first projection (A, or S_A: trainable, unlike the base weight) and read-modify-writes dX.
    Rank-space tensors ([T, <=128]) and adapter weights are small and left out.
    """
    if method == "base":
        forward = n + m + n * m // tokens
        return forward + (m + n + n * m // tokens if x_grad else 0)
    forward = n + 2 * m  # read x, read + write y
    backward = m + n + (2 * n if x_grad else 0)  # read dy, read x for dA, read + write dX
    return forward + backward


# ---------------------------------------------------------------------------------------------------- layers
def adapter_config(method: str, kernel: str, dropout: float) -> AdapterConfig:
    if method == "lora":
        return AdapterConfig(method="lora", rank=LORA_RANK, dropout=dropout)
    if method == "molora":
        return AdapterConfig(method="molora", rank=MOLORA_RANK, num_experts=NUM_EXPERTS, top_k=TOP_K,
                             dropout=dropout, kernel=kernel)
    return AdapterConfig(method="malora", rank=MALORA_RANK, shared_rank=MALORA_SHARED_RANK,
                         num_experts=NUM_EXPERTS, top_k=TOP_K, dropout=dropout, kernel=kernel)


LIBRARY_CLASSES: dict[str, type[AdapterLayer]] = {"lora": LoRALinear, "molora": MoLoRALinear, "malora": MALoRALinear}


def build_layer(base: nn.Linear, method: str, dropout: float,
                classes: Mapping[str, type[nn.Module]] = LIBRARY_CLASSES) -> nn.Module:
    """The layer for a method name like "malora_sparse"; the same seed gives every variant equal weights.

    `classes` maps "lora"/"molora"/"malora" to layer classes (the library's, or another revision's for kernel_ab).
    """
    family, _, kernel = method.partition("_")
    torch.manual_seed(0)
    config = adapter_config(family, kernel if kernel in ("dense", "sparse", "fused") else "dense", dropout)
    layer = classes[family](base, config, name=method)
    with torch.no_grad():
        layer.lora_B.normal_(std=1e-3)  # non-zero outputs, as after a few training steps
    if kernel in COMPILE_MODES:
        compile_adapters(layer, COMPILE_MODES[kernel])
    return layer


def molora_loop_forward(layer: MoLoRALinear, x: torch.Tensor, aux_loss_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Peer-style reference (MixLoRA / MoE-PEFT): per expert torch.where, an n-dim gather, gate on the m-dim output.

    It routes with the library's public `route` and `load_balance_loss` on the layer's own weights, so it does the
    same routing work as our kernels; only the expert computation differs.
    """
    result = layer.base_layer(x)
    x2d = x.reshape(-1, layer.in_features)
    dropped = layer.dropout(x2d)
    routing = route(layer.router(x2d), layer.top_k, layer.renormalize_top_k)
    aux = aux_loss_coef * load_balance_loss(routing.probs, routing.experts)
    delta = torch.zeros(x2d.shape[0], layer.out_features, dtype=result.dtype, device=result.device)
    for expert in range(layer.num_experts):
        token_index, slot = torch.where(routing.experts == expert)
        expert_out = F.linear(F.linear(dropped[token_index], layer.lora_A[expert]), layer.lora_B[expert].t())  # B_t
        gates = routing.gates[token_index, slot].unsqueeze(-1) * layer.scaling
        delta.index_add_(0, token_index, (expert_out * gates).to(delta.dtype))
    return result + delta.reshape(result.shape), aux


def training_forward(method: str, layer: nn.Module, aux_loss_coef: float,
                     adapter_only_result: torch.Tensor | None = None
                     ) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]:
    """x -> (output, weighted router loss or None), as a training step computes them.

    With `adapter_only_result` the base layer is skipped: the adapter adds its output to that fixed tensor, which
    isolates the adapter kernels from the (much larger) base GEMMs.
    """
    if method == "molora_loop":
        return lambda x: molora_loop_forward(layer, x, aux_loss_coef)

    def forward(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        context = getattr(layer, "routing_context", None)  # duck-typed: kernel_ab passes other revisions' classes
        record = context.begin_forward() if hasattr(context, "begin_forward") else None  # older contexts lack it
        if adapter_only_result is None:
            out = layer(x)
        else:
            out = layer.add_adapter_output(adapter_only_result, x, x.shape[:-1])
        if hasattr(layer, "last_router_losses"):  # a revision before a8527d0's successor (kernel_ab): stashed losses
            return out, aux_loss_coef * layer.last_router_losses.load_balance
        if record is None or not record.statistics:
            return out, None
        return out, aux_loss_coef * load_balance_from_statistics(record.statistics[0].balance)

    return forward


# ---------------------------------------------------------------------------------------------------- one setting
@dataclass
class Prepared:
    """Everything one method needs for a training step of one setting."""

    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor | None]]
    layer: nn.Module
    trainable: list[nn.Parameter]


@dataclass
class Inputs:
    """One setting's frozen base, input, fixed upstream gradient and autocast context."""

    base: nn.Linear
    x: torch.Tensor
    upstream: torch.Tensor
    autocast: Callable[[], Any]


def make_inputs(setting: Setting, device: torch.device) -> Inputs:
    dtype = DTYPES[setting.dtype]
    torch.manual_seed(1234)
    base = nn.Linear(setting.in_features, setting.out_features, bias=False, dtype=dtype, device=device)
    base.requires_grad_(False)
    x = torch.randn(setting.tokens, setting.in_features, dtype=dtype, device=device).requires_grad_(setting.x_grad)
    upstream = torch.randn(setting.tokens, setting.out_features, dtype=dtype, device=device)
    if setting.dtype == "bf16":
        return Inputs(base, x, upstream, lambda: torch.autocast(device.type, dtype=torch.bfloat16))
    return Inputs(base, x, upstream, contextlib.nullcontext)


def prepare(method: str, inputs: Inputs, dropout: float, aux_loss_coef: float,
            classes: Mapping[str, type[nn.Module]] = LIBRARY_CLASSES,
            adapter_only_result: torch.Tensor | None = None) -> Prepared:
    if method == "base":
        return Prepared(lambda x: (inputs.base(x), None), inputs.base, [])
    layer = build_layer(inputs.base, method, dropout, classes).to(inputs.x.device)
    trainable = [p for p in layer.parameters() if p.requires_grad]
    return Prepared(training_forward(method, layer, aux_loss_coef, adapter_only_result), layer, trainable)


def training_step(prepared: Prepared, x: torch.Tensor, upstream: torch.Tensor,
                  autocast: Callable[[], Any]) -> Callable[[], None]:
    """set_to_none zero-grad, forward (+ router loss), backward with a fixed upstream gradient."""

    def step() -> None:
        for param in prepared.trainable:
            param.grad = None
        x.grad = None
        with autocast():
            out, aux = prepared.forward(x)
        if not out.requires_grad:  # frozen base with x.grad=no: nothing to differentiate
            return
        if aux is None:
            out.backward(upstream)
        else:
            torch.autograd.backward([out, aux], [upstream, None])

    return step


def memory_of(step: Callable[[], None], prepared: Prepared, x: torch.Tensor, autocast: Callable[[], Any],
              device: torch.device) -> dict[str, float]:
    """Saved-for-backward bytes of the forward, and the peak bytes allocated during one whole step (MiB)."""
    excluded = [*prepared.layer.parameters(), x]
    saved = saved_tensor_bytes(lambda: _forward_only(prepared, x, autocast), excluded)
    step()  # grads exist now; drop them so the measured step starts from the training-loop state
    return {"saved_mib": saved / MIB, "peak_mib": peak_step_bytes(step, device) / MIB}


def _forward_only(prepared: Prepared, x: torch.Tensor, autocast: Callable[[], Any]) -> None:
    with autocast():
        prepared.forward(x)


def run_setting(setting: Setting, methods: list[str], args: argparse.Namespace,
                device: torch.device) -> dict[str, Any]:
    inputs = make_inputs(setting, device)
    prepared = {method: prepare(method, inputs, args.dropout, args.aux_loss_coef) for method in methods}
    steps, failed = working_steps({method: training_step(p, inputs.x, inputs.upstream, inputs.autocast)
                                   for method, p in prepared.items()}, device)
    times = round_robin(steps, args.warmup, args.rounds, device)
    medians_ms = {method: 1e3 * median(values) for method, values in times.items()}
    # the CPU tracker is a dispatch mode, which torch.compile does not trace through: compiled methods go without
    memory = {method: memory_of(steps[method], prepared[method], inputs.x, inputs.autocast, device)
              for method in steps if device.type == "cuda" or method not in COMPILED_METHODS}
    return {"setting": asdict(setting), "times_ms": {k: [1e3 * v for v in vs] for k, vs in times.items()},
            "median_ms": medians_ms, "ratios": ratios(medians_ms), "memory": memory, "failed": failed}


def ratios(ms: dict[str, float]) -> dict[str, float]:
    """Side-by-side ratios of one setting (each from the same run; missing methods are skipped)."""
    out: dict[str, float] = {}

    def best(family: str) -> float | None:
        values = [ms[k] for k in (f"{family}_dense", f"{family}_sparse") if k in ms]
        return min(values) if values else None

    malora, molora = best("malora"), best("molora")
    pairs = {
        "malora_best/molora_best": (malora, molora),
        "malora_dense/molora_dense": (ms.get("malora_dense"), ms.get("molora_dense")),
        "malora_sparse/molora_sparse": (ms.get("malora_sparse"), ms.get("molora_sparse")),
        "malora_best/molora_loop": (malora, ms.get("molora_loop")),
        "malora_best/lora": (malora, ms.get("lora")),
        "molora_best/lora": (molora, ms.get("lora")),
        "malora_compiled/lora_compiled": (ms.get("malora_compiled"), ms.get("lora_compiled")),
        "malora_compiled/lora": (ms.get("malora_compiled"), ms.get("lora")),
        "malora_compiled/molora_compiled": (ms.get("malora_compiled"), ms.get("molora_compiled")),
        "malora_compiled/malora_dense": (ms.get("malora_compiled"), ms.get("malora_dense")),
        "malora_cudagraphs/lora_cudagraphs": (ms.get("malora_cudagraphs"), ms.get("lora_cudagraphs")),
        "malora_fused/lora": (ms.get("malora_fused"), ms.get("lora")),
        "malora_fused/malora_dense": (ms.get("malora_fused"), ms.get("malora_dense")),
        "malora_fused/molora_fused": (ms.get("malora_fused"), ms.get("molora_fused")),
    }
    for name, (numerator, denominator) in pairs.items():
        if numerator is not None and denominator is not None:
            out[name] = numerator / denominator
    if "base" in ms:
        for name, value in (("lora", ms.get("lora")), ("molora_best", molora), ("malora_best", malora)):
            if value is not None:
                out[f"overhead_{name}"] = value / ms["base"] - 1.0
    return out


# ---------------------------------------------------------------------------------------------------- machine rates
def measure_bandwidth(device: torch.device) -> float:
    """Bytes per second of a large copy (read + write), the rate a pass over a wide activation runs at."""
    source = torch.ones(32 * MIB, device=device)  # 128 MiB of float32
    target = torch.empty_like(source)
    timings = []
    for _ in range(5):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        timings.append(time.perf_counter() - start)
    return 2 * source.numel() * source.element_size() / median(timings)


def floor_overheads(setting: Setting, base_ms: float, bandwidth: float) -> dict[str, float]:
    """Lowest overhead over the base that each method's work allows, at the base GEMM's own MAC rate.

    floor = (adapter MACs / base MAC rate + adapter floor bytes / copy bandwidth) / base time. Skinny adapter GEMMs
    run below the base's rate, so real kernels land above this.
    """
    n, m, tokens = setting.in_features, setting.out_features, setting.tokens
    element = torch.tensor([], dtype=DTYPES[setting.dtype]).element_size()
    base_macs = sum(macs_per_token("base", n, m, setting.x_grad)) * tokens
    mac_rate = base_macs / (base_ms / 1e3)
    out = {}
    for method in ("lora", "molora_dense", "molora_sparse", "malora_dense", "malora_sparse"):
        macs = sum(macs_per_token(method, n, m, setting.x_grad)) * tokens
        moved = floor_elements_per_token(method, n, m, tokens, setting.x_grad) * tokens * element
        out[method] = (macs / mac_rate + moved / bandwidth) / (base_ms / 1e3)
    return out


# ---------------------------------------------------------------------------------------------------- report
def cost_table(shapes: list[tuple[int, int]], tokens: list[int], x_grads: list[bool]) -> tuple[str, list[dict]]:
    rows, records = [], []
    methods = ("lora", "molora_dense", "molora_sparse", "malora_dense", "malora_sparse")
    for n, m in shapes:
        for x_grad in x_grads:
            base_fwd, base_bwd = macs_per_token("base", n, m, x_grad)
            base_total = base_fwd + base_bwd
            cells = []
            for method in methods:
                fwd, bwd = macs_per_token(method, n, m, x_grad)
                cells.append(f"{(fwd + bwd) / 1e6:.2f}M ({100 * (fwd + bwd) / base_total:.1f}%)")
                records.append({"in": n, "out": m, "x_grad": x_grad, "method": method, "forward_macs": fwd,
                                "backward_macs": bwd, "base_macs": base_total})
            floor = [f"{floor_elements_per_token('base', n, m, t, x_grad)}" for t in tokens]
            adapter_floor = floor_elements_per_token("lora", n, m, tokens[0], x_grad)
            rows.append([f"{n}->{m}", "yes" if x_grad else "no", f"{base_total / 1e6:.2f}M", *cells,
                         " / ".join(floor), str(adapter_floor)])
    headers = ["in->out", "x.grad", "base MACs", *(f"{COLUMN_NAMES[m]} MACs (% of base)" for m in methods),
               f"base elements moved (T={'/'.join(map(str, tokens))})", "adapter floor elements"]
    return markdown_table(headers, rows), records


def markdown_report(payload: dict[str, Any]) -> str:
    results = payload["results"]
    methods = payload["args"]["methods"]
    time_headers = ["setting", *(COLUMN_NAMES[m] for m in methods), "MA/MO best", "MA/MO dense", "MA/MO sparse",
                    "MA best/MO loop", "MA/LoRA", "MA comp/LoRA comp", "MA comp/LoRA", "ovh LoRA", "ovh MO", "ovh MA",
                    "floor ovh LoRA/MO/MA"]
    time_rows = []
    for result in results:
        r, ms, floor = result["ratios"], result["median_ms"], result["floor_overhead"]
        floors = "/".join(fmt_pct(floor.get(k)) for k in ("lora", "molora_sparse", "malora_sparse"))
        time_rows.append([Setting(**result["setting"]).label,
                          *(f"{ms[m]:.1f}" if m in ms else "failed" for m in methods),
                          fmt_ratio(r.get("malora_best/molora_best")), fmt_ratio(r.get("malora_dense/molora_dense")),
                          fmt_ratio(r.get("malora_sparse/molora_sparse")), fmt_ratio(r.get("malora_best/molora_loop")),
                          fmt_ratio(r.get("malora_best/lora")), fmt_ratio(r.get("malora_compiled/lora_compiled")),
                          fmt_ratio(r.get("malora_compiled/lora")), fmt_pct(r.get("overhead_lora")),
                          fmt_pct(r.get("overhead_molora_best")), fmt_pct(r.get("overhead_malora_best")), floors])
    summary_rows = []
    for name in ("malora_best/molora_best", "malora_dense/molora_dense", "malora_sparse/molora_sparse",
                 "malora_best/molora_loop", "malora_best/lora", "molora_best/lora", "malora_compiled/lora_compiled",
                 "malora_compiled/lora", "malora_compiled/molora_compiled", "malora_compiled/malora_dense",
                 "malora_cudagraphs/lora_cudagraphs", "malora_fused/lora", "malora_fused/malora_dense",
                 "malora_fused/molora_fused"):
        values = [result["ratios"][name] for result in results if name in result["ratios"]]
        if values:
            summary_rows.append([name, f"{min(values):.2f}–{max(values):.2f}", f"{geomean(values):.2f}"])
    for name in ("overhead_lora", "overhead_molora_best", "overhead_malora_best"):
        values = [result["ratios"][name] for result in results if name in result["ratios"]]
        if values:
            summary_rows.append([name, f"{fmt_pct(min(values))} – {fmt_pct(max(values))}",
                                 f"mean {fmt_pct(sum(values) / len(values))}"])
    memory_rows = [[Setting(**result["setting"]).label,
                    *(f"{result['memory'][m]['saved_mib']:.1f} / {result['memory'][m]['peak_mib']:.1f}"
                      if m in result["memory"] else "–" for m in methods)]
                   for result in results]
    winners = {family: {"dense": 0, "sparse": 0} for family in ("molora", "malora")}
    for result in results:
        for family in winners:
            pair = {k: result["median_ms"].get(f"{family}_{k}") for k in ("dense", "sparse")}
            if None not in pair.values():
                winners[family][min(pair, key=pair.get)] += 1
    failures = [f"- {Setting(**result['setting']).label}, {COLUMN_NAMES[method]}: {error}"
                for result in results for method, error in result["failed"].items()]
    memory_kind = ("torch.cuda.max_memory_allocated during one step, minus the memory in use before it"
                   if payload["device"] == "cuda" else
                   "tensor bytes allocated during one step and alive at its peak (a dispatch-mode tracker; "
                   "parameters and the input existed before and do not count)")
    sections = [
        f"# Layer speed: one adapted linear, forward + backward ({payload['preset']}, {payload['env']})",
        machine_markdown(payload["machine"]),
        f"- Device {payload['device']}; {payload['args']['warmup']} warm-up + {payload['args']['rounds']} timed "
        f"rounds, round-robin, medians in ms; dropout {payload['args']['dropout']}; aux loss coef "
        f"{payload['args']['aux_loss_coef']} (the router's load-balance term is in the backward).",
        f"- Copy bandwidth {payload['bandwidth_gbs']:.1f} GB/s (used for the floor column).",
        "- Methods: LoRA r=64; MoLoRA N=8, r=8, top-2; MALoRA N=8, r-bar=12, d=32, top-2 (all scale 2). "
        "MO loop (peer) is a MixLoRA/MoE-PEFT-style per-expert loop written in this benchmark, not a library kernel.",
        *(f"- Note: {note}" for note in payload["args"]["notes"]),
        "- base = the frozen linear alone: forward only when x needs no grad, forward + dX when it does.",
        "- ovh = time over base - 1. floor ovh = what the adapter's MACs (at the base GEMM's MAC rate) and minimum "
        "bytes (at copy bandwidth) would add; LoRA, sparse MoLoRA, sparse MALoRA work counts.",
        "## Times (median ms) and side-by-side ratios",
        markdown_table(time_headers, time_rows),
        *(["Failed, left out of the timings and ratios:", "\n".join(failures)] if failures else []),
        "## Ratio summary over the settings above",
        markdown_table(["ratio", "min–max", "geomean"], summary_rows),
        f"Fastest kernel: MoLoRA dense {winners['molora']['dense']}×, sparse {winners['molora']['sparse']}×; "
        f"MALoRA dense {winners['malora']['dense']}×, sparse {winners['malora']['sparse']}×.",
        "## Work per token (MACs, forward + backward) and the byte floor",
        "Adapter MACs include the router (N·n forward, N·n weight grad, N·n dX). Elements moved: base = x + y + "
        "weight/T per GEMM; adapter floor = its extra passes over x (forward, and backward for "
        "its first projection's gradient), y (read+write), the upstream gradient and dX (read+write), for any unfused "
        "kernel. Multiply by the element size (4 fp32, 2 bf16) for bytes.",
        payload["cost_table"],
        "## Memory (MiB): saved for backward / peak during the step",
        f"Peak = {memory_kind}. Saved = distinct storages autograd keeps for backward, parameters and input excluded.",
        markdown_table(["setting", *(COLUMN_NAMES[m] for m in methods)], memory_rows),
    ]
    return "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------------- main
def add_setting_arguments(parser: argparse.ArgumentParser, defaults: dict[str, Any]) -> None:
    """What to time: shapes, token counts, dtypes, x.grad, rounds, dropout and aux-loss weight (shared with kernel_ab)."""
    parser.add_argument("--shapes", default=defaults.get("shapes"),
                        help="comma-separated INxOUT, e.g. 4096x11008,11008x4096")
    parser.add_argument("--tokens", default=defaults.get("tokens"), help="comma-separated token counts, e.g. 512,2048")
    parser.add_argument("--dtypes", default=defaults.get("dtypes"), help="comma-separated subset of fp32,bf16")
    parser.add_argument("--x-grad", default=defaults.get("x_grad"),
                        help="comma-separated subset of no,yes: whether the layer input needs a gradient")
    parser.add_argument("--warmup", type=int, default=defaults.get("warmup"))
    parser.add_argument("--rounds", type=int, default=defaults.get("rounds"))
    parser.add_argument("--dropout", type=float, default=0.0, help="adapter dropout (the paper's configs use 0.05)")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)


def parse_settings(args: argparse.Namespace) -> list[Setting]:
    return [Setting(int(n), int(m), int(tokens), dtype, {"no": False, "yes": True}[x_grad])
            for n, m in (shape.split("x") for shape in args.shapes.split(","))
            for dtype in args.dtypes.split(",") for tokens in args.tokens.split(",")
            for x_grad in args.x_grad.split(",")]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="2048<->5504 shapes, T=512, x.grad=yes, 1+5 rounds (< 2 minutes on 2 idle CPU cores)")
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {','.join(METHODS + GPU_METHODS)}")
    add_setting_arguments(parser, {})
    add_run_arguments(parser)
    args = parser.parse_args()
    default_dtypes = "fp32,bf16" if fast_bf16_available(torch.device(args.device).type) else "fp32"
    preset = {"shapes": "2048x5504,5504x2048", "tokens": "512", "dtypes": default_dtypes, "x_grad": "yes",
              "warmup": 1, "rounds": 5} if args.quick else \
             {"shapes": "4096x11008,11008x4096", "tokens": "512,2048", "dtypes": default_dtypes, "x_grad": "no,yes",
              "warmup": 2, "rounds": 9}
    custom = any(getattr(args, key) is not None for key in preset)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = ("quick" if args.quick else "full") + ("-custom" if custom else "")
    args.notes = [] if "bf16" in default_dtypes else [
        "No native bf16 on this device (no AVX512-BF16/AMX, no GPU), so the presets leave bf16 out: torch's fallback "
        "bf16 GEMMs are up to 100x slower than fp32 here. Pass --dtypes fp32,bf16 to time it anyway."]
    for note in args.notes:
        print(f"note: {note}", flush=True)
    return args


def main() -> None:
    args = parse_args()
    device, load_at_start = start_run(args)
    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS + GPU_METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS + GPU_METHODS}")
    refuse_fused_off_gpu(methods, device)
    settings = parse_settings(args)
    shapes = list(dict.fromkeys((s.in_features, s.out_features) for s in settings))
    tokens = list(dict.fromkeys(s.tokens for s in settings))
    x_grads = list(dict.fromkeys(s.x_grad for s in settings))
    env = run_env_tag()
    bandwidth = measure_bandwidth(device)
    started = time.perf_counter()
    results = []
    for setting in settings:
        result = run_setting(setting, methods, args, device)
        if "base" in result["median_ms"]:
            result["floor_overhead"] = floor_overheads(setting, result["median_ms"]["base"], bandwidth)
        else:
            result["floor_overhead"] = {}
        results.append(result)
        line = "  ".join(f"{COLUMN_NAMES[m]} {result['median_ms'][m]:.1f}" for m in result["median_ms"])
        print(f"{setting.label}: {line}  " + "  ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()
                                                        if not k.startswith("overhead")), flush=True)
    table, cost_records = cost_table(shapes, tokens, x_grads)
    payload = {"preset": args.preset, "env": env, "device": device.type, "args": vars(args) | {"methods": methods},
               "machine": machine_info(load_at_start), "bandwidth_gbs": bandwidth / 1e9, "cost_table": table,
               "costs": cost_records, "results": results, "wall_seconds": time.perf_counter() - started}
    markdown = markdown_report(payload)
    print(markdown)
    stem = f"layer_speed_{args.preset}_{env}{'_' + args.tag if args.tag else ''}"
    for path in write_report(stem, payload, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
