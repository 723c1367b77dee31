"""Plots a clinician reads: figures over rounds with the sites' spread, each round's ROC, confusion and calibration, and
Grad-CAM pictures with their colour scale, probability and threshold. A figure that could not be computed is drawn as
a panel saying so and why, never as an empty legend."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.colors import Normalize  # noqa: E402
from PIL import Image, ImageDraw  # noqa: E402

from common.atomic import write_atomic  # noqa: E402
from common.metrics import reliability, roc_from_histograms, score_histograms, to_probability  # noqa: E402

HEATMAP = "jet"


def _save(fig: plt.Figure, path: Path, dpi: int) -> None:
    """Save a figure atomically and close it."""
    write_atomic(path, lambda p: fig.savefig(p, dpi=dpi))
    plt.close(fig)


def _note(ax: plt.Axes, text: str) -> None:
    """Write 'not available: why' across a panel that has nothing to draw."""
    ax.text(0.5, 0.5, text, ha="center", va="center", wrap=True, fontsize=9, color="dimgrey", transform=ax.transAxes)


def _legend(ax: plt.Axes, **options) -> None:
    """A legend only where something labelled was drawn."""
    if ax.get_legend_handles_labels()[0]:
        ax.legend(**options)


def _defined(series: pd.Series) -> bool:
    """True when a column has at least one number."""
    return bool(pd.to_numeric(series, errors="coerce").notna().any())


def _last_reason(history: pd.DataFrame, figure: str) -> str:
    """The latest recorded reason why a figure was not available ('' when none was recorded)."""
    for text in reversed(history.get("unavailable", pd.Series(dtype=str)).fillna("").astype(str).tolist()):
        for part in text.split("; "):
            if part.startswith(f"{figure}: "):
                return part.split(": ", 1)[1]
    return ""


def plot_history(history: pd.DataFrame, sites: pd.DataFrame, path: Path) -> None:
    """AUC over rounds (pooled with the range its intervals allow, held-out with its 95 % CI, the sites' own AUCs)
    and sensitivity/specificity."""
    fig, (ax_auc, ax_rates) = plt.subplots(1, 2, figsize=(12, 4.4), constrained_layout=True)
    r = history["round"]
    if len(sites) and _defined(sites["auc"]):
        spread = sites.groupby("round")["auc"].agg(["min", "max"])
        ax_auc.fill_between(spread.index, spread["min"], spread["max"], color="tab:green", alpha=0.12, label="range of the sites' own AUCs")
    if _defined(history["global_auc"]):
        if "global_auc_low" in history:
            ax_auc.fill_between(r, history["global_auc_low"], history["global_auc_high"], color="tab:blue", alpha=0.12, label="pooled: what the sites' bins allow")
        ax_auc.plot(r, history["global_auc"], "o-", color="tab:blue", label="all sites' validation, pooled")
    if _defined(history["mean_site_auc"]):
        ax_auc.plot(r, history["mean_site_auc"], ":", color="tab:blue", label="mean of the sites' AUCs")
    if _defined(history["heldout_auc"]):
        ax_auc.fill_between(r, history["heldout_auc_ci_low"], history["heldout_auc_ci_high"], color="tab:orange", alpha=0.2, label="held-out 95 % CI")
        ax_auc.plot(r, history["heldout_auc"], "s--", color="tab:orange", label="server's held-out set")
    missing = [f"{name} AUC not available: {why}" for name, figure in (("pooled validation", "global_auc"), ("held-out", "heldout_auc"))
               if not _defined(history[figure]) and (why := _last_reason(history, figure) or "no round computed it")]  # fmt: skip
    if missing:
        _note(ax_auc, "\n".join(missing))
    ax_auc.set(title="ROC AUC of the global model", xlabel="round", ylabel="AUC", ylim=(0.4, 1.0))
    for column, colour, style, label in (
        ("global_sensitivity", "tab:red", "o-", "sensitivity, pooled (run threshold)"),
        ("global_specificity", "tab:blue", "o-", "specificity, pooled (run threshold)"),
        ("heldout_sensitivity_at_threshold", "tab:red", "s--", "sensitivity, held-out (operating point)"),
        ("heldout_specificity_at_threshold", "tab:blue", "s--", "specificity, held-out (operating point)"),
    ):
        if column in history and _defined(history[column]):
            ax_rates.plot(r, history[column], style, color=colour, alpha=1.0 if style == "o-" else 0.6, label=label)
    if not ax_rates.get_lines():
        _note(ax_rates, "sensitivity and specificity not available: no hospital validated and no operating point yet")
    ax_rates.set(title="Sensitivity and specificity", xlabel="round", ylabel="rate", ylim=(0.0, 1.02))
    best = history.loc[history["best"] == True, "round"]  # noqa: E712
    for ax in (ax_auc, ax_rates):
        if len(best):
            ax.axvline(best.iloc[-1], color="grey", lw=0.8, ls=":", label=f"best model (round {best.iloc[-1]})")
        ax.grid(alpha=0.3)
        _legend(ax, fontsize=7.5, loc="lower right")
        ax.xaxis.get_major_locator().set_params(integer=True)
    _save(fig, path, 110)


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
    unavailable: dict[str, str],
) -> None:
    """One round's report, a row per label: ROC curves, held-out confusion matrix at the operating point, reliability;
    and the sites' own AUCs. `pooled` is the pooled (pos, neg) histograms; `heldout` is (logits, labels); `unavailable`
    says why a figure is missing."""
    n = len(labels)
    fig = plt.figure(figsize=(13, 4 * n + 0.6 + 0.35 * max(3, len(sites))), constrained_layout=True)
    grid = fig.add_gridspec(n + 1, 3, height_ratios=[4] * n + [0.6 + 0.35 * max(3, len(sites))])
    axes = [[fig.add_subplot(grid[j, k]) for k in range(3)] for j in range(n)]
    ax_sites = fig.add_subplot(grid[n, :])
    logits, truth = heldout
    held_pos, held_neg = score_histograms(logits, truth, n_bins)
    for j, label in enumerate(labels):
        ax_roc, ax_cm, ax_rel = axes[j]
        notes = []
        if pooled is not None and "global_auc" not in unavailable:
            ax_roc.plot(*roc_from_histograms(pooled[0][j], pooled[1][j]), color="tab:blue", label="sites' validation, pooled")
        else:
            notes.append(f"pooled validation ROC not available: {unavailable.get('global_auc', 'no hospital validated')}")
        if held_pos[j].sum() and held_neg[j].sum():
            ax_roc.plot(*roc_from_histograms(held_pos[j], held_neg[j]), "--", color="tab:orange", label="server's held-out set")
        else:
            notes.append(f"held-out ROC not available: {unavailable.get('heldout_auc', 'one class only')}")
        ax_roc.plot([0, 1], [0, 1], color="grey", lw=0.6)
        if notes:
            _note(ax_roc, "\n".join(notes))
        ax_roc.set(title=f"{label}: ROC curve", xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01))
        _legend(ax_roc, fontsize=8, loc="lower right")
        if counts_at_threshold is not None and thresholds is not None and not np.isnan(thresholds[j]):
            tp, fp, tn, fn = counts_at_threshold[j]
            matrix = np.array([[tn, fp], [fn, tp]])
            ax_cm.imshow(matrix, cmap="Blues")
            for (y, x), v in np.ndenumerate(matrix):
                ax_cm.text(x, y, str(v), ha="center", va="center", fontsize=14, color="black" if v < matrix.max() / 2 else "white")
            ax_cm.set_xticks([0, 1], ["called negative", "called positive"])
            ax_cm.set_yticks([0, 1], ["no finding", "finding"])
            ax_cm.set_title(f"{label}: held-out at threshold {thresholds[j]:.3f}\n(chosen on pooled validation)", fontsize=10)
        else:
            ax_cm.set(xticks=[], yticks=[], title=f"{label}: held-out confusion matrix")
            why = unavailable.get("threshold_at_target_sensitivity", "no operating point before the hospitals validate")
            _note(ax_cm, f"not available: no operating point ({why})")
        probabilities = to_probability(logits[:, j])
        predicted, observed, counts = reliability(probabilities, truth[:, j])
        shown = counts > 0
        ax_rel.plot([0, 1], [0, 1], color="grey", lw=0.6, label="perfect calibration")
        ax_rel.plot(predicted[shown], observed[shown], "o-", color="tab:orange", label="held-out")
        ax_rel.set(title=f"{label}: reliability (held-out)", xlabel="predicted probability", ylabel="observed share with finding", xlim=(0, 1), ylim=(0, 1))
        if not np.isfinite(probabilities).all():
            _note(ax_rel, f"{int((~np.isfinite(probabilities)).sum())} of {len(probabilities)} held-out scores are not finite: left out")
        _legend(ax_rel, fontsize=8, loc="upper left")
    if sites:
        names = [s["site"] for s in sites]
        aucs = np.array([s["auc"] for s in sites], float)
        ax_sites.barh(names, np.nan_to_num(aucs, nan=0.0), color="tab:blue")
        for y, (auc, site) in enumerate(zip(aucs, sites)):
            text = f"{auc:.3f}" if not np.isnan(auc) else f"not available: {site.get('note', '').split(': ', 2)[-1] or 'undefined'}"
            ax_sites.text(0.405 if np.isnan(auc) else max(auc, 0.4) + 0.004, y, text, va="center", fontsize=8, color="dimgrey")
    else:
        _note(ax_sites, "no hospital validated this round")
    ax_sites.set(title="each site's own validation AUC", xlim=(0.4, 1.07), xlabel="AUC", xticks=np.arange(0.4, 1.01, 0.1))
    fig.suptitle(title)
    _save(fig, path, 90)


def threshold_digits(threshold: float) -> int:
    """Decimals that show a threshold as what it is: at least 2, and enough that it does not round to 0 or 1."""
    digits = 2
    while digits < 7 and not 0 < round(threshold, digits) < 1:
        digits += 1
    return digits


def describe_call(probability: float, threshold: float) -> str:
    """'p = 0.83 >= 0.50' or 'p = 0.99937 < 0.99950': both with as many decimals as it takes for the threshold to show
    as itself and for the shown numbers to agree with the call (rounding never makes a probability below the
    threshold look equal to it or above it)."""
    called = probability >= threshold
    for digits in range(threshold_digits(threshold), 8):
        p, t = round(probability, digits), round(threshold, digits)
        if (p >= t) == called and p != t:
            break
    return f"p = {probability:.{digits}f} {'>=' if called else '<'} {threshold:.{digits}f}"


def overlay(image: np.ndarray, heat: np.ndarray, box: np.ndarray | None, scale: int = 4) -> Image.Image:
    """An RGB picture: the grayscale image (H, W, c) with the heatmap (H, W) over it in colour and the true box drawn."""
    gray = np.clip(image.mean(axis=-1), 0, 1)
    colour = matplotlib.colormaps[HEATMAP](heat)[..., :3]  # (H, W, 3)
    alpha = 0.45 * heat[..., None]
    mixed = (1 - alpha) * gray[..., None] + alpha * colour
    picture = Image.fromarray((mixed * 255).astype(np.uint8)).resize((gray.shape[1] * scale, gray.shape[0] * scale), Image.NEAREST)
    if box is not None and not np.isnan(box).any():
        y0, x0, y1, x1 = (float(v) * scale for v in box)
        ImageDraw.Draw(picture).rectangle([x0, y0, x1, y1], outline=(0, 255, 0), width=2)
    return picture


def _colour_scale(fig: plt.Figure, axes) -> None:
    """The heatmap's colour bar, in words."""
    bar = fig.colorbar(plt.cm.ScalarMappable(Normalize(0, 1), HEATMAP), ax=axes, shrink=0.6, pad=0.02)
    bar.set_label("Grad-CAM weight: 0 = none, 1 = the image's strongest", fontsize=8)


def explained_picture(path: Path, image: np.ndarray, heat: np.ndarray, caption: str) -> None:
    """One image with its Grad-CAM heatmap, the colour scale, and a caption (probability, threshold, call)."""
    fig, ax = plt.subplots(figsize=(4.2, 4.0), constrained_layout=True)
    ax.imshow(overlay(image, heat, None))
    ax.axis("off")
    ax.set_title(caption, fontsize=9)
    _colour_scale(fig, ax)
    _save(fig, path, 100)


def save_gradcam_pictures(
    folder: Path, title: str, images: np.ndarray, heat: np.ndarray, boxes: np.ndarray, cases: list, probabilities: np.ndarray,
    threshold: float, found: dict[str, int],
) -> None:  # fmt: skip
    """One overlay per chosen case (true positives, false negatives, false positives) and one grid a clinician can
    scan, with the colour scale, each image's probability against the threshold it was called at, and how many cases
    of each kind the sample holds (the grid shows a few)."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = ", ".join(f"{sum(kind == k for _, kind in cases)} of {n} {k}s" for k, n in found.items())
    columns = 4
    rows = max(1, (len(cases) + columns - 1) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns + 1, 3.3 * rows + 0.6), squeeze=False, constrained_layout=True)
    for ax in axes.flat:
        ax.axis("off")
    boxed = False
    for ax, (i, kind) in zip(axes.flat, cases):
        picture = overlay(images[i], heat[i], boxes[i])
        boxed |= not np.isnan(boxes[i]).any()
        write_atomic(folder / f"{kind.replace(' ', '_')}_{i:04d}.png", picture.save)
        ax.imshow(picture)
        ax.set_title(f"{kind}\n{describe_call(probabilities[i], threshold)}", fontsize=9)
    if not cases:
        _note(axes.flat[0], "no image of the sample is a true positive, false negative or false positive")
    _colour_scale(fig, axes)
    legend = "green box: the lesion's true outline; " if boxed else ""
    fig.suptitle(f"{title}\nshown: {counts}; {legend}called positive at p >= {threshold:.{threshold_digits(threshold)}f}", fontsize=10)
    _save(fig, folder / "grid.png", 80)
