"""Triangle meshes to point clouds, for the point-cloud datasets built from meshes (`shapes`, `modelnet10`):
reading OFF files (with the header repair ModelNet needs) and sampling points on a mesh's surface.

Sampling is reproducible from an integer seed: "uniform" draws area-weighted points with numpy, "poisson"
uses Open3D's Poisson-disk sampling (evenly spread points) after seeding Open3D's own generator.

Open3D is imported inside the functions: the training code imports this package on machines without it.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

SAMPLING_METHODS = ("uniform", "poisson")
_SEED_RANGE = 2**31  # Open3D takes the seed as a C int


def repair_off_header(data: bytes) -> bytes:
    """Put an OFF file's counts line back on a line of its own.

    Many ModelNet files run the counts into the keyword ("OFF1234 567 0" instead of "OFF" then
    "1234 567 0"); Open3D rejects that header with only a warning and returns an empty mesh. Files with a
    correct header come back unchanged."""
    if not data.startswith(b"OFF"):
        return data
    end = data.find(b"\n")
    first_line = data[3:] if end < 0 else data[3:end]
    if first_line.strip() == b"":
        return data
    return b"OFF\n" + data[3:].lstrip(b" \t")


def read_off(data: bytes, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (V, 3) float64 and triangles (T, 3) int64 of an OFF file's bytes (after repair_off_header),
    read by Open3D, which splits polygons into triangles. ValueError naming `name` if nothing is read."""
    import open3d as o3d

    with tempfile.TemporaryDirectory() as scratch:
        # Open3D reads meshes from paths only.
        path = Path(scratch) / "mesh.off"
        path.write_bytes(repair_off_header(data))
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            mesh = o3d.io.read_triangle_mesh(str(path))
    vertices = np.asarray(mesh.vertices, dtype=np.float64)
    triangles = np.asarray(mesh.triangles, dtype=np.int64)
    if len(vertices) == 0 or len(triangles) == 0:
        raise ValueError(f"{name}: no triangle mesh could be read from it (not an OFF file, or a damaged one)")
    return vertices, triangles


def triangle_areas(vertices: np.ndarray, triangles: np.ndarray) -> np.ndarray:
    a, b, c = (vertices[triangles[:, k]] for k in range(3))
    return 0.5 * np.linalg.norm(np.cross(b - a, c - a), axis=1)


def sample_uniform(vertices: np.ndarray, triangles: np.ndarray, count: int,
                   rng: np.random.Generator) -> np.ndarray:
    """`count` points (count, 3) drawn uniformly over the surface: a triangle with probability proportional
    to its area, then a uniform point in it (square-root barycentric trick)."""
    areas = triangle_areas(vertices, triangles)
    total = areas.sum()
    if not np.isfinite(total) or total <= 0:
        raise ValueError("the mesh has no surface area to sample")
    picked = triangles[rng.choice(len(triangles), size=count, p=areas / total)]
    r1, r2 = rng.random((2, count, 1))
    root = np.sqrt(r1)
    a, b, c = (vertices[picked[:, k]] for k in range(3))
    return (1 - root) * a + root * (1 - r2) * b + root * r2 * c


def sample_surface(vertices: np.ndarray, triangles: np.ndarray, count: int, method: str,
                   seed: int) -> np.ndarray:
    """`count` surface points (count, 3) float64 by `method` ("uniform" or "poisson"), reproducible from
    `seed` (a non-negative int)."""
    if method == "uniform":
        return sample_uniform(vertices, triangles, count, np.random.default_rng(seed))
    if method == "poisson":
        import open3d as o3d

        if triangle_areas(vertices, triangles).sum() <= 0:
            raise ValueError("the mesh has no surface area to sample")
        mesh = o3d.geometry.TriangleMesh(o3d.utility.Vector3dVector(vertices),
                                         o3d.utility.Vector3iVector(triangles.astype(np.int32)))
        # Open3D's first, uniform pass draws from its own global generator: seed it for every mesh.
        o3d.utility.random.seed(int(seed) % _SEED_RANGE)
        with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
            points = np.asarray(mesh.sample_points_poisson_disk(count).points, dtype=np.float64)
        if points.shape != (count, 3):
            raise ValueError(f"Poisson-disk sampling returned {len(points)} points instead of {count}")
        return points
    raise ValueError(f"unknown sampling method {method!r}; use one of {list(SAMPLING_METHODS)}")


def derived_seed(*keys: int) -> int:
    """A seed for one sample, drawn from the dataset seed and the sample's identity (class, index, file),
    so that a sample's points do not depend on which other samples are built."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint32)[0])
