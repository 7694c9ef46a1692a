"""Adapter-input dropout that is cheap on CPU.

On CPU, `torch.nn.functional.dropout` draws one Bernoulli sample per element through the scalar mt19937 path:
with the paper's dropout 0.05 on six adapted modules per decoder layer, a noticeable share of a SmolLM2 training
step. `LaneDropout` instead fills int64 words with 64 random bits each from torch's generator and reads every word as
four 16-bit lanes, one per element; an element is dropped when its lane falls below `p * 2**16`. It is faster than
`F.dropout` forward and backward (benchmarks/cpu_micro.py; the numbers are in BENCHMARKS.md, "What the kernel work
changed"), and the mask it keeps for backward is a bool tensor, as `F.dropout`'s is. The drop rate is `p` rounded to
a multiple of 2**-16 (0.05 becomes 0.0500031); the scale uses that rounded rate, so the expected output is still
exactly x. Other devices use `F.dropout`, whose fused kernels are already fast, except where the mixtures' kernel
keeps the keep mask itself (`keep_and_rescale`: a Bernoulli bool mask there).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

LANE_LEVELS = 2 ** 16
LANES_PER_WORD = 4  # int16 lanes in an int64 word


def dropped_levels(p: float) -> int:
    """How many of the 2**16 values of a lane drop its element: p rounded to a multiple of 2**-16, in those units."""
    return round(p * LANE_LEVELS)


def quantized_drop_rate(p: float) -> float:
    """The drop rate `LaneDropout` realises for a requested `p` on CPU."""
    return dropped_levels(p) / LANE_LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask of `shape`, each element False with probability `quantized_drop_rate(p)`, independently."""
    if dropped_levels(p) >= LANE_LEVELS:  # every lane value drops (a threshold past int16 would wrap around)
        return torch.zeros(shape, dtype=torch.bool, device=device)
    numel = shape.numel()
    # the whole int64 range: plain `random_()` leaves the sign bit clear, which would make every fourth lane biased
    words = torch.empty(-(-numel // LANES_PER_WORD), dtype=torch.int64, device=device).random_(-2 ** 63, 2 ** 63 - 1)
    threshold = dropped_levels(p) - LANE_LEVELS // 2  # int16 lanes are uniform on [-2**15, 2**15)
    return words.view(torch.int16)[:numel].ge(threshold).view(shape)


def keep_and_rescale(x: torch.Tensor, p: float) -> tuple[torch.Tensor, float]:
    """dropout(x) as a bool mask of the kept elements and the rescale 1/(1-rate): x where the mask holds, times the
    rescale, is dropout(x). Lane masks on CPU (the rate rounded as above); a Bernoulli draw elsewhere. For a caller
    that keeps the mask rather than the masked x for backward (the mixtures' kernel, which needs x itself too)."""
    if x.device.type == "cpu":
        rate, keep = quantized_drop_rate(p), keep_mask(x.shape, p, x.device)
    else:
        rate, keep = p, torch.empty(x.shape, dtype=torch.bool, device=x.device).bernoulli_(1.0 - p)
    return keep, 1.0 / (1.0 - rate) if rate < 1.0 else 1.0


def dropout_factors(x: torch.Tensor, p: float, training: bool) -> tuple[torch.Tensor, float]:
    """dropout(x) as (x with the dropped elements zeroed, the rescale 1/(1-p)); their product is dropout(x).

    A caller about to project x to a few dimensions applies the rescale there, on the small projection, instead of
    in another pass over x. Lane masks on CPU in eager mode; `F.dropout` (rescale 1) elsewhere and under
    `torch.compile`, whose generated kernels draw the mask inside a fused kernel.
    """
    if not training or p == 0.0:
        return x, 1.0
    if x.device.type != "cpu" or torch.compiler.is_compiling():
        return F.dropout(x, p, True), 1.0
    keep, rescale = keep_and_rescale(x, p)
    return torch.where(keep, x, 0.0), rescale


class LaneDropout(nn.Dropout):
    """`nn.Dropout` with a CPU keep mask from 16-bit random lanes (see the module docstring); same semantics.

    `masked` returns the two factors of the output separately, so that a caller about to project x to a few
    dimensions can apply the 1/(1-p) rescale there, on the small projection, instead of in another pass over x.
    """

    def masked(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(x with the dropped elements zeroed, the rescale); their product is `self(x)`."""
        if self.inplace and self.training:
            return F.dropout(x, self.p, True, True), 1.0
        return dropout_factors(x, self.p, self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dropped, rescale = self.masked(x)
        return dropped if rescale == 1.0 else dropped * rescale
