"""A run folder: made once with the run's resolved configuration (config.json), and its status.json (running,
finished, failed or interrupted, with the reason and the last round written). The ServerApp writes the status as the
run goes (through its status recorder), the commands that launch runs mark what the ServerApp could not (a crash,
Ctrl-C), and anything that watches runs reads it; all through the functions here."""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from common.atomic import write_text
from common.config import RunConfig, config_to_dict, parse_run_config, toml_lines
from common.errors import ConfigError

STATUS = "status.json"
RUNNING, FINISHED, FAILED, INTERRUPTED = "running", "finished", "failed", "interrupted"
STATES = (RUNNING, FINISHED, FAILED, INTERRUPTED)
RESUME = "resume.toml"  # the run's own settings with resume set: what a deployed resume passes to `flwr run --run-config`


def make_run_folder(cfg: RunConfig) -> Path:
    """Create this run's folder (output-dir/run-name, a timestamp when unnamed) and write config.json into it."""
    folder = Path(cfg.output_dir) / (cfg.run_name or time.strftime("%Y%m%d-%H%M%S"))
    try:
        folder.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise FileExistsError(f"run folder {folder} exists already: choose another 'run-name'") from None
    write_text(folder / "config.json", json.dumps(config_to_dict(cfg), indent=2) + "\n")
    write_text(folder / RESUME, toml_lines(config_to_dict(cfg) | {"resume": str(folder.resolve())}))  # for `flwr run --run-config`
    return folder


def run_folder(cfg: RunConfig) -> Path:
    """The folder a run writes into: the one it resumes, else output-dir/run-name."""
    return Path(cfg.resume) if cfg.resume else Path(cfg.output_dir) / cfg.run_name


def resumed_config(folder: Path, given: RunConfig | None = None) -> RunConfig:
    """The settings of the run in folder (its config.json), set to resume it; ConfigError where it cannot be resumed:
    no such run folder, one that finished every round, or (given: the settings the resuming run was started with, which
    the hospitals train by) settings that differ from the run's own."""
    folder = Path(folder).resolve()
    try:
        saved = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"resume: {folder} is not a run folder with a readable config.json ({type(exc).__name__}: {exc})") from None
    status = read_status(folder) or {}
    if status.get("status") == FINISHED:
        raise ConfigError(f"resume: the run in {folder} finished ({status.get('reason', '')}); there is nothing to resume")
    if given is not None:
        differ = sorted(k for k, v in config_to_dict(given).items() if k in saved and k != "resume" and saved[k] != v)
        if differ:
            raise ConfigError(
                f"resume: the settings given differ from the run's own in {', '.join(differ)} (the hospitals would train by them): "
                f"start the resume with --run-config {folder / RESUME}"
            )
    return parse_run_config(saved | {"resume": str(folder)}, base_dir=folder)


@contextlib.contextmanager
def hold(folder: Path) -> Iterator[None]:
    """Hold the run folder for this process while the block runs (a lock on its config.json, which the kernel lets go
    of when the process ends, however it ends); ConfigError where another process holds it."""
    fd = os.open(Path(folder) / "config.json", os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"run folder {folder} is in use: a running ServerApp holds it (stop that run first)") from None
        yield
    finally:
        os.close(fd)


def read_status(folder: Path) -> dict | None:
    """The run folder's status, or None where it has none (or an unreadable one, or JSON that is not an object: it is
    rewritten whole, so only a file from elsewhere can be broken)."""
    try:
        status = json.loads((Path(folder) / STATUS).read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(folder: Path, **fields) -> dict:
    """Update the run folder's status with the given fields (status, reason, last_round, ...), stamped with the time,
    and write it atomically; returns the whole status."""
    if "status" in fields and fields["status"] not in STATES:
        raise ValueError(f"status {fields['status']!r}: expected one of {', '.join(STATES)}")
    status = (read_status(folder) or {}) | fields | {"updated": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    write_text(Path(folder) / STATUS, json.dumps(status, indent=2) + "\n")
    return status


def mark_ended(folder: Path, status: str, reason: str, replacing: tuple[str, ...] = (RUNNING,)) -> dict | None:
    """After the ServerApp is gone: record how the run ended where its status still says one of `replacing` (running:
    it crashed or was killed; an interruption also replaces the failure the ServerApp wrote as it was stopped); leave
    any other status the ServerApp wrote. Returns the status (None where the run never made its folder)."""
    current = read_status(folder)
    if current is None or current.get("status") not in replacing:
        return current
    return write_status(folder, status=status, reason=reason)
