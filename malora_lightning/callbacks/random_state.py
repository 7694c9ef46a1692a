"""`TrainingRandomState`: a resumed fit continues the random sequence of the uninterrupted one, exactly.

Dropout draws from the global random generators. A checkpoint stores the state the next training step starts from,
one per rank (each process draws its own dropout masks), also when it is written mid-validation (validation draws
random numbers: each of its dataloader iterators takes a seed) or inside a training step (`OnExceptionCheckpoint` on
an exception or Ctrl-C: the resumed fit runs that step again, so it gets the state the step started from), and a
resumed fit restores each rank's own right before its first training batch (creating the dataloader iterator also
draws). Validation during a fit gives the training state back at its end. `MALoRAModule` attaches it always.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_warn

from malora_lightning.rng import RandomState, capture_rng_state, gather_by_rank, restore_rng_state

CHECKPOINT_KEY = "rng_states"


class TrainingRandomState(Callback):
    def __init__(self) -> None:
        self._to_restore: RandomState | None = None  # from a checkpoint, for the next training batch
        self._next_step: RandomState | None = None  # what the next training step starts from
        self._step_start: RandomState | None = None  # what the training step under way started from

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """The state the next training step starts from. Inside a step (a checkpoint written on an exception), the
        one that step started from: Lightning resumes by running it again, and the state now has its dropout draws.
        In a resumed fit before its first batch, the state loaded for that batch."""
        progress = trainer.fit_loop.epoch_loop.batch_progress.current
        if self._to_restore is not None:
            state = self._to_restore
        elif self._step_start is not None and progress.ready > progress.processed:  # a batch fetched, not trained
            state = self._step_start
        elif trainer.validating and self._next_step is not None:
            state = self._next_step
        else:
            state = capture_rng_state()
        checkpoint[CHECKPOINT_KEY] = gather_by_rank(state)

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """This rank's state, for a resumed fit (validate, test and predict load checkpoints too, and draw nothing
        the state matters to); with another number of processes than the checkpoint's, rank r takes saved rank
        r mod saved world size (the resumed random sequence then cannot repeat the saved run's anyway)."""
        states = checkpoint.get(CHECKPOINT_KEY)
        if states is None or trainer.state.fn != TrainerFn.FITTING:
            self._to_restore = None
            return
        if isinstance(states, dict):  # a checkpoint from before the states were stored per rank: rank 0's
            states = [states]
        if len(states) != trainer.world_size:
            rank_zero_warn(f"Checkpoint {trainer.ckpt_path} holds the random states of {len(states)} processes and "
                           f"this run has {trainer.world_size}: rank r restores saved rank r mod {len(states)}'s, so "
                           "dropout will not draw the numbers the saved run would have drawn.")
        self._to_restore = states[trainer.global_rank % len(states)]

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._to_restore is not None:
            restore_rng_state(self._to_restore)
            self._to_restore = None
        self._step_start = capture_rng_state()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._next_step = capture_rng_state()
        self._step_start = None

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._next_step is not None and trainer.state.fn == TrainerFn.FITTING:
            restore_rng_state(self._next_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._next_step = None
        self._step_start = None
