"""The `malora` command: LightningCLI over `MALoRAModule` and `MultiTaskDataModule` (fit/validate/test/predict)."""

from __future__ import annotations

from lightning.pytorch.cli import LightningCLI

from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule


class MALoRACLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model, so a recipe names the model once."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")


def main(args: list[str] | None = None, model_class: type[MALoRAModule] = MALoRAModule,
         datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule) -> MALoRACLI:
    """Entry point of `malora` and `python -m malora_lightning`; user projects pass their subclasses."""
    return MALoRACLI(model_class, datamodule_class, save_config_kwargs={"overwrite": True},
                     auto_configure_optimizers=False, args=args)
