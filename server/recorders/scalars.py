"""A round's figures as named numbers for the trackers (TensorBoard, MLflow): history.csv's numeric columns under
grouped names ('global_auc__lesion' -> 'pooled/auc/lesion') and each hospital's own ('hospital/<site>/auc')."""

from __future__ import annotations

import math

import numpy as np

GROUPS = (("global_", "pooled/"), ("heldout_", "heldout/"), ("gradcam_", "gradcam/"), ("dp_", "privacy/"), ("loo_", "influence/"))
ROUND = ("mean_site_auc", "worst_site_auc", "n_sites", "n_failed", "n_rejected", "n_val", "train_loss", "seconds", "selection_value")
SITE = ("n_train", "n_val", "auc", "sensitivity", "specificity", "update_norm")


def tag(column: str) -> str | None:
    """The TensorBoard tag of a history.csv column ('global_auc__lesion' -> 'pooled/auc/lesion'), None for one not charted."""
    for prefix, group in GROUPS:
        if column.startswith(prefix):
            return group + column.removeprefix(prefix).replace("__", "/")
    name = column.split("__")[0]
    if name in ROUND or name.startswith("seconds_") or name in ("threshold_at_target_sensitivity", "specificity_at_target_sensitivity"):
        return "round/" + column.replace("__", "/")
    return None


def number(value) -> float | None:
    """A finite number to chart, or None (text, flags, missing and non-finite values are not charted)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return None
    return float(value) if math.isfinite(value) else None


def scalars(row: dict, sites: list[dict]) -> dict[str, float]:
    """The round's charted figures by tag: history.csv's numeric columns and each hospital's ('hospital/<site>/auc')."""
    out = {t: v for column, value in row.items() if (t := tag(column)) is not None and (v := number(value)) is not None}
    for site in sites:
        out |= {f"hospital/{site['site']}/{name}": v for name in SITE if (v := number(site.get(name))) is not None}
    return out
