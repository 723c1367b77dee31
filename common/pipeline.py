"""The tf.data input pipeline: images from memory or streamed from disk with parallel decoding, cached where they fit,
augmented in training only, prefetched."""

from __future__ import annotations

import numpy as np
import tensorflow as tf
import keras

from common.config import RunConfig
from common.image_set import ImageSet
from common.images import fit_square, read_image
from common.site_file import Augmentation, DicomSettings
from common.site_index import SiteFiles

CACHE_BYTES = 1 << 30  # decoded images up to 1 GiB stay in memory after the first epoch; larger sites stream every epoch
SHUFFLE_BUFFER = 10_000
PREDICT_BATCH = 256


def augmenter(augmentation: Augmentation, seed: int) -> keras.Sequential | None:
    """The site's augmentation as Keras layers on a batch (b, s, s, c), or None when every option is off.

    Horizontal flips only when the site file asks: a chest X-ray's left and right are not interchangeable."""
    if not augmentation.active:
        return None
    layers = []
    if augmentation.rotation_degrees:
        layers.append(keras.layers.RandomRotation(augmentation.rotation_degrees / 360.0, fill_mode="constant", seed=seed))
    if augmentation.zoom:
        layers.append(keras.layers.RandomZoom(augmentation.zoom, fill_mode="constant", seed=seed + 1))
    if augmentation.shift:
        layers.append(keras.layers.RandomTranslation(augmentation.shift, augmentation.shift, fill_mode="constant", seed=seed + 2))
    if augmentation.contrast:
        layers.append(keras.layers.RandomContrast(augmentation.contrast, seed=seed + 3))
    if augmentation.horizontal_flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 4))
    if augmentation.noise:
        layers.append(keras.layers.GaussianNoise(augmentation.noise, seed=seed + 5))
    return keras.Sequential(layers, name="augmentation")


def _decoder(cfg: RunConfig, dicom: DicomSettings, fit: str):
    """A tf.data map from (path, labels) to (image (s, s, c) float32 in [0, 1], labels), decoding in Python threads."""
    size, channels = cfg.image_size, cfg.channels

    def read(path: tf.Tensor) -> np.ndarray:
        return read_image(path.numpy().decode(), channels, dicom)[0]  # (h, w, c)

    def decode(path: tf.Tensor, labels: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image = tf.py_function(read, [path], tf.float32)
        image.set_shape([None, None, channels])  # (h, w, c): sizes differ from file to file
        image = fit_square(image, size, fit)  # (s, s, c)
        return tf.clip_by_value(image, 0.0, 1.0), labels

    return decode


def decoded(data: SiteFiles | ImageSet, cfg: RunConfig, *, dicom: DicomSettings = DicomSettings(), fit: str = "pad") -> tf.data.Dataset:
    """Unbatched (image (s, s, c) float32 in [0, 1], labels (n_labels,) float32) in file order: files are decoded and
    fitted to the square input as `fit` says (in-memory images are fitted already), and kept in memory where they fit."""
    labels = data.labels.astype(np.float32)
    if isinstance(data, ImageSet):
        return tf.data.Dataset.from_tensor_slices((data.images, labels))
    ds = tf.data.Dataset.from_tensor_slices((data.paths.astype(str), labels))
    ds = ds.map(_decoder(cfg, dicom, fit), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.cache() if len(data) * cfg.image_size**2 * cfg.channels * 4 <= CACHE_BYTES else ds


def batches(
    images: tf.data.Dataset, n: int, cfg: RunConfig, *, training: bool, seed: int = 0, augmentation: Augmentation = Augmentation(),
) -> tf.data.Dataset:  # fmt: skip
    """Batches of (images (b, s, s, c), labels (b, n_labels)) of n decoded images: shuffled and augmented by `seed`
    when training (the same seed, the same order and augmentation), in order otherwise."""
    ds = images.shuffle(min(n, SHUFFLE_BUFFER), seed=seed, reshuffle_each_iteration=True) if training else images
    ds = ds.batch(cfg.batch_size if training else PREDICT_BATCH)
    augment = augmenter(augmentation, seed) if training else None
    if augment is not None:
        ds = ds.map(lambda x, y: (tf.clip_by_value(augment(x, training=True), 0.0, 1.0), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def dataset(
    data: SiteFiles | ImageSet, cfg: RunConfig, *, training: bool, seed: int = 0,
    augmentation: Augmentation = Augmentation(), dicom: DicomSettings = DicomSettings(), fit: str = "pad",
) -> tf.data.Dataset:  # fmt: skip
    """Batches of (images (b, s, s, c), labels (b, n_labels) float32) of a site's images: decoded(), then batches()."""
    return batches(decoded(data, cfg, dicom=dicom, fit=fit), len(data), cfg, training=training, seed=seed, augmentation=augmentation)
