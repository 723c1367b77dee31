"""Shared fixtures: small run configurations that train in seconds."""

from __future__ import annotations

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402

from common.config import RunConfig, parse_run_config  # noqa: E402


def pytest_configure(config: pytest.Config) -> None:
    """The tests' own TensorFlow (building a DenseNet, training in-process) gets one thread, as a hospital's client
    process does: with two pytest workers on two cores, one worker's TensorFlow taking both cores starved the other's
    simulation of its heartbeat (Flower fails a run whose simulation process sends none for 60 s)."""
    from common.runtime import configure_tensorflow

    configure_tensorflow(1)


@pytest.fixture
def small_cfg(tmp_path) -> RunConfig:
    """Three hospitals of 40 images at 32x32: big enough for every split, small enough to train in seconds."""
    return parse_run_config(
        {"num-hospitals": 3, "images-per-hospital": 40, "heldout-images": 30, "image-size": 32, "output-dir": str(tmp_path / "runs")}
    )


@pytest.fixture
def task_identity():
    """The identity Flower gives the process a ServerApp runs in, so that messages can be made outside a run."""
    from flwr.supercore.task_identity import TaskIdentity

    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved


FLOWER_NAMES = ("flower-superlink", "flower-superexec", "flower-supernode", "flwr-simulation", "flwr-serverapp", "flwr-clientapp", "ray::", "raylet", "gcs_server")


@pytest.fixture
def own_flower_processes(tmp_path, monkeypatch):
    """A function listing the Flower and Ray processes this test started and left running: those below this process,
    and those whose FLWR_HOME lies in this test's folder (a launcher's temporary FLWR_HOME goes there too). Flower
    jobs of anyone else on the machine are not this test's business."""
    import tempfile

    import psutil

    private = tmp_path / "tmp"
    private.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private))

    def mine(p: psutil.Process, below: set[int]) -> bool:
        try:
            named = any(name in " ".join(p.cmdline()) for name in FLOWER_NAMES)
            return named and (p.pid in below or p.environ().get("FLWR_HOME", "").startswith(str(tmp_path)))
        except (psutil.Error, OSError):
            return False

    def listing() -> list[psutil.Process]:
        below = {c.pid for c in psutil.Process().children(recursive=True)}
        return [p for p in psutil.process_iter() if mine(p, below)]

    return listing


# The small run several tests read (the run folder, the trackers, the monitor): 3 hospitals, 2 rounds, 32x32.
SMALL_RUN = "num-server-rounds=2 num-hospitals=3 images-per-hospital=80 heldout-images=30 image-size=32 min-hospitals=3 min-bin-images=2"


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory):
    """One small simulation, run once per session as a user runs it (`fedimaging simulate`, the console command), with
    MLflow recording to a local file store: (run folder, console output, exit code, MLflow tracking URI, the Flower and
    Ray processes it left running). Tests only read it; one that changes files works on a copy."""
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    base = tmp_path_factory.mktemp("finished-run")
    private = base / "tmp"
    private.mkdir()
    uri = (base / "mlruns").as_uri()
    command = [str(Path(sys.executable).with_name("fedimaging")), "simulate"]
    command += ["-c", SMALL_RUN, "-c", f"output-dir='{base / 'runs'}' run-name='e2e' mlflow-tracking-uri='{uri}'"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env={**os.environ, "TMPDIR": str(private)})

    def left(p: psutil.Process) -> bool:
        try:
            named = any(name in " ".join(p.cmdline()) for name in FLOWER_NAMES)
            return named and p.environ().get("FLWR_HOME", "").startswith(str(private))
        except (psutil.Error, OSError):
            return False

    return base / "runs" / "e2e", done.stdout + done.stderr, done.returncode, uri, [p for p in psutil.process_iter() if left(p)]
