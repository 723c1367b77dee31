"""What the histogram floor costs in the pooled figures: three small hospitals (12 to 15 validation images each, like
a brain-MRI tumour set split into three hospital folders), round by round of a real FedAvg training, the pooled AUC the
server estimates from their floored score intervals against the exact AUC of their validation images together.

    .venv/bin/python benchmarks/small_sites.py [--seeds 5] [--rounds 8]

The images are PneumoniaMNIST's (../shared/data/pneumoniamnist.npz, 28x28) where that file is present, else the
built-in data at 32x32. Each seed draws three hospitals of 60, 65 and 75 images (validation shares of 12, 13 and
15) and trains the CNN by FedAvg in this process for the given rounds (2 local epochs each). After each round the
global model scores every hospital's validation images: the exact pooled AUC comes from those scores, the estimate
and its bounds from what each hospital would send at each floor (min-bin-images 1, 3, 5, 10); before the floor, such
hospitals sent no histograms at all (min-histogram-images = 20), so no pooled AUC existed. Writes
benchmarks/results/small-sites.csv (every seed, round and floor), small-sites-summary.csv and small-sites.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from common.bin_floor import auc_bounds, floor_intervals, pooled  # noqa: E402
from common.config import RunConfig, parse_run_config, project_settings  # noqa: E402
from common.image_set import ImageSet  # noqa: E402
from common.metrics import auc_from_histograms, statistics, threshold_edge  # noqa: E402
from common.model import reset_optimizer, run_model, weigh_classes  # noqa: E402
from common.partition import hospital_data  # noqa: E402
from common.pipeline import dataset  # noqa: E402
from common.runtime import configure_tensorflow  # noqa: E402
from common.splits import stratified_split  # noqa: E402

PNEUMONIAMNIST = PROJECT.parent / "shared" / "data" / "pneumoniamnist.npz"
RESULTS = PROJECT / "benchmarks" / "results"
SIZES = (60, 65, 75)  # images per hospital; a fifth of each validates
FLOORS = (1, 3, 5, 10)


def settings(seed: int, rounds: int, data: Path | None) -> RunConfig:
    """The run settings: PneumoniaMNIST at 28x28 where present, else the built-in data at 32x32."""
    base = {"labels": "pneumonia", "image-size": 28, "data": str(data)} if data else {"image-size": 32, "images-per-hospital": 200}
    return parse_run_config({**project_settings(), **base, "num-hospitals": 1, "min-hospitals": 1, "seed": seed, "num-server-rounds": rounds, "gradcam-images": 0})


def small_hospitals(cfg: RunConfig, seed: int) -> list[tuple[ImageSet, ImageSet]]:
    """Three hospitals of SIZES images drawn from the data's pool without overlap, each split 80/20 by label."""
    pool = hospital_data(cfg, 0)
    pool = pool[0].join(pool[1])
    rows = np.random.default_rng([seed, 0x5A11]).permutation(len(pool))
    out, start = [], 0
    for size in SIZES:
        local = pool.take(rows[start : start + size])
        start += size
        train, val = stratified_split(local.labels, 0.2, seed)
        out.append((local.take(train), local.take(val)))
    return out


def fedavg_round(model: keras.Model, cfg: RunConfig, sites: list[tuple[ImageSet, ImageSet]], seed: int) -> None:
    """One FedAvg round in this process: every hospital trains the global weights, the mean by images becomes global."""
    start, updates, counts = model.get_weights(), [], []
    for h, (train, _) in enumerate(sites):
        model.set_weights(start)
        reset_optimizer(model)
        weigh_classes(model, train.labels, cfg.class_weighting)
        model.fit(dataset(train, cfg, training=True, seed=seed + h), epochs=cfg.local_epochs, shuffle=False, verbose=0)
        updates.append(model.get_weights())
        counts.append(len(train))
    model.set_weights([sum(u[i] * (n / sum(counts)) for u, n in zip(updates, counts)) for i in range(len(start))])


def measure(cfg: RunConfig, sites: list[tuple[ImageSet, ImageSet]], model: keras.Model) -> list[dict]:
    """The exact pooled validation AUC and, at each floor, the server's estimate and bounds."""
    logits = [model.predict(val.images, verbose=0) for _, val in sites]
    labels = [val.labels for _, val in sites]
    exact = roc_auc_score(np.concatenate(labels)[:, 0], np.concatenate(logits)[:, 0])
    root = threshold_edge(cfg.histogram_bins, cfg.threshold) + 1
    rows = []
    for k in FLOORS:
        intervals = []
        for z, y in zip(logits, labels):
            _, pos, neg = statistics(z, y, cfg.threshold, cfg.histogram_bins)
            intervals.append(floor_intervals(pos[0], neg[0], k, root))
        low, high = auc_bounds(intervals, cfg.histogram_bins)
        estimate = auc_from_histograms(*pooled(intervals, cfg.histogram_bins)) if high - low < 1 - 1e-9 else float("nan")
        rows.append({"floor": k, "exact": exact, "estimate": estimate, "low": low, "high": high,
                     "intervals": "/".join(str(int(((i.pos + i.neg) > 0).sum())) for i in intervals)})  # fmt: skip
    return rows


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per floor: the estimate's error against the exact AUC, how often it exists, and the bounds' width."""
    rows = []
    for k, part in table.groupby("floor"):
        error = part["estimate"] - part["exact"]
        rows.append({
            "min-bin-images": k, "rounds measured": len(part), "estimate available": f"{part['estimate'].notna().mean():.0%}",
            "mean error": error.mean(), "mean |error|": error.abs().mean(), "95th pct |error|": error.abs().quantile(0.95),
            "worst |error|": error.abs().max(), "exact within bounds": f"{((part['low'] <= part['exact'] + 1e-9) & (part['exact'] <= part['high'] + 1e-9)).mean():.0%}",
            "mean bounds width": (part["high"] - part["low"]).mean(),
        })  # fmt: skip
    return pd.DataFrame(rows)


def plot(table: pd.DataFrame, path: Path) -> None:
    """The estimate against the exact AUC, one panel per floor."""
    fig, axes = plt.subplots(1, len(FLOORS), figsize=(4 * len(FLOORS), 4), constrained_layout=True, sharey=True)
    for ax, (k, part) in zip(axes, table.groupby("floor")):
        part = part.dropna(subset=["estimate"])
        below, above = (part["estimate"] - part["low"]).clip(lower=0), (part["high"] - part["estimate"]).clip(lower=0)
        ax.errorbar(part["exact"], part["estimate"], yerr=[below, above], fmt="o",
                    ms=3, alpha=0.6, elinewidth=0.6, label="estimate, with what the intervals allow")  # fmt: skip
        ax.plot([0.4, 1], [0.4, 1], color="grey", lw=0.7)
        ax.set(title=f"min-bin-images = {k}", xlabel="exact pooled AUC", xlim=(0.4, 1.01), ylim=(0.4, 1.01))
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("pooled AUC the server estimates")
    axes[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Three hospitals of 12-15 validation images: the pooled AUC under the histogram floor")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command line: run every seed, print and write the tables."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--synthetic", action="store_true", help="use the built-in data even where PneumoniaMNIST is present")
    args = parser.parse_args(argv)
    configure_tensorflow(2)
    data = None if args.synthetic or not PNEUMONIAMNIST.is_file() else PNEUMONIAMNIST
    rows, started = [], time.time()
    for seed in range(args.seeds):
        cfg = settings(seed, args.rounds, data)
        sites = small_hospitals(cfg, seed)
        keras.backend.clear_session()
        keras.utils.set_random_seed(seed)
        model = run_model(cfg)
        for rnd in range(1, args.rounds + 1):
            fedavg_round(model, cfg, sites, seed)
            rows += [{"data": "PneumoniaMNIST" if data else "built-in", "seed": seed, "round": rnd, **r} for r in measure(cfg, sites, model)]
            print(f"seed {seed + 1}/{args.seeds} round {rnd}/{args.rounds}  exact pooled AUC {rows[-1]['exact']:.3f}  elapsed {time.time() - started:.0f} s", flush=True)
    table = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out / "small-sites.csv", index=False, float_format="%.4f")
    result = summary(table)
    result.to_csv(args.out / "small-sites-summary.csv", index=False, float_format="%.4f")
    plot(table, args.out / "small-sites.png")
    print(result.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(f"{len(table) // len(FLOORS)} rounds measured in {time.time() - started:.0f} s; results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
