"""What every dataset provides: train and test arrays in one layout, made from files in `raw_dir`
(downloaded datasets) or generated from a seed (generated datasets)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..augment import AUGMENTATIONS
from ..configurable import Configurable


@dataclass
class DatasetArrays:
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    class_names: list[str]
    # Per-sample side information stored next to the arrays, e.g. {"snr_train": ..., "snr_test": ...}.
    extras: dict[str, np.ndarray] = field(default_factory=dict)


def missing_archive_message(dataset: str, path: Path, remote) -> str:
    return (f"dataset '{dataset}': missing {remote.name} at {path}; run the download job, or fetch "
            f"{remote.url} on a machine with internet access and copy it there (the `data_root` "
            f"config key is the folder that holds {dataset}/{remote.name})")


class Dataset(Configurable):
    kind = "dataset"
    modality: ClassVar[str] = "?"  # "rf", "image" or "pointcloud": attacks declare which they fit
    generated: ClassVar[bool] = False  # True: built by a generate rule from a seed, nothing to download
    files: ClassVar[list] = []  # RemoteFile entries the download rule fetches into data_root/<name>/

    def build(self, raw_dir: Path, seed: int) -> DatasetArrays:
        raise NotImplementedError

    def verified_archive(self, raw_dir: Path) -> Path:
        """The dataset's one downloaded archive in `raw_dir`, checked against its checksum; a clear error
        naming where to put it when it is missing."""
        from ..download import require_verified

        remote = self.files[0]
        archive = Path(raw_dir) / remote.name
        if not archive.is_file():
            raise FileNotFoundError(missing_archive_message(self.name, archive, remote))
        require_verified(archive, remote)
        return archive


def check_augment(dataset: Dataset) -> None:
    """Shared by the image datasets: `augment` lists the device augmentations the trainer applies."""
    valid = sorted(AUGMENTATIONS)
    dataset.require(isinstance(dataset.augment, list) and set(dataset.augment) <= set(valid),
                    "augment", f"must be a list drawn from {valid}")
