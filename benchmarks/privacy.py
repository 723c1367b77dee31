"""What differential privacy costs: the held-out AUC of one federation on PneumoniaMNIST without DP, and with each option
(central: hospitals clip, the server adds the noise; local: hospitals clip and noise) at two noise levels, and with
clipping alone, with the
epsilon each spends, all measured in one run.

    .venv/bin/python benchmarks/privacy.py                         # about 20 minutes on 2 cores
    .venv/bin/python benchmarks/privacy.py --only none --only central-z1 --rounds 5

The federation: 5 hospitals sharing PneumoniaMNIST's training images (IID) at 28x28, 10 rounds of 2 local epochs,
the held-out set PneumoniaMNIST's test split; dp-clip-norm 1.0 (the light CNN's updates here are 4 to 8 in norm, so
every update is clipped), delta 1e-5. Prints a table and writes benchmarks/results/privacy.csv.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
DATA = PROJECT.parent / "shared" / "data" / "pneumoniamnist.npz"
sys.path.insert(0, str(PROJECT))

from server import simulate  # noqa: E402

BASE = {"num-hospitals": 5, "image-size": 28, "num-server-rounds": 10, "local-epochs": 2, "gradcam-images": 0, "dp-clip-norm": 1.0, "dp-delta": 1e-5}
SCENARIOS = {  # name -> run settings
    "none": {"dp": "off"},
    "central-z0": {"dp": "central", "dp-noise-multiplier": 0.0},  # clipping alone: what the noise adds to it
    "central-z0.5": {"dp": "central", "dp-noise-multiplier": 0.5},
    "central-z1": {"dp": "central", "dp-noise-multiplier": 1.0},
    "local-z0.5": {"dp": "local", "dp-noise-multiplier": 0.5},
    "local-z1": {"dp": "local", "dp-noise-multiplier": 1.0},
}


def run(name: str, settings: dict, rounds: int, data: Path, workdir: Path) -> dict:
    """One simulation; its final figures and the budget it spent."""
    cfg = simulate.prepare({**BASE, "data": str(data), "num-server-rounds": rounds, "output-dir": str(workdir), "run-name": name, **settings})
    started = time.perf_counter()
    folder = simulate.simulate(cfg)
    history = pd.read_csv(folder / "history.csv")
    last = history.iloc[-1]
    return {
        "scenario": name, "dp": cfg.dp, "noise_multiplier": cfg.dp_noise_multiplier if cfg.dp != "off" else 0.0, "rounds": rounds,
        "epsilon": last.get("dp_epsilon", float("inf")) if cfg.dp != "off" else float("inf"), "delta": cfg.dp_delta,
        "heldout_auc": last["heldout_auc"], "best_heldout_auc": history["heldout_auc"].iloc[1:].max(), "pooled_val_auc": last["global_auc"],
        "seconds": time.perf_counter() - started,
    }  # fmt: skip


def main() -> None:
    """Run the scenarios asked for, print the table, write the CSV."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", action="append", choices=list(SCENARIOS), help="run only these scenarios")
    parser.add_argument("--rounds", type=int, default=BASE["num-server-rounds"])
    parser.add_argument("--data", type=Path, default=DATA, help="PneumoniaMNIST as an .npz (see ../shared/data/README.md)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="privacy-") as tmp:
        for name in args.only or SCENARIOS:
            print(f"{name} ...", flush=True)
            rows.append(run(name, SCENARIOS[name], args.rounds, args.data, Path(tmp)))
    table = pd.DataFrame(rows)
    if "none" in set(table["scenario"]):
        table["auc_cost"] = table.loc[table["scenario"] == "none", "heldout_auc"].iloc[0] - table["heldout_auc"]
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "privacy.csv", index=False, float_format="%.6g")


if __name__ == "__main__":
    main()
