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
"""

from __future__ import annotations

import hashlib
import io
import os
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from occscene_pl.data.semantic_kitti import (
    SemanticKittiDataset,
    read_calib,
    train_to_raw,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.files import atomic_write

__all__ = ["SemanticKittiExporter", "create_exclusive", "png_bytes"]

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
        transform = np.asarray(voxel_to_camera[0], dtype=np.float64)
        if not np.allclose(transform[3], [0.0, 0.0, 0.0, 1.0]):
            raise ValueError(f"{what}: voxel_to_camera's last row must be [0, 0, 0, 1], got {transform[3].tolist()}")
        shift = np.eye(4)
        offset = np.asarray(voxel_origin, np.float64) - np.asarray(SemanticKittiDataset.VOXEL_ORIGIN)
        # Float32 copies of the reader's own origin (-25.6 -> -25.6000004) must not perturb Tr.
        shift[:3, 3] = np.where(np.abs(offset) < 1e-4, 0.0, offset)
        p2 = np.zeros((3, 4))
        p2[:, :3] = np.asarray(intrinsics[0], dtype=np.float64)
        return _KittiFrame(frame_id, raw, invalid, (labels != 0) & ~invalid, image[0], p2, transform @ shift)

    def write(self, frame: _KittiFrame) -> list[Path]:
        """Write one prepared frame (image first, ``.bin`` last), every file atomically.

        Returns:
            The files that make up the frame: its ``calib.txt``, image, four voxel files and index entry.
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
        return [seq_dir / "calib.txt", image_path, *voxels, index_file]

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
