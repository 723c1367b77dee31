"""The server's own check of the global model each round, on its held-out set, through the pooled-metrics code."""

from __future__ import annotations

from dataclasses import dataclass

import keras
import numpy as np

from common.config import RunConfig
from common.image_set import ImageSet
from common.gradcam import border_energy, energy_in_boxes, grid_cell, gradcam, pointing_hits, rank_correlation
from common.metrics import (
    brier_score, clinical_figures, confusion_counts, delong_ci, figures, per_label, statistics, to_logit, to_probability,
)  # fmt: skip


@dataclass(frozen=True)
class HeldoutResult:
    """The held-out figures of one round, and what the plots need."""

    row: dict[str, float]  # history.csv columns, all prefixed 'heldout_'
    logits: np.ndarray  # (n, n_labels)
    counts_at_threshold: np.ndarray | None  # (n_labels, 4) at the operating point; None before there is one


def evaluate_heldout(model: keras.Model, heldout: ImageSet, cfg: RunConfig, thresholds: np.ndarray | None) -> HeldoutResult:
    """AUC (with DeLong's 95 % CI), sensitivity and specificity at the run's threshold, Brier score, and the
    clinical figures at the operating point chosen on the sites' pooled validation data (never on this set)."""
    logits = model.predict(heldout.images, batch_size=256, verbose=0)  # (n, n_labels)
    labels, names = heldout.labels, cfg.labels
    row = figures(*statistics(logits, labels, cfg.threshold, cfg.histogram_bins), names)
    row["n"] = len(labels)
    cis = [delong_ci(logits[:, j], labels[:, j]) for j in range(len(names))]
    row |= per_label("auc_ci_low", [c[1] for c in cis], names) | per_label("auc_ci_high", [c[2] for c in cis], names)
    probabilities = to_probability(logits)
    row |= per_label("brier", [brier_score(probabilities[:, j], labels[:, j]) for j in range(len(names))], names)
    counts = None
    if thresholds is not None and not np.isnan(thresholds).all():
        counts = confusion_counts(logits, labels, np.nan_to_num(thresholds, nan=cfg.threshold))
        at = [clinical_figures(c) for c in counts]
        for name in at[0]:
            row |= per_label(f"{name}_at_threshold", [a[name] for a in at], names)
    return HeldoutResult({f"heldout_{k}": v for k, v in row.items()}, logits, counts)


CASES = ("true positive", "false negative", "false positive")
BY_SOURCE = "border_energy_from__"  # + a source hospital's name: the border energy of its held-out images
SHOWN_PER_CASE = 4  # overlays per kind of case in a round's grid


@dataclass(frozen=True)
class GradcamResult:
    """One round's Grad-CAM check on the fixed held-out sample."""

    row: dict[str, float | str]  # history.csv columns, prefixed 'gradcam_'
    heat: np.ndarray  # (n_labels, n, H, W) heatmaps, for drift next round and for the pictures
    cases: list[tuple[int, str]]  # (sample row, one of CASES) for the overlays of label 0, SHOWN_PER_CASE of each at most
    called_at: np.ndarray  # (n_labels,) the probability each label's images were called positive at
    found: dict[str, int]  # how many of each kind of case the sample holds (label 0), shown or not


def gradcam_sample(heldout: ImageSet, cfg: RunConfig) -> np.ndarray:
    """The held-out rows the Grad-CAM checks use every round: a fixed, seeded sample."""
    rng = np.random.default_rng([cfg.seed, 0x6CA3])
    return np.sort(rng.permutation(len(heldout))[: cfg.gradcam_images])


def gradcam_check(
    model: keras.Model, sample: ImageSet, logits: np.ndarray, thresholds: np.ndarray, cfg: RunConfig, previous: np.ndarray | None
) -> GradcamResult:
    """Where the model looks, per label: pointing-game hit rate and energy inside the box on the true positives whose
    box is known; energy in the border, overall and per source hospital where the held-out set knows it, on the images
    the model calls positive (where it says it sees the finding; a negative's map shows no evidence, only noise); drift
    since last round; all-zero maps. gradcam_true_positives counts every true positive of the sample, boxed or not."""
    names = cfg.labels
    heat = np.stack([gradcam(model, sample.images, j) for j in range(len(names))])  # (n_labels, n, H, W)
    tolerance = grid_cell(model)
    called = logits >= to_logit(thresholds)  # (n, n_labels)
    pointing, in_box, border, drift, zero, n_tp, n_boxed = [], [], [], [], [], [], []
    for j in range(len(names)):
        truth = sample.labels[:, j] == 1
        n_tp.append(int((truth & called[:, j]).sum()))
        tp = truth & called[:, j] & ~np.isnan(sample.boxes[:, j, 0])
        n_boxed.append(int(tp.sum()))
        pointing.append(float(pointing_hits(heat[j][tp], sample.boxes[tp, j], tolerance).mean()) if tp.any() else float("nan"))
        in_box.append(float(energy_in_boxes(heat[j][tp], sample.boxes[tp, j]).mean()) if tp.any() else float("nan"))
        border.append(np.where(called[:, j], border_energy(heat[j]), np.nan))  # (n,)
        zero.append(int((heat[j].reshape(len(sample), -1).max(axis=1) == 0).sum()))
        drift.append(1.0 - rank_correlation(heat[j], previous[j]) if previous is not None else float("nan"))
    per_image_border = _mean_defined(np.stack(border), axis=0)  # (n,) over the labels called; NaN where none is, or all-zero maps
    row = (
        per_label("pointing", pointing, names) | per_label("energy_in_box", in_box, names)
        | per_label("border_energy", [float(_mean_defined(b, axis=0)) for b in border], names)
        | per_label("drift", drift, names)
        | {"zero_maps": sum(zero), "true_positives": sum(n_tp), "boxed_true_positives": sum(n_boxed), "tolerance_px": tolerance,
           "called_positive": int(called.any(axis=1).sum())}
    )  # fmt: skip
    for source in sorted(set(sample.source.tolist()) - {""}):
        row[f"{BY_SOURCE}{source}"] = float(_mean_defined(per_image_border[sample.source == source], axis=0))
    truth0, called0 = sample.labels[:, 0] == 1, called[:, 0]
    masks = dict(zip(CASES, (truth0 & called0, truth0 & ~called0, ~truth0 & called0)))
    cases = [(int(i), kind) for kind, mask in masks.items() for i in np.flatnonzero(mask)[:SHOWN_PER_CASE]]
    found = {kind: int(mask.sum()) for kind, mask in masks.items()}
    return GradcamResult({f"gradcam_{k}": v for k, v in row.items()}, heat, cases, np.asarray(thresholds, np.float64), found)


def _mean_defined(values: np.ndarray, axis: int) -> np.ndarray:
    """Mean over the non-NaN values along an axis; NaN where there are none."""
    defined = np.isfinite(values)
    with np.errstate(invalid="ignore"):
        return np.where(defined, values, 0.0).sum(axis=axis) / defined.sum(axis=axis)


def gradcam_warning(row: dict, previous: dict | None, cfg: RunConfig) -> str:
    """The round's shortcut warning, or '': AUC rose while localisation fell by more than 0.1, or the held-out images
    the model calls positive drew more than gradcam-border-threshold of the heatmap energy into the border, overall or
    at one source hospital (named)."""
    reasons = []
    if previous is not None and row.get("global_auc", np.nan) > previous.get("global_auc", np.nan):
        for name in ("pointing", "energy_in_box"):
            now, before = row.get(f"gradcam_{name}", np.nan), previous.get(f"gradcam_{name}", np.nan)
            if now < before - 0.1:
                reasons.append(f"pooled AUC rose while {name.replace('_', ' ')} fell from {before:.2f} to {now:.2f}")
    limit = cfg.gradcam_border_threshold
    overall = row.get("gradcam_border_energy", np.nan)
    if overall > limit:
        reasons.append(f"held-out images called positive: {overall:.2f} of the heatmap energy in the image border (threshold {limit:g})")
    for key, value in row.items():
        if key.startswith(f"gradcam_{BY_SOURCE}") and value > limit:
            reasons.append(f"{key.split('__', 1)[1]}: {value:.2f} of the heatmap energy in the image border (threshold {limit:g})")
    return "; ".join(reasons)
