"""Plots a clinician reads: figures over rounds with the sites' spread, and each round's ROC, confusion and calibration."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from common.metrics import reliability, roc_from_histograms, score_histograms, to_probability  # noqa: E402


def plot_history(history: pd.DataFrame, sites: pd.DataFrame, path: Path) -> None:
    """AUC over rounds (pooled, held-out with its 95 % CI, the sites' range) and sensitivity/specificity."""
    fig, (ax_auc, ax_rates) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    r = history["round"]
    if len(sites):
        spread = sites.groupby("round")["auc"].agg(["min", "max"])
        ax_auc.fill_between(spread.index, spread["min"], spread["max"], color="tab:blue", alpha=0.15, label="range of the sites' own AUCs")
    ax_auc.plot(r, history["global_auc"], "o-", color="tab:blue", label="all sites' validation, pooled")
    ax_auc.plot(r, history["mean_site_auc"], ":", color="tab:blue", label="mean of the sites' AUCs")
    ax_auc.fill_between(r, history["heldout_auc_ci_low"], history["heldout_auc_ci_high"], color="tab:orange", alpha=0.2, label="held-out 95 % CI")
    ax_auc.plot(r, history["heldout_auc"], "s--", color="tab:orange", label="server's held-out set")
    ax_auc.set(title="ROC AUC of the global model", xlabel="round", ylabel="AUC", ylim=(0.4, 1.0))
    ax_rates.plot(r, history["global_sensitivity"], "o-", color="tab:red", label="sensitivity, pooled (run threshold)")
    ax_rates.plot(r, history["global_specificity"], "o-", color="tab:blue", label="specificity, pooled (run threshold)")
    if "heldout_sensitivity_at_threshold" in history:
        ax_rates.plot(r, history["heldout_sensitivity_at_threshold"], "s--", color="tab:red", alpha=0.6, label="sensitivity, held-out (operating point)")
        ax_rates.plot(r, history["heldout_specificity_at_threshold"], "s--", color="tab:blue", alpha=0.6, label="specificity, held-out (operating point)")
    ax_rates.set(title="Sensitivity and specificity", xlabel="round", ylabel="rate", ylim=(0.0, 1.02))
    best = history.loc[history["best"] == True, "round"]  # noqa: E712
    for ax in (ax_auc, ax_rates):
        if len(best):
            ax.axvline(best.iloc[-1], color="grey", lw=0.8, ls=":", label=f"best model (round {best.iloc[-1]})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_round(
    path: Path,
    title: str,
    labels: tuple[str, ...],
    pooled: tuple[np.ndarray, np.ndarray] | None,
    heldout: tuple[np.ndarray, np.ndarray],
    counts_at_threshold: np.ndarray | None,
    thresholds: np.ndarray | None,
    sites: list[dict],
    n_bins: int,
) -> None:
    """One round's report, a row per label: ROC curves, held-out confusion matrix at the operating point, reliability;
    and the sites' own AUCs. `pooled` is the summed (pos, neg) histograms; `heldout` is (logits, labels)."""
    n = len(labels)
    fig, axes = plt.subplots(n + 1, 3, figsize=(13, 4 * (n + 1)), constrained_layout=True, squeeze=False)
    logits, truth = heldout
    held_pos, held_neg = score_histograms(logits, truth, n_bins)
    for j, label in enumerate(labels):
        ax_roc, ax_cm, ax_rel = axes[j]
        if pooled is not None:
            ax_roc.plot(*roc_from_histograms(pooled[0][j], pooled[1][j]), color="tab:blue", label="sites' validation, pooled")
        ax_roc.plot(*roc_from_histograms(held_pos[j], held_neg[j]), "--", color="tab:orange", label="server's held-out set")
        ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.6)
        ax_roc.set(title=f"{label}: ROC curve", xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        ax_roc.legend(fontsize=8, loc="lower right")
        if counts_at_threshold is not None:
            tp, fp, tn, fn = counts_at_threshold[j]
            matrix = np.array([[tn, fp], [fn, tp]])
            ax_cm.imshow(matrix, cmap="Blues")
            for (y, x), v in np.ndenumerate(matrix):
                ax_cm.text(x, y, str(v), ha="center", va="center", fontsize=14, color="black" if v < matrix.max() / 2 else "white")
            ax_cm.set_xticks([0, 1], ["called negative", "called positive"])
            ax_cm.set_yticks([0, 1], ["no finding", "finding"])
            ax_cm.set_title(f"{label}: held-out at threshold {thresholds[j]:.3f}\n(chosen on pooled validation)", fontsize=10)
        else:
            ax_cm.axis("off")
        probabilities = to_probability(logits[:, j])
        predicted, observed, counts = reliability(probabilities, truth[:, j])
        shown = counts > 0
        ax_rel.plot([0, 1], [0, 1], color="grey", lw=0.6, label="perfect calibration")
        ax_rel.plot(predicted[shown], observed[shown], "o-", color="tab:orange", label="held-out")
        ax_rel.set(title=f"{label}: reliability (held-out)", xlabel="predicted probability", ylabel="observed share with finding", xlim=(0, 1), ylim=(0, 1))
        ax_rel.legend(fontsize=8, loc="upper left")
    ax_sites = axes[n][0]
    names = [s["site"] for s in sites]
    ax_sites.barh(names, [s["auc"] for s in sites], color="tab:blue")
    ax_sites.set(title="each site's own validation AUC", xlim=(0.4, 1.0), xlabel="AUC")
    for extra in axes[n][1:]:
        extra.axis("off")
    fig.suptitle(title)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overlay(image: np.ndarray, heat: np.ndarray, box: np.ndarray | None, scale: int = 4) -> Image.Image:
    """An RGB picture: the grayscale image (H, W, c) with the heatmap (H, W) over it in colour and the true box drawn."""
    gray = np.clip(image.mean(axis=-1), 0, 1)
    colour = matplotlib.colormaps["jet"](heat)[..., :3]  # (H, W, 3)
    alpha = 0.45 * heat[..., None]
    mixed = (1 - alpha) * gray[..., None] + alpha * colour
    picture = Image.fromarray((mixed * 255).astype(np.uint8)).resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST)
    if box is not None and not np.isnan(box).any():
        y0, x0, y1, x1 = (float(v) * scale for v in box)
        ImageDraw.Draw(picture).rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=2)
    return picture


def save_gradcam_pictures(folder: Path, title: str, images: np.ndarray, heat: np.ndarray, boxes: np.ndarray, cases: list, probabilities: np.ndarray) -> None:
    """One overlay per chosen case (true positives, false negatives, false positives) and one grid a clinician can scan."""
    folder.mkdir(parents=True, exist_ok=True)
    if not cases:
        return
    columns = 4
    rows = (len(cases) + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3.2 * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, kind) in zip(axes.flat, cases):
        picture = overlay(images[i], heat[i], boxes[i])
        picture.save(folder / f"{kind.replace(' ', '_')}_{i:04d}.png")
        ax.imshow(picture)
        ax.set_title(f"{kind}\np = {probabilities[i]:.2f}", fontsize=9)
    fig.suptitle(f"{title} (green: true box; colour: Grad-CAM)")
    fig.savefig(folder / "grid.png", dpi=80)
    plt.close(fig)
