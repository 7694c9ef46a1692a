"""A 4-bit MALoRA module wrapped by FSDP1 as recipes/llama2-7b/hardware/fsdp-qlora.yaml has Lightning wrap it (the
LightningModule as the root, its auto_wrap_policy units, use_orig_params), on 2 CPU processes (gloo): the tensor
names its checkpoints keep and the adapter folder `save_adapters` writes, against the unwrapped module's.
Lightning builds FSDPStrategy only on GPUs, so this wraps with torch directly.

Usage: python tests/scripts/fsdp1_adapter_export.py <tiny model dir> <output dir>
"""

import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision  # noqa: E402
from torch.distributed.fsdp.wrap import ModuleWrapPolicy  # noqa: E402

from malora_lightning.adapters import AdapterConfig, adapter_state_dict, save_adapters  # noqa: E402
from malora_lightning.adapters.io import peft_key  # noqa: E402
from malora_lightning.module import MALoRAModule  # noqa: E402
from tests.scripts.fsdp1_qlora_step import recipe_classes  # noqa: E402

WORLD = 2


def build(model_dir: str) -> MALoRAModule:
    """The recipe's base settings; MALoRA with non-zero B, so that a lost or zeroed tensor shows."""
    torch.manual_seed(0)
    module = MALoRAModule(model_name_or_path=model_dir, quantization="nf4", compute_dtype="bfloat16",
                          quant_storage="bfloat16",
                          adapter=AdapterConfig(method="malora", rank=2, shared_rank=4, num_experts=4))
    module.configure_model()
    with torch.no_grad():
        for name, param in module.model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(std=0.1)
    return module


def run(rank: int, model_dir: str, out_dir: str) -> None:
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    module = build(model_dir)
    reference_keys = module.checkpoint_keys()
    reference = {key: value.detach().clone() for key, value in adapter_state_dict(module.model).items()}
    bf16 = torch.bfloat16
    FullyShardedDataParallel(module, auto_wrap_policy=ModuleWrapPolicy(recipe_classes()), use_orig_params=True,
                             device_id=torch.device("cpu"),
                             mixed_precision=MixedPrecision(param_dtype=bf16, reduce_dtype=bf16, buffer_dtype=bf16))
    wrapped_names = [name for name, _ in module.model.named_parameters() if "lora_B" in name]
    keys = module.checkpoint_keys()
    save_adapters(module.model, Path(out_dir) / "adapter", write=rank == 0)  # collective: every rank calls it
    if rank == 0:
        saved = load_file(str(Path(out_dir) / "adapter" / "adapter_model.safetensors"))
        expected = {peft_key(key): value for key, value in reference.items()}
        (Path(out_dir) / "result.json").write_text(json.dumps({
            "wrapped_name": wrapped_names[0],
            "checkpoint_keys_equal": keys == reference_keys,
            "saved_keys_equal": sorted(saved) == sorted(expected),
            "saved_tensors_equal": all(torch.equal(saved[key], value) for key, value in expected.items()
                                       if key in saved),
            "tensors": len(saved)}))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ["MASTER_PORT"] = str(29500 + os.getpid() % 1000)
    mp.spawn(run, args=(sys.argv[1], sys.argv[2]), nprocs=WORLD)
