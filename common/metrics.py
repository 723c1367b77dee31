"""Confusion counts, score histograms, and every figure computed from them.

Scores are binned, per label, into histograms of logits for positives and for negatives over bins fixed for the run
(uniform in logit, one edge exactly at the run's threshold). Histograms give the ROC curve and AUC (exact up to the
bin width, ties inside a bin counted as half) and sensitivity and specificity at any bin edge. The hospitals send
coarser versions of theirs (common/bin_floor.py); the pooled, per-site and held-out figures all go through this code.
"""

from __future__ import annotations

import math

import numpy as np

LOGIT_RANGE = 16.0  # inner bin edges span [-16, 16] in logits: resolution stays where probabilities crowd near 0 and 1
TP, FP, TN, FN = range(4)  # column order of a (n_labels, 4) confusion-count array


def threshold_edge(n_bins: int, threshold: float = 0.5) -> int:
    """Which inner edge of the run's bins lies at the run's threshold (calling positive there means bins above it)."""
    step = 2 * LOGIT_RANGE / (n_bins - 2)
    return int(np.clip(round((float(to_logit(threshold)) + LOGIT_RANGE) / step), 0, n_bins - 2))


def bin_edges(n_bins: int, threshold: float = 0.5) -> np.ndarray:
    """The n_bins - 1 inner edges (logits) of the run's histogram bins, evenly spaced over about [-16, 16] with one
    exactly at the run's threshold (at 0.5: linspace(-16, 16)); the outermost bins are open-ended."""
    step = 2 * LOGIT_RANGE / (n_bins - 2)
    return float(to_logit(threshold)) + step * (np.arange(n_bins - 1) - threshold_edge(n_bins, threshold))


def score_histograms(logits: np.ndarray, labels: np.ndarray, n_bins: int, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """Per-label histograms (n_labels, n_bins) int64 of logits (n, n_labels) for positives and for negatives."""
    bins = np.searchsorted(bin_edges(n_bins, threshold), logits, side="right")  # (n, n_labels), bin b holds edges[b-1] <= z < edges[b]
    n_labels = logits.shape[1]
    pos = np.zeros((n_labels, n_bins), np.int64)
    neg = np.zeros((n_labels, n_bins), np.int64)
    for j in range(n_labels):
        is_pos = labels[:, j] == 1
        pos[j] = np.bincount(bins[is_pos, j], minlength=n_bins)
        neg[j] = np.bincount(bins[~is_pos, j], minlength=n_bins)
    return pos, neg


def to_logit(probability: float | np.ndarray) -> np.ndarray:
    """The logit of a probability (per element); -inf at 0, +inf at 1."""
    p = np.asarray(probability, np.float64)
    with np.errstate(divide="ignore"):
        return np.log(p) - np.log1p(-p)


def to_probability(logits: np.ndarray) -> np.ndarray:
    """The sigmoid of logits (per element), in float64."""
    return 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))


def confusion_counts(logits: np.ndarray, labels: np.ndarray, threshold: float | np.ndarray) -> np.ndarray:
    """Counts (n_labels, 4) int64 in TP, FP, TN, FN order, calling positive where probability >= threshold (per label)."""
    predicted = logits >= to_logit(threshold)  # (n, n_labels)
    actual = labels == 1
    return np.stack(
        [(predicted & actual).sum(0), (predicted & ~actual).sum(0), (~predicted & ~actual).sum(0), (~predicted & actual).sum(0)],
        axis=1,
    ).astype(np.int64)


def statistics(logits: np.ndarray, labels: np.ndarray, threshold: float, n_bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a site reports about its scores: confusion counts (n_labels, 4) and positive and negative histograms."""
    return (confusion_counts(logits, labels, threshold), *score_histograms(logits, labels, n_bins, threshold))


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


def roc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC points (false-positive rate, true-positive rate) at every bin edge, from (1, 1) down to (0, 0)."""
    tpr = np.concatenate([[pos.sum()], pos[::-1].cumsum()[::-1][1:], [0]]) / max(pos.sum(), 1)
    fpr = np.concatenate([[neg.sum()], neg[::-1].cumsum()[::-1][1:], [0]]) / max(neg.sum(), 1)
    return fpr, tpr


def edge_for_sensitivity(pos: np.ndarray, target: float) -> int | None:
    """The highest bin edge whose sensitivity reaches the target (-1: only calling everyone positive does); None without positives."""
    if pos.sum() == 0:
        return None
    sens = pos[::-1].cumsum()[::-1][1:] / pos.sum()  # sensitivity at each inner edge, falling
    reaching = np.flatnonzero(sens >= target - 1e-12)
    return int(reaching[-1]) if len(reaching) else -1


def rates_at_edge(pos: np.ndarray, neg: np.ndarray, edge: int) -> tuple[float, float]:
    """(sensitivity, specificity) when calling positive at logits >= bin_edges[edge]; exact from the histograms."""
    return _ratio(pos[edge + 1 :].sum(), pos.sum()), _ratio(neg[: edge + 1].sum(), neg.sum())


def counts_at_edge(pos: np.ndarray, neg: np.ndarray, edge: int) -> np.ndarray:
    """Confusion counts (n_labels, 4) in TP, FP, TN, FN order from histograms (n_labels, n_bins), calling positive above an edge."""
    return np.stack([pos[:, edge + 1 :].sum(1), neg[:, edge + 1 :].sum(1), neg[:, : edge + 1].sum(1), pos[:, : edge + 1].sum(1)], axis=1)


def log_loss_from_histograms(pos: np.ndarray, neg: np.ndarray, threshold: float = 0.5) -> float:
    """Mean binary cross-entropy over labels, each image scored at its bin's middle logit (the open-ended outer bins at
    half a bin beyond the last edge); defined wherever there is an image, unlike the AUC."""
    edges = bin_edges(pos.shape[1], threshold)
    step = edges[1] - edges[0]
    middles = np.concatenate([[edges[0] - step / 2], (edges[:-1] + edges[1:]) / 2, [edges[-1] + step / 2]])  # (n_bins,)
    losses = []
    for p, n in zip(pos, neg):
        total = p.sum() + n.sum()
        if total:
            losses.append(float((p * np.logaddexp(0.0, -middles) + n * np.logaddexp(0.0, middles)).sum() / total))
    return float(np.mean(losses)) if losses else float("nan")


def sensitivity(counts: np.ndarray) -> float:
    """TP / (TP + FN) of one label's counts (4,); NaN without positives."""
    return _ratio(counts[TP], counts[TP] + counts[FN])


def specificity(counts: np.ndarray) -> float:
    """TN / (TN + FP) of one label's counts (4,); NaN without negatives."""
    return _ratio(counts[TN], counts[TN] + counts[FP])


def clinical_figures(counts: np.ndarray) -> dict[str, float]:
    """Sensitivity, specificity, PPV, NPV, F1 and accuracy of one label's counts (4,); NaN where undefined."""
    tp, fp, tn, fn = (float(v) for v in counts)
    return {
        "sensitivity": sensitivity(counts), "specificity": specificity(counts), "ppv": _ratio(tp, tp + fp),
        "npv": _ratio(tn, tn + fn), "f1": _ratio(2 * tp, 2 * tp + fp + fn), "accuracy": _ratio(tp + tn, tp + fp + tn + fn),
    }  # fmt: skip


def delong_ci(scores: np.ndarray, labels: np.ndarray, level: float = 0.95) -> tuple[float, float, float]:
    """AUC with DeLong's confidence interval (scores and 0/1 labels of one label, shape (n,)); NaNs without both classes."""
    from scipy.stats import norm, rankdata

    pos, neg = scores[labels == 1], scores[labels == 0]
    m, n = len(pos), len(neg)
    if m < 2 or n < 2:
        return float("nan"), float("nan"), float("nan")
    # Structural components via mid-ranks (Sun and Xu, 2014): O(n log n), ties counted as half.
    all_ranks = rankdata(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - rankdata(pos)) / n  # (m,) share of negatives below each positive
    v01 = 1.0 - (all_ranks[m:] - rankdata(neg)) / m  # (n,) share of positives above each negative
    auc = float(v10.mean())
    se = math.sqrt(np.var(v10, ddof=1) / m + np.var(v01, ddof=1) / n)
    z = norm.ppf(0.5 + level / 2)
    return auc, max(0.0, auc - z * se), min(1.0, auc + z * se)


def brier_score(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean squared difference between predicted probability and outcome (0 is perfect; 0.25 is a coin)."""
    return float(np.mean((probabilities - labels) ** 2)) if len(labels) else float("nan")


def reliability(probabilities: np.ndarray, labels: np.ndarray, n_bins: int = 10) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per probability decile: mean predicted probability, observed share of positives, and image count (scores that
    are not finite left out: the caller says how many)."""
    finite = np.isfinite(probabilities)
    probabilities, labels = probabilities[finite], labels[finite]
    which = np.minimum((probabilities * n_bins).astype(int), n_bins - 1)
    counts = np.bincount(which, minlength=n_bins)
    with np.errstate(invalid="ignore"):
        predicted = np.bincount(which, probabilities, n_bins) / counts
        observed = np.bincount(which, labels.astype(float), n_bins) / counts
    return predicted, observed, counts


def per_label(name: str, values: list[float], labels: tuple[str, ...]) -> dict[str, float]:
    """A figure's macro average (over labels where defined) under its name and, with several labels, each under '<name>__<label>'."""
    out = {name: _nanmean(values)}
    if len(labels) > 1:
        out |= {f"{name}__{label}": float(v) for label, v in zip(labels, values)}
    return out


def figures(counts: np.ndarray, pos: np.ndarray | None, neg: np.ndarray | None, labels: tuple[str, ...]) -> dict[str, float]:
    """AUC, sensitivity and specificity, macro-averaged over labels and per label when several (see per_label).

    Without histograms (a site below min-histogram-images) the AUC is NaN: undefined, not 0 or 0.5.
    """
    aucs = [auc_from_histograms(pos[j], neg[j]) if pos is not None else float("nan") for j in range(len(labels))]
    return (
        per_label("auc", aucs, labels)
        | per_label("sensitivity", [sensitivity(c) for c in counts], labels)
        | per_label("specificity", [specificity(c) for c in counts], labels)
    )


def operating_point(
    pos: np.ndarray, neg: np.ndarray, target: float, labels: tuple[str, ...], threshold: float = 0.5
) -> tuple[np.ndarray, dict[str, float]]:
    """Per label, the threshold reaching the target sensitivity on pooled histograms, and the specificity there.

    Returns the thresholds (n_labels,) as probabilities (NaN where a label has no positives) and the figures
    'threshold_at_target_sensitivity' and 'specificity_at_target_sensitivity', per label as '__<label>' when several
    (the unsuffixed specificity is then the macro average).
    """
    edges = bin_edges(pos.shape[1], threshold)
    thresholds, specs = [], []
    for j in range(len(labels)):
        edge = edge_for_sensitivity(pos[j], target)
        if edge is None:
            thresholds.append(float("nan"))
            specs.append(float("nan"))
            continue
        thresholds.append(0.0 if edge < 0 else float(to_probability(edges[edge])))
        specs.append(rates_at_edge(pos[j], neg[j], edge)[1])
    # A threshold is per label: with several labels its unsuffixed column stays empty rather than averaging thresholds.
    out = per_label("threshold_at_target_sensitivity", thresholds, labels) | per_label("specificity_at_target_sensitivity", specs, labels)
    if len(labels) > 1:
        out["threshold_at_target_sensitivity"] = float("nan")
    return np.array(thresholds), out


def _nanmean(values: list[float]) -> float:
    """Mean of the values that are not NaN; NaN if none is."""
    defined = [v for v in values if not math.isnan(v)]
    return float(np.mean(defined)) if defined else float("nan")
