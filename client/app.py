"""The hospital's ClientApp: train the shared CNN on local images; report counts and score histograms, never images."""

from __future__ import annotations

import functools
import os
import warnings
from pathlib import Path

# Before TensorFlow loads in this worker: its C++ info and warning lines repeat in every worker of a simulation and
# bury the progress lines (errors still print). An operator's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning)

import keras  # noqa: E402
import numpy as np  # noqa: E402
from flwr.app import Context, Message  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from common import wire  # noqa: E402
from common.config import RunConfig, parse_run_config  # noqa: E402
from common.data import ImageSet  # noqa: E402
from common.metrics import figures, statistics  # noqa: E402
from common.model import build_model, reset_optimizer  # noqa: E402
from common.partition import hospital_data  # noqa: E402
from common.runtime import configure_tensorflow  # noqa: E402
from common.site_report import append_site_report  # noqa: E402

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    """The parsed run configuration (one parse per worker and run)."""
    return parse_run_config(dict(items))


@functools.lru_cache(maxsize=16)
def _site(cfg: RunConfig, hospital: int) -> tuple[str, ImageSet, ImageSet]:
    """(site name, train, validation) of a simulated hospital, kept while the worker serves it."""
    train, val = hospital_data(cfg, hospital)
    return f"hospital-{hospital}", train, val


@functools.lru_cache(maxsize=1)
def _model(name: str, input_shape: tuple[int, int, int], n_labels: int, learning_rate: float) -> keras.Model:
    """The compiled model, built once per worker and reused across rounds and hospitals."""
    keras.backend.clear_session()  # a new architecture: drop the graphs of the previous one
    return build_model(name, input_shape, n_labels, learning_rate)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, str, ImageSet, ImageSet, keras.Model]:
    """Parse the run, load this hospital's data and the global weights into the worker's model."""
    cfg = _run_config(tuple(sorted(context.run_config.items())))
    configure_tensorflow(cfg.threads_per_client)
    hospital = int(context.node_config["partition-id"])
    site, train, val = _site(cfg, hospital)
    model = _model(cfg.model, train.images.shape[1:], len(cfg.labels), cfg.learning_rate)
    weights = msg.content[wire.ARRAYS].to_numpy_ndarrays()
    model.set_weights(weights)
    return cfg, site, train, val, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the global model on this hospital's training images and send back weights, image count and loss."""
    cfg, site, train_set, _, model = _setup(msg, context)
    reset_optimizer(model)
    history = model.fit(
        train_set.images, train_set.labels.astype(np.float32), epochs=cfg.local_epochs, batch_size=cfg.batch_size, shuffle=True, verbose=0
    )
    loss = float(history.history["loss"][-1])
    content = wire.pack_train_reply(site, cfg.labels, model.get_weights(), len(train_set), loss)
    return Message(content=content, reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this hospital's validation images with the global model; send counts and histograms only.

    The hospital keeps its own report of how the global model does on its patients, round by round.
    """
    cfg, site, _, val, model = _setup(msg, context)
    logits = model.predict(val.images, batch_size=256, verbose=0)  # (n, n_labels)
    counts, pos, neg = statistics(logits, val.labels, cfg.threshold, cfg.histogram_bins)
    config = msg.content.config_records.get("config", {})
    if wire.RUN_FOLDER in config:
        append_site_report(Path(config[wire.RUN_FOLDER]) / "hospitals" / site, int(config["server-round"]), len(val), figures(counts, pos, neg, cfg.labels))
    if len(val) < cfg.min_histogram_images:  # too few patients: fine bins would come close to listing their scores
        pos = neg = None
    return Message(content=wire.pack_evaluate_reply(site, cfg.labels, len(val), counts, pos, neg), reply_to=msg)
