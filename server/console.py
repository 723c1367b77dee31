"""The operator's console: every line the server prints for people carries the same prefix (streamed by `flwr run
--stream`)."""

from __future__ import annotations

PREFIX = "[fedimaging] "  # what the launchers pass on to the console from the run's streamed log


def say(text: str) -> None:
    """One line of progress for the operator."""
    print(f"{PREFIX}{text}", flush=True)
