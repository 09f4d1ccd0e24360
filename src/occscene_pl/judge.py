"""An independent judge of generated scenes: a frozen perceiver that never saw a generated image.

Consistency between a generated image and its occupancy is measured by perceiving the image and comparing with the
occupancy. The co-trained perceiver of a joint model is a poor judge: it is trained to read the condition back out
of ``decode(x0_hat)``, so it learns the generator's quirks and flatters it. The judge is the perceiver of a
``perception``-mode checkpoint (stage 1, trained on real images only), frozen; ``model.evaluation.judge`` names it.

The checkpoint is read with ``torch.load(weights_only=True)``: no code runs from the file. The judge's architecture
comes from the checkpoint's own saved settings (``hyper_parameters.perceiver``: a
:class:`~occscene_pl.options.PerceiverOptions`, or a dict in checkpoints written before it), without its pretrained
backbone file (the weights come from the checkpoint).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

import occscene_pl.config  # noqa: F401 - registers the option dataclasses as safe globals
from occscene_pl.models import OccupancyPerceiver
from occscene_pl.options import PerceiverOptions, coerce_options

__all__ = ["load_judge", "read_checkpoint"]


def read_checkpoint(path: str | Path, option: str) -> dict[str, Any]:
    """Load a Lightning checkpoint weights-only (tensors, builtins and our option dataclasses; no code runs).

    Args:
        path: The ``.ckpt`` file.
        option: The option that named it, for the error message.

    Raises:
        FileNotFoundError: ``path`` is not a file.
        ValueError: The file is not a checkpoint that loads weights-only.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option}: checkpoint {path} does not exist or is not a file")
    try:
        # Our option dataclasses are allowed globally (occscene_pl.config, occscene_pl.options); a `safe_globals`
        # context here would remove them again on exit.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - zip, unpickling or safety errors: one line naming the file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{option}: {path} is not a readable occscene-pl checkpoint ({reason})") from error
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{option}: {path} holds no Lightning state_dict (expected an occscene-pl .ckpt)")
    return checkpoint


def load_judge(path: str | Path, num_classes: int, grid_size: Sequence[int]) -> OccupancyPerceiver:
    """The frozen perceiver of a perception-mode checkpoint.

    Args:
        path: A ``.ckpt`` written by ``occscene-pl fit --model.mode perception``.
        num_classes: The evaluated model's classes (the judge must predict the same ones).
        grid_size: The evaluated model's grid.

    Returns:
        The judge, frozen (no gradients) and in eval mode, on the CPU.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: Not a weights-only readable checkpoint, not perception mode, or other classes / grid.
    """
    option = "model.evaluation.judge"
    checkpoint = read_checkpoint(path, option)
    hparams = checkpoint.get("hyper_parameters") or {}
    mode = hparams.get("mode")
    if mode != "perception":
        raise ValueError(
            f"{option}: {path} is a {mode!r}-mode checkpoint; the judge must be a perception-mode checkpoint (a "
            "perceiver that never saw generated images, e.g. stage 1 of make demo)"
        )
    judge_classes = int(hparams.get("num_classes", -1))
    judge_grid = tuple(int(g) for g in hparams.get("grid_size", ()))
    if judge_classes != num_classes or judge_grid != tuple(int(g) for g in grid_size):
        raise ValueError(
            f"{option}: {path} predicts {judge_classes} classes on a {judge_grid} grid, but the model has "
            f"{num_classes} classes on {tuple(grid_size)}"
        )
    try:  # a PerceiverOptions, or a plain dict in checkpoints written before the option classes
        options = coerce_options(PerceiverOptions, hparams.get("perceiver"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"{option}: {path} has unusable perceiver settings: {error}") from error
    # The weights come from the checkpoint, not from the backbone file of fit time.
    judge = OccupancyPerceiver(num_classes, judge_grid, **dataclasses.replace(options, pretrained=None).kwargs())
    prefix = "perceiver."
    state = {k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
    try:
        judge.load_state_dict(state)
    except RuntimeError as error:
        raise ValueError(f"{option}: the perceiver weights of {path} do not fit its saved settings: {error}") from error
    return judge.requires_grad_(False).eval()
