"""The camera rig of a batch of scenes (``docs/design.md`` §4, §5).

Shared by the perceiver, the aligner, sampling and the module. :class:`Camera` gathers the five values that place
a voxel grid in a set of images (``intrinsics``, ``voxel_to_camera``, ``voxel_origin``, ``voxel_size`` and the
``image_size`` the intrinsics refer to), so that they travel as one argument instead of five. This module imports no
model code, so every model may import it without an import cycle; :mod:`occscene_pl.sampling` re-exports it.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Camera"]


@dataclass
class Camera:
    """The rig of a batch of ``B`` scenes of ``V`` views each.

    Attributes:
        intrinsics: ``(B, V, 3, 3)`` pinhole matrices at ``image_size``.
        voxel_to_camera: ``(B, V, 4, 4)`` maps voxel-frame metric points into each camera.
        voxel_origin: ``(B, 3)`` corner of voxel ``[0, 0, 0]`` in the voxel frame (metres).
        voxel_size: ``(B,)`` voxel edge (metres); a scalar ``()`` tensor is shared by every scene.
        image_size: ``(H, W)`` the intrinsics refer to.

    Raises:
        ValueError: on construction, a field whose shape does not fit the others (naming the field).
    """

    intrinsics: Tensor
    voxel_to_camera: Tensor
    voxel_origin: Tensor
    voxel_size: Tensor
    image_size: tuple[int, int]

    def __post_init__(self) -> None:
        k, t = self.intrinsics, self.voxel_to_camera
        if k.dim() != 4 or tuple(k.shape[2:]) != (3, 3):
            raise ValueError(f"Camera.intrinsics must be (B, V, 3, 3), got {tuple(k.shape)}")
        b, v = int(k.shape[0]), int(k.shape[1])
        if tuple(t.shape) != (b, v, 4, 4):
            raise ValueError(f"Camera.voxel_to_camera must be ({b}, {v}, 4, 4) like intrinsics, got {tuple(t.shape)}")
        if tuple(self.voxel_origin.shape) != (b, 3):
            raise ValueError(f"Camera.voxel_origin must be ({b}, 3), got {tuple(self.voxel_origin.shape)}")
        if tuple(self.voxel_size.shape) not in ((b,), ()):
            raise ValueError(f"Camera.voxel_size must be ({b},) or a scalar, got {tuple(self.voxel_size.shape)}")
        try:
            height, width = (operator.index(s) for s in self.image_size)
        except (TypeError, ValueError):
            height = width = 0
        if height <= 0 or width <= 0:
            raise ValueError(f"Camera.image_size must be two positive ints (H, W), got {self.image_size!r}")
        self.image_size = (height, width)

    @property
    def batch_size(self) -> int:
        """``B``, the number of scenes."""
        return int(self.intrinsics.shape[0])

    @property
    def views(self) -> int:
        """``V``, the number of views of every scene."""
        return int(self.intrinsics.shape[1])

    def select(self, rows: int | Sequence[int]) -> Camera:
        """The rig of scenes ``rows`` (one index keeps a batch of one), e.g. one sample of a generated batch.

        Args:
            rows: A scene index or a sequence of them, each in ``[-B, B)``.

        Raises:
            IndexError: an index outside the batch, naming it.
        """
        index = [rows] if isinstance(rows, int) else [int(r) for r in rows]
        bad = [r for r in index if not -self.batch_size <= r < self.batch_size]
        if bad:
            raise IndexError(f"Camera.select: rows {bad} are outside the batch of {self.batch_size} scene(s)")
        picked = torch.as_tensor(index, dtype=torch.long, device=self.intrinsics.device)
        size = self.voxel_size if self.voxel_size.dim() == 0 else self.voxel_size[picked.to(self.voxel_size.device)]
        return Camera(
            self.intrinsics[picked],
            self.voxel_to_camera[picked.to(self.voxel_to_camera.device)],
            self.voxel_origin[picked.to(self.voxel_origin.device)],
            size,
            self.image_size,
        )
