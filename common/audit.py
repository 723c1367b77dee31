"""A hospital's audit log: one JSON line per message its client sends, so that its data protection officer can see
exactly what left the building (keys, array shapes and sizes, counts, and a hash the server's log can be matched to)."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

from flwr.app import RecordDict

from common.wire import payload_summary

AUDIT_FILE = "audit.jsonl"


def append_audit(folder: Path, content: RecordDict, run_id: int, server_round: int, message_type: str, site: str) -> dict:
    """Append one line for a message about to be sent to folder/audit.jsonl, flushed to disk; returns the entry."""
    entry = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "site": site, "run": run_id,
        "round": server_round, "type": message_type, **payload_summary(content),
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / AUDIT_FILE, "a") as f:
        f.write(json.dumps(entry, sort_keys=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return entry


def read_audit(folder: Path) -> list[dict]:
    """Every entry of a site's audit log, oldest first."""
    path = folder / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
