"""Starting and stopping Flower's processes for a run on this machine: a private SuperLink, the environment its
processes need offline, the run's real outcome, and a stop that leaves nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from common.config import RunConfig, config_to_dict, toml_lines
from common.deployment import BIN, flower_process_env
from server.console import PREFIX
from server.run_folder import FAILED, FINISHED, mark_ended, read_status

PROJECT = Path(__file__).resolve().parent.parent

QUIET_LOGS = {  # defaults only: a variable already set in the environment wins
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ start-up chatter in every worker (errors still raise in Python)
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # Keras 3.15 on NumPy 2, once per worker and round
}


def quiet_here() -> None:
    """This launcher's own TensorFlow (the data check imports it) as quiet as the run's processes: call before it is imported."""
    for name, value in QUIET_LOGS.items():
        os.environ.setdefault(name, value)


class RunFailed(RuntimeError):
    """The run did not complete; the message says why."""


class TaskLost(RunFailed):
    """Flower failed the run because the process running its ServerApp sent no heartbeat for a minute (killed, crashed
    hard, starved of CPU or frozen), not because of anything the run reported: it can be started again."""


LOST = "No heartbeat received from the task"  # Flower 1.42's reason for such a run


def interruption(exc: BaseException) -> tuple[str, int]:
    """What stopped a command (Ctrl-C, or SIGTERM turned into SystemExit) in words, and the exit code it ends with."""
    return ("Ctrl-C", 130) if isinstance(exc, KeyboardInterrupt) else ("a termination signal", 143)


def write_run_config(path: Path, cfg: RunConfig, extra: dict[str, Any] | None = None) -> Path:
    """The run's resolved settings (and a wrapping app's own, in extra) as a TOML file for `flwr run --run-config`;
    returns its path."""
    path.write_text(toml_lines({**config_to_dict(cfg), **(extra or {})}))
    return path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(flwr_home: Path) -> dict[str, str]:
    """The environment of every Flower process of a run: offline, quiet, its own FLWR_HOME, our binaries first on PATH."""
    return {**QUIET_LOGS, **flower_process_env(), "FLWR_HOME": str(flwr_home)}


def start_superlink(flwr_home: Path, env: dict[str, str], options: list[str], ca_file: Path | None = None) -> tuple[subprocess.Popen, int]:
    """A SuperLink serving all its APIs on one free loopback port, with the given options (--insecure --simulation, or
    TLS and node authentication); waits until its health check answers (over TLS, trusting ca_file, when given)."""
    port = free_port()
    log = open(flwr_home / "superlink.log", "w")
    process = subprocess.Popen(
        [str(BIN / "flower-superlink"), *options, "--host", "127.0.0.1", "--port", str(port), "--disable-runtime-dependency-installation"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=flwr_home, env=env,
    )  # fmt: skip
    try:
        wait_for_health(process, port, ca_file, flwr_home / "superlink.log")
    except RunFailed:
        stop(process, flwr_home)
        raise
    return process, port


def wait_for_health(process: subprocess.Popen, port: int, ca_file: Path | None, log: Path, timeout: float = 60) -> None:
    """Wait until the SuperLink on 127.0.0.1:port answers its health check (over TLS trusting ca_file, where given);
    RunFailed with the end of its log where it exits or does not answer in time."""
    scheme = "https" if ca_file else "http"
    context = ssl.create_default_context(cafile=str(ca_file)) if ca_file else None
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RunFailed(f"the SuperLink exited at start (code {process.returncode}):\n{log.read_text()[-2000:] if log.exists() else ''}")
        try:
            with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/health", timeout=1, context=context) as reply:
                if reply.status == 200:
                    return
        except OSError:
            time.sleep(0.3)
    raise RunFailed(f"the SuperLink did not become ready within {timeout:.0f} s")


def flower_processes(flwr_home: Path) -> set[psutil.Process]:
    """Every process but this one carrying this FLWR_HOME: all that a run's SuperLink started, detached ones included."""

    def ours(p: psutil.Process) -> bool:
        try:
            return p.environ().get("FLWR_HOME") == str(flwr_home)
        except (psutil.Error, OSError):
            return False

    return {p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)}


def end(procs: set[psutil.Process]) -> None:
    """Terminate the processes, and kill those still alive 15 s later."""
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)


def stop(process: subprocess.Popen, flwr_home: Path) -> None:
    """Stop the SuperLink and every process it started, detached ones included (they all carry our FLWR_HOME)."""
    try:
        root = psutil.Process(process.pid)
        procs = {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        procs = set()
    end(procs | flower_processes(flwr_home))
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(1)


def stream_run(command: list[str], env: dict[str, str], log: Path, verbose: bool = False, timeout: float | None = None) -> str | None:
    """Run `flwr run --stream`, writing every line it prints to log and passing to the console only the run's own
    lines ('[fedimaging] ...'; every line when verbose); returns the run id it printed (None if none). It runs in a
    session of its own, so a terminal's Ctrl-C reaches only this process, which then stops it; RunFailed where it
    outlives timeout seconds. Nothing of the output is kept in memory: a run of days prints a lot."""
    run_id = None
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True
        )  # fmt: skip
        expired = threading.Event()
        watchdog = threading.Timer(timeout or 0, lambda: (expired.set(), process.terminate()))
        if timeout:
            watchdog.start()
        try:
            for line in process.stdout:
                out.write(line)
                out.flush()
                run_id = run_id or started_run(line)
                ours = line.find(PREFIX)  # Ray puts a worker's pid before its lines
                if verbose or ours >= 0:
                    print(line if verbose else line[ours:], end="", flush=True)
            process.wait()
        except KeyboardInterrupt:
            print("fedimaging: interrupted: stopping the run...", file=sys.stderr, flush=True)
            raise
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    if expired.is_set():
        raise RunFailed(f"the run did not end within {timeout:.0f} s and was stopped; its log is in {log}")
    return run_id


def started_run(line: str) -> str | None:
    """The run id in a line `flwr run` printed ('Successfully started run <id>'), or None."""
    found = re.search(r"started run (\d+)", line)
    return found.group(1) if found else None


def run_outcome(connection: str, env: dict[str, str], run_id: str | None = None) -> tuple[str, str]:
    """(status, details) of a run, from `flwr ls --format json`: the one with run_id, else the one run there is (a
    private SuperLink's)."""
    out = subprocess.run([str(BIN / "flwr"), "ls", connection, "--format", "json"], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown", f"`flwr ls` answered: {out.stdout.strip()[-500:]} {out.stderr.strip()[-500:]}"
    if run_id is not None:
        runs = [r for r in runs if str(r.get("run-id")) == run_id]
    if len(runs) != 1:
        return "unknown", f"expected one run {run_id or ''} on the SuperLink, found {len(runs)}"
    return runs[0]["status"], runs[0].get("status-details", "")




def outcome(connection: str, env: dict[str, str], folder: Path, run_id: str | None = None) -> None:
    """Raise RunFailed saying why, unless the run finished every round it set out to: the run folder's status.json
    says how the run ended where the ServerApp could say it; where it could not (it crashed, or never started),
    Flower's own status says it, and the status is marked failed with that reason; TaskLost where Flower lost the
    ServerApp's process."""
    flower, details = run_outcome(connection, env, run_id)
    status = read_status(folder)
    if status is not None and status.get("status") == FINISHED and flower == "finished:completed":
        return
    if LOST in details:
        reason = f"Flower stopped the run: {details} (none for 60 s: its process was killed, crashed, starved of CPU or frozen)"
        mark_ended(folder, FAILED, reason)
        raise TaskLost(f"{reason} (run folder {folder}, last round written: {(status or {}).get('last_round')})")
    if status is not None and status.get("status") == FAILED:
        raise RunFailed(f"{status.get('reason') or 'no reason recorded'} (run folder {folder})")
    reason = f"the run ended as {flower!r} in Flower: {details or 'no details'}"
    if status is None:
        raise RunFailed(f"{reason}; no run folder status was written ({folder})")
    mark_ended(folder, FAILED, reason)
    raise RunFailed(f"{reason} (run folder {folder}, last round written: {status.get('last_round')})")
