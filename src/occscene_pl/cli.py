"""The ``occscene-pl`` command: a LightningCLI with ``fit``, ``validate``, ``test`` and ``predict``.

Configs are YAML files parsed in OmegaConf mode (so ``${...}`` interpolation works) and compose left to right:
``occscene-pl fit --config configs/kitti.yaml --config configs/overlays/debug.yaml``. Dataset facts
(``num_classes``, ``class_names``, ``grid_size``) are linked from the DataModule into the model, never repeated.
"""

from __future__ import annotations

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from occscene_pl.data.base import OccupancyDataModule
from occscene_pl.placeholder import PlaceholderSSCModule

__all__ = ["OccSceneCLI", "main"]


class OccSceneCLI(LightningCLI):
    """LightningCLI that links the dataset's class list and grid into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Known only once the DataModule exists; the links also make the data instantiate first.
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("data.class_names", "model.class_names", apply_on="instantiate")
        parser.link_arguments("data.grid_size", "model.grid_size", apply_on="instantiate")


def main(args: ArgsType = None) -> None:
    """Entry point of ``occscene-pl``; ``args`` lets tests call it without a subprocess."""
    OccSceneCLI(
        PlaceholderSSCModule,
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
