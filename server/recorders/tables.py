"""The run folder's tables: history.csv (a row per round), sites.csv (a row per site per round), received.csv (every
reply that arrived, to match against the hospitals' audit logs), overlap.csv (the held-out overlap check), and
history.png drawn from them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from common.atomic import write_csv
from server.plots import plot_history
from server.rounds import Recorder, RoundReport, RunInfo

HISTORY_COLUMNS = [
    "round", "global_auc", "global_auc_low", "global_auc_high", "global_sensitivity", "global_specificity", "global_log_loss",
    "mean_site_auc", "worst_site_auc", "worst_site",
    "threshold_at_target_sensitivity", "specificity_at_target_sensitivity",
    "heldout_n", "heldout_auc", "heldout_auc_ci_low", "heldout_auc_ci_high", "heldout_sensitivity", "heldout_specificity",
    "heldout_sensitivity_at_threshold", "heldout_specificity_at_threshold", "heldout_ppv_at_threshold",
    "heldout_npv_at_threshold", "heldout_f1_at_threshold", "heldout_accuracy_at_threshold", "heldout_brier",
    "gradcam_pointing", "gradcam_energy_in_box", "gradcam_border_energy", "gradcam_drift", "gradcam_warning",
    "n_sites", "n_failed", "n_rejected", "n_val", "train_loss", "seconds", "selection_criterion", "selection_value", "best",
    "failures", "late_replies", "left_out_by_rule", "loo_auc_shift", "loo_sensitivity_shift", "loo_site", "influence_warning", "dp_epsilon", "dp_epsilon_replace_one", "dp_delta", "dp_noise_sd", "unavailable",
]  # fmt: skip  (per-label columns '<figure>__<label>' and the rest follow these)
SITE_COLUMNS = ["round", "site", "n_train", "n_val", "auc", "sensitivity", "specificity", "intervals", "note", "update_norm"]


def ordered(rows: list[dict[str, Any]], first: list[str]) -> pd.DataFrame:
    """Rows as a table whose columns start with `first`, then any others in the order they appear."""
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in first))
    return pd.DataFrame(rows, columns=first + extra)


def _rows(path: Path, last_round: int) -> list[dict[str, Any]]:
    """The rows of a table written by this recorder, up to last_round (none where it does not exist)."""
    if not path.is_file():
        return []
    table = pd.read_csv(path, keep_default_na=False, na_values=[""])
    return table[table["round"] <= last_round].to_dict("records")


class TablesRecorder(Recorder):
    """Keeps every round's rows and rewrites the tables (atomically) after each round."""

    def __init__(self, folder: Path) -> None:
        """Tables go into the run folder."""
        self.folder = folder
        self.rows: list[dict] = []
        self.site_rows: list[dict] = []
        self.received: list[dict] = []

    def start(self, run: RunInfo) -> None:
        """A resumed run takes up the tables' rows up to its checkpointed round (a later round's rows, written before
        the crash, are that round's first try and give way to the resumed one)."""
        if run.resumed is None:
            return
        self.rows, self.site_rows, self.received = (_rows(self.folder / name, run.resumed) for name in ("history.csv", "sites.csv", "received.csv"))

    def record(self, report: RoundReport) -> None:
        """Add the round's rows and write the tables and history.png."""
        self.rows.append(report.row())
        self.site_rows += report.site_rows()
        self.received += [{"round": report.round, **entry} for entry in report.record.received]
        if report.overlap:
            write_csv(self.folder / "overlap.csv", pd.DataFrame(report.overlap, columns=["site", "count", "heldout_rows"]))
        history, sites = ordered(self.rows, HISTORY_COLUMNS), ordered(self.site_rows, SITE_COLUMNS)
        write_csv(self.folder / "history.csv", history, float_format="%.6g")
        write_csv(self.folder / "sites.csv", sites, float_format="%.6g")
        write_csv(self.folder / "received.csv", pd.DataFrame(self.received, columns=["round", "phase", "node_id", "site", "bytes", "sha256", "seconds"]))
        plot_history(history, sites, self.folder / "history.png")
