"""The aggregation server's processes, started and stopped together:

- the SuperLink, on loopback only, with TLS and node authentication, its state (runs, registered keys) in a database
  file that outlives it, and process isolation: no SuperExec of Flower's own making;
- the SuperExec we start for it, proving itself with a shared secret, without which the Runtime API hands no task to
  anyone (Flower 1.42 honours the secret only this way);
- nginx in front (server/proxy.py), the one address hospitals reach: the Fleet API and nothing else.

The Control API (flwr run, ls, log, stop, supernode register) stays on the SuperLink's loopback port: the operator uses
it on the server itself, or through an SSH tunnel. The state folder keeps everything: the database, the secret, the
proxy's files, the logs, and a FLWR_HOME whose config.toml points the flwr command line at the loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from common.deployment import SuperLinkSetup, flower_process_env, superexec_command, superlink_command, write_secret
from server.launch import BIN, PROJECT, QUIET_LOGS, RunFailed, stop, wait_for_health
from server.proxy import ProxySetup, start_proxy
from server.roster import ROSTER, Registered, add_to_roster, key_digest

CONNECTION = "fedimaging"
DATABASE, SECRET = "linkstate.db", "superexec.secret"


@dataclass
class ServerStack:
    """A running aggregation server: its processes and where things are."""

    state: Path
    certs: Path | None
    listen: tuple[str, int]  # where hospitals connect (nginx)
    internal_port: int  # the SuperLink on 127.0.0.1 (Control and Runtime APIs too)
    env: dict[str, str]
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def flwr_home(self) -> Path:
        """The FLWR_HOME whose config.toml points the flwr command line at this SuperLink."""
        return self.state / "flwr-home"

    @property
    def address(self) -> str:
        """host:port hospitals connect to."""
        return f"{self.listen[0]}:{self.listen[1]}"

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run the flwr command line against this SuperLink (on loopback)."""
        return flwr_command(self.flwr_home, *args, timeout=timeout)

    def register(self, public_key: Path, name: str, images: int | None = None) -> Registered:
        """Register a hospital's public key with the SuperLink and write it into the roster beside the certificates."""
        return register_hospital(self.state, self.certs, public_key, name, images)

    @property
    def roster(self) -> Path:
        """The roster file registration writes."""
        return roster_path(self.state, self.certs)


def flwr_command(flwr_home: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run the flwr command line with the given FLWR_HOME (its config.toml names the SuperLink)."""
    env = {**flower_process_env(), "FLWR_HOME": str(flwr_home)}
    return subprocess.run([str(BIN / "flwr"), *args], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=timeout)


def roster_path(state: Path, certs: Path | None) -> Path:
    """The roster file: next to the certificates, else in the state folder."""
    return (certs or state) / ROSTER


def register_hospital(state: Path, certs: Path | None, public_key: Path, name: str, images: int | None = None) -> Registered:
    """Register a hospital's public key with the running SuperLink (on loopback) and add it to the roster; RunFailed
    with flwr's own words where the SuperLink refuses."""
    out = flwr_command(state / "flwr-home", "supernode", "register", str(public_key), CONNECTION, "--format", "json")
    try:
        node_id = int(json.loads(out.stdout[out.stdout.index("{") :])["node-id"])
    except (ValueError, KeyError) as exc:
        raise RunFailed(f"registering {public_key} failed: {out.stdout.strip()[-500:]} {out.stderr.strip()[-500:]}") from exc
    hospital = Registered(name, node_id, key_digest(public_key), images)
    add_to_roster(roster_path(state, certs), hospital)
    return hospital


def _private_file(path: Path) -> Path:
    """An empty file only its owner may read (the database: it holds task tokens, apps and weights)."""
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    path.chmod(0o600)
    return path


def start_stack(state: Path, certs: Path | None, listen_host: str, listen_port: int, internal_port: int) -> ServerStack:
    """Start the SuperLink, its SuperExec and the proxy (in that order, each answering before the next); on any failure
    stop what started and raise DeploymentError or RunFailed saying why."""
    state.mkdir(parents=True, exist_ok=True)
    os.chmod(state, 0o700)
    stack = ServerStack(state, certs, (listen_host, listen_port), internal_port, {})
    stack.flwr_home.mkdir(exist_ok=True)
    stack.env = {**QUIET_LOGS, **flower_process_env(), "FLWR_HOME": str(stack.flwr_home)}
    ca = certs / "ca.crt" if certs is not None else None
    security = f'root-certificates = "{ca}"' if ca is not None else "insecure = true"
    (stack.flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{internal_port}"\n{security}\n'
    )
    write_secret(state / SECRET)
    _private_file(state / DATABASE)
    try:
        _start_superlink(stack)
        stack.processes["proxy"] = start_proxy(ProxySetup(listen_host, listen_port, internal_port, state / "proxy", certs), stack.env)
    except BaseException:
        stop_stack(stack)
        raise
    return stack


def _start_superlink(stack: ServerStack) -> None:
    """The SuperLink (its state in the database file) and then its SuperExec, each answering before the next."""
    ca = stack.certs / "ca.crt" if stack.certs is not None else None
    state, port = stack.state, stack.internal_port
    setup = SuperLinkSetup("127.0.0.1", port, stack.certs, stack.certs is None, state / "superlink.log", state / DATABASE, state / SECRET)
    stack.processes["superlink"] = _start(superlink_command(setup), stack, "superlink.out")
    wait_for_health(stack.processes["superlink"], port, ca, state / "superlink.out")
    stack.processes["superexec"] = _start(superexec_command(f"127.0.0.1:{port}", ca, state / SECRET), stack, "superexec.out")


def restart_superlink(stack: ServerStack) -> None:
    """Stop the SuperLink and its SuperExec as a crash or an upgrade would (the proxy stays), and start them again on
    the same database: runs and registered keys are kept, and the hospitals reconnect by themselves."""
    for name in ("superexec", "superlink"):
        process = stack.processes.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, 9)
        process.wait()
    _start_superlink(stack)


def _start(command: list[str], stack: ServerStack, log: str) -> subprocess.Popen:
    """Start one of the server's processes in a session of its own, its output in the state folder."""
    return subprocess.Popen(command, stdout=open(stack.state / log, "a"), stderr=subprocess.STDOUT, env=stack.env, cwd=stack.state, start_new_session=True)


def stop_stack(stack: ServerStack) -> None:
    """Stop every process of the server (and everything they started), proxy first."""
    for name in ("proxy", "superexec", "superlink"):
        if name in stack.processes:
            stop(stack.processes[name], stack.flwr_home)
    with contextlib.suppress(OSError):
        (stack.state / "proxy" / "nginx.pid").unlink()


def supervise(stack: ServerStack) -> int:
    """Wait until one of the server's processes ends; 1 (it should not have), after saying which and where its log is."""
    while True:
        for name, process in stack.processes.items():
            if process.poll() is not None:
                print(f"fedimaging: the {name} stopped (code {process.returncode}); its output: {stack.state}: stopping the server", file=sys.stderr, flush=True)
                return 1
        time.sleep(0.5)


def describe(stack: ServerStack) -> list[str]:
    """What the operator needs to know once the server runs."""
    where = "with TLS and node authentication" if stack.certs is not None else "INSECURE: no TLS, no node authentication"
    return [
        f"hospitals connect to {stack.address} ({where}): the Fleet API only, through nginx",
        f"the SuperLink itself listens on 127.0.0.1:{stack.internal_port} only (Control API: flwr run/ls/log/stop/supernode)",
        f"  on this server: FLWR_HOME={stack.flwr_home} flwr ls {CONNECTION}",
        f"  from elsewhere: ssh -L {stack.internal_port}:127.0.0.1:{stack.internal_port} <this server>, then the same config.toml",
        f"state (runs and registered keys survive a restart): {stack.state / DATABASE}",
    ]
