"""The server's own check of the global model each round, on its held-out set, through the pooled-metrics code."""

from __future__ import annotations

import keras

from common.config import RunConfig
from common.data import ImageSet
from common.metrics import statistics, summary


def evaluate_heldout(model: keras.Model, heldout: ImageSet, cfg: RunConfig) -> dict[str, float]:
    """AUC, sensitivity and specificity of the model on the held-out set, computed as a site's would be."""
    logits = model.predict(heldout.images, batch_size=256, verbose=0)  # (n, n_labels)
    return summary(*statistics(logits, heldout.labels, cfg.threshold, cfg.histogram_bins))
