"""The operator's console: every line the server prints for people carries the same prefix (streamed by `flwr run
--stream`)."""

from __future__ import annotations


def say(text: str) -> None:
    """One line of progress for the operator."""
    print(f"[fedimaging] {text}", flush=True)
