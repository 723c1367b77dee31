"""The recorders a round's report goes to, each tested alone on real rounds made without Flower: the strategy pools
real replies, the server's held-out check and Grad-CAM check run on a real (small) model."""

from __future__ import annotations

import json
import shutil

import keras
import numpy as np
import pandas as pd
import pytest
from flwr.app import Error, Message, MessageType, RecordDict

from common import wire
from common.bin_floor import floor_intervals
from common.config import parse_run_config
from common.metrics import statistics, threshold_edge
from common.model import build_model
from common.partition import heldout_set
from server.evaluation import evaluate_heldout, gradcam_check, gradcam_sample
from server.recorders.gradcam import GradcamRecorder
from server.recorders.models import ModelsRecorder
from server.recorders.plots import PlotsRecorder
from server.recorders.progress import ProgressRecorder, sanity_verdict
from server.recorders.status import StatusRecorder
from server.recorders.tables import TablesRecorder
from server.rounds import Outcome, Recorder, RoundReport, RunInfo, record_round
from server.run_folder import FAILED, FINISHED, INTERRUPTED, RUNNING, mark_ended, read_status
from server.selection import LATEST, judge
from server.strategy import HospitalFedAvg

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def run(tmp_path):
    """A run's settings, folder, model and held-out set, as the round loop has them."""
    cfg = parse_run_config({"image-size": 16, "heldout-images": 24, "num-hospitals": 2, "gradcam-images": 8, "histogram-bins": 50, "output-dir": str(tmp_path)})
    folder = tmp_path / "run"
    folder.mkdir()
    keras.utils.set_random_seed(0)
    model = build_model(cfg.model, (16, 16, 1), 1, cfg.learning_rate)
    return cfg, folder, model, heldout_set(cfg)


def _reply(node: int, site: str, n: int, rng: np.random.Generator, kind=MessageType.EVALUATE) -> Message:
    labels = (np.arange(n) % 2).astype(np.uint8)[:, None]
    _, pos, neg = statistics(rng.normal(0, 2, (n, 1)) + 2 * labels, labels, 0.5, 50)
    intervals = [floor_intervals(pos[0], neg[0], 5, threshold_edge(50) + 1)]
    return Message(wire.pack_evaluate_reply(site, ("lesion",), n, intervals), reply_to=Message(RecordDict(), dst_node_id=node, message_type=kind))


def _report(run, rnd: int, best: bool = False, failing: bool = False) -> RoundReport:
    """Round rnd of the run, from two hospitals' real replies (one of them failing, if asked)."""
    cfg, folder, model, heldout = run
    strategy = HospitalFedAvg(cfg, [tuple(w.shape) for w in model.get_weights()], [w.trainable for w in model.weights])
    rng = np.random.default_rng(rnd)
    replies = [_reply(1, "hospital-0", 40, rng)]
    if failing:
        replies.append(Message(Error(0, "[site hospital-1] DataError: <data-root>/x.png: does not decode"), reply_to=Message(RecordDict(), dst_node_id=2, message_type=MessageType.EVALUATE)))
    else:
        replies.append(_reply(2, "hospital-1", 12, rng))
    if rnd:
        strategy.record.trained = {"hospital-0": 100, "hospital-1": 30}
        strategy.aggregate_evaluate(rnd, replies)
    held = evaluate_heldout(model, heldout, cfg, strategy.record.thresholds)
    rows = gradcam_sample(heldout, cfg)
    report = RoundReport(rnd, cfg, folder, strategy.record, held, heldout.labels, model, judge(strategy.record.row, rnd), best, heldout.take(rows), rows)
    if rnd:
        report.gradcam = gradcam_check(model, report.sample, held.logits[rows], np.array([0.5]), cfg, None)
    return report


def _outcome(status=FINISHED, reason="all 2 rounds", sanity=()) -> Outcome:
    return Outcome(status, reason, 2, 1, judge({"global_auc": 0.8}, 1), {"heldout_auc": 0.7}, list(sanity))


def test_the_tables_hold_every_round_once_and_say_what_was_not_available(run):
    cfg, folder, *_ = run
    tables = TablesRecorder(folder)
    tables.start(RunInfo(cfg, folder))
    zero = _report(run, 0)
    zero.overlap = [{"site": "hospital-0", "count": 2, "heldout_rows": "3 7"}]
    for report in (zero, _report(run, 1, best=True), _report(run, 2, failing=True)):
        tables.record(report)
    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2] and list(history.columns[:4]) == ["round", "global_auc", "global_auc_low", "global_auc_high"]
    assert history["n_failed"].tolist() == [0, 0, 1] and "hospital-1 (evaluate): client error: DataError" in history.loc[2, "failures"]
    assert history.loc[1, "selection_criterion"] == "pooled validation AUC" and bool(history.loc[1, "best"])
    sites = pd.read_csv(folder / "sites.csv")
    assert sorted(zip(sites["round"], sites["site"])) == [(1, "hospital-0"), (1, "hospital-1"), (2, "hospital-0")]
    small = sites[(sites["round"] == 1) & (sites["site"] == "hospital-1")].iloc[0]
    assert np.isnan(small["auc"]) and "AUC not available: its 12 validation images fit in one interval" in small["note"]
    assert pd.read_csv(folder / "overlap.csv").to_dict("records") == [{"site": "hospital-0", "count": 2, "heldout_rows": "3 7"}]
    assert (folder / "history.png").stat().st_size > 10_000


def test_the_status_says_running_then_each_round_then_how_the_run_ended(run):
    cfg, folder, *_ = run
    status = StatusRecorder(folder)
    status.start(RunInfo(cfg, folder))
    assert read_status(folder)["status"] == RUNNING and read_status(folder)["last_round"] == -1
    status.record(_report(run, 0))
    status.record(_report(run, 1, best=True))
    assert read_status(folder)["last_round"] == 1 and read_status(folder)["best_round"] == 1
    status.finish(_outcome(FAILED, "round 2: 1 valid training update(s), fewer than min-hospitals = 2"))
    assert read_status(folder) | {"updated": None, "started": None} == {
        "status": FAILED, "reason": "round 2: 1 valid training update(s), fewer than min-hospitals = 2", "last_round": 2,
        "num_rounds": cfg.num_server_rounds, "best_round": 1, "run_name": "run", "updated": None, "started": None,
    }  # fmt: skip


def test_a_launcher_marks_only_what_the_server_could_not_say(tmp_path):
    from server.run_folder import write_status

    assert mark_ended(tmp_path, FAILED, "crashed") is None  # no status: nothing to mark
    write_status(tmp_path, status=RUNNING)
    assert mark_ended(tmp_path, FAILED, "the ServerApp died")["status"] == FAILED
    assert mark_ended(tmp_path, FAILED, "again")["reason"] == "the ServerApp died"  # the first word stands
    assert mark_ended(tmp_path, INTERRUPTED, "Ctrl-C", replacing=(RUNNING, FAILED))["status"] == INTERRUPTED
    write_status(tmp_path, status=FINISHED, reason="all rounds")
    assert mark_ended(tmp_path, INTERRUPTED, "Ctrl-C", replacing=(RUNNING, FAILED))["status"] == FINISHED
    with pytest.raises(ValueError, match="status 'paused'"):
        write_status(tmp_path, status="paused")


def test_the_progress_line_says_round_k_of_n_each_failure_and_what_is_missing(run, capsys):
    progress = ProgressRecorder()
    progress.start(RunInfo(run[0], run[1]))
    progress.record(_report(run, 0))
    report = _report(run, 2, failing=True)
    report.record.asked, report.eta_seconds, report.warnings = 2, 75, ["hospital-1: 0.52 of the heatmap energy in the image border (threshold 0.4)"]
    progress.record(report)
    progress.finish(_outcome(FAILED, "round 2: too few updates", sanity=[("lesion", "logits", 0.9), ("lesion", "conv1", -0.56)]))
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"[fedimaging] run folder: {run[1]}" and out[1].startswith("[fedimaging] round 0/10  held-out AUC ")
    line = next(text for text in out if text.startswith("[fedimaging] round 2/10"))
    assert "pooled AUC " in line and "sites 2/2" in line and "FAILED 1" in line and "ETA 1m15s" in line and "border " in line
    assert "[fedimaging]   failed: hospital-1 (evaluate): client error: DataError: <data-root>/x.png: does not decode" in out
    assert "[fedimaging] GRAD-CAM WARNING round 2: hospital-1: 0.52 of the heatmap energy in the image border (threshold 0.4)" in out
    assert any("WARNING: |rho| 0.56 >= 0.5: the heatmaps barely depend on the weights" in text for text in out)  # the size, not the sign
    assert out[-1].startswith("[fedimaging] FAILED: round 2: too few updates; best model: round 1 by pooled validation AUC 0.800")


def test_the_randomisation_verdict_judges_the_size_of_the_correlation():
    assert "depend on the learnt weights" in sanity_verdict("x", 0.1) and "depend on the learnt weights" in sanity_verdict("x", -0.3)
    assert "barely depend" in sanity_verdict("x", -0.56) and "barely depend" in sanity_verdict("x", 0.7)


def test_the_models_are_the_last_every_round_and_the_best_when_it_is_best(run):
    folder = run[1]
    models = ModelsRecorder(folder)
    models.record(_report(run, 0))
    assert not list(folder.glob("*.keras"))  # the initial model is no result
    models.record(_report(run, 1, best=False))
    assert (folder / "model_last.keras").is_file() and not (folder / "model_best.keras").exists()
    models.record(_report(run, 2, best=True))
    assert keras.models.load_model(folder / "model_best.keras").output_shape == (None, 1)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # written beside and renamed


def test_the_plots_draw_every_round_and_copy_the_best(run):
    folder = run[1]
    plots = PlotsRecorder(folder)
    plots.record(_report(run, 1, best=True))
    plots.record(_report(run, 2, failing=True))
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["round_001.png", "round_002.png"]
    assert (folder / "best_model.png").read_bytes() == (folder / "plots" / "round_001.png").read_bytes()


def test_the_gradcam_pictures_and_the_sanity_table(run):
    folder = run[1]
    pictures = GradcamRecorder(folder)
    report = _report(run, 1)
    pictures.record(report)
    grid = folder / "gradcam" / "round_001" / "grid.png"
    assert grid.is_file() and len(list(grid.parent.glob("*_0*.png"))) == len(report.gradcam.cases)
    pictures.finish(_outcome(sanity=[("lesion", "logits", 0.9), ("lesion", "conv1", 0.05)]))
    assert pd.read_csv(folder / "gradcam" / "sanity.csv")["randomised_down_to"].tolist() == ["logits", "conv1"]


def test_the_recorders_see_each_round_in_order_with_the_time_spent_so_far(run):
    seen = []

    class Spy(Recorder):
        def __init__(self, name):
            self.name = name

        def record(self, report):
            seen.append((self.name, report.round, report.phases["seconds_record"]))

    report = _report(run, 1)
    record_round([Spy("a"), Spy("b")], report)
    assert [(name, rnd) for name, rnd, _ in seen] == [("a", 1), ("b", 1)] and seen[0][2] <= seen[1][2]
    assert report.seconds >= seen[1][2]


def test_a_round_without_any_validation_is_judged_as_the_latest_model():
    assert judge({}, 3).criterion == LATEST and judge({"global_auc": float("nan"), "global_log_loss": 0.4}, 3).criterion == "pooled validation log loss"
    assert judge({"global_auc": 0.7}, 1).beats(judge({"global_log_loss": 0.1}, 2))  # a round judged by AUC beats any judged by log loss
    assert judge({"global_log_loss": 0.2}, 2).beats(judge({"global_log_loss": 0.3}, 1)) and judge({}, 4).beats(judge({}, 3))
    assert json.dumps(judge({"global_auc": 0.9}, 1).describe()) == '"pooled validation AUC 0.900"'


def test_mlflow_goes_on_in_the_same_run_after_a_resume_and_a_lost_store_costs_records_not_the_run(run, tmp_path, capsys, monkeypatch):
    from mlflow import MlflowClient

    from server.recorders.mlflow_tracking import MlflowRecorder

    cfg, folder, *_ = run
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    uri = (tmp_path / "mlruns").as_uri()
    first = MlflowRecorder(folder, uri, "tests")
    first.start(RunInfo(cfg, folder))
    for rnd in (0, 1):
        first.record(_report(run, rnd))
    first.finish(_outcome(FAILED, "the server stopped"))  # a crash after round 1, then a resume after it
    again = MlflowRecorder(folder, uri, "tests")
    again.start(RunInfo(cfg, folder, resumed=1))
    assert again.run_id == first.run_id
    again.record(_report(run, 2))
    again.finish(_outcome())
    client = MlflowClient(tracking_uri=uri)
    recorded = client.get_run(first.run_id)
    assert recorded.info.status == "FINISHED" and recorded.data.params["image-size"] == "16"
    assert [m.step for m in client.get_metric_history(first.run_id, "heldout/auc")] == [0, 1, 2]
    assert sorted(m.step for m in client.get_metric_history(first.run_id, "hospital/hospital-0/n_val")) == [1, 2]

    lost = MlflowRecorder(folder, (tmp_path / "gone").as_uri(), "tests")
    lost.start(RunInfo(cfg, folder))
    shutil.rmtree(tmp_path / "gone")  # the store vanishes mid-run
    lost.record(_report(run, 1))
    lost.finish(_outcome())
    out = capsys.readouterr().out
    assert "MLflow: round 1 not recorded at" in out and "MLflow: 2 record(s) missing" in out
