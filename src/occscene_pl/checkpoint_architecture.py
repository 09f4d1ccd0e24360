"""Self-contained checkpoints: evaluate or generate from a ``.ckpt`` without the files that fit time started from.

A fit names files that only provide *initial* weights: the generator's local diffusers folder
(``model.generator.pretrained``, e.g. Stable Diffusion v1.5), the open_clip checkpoint
(``model.text_encoder.pretrained``), the timm backbone weights (``model.perceiver.pretrained``) and a stage-1
checkpoint (``model.init_from``). A checkpoint's state dict overwrites all of those weights, so ``validate``,
``test`` and ``predict`` with ``--ckpt_path`` do not need the files, with one exception: the diffusers folder also
defines the *architecture* of the UNet, the VAE and the noise schedule.

The design:

* :meth:`occscene_pl.module.OccSceneModule.on_save_checkpoint` stores :func:`model_architecture` under
  :data:`ARCHITECTURE_KEY`: the generator's UNet, VAE and scheduler configs as plain JSON-compatible values (dicts,
  lists, strings, numbers, booleans, None), so that ``torch.load(..., weights_only=True)`` reads them. Only the
  arguments the diffusers constructors accept are kept, so ``SceneGenerator(unet=..., vae=..., scheduler=...)``
  rebuilds exactly the same modules, with random weights, from them.
* :class:`occscene_pl.cli.OccSceneCLI` reads the key (:func:`read_architecture`, memory-mapped, weights only)
  before the model is instantiated, after Lightning has put the checkpoint's hyper-parameters into the config, and
  :func:`self_contained_model_config` rewrites the model config: the generator is built from the stored configs
  instead of the folder and every fit-time weights file is dropped. ``fit --ckpt_path`` (a resume) is left alone.
* A checkpoint written before the key existed still loads the architecture from ``model.generator.pretrained``;
  when that folder is missing, :func:`self_contained_model_config` fails with one line naming it.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from occscene_pl.models.generator import SceneGenerator

__all__ = [
    "ARCHITECTURE_KEY",
    "ArchitectureError",
    "architecture_entry",
    "generator_architecture",
    "model_architecture",
    "read_architecture",
    "self_contained_model_config",
]

log = logging.getLogger(__name__)

ARCHITECTURE_KEY = "occscene_architecture"
"""Checkpoint key of :func:`model_architecture` (``{"generator": {"unet", "vae", "scheduler"} or None}``)."""


# Evaluation instruments named by file (not part of the model, not in its state dict): what is lost without them.
_INSTRUMENTS = {"inception_weights": "FID/KID", "judge": "the judge's consistency scores"}


class ArchitectureError(FileNotFoundError):
    """A checkpoint needs a fit-time file that is gone (a checkpoint written before :data:`ARCHITECTURE_KEY`)."""


def _plain(value: Any, name: str) -> Any:
    """``value`` as JSON-compatible primitives; tuples become lists, numpy / torch values become Python ones."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, Mapping):
        return {str(key): _plain(item, f"{name}.{key}") for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item, f"{name}[{i}]") for i, item in enumerate(value)]
    if hasattr(value, "tolist"):  # numpy arrays and scalars, tensors
        return _plain(value.tolist(), name)
    raise TypeError(f"checkpoint architecture: {name} is a {type(value).__name__}, not a JSON-compatible value")


def _constructor_config(cls: Callable[..., Any], config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The entries of a diffusers ``config`` that ``cls.__init__`` accepts, as plain values.

    Drops diffusers' bookkeeping (``_class_name``, ``_diffusers_version``, ``_use_default_values``, ...) and keys
    a folder's config carries for another class (e.g. ``skip_prk_steps`` of SD's PNDM scheduler config, ignored when
    it is read as a ``DDPMScheduler``).
    """
    accepted = set(inspect.signature(cls).parameters)
    return {key: _plain(value, f"{name}.{key}") for key, value in config.items() if key in accepted}


def generator_architecture(generator: SceneGenerator) -> dict[str, Any]:
    """The configs that rebuild ``generator``'s modules without its ``pretrained`` folder.

    Args:
        generator: A built generator (from a folder or from configs).

    Returns:
        ``{"unet": ..., "vae": ... or None, "scheduler": ...}``, plain values, to be passed as
        ``SceneGenerator(unet=..., vae=..., scheduler=...)``.
    """
    return {
        "unet": _constructor_config(UNet2DConditionModel, generator.unet.config, "unet"),
        "vae": (_constructor_config(AutoencoderKL, generator.vae.config, "vae") if generator.vae is not None else None),
        "scheduler": _constructor_config(DDPMScheduler, generator.noise_scheduler.config, "scheduler"),
    }


def model_architecture(generator: SceneGenerator | None) -> dict[str, Any]:
    """What :data:`ARCHITECTURE_KEY` holds: the generator's :func:`generator_architecture`, None without one."""
    return {"generator": generator_architecture(generator) if generator is not None else None}


def read_architecture(path: str | Path) -> dict[str, Any] | None:
    """The :data:`ARCHITECTURE_KEY` entry of a checkpoint, None for a checkpoint written before it existed.

    The file is memory-mapped and read with ``weights_only=True`` (no code is unpickled, tensors stay on disk).

    Raises:
        ValueError: The file is not a checkpoint that ``torch.load(weights_only=True)`` reads, or the entry is not a
            dict.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001 - unpickling / zip errors of any kind: one line naming the file
        raise ValueError(f"--ckpt_path: could not read checkpoint {path}: {error}") from error
    return architecture_entry(checkpoint, path)


def architecture_entry(checkpoint: Any, path: str | Path) -> dict[str, Any] | None:
    """The :data:`ARCHITECTURE_KEY` entry of an already loaded checkpoint (see :func:`read_architecture`).

    Args:
        checkpoint: What ``torch.load`` returned for ``path``.
        path: The checkpoint file (named in the error).

    Raises:
        ValueError: The entry is present but not a dict with a ``generator`` key.
    """
    entry = checkpoint.get(ARCHITECTURE_KEY) if isinstance(checkpoint, dict) else None
    if entry is not None and not (isinstance(entry, dict) and "generator" in entry):
        raise ValueError(f"--ckpt_path: {path} has a malformed {ARCHITECTURE_KEY!r} entry: {entry!r:.200}")
    return entry


def self_contained_model_config(
    model: Mapping[str, Any], architecture: Mapping[str, Any] | None, ckpt_path: str | Path
) -> dict[str, Any]:
    """What to change in the model config of ``validate``/``test``/``predict --ckpt_path`` to need no fit-time file.

    Every weights file is dropped (``text_encoder.pretrained``, ``perceiver.pretrained``, ``init_from``: the
    checkpoint overwrites those weights). The evaluation instruments ``evaluation.inception_weights`` and
    ``evaluation.judge`` are not in the checkpoint: a present file is kept, a missing one is dropped with a warning
    (FID/KID, or the judge's scores, are then skipped; the CLI keeps a file named by an explicit
    ``--model.evaluation.*`` flag, so a missing one is an error there). With ``architecture``
    the generator is built from its configs (``pretrained`` None, ``unet``/``vae``/``scheduler`` from the
    checkpoint); without it (an older checkpoint) the generator still needs its ``pretrained`` folder.

    Args:
        model: The ``model`` config (init args of :class:`~occscene_pl.module.OccSceneModule`) as plain dicts.
        architecture: :func:`read_architecture` of the checkpoint.
        ckpt_path: The checkpoint (named in error messages).

    Returns:
        The new values by dotted key below ``model`` (e.g. ``"generator"``, ``"evaluation.inception_weights"``);
        ``model`` is not modified.

    Raises:
        ArchitectureError: An older checkpoint whose ``model.generator.pretrained`` folder does not exist.
    """
    changes: dict[str, Any] = {}
    if model.get("init_from") is not None:
        changes["init_from"] = None
    for part in ("text_encoder", "perceiver"):
        value = model.get(part)
        if isinstance(value, Mapping) and value.get("pretrained") is not None:
            changes[part] = {**copy.deepcopy(dict(value)), "pretrained": None}
    evaluation = model.get("evaluation")
    for key, skipped in _INSTRUMENTS.items():
        path = evaluation.get(key) if isinstance(evaluation, Mapping) else None
        if path is not None and not Path(path).is_file():
            log.warning("model.evaluation.%s %s does not exist here: %s are skipped", key, path, skipped)
            changes[f"evaluation.{key}"] = None
    generator = model.get("generator")
    if model.get("mode") == "perception" or not isinstance(generator, Mapping):
        return changes
    stored = architecture.get("generator") if architecture is not None else None
    if stored is not None:
        changes["generator"] = {**copy.deepcopy(dict(generator)), "pretrained": None, **copy.deepcopy(stored)}
        return changes
    folder = generator.get("pretrained")
    if folder is not None and not Path(folder).is_dir():
        raise ArchitectureError(
            f"--ckpt_path {ckpt_path} predates self-contained checkpoints (no {ARCHITECTURE_KEY!r} entry), so its "
            f"UNet/VAE/scheduler architecture is read from model.generator.pretrained={folder}, which does not exist"
        )
    return changes
