"""OpenOccupancy's (and mmdet3d's) nuScenes-Occupancy reading logic, transcribed to plain Python/NumPy for tests.

Transcribed from OpenOccupancy, https://github.com/JeffWang987/OpenOccupancy, commit
eafd14f54b3044f7fe2734c660caab9e4b06b340:

* ``projects/occ_plugin/datasets/nuscenes_occ_dataset.py``: ``NuscOCCDataset.__init__`` (sorting, interval) and
  ``get_data_info``;
* ``projects/occ_plugin/datasets/pipelines/loading_bevdet.py``: ``LoadMultiViewImageFromFiles_BEVDet.get_inputs``
  (test mode: what it reads) and ``get_sensor2lidar_transformation`` (sequential mode's camera keys);
* ``projects/occ_plugin/datasets/pipelines/loading.py``: ``LoadOccupancy.__call__`` and ``nb_process_label``;
* ``projects/configs/baselines/CAM-R50_img1600_128x128x10.py``: paths and ``data_config['cams']``;

and from mmdetection3d v0.17 (the version OpenOccupancy pins), https://github.com/open-mmlab/mmdetection3d,
``mmdet3d/datasets/nuscenes_dataset.py``: ``NuScenesDataset.load_annotations`` and ``get_ann_info``
(Copyright (c) OpenMMLab).

Licensed under the Apache License, Version 2.0 (the "License"); you may not use this file except in compliance with
the License. You may obtain a copy of the License at http://www.apache.org/licenses/LICENSE-2.0. Unless required by
applicable law or agreed to in writing, software distributed under the License is distributed on an "AS IS" BASIS,
WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied. See the License for the specific language
governing permissions and limitations under the License.

Changes made here: ``mmcv.load`` is our restricted unpickler (:func:`occscene_pl.native_export.load_info_pickle`);
torch tensors are NumPy arrays; the numba ``nb_process_label`` is a Python loop; the BEV augmentation matrix is the
test-time identity; pyquaternion's ``Quaternion(w, x, y, z).rotation_matrix`` is :func:`quaternion_rotation_matrix`;
image augmentation, normalisation, ``LiDARInstance3DBoxes`` and the visibility branch of ``LoadOccupancy`` (off in
every released config) are left out.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from PIL import Image

from occscene_pl.native_export import load_info_pickle

# CAM-R50_img1600_128x128x10.py
OCC_PATH = "./data/nuScenes-Occupancy"
DEPTH_GT_PATH = "./data/depth_gt"
TRAIN_ANN_FILE = "./data/nuscenes/nuscenes_occ_infos_train.pkl"
VAL_ANN_FILE = "./data/nuscenes/nuscenes_occ_infos_val.pkl"
DATA_CONFIG_CAMS = ["CAM_FRONT_LEFT", "CAM_FRONT", "CAM_FRONT_RIGHT", "CAM_BACK_LEFT", "CAM_BACK", "CAM_BACK_RIGHT"]
MODALITY = dict(use_lidar=False, use_camera=True, use_radar=False, use_map=False, use_external=False)
CLASSES = ("car", "truck", "trailer", "bus", "construction_vehicle", "bicycle", "motorcycle", "pedestrian",
           "traffic_cone", "barrier")  # fmt: skip


def quaternion_rotation_matrix(w: float, x: float, y: float, z: float) -> np.ndarray:
    """pyquaternion's ``Quaternion(w, x, y, z).rotation_matrix`` (it normalises first)."""
    q = np.array([w, x, y, z], dtype=np.float64)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)],
        ]
    )


# ---- mmdet3d NuScenesDataset -----------------------------------------------------------------------------------
def load_annotations(ann_file: str, load_interval: int = 1) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """Load annotations from ann_file: (data_infos sorted by timestamps, metadata, version)."""
    # loading data from a file-like object needs file format
    data = load_info_pickle(ann_file)  # mmcv.load(ann_file, file_format='pkl')
    data_infos = list(sorted(data["infos"], key=lambda e: e["timestamp"]))
    data_infos = data_infos[::load_interval]
    metadata = data["metadata"]
    version = metadata["version"]
    return data_infos, metadata, version


def get_ann_info(info: dict[str, Any], use_valid_flag: bool = True, with_velocity: bool = True) -> dict[str, Any]:
    """Get annotation info (boxes as an (N, 9) array instead of LiDARInstance3DBoxes)."""
    # filter out bbox containing no points
    if use_valid_flag:  # noqa: SIM108
        mask = info["valid_flag"]
    else:
        mask = info["num_lidar_pts"] > 0
    gt_bboxes_3d = info["gt_boxes"][mask]
    gt_names_3d = info["gt_names"][mask]
    gt_labels_3d = []
    for cat in gt_names_3d:
        if cat in CLASSES:
            gt_labels_3d.append(CLASSES.index(cat))
        else:
            gt_labels_3d.append(-1)
    gt_labels_3d = np.array(gt_labels_3d)
    if with_velocity:
        gt_velocity = info["gt_velocity"][mask]
        nan_mask = np.isnan(gt_velocity[:, 0])
        gt_velocity[nan_mask] = [0.0, 0.0]
        gt_bboxes_3d = np.concatenate([gt_bboxes_3d, gt_velocity], axis=-1)
    return dict(gt_bboxes_3d=gt_bboxes_3d, gt_labels_3d=gt_labels_3d, gt_names=gt_names_3d)


# ---- NuscOCCDataset ----------------------------------------------------------------------------------------------
class NuscOCCDataset:
    """``NuscOCCDataset(occ_size, pc_range, occ_root, ann_file=..., modality=...)`` without the mmdet3d base."""

    def __init__(self, occ_size: list[int], pc_range: list[float], occ_root: str, ann_file: str) -> None:
        self.load_interval = 1
        self.modality = MODALITY
        self.data_infos, self.metadata, self.version = load_annotations(ann_file, self.load_interval)
        self.data_infos = list(sorted(self.data_infos, key=lambda e: e["timestamp"]))
        self.data_infos = self.data_infos[:: self.load_interval]
        self.occ_size = occ_size
        self.pc_range = pc_range
        self.occ_root = occ_root
        self.data_root = "data/nuscenes/"

    def __len__(self) -> int:
        return len(self.data_infos)

    def get_data_info(self, index: int) -> dict[str, Any]:
        info = self.data_infos[index]
        # standard protocal modified from SECOND.Pytorch
        input_dict: dict[str, Any] = dict(
            sample_idx=info["token"],
            pts_filename=info["lidar_path"],
            sweeps=info["sweeps"],
            lidar2ego_translation=info["lidar2ego_translation"],
            lidar2ego_rotation=info["lidar2ego_rotation"],
            ego2global_translation=info["ego2global_translation"],
            ego2global_rotation=info["ego2global_rotation"],
            prev_idx=info["prev"],
            next_idx=info["next"],
            scene_token=info["scene_token"],
            can_bus=info["can_bus"],
            # frame_idx=info['frame_idx'],
            timestamp=info["timestamp"] / 1e6,
            occ_size=np.array(self.occ_size),
            pc_range=np.array(self.pc_range),
            lidar_token=info["lidar_token"],
            lidarseg=info["lidarseg"],
            curr=info,
        )
        if self.modality["use_camera"]:
            image_paths = []
            lidar2img_rts = []
            lidar2cam_rts = []
            cam_intrinsics = []
            lidar2cam_dic = {}
            for cam_type, cam_info in info["cams"].items():
                image_paths.append(cam_info["data_path"])
                # obtain lidar to image transformation matrix
                lidar2cam_r = np.linalg.inv(cam_info["sensor2lidar_rotation"])
                lidar2cam_t = cam_info["sensor2lidar_translation"] @ lidar2cam_r.T
                lidar2cam_rt = np.eye(4)
                lidar2cam_rt[:3, :3] = lidar2cam_r.T
                lidar2cam_rt[3, :3] = -lidar2cam_t
                intrinsic = cam_info["cam_intrinsic"]
                viewpad = np.eye(4)
                viewpad[: intrinsic.shape[0], : intrinsic.shape[1]] = intrinsic
                lidar2img_rt = viewpad @ lidar2cam_rt.T
                lidar2img_rts.append(lidar2img_rt)
                cam_intrinsics.append(viewpad)
                lidar2cam_rts.append(lidar2cam_rt.T)
                lidar2cam_dic[cam_type] = lidar2cam_rt.T
            input_dict.update(
                dict(
                    img_filename=image_paths,
                    lidar2img=lidar2img_rts,
                    cam_intrinsic=cam_intrinsics,
                    lidar2cam=lidar2cam_rts,
                    lidar2cam_dic=lidar2cam_dic,
                )
            )
        if self.modality["use_lidar"]:
            # FIXME alter lidar path
            input_dict["pts_filename"] = input_dict["pts_filename"].replace("./data/nuscenes/", self.data_root)
            for sw in input_dict["sweeps"]:
                sw["data_path"] = sw["data_path"].replace("./data/nuscenes/", self.data_root)
        return input_dict


# ---- LoadMultiViewImageFromFiles_BEVDet ------------------------------------------------------------------------
def load_multiview_images(results: dict[str, Any], load_depth: bool = True) -> dict[str, Any]:
    """What ``get_inputs`` reads (test mode, no augmentation): images, intrinsics, sensor2lidar, depth points."""
    imgs, rots, trans, intrins, gt_depths = [], [], [], [], []
    for cam_name in DATA_CONFIG_CAMS:
        cam_data = results["curr"]["cams"][cam_name]
        filename = cam_data["data_path"]
        img = Image.open(filename)
        intrin = np.asarray(cam_data["cam_intrinsic"], dtype=np.float32)
        # from camera to lidar
        sensor2lidar = np.linalg.inv(np.asarray(results["lidar2cam_dic"][cam_name])).astype(np.float32)
        rot = sensor2lidar[:3, :3]
        tran = sensor2lidar[:3, 3]
        if load_depth:
            img_file_path = results["curr"]["cams"][cam_name]["data_path"]
            file_name = os.path.split(img_file_path)[-1]
            point_depth = np.fromfile(
                os.path.join(DEPTH_GT_PATH, f"{file_name}.bin"), dtype=np.float32, count=-1
            ).reshape(-1, 3)
            gt_depths.append(point_depth)
        imgs.append(np.array(img))
        intrins.append(intrin)
        rots.append(rot)
        trans.append(tran)
    results["cam_names"] = DATA_CONFIG_CAMS
    results["img_inputs"] = dict(imgs=imgs, rots=rots, trans=trans, intrins=intrins, gt_depths=gt_depths)
    return results


def get_sensor2lidar_transformation(cam_info: dict[str, Any], cam_name: str, sample_info: dict[str, Any]) -> np.ndarray:
    """Sequential mode's camera -> LiDAR transform from the quaternion keys."""

    def pose(rotation: Any, translation: Any) -> np.ndarray:
        w, x, y, z = rotation
        matrix = np.zeros((4, 4))
        matrix[3, 3] = 1
        matrix[:3, :3] = quaternion_rotation_matrix(w, x, y, z)
        matrix[:3, -1] = translation
        return matrix

    cam = cam_info["cams"][cam_name]
    # sweep sensor to sweep ego
    sweepsensor2sweepego = pose(cam["sensor2ego_rotation"], cam["sensor2ego_translation"])
    # sweep ego to global
    sweepego2global = pose(cam["ego2global_rotation"], cam["ego2global_translation"])
    # global to lidar ego
    lidarego2global = pose(sample_info["ego2global_rotation"], sample_info["ego2global_translation"])
    global2lidarego = np.linalg.inv(lidarego2global)
    # lidar ego to lidar
    lidar2ego = pose(sample_info["lidar2ego_rotation"], sample_info["lidar2ego_translation"])
    ego2lidar = np.linalg.inv(lidar2ego)
    # camera to lidar
    sweepsensor2lidar = ego2lidar @ global2lidarego @ sweepego2global @ sweepsensor2sweepego
    return sweepsensor2lidar


# ---- LoadOccupancy -------------------------------------------------------------------------------------------
def nb_process_label(processed_label: np.ndarray, sorted_label_voxel_pair: np.ndarray) -> np.ndarray:
    label_size = 256
    counter = np.zeros((label_size,), dtype=np.uint16)
    counter[sorted_label_voxel_pair[0, 3]] = 1
    cur_sear_ind = sorted_label_voxel_pair[0, :3]
    for i in range(1, sorted_label_voxel_pair.shape[0]):
        cur_ind = sorted_label_voxel_pair[i, :3]
        if not np.all(np.equal(cur_ind, cur_sear_ind)):
            processed_label[cur_sear_ind[0], cur_sear_ind[1], cur_sear_ind[2]] = np.argmax(counter)
            counter = np.zeros((label_size,), dtype=np.uint16)
            cur_sear_ind = cur_ind
        counter[sorted_label_voxel_pair[i, 3]] += 1
    processed_label[cur_sear_ind[0], cur_sear_ind[1], cur_sear_ind[2]] = np.argmax(counter)
    return processed_label


def load_occupancy(
    results: dict[str, Any],
    occ_path: str = OCC_PATH,
    grid_size: tuple[int, int, int] = (512, 512, 40),
    pc_range: tuple[float, ...] = (-51.2, -51.2, -5.0, 51.2, 51.2, 3.0),
    unoccupied: int = 0,
) -> dict[str, Any]:
    """``LoadOccupancy(occ_path=..., grid_size=..., pc_range=..., unoccupied=0)(results)`` at test time."""
    grid = np.array(grid_size)
    pc = np.array(pc_range)
    voxel_size = (pc[3:] - pc[:3]) / grid
    bda_mat = np.eye(3, dtype=np.float32)  # LoadAnnotationsBEVDepth, is_train=False
    rel_path = "scene_{0}/occupancy/{1}.npy".format(results["scene_token"], results["lidar_token"])  # noqa: UP030, UP032
    #  [z y x cls] or [z y x vx vy vz cls]
    pcd = np.load(os.path.join(occ_path, rel_path))
    pcd_label = pcd[..., -1:]
    pcd_label[pcd_label == 0] = 255
    pcd_np_cor = (pcd[..., [2, 1, 0]] + 0.5) * voxel_size[None, :] + pc[:3][None, :]  # voxel2world, x y z
    # bevdet augmentation
    pcd_np_cor = (bda_mat @ pcd_np_cor.astype(np.float32)[..., None])[..., 0]
    pcd_np_cor = (pcd_np_cor - pc[:3][None, :]) / voxel_size[None, :]  # world2voxel
    # make sure the point is in the grid
    pcd_np_cor = np.clip(pcd_np_cor, np.array([0, 0, 0]), grid - 1)
    pcd_np = np.concatenate([pcd_np_cor, pcd_label], axis=-1)
    # 255: noise, 1-16 normal classes, 0 unoccupied
    pcd_np = pcd_np[np.lexsort((pcd_np_cor[:, 0], pcd_np_cor[:, 1], pcd_np_cor[:, 2])), :]
    pcd_np = pcd_np.astype(np.int64)
    processed_label = np.ones(grid, dtype=np.uint8) * unoccupied
    processed_label = nb_process_label(processed_label, pcd_np)
    results["gt_occ"] = processed_label
    return results
