"""A hospital's own report: how the global model does on its patients, round by round, kept at the hospital."""

from __future__ import annotations

import csv
from pathlib import Path


def append_site_report(folder: Path, server_round: int, n_val: int, figures: dict[str, float]) -> Path:
    """Append one round's figures to folder/report.csv (made with a header on first use); returns its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.csv"
    row = {"round": server_round, "n_val": n_val, **{k: f"{v:.6g}" for k, v in figures.items()}}
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path
