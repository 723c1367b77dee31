"""What crosses the wire: the record keys, packing replies on a client, and validating them where they arrive.

A train reply holds the site's new weights, its number of training images, its mean training loss and the numbers
of files it left out (unreadable, skipped; holding no image); an evaluate reply holds its number of validation
images and, per label, how many of its positives and negatives scored in each interval of the run's bin tree that
the histogram floor allows (common/bin_floor.py). An overlap reply holds how many of the site's images equal one of
the server's held-out images (and, when the run asks, which held-out images). Each carries the site's name (Flower's
aggregation hooks do not say which hospital a reply came from). A failed message carries one line: the site's name
and what went wrong. Nothing else leaves a hospital: no image, no per-patient score.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from common.bin_floor import Intervals, breaks_floor

ARRAYS = "arrays"  # ArrayRecord: model weights, in the model's get_weights() order
METRICS = "metrics"  # MetricRecord
SITE = "site"  # ConfigRecord holding SITE_NAME and SITE_LABELS
SITE_NAME = "site-name"
SITE_LABELS = "labels"  # the label names the site's counts are for, in order
RUN_FOLDER = "run-folder"  # server -> client, in the ConfigRecord "config": where a simulated hospital keeps its report

NUM_EXAMPLES = "num-examples"  # images, never batches: FedAvg weighs by it
TRAIN_LOSS = "train-loss"
SKIPPED = "skipped-files"  # files the site left out as unreadable (skip-unreadable): a count only
NOT_IMAGES = "not-images"  # files that hold no image (a DICOMDIR, an RT plan): a count only
HIST_INTERVALS = "hist-intervals"  # (n_labels,) how many score intervals each label has
HIST_STARTS = "hist-starts"  # each interval's first bin, label after label
HIST_POS = "hist-pos"  # positives per interval, label after label
HIST_NEG = "hist-neg"  # negatives per interval

OVERLAP_KEY = "overlap-key"  # server -> client, query: the run's key for the held-out digests (hex)
OVERLAP_DIGESTS = "overlap-digests"  # server -> client: HMAC-SHA256 under that key of each held-out image's pixel digest
OVERLAP_WHICH = "overlap-which"  # server -> client: 1 when the site should say which held-out images it holds
OVERLAP_COUNT = "overlap-count"  # client -> server: how many of the site's images equal a held-out image
OVERLAP_ROWS = "overlap-rows"  # client -> server, only when asked: the held-out images (positions in the list) it holds

TRAIN_METRIC_KEYS = frozenset({NUM_EXAMPLES, TRAIN_LOSS, SKIPPED, NOT_IMAGES})
EVALUATE_METRIC_KEYS = frozenset({NUM_EXAMPLES, HIST_INTERVALS, HIST_STARTS, HIST_POS, HIST_NEG})


class ReplyError(ValueError):
    """A reply that cannot be used; the message says what was wrong with it."""


@dataclass(frozen=True)
class TrainReply:
    """A validated train reply."""

    site: str
    num_examples: int
    train_loss: float
    skipped: int  # unreadable files the site left out
    not_images: int  # files holding no image
    weights: list[np.ndarray]


@dataclass(frozen=True)
class EvaluateReply:
    """A validated evaluate reply."""

    site: str
    num_examples: int
    intervals: list[Intervals]  # one per label: the site's validation scores as the histogram floor lets them out


@dataclass(frozen=True)
class OverlapReply:
    """A validated overlap reply."""

    site: str
    count: int  # the site's images equal to a held-out image
    rows: list[int] | None  # which held-out images, where the run asked


def _site_record(site: str, labels: tuple[str, ...]) -> ConfigRecord:
    """Who is replying and for which labels."""
    return ConfigRecord({SITE_NAME: site, SITE_LABELS: list(labels)})


def pack_train_reply(
    site: str, labels: tuple[str, ...], weights: list[np.ndarray], num_examples: int, train_loss: float, skipped: int = 0, not_images: int = 0
) -> RecordDict:
    """The content of a train reply."""
    metrics = {NUM_EXAMPLES: int(num_examples), TRAIN_LOSS: float(train_loss), SKIPPED: int(skipped), NOT_IMAGES: int(not_images)}
    return RecordDict({ARRAYS: ArrayRecord(weights), METRICS: MetricRecord(metrics), SITE: _site_record(site, labels)})


def pack_evaluate_reply(site: str, labels: tuple[str, ...], num_examples: int, intervals: list[Intervals]) -> RecordDict:
    """The content of an evaluate reply: the image count and each label's score intervals."""
    metrics = {
        NUM_EXAMPLES: int(num_examples), HIST_INTERVALS: [len(i.starts) for i in intervals],
        HIST_STARTS: [int(v) for i in intervals for v in i.starts], HIST_POS: [int(v) for i in intervals for v in i.pos],
        HIST_NEG: [int(v) for i in intervals for v in i.neg],
    }  # fmt: skip
    return RecordDict({METRICS: MetricRecord(metrics), SITE: _site_record(site, labels)})


def pack_overlap_query(key: bytes, digests: list[str], which: bool) -> RecordDict:
    """The server's question before training: the held-out images' pixel digests, keyed (digest_under)."""
    return RecordDict({"config": ConfigRecord({OVERLAP_KEY: key.hex(), OVERLAP_DIGESTS: [digest_under(key, d) for d in digests], OVERLAP_WHICH: int(which)})})


def digest_under(key: bytes, digest: str) -> str:
    """A pixel digest under the run's key (HMAC-SHA256): comparable within the run, useless outside it."""
    return hmac.new(key, digest.encode(), hashlib.sha256).hexdigest()


def read_overlap_query(content: RecordDict) -> tuple[bytes, list[str], bool]:
    """(key, keyed held-out digests, whether to say which) of the server's overlap question."""
    config = content.config_records.get("config", {})
    try:
        return bytes.fromhex(config[OVERLAP_KEY]), list(config[OVERLAP_DIGESTS]), bool(config[OVERLAP_WHICH])
    except (KeyError, TypeError, ValueError) as exc:
        raise ReplyError(f"not an overlap query: {type(exc).__name__}: {exc}") from exc


def answer_overlap_query(key: bytes, theirs: list[str], which: bool, own_digests: np.ndarray) -> tuple[int, list[int] | None]:
    """At a hospital: how many of its images (their pixel digests) equal a held-out image, and which held-out images
    when the server asks; nothing about the hospital's other images."""
    position = {d: i for i, d in enumerate(theirs)}
    matched = [position[k] for k in (digest_under(key, d) for d in own_digests if d) if k in position]
    return len(matched), sorted(set(matched)) if which else None


def pack_overlap_reply(site: str, labels: tuple[str, ...], count: int, rows: list[int] | None) -> RecordDict:
    """The content of an overlap reply."""
    metrics = {OVERLAP_COUNT: int(count)} | ({OVERLAP_ROWS: [int(r) for r in rows]} if rows is not None else {})
    return RecordDict({METRICS: MetricRecord(metrics), SITE: _site_record(site, labels)})


ERROR_SITE = re.compile(r"^\[site ([A-Za-z0-9_-]+)\] ")
MAX_ERROR = 500  # characters of a hospital's error that cross the wire


def error_reason(site: str, what: str, data_root: str = "") -> str:
    """What a hospital's failed message says: its site and the first line of what went wrong ('Type: message'), with
    the data root's path left out (file names inside it stay: they say which file to fix)."""
    text = what.strip().splitlines()[0] if what.strip() else "no reason given"
    if data_root:
        text = text.replace(data_root.rstrip("/") + "/", "<data-root>/").replace(data_root, "<data-root>")
    return f"[site {site}] {text}"[:MAX_ERROR]


def parse_error(reason: str | None) -> tuple[str | None, str]:
    """(site, one line) of a failed message: ours name the site; Flower's "<class 'X'>:<'message'>" and Ray's wrapper
    around it are cut to the message's last line (a traceback's last line says what went wrong)."""
    text, kind = (reason or "").strip() or "no reason given", ""
    wrapped = re.fullmatch(r"<class '[\w.]*?(\w+)'>:<'(.*)'>", text, re.DOTALL)
    if wrapped:
        kind, text = wrapped.group(1), wrapped.group(2).split("occurred. Message: ", 1)[-1].strip() or "no reason given"
    found = ERROR_SITE.match(text)
    if found:
        return found.group(1), text[found.end() :].splitlines()[0]
    last = [line.strip() for line in text.splitlines() if line.strip()][-1]
    return None, last if not kind or ": " in last else f"{kind}: {last}"


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
    for key in (SKIPPED, NOT_IMAGES):
        if not isinstance(metrics[key], int) or metrics[key] < 0:
            raise ReplyError(f"{key} = {metrics[key]!r}: expected a count >= 0")
    return TrainReply(site, metrics[NUM_EXAMPLES], loss, metrics[SKIPPED], metrics[NOT_IMAGES], weights)


def _counts(metrics: MetricRecord, key: str, length: int | None = None) -> np.ndarray:
    """A list of non-negative integers from the metrics (of a given length where one is expected), or raise ReplyError."""
    values = metrics[key]
    if not isinstance(values, list) or (length is not None and len(values) != length) or not all(isinstance(v, int) and v >= 0 for v in values):
        raise ReplyError(f"{key}: expected {length if length is not None else 'a list of'} non-negative integers")
    return np.asarray(values, np.int64)


def parse_evaluate_reply(content: RecordDict, labels: tuple[str, ...], n_bins: int, floor: int) -> EvaluateReply:
    """Validate an evaluate reply: labels, intervals that tile the run's bins, counts that add up to the images
    validated on, and the histogram floor kept (an interval of fewer than `floor` images is refused: the hospital's
    software did not apply the rule)."""
    site = reply_site(content, labels)
    metrics = _metrics(content, EVALUATE_METRIC_KEYS)
    if content.array_records:
        raise ReplyError(f"an evaluate reply carries no arrays, got {sorted(content.array_records)}")
    n = metrics[NUM_EXAMPLES]
    sizes = _counts(metrics, HIST_INTERVALS, len(labels))
    starts, pos, neg = (_counts(metrics, key, int(sizes.sum())) for key in (HIST_STARTS, HIST_POS, HIST_NEG))
    intervals, cut = [], np.concatenate([[0], np.cumsum(sizes)])
    for j, label in enumerate(labels):
        part = slice(cut[j], cut[j + 1])
        got = Intervals(starts[part], pos[part], neg[part])
        if not len(got.starts) or got.starts[0] != 0 or (np.diff(got.starts) <= 0).any() or got.starts[-1] >= n_bins:
            raise ReplyError(f"label {label!r}: interval starts {got.starts[:8].tolist()}... do not tile the run's {n_bins} bins")
        if got.pos.sum() + got.neg.sum() != n:
            raise ReplyError(f"label {label!r}: {got.pos.sum()} positives and {got.neg.sum()} negatives disagree with {NUM_EXAMPLES} = {n}")
        small = breaks_floor(got, floor)
        if small is not None:
            raise ReplyError(f"label {label!r}: an interval holds {small} image(s), below the run's min-bin-images = {floor}: the hospital's software does not apply the histogram floor")
        intervals.append(got)
    return EvaluateReply(site, n, intervals)


def parse_overlap_reply(content: RecordDict, labels: tuple[str, ...], n_heldout: int) -> OverlapReply:
    """Validate an overlap reply: a count, and where sent, distinct held-out positions that the count covers."""
    site = reply_site(content, labels)
    if set(content.metric_records) != {METRICS}:
        raise ReplyError(f"expected one MetricRecord {METRICS!r}, got {sorted(content.metric_records)}")
    metrics = content.metric_records[METRICS]
    if not set(metrics) <= {OVERLAP_COUNT, OVERLAP_ROWS} or OVERLAP_COUNT not in metrics:
        raise ReplyError(f"metrics keys {sorted(metrics)} differ from the expected {[OVERLAP_COUNT, OVERLAP_ROWS]}")
    count = metrics[OVERLAP_COUNT]
    if not isinstance(count, int) or count < 0:
        raise ReplyError(f"{OVERLAP_COUNT} = {count!r}: expected a count >= 0")
    rows = None
    if OVERLAP_ROWS in metrics:
        rows = _counts(metrics, OVERLAP_ROWS).tolist()
        if len(set(rows)) != len(rows) or any(r >= n_heldout for r in rows) or len(rows) > count:
            raise ReplyError(f"{OVERLAP_ROWS}: expected distinct positions below {n_heldout}, at most {OVERLAP_COUNT} = {count} of them")
    return OverlapReply(site, count, rows)


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
