"""Held-out images that a hospital also holds, found without sharing images: before training the server sends keyed
digests of its held-out images' decoded pixels (wire.pack_overlap_query); each hospital answers how many of its images
match, and, where the run says heldout-overlap = exclude, which held-out images, so the server can leave them out.

The server learns, per hospital, a count (and with exclude, which of its own held-out images that hospital holds);
nothing about the hospital's other images. A hospital learns which of its images the server holds in its held-out set.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from flwr.app import MessageType
from flwr.serverapp import Grid

from common import wire
from common.config import RunConfig
from common.image_set import ImageSet
from server.messaging import send_and_receive
from server.strategy import HospitalFedAvg


@dataclass(frozen=True)
class OverlapFound:
    """What the hospitals answered."""

    rows: list[dict] = field(default_factory=list)  # per hospital: site, held-out images it also holds, which (if asked)
    held: frozenset[int] = frozenset()  # held-out rows some hospital holds (known only where the run asked which)

    def lines(self, n_heldout: int) -> list[str]:
        """One line per hospital for the progress output."""
        return [f"{r['site']} holds {r['count']} of the {n_heldout} held-out images" for r in self.rows]


def check_overlap(grid: Grid, strategy: HospitalFedAvg, heldout: ImageSet, cfg: RunConfig) -> OverlapFound:
    """Ask every connected hospital how many of its images equal a held-out image; failures go to the strategy's
    current record (round 0), under the hospital's name, like any other failed reply."""
    which = cfg.heldout_overlap == "exclude"
    content = wire.pack_overlap_query(os.urandom(32), [str(d) for d in heldout.digest], which)
    nodes = strategy.ask(grid, "overlap", 0, 1.0)
    messages = strategy.messages(content, nodes, MessageType.QUERY)
    replies = send_and_receive(grid, messages, cfg.round_timeout, cfg.reply_poll_seconds, cfg.round_quorum, cfg.quorum_grace, cfg.min_hospitals)
    parse = lambda c: wire.parse_overlap_reply(c, cfg.labels, len(heldout))  # noqa: E731
    answers: list[wire.OverlapReply] = strategy.accept("overlap", replies, parse)
    rows = [{"site": a.site, "count": a.count, "heldout_rows": " ".join(map(str, a.rows)) if a.rows is not None else ""} for a in answers]
    held = frozenset(r for a in answers if a.rows is not None for r in a.rows)
    return OverlapFound(sorted(rows, key=lambda r: r["site"]), held)
