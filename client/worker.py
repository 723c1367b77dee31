"""A hospital's long-lived training worker: keeps TensorFlow, the compiled model and the site's pipelines loaded
between the per-message ClientApp processes that Flower starts, and does their work (client/training.py).

`python -m client.supernode` starts it beside the SuperNode; it is not meant to be started by hand. It listens on a
Unix socket in a private folder (mode 700) and answers only callers that hold the key file beside the socket (HMAC
challenge of multiprocessing.connection), one request at a time. Nothing it receives or returns leaves the machine.

    python -m client.worker --folder /run/fedimaging-worker-XXXX
"""

from __future__ import annotations

import argparse
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

SOCKET_FILE = "worker.sock"
KEY_FILE = "worker.key"
KINDS = ("train", "score", "overlap")
# Bumped whenever a request or a result changes. In deployment the ClientApp comes with the run's app while the
# worker runs the hospital's installation; a mismatch must be said, not surface as an unpickling error.
PROTOCOL = 2
REQUEST_TIMEOUT = 60.0  # seconds a connected caller has to send its request


class WorkerError(RuntimeError):
    """The worker could not be reached, or its work failed; the message says which and why."""


def call(socket_path: str, kind: str, run_config: dict, node_config: dict, payload):
    """Ask the worker at socket_path to run training.<kind> on the payload (global weights, or the overlap question);
    returns its Trained, Scored or Matched, or raises WorkerError."""
    try:
        key = (Path(socket_path).parent / KEY_FILE).read_bytes()
        with mpc.Client(socket_path, family="AF_UNIX", authkey=key) as connection:
            connection.send((PROTOCOL, kind, run_config, node_config, payload))
            status, value = connection.recv()
    except (OSError, EOFError, mpc.AuthenticationError) as exc:
        raise WorkerError(f"the hospital's training worker at {socket_path} does not answer ({exc}); restart `python -m client.supernode`") from exc
    if status != "ok":
        raise WorkerError(value)
    return value


def serve(folder: Path) -> None:
    """Load TensorFlow, then answer requests on folder/worker.sock until stopped; the folder must exist (mode 700)."""
    from client import training  # the slow import, once for the worker's life

    if not folder.is_dir():
        raise SystemExit(f"fedimaging worker: {folder} does not exist (client.supernode makes it)")
    folder.chmod(0o700)
    key = os.urandom(32)
    key_file = folder / KEY_FILE
    key_file.touch(mode=0o600)
    key_file.write_bytes(key)
    socket_path = folder / SOCKET_FILE
    socket_path.unlink(missing_ok=True)
    with mpc.Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        socket_path.chmod(0o600)
        print(f"[worker] ready on {socket_path}", flush=True)
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError, mpc.AuthenticationError) as exc:  # a caller without the key, or one that hung up
                print(f"[worker] refused a connection: {exc}", file=sys.stderr, flush=True)
                continue
            with connection:
                _answer(connection, training)


def _answer(connection: mpc.Connection, training) -> None:
    """Run one request and send back ('ok', result) or ('error', what went wrong)."""
    try:
        if not connection.poll(REQUEST_TIMEOUT):
            raise WorkerError(f"no request within {REQUEST_TIMEOUT:.0f} s of connecting")
        request = connection.recv()
        if not isinstance(request, tuple) or not request or request[0] != PROTOCOL:
            raise WorkerError(
                f"the ClientApp speaks worker protocol {request[0] if isinstance(request, tuple) and request else '?'}, this worker "
                f"{PROTOCOL}: install the same fedimaging version at the hospital as the run's app, then restart client.supernode"
            )
        _, kind, run_config, node_config, payload = request
        if kind not in KINDS:
            raise WorkerError(f"unknown request {kind!r}: expected one of {', '.join(KINDS)}")
        reply = ("ok", getattr(training, kind)(run_config, node_config, payload))
    except Exception as exc:  # noqa: BLE001 -- said to the caller, whose Flower reply carries it to the server
        traceback.print_exc()
        reply = ("error", f"{type(exc).__name__}: {exc}")
    try:
        connection.send(reply)
    except OSError as exc:
        print(f"[worker] the caller left before the reply: {exc}", file=sys.stderr, flush=True)


def _exit_with_parent(folder: Path) -> None:
    """End this process (removing its socket and key) once the process that started it is gone, even if that one was
    killed without a chance to stop it."""
    parent = os.getppid()
    while os.getppid() == parent:
        time.sleep(2)
    for name in (SOCKET_FILE, KEY_FILE):
        (folder / name).unlink(missing_ok=True)
    os._exit(1)


def main(argv: list[str] | None = None) -> int:
    """Command line: serve until SIGTERM or Ctrl-C."""
    parser = argparse.ArgumentParser(prog="python -m client.worker", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, required=True, help="a private folder for the socket and its key")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_exit_with_parent, args=(args.folder,), daemon=True).start()
    try:
        serve(args.folder)
    except KeyboardInterrupt:
        pass
    finally:
        for name in (SOCKET_FILE, KEY_FILE):
            (args.folder / name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
