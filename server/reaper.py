"""Stop a simulation's Flower processes once the command that started them is gone without stopping them.

A command killed outright (SIGKILL, the kernel's out-of-memory killer) runs no cleanup, and the SuperLink, ServerApp
and Ray processes it started, each in a session of its own, would go on training unseen, out of reach of Ctrl-C, with
the run folder saying `running`. `server.simulate` starts this watcher beside them, in a session of its own too: when
the command's process ends, it stops every process carrying the run's FLWR_HOME, marks the run folder interrupted (it
can go on with --resume), keeps Flower's logs in it and removes the run's temporary folders. A command that ends
normally stops its watcher.

    python -m server.reaper PID CREATE_TIME FLWR_HOME RUN_FOLDER [--keep LOG ...] [--remove FOLDER ...]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil

from server.launch import PROJECT, end, flower_processes
from server.run_folder import FAILED, INTERRUPTED, RUNNING, mark_ended

POLL = 1.0  # seconds between two looks at the command's process


@contextlib.contextmanager
def watched(flwr_home: Path, folder: Path, keep: tuple[str, ...], remove: list[Path]) -> Iterator[None]:
    """While the block runs, a watcher stops the run's processes should this process end without stopping them (and
    then copies the logs named in keep from FLWR_HOME into the run folder, and removes the folders in remove)."""
    me = psutil.Process()
    command = [sys.executable, "-m", "server.reaper", str(me.pid), repr(me.create_time()), str(flwr_home), str(folder)]
    command += [f"--keep={name}" for name in keep] + [f"--remove={path}" for path in remove]
    watcher = subprocess.Popen(command, cwd=PROJECT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        yield
    finally:
        watcher.terminate()
        watcher.wait()


def alive(pid: int, created: float) -> bool:
    """Whether the process pid, started at created (not a later one given the same pid), still runs (a zombie does not)."""
    try:
        process = psutil.Process(pid)
        return abs(process.create_time() - created) < 0.5 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def reap(pid: int, created: float, flwr_home: Path, folder: Path, keep: list[str], remove: list[Path]) -> None:
    """Wait for the command pid to end, then stop what it left running, mark its run interrupted, keep its logs and
    remove its temporary folders."""
    while alive(pid, created):
        time.sleep(POLL)
    left = flower_processes(flwr_home)
    end(left)
    reason = f"the command that ran it (process {pid}) was killed before it could stop the run"
    status = mark_ended(folder, INTERRUPTED, reason, replacing=(RUNNING, FAILED)) or {}
    if left or status.get("reason") == reason:
        print(f"fedimaging: {reason}: its {len(left)} Flower processes were stopped; {folder} can go on with --resume", file=sys.stderr, flush=True)
    if folder.is_dir():
        for name in keep:
            with contextlib.suppress(OSError):
                shutil.copy(flwr_home / name, folder / name)
    for path in remove:
        shutil.rmtree(path, ignore_errors=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m server.reaper", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("pid", type=int)
    parser.add_argument("created", type=float)
    parser.add_argument("flwr_home", type=Path)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--keep", action="append", default=[])
    parser.add_argument("--remove", action="append", default=[], type=Path)
    args = parser.parse_args()
    reap(args.pid, args.created, args.flwr_home, args.folder, args.keep, args.remove)
