"""The hospital's ClientApp: train the shared CNN on local images; report counts and score histograms, never images."""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

# Before TensorFlow loads in this worker: its C++ info and warning lines repeat in every worker of a simulation and
# bury the progress lines (errors still print). An operator's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from flwr.app import Context, Message, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402

from common import wire  # noqa: E402
from common.audit import append_audit  # noqa: E402
from common.config import Augmentation, DicomSettings, RunConfig, parse_run_config  # noqa: E402
from common.metrics import figures, statistics  # noqa: E402
from common.model import build_model, class_weights, reset_optimizer, set_class_weights  # noqa: E402
from common.pipeline import dataset  # noqa: E402
from common.runtime import configure_tensorflow  # noqa: E402
from common.site_data import SiteData, hospital_site  # noqa: E402
from common.site_report import append_site_report  # noqa: E402

app = ClientApp()


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    """The parsed run configuration (one parse per worker and run)."""
    return parse_run_config(dict(items))


@dataclass(frozen=True)
class _Site:
    """A hospital's data and its input pipelines, kept while the worker serves it (a cached pipeline keeps its images)."""

    data: SiteData
    train: tf.data.Dataset
    val: tf.data.Dataset
    folder: Path | None  # the site file's report-dir; None for a simulated hospital (it reports into the run folder)


@functools.lru_cache(maxsize=16)
def _site(cfg: RunConfig, node_config: tuple) -> _Site:
    """This node's site: read, checked and split once per worker."""
    data, site = hospital_site(cfg, dict(node_config))
    device = configure_tensorflow(cfg.threads_per_client, site.gpu if site is not None else 0, cfg.mixed_precision)
    if site is not None:
        print(f"[{data.name}] {len(data.train)} training and {len(data.val)} validation images; training on {device}", flush=True)
    augmentation, dicom = (site.augmentation, site.dicom) if site is not None else (Augmentation(), DicomSettings())
    seed = cfg.seed + (site.seed if site is not None else 0)
    train = dataset(data.train, cfg, training=True, seed=seed, augmentation=augmentation, dicom=dicom)
    return _Site(data, train, dataset(data.val, cfg, training=False, dicom=dicom), site.report_dir if site is not None else None)


def _reply(msg: Message, content: RecordDict, context: Context, site: _Site) -> Message:
    """The reply to a message, written to the site's audit log before it leaves."""
    folder = _site_folder(msg, site)
    if folder is not None:
        config = msg.content.config_records.get("config", {})
        append_audit(folder, content, context.run_id, int(config.get("server-round", 0)), msg.metadata.message_type, site.data.name)
    return Message(content=content, reply_to=msg)


def _site_folder(msg: Message, site: _Site) -> Path | None:
    """Where this site keeps its report and audit log: its site file's report-dir, else (a simulated hospital) its
    folder in the run folder the server names, else nowhere."""
    if site.folder is not None:
        return site.folder
    config = msg.content.config_records.get("config", {})
    return Path(config[wire.RUN_FOLDER]) / "hospitals" / site.data.name if wire.RUN_FOLDER in config else None


@functools.lru_cache(maxsize=1)
def _model(cfg: RunConfig) -> keras.Model:
    """The compiled model, built once per worker and reused across rounds and hospitals."""
    keras.backend.clear_session()  # a new architecture: drop the graphs of the previous one
    gamma = cfg.focal_gamma if cfg.loss == "focal" else 0.0
    return build_model(cfg.model, (cfg.image_size, cfg.image_size, cfg.channels), len(cfg.labels), cfg.learning_rate, gamma)


def _setup(msg: Message, context: Context) -> tuple[RunConfig, _Site, keras.Model]:
    """Parse the run, load this hospital's data and the global weights into the worker's model."""
    cfg = _run_config(tuple(sorted(context.run_config.items())))
    site = _site(cfg, tuple(sorted(context.node_config.items())))
    model = _model(cfg)
    model.set_weights(msg.content[wire.ARRAYS].to_numpy_ndarrays())
    return cfg, site, model


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Fit the global model on this hospital's training images and send back weights, image count, loss and the number
    of files it skipped as unreadable."""
    cfg, site, model = _setup(msg, context)
    reset_optimizer(model)
    labels = site.data.train.labels
    if cfg.class_weighting == "balanced":
        set_class_weights(model, *class_weights(labels))
    else:
        set_class_weights(model, np.ones(labels.shape[1]), np.ones(labels.shape[1]))
    history = model.fit(site.train, epochs=cfg.local_epochs, shuffle=False, verbose=0)  # the pipeline shuffles
    loss = float(history.history["loss"][-1])
    content = wire.pack_train_reply(site.data.name, cfg.labels, model.get_weights(), len(labels), loss, len(site.data.unreadable))
    return _reply(msg, content, context, site)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Score this hospital's validation images with the global model; send counts and histograms only.

    The hospital keeps its own report of how the global model does on its patients, round by round.
    """
    cfg, site, model = _setup(msg, context)
    val = site.data.val
    logits = model.predict(site.val, verbose=0)  # (n, n_labels), in the order of val
    counts, pos, neg = statistics(logits, val.labels, cfg.threshold, cfg.histogram_bins)
    folder = _site_folder(msg, site)
    if folder is not None:
        server_round = int(msg.content.config_records.get("config", {}).get("server-round", 0))
        append_site_report(folder, server_round, len(val), figures(counts, pos, neg, cfg.labels), site.data.unreadable)
    if len(val) < cfg.min_histogram_images:  # too few patients: fine bins would come close to listing their scores
        pos = neg = None
    return _reply(msg, wire.pack_evaluate_reply(site.data.name, cfg.labels, len(val), counts, pos, neg), context, site)
