"""The strategy validates each reply: a broken, failed or missing one is recorded by site and left out, never fatal."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, MetricRecord, RecordDict

from common import wire
from common.config import parse_run_config
from sklearn.metrics import roc_auc_score

from common.bin_floor import floor_intervals
from common.metrics import auc_from_histograms, statistics, threshold_edge
from server.messaging import Exchange
from server.strategy import HospitalFedAvg

SHAPES = [(3, 2), (2,)]
LABELS = ("lesion",)
pytestmark = pytest.mark.usefixtures("task_identity")


def _request(node_id: int, kind: str) -> Message:
    return Message(content=RecordDict(), dst_node_id=node_id, message_type=kind)


def _train_reply(node_id: int, site: str, value: float, n: int) -> Message:
    weights = [np.full(s, value, np.float32) for s in SHAPES]
    return Message(wire.pack_train_reply(site, LABELS, weights, n, 0.5), reply_to=_request(node_id, MessageType.TRAIN))


def _strategy(**settings) -> HospitalFedAvg:
    cfg = parse_run_config({"num-hospitals": 4, "min-hospitals": 2, "histogram-bins": 50, **settings})
    strategy = HospitalFedAvg(cfg, SHAPES, [True, False])  # the second array stands for batch-norm statistics
    strategy.current = [np.ones(s, np.float32) for s in SHAPES]  # the global model sent out
    return strategy


def test_weights_are_averaged_by_image_count_and_bad_replies_are_recorded_by_site():
    strategy = _strategy()
    strategy.sites[3] = "hospital-c"  # learnt from an earlier round
    broken = RecordDict({wire.ARRAYS: ArrayRecord([np.ones((9,), np.float32)]), **{k: v for k, v in wire.pack_train_reply("hospital-c", LABELS, [np.ones(s, np.float32) for s in SHAPES], 5, 0.1).items() if k != wire.ARRAYS}})
    replies = [
        _train_reply(1, "hospital-a", 1.0, 100),
        _train_reply(2, "hospital-b", 4.0, 300),
        Message(broken, reply_to=_request(3, MessageType.TRAIN)),
    ]
    asked = {f"message-{n}": n for n in (1, 2, 3, 4)}
    arrays, metrics = strategy.aggregate_train(1, Exchange(asked, replies, {"message-4": 4}, 600.0))  # node 4 never replies
    assert np.allclose(arrays.to_numpy_ndarrays()[0], (1.0 * 100 + 4.0 * 300) / 400)
    assert metrics[wire.NUM_EXAMPLES] == 400
    assert strategy.record.trained == {"hospital-a": 100, "hospital-b": 300}
    assert strategy.record.n_rejected == 1
    failures = strategy.record.failures
    assert len(failures) == 2
    assert failures[0].startswith("hospital-c (train): invalid reply: weights have shapes [(9,)]")
    assert failures[1] == "node 4 (train): timed out after 600 s (round-timeout)"


def test_fedadam_steps_trainable_weights_towards_the_mean_and_takes_the_mean_for_statistics():
    strategy = _strategy(aggregation="fedadam", **{"server-learning-rate": 0.1, "max-update-norm": 0})
    strategy.current = [np.zeros(s, np.float32) for s in SHAPES]
    replies = [_train_reply(1, "hospital-a", 1.0, 100), _train_reply(2, "hospital-b", 4.0, 300)]
    first = strategy.aggregate_train(1, replies)[0].to_numpy_ndarrays()
    mean, tau = 3.25, 1e-3
    m, v = 0.1 * mean, 0.99 * tau**2 + 0.01 * mean**2
    assert np.allclose(first[0], 0.1 * m / (np.sqrt(v) + tau), rtol=1e-5)  # Adam's step along mean - global
    assert 0 < first[0][0, 0] < mean
    assert np.allclose(first[1], mean)  # not trainable: the hospitals' mean as FedAvg takes it
    strategy.current = first  # the second round keeps the moments of the first
    second = strategy.aggregate_train(2, replies)[0].to_numpy_ndarrays()
    assert first[0][0, 0] < second[0][0, 0] < mean


def test_client_errors_and_non_finite_weights_are_left_out_and_below_min_hospitals_the_model_is_kept():
    strategy = _strategy()
    nan_reply = _train_reply(2, "hospital-b", float("nan"), 10)
    error_reply = Message(Error(code=0, reason="out of memory"), reply_to=_request(3, MessageType.TRAIN))
    arrays, _ = strategy.aggregate_train(1, [_train_reply(1, "hospital-a", 1.0, 10), nan_reply, error_reply])
    assert arrays is None  # one valid reply < min-hospitals 2: keep the global model
    reasons = " | ".join(strategy.record.failures)
    assert "non-finite" in reasons and "client error: out of memory" in reasons


def _evaluate_reply(node_id: int, site: str, logits, labels, floor: int = 5, names=LABELS) -> Message:
    _, pos, neg = statistics(logits, labels, 0.5, 50)
    intervals = [floor_intervals(pos[j], neg[j], floor, threshold_edge(50) + 1) for j in range(len(names))]
    return Message(wire.pack_evaluate_reply(site, names, len(labels), intervals), reply_to=_request(node_id, MessageType.EVALUATE))


def _sites(seed: int, sizes) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    sites = []
    for n, prevalence in sizes:
        labels = (rng.random(n) < prevalence).astype(np.uint8)[:, None]
        sites.append((rng.normal(0, 1, (n, 1)).astype(np.float32) + 1.5 * labels, labels))
    return sites


def test_evaluate_replies_are_pooled_from_the_sites_bins_not_by_averaging_aucs():
    sites = _sites(0, ((30, 0.2), (400, 0.5), (90, 0.8)))
    strategy = _strategy(**{"min-bin-images": 1})  # a floor of one image: every fine bin goes out as it is
    metrics = strategy.aggregate_evaluate(1, [_evaluate_reply(i + 1, f"s{i}", z, y, floor=1) for i, (z, y) in enumerate(sites)])
    _, pos, neg = statistics(np.concatenate([z for z, _ in sites]), np.concatenate([y for _, y in sites]), 0.5, 50)
    assert metrics["global_auc"] == pytest.approx(auc_from_histograms(pos[0], neg[0]))
    record = strategy.record
    assert record.n_val == 520 and record.evaluated == ["s0", "s1", "s2"]
    site_aucs = [site["auc"] for site in record.sites]
    assert record.row["worst_site_auc"] == min(site_aucs) and record.row["worst_site"] == f"s{int(np.argmin(site_aucs))}"
    assert record.row["mean_site_auc"] == pytest.approx(np.average(site_aucs, weights=[30, 400, 90]))
    assert 0 < record.row["threshold_at_target_sensitivity"] < 1 and record.thresholds.shape == (1,)
    assert record.row["global_auc_low"] <= record.row["global_auc"] <= record.row["global_auc_high"]


def test_small_sites_count_in_every_pooled_figure_within_the_bounds_their_bins_allow():
    sites = _sites(1, ((200, 0.5), (13, 0.5), (12, 0.5), (15, 0.5)))
    strategy = _strategy()  # the default floor: 5 images
    strategy.aggregate_evaluate(1, [_evaluate_reply(i + 1, f"s{i}", z, y) for i, (z, y) in enumerate(sites)])
    record = strategy.record
    z, y = np.concatenate([z for z, _ in sites])[:, 0], np.concatenate([y for _, y in sites])[:, 0]
    exact = roc_auc_score(y, z)
    assert record.n_val == 240 and record.row["global_auc_low"] <= exact <= record.row["global_auc_high"]
    assert abs(record.row["global_auc"] - exact) < 0.02
    called = z >= 0  # the run's threshold; exact where a site's intervals split there, estimated where they could not
    assert abs(record.row["global_sensitivity"] - (called & (y == 1)).sum() / y.sum()) < 0.03
    assert all(site["n_val"] for site in record.sites) and len(record.sites) == 4


def test_a_reply_for_other_labels_is_rejected_and_counted():
    strategy = _strategy()
    labels = np.array([[0], [1]], np.uint8)
    good = _evaluate_reply(1, "a", np.array([[0.1], [0.2]], np.float32), labels)
    other = _evaluate_reply(2, "b", np.array([[0.1], [0.2]], np.float32), labels, names=("pneumonia",))
    strategy.aggregate_evaluate(1, [good, other])
    assert strategy.record.evaluated == ["a"] and strategy.record.n_rejected == 1
    assert "labels ['pneumonia'] do not match the run's ['lesion']" in strategy.record.failures[0]


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda m: m.__setitem__(wire.HIST_STARTS, [1] + m[wire.HIST_STARTS][1:]), "do not tile the run's 50 bins"),
        (lambda m: m.__setitem__(wire.HIST_POS, [-1] + m[wire.HIST_POS][1:]), "hist-pos: expected"),
        (lambda m: m.__setitem__(wire.HIST_POS, [v + 0.5 for v in m[wire.HIST_POS]]), "hist-pos: expected"),
        (lambda m: m.__setitem__(wire.HIST_NEG, m[wire.HIST_NEG][:-1]), "hist-neg: expected"),
        (lambda m: m.__setitem__(wire.NUM_EXAMPLES, 999), "disagree with num-examples = 999"),
        (lambda m: m.__setitem__("patient-scores", [0.1, 0.9]), "metrics keys"),
    ],
)
def test_inconsistent_evaluate_replies_are_rejected_with_the_reason(tamper, reason):
    labels = np.array([[0], [1], [1], [0], [1], [0]], np.uint8)
    reply = _evaluate_reply(1, "s", np.array([[0.1], [2.0], [-1.0], [0.3], [3.0], [-2.0]], np.float32), labels, floor=1)
    tamper(reply.content[wire.METRICS])
    with pytest.raises(wire.ReplyError, match=reason):
        wire.parse_evaluate_reply(reply.content, LABELS, 50, 1)


def test_a_reply_that_breaks_the_histogram_floor_is_refused_not_used():
    labels = np.array([[0], [1], [1], [0], [1], [0]], np.uint8)
    fine = _evaluate_reply(1, "s", np.array([[0.1], [2.0], [-1.0], [0.3], [3.0], [-2.0]], np.float32), labels, floor=1)
    with pytest.raises(wire.ReplyError, match="below the run's min-bin-images = 5: the hospital's software does not apply the histogram floor"):
        wire.parse_evaluate_reply(fine.content, LABELS, 50, 5)


def test_a_hospitals_error_is_recorded_once_under_its_name_in_one_line():
    strategy = _strategy()
    ours = Message(Error(code=0, reason="[site hospital-c] DataError: <data-root>/x.png: does not decode"), reply_to=_request(3, MessageType.TRAIN))
    ray = "<class 'flwr.clientapp.client_app.ClientAppException'>:<'\nException ClientAppException occurred. Message: \nTraceback (most recent call last):\n  File \"x\"\nValueError: bad'>"
    wrapped = Message(Error(code=0, reason=ray), reply_to=_request(4, MessageType.TRAIN))
    replies = [_train_reply(1, "hospital-a", 1.0, 10), _train_reply(2, "hospital-b", 1.0, 10), ours, ours, wrapped]
    strategy.aggregate_train(1, replies)
    assert strategy.record.failures == [
        "hospital-c (train): client error: DataError: <data-root>/x.png: does not decode",
        "node 4 (train): client error: ValueError: bad",
    ]
    assert strategy.sites[3] == "hospital-c"


def test_a_reply_without_a_site_name_is_rejected():
    content = wire.pack_train_reply("x", LABELS, [np.ones(s, np.float32) for s in SHAPES], 3, 0.2)
    del content[wire.SITE]
    content[wire.SITE] = ConfigRecord({"other": "x"})
    with pytest.raises(wire.ReplyError, match="no site name"):
        wire.parse_train_reply(content, SHAPES, LABELS)
    site = ConfigRecord({wire.SITE_NAME: "x", wire.SITE_LABELS: list(LABELS)})
    content = RecordDict({wire.METRICS: MetricRecord({wire.NUM_EXAMPLES: 0, wire.TRAIN_LOSS: 0.1, wire.SKIPPED: 0, wire.NOT_IMAGES: 0}), wire.SITE: site})
    with pytest.raises(wire.ReplyError, match="expected a positive number of images"):
        wire.parse_train_reply(content, SHAPES, LABELS)


def test_fedadam_forgets_the_step_towards_a_model_that_is_kept_out():
    from server.aggregation import ServerAdam

    adam = ServerAdam(0.1, [True])
    current = [np.zeros(3)]
    adam.step(current, [np.ones(3)])
    m, v = [a.copy() for a in adam.m], [a.copy() for a in adam.v]
    adam.step(current, [np.full(3, 1e150)])  # a step towards a broken mean
    adam.undo()
    assert np.array_equal(adam.m[0], m[0]) and np.array_equal(adam.v[0], v[0])  # as if the broken round never came


def test_fedavgm_steps_by_its_momentum_and_forgets_a_step_kept_out():
    from server.aggregation import ServerMomentum

    momentum = ServerMomentum(0.5, [True, False])  # a weight and a batch-normalisation statistic
    current = [np.zeros(2), np.ones(2)]
    first = momentum.step(current, [np.full(2, 2.0), np.full(2, 3.0)])  # m = 2; w = 0 + 0.5 * 2
    assert first[0].tolist() == [1.0, 1.0] and first[1].tolist() == [3.0, 3.0]  # the statistic takes the mean
    second = momentum.step(first, [np.full(2, 0.0), np.full(2, 3.0)])  # a swing back: m = 0.5 * 2 + (0 - 1) = 0
    assert second[0].tolist() == [1.0, 1.0]  # damped: FedAvg would have gone back to 0
    third = momentum.step(second, [np.full(2, 1.0), np.full(2, 3.0)])  # steady: m = 0.5 * 0 + 0 = 0
    assert third[0].tolist() == [1.0, 1.0]
    kept = [a.copy() for a in momentum.m]
    momentum.step(third, [np.full(2, 1e150), np.full(2, 3.0)])  # a step towards a broken mean
    momentum.undo()
    assert all(np.array_equal(a, b) for a, b in zip(momentum.m, kept))  # as if the broken round never came
