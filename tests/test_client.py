"""The ClientApp, called as Flower calls it: what it trains, and exactly what leaves the hospital."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

from client.app import app
from common import wire
from common.config import ConfigError, config_to_dict
from common.model import build_model
from common.partition import hospital_data

pytestmark = pytest.mark.usefixtures("task_identity")


def _call(kind: str, weights, cfg, hospital: int = 1) -> Message:
    """Send one message to the ClientApp and return its reply."""
    context = Context(
        run_id=1, node_id=10 + hospital, node_config={"partition-id": hospital, "num-partitions": cfg.num_hospitals},
        state=RecordDict(), run_config=config_to_dict(cfg),
    )  # fmt: skip
    content = RecordDict({wire.ARRAYS: ArrayRecord(weights), "config": ConfigRecord({"server-round": 1})})
    return app(Message(content=content, dst_node_id=10 + hospital, message_type=kind), context)


def test_train_changes_the_weights_and_reports_images_not_batches(small_cfg):
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    reply = _call(MessageType.TRAIN, weights, small_cfg)
    assert not reply.has_error()
    parsed = wire.parse_train_reply(reply.content, [w.shape for w in weights])
    train, _ = hospital_data(small_cfg, 1)
    assert parsed.site == "hospital-1" and parsed.num_examples == len(train) and np.isfinite(parsed.train_loss)
    assert any(not np.allclose(a, b) for a, b in zip(weights, parsed.weights))


def test_only_weights_counts_and_histograms_leave_a_hospital(small_cfg):
    """Capture every reply a client sends and check it holds nothing that is an image or a per-patient output."""
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    train_set, val_set = hospital_data(small_cfg, 1)
    replies = {kind: _call(kind, weights, small_cfg) for kind in (MessageType.TRAIN, MessageType.EVALUATE)}

    train = replies[MessageType.TRAIN].content
    assert set(train.keys()) == {wire.ARRAYS, wire.METRICS, wire.SITE}
    assert [a.shape for a in train[wire.ARRAYS].to_numpy_ndarrays()] == [w.shape for w in weights]  # model-shaped only
    assert set(train[wire.METRICS].keys()) == wire.TRAIN_METRIC_KEYS
    assert dict(train[wire.SITE]) == {wire.SITE_NAME: "hospital-1"}

    evaluate = replies[MessageType.EVALUATE].content
    assert set(evaluate.keys()) == {wire.METRICS, wire.SITE}
    metrics = evaluate[wire.METRICS]
    assert set(metrics.keys()) == wire.EVALUATE_METRIC_KEYS
    assert metrics[wire.NUM_EXAMPLES] == len(val_set)
    # aggregate counts only: the histograms are as long as the run's bins, whatever the number of patients
    assert len(metrics[wire.HIST_POS]) == len(metrics[wire.HIST_NEG]) == small_cfg.histogram_bins
    assert all(isinstance(v, int) for v in metrics[wire.HIST_POS] + metrics[wire.HIST_NEG] + metrics[wire.CONFUSION])
    assert sum(metrics[wire.HIST_POS]) + sum(metrics[wire.HIST_NEG]) == len(val_set)

    # no image's pixels anywhere in what was sent
    sent = np.concatenate([a.reshape(-1) for a in train[wire.ARRAYS].to_numpy_ndarrays()])
    image_rows = {np.round(img.reshape(-1)[:16], 6).tobytes() for img in np.concatenate([train_set.images, val_set.images])}
    windows = {np.round(sent[i : i + 16], 6).astype(np.float32).tobytes() for i in range(0, len(sent) - 16)}
    assert not image_rows & windows


def test_a_hospital_outside_the_federation_is_a_clear_error(small_cfg):
    weights = build_model(small_cfg.model, (32, 32, 1), 1, small_cfg.learning_rate).get_weights()
    with pytest.raises(ConfigError, match="hospital 7 does not exist: run setting 'num-hospitals' = 3"):
        _call(MessageType.TRAIN, weights, small_cfg, hospital=7)
