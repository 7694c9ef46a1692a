"""The work counts behind layer_speed's floor column, against independent references: torch's own FLOP counter on
the library's layers for the multiply-adds, and the layer equations pass by pass for the elements moved."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.layer_speed import Setting, floor_elements_per_token, macs_per_token, make_inputs, prepare, \
    training_step


@pytest.mark.parametrize("x_grad", [False, True])
@pytest.mark.parametrize("method", ["lora", "molora_dense", "molora_sparse", "malora_dense", "malora_sparse"])
def test_macs_per_token_match_torch_flop_counter(method: str, x_grad: bool) -> None:
    n, m, tokens = 96, 160, 256
    setting = Setting(n, m, tokens, "fp32", x_grad)
    inputs = make_inputs(setting, torch.device("cpu"))
    step = training_step(prepare(method, inputs, 0.0, 0.01), inputs.x, inputs.upstream, inputs.autocast)
    step()  # lazy state
    with FlopCounterMode(display=False) as counter:
        step()
    adapter_macs = counter.get_total_flops() // 2 - sum(macs_per_token("base", n, m, x_grad)) * tokens
    assert adapter_macs == sum(macs_per_token(method, n, m, x_grad)) * tokens


@pytest.mark.parametrize("x_grad", [False, True])
def test_adapter_floor_counts_every_wide_pass(x_grad: bool) -> None:
    """y = base(x) + B(A x): forward reads x and read-modify-writes y; backward reads dy (for dB and A's hidden
    gradient), reads x again for dA = dh^T x (A is trained, the base weight is not), and with x.grad adds A^T dh
    into dX (read + write)."""
    n, m = 4096, 11008
    forward = n + 2 * m
    backward = m + n + (2 * n if x_grad else 0)
    assert floor_elements_per_token("lora", n, m, 512, x_grad) == forward + backward
    assert floor_elements_per_token("malora_sparse", n, m, 512, x_grad) == forward + backward
