"""Pinned first-step losses of one tiny seeded fit (as torchtune's expected-loss tests): a change to the loss, the
adapter initialisation, routing, the data order or the optimiser moves them, where "the loss fell" would not notice.

To regenerate after an intended change, run
    python -m pytest tests/test_expected_loss.py -s
and copy the printed losses into EXPECTED_LOSSES, saying in the commit which change moved them and why.
"""

from __future__ import annotations

import lightning as L
import pytest

from tests.test_module import LossRecorder, make_data, make_module, make_trainer

# steps 1-4 of the fit below (MALoRA, dense kernel, float32, the tiny Llama of tests/conftest.py `tiny_model_dir`)
EXPECTED_LOSSES = [6.131678581237793, 5.983387470245361, 5.945193290710449, 6.103833198547363]


def first_losses(model_dir, root) -> list[float]:
    L.seed_everything(1234)
    recorder = LossRecorder()
    trainer = make_trainer(root, max_steps=4, callbacks=[recorder])
    trainer.fit(make_module(model_dir), datamodule=make_data(model_dir))
    return [recorder.losses[step] for step in sorted(recorder.losses)]


def test_the_first_training_losses_are_the_pinned_ones(tiny_model_dir, tmp_path):
    losses = first_losses(tiny_model_dir, tmp_path)
    print("first losses:", losses)
    # identical in repeated runs; 1e-4 leaves room only for float summation order (another BLAS, thread count or
    # torch version), far below what one changed step, seed or token moves (the steps differ by over 1e-2)
    assert losses == pytest.approx(EXPECTED_LOSSES, rel=1e-4, abs=0)
