"""Sending messages to the hospitals and collecting their replies at the run's pace, within bounds: every phase ends at
its timeout, or sooner once a quorum of hospitals has replied and a grace period has passed. Whoever did not reply is
known by name of node, with how long the server waited, so that a failure is said once, with its true reason."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid


@dataclass
class Exchange:
    """One phase's messages and what came back."""

    sent: dict[str, int]  # message id -> the node it went to
    replies: list[Message] = field(default_factory=list)
    pending: dict[str, int] = field(default_factory=dict)  # message id -> node, for the messages nobody answered in time
    seconds: float = 0.0  # how long the server waited
    cut_by_quorum: bool = False  # the phase ended at the quorum's grace, not at the timeout
    arrived: dict[str, float] = field(default_factory=dict)  # message id -> seconds from the push to its reply's arrival

    def node_of(self, reply: Message) -> int:
        """The node a reply answers for: the one its message went to (the SuperLink answers for a node it lost)."""
        return self.sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)


def send_and_receive(
    grid: Grid, messages: Iterable[Message], timeout: float, poll: float, quorum: float = 1.0, grace: float = 0.0, minimum: int = 1,
) -> Exchange:  # fmt: skip
    """Push the messages, then pull their replies every `poll` seconds until all are in, the timeout passes, or (quorum
    below 1) `grace` seconds after ceil(quorum x sent), and at least `minimum`, hospitals have answered without an error
    (an error reply does not count towards the quorum: the others may still make the round).

    Flower's own Grid.send_and_receive waits 3 s between pulls from a deployed SuperLink, so each phase of a round
    lost 1.5 s on average; this uses the same public calls (push_messages, pull_messages) at the run's pace
    (reply-poll-seconds, 0.1 s by default as Flower's simulation grid polls).
    """
    messages = list(messages)
    ids = list(grid.push_messages(messages))
    exchange = Exchange({mid: m.metadata.dst_node_id for mid, m in zip(ids, messages)})
    pending = dict(exchange.sent)
    start = time.monotonic()
    deadline, enough = start + timeout, min(len(ids), max(math.ceil(quorum * len(ids)), minimum))
    while pending and time.monotonic() < deadline:
        pulled = list(grid.pull_messages(list(pending)))
        exchange.replies += pulled
        for reply in pulled:
            pending.pop(reply.metadata.reply_to_message_id, None)
            exchange.arrived.setdefault(reply.metadata.reply_to_message_id, time.monotonic() - start)
        answered = sum(1 for reply in exchange.replies if not reply.has_error())
        if quorum < 1 and not exchange.cut_by_quorum and answered >= enough and time.monotonic() + grace < deadline:
            deadline, exchange.cut_by_quorum = time.monotonic() + grace, True
        if pending:
            time.sleep(poll)
    exchange.pending, exchange.seconds = pending, time.monotonic() - start
    exchange.cut_by_quorum = exchange.cut_by_quorum and bool(pending)
    return exchange
