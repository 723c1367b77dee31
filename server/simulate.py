"""Run a simulated federation on this machine and say whether it worked.

Starts a private SuperLink on free loopback ports with its own FLWR_HOME, submits the app with `flwr run --stream`,
checks the run's real outcome (`flwr run` exits 0 even for a failed run) and stops every process it started.

    python -m server.simulate --run-config "num-server-rounds=5 partition='dirichlet'"
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from common.config import (
    ConfigError, RunConfig, config_to_dict, describe_settings, load_site_config, parse_overrides, parse_run_config, project_settings,
    site_label_sources,
)  # fmt: skip
from common.data import DataError
from common.partition import assign_hospitals, pool_labels
from common.site_data import index_site

PROJECT = Path(__file__).resolve().parent.parent
CONNECTION = "fedimaging-simulation"
QUIET_FLOWER = {
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",  # offline: never `uv sync` the app's dependencies
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
}

QUIET_LOGS = {  # defaults only: a variable already set in the environment wins
    "TF_CPP_MIN_LOG_LEVEL": "3",  # TensorFlow's C++ start-up chatter in every worker (errors still raise in Python)
    "PYTHONWARNINGS": "ignore::DeprecationWarning",  # Keras 3.15 on NumPy 2, once per worker and round
}


class RunFailed(RuntimeError):
    """The simulation did not complete; the message says why."""


def _toml_value(value: Any) -> str:
    """A str, bool, int or float as a TOML value."""
    return ("true" if value else "false") if isinstance(value, bool) else json.dumps(value)


def _free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prepare(overrides: dict[str, Any]) -> RunConfig:
    """The checked run configuration, with the run named and every path absolute; raises ConfigError before anything starts."""
    cfg = parse_run_config({**project_settings(), **overrides}, base_dir=PROJECT)
    if cfg.sites:  # fails now, not in a client, if a site file is wrong or does not cover the run's labels
        for path in cfg.sites:
            site = load_site_config(path)
            if site.layout != "npz":
                index_site(site, cfg.labels)
    else:
        assign_hospitals(pool_labels(cfg), cfg)  # fails now, not in a client, if the data cannot be shared out
    if cfg.heldout_site:
        site_label_sources(load_site_config(cfg.heldout_site), cfg.labels)
    run_name = cfg.run_name or time.strftime("%Y%m%d-%H%M%S")
    folder = Path(cfg.output_dir) / run_name
    if folder.exists():
        raise ConfigError(f"run setting 'run-name': run folder {folder} exists already")
    return parse_run_config({**config_to_dict(cfg), "run-name": run_name})


def start_superlink(flwr_home: Path, bin_dir: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """A simulation SuperLink serving all its APIs on one free loopback port; returns it and the port."""
    port = _free_port()
    log = open(flwr_home / "superlink.log", "w")
    process = subprocess.Popen(
        [
            str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
            "--host", "127.0.0.1", "--port", str(port),
            "--disable-runtime-dependency-installation",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=flwr_home, env=env,
    )  # fmt: skip
    deadline = time.time() + 60
    while time.time() < deadline:
        if process.poll() is not None:
            raise RunFailed(f"the SuperLink exited at start (code {process.returncode}):\n{(flwr_home / 'superlink.log').read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return process, port
        except OSError:
            time.sleep(0.3)
    stop(process, flwr_home)
    raise RunFailed("the SuperLink did not become ready within 60 s")


def stop(process: subprocess.Popen, flwr_home: Path) -> None:
    """Stop the SuperLink and every process it started, detached ones included (they all carry our FLWR_HOME)."""

    def ours(p: psutil.Process) -> bool:
        try:
            return p.environ().get("FLWR_HOME") == str(flwr_home)
        except (psutil.Error, OSError):
            return False

    try:
        root = psutil.Process(process.pid)
        procs = {root, *root.children(recursive=True)}
    except psutil.NoSuchProcess:
        procs = set()
    procs |= {p for p in psutil.process_iter() if p.pid != os.getpid() and ours(p)}
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(procs, timeout=15)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(1)


def write_connection(flwr_home: Path, port: int) -> None:
    """$FLWR_HOME/config.toml naming the private SuperLink as the default connection."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def federation_config(cfg: RunConfig) -> str:
    """The simulation's hospitals and resources, for `flwr run --federation-config`."""
    # One CPU per client (threads-per-client): Ray then trains as many hospitals at once as there are cores.
    return f"num-supernodes={cfg.num_hospitals} client-resources-num-cpus={cfg.threads_per_client} client-resources-num-gpus=0.0"


def run_outcome(flwr: Path, env: dict[str, str]) -> tuple[str, str]:
    """(status, details) of the one run on the private SuperLink, from `flwr ls --format json`."""
    out = subprocess.run([str(flwr), "ls", CONNECTION, "--format", "json"], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=60)
    try:
        runs = json.loads(out.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        return "unknown", f"`flwr ls` answered: {out.stdout.strip()[-500:]} {out.stderr.strip()[-500:]}"
    if len(runs) != 1:
        return "unknown", f"expected one run on the private SuperLink, found {len(runs)}"
    return runs[0]["status"], runs[0].get("status-details", "")


def simulate(cfg: RunConfig) -> Path:
    """Run the simulation to its end; returns the run folder, or raises RunFailed saying why."""
    bin_dir = Path(sys.executable).parent
    folder = Path(cfg.output_dir) / cfg.run_name
    print(f"fedimaging: simulating {cfg.num_hospitals} hospitals for {cfg.num_server_rounds} rounds; run folder {folder}", flush=True)
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home:
        flwr_home = Path(home)
        # Flower's own processes (flower-superexec, flwr-simulation) are found on PATH.
        path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
        env = {**QUIET_LOGS, **os.environ, **QUIET_FLOWER, "FLWR_HOME": str(flwr_home), "PATH": path}
        settings = flwr_home / "run-config.toml"
        settings.write_text("".join(f"{k} = {_toml_value(v)}\n" for k, v in config_to_dict(cfg).items()))
        superlink, port = start_superlink(flwr_home, bin_dir, env)
        try:
            write_connection(flwr_home, port)
            command = [str(bin_dir / "flwr"), "run", str(PROJECT), CONNECTION, "--stream"]
            command += ["--run-config", str(settings), "--federation-config", federation_config(cfg)]
            subprocess.run(command, env=env, cwd=PROJECT, check=False)
            status, details = run_outcome(bin_dir / "flwr", env)
        finally:
            stop(superlink, flwr_home)
            if folder.is_dir():
                shutil.copy(flwr_home / "superlink.log", folder / "superlink.log")
    if status != "finished:completed":
        where = f"the SuperLink's log is in {folder / 'superlink.log'}" if folder.is_dir() else "no run folder was made"
        raise RunFailed(f"run ended as {status!r}: {details or 'no details'} ({where})")
    if not (folder / "history.csv").is_file():
        raise RunFailed(f"the run completed but wrote no {folder / 'history.csv'}")
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: check the settings, run, and exit 0 only if the run completed."""
    settings = "\n".join(f"  {key:<24} {default!s:<12} {allowed}: {doc}" for key, default, allowed, doc in describe_settings())
    parser = argparse.ArgumentParser(
        prog="python -m server.simulate", description=__doc__, epilog=f"run settings (key, default, allowed: meaning):\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings")
    args = parser.parse_args(argv)
    # A SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so the SuperLink and everything it started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.time()
    try:
        cfg = prepare(parse_overrides(args.run_config))
        folder = simulate(cfg)
    except (ConfigError, DataError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fedimaging: the simulation failed: {exc}", file=sys.stderr)
        return 1
    print(f"fedimaging: completed in {time.time() - started:.0f} s; results in {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
