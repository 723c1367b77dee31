"""The ImageNet backbones: shapes, grey fed as ImageNet weights expect, the named last feature map, Grad-CAM's
randomisation block by block, weights from a local file in Keras's older HDF5 format and a wrong file refused."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import keras
import numpy as np
import pandas as pd
import pytest
from keras.src.legacy.saving import legacy_h5_format  # writes the format of the published *_notop.h5 files

from common.backbones import BACKBONES, IMAGENET_MEAN_RGB, IMAGENET_STD_RGB, ImagenetInput
from common.config import MODELS, parse_run_config
from common.errors import ConfigError
from common.gradcam import gradcam, gradcam_layer, grid_cell, randomisation_test
from common.model import ARCHITECTURES, LAST_CONV, build_model

SIZE = 32


def _application(name: str, weights: str | None = None) -> keras.Model:
    """keras.applications' own backbone, without its top, on RGB input."""
    return getattr(keras.applications, BACKBONES[name].application)(include_top=False, weights=weights, input_shape=(SIZE, SIZE, 3))


def _published_file(name: str, folder: Path, seed: int = 0) -> Path:
    """A stand-in for the published *_notop.h5: keras.applications' backbone with random weights (EfficientNet's input
    statistics as published: the ImageNet mean, and standard deviations where variances belong), in the legacy format."""
    source = _application(name)
    rng = np.random.default_rng(seed)
    source.set_weights([rng.normal(0, 0.05, w.shape).astype(w.dtype) if w.dtype.kind == "f" else w for w in source.get_weights()])
    for layer in source.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_variance.assign(np.abs(layer.moving_variance.numpy()) + 1.0)
        if isinstance(layer, keras.layers.Normalization):
            layer.adapt_mean.assign(np.array(IMAGENET_MEAN_RGB, np.float32))
            layer.adapt_variance.assign(np.array(IMAGENET_STD_RGB, np.float32))
    path = folder / BACKBONES[name].weights_file
    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, source)
    return path


def _text(name: str | bytes) -> str:
    """An HDF5 attribute's name as text (h5py gives bytes or str by version)."""
    return name.decode() if isinstance(name, bytes) else name


def test_every_backbone_is_a_model_setting():
    assert tuple(ARCHITECTURES) == MODELS and set(BACKBONES) <= set(MODELS)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_grey_images_are_fed_as_the_backbones_imagenet_weights_expect(name):
    grey = np.random.default_rng(1).random((2, SIZE, SIZE, 1)).astype(np.float32)
    ours = ImagenetInput(BACKBONES[name].scaling)(grey).numpy()
    rgb255 = np.repeat(grey, 3, axis=-1) * 255.0
    if name == "densenet121":
        expected = keras.applications.densenet.preprocess_input(rgb255.copy())
    elif name == "resnet50":
        expected = keras.applications.resnet50.preprocess_input(rgb255.copy())
    else:  # what EfficientNet's own scaling layers (taken out) compute with Keras's imagenet weights: (x - mean) / std
        expected = (np.repeat(grey, 3, axis=-1) - np.array(IMAGENET_MEAN_RGB)) / np.array(IMAGENET_STD_RGB)
    assert ours.shape == (2, SIZE, SIZE, 3) and np.allclose(ours, expected, atol=1e-3)


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_a_backbone_has_one_logit_per_label_a_named_last_feature_map_and_grad_cam_reads_it(name):
    model = build_model(name, (SIZE, SIZE, 1), 2, 1e-3, seed=0)
    images = np.random.default_rng(0).random((3, SIZE, SIZE, 1)).astype(np.float32)
    assert model.predict(images, verbose=0).shape == (3, 2)
    assert gradcam_layer(model) == LAST_CONV and model.get_layer(LAST_CONV).output.shape[1:3] == (1, 1)  # 32x32 in: a 1x1 grid
    assert grid_cell(model) == SIZE
    heat = gradcam(model, images, 1)
    assert heat.shape == (3, SIZE, SIZE) and np.isfinite(heat).all()
    assert not any(isinstance(layer, keras.Model) for layer in model.layers)  # the backbone's layers are the model's own
    assert all(w.dtype == np.float32 for w in model.get_weights())  # nothing a hospital's reply could not carry


@pytest.mark.parametrize("name", sorted(BACKBONES))
def test_local_imagenet_weights_load_and_reach_a_hospital_unchanged(name, tmp_path):
    path = _published_file(name, tmp_path)
    server = build_model(name, (SIZE, SIZE, 1), 1, 1e-3, backbone_weights=str(path))
    reference = _application(name, str(path))
    for layer in reference.layers:
        if layer.weights and not isinstance(layer, keras.layers.Normalization):
            assert all(np.array_equal(a, b) for a, b in zip(layer.get_weights(), server.get_layer(layer.name).get_weights())), layer.name
    grey = np.random.default_rng(2).random((2, SIZE, SIZE, 1)).astype(np.float32)
    rgb255 = np.repeat(grey, 3, axis=-1) * 255.0
    if name == "efficientnetb0":  # what Keras's imagenet path computes: its Normalization with the variances it means
        for layer in reference.layers:
            if isinstance(layer, keras.layers.Normalization):
                layer.adapt_variance.assign(np.square(np.array(IMAGENET_STD_RGB, np.float32)))
                layer.finalize_state()
        fed = rgb255
    else:
        fed = getattr(keras.applications, "densenet" if name == "densenet121" else "resnet50").preprocess_input(rgb255.copy())
    features = keras.Model(server.inputs, server.get_layer(LAST_CONV).output)
    assert np.allclose(features.predict(grey, verbose=0), reference.predict(fed, verbose=0), rtol=1e-3, atol=1e-3)
    hospital = build_model(name, (SIZE, SIZE, 1), 1, 1e-3)  # a hospital builds without the file and receives the weights
    hospital.set_weights(server.get_weights())
    assert np.allclose(hospital.predict(grey, verbose=0), server.predict(grey, verbose=0), atol=1e-5)


def test_a_wrong_weights_file_is_refused_in_one_line(tmp_path):
    densenet = _published_file("densenet121", tmp_path)
    with pytest.raises(ValueError) as info:
        build_model("resnet50", (SIZE, SIZE, 1), 1, 1e-3, backbone_weights=str(densenet))
    assert "not ResNet50's ImageNet weights without its top" in str(info.value) and "\n" not in str(info.value)
    garbage = tmp_path / "garbage.h5"
    garbage.write_bytes(b"not an HDF5 file")
    with pytest.raises(ValueError, match="backbone-weights garbage.h5: not DenseNet121's") as info:
        build_model("densenet121", (SIZE, SIZE, 1), 1, 1e-3, backbone_weights=str(garbage))
    assert "\n" not in str(info.value)
    effnet = _published_file("efficientnetb0", tmp_path)
    with h5py.File(effnet, "r+") as f:  # input statistics that are not ImageNet's: the file is not what it says
        layer = next(f[n] for n in map(_text, f.attrs["layer_names"]) if n.startswith("normalization"))
        mean = next(n for n in map(_text, layer.attrs["weight_names"]) if n.endswith("mean"))
        layer[mean][...] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match="its input normalisation .* is not keras.applications' ImageNet one"):
        build_model("efficientnetb0", (SIZE, SIZE, 1), 1, 1e-3, backbone_weights=str(effnet))


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"model": "lightcnn", "backbone-weights": "w.h5"}, "is for an ImageNet backbone"),
        ({"model": "resnet50", "backbone-weights": "w.pt"}, "expected keras.applications' *_notop.h5 file"),
        ({"model": "resnet50", "backbone-weights": "missing.h5"}, "'backbone-weights': file not found"),
        ({"model": "densenet121", "image-size": 16}, "model 'densenet121' needs at least 32"),
    ],
)
def test_backbone_settings_are_checked_before_a_run(tmp_path, settings, message):
    (tmp_path / "w.pt").write_bytes(b"")
    with pytest.raises(ConfigError, match=message.replace("*", r"\*")):
        parse_run_config(settings, base_dir=tmp_path)


def test_the_randomisation_test_randomises_a_backbone_block_by_block():
    model = build_model("resnet50", (SIZE, SIZE, 1), 1, 1e-3, seed=0)
    images = np.random.default_rng(3).random((2, SIZE, SIZE, 1)).astype(np.float32)
    stages = [name for name, _ in randomisation_test(model, images, 0)]
    blocks = [f"conv{stage}_block{block}" for stage, n in ((5, 3), (4, 6), (3, 4), (2, 3)) for block in range(n, 0, -1)]
    assert stages == ["logits", *blocks, "conv1"]  # ResNet-50's 16 residual blocks, each a stage, then its stem


def test_a_federation_trains_a_backbone_from_local_imagenet_weights_and_checks_its_grad_cam(tmp_path, own_flower_processes):
    from server import simulate

    weights = _published_file("efficientnetb0", tmp_path)
    settings = {"num-server-rounds": 1, "num-hospitals": 2, "images-per-hospital": 40, "heldout-images": 20, "image-size": SIZE,
                "min-bin-images": 2, "gradcam-images": 4, "model": "efficientnetb0", "backbone-weights": str(weights),
                "output-dir": str(tmp_path), "run-name": "backbone"}  # fmt: skip
    folder = simulate.simulate(simulate.prepare(settings))
    assert json.loads((folder / "status.json").read_text())["status"] == "finished"
    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1] and history["n_sites"].tolist()[1:] == [2] and history["n_failed"].sum() == 0
    trained = keras.models.load_model(folder / "model_last.keras", compile=False)
    start = _application("efficientnetb0", str(weights)).get_layer("block6a_expand_conv").get_weights()[0]
    after = trained.get_layer("block6a_expand_conv").get_weights()[0]
    assert np.corrcoef(start.ravel(), after.ravel())[0, 1] > 0.9  # the federation started from the file's weights
    sanity = pd.read_csv(folder / "gradcam" / "sanity.csv")
    assert {"logits", "top", "block7a", "block1a", "stem"} <= set(sanity["randomised_down_to"])  # block by block
    assert not own_flower_processes()
