"""The commands that start a deployed federation's processes, checked first: a SuperLink with TLS, node
authentication, its state in a database file and its SuperExec behind a shared secret; a SuperNode per hospital whose
ClientApps run in a SuperExec of their own; insecure mode only when asked, with a warning."""

from __future__ import annotations

import os
import shutil
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

from common.site_file import load_site_config
from common.tls import DeploymentError, check_node_key, check_server_files, load_certificate, probe_superlink

BIN = Path(sys.executable).parent
OFFLINE_FLOWER = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: never `uv sync` the app's dependencies
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}


def flower_process_env() -> dict[str, str]:
    """This environment for a Flower process: offline and quiet, this installation's binaries first on PATH (the
    SuperLink and SuperNode start flower-superexec and flwr-* processes by name)."""
    return {**os.environ, **OFFLINE_FLOWER, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}


WORKER_SOCKET = "worker-socket"  # node-config key: the hospital's worker's Unix socket (client/worker.py)
SITE_NAME = "site-name"  # node-config key: the hospital's name, for a failure its worker could not answer
DEFAULT_USER = "fedimaging-app"  # the account a hospital's ClientApps (the server's code) run as
CREATE_USER = "useradd --system --no-create-home --shell /usr/sbin/nologin {name}"
INSECURE_WARNING = "WARNING: insecure mode: no TLS, no node authentication; for a local rehearsal only, never across a network"


@dataclass(frozen=True)
class SuperLinkSetup:
    """How the aggregation server's SuperLink runs: on loopback, behind the proxy (server/proxy.py)."""

    host: str = "127.0.0.1"
    port: int = 9091
    certs: Path | None = None  # folder with ca.crt, superlink.crt, superlink.key; None only with insecure
    insecure: bool = False
    log_file: Path | None = None
    database: Path | None = None  # its state (runs, registered keys): kept across restarts; None: in memory
    secret_file: Path | None = None  # the SuperExec's shared secret: process isolation, a SuperExec started by us


@dataclass(frozen=True)
class SuperNodeSetup:
    """How a hospital's SuperNode runs."""

    site_file: Path
    superlink: str  # host:port
    ca_file: Path | None = None
    key_file: Path | None = None  # the hospital's private authentication key
    insecure: bool = False
    port: int = 9094  # the SuperNode's runtime API, where its ClientApps' SuperExec connects
    runtime_host: str = "127.0.0.1"  # loopback; the ClientApps' container's network where they run in one of their own
    worker_socket: Path | None = None  # the hospital's long-lived training worker (client/worker.py)
    secret_file: Path | None = None  # the ClientApps' SuperExec's shared secret: process isolation


def superlink_command(setup: SuperLinkSetup) -> list[str]:
    """The checked flower-superlink command line; raises DeploymentError saying what to fix."""
    command = [str(BIN / "flower-superlink"), "--host", setup.host, "--port", str(setup.port), "--disable-runtime-dependency-installation"]
    if setup.log_file is not None:
        command += ["--log-file", str(setup.log_file)]
    if setup.database is not None:
        command += ["--database", str(setup.database)]
    if setup.secret_file is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(setup.secret_file)]
    if setup.insecure:
        return command + ["--insecure"]
    if setup.certs is None:
        raise DeploymentError("no certificate folder: give --certs (made by deploy/certificates.py), or --insecure for a local rehearsal")
    ca, cert, key = setup.certs / "ca.crt", setup.certs / "superlink.crt", setup.certs / "superlink.key"
    check_server_files(ca, cert, key)
    return command + ["--ssl-ca-certfile", str(ca), "--ssl-certfile", str(cert), "--ssl-keyfile", str(key), "--enable-supernode-auth"]


def supernode_command(setup: SuperNodeSetup, probe: bool = True) -> list[str]:
    """The checked flower-supernode command line (site file, certificate, key, and the SuperLink answering); raises
    ConfigError for the site file and DeploymentError for the rest, each saying what to fix."""
    load_site_config(setup.site_file)
    command = [
        str(BIN / "flower-supernode"), "--superlink", setup.superlink, "--port", str(setup.port), "--host", setup.runtime_host,
        "--node-config", (f"{WORKER_SOCKET}='{setup.worker_socket}' {SITE_NAME}='{load_site_config(setup.site_file).name}'"
                          if setup.worker_socket else f"site-config='{Path(setup.site_file).resolve()}'"),
    ]  # fmt: skip
    if setup.secret_file is not None:
        command += ["--isolation", "process", "--superexec-auth-secret-file", str(setup.secret_file)]
    if setup.insecure:
        if probe:
            probe_superlink(setup.superlink, None)
        return command + ["--insecure"]
    if setup.ca_file is None or setup.key_file is None:
        raise DeploymentError("give the federation's CA certificate (--ca) and this hospital's private key (--key), or --insecure for a local rehearsal")
    load_certificate(setup.ca_file, "CA certificate")
    check_node_key(setup.key_file)
    if probe:
        probe_superlink(setup.superlink, setup.ca_file)
    return command + ["--root-certificates", str(setup.ca_file), "--auth-supernode-private-key", str(setup.key_file)]


def superexec_command(runtime_address: str, ca_file: Path | None, secret_file: Path) -> list[str]:
    """flower-superexec for the Runtime API at runtime_address (TLS trusting ca_file, or plaintext on loopback),
    proving itself with the shared secret; it starts every ServerApp or ClientApp process of its SuperLink or SuperNode."""
    trust = ["--root-certificates", str(ca_file)] if ca_file is not None else ["--insecure"]
    return [str(BIN / "flower-superexec"), "--runtime-api-address", runtime_address, *trust, "--superexec-auth-secret-file", str(secret_file)]


def write_secret(path: Path, group: int | None = None) -> Path:
    """A new random shared secret, created readable by its owner only (and its group, where given) from the first byte."""
    mode = 0o640 if group is not None else 0o600
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        if group is not None:
            os.fchown(fd, -1, group)
        os.write(fd, os.urandom(32).hex().encode())
    finally:
        os.close(fd)
    return path


def listening(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port (an any-address host: asked on loopback)."""
    try:
        with socket.create_connection((host if host not in ("0.0.0.0", "::") else "127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def closed_folders() -> list[Path]:
    """The folders on the way to this installation (its interpreter, virtual environment and code) that other users
    cannot pass through: each keeps the ClientApp user from running it."""
    targets = {Path(sys.executable).resolve(), Path(sys.prefix), Path(__file__).resolve().parent.parent}
    folders = {folder for target in targets for folder in (target, *target.parents)}
    return sorted(f for f in folders if f.is_dir() and not f.stat().st_mode & 0o001)


def run_as(uid: int, gid: int) -> list[str]:
    """The command prefix (util-linux's setpriv) that runs a command as that user, its privileges dropped for good and
    ended with its parent."""
    setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
    return [setpriv, f"--reuid={uid}", f"--regid={gid}", "--init-groups", "--no-new-privs", "--pdeathsig=TERM", "--"]
