"""End to end: the real Flower simulation engine on a private SuperLink, the run folder it leaves, and a failing run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pandas as pd
import pytest

from server import simulate

pytestmark = pytest.mark.xdist_group("finished-run")  # the tests that read the session's one small run share a worker

# 16 validation images a hospital: with a floor of 2 images an interval, their intervals still rank something after
# two rounds. The floor's own tests (tests/test_bin_floor.py, and the small-sites run below) use the default floor.
from tests.conftest import SMALL_RUN as SMALL  # noqa: E402


def test_a_two_round_simulation_writes_a_complete_run_folder(finished_run):
    folder, out, code, _, left = finished_run  # `fedimaging simulate` of SMALL (tests/conftest.py)
    assert code == 0, out
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "status.json", "history.csv", "sites.csv", "received.csv", "overlap.csv", "history.png", "best_model.png",
            "model_last.keras", "model_best.keras", "superlink.log", "flwr-run.log"} <= files
    assert not [f for f in files if f.startswith(".")]  # no temporary file left behind
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "finished" and status["last_round"] == 2 and status["num_rounds"] == 2
    assert sorted(p.name for p in (folder / "plots").iterdir()) == ["round_001.png", "round_002.png"]
    assert json.loads((folder / "config.json").read_text())["num-server-rounds"] == 2

    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1, 2]
    assert history.loc[0, ["global_auc", "global_sensitivity", "global_specificity"]].isna().all()  # no sites at round 0
    for column in ("global_auc", "global_sensitivity", "global_specificity", "heldout_auc", "heldout_sensitivity", "heldout_specificity"):
        values = history[column].iloc[1:] if column.startswith("global") else history[column]
        assert values.between(0, 1).all(), column
    assert history["n_sites"].iloc[1:].tolist() == [3, 3] and history["n_failed"].tolist() == [0, 0, 0]
    assert history["n_val"].iloc[1] > 0 and (history["seconds"] > 0).all() and history["n_rejected"].tolist() == [0, 0, 0]
    later = history.iloc[1:]
    assert (later["global_auc_low"] <= later["global_auc"]).all() and (later["global_auc"] <= later["global_auc_high"]).all()
    assert (later["worst_site_auc"].dropna() <= later["mean_site_auc"].dropna() + 1e-9).all()
    assert later["selection_criterion"].eq("pooled validation AUC").all() and history["best"].iloc[1:].any()
    for column in ("threshold_at_target_sensitivity", "specificity_at_target_sensitivity", "heldout_auc_ci_low", "heldout_auc_ci_high",
                   "heldout_sensitivity_at_threshold", "heldout_specificity_at_threshold", "heldout_accuracy_at_threshold", "heldout_brier"):
        assert later[column].between(0, 1).all(), column
    for column in ("heldout_ppv_at_threshold", "heldout_npv_at_threshold", "heldout_f1_at_threshold"):  # undefined when nobody is called negative
        assert later[column].dropna().between(0, 1).all() and column in later, column
    assert (history["heldout_auc_ci_low"] <= history["heldout_auc"]).all() and (history["heldout_auc"] <= history["heldout_auc_ci_high"]).all()

    for column in ("gradcam_pointing", "gradcam_energy_in_box", "gradcam_border_energy", "gradcam_drift", "gradcam_warning"):
        assert column in history, column
    assert later["gradcam_border_energy"].dropna().between(0, 1).all() and later["gradcam_drift"].iloc[1:].between(0, 2).all()
    for rnd in ("round_001", "round_002"):
        assert (folder / "gradcam" / rnd / "grid.png").is_file() and len(list((folder / "gradcam" / rnd).glob("*_*.png"))) >= 1
    sanity = pd.read_csv(folder / "gradcam" / "sanity.csv")
    assert sanity["randomised_down_to"].iloc[0] == "logits" and sanity["randomised_down_to"].iloc[-1] == "conv1"
    assert "randomisation test" in out

    sites = pd.read_csv(folder / "sites.csv")
    assert list(sites.columns[:10]) == ["round", "site", "n_train", "n_val", "auc", "sensitivity", "specificity", "intervals", "note", "update_norm"]
    assert sites["update_norm"].between(0, 10).all()  # every honest update well inside max-update-norm
    assert sorted(zip(sites["round"], sites["site"])) == [(r, f"hospital-{h}") for r in (1, 2) for h in range(3)]
    assert sites.groupby("round")["n_val"].sum().tolist() == later["n_val"].tolist()
    for h in range(3):  # each hospital's own report, kept at the hospital
        report = pd.read_csv(folder / "hospitals" / f"hospital-{h}" / "report.csv")
        assert report["round"].tolist() == [1, 2]

    model = keras.models.load_model(folder / "model_best.keras")
    assert model.output_shape == (None, 1)
    assert f"run folder: {folder}" in out and "round 2/2" in out and "hospital-0 holds 0 of the 30 held-out images" in out
    assert pd.read_csv(folder / "overlap.csv")["count"].tolist() == [0, 0, 0]
    received = pd.read_csv(folder / "received.csv")
    assert received.loc[received["phase"] == "train", "seconds"].between(0, 600).all()  # when each hospital's update arrived
    assert not left  # the private SuperLink and everything it started are gone


def test_the_console_keeps_to_the_runs_own_lines_and_the_run_folder_keeps_the_rest(finished_run):
    folder, out, *_ = finished_run
    for noise in ("DeprecationWarning", "cuda", "default simulated SuperNodes", "INFO", "FutureWarning"):
        assert noise not in out, noise
    lines = [line for line in out.splitlines() if line.strip()]
    assert all(line.startswith(("fedimaging", "[fedimaging] ")) for line in lines), lines
    assert "Starting Flower Simulation" in (folder / "flwr-run.log").read_text()  # everything Flower said, for when it went wrong


def test_every_run_writes_tensorboard_events_that_tensorboard_reads(finished_run):
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator

    folder = finished_run[0]
    history, sites = pd.read_csv(folder / "history.csv"), pd.read_csv(folder / "sites.csv")
    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()

    def series(tag):
        import tensorflow as tf

        return {e.step: float(tf.make_ndarray(e.tensor_proto)) for e in events.Tensors(tag)}

    assert series("heldout/auc") == pytest.approx(dict(zip(history["round"], history["heldout_auc"])), abs=1e-6)
    assert series("pooled/auc") == pytest.approx(dict(zip(history["round"][1:], history["global_auc"][1:])), abs=1e-6)
    own = sites[sites["site"] == "hospital-1"]
    assert series("hospital/hospital-1/n_train") == pytest.approx(dict(zip(own["round"], own["n_train"].astype(float))))
    assert {"pictures/report", "pictures/gradcam"} <= set(events.Tags()["tensors"])


def test_a_run_with_a_tracking_location_is_recorded_in_mlflow(finished_run, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.7+ reads its file store only when told

    folder, _, _, uri, _ = finished_run
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("fedimaging")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "e2e" and run.data.params["num-server-rounds"] == "2"
    history = pd.read_csv(folder / "history.csv")
    recorded = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "heldout/auc")}
    assert recorded == pytest.approx(dict(zip(history["round"], history["heldout_auc"])), abs=1e-6)
    assert {"model_best.keras", "history.csv", "sites.csv", "config.json"} <= {a.path for a in client.list_artifacts(run.info.run_id)}


def test_a_run_that_fails_inside_flower_exits_non_zero_and_says_why(tmp_path, capfd, own_flower_processes):
    """Initial weights of another architecture pass the up-front checks and fail in the ServerApp: `flwr run` says 0, we don't."""
    weights = tmp_path / "other.keras"
    from common.model import build_model

    build_model("seedcnn", (32, 32, 1), 1, 1e-3).save(weights)
    code = simulate.main(["-c", SMALL, "-c", f"output-dir='{tmp_path}' run-name='bad' initial-weights='{weights}'"])
    err = capfd.readouterr().err
    assert code == 1
    assert "the simulation failed: the server stopped: ValueError" in err
    status = json.loads((tmp_path / "bad" / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"].startswith("the server stopped: ValueError")
    assert not own_flower_processes()


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


def test_a_three_finding_simulation_reports_every_figure_per_label(tmp_path, capfd, own_flower_processes):
    settings = f"{SMALL} num-server-rounds=1 labels='nodule,basal_opacity,cardiomegaly' output-dir='{tmp_path}' run-name='multi'"
    assert simulate.main(["-c", settings]) == 0, capfd.readouterr().err
    assert not own_flower_processes()
    history = pd.read_csv(tmp_path / "multi" / "history.csv")
    sites = pd.read_csv(tmp_path / "multi" / "sites.csv")
    for label in ("nodule", "basal_opacity", "cardiomegaly"):
        for column in ("global_auc", "global_sensitivity", "heldout_auc", "heldout_auc_ci_low", "specificity_at_target_sensitivity",
                       "threshold_at_target_sensitivity", "heldout_specificity_at_threshold"):
            assert history.loc[1, f"{column}__{label}"] >= 0, (column, label)
        assert sites[f"auc__{label}"].notna().any() and sites[f"sensitivity__{label}"].notna().any()
    macro = np.nanmean([history.loc[1, f"global_auc__{label}"] for label in ("nodule", "basal_opacity", "cardiomegaly")])
    assert history.loc[1, "global_auc"] == pytest.approx(macro)


def test_a_simulation_of_sites_on_disk_reads_their_folders_and_counts_what_they_skipped(tmp_path, capfd, own_flower_processes):
    """Two hospitals as class folders of mixed PNG/JPEG modes and sizes, each with its own site YAML; one holds a corrupt
    file it is told to skip; the server's held-out set is a third folder."""
    from common.config import parse_run_config
    from common.demo_sites import write_demo_sites

    demo = parse_run_config({"num-hospitals": 2, "images-per-hospital": 60, "heldout-images": 30, "image-size": 32})
    hospital_0, hospital_1, heldout = write_demo_sites(demo, tmp_path / "sites", mixed=True)
    (tmp_path / "sites" / "hospital-1" / "lesion" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    hospital_1.write_text(hospital_1.read_text() + "skip-unreadable: true\n")
    copied = sorted((tmp_path / "sites" / "heldout" / "lesion").rglob("*.*"))[3]  # a held-out image the hospital also holds
    shutil.copy(copied, tmp_path / "sites" / "hospital-0" / "lesion" / f"also_{copied.name}")
    settings = (
        f"sites='{hospital_0},{hospital_1}' heldout-site='{heldout}' num-server-rounds=2 image-size=32 min-hospitals=2 "
        f"gradcam-images=8 heldout-overlap=exclude output-dir='{tmp_path}' run-name='run'"
    )
    assert simulate.main(["-c", settings]) == 0, capfd.readouterr().err
    out = capfd.readouterr().out
    assert not own_flower_processes()
    assert "data check: site 'hospital-1' ready; 1 warning(s): 1 unreadable file(s) will be skipped" in out
    assert "hospital-0 holds 1 of the 30 held-out images" in out and "hospital-1 holds 0 of the 30 held-out images" in out
    folder = tmp_path / "run"
    overlap = pd.read_csv(folder / "overlap.csv", dtype={"heldout_rows": str}).set_index("site")
    assert overlap["count"].to_dict() == {"hospital-0": 1, "hospital-1": 0}  # found without any image leaving
    history = pd.read_csv(folder / "history.csv")
    assert history["n_sites"].iloc[1:].tolist() == [2, 2] and history["n_failed"].tolist() == [0, 0, 0]
    assert history["heldout_auc"].between(0, 1).all() and history["heldout_n"].tolist() == [29, 29, 29]  # the copy is left out
    assert {"gradcam_border_energy_from__hospital-0", "gradcam_border_energy_from__hospital-1"} <= set(history.columns)  # sources from sub-folders
    sites = pd.read_csv(folder / "sites.csv")
    assert sites.groupby("site")["skipped_files"].max().to_dict() == {"hospital-0": 0, "hospital-1": 1}
    assert sites.groupby("site")["n_train"].first().sum() + sites.groupby("site")["n_val"].first().sum() == 121  # every readable image
    own = tmp_path / "sites" / "reports" / "hospital-1"  # a site file's reports stay with the site, not in the server's run folder
    assert (own / "audit.jsonl").is_file() and pd.read_csv(own / "report.csv")["round"].tolist() == [1, 2]
    skipped = pd.read_csv(own / "left_out.csv")
    assert skipped["path"].str.endswith("corrupt.png").tolist() == [True] and "does not decode" in skipped["reason"].iloc[0]
    assert skipped["kind"].tolist() == ["unreadable"]


def test_a_site_file_that_does_not_cover_the_runs_labels_stops_the_simulation_before_it_starts(tmp_path, capfd):
    from common.config import parse_run_config
    from common.demo_sites import write_demo_sites

    demo = parse_run_config({"num-hospitals": 2, "images-per-hospital": 20, "heldout-images": 10, "image-size": 16})
    hospital_0, hospital_1, _ = write_demo_sites(demo, tmp_path / "sites")
    code = simulate.main(["-c", f"sites='{hospital_0},{hospital_1}' labels='nodule' output-dir='{tmp_path / 'runs'}'"])
    assert code == 2 and "'labels' maps 'lesion', which the run does not have; the run's labels: nodule" in capfd.readouterr().err
    assert not (tmp_path / "runs").exists()


def _broken_sites(tmp_path):
    """Two demo hospitals, each with a file that does not decode and no leave to skip it."""
    from common.config import parse_run_config
    from common.demo_sites import write_demo_sites

    demo = parse_run_config({"num-hospitals": 2, "images-per-hospital": 30, "heldout-images": 20, "image-size": 16})
    hospital_0, hospital_1, heldout = write_demo_sites(demo, tmp_path / "sites")
    for name in ("hospital-0", "hospital-1"):
        (tmp_path / "sites" / name / "lesion" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    return hospital_0, hospital_1, heldout


def test_a_run_in_which_no_hospital_can_train_fails_naming_each_hospital_and_why(tmp_path, capfd, own_flower_processes):
    hospital_0, hospital_1, heldout = _broken_sites(tmp_path)
    settings = f"sites='{hospital_0},{hospital_1}' heldout-site='{heldout}' num-server-rounds=3 image-size=16 output-dir='{tmp_path / 'runs'}'"
    # The launcher's data check stops it before anything starts, naming both sites.
    assert simulate.main(["-c", settings + " run-name='checked'"]) == 2
    err = capfd.readouterr().err
    assert "site 'hospital-0'" in err and "site 'hospital-1'" in err and "NOT READY: 1 unreadable file(s)" in err
    assert not (tmp_path / "runs" / "checked").exists()
    # Past that check (files that broke after it), the run itself fails at round 1 and stops there: no model nobody trained.
    cfg = simulate.prepare(simulate.parse_overrides([settings + " run-name='run'"]))
    with pytest.raises(simulate.RunFailed) as failed:
        simulate.simulate(cfg)
    out = capfd.readouterr().out
    assert not own_flower_processes()
    reason = str(failed.value)
    assert reason.startswith("round 1: 0 valid training update(s), fewer than min-hospitals = 2; the run stops here")
    for name in ("hospital-0", "hospital-1"):
        line = f"{name} (train): client error: DataError: site '{name}': 1 file(s) cannot be read: <data-root>/lesion/corrupt.png: does not decode"
        assert line in reason and f"[fedimaging]   failed: {line}" in out
    assert "Traceback" not in reason and "ClientAppException" not in out
    folder = tmp_path / "runs" / "run"
    history = pd.read_csv(folder / "history.csv")
    assert history["round"].tolist() == [0, 1] and history.loc[1, "n_failed"] == 2 and history.loc[1, "n_sites"] == 0
    assert "global_auc: no model was trained this round" in history.loc[1, "unavailable"]
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "failed" and status["reason"] == reason.split(" (run folder")[0] and status["last_round"] == 1
    assert not (folder / "model_best.keras").exists() and "randomisation test" not in out  # nothing trained: nothing to vouch for


def test_three_small_hospitals_give_a_pooled_auc_near_the_exact_one_while_another_flower_job_runs(tmp_path, capfd, own_flower_processes):
    """Three sites of 12-15 validation images at the default floor (5 images an interval): the pooled AUC, its bounds
    holding the exact figure, the best model and every plot. Meanwhile another simulation runs on the same machine:
    its processes are not this test's, and it finishes too."""
    import os

    from common.config import parse_run_config
    from common.demo_sites import write_demo_sites
    from common.pipeline import dataset
    from common.site_data import load_site
    from common.site_file import load_site_config
    from sklearn.metrics import roc_auc_score

    other_tmp = tmp_path / "other-tmp"
    other_tmp.mkdir()
    other = subprocess.Popen(
        [sys.executable, "-m", "server.simulate", "-c", f"{SMALL} num-server-rounds=2 output-dir='{tmp_path / 'other'}' run-name='other'"],
        env={**os.environ, "TMPDIR": str(other_tmp)}, stdout=open(tmp_path / "other.log", "w"), stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        demo = parse_run_config({"num-hospitals": 3, "images-per-hospital": 200, "heldout-images": 40, "image-size": 32})
        *site_files, heldout = write_demo_sites(demo, tmp_path / "sites")
        for path in site_files:  # 14 validation images a hospital (and enough training images to learn something)
            path.write_text(path.read_text().replace("val-fraction: 0.2", "val-fraction: 0.07"))
        settings = (
            f"sites='{','.join(map(str, site_files))}' heldout-site='{heldout}' num-server-rounds=6 image-size=32 min-hospitals=3 "
            f"gradcam-images=8 output-dir='{tmp_path}' run-name='small'"
        )
        assert simulate.main(["-c", settings]) == 0, capfd.readouterr().err
        assert not own_flower_processes()  # ours are gone, whatever the other job still runs
    finally:
        _, err = other.communicate(timeout=600)
    assert other.returncode == 0, err[-3000:]
    folder = tmp_path / "small"
    history, sites = pd.read_csv(folder / "history.csv"), pd.read_csv(folder / "sites.csv")
    assert sites["n_val"].between(12, 15).all() and sites.groupby("round").size().tolist() == [3] * 6
    assert history["global_auc"].iloc[1:].notna().any()  # every hospital counts: no round without histograms for want of size
    cfg = parse_run_config({**json.loads((folder / "config.json").read_text())})
    model = keras.models.load_model(folder / "model_last.keras")
    logits, labels = [], []
    for path in site_files:
        data = load_site(load_site_config(path), cfg)
        logits.append(model.predict(dataset(data.val, cfg, training=False, fit=data.fit), verbose=0))
        labels.append(data.val.labels)
    exact = roc_auc_score(np.concatenate(labels)[:, 0], np.concatenate(logits)[:, 0])
    last = history.iloc[-1]
    assert last["global_auc_low"] <= exact <= last["global_auc_high"]
    assert abs(last["global_auc"] - exact) < 0.15, (last["global_auc"], exact)
    print(f"three small hospitals: pooled AUC {last['global_auc']:.3f}, exact {exact:.3f}, bounds {last['global_auc_low']:.3f}-{last['global_auc_high']:.3f}")
    assert (folder / "model_best.keras").is_file() and (folder / "best_model.png").is_file() and (folder / "history.png").is_file()
    assert sorted(p.name for p in (folder / "plots").iterdir()) == [f"round_{r:03d}.png" for r in range(1, 7)]


def test_ctrl_c_stops_the_run_within_seconds_says_so_and_marks_the_run_folder(tmp_path, own_flower_processes):
    """A terminal's Ctrl-C reaches the whole foreground process group: the command says it was interrupted at once,
    stops every process of the run, and leaves a run folder that says 'interrupted', without a traceback."""
    folder = tmp_path / "stopped"
    command = [sys.executable, "-m", "server.simulate", "-c", f"{SMALL} num-server-rounds=20 output-dir='{tmp_path}' run-name='stopped'"]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                           env={**os.environ, "TMPDIR": str(tmp_path / "tmp")})  # fmt: skip
    deadline = time.monotonic() + 300
    while not (folder / "history.csv").exists() and time.monotonic() < deadline and run.poll() is None:
        time.sleep(0.2)
    assert run.poll() is None, run.stdout.read()
    os.killpg(run.pid, signal.SIGINT)
    pressed = time.monotonic()
    out, _ = run.communicate(timeout=60)
    assert run.returncode == 130, out
    assert time.monotonic() - pressed < 30, out  # Flower's processes get 15 s to stop before they are killed
    assert "interrupted by Ctrl-C" in out and "Traceback" not in out, out
    status = json.loads((folder / "status.json").read_text())
    assert status["status"] == "interrupted" and status["reason"] == "interrupted by Ctrl-C"
    assert not own_flower_processes()

