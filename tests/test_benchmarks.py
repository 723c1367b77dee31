"""Each benchmark script, run as a user runs it, on a tiny configuration: it finishes, prints its table and writes its
results. (The benchmarks themselves, at full size, are not part of the test suite.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

PROJECT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.xdist_group("finished-run")  # the tests that read the session's one small run share a worker
BENCHMARKS = PROJECT / "benchmarks"


def _run(script: str, *args: str) -> str:
    """Run a benchmark script to its end; its standard output."""
    done = subprocess.run([sys.executable, str(BENCHMARKS / script), *args], cwd=PROJECT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _tiny_npz(path: Path) -> Path:
    """A PneumoniaMNIST-shaped file (28x28 uint8, train/val/test) where a bright patch marks the positives."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 160), ("val", 40), ("test", 60)):
        labels = (np.arange(n) % 2).astype(np.uint8)
        images = rng.integers(0, 80, (n, 28, 28)).astype(np.uint8)
        for i in np.flatnonzero(labels):
            r, c = rng.integers(4, 20, 2)
            images[i, r : r + 5, c : c + 5] = 230
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = images, labels[:, None]
    np.savez(path, **arrays)
    return path


def test_the_quality_benchmark_compares_pooled_local_and_federated_training(tmp_path):
    data = _tiny_npz(tmp_path / "tiny.npz")
    args = ["--data", str(data), "--seeds", "0", "--rounds", "2", "--local-epochs", "1", "--only", "pooled", "--only", "local-only",
            "--only", "fedavg-iid", "--results", str(tmp_path / "results"), "--runs", str(tmp_path / "runs")]  # fmt: skip
    out = _run("quality.py", *args)
    runs = pd.read_csv(tmp_path / "results" / "quality.csv")
    assert set(zip(runs["method"], runs["split"])) == {("pooled", "iid"), ("local-only", "iid"), ("fedavg-iid", "iid")}  # the baselines on the federation's split
    assert runs["test_auc"].between(0.5, 1.0).all() and runs["selected_test_auc"].between(0.5, 1.0).all()
    sites = pd.read_csv(tmp_path / "results" / "quality-sites.csv")
    iid = sites[sites["split"] == "iid"]
    assert len(iid) == 5 and iid[["alone_local_auc", "pooled_local_auc", "fedavg-iid_local_auc"]].notna().all().all()  # every hospital
    rounds = pd.read_csv(tmp_path / "results" / "quality-rounds.csv")
    assert sorted(rounds[rounds["method"] == "fedavg-iid"]["round"]) == [1, 2]
    assert (tmp_path / "results" / "quality.png").stat().st_size > 10_000 and "fedavg-iid" in out
    assert runs["wall_s"].gt(0).all() and "the table's 3 rows took" in out  # every row timed, pooled and local-only too
    assert (tmp_path / "results" / "quality-worst-seed.png").stat().st_size > 10_000
    assert runs["command"].str.startswith("benchmarks/quality.py --data").all() and (runs["rounds"] == 2).all()
    again = _run("quality.py", *args)  # resumable: the rows written are kept, not run again
    assert again.count("kept from quality.csv") == 3 and pd.read_csv(tmp_path / "results" / "quality.csv").equals(runs)
    summary = pd.read_csv(tmp_path / "results" / "quality-summary.csv")
    assert (summary["worst_seed"] == 0).all() and summary["worst_seed_test_auc"].equals(summary["test_auc"])  # one seed: its own worst


def test_the_overhead_benchmark_times_simulation_against_a_plain_loop(tmp_path):
    # The rehearsals it also times (--skip-rehearsal here, to keep the suite short) run in tests/test_deployment.py.
    out = _run("overhead.py", "--hospitals", "2", "--images", "40", "--rounds", "2", "--skip-rehearsal", "--results", str(tmp_path))
    table = pd.read_csv(tmp_path / "overhead.csv")
    assert table["setting"].tolist() == ["plain Keras loop", "Flower simulation"]
    assert (table["steady_round_s"] > 0).all() and (table["startup_s"] > 0).all() and table["round_vs_plain"].iloc[0] == 1.0
    sim = table.iloc[1]
    assert sim["model_bytes"] < sim["train_reply_bytes"] < sim["model_bytes"] + 4096  # the weights and a few headers go up
    profile = pd.read_csv(tmp_path / "overhead-profile.csv")
    assert {"train", "evaluate", "heldout"} <= set(profile["phase"]) and "steady_round_s" in out


def test_the_scale_benchmark_samples_hospitals_in_a_large_federation(tmp_path):
    _run("scale.py", "--hospitals", "40", "--rounds", "2", "--results", str(tmp_path))
    table = pd.read_csv(tmp_path / "scale.csv")
    assert table["hospitals"].tolist() == [40] and table["trained_per_round"].tolist() == [16]  # 16 of 40 sampled
    assert (table["peak_rss_gib"] > 0.5).all() and (table["failed_replies"] == 0).all()
    assert (tmp_path / "scale.png").is_file()


def test_the_throughput_benchmark_compares_local_training_with_plain_fit(tmp_path):
    _run("throughput.py", "--images", "100", "--epochs", "2", "--batch-size", "16", "--results", str(tmp_path))
    table = pd.read_csv(tmp_path / "throughput.csv")
    cpu = table[table["device"].str.startswith("CPU")]
    assert len(cpu) == 1 and cpu["images"].iloc[0] == 80  # the hospital's training share
    assert (cpu[["ours_images_per_s", "plain_fit_images_per_s"]] > 0).all().all()


def test_the_small_sites_benchmark_measures_the_floors_cost_against_the_exact_auc(tmp_path):
    out = _run("small_sites.py", "--seeds", "1", "--rounds", "2", "--synthetic", "--out", str(tmp_path))
    assert "min-bin-images" in out and "rounds measured" in out
    table = pd.read_csv(tmp_path / "small-sites.csv")
    assert sorted(table["floor"].unique()) == [1, 3, 5, 10] and len(table) == 2 * 4
    assert ((table["low"] <= table["exact"] + 1e-9) & (table["exact"] <= table["high"] + 1e-9)).all()
    assert (tmp_path / "small-sites-summary.csv").is_file() and (tmp_path / "small-sites.png").is_file()


def test_the_robustness_benchmark_runs_an_attacked_federation_under_a_robust_rule(tmp_path):
    _run("robustness.py", "--only", "flip/multikrum", "--rounds", "1", "--images", "40", "--results", str(tmp_path))
    table = pd.read_csv(tmp_path / "robustness.csv")
    assert table["scenario"].tolist() == ["flip/multikrum"] and table["aggregation"].tolist() == ["multikrum"]
    assert table["left_out_by_rule"].tolist() == [1] and table["heldout_auc"].between(0, 1).all()  # the flipped hospital, left out


def test_the_privacy_benchmark_reports_the_auc_and_epsilon_of_a_dp_run(tmp_path):
    data = _tiny_npz(tmp_path / "tiny.npz")
    out = _run("privacy.py", "--data", str(data), "--rounds", "1", "--only", "central-z1", "--results", str(tmp_path))
    table = pd.read_csv(tmp_path / "privacy.csv")
    row = table.iloc[0]
    assert row["scenario"] == "central-z1" and row["dp"] == "central" and row["noise_multiplier"] == 1.0
    assert 0 < row["epsilon"] < 50 and 0 <= row["heldout_auc"] <= 1 and "central-z1" in out


def test_the_monitor_benchmark_times_rounds_onto_the_page(tmp_path, finished_run):
    out = _run("monitor.py", "--run", str(finished_run[0]), "--every", "0.5", "--results", str(tmp_path))
    rounds = pd.read_csv(tmp_path / "monitor.csv")
    assert rounds["round"].tolist() == [1, 2] and rounds["seconds_to_page"].between(0, 30).all()
    summary = pd.read_csv(tmp_path / "monitor-summary.csv").iloc[0]
    assert summary["page_js_heap_mib"] > 0 and summary["browser_rss_mib"] > 0 and summary["monitor_rss_mib"] > 0
    assert "on the page after" in out
