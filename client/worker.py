"""A hospital's long-lived worker: the one process of the hospital's that reads its images. It keeps TensorFlow, the
compiled model and the site's pipelines loaded, and answers the per-message ClientApp processes Flower starts (the
code the server ships, run as an unprivileged user that cannot read the images) with replies made by the hospital's
own code (client/hospital.py): its policy checked, the histogram floor applied, the audit log written.

`python -m client.supernode` starts it beside the SuperNode; it is not meant to be started by hand. It reads only the
site file it was started with (a caller cannot name another site file, data path or report folder), listens on a
Unix socket in a folder only its owner and the ClientApp user's group may enter, answers only callers holding the key
beside the socket (HMAC challenge of multiprocessing.connection), one request at a time. Requests and replies are
JSON, NumPy arrays without pickles, and Flower's protobuf records: nothing a caller sends is unpickled.

    python -m client.worker --folder /run/fedimaging-worker-XXXX --site /etc/fedimaging/site.yaml [--group GID]
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing.connection as mpc
import os
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np

SOCKET_FILE = "worker.sock"
KEY_FILE = "worker.key"
# Bumped whenever a request or a reply changes. In deployment the ClientApp comes with the run's app while the
# worker runs the hospital's installation; a mismatch must be said, not surface as a decoding error.
PROTOCOL = 3
REQUEST_TIMEOUT = 60.0  # seconds a connected caller has to send its request
MAX_REQUEST = 1 << 30  # bytes of one request message


class WorkerError(RuntimeError):
    """The worker could not be reached, or it refused a request; the message says which and why."""


def _arrays_to_bytes(arrays: list[np.ndarray]) -> bytes:
    """Arrays as an .npz, without pickles."""
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _arrays_from_bytes(data: bytes) -> list[np.ndarray]:
    """Arrays from an .npz, refusing pickled objects."""
    with np.load(io.BytesIO(data), allow_pickle=False) as archive:
        return [archive[f"arr_{i}"] for i in range(len(archive.files))]


def call(socket_path: str, kind: str, run_config: dict, payload, meta: dict) -> tuple[bool, object]:
    """Ask the worker at socket_path for its answer to a request: (True, the reply's content) or (False, one line
    saying why not, naming the site); raises WorkerError when the worker does not answer. payload: the global
    weights (train, score) or the overlap question (key, keyed digests, which)."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

    overlap = {"key": payload[0].hex(), "digests": list(payload[1]), "which": bool(payload[2])} if kind == "overlap" else None
    header = {"protocol": PROTOCOL, "kind": kind, "run_config": run_config, "meta": meta, "overlap": overlap}
    try:
        key = (Path(socket_path).parent / KEY_FILE).read_bytes()
        with mpc.Client(socket_path, family="AF_UNIX", authkey=key) as connection:
            connection.send_bytes(json.dumps(header).encode())
            connection.send_bytes(_arrays_to_bytes(payload if overlap is None else []))
            status = json.loads(connection.recv_bytes())
            if not status["ok"]:
                return False, status["error"]
            proto = RecordDictProto()
            proto.ParseFromString(connection.recv_bytes())
    except (OSError, EOFError, ValueError, KeyError, mpc.AuthenticationError) as exc:
        raise WorkerError(f"the hospital's worker at {socket_path} does not answer ({exc}); restart `python -m client.supernode`") from exc
    return True, recorddict_from_proto(proto)


def _request(connection: mpc.Connection) -> tuple[str, dict, object, dict]:
    """(kind, run settings, payload, meta) of one request, checked; WorkerError for anything else."""
    if not connection.poll(REQUEST_TIMEOUT):
        raise WorkerError(f"no request within {REQUEST_TIMEOUT:.0f} s of connecting")
    try:
        header = json.loads(connection.recv_bytes(MAX_REQUEST))
        arrays = connection.recv_bytes(MAX_REQUEST)
    except (ValueError, OSError, EOFError) as exc:
        raise WorkerError(f"a request that does not decode ({type(exc).__name__}: {exc})") from exc
    if not isinstance(header, dict) or header.get("protocol") != PROTOCOL:
        raise WorkerError(
            f"the ClientApp speaks worker protocol {header.get('protocol', '?') if isinstance(header, dict) else '?'}, this worker "
            f"{PROTOCOL}: install the same fedimaging version at the hospital as the run's app, then restart client.supernode"
        )
    try:
        arrays = _arrays_from_bytes(arrays) if arrays else []
    except (ValueError, OSError, EOFError) as exc:
        raise WorkerError(f"arrays that do not decode ({type(exc).__name__}: {exc})") from exc
    kind, run_config, meta, overlap = header.get("kind"), header.get("run_config"), header.get("meta") or {}, header.get("overlap")
    if not isinstance(run_config, dict) or not isinstance(meta, dict):
        raise WorkerError("a request without run settings")
    payload = (bytes.fromhex(overlap["key"]), list(overlap["digests"]), bool(overlap["which"])) if kind == "overlap" and overlap else arrays
    meta = {k: meta[k] for k in ("run_id", "server_round", "run_folder") if k in meta}
    return kind, run_config, payload, meta


def _answer(connection: mpc.Connection, site_file: str, name: str) -> None:
    """Answer one request with the hospital's reply (for its own site file only), or one line saying why not."""
    from flwr.common.serde import recorddict_to_proto

    from client.hospital import answer
    from common.wire import error_reason

    try:
        kind, run_config, payload, meta = _request(connection)
        ok, result = answer(kind, run_config, {"site-config": site_file}, payload, meta)
    except Exception as exc:  # noqa: BLE001 - said to the caller, whose Flower reply carries it to the server
        if not isinstance(exc, WorkerError):
            traceback.print_exc()
        ok, result = False, error_reason(name, f"{type(exc).__name__}: {exc}")
    try:
        connection.send_bytes(json.dumps({"ok": ok, "error": "" if ok else result}).encode())
        if ok:
            connection.send_bytes(recorddict_to_proto(result).SerializeToString())
    except OSError as exc:
        print(f"[worker] the caller left before the reply: {exc}", file=sys.stderr, flush=True)


def serve(folder: Path, site_file: str, group: int | None = None) -> None:
    """Load TensorFlow, then answer requests on folder/worker.sock until stopped. The folder must exist; it is made
    enterable by its owner and, where given, the ClientApp user's group (who may then connect), nobody else."""
    from client import training  # noqa: F401 - the slow import, once for the worker's life
    from common.site_file import load_site_config

    if not folder.is_dir():
        raise SystemExit(f"fedimaging worker: {folder} does not exist (client.supernode makes it)")
    name = load_site_config(site_file).name
    shared = 0o750 if group is not None else 0o700
    folder.chmod(shared)
    key = os.urandom(32)
    key_file = folder / KEY_FILE
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o640 if group is not None else 0o600)
        if group is not None:
            os.fchown(fd, -1, group)
        os.write(fd, key)
    finally:
        os.close(fd)
    if group is not None:
        os.chown(folder, -1, group)
    socket_path = folder / SOCKET_FILE
    socket_path.unlink(missing_ok=True)
    with mpc.Listener(str(socket_path), family="AF_UNIX", authkey=key) as listener:
        socket_path.chmod(0o660 if group is not None else 0o600)
        if group is not None:
            os.chown(socket_path, -1, group)
        print(f"[worker] ready on {socket_path}, answering for {site_file}", flush=True)
        while True:
            try:
                connection = listener.accept()
            except (OSError, EOFError, mpc.AuthenticationError) as exc:  # a caller without the key, or one that hung up
                print(f"[worker] refused a connection: {exc}", file=sys.stderr, flush=True)
                continue
            with connection:
                _answer(connection, site_file, name)


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
    parser.add_argument("--site", type=Path, required=True, help="this hospital's site file: the only one the worker reads")
    parser.add_argument("--group", type=int, help="the group (id) of the ClientApp user, who may connect")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    threading.Thread(target=_exit_with_parent, args=(args.folder,), daemon=True).start()
    try:
        serve(args.folder, str(args.site.resolve()), args.group)
    except KeyboardInterrupt:
        pass
    finally:
        for name in (SOCKET_FILE, KEY_FILE):
            (args.folder / name).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
