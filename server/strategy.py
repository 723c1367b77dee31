"""FedAvg that validates every reply, records each failure by site, and pools the sites' score intervals into global
figures that count every hospital."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common import wire
from common.bin_floor import auc_bounds, pooled
from common.config import RunConfig
from common.metrics import (
    auc_from_histograms, counts_at_edge, figures, log_loss_from_histograms, operating_point, per_label, sensitivity, specificity, threshold_edge,
)  # fmt: skip
from server.aggregation import ServerAdam, ServerMomentum, clipped_mean, median, multikrum, trimmed_mean, weighted_mean
from server.attendance import attend, sample
from server.console import say
from server.defences import Bounds, check_count, check_weights, finite_model
from server.influence import leave_one_out
from server.messaging import Exchange
from server.privacy import check_clipped, private_mean, spent
from server.roster import load_roster

log = logging.getLogger(__name__)


@dataclass
class RoundRecord:
    """What one round's replies amounted to: who contributed, who failed and why, pooled and per-site figures."""

    asked: int = 0  # hospitals asked to train
    trained: dict[str, int] = field(default_factory=dict)  # site -> training images
    update_norms: dict[str, float] = field(default_factory=dict)  # site -> its update's size relative to the global model
    left_out_by_rule: list[str] = field(default_factory=list)  # valid updates the robust rule did not average (multikrum)
    influence: list[str] = field(default_factory=list)  # sites that move the pooled figures more than their bounds allow
    skipped: dict[str, int] = field(default_factory=dict)  # site -> unreadable files it left out (skip-unreadable)
    not_images: dict[str, int] = field(default_factory=dict)  # site -> files holding no image
    evaluated: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # "site (phase): reason", one per hospital and phase
    late: list[str] = field(default_factory=list)  # replies to an earlier phase that came after the server went on
    privacy: dict[str, float] = field(default_factory=dict)  # dp: the budget spent so far (dp_epsilon, dp_delta) and this round's noise
    n_rejected: int = 0  # replies that arrived but were invalid
    train_loss: float = float("nan")
    n_val: int = 0
    row: dict[str, float | str] = field(default_factory=dict)  # history.csv columns: pooled figures, operating point, site spread
    unavailable: dict[str, str] = field(default_factory=dict)  # figure -> why it could not be computed this round
    thresholds: np.ndarray | None = None  # (n_labels,) operating point per label, chosen on pooled validation
    pos: np.ndarray | None = None  # (n_labels, n_bins) pooled histograms (estimated), for the ROC plot
    neg: np.ndarray | None = None
    sites: list[dict] = field(default_factory=list)  # one row per evaluated site, for sites.csv
    received: list[dict] = field(default_factory=list)  # every reply that arrived: phase, node, site, bytes, SHA-256, seconds into the phase (received.csv)


class HospitalFedAvg(FedAvg):
    """FedAvg over hospitals whose replies are validated one by one: a broken reply is recorded and left out, never fatal.

    With aggregation = fedadam the example-weighted mean is not taken as is: a server-side Adam steps towards it.
    """

    def __init__(self, cfg: RunConfig, weight_shapes: list[tuple[int, ...]], trainable: list[bool], variances: list[bool] | None = None) -> None:
        """Sampling from the run settings; weight shapes to check train replies against, which weights are trainable,
        and which are batch-normalisation variances (kept above zero after differential privacy's noise)."""
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
        self.roster = load_roster(cfg.roster) if cfg.roster else {}  # node id -> the hospital its key was registered for
        self.sites: dict[int, str] = {n: r.name for n, r in self.roster.items()}  # node id -> site name: the roster's, else learnt
        self.record = RoundRecord()
        optimisers = {"fedadam": lambda: ServerAdam(cfg.server_learning_rate, trainable), "fedavgm": lambda: ServerMomentum(cfg.server_momentum, trainable)}
        self.server_optimiser = optimisers[cfg.aggregation]() if cfg.aggregation in optimisers else None
        self.current: list[np.ndarray] = []  # the global weights sent out this round
        declared = {r.name: r.images for r in self.roster.values() if r.images is not None}
        self.bounds = Bounds(cfg.max_update_norm, cfg.max_examples, declared)
        self.seen: set[int] = set()  # every node connected at some phase of this run
        self.absent: set[int] = set()  # the expected nodes missing when the last phase began (not waited for again)
        self.round = 0  # the round the current phase belongs to
        self.variances = variances or [False] * len(weight_shapes)
        self.dp_rounds = 0  # dp: rounds whose updates were released, for the accountant
        self.unanswered: dict[str, tuple[int, str, int, float]] = {}  # message id -> (node, phase, round, when the server went on)

    def site_of(self, node_id: int) -> str:
        """A node's site name where a reply has told it, else its node id."""
        return self.sites.get(node_id, f"node {node_id}")

    def _fail(self, node_id: int, phase: str, reason: str) -> None:
        """Record and log a reply that is left out."""
        entry = f"{self.site_of(node_id)} ({phase}): {reason}"
        self.record.failures.append(entry)
        log.warning("round reply left out: %s", entry)

    def accept(self, phase: str, replies: Exchange | Iterable[Message], parse: Callable, bound: Callable = lambda reply: None) -> list:
        """Parse every reply, check who sent it and that it keeps the bounds; record errors (in one line, under the site
        they name), invalid content and nodes that never replied, each once, with the true reason. Replies may come as
        a bare list (Flower's Strategy interface), whose nodes are then their senders."""
        exchange = replies if isinstance(replies, Exchange) else Exchange({}, list(replies))
        accepted, replied = [], set()
        for msg in exchange.replies:
            node_id = exchange.node_of(msg)
            if node_id in replied:  # one answer per hospital and phase counts
                continue
            replied.add(node_id)
            if msg.has_error():
                if msg.error.code == ErrorCode.NODE_UNAVAILABLE:  # the SuperLink's answer for a node it lost
                    self._fail(node_id, phase, f"node unavailable: its SuperNode stopped sending heartbeats after it was asked ({exchange.seconds:.0f} s into the phase)")
                    continue
                if msg.error.code in (ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE):
                    self._fail(node_id, phase, f"no reply: the SuperLink no longer holds the message or its reply (its time to live, round-timeout = {self.cfg.round_timeout:g} s, ran out)")
                    continue
                site, line = wire.parse_error(msg.error.reason)
                if site is not None and node_id not in self.sites and not self.roster:  # without a roster, a name said is all there is
                    self.sites[node_id] = site
                self._fail(node_id, phase, f"client error: {line}")
                continue
            summary = wire.payload_summary(msg.content)  # what arrived, to match against the hospitals' audit logs
            seconds = exchange.arrived.get(msg.metadata.reply_to_message_id, float("nan"))
            self.record.received.append({"phase": phase, "node_id": node_id, "bytes": summary["bytes"], "sha256": summary["sha256"], "seconds": seconds})
            try:
                reply = parse(msg.content)
                self._check_identity(node_id, reply.site)
                self.sites[node_id] = reply.site  # who it is, known now: a reply out of bounds is named
                bound(reply)
            except wire.ReplyError as exc:
                self.record.n_rejected += 1
                self._fail(node_id, phase, f"invalid reply: {exc}")
                continue
            accepted.append(reply)
        for entry in self.record.received:
            entry.setdefault("site", self.site_of(entry["node_id"]))
        answered = len(exchange.sent) - len(exchange.pending)
        for message_id, node_id in exchange.pending.items():
            if exchange.cut_by_quorum:
                why = f"no reply within quorum-grace ({self.cfg.quorum_grace:g} s) after {answered} of {len(exchange.sent)} hospitals replied, going on after {exchange.seconds:.0f} s"
            else:
                why = f"timed out after {exchange.seconds:.0f} s (round-timeout)"
            self._fail(node_id, phase, why)
            self.unanswered[message_id] = (node_id, phase, self.round, time.monotonic())
        return sorted(accepted, key=lambda reply: reply.site)  # one order whatever the arrival: sums repeat to the last bit

    def _check_identity(self, node_id: int, claimed: str) -> None:
        """With a roster, a reply must come from a registered node and carry the name its key was registered for."""
        if not self.roster:
            return
        if node_id not in self.roster:
            raise wire.ReplyError(f"node {node_id} is not in the roster {self.cfg.roster}: its key was not registered with `server.superlink register`")
        if claimed != self.roster[node_id].name:
            raise wire.ReplyError(f"claims to be {claimed!r}, but this node's key is registered for {self.roster[node_id].name!r}")

    def collect_late(self, grid: Grid) -> None:
        """Replies to earlier phases that came after the server went on: recorded as late (never used); messages the
        SuperLink gave up on are forgotten (their failure is recorded already)."""
        if not self.unanswered:
            return
        for msg in grid.pull_messages(list(self.unanswered)):
            node_id, phase, rnd, went_on = self.unanswered.pop(msg.metadata.reply_to_message_id, (None, "", 0, 0.0))
            if node_id is None or msg.has_error():
                continue
            summary = wire.payload_summary(msg.content)
            self.record.received.append({"phase": f"{phase}-late", "node_id": node_id, "site": self.site_of(node_id), "bytes": summary["bytes"], "sha256": summary["sha256"]})
            self.record.late.append(f"{self.site_of(node_id)} ({phase}, round {rnd}): replied within {time.monotonic() - went_on:.0f} s after the server went on, not used")

    def ask(self, grid: Grid, phase: str, server_round: int, fraction: float) -> list[int]:
        """The nodes to send this phase to: those connected (waiting up to node-wait for the expected ones, unless they
        were missing last time too), sampled; each expected hospital missing is recorded once, as not connected."""
        self.round, expected = server_round, set(self.roster) or self.seen
        connected = set(grid.get_node_ids())
        known_gaps = bool(expected - connected) and expected - connected <= self.absent and len(connected) >= self.cfg.min_hospitals
        wait = 0.0 if known_gaps else self.cfg.node_wait
        found = attend(grid, expected, self.cfg.min_hospitals, wait, say)
        self.seen |= set(found.present)
        waited = f"waited {found.waited:.0f} s (node-wait)" if wait else "missing since an earlier phase, not waited for again"
        for node_id in found.absent:
            self._fail(node_id, phase, f"node unavailable: not connected when the phase began ({waited})")
        self.absent = set(found.absent)
        if len(found.present) < self.cfg.min_hospitals:  # nobody is asked to work for a round that cannot count
            entry = f"federation ({phase}): {len(found.present)} hospital(s) connected after waiting {found.waited:.0f} s (node-wait), fewer than min-hospitals = {self.cfg.min_hospitals}; nobody was asked"
            self.record.failures.append(entry)
            log.warning("round %d: %s", server_round, entry)
            return []
        return sample(found.present, fraction, self.cfg.min_hospitals, self.cfg.seed, server_round, phase, key=self.site_of)

    def messages(self, content: RecordDict, nodes: list[int], message_type: str) -> list[Message]:
        """One message per node, living round-timeout seconds: a hospital that comes back from a long absence finds no
        backlog of old rounds to work through."""
        return [Message(content=content, dst_node_id=n, message_type=message_type, ttl=self.cfg.round_timeout) for n in nodes]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Start a new round record (with any late replies to earlier rounds) and ask the connected hospitals to train."""
        self.record = RoundRecord()
        self.current = arrays.to_numpy_ndarrays()
        self.collect_late(grid)
        nodes = self.ask(grid, "train", server_round, self.cfg.fraction_train)
        self.record.asked = len(nodes)
        if self.cfg.dp != "off" and nodes:
            self.dp_rounds += 1  # counted when asked: a hospital releases its update whether or not the round completes
        config["server-round"] = server_round
        return self.messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), nodes, MessageType.TRAIN)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Ask the connected hospitals to validate."""
        nodes = self.ask(grid, "evaluate", server_round, self.cfg.fraction_evaluate)
        config["server-round"] = server_round
        return self.messages(RecordDict({self.arrayrecord_key: arrays, self.configrecord_key: config}), nodes, MessageType.EVALUATE)

    def _bound_train(self, reply: wire.TrainReply) -> None:
        """A train reply's weights and claimed count within the bounds (server/defences.py), and under differential
        privacy its update within what the hospital's clipping (and noise) allows; its update's size recorded."""
        check_count(reply.site, reply.num_examples, "training", self.bounds)
        noised = self.cfg.dp == "local"  # the noise, not the hospital, sets the update's size: the privacy bound replaces the relative one
        self.record.update_norms[reply.site] = check_weights(reply.weights, self.current, dataclasses.replace(self.bounds, max_update_norm=0) if noised else self.bounds)
        if self.cfg.dp != "off":
            check_clipped(reply.weights, self.current, self.cfg)

    def aggregate_train(self, server_round: int, replies: Exchange | Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """The valid replies' weights combined by the run's aggregation rule; None (keep the global model) below
        min-hospitals, or where the combination is not a usable model (recorded)."""
        parse = lambda content: wire.parse_train_reply(content, self.weight_shapes, self.cfg.labels)  # noqa: E731
        accepted: list[wire.TrainReply] = self.accept("train", replies, parse, self._bound_train)
        if self.cfg.dp != "off" and self.record.asked:
            self.record.privacy = spent(self.cfg, self.dp_rounds, len(accepted))
        self.record.trained = {r.site: r.num_examples for r in accepted}
        self.record.skipped = {r.site: r.skipped for r in accepted}
        self.record.not_images = {r.site: r.not_images for r in accepted}
        if len(accepted) < self.cfg.min_hospitals:
            log.warning(
                "round %d: %d valid train replies, fewer than min-hospitals = %d; the global model is kept",
                server_round, len(accepted), self.cfg.min_hospitals,
            )  # fmt: skip
            return None, None
        total = sum(r.num_examples for r in accepted)
        weights = self.combine(accepted)
        self.record.train_loss = sum(r.train_loss * r.num_examples for r in accepted) / total if self.cfg.dp == "off" else float("nan")  # withheld under DP
        dtypes = [w.dtype for w in self.current]
        why = finite_model(weights, dtypes)
        if why:
            self.record.unavailable["global_model"] = f"{self.cfg.aggregation}: {why}; the previous model is kept"
            self.record.unavailable["global_auc"] = "the previous model was kept, so none was validated"
            log.warning("round %d: %s; the previous global model is kept", server_round, why)
            self.keep_out()
            return None, None
        metrics = MetricRecord({wire.NUM_EXAMPLES: total, wire.TRAIN_LOSS: self.record.train_loss})
        return ArrayRecord([w.astype(dtypes[i]) for i, w in enumerate(weights)]), metrics

    def keep_out(self) -> None:
        """The round's new global model will not be used: FedAdam or FedAvgM forgets the step it took towards it."""
        if self.server_optimiser is not None:
            self.server_optimiser.undo()

    def combine(self, accepted: list[wire.TrainReply]) -> list[np.ndarray]:
        """The next global weights from the accepted updates, by the run's aggregation rule (server/aggregation.py)."""
        cfg, updates, counts = self.cfg, [r.weights for r in accepted], [r.num_examples for r in accepted]
        if cfg.aggregation == "clipped-mean":
            return clipped_mean(updates, counts, self.current)
        if cfg.aggregation == "median":
            return median(updates)
        if cfg.aggregation == "trimmed-mean":
            return trimmed_mean(updates, cfg.trim_fraction)
        if cfg.aggregation == "multikrum":
            weights, kept = multikrum(updates, counts, cfg.krum_byzantine)
            self.record.left_out_by_rule = [r.site for i, r in enumerate(accepted) if i not in kept]
            return weights
        weights = private_mean(updates, cfg, self.variances) if cfg.dp != "off" else weighted_mean(updates, counts)
        return self.server_optimiser.step(self.current, weights) if self.server_optimiser is not None else weights

    def aggregate_evaluate(self, server_round: int, replies: Exchange | Iterable[Message]) -> MetricRecord | None:
        """Pool the valid replies' score intervals into global figures; each site's own figures beside them."""
        cfg = self.cfg
        parse = lambda content: wire.parse_evaluate_reply(content, cfg.labels, cfg.histogram_bins, cfg.min_bin_images)  # noqa: E731
        accepted: list[wire.EvaluateReply] = self.accept("evaluate", replies, parse, lambda r: check_count(r.site, r.num_examples, "validation", self.bounds))
        record = self.record
        record.evaluated = [r.site for r in accepted]
        record.n_val = sum(r.num_examples for r in accepted)
        pooled_row(record, accepted, cfg)
        loo, record.influence = leave_one_out(accepted, cfg)
        record.row |= loo
        record.sites = [site_row(r, cfg, record) for r in accepted]
        record.row |= site_spread(record.sites)
        return MetricRecord({k: float(v) for k, v in record.row.items() if isinstance(v, (int, float))})


def _missing(labels: tuple[str, ...], pos: np.ndarray, neg: np.ndarray, where: str) -> list[str]:
    """Why an AUC is undefined, per label: a class absent from the validation images ('' where both are present)."""
    out = []
    for j, label in enumerate(labels):
        if pos[j].sum() == 0:
            out.append(f"no validation image with {label} {where}")
        elif neg[j].sum() == 0:
            out.append(f"no validation image without {label} {where}")
        else:
            out.append("")
    return out


def pooled_row(record: RoundRecord, replies: list[wire.EvaluateReply], cfg: RunConfig) -> None:
    """The pooled figures of every site that validated, into record.row (and why any is missing into record.unavailable):
    AUC (estimated from the intervals; global_auc_low/high what they allow), sensitivity and specificity at the run's
    threshold, the operating point, and the pooled log loss (the selection criterion where the AUC is undefined)."""
    labels, n_bins = cfg.labels, cfg.histogram_bins
    if not replies:
        record.unavailable["global_auc"] = "no hospital validated this round"
        record.row = {f"global_{k}": v for k, v in figures(np.zeros((len(labels), 4)), None, None, labels).items()}
        return
    per = [pooled([r.intervals[j] for r in replies], n_bins) for j in range(len(labels))]
    record.pos, record.neg = np.stack([p for p, _ in per]), np.stack([n for _, n in per])
    counts = counts_at_edge(record.pos, record.neg, threshold_edge(n_bins, cfg.threshold))
    bounds = [auc_bounds([r.intervals[j] for r in replies], n_bins) for j in range(len(labels))]
    reasons = _missing(labels, record.pos, record.neg, "at any site")
    for j, (low, high) in enumerate(bounds):
        if not reasons[j] and high - low >= 1 - 1e-9:
            reasons[j] = f"no site's intervals separate its {labels[j]} images from the others (every site's images fit in one interval of min-bin-images = {cfg.min_bin_images} or fewer)"
    aucs = [float("nan") if reasons[j] else auc_from_histograms(record.pos[j], record.neg[j]) for j in range(len(labels))]
    figures_row = figures(counts, record.pos, record.neg, labels) | per_label("auc", aucs, labels)
    figures_row |= per_label("auc_low", [b[0] for b in bounds], labels) | per_label("auc_high", [b[1] for b in bounds], labels)
    record.row = {f"global_{k}": v for k, v in figures_row.items()}
    placed = any(len(r.intervals[j].starts) > 1 for r in replies for j in range(len(labels)))  # some image's score is bounded
    record.row["global_log_loss"] = log_loss_from_histograms(record.pos, record.neg, cfg.threshold) if placed else float("nan")
    if any(reasons):
        record.unavailable["global_auc"] = "; ".join(r for r in reasons if r)
    if (record.pos.sum(axis=1) > 0).any():
        record.thresholds, op = operating_point(record.pos, record.neg, cfg.target_sensitivity, labels, cfg.threshold)
        record.row |= op
    else:
        record.unavailable["threshold_at_target_sensitivity"] = f"no validation image with {' or '.join(labels)} at any site"


def site_row(reply: wire.EvaluateReply, cfg: RunConfig, record: RoundRecord) -> dict:
    """A site's own figures from its intervals (spread evenly: no other site's images inform them), for sites.csv; a
    figure its intervals cannot give is left empty and the note says why."""
    labels, n_bins, k = cfg.labels, cfg.histogram_bins, cfg.min_bin_images
    edge = threshold_edge(n_bins, cfg.threshold)
    spread = [i.spread(n_bins) for i in reply.intervals]
    pos, neg = np.stack([p for p, _ in spread]), np.stack([n for _, n in spread])
    counts = counts_at_edge(pos, neg, edge)
    missing = _missing(labels, pos, neg, "in its validation split")
    notes, aucs, sens, spec = [], [], [], []
    for j, (label, intervals) in enumerate(zip(labels, reply.intervals)):
        why = missing[j] or ("" if intervals.informative else f"its {reply.num_examples} validation images fit in one interval of min-bin-images = {k}")
        aucs.append(float("nan") if why else auc_from_histograms(pos[j], neg[j]))
        notes += [f"{label}: AUC not available: {why}"] if why else []
        exact = intervals.splits_at(edge + 1)
        sens.append(sensitivity(counts[j]) if exact else float("nan"))
        spec.append(specificity(counts[j]) if exact else float("nan"))
        notes += [] if exact else [f"{label}: sensitivity and specificity not available: fewer than min-bin-images = {k} of its images on one side of the threshold"]
    return {
        "site": reply.site, "n_train": record.trained.get(reply.site, 0), "n_val": reply.num_examples,
        "update_norm": record.update_norms.get(reply.site, float("nan")),
        **per_label("auc", aucs, labels), **per_label("sensitivity", sens, labels), **per_label("specificity", spec, labels),
        "intervals": "/".join(str(int(((i.pos + i.neg) > 0).sum())) for i in reply.intervals),
        "skipped_files": record.skipped.get(reply.site, 0), "not_images": record.not_images.get(reply.site, 0), "note": "; ".join(notes),
    }  # fmt: skip


def site_spread(sites: list[dict]) -> dict:
    """The sites' AUCs summarised: example-weighted mean, and the worst site's AUC and name (sites with a defined AUC)."""
    defined = [s for s in sites if not math.isnan(s["auc"])]
    if not defined:
        return {"mean_site_auc": float("nan"), "worst_site_auc": float("nan"), "worst_site": ""}
    worst = min(defined, key=lambda s: s["auc"])
    mean = sum(s["auc"] * s["n_val"] for s in defined) / sum(s["n_val"] for s in defined)
    return {"mean_site_auc": mean, "worst_site_auc": worst["auc"], "worst_site": worst["site"]}
