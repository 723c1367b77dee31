"""The run folder: resolved configuration, history and per-site tables, plots, last and best models."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import keras
import pandas as pd

from common.config import RunConfig, config_to_dict
from server.plots import plot_history

HISTORY_COLUMNS = [
    "round", "global_auc", "global_sensitivity", "global_specificity", "global_auc_images",
    "mean_site_auc", "worst_site_auc", "worst_site",
    "threshold_at_target_sensitivity", "specificity_at_target_sensitivity",
    "heldout_auc", "heldout_auc_ci_low", "heldout_auc_ci_high", "heldout_sensitivity", "heldout_specificity",
    "heldout_sensitivity_at_threshold", "heldout_specificity_at_threshold", "heldout_ppv_at_threshold",
    "heldout_npv_at_threshold", "heldout_f1_at_threshold", "heldout_accuracy_at_threshold", "heldout_brier",
    "gradcam_pointing", "gradcam_energy_in_box", "gradcam_border_energy", "gradcam_drift", "gradcam_warning",
    "n_sites", "n_failed", "n_rejected", "n_val", "train_loss", "seconds", "best", "failures",
]  # fmt: skip  (per-label columns '<figure>__<label>' follow these when a run has several labels)
SITE_COLUMNS = ["round", "site", "n_train", "n_val", "auc", "sensitivity", "specificity", "histograms"]


def _ordered(rows: list[dict[str, Any]], first: list[str]) -> pd.DataFrame:
    """Rows as a table whose columns start with `first`, then any others in the order they appear."""
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in first))
    return pd.DataFrame(rows, columns=first + extra)


def run_folder(cfg: RunConfig) -> Path:
    """Create this run's folder (output-dir/run-name, a timestamp when unnamed) and write config.json into it."""
    name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.output_dir) / name
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise FileExistsError(f"run folder {folder} exists already: choose another 'run-name'") from None
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg), indent=2) + "\n")
    return folder


def write_tables(folder: Path, rows: list[dict[str, Any]], site_rows: list[dict[str, Any]]) -> None:
    """Write history.csv, sites.csv (one row per site per round) and the plot of the figures over rounds."""
    history, sites = _ordered(rows, HISTORY_COLUMNS), _ordered(site_rows, SITE_COLUMNS)
    history.to_csv(folder / "history.csv", index=False, float_format="%.6g")
    sites.to_csv(folder / "sites.csv", index=False, float_format="%.6g")
    plot_history(history, sites, folder / "history.png")


def save_model(model: keras.Model, path: Path) -> None:
    """Save a model's architecture and weights so that a plain keras.models.load_model opens it (no training state, no
    custom loss to import); written beside and renamed, never left half-written."""
    plain = keras.Model(model.inputs, model.outputs, name=model.name)  # the same layers, uncompiled: no loss, no Adam state
    partial = path.with_name(path.stem + ".partial.keras")
    plain.save(partial)
    partial.replace(path)


def fmt(value: float, digits: int = 3) -> str:
    """A figure for the progress line: '-' where undefined."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
