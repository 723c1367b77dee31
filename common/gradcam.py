"""Grad-CAM heatmaps and the checks on them: does the model look at the finding, or at a shortcut?

Computation only; drawing overlays is server/plots.py's concern.
"""

from __future__ import annotations

import math
import re

import keras
import numpy as np
import tensorflow as tf
from scipy.stats import spearmanr

from common.model import LAST_CONV

BORDER_SHARE = 0.10  # the border: pixels within 10 % of the image's width of any edge (36 % of the area)


def gradcam_layer(model: keras.Model) -> str:
    """The feature map Grad-CAM reads: the named last convolution's activation (after its normalisation and ReLU)."""
    names = {layer.name for layer in model.layers}
    for name in (f"{LAST_CONV}_relu", LAST_CONV):
        if name in names:
            return name
    raise ValueError(f"model {model.name!r} has no layer named {LAST_CONV!r}: Grad-CAM needs the named last convolution")


def gradcam(model: keras.Model, images: np.ndarray, label: int, batch_size: int = 64) -> np.ndarray:
    """Heatmaps (n, h, w) in [0, 1] at the input's resolution for one label's logit; all-zero where nothing is positive."""
    expected = tuple(model.input_shape[1:])
    if images.ndim != 4 or tuple(images.shape[1:]) != expected:
        raise ValueError(f"images of shape {images.shape[1:]} do not fit the model's input {expected}")
    layer = model.get_layer(gradcam_layer(model))
    probe = keras.Model(model.inputs, [layer.output, model.outputs[0]])
    maps = []
    for start in range(0, len(images), batch_size):
        batch = tf.convert_to_tensor(images[start : start + batch_size])  # (b, H, W, c)
        with tf.GradientTape() as tape:
            features, logits = probe(batch, training=False)  # (b, h, w, k), (b, n_labels)
            target = logits[:, label]  # (b,)
        grads = tape.gradient(target, features)  # (b, h, w, k)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)  # (b, 1, 1, k)
        cam = tf.nn.relu(tf.reduce_sum(weights * features, axis=-1))  # (b, h, w)
        cam = tf.image.resize(cam[..., None], expected[:2], method="bilinear")[..., 0]  # (b, H, W)
        maps.append(cam.numpy())
    heat = np.concatenate(maps)  # (n, H, W)
    peak = heat.reshape(len(heat), -1).max(axis=1)
    return np.where(peak[:, None, None] > 0, heat / np.maximum(peak, 1e-12)[:, None, None], 0.0).astype(np.float32)


def grid_cell(model: keras.Model) -> float:
    """Pixels of input per cell of the Grad-CAM feature map's grid (the pointing game's tolerance)."""
    return model.input_shape[1] / model.get_layer(gradcam_layer(model)).output.shape[1]


def pointing_hits(heat: np.ndarray, boxes: np.ndarray, tolerance: float) -> np.ndarray:
    """Per heatmap (n, H, W): is its peak inside its box (n, 4: y0, x0, y1, x1) grown by `tolerance` pixels? All-zero maps miss."""
    n, height, width = heat.shape
    flat = heat.reshape(n, -1).argmax(axis=1)
    py, px = flat // width + 0.5, flat % width + 0.5  # pixel centres
    y0, x0, y1, x1 = (boxes[:, i] for i in range(4))
    inside = (py >= y0 - tolerance) & (py <= y1 + tolerance) & (px >= x0 - tolerance) & (px <= x1 + tolerance)
    return inside & (heat.reshape(n, -1).max(axis=1) > 0)


def energy_in_boxes(heat: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Per heatmap, the share of its energy (sum of squared values) inside its box (0 for an all-zero map)."""
    n, height, width = heat.shape
    yy, xx = np.mgrid[0:height, 0:width] + 0.5
    energy = heat.astype(np.float64) ** 2
    shares = np.zeros(n)
    for i, (y0, x0, y1, x1) in enumerate(boxes):
        total = energy[i].sum()
        if total > 0:
            shares[i] = energy[i][(yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)].sum() / total
    return shares


def border_mask(height: int, width: int) -> np.ndarray:
    """The border pixels: within BORDER_SHARE of the image's width of any edge."""
    margin = int(round(BORDER_SHARE * width))
    mask = np.ones((height, width), bool)
    mask[margin : height - margin, margin : width - margin] = False
    return mask


def border_energy(heat: np.ndarray) -> np.ndarray:
    """Per heatmap, the share of its energy (sum of squared values) in the border (NaN for an all-zero map: it looks nowhere).

    Squaring weighs where the map is hot over the faint haze a Grad-CAM map spreads over the whole image: with plain
    sums a hazy map puts about the border's share of the area (36 %) there whatever the model looks at.
    """
    mask = border_mask(*heat.shape[1:])
    energy = heat.astype(np.float64) ** 2
    total = energy.reshape(len(heat), -1).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, energy[:, mask].sum(axis=1) / total, np.nan)


def rank_correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Spearman rank correlation between matching heatmaps of two stacks (n, H, W).

    A constant map (all zero: it looks nowhere) has no ranking: against the same constant map it counts as 1 (nothing
    changed), against anything else as 0.
    """
    values = []
    for x, y in zip(a.reshape(len(a), -1), b.reshape(len(b), -1)):
        if x.std() > 0 and y.std() > 0:
            values.append(spearmanr(x, y).statistic)
        else:
            values.append(1.0 if np.array_equal(x, y) else 0.0)
    return float(np.mean(values)) if values else float("nan")


BLOCK = re.compile(r"^(conv\d+_block\d+|block\d+[a-z]|pool\d+|conv\d+|stem|top)_")  # keras.applications' block names


def block_of(layer_name: str) -> str:
    """The block a layer belongs to: keras.applications' block (conv4_block7, block6a, pool3, stem, top), else the
    layer with its normalisation and activation (conv1, conv1_bn or conv1_gn, conv1_relu: conv1)."""
    found = BLOCK.match(layer_name)
    return found.group(1) if found else re.sub(r"_(bn|gn|relu)$", "", layer_name)


def randomisation_test(model: keras.Model, images: np.ndarray, label: int, seed: int = 0) -> list[tuple[str, float]]:
    """Cascading randomisation (Adebayo et al., 2018): re-initialise the model block by block from the top down, one
    more block at each stage, and give the rank correlation of each stage's heatmaps with the trained model's. A
    backbone's blocks are stages of their own (its layers sit in the model, not nested in one). Input normalisation
    layers hold no learned weights and are left as they are. The model itself is left unchanged."""
    trained = gradcam(model, images, label)
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    rng = np.random.default_rng(seed)
    blocks: dict[str, list[keras.Layer]] = {}
    for layer in reversed(clone.layers):
        if layer.trainable_weights:
            blocks.setdefault(block_of(layer.name), []).append(layer)
    stages = []
    for name, layers in blocks.items():
        for weight in (w for layer in layers for w in layer.weights):
            w = weight.numpy()
            fan = max(1, int(np.prod(w.shape[:-1]))) if w.ndim > 1 else 1
            fresh = rng.normal(0.0, math.sqrt(2.0 / fan), w.shape) if w.ndim > 1 else rng.normal(0.0, 0.1, w.shape)
            weight.assign(fresh.astype(w.dtype) if "variance" not in weight.path else np.abs(fresh).astype(w.dtype) + 1.0)
        stages.append((name, rank_correlation(trained, gradcam(clone, images, label))))
    return stages
