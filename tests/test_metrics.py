"""Pooled figures from summed histograms agree with scikit-learn on the pooled raw scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import (
    auc_from_histograms, bin_edges, confusion_counts, rates_at_edge, score_histograms, sensitivity, specificity, statistics, summary,
)  # fmt: skip


def _site(rng, n, prevalence, shift, crowd):
    """Logits of one site: positives shifted up; `crowd` pushes scores towards probabilities near 0 and 1."""
    labels = (rng.random(n) < prevalence).astype(np.uint8)[:, None]
    logits = rng.normal(0, 1.5, (n, 1)) + shift * labels
    logits = logits * crowd
    return logits.astype(np.float32), labels


@pytest.mark.parametrize("crowd", [1.0, 4.0])
def test_pooled_auc_from_three_very_different_sites_matches_sklearn(crowd):
    rng = np.random.default_rng(0)
    sites = [_site(rng, 40, 0.1, 1.0, crowd), _site(rng, 5000, 0.5, 2.0, crowd), _site(rng, 700, 0.85, 0.5, crowd)]
    n_bins = 400
    pos = sum(score_histograms(z, y, n_bins)[0] for z, y in sites)
    neg = sum(score_histograms(z, y, n_bins)[1] for z, y in sites)
    logits = np.concatenate([z for z, _ in sites])
    labels = np.concatenate([y for _, y in sites])
    if crowd > 1:  # most probabilities really do sit near 0 and 1
        prob = 1 / (1 + np.exp(-logits))
        assert ((prob < 0.02) | (prob > 0.98)).mean() > 0.5
    assert auc_from_histograms(pos[0], neg[0]) == pytest.approx(roc_auc_score(labels[:, 0], logits[:, 0]), abs=0.002)


def test_sensitivity_and_specificity_at_a_bin_edge_are_exact():
    rng = np.random.default_rng(1)
    logits, labels = _site(rng, 3000, 0.4, 1.5, 1.0)
    edges = bin_edges(400)
    pos, neg = score_histograms(logits, labels, 400)
    for edge in (0, 150, 199, 250, 397):
        predicted = logits[:, 0] >= edges[edge]
        actual = labels[:, 0] == 1
        sens, spec = rates_at_edge(pos[0], neg[0], edge)
        assert sens == (predicted & actual).sum() / actual.sum()
        assert spec == (~predicted & ~actual).sum() / (~actual).sum()


def test_the_run_threshold_of_one_half_lies_on_a_bin_edge_and_agrees_with_the_counts():
    rng = np.random.default_rng(2)
    logits, labels = _site(rng, 1000, 0.3, 2.0, 1.0)
    counts, pos, neg = statistics(logits, labels, 0.5, 400)
    edge = int(np.flatnonzero(bin_edges(400) == 0.0)[0])
    assert rates_at_edge(pos[0], neg[0], edge) == (sensitivity(counts[0]), specificity(counts[0]))


def test_confusion_counts_per_label():
    logits = np.array([[2.0, -1.0], [-2.0, 1.0], [0.5, 0.5], [-0.1, -3.0]], np.float32)
    labels = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], np.uint8)
    counts = confusion_counts(logits, labels, 0.5)  # TP, FP, TN, FN
    assert counts.tolist() == [[1, 1, 1, 1], [2, 0, 2, 0]]


def test_undefined_figures_are_nan_not_zero_or_a_half():
    logits = np.array([[1.0], [-1.0]], np.float32)
    only_negatives = np.zeros((2, 1), np.uint8)
    counts, pos, neg = statistics(logits, only_negatives, 0.5, 100)
    figures = summary(counts, pos, neg)
    assert np.isnan(figures["auc"]) and np.isnan(figures["sensitivity"]) and figures["specificity"] == 0.5


def test_scores_beyond_the_binned_range_land_in_the_open_end_bins():
    logits = np.array([[-1e6], [1e6], [40.0]], np.float32)
    pos, neg = score_histograms(logits, np.array([[0], [1], [1]], np.uint8), 50)
    assert neg[0, 0] == 1 and pos[0, -1] == 2 and pos.sum() + neg.sum() == 3
