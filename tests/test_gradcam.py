"""Grad-CAM on tiny models whose right answer is known, and the checks computed from heatmaps."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common.gradcam import (
    border_energy, border_mask, energy_in_boxes, gradcam, gradcam_layer, grid_cell, pointing_hits, randomisation_test, rank_correlation,
)  # fmt: skip
from common.model import LAST_CONV, build_model


def _brightness_detector(pool) -> keras.Model:
    """image -> 1x1 convolution copying the image (named last_conv) -> pooling -> logit = pooled value: looks at bright spots."""
    inputs = keras.Input((16, 16, 1))
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name=LAST_CONV)(inputs)  # (b, 16, 16, 1)
    x = pool()(x)  # (b, 1)
    logits = keras.layers.Dense(1, kernel_initializer="ones", bias_initializer="zeros")(x)
    return keras.Model(inputs, logits)


@pytest.mark.parametrize("pool", [keras.layers.GlobalAveragePooling2D, keras.layers.GlobalMaxPooling2D])
def test_the_heatmap_peaks_on_the_bright_spot_the_model_looks_at(pool):
    images = np.zeros((3, 16, 16, 1), np.float32)
    spots = [(2, 3), (10, 12), (7, 7)]
    for i, (y, x) in enumerate(spots):
        images[i, y : y + 2, x : x + 2] = 1.0
    heat = gradcam(_brightness_detector(pool), images, 0)
    assert heat.shape == (3, 16, 16) and heat.min() >= 0 and heat.max() <= 1
    for i, (y, x) in enumerate(spots):
        peak = np.unravel_index(heat[i].argmax(), heat[i].shape)
        assert y <= peak[0] <= y + 1 and x <= peak[1] <= x + 1
        assert heat[i].max() == pytest.approx(1.0)
        assert heat[i][images[i, ..., 0] == 0].max() < 0.5  # elsewhere it is dim


def test_an_image_with_nothing_to_see_gives_an_all_zero_map_that_misses():
    heat = gradcam(_brightness_detector(keras.layers.GlobalMaxPooling2D), np.zeros((1, 16, 16, 1), np.float32), 0)
    assert not heat.any()
    assert not pointing_hits(heat, np.array([[0, 0, 16, 16]], np.float32), 1.0)[0]
    assert np.isnan(border_energy(heat)[0])


def test_bad_models_and_images_are_clear_errors():
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, name="conv"), keras.layers.Flatten(), keras.layers.Dense(1)])
    with pytest.raises(ValueError, match="no layer named 'last_conv'"):
        gradcam(model, np.zeros((1, 8, 8, 1), np.float32), 0)
    with pytest.raises(ValueError, match=r"do not fit the model's input \(16, 16, 1\)"):
        gradcam(_brightness_detector(keras.layers.GlobalMaxPooling2D), np.zeros((1, 32, 32, 3), np.float32), 0)


def test_pointing_energy_and_border_on_hand_made_maps():
    heat = np.zeros((2, 20, 20), np.float32)
    heat[0, 5, 5] = 1.0  # peak inside the box
    heat[1, 0, 0] = 1.0  # peak in the corner, all energy in the border
    heat[1, 10, 10] = 0.5
    boxes = np.array([[4, 4, 7, 7], [9, 9, 12, 12]], np.float32)
    assert pointing_hits(heat, boxes, 0.0).tolist() == [True, False]
    assert pointing_hits(heat, np.array([[7, 7, 9, 9], [9, 9, 12, 12]], np.float32), 2.0).tolist() == [True, False]  # tolerance
    assert energy_in_boxes(heat, boxes).tolist() == pytest.approx([1.0, 0.25 / 1.25])  # energy: squared values
    assert border_energy(heat).tolist() == pytest.approx([0.0, 1.0 / 1.25])
    assert border_mask(50, 50).mean() == pytest.approx(0.36)


@pytest.mark.parametrize("name", ["lightcnn", "lightcnn-gn"])
def test_rank_correlation_and_the_randomisation_test(name):
    rng = np.random.default_rng(0)
    a = rng.random((4, 8, 8))
    assert rank_correlation(a, a) == pytest.approx(1.0)
    assert rank_correlation(a, -a) == pytest.approx(-1.0)
    assert rank_correlation(a, np.zeros_like(a)) == 0.0  # a map that looks nowhere shares nothing with one that looks
    assert rank_correlation(np.zeros_like(a), np.zeros_like(a)) == 1.0  # and nothing changed between two such maps
    model = build_model(name, (32, 32, 1), 1, 1e-3)
    before = [w.copy() for w in model.get_weights()]
    stages = randomisation_test(model, rng.random((6, 32, 32, 1)).astype(np.float32), 0)
    assert [stage for stage, _ in stages] == ["logits", "last_conv", "conv2", "conv1"]  # each convolution with its normalisation
    assert all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))  # the model itself is untouched
    assert all(-1 <= r <= 1 for _, r in stages)


def test_the_default_model_reads_its_last_convolution_on_a_grid_of_two_pixel_cells():
    model = build_model("lightcnn", (64, 64, 1), 1, 1e-3)
    assert gradcam_layer(model) == f"{LAST_CONV}_relu" and grid_cell(model) == 2.0
