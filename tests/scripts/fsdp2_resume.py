"""FSDP2 (`ModelParallelStrategy`) as recipes/llama2-7b/hardware/fsdp.yaml sets it up (checkpoint files, not sharded
folders), on 2 CPU processes: a fit of 3 steps with a bf16 base, bf16-mixed and gradient clipping, then its resume
to 5 steps from the step-3 checkpoint. Run as a script because Lightning relaunches the command (once: the second
fit runs in the processes the first one started).

Usage: python tests/scripts/fsdp2_resume.py <tiny model dir> <output dir>
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from tests.test_module import make_data, make_module, make_trainer  # noqa: E402

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "llama2-7b" / "hardware" / "fsdp.yaml"

if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    settings = yaml.safe_load(RECIPE.read_text())["trainer"]["strategy"]["init_args"]
    for mode, steps, ckpt_path in (("fit", 3, None),
                                   ("resume", 5, out_dir / "fit" / "checkpoints" / "epoch=0-step=3.ckpt")):
        strategy = ModelParallelStrategy(**{**settings, "data_parallel_size": 2})
        trainer = make_trainer(out_dir / mode, strategy=strategy, devices=2, max_steps=steps,
                               enable_checkpointing=True, precision="bf16-mixed", gradient_clip_val=1.0)
        trainer.fit(make_module(model_dir, dtype="bfloat16"), make_data(model_dir), ckpt_path=ckpt_path)
        if trainer.is_global_zero:
            (out_dir / f"{mode}.json").write_text(json.dumps({"global_step": trainer.global_step}))
    if dist.is_initialized():
        dist.destroy_process_group()  # avoids a flaky SIGABRT at interpreter exit with gloo
    os._exit(0)
