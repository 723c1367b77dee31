"""Bounded influence: what one hospital's reply may do to the federation, checked before it counts.

A train reply is refused, and the hospital named, when its weights are not in the global model's dtypes (float64
values of 1e300 are finite, and become inf once cast; values that are not finite, or not floats, the reply's own
check in common/wire.py refuses first), or move the model further than `max-update-norm` times the global model's own
size; and when it claims more training images than the hospital declared in the roster or than `max-examples`. An
evaluate reply is refused when it claims more validation images than either. The aggregate itself is checked too: a global model that is not finite is kept out (server/strategy.py), and so is one
whose held-out scores are not finite or have collapsed to one value (server/federation.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from common.wire import ReplyError


@dataclass(frozen=True)
class Bounds:
    """The limits one hospital's reply must keep."""

    max_update_norm: float  # ||w - g|| / ||g||, whole model, float64; 0: off
    max_examples: int  # images a hospital may claim to have trained or validated on; 0: off
    declared: dict[str, int]  # site -> the images it declared at registration (the roster), where it did


def relative_update_norm(weights: list[np.ndarray], current: list[np.ndarray]) -> float:
    """||w - g|| / ||g|| over every weight array together, in float64 (||w - g|| where the global model is all zero)."""
    delta = np.sqrt(sum(float(np.sum((w.astype(np.float64) - g.astype(np.float64)) ** 2)) for w, g in zip(weights, current)))
    size = np.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in current))
    return delta / size if size > 0 else delta


def check_weights(weights: list[np.ndarray], current: list[np.ndarray], bounds: Bounds) -> float:
    """Refuse (ReplyError, saying which array and why) weights of another dtype than the global model's, or an update
    larger than max-update-norm; returns the update's relative norm."""
    for i, (w, g) in enumerate(zip(weights, current)):
        if w.dtype != g.dtype:
            raise ReplyError(f"weight array {i} is {w.dtype}, the global model's is {g.dtype}")
    norm = relative_update_norm(weights, current)
    if bounds.max_update_norm and norm > bounds.max_update_norm:
        raise ReplyError(f"its update is {norm:.3g} times the global model's size, above max-update-norm = {bounds.max_update_norm:g}")
    return norm


def check_count(site: str, claimed: int, what: str, bounds: Bounds) -> None:
    """Refuse a claimed number of images above what the site declared in the roster, or above max-examples."""
    declared = bounds.declared.get(site)
    if declared is not None and claimed > declared:
        raise ReplyError(f"claims {claimed} {what} images, more than the {declared} it declared in the roster")
    if bounds.max_examples and claimed > bounds.max_examples:
        raise ReplyError(f"claims {claimed} {what} images, above max-examples = {bounds.max_examples}")


def finite_model(weights: list[np.ndarray], dtypes: list[np.dtype]) -> str:
    """Why these aggregated weights cannot be the next global model ('' where they can): a value not finite, in float64
    or once cast to the model's dtypes."""
    with np.errstate(over="ignore", invalid="ignore"):
        for i, (w, dtype) in enumerate(zip(weights, dtypes)):
            if not np.isfinite(w).all() or not np.isfinite(w.astype(dtype)).all():
                return f"the aggregate's weight array {i} is not finite in {dtype}"
    return ""


def score_spread(logits: np.ndarray) -> float:
    """The smallest standard deviation, over labels, of a model's finite held-out probabilities (logits (n, n_labels)):
    0 where it gives every image the same probability, saturated ones included."""
    if not np.isfinite(logits).any():
        return 0.0
    with np.errstate(over="ignore"):
        probabilities = np.where(np.isfinite(logits), 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64))), np.nan)
    return float(np.nanmin(np.nanstd(probabilities, axis=0)))


def unusable_scores(logits: np.ndarray, previous_spread: float) -> str:
    """Why a new global model must not replace the current one ('' where it may): scores that are not finite, or a
    collapse (every held-out image given the same probability for a label, where the current model told them apart)."""
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).any(axis=1).sum())
        return f"its scores of {bad} of {len(logits)} held-out images are not finite"
    spread = score_spread(logits)
    if previous_spread > 1e-4 and spread < 1e-7:
        return f"it has collapsed: it gives every held-out image the same probability (spread {spread:.2g}, the current model's {previous_spread:.3g})"
    return ""
