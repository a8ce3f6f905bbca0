"""HDF5, checkpoint and JSON I/O: round trips, atomic writes, and clear errors on corrupt files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pipeline_pkg import __version__
from pipeline_pkg.h5io import (
    CorruptFileError,
    atomic_path,
    load_checkpoint,
    read_h5,
    read_json,
    save_checkpoint,
    write_h5,
    write_json,
)

torch.set_num_threads(1)


class SomeCustomClass:
    """Arbitrary picklable object: a checkpoint holding one must be refused (weights_only)."""

    def __init__(self):
        self.payload = [1, 2, 3]


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "x_train": rng.standard_normal((5, 2, 16)).astype(np.float32),
        "y_train": np.arange(5, dtype=np.int64),
        "mask": np.array([True, False, True]),
        "empty": np.zeros((0, 2, 16), dtype=np.float32),
    }


def test_h5_round_trip(tmp_path):
    path = tmp_path / "sub" / "data.h5"  # parent is created
    arrays = sample_arrays()
    attrs = {
        "dataset": "rf1024", "seed": 3, "ratio": 0.25, "flag": True,
        "class_names": ["bpsk", "qpsk", "8psk"],
        "params": {"snr_db": [-4, 20], "sps": 8, "nested": {"a": None}},
        "nothing": None,
        "empty_list": [],
    }
    assert write_h5(path, arrays, attrs) == path
    got, got_attrs = read_h5(path)
    assert got.keys() == arrays.keys()
    for k, v in arrays.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape
        assert np.array_equal(got[k], v)
    assert got_attrs["package_version"] == __version__
    for k, v in attrs.items():
        assert got_attrs[k] == v, k
    assert isinstance(got_attrs["seed"], int) and isinstance(got_attrs["flag"], bool)
    assert isinstance(got_attrs["class_names"], list)
    # Only the target is left in the folder: no temporary file.
    assert [p.name for p in path.parent.iterdir()] == ["data.h5"]


def test_h5_read_selected_keys(tmp_path):
    path = write_h5(tmp_path / "d.h5", sample_arrays())
    got, _ = read_h5(path, keys=["y_train"])
    assert list(got) == ["y_train"]


def test_h5_missing_key_names_it(tmp_path):
    path = write_h5(tmp_path / "d.h5", sample_arrays())
    with pytest.raises(CorruptFileError) as info:
        read_h5(path, keys=["y_train", "x_val"])
    message = str(info.value)
    assert "x_val" in message and str(path) in message and "rerun" in message


def test_h5_missing_file_is_not_corrupt(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing input file"):
        read_h5(tmp_path / "nope.h5")


def _assert_rebuild_message(exc: BaseException, path) -> None:
    message = str(exc)
    assert str(path) in message
    assert "delete it" in message and "rerun" in message


def test_h5_truncated_file(tmp_path):
    path = write_h5(tmp_path / "d.h5", sample_arrays(), {"a": 1})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(CorruptFileError) as info:
        read_h5(path)
    _assert_rebuild_message(info.value, path)


def test_h5_garbage_file(tmp_path):
    path = tmp_path / "garbage.h5"
    path.write_bytes(b"this is not an HDF5 file\n" * 50)
    with pytest.raises(CorruptFileError) as info:
        read_h5(path)
    _assert_rebuild_message(info.value, path)


def test_h5_numpy_array_attribute_round_trip(tmp_path):
    path = write_h5(tmp_path / "d.h5", sample_arrays(), {"input_shape": np.array([2, 16])})
    _, attrs = read_h5(path)
    assert np.array_equal(attrs["input_shape"], [2, 16])


def test_atomic_path_success(tmp_path):
    target = tmp_path / "out.txt"
    with atomic_path(target) as tmp:
        assert tmp != target and tmp.parent == target.parent
        tmp.write_text("hello")
        assert not target.exists()
    assert target.read_text() == "hello"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_path_failure_leaves_nothing(tmp_path):
    target = tmp_path / "out.h5"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("boom")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_path_failure_keeps_previous_file(tmp_path):
    target = write_json(tmp_path / "r.json", {"v": 1})
    with pytest.raises(KeyError):
        with atomic_path(target) as tmp:
            tmp.write_text("{broken")
            raise KeyError("x")
    assert read_json(target) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_write_h5_failure_leaves_nothing(tmp_path):
    target = tmp_path / "bad.h5"
    with pytest.raises(Exception):
        write_h5(target, {"ok": np.zeros(3), "bad": np.array([object()], dtype=object)})
    assert list(tmp_path.iterdir()) == []


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    state = {"model": net.state_dict(), "epoch": 2, "resume_key": "abc", "shape": [2, 1024],
             "opt": {"lr": 0.1, "steps": torch.tensor(5)}}
    path = save_checkpoint(state, tmp_path / "ck" / "c.pt")
    got = load_checkpoint(path)
    assert got["epoch"] == 2 and got["resume_key"] == "abc" and got["shape"] == [2, 1024]
    assert got["opt"]["lr"] == 0.1 and torch.equal(got["opt"]["steps"], torch.tensor(5))
    assert got["model"].keys() == state["model"].keys()
    for k, v in state["model"].items():
        assert torch.equal(got["model"][k], v)
    assert [p.name for p in path.parent.iterdir()] == ["c.pt"]


def test_checkpoint_with_arbitrary_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"x": SomeCustomClass()}, path)
    with pytest.raises(CorruptFileError) as info:
        load_checkpoint(path)
    assert str(path) in str(info.value)


def test_checkpoint_truncated(tmp_path):
    path = save_checkpoint({"w": torch.randn(100, 100)}, tmp_path / "c.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError) as info:
        load_checkpoint(path)
    _assert_rebuild_message(info.value, path)


def test_checkpoint_missing(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "none.pt")


def test_json_round_trip(tmp_path):
    data = {"acc": np.float32(0.5), "n": 3, "list": [1, 2], "nested": {"b": "x"}}
    path = write_json(tmp_path / "r.json", data)
    got = read_json(path)
    assert got == {"acc": 0.5, "n": 3, "list": [1, 2], "nested": {"b": "x"}}
    assert json.loads(path.read_text()) == got


def test_read_json_bad(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{"a": 1,')
    with pytest.raises(CorruptFileError) as info:
        read_json(path)
    _assert_rebuild_message(info.value, path)
    with pytest.raises(FileNotFoundError):
        read_json(tmp_path / "missing.json")


def test_error_hints_name_the_rule_that_makes_each_output():
    from pipeline_pkg.h5io import producing_rule

    run = "results/digits/badnets/resnet9/seed0"
    assert producing_rule(f"{run}/snapshots.pt") == "train"
    assert producing_rule(f"{run}/ft/model.pt") == "purify"
    assert producing_rule(f"{run}/detect-spectral/flagged.h5") == "detect"
    assert producing_rule(f"{run}/detect-spectral/model.pt") == "retrain"
    assert producing_rule(f"{run}/detect-spectral/metrics.json") == "evaluate"
