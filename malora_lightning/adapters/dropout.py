"""Adapter-input dropout that is cheap on CPU.

On CPU, `torch.nn.functional.dropout` draws one Bernoulli sample per element through the scalar mt19937 path
(about 4 ns an element, 1.5 ms for a [512, 576] input): with the paper's dropout 0.05 on six adapted modules per
decoder layer, that was about a tenth of a SmolLM2 training step (BENCHMARKS.md). `LaneDropout` instead fills
int64 words with torch's generator and cuts three 16-bit lanes out of each (`random_()` gives 63 random bits, so
the top lane is skipped); an element is dropped when its lane falls below `p * 2**16`. That is 3-5x cheaper, and
the keep mask is a bool tensor, as `F.dropout` saves. The drop rate is `p` rounded to a multiple of 2**-16 (0.05
becomes 0.0500031); the scale uses that rounded rate, so the expected output is still exactly x. Other devices use
`F.dropout`, whose fused kernels are already fast.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn

LANE_LEVELS = 2 ** 16
LANES_PER_WORD = 3  # of the four int16 lanes of a `random_()` int64, the top one has its sign bit always clear


def quantized_drop_rate(p: float) -> float:
    """The drop rate `LaneDropout` realises for a requested `p` on CPU: p rounded to a multiple of 2**-16."""
    return round(p * LANE_LEVELS) / LANE_LEVELS


def keep_mask(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """Bool mask of `shape`, each element False with probability `quantized_drop_rate(p)`, independently."""
    numel = shape.numel()
    words = torch.empty(-(-numel // LANES_PER_WORD), dtype=torch.int64, device=device).random_()
    lanes = words.view(torch.int16).view(-1, 4)[:, :LANES_PER_WORD]  # the low 48 bits (little-endian)
    threshold = round(p * LANE_LEVELS) - LANE_LEVELS // 2  # int16 lanes are uniform on [-2**15, 2**15)
    return lanes.ge(threshold).reshape(-1)[:numel].view(shape)


class LaneDropout(nn.Dropout):
    """`nn.Dropout` with a CPU keep mask from 16-bit random lanes (see the module docstring); same semantics."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu" or sys.byteorder != "little" or self.inplace:
            return F.dropout(x, self.p, True, self.inplace)
        kept = 1.0 - quantized_drop_rate(self.p)
        if kept == 0.0:
            return torch.zeros_like(x)
        return torch.where(keep_mask(x.shape, self.p, x.device), x, 0.0) * (1.0 / kept)
