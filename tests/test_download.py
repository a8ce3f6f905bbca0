"""download.py and the RadioML 2016.10a dataset, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import os
import pickle
import random
import re
import struct
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from http_server import TestServer, closed_port_url

from pipeline_pkg.configurable import ConfigError
from pipeline_pkg.download import ChecksumError, DownloadError, RemoteFile, download, file_digest, verify
from pipeline_pkg.h5io import CorruptFileError
from pipeline_pkg.registry import DATASETS


def random_bytes(n: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(n)


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = {"retries": 3, "backoff": 0.01, "timeout": 5.0, "progress": False}


# --------------------------------------------------------------------------------------------------
# RemoteFile and helpers


def test_remote_file_needs_a_well_formed_checksum() -> None:
    with pytest.raises(ValueError, match="needs a sha256 or md5"):
        RemoteFile("a.bin", "http://example.invalid/a.bin")
    with pytest.raises(ValueError, match="64 hex digits"):
        RemoteFile("a.bin", "http://example.invalid/a.bin", sha256="abc")
    with pytest.raises(ValueError, match="plain file name"):
        RemoteFile("../a.bin", "http://example.invalid/a.bin", md5="0" * 32)
    upper = RemoteFile("a.bin", "http://example.invalid/a.bin", sha256="AB" * 32)
    assert upper.checksum == ("sha256", "ab" * 32)


def test_file_digest_and_verify(tmp_path: Path) -> None:
    data = random_bytes(3 << 20)  # several read chunks
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert file_digest(path, "sha256") == sha256_of(data)
    assert file_digest(path, "md5") == hashlib.md5(data).hexdigest()
    assert verify(path, RemoteFile("f.bin", "http://x/f.bin", sha256=sha256_of(data)))
    assert not verify(path, RemoteFile("f.bin", "http://x/f.bin", sha256=sha256_of(b"other")))
    assert not verify(tmp_path / "absent", RemoteFile("f.bin", "http://x/f.bin", sha256=sha256_of(data)))


# --------------------------------------------------------------------------------------------------
# download()


def test_download_with_sha256(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(300_000)
    remote = RemoteFile("data.bin", server.serve("/data.bin", data), sha256=sha256_of(data))
    path = download(remote, tmp_path / "raw", **FAST)
    assert path == tmp_path / "raw" / "data.bin"
    assert path.read_bytes() == data
    assert not (tmp_path / "raw" / "data.bin.part").exists()
    assert [r.range for r in server.state.requests] == [None]


def test_download_with_md5(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(50_000, seed=1)
    remote = RemoteFile("data.bin", server.serve("/data.bin", data), md5=hashlib.md5(data).hexdigest())
    assert download(remote, tmp_path, **FAST).read_bytes() == data


def test_corrupt_file_raises_checksum_error_and_leaves_nothing(server: TestServer, tmp_path: Path) -> None:
    good, corrupt = random_bytes(20_000), random_bytes(20_000, seed=2)
    url = server.serve("/data.bin", corrupt)
    remote = RemoteFile("data.bin", url, sha256=sha256_of(good))
    with pytest.raises(ChecksumError) as caught:
        download(remote, tmp_path, **FAST)
    message = str(caught.value)
    for expected in ("data.bin", url, sha256_of(good), sha256_of(corrupt)):
        assert expected in message
    assert sorted(os.listdir(tmp_path)) == []


def test_interrupted_download_resumes_with_range(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(400_000, seed=3)
    cut = 123_456
    remote = RemoteFile("data.bin", server.serve("/data.bin", data, cut_after=cut), sha256=sha256_of(data))
    path = download(remote, tmp_path, **FAST)
    assert path.read_bytes() == data
    assert verify(path, remote)
    requests = server.state.requests
    assert [(r.range, r.status) for r in requests] == [(None, 200), (f"bytes={cut}-", 206)]


def test_server_ignoring_range_restarts_cleanly(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(100_000, seed=4)
    # A leftover partial file from elsewhere: if it were kept, the result would not verify.
    (tmp_path / "data.bin.part").write_bytes(b"garbage" * 1000)
    remote = RemoteFile("data.bin", server.serve("/data.bin", data, ignore_range=True),
                        sha256=sha256_of(data))
    path = download(remote, tmp_path, **FAST)
    assert path.read_bytes() == data
    assert [(r.range, r.status) for r in server.state.requests] == [("bytes=7000-", 200)]
    assert not (tmp_path / "data.bin.part").exists()


def test_complete_partial_file_is_finalised(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(10_000, seed=5)
    (tmp_path / "data.bin.part").write_bytes(data)  # a previous run died before the rename
    remote = RemoteFile("data.bin", server.serve("/data.bin", data), sha256=sha256_of(data))
    assert download(remote, tmp_path, **FAST).read_bytes() == data
    assert [r.status for r in server.state.requests] == [416]


def test_no_server_raises_one_download_error_naming_where_to_put_a_copy(tmp_path: Path) -> None:
    url = closed_port_url("archive.tar.bz2")
    remote = RemoteFile("archive.tar.bz2", url, sha256="0" * 64)
    with pytest.raises(DownloadError) as caught:
        download(remote, tmp_path / "radioml2016", retries=2, backoff=0.01, timeout=5.0, progress=False)
    assert type(caught.value) is DownloadError
    message = str(caught.value)
    assert "archive.tar.bz2" in message
    assert url in message
    assert str(tmp_path / "radioml2016" / "archive.tar.bz2") in message
    assert "data_root" in message
    assert "3 attempts" in message
    assert not (tmp_path / "radioml2016" / "archive.tar.bz2").exists()


def test_http_404_is_not_retried(server: TestServer, tmp_path: Path) -> None:
    remote = RemoteFile("missing.bin", server.url("/missing.bin"), sha256="0" * 64)
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(remote, tmp_path, **FAST)
    assert [r.status for r in server.state.requests] == [404]


def test_present_verified_file_is_not_fetched(server: TestServer, tmp_path: Path) -> None:
    data = random_bytes(5_000, seed=6)
    (tmp_path / "data.bin").write_bytes(data)
    remote = RemoteFile("data.bin", server.serve("/data.bin", b"different"), sha256=sha256_of(data))
    assert download(remote, tmp_path, **FAST) == tmp_path / "data.bin"
    assert server.state.requests == []


# --------------------------------------------------------------------------------------------------
# RadioML 2016.10a

MODS = ["QPSK", "BPSK", "WBFM"]  # deliberately unsorted: labels index the sorted names
SNRS = [-10, 0, 10]
PER_CELL = 10


def radioml_frames(seed: int = 0) -> dict[tuple[str, int], np.ndarray]:
    rng = np.random.default_rng(seed)
    return {(mod, snr): rng.standard_normal((PER_CELL, 2, 128)).astype(np.float32)
            for mod in MODS for snr in SNRS}


def tar_bz2_with(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:bz2") as tar:
        for name, content in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(content)
            tar.addfile(info, io.BytesIO(content))
    return buffer.getvalue()


def radioml_archive(frames: dict[tuple[str, int], np.ndarray]) -> bytes:
    return tar_bz2_with({"RML2016.10a_dict.pkl": pickle.dumps(frames, protocol=2)})


def test_radioml_download_and_build(server: TestServer, tmp_path: Path) -> None:
    frames = radioml_frames()
    archive = radioml_archive(frames)
    dataset = DATASETS.get("radioml2016")(sha256=sha256_of(archive))
    assert dataset.modality == "rf" and not dataset.generated
    [remote] = dataset.files
    assert remote.name == "RML2016.10a.tar.bz2"
    assert remote.url.endswith("/datasets/2016.10/RML2016.10a.tar.bz2")

    raw_dir = tmp_path / "radioml2016"
    local = dataclasses.replace(remote, url=server.serve("/RML2016.10a.tar.bz2", archive))
    download(local, raw_dir, **FAST)
    arrays = dataset.build(raw_dir, seed=0)

    n_cells = len(MODS) * len(SNRS)
    n_test_per_cell = round(PER_CELL * 0.2)
    assert arrays.x_train.shape == (n_cells * (PER_CELL - n_test_per_cell), 2, 128)
    assert arrays.x_test.shape == (n_cells * n_test_per_cell, 2, 128)
    assert arrays.x_train.dtype == np.float32 and arrays.y_train.dtype == np.int64
    assert arrays.class_names == sorted(MODS)
    assert set(arrays.y_train.tolist()) == set(arrays.y_test.tolist()) == {0, 1, 2}
    snr_train, snr_test = arrays.extras["snr_train"], arrays.extras["snr_test"]
    assert snr_train.dtype == np.float32 and snr_train.shape == arrays.y_train.shape
    assert snr_test.shape == arrays.y_test.shape
    # Stratified: every (modulation, SNR) cell is split the same way.
    test_cells = Counter(zip(arrays.y_test.tolist(), snr_test.tolist()))
    assert test_cells == {(label, float(snr)): n_test_per_cell for label in range(3) for snr in SNRS}

    # Every frame lands on exactly one side, with its own label and SNR.
    lookup = {frame.tobytes(): (sorted(MODS).index(mod), snr)
              for (mod, snr), block in frames.items() for frame in block}
    seen = [lookup[frame.tobytes()] for frame in np.concatenate([arrays.x_train, arrays.x_test])]
    assert len(set(f.tobytes() for f in np.concatenate([arrays.x_train, arrays.x_test]))) == len(lookup)
    expected = list(zip(np.concatenate([arrays.y_train, arrays.y_test]).tolist(),
                        np.concatenate([snr_train, snr_test]).tolist()))
    assert seen == expected

    again = dataset.build(raw_dir, seed=0)
    assert np.array_equal(again.x_test, arrays.x_test)
    other_seed = dataset.build(raw_dir, seed=1)
    assert not np.array_equal(other_seed.x_test, arrays.x_test)


def test_download_stage_writes_a_manifest_that_the_built_dataset_records(server: TestServer,
                                                                         tmp_path: Path) -> None:
    """The pipeline's download and prepare stages, with the archive served from a local mirror."""
    from pipeline_pkg import stages
    from pipeline_pkg.config import validate
    from pipeline_pkg.h5io import read_h5, read_json

    archive = radioml_archive(radioml_frames())
    url = server.serve("/mirror/RML2016.10a.tar.bz2", archive)
    config = validate({
        "results_dir": str(tmp_path / "results"), "data_root": str(tmp_path / "data"),
        "datasets": {"radioml2016": {"archs": ["rf_cnn"], "attacks": ["none"],
                                     "params": {"sha256": sha256_of(archive), "url": url}}},
        "defenses": {"none": {}}, "tracking": {"enabled": False}})
    manifest = stages.download(config, "radioml2016")
    assert manifest == tmp_path / "data" / "radioml2016" / "manifest.json"
    [entry] = read_json(manifest)["files"]
    assert entry == {"name": "RML2016.10a.tar.bz2", "url": url, "sha256": sha256_of(archive),
                     "bytes": len(archive)}
    out = stages.build_dataset(config, "radioml2016", tmp_path / "results" / "data" / "radioml2016.h5", manifest)
    arrays, attrs = read_h5(out)
    assert attrs["raw_files"] == [entry] and attrs["modality"] == "rf"
    assert arrays["x_train"].shape[1:] == (2, 128) and attrs["class_names"] == sorted(MODS)


def test_radioml_snr_filter(tmp_path: Path) -> None:
    archive = radioml_archive(radioml_frames())
    (tmp_path / "RML2016.10a.tar.bz2").write_bytes(archive)
    dataset = DATASETS.get("radioml2016")(sha256=sha256_of(archive), snr_db=[0, 18], test_fraction=0.5)
    arrays = dataset.build(tmp_path, seed=0)
    assert set(arrays.extras["snr_train"].tolist()) == set(arrays.extras["snr_test"].tolist()) == {0.0, 10.0}
    assert len(arrays.y_test) == len(arrays.y_train) == len(MODS) * 2 * PER_CELL // 2
    with pytest.raises(ConfigError, match="snr_db"):
        DATASETS.get("radioml2016")(sha256=sha256_of(archive), snr_db=[12, 18]).build(tmp_path, seed=0)


def test_radioml_requires_a_user_supplied_sha256(tmp_path: Path) -> None:
    cls = DATASETS.get("radioml2016")
    with pytest.raises(ConfigError, match=re.escape("datasets.radioml2016.params.sha256")):
        cls().files
    with pytest.raises(ConfigError, match=re.escape("datasets.radioml2016.params.sha256")):
        cls().build(tmp_path, seed=0)
    with pytest.raises(ConfigError, match="sha256"):
        cls(sha256="not-a-digest")
    with pytest.raises(ConfigError, match="test_fraction"):
        cls(test_fraction=1.0)


def test_radioml_build_rejects_an_archive_with_the_wrong_checksum(tmp_path: Path) -> None:
    archive = radioml_archive(radioml_frames())
    (tmp_path / "RML2016.10a.tar.bz2").write_bytes(archive)
    dataset = DATASETS.get("radioml2016")(sha256=sha256_of(b"another archive"))
    with pytest.raises(ChecksumError, match="RML2016.10a.tar.bz2"):
        dataset.build(tmp_path, seed=0)


def test_radioml_refuses_unsafe_archive_members(tmp_path: Path) -> None:
    payload = pickle.dumps(radioml_frames(), protocol=2)
    archive = tar_bz2_with({"../RML2016.10a_dict.pkl": payload})
    (tmp_path / "RML2016.10a.tar.bz2").write_bytes(archive)
    dataset = DATASETS.get("radioml2016")(sha256=sha256_of(archive))
    with pytest.raises(CorruptFileError, match="unsafe archive member"):
        dataset.build(tmp_path, seed=0)


class RunsAShellCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self) -> tuple:
        return os.system, (self.command,)


def test_restricted_load_refuses_code(tmp_path: Path) -> None:
    from pipeline_pkg.datasets.radioml2016 import restricted_load

    marker = tmp_path / "pwned"
    evil = pickle.dumps({("BPSK", 0): RunsAShellCommand(f"touch {marker}")}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        restricted_load(io.BytesIO(evil))
    assert not marker.exists()


def _py2_str(data: bytes) -> bytes:
    if len(data) < 256:
        return pickle.SHORT_BINSTRING + bytes([len(data)]) + data
    return pickle.BINSTRING + struct.pack("<i", len(data)) + data


def _py2_int(value: int) -> bytes:
    return pickle.BININT + struct.pack("<i", value)


def _py2_float32_array(array: np.ndarray) -> bytes:
    """The opcodes Python 2 with numpy 1.x wrote for a float32 array: byte strings, numpy.core names."""
    shape = pickle.MARK + b"".join(_py2_int(d) for d in array.shape) + pickle.TUPLE
    dtype = (pickle.GLOBAL + b"numpy\ndtype\n" + _py2_str(b"f4") + _py2_int(0) + _py2_int(1)
             + pickle.TUPLE3 + pickle.REDUCE
             + pickle.MARK + _py2_int(3) + _py2_str(b"<") + pickle.NONE * 3 + _py2_int(-1) + _py2_int(-1)
             + _py2_int(0) + pickle.TUPLE + pickle.BUILD)
    return (pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n" + pickle.GLOBAL + b"numpy\nndarray\n"
            + _py2_int(0) + pickle.TUPLE1 + _py2_str(b"b") + pickle.TUPLE3 + pickle.REDUCE
            + pickle.MARK + _py2_int(1) + shape + dtype + pickle.NEWFALSE
            + _py2_str(array.astype("<f4").tobytes()) + pickle.TUPLE + pickle.BUILD)


def test_restricted_load_reads_a_python2_style_pickle() -> None:
    from pipeline_pkg.datasets.radioml2016 import restricted_load

    frames = {("8PSK", -20): np.arange(2 * 2 * 128, dtype=np.float32).reshape(2, 2, 128),
              ("AM-DSB", 18): np.full((3, 2, 128), 0.5, dtype=np.float32)}
    body = b"".join(_py2_str(mod.encode()) + _py2_int(snr) + pickle.TUPLE2 + _py2_float32_array(x)
                    for (mod, snr), x in frames.items())
    blob = pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + body + pickle.SETITEMS + pickle.STOP
    loaded = restricted_load(io.BytesIO(blob))
    assert loaded.keys() == frames.keys()
    for key, x in frames.items():
        assert loaded[key].dtype == np.float32
        assert np.array_equal(loaded[key], x)
