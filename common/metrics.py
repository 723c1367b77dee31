"""Confusion counts, score histograms, and every figure computed from them.

A site sends, per label, histograms of its logits for positives and for negatives over bins fixed for the run, and
its confusion counts at the run's threshold. Summed over sites they give the pooled ROC curve and AUC (exact up to
the bin width, ties inside a bin counted as half) and sensitivity and specificity at any bin edge. The server's
held-out figures go through this same code.
"""

from __future__ import annotations

import math

import numpy as np

LOGIT_RANGE = 16.0  # inner bin edges span [-16, 16] in logits: resolution stays where probabilities crowd near 0 and 1
TP, FP, TN, FN = range(4)  # column order of a (n_labels, 4) confusion-count array


def bin_edges(n_bins: int) -> np.ndarray:
    """The n_bins - 1 inner edges (logits) of the run's histogram bins; the outermost bins are open-ended."""
    return np.linspace(-LOGIT_RANGE, LOGIT_RANGE, n_bins - 1)


def logit(probability: float) -> float:
    """The logit of a probability."""
    return math.log(probability / (1.0 - probability))


def score_histograms(logits: np.ndarray, labels: np.ndarray, n_bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-label histograms (n_labels, n_bins) int64 of logits (n, n_labels) for positives and for negatives."""
    bins = np.searchsorted(bin_edges(n_bins), logits, side="right")  # (n, n_labels), bin b holds edges[b-1] <= z < edges[b]
    n_labels = logits.shape[1]
    pos = np.zeros((n_labels, n_bins), np.int64)
    neg = np.zeros((n_labels, n_bins), np.int64)
    for j in range(n_labels):
        is_pos = labels[:, j] == 1
        pos[j] = np.bincount(bins[is_pos, j], minlength=n_bins)
        neg[j] = np.bincount(bins[~is_pos, j], minlength=n_bins)
    return pos, neg


def confusion_counts(logits: np.ndarray, labels: np.ndarray, threshold: float) -> np.ndarray:
    """Counts (n_labels, 4) int64 in TP, FP, TN, FN order, calling positive where probability >= threshold."""
    predicted = logits >= logit(threshold)  # (n, n_labels)
    actual = labels == 1
    return np.stack(
        [(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & ~actual).sum(0), (~predicted & actual).sum(0)],
        axis=1,
    ).astype(np.int64)


def statistics(logits: np.ndarray, labels: np.ndarray, threshold: float, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a site reports about its scores: confusion counts (n_labels, 4) and positive and negative histograms."""
    return (confusion_counts(logits, labels, threshold), *score_histograms(logits, labels, n_bins))


def _ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator, NaN when the denominator is zero (an undefined figure, not a zero)."""
    return float(numerator) / float(denominator) if denominator else float("nan")


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """ROC AUC of one label from its positive and negative histograms (n_bins,); NaN without both classes."""
    n_pos, n_neg = pos.sum(), neg.sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    neg_below = np.cumsum(neg) - neg  # negatives in lower bins
    return float((pos * (neg_below + 0.5 * neg)).sum() / (n_pos * n_neg))


def rates_at_edge(pos: np.ndarray, neg: np.ndarray, edge: int) -> tuple[float, float]:
    """(sensitivity, specificity) when calling positive at logits >= bin_edges[edge]; exact from the histograms."""
    return _ratio(pos[edge + 1 :].sum(), pos.sum()), _ratio(neg[: edge + 1].sum(), neg.sum())


def sensitivity(counts: np.ndarray) -> float:
    """TP / (TP + FN) of one label's counts (4,); NaN without positives."""
    return _ratio(counts[TP], counts[TP] + counts[FN])


def specificity(counts: np.ndarray) -> float:
    """TN / (TN + FP) of one label's counts (4,); NaN without negatives."""
    return _ratio(counts[TN], counts[TN] + counts[FP])


def summary(counts: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> dict[str, float]:
    """AUC, sensitivity and specificity, macro-averaged over labels (the mean of the defined ones)."""
    per_label = {
        "auc": [auc_from_histograms(pos[j], neg[j]) for j in range(len(counts))],
        "sensitivity": [sensitivity(c) for c in counts],
        "specificity": [specificity(c) for c in counts],
    }
    return {name: _nanmean(values) for name, values in per_label.items()}


def _nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN if none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")
