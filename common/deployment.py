"""The commands that start a deployed federation's processes, checked first: a SuperLink with TLS and node
authentication, and a SuperNode per hospital with its site file; insecure mode only when asked, with a warning."""

from __future__ import annotations

import os
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


WORKER_SOCKET = "worker-socket"  # node-config key: the hospital's training worker's Unix socket (client/worker.py)
INSECURE_WARNING = "WARNING: insecure mode: no TLS, no node authentication; for a local rehearsal only, never across a network"


@dataclass(frozen=True)
class SuperLinkSetup:
    """How the aggregation server's SuperLink runs."""

    host: str = "0.0.0.0"
    port: int = 9092
    certs: Path | None = None  # folder with ca.crt, superlink.crt, superlink.key; None only with insecure
    insecure: bool = False
    log_file: Path | None = None


@dataclass(frozen=True)
class SuperNodeSetup:
    """How a hospital's SuperNode runs."""

    site_file: Path
    superlink: str  # host:port
    ca_file: Path | None = None
    key_file: Path | None = None  # the hospital's private authentication key
    insecure: bool = False
    port: int = 9094  # the SuperNode's local runtime API (loopback)
    worker_socket: Path | None = None  # the hospital's long-lived training worker (client/worker.py), if it runs one


def superlink_command(setup: SuperLinkSetup) -> list[str]:
    """The checked flower-superlink command line; raises DeploymentError saying what to fix."""
    command = [str(BIN / "flower-superlink"), "--host", setup.host, "--port", str(setup.port), "--disable-runtime-dependency-installation"]
    if setup.log_file is not None:
        command += ["--log-file", str(setup.log_file)]
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
        str(BIN / "flower-supernode"), "--superlink", setup.superlink, "--port", str(setup.port), "--host", "127.0.0.1",
        "--node-config", f"site-config='{Path(setup.site_file).resolve()}'" + (f" {WORKER_SOCKET}='{setup.worker_socket}'" if setup.worker_socket else ""),
    ]  # fmt: skip
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
