"""The built-in data: deterministic, lesions inside a lung field, difficulty inside the pinned range."""

from __future__ import annotations

import numpy as np
import pytest

from common import synthetic


def test_same_seed_same_images_other_seed_other_images():
    labels = synthetic.sample_labels(7, 20, 0.5)
    a, boxes_a = synthetic.make_images(7, np.arange(20), labels)
    b, boxes_b = synthetic.make_images(7, np.arange(20), labels)
    c, _ = synthetic.make_images(8, np.arange(20), labels)
    assert np.array_equal(a, b) and np.array_equal(boxes_a, boxes_b, equal_nan=True)
    assert not np.array_equal(a, c)


def test_an_image_depends_only_on_seed_and_index():
    labels = synthetic.sample_labels(3, 10, 0.5)
    all_images, _ = synthetic.make_images(3, np.arange(10), labels)
    some, _ = synthetic.make_images(3, np.array([7, 2]), labels[[7, 2]])
    assert np.array_equal(some, all_images[[7, 2]])


def test_images_are_grayscale_in_unit_range_and_prevalence_holds():
    labels = synthetic.sample_labels(1, 2000, 0.3)
    assert labels.shape == (2000, 1) and abs(labels.mean() - 0.3) < 0.04
    images, boxes = synthetic.make_images(1, np.arange(50), labels[:50], size=64)
    assert images.shape == (50, 64, 64, 1) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert np.isnan(boxes[labels[:50, 0] == 0]).all() and not np.isnan(boxes[labels[:50, 0] == 1]).any()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_lesions_lie_inside_the_image_and_inside_a_lung_field(size):
    for index in range(60):
        _, boxes = synthetic.make_image(11, index, (1,), size)
        y0, x0, y1, x1 = boxes[0]
        assert 0 <= y0 < y1 <= size and 0 <= x0 < x1 <= size
        radius = (y1 - y0) / 2
        lo, hi = (r * size / 64 for r in synthetic.LESION_RADIUS_64)
        assert lo - 1e-4 <= radius <= hi + 1e-4
        # every pixel of the lesion's disc lies in the lung mask
        lungs = synthetic.lung_mask(11, index, size)
        cy, cx = (y0 + y1) / 2, (x0 + x1) / 2
        yy, xx = np.mgrid[0:size, 0:size] + 0.5
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= (radius - 0.5) ** 2
        assert disc.any() and lungs[disc].all()


def test_lesion_contrast_is_within_the_pinned_multiple_of_the_noise():
    """An image minus its lesion-free twin (same anatomy, same noise) peaks at 2.5 to 6 noise sigmas."""
    lo, hi = synthetic.LESION_CONTRAST
    assert (lo, hi) == (2.5, 6.0)
    peaks = np.array(
        [(synthetic.make_image(5, i, (1,))[0] - synthetic.make_image(5, i, (0,))[0]).max() / synthetic.NOISE_STD for i in range(60)]
    )
    assert peaks.min() >= lo - 0.05 and peaks.max() <= hi + 0.05
    assert peaks.max() - peaks.min() > 1.5  # the contrast really varies across the range


def test_the_three_finding_mode_draws_each_finding_with_its_box():
    labels = synthetic.sample_labels(4, 400, 0.4, n_findings=3)
    assert labels.shape == (400, 3) and 0.3 < labels.mean() < 0.5
    images, boxes = synthetic.make_images(4, np.arange(400), labels, 64, synthetic.MULTI)
    assert boxes.shape == (400, 3, 4)
    assert np.array_equal(~np.isnan(boxes[..., 0]), labels == 1)  # a box exactly where a finding is present
    present = boxes[labels == 1]
    assert (present[:, :2] >= 0).all() and (present[:, 2:] <= 64).all() and (present[:, 2:] > present[:, :2]).all()
    # each finding changes the image where its box says
    for j in range(3):
        one = np.zeros(3, int)
        one[j] = 1
        with_finding, box = synthetic.make_image(9, 0, tuple(one), 64, synthetic.MULTI)
        without, _ = synthetic.make_image(9, 0, (0, 0, 0), 64, synthetic.MULTI)
        y0, x0, y1, x1 = np.clip(np.round(box[j]).astype(int), 0, 64)
        changed = np.abs(with_finding - without) > 1e-6
        assert changed[y0:y1, x0:x1].mean() > 0.1 and changed.sum() - changed[y0:y1, x0:x1].sum() <= 0.1 * changed.sum() + 4
