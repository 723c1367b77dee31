"""A hospital's own report: how the global model does on its patients, round by round, and the files it left out,
kept at the hospital."""

from __future__ import annotations

import csv
from pathlib import Path

import pandas as pd


def append_site_report(folder: Path, server_round: int, n_val: int, figures: dict[str, float], unreadable: pd.DataFrame | None = None) -> Path:
    """Append one round's figures to folder/report.csv (made with a header on first use) and write the list of skipped
    files to folder/unreadable.csv when there are any; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "report.csv"
    row = {"round": server_round, "n_val": n_val, "unreadable_skipped": 0 if unreadable is None else len(unreadable)}
    row |= {k: f"{v:.6g}" for k, v in figures.items()}
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        if new:
            writer.writeheader()
        writer.writerow(row)
    if unreadable is not None and len(unreadable):
        unreadable.to_csv(folder / "unreadable.csv", index=False)
    return path
