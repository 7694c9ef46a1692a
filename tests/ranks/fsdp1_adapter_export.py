"""A 4-bit MALoRA module wrapped by FSDP1 as recipes/llama2-7b/hardware/fsdp-qlora.yaml has Lightning wrap it (the
LightningModule as the root, its auto_wrap_policy units, use_orig_params), on 2 CPU processes (gloo): the tensor
names its checkpoints keep and the adapter folder `save_adapters` writes, against the unwrapped module's.
Lightning builds FSDPStrategy only on GPUs, so this wraps with torch directly."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision
from torch.distributed.fsdp.wrap import ModuleWrapPolicy

from malora_lightning.adapters import AdapterConfig, adapter_state_dict, save_adapters
from malora_lightning.adapters import io
from malora_lightning.adapters.io import peft_key
from malora_lightning.module import MALoRAModule
from tests.ranks.fsdp1_qlora_step import recipe_classes


def build(model_dir: str, quantized: bool = True) -> MALoRAModule:
    """The recipe's base settings (or a float32 base, which FSDP1 can flatten into one unit with the adapters);
    MALoRA with non-zero B, so that a lost or zeroed tensor shows."""
    torch.manual_seed(0)
    base = dict(quantization="nf4", compute_dtype="bfloat16", quant_storage="bfloat16") if quantized \
        else dict(quantization=None)
    module = MALoRAModule(model_name_or_path=model_dir, **base,
                          adapter=AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4))
    module.configure_model()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    return module


def wrap_and_save(module: MALoRAModule, policy: ModuleWrapPolicy | None, folder: Path, rank: int,
                  root: bool = True) -> dict[str, int]:
    """Wrap, save, and count the parameter elements that are whole (not flat shards) while the save reads the
    adapters: at the most, and in the whole model."""
    bf16 = torch.bfloat16
    wrapped = FullyShardedDataParallel(module, auto_wrap_policy=policy, use_orig_params=True,
                                       device_id=torch.device("cpu"),
                                       mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16,
                                                                      buffer_dtype=bf16))
    whole = []
    reading = io.adapter_state_dict

    def counting(model):  # what gathered_adapter_state reads inside each unsharded span
        whole.append(sum(param.numel() for param in wrapped.parameters() if param.dim() > 1))
        return reading(model)

    io.adapter_state_dict = counting
    try:  # collective: every rank calls it; the root is what Lightning's FSDPStrategy wraps (trainer.strategy.model)
        save_adapters(module.model, folder, write=rank == 0, sharded_root=wrapped if root else None)
    finally:
        io.adapter_state_dict = reading
    with FullyShardedDataParallel.summon_full_params(wrapped, writeback=False):
        total = sum(param.numel() for param in wrapped.parameters() if param.dim() > 1)
    return {"most_whole_while_saving": max(whole), "model": total}


def compare(folder: Path, reference: dict[str, torch.Tensor]) -> dict[str, bool]:
    saved = load_file(str(folder / "adapter_model.safetensors"))
    # the folder stores each expert's B_t [m, r], as PEFT stores B; the layers hold it transposed
    expected = {peft_key(key): value.transpose(1, 2).contiguous() if key.endswith("lora_B") else value
                for key, value in reference.items()}
    return {"saved_keys_equal": sorted(saved) == sorted(expected),
            "saved_tensors_equal": sorted(saved) == sorted(expected)
            and all(torch.equal(saved[key], value) for key, value in expected.items()),
            "tensors": len(saved), "empty_tensors": sum(tensor.numel() == 0 for tensor in saved.values())}


def run(rank: int, model_dir: str, out_dir: str) -> None:
    out = Path(out_dir)
    result = {}
    # the recipe's units: the adapters live in the decoder-layer units
    module = build(model_dir)
    reference_keys = module.checkpoint_keys()
    reference = {key: value.detach().clone() for key, value in adapter_state_dict(module.model).items()}
    result["elements"] = wrap_and_save(module, ModuleWrapPolicy(recipe_classes()), out / "units", rank)
    result["wrapped_name"] = next(name for name, _ in module.model.named_parameters() if "lora_B" in name)
    result["checkpoint_keys_equal"] = module.checkpoint_keys() == reference_keys
    # no auto_wrap_policy (a float32 base): the root unit holds every adapter, which unsharding module.model alone
    # leaves sharded
    module = build(model_dir, quantized=False)
    unquantized_reference = {key: value.detach().clone() for key, value in adapter_state_dict(module.model).items()}
    wrap_and_save(module, None, out / "root", rank)
    module = build(model_dir, quantized=False)
    try:
        wrap_and_save(module, None, out / "root-not-passed", rank, root=False)
        result["root_not_passed_error"] = None
    except ValueError as error:
        result["root_not_passed_error"] = str(error)
    if rank == 0:
        result["units"] = compare(out / "units", reference)
        result["root_unit"] = compare(out / "root", unquantized_reference)
        result["root_not_passed_folder"] = (out / "root-not-passed").exists()
        (out / "result.json").write_text(json.dumps(result))
