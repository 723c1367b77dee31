"""Image sets in memory, `.npz` files, image files (PNG, JPEG, DICOM), preprocessing to the run's input, and splits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.config import DicomSettings

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma, as Pillow's convert("L")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit grey: scaled by the image's own range


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

    def join(self, other: ImageSet) -> ImageSet:
        """This set followed by another."""
        return ImageSet(*(np.concatenate([a, b]) for a, b in zip((self.images, self.labels, self.boxes, self.source),
                                                                 (other.images, other.labels, other.boxes, other.source))))  # fmt: skip


def to_model_input(images: np.ndarray, size: int, channels: int = 1) -> np.ndarray:
    """uint8 or float images (n, h, w[, c]) as float32 (n, size, size, channels) in [0, 1], resized when needed."""
    if images.ndim == 3:
        images = images[..., None]
    if images.shape[-1] != channels:
        images = np.repeat(images, channels, axis=-1) if images.shape[-1] == 1 else (images[..., :3] @ GREY_WEIGHTS)[..., None]
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


def sniff(path: Path) -> str | None:
    """The image format of a file from its first bytes: 'png', 'jpeg', 'dicom', or None."""
    with open(path, "rb") as f:
        head = f.read(132)
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head[128:132] == b"DICM":
        return "dicom"
    return None


def _min_max(pixels: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's own range (all zeros for a flat image)."""
    low, high = float(pixels.min()), float(pixels.max())
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)


def _to_channels(grey_or_rgb: np.ndarray, channels: int) -> np.ndarray:
    """(h, w) grey or (h, w, 3) RGB in [0, 1] as (h, w, channels) float32."""
    if grey_or_rgb.ndim == 2:
        return np.repeat(grey_or_rgb[..., None], channels, axis=-1).astype(np.float32)
    return (grey_or_rgb if channels == 3 else (grey_or_rgb @ GREY_WEIGHTS)[..., None]).astype(np.float32)


def _read_picture(path: Path, channels: int) -> tuple[np.ndarray, str]:
    """A PNG or JPEG of any mode as (h, w, channels) float32 in [0, 1], and its mode; transparency is flattened onto black."""
    from PIL import Image

    with Image.open(path) as img:
        img.load()  # decodes now: a truncated or corrupt file fails here
        mode = f"{img.format} {img.mode}"
        if img.mode in HIGH_BIT_MODES:
            return _to_channels(_min_max(np.asarray(img, np.float32)), channels), mode
        rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0  # (h, w, 4)
    return _to_channels(rgba[..., :3] * rgba[..., 3:], channels), mode


def _first(value) -> float:
    """The first of a DICOM multi-value, or the value."""
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def _read_dicom(path: Path, channels: int, settings: DicomSettings) -> tuple[np.ndarray, str, str]:
    """A DICOM image as (h, w, channels) float32 in [0, 1] (modality LUT, window, MONOCHROME1 inverted), its mode, its patient ID."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    ds = pydicom.dcmread(path)
    if "PixelData" not in ds:
        raise ValueError("no pixel data (a DICOM without an image, such as a structured report)")
    pixels = ds.pixel_array.astype(np.float32)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise ValueError(f"{frames} frames: expected a single image")
    if settings.rescale:
        pixels = apply_modality_lut(pixels, ds).astype(np.float32)
    window = settings.window
    if window == "file" and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if isinstance(window, tuple) and window[1] > 0:
        centre, width = window
        pixels = np.clip((pixels - (centre - width / 2)) / width, 0.0, 1.0)
    else:
        pixels = _min_max(pixels)
    if photometric == "MONOCHROME1" and settings.invert_monochrome1:
        pixels = 1.0 - pixels
    mode = f"DICOM {photometric} {ds.get('BitsStored', '?')}-bit"
    return _to_channels(pixels, channels), mode, str(ds.get("PatientID", "") or "")


def read_image(path: str | Path, channels: int, dicom: DicomSettings = DicomSettings()) -> tuple[np.ndarray, str, str]:
    """Any PNG, JPEG or DICOM file as (h, w, channels) float32 in [0, 1], its mode, and its patient ID where the file has one.

    Raises DataError naming the file and the reason when it is missing, not an image, or does not decode."""
    path = Path(path)
    try:
        kind = sniff(path)
        if kind is None:
            raise DataError(f"{path}: not a PNG, JPEG or DICOM file (by its content)")
        if kind == "dicom":
            return _read_dicom(path, channels, dicom)
        return (*_read_picture(path, channels), "")
    except DataError:
        raise
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes one message naming the file
        raise DataError(f"{path}: does not decode ({type(exc).__name__}: {exc})") from exc


def patient_split(labels: np.ndarray, patients: np.ndarray, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (train, validation) with every patient on one side only, stratified by label pattern where the
    patients allow, reproducible from the seed; an image without a patient ID ('') counts as a patient of its own."""
    import warnings

    from sklearn.model_selection import StratifiedGroupKFold

    n = len(labels)
    groups = np.where(patients == "", np.char.add("\0row", np.arange(n).astype(str)), patients.astype(str))
    n_splits = max(2, int(round(1 / val_fraction)))
    if len(np.unique(groups)) < n_splits:
        raise DataError(f"{len(np.unique(groups))} patient(s): too few to keep a validation share of {val_fraction:g} apart by patient")
    patterns = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "the least populated class has only k members": stratified where it can be
        train, val = next(folds.split(np.zeros(n), patterns, groups))
    return np.sort(train), np.sort(val)
