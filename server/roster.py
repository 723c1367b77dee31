"""The server operator's roster: which registered SuperNode is which hospital. A file next to the certificates
(certs/roster.yaml), written when a hospital's public key is registered (`python -m server.superlink register`), read
by the ServerApp (run setting `roster`): a reply is taken to come from the hospital its node's key was registered for,
whatever name it claims.

    - name: st-marys
      node-id: 4321987654
      key-sha256: 9f2c...            # SHA-256 of the registered OpenSSH public key line
      images: 1200                   # optional: the images the hospital declared it holds
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import yaml

from common.atomic import write_text
from common.errors import ConfigError
from common.yaml_file import read_yaml

ROSTER = "roster.yaml"


@dataclass(frozen=True)
class Registered:
    """One hospital as the roster knows it."""

    name: str
    node_id: int
    key_sha256: str
    images: int | None = None


def key_digest(public_key: Path) -> str:
    """SHA-256 of a public key file's key (type and base64 body: a trailing comment does not count)."""
    fields = Path(public_key).read_text().split()
    return hashlib.sha256(" ".join(fields[:2]).encode()).hexdigest()


def load_roster(path: Path) -> dict[int, Registered]:
    """node id -> the hospital registered with it; ConfigError naming the file and entry where it is broken."""
    raw = read_yaml(path, "roster") or []
    if not isinstance(raw, list):
        raise ConfigError(f"roster {path}: expected a list of hospitals")
    roster: dict[int, Registered] = {}
    for i, entry in enumerate(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not isinstance(entry.get("node-id"), int):
            raise ConfigError(f"roster {path}: entry {i + 1}: expected name (text) and node-id (a number), got {entry!r}")
        images = entry.get("images")
        if images is not None and (not isinstance(images, int) or images < 0):
            raise ConfigError(f"roster {path}: entry {i + 1} ({entry['name']}): images = {images!r}: expected a count")
        if entry["node-id"] in roster or entry["name"] in {r.name for r in roster.values()}:
            raise ConfigError(f"roster {path}: {entry['name']!r} (node {entry['node-id']}) appears twice")
        roster[entry["node-id"]] = Registered(entry["name"], entry["node-id"], str(entry.get("key-sha256", "")), images)
    return roster


def add_to_roster(path: Path, hospital: Registered) -> None:
    """Add a hospital to the roster (made when missing); refuses a name, node or key that is there already."""
    roster = load_roster(path) if Path(path).exists() else {}
    for known in roster.values():
        if hospital.name == known.name or hospital.node_id == known.node_id or (hospital.key_sha256 and hospital.key_sha256 == known.key_sha256):
            raise ConfigError(f"roster {path}: {known.name!r} (node {known.node_id}) is registered already with that name, node or key")
    entries = [
        {"name": r.name, "node-id": r.node_id, "key-sha256": r.key_sha256, **({"images": r.images} if r.images is not None else {})}
        for r in [*roster.values(), hospital]
    ]
    write_text(Path(path), "# Which registered SuperNode is which hospital (python -m server.superlink register).\n" + yaml.safe_dump(entries, sort_keys=False))
