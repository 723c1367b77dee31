"""A hospital's local work: load its site once, train the shared CNN on it, score its validation images (applying the
histogram floor, the run's or the hospital's own where higher, before anything leaves), and answer the server's
held-out overlap question. client/hospital.py calls these and packs what they return.

TensorFlow lives here and not in the Flower handlers (client/app.py), so that a deployed hospital's per-message
ClientApp processes need not import it: a long-lived worker (client/worker.py) runs these functions instead.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections import OrderedDict
from dataclasses import dataclass

# Before TensorFlow loads in this process: its C++ info and warning lines repeat in every worker of a simulation and
# bury the progress lines (errors still print). An operator's own setting wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
warnings.filterwarnings("ignore", message="__array__ implementation doesn't accept a copy keyword", category=DeprecationWarning)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from client.results import Matched, Scored, Trained  # noqa: E402
from common.atomic import write_csv  # noqa: E402
from common.bin_floor import floor_intervals  # noqa: E402
from common.config import RunConfig, parse_run_config  # noqa: E402
from common.metrics import figures, statistics, threshold_edge  # noqa: E402
from common.model import reset_optimizer, round_learning_rate, run_model, set_anchor, weigh_classes  # noqa: E402
from common.pipeline import batches, dataset, decoded  # noqa: E402
from common.privacy import add_gaussian_noise, clip_update, local_stddev  # noqa: E402
from common.runtime import configure_tensorflow  # noqa: E402
from common.scan import NOT_AN_IMAGE, UNREADABLE  # noqa: E402
from common.site_data import SiteData, hospital_site  # noqa: E402
from common.site_file import Augmentation, DicomSettings  # noqa: E402
from common.wire import answer_overlap_query  # noqa: E402


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple) -> RunConfig:
    """The parsed run configuration (one parse per process and run)."""
    return parse_run_config(dict(items))


@dataclass(frozen=True)
class _Site:
    """A hospital's data and its input pipelines, kept while the process serves it (a cached pipeline keeps its images)."""

    data: SiteData
    train: tf.data.Dataset  # the training images decoded, unbatched, in file order (batched anew each round)
    val: tf.data.Dataset
    floor: int  # the histogram floor: the run's min-bin-images, or the site's policy where that is higher
    seed: int  # the run's seed plus the site's own
    augmentation: Augmentation


LEFT_OUT = "left_out.csv"  # in a site's report-dir: every file left out (holding no image, or unreadable and skipped) and why
SITE_CACHE_BYTES = 2 << 30  # a process keeps the sites it served while their decoded images fit in this; then the oldest go
_sites: OrderedDict[tuple, _Site] = OrderedDict()  # least recently served first


def _site_bytes(cfg: RunConfig, data: SiteData) -> int:
    """The memory a site's decoded images take at the model's input size (what its pipelines keep)."""
    return (len(data.train) + len(data.val)) * cfg.image_size**2 * cfg.channels * 4


def _site(cfg: RunConfig, node_config: tuple) -> _Site:
    """This node's site: read, checked and split once, then kept while the process's site cache has room.

    A simulation worker serves many hospitals in turn; keeping every one it met would hold the whole federation's
    images, so sites beyond SITE_CACHE_BYTES are dropped, least recently served first (the current one always stays).
    """
    key = (cfg, node_config)
    if key in _sites:
        _sites.move_to_end(key)
        return _sites[key]
    site = _sites[key] = _load_site(cfg, dict(node_config))
    while len(_sites) > 1 and sum(_site_bytes(k[0], s.data) for k, s in _sites.items()) > SITE_CACHE_BYTES:
        _sites.popitem(last=False)
    return site


def _load_site(cfg: RunConfig, node_config: dict) -> _Site:
    """Read a site and build its input pipelines."""
    data, site = hospital_site(cfg, node_config)
    device = configure_tensorflow(cfg.threads_per_client, site.gpu if site is not None else 0, cfg.mixed_precision)
    if site is not None:
        left = f"; left out {len(data.left_out)} file(s), listed in {site.report_dir / LEFT_OUT}" if len(data.left_out) else ""
        print(f"[{data.name}] {len(data.train)} training and {len(data.val)} validation images{left}; training on {device}", flush=True)
        if site.report_dir is not None:
            site.report_dir.mkdir(parents=True, exist_ok=True)
            write_csv(site.report_dir / LEFT_OUT, data.left_out)
    augmentation, dicom = (site.augmentation, site.dicom) if site is not None else (Augmentation(), DicomSettings())
    seed = cfg.seed + (site.seed if site is not None else 0)
    train = decoded(data.train, cfg, dicom=dicom, fit=data.fit)
    floor = max(cfg.min_bin_images, site.policy.min_bin_images if site is not None else 0)
    return _Site(data, train, dataset(data.val, cfg, training=False, dicom=dicom, fit=data.fit), floor, seed, augmentation)


@functools.lru_cache(maxsize=1)
def _model(cfg: RunConfig) -> keras.Model:
    """The compiled model, built once per process and reused across rounds and hospitals."""
    keras.backend.clear_session()  # a new architecture: drop the graphs of the previous one
    return run_model(cfg)


def _setup(run_config: dict, node_config: dict, weights: list[np.ndarray], server_round: int | None = None) -> tuple[RunConfig, _Site, keras.Model]:
    """Parse the run, load this hospital's data and the global weights into the process's model. To train in a
    deterministic run the model is built afresh from the round's seed (its dropout draws then owe nothing to what the
    process did before) and TensorFlow's ops run deterministically."""
    cfg = _run_config(tuple(sorted(run_config.items())))
    site = _site(cfg, tuple(sorted(node_config.items())))
    if cfg.deterministic and server_round is not None:
        _model.cache_clear()
        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(round_seed(site.seed, server_round))
    model = _model(cfg)
    model.set_weights(weights)
    return cfg, site, model


def round_seed(seed: int, server_round: int) -> int:
    """The seed of a site's training in one round: the same site and round draw the same order and augmentation in any
    process, before or after a resume."""
    return int(np.random.SeedSequence([seed, server_round]).generate_state(1)[0])


def train(run_config: dict, node_config: dict, weights: list[np.ndarray], server_round: int = 0) -> Trained:
    """Fit the global weights on this hospital's training images for the run's local epochs."""
    cfg, site, model = _setup(run_config, node_config, weights, server_round)
    reset_optimizer(model)
    model.optimizer.learning_rate = round_learning_rate(cfg, server_round)
    set_anchor(model)  # FedProx: the global weights just received
    labels = site.data.train.labels
    weigh_classes(model, labels, cfg.class_weighting)
    images = batches(site.train, len(labels), cfg, training=True, seed=round_seed(site.seed, server_round), augmentation=site.augmentation)
    history = model.fit(images, epochs=cfg.local_epochs, shuffle=False, verbose=0)  # the pipeline shuffles
    data = site.data
    loss = float(history.history["loss"][-1]) if cfg.dp == "off" else 0.0  # under DP nothing un-noised about the training leaves
    return Trained(data.name, private(cfg, model.get_weights(), weights), len(labels), loss, data.count(UNREADABLE), data.count(NOT_AN_IMAGE))


def private(cfg: RunConfig, trained: list[np.ndarray], received: list[np.ndarray]) -> list[np.ndarray]:
    """The weights as they may leave the hospital under the run's differential privacy: the update clipped to
    dp-clip-norm, and with dp = local noised here too (from the operating system's entropy: never repeatable)."""
    if cfg.dp == "off":
        return trained
    clipped, _ = clip_update(trained, received, cfg.dp_clip_norm)
    if cfg.dp == "local":
        return add_gaussian_noise(clipped, local_stddev(cfg.dp_noise_multiplier, cfg.dp_clip_norm), np.random.default_rng())
    return clipped


def score(run_config: dict, node_config: dict, weights: list[np.ndarray]) -> Scored:
    """Score this hospital's validation images with the global weights: its own exact figures for its report, and for
    the server only the score intervals the histogram floor allows (common/bin_floor.py), applied here, at the hospital."""
    cfg, site, model = _setup(run_config, node_config, weights)
    logits = model.predict(site.val, verbose=0)  # (n, n_labels), in the order of val
    counts, pos, neg = statistics(logits, site.data.val.labels, cfg.threshold, cfg.histogram_bins)
    root = threshold_edge(cfg.histogram_bins, cfg.threshold) + 1  # the first bin above the run's threshold
    intervals = [floor_intervals(pos[j], neg[j], site.floor, root) for j in range(len(cfg.labels))]
    own = figures(counts, pos, neg, cfg.labels)
    return Scored(site.data.name, len(site.data.val), intervals, own, len(site.data.left_out))


def overlap(run_config: dict, node_config: dict, query: tuple[bytes, list[str], bool]) -> Matched:
    """How many of this hospital's images (training and validation) have the pixels of one of the server's held-out
    images, from the keyed digests the server sent; and which held-out images, when the server asks."""
    cfg = _run_config(tuple(sorted(run_config.items())))
    site = _site(cfg, tuple(sorted(node_config.items())))
    count, rows = answer_overlap_query(*query, site.data.digests)
    return Matched(site.data.name, count, rows)
