"""Helpers shared by the benchmark scripts: process environment, machine description, timing, memory, reports.

Benchmarks on a shared machine are noisy, so every script times its methods round-robin (each method once per
round, the order rotated between rounds) and reports medians and ratios taken from the same run.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from malora_lightning.atomic import atomic_write_text

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# glibc reads these at process start. They keep freed memory in the heap instead of returning every large buffer to
# the kernel, so kernels that allocate fresh [T*K, m] buffers do not pay page faults on every step.
TUNED_MALLOC_ENV = {
    "MALLOC_MMAP_THRESHOLD_": "4294967296",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_TOP_PAD_": "1073741824",
}
# libgomp reads this at process start: idle OpenMP workers spin instead of sleeping, so a small parallel op does not
# wait for a sleeping worker to be woken (about 16 ms per op on the 2-vCPU VM these benchmarks were written on).
OMP_ACTIVE_ENV = {"OMP_WAIT_POLICY": "ACTIVE"}
REPORTED_ENV_PREFIXES = ("MALLOC_", "OMP_", "GOMP_", "KMP_", "MKL_", "OPENBLAS_", "CUDA_VISIBLE_DEVICES")


def restart_with_env(env: dict[str, str]) -> None:
    """Re-execute the current command with `env` added unless it is already set (allocator/OpenMP read it at start)."""
    if all(os.environ.get(name) == value for name, value in env.items()):
        return
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env})


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options every benchmark script shares: device, threads, process environment, result-file tag."""
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--tuned-malloc", action="store_true", help="re-execute with glibc malloc tuned: "
                        + " ".join(f"{k}={v}" for k, v in TUNED_MALLOC_ENV.items()))
    parser.add_argument("--omp-active", action="store_true",
                        help="re-execute with OMP_WAIT_POLICY=ACTIVE (OpenMP workers spin instead of sleeping)")
    parser.add_argument("--tag", default="", help="appended to the result file names")


def start_run(args: argparse.Namespace) -> tuple[torch.device, tuple[float, float, float]]:
    """Apply the shared options (re-executing with the chosen environment); returns the device and the load average."""
    if args.tuned_malloc:
        restart_with_env(TUNED_MALLOC_ENV)
    if args.omp_active:
        restart_with_env(OMP_ACTIVE_ENV)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return torch.device(args.device), os.getloadavg()


def refuse_fused_off_gpu(methods: Iterable[str], device: torch.device) -> None:
    """Methods named `*_fused` run kernel="fused", whose Triton kernels need a CUDA device: elsewhere they would
    run the dense kernel's ops under the fused name."""
    fused = [method for method in methods if method.endswith("_fused")]
    if fused and device.type != "cuda":
        raise SystemExit(f"{fused} run Triton kernels: they need --device cuda")


def run_env_tag() -> str:
    """Name of the process environment, e.g. "tuned-malloc+omp-active-2threads" or "default-2threads"."""
    groups = {"tuned-malloc": TUNED_MALLOC_ENV, "omp-active": OMP_ACTIVE_ENV}
    active = [name for name, env in groups.items() if all(os.environ.get(k) == v for k, v in env.items())]
    return f"{'+'.join(active) or 'default'}-{torch.get_num_threads()}threads"


def command_line() -> str:
    """The command as typed, with the environment variables that matter for the numbers in front of it."""
    env = [f"{name}={value}" for name, value in sorted(os.environ.items()) if name.startswith(REPORTED_ENV_PREFIXES)]
    return shlex.join([*env, "python", *sys.orig_argv[1:]])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> list[str]:
    """The vector-extension flags that decide fp32/bf16 GEMM speed on x86."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    return sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))


def _package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine_info(load_at_start: tuple[float, float, float]) -> dict[str, Any]:
    """What the numbers depend on: hardware, library versions, threads, environment, code revision, machine load.

    `load_at_start` is `os.getloadavg()` from before the measurements; with the load at the end it shows whether
    other work shared the machine (above the benchmark's own threads, the timings are inflated and noisier).
    """
    info: dict[str, Any] = {
        "load_average_start": list(load_at_start),
        "load_average_end": list(os.getloadavg()),
        "cpu_model": _cpu_model(),
        "cpu_flags": _cpu_flags(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "bitsandbytes": _package_version("bitsandbytes"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "environment": {k: v for k, v in sorted(os.environ.items()) if k.startswith(REPORTED_ENV_PREFIXES)},
        "git_commit": _git("rev-parse", "--short", "HEAD"),
        "git_dirty_paths": (_git("status", "--porcelain", "--", "benchmarks", "malora_lightning") or "").splitlines(),
        "command": command_line(),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S"),
    }
    return info


def machine_markdown(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info["gpu"] else ", no GPU"
    lines = [
        f"- Machine: {info['cpu_model']}, {info['logical_cpus']} logical CPUs, torch threads {info['torch_threads']}, "
        f"torch CPU capability {info['torch_cpu_capability']}{gpu}",
        f"- CPU flags: {' '.join(info['cpu_flags']) or 'unknown'}",
        f"- Versions: python {info['python']}, torch {info['torch']}, bitsandbytes {info['bitsandbytes']}",
        f"- Environment: {' '.join(f'{k}={v}' for k, v in info['environment'].items()) or '(none of the tuning variables set)'}",
        f"- Code: git {info['git_commit']}{' (uncommitted changes)' if info['git_dirty_paths'] else ''}, "
        f"run {info['date_utc']} UTC",
        f"- Command: `{info['command']}`",
        f"- Load average (1/5/15 min) at start {'/'.join(f'{v:.1f}' for v in info['load_average_start'])}, "
        f"at end {'/'.join(f'{v:.1f}' for v in info['load_average_end'])} (the benchmark itself adds up to "
        f"{info['torch_threads']})",
    ]
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def round_robin(steps: dict[str, Callable[[], None]], warmup: int, rounds: int,
                device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each step, every step once per round, the order rotated each round.

    Interleaving means a slow phase of a shared machine slows every method alike, so ratios stay meaningful.
    """
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(warmup + rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            synchronize(device)
            start = time.perf_counter()
            steps[name]()
            synchronize(device)
            if round_index >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def working_steps(steps: dict[str, Callable[[], None]],
                  device: torch.device) -> tuple[dict[str, Callable[[], None]], dict[str, str]]:
    """Each step called once, as an extra warm-up: the steps that ran, and the error of each that raised, in one line.

    One method's failure (a compile or CUDA-graph error, a peer that cannot generate) then costs its own numbers only,
    not the whole setting's: on a GPU lent for minutes the other methods' timings are what the run is for."""
    ran, failed = {}, {}
    for name, step in steps.items():
        try:
            step()
            synchronize(device)
        except Exception as error:  # noqa: BLE001 - any failure of one method's code path
            failed[name] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            print(f"{name} failed, left out of the timings: {failed[name]}", flush=True)
        else:
            ran[name] = step
    return ran, failed


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def geomean(values: Iterable[float]) -> float:
    values = list(values)
    return math.exp(sum(math.log(v) for v in values) / len(values))


class PeakTensorMemory(TorchDispatchMode):
    """Peak bytes of tensor storages created while active and still alive (a tracemalloc for CPU tensors).

    Storages that existed before (parameters, inputs) are not counted; gradients and activations are. This is the
    CPU counterpart of `torch.cuda.max_memory_allocated` minus the memory in use before the step, without the
    allocator's caching and rounding. Frees are seen through a `weakref.finalize` on each new storage's Python object,
    which torch keeps alive exactly as long as the storage itself, so every op costs O(its outputs), not O(live).
    """

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, int] = {}  # data_ptr -> bytes of the storages created and not yet freed
        self.current = 0
        self.peak = 0

    def _freed(self, key: int) -> None:
        self.current -= self._live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # views and in-place results share an input's storage: nothing new was allocated for them
        inputs = {item.untyped_storage().data_ptr() for item in tree_flatten((args, kwargs))[0]
                  if isinstance(item, torch.Tensor)}
        for item in tree_flatten(out)[0]:
            if isinstance(item, torch.Tensor):
                storage = item.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key not in self._live and key not in inputs and nbytes > 0:
                    self._live[key] = nbytes
                    self.current += nbytes
                    weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.current)
        return out


def saved_tensor_bytes(run_forward: Callable[[], object], exclude: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd saves for backward during `run_forward`, not counting `exclude`."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            saved[storage.data_ptr()] = storage.nbytes()
        # not the tensor itself: a node saving its own output would then hold a Python reference to that output,
        # whose grad_fn is the node, a cycle through C++ that Python's gc cannot see, leaking the whole graph
        return tensor.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run_forward()
    return sum(saved.values())


def peak_step_bytes(step: Callable[[], None], device: torch.device) -> int:
    """Peak bytes allocated during one call of `step` beyond what was allocated before it (CUDA: the allocator's
    peak; CPU: `PeakTensorMemory`)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    tracker = PeakTensorMemory()
    with tracker:
        step()
    return tracker.peak


def fmt_ratio(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}"


def fmt_pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:+.0f}%"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(stem: str, payload: dict[str, Any], markdown: str, directory: Path = RESULTS_DIR) -> list[Path]:
    """Write `<stem>.json` and `<stem>.md` into `directory`, each atomically; returns their paths."""
    json_path, md_path = directory / f"{stem}.json", directory / f"{stem}.md"
    atomic_write_text(json_path, json.dumps(payload, indent=2) + "\n")
    atomic_write_text(md_path, markdown.rstrip() + "\n")
    return [json_path, md_path]
