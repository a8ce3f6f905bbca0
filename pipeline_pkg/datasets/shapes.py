"""`shapes`: a small point-cloud dataset generated from a seed, so the offline default config and the tests
have a point-cloud task without any download.

Ten classes, one per Open3D mesh primitive (the class names): box, sphere, cylinder, cone, torus,
icosahedron, octahedron, tetrahedron, arrow, mobius. Each primitive is first put upright (its axis along
y, the up axis of the point-cloud layout), centred and scaled into the unit sphere. Every sample then
  * stretches the mesh by independent factors along x, y and z (anisotropic scale),
  * samples `points` points on its surface ("uniform": area-weighted; "poisson": evenly spread),
  * bends the points smoothly: a taper and a twist along y, and a low-frequency sinusoidal displacement,
  * turns them by a random angle about y,
  * and is centred and scaled so its farthest point lies on the unit sphere,
stored as float32 (N, points, 3). The distortions make classes overlap a little (a stretched sphere is an
ellipsoid, a twisted box is no longer flat-sided), so a small network learns the task well but not
perfectly at once.

Reproducibility: each sample draws from its own generator, seeded by (data seed, split, class, index), and
Open3D's generator is seeded before each Poisson-disk sampling, so one seed gives byte-identical arrays.
Both splits are shuffled with the seed, so any slice holds a mix of classes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..pointcloud import normalize_unit_sphere
from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment
from .mesh_io import SAMPLING_METHODS, derived_seed, sample_surface

CLASSES = ["box", "sphere", "cylinder", "cone", "torus", "icosahedron", "octahedron", "tetrahedron",
           "arrow", "mobius"]
SPLITS = {"train": 0, "test": 1}  # part of every sample's seed: the two splits never share a sample

# Ranges of the random distortions, per sample.
SCALE_RANGE = (0.6, 1.4)  # factor along each axis
TAPER_MAX = 0.3  # width changes by up to ±30% per unit of height
TWIST_MAX = 0.6  # radians of twist per unit of height
WAVE_AMPLITUDE_MAX = 0.05  # displacement of the sinusoidal bend, per axis
WAVE_FREQUENCY_STD = 1.5  # spatial frequency (radians per unit) of that bend


def _primitive(name: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangles of one Open3D primitive, upright along y, centred, inside the unit sphere."""
    import open3d as o3d

    make = {
        "box": o3d.geometry.TriangleMesh.create_box,
        "sphere": o3d.geometry.TriangleMesh.create_sphere,
        "cylinder": o3d.geometry.TriangleMesh.create_cylinder,
        "cone": o3d.geometry.TriangleMesh.create_cone,
        "torus": o3d.geometry.TriangleMesh.create_torus,
        "icosahedron": o3d.geometry.TriangleMesh.create_icosahedron,
        "octahedron": o3d.geometry.TriangleMesh.create_octahedron,
        "tetrahedron": o3d.geometry.TriangleMesh.create_tetrahedron,
        "arrow": o3d.geometry.TriangleMesh.create_arrow,
        "mobius": o3d.geometry.TriangleMesh.create_mobius,
    }[name]
    mesh = make()
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    # Open3D builds its solids of revolution along z: (x, y, z) -> (x, z, -y) stands them up along y.
    vertices = np.stack([vertices[:, 0], vertices[:, 2], -vertices[:, 1]], axis=1)
    vertices -= (vertices.min(axis=0) + vertices.max(axis=0)) / 2
    vertices /= np.linalg.norm(vertices, axis=1).max()
    return vertices, np.asarray(mesh.triangles, dtype=np.int64)


def _bend(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A smooth random deformation: taper and twist along y, then a sinusoidal displacement."""
    x, y, z = points.T
    taper = 1 + rng.uniform(-TAPER_MAX, TAPER_MAX) * y
    angle = rng.uniform(-TWIST_MAX, TWIST_MAX) * y
    cos, sin = np.cos(angle), np.sin(angle)
    x, z = taper * (cos * x - sin * z), taper * (sin * x + cos * z)
    bent = np.stack([x, y, z], axis=1)
    frequencies = rng.normal(0, WAVE_FREQUENCY_STD, (3, 3))  # one wave vector per displaced axis
    phases = rng.uniform(0, 2 * np.pi, 3)
    amplitudes = rng.uniform(0, WAVE_AMPLITUDE_MAX, 3)
    return bent + amplitudes * np.sin(bent @ frequencies.T + phases)


def _turn_about_y(points: np.ndarray, angle: float) -> np.ndarray:
    cos, sin = np.cos(angle), np.sin(angle)
    x, y, z = points.T
    return np.stack([cos * x + sin * z, y, -sin * x + cos * z], axis=1)


def shape_sample(vertices: np.ndarray, triangles: np.ndarray, points: int, sampling: str,
                 seed: int) -> np.ndarray:
    """One distorted cloud (points, 3) float64 of a canonical primitive, before normalisation."""
    rng = np.random.default_rng(seed)
    stretched = vertices * rng.uniform(*SCALE_RANGE, size=3)
    cloud = sample_surface(stretched, triangles, points, sampling, int(rng.integers(2**31)))
    return _turn_about_y(_bend(cloud, rng), rng.uniform(0, 2 * np.pi))


@DATASETS.register("shapes")
class Shapes(Dataset):
    modality = "pointcloud"
    generated = True
    files = []
    defaults = {
        "points": 256,  # points per cloud
        "train_per_class": 60,
        "test_per_class": 20,
        "sampling": "uniform",  # "uniform" (area-weighted random) or "poisson" (evenly spread)
        "augment": ["scale", "shift", "jitter"],  # device augmentations the trainer applies
    }

    def check(self) -> None:
        for key, least in (("points", 16), ("train_per_class", 1), ("test_per_class", 1)):
            value = self.params[key]
            self.require(isinstance(value, int) and not isinstance(value, bool) and value >= least, key,
                         f"must be an integer >= {least}")
        self.require(self.sampling in SAMPLING_METHODS, "sampling", f"must be one of {list(SAMPLING_METHODS)}")
        check_augment(self)

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        meshes = [_primitive(name) for name in CLASSES]
        x_train, y_train = self._split(meshes, "train", int(self.train_per_class), seed)
        x_test, y_test = self._split(meshes, "test", int(self.test_per_class), seed)
        return DatasetArrays(x_train, y_train, x_test, y_test, list(CLASSES))

    def _split(self, meshes: list[tuple[np.ndarray, np.ndarray]], split: str, per_class: int,
               seed: int) -> tuple[np.ndarray, np.ndarray]:
        clouds, labels = [], []
        for label, (vertices, triangles) in enumerate(meshes):
            for index in range(per_class):
                sample_seed = derived_seed(seed, SPLITS[split], label, index)
                clouds.append(shape_sample(vertices, triangles, int(self.points), self.sampling, sample_seed))
                labels.append(label)
        x = normalize_unit_sphere(torch.from_numpy(np.stack(clouds))).numpy().astype(np.float32)
        y = np.asarray(labels, dtype=np.int64)
        order = np.random.default_rng([seed, SPLITS[split]]).permutation(len(y))
        return np.ascontiguousarray(x[order]), y[order]
