"""The seeds of the random draws of training and sampling (``docs/design.md`` §2.5, §3.1).

* :func:`step_generator`: the CPU stream of one training micro-batch (timesteps, noise, text and condition dropout,
  teacher forcing), a function of the run's seed, the rank, the optimizer step and the micro-batch only.
* :func:`frame_seed`: the default sampling seed of a frame, a function of the base seed and the frame id only.
"""

from __future__ import annotations

import os
import zlib

import numpy as np
import torch

__all__ = ["frame_seed", "step_generator"]


def step_generator(rank: int, step: int, micro_batch: int = 0) -> torch.Generator:
    """The CPU random stream of one training micro-batch.

    It is seeded from ``(seed, global rank, optimizer step, micro-batch within the step)``, where ``seed`` is the
    run's ``seed_everything`` seed (``PL_GLOBAL_SEED``; ``torch.initial_seed()`` without one). So every DDP rank
    draws its own timesteps and noise (``seed_everything`` alone seeds all ranks alike), and a micro-batch's draws
    do not depend on what ran before it: a run resumed at an optimizer step draws exactly what the uninterrupted one
    did (the global step is in every checkpoint).

    Args:
        rank: The global rank of the process.
        step: The optimizer step (``global_step``) the micro-batch belongs to.
        micro_batch: Its position among the step's accumulated micro-batches.

    Returns:
        A fresh CPU ``torch.Generator``.
    """
    base = os.environ.get("PL_GLOBAL_SEED")
    seed = int(base) if base is not None else torch.initial_seed()
    words = [seed % 2**63, int(rank), int(step), int(micro_batch)]
    state = np.random.SeedSequence([abs(w) for w in words]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def frame_seed(base: int, frame_id: object) -> int:
    """The sampling seed of a frame: ``base + crc32(str(frame_id))``, independent of its batch and of the run.

    Args:
        base: The base seed (``sampling.seed``).
        frame_id: The frame's id (any value; its ``str`` is hashed).

    Returns:
        The seed of the frame's initial noise.
    """
    return int(base) + zlib.crc32(str(frame_id).encode())
