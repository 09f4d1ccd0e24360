"""The ``occscene-pl`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Configs are YAML files parsed in OmegaConf mode (so ``${...}`` interpolation works) and compose left to right:
``occscene-pl fit --config configs/kitti.yaml --config configs/overlays/debug.yaml``. Dataset facts
(``num_classes``, ``class_names``, ``class_weights``, ``grid_size``) are linked from the DataModule into the model,
never repeated.

``predict`` is batch generation: a :class:`~occscene_pl.writer.GenerationWriter` is added when the config has none,
and predictions are not accumulated in memory (``--return_predictions`` defaults to false).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from occscene_pl.data.base import OccupancyDataModule
from occscene_pl.module import OccSceneModule
from occscene_pl.writer import GenerationWriter

__all__ = ["OccSceneCLI", "main"]


class OccSceneCLI(LightningCLI):
    """LightningCLI that links the dataset's class list, class weights and grid into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Known only once the DataModule exists; the links also make the data instantiate first.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.class_weights", "model.class_weights", apply_on="instantiate")
        parser.link_arguments("data.grid_size", "model.grid_size", apply_on="instantiate")

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "predict":
            # Generated scenes go to disk through the writer; keeping them all in memory would only grow.
            parser.set_defaults(return_predictions=False)
        return parser

    def before_predict(self) -> None:
        if not any(isinstance(callback, GenerationWriter) for callback in self.trainer.callbacks):  # type: ignore[attr-defined]
            self.trainer.callbacks.append(GenerationWriter())  # type: ignore[attr-defined]


def main(args: ArgsType = None) -> None:
    """Entry point of ``occscene-pl``; ``args`` lets tests call it without a subprocess."""
    OccSceneCLI(
        OccSceneModule,
        OccupancyDataModule,
        subclass_mode_data=True,
        auto_configure_optimizers=False,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        args=args,
    )


if __name__ == "__main__":
    main()
