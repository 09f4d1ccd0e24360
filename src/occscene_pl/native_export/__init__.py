"""Native dataset layouts for generated samples, so they drop into perception training (``docs/design.md`` §9.2).

Both exporters take a ``split`` (``"train"`` to augment a training set, ``"val"`` to evaluate on generated data) and an
``image_size``: the generated views are resampled to the size the peer codebase expects (uniform scale to cover it,
then a centred crop, intrinsics adjusted to match: :func:`fit_view`).

One exporter per layout: :class:`~occscene_pl.native_export.semantic_kitti.SemanticKittiExporter` (MonoScene's
SemanticKITTI tree) and :class:`~occscene_pl.native_export.nuscenes_occupancy.NuScenesOccupancyExporter`
(OpenOccupancy's tree); each module's docstring describes its layout. :mod:`.resample` resamples the views,
:mod:`.pickles` reads info pickles back as plain data and :mod:`.common` holds the shared helpers. Every public name
is re-exported here.
"""

from __future__ import annotations

from typing import Any, Protocol

from occscene_pl.native_export.common import (
    EXPORT_SPLITS,
    check_image_size,
    check_split,
    create_exclusive,
    png_bytes,
    rebased_transform,
)
from occscene_pl.native_export.nuscenes_occupancy import (
    NUSCENES_CAMERA_KEYS,
    NUSCENES_INFO_KEYS,
    NuScenesOccupancyExporter,
    quaternion_wxyz,
)
from occscene_pl.native_export.pickles import load_info_pickle
from occscene_pl.native_export.resample import fit_view
from occscene_pl.native_export.semantic_kitti import SemanticKittiExporter
from occscene_pl.samples import GeneratedSample

__all__ = [
    "EXPORT_SPLITS",
    "NUSCENES_CAMERA_KEYS",
    "NUSCENES_INFO_KEYS",
    "NativeExporter",
    "NuScenesOccupancyExporter",
    "SemanticKittiExporter",
    "check_image_size",
    "check_split",
    "create_exclusive",
    "fit_view",
    "load_info_pickle",
    "png_bytes",
    "quaternion_wxyz",
    "rebased_transform",
]


class NativeExporter(Protocol):
    """What the prediction writer needs of an exporter: check and convert, write one frame, gather at the end."""

    name: str

    def prepare(self, sample: GeneratedSample) -> Any:
        """Check that ``sample`` fits the layout and convert it (nothing is written); ``ValueError`` if not."""
        ...

    def write(self, frame: Any) -> dict[str, Any]:
        """Write a prepared frame; return the record the writer keeps of it (read back by :meth:`matches`)."""
        ...

    def matches(self, record: Any) -> bool:
        """Whether a kept record (as :meth:`write` returned it) was written with these options."""
        ...

    def finalize(self) -> object:
        """Gather what the frames share, once all frames of all ranks are written."""
        ...
