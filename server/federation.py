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

import keras
import numpy as np
from flwr.app import ArrayRecord, ConfigRecord
from flwr.serverapp import Grid

from common import wire
from common.config import RunConfig
from common.gradcam import randomisation_test
from common.image_set import ImageSet
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


@dataclass
class _State:
    """What the round loop carries from round to round."""

    best: Selection | None = None
    best_round: int | None = None
    stale: int = 0  # rounds since the best
    heat: np.ndarray | None = None  # last round's heatmaps, for drift
    durations: list[float] = field(default_factory=list)
    rows: list[dict] = field(default_factory=list)


def run_federation(grid: Grid, cfg: RunConfig) -> None:
    """Run every round and record it; raise RunAborted (after recording why) when the run cannot go on."""
    folder = make_run_folder(cfg)
    recorders = default_recorders(folder)
    keras.utils.set_random_seed(cfg.seed)
    for recorder in recorders:
        recorder.start(RunInfo(cfg, folder))
    state = _State()
    try:
        outcome = _rounds(grid, cfg, folder, recorders, state)
    except Exception as exc:
        reason = f"the server stopped: {type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        _finish(recorders, Outcome(FAILED, reason, len(state.rows) - 1, state.best_round, state.best, state.rows[-1] if state.rows else {}))
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


def _rounds(grid: Grid, cfg: RunConfig, folder, recorders: list[Recorder], state: _State) -> Outcome:
    """The overlap check and round 0, then the rounds until the last, an early stop or too few updates."""
    heldout = server_heldout(cfg)
    model = build_model(cfg.model, heldout.images.shape[1:], len(cfg.labels), cfg.learning_rate)
    if cfg.initial_weights:
        load_initial_weights(model, cfg.initial_weights)
    strategy = HospitalFedAvg(cfg, [tuple(w.shape) for w in model.get_weights()], [w.trainable for w in model.weights])
    started = time.perf_counter()
    overlap = check_overlap(grid, strategy, heldout, cfg)
    n_before = len(heldout)
    if overlap.held:
        heldout = heldout.take(np.array(sorted(set(range(len(heldout))) - overlap.held), int))
    sample_rows = gradcam_sample(heldout, cfg)
    sample = heldout.take(sample_rows)
    report = RoundReport(0, cfg, folder, strategy.record, evaluate_heldout(model, heldout, cfg, None), heldout.labels, model, judge({}, 0), False)
    report.started = started
    report.overlap = overlap.rows
    report.notes = overlap.lines(n_before) + ([f"{n_before - len(heldout)} held-out image(s) that hospitals also hold are left out; {len(heldout)} remain"] if overlap.held else [])
    _close(report, recorders, state)
    arrays = ArrayRecord(model.get_weights())
    config = ConfigRecord({wire.RUN_FOLDER: str(folder)})
    for rnd in range(1, cfg.num_server_rounds + 1):
        report, arrays = _round(rnd, grid, cfg, folder, strategy, model, heldout, sample, sample_rows, arrays, config, state)
        _close(report, recorders, state)
        if not report.record.trained or len(report.record.trained) < cfg.min_hospitals:
            reason = (
                f"round {rnd}: {len(report.record.trained)} valid training update(s), fewer than min-hospitals = {cfg.min_hospitals}; "
                f"the run stops here ({'; '.join(report.record.failures) or 'no hospital was asked'})"
            )
            return Outcome(FAILED, reason, rnd, state.best_round, state.best, state.rows[-1])
        if cfg.early_stop_rounds and state.stale >= cfg.early_stop_rounds:
            reason = f"early stop after round {rnd}: no better {state.best.criterion} for {state.stale} rounds (early-stop-rounds = {cfg.early_stop_rounds})"
            return Outcome(FINISHED, reason, rnd, state.best_round, state.best, state.rows[-1], _sanity(model, sample, cfg, state))
    reason = f"all {cfg.num_server_rounds} rounds"
    return Outcome(FINISHED, reason, cfg.num_server_rounds, state.best_round, state.best, state.rows[-1], _sanity(model, sample, cfg, state))


def _round(
    rnd: int, grid: Grid, cfg: RunConfig, folder, strategy: HospitalFedAvg, model: keras.Model, heldout: ImageSet, sample: ImageSet,
    sample_rows: np.ndarray, arrays: ArrayRecord, config: ConfigRecord, state: _State,
) -> tuple[RoundReport, ArrayRecord]:  # fmt: skip
    """One round: the hospitals train and validate, the server checks its held-out set and where the model looks."""
    started, phases = time.perf_counter(), {}
    with _timed(phases, "train"):  # the hospitals' training, the messages both ways, and aggregation
        replies = send_and_receive(grid, strategy.configure_train(rnd, arrays, config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
        new_arrays, _ = strategy.aggregate_train(rnd, replies)
    trained = new_arrays is not None
    arrays = new_arrays if trained else arrays
    if trained:
        with _timed(phases, "evaluate"):
            replies = send_and_receive(grid, strategy.configure_evaluate(rnd, arrays, config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
            strategy.aggregate_evaluate(rnd, replies)
    else:
        strategy.record.unavailable["global_auc"] = "no model was trained this round, so none was validated"
    record = strategy.record
    with _timed(phases, "heldout"):
        model.set_weights(arrays.to_numpy_ndarrays())
        held = evaluate_heldout(model, heldout, cfg, record.thresholds)
    selection = judge(record.row, rnd)
    best = trained and selection.beats(state.best)
    report = RoundReport(rnd, cfg, folder, record, held, heldout.labels, model, selection, best, sample, sample_rows)
    report.started = started
    if trained and cfg.gradcam_images:
        with _timed(phases, "gradcam"):
            _look(report, held.logits[sample_rows], state)
    report.phases = phases
    return report, arrays


def _look(report: RoundReport, logits: np.ndarray, state: _State) -> None:
    """This round's Grad-CAM check and shortcut warning; a failure is said and recorded, and the rest of the round stands."""
    cfg, record = report.cfg, report.record
    chosen = np.full(len(cfg.labels), cfg.threshold) if record.thresholds is None else np.where(np.isnan(record.thresholds), cfg.threshold, record.thresholds)
    try:
        report.gradcam = gradcam_check(report.model, report.sample, logits, chosen, cfg, state.heat)
    except ValueError as exc:
        report.gradcam_error = f"Grad-CAM check not run: {exc}"
        return
    state.heat = report.gradcam.heat
    previous = state.rows[-1] if report.round > 1 else None
    warning = gradcam_warning({**record.row, **report.gradcam.row}, previous, cfg)
    report.warnings = [warning] if warning else []


def _close(report: RoundReport, recorders: list[Recorder], state: _State) -> None:
    """Judge the round against the best so far, then hand it to the recorders."""
    if report.best:
        state.best, state.best_round, state.stale = report.selection, report.round, 0
    elif report.round > 0:
        state.stale += 1
    if report.round > 0:
        state.durations.append(time.perf_counter() - report.started)
        remaining = report.cfg.num_server_rounds - report.round
        report.eta_seconds = sum(state.durations) / len(state.durations) * remaining
    record_round(recorders, report)
    state.rows.append(report.row())


def _sanity(model: keras.Model, sample: ImageSet, cfg: RunConfig, state: _State) -> list[tuple[str, str, float]]:
    """The randomisation sanity test after the last round, where the Grad-CAM checks ran."""
    if state.heat is None:
        return []
    return [(cfg.labels[j], name, r) for j in range(len(cfg.labels)) for name, r in randomisation_test(model, sample.images, j, cfg.seed)]


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to phases['seconds_<name>']."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[f"seconds_{name}"] = phases.get(f"seconds_{name}", 0.0) + time.perf_counter() - start
