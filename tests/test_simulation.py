"""End to end: the real Flower simulation engine on a private SuperLink, the run folder it leaves, and a failing run."""

from __future__ import annotations

import json

import keras
import numpy as np
import pandas as pd
import psutil
import pytest

from server import simulate

SMALL = "num-server-rounds=2 num-hospitals=3 images-per-hospital=40 heldout-images=30 image-size=32 min-hospitals=3"


def _flower_processes() -> list[psutil.Process]:
    """Flower and Ray processes running now (none of ours may outlive a run)."""
    found = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if any(name in cmd for name in ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "ray::", "raylet", "gcs_server")):
            found.append(p)
    return found


def test_a_two_round_simulation_writes_a_complete_run_folder(tmp_path, capfd):
    before = {p.pid for p in _flower_processes()}
    code = simulate.main(["-c", SMALL, "-c", f"output-dir='{tmp_path}' run-name='e2e'"])
    out = capfd.readouterr().out
    assert code == 0, out
    folder = tmp_path / "e2e"
    assert {"config.json", "history.csv", "history.png", "model_last.keras", "model_best.keras"} <= {p.name for p in folder.iterdir()}
    assert json.loads((folder / "config.json").read_text())["num-server-rounds"] == 2

    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2]
    assert history.loc[0, ["global_auc", "global_sensitivity", "global_specificity"]].isna().all()  # no sites at round 0
    for column in ("global_auc", "global_sensitivity", "global_specificity", "heldout_auc", "heldout_sensitivity", "heldout_specificity"):
        values = history[column].iloc[1:] if column.startswith("global") else history[column]
        assert values.between(0, 1).all(), column
    assert history["n_sites"].iloc[1:].tolist() == [3, 3] and history["n_failed"].tolist() == [0, 0, 0]
    assert history["n_val"].iloc[1] > 0 and (history["seconds"] > 0).all()

    model = keras.models.load_model(folder / "model_best.keras")
    assert model.output_shape == (None, 1)
    assert f"run folder: {folder}" in out and "round 2/2" in out
    assert {p.pid for p in _flower_processes()} <= before  # the private SuperLink and everything it started are gone


def test_a_run_that_fails_inside_flower_exits_non_zero_and_says_why(tmp_path, capfd):
    """Initial weights of another architecture pass the up-front checks and fail in the ServerApp: `flwr run` says 0, we don't."""
    weights = tmp_path / "other.keras"
    from common.model import build_model

    build_model("seedcnn", (32, 32, 1), 1, 1e-3).save(weights)
    before = {p.pid for p in _flower_processes()}
    code = simulate.main(["-c", SMALL, "-c", f"output-dir='{tmp_path}' run-name='bad' initial-weights='{weights}'"])
    err = capfd.readouterr().err
    assert code == 1
    assert "the simulation failed" in err and "finished:failed" in err
    assert {p.pid for p in _flower_processes()} <= before


@pytest.mark.parametrize(
    "setting, message",
    [
        ("num-server-rounds=-1", "'num-server-rounds' = -1 is out of range"),
        ("num-hospitals=5", "'num-hospitals' = 5: the data has 30 training images, enough for at most 3 hospitals"),
        ("initial-weights='missing.keras'", "run setting 'initial-weights': file not found"),
    ],
)
def test_bad_settings_stop_before_anything_starts(tmp_path, capfd, setting, message):
    data = tmp_path / "tiny.npz"
    images, labels = np.zeros((15, 28, 28), np.uint8), np.arange(15).reshape(-1, 1) % 2
    np.savez(data, train_images=images, train_labels=labels, val_images=images, val_labels=labels, test_images=images, test_labels=labels)
    runs = tmp_path / "runs"
    code = simulate.main(["-c", f"{SMALL} data='{data}' image-size=28 output-dir='{runs}' {setting}"])
    assert code == 2 and message in capfd.readouterr().err
    assert not runs.exists()
