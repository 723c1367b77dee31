"""Clean, attacked and defended: the held-out AUC of one federation when one hospital of five attacks every round,
under plain FedAvg and each robust aggregation rule, all measured in one run.

    .venv/bin/python benchmarks/robustness.py                 # about 12 minutes on 2 cores
    .venv/bin/python benchmarks/robustness.py --only clean --only flip/median

The federation: 5 built-in hospitals x 300 images at 32x32, 8 rounds of 3 local epochs (its clean run reaches a
held-out AUC near 0.88). The attacker (hospital-4) runs fedimaging's own code and alters its train replies
(tests/attack_app): `flip` sends its weights sign-flipped, `scale` sends them x1e6. Plain FedAvg runs with the
norm bound (max-update-norm) switched off, to show what the bound and the rules each prevent. Prints a table and
writes benchmarks/results/robustness.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
sys.path.insert(0, str(PROJECT))
sys.path.insert(0, str(PROJECT / "tests" / "attack_app"))

from attack_maker import make_attack_app  # noqa: E402
from server import simulate  # noqa: E402
from server.launch import RunFailed  # noqa: E402

BASE = {"num-hospitals": 5, "images-per-hospital": 300, "heldout-images": 200, "image-size": 32, "num-server-rounds": 8, "local-epochs": 3,
        "gradcam-images": 0, "min-hospitals": 3}  # fmt: skip
UNBOUNDED = {"max-update-norm": 0}
SCENARIOS = {  # name -> (attack, run settings)
    "clean": ("none", {}),
    "clean/clipped-mean": ("none", {"aggregation": "clipped-mean"}),
    "scale/fedavg, no bound": ("scale", UNBOUNDED),
    "scale/fedavg, bounded": ("scale", {}),
    "flip/fedavg": ("flip", UNBOUNDED),
    "flip/clipped-mean": ("flip", {"aggregation": "clipped-mean", **UNBOUNDED}),
    "flip/median": ("flip", {"aggregation": "median", **UNBOUNDED}),
    "flip/trimmed-mean": ("flip", {"aggregation": "trimmed-mean", **UNBOUNDED}),
    "flip/multikrum": ("flip", {"aggregation": "multikrum", **UNBOUNDED}),
}


def run(name: str, attack: str, settings: dict, rounds: int, images: int, workdir: Path) -> dict:
    """One simulation; its final figures and what the server refused."""
    app = make_attack_app(workdir / f"app-{len(list(workdir.iterdir()))}")
    cfg = simulate.prepare({**BASE, "num-server-rounds": rounds, "images-per-hospital": images, "output-dir": str(workdir / "runs"), "run-name": name.replace("/", "-").replace(", ", "-").replace(" ", "-"), **settings})
    try:
        simulate.simulate(cfg, app, {"attack-hospital": 4, "attack-plan": ",".join([attack] * rounds)})
        outcome = "finished"
    except RunFailed as exc:  # a run the attack stopped is a result too: its history says how far it got
        outcome = f"failed: {str(exc).split(' (run folder')[0]}"
    history = pd.read_csv(Path(cfg.output_dir) / cfg.run_name / "history.csv")
    last = history.iloc[-1]
    left_out = pd.Series([site for cell in history["left_out_by_rule"].astype("string").fillna("") for site in cell.split("; ") if site]).value_counts().to_dict()
    kept_out = history["unavailable"].astype("string").fillna("").str.contains("global_model").sum()
    return {"scenario": name, "attack": attack, "aggregation": cfg.aggregation, "max_update_norm": cfg.max_update_norm,
            "heldout_auc": last["heldout_auc"], "refused_replies": int(history["n_rejected"].sum()), "models_kept_out": int(kept_out),
            "left_out_by_rule": int(history["left_out_by_rule"].astype("string").fillna("").str.len().gt(0).sum()),
            "left_out_sites": " ".join(f"{site}x{n}" for site, n in sorted(left_out.items())), "run": outcome}  # fmt: skip


def main() -> None:
    """Run the scenarios asked for, print the table, write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--rounds", type=int, default=BASE["num-server-rounds"])
    parser.add_argument("--images", type=int, default=BASE["images-per-hospital"], help="images per hospital")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="robustness-") as tmp:
        for name in args.only or SCENARIOS:
            print(f"{name} ...", flush=True)
            attack, settings = SCENARIOS[name]
            rows.append(run(name, attack, settings, args.rounds, args.images, Path(tmp)))
    table = pd.DataFrame(rows)
    if "clean" in set(table["scenario"]):
        table["vs_clean"] = table["heldout_auc"] - table.loc[table["scenario"] == "clean", "heldout_auc"].iloc[0]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "robustness.csv", index=False, float_format="%.4f")


if __name__ == "__main__":
    main()
