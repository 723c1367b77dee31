"""The data check a hospital runs before it joins (and the launchers run on every site file before training): read every
file as training would and report what was found, never stopping at the first problem."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from common.config import RunConfig
from common.errors import ConfigError, DataError
from common.scan import IMAGE, NOT_AN_IMAGE, UNREADABLE
from common.site_data import LEFT_OUT_COLUMNS, SiteData, npz_site, read_site, split_files
from common.site_file import SiteConfig, load_site_config
from common.site_index import SiteFiles

FIT_WORDS = {"pad": "padded with black to a square", "crop": "cut to their central square", "stretch": "stretched to a square"}


@dataclass(frozen=True)
class CheckReport:
    """The data check's findings: the report's lines, and the problems that would stop the site from training."""

    lines: list[str]
    blocking: list[str]
    warnings: list[str]


def _counts_table(train: np.ndarray, val: np.ndarray, run_labels: tuple[str, ...]) -> list[str]:
    """Images per label and split (labels (n, n_labels) of each), positives and negatives, as aligned text lines."""
    width = max(8, *map(len, run_labels))
    lines = [f"  {'label':<{width}}  {'train +':>8}  {'train -':>8}  {'val +':>8}  {'val -':>8}"]
    for j, name in enumerate(run_labels):
        t, v = train[:, j], val[:, j]
        lines.append(f"  {name:<{width}}  {int(t.sum()):>8}  {int((t == 0).sum()):>8}  {int(v.sum()):>8}  {int((v == 0).sum()):>8}")
    return lines


def _spread(table: pd.DataFrame, fit: str) -> list[str]:
    """The spread of image sizes and modes among the images, and what happens to those that are not square."""
    sizes = (table["width"].astype(str) + "x" + table["height"].astype(str)).value_counts()
    modes = table["mode"].value_counts()
    shown = ", ".join(f"{k} ({v})" for k, v in sizes.head(6).items()) + (f", and {len(sizes) - 6} other sizes" if len(sizes) > 6 else "")
    oblong = int((table["width"] != table["height"]).sum())
    return [
        f"Image sizes (width x height): {shown}; widths {table['width'].min()}-{table['width'].max()}, heights {table['height'].min()}-{table['height'].max()}",
        f"Not square: {oblong} image(s)" + (f"; they will be {FIT_WORDS[fit]} (image-fit: {fit})" if oblong else ""),
        f"Modes: {', '.join(f'{k} ({v})' for k, v in modes.items())}",
    ]


def _duplicates(files: SiteFiles, table: pd.DataFrame, val_rows: np.ndarray) -> tuple[list[str], list[str]]:
    """Report lines on exact duplicates (same bytes) and the warnings they raise: conflicting labels, copies on both
    sides of the split (val_rows: the validation files' rows of the table)."""
    images = table[table["kind"] == IMAGE]
    groups = [rows.tolist() for _, rows in images.groupby("sha256").groups.items() if len(rows) > 1]
    if not groups:
        return ["Exact duplicates: none"], []
    lines, warnings = [f"Exact duplicates: {len(groups)} group(s), {sum(map(len, groups))} files"], []
    for rows in groups[:10]:
        lines.append("  " + " = ".join(files.paths[r] for r in rows))
    conflicting = [g for g in groups if len({files.labels[r].tobytes() for r in g}) > 1]
    if conflicting:
        warnings.append(f"{len(conflicting)} duplicate group(s) carry different labels for the same image, e.g. {files.paths[conflicting[0][0]]}")
    val = set(val_rows.tolist())
    if any(0 < len(set(g) & val) < len(g) for g in groups):
        warnings.append("exact duplicates fall on both sides of the train/validation split: validation figures will flatter the model")
    return lines, warnings


def _files_report(site: SiteConfig, table: pd.DataFrame) -> tuple[list[str], list[str], list[str]]:
    """Lines, blocking problems and warnings about the files themselves: what each kind counts, and every file left out."""
    kinds = table["kind"].value_counts()
    lines = [f"Files: {len(table)} found, {kinds.get(IMAGE, 0)} images, {kinds.get(NOT_AN_IMAGE, 0)} holding no image, {kinds.get(UNREADABLE, 0)} unreadable"]
    for kind in (NOT_AN_IMAGE, UNREADABLE):
        lines += [f"  {kind}: {path}: {reason}" for path, reason in zip(*table.loc[table["kind"] == kind, ["path", "reason"]].T.values)]
    warned = table[table["warnings"] != ""]
    lines += [f"  decoder warning: {path}: {text}" for path, text in zip(warned["path"], warned["warnings"])]
    blocking, warnings = [], []
    if kinds.get(NOT_AN_IMAGE, 0):
        warnings.append(f"{kinds[NOT_AN_IMAGE]} file(s) hold no image (listed above): they are left out and counted")
    if kinds.get(UNREADABLE, 0):
        (warnings if site.skip_unreadable else blocking).append(
            f"{kinds[UNREADABLE]} unreadable file(s)" + (" will be skipped (skip-unreadable: true)" if site.skip_unreadable else "; fix or remove them, or set skip-unreadable: true")
        )
    if len(warned):
        warnings.append(f"the decoder warned about {len(warned)} file(s) (listed above)")
    return lines, blocking, warnings


def check_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> CheckReport:
    """Read every file of a site as training would and report what was found; never stops at the first problem."""
    import tensorflow as tf  # only the model-input check needs TensorFlow

    from common.pipeline import dataset

    fit = site.image_fit or cfg.image_fit
    lines = [f"Data check: site {site.name!r} ({site.path})", f"Layout: {site.layout} under {site.data_root}",
             f"Run: labels {', '.join(cfg.labels)}; model input {cfg.image_size}x{cfg.image_size}x{cfg.channels}"]  # fmt: skip
    blocking: list[str] = []
    warnings: list[str] = []
    try:
        if site.layout == "npz":
            data, files = npz_site(site, cfg), None
        else:
            files, table = read_site(site, cfg, progress)
    except (DataError, ConfigError) as exc:
        return CheckReport(lines + [f"ERROR: {exc}"], [str(exc)], [])
    if files is not None:
        more, blocking, warnings = _files_report(site, table)
        lines += more
        images = np.flatnonzero((table["kind"] == IMAGE).to_numpy())
        if len(images) < 2:
            blocking.append(f"{len(images)} readable image(s): a site needs at least two")
            return CheckReport(lines, blocking, warnings)
        kept = files.take(images)
        try:
            train, val = split_files(kept, site)
        except DataError as exc:
            blocking.append(str(exc))
            return CheckReport(lines + [f"ERROR: {exc}"], blocking, warnings)
        data = SiteData(site.name, kept.take(train), kept.take(val), table.loc[table["kind"] != IMAGE, LEFT_OUT_COLUMNS], fit)
        lines += _spread(table.iloc[images], fit)
        known = kept.patients != ""
        source = f"column {site.patient_column!r}" if site.patient_column else "the DICOM files' PatientID"
        if known.any():
            both = set(kept.patients[train][known[train]]) & set(kept.patients[val][known[val]])
            lines.append(f"Patients: {len(set(kept.patients[known]))} (from {source}); {len(both)} in both splits; {int((~known).sum())} images without a patient ID")
            if both:
                blocking.append(f"{len(both)} patient(s) in both splits")
        else:
            lines.append("Patients: no patient IDs (no patient column, no DICOM PatientID): the split is per image")
        if site.source_column or site.source_subfolders:
            origins = pd.Series(kept.sources).value_counts()
            lines.append(f"Source hospitals: {', '.join(f'{k} ({v})' for k, v in origins.items())}")
        dup_lines, dup_warnings = _duplicates(files, table, images[val])
        lines += dup_lines
        warnings += dup_warnings
    lines.append("Images per label and split (+ positive, - negative):")
    lines += _counts_table(data.train.labels, data.val.labels, cfg.labels)
    if len(data.train) == 0 or len(data.val) == 0:
        blocking.append("an empty training or validation split")
        return CheckReport(lines, blocking, warnings)
    for j, name in enumerate(cfg.labels):
        if data.val.labels[:, j].min() == data.val.labels[:, j].max():
            warnings.append(f"label {name!r}: the validation split has only {'positives' if data.val.labels[0, j] else 'negatives'}; the site's own AUC is undefined")
    batch = next(iter(dataset(data.val, cfg, training=False, dicom=site.dicom, fit=fit).take(1)))[0]
    lines.append(
        f"Model input: batches of {tuple(batch.shape[1:])} {batch.dtype.name}, values {float(tf.reduce_min(batch)):.3f} to "
        f"{float(tf.reduce_max(batch)):.3f} (first validation batch of {batch.shape[0]})"
    )
    aug = site.augmentation
    lines.append(
        "Augmentation (training only): " + (", ".join(f"{f.name.replace('_', '-')} {getattr(aug, f.name)}" for f in dataclasses.fields(aug) if getattr(aug, f.name)) or "off")
        + ("" if aug.horizontal_flip else "; horizontal flips off")
    )
    return CheckReport(lines, blocking, warnings)


def require_ready(paths: list[str], cfg: RunConfig, say: Callable[[str], None]) -> None:
    """Run the data check on every site file a run names (its hospitals' and its held-out site) before anything
    trains; one line per site, and a DataError naming each site that is NOT READY and why."""
    refused = []
    for path in dict.fromkeys(p for p in paths if p):
        try:
            site = load_site_config(path)
        except ConfigError as exc:
            refused.append(str(exc))
            continue
        report = check_site(site, cfg)
        if report.blocking:
            refused.append(f"site {site.name!r} ({site.path}) is NOT READY: {'; '.join(report.blocking)}")
            continue
        warned = f"; {len(report.warnings)} warning(s): {'; '.join(report.warnings)}" if report.warnings else ""
        say(f"data check: site {site.name!r} ready{warned}")
    if refused:
        raise DataError(" | ".join(refused) + " (run `python -m client.check_data <site file>` for the full report)")
