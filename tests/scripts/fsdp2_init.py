"""FSDP2 (`ModelParallelStrategy`) on 2 CPU processes whose random states differ (as processes without a common
seed_everything do): each rank's own initial adapters, and the whole adapters FSDP2 trains from. Run as a script
because Lightning relaunches the command.

Usage: python tests/scripts/fsdp2_init.py <tiny model dir> <output dir>
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lightning.pytorch.callbacks import Callback  # noqa: E402
from lightning.pytorch.strategies import ModelParallelStrategy  # noqa: E402

from malora_lightning.adapters import adapter_state_dict  # noqa: E402
from malora_lightning.module import MALoRAModule  # noqa: E402
from tests.test_module import make_data, make_module, make_trainer  # noqa: E402


class OwnInit(MALoRAModule):
    """Saves the adapters this rank initialised, before anything else touches them."""

    def build_model(self):
        model = super().build_model()
        tensors = {key: value.detach().clone() for key, value in adapter_state_dict(model).items()}
        torch.save(tensors, Path(sys.argv[2]) / f"own{self.global_rank}.pt")
        return model


class SaveWhole(Callback):
    """Rank zero saves the whole (gathered) adapters the first step trains from."""

    def on_train_start(self, trainer, pl_module) -> None:
        adapters = adapter_state_dict(pl_module.model)
        whole = {key: value.full_tensor().detach().clone() for key, value in adapters.items()}
        if trainer.is_global_zero:
            torch.save(whole, Path(sys.argv[2]) / "whole.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir, out_dir = sys.argv[1], sys.argv[2]
    torch.manual_seed(1000 + int(os.environ.get("LOCAL_RANK", "0")))  # each rank a random state of its own
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    trainer = make_trainer(out_dir, strategy=strategy, devices=2, max_steps=1, callbacks=[SaveWhole()])
    trainer.fit(OwnInit(**make_module(model_dir).hparams), make_data(model_dir))
    if dist.is_initialized():
        dist.destroy_process_group()  # avoids a flaky SIGABRT at interpreter exit with gloo
    os._exit(0)
