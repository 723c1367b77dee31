"""The ImageNet backbones chest X-ray work uses (keras.applications), fed this product's images: grey or RGB in [0, 1],
turned into the three channels and the scaling each backbone's published ImageNet weights expect.

Weights come only from a local file (the published `*_notop.h5`, Keras's older HDF5 format; nothing is downloaded).
EfficientNet carries its own input scaling layers: a Rescaling and a Normalization whose published statistics hold
standard deviations where Keras reads variances (tensorflow#49930), whose integer count no hospital's reply may carry,
and which does not see weights set by `set_weights` (how every hospital receives the global model). So those layers
are taken out (identity) and the input layer here does EfficientNet's ImageNet normalisation itself, the same at the
server and at every hospital; a weights file's statistics are checked to be ImageNet's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

IMAGENET_MEAN_RGB = (0.485, 0.456, 0.406)
IMAGENET_STD_RGB = (0.229, 0.224, 0.225)
CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)  # ResNet50's weights: BGR, 0-255, mean-subtracted (keras.applications' "caffe" mode)
MIN_SIZE = 32  # each of keras.applications' backbones needs at least 32x32 without its top


@dataclass(frozen=True)
class Backbone:
    """A keras.applications backbone: its constructor's name, the input scaling its ImageNet weights expect, the
    published weights file a hospital fetches once."""

    application: str
    scaling: str  # torch: (x - mean) / std on [0, 1]; caffe: BGR 0-255 minus the mean
    weights_file: str


BACKBONES = {
    "densenet121": Backbone("DenseNet121", "torch", "densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "resnet50": Backbone("ResNet50", "caffe", "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5"),
    "efficientnetb0": Backbone("EfficientNetB0", "torch", "efficientnetb0_notop.h5"),
}


@keras.saving.register_keras_serializable("fedimaging")
class ImagenetInput(keras.layers.Layer):
    """Images (b, h, w, 1 or 3) in [0, 1] as (b, h, w, 3) scaled as a backbone's ImageNet weights expect: a grey
    channel repeated into R, G and B, then the backbone's own scaling. No weights: nothing here is federated."""

    def __init__(self, scaling: str, **kwargs):
        super().__init__(**kwargs)
        if scaling not in ("torch", "caffe"):
            raise ValueError(f"unknown input scaling {scaling!r}")
        self.scaling = scaling

    def call(self, images):
        """(b, h, w, c) in [0, 1] -> (b, h, w, 3)."""
        rgb = keras.ops.repeat(images, 3, axis=-1) if images.shape[-1] == 1 else images  # (b, h, w, 3)
        if self.scaling == "caffe":
            bgr = keras.ops.flip(rgb, axis=-1)  # (b, h, w, 3)
            return bgr * 255.0 - keras.ops.convert_to_tensor(CAFFE_MEAN_BGR, dtype=rgb.dtype)
        mean = keras.ops.convert_to_tensor(IMAGENET_MEAN_RGB, dtype=rgb.dtype)
        std = keras.ops.convert_to_tensor(IMAGENET_STD_RGB, dtype=rgb.dtype)
        return (rgb - mean) / std  # (b, h, w, 3)

    def compute_output_shape(self, input_shape):
        """The same image, three channels."""
        return (*input_shape[:-1], 3)

    def get_config(self) -> dict:
        """What rebuilds the layer."""
        return {**super().get_config(), "scaling": self.scaling}


def backbone_features(name: str, images, weights: str = ""):
    """The backbone's last feature map (b, h/32, w/32, k) on an image input (b, h, w, c), its layers in the caller's
    model (not nested: Grad-CAM's randomisation test reaches each block); ImageNet weights from a local file if given."""
    spec = BACKBONES[name]
    if min(images.shape[1:3]) < MIN_SIZE:
        raise ValueError(f"model {name!r} needs images of at least {MIN_SIZE}x{MIN_SIZE}, not {images.shape[1]}x{images.shape[2]}")
    scaled = ImagenetInput(spec.scaling, name="imagenet_input")(images)  # (b, h, w, 3)
    application = getattr(keras.applications, spec.application)
    try:
        model = application(include_top=False, weights=weights or None, input_tensor=scaled)
    except (ValueError, OSError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"backbone-weights {Path(weights).name}: not {spec.application}'s ImageNet weights without its top "
            f"(keras.applications' {spec.weights_file}): {first}"
        ) from None
    _check_input_statistics(model, weights)
    inside = keras.models.clone_model(model, input_tensors=[images], clone_function=_without_input_scaling)  # the same layers, less two
    return inside.output


def _without_input_scaling(layer: keras.Layer) -> keras.Layer:
    """The layer itself (its weights shared), or an identity in place of a backbone's own input scaling."""
    if isinstance(layer, (keras.layers.Rescaling, keras.layers.Normalization)):
        return keras.layers.Identity(name=layer.name)
    return layer


def _check_input_statistics(model: keras.Model, weights: str) -> None:
    """A weights file's input statistics (EfficientNet's Normalization) must be keras.applications' ImageNet ones
    (standard deviations in place of variances, as published), or the file is refused."""
    for layer in model.layers:
        if weights and isinstance(layer, keras.layers.Normalization):
            mean, variance = np.asarray(layer.adapt_mean), np.asarray(layer.adapt_variance)
            if not (np.allclose(mean, IMAGENET_MEAN_RGB, atol=1e-3) and np.allclose(variance, IMAGENET_STD_RGB, atol=1e-3)):
                raise ValueError(
                    f"backbone-weights {Path(weights).name}: its input normalisation ({np.round(mean, 3).tolist()}, "
                    f"{np.round(variance, 3).tolist()}) is not keras.applications' ImageNet one"
                )
