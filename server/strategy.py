"""FedAvg that validates every reply, records each failure by site, and pools counts and histograms into global figures."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from common.config import RunConfig
from common.metrics import summary

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one round's replies amounted to: who contributed, who failed and why, and the pooled figures."""

    trained: list[str] = field(default_factory=list)
    evaluated: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "site (phase): reason"
    train_loss: float = float("nan")
    pooled: dict[str, float] = field(default_factory=dict)
    n_val: int = 0


class HospitalFedAvg(FedAvg):
    """FedAvg over hospitals whose replies are validated one by one: a broken reply is recorded and left out, never fatal."""

    def __init__(self, cfg: RunConfig, weight_shapes: list[tuple[int, ...]]) -> None:
        """Sampling from the run settings; weight shapes to check train replies against."""
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

    def _site(self, node_id: int) -> str:
        """A node's site name where a reply has told it, else its node id."""
        return self.sites.get(node_id, f"node {node_id}")

    def _fail(self, node_id: int, phase: str, reason: str) -> None:
        """Record and log a reply that is left out."""
        entry = f"{self._site(node_id)} ({phase}): {reason}"
        self.record.failures.append(entry)
        log.warning("round reply left out: %s", entry)

    def _accept(self, phase: str, replies: Iterable[Message], parse) -> list:
        """Parse every reply; record errors, invalid content and nodes that never replied."""
        accepted, replied = [], set()
        for msg in replies:
            node_id = msg.metadata.src_node_id
            replied.add(node_id)
            if msg.has_error():
                self._fail(node_id, phase, f"client error: {msg.error.reason}")
                continue
            try:
                reply = parse(msg.content)
            except wire.ReplyError as exc:
                self._fail(node_id, phase, f"invalid reply: {exc}")
                continue
            self.sites[node_id] = reply.site
            accepted.append(reply)
        for node_id in self.sent.get(phase, []):
            if node_id not in replied:
                self._fail(node_id, phase, f"no reply within round-timeout ({self.cfg.round_timeout:g} s)")
        return accepted

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Start a new round record and remember whom we asked to train."""
        self.record = RoundRecord()
        messages = list(super().configure_train(server_round, arrays, config, grid))
        self.sent["train"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Remember whom we asked to validate."""
        messages = list(super().configure_evaluate(server_round, arrays, config, grid))
        self.sent["evaluate"] = [m.metadata.dst_node_id for m in messages]
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Example-weighted mean of the valid replies' weights; None (keep the global model) below min-hospitals."""
        accepted: list[wire.TrainReply] = self._accept("train", replies, lambda c: wire.parse_train_reply(c, self.weight_shapes))
        self.record.trained = [r.site for r in accepted]
        if len(accepted) < self.cfg.min_hospitals:
            log.warning(
                "round %d: %d valid train replies, fewer than min-hospitals = %d; the global model is kept",
                server_round, len(accepted), self.cfg.min_hospitals,
            )
            return None, None
        total = sum(r.num_examples for r in accepted)
        weights = [sum(r.weights[i] * (r.num_examples / total) for r in accepted) for i in range(len(self.weight_shapes))]
        self.record.train_loss = sum(r.train_loss * r.num_examples for r in accepted) / total
        metrics = MetricRecord({wire.NUM_EXAMPLES: total, wire.TRAIN_LOSS: self.record.train_loss})
        return ArrayRecord([w.astype(accepted[0].weights[i].dtype) for i, w in enumerate(weights)]), metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Sum the valid replies' confusion counts and histograms into the pooled AUC, sensitivity and specificity."""
        n_labels, n_bins = len(self.cfg.labels), self.cfg.histogram_bins
        accepted: list[wire.EvaluateReply] = self._accept("evaluate", replies, lambda c: wire.parse_evaluate_reply(c, n_labels, n_bins))
        self.record.evaluated = [r.site for r in accepted]
        if not accepted:
            return None
        counts = sum(r.counts for r in accepted)
        pos, neg = sum(r.pos for r in accepted), sum(r.neg for r in accepted)
        self.record.pooled = summary(counts, pos, neg)
        self.record.n_val = sum(r.num_examples for r in accepted)
        return MetricRecord({**self.record.pooled, wire.NUM_EXAMPLES: self.record.n_val})
