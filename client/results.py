"""What a hospital's local work returns to its Flower handlers: plain data, light to import (no TensorFlow), so a
long-lived worker can hand it to a per-message ClientApp process."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Trained:
    """A local training's outcome: what the train reply carries, and where the site keeps its reports."""

    site: str
    weights: list[np.ndarray]
    num_examples: int
    loss: float
    skipped: int  # unreadable files left out (skip-unreadable)
    report_dir: Path | None  # the site file's report-dir; None for a simulated hospital (it reports into the run folder)


@dataclass(frozen=True)
class Scored:
    """The global model on the site's validation images, as aggregate counts and score histograms only."""

    site: str
    num_examples: int
    counts: np.ndarray  # (n_labels, 4) confusion counts at the run's threshold
    pos: np.ndarray  # (n_labels, n_bins) score histograms of the positives
    neg: np.ndarray  # (n_labels, n_bins) and of the negatives
    unreadable: pd.DataFrame  # files left out, for the site's own report
    report_dir: Path | None
