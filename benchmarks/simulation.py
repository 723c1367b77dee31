"""Wall time, peak memory and final figures of whole simulations, run as a user runs them.

    .venv/bin/python benchmarks/simulation.py                 # the default run and a PneumoniaMNIST run
    .venv/bin/python benchmarks/simulation.py --only default

Each scenario runs `python -m server.simulate` in a subprocess while this script samples the summed resident memory
of its whole process tree (SuperLink, ServerApp, Ray workers) every 0.5 s. Prints a table and writes
benchmarks/results/simulation.csv.
"""

from __future__ import annotations

import argparse
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
}


def run(name: str, settings: str) -> dict:
    """Run one scenario to its end; its wall time, peak memory and last history row."""
    run_name = f"bench-{name}-{time.strftime('%Y%m%d-%H%M%S')}"
    command = [sys.executable, "-m", "server.simulate", "-c", f"run-name='{run_name}' {settings}"]
    done = measure(command, PROJECT)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: the simulation failed:\n{done.stderr[-2000:]}")
    wall, peak = done.wall_s, done.peak_rss_bytes
    history = pd.read_csv(PROJECT / "runs" / run_name / "history.csv")
    last, best = history.iloc[-1], history.loc[history["best"] == True].iloc[-1]  # noqa: E712
    return {
        "scenario": name, "wall_s": round(wall, 1), "peak_rss_gib": round(peak / 2**30, 2), "rounds": int(last["round"]),
        "final_pooled_auc": last["global_auc"], "final_mean_site_auc": last["mean_site_auc"], "final_worst_site_auc": last["worst_site_auc"],
        "final_heldout_auc": last["heldout_auc"], "heldout_auc_ci_low": last["heldout_auc_ci_low"], "heldout_auc_ci_high": last["heldout_auc_ci_high"],
        "final_heldout_sens_at_op": last["heldout_sensitivity_at_threshold"], "final_heldout_spec_at_op": last["heldout_specificity_at_threshold"],
        "final_heldout_sens": last["heldout_sensitivity"], "final_heldout_spec": last["heldout_specificity"],
        "best_round": int(best["round"]), "best_pooled_auc": best["global_auc"],
        "final_gradcam_pointing": last["gradcam_pointing"], "final_gradcam_energy_in_box": last["gradcam_energy_in_box"],
        "final_gradcam_border_energy": last["gradcam_border_energy"], **_border_by_hospital(last),
        "rounds_warned": int(history["gradcam_warning"].notna().sum()),  # an empty warning reads back as NaN
        "sanity_fully_randomised": _sanity(PROJECT / "runs" / run_name), "run_folder": f"runs/{run_name}",
    }  # fmt: skip


def _border_by_hospital(row: pd.Series) -> dict:
    """The last round's border energy of the hospital whose held-out images draw most of it to the border."""
    borders = {k.split("__")[1]: v for k, v in row.items() if k.startswith("gradcam_border_energy__hospital-")}
    worst = max(borders, key=borders.get) if borders else ""
    return {"max_border_hospital": worst, "max_border_energy": borders.get(worst, float("nan"))}


def _sanity(folder: Path) -> float:
    """The fully randomised stage's rank correlation with the trained model's heatmaps (first label)."""
    path = folder / "gradcam" / "sanity.csv"
    return float(pd.read_csv(path)["spearman_with_trained"].iloc[-1]) if path.exists() else float("nan")


def main() -> None:
    """Run the chosen scenarios, print the table, write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(SCENARIOS), action="append")
    names = parser.parse_args().only or list(SCENARIOS)
    rows = []
    for name in names:
        if name.startswith("pneumoniamnist") and not PNEUMONIAMNIST.is_file():
            print(f"skipping {name}: {PNEUMONIAMNIST} not found", file=sys.stderr)
            continue
        print(f"running {name} ...", flush=True)
        rows.append(run(name, SCENARIOS[name]))
    table = pd.DataFrame(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / "simulation.csv"
    if path.exists():  # keep the scenarios not run this time
        kept = pd.read_csv(path)
        table = pd.concat([kept[~kept["scenario"].isin(table["scenario"])], table], ignore_index=True)
    table.to_csv(path, index=False, float_format="%.4f")
    print(table.drop(columns="run_folder").to_string(index=False, float_format=lambda v: f"{v:.3f}"))


if __name__ == "__main__":
    main()
