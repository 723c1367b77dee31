"""The server's held-out and Grad-CAM checks on a model whose answer is known."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from common.config import parse_run_config
from common.image_set import ImageSet
from common.model import LAST_CONV
from server.evaluation import evaluate_heldout, gradcam_check, gradcam_warning


def _spot_model() -> keras.Model:
    """Looks for bright pixels: 1x1 convolution (named last_conv) copying the image, max pooling, logit = 8 * (max - 0.5)."""
    inputs = keras.Input((20, 20, 1))
    x = keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer="ones", name=LAST_CONV)(inputs)
    x = keras.layers.GlobalMaxPooling2D()(x)
    logits = keras.layers.Dense(1, kernel_initializer=keras.initializers.Constant(8.0), bias_initializer=keras.initializers.Constant(-4.0))(x)
    return keras.Model(inputs, logits)


def _sample(corner_for: int | None = None) -> ImageSet:
    """Eight images: four with a bright 2x2 lesion in the middle (boxed), from hospitals 0 and 1; optionally a corner tag."""
    images = np.zeros((8, 20, 20, 1), np.float32)
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0], np.uint8)[:, None]
    boxes = np.full((8, 1, 4), np.nan, np.float32)
    source = np.array(["hospital-0", "hospital-1"] * 4, dtype=object)
    for i in range(4):
        images[i, 9:11, 9:11] = 1.0
        boxes[i, 0] = (9, 9, 11, 11)
    if corner_for is not None:
        for i in np.flatnonzero((source == f"hospital-{corner_for}") & (labels[:, 0] == 1)):
            images[i, 9:11, 9:11] = 0.0  # the lesion is gone: only the tag is left to look at
            images[i, 0:2, 0:2] = 1.0
    return ImageSet(images, labels, boxes, source)


def test_a_model_that_looks_at_the_lesion_points_at_it_and_raises_no_warning():
    cfg = parse_run_config({"image-size": 20})
    model, sample = _spot_model(), _sample()
    sample.images[4, 0:2, 0:2] = 0.4  # a dim corner on a negative the model calls negative: its map is not evidence
    held = evaluate_heldout(model, sample, cfg, thresholds=np.array([0.5]))
    assert held.row["heldout_auc"] == 1.0 and held.row["heldout_sensitivity_at_threshold"] == 1.0
    result = gradcam_check(model, sample, held.logits, np.array([0.5]), cfg, previous=None)
    assert result.row["gradcam_pointing"] == 1.0 and result.row["gradcam_true_positives"] == 4
    assert result.row["gradcam_energy_in_box"] > 0.5 and result.row["gradcam_border_energy"] < 0.1
    assert np.isnan(result.row["gradcam_drift"]) and result.heat.shape == (1, 8, 20, 20)
    assert [kind for _, kind in result.cases] == ["true positive"] * 4
    again = gradcam_check(model, sample, held.logits, np.array([0.5]), cfg, previous=result.heat)
    assert again.row["gradcam_drift"] == pytest.approx(0.0, abs=1e-9)
    assert gradcam_warning({"global_auc": 0.9, **again.row}, {"global_auc": 0.8, **result.row}, cfg) == ""


def test_a_hospital_whose_positives_carry_a_corner_tag_raises_the_border_warning_by_name():
    cfg = parse_run_config({"image-size": 20, "gradcam-border-threshold": 0.5})
    model, sample = _spot_model(), _sample(corner_for=1)
    logits = model.predict(sample.images, verbose=0)
    result = gradcam_check(model, sample, logits, np.array([0.5]), cfg, previous=None)
    assert result.row["gradcam_border_energy_from__hospital-1"] > 0.5 > result.row["gradcam_border_energy_from__hospital-0"]
    assert result.row["gradcam_pointing"] == 0.5  # two true positives point at the lesion, two at the tag
    warning = gradcam_warning({"global_auc": 0.9, **result.row}, None, cfg)
    assert warning.startswith("hospital-1:") and "hospital-0" not in warning


def test_localisation_falling_while_auc_rises_is_flagged():
    cfg = parse_run_config({})
    before = {"global_auc": 0.80, "gradcam_pointing": 0.9, "gradcam_energy_in_box": 0.4}
    after = {"global_auc": 0.85, "gradcam_pointing": 0.6, "gradcam_energy_in_box": 0.38}
    assert "pointing fell from 0.90 to 0.60" in gradcam_warning(after, before, cfg)
    assert gradcam_warning({**after, "global_auc": 0.75}, before, cfg) == ""


def test_a_heldout_set_without_positives_leaves_localisation_undefined_and_the_rest_recorded():
    cfg = parse_run_config({"image-size": 20})
    sample = _sample()
    negatives = ImageSet(sample.images[4:], sample.labels[4:], sample.boxes[4:], sample.source[4:])
    model = _spot_model()
    held = evaluate_heldout(model, negatives, cfg, thresholds=np.array([0.5]))
    assert np.isnan(held.row["heldout_auc"]) and held.row["heldout_specificity"] == 1.0
    result = gradcam_check(model, negatives, held.logits, np.array([0.5]), cfg, previous=None)
    assert np.isnan(result.row["gradcam_pointing"]) and result.row["gradcam_true_positives"] == 0
    assert np.isnan(result.row["gradcam_energy_in_box"]) and result.row["gradcam_zero_maps"] == 4  # nothing bright: every map all-zero, and counted


def _write_heldout_site(folder, tag_source: str | None, sources: bool):
    """The sample's images as a held-out site on disk: class folders, with a sub-folder per source hospital if asked;
    the positives of tag_source carry a bright corner tag instead of their lesion."""
    from PIL import Image

    sample = _sample()
    for i, (image, label, source) in enumerate(zip(sample.images, sample.labels[:, 0], sample.source)):
        pixels = image[..., 0].copy()
        if label and source == tag_source:
            pixels[9:11, 9:11], pixels[0:2, 0:2] = 0.0, 1.0
        where = folder / "data" / ("lesion" if label else "clear") / (source if sources else "")
        where.mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8), "L").save(where / f"{i}.png")
    extra = "source-subfolders: true\n" if sources else ""
    (folder / "heldout.yaml").write_text(f"name: heldout\ndata-root: data\nlayout: folders\nlabels: {{lesion: lesion}}\nnegative-folders: [clear]\n{extra}")
    return folder / "heldout.yaml"


@pytest.mark.parametrize("sources", [True, False])
def test_a_shortcut_in_a_site_file_heldout_set_is_caught_named_where_the_source_is_known(tmp_path, sources):
    """Held-out images read from a site file: where the file names each image's hospital the warning names it, where it
    does not, the overall border energy still raises it; the same images without the tag raise nothing."""
    from common.site_data import heldout_from_site
    from common.site_file import load_site_config

    cfg = parse_run_config({"image-size": 20, "gradcam-border-threshold": 0.4, "heldout-site": str(_write_heldout_site(tmp_path / "tagged", "hospital-1", sources))})
    model = _spot_model()
    for folder, tagged in ((tmp_path / "tagged", True), (tmp_path / "clean", False)):
        path = folder / "heldout.yaml" if tagged else _write_heldout_site(folder, None, sources)
        held = heldout_from_site(load_site_config(path), cfg)
        assert (held.source != "").all() == sources
        logits = model.predict(held.images, verbose=0)
        result = gradcam_check(model, held, logits, np.array([0.5]), cfg, previous=None)
        warning = gradcam_warning({"global_auc": 0.9, **result.row}, None, cfg)
        if not tagged:
            assert warning == "" and result.row["gradcam_border_energy"] < 0.4
        elif sources:
            assert "hospital-1: " in warning and "hospital-0" not in warning
        else:
            assert warning.startswith("held-out images called positive: ") and "(threshold 0.4)" in warning
