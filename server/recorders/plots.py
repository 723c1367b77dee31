"""Each round's report picture (plots/round_NNN.png), and best_model.png for the best round so far."""

from __future__ import annotations

import shutil
from pathlib import Path

from common.atomic import write_atomic
from server.plots import plot_round
from server.rounds import Recorder, RoundReport


class PlotsRecorder(Recorder):
    """Draws a round's ROC curves, confusion matrix, reliability and the sites' AUCs."""

    def __init__(self, folder: Path) -> None:
        """Plots go into the run folder's plots/."""
        self.folder = folder
        (folder / "plots").mkdir(exist_ok=True)

    def record(self, report: RoundReport) -> None:
        """Draw the round (not round 0: no hospital has validated the initial model)."""
        if report.round == 0:
            return
        record, held = report.record, report.heldout
        path = self.folder / "plots" / f"round_{report.round:03d}.png"
        plot_round(
            path, f"Round {report.round}: global model", report.cfg.labels,
            (record.pos, record.neg) if record.pos is not None else None, (held.logits, report.heldout_labels),
            held.counts_at_threshold, record.thresholds, record.sites, report.cfg.histogram_bins, report.unavailable(),
        )  # fmt: skip
        if report.best:
            write_atomic(self.folder / "best_model.png", lambda p: shutil.copy(path, p))
