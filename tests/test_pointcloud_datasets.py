"""The point-cloud datasets: `shapes` generated from a seed, `modelnet40` from a tiny archive in the exact
layout of the HDF5 release and `modelnet10` from a tiny archive of OFF meshes, both served over real HTTP
on 127.0.0.1, plus the repair of the broken OFF headers that ModelNet is known for."""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from http_server import TestServer, closed_port_url

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.datasets import mesh_io, modelnet10, modelnet40, shapes
from pipeline_pkg.download import ChecksumError, download
from pipeline_pkg.h5io import CorruptFileError
from pipeline_pkg.registry import DATASETS

FAST = {"retries": 2, "backoff": 0.01, "timeout": 5.0, "progress": False}


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def assert_unit_sphere(x: np.ndarray) -> None:
    assert np.allclose(x.mean(axis=1), 0, atol=1e-5)
    assert np.allclose(np.linalg.norm(x, axis=-1).max(axis=1), 1, atol=1e-5)


# --------------------------------------------------------------------------------------------------
# shapes

SMALL = {"points": 64, "train_per_class": 4, "test_per_class": 2}


def d2_descriptor(x: np.ndarray, bins: int = 16) -> np.ndarray:
    """Histogram of the distances between all point pairs (Osada et al.'s D2 shape distribution)."""
    dist = np.linalg.norm(x[:, :, None] - x[:, None], axis=-1)
    upper = np.triu_indices(x.shape[1], 1)
    return np.stack([np.histogram(d[upper], bins=bins, range=(0, 2))[0] for d in dist]) / len(upper[0])


@pytest.mark.parametrize("sampling", ["uniform", "poisson"])
def test_shapes_layout_balance_and_determinism(sampling: str) -> None:
    dataset = DATASETS.get("shapes")(sampling=sampling, **SMALL)
    assert dataset.modality == "pointcloud" and dataset.generated and dataset.files == []
    assert dataset.augment == ["scale", "shift", "jitter"]
    arrays = dataset.build(Path("unused"), seed=0)

    assert arrays.class_names == shapes.CLASSES and len(shapes.CLASSES) == 10
    assert arrays.x_train.shape == (40, 64, 3) and arrays.x_test.shape == (20, 64, 3)
    assert arrays.x_train.dtype == arrays.x_test.dtype == np.float32
    assert arrays.y_train.dtype == arrays.y_test.dtype == np.int64
    assert np.bincount(arrays.y_train).tolist() == [4] * 10
    assert np.bincount(arrays.y_test).tolist() == [2] * 10
    assert arrays.y_train.tolist() != sorted(arrays.y_train.tolist())  # shuffled
    for x in (arrays.x_train, arrays.x_test):
        assert_unit_sphere(x)
    # Every sample is distorted differently, and the splits share none.
    everything = np.concatenate([arrays.x_train, arrays.x_test]).reshape(60, -1)
    assert len(np.unique(everything, axis=0)) == 60

    again = dataset.build(Path("unused"), seed=0)
    for name in ("x_train", "y_train", "x_test", "y_test"):
        assert getattr(again, name).tobytes() == getattr(arrays, name).tobytes()
    other = dataset.build(Path("unused"), seed=1)
    assert not np.array_equal(other.x_train, arrays.x_train)


def test_shapes_classes_are_told_apart_by_their_geometry() -> None:
    # A 1-nearest-neighbour on a distance histogram, no learning: well above chance (10%) only if each
    # label really is one primitive's shape.
    arrays = DATASETS.get("shapes")(points=128, train_per_class=10, test_per_class=5).build(Path("unused"), 0)
    train, test = d2_descriptor(arrays.x_train), d2_descriptor(arrays.x_test)
    nearest = ((test[:, None] - train[None]) ** 2).sum(-1).argmin(axis=1)
    assert (arrays.y_train[nearest] == arrays.y_test).mean() > 0.3


def test_shapes_checks_its_params() -> None:
    for bad in ({"points": 4}, {"train_per_class": 0}, {"test_per_class": 1.5}, {"sampling": "grid"},
                {"augment": ["flip", "spin"]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DATASETS.get("shapes")(**bad)


# --------------------------------------------------------------------------------------------------
# modelnet40: the HDF5 release's layout, with a few clouds per file

SHAPE_NAMES = ["airplane", "bathtub", "bed", "bench", "bookshelf", "bottle", "bowl", "car", "chair", "cone",
               "cup", "curtain", "desk", "door", "dresser", "flower_pot", "glass_box", "guitar", "keyboard",
               "lamp", "laptop", "mantel", "monitor", "night_stand", "person", "piano", "plant", "radio",
               "range_hood", "sink", "sofa", "stairs", "stool", "table", "tent", "toilet", "tv_stand", "vase",
               "wardrobe", "xbox"]
H5_LABELS = {"ply_data_train0.h5": [8, 35, 0], "ply_data_train1.h5": [39, 8], "ply_data_test0.h5": [35, 1, 2]}


def h5_bytes(data: np.ndarray, labels: list[int]) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("data", data=data)
        f.create_dataset("faceId", data=np.zeros(data.shape[:2], dtype=np.int32))
        f.create_dataset("label", data=np.asarray(labels, dtype=np.uint8)[:, None])
        f.create_dataset("normal", data=np.zeros_like(data))
    return buffer.getvalue()


def modelnet40_clouds(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    # Off-centre and of different sizes, so the normalisation has work to do.
    clouds = {}
    for name, labels in H5_LABELS.items():
        n = len(labels)
        points = rng.normal(size=(n, modelnet40.SOURCE_POINTS, 3)) * rng.uniform(0.2, 3, (n, 1, 3))
        clouds[name] = (points + rng.uniform(-2, 2, (n, 1, 3))).astype(np.float32)
    return clouds


def modelnet40_archive(clouds: dict[str, np.ndarray], replace: dict[str, bytes] | None = None) -> bytes:
    folder = modelnet40.FOLDER
    members = {f"{folder}/shape_names.txt": "".join(f"{n}\n" for n in SHAPE_NAMES).encode()}
    for name in H5_LABELS:
        members[f"{folder}/{name}"] = h5_bytes(clouds[name], H5_LABELS[name])
        stem = name[:-3]  # ply_data_train0 -> ply_data_train_0_id2file.json, as in the release
        members[f"{folder}/{stem[:-1]}_{stem[-1]}_id2file.json"] = b'["chair/chair_0001.ply"]'
    members[f"{folder}/train_files.txt"] = (f"data/{folder}/ply_data_train0.h5\n"
                                            f"data/{folder}/ply_data_train1.h5\n").encode()
    members[f"{folder}/test_files.txt"] = f"data/{folder}/ply_data_test0.h5\n".encode()
    for name, content in (replace or {}).items():
        members[f"{folder}/{name}"] = content
    return zip_of(members)


def reference_fps(cloud: np.ndarray, count: int) -> np.ndarray:
    """Farthest point sampling from point 0, written out plainly in float64."""
    cloud = cloud.astype(np.float64)
    picked = [0]
    nearest = np.full(len(cloud), np.inf)
    for _ in range(count - 1):
        nearest = np.minimum(nearest, ((cloud - cloud[picked[-1]]) ** 2).sum(axis=1))
        picked.append(int(nearest.argmax()))
    points = cloud[picked]
    points -= points.mean(axis=0)
    return points / np.linalg.norm(points, axis=1).max()


def test_modelnet40_download_and_build_through_the_stages(server: TestServer, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_pkg import stages
    from pipeline_pkg.h5io import read_h5, read_json

    clouds = modelnet40_clouds()
    archive = modelnet40_archive(clouds)
    monkeypatch.setattr(modelnet40, "ARCHIVE_SHA256", sha256_of(archive))
    url = server.serve("/mirror/modelnet40_ply_hdf5_2048.zip", archive)
    config = {"data_root": str(tmp_path / "data"), "data_seed": 0,
              "datasets": {"modelnet40": {"params": {"url": url, "points": 32}}}}

    manifest = stages.download(config, "modelnet40")
    [entry] = read_json(manifest)["files"]
    assert entry == {"name": "modelnet40_ply_hdf5_2048.zip", "url": url, "sha256": sha256_of(archive),
                     "bytes": len(archive)}
    out = stages.build_dataset(config, "modelnet40", tmp_path / "modelnet40.h5", manifest)
    arrays, attrs = read_h5(out)

    assert attrs["modality"] == "pointcloud" and attrs["class_names"] == SHAPE_NAMES
    assert attrs["class_names"][8] == "chair" and attrs["class_names"][35] == "toilet"
    assert arrays["y_train"].dtype == np.int64 and arrays["y_train"].tolist() == [8, 35, 0, 39, 8]
    assert arrays["y_test"].tolist() == [35, 1, 2]
    assert arrays["x_train"].dtype == np.float32 and arrays["x_train"].shape == (5, 32, 3)
    assert arrays["x_test"].shape == (3, 32, 3)
    train_source = np.concatenate([clouds["ply_data_train0.h5"], clouds["ply_data_train1.h5"]])
    for x, source in ((arrays["x_train"], train_source), (arrays["x_test"], clouds["ply_data_test0.h5"])):
        expected = np.stack([reference_fps(cloud, 32) for cloud in source])
        np.testing.assert_allclose(x, expected, atol=1e-5)
        assert_unit_sphere(x)


def test_modelnet40_keeps_all_2048_points_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clouds = modelnet40_clouds(seed=1)
    archive = modelnet40_archive(clouds)
    (tmp_path / modelnet40.ARCHIVE_NAME).write_bytes(archive)
    monkeypatch.setattr(modelnet40, "ARCHIVE_SHA256", sha256_of(archive))
    arrays = DATASETS.get("modelnet40")(points=2048).build(tmp_path, seed=0)
    source = clouds["ply_data_test0.h5"].astype(np.float64)
    centred = source - source.mean(axis=1, keepdims=True)
    expected = centred / np.linalg.norm(centred, axis=-1).max(axis=1)[:, None, None]
    np.testing.assert_allclose(arrays.x_test, expected, atol=1e-5)  # same points, same order


def test_modelnet40_defaults_point_at_the_release() -> None:
    dataset = DATASETS.get("modelnet40")()
    assert dataset.modality == "pointcloud" and not dataset.generated
    assert dataset.points == 1024 and dataset.augment == ["scale", "shift", "jitter"]
    [remote] = dataset.files
    assert remote.url == "https://shapenet.cs.stanford.edu/media/modelnet40_ply_hdf5_2048.zip"
    assert remote.checksum == ("sha256", "07670e237db72ece0f723b9abb571534c9ad655a6456b389646587dc72bb8bae")
    for bad in ({"points": 4096}, {"points": 0}, {"url": ""}, {"augment": ["crop", "spin"]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DATASETS.get("modelnet40")(**bad)


def test_modelnet40_checksum_mismatch_leaves_nothing(server: TestServer, tmp_path: Path) -> None:
    url = server.serve("/modelnet40_ply_hdf5_2048.zip", modelnet40_archive(modelnet40_clouds()))
    dataset = DATASETS.get("modelnet40")(url=url)  # the fixture is not the published archive
    raw_dir = tmp_path / "modelnet40"
    with pytest.raises(ChecksumError) as caught:
        download(dataset.files[0], raw_dir, **FAST)
    assert "modelnet40_ply_hdf5_2048.zip" in str(caught.value) and url in str(caught.value)
    assert os.listdir(raw_dir) == []


def test_modelnet40_missing_archive_message(tmp_path: Path) -> None:
    url = closed_port_url("modelnet40_ply_hdf5_2048.zip")
    raw_dir = tmp_path / "data" / "modelnet40"
    with pytest.raises(FileNotFoundError) as caught:
        DATASETS.get("modelnet40")(url=url).build(raw_dir, seed=0)
    for expected in ("modelnet40_ply_hdf5_2048.zip", url, str(raw_dir / "modelnet40_ply_hdf5_2048.zip"),
                     "data_root"):
        assert expected in str(caught.value)


@pytest.mark.parametrize("damage, named", [("truncated", None), ("bad_h5", "ply_data_test0.h5"),
                                           ("no_label", "ply_data_train1.h5"),
                                           ("label_out_of_range", "ply_data_train0.h5"),
                                           ("missing_member", "ply_data_train1.h5")])
def test_modelnet40_corrupt_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str,
                                    named: str | None) -> None:
    clouds = modelnet40_clouds()
    replace = {"bad_h5": {"ply_data_test0.h5": b"\x89HDF\r\n\x1a\n" + b"\0" * 200},
               "no_label": {"ply_data_train1.h5": _h5_without_label(clouds["ply_data_train1.h5"])},
               "label_out_of_range": {"ply_data_train0.h5": h5_bytes(clouds["ply_data_train0.h5"], [8, 40, 0])},
               "missing_member": {"train_files.txt": b"ply_data_train0.h5\nply_data_train9.h5\n"}}.get(damage)
    archive = modelnet40_archive(clouds, replace)
    if damage == "missing_member":
        named = "ply_data_train9.h5"
    if damage == "truncated":
        archive = archive[: len(archive) // 2]
    path = tmp_path / modelnet40.ARCHIVE_NAME
    path.write_bytes(archive)
    monkeypatch.setattr(modelnet40, "ARCHIVE_SHA256", sha256_of(archive))
    with pytest.raises(CorruptFileError, match="delete it and rerun the download job") as caught:
        DATASETS.get("modelnet40")(points=16).build(tmp_path, seed=0)
    assert str(path) in str(caught.value)
    if named:
        assert named in str(caught.value)


def _h5_without_label(data: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    with h5py.File(buffer, "w") as f:
        f.create_dataset("data", data=data)
    return buffer.getvalue()


# --------------------------------------------------------------------------------------------------
# OFF header repair and modelnet10

TETRA = b"4 4 0\n0 0 0\n1 0 0\n0 1 0\n0 0 1\n3 0 1 2\n3 0 1 3\n3 0 2 3\n3 1 2 3\n"


def off_file(body: bytes, broken: bool) -> bytes:
    return (b"OFF" if broken else b"OFF\n") + body


def test_repair_off_header_is_exact() -> None:
    assert mesh_io.repair_off_header(b"OFF490 518 0\n1 2 3\n") == b"OFF\n490 518 0\n1 2 3\n"
    assert mesh_io.repair_off_header(b"OFF 4 4 0\r\n0 0 0\r\n") == b"OFF\n4 4 0\r\n0 0 0\r\n"
    for intact in (b"OFF\n4 4 0\n", b"OFF\r\n4 4 0\r\n", b"OFF \n4 4 0\n", b"ply\nformat ascii 1.0\n", b""):
        assert mesh_io.repair_off_header(intact) == intact


def test_broken_off_header_reads_only_after_repair(tmp_path: Path) -> None:
    import open3d as o3d

    broken = off_file(TETRA, broken=True)
    path = tmp_path / "chair_0001.off"
    path.write_bytes(broken)
    with o3d.utility.VerbosityContextManager(o3d.utility.VerbosityLevel.Error):
        assert len(o3d.io.read_triangle_mesh(str(path)).vertices) == 0  # what Open3D does unaided
    vertices, triangles = mesh_io.read_off(broken, "chair_0001.off")
    assert vertices.shape == (4, 3) and triangles.shape == (4, 3)
    assert vertices.tolist() == [[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]]
    with pytest.raises(ValueError, match="junk.off"):
        mesh_io.read_off(b"not a mesh at all", "junk.off")


def flat_square(z: float) -> bytes:
    """A 2x2 grid of squares in the plane z = const: a table top, flat in ModelNet's up axis (z)."""
    grid = [(x, y, z) for y in range(3) for x in range(3)]
    quads = [(r * 3 + c, r * 3 + c + 1, r * 3 + c + 4, r * 3 + c + 3) for r in range(2) for c in range(2)]
    lines = [f"{len(grid)} {len(quads)} 0"] + [f"{x} {y} {z}" for x, y, z in grid] + \
        [f"4 {a} {b} {c} {d}" for a, b, c, d in quads]  # quads: Open3D splits them into triangles
    return ("\n".join(lines) + "\n").encode()


def modelnet10_archive(extra: dict[str, bytes] | None = None) -> bytes:
    members = {
        "ModelNet10/chair/train/chair_0001.off": off_file(TETRA, broken=True),
        "ModelNet10/chair/train/chair_0002.off": off_file(TETRA.replace(b"0 0 1\n", b"0 0 2\n"), broken=False),
        "ModelNet10/table/train/table_0001.off": off_file(flat_square(0.7), broken=True),
        "ModelNet10/chair/test/chair_0890.off": off_file(TETRA.replace(b"1 0 0\n", b"3 0 0\n"), broken=False),
        "ModelNet10/table/test/table_0393.off": off_file(flat_square(-2.0), broken=False),
        # What the real archive has besides the meshes: macOS metadata and Finder files.
        "__MACOSX/ModelNet10/chair/train/._chair_0001.off": b"\0\x05\x16\x07 macOS resource fork",
        "ModelNet10/.DS_Store": b"\0\0\0\x01Bud1",
    }
    return zip_of({**members, **(extra or {})})


def test_modelnet10_download_and_build(server: TestServer, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    archive = modelnet10_archive()
    monkeypatch.setattr(modelnet10, "ARCHIVE_SHA256", sha256_of(archive))
    dataset = DATASETS.get("modelnet10")(url=server.serve("/ModelNet10.zip", archive), points=48)
    assert dataset.modality == "pointcloud" and not dataset.generated
    download(dataset.files[0], tmp_path, **FAST)
    arrays = dataset.build(tmp_path, seed=0)

    assert arrays.class_names == ["bathtub", "bed", "chair", "desk", "dresser", "monitor", "night_stand",
                                  "sofa", "table", "toilet"]
    assert sorted(arrays.y_train.tolist()) == [2, 2, 8] and sorted(arrays.y_test.tolist()) == [2, 8]
    assert arrays.x_train.shape == (3, 48, 3) and arrays.x_test.shape == (2, 48, 3)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64
    for x in (arrays.x_train, arrays.x_test):
        assert_unit_sphere(x)
    # The table tops are flat in ModelNet's z, which becomes y (up) in the clouds: their points share y.
    for x, y in ((arrays.x_train, arrays.y_train), (arrays.x_test, arrays.y_test)):
        for cloud in x[y == 8]:
            assert np.ptp(cloud[:, 1]) < 1e-5 and np.ptp(cloud[:, 0]) > 0.5 and np.ptp(cloud[:, 2]) > 0.5
        for cloud in x[y == 2]:  # tetrahedra are not flat
            assert np.ptp(cloud[:, 1]) > 0.5

    again = dataset.build(tmp_path, seed=0)
    assert again.x_train.tobytes() == arrays.x_train.tobytes()
    capped = DATASETS.get("modelnet10")(points=48, max_per_class=1).build(tmp_path, seed=0)
    assert sorted(capped.y_train.tolist()) == [2, 8]
    poisson = DATASETS.get("modelnet10")(points=48, sampling="poisson").build(tmp_path, seed=0)
    assert poisson.x_test.shape == (2, 48, 3) and not np.array_equal(poisson.x_test, arrays.x_test)
    assert_unit_sphere(poisson.x_test)


def test_modelnet10_unreadable_mesh_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = modelnet10_archive({"ModelNet10/bed/test/bed_0516.off": b"OFF\nthis is not a mesh\n"})
    path = tmp_path / modelnet10.ARCHIVE_NAME
    path.write_bytes(archive)
    monkeypatch.setattr(modelnet10, "ARCHIVE_SHA256", sha256_of(archive))
    with pytest.raises(CorruptFileError, match="bed_0516.off.*delete it and rerun the download job") as caught:
        DATASETS.get("modelnet10")(points=16).build(tmp_path, seed=0)
    assert str(path) in str(caught.value)


def test_modelnet10_defaults_and_params() -> None:
    [remote] = DATASETS.get("modelnet10")().files
    assert remote.url == "http://3dvision.princeton.edu/projects/2014/3DShapeNets/ModelNet10.zip"
    assert remote.checksum == ("sha256", "9d8679435fc07d1d26f13009878db164a7aa8ea5e7ea3c8880e42794b7307d51")
    for bad in ({"points": 0}, {"sampling": "grid"}, {"max_per_class": 0}, {"url": None}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DATASETS.get("modelnet10")(**bad)
