"""Rehearse a deployment on this machine: a SuperLink with TLS and node authentication and a SuperNode per hospital,
each with its own site file and folder of built-in images, all on loopback; runs a short federation and stops
everything it started, also when it fails.

    python -m server.rehearse [--hospitals 2] [--rounds 2] [--workdir rehearsal/] [--insecure]
    python -m server.rehearse -c "sites='a.yaml,b.yaml' heldout-site='heldout.yaml'"   # your own site files

The work folder keeps what a real deployment has: certs/ (CA, SuperLink certificate, hospital keys), sites/ (the
demo site files, images, and each hospital's reports/<name>/ with its audit log), logs/, and runs/<run-name>/.
With `sites=` each site file is a hospital (its SuperNode reads it; --hospitals is then the number of files), and
with `heldout-site=` the server's held-out set is that site's images. Every site file is checked first (the data
check); a site that is NOT READY stops the rehearsal before anything starts.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from common.config import RunConfig, parse_overrides, parse_run_config, project_settings
from common.demo_sites import write_demo_sites
from common.deployment import INSECURE_WARNING, SuperNodeSetup, supernode_command
from common.errors import ConfigError, DataError
from common.site_file import load_site_config
from common.tls import DeploymentError
from server.launch import BIN, PROJECT, RunFailed, flower_env, free_port, outcome, start_superlink, stop, write_run_config

CONNECTION = "rehearsal"
CERTIFICATES = PROJECT / "deploy" / "certificates.py"


@dataclass
class Federation:
    """A running loopback federation: its SuperLink, the SuperNodes started so far, and where everything lives."""

    workdir: Path
    flwr_home: Path
    env: dict[str, str]
    superlink: subprocess.Popen
    port: int
    insecure: bool
    nodes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def address(self) -> str:
        """The SuperLink's host:port."""
        return f"127.0.0.1:{self.port}"


def make_certificates(workdir: Path, hospitals: list[str]) -> Path:
    """The CA, the SuperLink's certificate for loopback, and a key pair per hospital, by deploy/certificates.py; returns certs/."""
    certs = workdir / "certs"
    steps = [["ca"], ["superlink", "--hosts", "127.0.0.1,localhost"]] + [["hospital", "--name", name] for name in hospitals]
    for step in steps:
        subprocess.run([sys.executable, str(CERTIFICATES), step[0], "--out", str(certs), *step[1:]], check=True, capture_output=True)
    return certs


def _flwr(federation: Federation, *args: str) -> subprocess.CompletedProcess:
    """Run the flwr command line against the rehearsal's SuperLink."""
    return subprocess.run([str(BIN / "flwr"), *args], env=federation.env, cwd=PROJECT, capture_output=True, text=True, timeout=120)


def register(federation: Federation, public_key: Path) -> None:
    """Register a hospital's public key with the SuperLink, so that its SuperNode is let in."""
    out = _flwr(federation, "supernode", "register", str(public_key), CONNECTION)
    if out.returncode != 0:
        raise RunFailed(f"registering {public_key.name} failed: {out.stdout.strip()[-500:]} {out.stderr.strip()[-500:]}")


def start_supernode(
    federation: Federation, site_file: Path, key: Path | None, name: str, insecure: bool | None = None, worker: bool = True,
) -> subprocess.Popen:  # fmt: skip
    """Start a hospital, its output in logs/<name>.log; insecure defaults to the federation's mode.

    With worker (as hospitals run it): `python -m client.supernode`, which checks everything, then runs the SuperNode
    beside the hospital's long-lived training worker. Without: a bare flower-supernode, where every message starts a
    fresh ClientApp process that does all the work; nothing checks the node first, so a plaintext intruder that our
    start command would refuse can be staged.
    """
    insecure = federation.insecure if insecure is None else insecure
    certs = federation.workdir / "certs"
    port = free_port()
    if worker:
        command = [sys.executable, "-m", "client.supernode", "--site", str(site_file), "--superlink", federation.address, "--port", str(port)]
        command += ["--insecure"] if insecure else ["--ca", str(certs / "ca.crt"), "--key", str(key)]
    else:
        command = supernode_command(SuperNodeSetup(site_file, federation.address, None if insecure else certs / "ca.crt", key, insecure, port), probe=False)
    log = open(federation.workdir / "logs" / f"{name}.log", "w")
    node = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=federation.env, cwd=PROJECT, start_new_session=True)
    federation.nodes.append(node)
    return node


@contextlib.contextmanager
def federation(workdir: Path, insecure: bool = False) -> Iterator[Federation]:
    """A loopback SuperLink (TLS and node authentication unless insecure) for the work folder; everything it and its
    SuperNodes started is stopped on the way out, whatever happens."""
    (workdir / "logs").mkdir(parents=True, exist_ok=True)
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(exist_ok=True)
    env = flower_env(flwr_home)
    certs = workdir / "certs"
    if insecure:
        options = ["--insecure"]
    else:
        options = ["--ssl-ca-certfile", str(certs / "ca.crt"), "--ssl-certfile", str(certs / "superlink.crt"),
                   "--ssl-keyfile", str(certs / "superlink.key"), "--enable-supernode-auth"]  # fmt: skip
    superlink, port = start_superlink(flwr_home, env, options, None if insecure else certs / "ca.crt")
    try:
        security = "insecure = true" if insecure else f'root-certificates = "{certs / "ca.crt"}"'
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\n{security}\n'
        )
        yield Federation(workdir, flwr_home, env, superlink, port, insecure)
    finally:
        stop(superlink, flwr_home)
        with contextlib.suppress(OSError):
            (workdir / "logs" / "superlink.log").write_text((flwr_home / "superlink.log").read_text())


def run(federation: Federation, cfg: RunConfig, timeout: float = 1800) -> Path:
    """Submit the app with `flwr run`, wait for it, and return the run folder; RunFailed says why not."""
    settings = write_run_config(federation.workdir / "run-config.toml", cfg)
    command = [str(BIN / "flwr"), "run", str(PROJECT), CONNECTION, "--stream", "--run-config", str(settings)]
    with open(federation.workdir / "logs" / "flwr-run.log", "w") as log:
        subprocess.run(command, env=federation.env, cwd=PROJECT, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, check=False)
    folder = Path(cfg.output_dir) / cfg.run_name
    try:
        outcome(CONNECTION, federation.env, folder)
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


def rehearse(workdir: Path, hospitals: int, rounds: int, insecure: bool = False, worker: bool = True, overrides: dict | None = None) -> Path:
    """The whole rehearsal: sites (the demo's, or the site files the settings name), the data check, certificates,
    SuperLink, SuperNodes (with their training workers unless told not to), a run; returns the run folder."""
    demo = parse_run_config({**project_settings(), "num-hospitals": hospitals, "images-per-hospital": 100, "heldout-images": 60, "image-size": 32})
    *demo_sites, demo_heldout = write_demo_sites(demo, workdir / "sites")
    cfg = rehearsal_config(workdir, demo_heldout, hospitals, rounds, overrides)
    site_files = [Path(p) for p in cfg.sites] or demo_sites
    names = [load_site_config(f).name for f in site_files]
    if len(set(names)) != len(names):
        raise ConfigError(f"run setting 'sites': two site files name the same site ({', '.join(names)}); every hospital needs its own name")
    from common.data_check import require_ready  # imports TensorFlow: after the settings are known to be sound

    require_ready([*map(str, site_files), cfg.heldout_site], cfg, lambda line: print(f"fedimaging: {line}", flush=True))
    certs = None if insecure else make_certificates(workdir, names)
    hospitals = len(site_files)
    print(f"fedimaging: rehearsal in {workdir}: {hospitals} hospitals, {rounds} rounds, {'INSECURE' if insecure else 'TLS and node authentication'}", flush=True)
    with federation(workdir, insecure) as fed:
        for name, site_file in zip(names, site_files):
            key = None if insecure else certs / "hospitals" / name
            if not insecure:
                register(fed, certs / "hospitals" / f"{name}.pub")
            start_supernode(fed, site_file, key, name, worker=worker)
        start = time.time()
        folder = run(fed, cfg)
        print(f"fedimaging: {rounds} rounds in {time.time() - start:.0f} s (run submitted to finished)", flush=True)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: rehearse, and exit 0 only if the run completed."""
    parser = argparse.ArgumentParser(prog="python -m server.rehearse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, default=2, choices=range(1, 9), metavar="N")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workdir", type=Path, help="keep everything here (default: a temporary folder, kept if the run fails)")
    parser.add_argument("--insecure", action="store_true", help="no TLS, no node authentication")
    parser.add_argument("--no-worker", action="store_true", help="bare SuperNodes: every message imports TensorFlow and loads its site anew")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="fedimaging-rehearsal-"))).resolve()
    if args.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    try:
        folder = rehearse(workdir, args.hospitals, args.rounds, args.insecure, not args.no_worker, parse_overrides(args.run_config))
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
