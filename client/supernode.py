"""Start this hospital's side of the federation: check the site file, the federation's CA certificate, this hospital's
key and that the SuperLink answers over TLS, then run three processes together (one line saying what to fix when
something is wrong):

- the hospital's worker (client/worker.py), the one process that reads the images: it answers every request with
  replies made by the hospital's own code (its policy, the histogram floor, its audit log);
- flower-supernode, connecting out to the federation;
- the SuperExec that starts Flower's per-message ClientApp processes (the code the server ships), run as an
  unprivileged user that cannot read the images (--clientapp-user, default fedimaging-app), through a shared secret.

    python -m client.supernode --site deploy/sites/class-folders.yaml --superlink fl.example.org:9092 \\
        --ca certs/ca.crt --key certs/hospitals/st-marys

Run it as root (or with the capabilities to switch user): it refuses to start when the ClientApp user is missing,
cannot run this installation, or can read the images. If any of the three processes stops, all stop and the command
exits non-zero, so that systemd or Docker restarts the hospital. Run `python -m client.check_data <site file>` first.

In containers (deploy/compose-hospital.yml) the ClientApps run in a container of their own, without the images:
`--exchange DIR` then starts the worker and the SuperNode only, and puts the worker's socket, its key and the SuperExec
secret in DIR, a volume the ClientApps' container mounts at the same path (readable by group --clientapp-gid there),
where it runs `flower-superexec` against this SuperNode's runtime port (--runtime-host).
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

from client.hospital import check_policy_names
from client.isolation import AppUser, app_user, check_isolation, private_home
from client.worker import KEY_FILE, SOCKET_FILE
from common.cli import program
from common.deployment import DEFAULT_USER, INSECURE_WARNING, SuperNodeSetup, flower_process_env, listening, superexec_command, supernode_command, write_secret
from common.errors import ConfigError
from common.site_file import load_site_config
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


def wait_for_port(process: subprocess.Popen, port: int, what: str, timeout: float = 60) -> None:
    """Wait until something listens on 127.0.0.1:port; DeploymentError if the process exits or it takes too long."""
    deadline = time.monotonic() + timeout
    while not listening("127.0.0.1", port):
        if process.poll() is not None:
            raise DeploymentError(f"the {what} exited at start-up with code {exit_code(process.returncode)} (its output is above)")
        if time.monotonic() > deadline:
            raise DeploymentError(f"the {what} did not start listening on 127.0.0.1:{port} within {timeout:.0f} s")
        time.sleep(0.2)


def supervise(processes: dict[str, subprocess.Popen], socket_path: Path) -> int:
    """Wait until one of the hospital's processes ends, or the worker's socket vanishes; 1 either way (the caller stops
    the rest): a SuperNode that stops by itself, even with code 0 (its registration refused or lost), must be restarted."""
    while True:
        for name, process in processes.items():
            if process.poll() is not None:
                print(f"fedimaging: the {name} stopped (code {exit_code(process.returncode)}): stopping this hospital's processes", file=sys.stderr, flush=True)
                return 1
        if not socket_path.exists():  # e.g. a /tmp cleaner removed it: messages would fail until a restart
            print(f"fedimaging: the worker's socket {socket_path} is gone: stopping, restart to recover", file=sys.stderr, flush=True)
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


def _clientapp_env(home: Path) -> dict[str, str]:
    """The ClientApps' environment: offline Flower, their own FLWR_HOME and temporary folder, nothing of the hospital's."""
    base = flower_process_env()
    keep = {k: base[k] for k in ("PATH", "LANG", "LC_ALL", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "FLWR_TELEMETRY_ENABLED", "FLWR_DISABLE_UPDATE_CHECK") if k in base}
    (home / "tmp").mkdir(exist_ok=True)
    return {**keep, "FLWR_HOME": str(home), "HOME": str(home), "TMPDIR": str(home / "tmp"), "PYTHONDONTWRITEBYTECODE": "1"}


def command_line() -> argparse.ArgumentParser:
    """The hospital's start command's options."""
    parser = argparse.ArgumentParser(prog=program("python -m client.supernode"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--site", type=Path, required=True, help="this hospital's site YAML file")
    parser.add_argument("--superlink", required=True, help="the federation's address, host:port (the proxy in front of the SuperLink)")
    parser.add_argument("--ca", type=Path, help="the federation's CA certificate (ca.crt)")
    parser.add_argument("--key", type=Path, help="this hospital's private authentication key (never leaves the hospital)")
    parser.add_argument("--port", type=int, default=9094, help="the SuperNode's runtime port, for its ClientApps' SuperExec")
    parser.add_argument("--insecure", action="store_true", help="no TLS and no node authentication: local rehearsal only")
    parser.add_argument("--clientapp-user", default=DEFAULT_USER, help=f"the unprivileged user the server's code runs as (default {DEFAULT_USER})")
    parser.add_argument("--unisolated", action="store_true", help="run the server's code as this user, with access to the images: local rehearsal only")
    parser.add_argument("--worker-dir", type=Path, help="where the worker's private socket folder goes (default: $XDG_RUNTIME_DIR, else the temporary folder)")
    parser.add_argument("--exchange", type=Path, help="the ClientApps run in another container that mounts this folder (see above); none run here")
    parser.add_argument("--clientapp-gid", type=int, help="with --exchange: the group id of the ClientApps' user in their container")
    parser.add_argument("--runtime-host", default="127.0.0.1", help="with --exchange: the address the runtime port listens on (the containers' network)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Command line: check, then run the worker, the SuperNode and the ClientApps' SuperExec together."""
    parser = command_line()
    args = parser.parse_args(argv)
    if args.exchange is not None and args.clientapp_gid is None:
        parser.error("--exchange needs --clientapp-gid: the group of the ClientApps' user in the other container")
    under = str(args.worker_dir or os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())
    # The worker's socket folder: private to this user and the ClientApp user's group, outside /tmp where possible.
    folder = args.exchange or Path(tempfile.mkdtemp(prefix="fedimaging-worker-", dir=under))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        site = load_site_config(args.site)
        check_policy_names(site)
        secret = folder / "superexec.secret"
        setup = SuperNodeSetup(args.site, args.superlink, args.ca, args.key, args.insecure, args.port, args.runtime_host, folder / SOCKET_FILE, secret)
        command = supernode_command(setup)
        user: AppUser | None = None
        if args.exchange is None and not args.unisolated:
            user = app_user(args.clientapp_user)
            check_isolation(user, site.data_root)
        group = args.clientapp_gid if args.exchange is not None else user.gid if user is not None else None
        write_secret(secret, group)
    except (ConfigError, DeploymentError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        _clean(folder, args.exchange is not None)
        return 2
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if user is not None:
        print(f"fedimaging: the server's code (each run's ClientApp) runs as {user.name} (uid {user.uid}), who cannot read {site.data_root}", flush=True)
    elif args.exchange is not None:
        print(f"fedimaging: the server's code runs in the ClientApps' container, reaching this hospital through {folder} only", flush=True)
    if args.unisolated:
        print("WARNING: unisolated: the server's code (each run's ClientApp) runs as this user, with access to the images; for a local rehearsal only", file=sys.stderr)
    env = {"TF_CPP_MIN_LOG_LEVEL": "2", **flower_process_env()}
    home = private_home(user, under) if args.exchange is None else None
    # A SIGTERM (systemd, docker stop) unwinds like Ctrl-C, so every process stops together.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    processes: dict[str, subprocess.Popen] = {}
    try:
        shared = ["--group", str(group)] if group is not None else []
        processes["training worker"] = subprocess.Popen([sys.executable, "-m", "client.worker", "--folder", str(folder), "--site", str(site.path), *shared], env=env)
        wait_for_worker(processes["training worker"], folder / SOCKET_FILE)
        processes["SuperNode"] = subprocess.Popen(command, env=env)
        wait_for_port(processes["SuperNode"], args.port, "SuperNode")
        if home is not None:
            run_as = user.run_as() if user is not None else []
            processes["ClientApps' SuperExec"] = subprocess.Popen([*run_as, *superexec_command(f"127.0.0.1:{args.port}", None, secret)], env=_clientapp_env(home))
        return supervise(processes, folder / SOCKET_FILE)
    except DeploymentError as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    finally:
        stop_all(list(processes.values()))
        _clean(folder, args.exchange is not None)
        if home is not None:
            shutil.rmtree(home, ignore_errors=True)


def _clean(folder: Path, shared: bool) -> None:
    """Remove the worker's folder, or, where it is a volume shared with the ClientApps' container, what this put in it."""
    if not shared:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for name in (SOCKET_FILE, KEY_FILE, "superexec.secret"):
        (folder / name).unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())
