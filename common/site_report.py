"""A hospital's own report: how the global model does on its patients, round by round, kept at the hospital."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.atomic import write_csv

REPORT = "report.csv"


def append_site_report(folder: Path, server_round: int, n_val: int, figures: dict[str, float], left_out: int = 0) -> Path:
    """Add one round's exact figures to folder/report.csv (rewritten atomically: a kill leaves the previous rounds);
    returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / REPORT
    row = {"round": server_round, "n_val": n_val, "left_out": left_out, **figures}
    table = pd.read_csv(path) if path.exists() else pd.DataFrame()
    write_csv(path, pd.concat([table, pd.DataFrame([row])], ignore_index=True), float_format="%.6g")
    return path
