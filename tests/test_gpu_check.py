"""`.ci/gpu-check` runs on GPU machines only, which CI never has: its dry run keeps it from rotting unseen."""

import importlib.machinery
import importlib.util
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / ".ci" / "gpu-check"), *arguments], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_the_dry_run_runs_the_steps_in_the_order_given_collects_the_cuda_tests_and_writes_the_summary(tmp_path):
    """The steps ran in a fixed order, whatever `--steps` said."""
    done = gpu_check(str(tmp_path), "--dry-run", "--steps", "bench,cuda-tests")
    assert done.returncode == 0, done.stdout + done.stderr
    summary = (tmp_path / "summary.md").read_text()
    assert "- cuda-tests: exit 0" in summary and "- bench: exit 0" in summary and "recipe" not in summary
    assert [line.split(":")[0] for line in summary.splitlines() if line.startswith(("- bench", "- cuda-tests"))] == \
           ["- bench", "- cuda-tests"]
    # the CUDA-graph test would run inductor's kernels in Triton's interpreter, which tests/conftest.py turns on
    assert "$ TRITON_INTERPRET=0 " in (tmp_path / "cuda-tests.log").read_text()
    assert "tests/test_cuda.py" in (tmp_path / "cuda-tests.log").read_text()
    assert "benchmarks.gpu_suite" in (tmp_path / "bench.log").read_text()
    assert (tmp_path / "reports.tgz").is_file()


def test_the_last_step_gets_all_the_time_left():
    """The recipe's share (all the time left) went to the recipe step only when it ran: a run of
    `--steps cuda-tests,bench` left the bench step 75 % of the time and the rest unused."""
    module = gpu_check_module()
    assert module.shares(["cuda-tests", "bench"]) == [("cuda-tests", 0.2), ("bench", 1.0)]
    assert [share for _, share in module.shares(list(module.STEPS))] == [0.2, 0.6, 0.75, 1.0]


def test_without_a_gpu_or_with_an_unknown_step_it_stops_with_a_message(tmp_path):
    unknown = gpu_check(str(tmp_path), "--steps", "suite,tests")
    assert unknown.returncode == 2 and "--steps: unknown ['tests']" in unknown.stderr
    twice = gpu_check(str(tmp_path), "--steps", "bench,bench")
    assert twice.returncode == 2 and "--steps: bench,bench names a step twice" in twice.stderr
    if not torch.cuda.is_available():
        no_gpu = gpu_check(str(tmp_path))
        assert no_gpu.returncode == 1 and "no CUDA GPU visible" in no_gpu.stderr
        assert not (tmp_path / "summary.md").exists()


def gpu_check_module():
    """.ci/gpu-check imported as a module (the script has no .py suffix)."""
    loader = importlib.machinery.SourceFileLoader("gpu_check", str(ROOT / ".ci" / "gpu-check"))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("gpu_check", loader))
    loader.exec_module(module)
    return module


def running(pid: int) -> bool:
    """Whether process `pid` exists and is not a zombie (a killed orphan stays one where nothing reaps it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_a_step_that_times_out_leaves_no_process_behind(tmp_path):
    """A step's command that started processes of its own (pytest's xdist workers, the benchmark suite's steps):
    when it times out, they are killed with it. `subprocess.run`'s timeout killed the direct child alone, and the
    workers went on running their tests on the GPU into the next step."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, time; "
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    started = time.monotonic()
    code = gpu_check_module().run([sys.executable, "-c", script], tmp_path / "step.log", timeout=3)
    assert code == "timeout" and time.monotonic() - started < 30
    grandchild = int(pid_file.read_text())
    deadline = time.monotonic() + 5
    while running(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not running(grandchild)
