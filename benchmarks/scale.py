"""How the simulation scales with the number of hospitals: seconds per round and peak memory of the whole process tree.

    .venv/bin/python benchmarks/scale.py                       # 4, 16, 64, 256 and 1,000 hospitals (about 12 min)
    .venv/bin/python benchmarks/scale.py --hospitals 4 --hospitals 64 --rounds 2

Each hospital holds 50 built-in images at 32x32 and trains 1 local epoch. Up to 16 hospitals all train each round;
beyond that a fraction is sampled so that 16 train and 16 validate per round, as a large federation would run it. So
the work per round stays the same and what grows is what the federation itself costs. Rounds are timed apart from
start-up (the mean of rounds 2..R). Writes benchmarks/results/scale.csv and scale.png; prints the table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
from measure import measure, steady_mean  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"
SIZES = (4, 16, 64, 256, 1000)
SAMPLED = 16  # hospitals that train (and validate) in a round, once the federation is larger


def settings(hospitals: int, rounds: int, output: Path, name: str) -> str:
    """The run settings of one federation size."""
    fraction = min(1.0, SAMPLED / hospitals)
    values = {
        "num-hospitals": hospitals, "images-per-hospital": 50, "image-size": 32, "local-epochs": 1, "num-server-rounds": rounds,
        "fraction-train": fraction, "fraction-evaluate": fraction, "min-hospitals": 2, "gradcam-images": 0, "heldout-images": 400,
        "output-dir": f"'{output}'", "run-name": f"'{name}'",
    }  # fmt: skip
    return " ".join(f"{k}={v}" for k, v in values.items())


def run(hospitals: int, rounds: int, output: Path) -> dict:
    """One federation size through `python -m server.simulate`: its wall time, peak memory and round times."""
    name = f"scale-{hospitals}-{time.strftime('%H%M%S')}"
    done = measure([sys.executable, "-m", "server.simulate", "-c", settings(hospitals, rounds, output, name)], PROJECT)
    if done.returncode != 0:
        raise RuntimeError(f"{hospitals} hospitals: the simulation failed:\n{done.stderr[-3000:]}")
    history = pd.read_csv(output / name / "history.csv")
    rounds_ = history[history["round"] > 0]
    seconds = rounds_["seconds"].tolist()
    return {
        "hospitals": hospitals, "trained_per_round": int(rounds_["n_sites"].iloc[-1]), "rounds": len(seconds),
        "wall_s": done.wall_s, "startup_s": done.wall_s - sum(seconds), "first_round_s": seconds[0],
        "steady_round_s": steady_mean(seconds), "peak_rss_gib": done.peak_rss_bytes / 2**30,
        "final_heldout_auc": float(rounds_["heldout_auc"].iloc[-1]), "failed_replies": int(rounds_["n_failed"].sum()),
    }  # fmt: skip


def plot(table: pd.DataFrame, path: Path) -> None:
    """Seconds per round and peak memory against the number of hospitals (log scale)."""
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(table["hospitals"], table["steady_round_s"], marker="o")
    left.set(xscale="log", xlabel="hospitals in the federation", ylabel="seconds per round (rounds 2..R)", title=f"Round time ({SAMPLED} hospitals train per round)")
    right.plot(table["hospitals"], table["peak_rss_gib"], marker="o", color="C1")
    right.set(xscale="log", xlabel="hospitals in the federation", ylabel="GiB", title="Peak memory of the whole process tree")
    for ax in (left, right):
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Run each size, print the table, write the CSV and the plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hospitals", type=int, action="append", help=f"federation sizes (default: {', '.join(map(str, SIZES))})")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedimaging-scale-") as tmp:
        for hospitals in args.hospitals or SIZES:
            print(f"{hospitals} hospitals ...", flush=True)
            rows.append(run(hospitals, args.rounds, Path(tmp)))
            print(f"  {rows[-1]['steady_round_s']:.2f} s per round, peak {rows[-1]['peak_rss_gib']:.2f} GiB", flush=True)
    table = pd.DataFrame(rows)
    table["round_vs_smallest"] = table["steady_round_s"] / table["steady_round_s"].iloc[0]
    table["memory_vs_smallest"] = table["peak_rss_gib"] / table["peak_rss_gib"].iloc[0]
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "scale.csv", index=False, float_format="%.3f")
    plot(table, args.results / "scale.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
