"""Whether bf16 is fast on a device: it decides the `"auto"` compute dtype and `AutoMixedPrecision`.

On x86 CPUs without AVX512-BF16 or AMX, PyTorch emulates bf16 matrix products, far slower than float32, so there
float32 is the fast choice; with them bf16 is the faster one. The measured rates are in BENCHMARKS.md ("Machines").
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import torch

CPU_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 AVX512-BF16 / AMX, ARMv8.6 BF16


def cpuinfo_has_bf16(cpuinfo: str) -> bool:
    """Whether the first CPU's flags (x86 "flags", ARM "Features") in /proc/cpuinfo text include a bf16 unit."""
    for line in cpuinfo.splitlines():
        if line.startswith(("flags", "Features")):
            return bool(CPU_BF16_FLAGS & set(line.split(":", 1)[1].split()))
    return False


@functools.cache
def cpu_has_fast_bf16() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    if platform.system() != "Linux" or not cpuinfo.is_file():
        return False
    return cpuinfo_has_bf16(cpuinfo.read_text())


def fast_bf16_available(device_type: str) -> bool:
    if device_type == "cuda":  # not counting emulation, which torch reports as support on pre-Ampere GPUs (T4, V100)
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return cpu_has_fast_bf16()
    return False


def resolve_compute_dtype(name: str, device_type: str) -> str:
    """"auto" becomes "bfloat16" where bf16 is fast on the device, else "float32"; other names pass through."""
    if name != "auto":
        return name
    return "bfloat16" if fast_bf16_available(device_type) else "float32"
