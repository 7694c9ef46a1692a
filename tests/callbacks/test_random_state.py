"""`TrainingRandomState` under DDP: every rank resumes from its own random state, not rank 0's."""

import json
import warnings
from pathlib import Path

import pytest
import torch
import lightning as L
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint

from tests.helpers import TwoProcessDDPStrategy
from tests.test_module import LossRecorder, make_data, make_module, make_trainer


class RankLosses(Callback):
    """Each rank appends its (step, loss) pairs to its own file; at the start of a fresh fit, rank r first draws r + 1
    numbers so that the ranks' random states differ from the first step (as they come to differ in real runs, whose
    ranks draw dropout masks of different shapes)."""

    def __init__(self, out_dir: str, tag: str) -> None:
        self.out_dir, self.tag = out_dir, tag

    def on_train_start(self, trainer, pl_module) -> None:
        torch.rand(trainer.global_rank + 1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        with open(f"{self.out_dir}/{self.tag}_rank{trainer.global_rank}.jsonl", "a") as handle:
            handle.write(json.dumps([trainer.global_step, outputs["loss"].item()]) + "\n")


def rank_losses(path) -> dict[int, float]:
    return dict(tuple(json.loads(line)) for line in path.read_text().splitlines())


@pytest.mark.slow
def test_each_ddp_rank_resumes_from_its_own_random_state(tiny_model_dir, tmp_path):
    """The checkpoint held rank 0's state only and both ranks restored it: rank 1's dropout after a resume drew
    rank 0's numbers, and its losses left the uninterrupted run's."""
    settings = dict(max_steps=3, devices=2, enable_checkpointing=True)
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer = make_trainer(tmp_path / "a", strategy=TwoProcessDDPStrategy(),
                           callbacks=[checkpoints, RankLosses(str(tmp_path), "full")], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    path = tmp_path / "ckpt" / "epoch=0-step=2.ckpt"
    states = torch.load(path, weights_only=True)["rng_states"]
    assert len(states) == 2 and not torch.equal(states[0]["torch"], states[1]["torch"])

    trainer = make_trainer(tmp_path / "b", strategy=TwoProcessDDPStrategy(),
                           callbacks=[RankLosses(str(tmp_path), "resumed")], **settings)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=path)
    for rank in (0, 1):
        full, resumed = (rank_losses(tmp_path / f"{tag}_rank{rank}.jsonl") for tag in ("full", "resumed"))
        assert resumed == {3: full[3]}, rank


def test_a_resume_on_another_number_of_processes_says_so(tiny_model_dir, tmp_path):
    """A checkpoint of 2 ranks resumed by 1 process: it restores saved rank 0's state and warns with both sizes."""
    trainer = make_trainer(tmp_path, max_steps=1)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir))
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    checkpoint = torch.load(tmp_path / "one.ckpt", weights_only=True)
    (state,) = checkpoint["rng_states"]
    checkpoint["rng_states"] = [state, {"torch": torch.zeros_like(state["torch"])}]
    torch.save(checkpoint, tmp_path / "two.ckpt")
    trainer = make_trainer(tmp_path, max_steps=2)
    with pytest.warns(UserWarning, match="holds the random states of 2 processes and this run has 1"):
        trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=tmp_path / "two.ckpt")
    assert trainer.global_step == 2
    with warnings.catch_warnings(record=True) as caught:  # evaluating draws nothing the random state matters to
        warnings.simplefilter("always")
        make_trainer(tmp_path / "v", limit_val_batches=1).validate(make_module(tiny_model_dir),
                                                                   make_data(tiny_model_dir), verbose=False,
                                                                   ckpt_path=tmp_path / "two.ckpt")
    assert not [w for w in caught if "random states" in str(w.message)]


FIVE_STEPS = dict(max_steps=5, enable_checkpointing=True)


class StopInsideStep(Callback):
    """Raise in the middle of the training step after `step` steps: its forward (and dropout) has run, as when
    Ctrl-C, a SIGTERM handler or an out-of-memory error stops a step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped inside a step")


class StopAtFitStart(Callback):
    """Raise in `on_fit_start`: a resumed fit has its checkpoint's tensors back, not yet its step and optimizer."""

    def on_fit_start(self, trainer, pl_module) -> None:
        raise RuntimeError("stopped while restoring")


class StopAtTrainStart(Callback):
    def on_train_start(self, trainer, pl_module) -> None:
        raise RuntimeError("stopped before the first batch")


class StopAtBatchStart(Callback):
    """Raise as the batch after `step` steps starts, before its step: a callback passed to the Trainer runs before the
    module's `TrainingRandomState`."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped between steps")


class StopAtBatchEnd(Callback):
    """Raise as step `step` ends, after its update, before `TrainingRandomState` has seen that step end."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError("stopped between steps")


def stopped_fit(tiny_model_dir, tmp_path, stopper: Callback) -> tuple[dict[int, float], str]:
    """The losses of a seeded 5-step fit, and the OnExceptionCheckpoint file of the same fit that `stopper` stopped
    after 2 steps."""
    full = LossRecorder()
    L.seed_everything(0, verbose=False)
    make_trainer(tmp_path / "a", callbacks=[full], **FIVE_STEPS).fit(make_module(tiny_model_dir),
                                                                      make_data(tiny_model_dir))
    on_exception = OnExceptionCheckpoint(tmp_path / "ckpt")
    L.seed_everything(0, verbose=False)
    with pytest.raises(RuntimeError, match="stopped"):
        make_trainer(tmp_path / "b", callbacks=[stopper, on_exception], **FIVE_STEPS).fit(
            make_module(tiny_model_dir), make_data(tiny_model_dir))
    assert torch.load(on_exception.ckpt_path, weights_only=True)["global_step"] == 2
    return full.losses, on_exception.ckpt_path


def resumed_losses(tiny_model_dir, root, path) -> tuple[L.Trainer, dict[int, float]]:
    resumed = LossRecorder()
    trainer = make_trainer(root, callbacks=[resumed], **FIVE_STEPS)
    trainer.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=path)
    return trainer, resumed.losses


@pytest.mark.parametrize("stopper", [StopAtBatchStart, StopAtBatchEnd])
def test_a_checkpoint_written_between_steps_resumes_exactly(tiny_model_dir, tmp_path, stopper):
    """Around a step, not inside it, the checkpoint holds the state the next step starts from: stopped as a batch
    starts, the resumed fit runs that batch's step (not the one before it) again; stopped once a step's update is
    done, it goes on with the next step (it does not run that one again)."""
    full, path = stopped_fit(tiny_model_dir, tmp_path, stopper(2))
    assert resumed_losses(tiny_model_dir, tmp_path / "c", path)[1] == {step: full[step] for step in (3, 4, 5)}


def test_a_checkpoint_written_inside_a_step_resumes_exactly(tiny_model_dir, tmp_path):
    """OnExceptionCheckpoint writes its checkpoint where the exception stops the fit. Inside a training step it held
    the random state after that step's dropout draws, and the resumed fit, which runs the step again, drew other
    masks: its losses left the uninterrupted run's. A resume stopped before Lightning restored its step and optimizer
    (after the tensors, setup and `on_fit_start`) wrote step 0 and a fresh optimizer over the file it resumed from;
    one stopped after, before its first batch, wrote the random state of the moment, not the one it was to restore."""
    full, path = stopped_fit(tiny_model_dir, tmp_path, StopInsideStep(2))
    # a resume stopped before its step and optimizer are restored wrote step 0 and a fresh optimizer over the file
    saved = Path(path).read_bytes()
    with pytest.raises(RuntimeError, match="stopped while restoring"):
        make_trainer(tmp_path / "b", callbacks=[StopAtFitStart(), OnExceptionCheckpoint(tmp_path / "ckpt")],
                     **FIVE_STEPS).fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=path)
    assert Path(path).read_bytes() == saved
    # stopped once restored, before its first batch: the file is written again, with the state that batch starts from
    with pytest.raises(RuntimeError, match="stopped before the first batch"):
        make_trainer(tmp_path / "b", callbacks=[StopAtTrainStart(), OnExceptionCheckpoint(tmp_path / "ckpt")],
                     **FIVE_STEPS).fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=path)
    assert Path(path).read_bytes() != saved

    trainer, losses = resumed_losses(tiny_model_dir, tmp_path / "c", path)
    assert losses == {step: full[step] for step in (3, 4, 5)}
    trainer.save_checkpoint(tmp_path / "five.ckpt")
    done = make_trainer(tmp_path / "d", **FIVE_STEPS)  # a fit resumed at its max_steps restores and trains nothing
    done.fit(make_module(tiny_model_dir), make_data(tiny_model_dir), ckpt_path=tmp_path / "five.ckpt")
    done.save_checkpoint(tmp_path / "again.ckpt")
    assert torch.load(tmp_path / "again.ckpt", weights_only=True)["global_step"] == 5


class FakeCuda:
    """torch.cuda of a process on device `current` of `visible` GPUs, each with its own generator state."""

    def __init__(self, visible: int, current: int) -> None:
        self.states = [torch.tensor([index], dtype=torch.uint8) for index in range(visible)]
        self.current = current

    def install(self, monkeypatch) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: self.current)
        monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: self.states[self.current].clone())
        monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: [state.clone() for state in self.states])

        def set_state(state):
            self.states[self.current] = state.clone()

        def set_all(states):
            for index, state in enumerate(states):
                self.states[index] = state.clone()  # IndexError past the visible devices, as torch raises

        monkeypatch.setattr(torch.cuda, "set_rng_state", set_state)
        monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)


def test_the_cuda_state_is_the_current_devices_and_restores_where_fewer_gpus_are_visible(monkeypatch):
    """Every visible GPU's state was saved, and restoring it where fewer were visible raised IndexError."""
    from malora_lightning.rng import capture_rng_state, restore_rng_state

    saved_on = FakeCuda(visible=4, current=2)
    saved_on.install(monkeypatch)
    state = capture_rng_state()
    assert torch.equal(state["cuda"], torch.tensor([2], dtype=torch.uint8))

    resumed_on = FakeCuda(visible=1, current=0)
    resumed_on.install(monkeypatch)
    restore_rng_state(state)
    assert resumed_on.states == [torch.tensor([2], dtype=torch.uint8)]
    restore_rng_state({"torch": state["torch"], "cuda": [torch.tensor([7], dtype=torch.uint8)] * 4})  # older format
    assert resumed_on.states == [torch.tensor([7], dtype=torch.uint8)]
    on_device_2 = FakeCuda(visible=3, current=2)  # an older checkpoint saved where only one GPU was visible
    on_device_2.install(monkeypatch)
    restore_rng_state({"torch": state["torch"], "cuda": [torch.tensor([7], dtype=torch.uint8)]})
    assert on_device_2.states == [torch.tensor([index], dtype=torch.uint8) for index in range(3)]  # none to restore
