"""The shared CNN: functional Keras, channels-last, one logit per label, the last convolution named for Grad-CAM;
the light CNNs here, the ImageNet backbones in common/backbones.py."""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf
from keras.src.random import seed_generator  # where Keras keeps the generator its default seeds come from

from common.backbones import BACKBONES, backbone_features
from common.config import RunConfig

LAST_CONV = "last_conv"
LOGITS = "logits"


def _conv_block(x, filters: int, name: str, norm: str):
    """3x3 convolution, normalisation, ReLU. batch: batch normalisation (fast-tracking statistics: few local steps per
    round); group: group normalisation, 4 channels a group, the same in training and inference whatever the batch holds."""
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    if norm == "group":
        x = keras.layers.GroupNormalization(groups=filters // 4, name=f"{name}_gn")(x)
    else:
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x)


def lightcnn(input_shape: tuple[int, int, int], n_labels: int, norm: str = "batch") -> keras.Model:
    """The default light CNN: global max pooling over a last convolution at half the input resolution.

    A finding is present if it is present anywhere, so the head takes each feature's maximum over the image; the last
    convolution keeps a fine grid (32x32 at 64x64 input) so that Grad-CAM can localise. On the built-in data this
    reached a pooled held-out AUC of 0.99 in two epochs where global average pooling stayed near 0.7 after 24.
    """
    inputs = keras.Input(input_shape, name="image")  # (b, s, s, c)
    x = _conv_block(inputs, 16, "conv1", norm)  # (b, s, s, 16)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # (b, s/2, s/2, 16)
    x = _conv_block(x, 32, "conv2", norm)  # (b, s/2, s/2, 32)
    x = _conv_block(x, 32, LAST_CONV, norm)  # (b, s/2, s/2, 32)
    x = keras.layers.GlobalMaxPooling2D(name="gmp")(x)  # (b, 32)
    logits = keras.layers.Dense(n_labels, dtype="float32", name=LOGITS)(x)  # (b, n_labels), float32 under mixed precision too
    return keras.Model(inputs, logits, name="lightcnn" if norm == "batch" else "lightcnn-gn")


def seedcnn(input_shape: tuple[int, int, int], n_labels: int) -> keras.Model:
    """The seed article's CNN (two convolutions, max-pooling, batch norm, Flatten, dropout, dense, L2), in Keras 3."""
    l2 = keras.regularizers.L2(1e-3)
    inputs = keras.Input(input_shape, name="image")  # (b, s, s, c)
    x = keras.layers.Conv2D(128, 5, padding="same", activation="relu", kernel_regularizer=l2, name="conv1")(inputs)  # (b, s, s, 128)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", kernel_regularizer=l2, name=LAST_CONV)(x)  # (b, s, s, 64)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)  # (b, s/2, s/2, 64)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten(name="flatten")(x)  # (b, s/2 * s/2 * 64)
    x = keras.layers.Dropout(0.5, name="dropout")(x)
    logits = keras.layers.Dense(n_labels, kernel_initializer="glorot_normal", dtype="float32", name=LOGITS)(x)  # (b, n_labels)
    return keras.Model(inputs, logits, name="seedcnn")


def pretrained(name: str, input_shape: tuple[int, int, int], n_labels: int, weights: str = "") -> keras.Model:
    """A keras.applications backbone (common/backbones.py) with global average pooling and one logit per label, as in
    CheXNet; its last feature map named for Grad-CAM; ImageNet weights from a local file where given."""
    inputs = keras.Input(input_shape, name="image")  # (b, s, s, c)
    features = backbone_features(name, inputs, weights)  # (b, s/32, s/32, k)
    x = keras.layers.Identity(name=LAST_CONV)(features)  # (b, s/32, s/32, k): the backbone's last activation, by our name
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)  # (b, k)
    logits = keras.layers.Dense(n_labels, dtype="float32", name=LOGITS)(x)  # (b, n_labels)
    return keras.Model(inputs, logits, name=name)


ARCHITECTURES = {"lightcnn": lightcnn, "lightcnn-gn": functools.partial(lightcnn, norm="group"), "seedcnn": seedcnn, **{name: functools.partial(pretrained, name) for name in BACKBONES}}


@keras.saving.register_keras_serializable("fedimaging")
class WeightedFocalLoss(keras.losses.Loss):
    """Binary cross-entropy on logits per label, positives and negatives of each label weighted, optionally focal.

    loss = mean over labels of w_y * (1 - p_t) ** gamma * BCE(y, z + b), where p_t is the probability given to the true
    class (Lin et al. 2017) and b a per-label offset added to the logits z (0 unless the site's loss is logit-adjusted);
    gamma 0 is plain weighted BCE. The weights and offsets are variables, set per site before it trains
    (set_class_weights, set_logit_offset), so one compiled model serves every site of a worker; they are not model
    weights and never leave the site.
    """

    def __init__(self, n_labels: int, gamma: float = 0.0, name: str = "weighted_focal", **kwargs):
        super().__init__(name=name, **kwargs)
        self.n_labels, self.gamma = n_labels, float(gamma)
        self.positive_weight = keras.Variable(np.ones(n_labels, np.float32), trainable=False, name="positive_weight")
        self.negative_weight = keras.Variable(np.ones(n_labels, np.float32), trainable=False, name="negative_weight")
        self.logit_offset = keras.Variable(np.zeros(n_labels, np.float32), trainable=False, name="logit_offset")

    def call(self, y_true, y_pred):
        """Per-image loss (b,) from labels (b, n_labels) and logits (b, n_labels)."""
        y_true = keras.ops.cast(y_true, y_pred.dtype)
        y_pred = y_pred + keras.ops.cast(self.logit_offset, y_pred.dtype)  # (b, n_labels)
        bce = keras.ops.binary_crossentropy(y_true, y_pred, from_logits=True)  # (b, n_labels)
        weight = y_true * self.positive_weight + (1.0 - y_true) * self.negative_weight  # (b, n_labels)
        if self.gamma:
            p = keras.ops.sigmoid(y_pred)
            p_true = y_true * p + (1.0 - y_true) * (1.0 - p)
            weight = weight * (1.0 - p_true) ** self.gamma
        return keras.ops.mean(weight * bce, axis=-1)

    def get_config(self) -> dict:
        """What rebuilds the loss (its weights are per site and not saved)."""
        return {**super().get_config(), "n_labels": self.n_labels, "gamma": self.gamma}


def class_weights(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Balanced (positive, negative) weights per label (n_labels,) from a site's own labels (n, n_labels): n / (2 n_class);
    1 for a class the site does not have."""
    n, positives = len(labels), labels.sum(axis=0).astype(np.float64)
    negatives = n - positives
    with np.errstate(divide="ignore"):
        pos = np.where(positives > 0, n / (2 * positives), 1.0)
        neg = np.where(negatives > 0, n / (2 * negatives), 1.0)
    return pos.astype(np.float32), neg.astype(np.float32)


def log_prior_odds(labels: np.ndarray) -> np.ndarray:
    """A site's own log prior odds per label (n_labels,) from its labels (n, n_labels), add-one smoothed:
    log((positives + 1) / (negatives + 1))."""
    positives = labels.sum(axis=0).astype(np.float64)
    return np.log((positives + 1) / (len(labels) - positives + 1)).astype(np.float32)


def set_logit_offset(model: keras.Model, offset: np.ndarray) -> None:
    """Set the compiled loss's per-label logit offset for the site about to train."""
    model.loss.logit_offset.assign(offset.astype(np.float32))


def set_class_weights(model: keras.Model, positive: np.ndarray, negative: np.ndarray) -> None:
    """Set the compiled loss's per-label weights for the site about to train."""
    model.loss.positive_weight.assign(positive.astype(np.float32))
    model.loss.negative_weight.assign(negative.astype(np.float32))


@dataclass(frozen=True)
class _Anchor:
    """The global weights a FedProx round starts from; a plain holder, so Keras does not count them as model weights."""

    weights: tuple[tf.Variable, ...]


class ProximalModel(keras.Model):
    """A functional model whose training loss adds FedProx's proximal term mu/2 ||w - w_global||^2 (Li et al. 2020).

    Each hospital sets the anchor w_global (set_anchor) to the global weights before it trains; the term then keeps
    its local steps near the global model when hospitals' data differ. Evaluation losses leave the term out.
    """

    def __init__(self, inputs, outputs, mu: float, **kwargs):
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.mu = float(mu)
        self.anchor = _Anchor(tuple(tf.Variable(w.numpy(), trainable=False) for w in self.trainable_weights))

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        """The compiled loss, plus the proximal term while training."""
        loss = super().compute_loss(x, y, y_pred, sample_weight, training=training)
        if not training:
            return loss
        drift = keras.ops.sum(keras.ops.stack([keras.ops.sum(keras.ops.square(w - a)) for w, a in zip(self.trainable_weights, self.anchor.weights)]))
        return loss + 0.5 * self.mu * drift


def set_anchor(model: keras.Model) -> None:
    """Take the model's current (global) weights as the FedProx anchor; nothing to do for a model without the term."""
    if isinstance(model, ProximalModel):
        for anchor, weight in zip(model.anchor.weights, model.trainable_weights):
            anchor.assign(weight.value)


@contextlib.contextmanager
def _own_python_random(seed: int) -> Iterator[None]:
    """While the block runs, Keras draws the default seeds of its initializers from a generator of its own, seeded:
    it otherwise draws them from Python's global generator, which other threads draw from too (Flower's heartbeat
    jitter), so that the same seed gave different initial weights from run to run."""
    shared = seed_generator.python_random
    seed_generator.python_random = random.Random(seed)
    try:
        yield
    finally:
        seed_generator.python_random = shared


def build_model(
    name: str, input_shape: tuple[int, int, int], n_labels: int, learning_rate: float, focal_gamma: float = 0.0, proximal_mu: float = 0.0,
    seed: int | None = None, backbone_weights: str = "",
) -> keras.Model:  # fmt: skip
    """Build and compile a named architecture: (weighted, optionally focal) binary cross-entropy on logits, one per
    label (multi-label ready), Adam; with FedProx's proximal term when proximal_mu > 0. With a seed, the same initial
    weights every time, whatever other threads do; a backbone's ImageNet weights from backbone_weights (a local file)."""
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown model {name!r}: expected one of {', '.join(ARCHITECTURES)}")
    if backbone_weights and name not in BACKBONES:
        raise ValueError(f"backbone weights are for {', '.join(BACKBONES)}, not model {name!r}")
    build = functools.partial(ARCHITECTURES[name], weights=backbone_weights) if backbone_weights else ARCHITECTURES[name]
    if seed is None:
        model = build(input_shape, n_labels)
    else:
        keras.utils.set_random_seed(seed)
        with _own_python_random(seed):
            model = build(input_shape, n_labels)
    if proximal_mu > 0:
        model = ProximalModel(model.inputs, model.outputs, proximal_mu, name=model.name)
    model.compile(optimizer=keras.optimizers.Adam(learning_rate), loss=WeightedFocalLoss(n_labels, focal_gamma))
    return model


def run_model(cfg: RunConfig) -> keras.Model:
    """The run's model as every hospital trains it: architecture, input, labels, learning rate, loss, FedProx term."""
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    return build_model(cfg.model, (cfg.image_size, cfg.image_size, cfg.channels), len(cfg.labels), cfg.learning_rate, gamma, cfg.proximal_mu)


def weigh_classes(model: keras.Model, labels: np.ndarray, weighting: str) -> None:
    """Set the loss for the site about to train from its own labels (n, n_labels): balanced class weights; or
    logit-adjusted (Menon et al. 2021): the logits shifted by the site's log prior odds while it trains, so that a site
    holding mostly one class learns what separates the classes rather than its own prior (with one class only, its
    loss barely moves the model); or neither."""
    ones = np.ones(labels.shape[1])
    set_class_weights(model, *(class_weights(labels) if weighting == "balanced" else (ones, ones)))
    set_logit_offset(model, log_prior_odds(labels) if weighting == "logit-adjusted" else np.zeros(labels.shape[1]))


def round_learning_rate(cfg: RunConfig, server_round: int) -> float:
    """A hospital's learning rate in a round (1-based): the run's own, or on a cosine from it in round 1 to a tenth of it
    in the last round."""
    if cfg.learning_rate_schedule == "constant" or cfg.num_server_rounds == 1:
        return cfg.learning_rate
    progress = (min(max(server_round, 1), cfg.num_server_rounds) - 1) / (cfg.num_server_rounds - 1)
    return cfg.learning_rate * (0.1 + 0.9 * (1 + float(np.cos(np.pi * progress))) / 2)


def reset_optimizer(model: keras.Model) -> None:
    """Zero the optimizer's step count and moment estimates, keeping its learning rate, so a reused model starts each round fresh."""
    optimizer = model.optimizer
    if not optimizer.built:
        return
    learning_rate = float(keras.ops.convert_to_numpy(optimizer.learning_rate))
    for variable in optimizer.variables:
        variable.assign(np.zeros(variable.shape, variable.dtype))
    optimizer.learning_rate = learning_rate


def load_initial_weights(model: keras.Model, path: str) -> None:
    """Set the model's weights from a local .keras model or .weights.h5 file of the same architecture."""
    try:
        if path.endswith(".keras"):
            source = keras.models.load_model(path, compile=False)
            model.set_weights(source.get_weights())
        else:
            model.load_weights(path)
    except (ValueError, OSError) as exc:
        raise ValueError(f"initial weights {Path(path).name}: do not fit model {model.name!r}: {exc}") from exc
