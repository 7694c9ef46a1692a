"""`malora-task-export`: one plain LoRA adapter (or one merged model) per task from a trained MoLoRA/MALoRA adapter.

For each task, the routing over its training examples (`task_profile`) fixes every routed layer's gates, and the
mixture collapses into one static low-rank update (`merge.py`): written as a PEFT LoRA folder that PEFT,
transformers and `malora --model.adapter_path` load, or with `--merge` folded into the (dequantized) base weights
and written with `save_pretrained`. The user trades per-token routing for zero inference overhead on a known task.

    malora-task-export -c recipes/default.yaml --adapter runs/.../checkpoints/adapter --output runs/task-adapters

The recipe supplies the base model and the data settings (tokenizer, prompt format, task list); further
`--model.*` / `--data.*` flags override it as for `malora`.
"""

from __future__ import annotations

import argparse
import copy
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from malora_lightning.adapters import read_adapter_folder, save_adapters
from malora_lightning.adapters.io import ADAPTER_FILES, CARD_NAME, CONFIG_NAME, library_version
from malora_lightning.adapters.merge import TaskProfile, merge_task, task_lora_model, task_profile
from malora_lightning.atomic import (
    apply_default_modes,
    check_writable,
    first_line,
    recover_replace,
    rename_into_place,
    staging_folder,
)
from malora_lightning.cli import MALoRACLI, argv_not_the_command, run_command
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.data.tasks import repeated
from malora_lightning.module import MALoRAModule
from malora_lightning.terminal import quiet_known_notes, show_library_logs
from malora_lightning.values import user_path

# named, not `__name__`: run as `python -m malora_lightning.task_export` the module is `__main__`, whose lines never
# reached the library's handler (`show_library_logs`)
logger = logging.getLogger("malora_lightning.task_export")

DEFAULT_PROFILE_EXAMPLES = 256


@dataclass(frozen=True)
class TaskExport:
    task: str
    path: Path
    profile_tokens: int  # real tokens the task's routing profile averaged over


def recipe_modules(adapter: str | Path, overrides: list[str], model_class: type[MALoRAModule] = MALoRAModule,
                   datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule,
                   ) -> tuple[MALoRAModule, MultiTaskDataModule]:
    """The module (the adapter folder's settings in it) and the data module exactly as `malora` (or `main` given
    those classes, a project's subclasses) builds them from the same recipe and flags, nothing loaded yet: what the
    export needs is checked before the base model loads."""
    with argv_not_the_command():  # the command's own flags are in sys.argv too, LightningCLI's get `args`
        cli = MALoRACLI(model_class, datamodule_class, run=False, auto_configure_optimizers=False,
                        args=[*overrides, f"--model.adapter_path={adapter}"])
    module, data = cli.model, cli.datamodule
    if not module.adapter_config.is_routed:
        raise ValueError(f"{adapter} holds a {module.adapter_config.method} adapter, which is static already: "
                         "malora-task-export collapses MoLoRA/MALoRA mixtures (merge a LoRA with merge_adapters)")
    return module, data


def build_from_recipe(adapter: str | Path, overrides: list[str], model_class: type[MALoRAModule] = MALoRAModule,
                      datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule,
                      ) -> tuple[MALoRAModule, MultiTaskDataModule]:
    """`recipe_modules`, loaded: the data module set up for fitting (train and validation splits loaded), the base
    model with the adapter folder's adapters in it."""
    module, data = recipe_modules(adapter, overrides, model_class, datamodule_class)
    data.setup("fit")
    module.configure_model()
    return module, data


def chosen_tasks(data: MultiTaskDataModule, named: list[str] | None) -> list[str]:
    """The tasks to export: those `--tasks` names, each one the recipe trains, or else every task it trains."""
    trained = [task.name for task in data.train_tasks]
    unknown = [name for name in named or [] if name not in trained]
    if unknown:
        raise ValueError(f"--tasks names {', '.join(map(repr, unknown))}, which the recipe does not train: each "
                         f"exported task needs its training examples; expected some of {', '.join(trained)}")
    return named or trained


def profile_tasks(model: nn.Module, data: MultiTaskDataModule, tasks: list[str],
                  max_examples: int = DEFAULT_PROFILE_EXAMPLES) -> dict[str, TaskProfile]:
    """Each task's routing profile over (at most `max_examples` of) its training examples."""
    return {task: task_profile(model, data.task_dataloader(task, "train", max_examples)) for task in tasks}


def task_model(model: nn.Module, profile: TaskProfile, merge: bool) -> nn.Module:
    """A copy of the routed `model` collapsed for one task: a LoRA model, or with `merge` a plain model whose
    (dequantized) base weights hold the update. `model` itself is left routed."""
    collapsed = copy.deepcopy(model)
    return merge_task(collapsed, profile, dequantize=True) if merge else task_lora_model(collapsed, profile)


def check_writable_output(output: Path) -> None:
    """Refuse an `--output` that is a file, or whose nearest existing folder cannot be written, before any work (the
    OSError would otherwise come after the base model loaded and every task was profiled, naming no flag)."""
    existing = next(folder for folder in (output, *output.parents) if folder.exists())
    if not existing.is_dir():
        raise FileExistsError(f"--output {output}: {existing} is a file; the export writes one folder per task there: "
                              "choose another --output")
    try:
        check_writable(existing)
    except OSError as error:
        raise PermissionError(f"--output {output}: {existing} cannot be written ({error.strerror}): choose another "
                              "--output") from None


def check_targets(adapter: Path, output: Path, tasks: list[str], merge: bool, overwrite: bool) -> None:
    """Refuse, before any work, an `output` that cannot be written and every `output/<task>` the export must not
    write: the adapter folder being read (or a folder inside it or holding it), a file, and a non-empty folder, unless
    `overwrite` and it is an adapter folder (then `save_adapters` replaces only its adapter files). A merged model is
    a whole folder written by one rename, so `--merge` never writes into a non-empty one. An adapter folder that a
    killed export left mid-replace is recovered first (`recover_replace`), as its next save would."""
    twice = repeated(tasks)
    if twice:
        raise ValueError(f"--tasks names {twice[0]!r} more than once: each task is exported to one folder")
    # names differing only in case are one folder where case is ignored (macOS and Windows by default): refused
    # everywhere, since an export copied there would lose one too
    folded = repeated(task.casefold() for task in tasks)
    if folded:
        first, second = [task for task in tasks if task.casefold() == folded[0]][:2]
        raise ValueError(f"tasks {first!r} and {second!r} differ only in case, and where case is ignored (macOS and "
                         f"Windows file systems, by default) {output / first} and {output / second} are one folder: "
                         f"the second export would replace the first; export them to different --output folders "
                         f"(--tasks {first}, then --tasks {second})")
    merged_before = []  # tasks whose merged model an earlier export wrote: a rerun after a stop goes on with the rest
    check_writable_output(output)
    source = adapter.resolve()
    for task in tasks:
        target = output / task
        if target.is_dir() and not merge:
            recover_replace(target)  # an export killed inside save_adapters: finish or drop its staged files first
        resolved = target.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            relation = ("is" if resolved == source else "lies inside" if source in resolved.parents else "holds")
            raise FileExistsError(f"{target} {relation} the --adapter folder {adapter}: the export would write over "
                                  f"the adapter it reads; choose an --output outside {adapter}")
        if target.exists() and not target.is_dir():
            raise FileExistsError(f"{target} is a file; the export writes a folder there: choose another --output")
        if not target.is_dir() or not any(target.iterdir()):
            continue
        if merge and (first_line(target / CARD_NAME) or "").startswith(f"{merged_card_title(task)} "):
            merged_before.append(task)
            continue
        if merge:
            raise FileExistsError(f"{target} exists and is not empty: --merge writes a whole model folder and never "
                                  "writes into an existing one (--overwrite does not apply); choose another --output")
        if not (target / CONFIG_NAME).is_file():
            raise FileExistsError(f"{target} exists and is not empty, and is not an adapter folder (no {CONFIG_NAME}): "
                                  "the export writes into a new or empty folder, or with --overwrite replaces the "
                                  "adapter files of an adapter folder; choose another --output")
        if not overwrite:
            raise FileExistsError(f"{target} exists and is not empty (an adapter folder): pass --overwrite to replace "
                                  f"its {' and '.join(ADAPTER_FILES)} (and a {CARD_NAME} that save_adapters wrote; "
                                  "other files stay), or choose another --output")
    if merged_before:
        rest = [task for task in tasks if task not in merged_before]
        go_on = f"pass --tasks {' '.join(rest)} to export the others, " if rest else ""
        raise FileExistsError(f"{', '.join(str(output / task) for task in merged_before)} already hold"
                              f"{'s' if len(merged_before) == 1 else ''} a merged model of an earlier export, and "
                              f"--merge never writes into an existing folder (--overwrite does not apply): {go_on}"
                              "delete a folder to export its task again, or choose another --output")


def export_tasks(module: MALoRAModule, data: MultiTaskDataModule, adapter: Path, output: Path, tasks: list[str],
                 merge: bool, overwrite: bool = False, max_examples: int = DEFAULT_PROFILE_EXAMPLES) -> list[TaskExport]:
    """Write `output/<task>/` for every task: a LoRA adapter folder, or with `merge` a merged model and tokenizer.
    `adapter` is the folder the module's mixture was loaded from; every target is checked first (`check_targets`)."""
    check_targets(adapter, output, tasks, merge, overwrite)
    exports = []
    for task, profile in profile_tasks(module.model, data, tasks, max_examples).items():
        target = output / task
        collapsed = task_model(module.model, profile, merge)
        base = module.settings.model_name_or_path
        origin = (f"The `{task}` task's {'model' if merge else 'LoRA'}, collapsed from the "
                  f"{module.adapter_config.method} mixture in `{adapter}` by `malora-task-export`: every layer's gates "
                  f"fixed to the task's mean routing over {profile.num_tokens} training tokens"
                  f"{f', and folded into the weights of {base}' if merge else ''}. It was not trained as it is.")
        if merge:
            _write_model_folder(collapsed, data.tokenizer, target, merged_model_card(task, origin))
        else:
            save_adapters(collapsed, target, base_model=base, origin=origin)
        logger.info("task %s: %s from %d tokens -> %s", task, "merged model" if merge else "LoRA adapter",
                    profile.num_tokens, target)
        exports.append(TaskExport(task, target, profile.num_tokens))
    return exports


def merged_card_title(task: str) -> str:
    """The first line of a merged model folder's README.md but the version, by which a rerun knows the folders an
    export wrote."""
    return f"# `{task}` model merged by malora_lightning"


def merged_model_card(task: str, origin: str) -> str:
    """A merged model folder's README.md: where it comes from, as an adapter folder's model card says, and how to
    load it."""
    return "\n".join([f"{merged_card_title(task)} {library_version()}", "", origin, "",
                      "## Loading", "", "A plain transformers model folder, with its tokenizer:", "", "```python",
                      "from transformers import AutoModelForCausalLM, AutoTokenizer",
                      'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")',
                      'tokenizer = AutoTokenizer.from_pretrained("path/to/this/folder")', "```", ""])


def _write_model_folder(model: nn.Module, tokenizer, target: Path, card: str) -> None:
    """`save_pretrained` of model and tokenizer, and the model card `card`, into a staging folder beside `target`,
    then one rename: a run killed midway leaves no half-written model at `target`, only a hidden `.<name>.*` folder,
    which the next export of that task removes (`staging_folder`)."""
    with staging_folder(target) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / CARD_NAME).write_text(card, encoding="utf-8")
        apply_default_modes(staging)  # safetensors writes the weights owner-only
        rename_into_place(staging, target)  # `target` is absent or an empty folder (checked before any work)


def main(args: list[str] | None = None, model_class: type[MALoRAModule] = MALoRAModule,
         datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule) -> list[TaskExport]:
    """Entry point of `malora-task-export`; a project whose runs use its own subclasses passes them, as to
    `malora_lightning.cli.main`, so that the recipe and flags of those runs build the same modules."""
    parser = argparse.ArgumentParser(prog="malora-task-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--adapter", required=True, help="a MoLoRA/MALoRA adapter folder (save_adapters)")
    parser.add_argument("--output", required=True, help="folder that receives one sub-folder per task")
    parser.add_argument("--tasks", nargs="+", help="tasks to export (default: every task the recipe trains)")
    parser.add_argument("--merge", action="store_true",
                        help="write merged models (base dequantized, save_pretrained) instead of LoRA folders")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the adapter files of an existing adapter folder <output>/<task> (other files "
                             "stay; never the --adapter folder, nor with --merge)")
    parser.add_argument("--profile-examples", type=int, default=DEFAULT_PROFILE_EXAMPLES,
                        help="training examples per task the routing profile averages over (default: %(default)s)")
    known, overrides = parser.parse_known_args(args)
    if known.profile_examples < 1:
        parser.error(f"--profile-examples={known.profile_examples} is invalid: expected an integer >= 1")
    if not known.output.strip():
        parser.error("--output is empty: give the folder that receives one sub-folder per task (e.g. runs/tasks)")
    # a leading `~` is the home folder, as the shell would expand it: `--output=~/tasks` or a quoted one reach us
    # unexpanded (bash expands only a word's leading `~`; cmd and PowerShell none), and wrote into a folder named `~`
    known.output = Path(user_path(known.output))
    known.adapter = user_path(known.adapter)
    quiet_known_notes()
    show_library_logs()
    read_adapter_folder(known.adapter)  # a missing or foreign folder is named before the base model loads
    module, data = recipe_modules(known.adapter, overrides, model_class, datamodule_class)
    tasks = chosen_tasks(data, known.tasks)  # so are unknown tasks and every target, before the data or model loads
    check_targets(Path(known.adapter), known.output, tasks, known.merge, known.overwrite)
    data.setup("fit")
    module.configure_model()
    return export_tasks(module, data, Path(known.adapter), known.output, tasks, known.merge, known.overwrite,
                        known.profile_examples)  # each task's folder is logged as it is written


def console_main() -> None:
    run_command("malora-task-export", main)


if __name__ == "__main__":
    console_main()
