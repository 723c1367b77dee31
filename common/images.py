"""Reading one image file (PNG, JPEG, DICOM) into pixels, fitting pixels to the model's square input, and a digest of
decoded pixels that finds the same image saved twice; the read step of a site's data path."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from common.dicom import looks_like_dicom, read_dicom
from common.errors import DataError
from common.site_file import DicomSettings

GREY_WEIGHTS = np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma, as Pillow's convert("L")
HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")  # 16/32-bit grey: scaled by the image's own range


def sniff(path: Path) -> str | None:
    """The image format of a file from its first bytes: 'png', 'jpeg', 'dicom', or None."""
    with open(path, "rb") as f:
        head = f.read(1024)
    if looks_like_dicom(head):  # first: a DICOM preamble may hold anything, even another format's magic number
        return "dicom"
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    return None


def min_max(pixels: np.ndarray) -> np.ndarray:
    """Scale to [0, 1] by the image's own range (all zeros for a flat image)."""
    low, high = float(pixels.min()), float(pixels.max())
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)


def to_channels(grey_or_rgb: np.ndarray, channels: int) -> np.ndarray:
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
            return to_channels(min_max(np.asarray(img, np.float32)), channels), mode
        rgba = np.asarray(img.convert("RGBA"), np.float32) / 255.0  # (h, w, 4)
    return to_channels(rgba[..., :3] * rgba[..., 3:], channels), mode


def read_image(path: str | Path, channels: int, dicom: DicomSettings = DicomSettings()) -> tuple[np.ndarray, str, str, list[str]]:
    """Any PNG, JPEG or DICOM file as (h, w, channels) float32 in [0, 1], its mode, its patient ID where the file has
    one, and the decoder's warnings about it.

    Raises NotAnImage for a file that reads but holds no image (a DICOMDIR, an RT plan), DataError naming the file
    and the reason when it is missing, not an image file, or does not decode."""
    path = Path(path)
    try:
        kind = sniff(path)
        if kind is None:
            raise DataError(f"{path}: not a PNG, JPEG or DICOM file (by its content)")
        if kind == "dicom":
            image, mode, patient, warned = read_dicom(path, dicom)
            return to_channels(image, channels), mode, patient, warned
        return (*_read_picture(path, channels), "", [])
    except DataError as exc:
        raise type(exc)(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from exc
    except FileNotFoundError as exc:
        raise DataError(f"{path}: file not found") from exc
    except PermissionError as exc:
        raise DataError(f"{path}: permission denied: this user cannot read the file") from exc
    except Exception as exc:  # noqa: BLE001 - every decoder failure becomes one message naming the file
        raise DataError(f"{path}: does not decode ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def pixel_digest(pixels: np.ndarray) -> str:
    """SHA-256 of decoded pixels (h, w, c) in [0, 1], quantised to 8 bits with their shape: the same image gives the
    same digest whatever file format or name it was saved under (lossless), and another image a different one."""
    quantised = np.round(np.clip(pixels, 0.0, 1.0) * 255).astype(np.uint8)
    digest = hashlib.sha256(f"{quantised.shape}".encode())
    digest.update(quantised.tobytes())
    return digest.hexdigest()


def fit_square(images, size: int, fit: str):
    """Images (n, h, w, c) or one image (h, w, c), a tensor or an array, as (…, size, size, c): padded with black
    around the image's centre ('pad'), cut to their central square ('crop'), or resized as they are ('stretch')."""
    import tensorflow as tf  # only resizing needs TensorFlow; keep imports of this module light

    height, width = tf.shape(images)[-3], tf.shape(images)[-2]
    if fit == "crop":
        side = tf.minimum(height, width)
        top, left = (height - side) // 2, (width - side) // 2
        images = images[..., top : top + side, left : left + side, :]
    elif fit == "pad":
        return tf.image.resize_with_pad(images, size, size, method="bilinear", antialias=True)
    return tf.image.resize(images, (size, size), method="bilinear", antialias=True)


def to_model_input(images: np.ndarray, size: int, channels: int = 1, fit: str = "pad") -> np.ndarray:
    """uint8 or float images (n, h, w[, c]) as float32 (n, size, size, channels) in [0, 1], fitted when needed."""
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
        images = fit_square(images, size, fit).numpy()
    return np.clip(images, 0.0, 1.0)
