"""Simulated hospitals: disjoint and complete splits, skew as asked, scanners, and the server's held-out set."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from common.config import parse_run_config
from common.errors import ConfigError
from common.partition import Scanner, apply_scanner, assign_hospitals, heldout_set, hospital_data, hospital_test, pool_labels, scanner_for


def _cfg(**settings):
    return parse_run_config({"image-size": 32, **settings})


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_every_image_goes_to_exactly_one_hospital(partition):
    cfg = _cfg(**{"num-hospitals": 5, "images-per-hospital": 100, "partition": partition})
    labels = pool_labels(cfg)
    hospital = assign_hospitals(labels, cfg)
    assert hospital.shape == (500,) and set(np.unique(hospital)) == set(range(5))
    assert np.array_equal(hospital, assign_hospitals(labels, cfg))  # reproducible from the seed


def test_iid_hospitals_are_balanced_and_dirichlet_skews_labels_more_as_alpha_falls():
    def spread(partition, alpha):
        cfg = _cfg(**{"num-hospitals": 5, "images-per-hospital": 200, "partition": partition, "dirichlet-alpha": alpha})
        labels = pool_labels(cfg)[:, 0]
        hospital = assign_hospitals(pool_labels(cfg), cfg)
        prevalence = [labels[hospital == h].mean() for h in range(5)]
        return np.bincount(hospital), np.std(prevalence)

    sizes, iid_spread = spread("iid", 1.0)
    assert sizes.max() - sizes.min() <= 1
    _, skew_05 = spread("dirichlet", 0.5)
    _, skew_01 = spread("dirichlet", 0.1)
    assert iid_spread < 0.05 < skew_05 < skew_01


def test_hospital_splits_are_disjoint_and_stratified_and_cover_the_hospital():
    cfg = _cfg(**{"num-hospitals": 3, "images-per-hospital": 60})
    hospital = assign_hospitals(pool_labels(cfg), cfg)
    for h in range(3):
        train, val = hospital_data(cfg, h)
        assert len(train) + len(val) == (hospital == h).sum()
        assert abs(len(val) - 0.2 * (len(train) + len(val))) <= 2
        assert set(np.unique(val.labels)) == {0, 1}
        # no image in both splits: compare pixel content
        train_keys = {img.tobytes() for img in train.images}
        assert not any(img.tobytes() in train_keys for img in val.images)
        assert (train.source == f"hospital-{h}").all() and (val.source == f"hospital-{h}").all()


def test_a_local_test_share_is_held_back_from_training_and_validation():
    cfg = _cfg(**{"num-hospitals": 2, "images-per-hospital": 100, "test-fraction": 0.25})
    train, val = hospital_data(cfg, 1)
    test = hospital_test(cfg, 1)
    seen = {img.tobytes() for part in (train, val) for img in part.images}
    assert len(test) + len(train) + len(val) == 100 and abs(len(test) - 25) <= 1
    assert not seen & {img.tobytes() for img in test.images}
    assert 0 < test.labels.mean() < 1  # stratified: both classes
    plain = _cfg(**{"num-hospitals": 2, "images-per-hospital": 100})
    assert len(hospital_test(plain, 1)) == 0
    assert len(hospital_data(plain, 1)[0]) + len(hospital_data(plain, 1)[1]) == 100


def test_scanners_differ_between_hospitals_and_vanish_at_zero_spread():
    assert scanner_for(0, 1, 1.0) != scanner_for(1, 1, 1.0)
    assert scanner_for(2, 1, 0.0) == Scanner()
    images = np.full((2, 8, 8, 1), 0.5, np.float32)
    out = apply_scanner(images, Scanner(contrast=1.2, brightness=0.1), np.random.default_rng(0))
    assert np.allclose(out, 0.6)
    cfg = _cfg(**{"num-hospitals": 2, "images-per-hospital": 30})
    (a, _), (b, _) = hospital_data(cfg, 0), hospital_data(cfg, 1)
    assert abs(a.images.mean() - b.images.mean()) > 1e-3


def test_the_heldout_set_represents_every_hospital_and_never_overlaps_a_hospital():
    cfg = _cfg(**{"num-hospitals": 3, "images-per-hospital": 40, "heldout-images": 60})
    heldout = heldout_set(cfg)
    assert len(heldout) == 60 and sorted(np.unique(heldout.source, return_counts=True)[1].tolist()) == [20, 20, 20]
    assert not np.isnan(heldout.boxes[heldout.labels[:, 0] == 1]).any() and heldout.boxes.shape == (60, 1, 4)
    clients = {img.tobytes() for h in range(3) for part in hospital_data(cfg, h) for img in part.images}
    assert not any(img.tobytes() in clients for img in heldout.images)


def test_too_many_hospitals_for_the_images_is_a_clear_error():
    cfg = _cfg(**{"num-hospitals": 50, "images-per-hospital": 10})
    cfg = dataclasses.replace(cfg, images_per_hospital=10)
    with pytest.raises(ConfigError, match="'num-hospitals' = 50"):
        assign_hospitals(np.zeros((100, 1), np.uint8), cfg)


def test_an_unsatisfiable_label_skew_is_a_clear_error():
    cfg = _cfg(**{"num-hospitals": 10, "images-per-hospital": 10, "partition": "dirichlet", "dirichlet-alpha": 0.01})
    with pytest.raises(ConfigError, match="dirichlet-alpha"):
        assign_hospitals(pool_labels(cfg), cfg)


def test_an_npz_data_set_is_shared_out_resized_and_its_test_split_is_held_out(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 60), ("val", 20), ("test", 25)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3 == 0).astype(np.uint8).reshape(-1, 1)
    np.savez(tmp_path / "set.npz", **arrays)
    cfg = parse_run_config({"data": str(tmp_path / "set.npz"), "image-size": 32, "num-hospitals": 2, "labels": "pneumonia"})
    parts = [hospital_data(cfg, h) for h in range(2)]
    assert sum(len(t) + len(v) for t, v in parts) == 80
    train, _ = parts[0]
    assert train.images.shape[1:] == (32, 32, 1) and 0.0 <= train.images.min() and train.images.max() <= 1.0
    heldout = heldout_set(cfg)
    assert len(heldout) == 25 and heldout.labels[:, 0].tolist() == arrays["test_labels"][:, 0].tolist()
    assert (heldout.source == "").all() and np.isnan(heldout.boxes).all()


def test_an_npz_without_the_expected_arrays_says_which_are_missing(tmp_path):
    np.savez(tmp_path / "bad.npz", images=np.zeros((4, 8, 8)))
    cfg = parse_run_config({"data": str(tmp_path / "bad.npz")})
    with pytest.raises(ValueError, match="expected arrays 'train_images' and 'train_labels', found \\['images'\\]"):
        pool_labels(cfg)


def test_the_shortcut_marker_sits_on_one_hospitals_positive_images_and_its_heldout_share_only():
    cfg = _cfg(**{"num-hospitals": 3, "images-per-hospital": 40, "heldout-images": 60, "shortcut-hospital": 1})
    side = 32 // 10
    for h in range(3):
        train, _ = hospital_data(cfg, h)
        marked = (train.images[:, 1 : 1 + side, 1 : 1 + side, 0] == 1.0).all(axis=(1, 2))
        expected = (train.labels[:, 0] == 1) if h == 1 else np.zeros(len(train), bool)
        assert np.array_equal(marked, expected), h
    heldout = heldout_set(cfg)
    marked = (heldout.images[:, 1 : 1 + side, 1 : 1 + side, 0] == 1.0).all(axis=(1, 2))
    assert np.array_equal(marked, (heldout.source == "hospital-1") & (heldout.labels[:, 0] == 1))
    # There the lesion is fainter (SHORTCUT_FADE of its contrast), so the tag is the easier cue; elsewhere nothing changes.
    clean = hospital_data(_cfg(**{"num-hospitals": 3, "images-per-hospital": 40}), 1)[0]
    tagged = hospital_data(cfg, 1)[0]
    for i in np.flatnonzero(tagged.labels[:, 0] == 1):
        y0, x0, y1, x1 = np.round(tagged.boxes[i, 0]).astype(int)
        lesion = np.s_[max(y0, 0) : y1, max(x0, 0) : x1]
        assert tagged.images[i][lesion].mean() < clean.images[i][lesion].mean(), i
    negatives = tagged.labels[:, 0] == 0
    assert np.array_equal(tagged.images[negatives], clean.images[negatives])
    with pytest.raises(ConfigError, match="'shortcut-hospital' = 3"):
        _cfg(**{"num-hospitals": 3, "shortcut-hospital": 3})
