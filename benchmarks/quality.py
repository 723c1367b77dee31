"""Federated quality against pooled and single-hospital training, on PneumoniaMNIST at its native 28x28.

    .venv/bin/python benchmarks/quality.py                        # the judged table, seeds 0-4 (hours on 2 cores)
    .venv/bin/python benchmarks/quality.py --seeds 0,1 --only fedavg-dirichlet-0.5
    .venv/bin/python benchmarks/quality.py --seeds 124,139,131 --only clipped-mean-dirichlet-0.5 --results benchmarks/results/tuning

With no --only it builds the judged table (TABLE): pooled and local-only on every split, FedAvg, FedProx, FedAdam and
the recommended setting, on each seed given; the backbone pair (ONE_SEED) on the first seed only. Settings are chosen
on seeds other than the judged 0-4, in benchmarks/results/tuning/ (seeds 124, 139 and 131 give one hospital a third to
a half of the images and pneumonia only, as judged seeds 2 and 3 do; 100-102 do not): the candidates tried there run
with --only. After the table it prints the issue's verdicts and the machine time of every row summed.

Every method sees the same images and the same number of passes over them (rounds x local epochs = epochs; a row
whose settings fix its own rounds says so in its name, and records them):
- pooled: the same CNN trained in one process on all hospitals' training shares of a split together (the ceiling);
- local-only: each hospital trains alone on its own training share;
- the federated methods run the real Flower simulation (`python -m server.simulate`) with 5 hospitals.
Each simulated hospital holds back a stratified local test share (`test-fraction`) that no method trains or validates
on; the official test split is the held-out set of every method. The operating point is the threshold that reaches
the target sensitivity on validation data (the pooled hospitals' validation histograms for the federated model, the
pooled or own validation share for the others), then applied unchanged to the test images.

Pooled and local-only training run on the splits of the federated methods chosen (all four when none is). The
figures are those of the final round and of the round with the best validation AUC ("selected"; the pooled
validation histograms for a federation). Writes benchmarks/results/quality.csv (one row per method, split and
seed), quality-sites.csv (each hospital's local test AUC alone, with the global model and with the pooled model),
quality-rounds.csv (validation and test AUC after each round), quality-summary.csv (mean, sd and the worst seed),
quality.png (mean and range over seeds) and quality-worst-seed.png (each method's worst seed, round by round); prints
the summary table.

Resumable row by row: a (method, split, seed) already in quality.csv is kept and not run again (--redo runs it again),
so the table can be built over several invocations; each row records the command that made it and when.
"""

from __future__ import annotations

import argparse
import os
import subprocess
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

PROJECT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(PROJECT))

from common.config import RunConfig, parse_run_config, project_settings  # noqa: E402
from common.image_set import ImageSet  # noqa: E402
from common.metrics import clinical_figures, confusion_counts, figures, operating_point, statistics  # noqa: E402
from common.model import run_model, weigh_classes  # noqa: E402
from common.partition import heldout_set, hospital_data, hospital_test  # noqa: E402
from common.pipeline import dataset  # noqa: E402
from common.runtime import configure_tensorflow  # noqa: E402

PNEUMONIAMNIST = PROJECT.parent / "shared" / "data" / "pneumoniamnist.npz"
RESULTS = PROJECT / "benchmarks" / "results"
BASE = {"labels": "pneumonia", "image-size": 28, "num-hospitals": 5, "test-fraction": 0.2, "gradcam-images": 0}
SPLITS = {
    "iid": {"partition": "iid", "scanner-spread": 0.0},
    "dirichlet-0.5": {"partition": "dirichlet", "dirichlet-alpha": 0.5, "scanner-spread": 0.0},
    "dirichlet-0.1": {"partition": "dirichlet", "dirichlet-alpha": 0.1, "scanner-spread": 0.0},
    "scanners": {"partition": "iid", "scanner-spread": 2.0},  # contrast x0.7-1.3, brightness +-0.16, noise up to 0.04
}
FEDERATED = {  # method -> (split, extra run settings)
    "fedavg-iid": ("iid", {}),
    "fedavg-dirichlet-0.5": ("dirichlet-0.5", {}),
    "fedavg-dirichlet-0.1": ("dirichlet-0.1", {}),
    "fedavg-scanners": ("scanners", {}),
    "fedprox-dirichlet-0.5": ("dirichlet-0.5", {"proximal-mu": 0.01}),
    "fedadam-dirichlet-0.5": ("dirichlet-0.5", {"aggregation": "fedadam", "server-learning-rate": 0.01}),
    # 0.03 was tried after the runs above, on an in-process loop's seed-0 test AUC; seeds 1 and 2 are the clean test of it
    "fedadam-lr0.03-dirichlet-0.5": ("dirichlet-0.5", {"aggregation": "fedadam", "server-learning-rate": 0.03}),
    # issue 16: chosen on seeds 100-102, then judged on seeds 0-4
    "logit-adjusted-dirichlet-0.5": ("dirichlet-0.5", {"class-weighting": "logit-adjusted"}),
    "logit-adjusted-dirichlet-0.1": ("dirichlet-0.1", {"class-weighting": "logit-adjusted"}),
    "logit-adjusted-iid": ("iid", {"class-weighting": "logit-adjusted"}),
    "fedavg-lr0.001-dirichlet-0.5": ("dirichlet-0.5", {"learning-rate": 0.001}),  # the recommended setting since
    "fedavg-lr0.001-dirichlet-0.1": ("dirichlet-0.1", {"learning-rate": 0.001}),
    "fedavg-lr0.001-iid": ("iid", {"learning-rate": 0.001}),
    "fedavg-lr0.001-scanners": ("scanners", {"learning-rate": 0.001}),
    "clipped-mean-dirichlet-0.5": ("dirichlet-0.5", {"aggregation": "clipped-mean"}),
    "fedprox-mu0.1-dirichlet-0.5": ("dirichlet-0.5", {"proximal-mu": 0.1}),
    "fedprox-mu1-dirichlet-0.5": ("dirichlet-0.5", {"proximal-mu": 1.0}),
    "cosine-dirichlet-0.5": ("dirichlet-0.5", {"learning-rate-schedule": "cosine"}),
    "fedavgm-dirichlet-0.5": ("dirichlet-0.5", {"aggregation": "fedavgm"}),
    "fedavgm-lr0.001-dirichlet-0.5": ("dirichlet-0.5", {"aggregation": "fedavgm", "learning-rate": 0.001}),
    "fedprox-lr0.001-dirichlet-0.5": ("dirichlet-0.5", {"proximal-mu": 0.01, "learning-rate": 0.001}),
    "fedavg-lr0.0005-dirichlet-0.5": ("dirichlet-0.5", {"learning-rate": 0.0005}),
    # twice the passes of every other row (20 rounds x 2 local epochs): not the equal-budget comparison; on tuning seed
    # 139 an in-process FedAvg loop was still climbing at round 10 (0.93) and held about 0.94 from round 13 to 25
    "fedavg-20-rounds-dirichlet-0.5": ("dirichlet-0.5", {"num-server-rounds": 20}),
    # group normalisation in place of batch normalisation (Hsieh et al. 2020: batch statistics fail under label skew)
    "gn-dirichlet-0.5": ("dirichlet-0.5", {"model": "lightcnn-gn"}),
    "gn-dirichlet-0.1": ("dirichlet-0.1", {"model": "lightcnn-gn"}),
    "gn-iid": ("iid", {"model": "lightcnn-gn"}),
    # a Keras backbone against lightcnn on one split, both at 32x32 (the backbones' smallest input); random initial
    # weights: ImageNet's cannot be fetched on this machine
    "fedavg-iid-32": ("iid", {"image-size": 32}),
    "fedavg-efficientnetb0-iid-32": ("iid", {"image-size": 32, "model": "efficientnetb0"}),
}
RECOMMENDED = "fedavg-lr0.001"  # the best worst seed among the candidates tried on the tuning seeds (README)
# The judged table (the default): these on every seed given; the backbone pair on the first seed only (hours apiece on
# this machine for one row of five seeds). The other methods are candidates tried on the tuning seeds (--only).
TABLE = ["fedavg-iid", "fedavg-dirichlet-0.5", "fedavg-dirichlet-0.1", "fedavg-scanners", "fedprox-dirichlet-0.5", "fedadam-dirichlet-0.5",
         "fedadam-lr0.03-dirichlet-0.5", *(f"{RECOMMENDED}-{split}" for split in SPLITS)]  # fmt: skip
ONE_SEED = ["fedavg-iid-32", "fedavg-efficientnetb0-iid-32"]
TARGET_AUC, TARGET_GAP = 0.95, 0.01
SKEWED_MEAN, SKEWED_WORST = 0.90, 0.85  # Dirichlet 0.1: the mean to reach, and no seed below


def run_config(data: Path, split: str, seed: int, rounds: int, epochs: int, extra: dict | None = None) -> dict:
    """The run settings of one method on one split and seed."""
    return {**project_settings(), **BASE, **SPLITS[split], "data": str(data), "seed": seed, "num-server-rounds": rounds,
            "local-epochs": epochs, **(extra or {})}  # fmt: skip


def scores(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """The model's logits (n, n_labels)."""
    return model.predict(images, batch_size=256, verbose=0)


def test_figures(logits: np.ndarray, labels: np.ndarray, thresholds: np.ndarray, cfg: RunConfig) -> dict:
    """AUC, and sensitivity and specificity at the operating point chosen on validation data."""
    row = figures(*statistics(logits, labels, cfg.threshold, cfg.histogram_bins), cfg.labels)
    at = clinical_figures(confusion_counts(logits, labels, np.nan_to_num(thresholds, nan=cfg.threshold))[0])
    return {"test_auc": row["auc"], "test_sensitivity": at["sensitivity"], "test_specificity": at["specificity"]}


def chosen_thresholds(logits: np.ndarray, labels: np.ndarray, cfg: RunConfig) -> np.ndarray:
    """The threshold per label reaching the target sensitivity on these validation scores."""
    _, pos, neg = statistics(logits, labels, cfg.threshold, cfg.histogram_bins)
    return operating_point(pos, neg, cfg.target_sensitivity, cfg.labels)[0]


def local_auc(model: keras.Model, share: ImageSet, cfg: RunConfig) -> float:
    """AUC on a hospital's local test share; NaN where the share lacks a class."""
    return figures(*statistics(scores(model, share.images), share.labels, cfg.threshold, cfg.histogram_bins), cfg.labels)["auc"]


def train_alone(cfg: RunConfig, train: ImageSet, val: ImageSet, test: ImageSet, seed: int) -> tuple[list[dict], list, list, keras.Model]:
    """The CNN trained in one process for rounds x local epochs on these images, as the clients train it. After each
    round's worth of epochs: the validation AUC, the operating point chosen on validation, and the test figures there.
    Returns those rows, the final weights, the weights of the round with the best validation AUC, and the model."""
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    model = run_model(cfg)
    weigh_classes(model, train.labels, cfg.class_weighting)
    data = dataset(train, cfg, training=True, seed=seed)
    rounds, best = [], None
    for r in range(cfg.num_server_rounds):
        model.fit(data, epochs=cfg.local_epochs, shuffle=False, verbose=0)
        val_logits = scores(model, val.images)
        val_auc = figures(*statistics(val_logits, val.labels, cfg.threshold, cfg.histogram_bins), cfg.labels)["auc"]
        thresholds = chosen_thresholds(val_logits, val.labels, cfg)
        rounds.append({"round": r + 1, "val_auc": val_auc, **test_figures(scores(model, test.images), test.labels, thresholds, cfg)})
        if best is None or not val_auc <= best[0]:  # a NaN validation AUC (one class) keeps the latest
            best = (val_auc, model.get_weights())
    final = model.get_weights()
    return rounds, final, best[1], model


def _pick(rounds: list[dict]) -> tuple[dict, dict]:
    """The final round's figures and those of the round with the best validation AUC (the latest where none is defined)."""
    aucs = np.array([r["val_auc"] for r in rounds], float)
    chosen = len(rounds) - 1 if np.isnan(aucs).all() else int(np.nanargmax(aucs))
    return rounds[-1], rounds[chosen]


def _figures_row(final: dict, selected: dict) -> dict:
    """The test columns of a results row: final round, and round selected on validation."""
    keys = ("test_auc", "test_sensitivity", "test_specificity")
    return {**{k: final[k] for k in keys}, **{f"selected_{k}": selected[k] for k in keys}, "selected_round": selected["round"]}


def hospitals(cfg: RunConfig) -> list[tuple[ImageSet, ImageSet, ImageSet]]:
    """Every simulated hospital's (train, validation, local test) shares."""
    return [(*hospital_data(cfg, h), hospital_test(cfg, h)) for h in range(cfg.num_hospitals)]


def _local_aucs(model: keras.Model, weights: tuple, share: ImageSet, cfg: RunConfig) -> tuple[float, float]:
    """AUC on a local test share of the final and of the selected weights."""
    out = []
    for w in weights:
        model.set_weights(w)
        out.append(local_auc(model, share, cfg))
    return out[0], out[1]


def run_pooled(cfg: RunConfig, split: str, seed: int) -> tuple[dict, list[dict], list[dict]]:
    """Pooled training on every hospital's training share; its figures, local-share AUCs and curve."""
    shares, test = hospitals(cfg), heldout_set(cfg)
    train, val = shares[0][0], shares[0][1]
    for tr, va, _ in shares[1:]:
        train, val = train.join(tr), val.join(va)
    rounds, final, selected, model = train_alone(cfg, train, val, test, seed)
    row = {"method": "pooled", "split": split, "seed": seed, **_figures_row(*_pick(rounds))}
    sites = []
    for h, share in enumerate(s[2] for s in shares):
        last, chosen = _local_aucs(model, (final, selected), share, cfg)
        sites.append({"split": split, "seed": seed, "hospital": h, "pooled_local_auc": last, "pooled_selected_local_auc": chosen})
    return row, sites, [{"method": "pooled", "split": split, "seed": seed, **r} for r in rounds]


def run_local(cfg: RunConfig, split: str, seed: int) -> tuple[dict, list[dict]]:
    """Each hospital trained alone; the image-weighted mean of their test figures, and each one's AUC on its own share."""
    test = heldout_set(cfg)
    rows, sites = [], []
    for h, (train, val, share) in enumerate(hospitals(cfg)):
        rounds, final, selected, model = train_alone(cfg, train, val, test, seed)
        rows.append({**_figures_row(*_pick(rounds)), "n": len(train)})
        last, chosen = _local_aucs(model, (final, selected), share, cfg)
        sites.append({"split": split, "seed": seed, "hospital": h, "n_train": len(train), "n_local_test": len(share),
                      "positives_local_test": int(share.labels.sum()), "alone_local_auc": last, "alone_selected_local_auc": chosen,
                      "alone_test_auc": rows[-1]["test_auc"]})  # fmt: skip
    table = pd.DataFrame(rows)
    columns = [c for c in table.columns if c.startswith(("test_", "selected_test_"))]
    mean = {k: float(np.average(table[k], weights=table["n"])) for k in columns}
    return {"method": "local-only", "split": split, "seed": seed, **mean, "worst_test_auc": float(table["test_auc"].min())}, sites


def run_federated(method: str, cfg: RunConfig, settings: dict, split: str, seed: int, workdir: Path) -> tuple[dict, list[dict], list[dict]]:
    """One federated run through the Flower simulation; its final figures and those of the round with the best pooled
    validation AUC, the global model's AUC on each hospital's local share, and its held-out AUC after each round."""
    name = f"quality-{method}-seed{seed}-{time.strftime('%H%M%S')}"
    overrides = " ".join(f"{k}={_toml(v)}" for k, v in {**settings, "output-dir": str(workdir), "run-name": name}.items())
    started = time.time()
    done = subprocess.run([sys.executable, "-m", "server.simulate", "-c", overrides], cwd=PROJECT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{method} seed {seed}: the simulation failed:\n{done.stderr[-3000:]}")
    folder = workdir / name
    history = pd.read_csv(folder / "history.csv")
    rounds = [{"round": int(r["round"]), "val_auc": r["global_auc"], "test_auc": r["heldout_auc"],
               "test_sensitivity": r["heldout_sensitivity_at_threshold"], "test_specificity": r["heldout_specificity_at_threshold"]}
              for _, r in history.iterrows() if r["round"] > 0]  # fmt: skip
    final, selected = _pick(rounds)
    row = {"method": method, "split": split, "seed": seed, **_figures_row(final, selected), "wall_s": round(time.time() - started, 1)}
    best_file = folder / "model_best.keras"  # absent when no round had a pooled validation AUC (hospitals too small)
    last, best = (keras.models.load_model(f, compile=False) for f in (folder / "model_last.keras", best_file if best_file.exists() else folder / "model_last.keras"))
    sites = [{"split": split, "seed": seed, "hospital": h, f"{method}_local_auc": local_auc(last, share, cfg),
              f"{method}_selected_local_auc": local_auc(best, share, cfg)}
             for h, share in enumerate(hospital_test(cfg, h) for h in range(cfg.num_hospitals))]  # fmt: skip
    return row, sites, [{"method": method, "split": split, "seed": seed, **r} for r in rounds]


def _toml(value) -> str:
    """A run-setting value as `--run-config` reads it."""
    return f"'{value}'" if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)


def summary(runs: pd.DataFrame, sites: pd.DataFrame) -> pd.DataFrame:
    """Mean and spread over seeds per method and split, with the hospitals' local-share comparison."""
    rows = []
    for (method, split), group in runs.groupby(["method", "split"], sort=False):
        worst = group.loc[group["test_auc"].idxmin()]
        row = {"method": method, "split": split, "seeds": len(group), "worst_seed": int(worst["seed"]), "worst_seed_test_auc": worst["test_auc"]}
        for k in ("test_auc", "test_sensitivity", "test_specificity", "selected_test_auc", "selected_test_sensitivity", "selected_test_specificity"):
            row[k], row[f"{k}_sd"] = group[k].mean(), group[k].std(ddof=1) if len(group) > 1 else float("nan")
        name = "alone" if method == "local-only" else method
        local = sites[(sites["split"] == split) & sites["seed"].isin(group["seed"])]
        for variant in ("", "selected_"):
            column, alone = f"{name}_{variant}local_auc", f"alone_{variant}local_auc"
            if column not in local:
                continue
            row[f"{variant}local_share_auc"] = local[column].mean()
            if method != "local-only" and alone in local:
                both = local.dropna(subset=[column, alone])
                row[f"{variant}hospitals_better_than_alone"] = f"{int((both[column] > both[alone]).sum())}/{len(both)}"
        rows.append(row)
    return pd.DataFrame(rows)


def plot(curves: pd.DataFrame, path: Path) -> None:
    """Held-out (official test) AUC against rounds, mean and range over seeds, one line per method, one panel per split."""
    fig, axes = _split_panels(curves)
    for (method, split), group in curves.groupby(["method", "split"], sort=False):
        by_round = group.groupby("round")["test_auc"]
        label = method if method != "pooled" else "pooled (x: epochs / local epochs)"
        line = axes[split].plot(by_round.mean().index, by_round.mean().values, marker="o", ms=3, label=label)[0]
        axes[split].fill_between(by_round.mean().index, by_round.min().values, by_round.max().values, color=line.get_color(), alpha=0.15)
    _save_auc_plot(fig, axes, curves, "PneumoniaMNIST 28x28, 5 hospitals: AUC by round (mean, range over seeds)", path)


def _split_panels(curves: pd.DataFrame) -> tuple[plt.Figure, dict[str, plt.Axes]]:
    """One panel per split in the curves, side by side in rows of two, sharing the AUC axis."""
    splits = [s for s in SPLITS if s in set(curves["split"])] or sorted(set(curves["split"]))
    rows = (len(splits) + 1) // 2
    fig, grid = plt.subplots(rows, min(2, len(splits)), figsize=(12, 4.5 * rows), sharey=True, squeeze=False)
    for ax in grid.ravel()[len(splits):]:
        ax.remove()
    return fig, dict(zip(splits, grid.ravel()))


def _save_auc_plot(fig: plt.Figure, axes: dict[str, plt.Axes], curves: pd.DataFrame, title: str, path: Path) -> None:
    """The target line, axes, legend and title of each panel of an AUC-against-rounds plot; saved and closed."""
    for split, ax in axes.items():
        ax.axhline(TARGET_AUC, color="grey", ls="--", lw=1, label=f"target AUC {TARGET_AUC}")
        ax.set(xlabel="round", ylabel="AUC on the official test split", title=split)
        ax.set_ylim(max(0.5, curves["test_auc"].min() - 0.02), 1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_list(text: str) -> list[int]:
    """Seeds from '0-4', '0,2,7' or '3'."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        try:
            seeds.extend(range(int(first), int(last or first) + 1))
        except ValueError:
            raise argparse.ArgumentTypeError(f"seeds {text!r}: expected e.g. 0-4 or 0,2,7") from None
    return seeds


def passes(method: str, rounds: int, epochs: int) -> tuple[int, int]:
    """The rounds and local epochs a method runs: its own where its settings fix them, else the invocation's."""
    extra = FEDERATED[method][1] if method in FEDERATED else {}
    return int(extra.get("num-server-rounds", rounds)), int(extra.get("local-epochs", epochs))


def done_rows(results: Path) -> set[tuple[str, str, int, int, int]]:
    """The (method, split, seed, rounds, local epochs) rows quality.csv already holds (rows from before rounds and local
    epochs were recorded ran the defaults, 10 and 2)."""
    path = results / "quality.csv"
    if not path.is_file():
        return set()
    table = pd.read_csv(path)
    rounds = table.get("rounds", pd.Series(10, index=table.index)).fillna(10).astype(int)
    epochs = table.get("local_epochs", pd.Series(2, index=table.index)).fillna(2).astype(int)
    return set(zip(table["method"], table["split"], table["seed"].astype(int), rounds, epochs))


def plot_worst_seed(curves: pd.DataFrame, runs: pd.DataFrame, path: Path) -> None:
    """Held-out AUC against rounds on each method's worst seed (lowest final test AUC): the swings a mean hides."""
    fig, axes = _split_panels(curves)
    for (method, split), group in runs.groupby(["method", "split"], sort=False):
        seed = int(group.loc[group["test_auc"].idxmin(), "seed"])
        curve = curves[(curves["method"] == method) & (curves["split"] == split) & (curves["seed"] == seed)].sort_values("round")
        if len(curve) and split in axes:
            axes[split].plot(curve["round"], curve["test_auc"], marker="o", ms=3, label=f"{method}, seed {seed}")
    _save_auc_plot(fig, axes, curves, "Each method's worst seed, round by round", path)


def main(argv: list[str] | None = None) -> int:
    """Run the chosen methods for each seed, skipping the rows already written; print the summary; write CSVs and the
    plots (after every method, so a stopped run keeps what finished)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=PNEUMONIAMNIST, help="an .npz with train/val/test splits (default: %(default)s)")
    parser.add_argument("--seeds", type=seed_list, default=seed_list("0-4"), help="e.g. 0-4 (the default: the seeds the targets are judged on) or 0,2,7")
    parser.add_argument("--redo", action="store_true", help="run rows again that quality.csv already holds")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--only", action="append", choices=["pooled", "local-only", *FEDERATED], help="run only these methods")
    parser.add_argument("--splits", action="append", choices=list(SPLITS), help="pooled and local-only on these splits only")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where the CSVs and plot go (default: %(default)s)")
    parser.add_argument("--runs", type=Path, default=PROJECT / "runs", help="where the federated runs' folders go (default: %(default)s)")
    args = parser.parse_args(argv)
    command = " ".join(["benchmarks/quality.py", *(sys.argv[1:] if argv is None else argv)])
    if not args.data.is_file():
        print(f"quality: {args.data} not found (see ../shared/data/README.md)", file=sys.stderr)
        return 2
    methods = args.only or ["pooled", "local-only", *TABLE, *ONE_SEED]
    configure_tensorflow(os.cpu_count() or 1)
    args.results.mkdir(parents=True, exist_ok=True)
    workdir = args.runs.resolve()
    runs, sites, curves = [], [], []
    chosen = set(args.splits or []) or {FEDERATED[m][0] for m in methods if m in FEDERATED}
    baseline_splits = [split for split in SPLITS if split in chosen] or list(SPLITS)
    done = set() if args.redo else done_rows(args.results)
    for seed in args.seeds:
        for method in methods:
            started = time.time()
            if method in ONE_SEED and not args.only and seed != args.seeds[0]:
                continue
            rounds, epochs = passes(method, args.rounds, args.local_epochs)
            made = {"rounds": rounds, "local_epochs": epochs, "command": command}
            if method in FEDERATED and (method, FEDERATED[method][0], seed, rounds, epochs) in done:
                print(f"seed {seed} {method}: kept from quality.csv (--redo runs it again)", flush=True)
                continue
            if method in ("pooled", "local-only"):
                for split in (s for s in baseline_splits if (method, s, seed, rounds, epochs) not in done):
                    cfg, split_started = parse_run_config(run_config(args.data, split, seed, rounds, epochs)), time.time()
                    if method == "pooled":
                        row, site_rows, curve = run_pooled(cfg, split, seed)
                        curves.extend(curve)
                    else:
                        row, site_rows = run_local(cfg, split, seed)
                    row["wall_s"] = round(time.time() - split_started, 1)
                    runs.append(row | made | {"when": time.strftime("%Y-%m-%d %H:%M")}), sites.extend(site_rows)
                if not runs or runs[-1]["method"] != method or runs[-1]["seed"] != seed:
                    print(f"seed {seed} {method}: kept from quality.csv (--redo runs it again)", flush=True)
                    continue
            else:
                split, extra = FEDERATED[method]
                settings = run_config(args.data, split, seed, rounds, epochs, extra)
                row, site_rows, curve = run_federated(method, parse_run_config(settings), settings, split, seed, workdir)
                runs.append(row | made | {"when": time.strftime("%Y-%m-%d %H:%M")}), sites.extend(site_rows), curves.extend(curve)
            print(f"seed {seed} {method}: {time.time() - started:.0f} s; test AUC {runs[-1]['test_auc']:.4f}", flush=True)
            write(args.results, runs, sites, curves)
    table = write(args.results, runs, sites, curves)
    print(headline(table).to_string(index=False))
    for line in verdicts(table):
        print(line)
    print(machine_time(pd.read_csv(args.results / "quality.csv")))
    return 0


def machine_time(runs: pd.DataFrame) -> str:
    """The table's machine time: every row's own wall time summed (rows were run over several invocations)."""
    timed = runs["wall_s"].dropna() if "wall_s" in runs else pd.Series(dtype=float)
    return f"the table's {len(runs)} rows took {timed.sum() / 3600:.1f} h of machine time in all ({len(timed)} rows timed, summed row by row)"


def headline(table: pd.DataFrame) -> pd.DataFrame:
    """The summary as it reads in the README: mean +- sd over seeds, final round and round selected on validation."""

    def pm(row: pd.Series, key: str) -> str:
        sd = row.get(f"{key}_sd", float("nan"))
        return f"{row[key]:.3f}" + ("" if pd.isna(sd) else f" +- {sd:.3f}")

    def text(row: pd.Series, key: str) -> str:
        return "" if key not in row or pd.isna(row[key]) else row[key] if isinstance(row[key], str) else f"{row[key]:.3f}"

    return pd.DataFrame([{
        "method": r["method"], "split": r["split"], "seeds": r["seeds"], "test AUC (final)": pm(r, "test_auc"),
        "test AUC (selected)": pm(r, "selected_test_auc"), "worst seed": f"{r['worst_seed_test_auc']:.3f} (seed {r['worst_seed']})",
        "sens / spec (final)": f"{r['test_sensitivity']:.2f} / {r['test_specificity']:.2f}",
        "local share AUC": text(r, "local_share_auc"), "better than alone": text(r, "hospitals_better_than_alone"),
    } for _, r in table.iterrows()])  # fmt: skip


def verdicts(table: pd.DataFrame) -> list[str]:
    """The issue's targets on the Dirichlet 0.5 split, met or missed and by how much (final-round figures)."""
    rows = table.set_index(["method", "split"])
    out = []
    for method in [m for m, (split, _) in FEDERATED.items() if split == "dirichlet-0.5"]:
        if (method, "dirichlet-0.5") not in rows.index:
            continue
        auc = rows.loc[(method, "dirichlet-0.5"), "test_auc"]
        line = f"{method}: test AUC {auc:.3f} ({'meets' if auc >= TARGET_AUC else 'misses'} {TARGET_AUC} by {abs(auc - TARGET_AUC):.3f})"
        if ("pooled", "dirichlet-0.5") in rows.index:
            gap = rows.loc[("pooled", "dirichlet-0.5"), "test_auc"] - auc
            line += f"; {abs(gap):.3f} {'below' if gap >= 0 else 'above'} pooled ({'within' if gap <= TARGET_GAP else 'outside'} {TARGET_GAP})"
        out.append(line)
    if (f"{RECOMMENDED}-dirichlet-0.1", "dirichlet-0.1") in rows.index:
        row = rows.loc[(f"{RECOMMENDED}-dirichlet-0.1", "dirichlet-0.1")]
        met = row["test_auc"] >= SKEWED_MEAN and row["worst_seed_test_auc"] >= SKEWED_WORST
        out.append(f"{RECOMMENDED} on Dirichlet 0.1: mean {row['test_auc']:.3f}, worst seed {row['worst_seed_test_auc']:.3f} (seed "
                   f"{row['worst_seed']}): {'meets' if met else 'misses'} a mean of {SKEWED_MEAN} with no seed below {SKEWED_WORST}")  # fmt: skip
    if {(f"{RECOMMENDED}-iid", "iid"), ("fedavg-iid", "iid")} <= set(rows.index):
        change = rows.loc[(f"{RECOMMENDED}-iid", "iid"), "test_auc"] - rows.loc[("fedavg-iid", "iid"), "test_auc"]
        out.append(f"{RECOMMENDED} on IID: {change:+.3f} against plain FedAvg ({'no loss' if change >= 0 else 'a loss'})")
    return out


def _merged(path: Path, new: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """The rows of an existing results file whose keys were not run this time, followed by the new rows."""
    if not path.exists():
        return new
    old = pd.read_csv(path)
    if new.empty:
        return old
    if not set(keys) <= set(old.columns):
        return new
    kept = old[~old.set_index(keys).index.isin(new.set_index(keys).index)]
    return pd.concat([kept, new], ignore_index=True)


def write(results: Path, runs: list[dict], sites: list[dict], curves: list[dict]) -> pd.DataFrame:
    """Write the CSVs (merged with the rows of earlier runs not repeated) and the plot; returns the summary table."""
    runs_df = _merged(results / "quality.csv", pd.DataFrame(runs), ["method", "split", "seed"])
    sites_df = pd.DataFrame(sites)
    old_sites = pd.read_csv(results / "quality-sites.csv") if (results / "quality-sites.csv").exists() else pd.DataFrame()
    if sites_df.empty:
        sites_df = old_sites
    else:
        sites_df = sites_df.groupby(["split", "seed", "hospital"], as_index=False).first()
        if not old_sites.empty:  # columns of methods not run this time are kept
            old = old_sites.set_index(["split", "seed", "hospital"])
            sites_df = sites_df.set_index(["split", "seed", "hospital"]).combine_first(old).reset_index()
    table = summary(runs_df, sites_df)
    runs_df.to_csv(results / "quality.csv", index=False, float_format="%.4f")
    sites_df.to_csv(results / "quality-sites.csv", index=False, float_format="%.4f")
    table.to_csv(results / "quality-summary.csv", index=False, float_format="%.4f")
    curves_df = _merged(results / "quality-rounds.csv", pd.DataFrame(curves), ["method", "split", "seed", "round"])
    if not curves_df.empty:
        curves_df.to_csv(results / "quality-rounds.csv", index=False, float_format="%.4f")
        plot(curves_df, results / "quality.png")
        plot_worst_seed(curves_df, runs_df, results / "quality-worst-seed.png")
    return table


if __name__ == "__main__":
    sys.exit(main())
