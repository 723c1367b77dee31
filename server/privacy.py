"""The server's side of differential privacy (run setting dp; the arithmetic is common/privacy.py, the hospitals' clipping
and local noise client/training.py): each update checked against what clipping (and local noise) allows, the central
noise on the unweighted mean, batch-normalisation variances kept positive after noise (post-processing, no privacy
cost), and the budget spent so far, per round, into history.csv.

The accountant counts every round in which hospitals were asked to train as one release of each hospital's update with
noise multiplier dp-noise-multiplier, without amplification by sampling (hospitals are not Poisson-sampled here), so
the epsilon reported is an upper bound for both options; under dp = local it is each hospital's own.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from common.atomic import write_text
from common.config import RunConfig
from common.privacy import add_gaussian_noise, central_stddev, epsilon, local_stddev, update_norm
from common.wire import ReplyError

SLACK = 1e-3  # float32 rounding of a clipped update's norm
LEDGER = "privacy.json"  # the releases so far, written before each round's updates are asked for (a crash never loses one)


def record_release(folder: Path, releases: int) -> None:
    """Write the number of rounds whose updates have been (or are being) released, before they are asked for."""
    write_text(Path(folder) / LEDGER, json.dumps({"releases": releases}) + "\n")


def releases(folder: Path) -> int:
    """The releases the run folder's ledger records (0 where there is none)."""
    try:
        return int(json.loads((Path(folder) / LEDGER).read_text())["releases"])
    except (OSError, ValueError, KeyError, TypeError):
        return 0


def check_clipped(weights: list[np.ndarray], current: list[np.ndarray], cfg: RunConfig) -> None:
    """ReplyError where an update is larger than the hospital's clipping allows (dp = central), or than clipping plus
    the local noise's norm can reach (dp = local: it concentrates at sigma x sqrt(d), with a spread of sigma / sqrt(2))."""
    norm, size = update_norm(weights, current), sum(w.size for w in current)
    limit = cfg.dp_clip_norm * (1 + SLACK)
    if cfg.dp == "local":  # the noise's norm is sigma x sqrt(d) give or take sigma / sqrt(2): four of those above it
        limit += local_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm) * (math.sqrt(size) + 4)
    if norm > limit:
        raise ReplyError(f"its update's norm {norm:.4g} is above {limit:.4g}, what dp = {cfg.dp} with dp-clip-norm = {cfg.dp_clip_norm:g} allows: the hospital did not clip")


def floor_variances(weights: list[np.ndarray], variances: list[bool]) -> list[np.ndarray]:
    """Batch-normalisation variances raised to a small positive floor where noise took them below it."""
    return [np.maximum(w, 1e-3) if is_variance else w for w, is_variance in zip(weights, variances)]


def private_mean(updates: list[list[np.ndarray]], cfg: RunConfig, variances: list[bool]) -> list[np.ndarray]:
    """The unweighted mean of the hospitals' updates (each hospital counts once, whatever images it claims: the bound
    DP needs), with dp = central Gaussian noise of sd dp-noise-multiplier x dp-clip-norm / n added (Flower's client-side
    fixed clipping), from the operating system's entropy; batch-normalisation variances kept positive; in float64."""
    mean = [np.mean(np.stack([u[i].astype(np.float64) for u in updates]), axis=0) for i in range(len(updates[0]))]
    if cfg.dp == "central":
        mean = add_gaussian_noise(mean, central_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm, len(updates)), np.random.default_rng())
    return floor_variances(mean, variances)


def spent(cfg: RunConfig, releases: int, n_updates: int) -> dict[str, float]:
    """The round's privacy figures: epsilon spent so far at dp-delta, between federations with and without one
    hospital (as Flower accounts) and between federations where one hospital's data is swapped for another's (twice
    the sensitivity: the epsilon to quote where who took part is known, as history.csv says), and the noise's sd on
    the mean."""
    n = max(n_updates, 1)
    z = cfg.dp_noise_multiplier
    sd = central_stddev(z, cfg.dp_clip_norm, n) if cfg.dp == "central" else local_stddev(z, cfg.dp_clip_norm) / math.sqrt(n)
    return {
        "dp_epsilon": epsilon(z, [1.0] * releases, cfg.dp_delta), "dp_epsilon_replace_one": epsilon(z / 2, [1.0] * releases, cfg.dp_delta),
        "dp_delta": cfg.dp_delta, "dp_noise_sd": sd,
    }  # fmt: skip
