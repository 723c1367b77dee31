"""Image sets in memory, `.npz` files, preprocessing to the run's input, and train/validation splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


class DataError(ValueError):
    """Input data that cannot be used as it is; the message says what and where."""


@dataclass(frozen=True)
class ImageSet:
    """Images with their labels, lesion boxes where known, and the hospital each image came from where known."""

    images: np.ndarray  # (n, h, w, c) float32 in [0, 1]
    labels: np.ndarray  # (n, n_labels) uint8, 0/1
    boxes: np.ndarray  # (n, n_labels, 4) float32 (y0, x0, y1, x1) in pixels; NaN where no box is known
    source: np.ndarray  # (n,) int16 hospital index the image represents; -1 where unknown

    def __post_init__(self) -> None:
        """Check that the arrays agree in length and form."""
        n = len(self.images)
        if self.images.ndim != 4:
            raise DataError(f"images must be (n, h, w, c), got shape {self.images.shape}")
        for name, arr, ndim in (("labels", self.labels, 2), ("boxes", self.boxes, 3), ("source", self.source, 1)):
            if arr.ndim != ndim or len(arr) != n:
                raise DataError(f"{name} has shape {arr.shape}, expected {ndim} dimensions and {n} rows")

    def __len__(self) -> int:
        """Number of images."""
        return len(self.images)

    def take(self, rows: np.ndarray) -> ImageSet:
        """The subset at the given row indices."""
        return ImageSet(self.images[rows], self.labels[rows], self.boxes[rows], self.source[rows])


def to_model_input(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 or float images (n, h, w[, c]) as float32 (n, size, size, c) in [0, 1], resized when needed."""
    if images.ndim == 3:
        images = images[..., None]
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    elif images.dtype == np.uint16:
        images = images.astype(np.float32) / 65535.0
    else:
        images = images.astype(np.float32)
    if images.shape[1:3] != (size, size):
        import tensorflow as tf  # only resizing needs TensorFlow; keep imports of this module light

        images = tf.image.resize(images, (size, size), method="bilinear", antialias=True).numpy()
    return np.clip(images, 0.0, 1.0)


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


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation), stratified by the label pattern and reproducible from the seed."""
    rng = np.random.default_rng([seed, 0x5B117])
    patterns = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    train, val = [], []
    for pattern in np.unique(patterns):
        rows = rng.permutation(np.flatnonzero(patterns == pattern))
        n_val = int(round(len(rows) * val_fraction))
        if len(rows) >= 2:
            n_val = min(max(n_val, 1), len(rows) - 1)  # each split sees every class it can
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))
