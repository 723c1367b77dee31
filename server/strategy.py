"""FedAvg that validates every reply, records each failure by site, and pools counts and histograms into global figures."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from common.config import RunConfig
from common.metrics import figures, operating_point
from server.aggregation import ServerAdam, weighted_mean

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one round's replies amounted to: who contributed, who failed and why, pooled and per-site figures."""

    trained: dict[str, int] = field(default_factory=dict)  # site -> training images
    skipped: dict[str, int] = field(default_factory=dict)  # site -> unreadable files it left out (skip-unreadable)
    evaluated: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "site (phase): reason"
    n_rejected: int = 0  # replies that arrived but were invalid
    train_loss: float = float("nan")
    n_val: int = 0
    row: dict[str, float | str] = field(default_factory=dict)  # history.csv columns: pooled figures, operating point, site spread
    thresholds: np.ndarray | None = None  # (n_labels,) operating point per label, chosen on pooled validation
    pos: np.ndarray | None = None  # (n_labels, n_bins) pooled histograms, for the ROC plot
    neg: np.ndarray | None = None
    sites: list[dict] = field(default_factory=list)  # one row per evaluated site, for sites.csv
    received: list[dict] = field(default_factory=list)  # every reply that arrived: phase, node, site, bytes, SHA-256 (received.csv)


class HospitalFedAvg(FedAvg):
    """FedAvg over hospitals whose replies are validated one by one: a broken reply is recorded and left out, never fatal.

    With aggregation = fedadam the example-weighted mean is not taken as is: a server-side Adam steps towards it.
    """

    def __init__(self, cfg: RunConfig, weight_shapes: list[tuple[int, ...]], trainable: list[bool]) -> None:
        """Sampling from the run settings; weight shapes to check train replies against, and which weights are trainable."""
        super().__init__(
            fraction_train=cfg.fraction_train,
            fraction_evaluate=cfg.fraction_evaluate,
            min_train_nodes=cfg.min_hospitals,
            min_evaluate_nodes=cfg.min_hospitals,
            min_available_nodes=cfg.min_hospitals,
            weighted_by_key=wire.NUM_EXAMPLES,
            arrayrecord_key=wire.ARRAYS,
        )
        self.cfg = cfg
        self.weight_shapes = weight_shapes
        self.sites: dict[int, str] = {}  # node id -> site name, learnt from valid replies
        self.sent: dict[str, list[int]] = {}  # phase -> node ids asked this round
        self.record = RoundRecord()
        self.server_adam = ServerAdam(cfg.server_learning_rate, trainable) if cfg.aggregation == "fedadam" else None
        self.current: list[np.ndarray] = []  # the global weights sent out this round

    def _site(self, node_id: int) -> str:
        """A node's site name where a reply has told it, else its node id."""
        return self.sites.get(node_id, f"node {node_id}")

    def _fail(self, node_id: int, phase: str, reason: str) -> None:
        """Record and log a reply that is left out."""
        entry = f"{self._site(node_id)} ({phase}): {reason}"
        self.record.failures.append(entry)
        log.warning("round reply left out: %s", entry)

    def _accept(self, phase: str, replies: Iterable[Message], parse: Callable) -> list:
        """Parse every reply; record errors, invalid content and nodes that never replied."""
        accepted, replied = [], set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            replied.add(node_id)
            if not msg.has_error():  # what arrived, to match against the hospitals' audit logs
                summary = wire.payload_summary(msg.content)
                self.record.received.append({"phase": phase, "node_id": node_id, "bytes": summary["bytes"], "sha256": summary["sha256"]})
            if msg.has_error():
                self._fail(node_id, phase, f"client error: {msg.error.reason}")
                continue
            try:
                reply = parse(msg.content)
            except wire.ReplyError as exc:
                self.record.n_rejected += 1
                self._fail(node_id, phase, f"invalid reply: {exc}")
                continue
            self.sites[node_id] = reply.site
            accepted.append(reply)
        for entry in self.record.received:
            entry.setdefault("site", self._site(entry["node_id"]))
        for node_id in self.sent.get(phase, []):
            if node_id not in replied:
                self._fail(node_id, phase, f"no reply within round-timeout ({self.cfg.round_timeout:g} s)")
        return accepted

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Start a new round record and remember whom we asked to train."""
        self.record = RoundRecord()
        self.current = arrays.to_numpy_ndarrays()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent["train"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember whom we asked to validate."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent["evaluate"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Example-weighted mean of the valid replies' weights (or FedAdam's step towards it); None (keep the global
        model) below min-hospitals."""
        parse = lambda content: wire.parse_train_reply(content, self.weight_shapes, self.cfg.labels)  # noqa: E731
        accepted: list[wire.TrainReply] = self._accept("train", replies, parse)
        self.record.trained = {r.site: r.num_examples for r in accepted}
        self.record.skipped = {r.site: r.skipped for r in accepted}
        if len(accepted) < self.cfg.min_hospitals:
            log.warning(
                "round %d: %d valid train replies, fewer than min-hospitals = %d; the global model is kept",
                server_round, len(accepted), self.cfg.min_hospitals,
            )  # fmt: skip
            return None, None
        total = sum(r.num_examples for r in accepted)
        weights = weighted_mean([r.weights for r in accepted], [r.num_examples for r in accepted])
        if self.server_adam is not None:
            weights = self.server_adam.step(self.current, weights)
        self.record.train_loss = sum(r.train_loss * r.num_examples for r in accepted) / total
        metrics = MetricRecord({wire.NUM_EXAMPLES: total, wire.TRAIN_LOSS: self.record.train_loss})
        return ArrayRecord([w.astype(accepted[0].weights[i].dtype) for i, w in enumerate(weights)]), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the valid replies' counts and histograms into pooled figures; each site's own figures beside them."""
        cfg = self.cfg
        parse = lambda content: wire.parse_evaluate_reply(content, cfg.labels, cfg.histogram_bins)  # noqa: E731
        accepted: list[wire.EvaluateReply] = self._accept("evaluate", replies, parse)
        record = self.record
        record.evaluated = [r.site for r in accepted]
        if not accepted:
            return None
        with_hist = [r for r in accepted if r.pos is not None]
        counts = sum(r.counts for r in accepted)
        record.n_val = sum(r.num_examples for r in accepted)
        if with_hist:
            record.pos, record.neg = sum(r.pos for r in with_hist), sum(r.neg for r in with_hist)
        record.row = {f"global_{k}": v for k, v in figures(counts, record.pos, record.neg, cfg.labels).items()}
        record.row["global_auc_images"] = sum(r.num_examples for r in with_hist)  # how many images the pooled AUC covers
        if record.pos is not None:
            record.thresholds, op = operating_point(record.pos, record.neg, cfg.target_sensitivity, cfg.labels)
            record.row |= op
        record.sites = [
            {"site": r.site, "n_train": record.trained.get(r.site, 0), "n_val": r.num_examples,
             **figures(r.counts, r.pos, r.neg, cfg.labels), "histograms": r.pos is not None, "skipped_files": record.skipped.get(r.site, 0)}
            for r in accepted
        ]  # fmt: skip
        record.row |= site_spread(record.sites)
        return MetricRecord({k: float(v) for k, v in record.row.items() if isinstance(v, (int, float))})


def site_spread(sites: list[dict]) -> dict:
    """The sites' AUCs summarised: example-weighted mean, and the worst site's AUC and name (sites with a defined AUC)."""
    defined = [s for s in sites if not math.isnan(s["auc"])]
    if not defined:
        return {"mean_site_auc": float("nan"), "worst_site_auc": float("nan"), "worst_site": ""}
    worst = min(defined, key=lambda s: s["auc"])
    mean = sum(s["auc"] * s["n_val"] for s in defined) / sum(s["n_val"] for s in defined)
    return {"mean_site_auc": mean, "worst_site_auc": worst["auc"], "worst_site": worst["site"]}
