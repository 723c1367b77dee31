"""Checkpoint and resume: the checkpoint file itself, the refusals of `server.simulate --resume`, a real simulation
whose ServerApp is killed after round 2 and resumed, against the same deterministic run left alone, and one whose
command is killed outright, leaving nothing running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest

from common.config import config_to_dict, parse_run_config
from server import simulate
from server.checkpoint import CHECKPOINT, Checkpoint, CheckpointError, identity, load_checkpoint, require_model, save_checkpoint
from server.run_folder import hold, write_status

PROJECT = Path(__file__).resolve().parent.parent
SMALL = "num-server-rounds=3 num-hospitals=2 images-per-hospital=80 heldout-images=30 image-size=32 min-bin-images=2 gradcam-images=8 deterministic=true"
TIMING = ("seconds", "phase")  # history columns that measure time: they differ from run to run


def _checkpoint(rnd: int = 2, labels: tuple[str, ...] = ("lesion",)) -> tuple[Checkpoint, dict]:
    """A checkpoint of a small made-up model, and the identity it was made for."""
    cfg = parse_run_config({"labels": ",".join(labels)})
    weights = [np.arange(6, dtype=np.float32).reshape(2, 3), np.ones(3, np.float32)]
    ident = identity(cfg, [w.shape for w in weights])
    adam = ([np.zeros((2, 3)), np.zeros(3)], [np.full((2, 3), 1e-6), np.full(3, 1e-6)])
    state = {"best": {"criterion": "pooled validation AUC", "value": 0.9}, "best_round": 1, "stale": 1, "last_row": {"round": rnd, "global_auc": None}}
    return Checkpoint(rnd, ident, weights, [w * 2 for w in weights], adam, np.zeros((1, 4, 8, 8), np.float32), state), ident


def test_a_checkpoint_reads_back_whole(tmp_path):
    written, ident = _checkpoint()
    save_checkpoint(tmp_path, written)
    read = load_checkpoint(tmp_path)
    require_model(read, ident, tmp_path)
    assert read.round == 2 and read.state == written.state and read.identity == ident
    for a, b in zip(read.weights + read.best_weights + read.adam[0] + read.adam[1], written.weights + written.best_weights + written.adam[0] + written.adam[1]):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    assert read.heat.shape == (1, 4, 8, 8)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT]  # nothing left beside it


def test_a_checkpoint_of_another_model_a_corrupt_one_or_none_is_refused_in_one_line(tmp_path):
    written, _ = _checkpoint()
    save_checkpoint(tmp_path, written)
    _, other = _checkpoint(labels=("pneumonia", "effusion"))
    with pytest.raises(CheckpointError, match=r"a checkpoint of another model \(labels: checkpoint \['lesion'\], this run \['pneumonia', 'effusion'\]\)"):
        require_model(load_checkpoint(tmp_path), other, tmp_path)
    data = (tmp_path / CHECKPOINT).read_bytes()
    (tmp_path / CHECKPOINT).write_bytes(data[: len(data) // 2])  # cut short, as a full disk would
    with pytest.raises(CheckpointError, match="not a readable fedimaging checkpoint") as caught:
        load_checkpoint(tmp_path)
    assert "\n" not in str(caught.value)
    (tmp_path / CHECKPOINT).unlink()
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path)


def _stopped_run(tmp_path: Path, status: str = "failed") -> Path:
    """A run folder as a run that stopped after round 1 leaves it: settings, status and a checkpoint."""
    cfg = parse_run_config({"output-dir": str(tmp_path), "run-name": "stopped"})
    folder = tmp_path / "stopped"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    write_status(folder, status=status, reason="the server stopped", last_round=1)
    written, _ = _checkpoint(1)
    written.identity |= {"image_size": cfg.image_size}
    save_checkpoint(folder, written)
    return folder


@pytest.mark.parametrize(
    "damage, message",
    [
        ("finished", "finished .*there is nothing to resume"),
        ("held", "is in use: a running ServerApp holds it"),
        ("corrupt", "resume: .*checkpoint.npz: not a readable fedimaging checkpoint"),
        ("other labels", r"a checkpoint of another model \(labels: checkpoint \['pneumonia'\], this run \['lesion'\]\)"),
        ("settings too", "--resume takes the run's own settings from its config.json; leave out num-server-rounds"),
    ],
)
def test_resume_refuses_what_it_cannot_continue_before_anything_starts(tmp_path, capfd, damage, message):
    folder = _stopped_run(tmp_path, "finished" if damage == "finished" else "failed")
    if damage == "corrupt":
        (folder / CHECKPOINT).write_bytes(b"PK\x03\x04 not really")
    if damage == "other labels":
        written, _ = _checkpoint(1, ("pneumonia",))
        save_checkpoint(folder, written)
    argv = ["--resume", str(folder)] + (["-c", "num-server-rounds=5"] if damage == "settings too" else [])
    if damage == "held":
        with hold(folder):
            code = simulate.main(argv)
    else:
        code = simulate.main(argv)
    err = capfd.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert pd.Series([err]).str.contains(message).all(), err


def _table(path: Path) -> pd.DataFrame:
    """A run table without its timing columns, in one row order."""
    table = pd.read_csv(path)
    table = table[[c for c in table.columns if not c.startswith(TIMING)]]
    return table.sort_values([c for c in ("round", "site") if c in table]).reset_index(drop=True)


def _simulation(tmp_path: Path, name: str) -> subprocess.Popen:
    """`python -m server.simulate` of the small deterministic run."""
    argv = [sys.executable, "-m", "server.simulate", "-c", SMALL, "-c", f"output-dir='{tmp_path}' run-name='{name}'"]
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp")}  # its Flower home in the test's folder, where own_flower_processes looks
    return subprocess.Popen(argv, cwd=PROJECT, env=env, stdout=open(tmp_path / f"{name}.log", "w"), stderr=subprocess.STDOUT)


def _wait_for_round(folder: Path, rnd: int, run: subprocess.Popen, log: Path) -> None:
    """Wait until the run has checkpointed round rnd (at most 400 s), asserting it keeps running meanwhile."""
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline:
        try:
            if load_checkpoint(folder).round >= rnd:
                return
        except CheckpointError:
            pass
        assert run.poll() is None, log.read_text()
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of round {rnd} in 400 s: {log.read_text()[-3000:]}")


def test_a_serverapp_killed_after_round_2_is_resumed_by_the_command_to_the_same_figures_as_a_run_left_alone(tmp_path, own_flower_processes):
    """A hard crash of the ServerApp (SIGKILL: no handler runs) goes silent; Flower fails the run a minute later and
    the command resumes it after its checkpointed round, through the same path as `--resume`."""
    whole = _simulation(tmp_path, "whole")  # alongside: a deterministic run's figures do not depend on its pace
    crashed = _simulation(tmp_path, "crashed")
    folder = tmp_path / "crashed"
    _wait_for_round(folder, 2, crashed, tmp_path / "crashed.log")
    servers = [p for p in psutil.Process(crashed.pid).children(recursive=True) if "flwr-simulation" in " ".join(p.cmdline())]
    assert servers, "no ServerApp process found"
    for server in servers:
        server.kill()  # a crash: no handler runs, nothing is marked
    code = crashed.wait(timeout=600)
    out = (tmp_path / "crashed.log").read_text()
    assert code == 0, out
    assert whole.wait(timeout=600) == 0, (tmp_path / "whole.log").read_text()
    assert "Flower stopped the run: No heartbeat received from the task" in out and "starting it again (attempt 2 of 3)" in out, out
    assert "resuming after round 2" in out and "round 3/3" in out, out
    assert {"flwr-run.lost-1.log", "superlink.lost-1.log", "flwr-run.log", "superlink.log"} <= {p.name for p in folder.iterdir()}
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "finished" and status["last_round"] == 3 and status["resumes"] == 1

    history = _table(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2, 3]  # every round once: no gap, no duplicate
    pd.testing.assert_frame_equal(history, _table(tmp_path / "whole" / "history.csv"))
    pd.testing.assert_frame_equal(_table(folder / "sites.csv"), _table(tmp_path / "whole" / "sites.csv"))
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["round_001.png", "round_002.png", "round_003.png"]
    assert not own_flower_processes()


def test_a_command_killed_outright_leaves_nothing_running_and_its_run_ready_to_resume(tmp_path, own_flower_processes):
    """`kill -9` of server.simulate itself (or the out-of-memory killer) runs none of its cleanup: its watcher stops the
    SuperLink, ServerApp and Ray processes it left, marks the run interrupted and keeps Flower's logs."""
    killed = _simulation(tmp_path, "killed")
    folder = tmp_path / "killed"
    _wait_for_round(folder, 1, killed, tmp_path / "killed.log")
    killed.kill()
    killed.wait()
    deadline = time.monotonic() + 60
    while (own_flower_processes() or list((tmp_path / "tmp").iterdir())) and time.monotonic() < deadline:
        time.sleep(1)  # the watcher stops the processes (15 s each at most), then marks the run and removes its folders
    assert not own_flower_processes()
    assert not list((tmp_path / "tmp").iterdir())  # the temporary Flower home is gone with its processes
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "interrupted" and "was killed before it could stop the run" in status["reason"], status
    assert (folder / "superlink.log").is_file() and (folder / "flwr-run.log").is_file()  # kept for whoever asks why

    assert simulate.prepare_resume(folder).resume == str(folder.resolve())  # free, checkpointed: --resume goes on from it
    # (the resumed run itself is the killed ServerApp's test above: the command resumes through the same prepare_resume)


def test_a_run_folder_carries_its_resume_settings_and_a_resume_with_other_settings_is_refused(tmp_path):
    import tomllib

    from common.config import parse_run_config as parse
    from common.errors import ConfigError
    from server.run_folder import RESUME, make_run_folder, resumed_config

    cfg = parse({"output-dir": str(tmp_path), "run-name": "r", "dp": "local", "learning-rate": 0.001})
    folder = make_run_folder(cfg)
    given = parse(tomllib.loads((folder / RESUME).read_text()))  # what `flwr run --run-config resume.toml` hands the apps
    assert resumed_config(folder, given) == given and given.resume == str(folder.resolve())
    plain = parse({"resume": str(folder)})  # only resume= given: the hospitals would train with the defaults (dp off)
    with pytest.raises(ConfigError, match=r"differ from the run's own in dp, learning-rate, output-dir, run-name .*--run-config .*resume.toml"):
        resumed_config(folder, plain)


def test_a_checkpoint_whose_state_does_not_fit_the_run_is_refused_in_one_line(tmp_path):
    from server.checkpoint import check_state

    written, _ = _checkpoint()
    written.state |= {"kept": [0, 1, 2, 3], "sample_rows": [0, 3], "stale": 1, "dp_rounds": 0}
    check_state(written, 4, tmp_path)
    written.state["kept"] = [0, 1, 2, 9]  # a held-out row the set does not have
    with pytest.raises(CheckpointError, match="its held-out rows do not fit this run"):
        check_state(written, 4, tmp_path)
    written.state["kept"], written.best_weights = [0, 1, 2, 3], [np.zeros((3, 3), np.float32)]
    with pytest.raises(CheckpointError, match="its best weights do not fit this run"):
        check_state(written, 4, tmp_path)


def test_fedavgms_momentum_survives_a_checkpoint_and_one_of_another_shape_is_refused(tmp_path):
    from server.checkpoint import check_state

    written, _ = _checkpoint()
    written.state |= {"kept": [0, 1, 2, 3], "sample_rows": [0, 3], "stale": 1, "dp_rounds": 0}
    written.adam = ([np.full((2, 3), 0.5), np.full(3, 0.25)], [])  # fedavgm: a running sum, no second moments
    save_checkpoint(tmp_path, written)
    read = load_checkpoint(tmp_path)
    check_state(read, 4, tmp_path)
    assert [a.tolist() for a in read.adam[0]] == [[[0.5] * 3] * 2, [0.25] * 3] and read.adam[1] == []
    read.adam = ([np.zeros((3, 3))], [])
    with pytest.raises(CheckpointError, match="optimiser moments do not fit this run"):
        check_state(read, 4, tmp_path)


def test_a_run_flower_lost_starts_again_after_its_checkpoint_or_from_the_start_where_it_has_none(tmp_path):
    folder = _stopped_run(tmp_path)  # round 1 checkpointed
    again = simulate.start_again(parse_run_config({"output-dir": str(tmp_path), "run-name": "stopped"}), folder)
    assert again.resume == str(folder.resolve()) and (folder / CHECKPOINT).is_file()

    cfg = parse_run_config({"output-dir": str(tmp_path), "run-name": "early"})
    early = tmp_path / "early"
    early.mkdir()
    (early / "config.json").write_text(json.dumps(config_to_dict(cfg)))
    write_status(early, status="failed", reason="Flower stopped the run", last_round=-1)
    assert simulate.start_again(cfg, early) == cfg and not early.exists()  # nothing learnt: made anew by the next attempt
