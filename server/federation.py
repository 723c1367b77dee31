"""The federation's rounds: the held-out overlap check, round 0 (the initial model), then train, validate and check the
held-out set and where the model looks, round by round, handing each round's report to the recorders (server/rounds.py).

A run stops, and fails, when a round has fewer valid training updates than min-hospitals: no more rounds on a model
nobody trained. Whatever ends the run, the recorders hear how (status.json says it), and a failed run raises so that
Flower marks it failed too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tensorflow as tf
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import wire
from common.atomic import write_atomic
from common.config import RunConfig
from common.gradcam import randomisation_test
from common.model import build_model, load_initial_weights
from common.site_data import server_heldout
from server.checkpoint import Checkpoint, check_state, identity, load_checkpoint, require_model, save_checkpoint
from server.defences import score_spread, unusable_scores
from server.evaluation import evaluate_heldout, gradcam_check, gradcam_sample, gradcam_warning
from server.messaging import send_and_receive
from server.overlap import check_overlap
from server.privacy import record_release, releases
from server.recorders import default_recorders
from server.recorders.models import save_model
from server.rounds import Outcome, Recorder, RoundReport, RunInfo, record_round
from server.run_folder import FAILED, FINISHED, hold, make_run_folder, resumed_config, run_folder
from server.selection import Selection, judge
from server.strategy import HospitalFedAvg


class RunAborted(RuntimeError):
    """The run stopped before its last round for a reason of its own (status.json says which)."""


def run_federation(grid: Grid, cfg: RunConfig) -> None:
    """Run every round (after the checkpointed one, when resuming) and record it; raise RunAborted (after recording
    why) when the run cannot go on."""
    if cfg.resume:
        cfg = resumed_config(Path(cfg.resume), cfg)  # the run's own settings, from its folder, as the hospitals were given them
        folder = run_folder(cfg)
    else:
        folder = make_run_folder(cfg)
    with hold(folder):
        _run_in(grid, cfg, folder)


def _run_in(grid: Grid, cfg: RunConfig, folder: Path) -> None:
    """The rounds of a run whose folder this process holds."""
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    recorders = default_recorders(folder, cfg)
    run = _Run(grid, cfg, folder, recorders)
    try:
        outcome = run.all_rounds()
    except Exception as exc:
        reason = f"the server stopped: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _finish(recorders, run.outcome(FAILED, reason, run.rows[-1]["round"] if run.rows else -1))
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
    rows: list[dict] = field(default_factory=list)  # the history rows of the rounds this process ran (a resumed run: the checkpointed one first)
    best_weights: list[np.ndarray] = field(default_factory=list)
    kept: np.ndarray | None = None  # (n,) the rows of the held-out set kept after the overlap check
    previous_spread: float = 0.0  # the spread of the global model's held-out scores, to tell a collapse from a start
    kept_out: list[int] = field(default_factory=list)  # rounds whose new global model was kept out

    def all_rounds(self) -> Outcome:
        """The overlap check and round 0 (or the checkpoint's state), then the rounds until the last, an early stop or
        too few updates."""
        cfg = self.cfg
        checkpoint = load_checkpoint(self.folder) if cfg.resume else None
        for recorder in self.recorders:
            recorder.start(RunInfo(cfg, self.folder, checkpoint.round if checkpoint else None))
        self.heldout = server_heldout(cfg)
        backbone_weights = cfg.backbone_weights if checkpoint is None else ""  # a resumed run starts from its checkpoint
        self.model = build_model(cfg.model, self.heldout.images.shape[1:], len(cfg.labels), cfg.learning_rate, seed=cfg.seed, backbone_weights=backbone_weights)
        shapes = [tuple(w.shape) for w in self.model.get_weights()]
        if checkpoint is not None:
            require_model(checkpoint, identity(cfg, shapes), self.folder)
        elif cfg.initial_weights:
            load_initial_weights(self.model, cfg.initial_weights)
        weights = self.model.weights
        self.strategy = HospitalFedAvg(cfg, shapes, [w.trainable for w in weights], [w.path.endswith("moving_variance") for w in weights])
        self.arrays = ArrayRecord(self.model.get_weights())
        self.config = ConfigRecord({wire.RUN_FOLDER: str(self.folder)})
        if checkpoint is None:
            self._record(self._round_zero())
        else:
            self._restore(checkpoint)
        for rnd in range(self.rows[-1]["round"] + 1, cfg.num_server_rounds + 1):
            report = self._round(rnd)
            if "global_model" in report.record.unavailable:
                self.kept_out.append(rnd)
            self._record(report)
            if len(report.record.trained) < cfg.min_hospitals:
                failed = "; ".join(report.record.failures) or "no hospital was asked"
                reason = f"round {rnd}: {len(report.record.trained)} valid training update(s), fewer than min-hospitals = {cfg.min_hospitals}; the run stops here ({failed})"
                return self.outcome(FAILED, reason, rnd)
            if cfg.early_stop_rounds and self.stale >= cfg.early_stop_rounds:
                return self._ended(f"early stop after round {rnd}: no better {self.best.criterion} for {self.stale} rounds (early-stop-rounds = {cfg.early_stop_rounds})")
        return self._ended(f"all {cfg.num_server_rounds} rounds")

    def _ended(self, how: str) -> Outcome:
        """A run that went to its end (or an early stop): finished, saying which global models were kept out; failed
        where every round's was (no round left a usable model)."""
        last = self.rows[-1]["round"]
        if self.kept_out and self.best_round is None:
            return self.outcome(FAILED, f"{how}, but no round left a usable global model: every one was kept out (rounds {', '.join(map(str, self.kept_out))})", last)
        kept = f"; {len(self.kept_out)} round(s) kept their previous global model (rounds {', '.join(map(str, self.kept_out))})" if self.kept_out else ""
        return self.outcome(FINISHED, how + kept, last, self._sanity())

    def outcome(self, status: str, reason: str, last_round: int, sanity: list | None = None) -> Outcome:
        """How the run ended, with the best round so far and the last history row."""
        return Outcome(status, reason, last_round, self.best_round, self.best, self.rows[-1] if self.rows else {}, sanity or [])

    def _round_zero(self) -> RoundReport:
        """Before training: ask the hospitals which held-out images they hold (leaving those out where the run says),
        fix the Grad-CAM sample, and check the initial model on the held-out set."""
        cfg, started = self.cfg, time.perf_counter()
        overlap = check_overlap(self.grid, self.strategy, self.heldout, cfg)
        n_before = len(self.heldout)
        self.kept = np.array(sorted(set(range(n_before)) - overlap.held), int)
        if overlap.held:
            self.heldout = self.heldout.take(self.kept)
        self.sample_rows = gradcam_sample(self.heldout, cfg)
        self.sample = self.heldout.take(self.sample_rows)
        held = evaluate_heldout(self.model, self.heldout, cfg, None)
        self.previous_spread = score_spread(held.logits)
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
            messages = strategy.configure_train(rnd, self.arrays, self.config, grid)
            if cfg.dp != "off" and messages:
                record_release(self.folder, strategy.dp_rounds)  # on disk before any hospital is asked
            replies = send_and_receive(grid, messages, *_pace(cfg))
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
        trained, previous = new_arrays is not None, self.arrays
        if trained:
            self.arrays = new_arrays
            with _timed(phases, "evaluate"):
                replies = send_and_receive(grid, strategy.configure_evaluate(rnd, self.arrays, self.config, grid), *_pace(cfg))
                strategy.aggregate_evaluate(rnd, replies)
        else:
            strategy.record.unavailable.setdefault("global_auc", "no model was trained this round, so none was validated")
        record = strategy.record
        with _timed(phases, "heldout"):
            self.model.set_weights(self.arrays.to_numpy_ndarrays())
            held = evaluate_heldout(self.model, self.heldout, cfg, record.thresholds)
            unusable = unusable_scores(held.logits, self.previous_spread) if trained else ""
            if unusable:  # a model that scores no number, or the same number for every image, is never the global model
                record.unavailable["global_model"] = f"{unusable}; the previous model is kept"
                strategy.keep_out()
                self.arrays, trained = previous, False
                record.row = {k: float("nan") if isinstance(v, float) else v for k, v in record.row.items()}  # of the model kept out
                record.thresholds = None
                record.unavailable["global_auc"] = "the model the hospitals validated was kept out"
                self.model.set_weights(self.arrays.to_numpy_ndarrays())
                held = evaluate_heldout(self.model, self.heldout, cfg, record.thresholds)
            self.previous_spread = score_spread(held.logits)
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
        """Judge the round against the best so far, hand it to the recorders, then checkpoint the run."""
        if report.best:
            self.best, self.best_round, self.stale = report.selection, report.round, 0
            self.best_weights = self.model.get_weights()
        elif report.round > 0:
            self.stale += 1
        if report.round > 0:
            self.durations.append(time.perf_counter() - report.started)
            report.eta_seconds = sum(self.durations) / len(self.durations) * (self.cfg.num_server_rounds - report.round)
        record_round(self.recorders, report)
        self.rows.append(report.row())
        save_checkpoint(self.folder, self._checkpoint(report.round))

    def _checkpoint(self, rnd: int) -> Checkpoint:
        """The run's state after round rnd, for a resume."""
        adam = self.strategy.server_optimiser
        state = {
            "best": dataclasses.asdict(self.best) if self.best else None, "best_round": self.best_round, "stale": self.stale,
            "durations": self.durations, "kept": self.kept.tolist(), "sample_rows": self.sample_rows.tolist(),
            "sites": {str(n): site for n, site in self.strategy.sites.items()}, "last_row": _plain(self.rows[-1]),
            "dp_rounds": self.strategy.dp_rounds, "previous_spread": self.previous_spread, "kept_out": self.kept_out,
        }  # fmt: skip
        weights = self.arrays.to_numpy_ndarrays()
        return Checkpoint(
            rnd, identity(self.cfg, [w.shape for w in weights]), weights, self.best_weights,
            (adam.m, adam.v) if adam is not None and adam.m else None, self.heat, state,
        )  # fmt: skip

    def _restore(self, checkpoint: Checkpoint) -> None:
        """Take up the run where the checkpoint left it; the models on disk become the checkpoint's (a round after it
        may have saved its own before the crash)."""
        state = checkpoint.state
        check_state(checkpoint, len(self.heldout), self.folder)
        self.kept, self.sample_rows = np.array(state["kept"], int), np.array(state["sample_rows"], int)
        self.heldout = self.heldout.take(self.kept)
        self.sample = self.heldout.take(self.sample_rows)
        self.best = Selection(**state["best"]) if state["best"] else None
        self.best_round, self.stale, self.durations, self.heat = state["best_round"], state["stale"], state["durations"], checkpoint.heat
        self.strategy.sites |= {int(n): site for n, site in state["sites"].items()}
        self.previous_spread, self.kept_out = state["previous_spread"], state["kept_out"]
        self.strategy.dp_rounds = max(state["dp_rounds"], releases(self.folder))  # a round asked for after the checkpoint counts too
        if checkpoint.adam is not None:
            self.strategy.server_optimiser.m, self.strategy.server_optimiser.v = checkpoint.adam
        self.rows = [{k: math.nan if v is None else v for k, v in state["last_row"].items()}]
        self.arrays = ArrayRecord(checkpoint.weights)
        if checkpoint.best_weights:
            self.best_weights = checkpoint.best_weights
            self.model.set_weights(self.best_weights)
            save_model(self.model, self.folder / "model_best.keras")
            plot = self.folder / "plots" / f"round_{self.best_round:03d}.png"
            if plot.is_file():
                write_atomic(self.folder / "best_model.png", lambda path: shutil.copy(plot, path))
        else:  # a best model a round after the checkpoint saved before the crash is that round's, which is done again
            for name in ("model_best.keras", "best_model.png", "model_last.keras"):
                (self.folder / name).unlink(missing_ok=True)
        self.model.set_weights(checkpoint.weights)
        if checkpoint.round > 0:
            save_model(self.model, self.folder / "model_last.keras")

    def _sanity(self) -> list[tuple[str, str, float]]:
        """The randomisation sanity test after the last round, where the Grad-CAM checks ran."""
        if self.heat is None:
            return []
        labels = self.cfg.labels
        return [(labels[j], name, r) for j in range(len(labels)) for name, r in randomisation_test(self.model, self.sample.images, j, self.cfg.seed)]


def _pace(cfg: RunConfig) -> tuple[float, float, float, float, int]:
    """How a phase waits for replies: timeout, poll interval, quorum, its grace, and the fewest answers it may go on with."""
    return cfg.round_timeout, cfg.reply_poll_seconds, cfg.round_quorum, cfg.quorum_grace, cfg.min_hospitals


def _plain(row: dict) -> dict:
    """A history row as JSON takes it (NumPy numbers as Python's, NaN as None)."""
    out = {}
    for key, value in row.items():
        value = value.item() if isinstance(value, np.generic) else value
        out[key] = None if isinstance(value, float) and math.isnan(value) else value
    return out


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to phases['seconds_<name>']."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[f"seconds_{name}"] = phases.get(f"seconds_{name}", 0.0) + time.perf_counter() - start
