"""A hospital's audit log: one JSON line per message its client sends, so that its data protection officer can see
exactly what left the building (keys, array shapes and sizes, counts, and a hash the server's log can be matched to)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from flwr.app import RecordDict

from common.atomic import append_line
from common.wire import payload_summary

AUDIT_FILE = "audit.jsonl"


def append_audit(
    folder: Path, content: RecordDict, run_id: int, server_round: int, message_type: str, site: str, error: str = ""
) -> dict:
    """Append one line for a message about to be sent to folder/audit.jsonl (rewritten atomically, so a kill never
    leaves half a line); a failed message's entry holds the one line of error it carries instead of content; returns
    the entry."""
    entry = {
        "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), "site": site, "run": run_id,
        "round": server_round, "type": message_type, **({"error": error} if error else payload_summary(content)),
    }  # fmt: skip
    folder.mkdir(parents=True, exist_ok=True)
    append_line(folder / AUDIT_FILE, json.dumps(entry, sort_keys=False))
    return entry


def read_audit(folder: Path) -> list[dict]:
    """Every entry of a site's audit log, oldest first."""
    path = folder / AUDIT_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
