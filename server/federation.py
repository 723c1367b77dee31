"""The federation's rounds: the held-out overlap check, round 0 (the initial model), then train, validate and check the
held-out set and where the model looks, round by round, handing each round's report to the recorders (server/rounds.py).

A run stops, and fails, when a round has fewer valid training updates than min-hospitals: no more rounds on a model
nobody trained. Whatever ends the run, the recorders hear how (status.json says it), and a failed run raises so that
Flower marks it failed too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import keras
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import wire
from common.config import RunConfig
from common.gradcam import randomisation_test
from common.model import build_model, load_initial_weights
from common.site_data import server_heldout
from server.evaluation import evaluate_heldout, gradcam_check, gradcam_sample, gradcam_warning
from server.messaging import send_and_receive
from server.overlap import check_overlap
from server.recorders import default_recorders
from server.rounds import Outcome, Recorder, RoundReport, RunInfo, record_round
from server.run_folder import FAILED, FINISHED, make_run_folder
from server.selection import Selection, judge
from server.strategy import HospitalFedAvg


class RunAborted(RuntimeError):
    """The run stopped before its last round for a reason of its own (status.json says which)."""


def run_federation(grid: Grid, cfg: RunConfig) -> None:
    """Run every round and record it; raise RunAborted (after recording why) when the run cannot go on."""
    folder = make_run_folder(cfg)
    recorders = default_recorders(folder)
    keras.utils.set_random_seed(cfg.seed)
    for recorder in recorders:
        recorder.start(RunInfo(cfg, folder))
    run = _Run(grid, cfg, folder, recorders)
    try:
        outcome = run.all_rounds()
    except Exception as exc:
        reason = f"the server stopped: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _finish(recorders, run.outcome(FAILED, reason, len(run.rows) - 1))
        raise
    _finish(recorders, outcome)
    if outcome.status == FAILED:
        raise RunAborted(outcome.reason)


def _finish(recorders: list[Recorder], outcome: Outcome) -> None:
    """Tell every recorder how the run ended; one recorder failing does not silence the others."""
    errors = []
    for recorder in recorders:
        try:
            recorder.finish(outcome)
        except Exception as exc:  # noqa: BLE001 - said below, after the others had their turn
            errors.append(exc)
    if errors:
        raise errors[0]


@dataclass
class _Run:
    """One federation as the round loop carries it from round to round."""

    grid: Grid
    cfg: RunConfig
    folder: Path
    recorders: list[Recorder]
    best: Selection | None = None
    best_round: int | None = None
    stale: int = 0  # rounds since the best
    heat: np.ndarray | None = None  # last round's heatmaps, for drift
    durations: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)  # every round's history row

    def all_rounds(self) -> Outcome:
        """The overlap check and round 0, then the rounds until the last, an early stop or too few updates."""
        cfg = self.cfg
        self.heldout = server_heldout(cfg)
        self.model = build_model(cfg.model, self.heldout.images.shape[1:], len(cfg.labels), cfg.learning_rate)
        if cfg.initial_weights:
            load_initial_weights(self.model, cfg.initial_weights)
        self.strategy = HospitalFedAvg(cfg, [tuple(w.shape) for w in self.model.get_weights()], [w.trainable for w in self.model.weights])
        self.arrays = ArrayRecord(self.model.get_weights())
        self.config = ConfigRecord({wire.RUN_FOLDER: str(self.folder)})
        self._record(self._round_zero())
        for rnd in range(1, cfg.num_server_rounds + 1):
            report = self._round(rnd)
            self._record(report)
            if len(report.record.trained) < cfg.min_hospitals:
                failed = "; ".join(report.record.failures) or "no hospital was asked"
                reason = f"round {rnd}: {len(report.record.trained)} valid training update(s), fewer than min-hospitals = {cfg.min_hospitals}; the run stops here ({failed})"
                return self.outcome(FAILED, reason, rnd)
            if cfg.early_stop_rounds and self.stale >= cfg.early_stop_rounds:
                reason = f"early stop after round {rnd}: no better {self.best.criterion} for {self.stale} rounds (early-stop-rounds = {cfg.early_stop_rounds})"
                return self.outcome(FINISHED, reason, rnd, self._sanity())
        return self.outcome(FINISHED, f"all {cfg.num_server_rounds} rounds", cfg.num_server_rounds, self._sanity())

    def outcome(self, status: str, reason: str, last_round: int, sanity: list | None = None) -> Outcome:
        """How the run ended, with the best round so far and the last history row."""
        return Outcome(status, reason, last_round, self.best_round, self.best, self.rows[-1] if self.rows else {}, sanity or [])

    def _round_zero(self) -> RoundReport:
        """Before training: ask the hospitals which held-out images they hold (leaving those out where the run says),
        fix the Grad-CAM sample, and check the initial model on the held-out set."""
        cfg, started = self.cfg, time.perf_counter()
        overlap = check_overlap(self.grid, self.strategy, self.heldout, cfg)
        n_before = len(self.heldout)
        if overlap.held:
            self.heldout = self.heldout.take(np.array(sorted(set(range(n_before)) - overlap.held), int))
        self.sample_rows = gradcam_sample(self.heldout, cfg)
        self.sample = self.heldout.take(self.sample_rows)
        held = evaluate_heldout(self.model, self.heldout, cfg, None)
        report = RoundReport(0, cfg, self.folder, self.strategy.record, held, self.heldout.labels, self.model, judge({}, 0), False, started=started)
        report.overlap = overlap.rows
        report.notes = overlap.lines(n_before)
        if overlap.held:
            report.notes.append(f"{n_before - len(self.heldout)} held-out image(s) that hospitals also hold are left out; {len(self.heldout)} remain")
        return report

    def _round(self, rnd: int) -> RoundReport:
        """One round: the hospitals train and validate, the server checks its held-out set and where the model looks."""
        cfg, strategy, grid = self.cfg, self.strategy, self.grid
        started, phases = time.perf_counter(), {}
        with _timed(phases, "train"):  # the hospitals' training, the messages both ways, and aggregation
            replies = send_and_receive(grid, strategy.configure_train(rnd, self.arrays, self.config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
        trained, previous = new_arrays is not None, self.arrays
        if trained:
            self.arrays = new_arrays
            with _timed(phases, "evaluate"):
                replies = send_and_receive(grid, strategy.configure_evaluate(rnd, self.arrays, self.config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
                strategy.aggregate_evaluate(rnd, replies)
        else:
            strategy.record.unavailable.setdefault("global_auc", "no model was trained this round, so none was validated")
        record = strategy.record
        with _timed(phases, "heldout"):
            self.model.set_weights(self.arrays.to_numpy_ndarrays())
            held = evaluate_heldout(self.model, self.heldout, cfg, record.thresholds)
            if trained and not np.isfinite(held.logits).all():  # a model that scores no number is never the global model
                bad = int((~np.isfinite(held.logits)).any(axis=1).sum())
                record.unavailable["global_model"] = f"its scores of {bad} of {len(held.logits)} held-out images are not finite; the previous model is kept"
                self.arrays, trained = previous, False
                record.row = {k: float("nan") if isinstance(v, float) else v for k, v in record.row.items()}  # of the model kept out
                record.thresholds = None
                record.unavailable["global_auc"] = "the model the hospitals validated was kept out"
                self.model.set_weights(self.arrays.to_numpy_ndarrays())
                held = evaluate_heldout(self.model, self.heldout, cfg, record.thresholds)
        selection = judge(record.row, rnd)
        report = RoundReport(
            rnd, cfg, self.folder, record, held, self.heldout.labels, self.model, selection, trained and selection.beats(self.best),
            self.sample, self.sample_rows, started=started,
        )  # fmt: skip
        if trained and cfg.gradcam_images:
            with _timed(phases, "gradcam"):
                self._look(report, held.logits[self.sample_rows])
        report.phases = phases
        return report

    def _look(self, report: RoundReport, logits: np.ndarray) -> None:
        """This round's Grad-CAM check and shortcut warning; a failure is said and recorded, and the rest of the round stands."""
        cfg, thresholds = self.cfg, report.record.thresholds
        chosen = np.full(len(cfg.labels), cfg.threshold) if thresholds is None else np.where(np.isnan(thresholds), cfg.threshold, thresholds)
        try:
            report.gradcam = gradcam_check(report.model, report.sample, logits, chosen, cfg, self.heat)
        except ValueError as exc:
            report.gradcam_error = f"Grad-CAM check not run: {exc}"
            return
        self.heat = report.gradcam.heat
        previous = self.rows[-1] if report.round > 1 else None
        warning = gradcam_warning({**report.record.row, **report.gradcam.row}, previous, cfg)
        report.warnings = [warning] if warning else []

    def _record(self, report: RoundReport) -> None:
        """Judge the round against the best so far, then hand it to the recorders."""
        if report.best:
            self.best, self.best_round, self.stale = report.selection, report.round, 0
        elif report.round > 0:
            self.stale += 1
        if report.round > 0:
            self.durations.append(time.perf_counter() - report.started)
            report.eta_seconds = sum(self.durations) / len(self.durations) * (self.cfg.num_server_rounds - report.round)
        record_round(self.recorders, report)
        self.rows.append(report.row())

    def _sanity(self) -> list[tuple[str, str, float]]:
        """The randomisation sanity test after the last round, where the Grad-CAM checks ran."""
        if self.heat is None:
            return []
        labels = self.cfg.labels
        return [(labels[j], name, r) for j in range(len(labels)) for name, r in randomisation_test(self.model, self.sample.images, j, self.cfg.seed)]


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to phases['seconds_<name>']."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[f"seconds_{name}"] = phases.get(f"seconds_{name}", 0.0) + time.perf_counter() - start
