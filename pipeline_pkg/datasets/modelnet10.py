"""ModelNet10 (Wu et al., CVPR 2015): 4,899 CAD meshes of 10 furniture categories, 3,991 for training and
908 for testing, from the Princeton 3D ShapeNets archive ModelNet10.zip.

The archive holds ModelNet10/<class>/{train,test}/<class>_NNNN.off (besides macOS metadata, which is
skipped). Each mesh is read from the archive by Open3D after repairing the broken header many ModelNet
files have (see mesh_io.repair_off_header), `points` points are sampled on its surface ("uniform":
area-weighted; "poisson": evenly spread) and the cloud is centred and scaled into the unit sphere, stored
as float32 (N, points, 3). The models are aligned upright with z up; the clouds are turned to y up, the
axis convention of the point-cloud layout (and of the ModelNet40 HDF5 release).

`max_per_class` keeps only the first meshes of each class and split (by file number), for a quick run.
A mesh's points are drawn from a seed made of the data seed and the mesh's path, so they do not depend on
which other meshes are built. Both splits are shuffled with the data seed (the archive groups by class).
"""

from __future__ import annotations

import re
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from ..download import RemoteFile
from ..h5io import CorruptFileError
from ..pointcloud import normalize_unit_sphere
from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment
from .mesh_io import SAMPLING_METHODS, derived_seed, read_off, sample_surface

ARCHIVE_NAME = "ModelNet10.zip"
ARCHIVE_URL = "http://3dvision.princeton.edu/projects/2014/3DShapeNets/ModelNet10.zip"
# sha256 of the archive as pinned by CompressAI's ModelNet loader (InterDigitalInc/CompressAI:
# compressai/datasets/pointcloud/modelnet.py), which checks the download from ARCHIVE_URL against it; its
# ModelNet40.zip value there agrees with TensorFlow Graphics'. Read at call time so tests can replace it.
ARCHIVE_SHA256 = "9d8679435fc07d1d26f13009878db164a7aa8ea5e7ea3c8880e42794b7307d51"

CLASSES = ["bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand", "sofa", "table", "toilet"]
SPLITS = {"train": 0, "test": 1}
_MESH = re.compile(r"ModelNet10/([a-z_]+)/(train|test)/\1_(\d+)\.off")


@DATASETS.register("modelnet10")
class ModelNet10(Dataset):
    modality = "pointcloud"
    generated = False
    defaults = {
        "url": ARCHIVE_URL,  # the archive, or a mirror of it (e.g. on your cluster)
        "points": 1024,  # points sampled per mesh
        "sampling": "uniform",  # "uniform" (area-weighted random) or "poisson" (evenly spread)
        "max_per_class": None,  # keep at most this many meshes per class and split (None: all)
        "augment": ["scale", "shift", "jitter"],  # device augmentations the trainer applies
    }

    def check(self) -> None:
        url = self.params["url"]
        self.require(isinstance(url, str) and url != "", "url", "must be the archive's URL")
        points = self.params["points"]
        self.require(isinstance(points, int) and not isinstance(points, bool) and points >= 1, "points",
                     "must be a positive integer")
        self.require(self.sampling in SAMPLING_METHODS, "sampling", f"must be one of {list(SAMPLING_METHODS)}")
        cap = self.params["max_per_class"]
        self.require(cap is None or (isinstance(cap, int) and not isinstance(cap, bool) and cap >= 1),
                     "max_per_class", "must be a positive integer, or null for every mesh")
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
            members = _mesh_members(zf, archive, self.max_per_class)
            x_train, y_train = self._split(zf, archive, "train", members["train"], seed)
            x_test, y_test = self._split(zf, archive, "test", members["test"], seed)
        return DatasetArrays(x_train, y_train, x_test, y_test, list(CLASSES))

    def _split(self, zf: zipfile.ZipFile, archive: Path, split: str, members: list[tuple[str, int]],
               seed: int) -> tuple[np.ndarray, np.ndarray]:
        points = int(self.points)
        clouds = np.empty((len(members), points, 3), dtype=np.float64)
        for i, (member, _) in enumerate(members):
            try:
                vertices, triangles = read_off(_read(zf, archive, member), member)
            except ValueError as exc:
                raise _corrupt(archive, str(exc)) from exc
            try:
                cloud = sample_surface(vertices, triangles, points, self.sampling,
                                       derived_seed(seed, zlib.crc32(member.encode())))
            except ValueError as exc:
                raise _corrupt(archive, f"{member}: {exc}") from exc
            # z up -> y up: (x, y, z) -> (x, z, -y), a rotation, so no shape is mirrored.
            clouds[i] = np.stack([cloud[:, 0], cloud[:, 2], -cloud[:, 1]], axis=1)
        x = normalize_unit_sphere(torch.from_numpy(clouds)).numpy().astype(np.float32)
        y = np.asarray([label for _, label in members], dtype=np.int64)
        order = np.random.default_rng([seed, SPLITS[split]]).permutation(len(y))
        return np.ascontiguousarray(x[order]), y[order]


def _corrupt(archive: Path, why: str) -> CorruptFileError:
    return CorruptFileError(f"cannot read {archive} ({why}); it is not the ModelNet10 archive or is "
                            f"damaged: delete it and rerun the download job")


def _read(zf: zipfile.ZipFile, archive: Path, member: str) -> bytes:
    try:
        return zf.read(member)
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise _corrupt(archive, f"{member}: {exc}") from exc


def _mesh_members(zf: zipfile.ZipFile, archive: Path, cap: int | None) -> dict[str, list[tuple[str, int]]]:
    """The mesh members of each split with their labels, by class and file number, at most `cap` a class."""
    found: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for name in zf.namelist():
        match = _MESH.fullmatch(name)
        if match is None:
            continue
        cls, split, number = match.groups()
        if cls not in CLASSES:
            raise _corrupt(archive, f"{name} is of class {cls!r}, not one of the ModelNet10 classes {CLASSES}")
        found.setdefault((split, cls), []).append((int(number), name))
    members: dict[str, list[tuple[str, int]]] = {}
    for split in SPLITS:
        members[split] = [(name, label) for label, cls in enumerate(CLASSES)
                          for _, name in sorted(found.get((split, cls), []))[:cap]]
        if not members[split]:
            raise _corrupt(archive, f"no ModelNet10/<class>/{split}/<class>_NNNN.off meshes")
    return members
