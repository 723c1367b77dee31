"""The histogram floor: what a hospital may say about its validation scores, tested as a rule (with the floor in force,
never at 1), and how well the server pools what small hospitals say."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from common.bin_floor import Intervals, auc_bounds, breaks_floor, floor_intervals, pooled
from common.metrics import auc_from_histograms, score_histograms, threshold_edge

N_BINS = 400
ROOT = threshold_edge(N_BINS) + 1  # the first bin above the run's threshold (0.5)


def _site(rng: np.random.Generator, n: int, separation: float) -> tuple[np.ndarray, np.ndarray]:
    """n validation logits (n, 1) and labels (n, 1) with both classes."""
    labels = (rng.random(n) < 0.5).astype(np.uint8)
    labels[:2] = (0, 1)
    return (rng.normal(0, 2, n) + separation * (2 * labels - 1.0))[:, None], labels[:, None]


def _intervals(logits: np.ndarray, labels: np.ndarray, k: int) -> Intervals:
    pos, neg = score_histograms(logits, labels, N_BINS)
    return floor_intervals(pos[0], neg[0], k, ROOT)


@pytest.mark.parametrize("k", [2, 5, 10])
@pytest.mark.parametrize("n", [3, 13, 60, 400])
def test_every_interval_a_hospital_sends_holds_no_image_or_at_least_k(k, n):
    rng = np.random.default_rng(n * 31 + k)
    for _ in range(20):
        logits, labels = _site(rng, n, separation=rng.uniform(0, 4))
        got = _intervals(logits, labels, k)
        held = got.pos + got.neg
        assert got.pos.sum() == labels.sum() and got.neg.sum() == (labels == 0).sum()  # every image, once
        assert len(held) == 1 or ((held == 0) | (held >= k)).all()  # the floor
        assert breaks_floor(got, k) is None and got.starts[0] == 0 and (np.diff(got.starts) > 0).all()
        assert not ((held[1:] == 0) & (held[:-1] == 0)).any()  # empty neighbours merged: nothing to read in them
        if n >= 2 * k:
            assert len(held) > 1  # a site that can be cut is cut somewhere


@pytest.mark.parametrize("scores", [[-3.0, 4.0, 5.0, -6.0], [4.0, 4.1, 4.2, 4.3], [-9.0] * 4])
def test_a_site_smaller_than_twice_the_floor_says_only_how_many_positives_and_negatives_it_has(scores):
    logits, labels = np.array(scores)[:, None], np.array([[0], [1], [1], [0]], np.uint8)
    got = _intervals(logits, labels, 5)
    assert got.starts.tolist() == [0] and (got.pos.tolist(), got.neg.tolist()) == ([2], [2])  # not even where the four lie
    assert not got.informative


def test_a_large_site_keeps_the_fine_bins_where_its_scores_crowd():
    rng = np.random.default_rng(3)
    logits, labels = _site(rng, 2000, separation=1.0)
    got = _intervals(logits, labels, 5)
    p, n = pooled([got], N_BINS)
    assert len(got.starts) > 50 and abs(auc_from_histograms(p, n) - roc_auc_score(labels, logits)) < 0.002
    assert got.splits_at(ROOT)  # sensitivity and specificity at the run's threshold stay exact


def test_a_floor_of_one_sends_the_fine_bins_and_pools_to_their_sum():
    rng = np.random.default_rng(4)
    sites = [_site(rng, n, 1.5) for n in (30, 200, 90)]
    pos, neg = score_histograms(np.concatenate([z for z, _ in sites]), np.concatenate([y for _, y in sites]), N_BINS)
    p, n = pooled([_intervals(z, y, 1) for z, y in sites], N_BINS)
    assert np.allclose(p, pos[0]) and np.allclose(n, neg[0])


def test_three_sites_of_twelve_to_fifteen_images_give_a_pooled_auc_within_its_bounds():
    """The MRI-like case, on draws of logits: what the floor costs in the pooled AUC (the benchmark measures it on
    trained models: benchmarks/small_sites.py)."""
    rng = np.random.default_rng(5)
    errors = []
    for _ in range(100):
        sites = [_site(rng, int(rng.integers(12, 16)), 2.0) for _ in range(3)]
        intervals = [_intervals(z, y, 5) for z, y in sites]
        exact = roc_auc_score(np.concatenate([y for _, y in sites])[:, 0], np.concatenate([z for z, _ in sites])[:, 0])
        low, high = auc_bounds(intervals, N_BINS)
        estimate = auc_from_histograms(*pooled(intervals, N_BINS))
        assert low - 1e-12 <= exact <= high + 1e-12 and low - 1e-12 <= estimate <= high + 1e-12
        errors.append(estimate - exact)
    assert np.median(np.abs(errors)) < 0.12  # ties inside an interval count half: the estimate leans low


def test_the_pooled_estimate_places_a_coarse_sites_images_where_the_others_scores_lie():
    rng = np.random.default_rng(6)
    big = _site(rng, 600, 2.0)
    small = _site(rng, 12, 2.0)
    intervals = [_intervals(*big, 5), _intervals(*small, 5)]
    exact = roc_auc_score(np.concatenate([big[1], small[1]])[:, 0], np.concatenate([big[0], small[0]])[:, 0])
    estimate = auc_from_histograms(*pooled(intervals, N_BINS))
    assert abs(estimate - exact) < 0.01


def test_the_bounds_are_the_extremes_of_every_placement_inside_the_intervals():
    one = Intervals(np.array([0, 200]), np.array([0, 3]), np.array([4, 1]))  # 1 negative shares the upper interval with 3 positives
    low, high = auc_bounds([one], N_BINS)
    assert (low, high) == pytest.approx((12 / 15, 1.0))
    assert auc_from_histograms(*pooled([one], N_BINS)) == pytest.approx((12 + 1.5) / 15)  # the tie counts half


def test_a_reply_that_broke_the_floor_is_found():
    assert breaks_floor(Intervals(np.array([0, 200]), np.array([1, 5]), np.array([2, 0])), 5) == 3
    assert breaks_floor(Intervals(np.array([0]), np.array([1]), np.array([2])), 5) is None  # one interval over every bin
