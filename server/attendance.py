"""Who takes part in a phase of a round: the hospitals connected now, waited for within a bound (node-wait), never
forever, and a seeded sample of them.

The hospitals a phase waits for are the roster's where there is one, else every hospital seen connected earlier in the
run, and at least min-hospitals. A hospital still missing at the next phase is not waited for again: the run goes on
with those present, and one that comes back is asked again from the next phase on. Flower counts a SuperNode as
connected until it has missed two heartbeats (about a minute); until then its messages end in the SuperLink's own
"node unavailable" reply or a timeout, which the strategy records as such.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from flwr.serverapp import Grid


@dataclass(frozen=True)
class Attendance:
    """The nodes connected when a phase began, and the expected ones that were not."""

    present: list[int]
    absent: list[int]
    waited: float  # seconds spent waiting for the absent ones


def attend(grid: Grid, expected: set[int], minimum: int, wait: float, say: Callable[[str], None], poll: float = 1.0) -> Attendance:
    """The connected nodes once every expected one and at least `minimum` are, or once `wait` seconds have passed."""
    start, said = time.monotonic(), False
    while True:
        present = set(grid.get_node_ids())
        missing = expected - present
        if (not missing and len(present) >= minimum) or time.monotonic() - start >= wait:
            return Attendance(sorted(present), sorted(missing), time.monotonic() - start)
        if not said:
            say(f"waiting up to {wait:g} s (node-wait) for hospitals: {len(present)} connected, {len(missing) or minimum - len(present)} more expected")
            said = True
        time.sleep(poll)


def sample(nodes: list[int], fraction: float, minimum: int, seed: int, server_round: int, phase: str, key: Callable[[int], str] = str) -> list[int]:
    """A seeded sample of the nodes: that fraction of them, at least `minimum` (all of them where there are fewer),
    drawn from the nodes ordered by key (their site names: node ids change from run to run, names do not)."""
    size = min(len(nodes), max(int(len(nodes) * fraction), minimum))
    return random.Random(f"{seed}/{server_round}/{phase}").sample(sorted(nodes, key=key), size)
