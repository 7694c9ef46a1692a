"""FSDP2 (`ModelParallelStrategy`) fit on 2 CPU processes; run as a script because Lightning relaunches the command.

Usage: python tests/scripts/fsdp2_fit.py <tiny model dir> <output dir>
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from tests.test_module import make_data, make_module, make_trainer  # noqa: E402

if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = make_trainer(out_dir, strategy=strategy, devices=2, max_steps=3, enable_checkpointing=True)
    trainer.fit(make_module(model_dir), make_data(model_dir))
    if dist.is_initialized():
        dist.destroy_process_group()  # avoids a flaky SIGABRT at interpreter exit with gloo
    os._exit(0)
