"""Start this hospital's SuperNode: checks the site file, the federation's CA certificate, this hospital's key and
that the SuperLink answers over TLS, then connects (one line saying what to fix when something is wrong).

    python -m client.supernode --site deploy/sites/class-folders.yaml --superlink fl.example.org:9092 \\
        --ca certs/ca.crt --key certs/hospitals/st-marys

Beside the SuperNode it runs the hospital's training worker (client/worker.py), which keeps TensorFlow, the model and
the site's images loaded between rounds; Flower's per-message ClientApp processes hand it their work over a private
local socket. With --no-worker every message does the whole work in its own fresh process (slower, nothing shared).
Both stop together. Run `python -m client.check_data <site file>` first. Every message this client sends is appended
to the site's audit log (<report-dir>/audit.jsonl).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from client.worker import SOCKET_FILE
from common.errors import ConfigError
from common.deployment import INSECURE_WARNING, SuperNodeSetup, flower_process_env, supernode_command
from common.tls import DeploymentError

WORKER_START_TIMEOUT = 300.0  # seconds for the worker to import TensorFlow and listen


def wait_for_worker(worker: subprocess.Popen, socket_path: Path) -> None:
    """Wait until the worker listens on its socket; raises DeploymentError if it exits or takes too long."""
    deadline = time.monotonic() + WORKER_START_TIMEOUT
    while not socket_path.exists():
        if worker.poll() is not None:
            raise DeploymentError(f"the training worker exited at start-up with code {exit_code(worker.returncode)} (its output is above)")
        if time.monotonic() > deadline:
            raise DeploymentError(f"the training worker did not start listening within {WORKER_START_TIMEOUT:.0f} s")
        time.sleep(0.2)


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128 + the signal's number when a signal ended it."""
    return 128 - returncode if returncode < 0 else returncode


def supervise(node: subprocess.Popen, worker: subprocess.Popen, socket_path: Path) -> int:
    """Wait until the SuperNode or the worker ends, or the worker's socket vanishes; the SuperNode's exit status, or
    1 when the worker failed first (the caller stops whatever still runs)."""
    while True:
        if node.poll() is not None:
            return exit_code(node.returncode)
        if worker.poll() is not None:
            print(f"fedimaging: the training worker stopped (code {exit_code(worker.returncode)}): stopping the SuperNode", file=sys.stderr)
            return 1
        if not socket_path.exists():  # e.g. a /tmp cleaner removed it: messages would fail until a restart
            print(f"fedimaging: the training worker's socket {socket_path} is gone: stopping, restart to recover", file=sys.stderr)
            return 1
        time.sleep(0.5)


def stop_all(processes: list[subprocess.Popen]) -> None:
    """Terminate the processes still running, and kill those that do not stop within 10 s."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    for p in processes:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    """Command line: check, start the worker, then run flower-supernode beside it (or become it, with --no-worker)."""
    parser = argparse.ArgumentParser(prog="python -m client.supernode", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, required=True, help="this hospital's site YAML file")
    parser.add_argument("--superlink", required=True, help="the SuperLink's host:port")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, help="this hospital's private authentication key (never leaves the hospital)")
    parser.add_argument("--port", type=int, default=9094, help="the SuperNode's local runtime port (loopback only)")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local rehearsal only")
    parser.add_argument("--no-worker", action="store_true", help="no long-lived worker: each message imports TensorFlow and loads the site anew")
    parser.add_argument("--worker-dir", type=Path, help="where the worker's private socket folder goes (default: $XDG_RUNTIME_DIR, else the temporary folder)")
    args = parser.parse_args(argv)
    # The worker's socket folder: private to this user, and outside /tmp where one is available (cleaners prune /tmp).
    folder = None if args.no_worker else Path(tempfile.mkdtemp(prefix="fedimaging-worker-", dir=args.worker_dir or os.environ.get("XDG_RUNTIME_DIR")))
    setup = SuperNodeSetup(args.site, args.superlink, args.ca, args.key, args.insecure, args.port, folder / SOCKET_FILE if folder else None)
    try:
        command = supernode_command(setup)
    except (ConfigError, DeploymentError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        if folder is not None:
            folder.rmdir()
        return 2
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **flower_process_env()}
    if folder is None:
        os.execve(command[0], command, env)
    # A SIGTERM (systemd, docker stop) unwinds like Ctrl-C, so the worker and the SuperNode stop together.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    processes: list[subprocess.Popen] = []
    try:
        worker = subprocess.Popen([sys.executable, "-m", "client.worker", "--folder", str(folder)], env=env)
        processes.append(worker)
        wait_for_worker(worker, folder / SOCKET_FILE)
        processes.append(subprocess.Popen(command, env=env))
        return supervise(processes[1], worker, folder / SOCKET_FILE)
    except DeploymentError as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all(processes)
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
