"""Measuring helpers of the benchmarks: run a command while sampling its process tree's memory; steady-round means."""

from __future__ import annotations

import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

SAMPLE_SECONDS = 0.5


@dataclass(frozen=True)
class Measured:
    """A finished command: its exit code, wall time, peak memory of its process tree, and its standard error."""

    returncode: int
    wall_s: float
    peak_rss_bytes: int
    stderr: str


def tree_rss(root: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(command: list[str], cwd: Path) -> Measured:
    """Run the command (its standard output discarded), sampling its process tree's memory every SAMPLE_SECONDS."""
    start, peak = time.perf_counter(), 0
    process = psutil.Popen(command, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stderr: list[str] = []
    reader = threading.Thread(target=lambda: stderr.extend(process.stderr), daemon=True)  # a full pipe would stall it
    reader.start()
    while process.poll() is None:
        peak = max(peak, tree_rss(process))
        time.sleep(SAMPLE_SECONDS)
    reader.join(5)
    return Measured(process.returncode, time.perf_counter() - start, peak, "".join(stderr))


def steady_mean(per_round: list[float]) -> float:
    """The mean of rounds 2..R, apart from round 1's start-up work (round 1 alone when it is the only one)."""
    later = per_round[1:] or per_round
    return sum(later) / len(later)
