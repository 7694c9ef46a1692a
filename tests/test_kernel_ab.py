"""benchmarks/kernel_ab.py's old side runs the revision's own adapter package, not the working tree's kernels under
the revision's layers, and layer_speed's training step runs layers whose routing context predates forwards."""

import sys

import torch

import malora_lightning.adapters.kernels as kernels
from benchmarks.kernel_ab import revision_classes
from benchmarks.layer_speed import Setting, make_inputs, prepare, training_step


def test_the_old_layers_call_the_revisions_kernels():
    classes = revision_classes("9e4ab73")
    layers = sys.modules[classes["malora"].__module__]
    assert layers.routed_output is not kernels.routed_output
    for function in (layers.routed_output, layers.dropout_factors, layers.route):
        assert function.__module__.startswith("_kernel_ab_9e4ab73."), function
        assert "malora_lightning.adapters" not in sys.modules[function.__module__].__name__


def test_a_revision_without_begin_forward_takes_training_steps():
    inputs = make_inputs(Setting(48, 40, 8, "fp32", True), torch.device("cpu"))
    classes = revision_classes("a8527d0")  # its RoutingContext has no begin_forward; its layers stash their losses
    for method in ("lora", "molora_dense", "malora_sparse"):
        prepared = prepare(method, inputs, 0.05, 0.01, classes)
        training_step(prepared, inputs.x, inputs.upstream, inputs.autocast)()
        assert all(p.grad is not None for p in prepared.trainable), method
