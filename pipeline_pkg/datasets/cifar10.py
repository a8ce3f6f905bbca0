"""CIFAR-10 (Krizhevsky, 2009): 60,000 colour images of 32x32 pixels in 10 classes.

The "python version" archive holds six pickled batches (data_batch_1..5: 50,000 training images,
test_batch: 10,000 test images) and batches.meta with the class names. Each batch pickle, written by
Python 2, is a dict whose b"data" is uint8 (10000, 3072), a row being the red, green and blue 32x32
planes in turn, and whose b"labels" is a list of ints. The batches are read straight from the
archive (nothing is extracted) by an unpickler that admits only plain containers, strings and numpy
arrays, and stored as uint8 (N, 3, 32, 32), in the archive's order (it is already shuffled).
"""

from __future__ import annotations

import pickle
import tarfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ..download import RemoteFile
from ..h5io import CorruptFileError
from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment
from .safe_pickle import ForbiddenGlobalError, restricted_load

ARCHIVE_NAME = "cifar-10-python.tar.gz"
ARCHIVE_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
# Published on https://www.cs.toronto.edu/~kriz/cifar.html; torchvision pins the same value. Read at
# call time (not copied into a class attribute) so tests can point it at a fixture archive.
ARCHIVE_MD5 = "c58f30108f718f92721af3b95e74349a"

FOLDER = "cifar-10-batches-py"
TRAIN_BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
TEST_BATCH = "test_batch"
META = "batches.meta"
IMAGE_SHAPE = (3, 32, 32)


@DATASETS.register("cifar10")
class CIFAR10(Dataset):
    modality = "image"
    generated = False
    defaults = {
        "url": ARCHIVE_URL,  # the archive, or a mirror of it (e.g. on your cluster)
        "augment": ["crop", "flip"],  # GPU augmentations the trainer applies: random crop, horizontal flip
    }

    def check(self) -> None:
        url = self.params["url"]
        self.require(isinstance(url, str) and url != "", "url", "must be the archive's URL")
        check_augment(self)

    @property
    def files(self) -> list[RemoteFile]:  # type: ignore[override]
        return [RemoteFile(ARCHIVE_NAME, self.params["url"], md5=ARCHIVE_MD5)]

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        archive = self.verified_archive(raw_dir)
        members = _read_members(archive, [*TRAIN_BATCHES, TEST_BATCH, META])

        class_names = _class_names(members[META], archive)
        train = [_batch(members[name], name, archive, len(class_names)) for name in TRAIN_BATCHES]
        x_test, y_test = _batch(members[TEST_BATCH], TEST_BATCH, archive, len(class_names))
        return DatasetArrays(
            x_train=np.concatenate([x for x, _ in train]),
            y_train=np.concatenate([y for _, y in train]),
            x_test=x_test,
            y_test=y_test,
            class_names=class_names,
        )


def _read_members(archive: Path, names: list[str]) -> dict[str, Any]:
    """Unpickle FOLDER/<name> for each name in one pass over the compressed archive."""
    wanted = {f"{FOLDER}/{name}": name for name in names}
    found: dict[str, Any] = {}
    member_name = None
    try:
        # Streaming mode: members are read in archive order without seeking back through the gzip.
        with tarfile.open(archive, "r|gz") as tar:
            for member in tar:
                name = wanted.get(member.name)
                if name is None:
                    continue
                member_name = member.name
                # Only exact, known member names are read, and only into memory: nothing is written.
                if not member.isfile() or name in found:
                    raise CorruptFileError(f"{archive}: unexpected archive member {member.name!r}; "
                                           f"delete it and rerun the download job")
                fileobj = tar.extractfile(member)
                assert fileobj is not None  # isfile() above
                found[name] = restricted_load(fileobj)
                member_name = None
    except ForbiddenGlobalError as exc:
        raise ForbiddenGlobalError(f"{archive}: {member_name}: {exc}") from exc
    except (tarfile.TarError, EOFError, OSError, zlib.error, ValueError,
            pickle.UnpicklingError) as exc:
        where = f" (reading {member_name})" if member_name else ""
        raise CorruptFileError(
            f"cannot read {archive}{where}: {exc}; delete it and rerun the download job") from exc
    missing = sorted(f"{FOLDER}/{name}" for name in names if name not in found)
    if missing:
        raise CorruptFileError(f"{archive} lacks {', '.join(missing)}; it is not the CIFAR-10 python "
                               f"archive: delete it and rerun the download job")
    return found


def _field(data: Any, key: str) -> Any:
    # Python 2 strings load as str (latin1), Python 3 bytes as bytes: accept either spelling of a key.
    if not isinstance(data, dict):
        return None
    return data.get(key, data.get(key.encode("latin1")))


def _bad_layout(archive: Path, name: str, why: str) -> CorruptFileError:
    return CorruptFileError(f"{archive}: {FOLDER}/{name} is not in the CIFAR-10 layout ({why}); "
                            f"delete it and rerun the download job")


def _class_names(meta: Any, archive: Path) -> list[str]:
    names = _field(meta, "label_names")
    if not (isinstance(names, list) and names and all(isinstance(n, (str, bytes)) for n in names)):
        raise _bad_layout(archive, META, "no list of label_names")
    return [n.decode("latin1") if isinstance(n, bytes) else n for n in names]


def _batch(data: Any, name: str, archive: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    pixels, labels = _field(data, "data"), _field(data, "labels")
    size = int(np.prod(IMAGE_SHAPE))
    if not (isinstance(pixels, np.ndarray) and pixels.dtype == np.uint8 and pixels.ndim == 2
            and pixels.shape[1] == size):
        raise _bad_layout(archive, name, f"data is not a uint8 (n, {size}) array")
    if not (isinstance(labels, list) and len(labels) == len(pixels)
            and all(isinstance(v, int) and 0 <= v < num_classes for v in labels)):
        raise _bad_layout(archive, name, f"labels is not a list of {len(pixels)} ints in [0, {num_classes})")
    # Each row is three row-major 32x32 planes (R, G, B): a plain reshape gives channels first.
    x = np.ascontiguousarray(pixels.reshape(len(pixels), *IMAGE_SHAPE))
    return x, np.asarray(labels, dtype=np.int64)
