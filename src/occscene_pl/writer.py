"""The predict-time writer of generated samples (``docs/design.md`` §9.1).

Every sample of ``predict_step``'s output (a list of :class:`~occscene_pl.samples.GeneratedSample`, see
:meth:`GenerationWriter.write_sample`) becomes a folder ``<output_dir>/<frame_id>/``::

    image.png                      the generated image (V == 1), or image_0.png ... image_{V-1}.png
    occupancy.npz                  labels (X, Y, Z) uint8, [condition (X, Y, Z) uint8], [probabilities (C, X, Y, Z)
                                   float16], voxel_origin, voxel_size, intrinsics (V, 3, 3), voxel_to_camera (V, 4, 4)
    occupancy.png                  image | perceived occupancy from camera 0 | bird's-eye view [; a second row with
                                   the condition's camera view and bird's-eye view, in layout mode]
    meta.json                      prompt, seed, mode, frame_id, the sample's meta, the file list, exports,
                                   checkpoint, package version, creation time

Each file is written atomically (hidden temporary file + ``os.replace``), and ``meta.json`` last: a sample is
complete when its ``meta.json`` exists and every file it lists does (:meth:`GenerationWriter.is_complete`), so an
interrupted run resumes where it stopped: before each predict step the writer removes the batch's completed samples
(:meth:`GenerationWriter.on_predict_batch_start`), so they are not generated again. Optional native exports
(:mod:`occscene_pl.native_export`) are written under ``<output_dir>/<export name>/`` before ``meta.json`` and are
listed in it.
"""

from __future__ import annotations

import json
import math
import zipfile
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.callbacks import BasePredictionWriter
from tqdm import tqdm

import occscene_pl
from occscene_pl.data.base import select_rows
from occscene_pl.files import atomic_write
from occscene_pl.native_export import (
    NativeExporter,
    NuScenesOccupancyExporter,
    SemanticKittiExporter,
    check_image_size,
    check_split,
    png_bytes,
)
from occscene_pl.render import palette, render_occupancy_figure
from occscene_pl.samples import GeneratedSample
from occscene_pl.samples import check_frame_id as _check_safe_name

__all__ = ["GenerationWriter", "SUPPORTED_EXPORTS", "check_frame_id", "write_npz"]

_EXPORTERS: dict[str, Callable[..., NativeExporter]] = {
    exporter.name: exporter for exporter in (SemanticKittiExporter, NuScenesOccupancyExporter)
}
SUPPORTED_EXPORTS: tuple[str, ...] = tuple(_EXPORTERS)
META_FILE = "meta.json"


def check_frame_id(frame_id: Any) -> str:
    r"""Return ``frame_id`` if it is a safe folder name, else raise a ``ValueError`` naming it.

    Rejected: non-strings, empty ids, path separators (``/``, ``\``), NUL, ids starting with ``.`` (``.``, ``..``
    and hidden temporary files), and the export folder names (``semantic_kitti``, ``nuscenes_occupancy``).
    """
    return _check_safe_name(frame_id, reserved=SUPPORTED_EXPORTS)


def write_npz(file: IO[bytes], arrays: Mapping[str, np.ndarray], stored: Sequence[str] = ()) -> None:
    """Write an ``.npz`` archive (``np.load`` reads it) with every array deflated except those in ``stored``.

    Perceiver probabilities hardly compress (about 6 %) but would cost seconds per sample to deflate, so they are
    stored as they are; labels shrink about tenfold.
    """
    with zipfile.ZipFile(file, "w", allowZip64=True) as archive:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy")
            info.compress_type = zipfile.ZIP_STORED if name in stored else zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=True) as entry:
                np.lib.format.write_array(entry, np.asanyarray(array), allow_pickle=False)


def _json_default(value: Any) -> Any:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"meta value of type {type(value).__name__} is not JSON-serialisable: {value!r}")


class GenerationWriter(BasePredictionWriter):
    """Writes generated samples (images, occupancy, pictures, metadata) atomically, one folder per ``frame_id``.

    Resume is the writer's alone: before every predict step it removes the samples it already completed from the
    batch (:meth:`on_predict_batch_start`, unless ``overwrite``), so ``predict_step`` only sees work still to do; it
    also skips complete samples it is handed. Its output folder is resolved in :meth:`setup`.

    Args:
        output_dir: where sample folders go; ``None`` means ``<trainer.default_root_dir>/predictions``.
        save_probabilities: also store the perceiver's ``probabilities`` (float16) in ``occupancy.npz``.
        render: write ``occupancy.png``.
        export: native dataset layouts to also write, from ``["semantic_kitti", "nuscenes_occupancy"]``
            (:mod:`occscene_pl.native_export`), under ``<output_dir>/<name>/``. ``nuscenes_occupancy`` builds its
            info pickle when predict ends.
        export_split: the split the exports fill: ``"val"`` (KITTI sequence 08, ``nuscenes_occ_infos_val.pkl``) or
            ``"train"`` (MonoScene's training sequences, ``nuscenes_occ_infos_train.pkl``) to train on generated
            data. Samples exported under other options are re-exported (and leave their old place).
        semantic_kitti_sequences: KITTI sequence numbers to fill, one per distinct camera (e.g. ``["00"]``); each in
            ``export_split``'s MonoScene sequences or 22..99. ``None``: the split's sequences, then 22..99.
        semantic_kitti_image_size: ``[W, H]`` of the exported KITTI images; ``[1220, 370]`` is what MonoScene's
            crop and field-of-view masks assume (the image is scaled to cover it and centre-cropped, the intrinsics
            in ``calib.txt`` follow). ``None`` keeps the generated size.
        nuscenes_occupancy_image_size: ``[W, H]`` of the exported nuScenes views, e.g. ``[1600, 900]``; ``None``
            keeps the generated size.
        overwrite: re-write samples that are already complete.
        class_names: class names, index = train id; sets the picture palette (``palette(len(class_names))``) and is
            stored in ``meta.json`` and ``occupancy.npz``. ``None`` takes the module's ``class_names`` at setup (the
            names linked from the DataModule), else the default palette.
        progress: show a progress bar of samples written/skipped (rank 0, and only if the trainer has one).
    """

    def __init__(
        self,
        output_dir: str | None = None,
        save_probabilities: bool = False,
        render: bool = True,
        export: Sequence[str] = (),
        export_split: str = "val",
        semantic_kitti_sequences: Sequence[str] | None = None,
        semantic_kitti_image_size: Sequence[int] | None = None,
        nuscenes_occupancy_image_size: Sequence[int] | None = None,
        overwrite: bool = False,
        class_names: Sequence[str] | None = None,
        progress: bool = True,
    ) -> None:
        super().__init__(write_interval="batch")
        if isinstance(export, str):
            export = [export]
        unknown = [name for name in export if name not in SUPPORTED_EXPORTS]
        if unknown:
            raise ValueError(f"unknown export format(s) {unknown}; supported: {list(SUPPORTED_EXPORTS)}")
        self.output_dir = output_dir
        self.save_probabilities = save_probabilities
        self.render = render
        self.export: list[str] = list(dict.fromkeys(export))
        self.export_split = check_split(export_split, "export_split")
        kitti_size = check_image_size(semantic_kitti_image_size, "semantic_kitti_image_size")
        nuscenes_size = check_image_size(nuscenes_occupancy_image_size, "nuscenes_occupancy_image_size")
        for option, value, name in (
            ("semantic_kitti_sequences", semantic_kitti_sequences, "semantic_kitti"),
            ("semantic_kitti_image_size", kitti_size, "semantic_kitti"),
            ("nuscenes_occupancy_image_size", nuscenes_size, "nuscenes_occupancy"),
        ):
            if value is not None and name not in self.export:
                raise ValueError(f"{option} is set but export {self.export} does not include {name!r}")
        if isinstance(semantic_kitti_sequences, str | int):
            semantic_kitti_sequences = [semantic_kitti_sequences]
        sequences = None if semantic_kitti_sequences is None else list(semantic_kitti_sequences)
        SemanticKittiExporter.check_sequences(self.export_split, sequences)
        self._export_options: dict[str, dict[str, Any]] = {
            "semantic_kitti": {"split": self.export_split, "sequences": sequences, "image_size": kitti_size},
            "nuscenes_occupancy": {"split": self.export_split, "image_size": nuscenes_size},
        }
        self.overwrite = overwrite
        self.class_names: list[str] | None = list(class_names) if class_names is not None else None
        self.colors = palette(len(self.class_names)) if self.class_names else None
        self.progress = progress
        self.written = 0
        self.skipped = 0
        self._root: Path | None = Path(output_dir).expanduser() if output_dir is not None else None
        self._bar: Any = None
        self._exporters: dict[str, NativeExporter] = {}

    # ------------------------------------------------------------------------------------------------------------
    # Locations and completion
    # ------------------------------------------------------------------------------------------------------------

    def resolve_output_dir(self, trainer: pl.Trainer) -> Path:
        """Fix the output folder from ``trainer`` (``output_dir``, else ``<default_root_dir>/predictions``)."""
        if self.output_dir is not None:
            root = Path(self.output_dir).expanduser()
        else:
            root = Path(trainer.default_root_dir).expanduser() / "predictions"
        if root != self._root:
            self._exporters = {}
        self._root = root
        return root

    @property
    def root(self) -> Path:
        """The resolved output folder."""
        if self._root is None:
            raise RuntimeError(
                "GenerationWriter has no output folder yet: give output_dir, or call setup() / resolve_output_dir()"
            )
        return self._root

    def sample_dir(self, frame_id: str) -> Path:
        """``<output_dir>/<frame_id>`` (``frame_id`` is validated by :func:`check_frame_id`)."""
        return self.root / check_frame_id(frame_id)

    def is_complete(self, frame_id: str) -> bool:
        """Whether ``frame_id`` is completely on disk.

        Complete means: ``meta.json`` readable, every file it lists present, and every export this writer is
        configured for recorded there with the same options (split, sequences, image size), so enabling an export or
        changing its options re-writes older samples.
        """
        directory = self.sample_dir(frame_id)
        try:
            meta = json.loads((directory / META_FILE).read_text(encoding="utf-8"))
            files = [directory / name for name in meta["files"]]
            exports = meta.get("exports", {})
            for name in self.export:
                if not self._exporter(name).matches(exports[name]):
                    return False
                files.extend(self.root / path for path in exports[name]["files"])
        except (OSError, ValueError, KeyError, TypeError):
            return False
        return all(path.is_file() for path in files)

    def should_skip(self, frame_id: str) -> bool:
        """Whether generating ``frame_id`` is unnecessary: it is complete and ``overwrite`` is off."""
        return not self.overwrite and self.is_complete(frame_id)

    # ------------------------------------------------------------------------------------------------------------
    # Lightning hooks
    # ------------------------------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Resolve the output folder and, when no ``class_names`` were given, take the module's."""
        super().setup(trainer, pl_module, stage)
        self.resolve_output_dir(trainer)
        module_names = getattr(pl_module, "class_names", None)
        if self.class_names is None and module_names:
            self.class_names = [str(name) for name in module_names]
            self.colors = palette(len(self.class_names))

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Resolve the output folder, reset the written/skipped counts and open the progress bar."""
        self.resolve_output_dir(trainer)
        self.written = self.skipped = 0
        self._close_bar()
        if self.progress and trainer.is_global_zero and getattr(trainer, "progress_bar_callback", None) is not None:
            self._bar = tqdm(total=_predict_total(trainer), desc="Writing samples", unit="sample", dynamic_ncols=True)

    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        """Resume: remove the samples this writer already completed from ``batch``, in place, before ``predict_step``.

        Lightning hands this same object to ``predict_step``, which then generates the remaining rows only (possibly
        none: every list and tensor of the batch then has length 0). A batch that is not a dict with a ``frame_id``
        list is left alone. Removed samples count as skipped.
        """
        if self.overwrite or not isinstance(batch, dict) or "frame_id" not in batch:
            return
        frame_ids = [str(f) for f in batch["frame_id"]]
        keep = [i for i, frame_id in enumerate(frame_ids) if not self.should_skip(frame_id)]
        if len(keep) == len(frame_ids):
            return
        batch.update(select_rows(batch, keep))
        self._advance(skipped=len(frame_ids) - len(keep))

    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Close the progress bar and, with exports, wait for every rank and :meth:`finalize` them on rank 0."""
        self._close_bar()
        if not self.export:
            return
        strategy = getattr(trainer, "strategy", None)
        if strategy is not None:
            strategy.barrier("GenerationWriter.finalize")  # every rank's samples are on disk
        if trainer.is_global_zero:
            self.finalize()

    def finalize(self) -> None:
        """Complete the exports that gather all samples (``nuscenes_occupancy``'s info pickle); run once, rank 0."""
        for name in self.export:
            self._exporter(name).finalize()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Close the progress bar (also when prediction stopped early)."""
        self._close_bar()

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Write every sample of ``prediction`` (a list of :class:`GeneratedSample`; ``None`` writes nothing)."""
        if prediction is None:
            return
        if not isinstance(prediction, list | tuple):
            raise TypeError(
                f"GenerationWriter expects predict_step to return a list of GeneratedSample, got "
                f"{type(prediction).__name__}"
            )
        for sample in prediction:
            if not isinstance(sample, GeneratedSample):
                raise TypeError(f"each prediction must be a GeneratedSample, got {type(sample).__name__}")
            if self.should_skip(sample.frame_id):
                self._advance(skipped=1)
            else:
                self.write_sample(sample, trainer)
                self._advance(written=1)

    def _advance(self, written: int = 0, skipped: int = 0) -> None:
        self.written += written
        self.skipped += skipped
        if self._bar is not None:
            self._bar.update(written + skipped)
            self._bar.set_postfix(written=self.written, skipped=self.skipped, refresh=False)

    def _close_bar(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # ------------------------------------------------------------------------------------------------------------
    # Writing one sample
    # ------------------------------------------------------------------------------------------------------------

    def write_sample(self, sample: GeneratedSample, trainer: pl.Trainer | None = None) -> Path:
        """Write one sample (unconditionally) and return its folder.

        Args:
            sample: The sample (validated on construction).
            trainer: supplies ``ckpt_path`` for ``meta.json``.

        Raises:
            TypeError: ``sample`` is not a :class:`GeneratedSample`.
            ValueError: a ``frame_id`` reserved for an export folder, labels beyond ``class_names``, or a sample an
                export cannot hold; nothing is written then.
        """
        if not isinstance(sample, GeneratedSample):
            raise TypeError(f"write_sample takes a GeneratedSample, got {type(sample).__name__}")
        frame_id = check_frame_id(sample.frame_id)
        self._check_classes(sample)
        prepared = {name: self._exporter(name).prepare(sample) for name in self.export}
        directory = self.sample_dir(frame_id)
        directory.mkdir(parents=True, exist_ok=True)
        # The sample is incomplete from here until the new meta.json lands.
        (directory / META_FILE).unlink(missing_ok=True)
        files: list[str] = []

        def put(name: str, data: bytes) -> None:
            atomic_write(directory / name, data)
            files.append(name)

        views = sample.pixels
        for v, image in enumerate(views):
            put("image.png" if len(views) == 1 else f"image_{v}.png", png_bytes(image))
        arrays: dict[str, np.ndarray] = {
            "labels": sample.labels,
            "voxel_origin": sample.voxel_origin,
            "voxel_size": np.asarray(sample.voxel_size, dtype=np.float32),
            "intrinsics": sample.intrinsics,
            "voxel_to_camera": sample.voxel_to_camera,
        }
        if sample.condition is not None:
            arrays["condition"] = sample.condition
        if self.save_probabilities and sample.probabilities is not None:
            arrays["probabilities"] = sample.probabilities
        if self.class_names is not None:
            arrays["class_names"] = np.asarray(self.class_names, dtype=str)
        atomic_write(directory / "occupancy.npz", lambda f: write_npz(f, arrays, stored=("probabilities",)))
        files.append("occupancy.npz")
        if self.render:
            put("occupancy.png", png_bytes(self._figure(sample)))
        exports: dict[str, Any] = {}
        for name, frame in prepared.items():
            record = self._exporters[name].write(frame)
            record["files"] = [path.relative_to(self.root).as_posix() for path in record["files"]]
            exports[name] = record
        ckpt = getattr(trainer, "ckpt_path", None) if trainer is not None else None
        meta = {
            "frame_id": frame_id,
            "prompt": sample.prompt,
            "seed": sample.seed,
            "mode": sample.mode,
            "meta": sample.meta,
            "files": files,
            "exports": exports,
            "num_views": sample.views,
            "image_size": list(sample.image_size),
            "grid_size": list(sample.grid_size),
            "class_names": self.class_names,
            "checkpoint": str(ckpt) if ckpt is not None else None,
            "package_version": occscene_pl.__version__,
            "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        text = json.dumps(meta, indent=2, default=_json_default, allow_nan=True).encode("utf-8")
        atomic_write(directory / META_FILE, text)
        return directory

    def _exporter(self, name: str) -> NativeExporter:
        if name not in self._exporters:
            self._exporters[name] = _EXPORTERS[name](self.root / name, **self._export_options[name])
        return self._exporters[name]

    def _check_classes(self, sample: GeneratedSample) -> None:
        """Refuse labels (and condition labels) beyond the configured ``class_names``; 255 is always allowed."""
        classes = len(self.colors) if self.colors is not None else 256
        for name, grid in (("labels", sample.labels), ("condition", sample.condition)):
            known = np.zeros(0) if grid is None else grid[grid != 255]
            if known.size and int(known.max()) >= classes:
                raise ValueError(
                    f"sample {sample.frame_id!r}: {name} has label {int(known.max())} but only {classes} class_names "
                    "are given"
                )

    def _figure(self, sample: GeneratedSample) -> np.ndarray:
        """``occupancy.png``: image | occupancy | BEV, and below it the condition's two panels, right-aligned."""
        image = sample.pixels[0]
        camera = (sample.voxel_origin, sample.voxel_size, sample.intrinsics[0], sample.voxel_to_camera[0])
        top = render_occupancy_figure(sample.labels, *camera, sample.image_size, colors=self.colors, image=image)
        if sample.condition is None:
            return top
        bottom = render_occupancy_figure(sample.condition, *camera, sample.image_size, colors=self.colors)
        gap = 4
        canvas = np.full((top.shape[0] + gap + bottom.shape[0], max(top.shape[1], bottom.shape[1]), 3), 255, np.uint8)
        canvas[: top.shape[0], : top.shape[1]] = top
        canvas[top.shape[0] + gap :, canvas.shape[1] - bottom.shape[1] :] = bottom
        return canvas


def _predict_total(trainer: pl.Trainer) -> int | None:
    """Samples this rank will see: the predict datasets' length split over the ranks, if known."""
    loaders = getattr(trainer, "predict_dataloaders", None)
    if loaders is None:
        return None
    total = 0
    for loader in loaders if isinstance(loaders, list | tuple) else [loaders]:
        try:
            total += len(loader.dataset)
        except (AttributeError, TypeError):
            return None
    return math.ceil(total / max(1, int(getattr(trainer, "world_size", 1))))
