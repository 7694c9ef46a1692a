"""The benchmarks' CPU memory tracker against hand-counted allocations (no timing: benchmarks are never timed tests)."""

import gc
import weakref

import torch

from benchmarks.common import PeakTensorMemory, peak_step_bytes, saved_tensor_bytes


def test_peak_counts_live_new_storages_and_sees_frees():
    tracker = PeakTensorMemory()
    with tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.empty(2000)  # 8000 bytes: live 12000
        del a  # live 8000
        c = torch.zeros(500)  # 2000 bytes: live 10000
        view = b[:10]  # a view allocates nothing
        b.add_(1.0)  # neither does an in-place op
    assert tracker.peak == 12000
    assert tracker.current == 10000
    del b, c, view
    assert tracker.current == 0


def test_storages_that_existed_before_are_not_counted():
    existing = torch.ones(10_000)
    tracker = PeakTensorMemory()
    with tracker:
        existing.mul_(2.0)
        transposed = existing.view(100, 100).t()
        total = transposed.sum()  # one 4-byte scalar
    assert tracker.peak == total.untyped_storage().nbytes() == 4


def test_tensors_saved_for_backward_stay_counted_until_the_graph_is_freed():
    x = torch.randn(1000, requires_grad=True)  # the input: not counted

    def step() -> None:
        hidden = x * 2  # 4000 bytes, saved by sin's backward
        loss = hidden.sin().sum()  # sin's output 4000 bytes (freed once summed), the loss 4 bytes
        del hidden
        loss.backward()  # x.grad 4000 bytes, plus backward temporaries

    peak = peak_step_bytes(step, torch.device("cpu"))
    # forward: hidden + sin output (freed once summed) = 8000; backward: hidden (still saved) + the loss and its
    # 4-byte seed gradient + cos(hidden) + grad * cos(hidden) = 12008, before hidden is released
    assert peak == 12008
    x.grad = None
    tracker = PeakTensorMemory()
    with tracker:
        step()
    assert tracker.peak == peak
    assert tracker.current == x.grad.untyped_storage().nbytes() == 4000  # only the gradient outlives the step


def test_saved_tensor_bytes_counts_what_backward_keeps_and_leaks_nothing():
    x = torch.randn(1000, requires_grad=True)
    freed = []

    def forward() -> None:
        hidden = x * 2  # multiplying by a Python scalar saves nothing
        out = hidden.exp()  # exp saves its own output: 4000 bytes
        (out * hidden).sum()  # the product saves both factors, out again (same storage) and hidden: 4000 more
        for tensor in (hidden, out):
            weakref.finalize(tensor.untyped_storage(), freed.append, True)

    assert saved_tensor_bytes(forward, exclude=[x]) == 8000
    gc.collect()
    assert freed == [True, True]  # the graph, saved outputs included, is gone once the forward returns
