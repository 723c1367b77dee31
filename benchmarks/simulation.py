"""Wall time, peak memory and final figures of whole simulations, run as a user runs them, over several seeds.

    .venv/bin/python benchmarks/simulation.py                       # every scenario, seed 42 only
    .venv/bin/python benchmarks/simulation.py --seeds 5 --only default --only shortcut-hospital-2

Each scenario runs `python -m server.simulate` in a subprocess while this script samples the summed resident memory
of its whole process tree (SuperLink, ServerApp, Ray workers) every 0.5 s. With --seeds N each scenario runs with
seeds 42 to 41 + N (other data, splits and initial weights each time). Prints a table per run and a summary per
scenario (mean and range), and writes benchmarks/results/simulation.csv (one row per scenario and seed, keeping the
rows not run this time) and simulation-summary.csv.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
from measure import measure

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
PNEUMONIAMNIST = PROJECT.parent / "shared" / "data" / "pneumoniamnist.npz"
SCENARIOS = {
    "default": "",
    "shortcut-hospital-2": "shortcut-hospital=2",
    "pneumoniamnist-dirichlet": (
        f"data='{PNEUMONIAMNIST}' labels=pneumonia image-size=28 num-hospitals=5 partition=dirichlet dirichlet-alpha=0.5"
    ),
    # the same shortcut, but the hospitals and the held-out set are folders of PNG files with site files, the held-out
    # images in a sub-folder per source hospital (common/demo_sites.py): the check must work on a site-file held-out set
    "shortcut-hospital-2-site-files": "sites:shortcut-hospital=2",
}


def _site_files(run_name: str, settings: str, seed: int) -> str:
    """Write the built-in hospitals and held-out set as site folders (not timed); the run settings that name them."""
    folder = PROJECT / "runs" / f"{run_name}-sites"
    command = [sys.executable, "-m", "common.demo_sites", str(folder), "-c", f"{settings} seed={seed}"]
    files = subprocess.run(command, cwd=PROJECT, capture_output=True, text=True, check=True).stdout.split()
    return f"sites='{','.join(files[:-1])}' heldout-site='{files[-1]}'"


def run(name: str, settings: str, seed: int) -> dict:
    """Run one scenario to its end; its wall time, peak memory and last history row."""
    run_name = f"bench-{name}-seed{seed}-{time.strftime('%Y%m%d-%H%M%S')}"
    if settings.startswith("sites:"):
        settings = _site_files(run_name, settings.removeprefix("sites:"), seed)
    command = [sys.executable, "-m", "server.simulate", "-c", f"run-name='{run_name}' seed={seed} {settings}"]
    done = measure(command, PROJECT)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the simulation failed:\n{done.stderr[-2000:]}")
    wall, peak = done.wall_s, done.peak_rss_bytes
    history = pd.read_csv(PROJECT / "runs" / run_name / "history.csv")
    last, best = history.iloc[-1], history.loc[history["best"] == True].iloc[-1]  # noqa: E712
    warned = history["gradcam_warning"].astype("string").fillna("")  # an empty warning reads back as NaN
    return {
        "scenario": name, "seed": seed, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2), "rounds": int(last["round"]),
        "final_pooled_auc": last["global_auc"], "final_mean_site_auc": last["mean_site_auc"], "final_worst_site_auc": last["worst_site_auc"],
        "final_heldout_auc": last["heldout_auc"], "heldout_auc_ci_low": last["heldout_auc_ci_low"], "heldout_auc_ci_high": last["heldout_auc_ci_high"],
        "final_heldout_sens_at_op": last["heldout_sensitivity_at_threshold"], "final_heldout_spec_at_op": last["heldout_specificity_at_threshold"],
        "final_heldout_sens": last["heldout_sensitivity"], "final_heldout_spec": last["heldout_specificity"],
        "best_round": int(best["round"]), "best_pooled_auc": best["global_auc"],
        "final_gradcam_pointing": last["gradcam_pointing"], "final_gradcam_energy_in_box": last["gradcam_energy_in_box"],
        "final_gradcam_border_energy": last["gradcam_border_energy"], **_border_by_hospital(last),
        "rounds_warned": int((warned != "").sum()), "rounds_naming_hospital_2": int(warned.str.contains("hospital-2:").sum()),
        "rounds_naming_others": int(warned.str.contains("hospital-[013]:", regex=True).sum()),
        "max_border_energy_clean_hospitals": _clean_border(history),
        "sanity_fully_randomised": _sanity(PROJECT / "runs" / run_name), "run_folder": f"runs/{run_name}",
    }  # fmt: skip


BY_SOURCE = "gradcam_border_energy_from__"


def _border_by_hospital(row: pd.Series) -> dict:
    """The last round's border energy of the hospital whose held-out images draw most of it to the border."""
    borders = {k.split("__")[1]: v for k, v in row.items() if k.startswith(BY_SOURCE)}
    worst = max(borders, key=borders.get) if borders else ""
    return {"max_border_hospital": worst, "max_border_energy": borders.get(worst, float("nan"))}


def _clean_border(history: pd.DataFrame) -> float:
    """The highest border energy of any hospital but hospital-2 (the shortcut's) in any round: the clean margin."""
    columns = [c for c in history.columns if c.startswith(BY_SOURCE) and not c.endswith("hospital-2")]
    return float(history[columns].max().max()) if columns else float("nan")


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per scenario: runs, and the mean [min-max] of the figures a reader compares."""
    def spread(values: pd.Series, digits: int) -> str:
        return f"{values.mean():.{digits}f} [{values.min():.{digits}f}-{values.max():.{digits}f}]"

    rows = []
    for name, part in table.groupby("scenario", sort=False):
        rows.append({
            "scenario": name, "runs": len(part), "rounds warned": spread(part["rounds_warned"], 1),
            "rounds naming hospital-2": spread(part["rounds_naming_hospital_2"], 1), "rounds naming another": spread(part["rounds_naming_others"], 1),
            "max border energy, clean hospitals": spread(part["max_border_energy_clean_hospitals"], 2),
            "final held-out AUC": spread(part["final_heldout_auc"], 3), "final pointing": spread(part["final_gradcam_pointing"], 2),
            "randomised rho": spread(part["sanity_fully_randomised"], 2), "wall s": spread(part["wall_s"], 0),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _sanity(folder: Path) -> float:
    """The fully randomised stage's rank correlation with the trained model's heatmaps (first label)."""
    path = folder / "gradcam" / "sanity.csv"
    return float(pd.read_csv(path)["spearman_with_trained"].iloc[-1]) if path.exists() else float("nan")


def main() -> None:
    """Run the chosen scenarios, print the table, write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    parser.add_argument("--seeds", type=int, default=1, help="runs per scenario, seeds 42, 43, ...")
    args = parser.parse_args()
    names = args.only or list(SCENARIOS)
    rows = []
    for name in names:
        if name.startswith("pneumoniamnist") and not PNEUMONIAMNIST.is_file():
            print(f"skipping {name}: {PNEUMONIAMNIST} not found", file=sys.stderr)
            continue
        for seed in range(42, 42 + args.seeds):
            print(f"running {name}, seed {seed} ...", flush=True)
            rows.append(run(name, SCENARIOS[name], seed))
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "simulation.csv"
    if path.exists():  # keep the scenarios and seeds not run this time
        kept = pd.read_csv(path)
        kept = kept.assign(seed=kept["seed"] if "seed" in kept else 42)
        done = set(zip(table["scenario"], table["seed"]))
        table = pd.concat([kept[[(s, d) not in done for s, d in zip(kept["scenario"], kept["seed"])]], table], ignore_index=True)
    table.to_csv(path, index=False, float_format="%.4f")
    print(table.drop(columns="run_folder").to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    result = summary(table)
    result.to_csv(RESULTS / "simulation-summary.csv", index=False)
    print(result.to_string(index=False))


if __name__ == "__main__":
    main()
