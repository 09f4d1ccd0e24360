"""Native dataset layouts for generated samples, so they drop straight into perception training (DESIGN §6).

:class:`SemanticKittiExporter` writes the layout that :class:`~occscene_pl.data.semantic_kitti.SemanticKittiDataset`
reads::

    <root>/dataset/sequences/<SS>/calib.txt              P2 = [K | 0], Tr = voxel_to_camera (re-based, see below)
    <root>/dataset/sequences/<SS>/image_2/<NNNNNN>.png   view 0 at the generated size
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

**Sequences.** ``calib.txt`` is per sequence, so every distinct camera gets its own: the first camera written goes to
sequence ``08`` (the ``val`` split, so ``SemanticKittiDataset(root, split="val", ...)`` reads it), further cameras
to ``22``, ``23``, ... (outside the official splits; read them with ``sequences=["22"]``). A sequence is claimed by
an exclusive create of its ``calib.txt``; cameras match when ``P2`` and ``Tr`` agree to 1e-9.

**Camera.** The reader takes ``intrinsics = P2[:3, :3]`` and ``voxel_to_camera = Tr`` and places voxel ``[0, 0, 0]``
at its fixed ``VOXEL_ORIGIN``; a sample whose ``voxel_origin`` differs gets ``Tr = voxel_to_camera @
translate(voxel_origin - VOXEL_ORIGIN)``, so every voxel projects to the same pixel as in the sample. The reader
crops the top-left ``crop_size = (W, H)`` of every image: read exported frames back with ``crop_size=(W, H)`` of the
generated images (and ``image_size=None``) to get the same intrinsics. Requirements: one view, a grid with
``X == Y == 8 * Z`` and ``voxel_size == 51.2 / X`` (the KITTI extent), train ids in ``0..19`` or 255.

:class:`NuScenesOccupancyExporter` writes the OpenOccupancy layout that
:class:`~occscene_pl.data.nuscenes_occupancy.NuScenesOccupancyDataset` reads::

    <root>/nuscenes/samples/<CAM_*>/<token>.png                         the six views at the generated size
    <root>/nuScenes-Occupancy/scene_<scene_token>/occupancy/<lidar_token>.npy   sparse [z, y, x, cls] (255 -> 0)
    <root>/nuscenes/occscene_infos/<token>.pkl                          the frame's info (written last)
    <root>/nuscenes/nuscenes_occ_infos_val.pkl                          every frame's info, rebuilt by finalize()

Tokens are 32 hex digits derived from the frame_id (``sha256``), so re-runs overwrite the same files; every sample is
its own scene. ``nuscenes_occ_infos_val.pkl`` is rebuilt from the per-frame infos when predict ends (rank 0, after
all ranks), or by calling :meth:`NuScenesOccupancyExporter.finalize`; read it back with
``NuScenesOccupancyDataset("<root>/nuscenes", split="val", grid_size=..., crop_box=None)``. The reader puts voxel
``[0, 0, 0]`` at ``POINT_CLOUD_RANGE[:3]``; a sample whose ``voxel_origin`` differs is re-based as above.
Requirements: six views in ``CAMERA_NAMES`` order, a grid over the OpenOccupancy range with cubic voxels
(``102.4 / X == 102.4 / Y == 8 / Z == voxel_size``), train ids in ``0..16`` or 255.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import time
import uuid
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
from occscene_pl.files import atomic_write

__all__ = [
    "NativeExporter",
    "NuScenesOccupancyExporter",
    "SemanticKittiExporter",
    "create_exclusive",
    "png_bytes",
    "rebased_transform",
]

_NUM_STEMS = 10**6
_VOXEL_SUFFIXES = ("bin", "label", "invalid", "occluded")  # .bin first: it enumerates frames


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


class NativeExporter(Protocol):
    """What the prediction writer needs of an exporter: check and convert, write one frame, gather at the end."""

    name: str

    def prepare(
        self,
        frame_id: str,
        labels: np.ndarray,
        image: np.ndarray,
        intrinsics: np.ndarray,
        voxel_to_camera: np.ndarray,
        voxel_origin: np.ndarray,
        voxel_size: float,
    ) -> Any: ...

    def write(self, frame: Any) -> dict[str, Any]: ...

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
    """

    name = "semantic_kitti"
    SEQUENCES: tuple[str, ...] = ("08", *(str(i) for i in range(22, 100)))

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.sequences_root = self.root / "dataset" / "sequences"
        self.index_dir = self.root / "frame_ids"
        self._calibs: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def prepare(
        self,
        frame_id: str,
        labels: np.ndarray,
        image: np.ndarray,
        intrinsics: np.ndarray,
        voxel_to_camera: np.ndarray,
        voxel_origin: np.ndarray,
        voxel_size: float,
    ) -> _KittiFrame:
        """Check that a sample fits the SemanticKITTI layout and convert it; nothing is written.

        Args:
            frame_id: the sample's id (for error messages and the stem).
            labels: ``(X, Y, Z)`` uint8 train ids.
            image: ``(V, H, W, 3)`` uint8 views; ``V`` must be 1.
            intrinsics: ``(V, 3, 3)`` at the image size.
            voxel_to_camera: ``(V, 4, 4)``.
            voxel_origin: ``(3,)`` metres.
            voxel_size: metres.

        Raises:
            ValueError: naming ``frame_id`` and the requirement it breaks.
        """
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
        p2 = np.zeros((3, 4))
        p2[:, :3] = np.asarray(intrinsics[0], dtype=np.float64)
        return _KittiFrame(frame_id, raw, invalid, (labels != 0) & ~invalid, image[0], p2, tr)

    def write(self, frame: _KittiFrame) -> dict[str, Any]:
        """Write one prepared frame (image first, ``.bin`` last), every file atomically.

        Returns:
            ``sequence`` and ``stem`` of the frame, the reader's ``crop_size`` ``[W, H]`` for it, and ``files``: its
            ``calib.txt``, image, four voxel files and index entry.
        """
        sequence = self._sequence_for(frame.p2, frame.tr)
        stem, index_file = self._claim_stem(frame.frame_id)
        self._remove_stale(stem, keep=sequence)
        seq_dir = self.sequences_root / sequence
        image_path = seq_dir / "image_2" / f"{stem}.png"
        image_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(image_path, png_bytes(frame.image))
        write_voxel_frame(seq_dir / "voxels", stem, frame.raw, invalid=frame.invalid, scan=frame.scan)
        voxels = [seq_dir / "voxels" / f"{stem}.{suffix}" for suffix in _VOXEL_SUFFIXES]
        height, width = frame.image.shape[:2]
        return {
            "sequence": sequence,
            "stem": stem,
            "crop_size": [int(width), int(height)],  # the reader's crop_size=(W, H)
            "files": [seq_dir / "calib.txt", image_path, *voxels, index_file],
        }

    def finalize(self) -> None:
        """Nothing to gather: every SemanticKITTI file is complete once :meth:`write` returns."""

    def _sequence_for(self, p2: np.ndarray, tr: np.ndarray) -> str:
        for sequence in self.SEQUENCES:
            calib = self._calibs.get(sequence)
            if calib is None:
                path = self.sequences_root / sequence / "calib.txt"
                if not path.is_file():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    tmp = path.with_name(f".calib.{uuid.uuid4().hex}.tmp")
                    try:
                        write_calib(tmp, p2, tr)
                        create_exclusive(path, tmp.read_bytes())
                    finally:
                        tmp.unlink(missing_ok=True)
                values = read_calib(path)
                calib = self._calibs[sequence] = (values["P2"], values["Tr"])
            if np.allclose(calib[0], p2, rtol=1e-9, atol=1e-9) and np.allclose(calib[1], tr, rtol=1e-9, atol=1e-9):
                return sequence
        raise ValueError(f"semantic_kitti export: more than {len(self.SEQUENCES)} distinct cameras in {self.root}")

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
        # A frame_id re-written through a different camera must not stay in its old sequence too.
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
    images: np.ndarray  # (6, H, W, 3) uint8 in CAMERA_NAMES order
    intrinsics: np.ndarray  # (6, 3, 3)
    sensor_to_lidar: np.ndarray  # (6, 4, 4)


class NuScenesOccupancyExporter:
    """Writes generated six-camera samples into an OpenOccupancy tree (layout in the module docstring).

    Use :meth:`prepare` (validates and converts; writes nothing), :meth:`write` per frame, then :meth:`finalize`
    once all frames are written (it builds ``nuscenes_occ_infos_val.pkl``).

    Args:
        root: the export root, e.g. ``<output_dir>/nuscenes_occupancy``.
    """

    name = "nuscenes_occupancy"
    SPLIT = "val"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.data_root = self.root / "nuscenes"
        self.occupancy_root = self.root / "nuScenes-Occupancy"
        self.info_dir = self.data_root / "occscene_infos"
        self.info_file = self.data_root / f"nuscenes_occ_infos_{self.SPLIT}.pkl"

    @staticmethod
    def token(frame_id: str, kind: str = "sample") -> str:
        """A 32-hex-digit nuScenes-style token of ``frame_id`` for ``kind`` (sample, scene, lidar, a camera)."""
        return hashlib.sha256(f"{kind}/{frame_id}".encode()).hexdigest()[:32]

    def prepare(
        self,
        frame_id: str,
        labels: np.ndarray,
        image: np.ndarray,
        intrinsics: np.ndarray,
        voxel_to_camera: np.ndarray,
        voxel_origin: np.ndarray,
        voxel_size: float,
    ) -> _NuScenesFrame:
        """Check that a sample fits the OpenOccupancy layout and convert it; nothing is written.

        Args: as :meth:`SemanticKittiExporter.prepare`, with ``V == 6`` views in ``CAMERA_NAMES`` order.

        Raises:
            ValueError: naming ``frame_id`` and the requirement it breaks.
        """
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
        return _NuScenesFrame(
            frame_id, self.token(frame_id), labels, image, np.asarray(intrinsics, np.float64), to_lidar
        )

    def write(self, frame: _NuScenesFrame) -> dict[str, Any]:
        """Write one prepared frame: images, occupancy, and its info last, every file atomically.

        Returns:
            the frame's ``token`` (the reader's ``frame_id``), ``split``, and ``files``: six images, the occupancy
            ``.npy`` and the frame's info pickle.

        Raises:
            ValueError: another frame_id already owns this token (a SHA-256 collision).
        """
        info_path = self.info_dir / f"{frame.token}.pkl"
        if info_path.is_file():
            owner = self._read_info(info_path).get("occscene_frame_id")
            if owner != frame.frame_id:
                raise ValueError(
                    f"nuscenes_occupancy export: token {frame.token} of frame {frame.frame_id!r} is owned by {owner!r}"
                )
        scene_token, lidar_token = self.token(frame.frame_id, "scene"), self.token(frame.frame_id, "lidar")
        files: list[Path] = []
        cams: dict[str, dict[str, Any]] = {}
        for view, camera in enumerate(CAMERA_NAMES):
            path = self.data_root / "samples" / camera / f"{frame.token}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, png_bytes(frame.images[view]))
            files.append(path)
            cams[camera] = {
                "data_path": f"./data/nuscenes/samples/{camera}/{path.name}",
                "type": camera,
                "sample_data_token": self.token(frame.frame_id, camera),
                "cam_intrinsic": frame.intrinsics[view].copy(),
                "sensor2lidar_rotation": frame.sensor_to_lidar[view, :3, :3].copy(),
                "sensor2lidar_translation": frame.sensor_to_lidar[view, :3, 3].copy(),
            }
        occupancy = self.occupancy_root / f"scene_{scene_token}" / "occupancy" / f"{lidar_token}.npy"
        write_sparse_occupancy(occupancy, frame.labels)
        files.append(occupancy)
        info = {
            "token": frame.token,
            "scene_token": scene_token,
            "lidar_token": lidar_token,
            "timestamp": time.time_ns() // 1000,  # microseconds, as nuScenes; infos are read in this order
            "cams": cams,
            "occscene_frame_id": frame.frame_id,
        }
        self.info_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(info_path, pickle.dumps(info, protocol=pickle.HIGHEST_PROTOCOL))
        files.append(info_path)
        return {"token": frame.token, "split": self.SPLIT, "files": files}

    def finalize(self) -> Path | None:
        """Rebuild ``nuscenes_occ_infos_val.pkl`` from every frame's info (atomically); ``None`` if there is none.

        Call it once all ranks have written (the prediction writer does, on rank 0, when predict ends). The result is
        checked by loading it back with the reader's :func:`~occscene_pl.data.nuscenes_occupancy.load_infos`.
        """
        if not self.info_dir.is_dir():
            return None
        infos = [self._read_info(path) for path in sorted(self.info_dir.glob("*.pkl"))]
        if not infos:
            return None
        data = {"infos": infos, "metadata": {"version": "occscene-generated", "generator": "occscene-pl"}}
        atomic_write(self.info_file, pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
        load_infos(self.info_file, CAMERA_NAMES)
        return self.info_file

    @staticmethod
    def _read_info(path: Path) -> dict[str, Any]:
        try:
            with path.open("rb") as handle:
                info = pickle.load(handle)
        except (OSError, pickle.UnpicklingError, EOFError) as err:
            raise ValueError(f"nuscenes_occupancy export: frame info {path} is not readable ({err})") from err
        if not isinstance(info, dict):
            raise ValueError(f"nuscenes_occupancy export: frame info {path} holds a {type(info).__name__}, not a dict")
        return info
