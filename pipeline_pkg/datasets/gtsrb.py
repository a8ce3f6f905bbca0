"""GTSRB, the German Traffic Sign Recognition Benchmark (Stallkamp et al., IJCNN 2011): 43 classes,
39,209 training and 12,630 test images of one sign each, 15 to 250 pixels a side.

Three official archives: the training images (GTSRB/Final_Training/Images/<class 00000..00042>/*.ppm,
each class folder with its GT-<class>.csv), the test images (GTSRB/Final_Test/Images/*.ppm) and the
test ground truth (GT-final_test.csv). The CSVs are semicolon-separated with the columns
Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId. Images are decoded straight from the zips
(nothing is extracted), optionally cropped to the sign's region of interest, resized to size x size
and stored as uint8 (N, 3, size, size).

The training images come grouped by class and by track (30 pictures of one physical sign): they are
shuffled with the data seed so that no slice of the training set holds a single class. The test set
keeps its official order (already random). The dataset publishes no class names with the archives,
so classes are named class_00 .. class_42 after their ClassId.
"""

from __future__ import annotations

import csv
import io
import re
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from ..download import RemoteFile, require_verified
from ..h5io import CorruptFileError
from ..registry import DATASETS
from .base import Dataset, DatasetArrays, check_augment

ARCHIVE_URL = "https://sid.erda.dk/public/archives/daaeac0d7ce1152aea9b61d9f1e19370/"
TRAIN_ARCHIVE = "GTSRB_Final_Training_Images.zip"
TEST_ARCHIVE = "GTSRB_Final_Test_Images.zip"
TEST_GT_ARCHIVE = "GTSRB_Final_Test_GT.zip"
# The archives' md5 digests, as pinned by torchvision (test images, test GT) and other loaders of these
# exact files (all three). Read at call time so tests can point them at fixture archives.
MD5 = {
    TRAIN_ARCHIVE: "f33fd80ac59bff73c82d25ab499e03a3",
    TEST_ARCHIVE: "c7e4e6327067d32654124b0fe9e82185",
    TEST_GT_ARCHIVE: "fe31e9c9270bbcd7b84b7f21a9d9d9e5",
}

NUM_CLASSES = 43
TRAIN_DIR = "GTSRB/Final_Training/Images"
TEST_DIR = "GTSRB/Final_Test/Images"
TEST_GT_CSV = "GT-final_test.csv"
_TRAIN_CSV = re.compile(rf"{re.escape(TRAIN_DIR)}/(\d{{5}})/GT-\1\.csv")
_COLUMNS = ("Filename", "Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2", "ClassId")


def missing_archives_message(dataset: str, raw_dir: Path, missing: list[RemoteFile]) -> str:
    head = (f"dataset '{dataset}': missing {len(missing)} of its archives in {raw_dir}; run the download "
            f"job, or fetch them on a machine with internet access and copy them there (the `data_root` "
            f"config key is the folder that holds {dataset}/):")
    return "\n".join([head, *(f"  {raw_dir / remote.name}  from {remote.url}" for remote in missing)])


@DATASETS.register("gtsrb")
class GTSRB(Dataset):
    modality = "image"
    generated = False
    defaults = {
        "url": ARCHIVE_URL,  # folder URL holding the three archives, or a mirror of it
        "size": 32,  # images are resized to size x size pixels
        # Every image has a margin of 10% of the sign (at least 5 pixels) and the sign is not always
        # centred: cropping to the annotated region gives every sign the same position and scale, so
        # the few pixels of a small image are spent on the sign rather than on background.
        "crop_roi": True,
        # GPU augmentations the trainer applies: random crop only, since mirroring a sign can turn it
        # into another class (keep left <-> keep right, turn left <-> turn right).
        "augment": ["crop"],
    }

    def check(self) -> None:
        url = self.params["url"]
        self.require(isinstance(url, str) and url != "", "url", "must be the URL of the archives' folder")
        size = self.params["size"]
        self.require(isinstance(size, int) and not isinstance(size, bool) and size >= 8, "size",
                     "must be an integer >= 8 (pixels a side)")
        self.require(isinstance(self.params["crop_roi"], bool), "crop_roi", "must be true or false")
        check_augment(self)

    @property
    def files(self) -> list[RemoteFile]:  # type: ignore[override]
        base = self.params["url"].rstrip("/") + "/"
        return [RemoteFile(name, base + name, md5=MD5[name])
                for name in (TRAIN_ARCHIVE, TEST_ARCHIVE, TEST_GT_ARCHIVE)]

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        raw_dir = Path(raw_dir)
        missing = [remote for remote in self.files if not (raw_dir / remote.name).is_file()]
        if missing:
            raise FileNotFoundError(missing_archives_message(self.name, raw_dir, missing))
        paths = {remote.name: require_verified(raw_dir / remote.name, remote) for remote in self.files}

        size, crop = self.params["size"], self.params["crop_roi"]
        x_train, y_train = _read_train(paths[TRAIN_ARCHIVE], size, crop)
        x_test, y_test = _read_test(paths[TEST_ARCHIVE], paths[TEST_GT_ARCHIVE], size, crop)
        order = np.random.default_rng(seed).permutation(len(y_train))
        return DatasetArrays(
            x_train=x_train[order], y_train=y_train[order], x_test=x_test, y_test=y_test,
            class_names=[f"class_{c:02d}" for c in range(NUM_CLASSES)],
        )


def _corrupt(archive: Path, why: str) -> CorruptFileError:
    return CorruptFileError(f"cannot read {archive} ({why}); delete it and rerun the download job")


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise _corrupt(archive, str(exc)) from exc


def _read(zf: zipfile.ZipFile, archive: Path, member: str) -> bytes:
    try:
        return zf.read(member)
    except KeyError as exc:
        raise _corrupt(archive, f"no member {member}") from exc
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as exc:
        raise _corrupt(archive, f"{member}: {exc}") from exc


def _rows(zf: zipfile.ZipFile, archive: Path, member: str) -> Iterator[dict[str, str]]:
    """The CSV's rows, each checked to have the columns this loader uses."""
    try:
        text = _read(zf, archive, member).decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _corrupt(archive, f"{member} is not text: {exc}") from exc
    reader = csv.DictReader(io.StringIO(text), delimiter=";", skipinitialspace=True)
    missing = [c for c in _COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise _corrupt(archive, f"{member} lacks the column(s) {missing}")
    yield from reader


def _sample(row: dict[str, str], archive: Path, member: str) -> tuple[str, tuple[int, int, int, int], int]:
    try:
        box = tuple(int(row[c]) for c in ("Roi.X1", "Roi.Y1", "Roi.X2", "Roi.Y2"))
        label = int(row["ClassId"])
    except (TypeError, ValueError) as exc:
        raise _corrupt(archive, f"{member}: bad row {row}") from exc
    if not 0 <= label < NUM_CLASSES:
        raise _corrupt(archive, f"{member}: ClassId {label} outside 0..{NUM_CLASSES - 1}")
    return row["Filename"], box, label  # type: ignore[return-value]


def _image(zf: zipfile.ZipFile, archive: Path, member: str, box: tuple[int, int, int, int],
           size: int, crop: bool) -> np.ndarray:
    data = _read(zf, archive, member)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert("RGB")
            if crop:
                # Roi.X2/Y2 are read as the box's end (PIL's crop convention); clamped to the image.
                x1, y1, x2, y2 = box
                x1, y1 = max(0, x1), max(0, y1)
                x2, y2 = min(img.width, x2), min(img.height, y2)
                if x2 > x1 and y2 > y1:
                    img = img.crop((x1, y1, x2, y2))
            # Pillow's bilinear filter widens with the scale factor when shrinking: antialiased.
            img = img.resize((size, size), Image.Resampling.BILINEAR)
            return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)
    except (OSError, EOFError, ValueError, Image.DecompressionBombError) as exc:
        raise _corrupt(archive, f"{member}: {exc}") from exc


def _stack(images: list[np.ndarray], labels: list[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    x = np.stack(images) if images else np.zeros((0, 3, size, size), dtype=np.uint8)
    return x, np.asarray(labels, dtype=np.int64)


def _read_train(archive: Path, size: int, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    with _open_zip(archive) as zf:
        csvs = sorted((m.group(1), name) for name in zf.namelist() if (m := _TRAIN_CSV.fullmatch(name)))
        if not csvs:
            raise _corrupt(archive, f"no {TRAIN_DIR}/<class>/GT-<class>.csv: not the GTSRB training archive")
        for folder, member in csvs:
            for row in _rows(zf, archive, member):
                filename, box, label = _sample(row, archive, member)
                if label != int(folder):
                    raise _corrupt(archive, f"{member}: ClassId {label} in the folder of class {folder}")
                images.append(_image(zf, archive, f"{TRAIN_DIR}/{folder}/{filename}", box, size, crop))
                labels.append(label)
    return _stack(images, labels, size)


def _read_test(archive: Path, gt_archive: Path, size: int, crop: bool) -> tuple[np.ndarray, np.ndarray]:
    with _open_zip(gt_archive) as zf:
        samples = [_sample(row, gt_archive, TEST_GT_CSV) for row in _rows(zf, gt_archive, TEST_GT_CSV)]
    if not samples:
        raise _corrupt(gt_archive, f"{TEST_GT_CSV} lists no images")
    with _open_zip(archive) as zf:
        images = [_image(zf, archive, f"{TEST_DIR}/{filename}", box, size, crop)
                  for filename, box, _ in samples]
    return _stack(images, [label for _, _, label in samples], size)
