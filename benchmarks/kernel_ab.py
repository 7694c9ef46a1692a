"""Before/after timing of the adapter kernels: a git revision's layers.py against the working tree, interleaved.

The revision's whole `malora_lightning/adapters` package (`git archive`) is imported under a private package name,
its `malora_lightning.adapters.*` imports pointing at that copy, so its layers run its own kernels, routing and
dropout (the rest of `malora_lightning`, small helpers such as dtype names, is the working tree's). Both versions of
every method run round-robin in one process, so a noisy machine slows both alike. `--scope adapter` times the
adapter path alone (adapter output added to a fixed base result); `--scope layer` includes the frozen base layer.

    python -m benchmarks.kernel_ab --rev b772aa4 --scope adapter
    python -m benchmarks.kernel_ab --rev b772aa4 --scope layer --shapes 4096x11008 --tokens 512
"""

from __future__ import annotations

import argparse
import atexit
import importlib
import io
import shutil
import subprocess
import sys
import tarfile
import tempfile
import types
from dataclasses import asdict
from pathlib import Path

import torch

from benchmarks.common import (
    REPO_ROOT,
    add_run_arguments,
    fmt_pct,
    fmt_ratio,
    geomean,
    machine_info,
    machine_markdown,
    markdown_table,
    median,
    round_robin,
    run_env_tag,
    start_run,
    write_report,
)
from benchmarks.layer_speed import (
    DTYPES,
    LIBRARY_CLASSES,
    Setting,
    add_setting_arguments,
    make_inputs,
    parse_settings,
    prepare,
    ratios,
    training_step,
)

METHODS = ("lora", "molora_dense", "molora_sparse", "malora_dense", "malora_sparse")
PACKAGE_PATH = "malora_lightning/adapters"


def revision_classes(rev: str) -> dict[str, type[torch.nn.Module]]:
    """LoRA/MoLoRA/MALoRA layer classes as of git revision `rev`, from its own adapters package.

    The files are extracted to disk (Triton's kernels read their source back) with every `malora_lightning.adapters`
    reference renamed to a private package; that package is registered without running its `__init__`, so only
    what `layers` imports is loaded, and the old `__init__`'s imports of modules the working tree has reshaped never
    run.
    """
    name = "_kernel_ab_" + "".join(c if c.isalnum() else "_" for c in rev)
    if name not in sys.modules:
        root = Path(tempfile.mkdtemp(prefix="kernel_ab_"))
        atexit.register(shutil.rmtree, root, ignore_errors=True)
        archive = subprocess.run(["git", "archive", rev, PACKAGE_PATH], cwd=REPO_ROOT, capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(root, filter="data")
        directory = root / PACKAGE_PATH
        for source in directory.glob("*.py"):
            source.write_text(source.read_text().replace(PACKAGE_PATH.replace("/", "."), name))
        package = types.ModuleType(name)
        package.__path__ = [str(directory)]
        sys.modules[name] = package
    layers = importlib.import_module(f"{name}.layers")
    return {"lora": layers.LoRALinear, "molora": layers.MoLoRALinear, "malora": layers.MALoRALinear}


def run_setting(setting: Setting, methods: list[str], old_classes: dict, args: argparse.Namespace,
                device: torch.device) -> dict:
    inputs = make_inputs(setting, device)
    fixed_result = None
    if args.scope == "adapter":
        fixed_result = torch.randn(setting.tokens, setting.out_features, dtype=DTYPES[setting.dtype], device=device)
    steps = {}
    if args.scope == "layer":  # the frozen base alone, the floor both versions' overheads are measured against
        steps["base"] = training_step(prepare("base", inputs, args.dropout, args.aux_loss_coef), inputs.x,
                                      inputs.upstream, inputs.autocast)
    for method in methods:
        for version, classes in (("old", old_classes), ("new", LIBRARY_CLASSES)):
            prepared = prepare(method, inputs, args.dropout, args.aux_loss_coef, classes, fixed_result)
            steps[f"{version}:{method}"] = training_step(prepared, inputs.x, inputs.upstream, inputs.autocast)
    times = round_robin(steps, args.warmup, args.rounds, device)
    median_ms = {name: 1e3 * median(values) for name, values in times.items()}
    by_version = {version: {m: median_ms[f"{version}:{m}"] for m in methods} for version in ("old", "new")}
    if "base" in median_ms:
        for version_ms in by_version.values():
            version_ms["base"] = median_ms["base"]
    return {"setting": asdict(setting), "median_ms": median_ms,
            "new_over_old": {m: median_ms[f"new:{m}"] / median_ms[f"old:{m}"] for m in methods},
            "ratios": {version: ratios(version_ms) for version, version_ms in by_version.items()},
            "times_ms": {name: [1e3 * v for v in values] for name, values in times.items()}}


def fmt(ratio_name: str, value: float) -> str:
    return fmt_pct(value) if ratio_name.startswith("overhead") else fmt_ratio(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", default="HEAD", help="git revision whose kernels are the 'old' side")
    parser.add_argument("--scope", choices=("adapter", "layer"), default="adapter")
    parser.add_argument("--methods", default=",".join(METHODS))
    add_setting_arguments(parser, {"shapes": "2048x5504,5504x2048", "tokens": "512", "dtypes": "fp32",
                                   "x_grad": "yes", "warmup": 2, "rounds": 15})
    add_run_arguments(parser)
    args = parser.parse_args()
    device, load_at_start = start_run(args)
    methods = args.methods.split(",")
    old_classes = revision_classes(args.rev)
    settings = parse_settings(args)
    results = []
    for setting in settings:
        result = run_setting(setting, methods, old_classes, args, device)
        results.append(result)
        print(setting.label, "  ".join(f"{m} {result['median_ms'][f'old:{m}']:.1f}->{result['median_ms'][f'new:{m}']:.1f}"
                                       for m in methods), flush=True)
    env = run_env_tag()
    info = machine_info(load_at_start)
    rows = [[Setting(**r["setting"]).label,
             *(f"{r['median_ms'][f'old:{m}']:.1f} → {r['median_ms'][f'new:{m}']:.1f} ({r['new_over_old'][m]:.2f})"
               for m in methods)] for r in results]
    summary = [[m, f"{geomean(r['new_over_old'][m] for r in results):.2f}"] for m in methods]
    ratio_names = [name for name in results[0]["ratios"]["new"]]
    ratio_rows = [[Setting(**r["setting"]).label, *(f"{fmt(k, r['ratios']['old'][k])} → {fmt(k, r['ratios']['new'][k])}"
                                                    for k in ratio_names)] for r in results]
    markdown = "\n\n".join([
        f"# Kernel before/after: {args.rev} → working tree ({args.scope} scope, {env})",
        machine_markdown(info),
        f"- {args.warmup} warm-up + {args.rounds} rounds, old and new of every method interleaved round-robin; "
        "median ms, old → new (new/old).",
        markdown_table(["setting", *methods], rows),
        markdown_table(["method", "geomean new/old"], summary),
        "Side-by-side ratios of each version (old → new), from the same rounds:",
        markdown_table(["setting", *ratio_names], ratio_rows),
    ])
    print(markdown)
    payload = {"rev": args.rev, "scope": args.scope, "env": env, "args": vars(args), "machine": info,
               "results": results}
    stem = f"kernel_ab_{args.scope}_{env}{'_' + args.tag if args.tag else ''}"
    for path in write_report(stem, payload, markdown):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
