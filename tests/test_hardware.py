import pytest
import torch

import malora_lightning.hardware as hardware
import malora_lightning.precision as precision
from malora_lightning.hardware import cpuinfo_has_bf16, resolve_compute_dtype
from malora_lightning.precision import AutoMixedPrecision

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16 amx_tile\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_bf16_units_are_read_from_cpuinfo():
    assert not cpuinfo_has_bf16(AVX2_ONLY)
    assert cpuinfo_has_bf16(SAPPHIRE_RAPIDS)
    assert cpuinfo_has_bf16(GRAVITON3)
    assert not cpuinfo_has_bf16("")


@pytest.mark.parametrize("fast", [True, False])
def test_auto_choices_follow_the_hardware(monkeypatch, fast):
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: fast)
    monkeypatch.setattr(precision, "fast_bf16_available", hardware.fast_bf16_available)
    assert resolve_compute_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")
    assert resolve_compute_dtype("float16", "cpu") == "float16"
    plugin = AutoMixedPrecision("cpu")
    with plugin.forward_context():
        out = torch.nn.functional.linear(torch.randn(2, 3), torch.randn(4, 3))
    assert out.dtype == (torch.bfloat16 if fast else torch.float32)
    assert plugin.precision == ("bf16-mixed" if fast else "32-true")


@pytest.mark.parametrize(("native", "fast"), [(True, True), (False, False)])
def test_a_gpu_that_only_emulates_bf16_computes_in_float32(monkeypatch, native, fast):
    """torch.cuda.is_bf16_supported() counts emulation by default, so a T4 or V100 (sm75/sm70) was given bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: native or including_emulation)
    assert hardware.fast_bf16_available("cuda") is fast
    assert resolve_compute_dtype("auto", "cuda") == ("bfloat16" if fast else "float32")


def test_the_cuda_choice_is_made_in_the_training_process_not_when_the_plugin_is_built(monkeypatch):
    """Asking CUDA about bf16 initialises it, and Lightning cannot fork processes (ddp_fork, ddp_notebook) after
    that: the plugin, built in the parent by the recipe, asked at once."""
    asked = []
    monkeypatch.setattr(precision, "fast_bf16_available", lambda device: asked.append(device) or True)
    plugin = AutoMixedPrecision("cuda")
    assert asked == []
    model = torch.nn.Linear(2, 2)
    assert plugin.connect(model, [], []) == (model, [], [])
    assert asked == ["cuda"] and plugin.enabled and plugin.precision == "bf16-mixed"
    assert asked == ["cuda"]  # once


@pytest.mark.parametrize(("system", "has_cpuinfo", "fast"), [("Darwin", True, False), ("Windows", False, False),
                                                           ("Linux", False, False), ("Linux", True, True)])
def test_without_a_linux_cpuinfo_the_cpu_counts_as_without_fast_bf16(monkeypatch, tmp_path, system, has_cpuinfo, fast):
    """macOS and Windows have no /proc/cpuinfo to read (a Linux one would be another machine's): float32 on CPU."""
    import platform

    (tmp_path / "cpuinfo").write_text(SAPPHIRE_RAPIDS)
    cpuinfo = tmp_path / "cpuinfo" if has_cpuinfo else tmp_path / "missing"
    real_path = hardware.Path
    monkeypatch.setattr(platform, "system", lambda: system)
    monkeypatch.setattr(hardware, "Path", lambda path: cpuinfo if path == "/proc/cpuinfo" else real_path(path))
    hardware.cpu_has_fast_bf16.cache_clear()
    try:
        assert hardware.cpu_has_fast_bf16() is fast
        assert resolve_compute_dtype("auto", "cpu") == ("bfloat16" if fast else "float32")
    finally:
        hardware.cpu_has_fast_bf16.cache_clear()


def test_another_device_type_counts_as_without_fast_bf16(monkeypatch):
    """Not the CPU's answer either: this runs as on a CPU with fast bf16, whatever this machine's is."""
    monkeypatch.setattr(hardware, "cpu_has_fast_bf16", lambda: True)
    assert hardware.fast_bf16_available("cpu") is True
    assert hardware.fast_bf16_available("mps") is False
    assert resolve_compute_dtype("auto", "mps") == "float32"
