"""Grad-CAM pictures a clinician scans: each round's overlays and grid (gradcam/round_NNN/), and the randomisation
sanity test's stages at the end (gradcam/sanity.csv)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.atomic import write_csv
from common.metrics import to_probability
from server.plots import save_gradcam_pictures
from server.rounds import Outcome, Recorder, RoundReport


class GradcamRecorder(Recorder):
    """Writes the Grad-CAM overlays, grids and sanity table."""

    def __init__(self, folder: Path) -> None:
        """Pictures go into the run folder's gradcam/."""
        self.folder = folder / "gradcam"

    def record(self, report: RoundReport) -> None:
        """The round's overlays of label 0 and their grid, where the check ran."""
        if report.round == 0 or report.gradcam is None:
            return
        result, label = report.gradcam, report.cfg.labels[0]
        pictures = self.folder / f"round_{report.round:03d}"
        title = f"Round {report.round}: where the model looks for {label}"
        probabilities = to_probability(report.heldout.logits[report.sample_rows, 0])
        save_gradcam_pictures(
            pictures, title, report.sample.images, result.heat[0], report.sample.boxes[:, 0], result.cases, probabilities,
            float(result.called_at[0]), result.found,
        )  # fmt: skip

    def finish(self, outcome: Outcome) -> None:
        """The randomisation test's stages, where it ran."""
        if outcome.sanity:
            self.folder.mkdir(exist_ok=True)
            table = pd.DataFrame(outcome.sanity, columns=["label", "randomised_down_to", "spearman_with_trained"])
            write_csv(self.folder / "sanity.csv", table, float_format="%.4f")
