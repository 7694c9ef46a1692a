"""Every documented run (a recipe, or a README stack of recipe fragments) instantiated, not only parsed: trainer and
callbacks, data module (task names) and model (adapters).

Runs on CPU with no weights: the accelerator is forced to CPU, and the base model is a stand-in built on the meta
device from the real model's shapes (`STAND_IN_CONFIGS`), so the recipe's adapter settings are injected into the
modules they would meet in the real run. Datasets and tokenizers are not loaded: the data module resolves its task
names (built-in registry or the recipe's inline task_specs) when it is constructed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy
from transformers import AutoModelForCausalLM, LlamaConfig

import malora_lightning.module as module_file
from malora_lightning.adapters import adapter_layers, find_target_modules
from malora_lightning.adapters.layers import ADAPTER_CLASSES
from malora_lightning.cli import MALoRACLI
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule
from tests.recipe_stacks import DOCUMENTED_RUNS, ROOT, stack_files

# The shapes of the base models the recipes name, copied from each model's config.json (no download needed).
STAND_IN_CONFIGS = {
    "offline:SmolLM2-135M-Instruct": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                                          num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3),
    "meta-llama/Llama-2-7b-hf": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                     num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32),
}


class RecipeCLI(MALoRACLI):
    """`malora fit -c recipe` up to (not including) the run. Lightning refuses to build FSDP on a CPU accelerator,
    so an FSDP strategy is instantiated from the recipe (its arguments validated) and kept in `recipe_strategy`, and
    the trainer itself is built with the default strategy."""

    recipe_strategy = None

    def _instantiate_trainer(self, config, callbacks):
        self.recipe_strategy = config["strategy"]
        if isinstance(self.recipe_strategy, FSDPStrategy):
            config = {**config, "strategy": "auto"}
        return super()._instantiate_trainer(config, callbacks)


def stand_in_loader(model_name_or_path: str, **kwargs) -> torch.nn.Module:
    """Replaces `load_base_model`: the named model's architecture on the meta device (no weights, no memory)."""
    if model_name_or_path not in STAND_IN_CONFIGS:
        raise AssertionError(f"a recipe names {model_name_or_path!r}: add its shapes to STAND_IN_CONFIGS")
    config = LlamaConfig(**STAND_IN_CONFIGS[model_name_or_path], max_position_embeddings=4096)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def instantiate_recipe(args: list[str], root: Path, monkeypatch) -> RecipeCLI:
    """Build the trainer, callbacks, data module and model (adapters injected into a meta stand-in) of the run that
    `malora fit *args` makes: one recipe file or a stack of them, plus flags."""
    monkeypatch.setattr(module_file, "load_base_model", stand_in_loader)
    cli = RecipeCLI(MALoRAModule, MultiTaskDataModule, run=False, auto_configure_optimizers=False,
                    args=[*args, "--trainer.accelerator=cpu", f"--trainer.default_root_dir={root}"])
    cli.model.configure_model()
    return cli


def written_settings(args: list[str]) -> dict:
    """What the run's recipe files say, merged as the CLI merges stacked files (later files win key by key, a list
    is replaced whole), read with plain YAML: the expectations below do not come from the parser under test."""

    def merge(base: dict, update: dict) -> dict:
        merged = dict(base)
        for key, value in update.items():
            both_dicts = isinstance(value, dict) and isinstance(merged.get(key), dict)
            merged[key] = merge(merged[key], value) if both_dicts else value
        return merged

    settings: dict = {}
    for path in stack_files(args):
        settings = merge(settings, yaml.safe_load(Path(path).read_text()) or {})
    return settings


@pytest.mark.parametrize("run", sorted(DOCUMENTED_RUNS))
def test_every_recipe_instantiates(run, tmp_path, monkeypatch):
    args = DOCUMENTED_RUNS[run]
    cli = instantiate_recipe(args, tmp_path, monkeypatch)
    written = written_settings(args)

    # data: every task name resolved, in the recipe's order (training tasks, then evaluation-only ones)
    data = written.get("data", {})
    default_tasks = MultiTaskDataModule.__init__.__defaults__[0]
    expected = list(data.get("tasks", default_tasks)) + list(data.get("eval_tasks") or [])
    assert [task.name for task in cli.datamodule.tasks] == expected
    assert cli.datamodule.tokenizer_name == cli.model.hparams.model_name_or_path

    # model: the recipe's adapter on every decoder layer's targeted projections
    config = cli.model.adapter_config
    layers = adapter_layers(cli.model.model)
    assert layers and all(type(layer) is ADAPTER_CLASSES[config.method] for layer in layers.values())
    assert set(layers) == set(find_target_modules(stand_in_loader(cli.model.hparams.model_name_or_path), config))
    suffixes = {name.rsplit(".", 1)[-1] for name in layers}
    if isinstance(config.target_modules, list):
        assert suffixes == set(config.target_modules)
    assert len(layers) % STAND_IN_CONFIGS[cli.model.hparams.model_name_or_path]["num_hidden_layers"] == 0

    # trainer: the default callbacks plus the recipe's own, and the recipe's strategy
    callbacks = {type(callback).__name__ for callback in cli.trainer.callbacks}
    assert {"PerTaskMetrics", "SeesawTracker", "RoutingStats", "RunReport", "PredictionWriter"} <= callbacks
    for listed in written["trainer"].get("callbacks", []):
        assert listed["class_path"].rsplit(".", 1)[-1] in callbacks
    strategy = written["trainer"].get("strategy")
    if isinstance(strategy, dict):
        assert type(cli.recipe_strategy).__name__ == strategy["class_path"].rsplit(".", 1)[-1]


BROKEN_RUN = "commonsense-malora"


def broken_copy(tmp_path: Path, change) -> list[str]:
    """The commonsense MALoRA run's arguments, its recipe files copied with one mistake made by
    `change(files)`, where `files` maps each file's repository path to its YAML dict."""
    args = DOCUMENTED_RUNS[BROKEN_RUN]
    files = {Path(path).relative_to(ROOT).as_posix(): yaml.safe_load(Path(path).read_text())
             for path in stack_files(args)}
    change(files)
    copies = {}
    for name, recipe in files.items():
        copies[str(ROOT / name)] = path = tmp_path / "broken" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(yaml.safe_dump(recipe))
    return [str(copies.get(word, word)) for word in args]


SETTING, METHOD = "recipes/llama2-7b/commonsense.yaml", "recipes/llama2-7b/adapters/malora.yaml"


def misspell_task(files):
    files[SETTING]["data"]["tasks"][0] = "arc_chalenge"


def misname_targets(files):
    files[METHOD]["model"]["adapter"]["target_modules"] = ["wq", "wk", "wv"]  # another family's: nothing matches


def oversize_shared_rank(files):
    files[METHOD]["model"]["adapter"]["shared_rank"] = 5000  # above LLaMA-2-7B's hidden size 4096


def misspell_callback_argument(files):
    files[SETTING]["trainer"]["callbacks"][0]["init_args"] = {"save_lats": True}


@pytest.mark.parametrize(("change", "error", "named"), [
    (misspell_task, ValueError, "unknown task 'arc_chalenge'"),
    (misname_targets, ValueError, "matched no module"),
    (oversize_shared_rank, ValueError, "shared_rank"),
    (misspell_callback_argument, SystemExit, "save_lats"),
], ids=["task-name", "target-modules", "shared-rank", "callback-argument"])
def test_instantiate_recipe_catches_a_broken_recipe(change, error, named, tmp_path, monkeypatch, capsys):
    """The helper above is a real check: the recipe it is given, with one mistake, fails naming the mistake."""
    instantiate_recipe(DOCUMENTED_RUNS[BROKEN_RUN], tmp_path, monkeypatch)  # the unbroken run passes
    with pytest.raises(error) as raised:
        instantiate_recipe(broken_copy(tmp_path, change), tmp_path, monkeypatch)
    message = str(raised.value) + capsys.readouterr().err
    assert named in message
