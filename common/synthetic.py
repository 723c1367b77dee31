"""The built-in data set: chest-like grayscale images, a positive one carrying a lesion inside a lung field.

Two modes: one finding ("lesion"), or three ("nodule", "basal_opacity", "cardiomegaly"), each with its box.

Difficulty is pinned here so nobody can tune it away (see README, "Built-in data"):
a lesion's peak contrast is 2.5 to 6 times the noise's standard deviation, its radius 2 to 5 pixels at 64x64
(scaled with the image size), and its centre lies at a random place inside a lung field with the whole lesion in it.
Image i of a data set depends only on (seed, i), so a hospital can make its own images without making anyone else's.
"""

from __future__ import annotations

import numpy as np

NOISE_STD = 0.05
LESION_CONTRAST = (2.5, 6.0)  # peak contrast, in units of NOISE_STD
LESION_RADIUS_64 = (2.0, 5.0)  # pixels at 64x64; scaled linearly with the image size

BODY = 0.55  # soft-tissue intensity inside the body outline
LUNG = 0.28  # the darker, air-filled lung fields
MEDIASTINUM = 0.70  # spine and heart shadow between the lungs


def sample_labels(seed: int, n: int, prevalence: float, n_findings: int = 1) -> np.ndarray:
    """The labels of images 0..n-1 of the data set `seed`, shape (n, n_findings) uint8, each finding independent."""
    rng = np.random.default_rng([seed, 0x1ABE1])
    return (rng.random((n, n_findings)) < prevalence).astype(np.uint8)


def lung_ellipses(rng: np.random.Generator, size: int) -> list[tuple[float, float, float, float]]:
    """Two lung fields as (centre_y, centre_x, semi-axis_y, semi-axis_x) in pixels, jittered per image."""
    s = size / 64.0
    cy = (34 + rng.uniform(-2, 2)) * s
    ay = (17 + rng.uniform(-2, 2)) * s
    ax = (9 + rng.uniform(-1, 1)) * s
    gap = (12 + rng.uniform(-1.5, 1.5)) * s
    return [(cy, size / 2 - gap, ay, ax), (cy, size / 2 + gap, ay, ax)]


def _inside(yy: np.ndarray, xx: np.ndarray, ellipse: tuple[float, float, float, float]) -> np.ndarray:
    """Boolean mask of the pixels inside an ellipse."""
    cy, cx, ay, ax = ellipse
    return ((yy - cy) / ay) ** 2 + ((xx - cx) / ax) ** 2 <= 1.0


def _anatomy(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """A noiseless chest-like image (size, size) float32, its lung mask (size, size) bool, and the lung ellipses."""
    s = size / 64.0
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    img = np.zeros((size, size), np.float32)
    body = (size * 0.5 + rng.uniform(-1, 1) * s, size * 0.5, (29 + rng.uniform(-1, 1)) * s, (27 + rng.uniform(-1.5, 1.5)) * s)
    img[_inside(yy, xx, body)] = BODY
    img[_inside(yy, xx, (size * 0.55, size * 0.5, 22 * s, 4 * s))] = MEDIASTINUM
    lungs = lung_ellipses(rng, size)
    lung_mask = np.zeros((size, size), bool)
    for ellipse in lungs:
        lung_mask |= _inside(yy, xx, ellipse)
    img[lung_mask] = LUNG
    # Ribs: faint horizontal bands across the lungs, so texture is not a give-away for a lesion.
    ribs = 0.04 * np.sin(2 * np.pi * yy / (7 * s) + rng.uniform(0, 2 * np.pi))
    img += np.where(lung_mask, ribs, 0).astype(np.float32)
    return img, lung_mask, lungs


def lesion_centre_and_radius(rng: np.random.Generator, size: int, lungs: list) -> tuple[float, float, float]:
    """A lesion radius and a centre drawn uniformly from the places where the whole lesion fits in a lung field."""
    s = size / 64.0
    radius = rng.uniform(*LESION_RADIUS_64) * s
    cy, cx, ay, ax = lungs[rng.integers(2)]
    # Uniform in the ellipse shrunk by the radius: every point of the disc then lies inside the lung field.
    r, theta = np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
    return cy + r * (ay - radius) * np.sin(theta), cx + r * (ax - radius) * np.cos(theta), radius


def _paint_nodule(img: np.ndarray, rng: np.random.Generator, lungs: list, fade: float) -> np.ndarray:
    """Add a nodule-like lesion inside a lung field at the pinned difficulty times `fade`; returns its box."""
    size = img.shape[0]
    cy, cx, radius = lesion_centre_and_radius(rng, size, lungs)
    peak = fade * rng.uniform(*LESION_CONTRAST) * NOISE_STD
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    # Full peak contrast across the disc, a one-pixel soft edge at the radius.
    img += peak * np.clip(radius + 0.5 - np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2), 0.0, 1.0)
    return np.array([cy - radius, cx - radius, cy + radius, cx + radius], np.float32)


def _paint_basal_opacity(img: np.ndarray, rng: np.random.Generator, lungs: list, fade: float) -> np.ndarray:
    """Add a hazy opacity filling the base (lowest quarter to two fifths) of one lung field, its contrast times `fade`; returns its box."""
    size = img.shape[0]
    cy, cx, ay, ax = lungs[rng.integers(2)]
    top = cy + ay * (1 - 2 * rng.uniform(0.25, 0.4))
    peak = fade * rng.uniform(*LESION_CONTRAST) * NOISE_STD
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    region = _inside(yy, xx, (cy, cx, ay, ax)) & (yy >= top)
    img += np.where(region, peak * np.clip((yy - top) / 2.0, 0.0, 1.0), 0.0).astype(np.float32)
    return np.array([top, cx - ax, cy + ay, cx + ax], np.float32)


def _heart(rng: np.random.Generator, size: int, enlarged: bool) -> tuple[float, float, float, float]:
    """The heart shadow's ellipse, widened by 25 to 50 % when enlarged (cardiomegaly)."""
    s = size / 64.0
    ay, ax = (8 + rng.uniform(-0.5, 0.5)) * s, (7 + rng.uniform(-0.5, 0.5)) * s
    widening = rng.uniform(1.25, 1.5)  # drawn either way, so that the other findings do not move with this label
    return (size * 0.66, size * 0.5 + 2 * s, ay, ax * widening if enlarged else ax)


FINDINGS = {"lesion": _paint_nodule, "nodule": _paint_nodule, "basal_opacity": _paint_basal_opacity, "cardiomegaly": None}
SINGLE = ("lesion",)
MULTI = ("nodule", "basal_opacity", "cardiomegaly")  # the 3-finding mode


def make_image(
    seed: int, index: int, labels: tuple[int, ...], size: int = 64, findings: tuple[str, ...] = SINGLE, fade: float = 1.0
) -> tuple[np.ndarray, np.ndarray]:
    """Image `index` of data set `seed`: (size, size) float32 in [0, 1] and a box (y0, x0, y1, x1) per finding, NaN if absent.

    `fade` scales the contrast of the painted findings (nodule, basal opacity); 1 keeps the pinned difficulty."""
    if findings not in (SINGLE, MULTI):
        raise ValueError(f"the built-in data has the findings {SINGLE} or {MULTI}, not {findings}")
    rng = np.random.default_rng([seed, index])
    img, _, lungs = _anatomy(rng, size)
    boxes = np.full((len(findings), 4), np.nan, np.float32)
    if "cardiomegaly" in findings:
        j = findings.index("cardiomegaly")
        cy, cx, ay, ax = _heart(rng, size, bool(labels[j]))
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
        img[_inside(yy, xx, (cy, cx, ay, ax))] = MEDIASTINUM
        if labels[j]:
            boxes[j] = (cy - ay, cx - ax, cy + ay, cx + ax)
    for j, finding in enumerate(findings):
        if FINDINGS[finding] is not None:
            # Each finding draws from a stream of its own, so one finding's label never moves another's.
            finding_rng = np.random.default_rng([seed, index, 0xF1D + j])
            if labels[j]:
                boxes[j] = FINDINGS[finding](img, finding_rng, lungs, fade)
    # Noise from a stream of its own: an image differs from its finding-free twin by the findings alone.
    img += np.random.default_rng([seed, index, 0x4015E]).normal(0.0, NOISE_STD, img.shape).astype(np.float32)
    return np.clip(img, 0.0, 1.0), boxes


def make_images(
    seed: int, indices: np.ndarray, labels: np.ndarray, size: int = 64, findings: tuple[str, ...] = SINGLE, fade: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Images for the given indices and labels (n, n_findings): (n, size, size, 1) float32 and boxes (n, n_findings, 4).

    `fade` (n,), if given, scales each image's finding contrast (see make_image)."""
    images = np.empty((len(indices), size, size, 1), np.float32)
    boxes = np.empty((len(indices), len(findings), 4), np.float32)
    fade = np.ones(len(indices)) if fade is None else fade
    for row, index in enumerate(indices):
        images[row, :, :, 0], boxes[row] = make_image(seed, int(index), tuple(labels[row]), size, findings, float(fade[row]))
    return images, boxes


def lung_mask(seed: int, index: int, size: int = 64) -> np.ndarray:
    """The lung mask (size, size) bool of image `index` of data set `seed` (for checks and tests)."""
    return _anatomy(np.random.default_rng([seed, index]), size)[1]
