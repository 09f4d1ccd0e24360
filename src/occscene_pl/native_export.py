"""Native dataset layouts for generated samples, so they drop into perception training (``docs/design.md`` §9.2).

Both exporters take a ``split`` (``"train"`` to augment a training set, ``"val"`` to evaluate on generated data) and an
``image_size``: the generated views are resampled to the size the peer codebase expects (uniform scale to cover it,
then a centred crop, intrinsics adjusted to match: :func:`fit_view`).

:class:`SemanticKittiExporter` writes the layout that MonoScene's ``KittiDataset`` and
:class:`~occscene_pl.data.semantic_kitti.SemanticKittiDataset` read::

    <root>/dataset/sequences/<SS>/calib.txt              P2 = [K | 0], Tr = voxel_to_camera (re-based, see below)
    <root>/dataset/sequences/<SS>/.occscene_camera       the same text: which camera claimed the sequence
    <root>/dataset/sequences/<SS>/image_2/<NNNNNN>.png   view 0 at ``image_size`` (default: the generated size)
    <root>/dataset/sequences/<SS>/voxels/<NNNNNN>.label  uint16 raw ids (train id -> learning_map_inv; 255 -> 0)
    <root>/dataset/sequences/<SS>/voxels/<NNNNNN>.invalid  bit-packed, the voxels labelled 255 (unknown)
    <root>/dataset/sequences/<SS>/voxels/<NNNNNN>.occluded bit-packed, all zero
    <root>/dataset/sequences/<SS>/voxels/<NNNNNN>.bin    bit-packed occupancy (label not 0 and not 255)
    <root>/frame_ids/<NNNNNN>.txt                        the generated frame_id that owns stem NNNNNN

**Stems.** A frame_id's stem is ``sha256(frame_id) mod 10**6`` as six digits; when another frame_id already owns
that stem (``frame_ids/NNNNNN.txt``), the next stem up is tried (linear probing, wrapping at 10**6). Ownership is
claimed by an atomic exclusive create (``os.link``), so concurrent ranks never share a stem, and a frame_id keeps its
stem on re-runs. Stems are unique across sequences. The reader names exported frames ``"<SS>_<NNNNNN>"``;
``frame_ids/NNNNNN.txt`` (or the sample's ``meta.json``) maps them back.

**Split and sequences.** ``calib.txt`` is per sequence, so every distinct camera gets its own sequence, taken in
order from ``sequences``: by default MonoScene's sequences of the split (``train``: 00-07, 09, 10; ``val``: 08) and
then 22, 23, ... (outside MonoScene's splits, which neither its ``preprocess.py``, limited to 00-10, nor its
``KittiDataset`` read; our reader does with ``sequences=["22"]``). A sequence is claimed by an exclusive create of
``<SS>/.occscene_camera`` (the calib text), then ``calib.txt`` is written from it; cameras match when ``P2`` and
``Tr`` agree to 1e-9. MonoScene's ``KittiDataset`` opens ``calib.txt`` of every sequence of its split, so the split's
other sequences get a placeholder ``calib.txt`` (a copy of a written camera's; no claim) and an empty ``voxels/``:
they hold no frames, and a further camera claims and overwrites them. A frame_id re-written through another camera
or split leaves its old sequence.

**Camera.** The reader takes ``intrinsics = P2[:3, :3]`` and ``voxel_to_camera = Tr`` and places voxel ``[0, 0, 0]``
at its fixed ``VOXEL_ORIGIN``; a sample whose ``voxel_origin`` differs gets ``Tr = voxel_to_camera @
translate(voxel_origin - VOXEL_ORIGIN)``, so every voxel projects to the same pixel as in the sample. MonoScene crops
the top-left 1220 x 370 pixels of every image and computes its field-of-view masks for exactly that size, so export
for MonoScene with ``image_size=(1220, 370)`` (a 1024 x 320 image is scaled by 1220 / 1024 and 5 rows are cropped
off the top and 6 off the bottom). Our reader reads exports back with ``crop_size=(W, H)`` of the written images
(the record's ``crop_size``). Requirements: one view, a grid with ``X == Y == 8 * Z`` and ``voxel_size == 51.2 / X``
(the KITTI extent; MonoScene itself needs 256 x 256 x 32), train ids in ``0..19`` or 255.

:class:`NuScenesOccupancyExporter` writes the OpenOccupancy layout; ``<root>`` plays the role of OpenOccupancy's
``data/`` folder (its configs read ``./data/nuscenes``, ``./data/nuScenes-Occupancy`` and ``./data/depth_gt``), and
:class:`~occscene_pl.data.nuscenes_occupancy.NuScenesOccupancyDataset` reads ``<root>/nuscenes``::

    <root>/nuscenes/samples/<CAM_*>/<token>__<CAM_*>.png                 the six views at ``image_size``
    <root>/nuscenes/samples/LIDAR_TOP/<lidar_token>.pcd.bin             placeholder: an empty point cloud
    <root>/nuscenes/lidarseg/v1.0-trainval/<lidar_token>_lidarseg.bin   placeholder: labels of no points
    <root>/depth_gt/<token>__<CAM_*>.png.bin                             placeholder: no depth points (float32 N x 3)
    <root>/nuScenes-Occupancy/scene_<scene_token>/occupancy/<lidar_token>.npy   sparse [z, y, x, cls] (255 -> 0)
    <root>/nuscenes/occscene_infos/<split>/<token>.pkl                  the frame's info (written last)
    <root>/nuscenes/nuscenes_occ_infos_<split>.pkl                      every frame's info, rebuilt by finalize()

Tokens are 32 hex digits derived from the frame_id (``sha256``), so re-runs overwrite the same files; every sample is
its own scene. ``nuscenes_occ_infos_<split>.pkl`` is rebuilt from the per-frame infos when predict ends (rank 0,
after all ranks), or by calling :meth:`NuScenesOccupancyExporter.finalize`; read it back with
``NuScenesOccupancyDataset("<root>/nuscenes", split=..., grid_size=..., crop_box=None)``. The reader puts voxel
``[0, 0, 0]`` at ``POINT_CLOUD_RANGE[:3]``; a sample whose ``voxel_origin`` differs is re-based as above.
Requirements: six views in ``CAMERA_NAMES`` order, a grid over the OpenOccupancy range with cubic voxels
(``102.4 / X == 102.4 / Y == 8 / Z == voxel_size``), train ids in ``0..16`` or 255.

**Placeholders for LiDAR-only data.** Every info holds every key that OpenOccupancy's ``NuscOCCDataset``, its
loading pipeline and mmdet3d's ``NuScenesDataset`` read (:data:`NUSCENES_INFO_KEYS`). Generated data has no LiDAR,
ego motion or boxes, so: the LiDAR frame is the ego frame (``lidar2ego`` identity), the ego sits at the global origin
(``ego2global`` identity), ``sweeps`` is empty, ``prev``/``next`` are ``""`` (no neighbouring frames), ``can_bus`` is
18 zeros, ``frame_idx`` is 0, the point cloud and lidarseg files hold no points, every ``depth_gt`` file holds no
points (OpenOccupancy's depth loss then has no foreground pixels and contributes 0 for these frames), and the box
arrays (``gt_boxes``, ``gt_names``, ``gt_velocity``, ``num_lidar_pts``, ``num_radar_pts``, ``valid_flag``) are
empty. The cameras' ``sensor2ego_*`` therefore equal their ``sensor2lidar_*``. Camera-only configs train on such
frames unchanged; LiDAR and multi-modal configs get no points.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from occscene_pl.data.nuscenes_occupancy import (
    CAMERA_NAMES,
    NUSCENES_OCCUPANCY_CLASSES,
    POINT_CLOUD_RANGE,
    load_infos,
    write_sparse_occupancy,
)
from occscene_pl.data.semantic_kitti import (
    SemanticKittiDataset,
    read_calib,
    train_to_raw,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.data.transforms import crop_view, resize_view
from occscene_pl.files import atomic_write
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

_NUM_STEMS = 10**6
_VOXEL_SUFFIXES = ("bin", "label", "invalid", "occluded")  # .bin first: it enumerates frames
EXPORT_SPLITS: tuple[str, ...] = ("train", "val")
# Every info key read by OpenOccupancy's NuscOCCDataset.get_data_info, its CustomNuScenesDataset and mmdet3d's
# NuScenesDataset (load_annotations, get_ann_info, get_cat_ids).
NUSCENES_INFO_KEYS: tuple[str, ...] = (
    "token",
    "lidar_path",
    "lidar_token",
    "sweeps",
    "cams",
    "lidar2ego_translation",
    "lidar2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "timestamp",
    "prev",
    "next",
    "scene_token",
    "can_bus",
    "frame_idx",
    "lidarseg",
    "gt_boxes",
    "gt_names",
    "gt_velocity",
    "num_lidar_pts",
    "num_radar_pts",
    "valid_flag",
)
# Every camera key read by those and by OpenOccupancy's LoadMultiViewImageFromFiles_BEVDet (also in sequential mode)
# and tools/gen_data/gen_depth_gt.py.
NUSCENES_CAMERA_KEYS: tuple[str, ...] = (
    "data_path",
    "type",
    "sample_data_token",
    "sensor2ego_translation",
    "sensor2ego_rotation",
    "ego2global_translation",
    "ego2global_rotation",
    "timestamp",
    "sensor2lidar_rotation",
    "sensor2lidar_translation",
    "cam_intrinsic",
)
_CAMERA_CLAIM = ".occscene_camera"  # a sequence's camera (calib.txt text), claimed by exclusive create
_CAN_BUS_LENGTH = 18  # nuScenes infos' can_bus: position (3), orientation (4), ..., patch angle (rad, deg)
_IDENTITY_QUATERNION = (1.0, 0.0, 0.0, 0.0)  # w, x, y, z


def create_exclusive(path: Path, data: bytes) -> bool:
    """Create ``path`` holding ``data`` only if it does not exist yet, atomically (temporary file + ``os.link``).

    Returns:
        ``True`` if this call created the file, ``False`` if it already existed.
    """
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        tmp.unlink(missing_ok=True)


def png_bytes(image: np.ndarray) -> bytes:
    """Encode an ``(H, W, 3)`` uint8 array as PNG."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def check_split(split: Any, option: str = "split") -> str:
    """Return ``split`` if it is an export split (``"train"`` or ``"val"``), else raise a ``ValueError`` naming
    ``option``."""
    if split not in EXPORT_SPLITS:
        raise ValueError(f"{option} must be one of {list(EXPORT_SPLITS)}, got {split!r}")
    return str(split)


def check_image_size(size: Any, option: str = "image_size") -> tuple[int, int] | None:
    """Return ``size`` as ``(W, H)`` positive ints (``None`` stays ``None``), else raise a ``ValueError`` naming
    ``option``."""
    if size is None:
        return None
    try:
        values = [int(v) for v in size]
        exact = all(int(v) == v for v in size) and not isinstance(size, str | bytes)
    except (TypeError, ValueError):
        values, exact = [], False
    if len(values) != 2 or not exact or min(values) < 1:
        raise ValueError(f"{option} must be (width, height) as two positive integers, e.g. [1220, 370], got {size!r}")
    return values[0], values[1]


def fit_view(image: np.ndarray, intrinsics: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Resample a view to ``size = (W, H)`` without distorting it, and adjust its intrinsics to match.

    The image is scaled uniformly by ``max(W / w, H / h)`` (bilinear, so that it covers ``W x H``), then the centred
    ``W x H`` window is kept. Intrinsics follow :mod:`occscene_pl.data.transforms`' pixel convention (a resize maps
    ``c -> (c + 0.5) * s - 0.5``, a crop shifts the principal point), so every 3D point lands on the same content.

    Args:
        image: ``(h, w, 3)`` uint8.
        intrinsics: ``(3, 3)`` at ``(w, h)``.
        size: the output ``(W, H)``.

    Returns:
        The ``(H, W, 3)`` uint8 image and its ``(3, 3)`` float64 intrinsics.
    """
    height, width = image.shape[:2]
    out_w, out_h = size
    if (width, height) == (out_w, out_h):
        return image, np.asarray(intrinsics, dtype=np.float64)
    scale = max(out_w / width, out_h / height)
    new_w, new_h = max(out_w, round(width * scale)), max(out_h, round(height * scale))
    resized, k = resize_view(Image.fromarray(image), np.asarray(intrinsics), (new_h, new_w))
    left, top = (new_w - out_w) // 2, (new_h - out_h) // 2
    cropped, k = crop_view(resized, k, (left, top, left + out_w, top + out_h))
    return np.asarray(cropped), k


def quaternion_wxyz(rotation: np.ndarray) -> list[float]:
    """The unit quaternion ``[w, x, y, z]`` (nuScenes / pyquaternion order, ``w >= 0``) of a ``(3, 3)`` rotation.

    Shepperd's method on the nearest rotation (SVD), so float32 round-off in the input does not matter.
    """
    u, _, vt = np.linalg.svd(np.asarray(rotation, dtype=np.float64))
    r = u @ np.diag([1.0, 1.0, np.linalg.det(u @ vt)]) @ vt
    trace = np.trace(r)
    if trace > 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([s / 4, (r[2, 1] - r[1, 2]) / s, (r[0, 2] - r[2, 0]) / s, (r[1, 0] - r[0, 1]) / s])
    else:
        i = int(np.argmax(np.diag(r)))
        j, k = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + r[i, i] - r[j, j] - r[k, k])
        q = np.zeros(4)
        q[0] = (r[k, j] - r[j, k]) / s
        q[1 + i] = s / 4
        q[1 + j] = (r[j, i] + r[i, j]) / s
        q[1 + k] = (r[k, i] + r[i, k]) / s
    q /= np.linalg.norm(q)
    return [float(v) for v in (q if q[0] >= 0 else -q)]


class _InfoUnpickler(pickle.Unpickler):
    """Unpickles plain containers and NumPy arrays only: never code (the info pickles are data)."""

    _ALLOWED = frozenset(
        {("numpy", "ndarray"), ("numpy", "dtype")}
        | {(f"numpy.{core}.multiarray", name) for core in ("core", "_core") for name in ("_reconstruct", "scalar")}
        | {(f"numpy.{core}.numeric", "_frombuffer") for core in ("core", "_core")}
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (only containers and NumPy arrays)")
        return super().find_class(module, name)


def load_info_pickle(path: str | Path) -> Any:
    """Read an info pickle with a restricted unpickler (containers, strings, numbers and NumPy arrays only).

    Raises:
        ValueError: the file is unreadable, not a pickle, or holds anything else (naming the file).
    """
    try:
        with Path(path).open("rb") as handle:
            return _InfoUnpickler(handle).load()
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise ValueError(f"info pickle {path} is not readable as plain data ({err})") from err


class NativeExporter(Protocol):
    """What the prediction writer needs of an exporter: check and convert, write one frame, gather at the end."""

    name: str

    def prepare(self, sample: GeneratedSample) -> Any:
        """Check that ``sample`` fits the layout and convert it (nothing is written); ``ValueError`` if not."""
        ...

    def write(self, frame: Any) -> dict[str, Any]: ...

    def matches(self, record: Any) -> bool: ...

    def finalize(self) -> object: ...


def rebased_transform(voxel_to_camera: np.ndarray, voxel_origin: Any, reader_origin: Any, what: str) -> np.ndarray:
    """``voxel_to_camera`` for a reader that puts voxel ``[0, 0, 0]`` at ``reader_origin`` instead of ``voxel_origin``.

    A voxel's point is ``voxel_origin + (i + 0.5) * size`` for the sample and ``reader_origin + (i + 0.5) * size`` for
    the reader, so the reader's transform is ``voxel_to_camera @ translate(voxel_origin - reader_origin)``: every voxel
    projects to the same pixel. Offsets under 0.1 mm (float32 copies of the reader's own origin) count as zero.

    Raises:
        ValueError: the last row is not ``[0, 0, 0, 1]`` (``what`` names the export and frame).
    """
    transform = np.asarray(voxel_to_camera, dtype=np.float64)
    if not np.allclose(transform[3], [0.0, 0.0, 0.0, 1.0]):
        raise ValueError(f"{what}: voxel_to_camera's last row must be [0, 0, 0, 1], got {transform[3].tolist()}")
    shift = np.eye(4)
    offset = np.asarray(voxel_origin, np.float64) - np.asarray(reader_origin, np.float64)
    shift[:3, 3] = np.where(np.abs(offset) < 1e-4, 0.0, offset)
    return transform @ shift


def _record_size(size: tuple[int, int] | None) -> list[int] | None:
    return None if size is None else [int(size[0]), int(size[1])]


@dataclass
class _KittiFrame:
    frame_id: str
    raw: np.ndarray  # (X, Y, Z) uint16
    invalid: np.ndarray  # (X, Y, Z) bool
    scan: np.ndarray  # (X, Y, Z) bool
    image: np.ndarray  # (H, W, 3) uint8
    p2: np.ndarray  # (3, 4)
    tr: np.ndarray  # (4, 4)


class SemanticKittiExporter:
    """Writes generated samples into a SemanticKITTI tree (layout, stems and sequences in the module docstring).

    Use :meth:`prepare` (validates and converts; writes nothing) then :meth:`write`.

    Args:
        root: the export root, e.g. ``<output_dir>/semantic_kitti``.
        split: ``"train"`` (MonoScene's training sequences, to augment a training set) or ``"val"`` (sequence 08).
        sequences: the sequence numbers to fill, one per distinct camera, in order (e.g. ``["00"]`` or
            ``["30", "31"]``); each must be one of MonoScene's sequences of ``split`` or 22..99 (outside every
            official split). ``None``: the split's sequences, then 22..99.
        image_size: ``(W, H)`` to resample the images to (:func:`fit_view`), e.g. ``(1220, 370)`` for MonoScene;
            ``None`` keeps the generated size.

    Raises:
        ValueError: a bad ``split``, ``sequences`` or ``image_size`` (naming the option).
    """

    name = "semantic_kitti"
    OVERFLOW_SEQUENCES: tuple[str, ...] = tuple(str(i) for i in range(22, 100))

    def __init__(
        self,
        root: str | Path,
        split: str = "val",
        sequences: Sequence[str | int] | None = None,
        image_size: Sequence[int] | None = None,
    ) -> None:
        self.root = Path(root)
        self.split = check_split(split, "semantic_kitti split")
        self.sequences = self.check_sequences(self.split, sequences)
        self.image_size = check_image_size(image_size, "semantic_kitti image_size")
        self.sequences_root = self.root / "dataset" / "sequences"
        self.index_dir = self.root / "frame_ids"
        self._calibs: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._placeholders_written = False

    @classmethod
    def check_sequences(cls, split: str, sequences: Sequence[str | int] | None) -> tuple[str, ...]:
        """The two-digit sequence names to fill for ``split``: ``sequences`` checked, or the default.

        Raises:
            ValueError: ``sequences`` is empty, has duplicates, or names a sequence that is not a number in 0..99,
                belongs to another split (MonoScene's train 00-07, 09, 10; val 08; test 11-21), naming it.
        """
        official = SemanticKittiDataset.SPLIT_SEQUENCES
        if sequences is None:
            return (*official[split], *cls.OVERFLOW_SEQUENCES)
        if isinstance(sequences, str | int):
            sequences = [sequences]
        names: list[str] = []
        for value in sequences:
            text = str(value).strip()
            if not text.isdigit() or int(text) > 99 or isinstance(value, bool):
                raise ValueError(f"semantic_kitti sequences: {value!r} is not a sequence number in 0..99, e.g. '00'")
            name = f"{int(text):02d}"
            owner = next((s for s, names_ in official.items() if name in names_), None)
            if owner is not None and owner != split:
                raise ValueError(
                    f"semantic_kitti sequences: sequence {name} belongs to MonoScene's {owner} split, not split="
                    f"{split!r}; use one of {list(official[split])} or 22..99"
                )
            if name in names:
                raise ValueError(f"semantic_kitti sequences: sequence {name} is listed twice")
            names.append(name)
        if not names:
            raise ValueError("semantic_kitti sequences must name at least one sequence (or be null for the default)")
        return tuple(names)

    def prepare(self, sample: GeneratedSample) -> _KittiFrame:
        """Check that a sample fits the SemanticKITTI layout and convert it; nothing is written.

        Args:
            sample: the generated sample: one view, its ``labels``, camera and grid placement (its ``frame_id``
                names the stem and the error messages).

        Raises:
            ValueError: naming the frame and the requirement it breaks.
        """
        frame_id, labels, image, voxel_size = sample.frame_id, sample.labels, sample.pixels, sample.voxel_size
        intrinsics, voxel_to_camera, voxel_origin = sample.intrinsics, sample.voxel_to_camera, sample.voxel_origin
        what = f"semantic_kitti export of frame {frame_id!r}"
        if image.shape[0] != 1:
            raise ValueError(f"{what}: SemanticKITTI frames have one camera, the sample has {image.shape[0]} views")
        x, y, z = labels.shape
        if not x == y == 8 * z:
            raise ValueError(f"{what}: grid {labels.shape} does not cover the KITTI extent (need X == Y == 8 * Z)")
        extent = SemanticKittiDataset.SCENE_EXTENT_M[0]
        if not np.isclose(voxel_size, extent / x, rtol=1e-4, atol=0.0):
            raise ValueError(f"{what}: voxel_size {voxel_size} m, the reader assumes {extent} / {x} = {extent / x} m")
        invalid = labels == 255
        try:
            raw = train_to_raw(np.where(invalid, 0, labels))
        except ValueError as err:
            raise ValueError(f"{what}: {err}") from err
        tr = rebased_transform(voxel_to_camera[0], voxel_origin, SemanticKittiDataset.VOXEL_ORIGIN, what)
        view, k = image[0], np.asarray(intrinsics[0], dtype=np.float64)
        if self.image_size is not None:
            view, k = fit_view(view, k, self.image_size)
        p2 = np.zeros((3, 4))
        p2[:, :3] = k
        return _KittiFrame(frame_id, raw, invalid, (labels != 0) & ~invalid, view, p2, tr)

    def write(self, frame: _KittiFrame) -> dict[str, Any]:
        """Write one prepared frame (image first, ``.bin`` last), every file atomically.

        Returns:
            ``split``, ``sequence`` and ``stem`` of the frame, ``image_size`` (the option), the reader's
            ``crop_size`` ``[W, H]`` (the written image's size), and ``files``: its ``calib.txt``, image, four voxel
            files and index entry.
        """
        sequence = self._sequence_for(frame.p2, frame.tr)
        stem, index_file = self._claim_stem(frame.frame_id)
        self._remove_stale(stem, keep=sequence)
        seq_dir = self.sequences_root / sequence
        image_path = seq_dir / "image_2" / f"{stem}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(image_path, png_bytes(frame.image))
        write_voxel_frame(seq_dir / "voxels", stem, frame.raw, invalid=frame.invalid, scan=frame.scan)
        self._write_placeholders((seq_dir / _CAMERA_CLAIM).read_bytes())
        voxels = [seq_dir / "voxels" / f"{stem}.{suffix}" for suffix in _VOXEL_SUFFIXES]
        height, width = frame.image.shape[:2]
        return {
            "split": self.split,
            "sequence": sequence,
            "stem": stem,
            "image_size": _record_size(self.image_size),
            "crop_size": [int(width), int(height)],  # the reader's crop_size=(W, H)
            "files": [seq_dir / "calib.txt", image_path, *voxels, index_file],
        }

    def matches(self, record: Any) -> bool:
        """Whether a frame's export ``record`` (as :meth:`write` returned it) was written with these options."""
        return (
            isinstance(record, dict)
            and record.get("split", "val") == self.split
            and record.get("sequence") in self.sequences
            and record.get("image_size") == _record_size(self.image_size)
        )

    def finalize(self) -> None:
        """Nothing to gather: every SemanticKITTI file is complete once :meth:`write` returns."""

    def _sequence_for(self, p2: np.ndarray, tr: np.ndarray) -> str:
        calib_bytes = self._calib_bytes(p2, tr)
        for sequence in self.sequences:
            calib = self._calibs.get(sequence)
            if calib is None:
                seq_dir = self.sequences_root / sequence
                seq_dir.mkdir(parents=True, exist_ok=True)
                claim = seq_dir / _CAMERA_CLAIM
                if not claim.is_file():
                    existing = seq_dir / "calib.txt"  # an export from before claim files owns it if it has frames
                    owned = existing.is_file() and any((seq_dir / "voxels").glob("*.bin"))
                    create_exclusive(claim, existing.read_bytes() if owned else calib_bytes)
                claimed = claim.read_bytes()
                calib_path = seq_dir / "calib.txt"
                if not calib_path.is_file() or calib_path.read_bytes() != claimed:
                    atomic_write(calib_path, claimed)  # replaces a placeholder
                values = read_calib(claim)
                calib = self._calibs[sequence] = (values["P2"], values["Tr"])
            if np.allclose(calib[0], p2, rtol=1e-9, atol=1e-9) and np.allclose(calib[1], tr, rtol=1e-9, atol=1e-9):
                return sequence
        raise ValueError(
            f"semantic_kitti export: every sequence of sequences={list(self.sequences)} in {self.sequences_root} "
            "already holds another camera (one calib.txt per sequence); list more sequences"
        )

    def _calib_bytes(self, p2: np.ndarray, tr: np.ndarray) -> bytes:
        self.sequences_root.mkdir(parents=True, exist_ok=True)
        tmp = self.sequences_root / f".calib.{uuid.uuid4().hex}.tmp"
        try:
            write_calib(tmp, p2, tr)
            return tmp.read_bytes()
        finally:
            tmp.unlink(missing_ok=True)

    def _write_placeholders(self, calib_bytes: bytes) -> None:
        """MonoScene reads ``calib.txt`` of every sequence of its split: give the unused ones a calib and no frames."""
        if self._placeholders_written:
            return
        for sequence in SemanticKittiDataset.SPLIT_SEQUENCES[self.split]:
            seq_dir = self.sequences_root / sequence
            (seq_dir / "voxels").mkdir(parents=True, exist_ok=True)
            if not (seq_dir / "calib.txt").is_file():
                create_exclusive(seq_dir / "calib.txt", calib_bytes)
        self._placeholders_written = True

    @staticmethod
    def stem_hash(frame_id: str) -> int:
        """First stem tried for ``frame_id``: ``sha256(frame_id) mod 10**6``."""
        return int.from_bytes(hashlib.sha256(frame_id.encode("utf-8")).digest()[:8], "big") % _NUM_STEMS

    def _claim_stem(self, frame_id: str) -> tuple[str, Path]:
        self.index_dir.mkdir(parents=True, exist_ok=True)
        start = self.stem_hash(frame_id)
        for k in range(_NUM_STEMS):
            stem = f"{(start + k) % _NUM_STEMS:06d}"
            path = self.index_dir / f"{stem}.txt"
            if not path.is_file() and create_exclusive(path, frame_id.encode("utf-8")):
                return stem, path
            if path.read_text(encoding="utf-8") == frame_id:
                return stem, path
        raise ValueError(f"semantic_kitti export: all {_NUM_STEMS} stems of {self.index_dir} are taken")

    def lookup(self, frame_id: str) -> str | None:
        """The stem ``frame_id`` owns, or ``None`` if it was never exported here."""
        start = self.stem_hash(frame_id)
        for k in range(_NUM_STEMS):
            path = self.index_dir / f"{(start + k) % _NUM_STEMS:06d}.txt"
            if not path.is_file():
                return None
            if path.read_text(encoding="utf-8") == frame_id:
                return path.stem
        return None

    def _remove_stale(self, stem: str, keep: str) -> None:
        # A frame_id re-written through a different camera or split must not stay in its old sequence too.
        if not self.sequences_root.is_dir():
            return
        for seq_dir in self.sequences_root.iterdir():
            if seq_dir.name == keep or not seq_dir.is_dir():
                continue
            for suffix in _VOXEL_SUFFIXES:
                (seq_dir / "voxels" / f"{stem}.{suffix}").unlink(missing_ok=True)
            (seq_dir / "image_2" / f"{stem}.png").unlink(missing_ok=True)


@dataclass
class _NuScenesFrame:
    frame_id: str
    token: str
    labels: np.ndarray  # (X, Y, Z) uint8 train ids, 255 = unknown
    images: list[np.ndarray]  # 6 x (H, W, 3) uint8 in CAMERA_NAMES order
    intrinsics: np.ndarray  # (6, 3, 3)
    sensor_to_lidar: np.ndarray  # (6, 4, 4)


class NuScenesOccupancyExporter:
    """Writes generated six-camera samples into an OpenOccupancy tree (layout and placeholders in the module docstring).

    Use :meth:`prepare` (validates and converts; writes nothing), :meth:`write` per frame, then :meth:`finalize`
    once all frames are written (it builds ``nuscenes_occ_infos_<split>.pkl``).

    Args:
        root: the export root, e.g. ``<output_dir>/nuscenes_occupancy``; use it as OpenOccupancy's ``data/`` folder.
        split: ``"train"`` (``nuscenes_occ_infos_train.pkl``, to augment a training set) or ``"val"``.
        image_size: ``(W, H)`` to resample the views to (:func:`fit_view`), e.g. ``(1600, 900)`` for nuScenes'
            camera size; ``None`` keeps the generated size (OpenOccupancy resizes any size to its input size).

    Raises:
        ValueError: a bad ``split`` or ``image_size`` (naming the option).
    """

    name = "nuscenes_occupancy"
    DATA_VERSION = "v1.0-trainval"  # where nuScenes keeps lidarseg files; the infos' metadata says occscene-generated
    FORMAT = 2  # layout version in the export record; older records (no peer keys) are re-written

    def __init__(self, root: str | Path, split: str = "val", image_size: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.split = check_split(split, "nuscenes_occupancy split")
        self.image_size = check_image_size(image_size, "nuscenes_occupancy image_size")
        self.data_root = self.root / "nuscenes"
        self.occupancy_root = self.root / "nuScenes-Occupancy"
        self.depth_root = self.root / "depth_gt"
        self.info_root = self.data_root / "occscene_infos"
        self.info_dir = self.info_root / self.split
        self.info_file = self.info_path(self.split)

    def info_path(self, split: str) -> Path:
        """``<root>/nuscenes/nuscenes_occ_infos_<split>.pkl``."""
        return self.data_root / f"nuscenes_occ_infos_{split}.pkl"

    @staticmethod
    def token(frame_id: str, kind: str = "sample") -> str:
        """A 32-hex-digit nuScenes-style token of ``frame_id`` for ``kind`` (sample, scene, lidar, a camera)."""
        return hashlib.sha256(f"{kind}/{frame_id}".encode()).hexdigest()[:32]

    def prepare(self, sample: GeneratedSample) -> _NuScenesFrame:
        """Check that a sample fits the OpenOccupancy layout and convert it; nothing is written.

        Args:
            sample: the generated sample, with ``V == 6`` views in ``CAMERA_NAMES`` order (its ``frame_id`` derives
                the tokens).

        Raises:
            ValueError: naming the frame and the requirement it breaks.
        """
        frame_id, labels, image, voxel_size = sample.frame_id, sample.labels, sample.pixels, sample.voxel_size
        intrinsics, voxel_to_camera, voxel_origin = sample.intrinsics, sample.voxel_to_camera, sample.voxel_origin
        what = f"nuscenes_occupancy export of frame {frame_id!r}"
        if image.shape[0] != len(CAMERA_NAMES):
            raise ValueError(
                f"{what}: nuScenes frames have {len(CAMERA_NAMES)} cameras {list(CAMERA_NAMES)}, "
                f"the sample has {image.shape[0]} view(s)"
            )
        extent = np.subtract(POINT_CLOUD_RANGE[3:], POINT_CLOUD_RANGE[:3])
        sizes = extent / np.asarray(labels.shape, dtype=np.float64)
        if not np.allclose(sizes, voxel_size, rtol=1e-4, atol=0.0):
            raise ValueError(
                f"{what}: grid {labels.shape} with voxel_size {voxel_size} m does not cover the OpenOccupancy range "
                f"{POINT_CLOUD_RANGE} with cubic voxels (need 102.4 / X == 102.4 / Y == 8 / Z == voxel_size)"
            )
        known = labels[labels != 255]
        if known.size and int(known.max()) >= len(NUSCENES_OCCUPANCY_CLASSES):
            raise ValueError(
                f"{what}: label {int(known.max())} is not a nuScenes-Occupancy train id "
                f"(0..{len(NUSCENES_OCCUPANCY_CLASSES) - 1} or 255)"
            )
        to_lidar = np.stack(
            [
                np.linalg.inv(rebased_transform(transform, voxel_origin, POINT_CLOUD_RANGE[:3], what))
                for transform in voxel_to_camera
            ]
        )
        views, ks = list(image), [np.asarray(k, dtype=np.float64) for k in intrinsics]
        if self.image_size is not None:
            fitted = [fit_view(view, k, self.image_size) for view, k in zip(views, ks, strict=True)]
            views, ks = [view for view, _ in fitted], [k for _, k in fitted]
        return _NuScenesFrame(frame_id, self.token(frame_id), labels, views, np.stack(ks), to_lidar)

    def write(self, frame: _NuScenesFrame) -> dict[str, Any]:
        """Write one prepared frame: images, placeholders, occupancy, and its info last, every file atomically.

        Returns:
            the frame's ``token`` (the reader's ``frame_id``), ``split``, ``image_size`` (the option), ``format``
            (:attr:`FORMAT`), and ``files``:
            six images, six ``depth_gt`` files, the point-cloud and lidarseg placeholders, the occupancy ``.npy`` and
            the frame's info pickle.

        Raises:
            ValueError: another frame_id already owns this token (a SHA-256 collision).
        """
        info_path = self.info_dir / f"{frame.token}.pkl"
        for split in EXPORT_SPLITS:
            other = self.info_root / split / info_path.name
            if other.is_file():
                owner = self._read_info(other).get("occscene_frame_id")
                if owner != frame.frame_id:
                    raise ValueError(
                        f"nuscenes_occupancy export: token {frame.token} of frame {frame.frame_id!r} is owned by "
                        f"{owner!r}"
                    )
        scene_token, lidar_token = self.token(frame.frame_id, "scene"), self.token(frame.frame_id, "lidar")
        timestamp = time.time_ns() // 1000  # microseconds, as nuScenes; infos are read in this order
        files: list[Path] = []
        cams: dict[str, dict[str, Any]] = {}
        self.depth_root.mkdir(parents=True, exist_ok=True)
        for view, camera in enumerate(CAMERA_NAMES):
            image_name = f"{frame.token}__{camera}.png"
            path = self.data_root / "samples" / camera / image_name
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, png_bytes(frame.images[view]))
            depth = self.depth_root / f"{image_name}.bin"  # gen_depth_gt.py's name: <image file name>.bin
            atomic_write(depth, np.zeros((0, 3), dtype=np.float32).tobytes())
            files += [path, depth]
            rotation = frame.sensor_to_lidar[view, :3, :3].copy()
            translation = frame.sensor_to_lidar[view, :3, 3].copy()
            cams[camera] = {
                "data_path": f"./data/nuscenes/samples/{camera}/{image_name}",
                "type": camera,
                "sample_data_token": self.token(frame.frame_id, camera),
                # Placeholders: the LiDAR frame is the ego frame and the ego sits at the global origin.
                "sensor2ego_translation": translation.tolist(),
                "sensor2ego_rotation": quaternion_wxyz(rotation),
                "ego2global_translation": [0.0, 0.0, 0.0],
                "ego2global_rotation": list(_IDENTITY_QUATERNION),
                "timestamp": timestamp,
                "sensor2lidar_rotation": rotation,
                "sensor2lidar_translation": translation,
                "cam_intrinsic": frame.intrinsics[view].copy(),
            }
        lidar_name = f"{lidar_token}.pcd.bin"
        lidar = self.data_root / "samples" / "LIDAR_TOP" / lidar_name
        lidarseg_rel = f"lidarseg/{self.DATA_VERSION}/{lidar_token}_lidarseg.bin"
        lidarseg = self.data_root / lidarseg_rel
        for path in (lidar, lidarseg):  # placeholders: no points (x, y, z, intensity, ring float32 / uint8 labels)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, b"")
        files += [lidar, lidarseg]
        occupancy = self.occupancy_root / f"scene_{scene_token}" / "occupancy" / f"{lidar_token}.npy"
        write_sparse_occupancy(occupancy, frame.labels)
        files.append(occupancy)
        info = {
            "token": frame.token,
            "lidar_path": f"./data/nuscenes/samples/LIDAR_TOP/{lidar_name}",
            "lidar_token": lidar_token,
            "sweeps": [],
            "cams": cams,
            "lidar2ego_translation": [0.0, 0.0, 0.0],
            "lidar2ego_rotation": list(_IDENTITY_QUATERNION),
            "ego2global_translation": [0.0, 0.0, 0.0],
            "ego2global_rotation": list(_IDENTITY_QUATERNION),
            "timestamp": timestamp,
            "prev": "",
            "next": "",
            "scene_token": scene_token,
            "can_bus": np.zeros(_CAN_BUS_LENGTH),
            "frame_idx": 0,
            "lidarseg": lidarseg_rel,
            "gt_boxes": np.zeros((0, 7)),
            "gt_names": np.zeros(0, dtype="<U20"),
            "gt_velocity": np.zeros((0, 2)),
            "num_lidar_pts": np.zeros(0, dtype=np.int64),
            "num_radar_pts": np.zeros(0, dtype=np.int64),
            "valid_flag": np.zeros(0, dtype=bool),
            "occscene_frame_id": frame.frame_id,
        }
        self.info_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(info_path, pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL))
        for split in EXPORT_SPLITS:  # a frame re-written into another split leaves the old one
            if split != self.split:
                (self.info_root / split / info_path.name).unlink(missing_ok=True)
        files.append(info_path)
        return {
            "token": frame.token,
            "split": self.split,
            "image_size": _record_size(self.image_size),
            "format": self.FORMAT,
            "files": files,
        }

    def matches(self, record: Any) -> bool:
        """Whether a frame's export ``record`` (as :meth:`write` returned it) was written with these options."""
        return (
            isinstance(record, dict)
            and record.get("format") == self.FORMAT
            and record.get("split") == self.split
            and record.get("image_size") == _record_size(self.image_size)
        )

    def finalize(self) -> Path | None:
        """Rebuild ``nuscenes_occ_infos_<split>.pkl`` of every split from its frames' infos (atomically).

        A split left without frames (all moved to the other split) loses its pickle. Call it once all ranks have
        written (the prediction writer does, on rank 0, when predict ends). Each result is checked by loading it
        back with the reader's :func:`~occscene_pl.data.nuscenes_occupancy.load_infos`.

        Returns:
            this exporter's split's pickle, or ``None`` if that split has no frames.
        """
        built: dict[str, Path] = {}
        for split in EXPORT_SPLITS:
            info_dir, info_file = self.info_root / split, self.info_path(split)
            paths = sorted(info_dir.glob("*.pkl")) if info_dir.is_dir() else []
            if not paths:
                if info_dir.is_dir():
                    info_file.unlink(missing_ok=True)
                continue
            infos = [self._read_info(path) for path in paths]
            data = {"infos": infos, "metadata": {"version": "occscene-generated", "generator": "occscene-pl"}}
            atomic_write(info_file, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
            load_infos(info_file, CAMERA_NAMES)
            built[split] = info_file
        return built.get(self.split)

    @staticmethod
    def _read_info(path: Path) -> dict[str, Any]:
        try:
            info = load_info_pickle(path)
        except ValueError as err:
            raise ValueError(f"nuscenes_occupancy export: frame info {path} is not readable ({err})") from err
        if not isinstance(info, dict):
            raise ValueError(f"nuscenes_occupancy export: frame info {path} holds a {type(info).__name__}, not a dict")
        return info
