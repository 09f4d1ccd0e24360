"""MonoScene's SemanticKITTI reading logic, transcribed to plain Python/NumPy for tests.

Transcribed from MonoScene, https://github.com/astra-vision/MonoScene, commit
f52bbb18c55cdbf1da991a9bee54d2a5cffa8dda:

* ``monoscene/data/semantic_kitti/io_data.py``: ``unpack``, ``_read_SemKITTI``, ``_read_label_SemKITTI``,
  ``_read_invalid_SemKITTI``, ``get_remap_lut`` (itself from LMSCNet);
* ``monoscene/data/semantic_kitti/semantic-kitti.yaml``: ``learning_map``;
* ``monoscene/data/semantic_kitti/preprocess.py``: the per-frame body of ``main`` (the ``1_1`` target);
* ``monoscene/data/semantic_kitti/kitti_dataset.py``: ``KittiDataset.__init__``, the reading part of
  ``__getitem__`` and ``read_calib``;
* ``monoscene/data/utils/helpers.py``: ``vox2pix``; ``monoscene/data/utils/fusion.py``: ``TSDFVolume.vox2world``,
  ``TSDFVolume.cam2pix``, ``rigid_transform`` (from tsdf-fusion-python).

Copyright the MonoScene authors. Licensed under the Apache License, Version 2.0 (the "License"); you may not use
this file except in compliance with the License. You may obtain a copy of the License at
http://www.apache.org/licenses/LICENSE-2.0. Unless required by applicable law or agreed to in writing, software
distributed under the License is distributed on an "AS IS" BASIS, WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND,
either express or implied. See the License for the specific language governing permissions and limitations under
the License.

Changes made here: ``np.array(img, dtype=np.float32, copy=False)`` (NumPy 1 semantics) is ``np.asarray``; the
numba ``prange`` loops of ``vox2world`` and ``cam2pix`` are written as the equivalent NumPy expressions (same float32
arithmetic, ``np.round`` then integer); the YAML file is replaced by its ``learning_map`` as a dict; Hydra's config
is replaced by arguments; torchvision's normalisation, colour jitter, the flip, the ``1_8`` target, local frustums and
the CP mega matrix (not reading logic) are left out.
"""

from __future__ import annotations

import glob
import os
from typing import Any

import numpy as np
from PIL import Image

# semantic-kitti.yaml, learning_map
LEARNING_MAP = {
    0: 0, 1: 0, 10: 1, 11: 2, 13: 5, 15: 3, 16: 5, 18: 4, 20: 5, 30: 6, 31: 7, 32: 8, 40: 9, 44: 10, 48: 11,
    49: 12, 50: 13, 51: 14, 52: 0, 60: 9, 70: 15, 71: 16, 72: 17, 80: 18, 81: 19, 99: 0, 252: 1, 253: 7, 254: 6,
    255: 8, 256: 5, 257: 5, 258: 4, 259: 5,
}  # fmt: skip


# ---- io_data.py -------------------------------------------------------------------------------------------------
def unpack(compressed: np.ndarray) -> np.ndarray:
    """given a bit encoded voxel grid, make a normal voxel grid out of it."""
    uncompressed = np.zeros(compressed.shape[0] * 8, dtype=np.uint8)
    uncompressed[::8] = compressed[:] >> 7 & 1
    uncompressed[1::8] = compressed[:] >> 6 & 1
    uncompressed[2::8] = compressed[:] >> 5 & 1
    uncompressed[3::8] = compressed[:] >> 4 & 1
    uncompressed[4::8] = compressed[:] >> 3 & 1
    uncompressed[5::8] = compressed[:] >> 2 & 1
    uncompressed[6::8] = compressed[:] >> 1 & 1
    uncompressed[7::8] = compressed[:] & 1
    return uncompressed


def _read_SemKITTI(path: str, dtype: Any, do_unpack: bool) -> np.ndarray:  # noqa: N802
    bin = np.fromfile(path, dtype=dtype)  # Flattened array
    if do_unpack:
        bin = unpack(bin)
    return bin


def _read_label_SemKITTI(path: str) -> np.ndarray:  # noqa: N802
    label = _read_SemKITTI(path, dtype=np.uint16, do_unpack=False).astype(np.float32)
    return label


def _read_invalid_SemKITTI(path: str) -> np.ndarray:  # noqa: N802
    invalid = _read_SemKITTI(path, dtype=np.uint8, do_unpack=True)
    return invalid


def get_remap_lut() -> np.ndarray:
    """remap_lut to remap classes of semantic kitti for training..."""
    dataset_config = {"learning_map": LEARNING_MAP}
    # make lookup table for mapping
    maxkey = max(dataset_config["learning_map"].keys())
    # +100 hack making lut bigger just in case there are unknown labels
    remap_lut = np.zeros((maxkey + 100), dtype=np.int32)
    remap_lut[list(dataset_config["learning_map"].keys())] = list(dataset_config["learning_map"].values())
    # in completion we have to distinguish empty and invalid voxels.
    # Important: For voxels 0 corresponds to "empty" and not "unlabeled".
    remap_lut[remap_lut == 0] = 255  # map 0 to 'invalid'
    remap_lut[0] = 0  # only 'empty' stays 'empty'.
    return remap_lut


# ---- preprocess.py (main, scale 1_1) -----------------------------------------------------------------------------
def preprocess(kitti_root: str, kitti_preprocess_root: str) -> list[str]:
    """Write ``labels/<SS>/<frame>_1_1.npy`` for sequences 00-10; returns the files written."""
    sequences = ["00", "01", "02", "03", "04", "05", "06", "07", "08", "09", "10"]
    remap_lut = get_remap_lut()
    written = []
    for sequence in sequences:
        sequence_path = os.path.join(kitti_root, "dataset", "sequences", sequence)
        label_paths = sorted(glob.glob(os.path.join(sequence_path, "voxels", "*.label")))
        invalid_paths = sorted(glob.glob(os.path.join(sequence_path, "voxels", "*.invalid")))
        out_dir = os.path.join(kitti_preprocess_root, "labels", sequence)
        os.makedirs(out_dir, exist_ok=True)
        for i in range(len(label_paths)):
            frame_id, extension = os.path.splitext(os.path.basename(label_paths[i]))
            LABEL = _read_label_SemKITTI(label_paths[i])  # noqa: N806
            INVALID = _read_invalid_SemKITTI(invalid_paths[i])  # noqa: N806
            LABEL = remap_lut[LABEL.astype(np.uint16)].astype(np.float32)  # noqa: N806
            LABEL[np.isclose(INVALID, 1)] = 255  # Setting to unknown all voxels marked on invalid mask...
            LABEL = LABEL.reshape([256, 256, 32])  # noqa: N806
            label_filename = os.path.join(out_dir, frame_id + "_1_1.npy")
            np.save(label_filename, LABEL)
            written.append(label_filename)
    return written


# ---- fusion.py -------------------------------------------------------------------------------------------------
def vox2world(vol_origin: np.ndarray, vox_coords: np.ndarray, vox_size: float) -> np.ndarray:
    """Convert voxel grid coordinates to world coordinates (offsets 0.5)."""
    vol_origin = vol_origin.astype(np.float32)
    vox_coords = vox_coords.astype(np.float32)
    return (vol_origin[None] + np.float32(vox_size) * vox_coords + np.float32(vox_size) * np.float32(0.5)).astype(
        np.float32
    )


def cam2pix(cam_pts: np.ndarray, intr: np.ndarray) -> np.ndarray:
    """Convert camera coordinates to pixel coordinates."""
    intr = intr.astype(np.float32)
    fx, fy = intr[0, 0], intr[1, 1]
    cx, cy = intr[0, 2], intr[1, 2]
    pix = np.empty((cam_pts.shape[0], 2), dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore"):
        pix[:, 0] = np.round((cam_pts[:, 0] * fx / cam_pts[:, 2]) + cx).astype(np.int64)
        pix[:, 1] = np.round((cam_pts[:, 1] * fy / cam_pts[:, 2]) + cy).astype(np.int64)
    return pix


def rigid_transform(xyz: np.ndarray, transform: np.ndarray) -> np.ndarray:
    """Applies a rigid transform to an (N, 3) pointcloud."""
    xyz_h = np.hstack([xyz, np.ones((len(xyz), 1), dtype=np.float32)])
    xyz_t_h = np.dot(transform, xyz_h.T).T
    return xyz_t_h[:, :3]


# ---- helpers.py ----------------------------------------------------------------------------------------------
def vox2pix(
    cam_E: np.ndarray,  # noqa: N803
    cam_k: np.ndarray,
    vox_origin: np.ndarray,
    voxel_size: float,
    img_W: int,  # noqa: N803
    img_H: int,  # noqa: N803
    scene_size: tuple[float, float, float],
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """compute the 2D projection of voxels centroids"""
    # Compute the x, y, z bounding of the scene in meter
    vol_bnds = np.zeros((3, 2))
    vol_bnds[:, 0] = vox_origin
    vol_bnds[:, 1] = vox_origin + np.array(scene_size)
    # Compute the voxels centroids in lidar cooridnates
    vol_dim = np.ceil((vol_bnds[:, 1] - vol_bnds[:, 0]) / voxel_size).copy(order="C").astype(int)
    xv, yv, zv = np.meshgrid(range(vol_dim[0]), range(vol_dim[1]), range(vol_dim[2]), indexing="ij")
    vox_coords = np.concatenate([xv.reshape(1, -1), yv.reshape(1, -1), zv.reshape(1, -1)], axis=0).astype(int).T
    # Project voxels'centroid from lidar coordinates to camera coordinates
    cam_pts = vox2world(vox_origin, vox_coords, voxel_size)
    cam_pts = rigid_transform(cam_pts, cam_E)
    # Project camera coordinates to pixel positions
    projected_pix = cam2pix(cam_pts, cam_k)
    pix_x, pix_y = projected_pix[:, 0], projected_pix[:, 1]
    # Eliminate pixels outside view frustum
    sensor_distance = cam_pts[:, 2]
    fov_mask = np.logical_and(
        pix_x >= 0,
        np.logical_and(pix_x < img_W, np.logical_and(pix_y >= 0, np.logical_and(pix_y < img_H, sensor_distance > 0))),
    )
    return projected_pix, fov_mask, sensor_distance


# ---- kitti_dataset.py ----------------------------------------------------------------------------------------
class KittiDataset:
    """MonoScene's SemanticKITTI dataset: enumeration, calibration, 3D-2D mapping, targets and image."""

    def __init__(self, split: str, root: str, preprocess_root: str, project_scale: int = 2) -> None:
        self.root = root
        self.label_root = os.path.join(preprocess_root, "labels")
        self.n_classes = 20
        splits = {
            "train": ["00", "01", "02", "03", "04", "05", "06", "07", "09", "10"],
            "val": ["08"],
            "test": ["11", "12", "13", "14", "15", "16", "17", "18", "19", "20", "21"],
        }
        self.split = split
        self.sequences = splits[split]
        self.project_scale = project_scale
        self.output_scale = int(self.project_scale / 2)
        self.scene_size = (51.2, 51.2, 6.4)
        self.vox_origin = np.array([0, -25.6, -2])
        self.voxel_size = 0.2  # 0.2m
        self.img_W = 1220
        self.img_H = 370
        self.scans = []
        for sequence in self.sequences:
            calib = self.read_calib(os.path.join(self.root, "dataset", "sequences", sequence, "calib.txt"))
            P = calib["P2"]  # noqa: N806
            T_velo_2_cam = calib["Tr"]  # noqa: N806
            proj_matrix = P @ T_velo_2_cam
            glob_path = os.path.join(self.root, "dataset", "sequences", sequence, "voxels", "*.bin")
            for voxel_path in glob.glob(glob_path):
                self.scans.append(
                    {
                        "sequence": sequence,
                        "P": P,
                        "T_velo_2_cam": T_velo_2_cam,
                        "proj_matrix": proj_matrix,
                        "voxel_path": voxel_path,
                    }
                )

    def __getitem__(self, index: int) -> dict[str, Any]:
        scan = self.scans[index]
        voxel_path = scan["voxel_path"]
        sequence = scan["sequence"]
        P = scan["P"]  # noqa: N806
        T_velo_2_cam = scan["T_velo_2_cam"]  # noqa: N806
        proj_matrix = scan["proj_matrix"]
        filename = os.path.basename(voxel_path)
        frame_id = os.path.splitext(filename)[0]
        rgb_path = os.path.join(self.root, "dataset", "sequences", sequence, "image_2", frame_id + ".png")
        data: dict[str, Any] = {
            "frame_id": frame_id,
            "sequence": sequence,
            "P": P,
            "T_velo_2_cam": T_velo_2_cam,
            "proj_matrix": proj_matrix,
        }
        scale_3ds = [self.output_scale, self.project_scale]
        data["scale_3ds"] = scale_3ds
        cam_k = P[0:3, 0:3]
        data["cam_k"] = cam_k
        for scale_3d in scale_3ds:
            # compute the 3D-2D mapping
            projected_pix, fov_mask, sensor_distance = vox2pix(
                T_velo_2_cam,
                cam_k,
                self.vox_origin,
                self.voxel_size * scale_3d,
                self.img_W,
                self.img_H,
                self.scene_size,
            )
            data[f"projected_pix_{scale_3d}"] = projected_pix
            data[f"sensor_distance_{scale_3d}"] = sensor_distance
            data[f"fov_mask_{scale_3d}"] = fov_mask
        target_1_path = os.path.join(self.label_root, sequence, frame_id + "_1_1.npy")
        target = np.load(target_1_path)
        data["target"] = target
        img = Image.open(rgb_path).convert("RGB")
        # PIL to numpy
        img = np.asarray(img, dtype=np.float32) / 255.0  # np.array(..., copy=False) in NumPy 1
        img = img[:370, :1220, :]  # crop image
        data["img"] = img
        return data

    def __len__(self) -> int:
        return len(self.scans)

    @staticmethod
    def read_calib(calib_path: str) -> dict[str, np.ndarray]:
        """Modify from pykitti/utils.py (read_calib_file)."""
        calib_all = {}
        with open(calib_path) as f:
            for line in f.readlines():
                if line == "\n":
                    break
                key, value = line.split(":", 1)
                calib_all[key] = np.array([float(x) for x in value.split()])
        # reshape matrices
        calib_out = {}
        # 3x4 projection matrix for left camera
        calib_out["P2"] = calib_all["P2"].reshape(3, 4)
        calib_out["Tr"] = np.identity(4)  # 4x4 matrix
        calib_out["Tr"][:3, :4] = calib_all["Tr"].reshape(3, 4)
        return calib_out
