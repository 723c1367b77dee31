"""Rehearse a deployment on this machine, as it runs for real: the aggregation server (the SuperLink on loopback with
TLS, node authentication and its state in a database file, its SuperExec behind a secret, nginx in front answering
the Fleet API only) and a hospital per site file (its worker reading the images, its SuperNode, and the server's code
run as an unprivileged user that cannot read them), all on loopback; runs a short federation and stops everything it
started, also when it fails.

    python -m server.rehearse [--hospitals 2] [--rounds 2] [--workdir rehearsal/] [--insecure]
    python -m server.rehearse -c "sites='a.yaml,b.yaml' heldout-site='heldout.yaml'"   # your own site files

The work folder keeps what a real deployment has: certs/ (CA, SuperLink certificate, hospital keys, the roster),
server/ (the SuperLink's database, the proxy's configuration and logs), sites/ (the demo site files, images, and each
hospital's reports/<name>/ with its audit log), logs/, and runs/<run-name>/. With `sites=` each site file is a
hospital (its SuperNode reads it; --hospitals is then the number of files), and with `heldout-site=` the server's
held-out set is that site's images. Every site file is checked first (the data check); a site that is NOT READY stops
the rehearsal before anything starts. Run as root, the rehearsal creates the ClientApp user (fedimaging-app) where it
is missing and makes the demo images unreadable to it; as any other user it runs the ClientApps unisolated, and says so.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.cli import program
from common.config import RunConfig, parse_overrides, parse_run_config, project_settings
from common.demo_sites import write_demo_sites
from common.deployment import CREATE_USER, DEFAULT_USER, INSECURE_WARNING, SuperNodeSetup, closed_folders, run_as, superexec_command, supernode_command
from common.errors import ConfigError, DataError
from common.site_file import load_site_config
from common.tls import DeploymentError
from server.launch import BIN, PROJECT, RunFailed, free_port, interruption, outcome, quiet_here, stream_run, write_run_config
from server.run_folder import FAILED, INTERRUPTED, RUNNING, mark_ended
from server.stack import CONNECTION, ServerStack, start_stack, stop_stack

CERTIFICATES = PROJECT / "deploy" / "certificates.py"


@dataclass
class Federation:
    """A running loopback federation: its aggregation server, the hospitals started so far, and where everything lives."""

    workdir: Path
    stack: ServerStack
    insecure: bool
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The address hospitals connect to (the proxy)."""
        return self.stack.address

    @property
    def roster(self) -> Path:
        """The roster registration writes."""
        return self.stack.roster

    @property
    def env(self) -> dict[str, str]:
        """The environment of the flwr command line against this federation."""
        return self.stack.env


def make_certificates(workdir: Path, hospitals: list[str]) -> Path:
    """The CA, the SuperLink's certificate for loopback, and a key pair per hospital, by deploy/certificates.py; returns certs/."""
    certs = workdir / "certs"
    steps = [["ca"], ["superlink", "--hosts", "127.0.0.1,localhost"]] + [["hospital", "--name", name] for name in hospitals]
    for step in steps:
        subprocess.run([sys.executable, str(CERTIFICATES), step[0], "--out", str(certs), *step[1:]], check=True, capture_output=True)
    return certs


def register(federation: Federation, public_key: Path, name: str) -> None:
    """Register a hospital's public key with the SuperLink (and in the roster), so that its SuperNode is let in."""
    federation.stack.register(public_key, name)


def ensure_app_user(name: str = DEFAULT_USER) -> bool:
    """Whether the ClientApps can be isolated here: as root, the ClientApp user exists (made now where missing) and can
    pass through the folders on the way to this installation (opened with o+x, traverse only, where closed)."""
    if os.geteuid() != 0:
        return False
    try:
        pwd.getpwnam(name)
    except KeyError:
        print(f"fedimaging: creating the ClientApp user: {CREATE_USER.format(name=name)}", flush=True)
        made = subprocess.run(CREATE_USER.format(name=name).split(), capture_output=True, text=True)
        if made.returncode != 0:  # another rehearsal may have made it meanwhile (useradd exits 9: the user exists)
            try:
                pwd.getpwnam(name)
            except KeyError:
                raise RunFailed(f"could not create the ClientApp user {name!r}: {made.stderr.strip()}") from None
    for folder in closed_folders():  # e.g. /root, where pyenv keeps Python: other users may pass, not list
        print(f"fedimaging: letting the ClientApp user through {folder} to this installation: chmod o+x {folder}", flush=True)
        folder.chmod(folder.stat().st_mode | 0o001)
    return True


def start_supernode(
    federation: Federation, site_file: Path, key: Path | None, name: str, insecure: bool | None = None, worker: bool = True,
    exchange: Path | None = None,
) -> subprocess.Popen:  # fmt: skip
    """Start a hospital, its output in logs/<name>.log; insecure defaults to the federation's mode.

    With worker (as hospitals run it): `python -m client.supernode`, which checks everything, then runs the hospital's
    worker, its SuperNode, and the server's code as the ClientApp user (unisolated where this process is not root).
    With exchange as well (root only), the layout of deploy/compose-hospital.yml: the ClientApps' SuperExec runs apart,
    as the ClientApp user, reaching the hospital through the exchange folder, as its own container would.
    Without worker: a bare flower-supernode whose per-message ClientApps do all the work themselves; nothing checks the
    node first, so intruders that our start command would refuse can be staged.
    """
    insecure = federation.insecure if insecure is None else insecure
    certs = federation.workdir / "certs"
    port = free_port()
    if worker:
        command = [sys.executable, "-m", "client.supernode", "--site", str(site_file), "--superlink", federation.address, "--port", str(port)]
        command += ["--insecure"] if insecure else ["--ca", str(certs / "ca.crt"), "--key", str(key)]
        if exchange is not None:
            if not ensure_app_user():
                raise RunFailed("running the ClientApps apart needs root (to run them as the ClientApp user)")
            command += ["--exchange", str(exchange), "--clientapp-gid", str(pwd.getpwnam(DEFAULT_USER).pw_gid)]
        else:
            command += ["--clientapp-user", DEFAULT_USER] if ensure_app_user() else ["--unisolated"]
    else:
        command = supernode_command(SuperNodeSetup(site_file, federation.address, None if insecure else certs / "ca.crt", key, insecure, port), probe=False)
    log = open(federation.workdir / "logs" / f"{name}.log", "w")
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=federation.env, cwd=PROJECT, start_new_session=True)
    federation.nodes.append(node)
    if exchange is not None:
        federation.nodes.append(_clientapps_apart(federation, exchange, port, log))
    return node


def _clientapps_apart(federation: Federation, exchange: Path, port: int, log) -> subprocess.Popen:
    """The ClientApps' SuperExec of compose-hospital.yml's second container, as the ClientApp user with a home of its
    own beside the exchange folder, once the hospital has shared its worker there."""
    user = pwd.getpwnam(DEFAULT_USER)
    deadline = time.monotonic() + 300
    while not (exchange / "worker.sock").exists():  # the secret is written first, the worker's socket when all is shared
        if time.monotonic() > deadline:
            raise RunFailed(f"the hospital's worker did not listen in {exchange} within 300 s")
        time.sleep(0.5)
    home = Path(tempfile.mkdtemp(prefix="clientapps-home-", dir=exchange.parent))  # where that user can reach it
    os.chown(home, user.pw_uid, user.pw_gid)
    env = {**federation.env, "FLWR_HOME": str(home), "HOME": str(home), "TMPDIR": str(home)}
    command = [*run_as(user.pw_uid, user.pw_gid), *superexec_command(f"127.0.0.1:{port}", None, exchange / "superexec.secret")]
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=home, start_new_session=True)


@contextlib.contextmanager
def federation(workdir: Path, insecure: bool = False) -> Iterator[Federation]:
    """The aggregation server on loopback (TLS and node authentication unless insecure) for the work folder; everything
    it and its hospitals started is stopped on the way out, whatever happens."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    certs = None if insecure else workdir / "certs"
    stack = start_stack(workdir / "server", certs, "127.0.0.1", free_port(), free_port())
    fed = Federation(workdir, stack, insecure)
    try:
        yield fed
    finally:
        for node in fed.nodes:
            with contextlib.suppress(OSError):
                os.killpg(node.pid, signal.SIGTERM)
        for node in fed.nodes:
            try:
                node.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    os.killpg(node.pid, signal.SIGKILL)
        stop_stack(stack)
        for log in ("superlink.log", "superlink.out", "superexec.out"):
            with contextlib.suppress(OSError):
                shutil.copy(stack.state / log, workdir / "logs" / log)


def run(federation: Federation, cfg: RunConfig, timeout: float = 1800, verbose: bool = False) -> Path:
    """Submit the app with `flwr run` (naming hospitals from the roster, where hospitals were registered), show its
    progress, wait for it, and return the run folder; RunFailed says why not. Interrupted (Ctrl-C, SIGTERM), the run
    folder says so."""
    if not cfg.roster and federation.stack.roster.exists():
        cfg = dataclasses.replace(cfg, roster=str(federation.stack.roster))
    settings = write_run_config(federation.workdir / "run-config.toml", cfg)
    command = [str(BIN / "flwr"), "run", str(PROJECT), CONNECTION, "--stream", "--run-config", str(settings)]
    log = federation.workdir / "logs" / f"flwr-run-{cfg.run_name}.log"
    folder = Path(cfg.output_dir) / cfg.run_name
    try:
        run_id = stream_run(command, federation.env, log, verbose, timeout)
    except (KeyboardInterrupt, SystemExit) as exc:
        mark_ended(folder, INTERRUPTED, f"interrupted by {interruption(exc)[0]}", replacing=(RUNNING, FAILED))
        raise
    try:
        outcome(CONNECTION, federation.env, folder, run_id)
    except RunFailed as exc:
        raise RunFailed(f"{exc}; logs in {federation.workdir / 'logs'}") from None
    return folder


def rehearsal_config(workdir: Path, heldout: Path, hospitals: int, rounds: int, overrides: dict | None = None) -> RunConfig:
    """The rehearsal's run settings: the app's defaults, small images, the held-out site, output under the work folder;
    the caller's settings (sites=, heldout-site= included) win."""
    overrides = overrides or {}
    settings = {
        **project_settings(), "num-server-rounds": rounds, "num-hospitals": hospitals, "min-hospitals": hospitals,
        "image-size": 32, "gradcam-images": 16, "heldout-site": str(heldout),
        "output-dir": str(workdir / "runs"), "run-name": time.strftime("rehearsal-%Y%m%d-%H%M%S"), **overrides,
    }  # fmt: skip
    if "sites" in overrides and "min-hospitals" not in overrides:
        settings["min-hospitals"] = len([p for p in str(overrides["sites"]).split(",") if p.strip()]) or hospitals
    return parse_run_config(settings)


def rehearse(workdir: Path, hospitals: int, rounds: int, insecure: bool = False, overrides: dict | None = None, verbose: bool = False) -> Path:
    """The whole rehearsal: sites (the demo's, or the site files the settings name), the data check, certificates,
    the aggregation server, the hospitals, a run; returns the run folder."""
    demo = parse_run_config({**project_settings(), "num-hospitals": hospitals, "images-per-hospital": 100, "heldout-images": 60, "image-size": 32})
    *demo_sites, demo_heldout = write_demo_sites(demo, workdir / "sites")
    cfg = rehearsal_config(workdir, demo_heldout, hospitals, rounds, overrides)
    site_files = [Path(p) for p in cfg.sites] or demo_sites
    names = [load_site_config(f).name for f in site_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"run setting 'sites': two site files name the same site ({', '.join(names)}); every hospital needs its own name")
    from common.data_check import require_ready  # imports TensorFlow: after the settings are known to be sound

    require_ready([*map(str, site_files), cfg.heldout_site], cfg, lambda line: print(f"fedimaging: {line}", flush=True))
    if os.geteuid() == 0:  # as a hospital keeps them: the server's code, run as the ClientApp user, must not read them
        for path in demo_sites:
            os.chmod(load_site_config(path).data_root, 0o700)
    certs = None if insecure else make_certificates(workdir, names)
    hospitals = len(site_files)
    print(f"fedimaging: rehearsal in {workdir}: {hospitals} hospitals, {rounds} rounds, {'INSECURE' if insecure else 'TLS and node authentication'}", flush=True)
    with federation(workdir, insecure) as fed:
        for name, site_file in zip(names, site_files):
            key = None if insecure else certs / "hospitals" / name
            if not insecure:
                register(fed, certs / "hospitals" / f"{name}.pub", name)
            start_supernode(fed, site_file, key, name)
        start = time.time()
        folder = run(fed, cfg, verbose=verbose)
        print(f"fedimaging: {rounds} rounds in {time.time() - start:.0f} s (run submitted to finished)", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: rehearse, and exit 0 only if the run completed."""
    parser = argparse.ArgumentParser(prog=program("python -m server.rehearse"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=2, choices=range(1, 9), metavar="N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, kept if the run fails)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings")
    parser.add_argument("--verbose", "-v", action="store_true", help="also show Flower's, Ray's and TensorFlow's lines (always in the work folder's logs/)")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the run even where it started with SIGINT ignored
    quiet_here()
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="fedimaging-rehearsal-"))).resolve()
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    try:
        folder = rehearse(workdir, args.hospitals, args.rounds, args.insecure, parse_overrides(args.run_config), args.verbose)
    except (KeyboardInterrupt, SystemExit) as exc:
        how, code = interruption(exc)
        print(f"fedimaging: rehearsal interrupted by {how}; every process it started was stopped; work folder {workdir}", file=sys.stderr)
        return code
    except (ConfigError, DataError, DeploymentError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    except (RunFailed, subprocess.TimeoutExpired) as exc:
        print(f"fedimaging: the rehearsal failed: {exc}", file=sys.stderr)
        return 1
    print(f"fedimaging: rehearsal completed; work folder {workdir}; run folder {folder}; the demo hospitals' audit logs under {workdir / 'sites' / 'reports'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
