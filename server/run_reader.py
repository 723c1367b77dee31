"""Reading run folders for people watching them (the monitor): what state each run is in, and one run's figures,
hospitals, events and pictures, from its files only (status.json, config.json, the tables, the pictures); never from
a server's memory, and never writing. A half-written, crashed or damaged run gives what it has, and says what is
missing or could not be read; a file that is a link to somewhere outside the run folder is not read."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from server.run_folder import RUNNING, STATUS

STALLED, UNREADABLE = "stalled", "unreadable"
SETTINGS = ("num-hospitals", "num-server-rounds", "aggregation", "model", "image-size", "labels", "local-epochs", "dp", "data", "sites")
EVENT_COLUMNS = (("failures", "failure"), ("late_replies", "late"), ("influence_warning", "influence"), ("gradcam_warning", "grad-cam"), ("unavailable", "not available"))
PICTURES = {"report": "plots/round_{:03d}.png", "gradcam": "gradcam/round_{:03d}/grid.png"}  # what the page shows of a round
MAX_ROWS = 100_000  # rows read of a table: far more than a federation's rounds, and a bound on a request's work


@dataclass(frozen=True)
class StallRule:
    """When a run that says it is running is called stalled: no new round for `factor` times its longest round (at least
    `minimum` seconds), or for `first` seconds before its first round."""

    factor: float = 5.0
    minimum: float = 120.0
    first: float = 900.0


def plain(value: Any) -> Any:
    """A value as JSON has it: None for a missing or non-finite number, containers cleaned throughout."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # NumPy scalars
        return plain(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def inside(folder: Path, name: str) -> Path | None:
    """The file of that name in the run folder, or None where it is a link leading out of it."""
    path = folder / name
    try:
        return path if path.resolve().is_relative_to(folder.resolve()) else None
    except (OSError, ValueError):
        return None


def read_table(folder: Path, name: str, missing: list[str]) -> pd.DataFrame:
    """A table of the run folder, its round column as whole numbers (empty where absent or unreadable, the reason added
    to missing; rows whose round is not a number are left out and counted there)."""
    path = inside(folder, name)
    if path is None:
        missing.append(f"{name}: a link to outside the run folder, not read")
        return pd.DataFrame()
    if not path.is_file():
        missing.append(f"{name}: not written yet")
        return pd.DataFrame()
    try:
        table = pd.read_csv(path, keep_default_na=False, na_values=[""], nrows=MAX_ROWS)
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        missing.append(f"{name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        return pd.DataFrame()
    if "round" not in table:
        missing.append(f"{name}: no round column")
        return pd.DataFrame()
    rounds = pd.to_numeric(table["round"], errors="coerce")
    if rounds.isna().any():
        missing.append(f"{name}: {int(rounds.isna().sum())} row(s) without a round number, left out")
    table = table[rounds.notna()].assign(round=rounds[rounds.notna()].astype(int))
    return table.reset_index(drop=True)


def numbers(table: pd.DataFrame, column: str) -> pd.Series:
    """A column as numbers (NaN where absent, empty or not a number)."""
    if column not in table:
        return pd.Series([math.nan] * len(table), index=table.index, dtype=float)
    return pd.to_numeric(table[column], errors="coerce")


def texts(table: pd.DataFrame, column: str) -> pd.Series:
    """A column as text ('' where absent or empty)."""
    if column not in table:
        return pd.Series([""] * len(table), index=table.index, dtype=object)
    return table[column].map(lambda v: v if isinstance(v, str) else "" if pd.isna(v) else str(v))


def read_json(folder: Path, name: str, missing: list[str]) -> dict:
    """A JSON object of the run folder (config.json, status.json), or {} with the reason added to missing."""
    path = inside(folder, name)
    if path is None:
        missing.append(f"{name}: a link to outside the run folder, not read")
        return {}
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        missing.append(f"{name}: not written")
        return {}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        missing.append(f"{name}: unreadable ({type(exc).__name__})")
        return {}
    if not isinstance(value, dict):
        missing.append(f"{name}: not a JSON object")
        return {}
    return value


def whole(value: Any) -> int | None:
    """A whole number from a file's value, or None."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if math.isfinite(number) else None


def state(status: dict, history: pd.DataFrame, now: float, rule: StallRule) -> tuple[str, str]:
    """The run's state (running, finished, failed, interrupted, stalled, unknown) and why, in words."""
    if not status:
        return "unknown", "no readable status.json: not a run folder yet, or one written by another tool"
    said = str(status.get("status", "unknown"))
    if said != RUNNING:
        return said, str(status.get("reason", ""))
    seconds = numbers(history, "seconds").dropna()
    updated = _timestamp(status.get("updated")) or now
    silent = now - updated
    limit = max(rule.factor * float(seconds.max()), rule.minimum) if len(seconds) else rule.first
    if silent > limit:
        took = f"its rounds took up to {seconds.max():.0f} s" if len(seconds) else "no round written yet"
        return STALLED, f"no new round for {silent:.0f} s ({took}): the server may have crashed or lost its hospitals"
    return RUNNING, ""


def run_state(folder: Path, now: float | None = None, rule: StallRule = StallRule()) -> str:
    """The run's state as summary gives it, at the cost of status.json alone (and history.csv while it runs): what the
    page polls every few seconds."""
    missing: list[str] = []
    status = read_json(folder, STATUS, missing)
    history = read_table(folder, "history.csv", missing) if status.get("status") == RUNNING else pd.DataFrame()
    return state(status, history, time.time() if now is None else now, rule)[0]


def _timestamp(text: Any) -> float | None:
    """Seconds since the epoch of an ISO time in status.json, or None."""
    try:
        return pd.Timestamp(str(text)).timestamp()
    except (ValueError, TypeError):
        return None


def read_run(folder: Path, missing: list[str]) -> tuple[dict, dict, pd.DataFrame, pd.DataFrame]:
    """A run folder's status, settings, history and sites tables, as far as they can be read (missing says the rest)."""
    status, config = read_json(folder, STATUS, missing), read_json(folder, "config.json", missing)
    return status, config, read_table(folder, "history.csv", missing), read_table(folder, "sites.csv", missing)


def summary(folder: Path, now: float | None = None, rule: StallRule = StallRule(), read: tuple | None = None) -> dict:
    """One line of the runs table: state, rounds done of planned, best pooled AUC, held-out AUC, start, hospitals, key
    settings (from read: what read_run gave, where the caller has it)."""
    now = time.time() if now is None else now
    status, config, history, sites = read if read is not None else read_run(folder, [])
    run_state, why = state(status, history, now, rule)
    pooled = numbers(history[history["round"] > 0] if len(history) else history, "global_auc").dropna()
    heldout = numbers(history, "heldout_auc").dropna()
    hospitals = sorted(set(texts(sites, "site")) - {""})
    last = whole(status.get("last_round"))
    return plain({
        "name": folder.name, "state": run_state, "why": why or str(status.get("reason", "")),
        "last_round": last if last is not None else int(history["round"].max()) if len(history) else -1,
        "num_rounds": whole(status.get("num_rounds", config.get("num-server-rounds"))),
        "best_round": whole(status.get("best_round")),
        "best_pooled_auc": float(pooled.max()) if len(pooled) else None,
        "heldout_auc": float(heldout.iloc[-1]) if len(heldout) else None,
        "started": str(status.get("started", "")), "updated": str(status.get("updated", "")),
        "hospitals": hospitals, "n_hospitals": len(hospitals) or whole(config.get("num-hospitals")),
        "settings": {key: config[key] for key in SETTINGS if key in config and config[key] not in ("", [], None)},
        "resumes": whole(status.get("resumes", 0)) or 0,
    })  # fmt: skip


def is_run(folder: Path) -> bool:
    """True for a run folder: a real folder (not a link) with a config.json or a status.json."""
    return folder.is_dir() and not folder.is_symlink() and ((folder / "config.json").is_file() or (folder / STATUS).is_file())


def list_runs(root: Path, now: float | None = None, rule: StallRule = StallRule()) -> list[dict]:
    """Every run folder directly under root, the newest first; one that cannot be read is listed as unreadable, saying why."""
    root = Path(root)
    runs = []
    for folder in (p for p in root.iterdir() if is_run(p)) if root.is_dir() else ():
        try:
            runs.append(summary(folder, now, rule))
        except Exception as exc:  # noqa: BLE001 - one damaged run folder must not hide the others
            runs.append({"name": folder.name, "state": UNREADABLE, "why": f"{type(exc).__name__}: {exc}", "last_round": -1, "num_rounds": None,
                         "best_pooled_auc": None, "heldout_auc": None, "started": "", "n_hospitals": None, "settings": {}})  # fmt: skip
    return sorted(runs, key=lambda run: (run["started"] or "", run["name"]), reverse=True)


def events(history: pd.DataFrame) -> list[dict]:
    """The run's timeline: each failure, late reply, influence and Grad-CAM warning and missing figure, by round."""
    out = []
    for column, kind in EVENT_COLUMNS:
        for rnd, text in zip(history["round"] if len(history) else [], texts(history, column)):
            out += [{"round": int(rnd), "kind": kind, "text": part.strip()} for part in text.split("; ") if part.strip()]
    return sorted(out, key=lambda e: e["round"])


def hospitals(sites: pd.DataFrame, received: pd.DataFrame, timeline: list[dict], asked_rounds: int) -> list[dict]:
    """Per hospital: its images, the rounds it took part in, its AUC round by round, its failures and why, and how
    long its training update took to arrive each round."""
    failures: dict[str, list[dict]] = {}
    for event in timeline:
        if event["kind"] == "failure":
            failures.setdefault(event["text"].split(" (")[0], []).append({"round": event["round"], "text": event["text"]})
    site_names, received_names = texts(sites, "site"), texts(received, "site")
    out = []
    for name in sorted((set(site_names) | set(failures)) - {""}):
        own = sites[site_names == name]
        train = received[(received_names == name) & (texts(received, "phase") == "train")] if len(received) else received
        last = own.iloc[-1:] if len(own) else own
        out.append(plain({
            "site": name,
            "n_train": numbers(last, "n_train").iloc[0] if len(last) else None,
            "n_val": numbers(last, "n_val").iloc[0] if len(last) else None,
            "rounds": [int(r) for r in own["round"]] if len(own) else [],
            "of_rounds": asked_rounds,
            "auc": [{"round": int(r), "auc": a} for r, a in zip(own["round"], numbers(own, "auc"))] if len(own) else [],
            "last_auc": numbers(last, "auc").iloc[0] if len(last) else None,
            "failures": failures.get(name, []),
            "reply_seconds": [{"round": int(r), "seconds": s} for r, s in zip(train["round"], numbers(train, "seconds"))] if len(train) else [],
        }))  # fmt: skip
    return out


def pictures(folder: Path, last_round: int) -> dict[int, dict[str, str]]:
    """Per round, the pictures written for it (paths relative to the run folder)."""
    out: dict[int, dict[str, str]] = {}
    for rnd in range(0, max(last_round, -1) + 1):
        found = {kind: pattern.format(rnd) for kind, pattern in PICTURES.items() if (folder / pattern.format(rnd)).is_file()}
        if found:
            out[rnd] = found
    return out


def detail(folder: Path, now: float | None = None, rule: StallRule = StallRule()) -> dict:
    """Everything the run page shows: the summary, settings, every round's figures, the hospitals, the timeline, the
    pictures, the ETA, and what is missing."""
    now = time.time() if now is None else now
    missing: list[str] = []
    read = read_run(folder, missing)
    head = summary(folder, now, rule, read)
    _, config, history, sites = read
    received = read_table(folder, "received.csv", missing)
    last = int(history["round"].max()) if len(history) else -1
    planned = head["num_rounds"]
    seconds = numbers(history[history["round"] > 0], "seconds").dropna() if len(history) else pd.Series(dtype=float)
    eta = float(seconds.mean()) * max(planned - last, 0) if head["state"] == RUNNING and len(seconds) and planned else None
    for name in ("history.png", "model_best.keras"):
        if last > 0 and not (folder / name).is_file():
            missing.append(f"{name}: not written")
    timeline = events(history)
    labels = str(config.get("labels", "")).split(",") if config.get("labels") else []
    return head | plain({
        "config": config, "labels": labels, "history": history.to_dict("records"),
        "hospitals": hospitals(sites, received, timeline, max(last, 0)), "events": timeline,
        "pictures": pictures(folder, last), "eta_seconds": eta, "missing": missing, "stamp": stamp(folder),
    })  # fmt: skip


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
