"""The CNNs: shapes, logits out, the named last convolution, initial weights from a file."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common.config import parse_run_config
from common.model import (
    LAST_CONV, build_model, class_weights, load_initial_weights, log_prior_odds, reset_optimizer, round_learning_rate, set_anchor,
    set_class_weights, weigh_classes,
)


@pytest.mark.parametrize("name", ["lightcnn", "lightcnn-gn", "seedcnn"])
@pytest.mark.parametrize("n_labels", [1, 3])
def test_one_logit_per_label_and_a_named_last_convolution(name, n_labels):
    model = build_model(name, (32, 32, 1), n_labels, 1e-3)
    out = model.predict(np.random.default_rng(0).random((4, 32, 32, 1), np.float32), verbose=0)
    assert out.shape == (4, n_labels)
    assert model.layers[-1].get_config().get("activation", "linear") == "linear"  # logits, not probabilities
    conv = model.get_layer(LAST_CONV)
    assert isinstance(conv, keras.layers.Conv2D)
    logits = np.array([[2.0] * n_labels, [-1.0] * n_labels], np.float32)
    truth = np.array([[1] * n_labels, [1] * n_labels], np.float32)
    if name == "lightcnn-gn":  # group normalisation: no batch statistics at all, so nothing differs at inference
        assert not any(isinstance(layer, keras.layers.BatchNormalization) for layer in model.layers)
    expected = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)(truth, logits)
    assert np.allclose(model.loss(truth, logits), np.mean(expected))  # the loss reads logits: plain BCE by default


def test_balanced_class_weights_come_from_the_sites_own_counts():
    labels = np.array([[1, 0], [0, 0], [0, 0], [0, 1]], np.uint8)  # label 0: 1 positive of 4; label 1: 1 of 4
    pos, neg = class_weights(labels)
    assert np.allclose(pos, [2.0, 2.0]) and np.allclose(neg, [4 / 6, 4 / 6])  # n / (2 n_class)
    pos, neg = class_weights(np.zeros((5, 1), np.uint8))  # no positives at this site: nothing to weigh up
    assert pos.tolist() == [1.0] and np.allclose(neg, [0.5])


def test_weights_and_focal_term_scale_the_loss_as_defined():
    truth, logits = np.array([[1.0], [0.0]], np.float32), np.array([[0.0], [3.0]], np.float32)
    bce = keras.losses.BinaryCrossentropy(from_logits=True, reduction=None)(truth, logits).numpy()  # (2,)
    model = build_model("lightcnn", (16, 16, 1), 1, 1e-3)
    set_class_weights(model, np.array([3.0]), np.array([0.5]))
    assert np.allclose(model.loss(truth, logits), (3.0 * bce[0] + 0.5 * bce[1]) / 2)
    focal = build_model("lightcnn", (16, 16, 1), 1, 1e-3, focal_gamma=2.0)
    p_true = np.array([0.5, 1 - 1 / (1 + np.exp(-3.0))])  # the probability each image's true class gets
    assert np.allclose(focal.loss(truth, logits), np.mean((1 - p_true) ** 2 * bce), rtol=1e-5)
    assert not any(w.name in ("positive_weight", "negative_weight") for w in model.weights)  # never sent as weights


def test_logit_adjustment_shifts_each_sites_logits_by_its_own_log_prior_odds():
    labels = np.array([[1, 0]] * 3 + [[0, 0]], np.uint8)  # label 0: 3 positives of 4; label 1: none
    assert np.allclose(log_prior_odds(labels), [np.log(4 / 2), np.log(1 / 5)])  # add-one smoothed
    model = build_model("lightcnn", (16, 16, 1), 2, 1e-3)
    weigh_classes(model, labels, "logit-adjusted")
    truth, logits = np.array([[1.0, 0.0], [0.0, 0.0]], np.float32), np.array([[0.5, -1.0], [2.0, 0.0]], np.float32)
    shifted = logits + np.log([[2.0, 0.2]])  # z + log((pos + 1) / (neg + 1)), hand-computed
    p = 1 / (1 + np.exp(-shifted))
    expected = -(truth * np.log(p) + (1 - truth) * np.log(1 - p))  # BCE per image and label, class weights of one
    assert np.allclose(model.loss(truth, logits), expected.mean(), rtol=1e-5)
    one_class = np.ones((50, 1), np.uint8)  # a site holding positives only: its loss, and so its pull, nearly vanishes
    alone = build_model("lightcnn", (16, 16, 1), 1, 1e-3)
    weigh_classes(alone, one_class, "logit-adjusted")
    assert float(alone.loss(np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32))) < 0.02
    weigh_classes(alone, one_class, "balanced")  # the other weightings leave the logits as they are
    assert float(alone.loss(np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32))) == pytest.approx(0.5 * np.log(2), rel=1e-5)
    assert not any("logit_offset" in w.path for w in alone.weights)  # the site's prior never leaves it


def test_the_default_model_keeps_the_last_convolution_at_half_resolution():
    model = build_model("lightcnn", (64, 64, 1), 1, 1e-3)
    assert tuple(model.get_layer(LAST_CONV).output.shape[1:3]) == (32, 32)


def test_reset_optimizer_zeroes_its_state_but_keeps_the_learning_rate():
    model = build_model("lightcnn", (16, 16, 1), 1, 0.003)
    x, y = np.random.default_rng(0).random((8, 16, 16, 1), np.float32), np.ones((8, 1), np.float32)
    model.fit(x, y, epochs=1, batch_size=4, verbose=0)
    assert int(model.optimizer.iterations.numpy()) == 2
    reset_optimizer(model)
    assert int(model.optimizer.iterations.numpy()) == 0
    assert all(not np.any(v.numpy()) for v in model.optimizer.variables if "learning_rate" not in v.path)
    assert float(model.optimizer.learning_rate.numpy()) == pytest.approx(0.003)


@pytest.mark.parametrize("suffix", [".keras", ".weights.h5"])
def test_initial_weights_load_from_a_local_file(tmp_path, suffix):
    source = build_model("lightcnn", (16, 16, 1), 1, 1e-3)
    path = tmp_path / f"init{suffix}"
    source.save(path) if suffix == ".keras" else source.save_weights(path)
    target = build_model("lightcnn", (16, 16, 1), 1, 1e-3)
    load_initial_weights(target, str(path))
    assert all(np.array_equal(a, b) for a, b in zip(source.get_weights(), target.get_weights()))


def test_initial_weights_of_another_architecture_are_a_clear_error(tmp_path):
    path = tmp_path / "other.keras"
    build_model("seedcnn", (16, 16, 1), 1, 1e-3).save(path)
    with pytest.raises(ValueError, match="do not fit model 'lightcnn'"):
        load_initial_weights(build_model("lightcnn", (16, 16, 1), 1, 1e-3), str(path))


def test_the_proximal_term_keeps_local_training_near_the_global_weights_and_stays_on_the_site():
    rng = np.random.default_rng(0)
    x, y = rng.random((64, 16, 16, 1), np.float32), (rng.random((64, 1)) > 0.5).astype(np.float32)
    drift = {}
    for mu in (0.0, 10.0):
        keras.utils.set_random_seed(1)
        model = build_model("lightcnn", (16, 16, 1), 1, 0.01, proximal_mu=mu)
        set_anchor(model)
        start = model.get_weights()
        assert len(start) == 17  # the anchor is not a model weight, so it is never sent
        model.fit(x, y, epochs=3, batch_size=16, verbose=0)
        trainable = [w.trainable for w in model.weights]
        drift[mu] = sum(float(((a - b) ** 2).sum()) for a, b, t in zip(model.get_weights(), start, trainable) if t)
    assert drift[10.0] < 0.5 * drift[0.0]


def test_the_cosine_schedule_falls_from_the_rate_to_a_tenth_of_it():
    cfg = parse_run_config({"learning-rate": 0.002, "learning-rate-schedule": "cosine", "num-server-rounds": 3})
    assert [round_learning_rate(cfg, r) for r in (1, 2, 3)] == pytest.approx([0.002, 0.002 * 0.55, 0.0002])  # (1 + cos(pi/2)) / 2 = 0.5
    constant = parse_run_config({"learning-rate": 0.002, "num-server-rounds": 3})
    assert [round_learning_rate(constant, r) for r in (1, 2, 3)] == [0.002] * 3
