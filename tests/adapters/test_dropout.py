import math

import pytest
import torch

from malora_lightning.adapters.dropout import LaneDropout, keep_mask, quantized_drop_rate


def binomial_bound(p: float, n: int, sigmas: float = 6.0) -> float:
    return sigmas * math.sqrt(p * (1 - p) / n)


@pytest.mark.parametrize("p", [0.05, 0.3, 0.9])
def test_keep_mask_drops_at_the_quantized_rate_in_every_lane(p):
    """Every lane position (element index mod 4) drops at the same rate: a lane with a stuck bit would not."""
    torch.manual_seed(0)
    n = 4 * 300_000
    dropped = ~keep_mask(torch.Size([n]), p, torch.device("cpu"))
    rate = quantized_drop_rate(p)
    for lane in range(4):
        observed = dropped[lane::4].double().mean().item()
        assert abs(observed - rate) < binomial_bound(rate, n // 4), (lane, observed, rate)


def test_keep_mask_elements_are_independent_of_their_neighbours():
    torch.manual_seed(1)
    p, n = 0.5, 1_200_001
    dropped = (~keep_mask(torch.Size([n]), p, torch.device("cpu"))).double()
    both = (dropped[1:] * dropped[:-1]).mean().item()  # P(neighbour pair both dropped) = p^2 if independent
    assert abs(both - p * p) < binomial_bound(p * p, n)


def test_quantized_drop_rate_rounds_to_a_multiple_of_two_to_the_minus_16():
    assert quantized_drop_rate(0.05) == 3277 / 65536
    assert quantized_drop_rate(0.5) == 0.5
    assert quantized_drop_rate(1e-7) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_lane_dropout_zeroes_dropped_and_scales_kept_elements(dtype):
    """Output and input gradient follow the forward's own keep mask, replayed from the generator state.

    The mask is not read off `out != 0`: an element of x that is exactly zero gives a zero output whether kept or
    dropped, yet a kept one still passes its gradient. Older torch (seen on 2.7 and 2.11) draws CPU bf16 `randn`
    with about 0.5 % exact zeros, which made that shortcut fail on 35 of these 8256 elements; x has zeros on purpose.
    """
    torch.manual_seed(2)
    dropout = LaneDropout(0.25).train()
    x = torch.randn(64, 129, dtype=dtype)
    x[:, ::10] = 0.0
    x.requires_grad_(True)
    state = torch.get_rng_state()
    out = dropout(x)
    torch.set_rng_state(state)
    kept = keep_mask(x.shape, 0.25, x.device)
    assert out.dtype == dtype and out.shape == x.shape
    scale = 1 / (1 - quantized_drop_rate(0.25))
    torch.testing.assert_close(out, torch.where(kept, x * scale, 0.0), rtol=0, atol=0)
    assert 0.15 < 1 - kept.double().mean().item() < 0.35
    upstream = torch.randn_like(x)
    out.backward(upstream)
    torch.testing.assert_close(x.grad, torch.where(kept, upstream * scale, 0.0), rtol=0, atol=0)
    assert x.grad[:, ::10].count_nonzero() > 0  # kept zeros of x received their gradient


def test_lane_dropout_keeps_the_expectation():
    torch.manual_seed(3)
    x = torch.full((2_000_000,), 1.0, dtype=torch.float64)
    mean = LaneDropout(0.05).train()(x).mean().item()
    p = quantized_drop_rate(0.05)
    assert abs(mean - 1.0) < 6 * math.sqrt(p / (1 - p) / x.numel())


def test_lane_dropout_is_identity_in_eval_and_reproducible_under_a_seed():
    x = torch.randn(10, 33)
    dropout = LaneDropout(0.5)
    assert dropout.eval()(x) is x
    dropout.train()
    torch.manual_seed(4)
    first = dropout(x)
    torch.manual_seed(4)
    assert torch.equal(first, dropout(x))
    assert not torch.equal(first, dropout(x))


def test_lane_dropout_of_a_rate_that_rounds_to_one_drops_everything():
    out = LaneDropout(1 - 1e-7).train()(torch.ones(5, 7))
    assert torch.equal(out, torch.zeros(5, 7))


def test_lane_dropout_is_an_nn_dropout_and_falls_back_off_cpu():
    dropout = LaneDropout(0.1).train()
    assert isinstance(dropout, torch.nn.Dropout)
    out = dropout(torch.empty(4, 8, device="meta"))  # F.dropout's path
    assert out.device.type == "meta" and out.shape == (4, 8)


def test_an_inplace_lane_dropout_drops_in_place_as_nn_dropout_does():
    """`inplace=True` keeps nn.Dropout's meaning: x itself is overwritten, each element either zeroed or scaled by
    1/(1-p) (torch's own Bernoulli draw), and handed back with the rescale already in it."""
    torch.manual_seed(5)
    x = torch.rand(64, 33, dtype=torch.float64) + 1.0  # no zeros: a zero output means a dropped element
    original = x.clone()
    dropout = LaneDropout(0.5, inplace=True).train()
    dropped, rescale = dropout.masked(x)
    assert dropped is x and rescale == 1.0
    kept = x != 0
    assert torch.equal(x[kept], original[kept] * 2.0) and 0.3 < kept.double().mean().item() < 0.7
    x = original.clone()
    assert dropout(x) is x and not torch.equal(x, original)
    assert dropout.eval()(x) is x
