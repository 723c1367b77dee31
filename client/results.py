"""What a hospital's local work returns to its Flower handlers: plain data, light to import (no TensorFlow), so a
long-lived worker can hand it to a per-message ClientApp process. Only what may leave the hospital, and the
hospital's own report of the global model, which stays there."""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np

from common.bin_floor import Intervals


@dataclass(frozen=True)
class Trained:
    """A local training's outcome: what the train reply carries, and where the site keeps its reports."""

    site: str
    weights: list[np.ndarray]
    num_examples: int
    loss: float
    skipped: int  # unreadable files left out (skip-unreadable)
    not_images: int  # files holding no image, left out


@dataclass(frozen=True)
class Scored:
    """The global model on the site's validation images: the score intervals the histogram floor lets out, and the
    site's own exact figures for its own report (they stay at the hospital)."""

    site: str
    num_examples: int
    intervals: list[Intervals]  # one per label
    own_figures: dict[str, float]  # AUC, sensitivity, specificity on the site's own patients, exact
    left_out: int  # files left out (unreadable and skipped, or holding no image), for the site's own report


@dataclass(frozen=True)
class Matched:
    """How many of the site's images equal one of the server's held-out images, and which held-out images if asked."""

    site: str
    count: int
    rows: list[int] | None
