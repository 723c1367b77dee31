"""Simulated hospitals: who gets which images, and each hospital's scanner. The one place where they differ."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common import synthetic
from common.config import RunConfig
from common.errors import ConfigError
from common.image_set import ImageSet, load_npz_split, no_boxes, unknown_sources
from common.images import to_model_input
from common.splits import stratified_split

MIN_IMAGES_PER_HOSPITAL = 10
# On the built-in data the shortcut hospital's positives also show their finding at 40 % of the pinned contrast, as
# when the sickest patients are imaged on a portable scanner: there the tag is the easier cue, so a model learns it.
SHORTCUT_FADE = 0.4
HELDOUT_SEED_OFFSET = 1_000_003  # the server's held-out images are another draw of the generator
TEST_SEED_OFFSET = 7919  # a hospital's local test share is drawn apart from its validation split
_DIRICHLET_TRIES = 1000


@dataclass(frozen=True)
class Scanner:
    """A hospital's imaging chain: x -> (x - 0.5) * contrast + 0.5 + brightness + N(0, noise_std)."""

    contrast: float = 1.0
    brightness: float = 0.0
    noise_std: float = 0.0


def hospital_name(hospital: int) -> str:
    """The name a simulated hospital goes by in every report."""
    return f"hospital-{hospital}"


def scanner_for(hospital: int, seed: int, spread: float) -> Scanner:
    """Hospital `hospital`'s scanner; spread 0 gives every hospital the identity scanner."""
    rng = np.random.default_rng([seed, 0x5CA7, hospital])
    contrast, brightness, noise = rng.uniform(-0.15, 0.15), rng.uniform(-0.08, 0.08), rng.uniform(0.0, 0.02)
    return Scanner(1.0 + spread * contrast, spread * brightness, spread * noise)


def apply_scanner(images: np.ndarray, scanner: Scanner, rng: np.random.Generator) -> np.ndarray:
    """Images (n, h, w, c) in [0, 1] as seen through a scanner, still in [0, 1]."""
    out = (images - 0.5) * scanner.contrast + 0.5 + scanner.brightness
    if scanner.noise_std > 0:
        out = out + rng.normal(0.0, scanner.noise_std, images.shape).astype(np.float32)
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def add_shortcut_marker(images: np.ndarray) -> np.ndarray:
    """Burn a bright square tag into the top-left corner (a simulated scanner or text marker), in place; returns the images."""
    side = max(2, images.shape[1] // 10)
    images[:, 1 : 1 + side, 1 : 1 + side, :] = 1.0
    return images


def _mark_shortcut(images: np.ndarray, labels: np.ndarray, source: np.ndarray, cfg: RunConfig) -> None:
    """Put the shortcut marker on the positive images of the run's shortcut hospital, if any."""
    rows = _shortcut_rows(labels, source, cfg)
    images[rows] = add_shortcut_marker(images[rows])


def _shortcut_rows(labels: np.ndarray, source: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """Which images carry the shortcut (n,) bool: the positives of the run's shortcut hospital, if it has one."""
    return (cfg.shortcut_hospital >= 0) & (source == cfg.shortcut_hospital) & (labels.max(axis=1) == 1)


def _finding_fade(labels: np.ndarray, source: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """Each built-in image's finding contrast factor (n,): SHORTCUT_FADE on the shortcut's images, else 1."""
    return np.where(_shortcut_rows(labels, source, cfg), SHORTCUT_FADE, 1.0)


def assign_hospitals(labels: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """The hospital (0..num_hospitals-1) of every image of the pool: IID or Dirichlet label skew, each image once."""
    n, k = len(labels), cfg.num_hospitals
    if n < k * MIN_IMAGES_PER_HOSPITAL:
        raise ConfigError(
            f"run setting 'num-hospitals' = {k}: the data has {n} training images, enough for at most "
            f"{n // MIN_IMAGES_PER_HOSPITAL} hospitals of {MIN_IMAGES_PER_HOSPITAL} images each"
        )
    rng = np.random.default_rng([cfg.seed, 0xD1C7])
    if cfg.partition == "iid":
        return rng.permutation(np.arange(n) % k)
    classes = np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    for _ in range(_DIRICHLET_TRIES):
        hospital = np.empty(n, np.int64)
        for c in np.unique(classes):
            rows = rng.permutation(np.flatnonzero(classes == c))
            shares = rng.dirichlet(np.full(k, cfg.dirichlet_alpha))
            cuts = (np.cumsum(shares)[:-1] * len(rows)).astype(int)
            for h, part in enumerate(np.split(rows, cuts)):
                hospital[part] = h
        if np.bincount(hospital, minlength=k).min() >= MIN_IMAGES_PER_HOSPITAL:
            return hospital
    raise ConfigError(
        f"run settings 'dirichlet-alpha' = {cfg.dirichlet_alpha} and 'num-hospitals' = {k}: no split in "
        f"{_DIRICHLET_TRIES} draws gave every hospital {MIN_IMAGES_PER_HOSPITAL} images; raise the alpha or lower the hospitals"
    )


def check_builtin_labels(cfg: RunConfig) -> None:
    """The built-in data knows one finding or the three of its multi-label mode; anything else is a ConfigError."""
    if cfg.labels not in (synthetic.SINGLE, synthetic.MULTI):
        raise ConfigError(
            f"run setting 'labels' = {','.join(cfg.labels)!r}: the built-in data has {','.join(synthetic.SINGLE)!r} "
            f"or the three findings {','.join(synthetic.MULTI)!r}"
        )


def pool_labels(cfg: RunConfig) -> np.ndarray:
    """Labels (n, n_labels) of the training pool that the hospitals share out."""
    if cfg.data_path is None:
        check_builtin_labels(cfg)
        return synthetic.sample_labels(cfg.seed, cfg.num_hospitals * cfg.images_per_hospital, cfg.prevalence, len(cfg.labels))
    return np.concatenate([load_npz_split(cfg.data_path, split, len(cfg.labels))[1] for split in ("train", "val")])


def _pool_images(cfg: RunConfig, rows: np.ndarray, labels: np.ndarray, hospital: int) -> tuple[np.ndarray, np.ndarray]:
    """Images (n, s, s, c) and boxes (n, n_labels, 4) of the given pool rows of `hospital`, made or read only for those rows."""
    if cfg.data_path is None:
        fade = _finding_fade(labels[rows], np.full(len(rows), hospital), cfg)
        images, boxes = synthetic.make_images(cfg.seed, rows, labels[rows], cfg.image_size, cfg.labels, fade)
        return to_model_input(images, cfg.image_size, cfg.channels, cfg.image_fit), boxes
    images = np.concatenate([load_npz_split(cfg.data_path, split, len(cfg.labels))[0] for split in ("train", "val")])
    return to_model_input(images[rows], cfg.image_size, cfg.channels, cfg.image_fit), no_boxes(len(rows), len(cfg.labels))


def _hospital_images(cfg: RunConfig, hospital: int) -> ImageSet:
    """All of hospital `hospital`'s images, seen through its scanner."""
    if not 0 <= hospital < cfg.num_hospitals:
        raise ConfigError(f"hospital {hospital} does not exist: run setting 'num-hospitals' = {cfg.num_hospitals}")
    labels = pool_labels(cfg)
    rows = np.flatnonzero(assign_hospitals(labels, cfg) == hospital)
    images, boxes = _pool_images(cfg, rows, labels, hospital)
    images = apply_scanner(images, scanner_for(hospital, cfg.seed, cfg.scanner_spread), np.random.default_rng([cfg.seed, 0x1A6E, hospital]))
    _mark_shortcut(images, labels[rows], np.full(len(rows), hospital), cfg)
    return ImageSet(images, labels[rows], boxes, np.full(len(rows), hospital_name(hospital), dtype=object))


def _test_split(labels: np.ndarray, cfg: RunConfig, hospital: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, local test share) of a hospital's images; no test share when test-fraction is 0."""
    if cfg.test_fraction == 0:
        return np.arange(len(labels)), np.arange(0)
    return stratified_split(labels, cfg.test_fraction, cfg.seed + TEST_SEED_OFFSET + hospital)


def hospital_data(cfg: RunConfig, hospital: int) -> tuple[ImageSet, ImageSet]:
    """Hospital `hospital`'s (train, validation) images, seen through its scanner; its local test share left out."""
    local = _hospital_images(cfg, hospital)
    local = local.take(_test_split(local.labels, cfg, hospital)[0])
    train, val = stratified_split(local.labels, cfg.val_fraction, cfg.seed + hospital)
    return local.take(train), local.take(val)


def hospital_test(cfg: RunConfig, hospital: int) -> ImageSet:
    """Hospital `hospital`'s local test share (test-fraction of its images), never trained or validated on."""
    local = _hospital_images(cfg, hospital)
    return local.take(_test_split(local.labels, cfg, hospital)[1])


def heldout_set(cfg: RunConfig) -> ImageSet:
    """The server's held-out set: built-in data made on the server with every hospital's scanner on a share, or the file's test split."""
    if cfg.data_path is not None:
        images, labels = load_npz_split(cfg.data_path, "test", len(cfg.labels))
        n = len(images)
        return ImageSet(to_model_input(images, cfg.image_size, cfg.channels, cfg.image_fit), labels, no_boxes(n, len(cfg.labels)), unknown_sources(n))
    check_builtin_labels(cfg)
    seed = cfg.seed + HELDOUT_SEED_OFFSET
    labels = synthetic.sample_labels(seed, cfg.heldout_images, cfg.prevalence, len(cfg.labels))
    source = np.arange(cfg.heldout_images) % cfg.num_hospitals
    fade = _finding_fade(labels, source, cfg)
    images, boxes = synthetic.make_images(seed, np.arange(cfg.heldout_images), labels, cfg.image_size, cfg.labels, fade)
    images = to_model_input(images, cfg.image_size, cfg.channels, cfg.image_fit)
    for hospital in range(cfg.num_hospitals):
        rows = source == hospital
        rng = np.random.default_rng([seed, 0x1A6E, hospital])
        images[rows] = apply_scanner(images[rows], scanner_for(hospital, cfg.seed, cfg.scanner_spread), rng)
    _mark_shortcut(images, labels, source, cfg)
    return ImageSet(images, labels, boxes, np.array([hospital_name(h) for h in source], dtype=object))
