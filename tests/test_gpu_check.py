"""`.ci/gpu-check` runs on GPU machines only, which CI never has: its dry run keeps it from rotting unseen."""

import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu-check"), *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_dry_run_collects_the_cuda_tests_and_writes_the_summary(tmp_path):
    done = gpu_check(str(tmp_path), "--dry-run", "--steps", "cuda-tests,bench")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "- cuda-tests: exit 0" in summary and "- bench: exit 0" in summary and "recipe" not in summary
    # the CUDA-graph test would run inductor's kernels in Triton's interpreter, which tests/conftest.py turns on
    assert "$ TRITON_INTERPRET=0 " in (tmp_path / "cuda-tests.log").read_text()
    assert "tests/test_cuda.py" in (tmp_path / "cuda-tests.log").read_text()
    assert "benchmarks.gpu_suite" in (tmp_path / "bench.log").read_text()
    assert (tmp_path / "reports.tgz").is_file()


def test_without_a_gpu_or_with_an_unknown_step_it_stops_with_a_message(tmp_path):
    unknown = gpu_check(str(tmp_path), "--steps", "suite,tests")
    assert unknown.returncode == 2 and "--steps: unknown ['tests']" in unknown.stderr
    if not torch.cuda.is_available():
        no_gpu = gpu_check(str(tmp_path))
        assert no_gpu.returncode == 1 and "no CUDA GPU visible" in no_gpu.stderr
        assert not (tmp_path / "summary.md").exists()
