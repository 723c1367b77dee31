"""The federation's rounds: train, validate, check the held-out set and where the model looks, record everything."""

from __future__ import annotations

import contextlib
import math
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from common import wire
from common.config import RunConfig
from common.gradcam import randomisation_test
from common.metrics import to_probability
from common.model import build_model, load_initial_weights
from common.site_data import server_heldout
from server.evaluation import evaluate_heldout, gradcam_check, gradcam_sample, gradcam_warning
from server.history import fmt, run_folder, save_model, write_tables
from server.plots import plot_round, save_gradcam_pictures
from server.strategy import HospitalFedAvg


def say(text: str) -> None:
    """One line of progress for the operator (streamed by `flwr run --stream`)."""
    print(f"[fedimaging] {text}", flush=True)


def _eta(seconds: list[float], remaining: int) -> str:
    """Remaining time from the mean round so far, as '1m30s'."""
    left = int(round(sum(seconds) / len(seconds) * remaining)) if seconds else 0
    return f"{left // 60}m{left % 60:02d}s"


def send_and_receive(grid: Grid, messages: Iterable[Message], timeout: float, poll: float) -> list[Message]:
    """Push the messages, then pull their replies every `poll` seconds until all are in or the timeout passes.

    Flower's own Grid.send_and_receive waits 3 s between pulls from a deployed SuperLink, so each phase of a round
    lost 1.5 s on average; this uses the same public calls (push_messages, pull_messages) at the run's pace
    (reply-poll-seconds, 0.1 s by default as Flower's simulation grid polls).
    """
    pending = set(grid.push_messages(messages))
    deadline = time.monotonic() + timeout
    replies: list[Message] = []
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(pending))
        replies += pulled
        pending -= {m.metadata.reply_to_message_id for m in pulled}
        if pending:
            time.sleep(poll)
    return replies


@contextlib.contextmanager
def _timed(phases: dict[str, float], name: str) -> Iterator[None]:
    """Add the wall time of the block to phases['seconds_<name>']."""
    start = time.perf_counter()
    try:
        yield
    finally:
        phases[f"seconds_{name}"] = phases.get(f"seconds_{name}", 0.0) + time.perf_counter() - start


def run_federation(grid: Grid, cfg: RunConfig) -> None:
    """Round 0 (the initial model) and then train, validate and check each round until the last or an early stop."""
    folder = run_folder(cfg)
    (folder / "plots").mkdir()
    say(f"run folder: {folder}")
    keras.utils.set_random_seed(cfg.seed)
    heldout = server_heldout(cfg)
    model = build_model(cfg.model, heldout.images.shape[1:], len(cfg.labels), cfg.learning_rate)
    if cfg.initial_weights:
        load_initial_weights(model, cfg.initial_weights)
    sample_rows = gradcam_sample(heldout, cfg)
    sample = heldout.take(sample_rows)
    strategy = HospitalFedAvg(cfg, [tuple(w.shape) for w in model.get_weights()], [w.trainable for w in model.weights])
    arrays = ArrayRecord(model.get_weights())
    config = ConfigRecord({wire.RUN_FOLDER: str(folder)})

    start = time.time()
    held = evaluate_heldout(model, heldout, cfg, thresholds=None)
    rows = [{"round": 0, **held.row, "n_sites": 0, "n_failed": 0, "n_rejected": 0, "seconds": time.time() - start, "best": False}]
    site_rows: list[dict] = []
    received_rows: list[dict] = []
    write_tables(folder, rows, site_rows)
    say(f"round 0/{cfg.num_server_rounds}  held-out AUC {fmt(held.row['heldout_auc'])} (initial model, {len(heldout)} held-out images)")

    best_auc, stale, round_seconds, heat = -math.inf, 0, [], None
    for rnd in range(1, cfg.num_server_rounds + 1):
        start, phases = time.time(), {}
        with _timed(phases, "train"):  # the hospitals' training, the messages both ways, and aggregation
            replies = send_and_receive(grid, strategy.configure_train(rnd, arrays, config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
        arrays = new_arrays if new_arrays is not None else arrays
        with _timed(phases, "evaluate"):
            replies = send_and_receive(grid, strategy.configure_evaluate(rnd, arrays, config, grid), cfg.round_timeout, cfg.reply_poll_seconds)
            strategy.aggregate_evaluate(rnd, replies)
        record = strategy.record
        with _timed(phases, "heldout"):
            model.set_weights(arrays.to_numpy_ndarrays())
            held = evaluate_heldout(model, heldout, cfg, record.thresholds)
        with _timed(phases, "gradcam"):
            looks, heat = check_where_it_looks(model, sample, held.logits[sample_rows], record.thresholds, cfg, heat, folder / "gradcam" / f"round_{rnd:03d}")
            looks["gradcam_warning"] = gradcam_warning({**record.row, **looks}, rows[-1] if rnd > 1 else None, cfg)
        if looks["gradcam_warning"]:
            say(f"GRAD-CAM WARNING round {rnd}: {looks['gradcam_warning']}")

        auc = record.row.get("global_auc", math.nan)
        best = not math.isnan(auc) and auc > best_auc
        with _timed(phases, "record"):  # models, plots
            if best:
                best_auc, stale = auc, 0
                save_model(model, folder / "model_best.keras")
            else:
                stale += 1
            save_model(model, folder / "model_last.keras")
            plot_round(
                folder / "plots" / f"round_{rnd:03d}.png", f"Round {rnd}: global model", cfg.labels,
                (record.pos, record.neg) if record.pos is not None else None, (held.logits, heldout.labels),
                held.counts_at_threshold, record.thresholds, record.sites, cfg.histogram_bins,
            )  # fmt: skip
            if best:
                shutil.copy(folder / "plots" / f"round_{rnd:03d}.png", folder / "best_model.png")
        round_seconds.append(time.time() - start)
        rows.append(
            {
                "round": rnd, **record.row, **held.row, **looks,
                "n_sites": len(record.trained), "n_failed": len(record.failures), "n_rejected": record.n_rejected,
                "n_val": record.n_val, "train_loss": record.train_loss, "seconds": round_seconds[-1], **phases, "best": best,
                "failures": "; ".join(record.failures),
            }
        )  # fmt: skip
        site_rows += [{"round": rnd, **site} for site in record.sites]
        write_tables(folder, rows, site_rows)
        received_rows += [{"round": rnd, **entry} for entry in record.received]
        pd.DataFrame(received_rows).to_csv(folder / "received.csv", index=False)  # to match against the hospitals' audit logs
        worst = record.row.get("worst_site_auc", math.nan)
        say(
            f"round {rnd}/{cfg.num_server_rounds}  pooled AUC {fmt(auc)}  sens {fmt(record.row.get('global_sensitivity'), 2)}  "
            f"spec {fmt(record.row.get('global_specificity'), 2)}  worst site AUC {fmt(worst)} ({record.row.get('worst_site', '-')})  "
            f"held-out AUC {fmt(held.row['heldout_auc'])}  sites {len(record.trained)}/{len(strategy.sent.get('train', []))}"
            + f"  pointing {fmt(looks.get('gradcam_pointing'), 2)}"
            + (f"  FAILED {len(record.failures)}" if record.failures else "")
            + f"  {round_seconds[-1]:.1f} s  ETA {_eta(round_seconds, cfg.num_server_rounds - rnd)}"
        )
        if cfg.early_stop_rounds and stale >= cfg.early_stop_rounds:
            say(f"early stop: no better pooled AUC for {stale} rounds (early-stop-rounds = {cfg.early_stop_rounds})")
            break
    if heat is not None:
        sanity_check(model, sample, cfg, folder / "gradcam")
    ci = f"{fmt(held.row['heldout_auc_ci_low'])}-{fmt(held.row['heldout_auc_ci_high'])}"
    say(f"done: best pooled AUC {fmt(best_auc)}; final held-out AUC {fmt(held.row['heldout_auc'])} (95 % CI {ci}); run folder: {folder}")


def check_where_it_looks(model, sample, logits, thresholds, cfg: RunConfig, previous, pictures: Path) -> tuple[dict, np.ndarray | None]:
    """This round's Grad-CAM figures and pictures; a failure is said and recorded, and the rest of the round stands."""
    if cfg.gradcam_images == 0:
        return {}, None
    chosen = np.full(len(cfg.labels), cfg.threshold) if thresholds is None else np.where(np.isnan(thresholds), cfg.threshold, thresholds)
    try:
        result = gradcam_check(model, sample, logits, chosen, cfg, previous)
    except ValueError as exc:
        say(f"Grad-CAM check skipped: {exc}")
        return {"gradcam_error": str(exc)}, previous
    probabilities = to_probability(logits[:, 0])
    title = f"{pictures.name.replace('_', ' ')}: where the model looks for {cfg.labels[0]}, called positive at p >= {chosen[0]:.3f}"
    save_gradcam_pictures(pictures, title, sample.images, result.heat[0], sample.boxes[:, 0], result.cases, probabilities)
    return result.row, result.heat


def sanity_check(model, sample, cfg: RunConfig, folder: Path) -> None:
    """The randomisation sanity test after the last round: gradcam/sanity.csv, and a verdict on the fully randomised stage."""
    stages = [(cfg.labels[j], name, r) for j in range(len(cfg.labels)) for name, r in randomisation_test(model, sample.images, j, cfg.seed)]
    pd.DataFrame(stages, columns=["label", "randomised_down_to", "spearman_with_trained"]).to_csv(folder / "sanity.csv", index=False, float_format="%.4f")
    for label in cfg.labels:
        final = [r for l, _, r in stages if l == label][-1]
        verdict = "the heatmaps depend on the learnt weights" if final < 0.5 else "WARNING: the heatmaps barely depend on the weights"
        say(f"Grad-CAM randomisation test ({label}): fully randomised stage correlates {final:.2f} with the trained model: {verdict}")
