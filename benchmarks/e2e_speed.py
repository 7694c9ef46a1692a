"""End-to-end training-step time and memory on a whole model: our LoRA, MoLoRA and MALoRA (eager and compiled) next to
PEFT LoRA and MixLoRA.

The layer benchmark isolates one linear; this one times what a user pays per optimiser step on a whole model: the
forward (LM loss over every position, plus the router load-balance loss where the method has one), the backward
and the AdamW step, each phase separately, round-robin over the methods in one process. Every method gets the same
frozen base (one load, deep-copied), the same batch of random token ids and the paper's module set
(q, k, v, gate, up, down; not o_proj). The frozen base without adapters (forward + backward to the input embeddings,
no optimiser) is the floor.

    python -m benchmarks.e2e_speed --quick     # the default job's base here, 4 x 64 tokens, 1 + 2 rounds (< 2 min)
    python -m benchmarks.e2e_speed             # nf4 and fp32 bases at 8 x 64 and 8 x 256 tokens, plus bf16 cases
                                               # (nf4-bf16 and bf16 at both sizes where the CPU has native bf16)
    python -m benchmarks.e2e_speed --profile malora --settings nf4:8x256   # where MALoRA's step time goes
    python -m benchmarks.e2e_speed --model llama2-7b-shape:4 --settings nf4-bf16:4x512,bf16:4x512 --eval
                                               # random weights in LLaMA-2-7B's shape (no download), + evaluation

`--model` (benchmarks/models.py): the offline SmolLM2-135M (default), or random weights in SmolLM2's or LLaMA-2-7B's
shape. Methods with `_compiled` run the same adapters with `compile_adapters` (torch.compile of each adapter path;
the first warm-up rounds compile); methods with `_fused` run the mixtures with `kernel="fused"` (Triton routing, CUDA
only); methods with `_whole` compile the whole model, base, adapters and loss, with `torch.compile(model)` (one graph
per mode and shape: no per-layer call overhead left, and the base's own ops fused too). `--eval` also times an
evaluation forward (no gradients, eval mode) and greedy generation, where every new token runs through every adapted
layer.

Bases: "nf4" = bitsandbytes 4-bit NF4 (double quant) computing in float32, other weights float32; "fp32" =
unquantized float32; "bf16" = unquantized bf16 weights, forward under bf16 autocast, adapters float32 (Lightning's
bf16-mixed on a bf16 base); "nf4-bf16" = NF4 computing in bf16 under bf16 autocast. On a CPU without native bf16
(no AVX512-BF16/AMX) torch emulates bf16 matmuls about 50x slower than float32, so the bf16 bases run few rounds
on a small batch there and measure that emulation, not the adapters.

Peers (`pip install -e '.[bench]'`): PEFT `LoraConfig(r=64, lora_alpha=128)` via `get_peft_model`; MixLoRA 0.2.3 (the
inference package of TUDB-Labs/MixLoRA) injected with `inject_adapter_in_model` and freshly initialised weights.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from benchmarks.common import (
    add_run_arguments,
    fmt_ratio,
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
from benchmarks.models import ModelChoice, model_path, parse_model, temporary_model_directory
from benchmarks.quality import CONFIGURATIONS
from malora_lightning.adapters import (
    PAPER_TARGET_MODULES,
    AdapterConfig,
    AdapterLayer,
    aux_loss,
    compile_adapters,
    count_parameters,
    frozen_adapter_weights,
    inject_adapters,
    load_base_model,
)
from malora_lightning.hardware import fast_bf16_available
from malora_lightning.optim import adamw_options

METHODS = ("base", "lora", "molora", "malora", "lora_compiled", "molora_compiled", "malora_compiled", "molora_fused",
           "malora_fused", "peft_lora", "mixlora", "base_whole", "lora_whole", "malora_whole", "peft_lora_whole")
COMPILED = "_compiled"  # compile_adapters: each adapter path compiled on its own, the base eager
FUSED = "_fused"  # kernel="fused": Triton kernels, so CUDA only
WHOLE = "_whole"  # torch.compile of the whole model (base, adapters and loss in one graph)
# MALoRA method -> its suffix
MALORA_MODES = {"malora": "", "malora_compiled": COMPILED, "malora_fused": FUSED, "malora_whole": WHOLE}
COLUMN_NAMES = {"base": "base (frozen, no adapter)", "lora": "LoRA r=64 (ours)", "molora": "MoLoRA 8x r8 top-2 (ours)",
                "malora": "MALoRA 8x r12 d32 top-2 (ours)", "lora_compiled": "LoRA r=64 (ours, compiled)",
                "molora_compiled": "MoLoRA 8x r8 top-2 (ours, compiled)",
                "malora_compiled": "MALoRA 8x r12 d32 top-2 (ours, compiled)",
                "molora_fused": "MoLoRA 8x r8 top-2 (ours, fused routing)",
                "malora_fused": "MALoRA 8x r12 d32 top-2 (ours, fused routing)", "peft_lora": "PEFT LoRA r=64",
                "mixlora": "MixLoRA 8x r8 top-2 (pkg)", "base_whole": "base (frozen, whole model compiled)",
                "lora_whole": "LoRA r=64 (ours, whole model compiled)",
                "malora_whole": "MALoRA 8x r12 d32 top-2 (ours, whole model compiled)",
                "peft_lora_whole": "PEFT LoRA r=64 (whole model compiled)"}
OUR_CONFIGURATIONS = {"lora": "lora_r64", "molora": "molora_r8", "malora": "malora"}  # keys of quality.CONFIGURATIONS
TARGET_MODULES = list(PAPER_TARGET_MODULES)
DROPOUT = 0.05  # the paper's; MixLoRA's LoraLinear asserts lora_dropout > 0, so every method uses it
AUX_LOSS_COEF = 0.01
MIXLORA_RANK, MIXLORA_EXPERTS, MIXLORA_TOP_K = 8, 8, 2
LEARNING_RATE = 1e-4
MIB = 2 ** 20
# the targets of issue 11 (MALoRA time / other time, "lora" and "molora" in MALoRA's own mode: eager or compiled),
# checked in the report; not test thresholds
TARGETS = {"malora/peft_lora": 1.10, "malora/lora": 1.10, "malora/mixlora": 0.5, "malora/molora": 1.0}
EVAL_NEW_TOKENS = 8
DEFAULT_MODEL = "smollm2"  # benchmarks/models.py's offline SmolLM2-135M


@dataclass(frozen=True)
class BaseSpec:
    """How the frozen base is loaded and run."""

    quantization: str | None
    dtype: str  # compute dtype of 4-bit layers, or the weights' dtype when unquantized
    autocast: bool  # forward under torch.autocast(bfloat16)
    description: str


BASES = {
    "nf4": BaseSpec("nf4", "float32", False, "4-bit NF4 (double quant), float32 compute; embeddings, norms and "
                    "head float32"),
    "fp32": BaseSpec(None, "float32", False, "unquantized, float32 weights"),
    "bf16": BaseSpec(None, "bfloat16", True, "unquantized bf16 weights, bf16 autocast, float32 adapters"),
    "nf4-bf16": BaseSpec("nf4", "bfloat16", True, "4-bit NF4, bf16 compute, bf16 autocast, float32 adapters"),
}


@dataclass(frozen=True)
class Setting:
    base: str
    batch: int
    seq_len: int

    @property
    def label(self) -> str:
        return f"{self.base} {self.batch}x{self.seq_len}"

    @property
    def tokens(self) -> int:
        return self.batch * self.seq_len


def parse_settings(text: str) -> list[Setting]:
    """"nf4:8x64,fp32:8x256" -> settings."""
    settings = []
    for item in text.split(","):
        base, _, shape = item.partition(":")
        batch, _, seq_len = shape.partition("x")
        if base not in BASES or not batch.isdigit() or not seq_len.isdigit():
            raise SystemExit(f"bad setting {item!r}: expected BASE:BATCHxSEQ with BASE in {tuple(BASES)}")
        settings.append(Setting(base, int(batch), int(seq_len)))
    return settings


def bf16_is_emulated(setting: Setting, device: torch.device) -> bool:
    return BASES[setting.base].autocast and not fast_bf16_available(device.type)


# ---------------------------------------------------------------------------------------------------- methods
@dataclass
class Prepared:
    """One method on its own copy of the base: the model to call, what AdamW updates, and its router loss."""

    model: nn.Module
    trainable: list[nn.Parameter]
    trainable_count: int  # from the method's own counter (ours, PEFT's, or requires_grad for MixLoRA)
    counted_by: str
    router_loss: Callable[[], torch.Tensor] | None
    all_parameters: list[nn.Parameter]  # every parameter the step reads (MixLoRA's experts are not registered)
    notes: list[str] = field(default_factory=list)


def our_family(method: str) -> str:
    """"malora_compiled" -> "malora"; the name itself for methods that are not ours."""
    return method.removesuffix(COMPILED).removesuffix(FUSED).removesuffix(WHOLE)


def prepare_ours(method: str, model: nn.Module) -> Prepared:
    kernel = {"kernel": "fused"} if method.endswith(FUSED) else {}
    config = AdapterConfig(**CONFIGURATIONS[OUR_CONFIGURATIONS[our_family(method)]]["adapter"], dropout=DROPOUT,
                           aux_loss_coef=AUX_LOSS_COEF, target_modules=TARGET_MODULES, **kernel)
    inject_adapters(model, config)
    if method.endswith(COMPILED):
        compile_adapters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    router = (lambda: aux_loss(model)) if config.is_routed else None
    return Prepared(model, trainable, count_parameters(model).trainable, "malora_lightning count_parameters",
                    router, list(model.parameters()), [f"AdapterConfig: {config.to_dict()}"])


def prepare_peft(model: nn.Module) -> Prepared:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=64, lora_alpha=128, lora_dropout=DROPOUT, target_modules=TARGET_MODULES, bias="none",
                        task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    return Prepared(peft_model, trainable, peft_model.get_nb_trainable_parameters()[0],
                    "PEFT get_nb_trainable_parameters", None, list(peft_model.parameters()),
                    [f"peft.LoraConfig(r=64, lora_alpha=128, lora_dropout={DROPOUT}, target_modules={TARGET_MODULES})"])


def mixlora_config(model: nn.Module, base_name: str):
    """The closest MixLoRA configuration to the paper's job: 8 experts, top-2, rank 8 everywhere (scale 2)."""
    from mixlora import MixLoraConfig

    targets = {name: name in TARGET_MODULES for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj")}
    config = MixLoraConfig(
        base_model_=base_name, task_type_="CAUSAL_LM", peft_type_="MIXLORA", adapter_name_="default",
        dtype_=torch.float32, lora_r_=MIXLORA_RANK, lora_alpha_=2 * MIXLORA_RANK, lora_dropout_=DROPOUT,
        target_modules_=targets, routing_strategy_="mixlora", num_experts_=MIXLORA_EXPERTS, top_k_=MIXLORA_TOP_K,
        router_aux_loss_coef_=AUX_LOSS_COEF, router_init_range_=0.02, jitter_noise_=0.0,
        # the package leaves act_fn_ None ("use the FFN's own") but then calls it; name the FFN's activation
        act_fn_=model.config.hidden_act,
    )
    return config.check()


def prepare_mixlora(model: nn.Module) -> Prepared:
    """MixLoRA with fresh weights: `inject_adapter_in_model` copies given tensors, and a None pair makes its
    `LoraLinear` use its own init (Kaiming-uniform A, zero B); routers start as N(0, router_init_range).

    The package keeps each router where it is given (`.to(dtype_)` changes its dtype only), so it is created on the
    model's device in the package's dtype: a CPU router under a CUDA model is copied to the GPU in every MoE forward
    and sends AdamW down its slow per-tensor path for every tensor."""
    from mixlora import inject_adapter_in_model

    config = mixlora_config(model, model.config.name_or_path)
    weights: dict[str, torch.Tensor | None] = defaultdict(lambda: None)
    hidden = model.config.hidden_size
    for index in range(model.config.num_hidden_layers):
        gate = torch.empty(MIXLORA_EXPERTS, hidden, device=model.device, dtype=config.dtype_)
        gate.normal_(std=config.router_init_range_).requires_grad_(True)
        weights[f"mixlora.layers.{index}.mlp.moe_gate.weight"] = gate
    inject_adapter_in_model(model, config, weights)
    # the MoE blocks, their expert LoRAs and routers are plain attributes, not submodules: collect them by hand
    parameters = list(model.parameters())
    for layer in model.model.layers:
        for moe in layer.mlp.mixlora_moes.values():
            parameters.append(moe.gate_)
            for expert in moe.experts_.values():
                parameters += [expert.lora_A.weight, expert.lora_B.weight]
    trainable = [p for p in parameters if p.requires_grad]
    notes = ["MoE over the MLP block (one router per decoder layer on the MLP input); each expert = LoRA r=8 on "
             "gate, up and down (scale 2); plain LoRA r=8 on q, k, v; base gate/up run once for all tokens, base "
             "down_proj runs per expert on its tokens (top-2: twice the tokens); no router loss in the package"]
    return Prepared(model, trainable, sum(p.numel() for p in trainable), "requires_grad (unregistered experts "
                    "included)", None, parameters, notes)


def prepare(method: str, base_model: nn.Module) -> Prepared:
    """`method` on its own deep copy of the base; refuses a method that left a tensor it reads off the base's
    device (each forward would copy it, and AdamW would fall back to its per-tensor loop for all of them)."""
    if method.endswith(WHOLE):  # the method itself, then its whole model compiled: base, adapters and loss
        prepared = prepare(method.removesuffix(WHOLE), base_model)
        return replace(prepared, model=torch.compile(prepared.model),
                       notes=[*prepared.notes, "whole model: torch.compile(model), default mode"])
    model = copy.deepcopy(base_model)
    if method == "base":
        prepared = Prepared(model, [], 0, "-", None, list(model.parameters()))
    elif our_family(method) in OUR_CONFIGURATIONS:
        prepared = prepare_ours(method, model)
    elif method == "peft_lora":
        prepared = prepare_peft(model)
    else:
        prepared = prepare_mixlora(model)
    device = base_model.device
    stray = sorted({str(p.device) for p in prepared.all_parameters if p.device != device})
    if stray:
        raise RuntimeError(f"{method}: tensors on {stray}, not on the run's device {device}")
    return prepared


# ---------------------------------------------------------------------------------------------------- one step
@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def make_batch(setting: Setting, vocab_size: int, device: torch.device) -> Batch:
    generator = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, vocab_size, (setting.batch, setting.seq_len), generator=generator)
    return Batch(ids.to(device), torch.ones_like(ids, device=device))


def autocast_for(setting: Setting, device: torch.device) -> Callable[[], Any]:
    if BASES[setting.base].autocast:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def forward_loss(prepared: Prepared, batch: Batch) -> torch.Tensor:
    """Token-mean LM loss over every position (labels = inputs) plus the weighted router loss, if any."""
    loss = prepared.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.input_ids,
                          use_cache=False).loss
    if prepared.router_loss is not None:
        loss = loss + prepared.router_loss().to(loss.device)
    return loss


def make_optimizer(prepared: Prepared, kind: str) -> torch.optim.Optimizer | None:
    """AdamW over the trainable parameters; "default" is what `MALoRAModule.configure_optimizers` picks."""
    if not prepared.trainable:
        return None
    options = {"default": adamw_options(prepared.trainable), "foreach": {"foreach": True}, "fused": {"fused": True},
               "loop": {"foreach": False}}[kind]
    return torch.optim.AdamW(prepared.trainable, lr=LEARNING_RATE, **options)


Phases = list[tuple[float, float, float]]  # (forward, backward, optimizer) seconds per call


def training_step(prepared: Prepared, optimizer: torch.optim.Optimizer | None, batch: Batch,
                  autocast: Callable[[], Any], device: torch.device, phases: Phases) -> Callable[[], None]:
    """Forward (+ router loss), backward, AdamW step and set_to_none zero-grad; appends each phase's seconds."""

    def step() -> None:
        start = time.perf_counter()
        with autocast():
            loss = forward_loss(prepared, batch)
        synchronize(device)
        forward_done = time.perf_counter()
        loss.backward()
        synchronize(device)
        backward_done = time.perf_counter()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            synchronize(device)
        phases.append((forward_done - start, backward_done - forward_done, time.perf_counter() - backward_done))

    return step


def memory_of(prepared: Prepared, optimizer: torch.optim.Optimizer | None, step: Callable[[], None], batch: Batch,
              autocast: Callable[[], Any], device: torch.device) -> dict[str, float]:
    """MiB saved for backward by the forward, peak during a whole step, and the standing optimiser state."""

    def forward_only() -> None:
        with autocast():
            forward_loss(prepared, batch)

    saved = saved_tensor_bytes(forward_only, prepared.all_parameters)
    peak = peak_step_bytes(step, device)
    state = 0 if optimizer is None else sum(value.numel() * value.element_size()
                                            for per_param in optimizer.state.values()
                                            for value in per_param.values() if isinstance(value, torch.Tensor))
    trainable_bytes = sum(p.numel() * p.element_size() for p in prepared.trainable)
    return {"saved_mib": saved / MIB, "peak_mib": peak / MIB, "optimizer_state_mib": state / MIB,
            "trainable_mib": trainable_bytes / MIB}


# ---------------------------------------------------------------------------------------------------- one setting
def summarise(phases: Phases, totals: list[float]) -> dict[str, float]:
    forward, backward, optimizer = zip(*phases)
    return {"forward_ms": 1e3 * median(forward), "backward_ms": 1e3 * median(backward),
            "optimizer_ms": 1e3 * median(optimizer), "total_ms": 1e3 * median(totals)}


def ratios(totals: dict[str, float]) -> dict[str, float]:
    """MALoRA (eager, compiled, fused when run) against each other method, and every method against the frozen base,
    from medians of one run. Our LoRA and MoLoRA are compared in MALoRA's own mode: "malora_compiled/lora" is
    compiled MALoRA over compiled LoRA, "malora_fused/molora" fused over fused, "malora_fused/lora" over eager LoRA
    (LoRA has no routing to fuse); the peers have one mode."""
    out = {}
    for malora, suffix in MALORA_MODES.items():
        if malora not in totals:
            continue
        for other in ("lora", "molora", "peft_lora", "mixlora"):
            counterpart = other + suffix if other + suffix in METHODS else other
            if counterpart in totals:
                out[f"{malora}/{other}"] = totals[malora] / totals[counterpart]
    if "base" in totals:
        out |= {f"{method}/base": value / totals["base"] for method, value in totals.items() if method != "base"}
    return out


def evaluation_steps(prepared: dict[str, Prepared], batch: Batch, autocast: Callable[[], Any],
                     device: torch.device) -> dict[str, Callable[[], None]]:
    """Per method: an evaluation forward over the batch and greedy generation of EVAL_NEW_TOKENS tokens after its
    first half, both in eval mode without gradients (what a validation pass runs)."""
    prompt = Batch(batch.input_ids[:, :batch.input_ids.shape[1] // 2], batch.attention_mask[:, :batch.input_ids.shape[1] // 2])
    steps = {}
    for method, p in prepared.items():
        def forward(p: Prepared = p) -> None:
            with torch.no_grad(), autocast():
                p.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)

        def generate(p: Prepared = p) -> None:
            # as the library generates (evaluation.generate_predictions): our layers cast and stack their weights
            # once per call, not per token; the peers have none of our layers, so it leaves them as they are
            with torch.no_grad(), autocast(), frozen_adapter_weights(p.model):
                p.model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, do_sample=False,
                                 max_new_tokens=EVAL_NEW_TOKENS, min_new_tokens=EVAL_NEW_TOKENS, pad_token_id=0)

        steps[f"{method}:forward"] = forward
        steps[f"{method}:generate"] = generate
    return steps


def run_evaluation(prepared: dict[str, Prepared], batch: Batch, autocast: Callable[[], Any], device: torch.device,
                   warmup: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median ms of each method's evaluation forward and generation (round-robin, eval mode, then back to train)."""
    for p in prepared.values():
        p.model.eval()
    try:
        steps, failed = working_steps(evaluation_steps(prepared, batch, autocast, device), device)
        times = round_robin(steps, warmup, rounds, device)
    finally:
        for p in prepared.values():
            p.model.train()
    result: dict[str, dict[str, float]] = {method: {"forward_ms": float("nan"), "generate_ms": float("nan")}
                                           for method in prepared}
    for key, values in times.items():
        method, _, kind = key.partition(":")
        result[method][f"{kind}_ms"] = 1e3 * median(values)
    for key, message in failed.items():
        method, _, kind = key.partition(":")
        result[method][f"{kind}_error"] = message
    return result


def run_setting(setting: Setting, prepared: dict[str, Prepared], optimizers: dict[str, torch.optim.Optimizer | None],
                warmup: int, rounds: int, vocab_size: int, device: torch.device, measure_memory: bool,
                evaluate: bool) -> dict[str, Any]:
    batch = make_batch(setting, vocab_size, device)
    autocast = autocast_for(setting, device)
    phases: dict[str, Phases] = {method: [] for method in prepared}
    steps, failed = working_steps({method: training_step(p, optimizers[method], batch, autocast, device,
                                                         phases[method]) for method, p in prepared.items()}, device)
    prepared = {method: p for method, p in prepared.items() if method in steps}
    for recorded in phases.values():
        recorded.clear()  # the trial calls' phases
    times = round_robin(steps, warmup, rounds, device)
    medians = {method: summarise(phases[method][warmup:], times[method]) for method in prepared}
    result: dict[str, Any] = {
        "setting": asdict(setting), "tokens": setting.tokens, "warmup": warmup, "rounds": rounds,
        "bf16_emulated": bf16_is_emulated(setting, device), "median": medians, "failed": failed,
        "ratios": ratios({method: values["total_ms"] for method, values in medians.items()}),
        "times_ms": {m: [1e3 * t for t in ts] for m, ts in times.items()},
        "phases_ms": {m: [[1e3 * t for t in p] for p in phases[m][warmup:]] for m in prepared},
    }
    if evaluate:
        evaluation = run_evaluation(prepared, batch, autocast, device, warmup, rounds)
        result["evaluation"] = evaluation
        result["evaluation_ratios"] = {
            kind: ratios({method: values[f"{kind}_ms"] for method, values in evaluation.items()})
            for kind in ("forward", "generate")}
    if measure_memory:
        result["memory"] = {method: memory_of(p, optimizers[method], steps[method], batch, autocast, device)
                            for method, p in prepared.items()}
    return result


def load_prepared(base: str, methods: list[str], path: str, device: torch.device) -> tuple[dict[str, Prepared], int]:
    """Every method on its own deep copy of one loaded base; returns them and the vocabulary size."""
    spec = BASES[base]
    dtype = None if spec.quantization else spec.dtype
    base_model = load_base_model(path, quantization=spec.quantization, compute_dtype=spec.dtype, dtype=dtype,
                                 device_map={"": device} if device.type == "cuda" else None)
    if base_model.device != device:
        base_model.to(device)
    base_model.train()
    prepared = {method: prepare(method, base_model) for method in methods}
    for p in prepared.values():
        p.model.train()
    return prepared, base_model.config.vocab_size


# ---------------------------------------------------------------------------------------------------- profile
class ScopeMarker:
    """Opens a profiler scope named after a module's role around its forward (module hooks, innermost scope wins).

    Backward work is attributed through autograd sequence numbers: each backward node carries the number of the
    forward op that created it, and that op sits in one of these scopes.
    """

    def __init__(self) -> None:
        self._open: list[torch.autograd.profiler.record_function] = []
        self._handles: list[Any] = []

    def mark(self, module: nn.Module, scope: str) -> None:
        def enter(*_: Any) -> None:
            record = torch.autograd.profiler.record_function(f"scope::{scope}")
            record.__enter__()
            self._open.append(record)

        def leave(*_: Any) -> None:
            self._open.pop().__exit__(None, None, None)

        self._handles += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def mark_scopes(model: nn.Module, marker: ScopeMarker) -> None:
    """Scopes for a Llama-style model with our adapters. A routed layer's routing runs inside its adapter kernel
    (one autograd node), so it counts as "adapter"."""
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if isinstance(module, AdapterLayer):
            marker.mark(module, "adapter")
            marker.mark(module.base_layer, "base linear")
        elif name == "" or leaf in ("lm_head", "embed_tokens", "self_attn", "mlp", "input_layernorm",
                                    "post_attention_layernorm", "norm", "rotary_emb"):
            scope = {"": "loss + glue", "self_attn": "attention core", "mlp": "MLP activation"}.get(leaf, leaf)
            marker.mark(module, "norms" if "norm" in leaf else scope)
        elif isinstance(module, nn.Linear):  # unadapted base linears (o_proj)
            marker.mark(module, "base linear")


def _ancestors(event: Any) -> Iterator[Any]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent
        parent = parent.cpu_parent


def categorise(events: list[Any]) -> dict[str, float]:
    """Self CPU milliseconds per (phase, scope) category, every op counted once."""
    scope_of: dict[int, str] = {}

    def forward_scope(event: Any) -> str | None:
        return next((a.name.removeprefix("scope::") for a in [event, *_ancestors(event)]
                     if a.name.startswith("scope::")), None)

    for event in events:  # map forward ops' sequence numbers to their scopes
        if event.sequence_nr >= 0 and not any("evaluate_function" in a.name for a in _ancestors(event)):
            scope = forward_scope(event)
            if scope is not None:
                scope_of.setdefault(event.sequence_nr, scope)
    totals: dict[str, float] = defaultdict(float)
    for event in events:
        chain = [event, *_ancestors(event)]
        if any(a.name.startswith("Optimizer.") for a in chain):
            category = "optimizer (AdamW step + zero_grad)"
        elif any(a.name.startswith("autograd::engine::evaluate_function") for a in chain):
            node = next(a for a in chain if a.name.startswith("autograd::engine::evaluate_function"))
            category = f"backward: {scope_of.get(node.sequence_nr, 'unattributed')}"
        else:
            category = f"forward: {forward_scope(event) or 'outside the model'}"
        if category.endswith("base linear") and "dequantize" in event.name:
            category += " (4-bit dequantize)"
        elif category.endswith("base linear"):
            category += " (GEMM + rest)"
        totals[category] += event.self_cpu_time_total / 1e3
    return dict(totals)


def run_profile(method: str, setting: Setting, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """torch.profiler over `args.profile_steps` steps of one method (after one warm-up step), grouped by scope."""
    prepared, vocab_size = load_prepared(setting.base, [method], args.model_path, device)
    p = prepared[method]
    optimizer = make_optimizer(p, args.adamw)
    batch, autocast, phases = make_batch(setting, vocab_size, device), autocast_for(setting, device), []
    step = training_step(p, optimizer, batch, autocast, device, phases)
    step()  # warm-up: optimizer state, one-time allocations
    marker = ScopeMarker()
    mark_scopes(p.model, marker)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        for _ in range(args.profile_steps):
            step()
    marker.remove()
    events = list(profiler.events())
    categories = {k: v / args.profile_steps for k, v in sorted(categorise(events).items(), key=lambda kv: -kv[1])}
    top_ops = profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    profiled = [1e3 * sum(phase) for phase in phases[1:]]
    return {"method": method, "setting": asdict(setting), "steps": args.profile_steps, "categories_ms": categories,
            "step_ms_under_profiler": profiled, "top_ops": top_ops}


def profile_markdown(profile: dict[str, Any]) -> str:
    total = sum(profile["categories_ms"].values())
    rows = [[name, f"{ms:.0f}", f"{100 * ms / total:.1f}%"] for name, ms in profile["categories_ms"].items()]
    setting = Setting(**profile["setting"])
    return "\n\n".join([
        f"### Profile: {COLUMN_NAMES[profile['method']]}, {setting.label} ({profile['steps']} steps, per step)",
        f"Self CPU time per category (ms per step; the profiler's own overhead included; step wall time under the "
        f"profiler {', '.join(f'{v:.0f}' for v in profile['step_ms_under_profiler'])} ms). Scopes come from module "
        "hooks; backward ops are attributed to the scope of the forward op that created their autograd node.",
        markdown_table(["category", "ms / step", "share"], rows),
        "Top ops by self CPU time:\n\n```\n" + profile["top_ops"] + "\n```",
    ])


# ---------------------------------------------------------------------------------------------------- report
def describe_model(choice: ModelChoice) -> str:
    return f"{choice.name} (random weights)" if choice.random_weights else "SmolLM2-135M-Instruct"


def setting_table(result: dict[str, Any], methods: list[str], trainable: dict[str, int]) -> str:
    medians, r, memory = result["median"], result["ratios"], result.get("memory", {})
    rows = []
    for method in methods:
        if method not in medians:
            rows.append([COLUMN_NAMES[method], f"failed: {result['failed'][method]}", *[""] * 12])
            continue
        m = medians[method]
        mem = memory.get(method)
        rows.append([COLUMN_NAMES[method], f"{m['forward_ms']:.1f}", f"{m['backward_ms']:.1f}",
                     f"{m['optimizer_ms']:.1f}", f"**{m['total_ms']:.1f}**", fmt_ratio(r.get(f"{method}/base")),
                     *(fmt_ratio(medians[malora]["total_ms"] / m["total_ms"] if malora in medians else None)
                       for malora in MALORA_MODES), f"{trainable[method]:,}",
                     "–" if mem is None else f"{mem['saved_mib']:.0f}", "–" if mem is None else f"{mem['peak_mib']:.0f}",
                     "–" if mem is None else f"{mem['optimizer_state_mib']:.0f}"])
    headers = ["method", "forward ms", "backward ms", "optimizer ms", "total ms", "× base", "MALoRA / this",
               "compiled MALoRA / this", "fused MALoRA / this", "whole-compiled MALoRA / this", "trainable params",
               "saved MiB", "peak MiB", "AdamW state MiB"]
    return markdown_table(headers, rows)


def evaluation_table(result: dict[str, Any], methods: list[str]) -> str:
    evaluation = result["evaluation"]
    rows = [[COLUMN_NAMES[method], f"{evaluation[method]['forward_ms']:.1f}",
             f"{evaluation[method]['generate_ms']:.1f}",
             *(fmt_ratio(result["evaluation_ratios"][kind].get(f"{method}/base")) for kind in ("forward", "generate"))]
            for method in methods if method in evaluation]
    return markdown_table(["method", "eval forward ms", f"generate {EVAL_NEW_TOKENS} tokens ms", "forward × base",
                           "generate × base"], rows)


def target_rows(results: list[dict[str, Any]]) -> list[list[str]]:
    rows = []
    for result in results:
        label = Setting(**result["setting"]).label + (" (bf16 emulated)" if result["bf16_emulated"] else "")
        for name, limit in TARGETS.items():
            for malora in MALORA_MODES:
                key = name.replace("malora", malora, 1)
                value = result["ratios"].get(key)
                if value is not None:
                    rows.append([label, key, f"{value:.3f}", f"<= {limit}", "holds" if value <= limit else "misses"])
    return rows


def markdown_report(payload: dict[str, Any]) -> str:
    methods = payload["methods"]
    sections = [
        f"# End to end: one training step on {payload['model']} ({payload['preset']}, {payload['env']})",
        machine_markdown(payload["machine"]),
        f"- Device {payload['device']}; batch of random token ids (seed 1234), attention mask all ones, LM loss over "
        f"every position (labels = input ids); round-robin over the methods, warm-up then timed rounds, medians. "
        f"Dropout {DROPOUT} on every adapter; router aux-loss coefficient {AUX_LOSS_COEF} (ours; MixLoRA's package "
        f"computes no router loss); AdamW ({payload['args']['adamw']}) over the trainable parameters, "
        f"zero_grad(set_to_none=True) in the optimizer phase.",
        "- Memory (CPU): saved = distinct storages autograd keeps for backward in one forward, parameters excluded "
        "(`saved_tensor_bytes`); peak = tensor bytes allocated during one whole step and alive at its peak "
        "(`PeakTensorMemory`: activations, gradients, optimizer temporaries; parameters and the standing AdamW state "
        "existed before and are listed apart). On CUDA: max_memory_allocated minus the memory before the step.",
        *(f"- Note: {note}" for note in payload["notes"]),
    ]
    for result in payload["results"]:
        setting = Setting(**result["setting"])
        emulated = " — **bf16 emulated in software on this CPU: ~50x slower matmuls, not an adapter measurement**" \
            if result["bf16_emulated"] else ""
        sections += [f"## {setting.label}: {setting.tokens} tokens per step, base {BASES[setting.base].description}"
                     f" ({result['warmup']} warm-up + {result['rounds']} timed rounds){emulated}",
                     setting_table(result, methods, payload["trainable"])]
        if "evaluation" in result:
            sections += [f"Evaluation, eval mode without gradients: one forward over the same batch, and greedy "
                         f"generation of {EVAL_NEW_TOKENS} tokens after the first half of each row (KV cache).",
                         evaluation_table(result, methods)]
    sections += ["## Ratios against the issue's targets (total step time, same run; `malora_compiled/lora` is "
                 "compiled MALoRA over compiled LoRA, `malora/lora` eager over eager)",
                 markdown_table(["setting", "ratio", "measured", "target", ""], target_rows(payload["results"]))]
    sections += ["## Method details", "\n".join(f"- {COLUMN_NAMES[m]}: trainable counted by "
                                                 f"{payload['counted_by'][m]}; " + "; ".join(payload['method_notes'][m])
                                                 for m in methods if m != "base")]
    return "\n\n".join(sections)


# ---------------------------------------------------------------------------------------------------- main
def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the default job's base on this hardware (nf4-bf16 "
                        "with native bf16, else nf4), 4x64 tokens, 1 + 2 rounds (< 2 minutes)")
    parser.add_argument("--settings", help="comma-separated BASE:BATCHxSEQ, BASE in " + ",".join(BASES))
    parser.add_argument("--model", default=DEFAULT_MODEL, help="smollm2 (offline), smollm2-shape or "
                        "llama2-7b-shape:LAYERS (random weights, benchmarks/models.py)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)} (default: all; on a CPU "
                        "without the compiled ones, whose compilation takes minutes there)")
    parser.add_argument("--eval", action="store_true", help="also time an evaluation forward and greedy generation")
    parser.add_argument("--warmup", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--bf16-rounds", type=int, default=2,
                        help="timed rounds of bf16 settings where bf16 is emulated (one warm-up round)")
    parser.add_argument("--adamw", choices=("default", "foreach", "fused", "loop"), default="default",
                        help="AdamW implementation (default: the library's choice, `optim.adamw_options`; loop: "
                        "torch's per-tensor loop, its own default for CPU tensors)")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory measurements")
    parser.add_argument("--profile", help="instead of timing, profile these methods (comma-separated) at the first "
                        "setting with torch.profiler")
    parser.add_argument("--profile-steps", type=int, default=2)
    add_run_arguments(parser)
    args = parser.parse_args()
    bf16_fast = fast_bf16_available(torch.device(args.device).type)
    bf16_settings = "nf4-bf16:8x64,nf4-bf16:8x256,bf16:8x64,bf16:8x256" if bf16_fast else "bf16:1x64,nf4-bf16:1x64"
    quick_base = "nf4-bf16" if bf16_fast else "nf4"  # what `compute_dtype: auto` picks for the default job
    preset = {"settings": f"{quick_base}:4x64", "warmup": 1, "rounds": 2} if args.quick else \
             {"settings": f"nf4:8x64,nf4:8x256,fp32:8x64,fp32:8x256,{bf16_settings}", "warmup": 1, "rounds": 5}
    custom = any(getattr(args, key) is not None for key in preset)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.preset = ("profile" if args.profile else "quick" if args.quick else "full") + ("-custom" if custom else "")
    if args.methods is None:
        on_cuda = torch.device(args.device).type == "cuda"
        args.methods = ",".join(m for m in METHODS if on_cuda or not m.endswith((COMPILED, FUSED, WHOLE)))
    args.notes = [] if bf16_fast else [
        "No native bf16 on this CPU (no AVX512-BF16/AMX): bf16 settings measure torch's software bf16 matmuls "
        "(~1.3 vs ~72 GFLOP/s float32), so they run on a small batch with few rounds and are reported for "
        "completeness only; float32 is what this machine trains in (`hardware.fast_bf16_available`)."]
    return args


def main() -> None:
    args = parse_args()
    device, load_at_start = start_run(args)
    settings = parse_settings(args.settings)
    env = run_env_tag()
    started = time.perf_counter()
    model_directory = temporary_model_directory()
    choice = parse_model(args.model)
    args.model_path = model_path(choice, Path(model_directory.name))
    if args.profile:
        profiles = [run_profile(method, settings[0], args, device) for method in args.profile.split(",")]
        payload = {"preset": args.preset, "env": env, "args": vars(args), "profiles": profiles,
                   "machine": machine_info(load_at_start), "wall_seconds": time.perf_counter() - started}
        markdown = "\n\n".join([f"# End-to-end profile ({env})", machine_markdown(payload["machine"]),
                                *(profile_markdown(p) for p in profiles)])
        print(markdown)
        stem = report_stem(f"e2e_profile_{settings[0].label.replace(' ', '_')}", args, env)
        for path in write_report(stem, payload, markdown):
            print(f"wrote {path}")
        return

    methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown methods {unknown}; choose from {METHODS}")
    refuse_fused_off_gpu(methods, device)
    for note in args.notes:
        print(f"note: {note}", flush=True)
    results, trainable, counted_by, method_notes = [], {}, {}, {}
    for base in dict.fromkeys(s.base for s in settings):
        prepared, vocab_size = load_prepared(base, methods, args.model_path, device)
        optimizers = {method: make_optimizer(p, args.adamw) for method, p in prepared.items()}
        for method, p in prepared.items():
            trainable[method], counted_by[method], method_notes[method] = p.trainable_count, p.counted_by, p.notes
        for setting in (s for s in settings if s.base == base):
            emulated = bf16_is_emulated(setting, device)
            warmup, rounds = (1, args.bf16_rounds) if emulated else (args.warmup, args.rounds)
            result = run_setting(setting, prepared, optimizers, warmup, rounds, vocab_size, device,
                                 not args.no_memory, args.eval)
            results.append(result)
            line = "  ".join(f"{m} {result['median'][m]['total_ms']:.1f}" for m in methods)
            print(f"{setting.label}: {line}  " + "  ".join(f"{k} {v:.2f}" for k, v in result["ratios"].items()),
                  flush=True)
            report(args, env, methods, choice, trainable, counted_by, method_notes, load_at_start, results, started,
                   final=False)  # after every setting: a run cut short keeps what it measured
        del prepared, optimizers
        gc.collect()
    model_directory.cleanup()
    report(args, env, methods, choice, trainable, counted_by, method_notes, load_at_start, results, started,
           final=True)


def report_stem(prefix: str, args: argparse.Namespace, env: str) -> str:
    """The report's file name: every model but the default one is named, so runs that differ only in the model
    (the GPU suite's LLaMA-shape and SmolLM2-shape steps) do not overwrite each other's report."""
    model = "" if args.model == DEFAULT_MODEL else "_" + args.model.replace(":", "-")
    return f"{prefix}{model}_{env}{'_' + args.tag if args.tag else ''}"


def report(args: argparse.Namespace, env: str, methods: list[str], choice: ModelChoice, trainable: dict[str, int],
           counted_by: dict[str, str], method_notes: dict[str, list[str]], load_at_start: tuple[float, float, float],
           results: list[dict[str, Any]], started: float, final: bool) -> None:
    compiled_graphs = dict(torch._dynamo.utils.counters["stats"])
    payload = {"preset": args.preset, "env": env, "device": args.device, "methods": methods, "args": vars(args),
               "notes": args.notes, "model": describe_model(choice), "target_modules": TARGET_MODULES,
               "trainable": trainable, "counted_by": counted_by, "method_notes": method_notes,
               "machine": machine_info(load_at_start), "results": results, "dynamo_stats": compiled_graphs,
               "wall_seconds": time.perf_counter() - started}
    markdown = markdown_report(payload)
    stem = report_stem(f"e2e_speed_{args.preset}", args, env)
    paths = write_report(stem, payload, markdown)
    if final:
        print(markdown)
        print(f"dynamo: {compiled_graphs}")
        for path in paths:
            print(f"wrote {path}")


if __name__ == "__main__":
    main()
