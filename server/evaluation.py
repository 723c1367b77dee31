"""The server's own check of the global model each round, on its held-out set, through the pooled-metrics code."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from common.config import RunConfig
from common.data import ImageSet
from common.metrics import brier_score, clinical_figures, confusion_counts, delong_ci, figures, per_label, statistics


@dataclass(frozen=True)
class HeldoutResult:
    """The held-out figures of one round, and what the plots need."""

    row: dict[str, float]  # history.csv columns, all prefixed 'heldout_'
    logits: np.ndarray  # (n, n_labels)
    counts_at_threshold: np.ndarray | None  # (n_labels, 4) at the operating point; None before there is one


def evaluate_heldout(model: keras.Model, heldout: ImageSet, cfg: RunConfig, thresholds: np.ndarray | None) -> HeldoutResult:
    """AUC (with DeLong's 95 % CI), sensitivity and specificity at the run's threshold, Brier score, and the
    clinical figures at the operating point chosen on the sites' pooled validation data (never on this set)."""
    logits = model.predict(heldout.images, batch_size=256, verbose=0)  # (n, n_labels)
    labels, names = heldout.labels, cfg.labels
    row = figures(*statistics(logits, labels, cfg.threshold, cfg.histogram_bins), names)
    cis = [delong_ci(logits[:, j], labels[:, j]) for j in range(len(names))]
    row |= per_label("auc_ci_low", [c[1] for c in cis], names) | per_label("auc_ci_high", [c[2] for c in cis], names)
    probabilities = 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))
    row |= per_label("brier", [brier_score(probabilities[:, j], labels[:, j]) for j in range(len(names))], names)
    counts = None
    if thresholds is not None and not np.isnan(thresholds).all():
        counts = confusion_counts(logits, labels, np.nan_to_num(thresholds, nan=0.5))
        at = [clinical_figures(c) for c in counts]
        for name in at[0]:
            row |= per_label(f"{name}_at_threshold", [a[name] for a in at], names)
    return HeldoutResult({f"heldout_{k}": v for k, v in row.items()}, logits, counts)
