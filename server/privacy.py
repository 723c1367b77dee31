"""The server's side of differential privacy (run setting dp; the arithmetic is common/privacy.py, the hospitals' clipping
and local noise client/training.py): each update checked against what clipping (and local noise) allows, the central
noise on the unweighted mean, batch-normalisation variances kept positive after noise (post-processing, no privacy
cost), and the budget spent so far, per round, into history.csv.

The accountant counts every round in which hospitals were asked to train as one release of each hospital's update with
noise multiplier dp-noise-multiplier, without amplification by sampling (hospitals are not Poisson-sampled here), so
the epsilon reported is an upper bound for both options; under dp = local it is each hospital's own.
"""

from __future__ import annotations

import math

import numpy as np

from common.config import RunConfig
from common.privacy import add_gaussian_noise, central_stddev, epsilon, local_stddev, update_norm
from common.wire import ReplyError

SLACK = 1e-3  # float32 rounding of a clipped update's norm


def check_clipped(weights: list[np.ndarray], current: list[np.ndarray], cfg: RunConfig) -> None:
    """ReplyError where an update is larger than the hospital's clipping allows (dp = central), or than clipping plus
    four times the local noise's expected norm (dp = local: the noise's norm concentrates tightly at sigma x sqrt(d))."""
    norm, size = update_norm(weights, current), sum(w.size for w in current)
    limit = cfg.dp_clip_norm * (1 + SLACK)
    if cfg.dp == "local":
        limit += 4 * local_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm) * math.sqrt(size)
    if norm > limit:
        raise ReplyError(f"its update's norm {norm:.4g} is above {limit:.4g}, what dp = {cfg.dp} with dp-clip-norm = {cfg.dp_clip_norm:g} allows: the hospital did not clip")


def floor_variances(weights: list[np.ndarray], variances: list[bool]) -> list[np.ndarray]:
    """Batch-normalisation variances raised to a small positive floor where noise took them below it."""
    return [np.maximum(w, 1e-3) if is_variance else w for w, is_variance in zip(weights, variances)]


def central_noise(updates: list[list[np.ndarray]], cfg: RunConfig, variances: list[bool]) -> list[np.ndarray]:
    """The unweighted mean of the clipped updates plus Gaussian noise of sd dp-noise-multiplier x dp-clip-norm / n
    (Flower's client-side fixed clipping), from the operating system's entropy, in float64."""
    mean = [np.mean(np.stack([u[i].astype(np.float64) for u in updates]), axis=0) for i in range(len(updates[0]))]
    noised = add_gaussian_noise(mean, central_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm, len(updates)), np.random.default_rng())
    return floor_variances(noised, variances)


def spent(cfg: RunConfig, releases: int, n_updates: int) -> dict[str, float]:
    """The round's privacy figures: epsilon spent so far at dp-delta, and the noise's sd on the aggregate."""
    sd = central_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm, max(n_updates, 1))
    if cfg.dp == "local":
        sd = local_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm) / math.sqrt(max(n_updates, 1))
    return {"dp_epsilon": epsilon(cfg.dp_noise_multiplier, [1.0] * releases, cfg.dp_delta), "dp_delta": cfg.dp_delta, "dp_noise_sd": sd}
