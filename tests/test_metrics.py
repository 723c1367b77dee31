"""Pooled figures from summed histograms agree with scikit-learn on the pooled raw scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.metrics import (
    auc_from_histograms, bin_edges, confusion_counts, rates_at_edge, score_histograms, sensitivity, specificity, statistics, figures,
    clinical_figures, delong_ci, brier_score, reliability, operating_point, roc_from_histograms,
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
    out = figures(counts, pos, neg, ("x",))
    assert np.isnan(out["auc"]) and np.isnan(out["sensitivity"]) and out["specificity"] == 0.5
    assert np.isnan(figures(counts, None, None, ("x",))["auc"])  # a site that sent no histograms


def test_scores_beyond_the_binned_range_land_in_the_open_end_bins():
    logits = np.array([[-1e6], [1e6], [40.0]], np.float32)
    pos, neg = score_histograms(logits, np.array([[0], [1], [1]], np.uint8), 50)
    assert neg[0, 0] == 1 and pos[0, -1] == 2 and pos.sum() + neg.sum() == 3


def test_several_labels_give_macro_and_per_label_figures():
    rng = np.random.default_rng(3)
    labels = (rng.random((500, 2)) < 0.4).astype(np.uint8)
    logits = rng.normal(0, 1, (500, 2)).astype(np.float32) + labels * np.array([2.0, 0.5], np.float32)
    out = figures(*statistics(logits, labels, 0.5, 400), ("nodule", "effusion"))
    assert out["auc__nodule"] == pytest.approx(roc_auc_score(labels[:, 0], logits[:, 0]), abs=0.002)
    assert out["auc__effusion"] == pytest.approx(roc_auc_score(labels[:, 1], logits[:, 1]), abs=0.002)
    assert out["auc"] == pytest.approx((out["auc__nodule"] + out["auc__effusion"]) / 2)
    assert "sensitivity__effusion" in out and "specificity__nodule" in out


def test_the_operating_point_reaches_the_target_sensitivity_on_the_pooled_histograms():
    rng = np.random.default_rng(4)
    logits, labels = _site(rng, 4000, 0.3, 2.0, 1.0)
    counts, pos, neg = statistics(logits, labels, 0.5, 400)
    thresholds, out = operating_point(pos, neg, 0.8, ("x",))
    t = thresholds[0]
    assert out["threshold_at_target_sensitivity"] == t
    called = 1 / (1 + np.exp(-logits[:, 0].astype(np.float64))) >= t
    actual = labels[:, 0] == 1
    sens = (called & actual).sum() / actual.sum()
    assert 0.8 <= sens < 0.8 + 0.02  # reaches the target, and the next bin edge up would not
    assert out["specificity_at_target_sensitivity"] == pytest.approx((~called & ~actual).sum() / (~actual).sum(), abs=1e-9)
    tp, fp, tn, fn = confusion_counts(logits, labels, thresholds)[0]
    assert tp / (tp + fn) == pytest.approx(sens)


def test_the_operating_point_without_positives_is_undefined():
    pos, neg = np.zeros((1, 20), np.int64), np.ones((1, 20), np.int64)
    thresholds, out = operating_point(pos, neg, 0.8, ("x",))
    assert np.isnan(thresholds[0]) and np.isnan(out["specificity_at_target_sensitivity"])


def test_clinical_figures_from_counts():
    out = clinical_figures(np.array([40, 10, 45, 5]))  # TP, FP, TN, FN
    assert out == pytest.approx({"sensitivity": 40 / 45, "specificity": 45 / 55, "ppv": 40 / 50, "npv": 45 / 50, "f1": 80 / 95, "accuracy": 85 / 100})


def test_delong_interval_covers_sklearn_auc_and_matches_a_bootstrap():
    rng = np.random.default_rng(5)
    logits, labels = _site(rng, 600, 0.4, 1.2, 1.0)
    auc, lo, hi = delong_ci(logits[:, 0], labels[:, 0])
    assert auc == pytest.approx(roc_auc_score(labels[:, 0], logits[:, 0]), abs=1e-12)
    boot = []
    for _ in range(400):
        rows = rng.integers(0, 600, 600)
        boot.append(roc_auc_score(labels[rows, 0], logits[rows, 0]))
    b_lo, b_hi = np.percentile(boot, [2.5, 97.5])
    assert lo < auc < hi and abs(lo - b_lo) < 0.015 and abs(hi - b_hi) < 0.015


def test_brier_score_and_reliability():
    labels = np.array([0, 0, 1, 1])
    assert brier_score(np.array([0.0, 0.0, 1.0, 1.0]), labels) == 0.0
    assert brier_score(np.full(4, 0.5), labels) == 0.25
    probabilities = np.array([0.05, 0.05, 0.95, 0.95, 0.55, 0.55])
    predicted, observed, counts = reliability(probabilities, np.array([0, 0, 1, 1, 1, 0]))
    assert counts.sum() == 6 and counts[0] == 2 and counts[9] == 2 and counts[5] == 2
    assert observed[0] == 0 and observed[9] == 1 and observed[5] == 0.5 and predicted[5] == pytest.approx(0.55)


def test_the_roc_curve_from_histograms_runs_from_one_one_to_zero_zero():
    rng = np.random.default_rng(6)
    logits, labels = _site(rng, 800, 0.5, 1.5, 1.0)
    pos, neg = score_histograms(logits, labels, 100)
    fpr, tpr = roc_from_histograms(pos[0], neg[0])
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (1, 1, 0, 0)
    assert np.all(np.diff(fpr) <= 0) and np.all(np.diff(tpr) <= 0)
    assert -np.trapezoid(tpr, fpr) == pytest.approx(auc_from_histograms(pos[0], neg[0]), abs=1e-9)
