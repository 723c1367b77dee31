"""Images held in memory at the model's input size (built-in data, `.npz` files, the server's held-out set), and the
MedMNIST-style `.npz` files they may come from."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.images import pixel_digest


@dataclass(frozen=True)
class ImageSet:
    """Images with their labels, lesion boxes where known, the hospital each came from where known, and pixel digests."""

    images: np.ndarray  # (n, h, w, c) float32 in [0, 1]
    labels: np.ndarray  # (n, n_labels) uint8, 0/1
    boxes: np.ndarray  # (n, n_labels, 4) float32 (y0, x0, y1, x1) in pixels; NaN where no box is known
    source: np.ndarray  # (n,) str: the hospital the image came from (e.g. 'hospital-2'); '' where unknown
    digest: np.ndarray = field(default=None)  # (n,) str: pixel_digest of each image as decoded; computed when not given

    def __post_init__(self) -> None:
        """Check that the arrays agree in length and form; digest the images when no digests were given."""
        n = len(self.images)
        if self.images.ndim != 4:
            raise DataError(f"images must be (n, h, w, c), got shape {self.images.shape}")
        if self.digest is None:
            object.__setattr__(self, "digest", np.array([pixel_digest(image) for image in self.images], dtype=object).reshape(n))
        for name, arr, ndim in (("labels", self.labels, 2), ("boxes", self.boxes, 3), ("source", self.source, 1), ("digest", self.digest, 1)):
            if arr.ndim != ndim or len(arr) != n:
                raise DataError(f"{name} has shape {arr.shape}, expected {ndim} dimensions and {n} rows")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def take(self, rows: np.ndarray) -> ImageSet:
        """The subset at the given row indices."""
        return ImageSet(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def join(self, other: ImageSet) -> ImageSet:
        """This set followed by another."""
        return ImageSet(*(np.concatenate([getattr(self, f.name), getattr(other, f.name)]) for f in dataclasses.fields(self)))


def unknown_sources(n: int) -> np.ndarray:
    """(n,) sources of images whose hospital is not known."""
    return np.full(n, "", dtype=object)


def no_boxes(n: int, n_labels: int) -> np.ndarray:
    """(n, n_labels, 4) boxes of images whose lesions are not outlined."""
    return np.full((n, n_labels, 4), np.nan, np.float32)


def load_npz_split(path: Path, split: str, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, h, w[, c]) and labels (n, n_labels) uint8 of one split ('train', 'val', 'test') of a MedMNIST-style .npz."""
    try:
        archive = np.load(path)
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: not a readable .npz file ({exc})") from exc
    with archive:
        keys = set(archive.files)
        want = (f"{split}_images", f"{split}_labels")
        if not set(want) <= keys:
            raise DataError(f"{path}: expected arrays {want[0]!r} and {want[1]!r}, found {sorted(keys)}")
        images, labels = archive[want[0]], archive[want[1]]
    labels = labels.reshape(len(labels), -1)
    if len(images) != len(labels):
        raise DataError(f"{path}: {want[0]} has {len(images)} images but {want[1]} has {len(labels)} rows")
    if labels.shape[1] != n_labels:
        raise DataError(f"{path}: {want[1]} has {labels.shape[1]} label column(s) but the run names {n_labels} label(s)")
    if not np.isin(labels, (0, 1)).all():
        raise DataError(f"{path}: {want[1]} holds values other than 0 and 1: {np.unique(labels)[:10].tolist()}")
    if images.ndim not in (3, 4):
        raise DataError(f"{path}: {want[0]} has shape {images.shape}, expected (n, h, w) or (n, h, w, c)")
    return images, labels.astype(np.uint8)
