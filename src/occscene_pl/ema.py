"""Exponential moving average of the UNet and the aligner (``docs/design.md`` §2.6).

The average is an ``nn.ModuleDict`` of frozen copies (:func:`make_ema`) owned by the LightningModule, so its weights
are saved in checkpoints under ``ema.<name>.*``. :func:`ema_decay` is the decay schedule, :func:`update_ema` the
in-place update (once per optimizer step) and :func:`swapped_modules` the context in which sampling uses the averaged
modules instead of the live ones.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

__all__ = ["ema_decay", "make_ema", "swapped_modules", "update_ema"]


def ema_decay(update: int, max_decay: float, warmup: bool = True) -> float:
    """The decay of EMA update ``n = update`` (0-based).

    With ``warmup`` it is diffusers' ``EMAModel`` schedule: 0 for the first update (the average starts as the weights
    after one step), then ``min(max_decay, (1 + n) / (10 + n))``; without it, ``max_decay`` always.

    Args:
        update: The 0-based index of the update.
        max_decay: The decay the schedule saturates at, in ``(0, 1)``.
        warmup: Ramp the decay up as described above.

    Returns:
        The weight of the old average in this update.
    """
    if not warmup:
        return max_decay
    if update <= 0:
        return 0.0
    return min(max_decay, (1.0 + update) / (10.0 + update))


def make_ema(modules: Mapping[str, nn.Module]) -> nn.ModuleDict:
    """Frozen copies of ``modules`` (no gradients, eval mode) that start as the live weights.

    Args:
        modules: The modules to average, by name (the names of the state-dict entries).

    Returns:
        An ``nn.ModuleDict`` of deep copies.
    """
    ema = nn.ModuleDict({name: copy.deepcopy(module) for name, module in modules.items()}).requires_grad_(False)
    ema.eval()
    return ema


@torch.no_grad()
def update_ema(ema: nn.ModuleDict, live: Mapping[str, nn.Module], decay: float) -> None:
    """``average <- decay * average + (1 - decay) * live`` for every parameter, in place.

    Args:
        ema: The averages of :func:`make_ema`.
        live: The live modules, by the same names and in the same order as ``ema``.
        decay: The decay of this update (:func:`ema_decay`).
    """
    averages: list[Tensor] = [p for name in live for p in ema[name].parameters()]
    weights: list[Tensor] = [p.detach() for module in live.values() for p in module.parameters()]
    torch._foreach_lerp_(averages, [p.to(a.dtype) for p, a in zip(weights, averages, strict=True)], 1.0 - decay)


@contextmanager
def swapped_modules(swaps: Sequence[tuple[nn.Module, str, nn.Module]]) -> Iterator[None]:
    """Within the context, submodule ``name`` of every ``parent`` is ``replacement``; restored on exit.

    The swap goes through the parent's module registry, so it also works for registered submodules that plain
    attribute assignment would refuse to replace by a module of another class.

    Args:
        swaps: ``(parent, name, replacement)`` triples.
    """
    originals = [(parent, name, parent._modules[name]) for parent, name, _ in swaps]
    for parent, name, replacement in swaps:
        parent._modules[name] = replacement
    try:
        yield
    finally:
        for parent, name, original in originals:
            parent._modules[name] = original
