"""Does `kernel="fused"` compute what `kernel="dense"` computes, on this device?

On a GPU this is the check of the compiled Triton kernels: the tests run them through Triton's interpreter on CPU,
which is not the code a GPU runs (it rounds float32 to bf16 toward zero, for one). Each case builds one random MoLoRA
or MALoRA layer twice, once per kernel, with the same weights, and takes a training step (forward, then backward of
the output, the balance statistics and the z-loss with fixed upstream gradients) with the same dropout draws; every
output and gradient must agree within the case's tolerance.

    python -m benchmarks.fused_check --device cuda     # exit 1 when a case disagrees (the GPU suite runs it first)
    TRITON_INTERPRET=1 python -m benchmarks.fused_check --device cpu
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from benchmarks.common import command_line, markdown_table, write_report
from malora_lightning.adapters import AdapterConfig, MALoRALinear, MoLoRALinear

LAYER_CLASSES: dict[str, type[nn.Module]] = {"molora": MoLoRALinear, "malora": MALoRALinear}
BLOCK_SPANNING_TOKENS = 141  # three of the kernels' 64-token blocks, the last one partial


@dataclass(frozen=True)
class Case:
    method: str
    autocast: bool  # bf16 autocast, else float32
    dropout: float = 0.0
    renormalize: bool = True
    padded: bool = False  # a left-padded attention mask: the statistics weigh real tokens only
    in_features: int = 24
    out_features: int = 20
    tokens: int = BLOCK_SPANNING_TOKENS

    @property
    def label(self) -> str:
        return (f"{self.method} {'bf16' if self.autocast else 'fp32'} dropout {self.dropout} "
                f"{'renormalised' if self.renormalize else 'plain'} gates{' padded' if self.padded else ''} "
                f"{self.in_features}->{self.out_features} T={self.tokens}")


CASES = [
    *(Case(method, autocast=False, dropout=dropout, renormalize=renormalize, padded=True)
      for method in LAYER_CLASSES for renormalize in (True, False) for dropout in (0.0, 0.5)),
    *(Case(method, autocast=True, dropout=0.05) for method in LAYER_CLASSES),
]
GPU_CASES = [Case("malora", autocast=True, dropout=0.05, in_features=1024, out_features=2048, tokens=512),
             Case("molora", autocast=True, dropout=0.05, in_features=1024, out_features=2048, tokens=512)]


def make_layer(method: str, kernel: str, in_features: int = 24, out_features: int = 20,
               device: torch.device | str = "cpu", **overrides) -> nn.Module:
    """The same random layer for either kernel: B and the router non-zero so that every path carries signal."""
    torch.manual_seed(0)
    base = nn.Linear(in_features, out_features, device=device)
    settings = dict(method=method, rank=3, shared_rank=8, num_experts=5, top_k=2, dropout=0.0, kernel=kernel,
                    router_z_loss_coef=0.01)
    settings.update(overrides)
    layer = LAYER_CLASSES[method](base, AdapterConfig(**settings), name="layer")
    with torch.no_grad():
        layer.lora_B.normal_()
        layer.router.weight.normal_()
    return layer.train()


def training_step(layer: nn.Module, x: torch.Tensor, mask: torch.Tensor | None, autocast: bool
                  ) -> dict[str, torch.Tensor]:
    """Forward and backward of the output, the balance statistics and the z-loss with fixed upstream gradients:
    the output, the statistics and every gradient, in float32."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    forward = layer.routing_context.begin_forward(mask)
    torch.manual_seed(7)  # the same dropout draws for both kernels
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast):
        out = layer(x)
    statistics = forward.statistics[0]
    upstream = torch.linspace(-1, 1, out.numel(), device=x.device).reshape(out.shape)
    balance_upstream = torch.arange(statistics.balance.numel(), dtype=torch.float32, device=x.device)
    loss = (out.float() * upstream).sum() + (statistics.balance * balance_upstream).sum() + 3 * statistics.z_loss
    loss.backward()
    result = {name: p.grad.float() for name, p in layer.named_parameters() if p.grad is not None}
    result.update(out=out.detach().float(), balance=statistics.balance.detach(), z_loss=statistics.z_loss.detach(),
                  x=x.grad.float())
    return result


@dataclass(frozen=True)
class Comparison:
    case: str
    tensor: str
    max_difference: float  # max |fused - dense|
    allowed: float  # atol + rtol * max |dense|
    ok: bool


def tolerance(autocast: bool, reference: torch.Tensor) -> tuple[float, float]:
    """(rtol, atol): float32 kernels agree to rounding; under bf16 autocast a gated hidden state may round to the
    neighbouring bf16 value (the kernels round in another order), which moves every later product by up to 2^-8."""
    if not autocast:
        return 2e-5, 2e-5
    return 2e-2, 2e-2 * reference.abs().max().item()


def compare(case: Case, device: torch.device) -> list[Comparison]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(case.tokens, case.in_features, generator=generator).to(device)
    mask = None
    if case.padded:  # two rows, the first left-padded by 9 tokens
        x = x[: case.tokens - case.tokens % 2].view(2, -1, case.in_features)
        mask = torch.ones(2, x.shape[1], device=device)
        mask[0, :9] = 0
    dense, fused = (training_step(make_layer(case.method, kernel, case.in_features, case.out_features, device,
                                             dropout=case.dropout, renormalize_top_k=case.renormalize),
                                  x, mask, case.autocast) for kernel in ("dense", "fused"))
    if dense.keys() != fused.keys():
        raise AssertionError(f"{case.label}: the kernels give gradients of different tensors: {sorted(dense)} and "
                             f"{sorted(fused)}")
    comparisons = []
    for name, reference in dense.items():
        rtol, atol = tolerance(case.autocast, reference)
        difference = (fused[name] - reference).abs()
        allowed = atol + rtol * reference.abs()
        comparisons.append(Comparison(case.label, name, difference.max().item(),
                                      (atol + rtol * reference.abs().max()).item(),
                                      bool((difference <= allowed).all())))
    return comparisons


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tag", default="fused-check")
    args = parser.parse_args()
    device = torch.device(args.device)
    from malora_lightning.adapters.kernels import fused_routing_applies
    if not fused_routing_applies(device, torch.float32):
        raise SystemExit(f"kernel='fused' runs plain ops on {device}: run on a CUDA device, or on CPU with "
                         "TRITON_INTERPRET=1 and Triton installed")
    cases = CASES + (GPU_CASES if device.type == "cuda" else [])
    comparisons = [comparison for case in cases for comparison in compare(case, device)]
    failed = [c for c in comparisons if not c.ok]
    rows = [[c.case, c.tensor, f"{c.max_difference:.3g}", f"{c.allowed:.3g}", "ok" if c.ok else "**DIFFERS**"]
            for c in comparisons]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (Triton interpreter)"
    markdown = (f"# Fused routing against the dense kernel on {device_name}\n\n`{command_line()}`\n\n"
                f"{len(comparisons) - len(failed)} of {len(comparisons)} tensors agree.\n\n"
                + markdown_table(["case", "tensor", "max |fused - dense|", "allowed", ""], rows))
    paths = write_report(f"fused_check_{device.type}_{args.tag}",
                         {"device": device_name, "comparisons": [asdict(c) for c in comparisons]}, markdown)
    print(markdown, f"\nwritten: {', '.join(map(str, paths))}", sep="\n")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
