"""The `malora` command: LightningCLI over `MALoRAModule` and `MultiTaskDataModule` (fit/validate/test/predict)."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.cli import LightningCLI

from malora_lightning.callbacks import PerTaskMetrics, RoutingStats, RunReport, SeesawTracker
from malora_lightning.data import MultiTaskDataModule
from malora_lightning.module import MALoRAModule

# Callbacks every run gets, each under its own config key so that one can be tuned (`--seesaw.tolerance 0.05`)
# or switched off (`--routing_stats null`) without rewriting the trainer's callback list.
DEFAULT_CALLBACKS: dict[str, type[Callback]] = {
    "per_task_metrics": PerTaskMetrics,
    "seesaw": SeesawTracker,
    "routing_stats": RoutingStats,
    "run_report": RunReport,
}


class MALoRACLI(LightningCLI):
    """LightningCLI with the tokenizer linked to the model (a recipe names the model once) and default callbacks."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("model.model_name_or_path", "data.tokenizer")
        for key, callback in DEFAULT_CALLBACKS.items():
            parser.add_lightning_class_args(callback, key, subclass_mode=True, required=False)
            parser.set_defaults({key: {"class_path": f"{callback.__module__}.{callback.__name__}"}})

    def _instantiate_trainer(self, config, callbacks):
        return super()._instantiate_trainer(config, [callback for callback in callbacks if callback is not None])


def main(args: list[str] | None = None, model_class: type[MALoRAModule] = MALoRAModule,
         datamodule_class: type[MultiTaskDataModule] = MultiTaskDataModule) -> None:
    """Entry point of `malora` and `python -m malora_lightning`; user projects pass their subclasses.

    Returns None: a console script exits with `sys.exit(main())`, and any other value would be an error exit.
    """
    MALoRACLI(model_class, datamodule_class, save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False,
              args=args)
