"""The SemanticKITTI export of generated samples (``docs/design.md`` §9.2).

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
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from occscene_pl.data.semantic_kitti import (
    SemanticKittiDataset,
    read_calib,
    train_to_raw,
    write_calib,
    write_voxel_frame,
)
from occscene_pl.files import atomic_write
from occscene_pl.native_export.common import (
    check_image_size,
    check_split,
    create_exclusive,
    png_bytes,
    rebased_transform,
    record_size,
)
from occscene_pl.native_export.resample import fit_view
from occscene_pl.samples import GeneratedSample

__all__ = ["SemanticKittiExporter"]

_NUM_STEMS = 10**6
_VOXEL_SUFFIXES = ("bin", "label", "invalid", "occluded")  # .bin first: it enumerates frames
_CAMERA_CLAIM = ".occscene_camera"  # a sequence's camera (calib.txt text), claimed by exclusive create


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
        """Check the options (see the class docstring); nothing is written yet."""
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
            "image_size": record_size(self.image_size),
            "crop_size": [int(width), int(height)],  # the reader's crop_size=(W, H)
            "files": [seq_dir / "calib.txt", image_path, *voxels, index_file],
        }

    def matches(self, record: Any) -> bool:
        """Whether a frame's export ``record`` (as :meth:`write` returned it) was written with these options."""
        return (
            isinstance(record, dict)
            and record.get("split", "val") == self.split
            and record.get("sequence") in self.sequences
            and record.get("image_size") == record_size(self.image_size)
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
