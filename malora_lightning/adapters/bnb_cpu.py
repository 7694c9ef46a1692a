"""The bitsandbytes CPU workaround, in one place for loading, injection and merging (a no-op without bitsandbytes).

CPU trap (bitsandbytes 0.50, AVX512-BF16 CPUs): the first eval-mode forward of a `Linear4bit` whose input needs no
gradient (Lightning's sanity check, `generate()`) repacks its weight for a fast inference kernel that has no autograd;
from then on the layer silently passes no gradient to its input, even in train mode. `disable_bnb_cpu_weight_packing`
turns that path off (and undoes a packing that already happened); every model we load or inject into gets it.
`import_bitsandbytes` imports it without the hub download bitsandbytes tries at import for that same packed path.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from types import ModuleType

import torch
from torch import nn


class _DropHubKernelWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Failed to load CPU gemm_4bit_forward from kernels-community")


def import_bitsandbytes() -> ModuleType:
    """Import bitsandbytes without the hub download it tries at import, and without its warning about it.

    On AVX512-BF16 CPUs bitsandbytes 0.50 asks the `kernels` package for "kernels-community/quantization-bitsandbytes"
    (a download at run time) and warns when that fails, as it does offline. That kernel only serves the packed
    inference layout `disable_bnb_cpu_weight_packing` turns off, so it would never run here: hiding `kernels` during
    the import skips the lookup and changes no result. Call it before anything (transformers) imports bitsandbytes.
    """
    if "bitsandbytes" in sys.modules:
        return sys.modules["bitsandbytes"]
    had_kernels, kernels = "kernels" in sys.modules, sys.modules.get("kernels")
    sys.modules["kernels"] = None  # `from kernels import get_kernel` raises ImportError: bitsandbytes falls back
    ops_logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    drop = _DropHubKernelWarning()
    ops_logger.addFilter(drop)
    try:
        import bitsandbytes
    finally:
        ops_logger.removeFilter(drop)
        if had_kernels:
            sys.modules["kernels"] = kernels
        else:
            del sys.modules["kernels"]
    return bitsandbytes


def disable_bnb_cpu_weight_packing(model: nn.Module) -> int:
    """Keep every bitsandbytes `Linear4bit` on its differentiable path on CPU; returns how many layers it touched."""
    try:
        bnb = import_bitsandbytes()
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse as inverse
    except ImportError:
        return 0
    touched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            quant_state = getattr(module.weight, "quant_state", None)
            if getattr(quant_state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _unpacked(inverse, module.weight.data, quant_state)
            touched += 1
    return touched


def _unpacked(inverse: Callable, weight: torch.Tensor, quant_state) -> tuple[torch.Tensor, object]:
    """bitsandbytes' `inverse` of its CPU packing re-quantizes a double-quantized absmax, but leaves a plain one in the
    packed layout ([in_features/blocksize, out_features], bfloat16): dequantized so, every block takes another block's
    scale. Put it back in the stored order (one float32 per block); the rounding to bfloat16 the packing did stays."""
    nested = quant_state.original_nested
    weight, quant_state = inverse(weight, quant_state)
    if not nested:
        quant_state.absmax = quant_state.absmax.T.reshape(-1).float()
    return weight, quant_state
