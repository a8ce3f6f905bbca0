"""The CIFAR-10 and GTSRB datasets, from tiny archives in the official layouts served over real HTTP
on 127.0.0.1: download, resume, checksums, conversion to arrays and the errors a user can meet."""

from __future__ import annotations

import csv
import hashlib
import io
import os
import pickle
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from http_server import TestServer, closed_port_url
from PIL import Image

from pipeline_pkg.datasets import cifar10, gtsrb
from pipeline_pkg.download import ChecksumError, DownloadError, download, verify
from pipeline_pkg.h5io import CorruptFileError
from pipeline_pkg.registry import DATASETS

FAST = {"retries": 3, "backoff": 0.01, "timeout": 5.0, "progress": False}


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def fetch_all(dataset, raw_dir: Path) -> None:
    # What the download stage does for a dataset's files.
    for remote in dataset.files:
        download(remote, raw_dir, **FAST)


# --------------------------------------------------------------------------------------------------
# CIFAR-10 fixture: the real member layout with a few images per batch

CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
PER_BATCH = 3


def cifar_batches(seed: int = 0) -> dict[str, tuple[np.ndarray, list[int]]]:
    rng = np.random.default_rng(seed)
    return {name: (rng.integers(0, 256, (PER_BATCH + (name == "test_batch"), 3072), dtype=np.uint8),
                   rng.integers(0, 10, PER_BATCH + (name == "test_batch")).tolist())
            for name in [*cifar10.TRAIN_BATCHES, cifar10.TEST_BATCH]}


def tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        folder = tarfile.TarInfo("cifar-10-batches-py")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def cifar_members(batches: dict[str, tuple[np.ndarray, list[int]]]) -> dict[str, bytes]:
    members = {"cifar-10-batches-py/readme.html": b"<html></html>"}
    for index, (name, (data, labels)) in enumerate(batches.items()):
        batch = {b"batch_label": f"batch {index}".encode(), b"labels": labels, b"data": data,
                 b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))]}
        if index == 1:  # what a Python 2 pickle gives under encoding="latin1": str keys
            batch = {key.decode(): value for key, value in batch.items()}
        members[f"cifar-10-batches-py/{name}"] = pickle.dumps(batch, protocol=2)
    meta = {b"label_names": [n.encode() for n in CIFAR_CLASSES], b"num_cases_per_batch": 10000}
    members["cifar-10-batches-py/batches.meta"] = pickle.dumps(meta, protocol=2)
    return members


def expected_images(data: np.ndarray) -> np.ndarray:
    # Independent of the reshape in cifar10.py: pixel (c, i, j) is entry c*1024 + i*32 + j of a row.
    out = np.empty((len(data), 3, 32, 32), dtype=np.uint8)
    for n, c, i, j in np.ndindex(out.shape):
        out[n, c, i, j] = data[n, c * 1024 + i * 32 + j]
    return out


def test_cifar10_download_and_build_through_the_stages(server: TestServer, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline_pkg import stages
    from pipeline_pkg.h5io import read_h5, read_json

    batches = cifar_batches()
    archive = tar_gz(cifar_members(batches))
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    url = server.serve("/mirror/cifar-10-python.tar.gz", archive)
    config = {"data_root": str(tmp_path / "data"), "data_seed": 0,
              "datasets": {"cifar10": {"params": {"url": url}}}}

    manifest = stages.download(config, "cifar10")
    [entry] = read_json(manifest)["files"]
    assert entry == {"name": "cifar-10-python.tar.gz", "url": url, "md5": md5_of(archive),
                     "bytes": len(archive)}
    out = stages.build_dataset(config, "cifar10", tmp_path / "cifar10.h5", manifest)
    arrays, attrs = read_h5(out)

    train = [batches[name] for name in cifar10.TRAIN_BATCHES]
    x_test, y_test = batches[cifar10.TEST_BATCH]
    assert arrays["x_train"].dtype == np.uint8 and arrays["x_train"].shape == (5 * PER_BATCH, 3, 32, 32)
    assert np.array_equal(arrays["x_train"], expected_images(np.concatenate([d for d, _ in train])))
    assert arrays["y_train"].dtype == np.int64
    assert arrays["y_train"].tolist() == [label for _, labels in train for label in labels]
    assert np.array_equal(arrays["x_test"], expected_images(x_test))
    assert arrays["y_test"].tolist() == y_test
    assert attrs["class_names"] == CIFAR_CLASSES and attrs["modality"] == "image"
    assert attrs["params"]["augment"] == ["crop", "flip"]


def test_cifar10_defaults_point_at_the_canonical_archive() -> None:
    dataset = DATASETS.get("cifar10")()
    assert dataset.modality == "image" and not dataset.generated
    [remote] = dataset.files
    assert remote.url == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert remote.checksum == ("md5", "c58f30108f718f92721af3b95e74349a")
    assert DATASETS.get("gtsrb")().augment == ["crop"]


def test_cifar10_checksum_mismatch_leaves_nothing(server: TestServer, tmp_path: Path) -> None:
    archive = tar_gz(cifar_members(cifar_batches()))
    url = server.serve("/cifar-10-python.tar.gz", archive)  # not the published archive
    dataset = DATASETS.get("cifar10")(url=url)
    raw_dir = tmp_path / "cifar10"
    with pytest.raises(ChecksumError) as caught:
        fetch_all(dataset, raw_dir)
    assert "cifar-10-python.tar.gz" in str(caught.value) and url in str(caught.value)
    assert os.listdir(raw_dir) == []


def test_cifar10_resumes_a_download_cut_mid_file(server: TestServer, tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    batches = cifar_batches(seed=1)
    archive = tar_gz(cifar_members(batches))
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    cut = len(archive) // 2
    dataset = DATASETS.get("cifar10")(url=server.serve("/c.tar.gz", archive, cut_after=cut))
    fetch_all(dataset, tmp_path)
    assert [(r.range, r.status) for r in server.state.requests] == [(None, 200), (f"bytes={cut}-", 206)]
    assert verify(tmp_path / "cifar-10-python.tar.gz", dataset.files[0])
    arrays = dataset.build(tmp_path, seed=0)
    assert np.array_equal(arrays.x_test, expected_images(batches["test_batch"][0]))


def test_cifar10_offline_and_missing_archive_messages(tmp_path: Path) -> None:
    url = closed_port_url("cifar-10-python.tar.gz")
    dataset = DATASETS.get("cifar10")(url=url)
    raw_dir = tmp_path / "data" / "cifar10"
    with pytest.raises(DownloadError) as caught:
        download(dataset.files[0], raw_dir, retries=1, backoff=0.01, timeout=5.0, progress=False)
    for expected in ("cifar-10-python.tar.gz", url, str(raw_dir / "cifar-10-python.tar.gz"), "data_root"):
        assert expected in str(caught.value)
    with pytest.raises(FileNotFoundError) as caught_build:
        dataset.build(raw_dir, seed=0)
    for expected in ("cifar-10-python.tar.gz", url, str(raw_dir / "cifar-10-python.tar.gz"), "data_root"):
        assert expected in str(caught_build.value)


class RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_cifar10_refuses_a_pickle_with_a_forbidden_global(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "pwned"
    members = cifar_members(cifar_batches())
    members["cifar-10-batches-py/data_batch_2"] = pickle.dumps(
        {b"data": RunsAShellCommand(f"touch {marker}"), b"labels": []}, protocol=2)
    archive = tar_gz(members)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(archive)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    with pytest.raises(pickle.UnpicklingError, match=r"data_batch_2.*refusing to load global \w+\.system"):
        DATASETS.get("cifar10")().build(tmp_path, seed=0)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated", "missing_batch", "wrong_layout"])
def test_cifar10_corrupt_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    members = cifar_members(cifar_batches())
    if damage == "missing_batch":
        del members["cifar-10-batches-py/test_batch"]
    if damage == "wrong_layout":
        members["cifar-10-batches-py/data_batch_3"] = pickle.dumps(
            {b"data": np.zeros((3, 100), dtype=np.uint8), b"labels": [0, 1, 2]}, protocol=2)
    archive = tar_gz(members)
    if damage == "truncated":
        archive = archive[: len(archive) * 2 // 3]
    path = tmp_path / "cifar-10-python.tar.gz"
    path.write_bytes(archive)
    monkeypatch.setattr(cifar10, "ARCHIVE_MD5", md5_of(archive))
    with pytest.raises(CorruptFileError, match="delete it and rerun the download job") as caught:
        DATASETS.get("cifar10")().build(tmp_path, seed=0)
    assert str(path) in str(caught.value)


# --------------------------------------------------------------------------------------------------
# GTSRB fixture: the three archives' layouts; each image is a border colour around a sign region of
# its own colour, so the output pixels say which image (and which region of it) was used.

BORDER = (10, 20, 30)
HEADER = ["Filename", "Width", "Height", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId"]
# (width, height, (x1, y1, x2, y2)) per image; differing sizes, non-square, off-centre signs.
TRAIN_IMAGES = {
    0: [(29, 30, (5, 6, 24, 25)), (47, 61, (6, 5, 41, 55)), (64, 40, (20, 5, 58, 35))],
    1: [(31, 33, (5, 5, 26, 28)), (90, 80, (9, 8, 81, 72))],
    2: [(40, 40, (5, 5, 35, 35)), (25, 36, (5, 7, 20, 31)), (120, 115, (12, 11, 108, 104))],
}
TEST_IMAGES = [(2, (33, 30, (5, 5, 28, 25))), (0, (50, 52, (6, 6, 44, 46))), (1, (27, 27, (5, 5, 22, 22)))]


def sign_colour(index: int) -> tuple[int, int, int]:
    return (200 - 7 * index, 40 + 9 * index, 90 + 5 * index)  # distinct, in 0..255 for index < 24


def ppm(width: int, height: int, box: tuple[int, int, int, int], colour: tuple[int, int, int]) -> bytes:
    pixels = np.empty((height, width, 3), dtype=np.uint8)
    pixels[:] = BORDER
    x1, y1, x2, y2 = box
    pixels[y1:y2, x1:x2] = colour
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PPM")
    return buffer.getvalue()


def csv_text(rows: list[list[object]], header: list[str] = HEADER) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";", lineterminator="\r\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue().encode()


def zip_of(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, content in members.items():
            zf.writestr(name, content)
    return buffer.getvalue()


def gtsrb_archives() -> tuple[dict[str, bytes], dict[tuple[int, int, int], int]]:
    """The three archives by name, and each train image's sign colour -> class."""
    train: dict[str, bytes] = {"GTSRB/Readme-Images.txt": b"readme"}
    colour_class: dict[tuple[int, int, int], int] = {}
    index = 0
    for cls, images in TRAIN_IMAGES.items():
        folder = f"GTSRB/Final_Training/Images/{cls:05d}"
        rows = []
        for track_image, (width, height, box) in enumerate(images):
            filename = f"00000_{track_image:05d}.ppm"
            colour = sign_colour(index)
            colour_class[colour] = cls
            train[f"{folder}/{filename}"] = ppm(width, height, box, colour)
            rows.append([filename, width, height, *box, cls])
            index += 1
        train[f"{folder}/GT-{cls:05d}.csv"] = csv_text(rows)

    test: dict[str, bytes] = {"GTSRB/Readme-Images-Final-test.txt": b"readme"}
    gt_rows, plain_rows = [], []
    for n, (cls, (width, height, box)) in enumerate(TEST_IMAGES):
        filename = f"{n:05d}.ppm"
        test[f"GTSRB/Final_Test/Images/{filename}"] = ppm(width, height, box, sign_colour(16 + n))
        gt_rows.append([filename, width, height, *box, cls])
        plain_rows.append([filename, width, height, *box])
    test["GTSRB/Final_Test/Images/GT-final_test.test.csv"] = csv_text(plain_rows, HEADER[:-1])
    archives = {gtsrb.TRAIN_ARCHIVE: zip_of(train), gtsrb.TEST_ARCHIVE: zip_of(test),
                gtsrb.TEST_GT_ARCHIVE: zip_of({"GT-final_test.csv": csv_text(gt_rows)})}
    return archives, colour_class


def serve_gtsrb(server: TestServer, monkeypatch: pytest.MonkeyPatch, archives: dict[str, bytes],
                **behaviour: dict) -> str:
    for name, body in archives.items():
        server.serve(f"/gtsrb/{name}", body, **behaviour.get(name, {}))
        monkeypatch.setitem(gtsrb.MD5, name, md5_of(body))
    return server.url("/gtsrb/")


def test_gtsrb_download_and_build(server: TestServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives, colour_class = gtsrb_archives()
    dataset = DATASETS.get("gtsrb")(url=serve_gtsrb(server, monkeypatch, archives))
    assert dataset.modality == "image" and not dataset.generated
    fetch_all(dataset, tmp_path)
    arrays = dataset.build(tmp_path, seed=0)

    n_train = sum(len(images) for images in TRAIN_IMAGES.values())
    assert arrays.x_train.shape == (n_train, 3, 32, 32) and arrays.x_train.dtype == np.uint8
    assert arrays.x_test.shape == (len(TEST_IMAGES), 3, 32, 32)
    assert arrays.y_train.dtype == arrays.y_test.dtype == np.int64
    assert arrays.class_names == [f"class_{c:02d}" for c in range(43)]
    # Cropped to the sign region and resized, every image is exactly its sign's colour.
    for x in (arrays.x_train, arrays.x_test):
        assert (x == x[:, :, :1, :1]).all()
    train_colours = [tuple(int(v) for v in image[:, 0, 0]) for image in arrays.x_train]
    assert sorted(train_colours) == sorted(colour_class)
    assert arrays.y_train.tolist() == [colour_class[c] for c in train_colours]
    assert [tuple(int(v) for v in image[:, 0, 0]) for image in arrays.x_test] == \
        [sign_colour(16 + n) for n in range(len(TEST_IMAGES))]
    assert arrays.y_test.tolist() == [cls for cls, _ in TEST_IMAGES]
    # The training set (grouped by class in the archive) is shuffled with the data seed.
    assert arrays.y_train.tolist() != sorted(arrays.y_train.tolist())
    assert np.array_equal(dataset.build(tmp_path, seed=0).x_train, arrays.x_train)
    assert not np.array_equal(dataset.build(tmp_path, seed=1).x_train, arrays.x_train)


def test_gtsrb_without_roi_crop_keeps_the_border(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives, _ = gtsrb_archives()
    for name, body in archives.items():
        (tmp_path / name).write_bytes(body)
        monkeypatch.setitem(gtsrb.MD5, name, md5_of(body))
    arrays = DATASETS.get("gtsrb")(crop_roi=False, size=16).build(tmp_path, seed=0)
    assert arrays.x_test.shape == (len(TEST_IMAGES), 3, 16, 16)
    for n, image in enumerate(arrays.x_test):
        assert tuple(image[:, 0, 0]) == BORDER and tuple(image[:, -1, -1]) == BORDER
        assert tuple(image[:, 8, 8]) == sign_colour(16 + n)


def test_gtsrb_resumes_a_cut_download_and_rejects_a_wrong_archive(server: TestServer, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    archives, _ = gtsrb_archives()
    cut = len(archives[gtsrb.TRAIN_ARCHIVE]) // 3
    url = serve_gtsrb(server, monkeypatch, archives, **{gtsrb.TRAIN_ARCHIVE: {"cut_after": cut}})
    dataset = DATASETS.get("gtsrb")(url=url)
    fetch_all(dataset, tmp_path / "ok")
    train_requests = [(r.range, r.status) for r in server.state.requests if r.path.endswith(gtsrb.TRAIN_ARCHIVE)]
    assert train_requests == [(None, 200), (f"bytes={cut}-", 206)]
    assert all(verify(tmp_path / "ok" / remote.name, remote) for remote in dataset.files)

    monkeypatch.setitem(gtsrb.MD5, gtsrb.TEST_GT_ARCHIVE, md5_of(b"another archive"))
    with pytest.raises(ChecksumError, match=gtsrb.TEST_GT_ARCHIVE):
        fetch_all(dataset, tmp_path / "bad")
    assert gtsrb.TEST_GT_ARCHIVE not in " ".join(os.listdir(tmp_path / "bad"))
    # build checks the checksum too, before reading anything
    with pytest.raises(ChecksumError, match=gtsrb.TEST_GT_ARCHIVE):
        dataset.build(tmp_path / "ok", seed=0)


def test_gtsrb_offline_and_missing_archive_messages(tmp_path: Path) -> None:
    base = closed_port_url("gtsrb/")
    dataset = DATASETS.get("gtsrb")(url=base)
    remote = dataset.files[0]
    assert remote.url == base + gtsrb.TRAIN_ARCHIVE
    raw_dir = tmp_path / "data" / "gtsrb"
    with pytest.raises(DownloadError) as caught:
        download(remote, raw_dir, retries=0, progress=False)
    for expected in (gtsrb.TRAIN_ARCHIVE, remote.url, str(raw_dir / gtsrb.TRAIN_ARCHIVE), "data_root"):
        assert expected in str(caught.value)
    with pytest.raises(FileNotFoundError) as caught_build:
        dataset.build(raw_dir, seed=0)
    for expected in (gtsrb.TRAIN_ARCHIVE, remote.url, str(raw_dir / gtsrb.TRAIN_ARCHIVE), "data_root"):
        assert expected in str(caught_build.value)


def test_gtsrb_truncated_zip_is_a_corrupt_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archives, _ = gtsrb_archives()
    archives[gtsrb.TEST_ARCHIVE] = archives[gtsrb.TEST_ARCHIVE][:-100]
    for name, body in archives.items():
        (tmp_path / name).write_bytes(body)
        monkeypatch.setitem(gtsrb.MD5, name, md5_of(body))
    with pytest.raises(CorruptFileError, match="delete it and rerun the download job") as caught:
        DATASETS.get("gtsrb")().build(tmp_path, seed=0)
    assert str(tmp_path / gtsrb.TEST_ARCHIVE) in str(caught.value)


def test_gtsrb_checks_its_params() -> None:
    from pipeline_pkg.configurable import ConfigError

    for bad in ({"size": 4}, {"size": "32"}, {"crop_roi": "yes"}, {"augment": ["spin"]}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            DATASETS.get("gtsrb")(**bad)
