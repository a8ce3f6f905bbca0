"""RadioML 2016.10a (DeepSig): 220,000 I/Q frames of 2x128 samples, 11 modulations at 20 SNRs.

Optional and off by default. DeepSig publishes no checksum for the archive, so the user supplies its
SHA-256 as the `sha256` parameter; nothing is read before the archive matches it. The data is a pickle
written by Python 2, so it is loaded by an unpickler that admits only what numpy arrays need: a pickle
from a tampered archive cannot run code.
"""

from __future__ import annotations

import re
import tarfile
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from ..configurable import ConfigError
from ..download import RemoteFile, require_verified
from ..h5io import CorruptFileError
from ..registry import DATASETS
from .base import Dataset, DatasetArrays
from .safe_pickle import restricted_load

ARCHIVE_NAME = "RML2016.10a.tar.bz2"
ARCHIVE_URL = "https://opendata.deepsig.io/datasets/2016.10/RML2016.10a.tar.bz2"
PICKLE_NAME = "RML2016.10a_dict.pkl"

_MISSING_SHA256 = (
    f"dataset 'radioml2016' needs the SHA-256 of {ARCHIVE_NAME}, which DeepSig does not publish: "
    f"download {ARCHIVE_URL} once, run `sha256sum {ARCHIVE_NAME}` on a copy you trust, and set "
    f"datasets.radioml2016.params.sha256 to that value in your config")


@DATASETS.register("radioml2016")
class RadioML2016(Dataset):
    modality = "rf"
    generated = False
    defaults = {
        "url": ARCHIVE_URL,  # DeepSig's archive, or a mirror of it (e.g. on your cluster)
        "test_fraction": 0.2,
        "snr_db": None,  # None: every SNR; [low, high]: keep frames with low <= SNR <= high (dB)
        "sha256": None,  # SHA-256 of RML2016.10a.tar.bz2; required to download or build
    }

    def check(self) -> None:
        fraction = self.params["test_fraction"]
        self.require(isinstance(fraction, (int, float)) and 0 < fraction < 1, "test_fraction",
                     "must be a number strictly between 0 and 1")
        snr_db = self.params["snr_db"]
        self.require(snr_db is None or (
            isinstance(snr_db, (list, tuple)) and len(snr_db) == 2
            and all(isinstance(v, (int, float)) for v in snr_db) and snr_db[0] <= snr_db[1]),
            "snr_db", "must be null (all SNRs) or [low, high] in dB with low <= high")
        sha256 = self.params["sha256"]
        self.require(sha256 is None or (isinstance(sha256, str)
                                        and re.fullmatch(r"[0-9a-fA-F]{64}", sha256) is not None),
                     "sha256", "must be null or the archive's SHA-256 as 64 hex digits")

    @property
    def files(self) -> list[RemoteFile]:  # type: ignore[override]
        """The archive, known only once the config gives its checksum."""
        if self.params["sha256"] is None:
            raise ConfigError(_MISSING_SHA256)
        return [RemoteFile(ARCHIVE_NAME, self.params["url"], sha256=self.params["sha256"])]

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        remote = self.files[0]  # raises ConfigError while sha256 is unset
        archive = Path(raw_dir) / remote.name
        if not archive.is_file():
            raise FileNotFoundError(
                f"missing {archive}; run the download job, or copy {remote.url} there by hand")
        require_verified(archive, remote)
        frames = _read_frames(archive)
        return self._split(frames, seed, source=archive)

    def _split(self, frames: dict[tuple[str, int], np.ndarray], seed: int, source: Path) -> DatasetArrays:
        class_names = sorted({mod for mod, _ in frames})
        label_of = {mod: index for index, mod in enumerate(class_names)}
        snr_db = self.params["snr_db"]
        cells = sorted(key for key in frames
                       if snr_db is None or snr_db[0] <= key[1] <= snr_db[1])
        if not cells:
            available = sorted({snr for _, snr in frames})
            raise ConfigError(f"dataset 'radioml2016': parameter snr_db={snr_db!r} keeps no frames; "
                              f"{source} has SNRs {available}")

        rng = np.random.default_rng(seed)
        parts: dict[str, list[np.ndarray]] = {k: [] for k in ("x_train", "x_test", "y_train", "y_test",
                                                              "snr_train", "snr_test")}
        # Split every (modulation, SNR) cell separately so both sides keep the same mix of classes and SNRs.
        for mod, snr in cells:
            x = frames[(mod, snr)]
            n_test = _test_count(len(x), self.params["test_fraction"])
            order = rng.permutation(len(x))
            for side, idx in (("test", order[:n_test]), ("train", order[n_test:])):
                parts[f"x_{side}"].append(x[idx])
                parts[f"y_{side}"].append(np.full(len(idx), label_of[mod], dtype=np.int64))
                parts[f"snr_{side}"].append(np.full(len(idx), snr, dtype=np.float32))

        arrays = {key: np.concatenate(value) for key, value in parts.items()}
        # Shuffle each side once so no consumer sees frames grouped by class and SNR.
        for side in ("train", "test"):
            shuffle = rng.permutation(len(arrays[f"y_{side}"]))
            for key in (f"x_{side}", f"y_{side}", f"snr_{side}"):
                arrays[key] = arrays[key][shuffle]
        return DatasetArrays(
            x_train=arrays["x_train"].astype(np.float32, copy=False),
            y_train=arrays["y_train"],
            x_test=arrays["x_test"].astype(np.float32, copy=False),
            y_test=arrays["y_test"],
            class_names=class_names,
            extras={"snr_train": arrays["snr_train"], "snr_test": arrays["snr_test"]},
        )


def _test_count(n: int, fraction: float) -> int:
    # Keep every cell on both sides of the split whenever it has at least two frames.
    if n < 2:
        return 0
    return min(max(round(n * fraction), 1), n - 1)


def _read_frames(archive: Path) -> dict[tuple[str, int], np.ndarray]:
    """The {(modulation, snr): float32 (n, 2, L)} dict from the archive's pickle, checked for layout."""
    try:
        with tarfile.open(archive, "r:bz2") as tar:
            member = _find_pickle_member(tar, archive)
            fileobj = tar.extractfile(member)
            if fileobj is None:
                raise CorruptFileError(f"{archive}: {member.name} is not a regular file")
            with fileobj:
                data = restricted_load(fileobj)
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CorruptFileError(
            f"cannot read {archive} ({exc}); delete it and rerun the download job") from exc
    return _check_layout(data, archive)


def _find_pickle_member(tar: tarfile.TarFile, archive: Path) -> tarfile.TarInfo:
    # Only the pickle is ever read, straight from the archive: nothing is written to disk, and a
    # member with an absolute or parent-relative path is refused outright.
    for member in tar:
        path = PurePosixPath(member.name)
        if path.name != PICKLE_NAME:
            continue
        if path.is_absolute() or ".." in path.parts or not member.isfile():
            raise CorruptFileError(f"{archive}: refusing unsafe archive member {member.name!r}")
        return member
    raise CorruptFileError(f"{archive} holds no {PICKLE_NAME}; delete it and rerun the download job")


def _check_layout(data: Any, source: Path) -> dict[tuple[str, int], np.ndarray]:
    def bad(why: str) -> CorruptFileError:
        return CorruptFileError(f"{source}: {PICKLE_NAME} is not in the RadioML 2016.10a layout "
                                f"({why}); delete it and rerun the download job")

    if not isinstance(data, dict) or not data:
        raise bad(f"expected a non-empty dict, got {type(data).__name__}")
    frames: dict[tuple[str, int], np.ndarray] = {}
    frame_length = None
    for key, value in data.items():
        if not (isinstance(key, tuple) and len(key) == 2 and isinstance(key[0], str)
                and isinstance(key[1], (int, np.integer))):
            raise bad(f"key {key!r} is not (modulation, snr)")
        if not (isinstance(value, np.ndarray) and value.ndim == 3 and value.shape[1] == 2):
            raise bad(f"value for {key!r} is not an (n, 2, length) array")
        if frame_length is None:
            frame_length = value.shape[2]
        elif value.shape[2] != frame_length:
            raise bad(f"frame length {value.shape[2]} for {key!r} differs from {frame_length}")
        frames[(key[0], int(key[1]))] = np.asarray(value, dtype=np.float32)
    return frames
