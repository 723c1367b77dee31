"""The ClientApp, called as Flower calls it: what it trains, and exactly what leaves the hospital."""

from __future__ import annotations

import contextlib
import dataclasses
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from common.deployment import WORKER_SOCKET
from client.worker import SOCKET_FILE, WorkerError, call
from common import wire
from common.config import config_to_dict
from common.model import build_model
from common.partition import hospital_data

pytestmark = pytest.mark.usefixtures("task_identity")


def _call(kind: str, weights, cfg, hospital: int = 1, run_folder=None, worker_socket: str = "", content: RecordDict | None = None) -> Message:
    """Send one message to the ClientApp and return its reply."""
    node_config = {"partition-id": hospital, "num-partitions": cfg.num_hospitals} | ({WORKER_SOCKET: worker_socket} if worker_socket else {})
    context = Context(run_id=1, node_id=10 + hospital, node_config=node_config, state=RecordDict(), run_config=config_to_dict(cfg))
    config = {"server-round": 1} | ({wire.RUN_FOLDER: str(run_folder)} if run_folder else {})
    content = content if content is not None else RecordDict({wire.ARRAYS: ArrayRecord(weights), "config": ConfigRecord(config)})
    return app(Message(content=content, dst_node_id=10 + hospital, message_type=kind), context)


def _interval_sizes(metrics) -> np.ndarray:
    """The number of images in each score interval an evaluate reply reports."""
    return np.asarray(metrics[wire.HIST_POS]) + np.asarray(metrics[wire.HIST_NEG])


def test_train_changes_the_weights_and_reports_images_not_batches(small_cfg):
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    reply = _call(MessageType.TRAIN, weights, small_cfg)
    assert not reply.has_error()
    parsed = wire.parse_train_reply(reply.content, [w.shape for w in weights], small_cfg.labels)
    train, _ = hospital_data(small_cfg, 1)
    assert parsed.site == "hospital-1" and parsed.num_examples == len(train) and np.isfinite(parsed.train_loss)
    assert any(not np.allclose(a, b) for a, b in zip(weights, parsed.weights))


def test_only_weights_counts_and_floored_intervals_leave_a_hospital(small_cfg):
    """Capture every reply a client sends and check it holds only weights, the site's name and labels, image counts,
    the loss, score intervals that keep the histogram floor, and the overlap count: no image, no array the size of an
    image, no per-patient score or label. This test is meant to fail when a later change makes a client send more."""
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    train_set, val_set = hospital_data(small_cfg, 1)
    replies = {kind: _call(kind, weights, small_cfg) for kind in (MessageType.TRAIN, MessageType.EVALUATE)}
    image_size = int(np.prod(train_set.images.shape[1:]))

    train = replies[MessageType.TRAIN].content
    assert set(train.keys()) == {wire.ARRAYS, wire.METRICS, wire.SITE}
    sent_arrays = train[wire.ARRAYS].to_numpy_ndarrays()
    assert [a.shape for a in sent_arrays] == [w.shape for w in weights]  # model-shaped only
    assert all(a.size != image_size for a in sent_arrays)
    assert set(train[wire.METRICS].keys()) == wire.TRAIN_METRIC_KEYS
    assert isinstance(train[wire.METRICS][wire.NUM_EXAMPLES], int) and isinstance(train[wire.METRICS][wire.TRAIN_LOSS], float)
    assert train[wire.METRICS][wire.SKIPPED] == 0 and train[wire.METRICS][wire.NOT_IMAGES] == 0  # counts only

    evaluate = replies[MessageType.EVALUATE].content
    assert set(evaluate.keys()) == {wire.METRICS, wire.SITE}
    metrics = evaluate[wire.METRICS]
    assert set(metrics.keys()) == wire.EVALUATE_METRIC_KEYS
    assert metrics[wire.NUM_EXAMPLES] == len(val_set)
    assert all(isinstance(v, int) for key in wire.EVALUATE_METRIC_KEYS - {wire.NUM_EXAMPLES} for v in metrics[key])
    sizes = _interval_sizes(metrics)
    assert sizes.sum() == len(val_set)
    # the floor, as sent: every interval holds no image or at least min-bin-images of them (one interval over every
    # bin says only how many positives and negatives there are)
    assert len(sizes) == 1 or ((sizes == 0) | (sizes >= small_cfg.min_bin_images)).all()
    assert (sizes > 0).sum() <= len(val_set) // small_cfg.min_bin_images  # far fewer numbers than patients

    query = wire.pack_overlap_query(b"k" * 32, [str(d) for d in val_set.digest[:3]] + ["0" * 64], which=True)
    overlap = _call(MessageType.QUERY, None, small_cfg, content=query).content
    assert set(overlap.keys()) == {wire.METRICS, wire.SITE}
    assert dict(overlap[wire.METRICS]) == {wire.OVERLAP_COUNT: 3, wire.OVERLAP_ROWS: [0, 1, 2]}  # the server's own images, by position

    for content in (train, evaluate, overlap):
        assert dict(content[wire.SITE]) == {wire.SITE_NAME: "hospital-1", wire.SITE_LABELS: list(small_cfg.labels)}

    # no image's pixels anywhere in what was sent
    sent = np.concatenate([a.reshape(-1) for a in sent_arrays])
    image_rows = {np.round(img.reshape(-1)[:16], 6).tobytes() for img in np.concatenate([train_set.images, val_set.images])}
    windows = {np.round(sent[i : i + 16], 6).astype(np.float32).tobytes() for i in range(0, len(sent) - 16)}
    assert not image_rows & windows


def test_a_small_site_sends_what_the_floor_allows_and_keeps_its_exact_report(small_cfg, tmp_path):
    cfg = dataclasses.replace(small_cfg, min_bin_images=1000)  # more than the site's images: one interval over every bin
    weights = build_model(cfg.model, (32, 32, 1), 1, cfg.learning_rate).get_weights()
    reply = _call(MessageType.EVALUATE, weights, cfg, run_folder=tmp_path)
    metrics = reply.content[wire.METRICS]
    assert metrics[wire.HIST_INTERVALS] == [1] and metrics[wire.HIST_STARTS] == [0]
    _, val = hospital_data(cfg, 1)
    assert metrics[wire.HIST_POS] == [int(val.labels.sum())] and metrics[wire.HIST_NEG] == [int((val.labels == 0).sum())]
    report = pd.read_csv(tmp_path / "hospitals" / "hospital-1" / "report.csv")
    assert report["round"].tolist() == [1] and report["n_val"].tolist() == [metrics[wire.NUM_EXAMPLES]]
    assert report["auc"].between(0, 1).all() and {"sensitivity", "specificity"} <= set(report.columns)  # exact, kept at home


def test_a_hospital_that_fails_answers_in_one_line_naming_itself(small_cfg, tmp_path):
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    reply = _call(MessageType.TRAIN, weights, small_cfg, hospital=7, run_folder=tmp_path)
    assert reply.has_error()
    assert reply.error.reason == "[site hospital-7] ConfigError: hospital 7 does not exist: run setting 'num-hospitals' = 3"
    assert wire.parse_error(reply.error.reason) == ("hospital-7", "ConfigError: hospital 7 does not exist: run setting 'num-hospitals' = 3")
    from common.audit import read_audit

    assert read_audit(tmp_path / "hospitals" / "hospital-7")[0]["error"] == reply.error.reason  # what left is in its audit log


def test_every_reply_is_in_the_hospitals_audit_log_with_the_hash_the_server_computes(small_cfg, tmp_path):
    from common.audit import read_audit

    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    replies = [_call(kind, weights, small_cfg, run_folder=tmp_path) for kind in (MessageType.TRAIN, MessageType.EVALUATE)]
    entries = read_audit(tmp_path / "hospitals" / "hospital-1")
    assert [e["type"] for e in entries] == [MessageType.TRAIN, MessageType.EVALUATE] and all(e["round"] == 1 for e in entries)
    for entry, reply in zip(entries, replies):
        assert entry["sha256"] == wire.payload_digest(reply.content) and entry["site"] == "hospital-1"
    train = entries[0]
    assert [a["shape"] for a in train["arrays"]] == [list(w.shape) for w in weights]  # weights only
    for array, w in zip(train["arrays"], weights):  # the serialised array: its values and a .npy header, nothing more
        assert w.nbytes < array["bytes"] <= w.nbytes + 256
    assert train["values"]["metrics.skipped-files"] == 0 and entries[1]["arrays"] == []
    evaluate = replies[1].content[wire.METRICS]
    assert entries[1]["values"]["metrics.hist-pos"] == f"{len(evaluate[wire.HIST_POS])} values"  # how many numbers, not the numbers


@pytest.fixture
def site_file(small_cfg, tmp_path):
    """Hospital 1 of the small run written as a site on disk: class folders and a site file."""
    from common.demo_sites import write_demo_sites

    return write_demo_sites(small_cfg, tmp_path / "sites")[1]


@pytest.fixture
def worker(tmp_path, site_file):
    """A hospital's worker running in its own process for that site, as client.supernode starts it; stopped afterwards."""
    folder = tmp_path / "worker"
    folder.mkdir(mode=0o700)  # client.supernode makes it
    process = subprocess.Popen([sys.executable, "-m", "client.worker", "--folder", str(folder), "--site", str(site_file)])
    deadline = time.monotonic() + 120
    while not (folder / SOCKET_FILE).exists():
        assert process.poll() is None and time.monotonic() < deadline, "the worker did not start"
        time.sleep(0.2)
    yield folder / SOCKET_FILE
    process.terminate()
    process.wait(20)


def test_through_the_worker_the_replies_are_the_hospitals_own_and_audited_by_it(small_cfg, worker, site_file, tmp_path):
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    for round_ in (1, 2):  # the worker keeps the site and model between messages
        # the caller names another hospital and a run folder: the worker answers for its own site file only
        train = _call(MessageType.TRAIN, weights, small_cfg, hospital=2, run_folder=tmp_path / "elsewhere", worker_socket=str(worker))
        assert not train.has_error(), train.error
        parsed = wire.parse_train_reply(train.content, [w.shape for w in weights], small_cfg.labels)
        assert parsed.site == "hospital-1" and parsed.num_examples > 0
        evaluate = _call(MessageType.EVALUATE, weights, small_cfg, worker_socket=str(worker))
        assert set(evaluate.content[wire.METRICS].keys()) == wire.EVALUATE_METRIC_KEYS
    from common.audit import read_audit

    entries = read_audit(site_file.parent / "reports" / "hospital-1")  # written by the worker, in the site's report-dir
    assert [e["type"] for e in entries] == ["train", "evaluate"] * 2 and not (tmp_path / "elsewhere").exists()


def test_the_worker_refuses_strangers_never_unpickles_and_its_refusals_reach_the_caller_in_words(small_cfg, worker, tmp_path):
    import multiprocessing.connection as mpc
    import pickle

    with pytest.raises(mpc.AuthenticationError):
        mpc.Client(str(worker), family="AF_UNIX", authkey=b"not the key")
    assert oct(worker.parent.stat().st_mode & 0o777) == "0o700" and oct((worker.parent / "worker.key").stat().st_mode & 0o777) == "0o600"
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    ok, said = call(str(worker), "predict", config_to_dict(small_cfg), weights, {})
    assert not ok and said == "[site hospital-1] ValueError: unknown request 'predict': expected one of train, score, overlap"
    key = (worker.parent / "worker.key").read_bytes()
    with mpc.Client(str(worker), family="AF_UNIX", authkey=key) as connection:
        connection.send_bytes(b'{"protocol": 0, "kind": "train", "run_config": {}}')  # a ClientApp of another fedimaging version
        with contextlib.suppress(BrokenPipeError):  # the worker may have answered the first frame and hung up already
            connection.send_bytes(b"")
        assert "install the same fedimaging version" in connection.recv_bytes().decode()
    marker = tmp_path / "pickle-ran"
    evil = pickle.dumps(type("Evil", (), {"__reduce__": lambda self: (open, (str(marker), "w"))})())
    with mpc.Client(str(worker), family="AF_UNIX", authkey=key) as connection:
        connection.send(evil)  # a pickle, as a rogue ClientApp holding the key might send
        with contextlib.suppress(BrokenPipeError):
            connection.send_bytes(b"")
        assert "does not decode" in connection.recv_bytes().decode()
    assert not marker.exists()  # nothing the caller sent was unpickled
    with pytest.raises(WorkerError, match="does not answer"):
        call(str(tmp_path / "gone" / SOCKET_FILE), "train", config_to_dict(small_cfg), weights, {})


def test_a_process_keeps_only_the_sites_that_fit_its_cache(small_cfg, monkeypatch):
    from client import training

    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    one_site = 40 * 32 * 32 * 4  # a hospital's 40 images at the model's input size
    monkeypatch.setattr(training, "_sites", training.OrderedDict())
    monkeypatch.setattr(training, "SITE_CACHE_BYTES", int(1.5 * one_site))
    for hospital in (0, 1, 2, 1):
        _call(MessageType.EVALUATE, weights, small_cfg, hospital=hospital)
    kept = [dict(node)["partition-id"] for _, node in training._sites]
    assert kept == [1]  # the federation's other hospitals were let go; the one just served stays
    monkeypatch.setattr(training, "SITE_CACHE_BYTES", 10 * one_site)
    for hospital in (0, 2):
        _call(MessageType.EVALUATE, weights, small_cfg, hospital=hospital)
    assert [dict(node)["partition-id"] for _, node in training._sites] == [1, 0, 2]


def test_the_hospital_stops_when_any_of_its_processes_ends_even_with_code_0(tmp_path, capsys):
    from client.supernode import stop_all, supervise

    socket_path = tmp_path / SOCKET_FILE
    socket_path.touch()
    for name, code in (("training worker", 3), ("SuperNode", 0)):  # a SuperNode whose registration is refused exits 0
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        ending = subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])
        try:
            assert supervise({"other": sleeper, name: ending}, socket_path) == 1
        finally:
            stop_all([sleeper, ending])
        assert sleeper.returncode is not None and f"the {name} stopped (code {code})" in capsys.readouterr().err
    node = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    socket_path.unlink()  # as a /tmp cleaner would
    try:
        assert supervise({"SuperNode": node, "training worker": worker}, socket_path) == 1
    finally:
        stop_all([node, worker])
    assert "is gone" in capsys.readouterr().err
