"""The CNNs: shapes, logits out, the named last convolution, initial weights from a file."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common.model import LAST_CONV, build_model, load_initial_weights, reset_optimizer


@pytest.mark.parametrize("name", ["lightcnn", "seedcnn"])
@pytest.mark.parametrize("n_labels", [1, 3])
def test_one_logit_per_label_and_a_named_last_convolution(name, n_labels):
    model = build_model(name, (32, 32, 1), n_labels, 1e-3)
    out = model.predict(np.random.default_rng(0).random((4, 32, 32, 1), np.float32), verbose=0)
    assert out.shape == (4, n_labels)
    assert model.layers[-1].get_config().get("activation", "linear") == "linear"  # logits, not probabilities
    conv = model.get_layer(LAST_CONV)
    assert isinstance(conv, keras.layers.Conv2D)
    assert model.loss.get_config()["from_logits"] is True


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
