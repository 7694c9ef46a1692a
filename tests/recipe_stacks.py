"""The runs the recipes are documented for, each as the `malora` arguments that make it: one place for the tests.

`recipes/default.yaml` and `recipes/default-gpu.yaml` are complete recipes, one file each. The LLaMA-2-7B files are
fragments (a setting, a method, hardware) that only make a run when stacked, and `recipes/tasks/` holds fragments
stacked after a recipe, so their runs are read from the commands README.md lists (`malora fit -c recipes/... -c
... --trainer.default_root_dir DIR`): the tests parse and instantiate exactly what the README tells a user to type.
A run is named by its `--trainer.default_root_dir` folder.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "recipes"
SINGLE_FILE_RECIPES = ("default.yaml", "default-gpu.yaml")


def readme_stack_commands() -> list[str]:
    """README.md's stacked runs (`malora fit -c recipes/... -c ...` naming their folder), in their order."""
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [line.strip() for block in blocks for line in block.splitlines()
            if line.startswith("malora fit -c recipes/") and line.count(" -c ") >= 2
            and "--trainer.default_root_dir" in line]


def stack_args(command: str) -> list[str]:
    """The arguments after `malora fit` in one documented command."""
    words = shlex.split(command)
    assert words[:2] == ["malora", "fit"], command
    return words[2:]


def run_name(args: list[str]) -> str:
    """The run's folder name: the last path part of its `--trainer.default_root_dir`."""
    index = args.index("--trainer.default_root_dir")
    return Path(args[index + 1]).name


def stack_files(args: list[str]) -> list[str]:
    """The recipe files a run stacks (its `-c`/`--config` values), relative to the repository root."""
    return [args[index + 1] for index, word in enumerate(args) if word in ("-c", "--config")]


def rooted(args: list[str]) -> list[str]:
    """`args` with every recipe file made absolute, so they parse from any working directory."""
    return [str(ROOT / word) if index and args[index - 1] in ("-c", "--config") else word
            for index, word in enumerate(args)]


def documented_runs() -> dict[str, list[str]]:
    """Run name -> `malora fit` arguments, for every documented run (single-file recipes and README stacks)."""
    runs = {Path(name).stem: ["--config", str(RECIPE_DIR / name)] for name in SINGLE_FILE_RECIPES}
    for command in readme_stack_commands():
        args = rooted(stack_args(command))
        name = run_name(args)
        assert name not in runs, f"two documented runs write to the folder {name!r}"
        runs[name] = args
    return runs


DOCUMENTED_RUNS = documented_runs()
