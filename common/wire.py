"""What crosses the wire: the record keys, packing replies on a client, and validating them where they arrive.

A train reply holds the site's new weights, its number of training images, its mean training loss and the number of
files it skipped as unreadable; an
evaluate reply holds its number of validation images, its confusion counts at the run's threshold and, per label,
histograms of its logits for positives and negatives. Both carry the site's name (Flower's aggregation hooks do not
say which hospital a reply came from). Nothing else leaves a hospital: no image, no per-patient score.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

ARRAYS = "arrays"  # ArrayRecord: model weights, in the model's get_weights() order
METRICS = "metrics"  # MetricRecord
SITE = "site"  # ConfigRecord holding SITE_NAME and SITE_LABELS
SITE_NAME = "site-name"
SITE_LABELS = "labels"  # the label names the site's counts are for, in order
RUN_FOLDER = "run-folder"  # server -> client, in the ConfigRecord "config": where a simulated hospital keeps its report

NUM_EXAMPLES = "num-examples"  # images, never batches: FedAvg weighs by it
TRAIN_LOSS = "train-loss"
SKIPPED = "skipped-files"  # files the site left out as unreadable (skip-unreadable): a count only
CONFUSION = "confusion"  # (n_labels, 4) TP, FP, TN, FN, flattened
HIST_POS = "hist-pos"  # (n_labels, n_bins), flattened
HIST_NEG = "hist-neg"

TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, SKIPPED})
EVALUATE_METRIC_KEYS = frozenset({NUM_EXAMPLES, CONFUSION, HIST_POS, HIST_NEG})
COUNTS_ONLY_METRIC_KEYS = frozenset({NUM_EXAMPLES, CONFUSION})  # a site below min-histogram-images sends no histograms


class ReplyError(ValueError):
    """A reply that cannot be used; the message says what was wrong with it."""


@dataclass(frozen=True)
class TrainReply:
    """A validated train reply."""

    site: str
    num_examples: int
    train_loss: float
    skipped: int  # unreadable files the site left out
    weights: list[np.ndarray]


@dataclass(frozen=True)
class EvaluateReply:
    """A validated evaluate reply."""

    site: str
    num_examples: int
    counts: np.ndarray  # (n_labels, 4) int64
    pos: np.ndarray | None  # (n_labels, n_bins) int64; None from a site too small to send histograms
    neg: np.ndarray | None  # (n_labels, n_bins) int64


def _site_record(site: str, labels: tuple[str, ...]) -> ConfigRecord:
    """Who is replying and for which labels."""
    return ConfigRecord({SITE_NAME: site, SITE_LABELS: list(labels)})


def pack_train_reply(
    site: str, labels: tuple[str, ...], weights: list[np.ndarray], num_examples: int, train_loss: float, skipped: int = 0
) -> RecordDict:
    """The content of a train reply."""
    return RecordDict(
        {
            ARRAYS: ArrayRecord(weights),
            METRICS: MetricRecord({NUM_EXAMPLES: int(num_examples), TRAIN_LOSS: float(train_loss), SKIPPED: int(skipped)}),
            SITE: _site_record(site, labels),
        }
    )


def pack_evaluate_reply(
    site: str, labels: tuple[str, ...], num_examples: int, counts: np.ndarray, pos: np.ndarray | None, neg: np.ndarray | None
) -> RecordDict:
    """The content of an evaluate reply; without histograms when pos and neg are None."""
    metrics = {NUM_EXAMPLES: int(num_examples), CONFUSION: [int(v) for v in counts.reshape(-1)]}
    if pos is not None and neg is not None:
        metrics |= {HIST_POS: [int(v) for v in pos.reshape(-1)], HIST_NEG: [int(v) for v in neg.reshape(-1)]}
    return RecordDict({METRICS: MetricRecord(metrics), SITE: _site_record(site, labels)})


def reply_site(content: RecordDict, labels: tuple[str, ...]) -> str:
    """The site name a reply carries, after checking that its labels are the run's; or raise ReplyError."""
    record = content.config_records.get(SITE)
    if record is None or not isinstance(record.get(SITE_NAME), str):
        raise ReplyError(f"no site name (expected ConfigRecord {SITE!r} with key {SITE_NAME!r})")
    if tuple(record.get(SITE_LABELS, ())) != tuple(labels):
        raise ReplyError(f"labels {list(record.get(SITE_LABELS, []))} do not match the run's {list(labels)}")
    return record[SITE_NAME]


def _metrics(content: RecordDict, *allowed: frozenset[str]) -> MetricRecord:
    """The reply's MetricRecord, checked to hold exactly one of the allowed key sets."""
    if set(content.metric_records) != {METRICS}:
        raise ReplyError(f"expected one MetricRecord {METRICS!r}, got {sorted(content.metric_records)}")
    metrics = content.metric_records[METRICS]
    if set(metrics) not in allowed:
        raise ReplyError(f"metrics keys {sorted(metrics)} differ from the expected {sorted(allowed[0])}")
    n = metrics[NUM_EXAMPLES]
    if not isinstance(n, int) or n <= 0:
        raise ReplyError(f"{NUM_EXAMPLES} = {n!r}: expected a positive number of images")
    return metrics


def parse_train_reply(content: RecordDict, shapes: list[tuple[int, ...]], labels: tuple[str, ...]) -> TrainReply:
    """Validate a train reply against the global model's weight shapes and the run's labels."""
    site = reply_site(content, labels)
    metrics = _metrics(content, TRAIN_METRIC_KEYS)
    if set(content.array_records) != {ARRAYS}:
        raise ReplyError(f"expected one ArrayRecord {ARRAYS!r}, got {sorted(content.array_records)}")
    weights = content.array_records[ARRAYS].to_numpy_ndarrays()
    got = [tuple(w.shape) for w in weights]
    if got != [tuple(s) for s in shapes]:
        raise ReplyError(f"weights have shapes {got}, the global model has {shapes}")
    for i, w in enumerate(weights):
        if not np.issubdtype(w.dtype, np.floating) or not np.isfinite(w).all():
            raise ReplyError(f"weight array {i} holds non-finite or non-float values ({w.dtype})")
    loss = metrics[TRAIN_LOSS]
    if not isinstance(loss, float) or not math.isfinite(loss):
        raise ReplyError(f"{TRAIN_LOSS} = {loss!r}: expected a finite number")
    skipped = metrics[SKIPPED]
    if not isinstance(skipped, int) or skipped < 0:
        raise ReplyError(f"{SKIPPED} = {skipped!r}: expected a count >= 0")
    return TrainReply(site, metrics[NUM_EXAMPLES], loss, skipped, weights)


def _int_array(metrics: MetricRecord, key: str, shape: tuple[int, int]) -> np.ndarray:
    """A flattened non-negative integer list from the metrics, reshaped, or raise ReplyError."""
    values = metrics[key]
    if not isinstance(values, list) or len(values) != shape[0] * shape[1] or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ReplyError(f"{key}: expected {shape[0] * shape[1]} non-negative integers ({shape[0]} x {shape[1]})")
    return np.asarray(values, np.int64).reshape(shape)


def parse_evaluate_reply(content: RecordDict, labels: tuple[str, ...], n_bins: int) -> EvaluateReply:
    """Validate an evaluate reply: labels, shapes, non-negative counts, and counts that agree with the histograms."""
    site = reply_site(content, labels)
    metrics = _metrics(content, EVALUATE_METRIC_KEYS, COUNTS_ONLY_METRIC_KEYS)
    if content.array_records:
        raise ReplyError(f"an evaluate reply carries no arrays, got {sorted(content.array_records)}")
    n_labels, n = len(labels), metrics[NUM_EXAMPLES]
    counts = _int_array(metrics, CONFUSION, (n_labels, 4))
    pos = neg = None
    if HIST_POS in metrics:
        pos = _int_array(metrics, HIST_POS, (n_labels, n_bins))
        neg = _int_array(metrics, HIST_NEG, (n_labels, n_bins))
    for j in range(n_labels):
        tp, fp, tn, fn = counts[j]
        if tp + fp + tn + fn != n or (pos is not None and (pos[j].sum() != tp + fn or neg[j].sum() != fp + tn)):
            raise ReplyError(
                f"label {labels[j]!r}: confusion counts {counts[j].tolist()} disagree with the histograms or with {NUM_EXAMPLES} = {n}"
            )
    return EvaluateReply(site, n, counts, pos, neg)


def payload_digest(content: RecordDict) -> str:
    """SHA-256 of a message's content as it crosses the wire: each record's name and kind, then its keys and values
    (for arrays: dtype, shape and bytes, in order); computed alike where it is sent and where it arrives."""
    digest = hashlib.sha256()
    for name in sorted(content.keys()):
        record = content[name]
        digest.update(f"{name}:{type(record).__name__}\n".encode())
        if isinstance(record, ArrayRecord):
            for key in record.keys():
                array = record[key]
                digest.update(f"{key}:{array.dtype}:{list(array.shape)}\n".encode())
                digest.update(array.data)
        else:
            digest.update(json.dumps(dict(record), sort_keys=True).encode())
    return digest.hexdigest()


def payload_summary(content: RecordDict) -> dict:
    """What a message carries, for a hospital's audit log: each record's keys, array shapes and sizes, metric values
    (lists by their length), total bytes, and the payload's SHA-256."""
    arrays, values, total = [], {}, 0
    for name in sorted(content.keys()):
        record = content[name]
        if isinstance(record, ArrayRecord):
            for key in record.keys():
                array = record[key]
                arrays.append({"record": name, "key": key, "shape": list(array.shape), "dtype": array.dtype, "bytes": len(array.data)})
                total += len(array.data)
        else:
            for key, value in record.items():
                values[f"{name}.{key}"] = f"{len(value)} values" if isinstance(value, list) and key not in (SITE_LABELS,) else value
                total += len(json.dumps(value))
    return {"records": sorted(content.keys()), "arrays": arrays, "values": values, "bytes": total, "sha256": payload_digest(content)}
