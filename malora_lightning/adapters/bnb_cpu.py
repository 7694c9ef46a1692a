"""The bitsandbytes CPU workaround, in one place for loading, injection and merging (a no-op without bitsandbytes).

CPU trap (bitsandbytes 0.50, AVX512-BF16 CPUs): the first eval-mode forward of a `Linear4bit` whose input needs no
gradient (Lightning's sanity check, `generate()`) repacks its weight for a fast inference kernel that has no autograd;
from then on the layer silently passes no gradient to its input, even in train mode. `disable_bnb_cpu_weight_packing`
turns that path off (and undoes a packing that already happened); every model we load or inject into gets it.
"""

from __future__ import annotations

from torch import nn


def disable_bnb_cpu_weight_packing(model: nn.Module) -> int:
    """Keep every bitsandbytes `Linear4bit` on its differentiable path on CPU; returns how many layers it touched."""
    try:
        import bitsandbytes as bnb
        from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse
    except ImportError:
        return 0
    touched = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            quant_state = getattr(module.weight, "quant_state", None)
            if getattr(quant_state, "packing_format_for_cpu", False):
                module.weight.data, module.weight.quant_state = _convert_weight_packed_for_cpu_inverse(
                    module.weight.data, quant_state)
            touched += 1
    return touched
