"""One training step of a 4-bit MALoRA model wrapped by FSDP1 as recipes/llama2-7b/hardware/fsdp-qlora.yaml wraps it
(its auto_wrap_policy classes, bf16-mixed's MixedPrecision), on 2 CPU processes (gloo), against the unwrapped model
with the same parameters in bf16. Lightning builds FSDPStrategy only on GPUs, so this wraps with torch directly."""

import importlib
import json
from pathlib import Path

import torch
import yaml
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from malora_lightning.adapters import AdapterConfig, inject_adapters, load_base_model

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama2-7b" / "hardware" / "fsdp-qlora.yaml"


def recipe_classes() -> set[type]:
    paths = yaml.safe_load(RECIPE.read_text())["trainer"]["strategy"]["init_args"]["auto_wrap_policy"]
    return {getattr(importlib.import_module(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]) for path in paths}


def build(model_dir: str) -> torch.nn.Module:
    """The recipe's base settings (nf4, bf16 compute, bf16 storage), MALoRA with non-zero B, in training mode.

    Every expert is routed (top_k = num_experts): with top-2 of 4, on an AVX2 CPU (not on an AVX512 one) all four
    adapter tensors of one layer, and only those, differed by 22-54 %, every other by at most 7 %. In that layer one
    token's second and third router logits are equal in bf16, so rounding that differs between the wrapped and the
    unwrapped model can pick either expert: a discontinuity of top-k, not of the wrapping under test."""
    torch.manual_seed(0)
    model = load_base_model(model_dir, quantization="nf4", compute_dtype="bfloat16", quant_storage="bfloat16")
    inject_adapters(model, AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4, top_k=4, dropout=0.0))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    return model.train()


def step(model: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.item()


def run(rank: int, model_dir: str, out_path: str) -> None:
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(1))  # the same batch on each rank
    reference = build(model_dir)
    for param in reference.parameters():  # what FSDP's mixed precision computes with
        if type(param).__name__ != "Params4bit":
            param.data = param.data.bfloat16()
    reference_loss = step(reference, ids)
    reference_grads = {name: param.grad.float() for name, param in reference.named_parameters()
                       if param.grad is not None}
    bf16 = torch.bfloat16
    wrapped = FullyShardedDataParallel(build(model_dir), auto_wrap_policy=ModuleWrapPolicy(recipe_classes()),
                                       use_orig_params=True, device_id=torch.device("cpu"),
                                       mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16,
                                                                      buffer_dtype=bf16))
    loss = step(wrapped, ids)
    norm_before = wrapped.clip_grad_norm_(1e-3).item()  # what MALoRAModule.configure_gradient_clipping calls
    norm_after = wrapped.clip_grad_norm_(float("inf")).item()
    for param in wrapped.parameters():  # the comparison below is of the unclipped gradients
        if param.grad is not None:
            param.grad.mul_(norm_before / norm_after)
    differences = {}
    with FullyShardedDataParallel.summon_full_params(wrapped, with_grads=True):
        for name, param in wrapped.named_parameters():
            name = name.replace("_fsdp_wrapped_module.", "")
            if param.grad is not None and name in reference_grads:
                expected = reference_grads[name]
                differences[name] = ((param.grad.float() - expected).norm() / expected.norm()).item()
    if rank == 0:
        Path(out_path).write_text(json.dumps({"loss": loss, "reference_loss": reference_loss,
                                              "norm_before_clipping": norm_before, "norm_after_clipping": norm_after,
                                              "relative_grad_differences": differences,
                                              "reference_grads": sorted(reference_grads)}))
