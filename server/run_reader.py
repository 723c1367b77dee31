"""Reading run folders for people watching them (the monitor): what state each run is in, and one run's figures,
hospitals, events and pictures, from its files only (status.json, config.json, the tables, the pictures); never from
a server's memory, and never writing. A half-written or crashed run gives what it has, and says what is missing."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from server.run_folder import RUNNING, STATUS, read_status

STALLED = "stalled"
SETTINGS = ("num-hospitals", "num-server-rounds", "aggregation", "model", "image-size", "labels", "local-epochs", "dp", "data", "sites")
EVENT_COLUMNS = (("failures", "failure"), ("late_replies", "late"), ("influence_warning", "influence"), ("gradcam_warning", "grad-cam"), ("unavailable", "not available"))


@dataclass(frozen=True)
class StallRule:
    """When a run that says it is running is called stalled: no new round for `factor` times its longest round (at least
    `minimum` seconds), or for `first` seconds before its first round."""

    factor: float = 5.0
    minimum: float = 120.0
    first: float = 900.0


def plain(value: Any) -> Any:
    """A table cell as JSON has it: None for a missing or non-finite number."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "item"):  # NumPy scalars
        return plain(value.item())
    return value


def read_table(folder: Path, name: str, missing: list[str]) -> pd.DataFrame:
    """A table of the run folder (empty where it is absent or unreadable, with the reason added to missing)."""
    path = folder / name
    if not path.is_file():
        missing.append(f"{name}: not written yet")
        return pd.DataFrame()
    try:
        return pd.read_csv(path, keep_default_na=False, na_values=[""])
    except (OSError, ValueError) as exc:
        missing.append(f"{name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return pd.DataFrame()


def records(table: pd.DataFrame) -> list[dict]:
    """A table as a list of JSON-ready rows."""
    return [{key: plain(value) for key, value in row.items()} for row in table.to_dict("records")]


def read_config(folder: Path, missing: list[str]) -> dict:
    """The run's settings (config.json), or {} with the reason added to missing."""
    try:
        return json.loads((folder / "config.json").read_text())
    except FileNotFoundError:
        missing.append("config.json: not written")
    except (OSError, ValueError) as exc:
        missing.append(f"config.json: unreadable ({type(exc).__name__})")
    return {}


def state(status: dict | None, history: pd.DataFrame, now: float, rule: StallRule) -> tuple[str, str]:
    """The run's state (running, finished, failed, interrupted, stalled, unknown) and why, in words."""
    if status is None:
        return "unknown", "no readable status.json: not a run folder yet, or one written by another tool"
    said = str(status.get("status", "unknown"))
    if said != RUNNING:
        return said, str(status.get("reason", ""))
    seconds = history["seconds"].dropna() if "seconds" in history else pd.Series(dtype=float)
    updated = _timestamp(status.get("updated")) or now
    silent = now - updated
    limit = max(rule.factor * float(seconds.max()), rule.minimum) if len(seconds) else rule.first
    if silent > limit:
        took = f"its rounds took up to {seconds.max():.0f} s" if len(seconds) else "no round written yet"
        return STALLED, f"no new round for {silent:.0f} s ({took}): the server may have crashed or lost its hospitals"
    return RUNNING, ""


def _timestamp(text: Any) -> float | None:
    """Seconds since the epoch of an ISO time in status.json, or None."""
    try:
        return pd.Timestamp(str(text)).timestamp()
    except (ValueError, TypeError):
        return None


def summary(folder: Path, now: float | None = None, rule: StallRule = StallRule()) -> dict:
    """One line of the runs table: state, rounds done of planned, best pooled AUC, held-out AUC, start, hospitals, key settings."""
    now = time.time() if now is None else now
    missing: list[str] = []
    status, config = read_status(folder), read_config(folder, missing)
    history = read_table(folder, "history.csv", missing)
    sites = read_table(folder, "sites.csv", missing)
    run_state, why = state(status, history, now, rule)
    status = status or {}
    trained = history[history["round"] > 0] if "round" in history else history
    pooled = trained["global_auc"].dropna() if "global_auc" in trained else pd.Series(dtype=float)
    heldout = history["heldout_auc"].dropna() if "heldout_auc" in history else pd.Series(dtype=float)
    hospitals = sorted(sites["site"].dropna().astype(str).unique()) if "site" in sites else []
    return {
        "name": folder.name,
        "state": run_state,
        "why": why or str(status.get("reason", "")),
        "last_round": plain(status.get("last_round", int(history["round"].max()) if "round" in history and len(history) else -1)),
        "num_rounds": status.get("num_rounds", config.get("num-server-rounds")),
        "best_round": status.get("best_round"),
        "best_pooled_auc": plain(float(pooled.max())) if len(pooled) else None,
        "heldout_auc": plain(float(heldout.iloc[-1])) if len(heldout) else None,
        "started": status.get("started", ""),
        "updated": status.get("updated", ""),
        "hospitals": hospitals,
        "n_hospitals": len(hospitals) or config.get("num-hospitals"),
        "settings": {key: config[key] for key in SETTINGS if key in config and config[key] not in ("", [], None)},
        "resumes": status.get("resumes", 0),
    }


def is_run(folder: Path) -> bool:
    """True for a run folder: one with a config.json or a status.json."""
    return folder.is_dir() and ((folder / "config.json").is_file() or (folder / STATUS).is_file())


def list_runs(root: Path, now: float | None = None, rule: StallRule = StallRule()) -> list[dict]:
    """Every run folder directly under root, the newest first."""
    root = Path(root)
    folders = [p for p in root.iterdir() if is_run(p)] if root.is_dir() else []
    runs = [summary(folder, now, rule) for folder in folders]
    return sorted(runs, key=lambda run: (run["started"] or "", run["name"]), reverse=True)


def events(history: pd.DataFrame) -> list[dict]:
    """The run's timeline: each failure, late reply, influence and Grad-CAM warning and missing figure, by round."""
    out = []
    for row in history.to_dict("records"):
        for column, kind in EVENT_COLUMNS:
            text = row.get(column)
            if isinstance(text, str) and text.strip():
                out += [{"round": int(row["round"]), "kind": kind, "text": part.strip()} for part in text.split("; ") if part.strip()]
    return out


def hospitals(sites: pd.DataFrame, received: pd.DataFrame, history: pd.DataFrame, asked_rounds: int) -> list[dict]:
    """Per hospital: its images, the rounds it took part in, its AUC round by round, its failures and why, and how
    long its training reply took each round."""
    names = sorted(set(sites["site"].dropna().astype(str)) if "site" in sites else set())
    failures = [(e["round"], e["text"]) for e in events(history) if e["kind"] == "failure"]
    names += sorted({text.split(" (")[0] for _, text in failures} - set(names) - {""})
    out = []
    for name in names:
        own = sites[sites["site"].astype(str) == name] if "site" in sites else pd.DataFrame()
        train = received[(received["site"].astype(str) == name) & (received["phase"] == "train")] if {"site", "phase"} <= set(received) else pd.DataFrame()
        failed = [{"round": rnd, "text": text} for rnd, text in failures if text.startswith(f"{name} (")]
        last = own.iloc[-1] if len(own) else None
        out.append({
            "site": name,
            "n_train": plain(last["n_train"]) if last is not None else None,
            "n_val": plain(last["n_val"]) if last is not None else None,
            "rounds": [int(r) for r in own["round"]] if len(own) else [],
            "of_rounds": asked_rounds,
            "auc": [{"round": int(r), "auc": plain(a)} for r, a in zip(own["round"], own["auc"])] if len(own) else [],
            "last_auc": plain(last["auc"]) if last is not None else None,
            "failures": failed,
            "reply_seconds": [{"round": int(r), "seconds": plain(s)} for r, s in zip(train["round"], train["seconds"])] if "seconds" in train else [],
        })  # fmt: skip
    return out


def pictures(folder: Path, last_round: int) -> dict[int, dict[str, str]]:
    """Per round, the pictures written for it (paths relative to the run folder)."""
    out: dict[int, dict[str, str]] = {}
    for rnd in range(0, max(last_round, -1) + 1):
        found = {
            "report": f"plots/round_{rnd:03d}.png",
            "gradcam": f"gradcam/round_{rnd:03d}/grid.png",
        }
        found = {kind: path for kind, path in found.items() if (folder / path).is_file()}
        if found:
            out[rnd] = found
    return out


def detail(folder: Path, now: float | None = None, rule: StallRule = StallRule()) -> dict:
    """Everything the run page shows: the summary, settings, every round's figures, the hospitals, the timeline, the
    pictures, the ETA, and what is missing."""
    now = time.time() if now is None else now
    missing: list[str] = []
    config = read_config(folder, missing)
    history = read_table(folder, "history.csv", missing)
    sites = read_table(folder, "sites.csv", missing)
    received = read_table(folder, "received.csv", missing)
    head = summary(folder, now, rule)
    if read_status(folder) is None:
        missing.append("status.json: not written or unreadable")
    last = int(history["round"].max()) if "round" in history and len(history) else -1
    planned = head["num_rounds"]
    seconds = history.loc[history["round"] > 0, "seconds"].dropna() if "seconds" in history else pd.Series(dtype=float)
    eta = float(seconds.mean()) * max(int(planned) - last, 0) if head["state"] == RUNNING and len(seconds) and planned else None
    for name in ("history.png", "model_best.keras"):
        if last > 0 and not (folder / name).is_file():
            missing.append(f"{name}: not written")
    labels = str(config.get("labels", "")).split(",") if config.get("labels") else []
    return head | {
        "config": config,
        "labels": labels,
        "history": records(history),
        "hospitals": hospitals(sites, received, history, max(last, 0)),
        "events": events(history),
        "pictures": pictures(folder, last),
        "eta_seconds": eta,
        "missing": missing,
        "stamp": stamp(folder),
    }


def stamp(folder: Path) -> str:
    """What changes when the run writes anything the page shows (the files' sizes and times): the page refetches when it does."""
    parts = []
    for name in (STATUS, "history.csv", "sites.csv", "received.csv", "config.json"):
        try:
            info = (folder / name).stat()
            parts.append(f"{name}:{info.st_mtime_ns}:{info.st_size}")
        except OSError:
            parts.append(f"{name}:-")
    return "|".join(parts)
