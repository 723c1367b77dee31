"""Run a simulated federation on this machine and say whether it worked.

Checks the settings and runs the data check on every site file named, then starts a private SuperLink on free
loopback ports with its own FLWR_HOME, submits the app with `flwr run --stream`, reads the run's real outcome from its
folder's status.json (`flwr run` exits 0 even for a failed run) and stops every process it started (its watcher,
server.reaper, does so where the command is killed outright). Exits 0 only when every round ran; 1 when the run
failed (the reason is said); 2 on bad settings or data; 130 when interrupted. A run that stopped (a crash, Ctrl-C, a
failure) goes on after its last checkpointed round with --resume; one whose ServerApp process Flower lost (killed, or
starved on a busy machine) is resumed by the command itself.

    python -m server.simulate --run-config "num-server-rounds=5 partition='dirichlet'"
    python -m server.simulate --resume runs/20261202-101500
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from common.cli import program
from common.config import RunConfig, config_to_dict, describe_settings, parse_overrides, parse_run_config, project_settings, require_mlflow
from common.errors import ConfigError, DataError
from common.deployment import write_secret
from common.partition import assign_hospitals, pool_labels
from common.site_file import load_site_config, site_label_sources
from common.site_index import index_site
from server.launch import BIN, PROJECT, RunFailed, TaskLost, flower_env, interruption, outcome, quiet_here, start_superlink, stop, stream_run, write_run_config
from server.checkpoint import CHECKPOINT, CheckpointError, identity, load_checkpoint, require_model
from server.reaper import watched
from server.run_folder import FAILED, INTERRUPTED, RUNNING, hold, mark_ended, resumed_config, run_folder

CONNECTION = "fedimaging-simulation"


def prepare(overrides: dict[str, Any]) -> RunConfig:
    """The checked run configuration, with the run named and every path absolute; raises ConfigError before anything starts."""
    cfg = parse_run_config({**project_settings(), **overrides}, base_dir=PROJECT)
    require_mlflow(cfg)
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


def prepare_resume(folder: Path) -> RunConfig:
    """The settings to resume the run in folder with (its own, from config.json); ConfigError in one line where it
    cannot be resumed: finished, still running, or without a checkpoint of its own model."""
    cfg = resumed_config(folder)
    with hold(run_folder(cfg)):  # free: no ServerApp is writing into it
        pass
    try:
        checkpoint = load_checkpoint(run_folder(cfg))
        require_model(checkpoint, {k: v for k, v in identity(cfg, []).items() if k != "shapes"}, run_folder(cfg))
    except CheckpointError as exc:
        raise ConfigError(f"resume: {exc}") from None
    print(f"fedimaging: resuming {run_folder(cfg)} after round {checkpoint.round} of {cfg.num_server_rounds}", flush=True)
    return cfg


def check_data(cfg: RunConfig) -> None:
    """The data check on every site file of the run, before anything trains; DataError names each site NOT READY."""
    if cfg.sites or cfg.heldout_site:
        from common.data_check import require_ready  # imports TensorFlow: only where there are site files to check

        require_ready([*cfg.sites, cfg.heldout_site], cfg, lambda line: print(f"fedimaging: {line}", flush=True))


def write_connection(flwr_home: Path, port: int) -> None:
    """$FLWR_HOME/config.toml naming the private SuperLink as the default connection."""
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def federation_config(cfg: RunConfig) -> str:
    """The simulation's hospitals and resources, for `flwr run --federation-config`."""
    # One CPU per client (threads-per-client): Ray then trains as many hospitals at once as there are cores.
    return f"num-supernodes={cfg.num_hospitals} client-resources-num-cpus={cfg.threads_per_client} client-resources-num-gpus=0.0"


ATTEMPTS = 3  # a run Flower loses is started again this many times in all
LOGS = ("superlink.log", "flwr-run.log")


def simulate(cfg: RunConfig, app: Path = PROJECT, extra: dict[str, Any] | None = None, verbose: bool = False) -> Path:
    """Run the simulation to its end; returns the run folder, or raises RunFailed saying why. Another Flower app folder
    (one that wraps fedimaging's apps) may be run the same way, with its own run settings in extra. The console shows
    the run's own lines (Flower's, Ray's and TensorFlow's too when verbose); all of them go to the run folder's
    flwr-run.log. A run Flower lost (no heartbeat from its process for a minute: killed, crashed hard, or on a machine
    too busy for it) is started again, after its last checkpointed round, up to ATTEMPTS times in all; each lost
    attempt's logs stay in the folder."""
    folder = run_folder(cfg)
    print(f"fedimaging: simulating {cfg.num_hospitals} hospitals for {cfg.num_server_rounds} rounds; run folder {folder}", flush=True)
    lost: Path | None = None  # the lost attempts' logs, made only where Flower loses one (start_again may empty the folder)
    attempt = 1
    try:
        while True:
            try:
                return simulate_once(cfg, app, extra, verbose)
            except TaskLost as exc:
                if attempt == ATTEMPTS:
                    raise RunFailed(f"{exc}; Flower lost the run {ATTEMPTS} times: give it a machine with CPU to spare") from None
                lost = lost or Path(tempfile.mkdtemp(prefix="fi-lost-"))
                for log in LOGS:  # the next attempt writes its own
                    if (folder / log).exists():
                        shutil.move(folder / log, lost / f"{Path(log).stem}.lost-{attempt}.log")
                attempt += 1
                print(f"fedimaging: {exc}; starting it again (attempt {attempt} of {ATTEMPTS})", flush=True)
                cfg = start_again(cfg, folder)
    finally:
        if lost:
            if folder.is_dir():
                for log in lost.iterdir():
                    shutil.copy(log, folder / log.name)
            shutil.rmtree(lost, ignore_errors=True)


def start_again(cfg: RunConfig, folder: Path) -> RunConfig:
    """The settings to run again a run Flower lost: resuming it after its checkpointed round; or, where it stopped
    before round 0 ended (no checkpoint: nothing learnt, nothing to lose), from the start in a folder made anew."""
    if (folder / CHECKPOINT).is_file():
        return prepare_resume(folder)
    if cfg.resume:  # a resumed run always has its checkpoint: this folder is not one this function may empty
        raise RunFailed(f"{folder} lost its checkpoint; nothing to start again from")
    shutil.rmtree(folder, ignore_errors=True)
    return cfg


def simulate_once(cfg: RunConfig, app: Path, extra: dict[str, Any] | None, verbose: bool) -> Path:
    """One attempt: a private SuperLink and Flower run of the app, stopped whatever happens; returns the run folder, or
    raises RunFailed (TaskLost where Flower lost the run's process)."""
    folder = run_folder(cfg)
    # Ray keeps Unix sockets in its temporary folder, whose paths may not exceed 107 bytes: a short folder of this run's
    # own (a long TMPDIR broke Ray's start, and two runs never share a session folder).
    short = "/tmp" if os.access("/tmp", os.W_OK) else None
    with tempfile.TemporaryDirectory(prefix="flwr-home-") as home, tempfile.TemporaryDirectory(prefix="fi-ray-", dir=short) as ray_tmp:
        flwr_home = Path(home)
        # Ray's processes listen on every interface (Ray 2.55 has no setting for it): each request must carry this run's
        # random token, kept in the run's private temporary folder, or Ray refuses it.
        token = write_secret(Path(ray_tmp) / "ray-token")
        env = {**flower_env(flwr_home), "RAY_TMPDIR": ray_tmp, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
        settings = flwr_home / "run-config.toml"
        write_run_config(settings, cfg, extra)
        with watched(flwr_home, folder, LOGS, [flwr_home, Path(ray_tmp)]):  # killed outright, this process stops nothing itself
            superlink, port = start_superlink(flwr_home, env, ["--insecure", "--simulation", "--isolation", "subprocess"])
            try:
                write_connection(flwr_home, port)
                command = [str(BIN / "flwr"), "run", str(app), CONNECTION, "--stream"]
                command += ["--run-config", str(settings), "--federation-config", federation_config(cfg)]
                stream_run(command, env, flwr_home / "flwr-run.log", verbose)
                try:
                    outcome(CONNECTION, env, folder)
                except TaskLost:
                    raise
                except RunFailed as exc:
                    raise RunFailed(f"{exc}; Flower's log: {folder / 'flwr-run.log'}") from None
            finally:
                stop(superlink, flwr_home)
                if folder.is_dir():
                    for log in LOGS:
                        if (flwr_home / log).exists():
                            shutil.copy(flwr_home / log, folder / log)
    return folder


def main(argv: list[str] | None = None) -> int:
    """Command line: check the settings, run, and exit 0 only if the run completed."""
    settings = "\n".join(f"  {key:<24} {default!s:<12} {allowed}: {doc}" for key, default, allowed, doc in describe_settings())
    parser = argparse.ArgumentParser(
        prog=program("python -m server.simulate"), description=__doc__, epilog=f"run settings (key, default, allowed: meaning):\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings")
    parser.add_argument("--resume", type=Path, metavar="RUN_FOLDER", help="continue a stopped run after its last checkpointed round, with its own settings")
    parser.add_argument("--verbose", "-v", action="store_true", help="also show Flower's, Ray's and TensorFlow's lines (always in the run folder's flwr-run.log)")
    args = parser.parse_args(argv)
    # A SIGTERM (a scheduler, `kill`) unwinds like Ctrl-C, so the SuperLink and everything it started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops the run even where it started with SIGINT ignored
    quiet_here()
    started = time.time()
    cfg = None
    try:
        overrides = parse_overrides(args.run_config)
        resume = args.resume or overrides.pop("resume", "")
        if resume and overrides:
            raise ConfigError(f"--resume takes the run's own settings from its config.json; leave out {', '.join(sorted(overrides))}")
        cfg = prepare_resume(Path(resume)) if resume else prepare(overrides)
        check_data(cfg)
        folder = simulate(cfg, verbose=args.verbose)
    except (ConfigError, DataError) as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    except RunFailed as exc:
        print(f"fedimaging: the simulation failed: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, SystemExit) as exc:
        how, code = interruption(exc)
        if cfg is not None:
            mark_ended(run_folder(cfg), INTERRUPTED, f"interrupted by {how}", replacing=(RUNNING, FAILED))
        print(f"fedimaging: interrupted by {how}; every process of the run was stopped", file=sys.stderr)
        return code
    print(f"fedimaging: completed in {time.time() - started:.0f} s; results in {folder}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
