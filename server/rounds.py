"""The seam between the round loop and everything that records it.

Each round (round 0 being the initial model) ends in one RoundReport; the loop hands it, in order, to a short list of
recorders (server/recorders/): the models, the plots, the Grad-CAM pictures, the tables, the status, the progress
line. A recorder sees the run start (RunInfo), every round, and the run's end (Outcome); adding one touches no other.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np

from common.config import RunConfig
from common.image_set import ImageSet
from server.evaluation import GradcamResult, HeldoutResult
from server.selection import Selection
from server.strategy import RoundRecord


@dataclass(frozen=True)
class RunInfo:
    """What a run starts with: its settings and folder (config.json written; nothing else yet, unless it resumes)."""

    cfg: RunConfig
    folder: Path
    resumed: int | None = None  # the round whose checkpoint a resumed run goes on from; its files up to it stand


@dataclass
class RoundReport:
    """One round, as the recorders receive it."""

    round: int  # 0: the initial model, before any training
    cfg: RunConfig
    folder: Path
    record: RoundRecord  # the hospitals' replies and the pooled figures (empty at round 0)
    heldout: HeldoutResult
    heldout_labels: np.ndarray  # (n, n_labels) the held-out truth, for the plots
    model: keras.Model  # the global model after this round
    selection: Selection  # how this round's model stands by the selection criterion
    best: bool  # the best model so far by that criterion
    sample: ImageSet | None = None  # the held-out images the Grad-CAM checks look at
    sample_rows: np.ndarray | None = None  # (m,) their rows in the held-out set
    gradcam: GradcamResult | None = None
    gradcam_error: str = ""  # why the Grad-CAM check could not run this round
    warnings: list[str] = field(default_factory=list)  # the round's warnings (shortcut), said and recorded
    notes: list[str] = field(default_factory=list)  # what else the operator should read (round 0: the overlap check)
    overlap: list[dict] = field(default_factory=list)  # round 0: per hospital, how many held-out images it also holds
    phases: dict[str, float] = field(default_factory=dict)  # seconds_<phase>: where the round's time went
    seconds: float = 0.0  # the round's wall time so far
    eta_seconds: float = 0.0  # the time the remaining rounds will take, from the mean round so far
    started: float = field(default_factory=time.perf_counter)

    @property
    def trained(self) -> bool:
        """True when this round's model came from hospitals' updates."""
        return self.round > 0 and bool(self.record.trained)

    def unavailable(self) -> dict[str, str]:
        """Every figure of the round that could not be computed, and why."""
        out = dict(self.record.unavailable) if self.round > 0 else {}
        if np.isnan(self.heldout.row.get("heldout_auc", np.nan)):
            out["heldout_auc"] = "the held-out set lacks " + ("positives" if not self.heldout_labels.any() else "negatives")
        if self.gradcam_error:
            out["gradcam"] = self.gradcam_error
        return out

    def row(self) -> dict:
        """This round's history.csv row."""
        record, gradcam = self.record, self.gradcam.row if self.gradcam is not None else {}
        return {
            "round": self.round, **record.row, **self.heldout.row, **gradcam, "gradcam_warning": "; ".join(self.warnings),
            "n_sites": len(record.trained), "n_failed": len(record.failures), "n_rejected": record.n_rejected,
            "n_val": record.n_val, "train_loss": record.train_loss, "seconds": self.seconds, **self.phases,
            "selection_criterion": self.selection.criterion, "selection_value": self.selection.value, "best": self.best,
            "failures": "; ".join(record.failures), "late_replies": "; ".join(record.late), "left_out_by_rule": "; ".join(record.left_out_by_rule),
            "influence_warning": "; ".join(record.influence),
            **record.privacy,
            "unavailable": "; ".join(f"{name}: {why}" for name, why in self.unavailable().items()),
        }  # fmt: skip

    def site_rows(self) -> list[dict]:
        """This round's sites.csv rows."""
        return [{"round": self.round, **site} for site in self.record.sites]


@dataclass(frozen=True)
class Outcome:
    """How the run ended, for the recorders' last word."""

    status: str  # server/run_status.py: finished or failed
    reason: str  # why it failed, or how it finished (all rounds, an early stop)
    last_round: int
    best_round: int | None
    best: Selection | None
    final: dict  # the last round's history row
    sanity: list[tuple[str, str, float]] = field(default_factory=list)  # (label, randomised down to, Spearman) stages


class Recorder:
    """Something that records a run as it goes; every hook does nothing unless the recorder needs it."""

    def start(self, run: RunInfo) -> None:
        """The run begins (its folder exists, nothing trained yet)."""

    def record(self, report: RoundReport) -> None:
        """A round ended."""

    def finish(self, outcome: Outcome) -> None:
        """The run ended, however it ended."""


def record_round(recorders: list[Recorder], report: RoundReport) -> None:
    """Hand the report to each recorder in order; the time spent so far is in report.phases['seconds_record'] and
    report.seconds when each one sees it."""
    start = time.perf_counter()
    for recorder in recorders:
        report.phases["seconds_record"] = time.perf_counter() - start
        report.seconds = time.perf_counter() - report.started
        recorder.record(report)
