"""Differential privacy for hospitals' updates: what is protected is one hospital's whole update in a round
(hospital-level DP, neighbouring federations differ by adding or removing one hospital), as in Flower's fixed clipping.

Two options. Central: each hospital clips its update (weights minus the global model) to L2 norm clip_norm in its own
code, and the server adds Gaussian noise to the mean of the clipped updates (Flower's
DifferentialPrivacyClientSideFixedClipping); the server sees un-noised updates. Local: each hospital also noises its own
clipped update before sending it, so nothing un-noised leaves the hospital (more noise on the mean for the same epsilon).
Both bounds hold only for the unweighted mean of the updates: a hospital weighted by its image count can move the mean
by more than clip_norm / n (Flower's accounted DP strategies refuse unequal weights).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant


def update_norm(weights: Sequence[np.ndarray], reference: Sequence[np.ndarray]) -> float:
    """L2 norm of weights minus reference over all arrays together, computed in float64."""
    pairs = zip(weights, reference, strict=True)
    return float(math.sqrt(sum(np.sum(np.square(np.asarray(w, np.float64) - np.asarray(r, np.float64))) for w, r in pairs)))


def clip_update(weights: list[np.ndarray], reference: list[np.ndarray], clip_norm: float) -> tuple[list[np.ndarray], float]:
    """Reference plus the update scaled down to L2 norm at most clip_norm (each array keeps its dtype), and the norm before."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm}")
    norm = update_norm(weights, reference)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    clipped = [
        (np.asarray(r, np.float64) + (np.asarray(w, np.float64) - np.asarray(r, np.float64)) * scale).astype(np.asarray(w).dtype)
        for w, r in zip(weights, reference, strict=True)
    ]
    return clipped, norm


def add_gaussian_noise(weights: list[np.ndarray], stddev: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Weights plus independent N(0, stddev^2) noise on every coordinate (each array keeps its dtype)."""
    if not stddev >= 0:
        raise ValueError(f"stddev must be non-negative, got {stddev}")
    return [(np.asarray(w, np.float64) + rng.normal(0.0, stddev, np.shape(w))).astype(np.asarray(w).dtype) for w in weights]


def central_stddev(noise_multiplier: float, clip_norm: float, n_sites: int) -> float:
    """Stddev of the noise the server adds to the unweighted mean of n_sites clipped updates (Flower's compute_stdv)."""
    return float(noise_multiplier * clip_norm / n_sites)


def local_stddev(noise_multiplier: float, clip_norm: float) -> float:
    """Stddev of the noise each hospital adds to its own clipped update."""
    return float(noise_multiplier * clip_norm)


def epsilon(noise_multiplier: float, sample_rates: Sequence[float], delta: float) -> float:
    """Epsilon at delta after one Gaussian release per entry of sample_rates (Poisson rate of hospitals; 1.0: all), by RDP."""
    if not noise_multiplier >= 0 or not 0 < delta < 1 or any(not 0 <= q <= 1 for q in sample_rates):
        raise ValueError(f"need noise_multiplier >= 0, 0 < delta < 1 and sample rates in [0, 1]; got {noise_multiplier}, {delta}")
    if not sample_rates:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = RdpAccountant()
    gaussian = dp_accounting.GaussianDpEvent(noise_multiplier)
    for q, rounds in sorted(Counter(float(q) for q in sample_rates).items()):
        event = gaussian if q == 1 else dp_accounting.PoissonSampledDpEvent(q, gaussian)
        accountant.compose(dp_accounting.SelfComposedDpEvent(event, rounds))
    return float(accountant.get_epsilon(delta))
