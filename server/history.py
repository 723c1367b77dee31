"""The run folder: resolved configuration, one history row per round, the plot over rounds, last and best models."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import keras
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402

from common.config import RunConfig, config_to_dict  # noqa: E402

HISTORY_COLUMNS = [
    "round", "global_auc", "global_sensitivity", "global_specificity",
    "heldout_auc", "heldout_sensitivity", "heldout_specificity",
    "n_sites", "n_failed", "n_val", "train_loss", "seconds", "best", "failures",
]  # fmt: skip


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


def write_history(folder: Path, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Write history.csv (every row so far) and the plot of the figures over rounds; returns the table."""
    table = pd.DataFrame(rows, columns=HISTORY_COLUMNS)
    table.to_csv(folder / "history.csv", index=False, float_format="%.6g")
    plot_history(table, folder / "history.png")
    return table


def plot_history(table: pd.DataFrame, path: Path) -> None:
    """Two panels a clinician can read: AUC over rounds, and sensitivity and specificity at the run's threshold."""
    fig, (ax_auc, ax_rates) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    ax_auc.plot(table["round"], table["global_auc"], "o-", label="sites' validation, pooled")
    ax_auc.plot(table["round"], table["heldout_auc"], "s--", label="server's held-out set")
    ax_auc.set(title="ROC AUC of the global model", xlabel="round", ylabel="AUC", ylim=(0.4, 1.0))
    ax_rates.plot(table["round"], table["global_sensitivity"], "o-", color="tab:red", label="sensitivity, pooled")
    ax_rates.plot(table["round"], table["global_specificity"], "o-", color="tab:blue", label="specificity, pooled")
    ax_rates.plot(table["round"], table["heldout_sensitivity"], "s--", color="tab:red", alpha=0.6, label="sensitivity, held-out")
    ax_rates.plot(table["round"], table["heldout_specificity"], "s--", color="tab:blue", alpha=0.6, label="specificity, held-out")
    ax_rates.set(title="At the decision threshold", xlabel="round", ylabel="rate", ylim=(0.0, 1.02))
    best = table[table["best"] == True]  # noqa: E712  (a column of booleans with NaN-free rows)
    for ax in (ax_auc, ax_rates):
        for r in best["round"].tail(1):
            ax.axvline(r, color="grey", lw=0.8, ls=":", label=f"best model (round {r})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_model(model: keras.Model, path: Path) -> None:
    """Save a model so that keras.models.load_model opens it; written beside and renamed, never left half-written."""
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)  # saved state then matches what load_model rebuilds
    partial = path.with_name(path.stem + ".partial.keras")
    model.save(partial)
    partial.replace(path)


def fmt(value: float, digits: int = 3) -> str:
    """A figure for the progress line: '-' where undefined."""
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"
