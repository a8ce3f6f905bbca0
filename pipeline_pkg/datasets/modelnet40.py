"""ModelNet40 (Wu et al., CVPR 2015) in the HDF5 release of PointNet (Qi et al., CVPR 2017): 2048 points
sampled from each of 12,308 CAD models of 40 object categories, 9,840 for training and 2,468 for testing.

The archive modelnet40_ply_hdf5_2048.zip holds one folder, modelnet40_ply_hdf5_2048/, with
  * ply_data_train0..4.h5 and ply_data_test0..1.h5: each has `data`, float32 (n, 2048, 3), and `label`,
    uint8 (n, 1), besides per-point normals and face ids that are not used here;
  * train_files.txt and test_files.txt: the h5 files of each split, one path a line, in order;
  * shape_names.txt: the 40 class names, alphabetical, one a line (label 8 is chair, 35 toilet).
The h5 files are read straight from the archive (nothing is extracted) and concatenated in the order the
listings give; the clouds are already shuffled. Each cloud is cut to its first `points` farthest points
(farthest point sampling from point 0, deterministic) and centred and scaled into the unit sphere,
stored as float32 (N, points, 3). The y axis is up. The sampling runs on the CPU, so that the result is
the same with or without a GPU, and takes a few minutes for the whole release.
"""

from __future__ import annotations

import io
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import h5py
import numpy as np
import torch

from ..download import RemoteFile
from ..h5io import CorruptFileError
from ..pointcloud import farthest_point_sample, normalize_unit_sphere
from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment

ARCHIVE_NAME = "modelnet40_ply_hdf5_2048.zip"
ARCHIVE_URL = "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip"
# sha256 of the archive (435,212,151 bytes) as registered by TensorFlow Graphics when downloading it from
# ARCHIVE_URL (tensorflow/graphics: tensorflow_graphics/datasets/modelnet40/checksums.tsv). Read at call
# time (not copied into a class attribute) so tests can point it at a fixture archive.
ARCHIVE_SHA256 = "07670e237db72ece0f723b9abb571534c9ad655a6456b389646587dc72bb8bae"

FOLDER = "modelnet40_ply_hdf5_2048"
SHAPE_NAMES = "shape_names.txt"
TRAIN_LIST = "train_files.txt"
TEST_LIST = "test_files.txt"
SOURCE_POINTS = 2048
# Clouds per farthest-point-sampling batch: small enough for the (chunk, 2048, 3) temporaries to stay in
# the CPU cache (256 is several times slower per cloud), large enough to amortise the per-step overhead.
FPS_CHUNK = 64


@DATASETS.register("modelnet40")
class ModelNet40(Dataset):
    modality = "pointcloud"
    generated = False
    defaults = {
        "url": ARCHIVE_URL,  # the archive, or a mirror of it (e.g. on your cluster)
        "points": 1024,  # points kept per cloud (farthest point sampling of the 2048)
        "augment": ["scale", "shift", "jitter"],  # device augmentations the trainer applies
    }

    def check(self) -> None:
        url = self.params["url"]
        self.require(isinstance(url, str) and url != "", "url", "must be the archive's URL")
        points = self.params["points"]
        self.require(isinstance(points, int) and not isinstance(points, bool) and 1 <= points <= SOURCE_POINTS,
                     "points", f"must be an integer in [1, {SOURCE_POINTS}] (the release has {SOURCE_POINTS} "
                               "points per cloud)")
        check_augment(self)

    @property
    def files(self) -> list[RemoteFile]:  # type: ignore[override]
        return [RemoteFile(ARCHIVE_NAME, self.params["url"], sha256=ARCHIVE_SHA256)]

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        archive = self.verified_archive(raw_dir)
        try:
            zf = zipfile.ZipFile(archive)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise _corrupt(archive, str(exc)) from exc
        with zf:
            class_names = _lines(zf, archive, SHAPE_NAMES)
            x_train, y_train = _split(zf, archive, TRAIN_LIST, len(class_names))
            x_test, y_test = _split(zf, archive, TEST_LIST, len(class_names))
        points = int(self.points)
        return DatasetArrays(subsample(x_train, points), y_train, subsample(x_test, points), y_test,
                             class_names)


def subsample(x: np.ndarray, count: int) -> np.ndarray:
    """Farthest point sampling of `count` points per cloud, then the unit sphere; in chunks of clouds."""
    out = np.empty((len(x), count, 3), dtype=np.float32)
    for start in range(0, len(x), FPS_CHUNK):
        chunk = torch.from_numpy(np.ascontiguousarray(x[start:start + FPS_CHUNK], dtype=np.float32))
        if count < chunk.shape[1]:
            chunk = farthest_point_sample(chunk, count)
        out[start:start + len(chunk)] = normalize_unit_sphere(chunk).numpy()
    return out


def _corrupt(archive: Path, why: str) -> CorruptFileError:
    return CorruptFileError(f"cannot read {archive} ({why}); it is not the ModelNet40 HDF5 release or is "
                            f"damaged: delete it and rerun the download job")


def _read(zf: zipfile.ZipFile, archive: Path, name: str) -> bytes:
    member = f"{FOLDER}/{name}"
    try:
        return zf.read(member)
    except KeyError as exc:
        raise _corrupt(archive, f"no member {member}") from exc
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise _corrupt(archive, f"{member}: {exc}") from exc


def _lines(zf: zipfile.ZipFile, archive: Path, name: str) -> list[str]:
    try:
        text = _read(zf, archive, name).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _corrupt(archive, f"{FOLDER}/{name} is not text: {exc}") from exc
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise _corrupt(archive, f"{FOLDER}/{name} is empty")
    return lines


def _split(zf: zipfile.ZipFile, archive: Path, listing: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    # The listings give paths from the authors' tree ("data/modelnet40_ply_hdf5_2048/ply_data_train0.h5"):
    # only the file name locates the member.
    parts = [_h5_member(zf, archive, PurePosixPath(path).name, num_classes) for path in _lines(zf, archive, listing)]
    return np.concatenate([x for x, _ in parts]), np.concatenate([y for _, y in parts])


def _h5_member(zf: zipfile.ZipFile, archive: Path, name: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    member = f"{FOLDER}/{name}"
    content = _read(zf, archive, name)
    try:
        with h5py.File(io.BytesIO(content), "r") as f:
            missing = [key for key in ("data", "label") if key not in f]
            if missing:
                raise _corrupt(archive, f"{member} lacks {missing}")
            data, label = f["data"][()], f["label"][()]
    except CorruptFileError:
        raise
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise _corrupt(archive, f"{member} is not a readable HDF5 file: {exc}") from exc
    if not (data.ndim == 3 and data.shape[1:] == (SOURCE_POINTS, 3) and np.issubdtype(data.dtype, np.floating)):
        raise _corrupt(archive, f"{member}: data is {data.dtype} {data.shape}, not float (n, {SOURCE_POINTS}, 3)")
    label = label.reshape(-1)
    if not (len(label) == len(data) and np.issubdtype(label.dtype, np.integer)
            and (len(label) == 0 or 0 <= label.min() <= label.max() < num_classes)):
        raise _corrupt(archive, f"{member}: label is not {len(data)} integers in [0, {num_classes})")
    return data.astype(np.float32, copy=False), label.astype(np.int64)
