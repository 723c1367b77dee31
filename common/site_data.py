"""A hospital's own images, as its site file describes them: find and label the files, read every one once, split by
patient, and report what was found (the data check a hospital runs before it joins)."""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from common.config import ConfigError, RunConfig, SiteConfig, load_site_config, site_label_sources
from common.data import DataError, ImageSet, load_npz_split, patient_split, read_image, stratified_split, to_model_input
from common.partition import heldout_set, hospital_data

IGNORED_FILES = ("Thumbs.db", "desktop.ini")  # operating-system clutter in exported folders; hidden files are ignored too
MAX_LISTED = 10  # unreadable files named in an error; the data check lists them all


@dataclass(frozen=True)
class SiteFiles:
    """A site's image files with their labels and patient IDs."""

    paths: np.ndarray  # (n,) str, absolute
    labels: np.ndarray  # (n, n_labels) uint8, 0/1
    patients: np.ndarray  # (n,) str; '' where unknown

    def __len__(self) -> int:
        """Number of files."""
        return len(self.paths)

    def take(self, rows: np.ndarray) -> SiteFiles:
        """The subset at the given row indices."""
        return SiteFiles(self.paths[rows], self.labels[rows], self.patients[rows])


@dataclass(frozen=True)
class SiteData:
    """A site's training and validation data, ready for the pipeline, with what was left out and why."""

    name: str
    train: SiteFiles | ImageSet
    val: SiteFiles | ImageSet
    unreadable: pd.DataFrame  # columns path, reason: files skipped under skip-unreadable (empty otherwise)


def _visible_files(folder: Path) -> list[Path]:
    """Every file under a folder, recursively, sorted, without hidden files and operating-system clutter."""
    return sorted(
        p for p in folder.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts) and p.name not in IGNORED_FILES
    )  # fmt: skip


def _folder_index(site: SiteConfig, sources: dict[str, str]) -> SiteFiles:
    """Class folders: a folder per label (its images have that label only) and folders of images without a finding."""
    found = sorted(p.name for p in site.data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
    mapped = list(sources.values()) + list(site.negative_folders)
    unmapped = sorted(set(found) - set(mapped))
    if unmapped:
        raise DataError(
            f"{site.data_root}: folder(s) {', '.join(unmapped)} are not mapped to a label; name them under 'labels' or "
            f"'negative-folders' in {site.path.name}, or move them out of the data root"
        )
    paths, labels = [], []
    for folder in mapped:
        if folder not in found:
            raise DataError(f"{site.data_root}: no folder {folder!r} (named in {site.path.name}); folders found: {', '.join(found) or 'none'}")
        files = _visible_files(site.data_root / folder)
        if not files:
            raise DataError(f"{site.data_root / folder}: empty class folder: no image files")
        row = np.array([int(sources[label] == folder) for label in sources], np.uint8)
        paths += [str(p) for p in files]
        labels += [row] * len(files)
    return SiteFiles(np.array(paths), np.array(labels, np.uint8).reshape(-1, len(sources)), np.full(len(paths), "", dtype=object))


def _manifest_index(site: SiteConfig, sources: dict[str, str]) -> SiteFiles:
    """A CSV manifest: an image-path column, one 0/1 column per label, optionally a patient-ID column."""
    try:
        table = pd.read_csv(site.manifest, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{site.manifest}: not a readable CSV file ({exc})") from exc
    wanted = [site.image_column, *sources.values()] + ([site.patient_column] if site.patient_column else [])
    missing = [c for c in wanted if c not in table.columns]
    if missing:
        raise DataError(f"{site.manifest}: missing column(s) {', '.join(map(repr, missing))}; columns found: {', '.join(map(repr, table.columns))}")
    if table.empty:
        raise DataError(f"{site.manifest}: no rows")
    labels = np.zeros((len(table), len(sources)), np.uint8)
    for j, column in enumerate(sources.values()):
        values = table[column].str.strip()
        bad = ~values.isin(["0", "1", "0.0", "1.0"])
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataError(
                f"{site.manifest}: column {column!r} holds {values.iloc[row]!r} on line {row + 2} ({int(bad.sum())} such row(s)); expected 0 or 1"
            )
        labels[:, j] = values.isin(["1", "1.0"])
    paths = np.array([str((site.data_root / p.strip()).resolve()) for p in table[site.image_column]])
    patients = table[site.patient_column].str.strip().to_numpy(object) if site.patient_column else np.full(len(table), "", dtype=object)
    return SiteFiles(paths, labels, patients)


def index_site(site: SiteConfig, run_labels: tuple[str, ...]) -> SiteFiles:
    """The site's files with their labels, from class folders or a manifest; DataError or ConfigError says what is wrong."""
    sources = site_label_sources(site, run_labels)
    if site.layout == "folders":
        return _folder_index(site, sources)
    if site.layout == "manifest":
        return _manifest_index(site, sources)
    raise ConfigError(f"site file {site.path}: layout {site.layout!r} has no files to index")


def _inspect(path: str, site: SiteConfig, channels: int) -> dict:
    """Read one file: whether it decodes (and why not), its size, mode, patient ID and content hash."""
    try:
        pixels, mode, patient = read_image(path, channels, site.dicom)
    except DataError as exc:
        return {"path": path, "ok": False, "reason": str(exc).removeprefix(f"{path}: "), "height": 0, "width": 0, "mode": "", "patient_in_file": "", "sha256": ""}
    digest = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    h, w = pixels.shape[:2]
    return {"path": path, "ok": True, "reason": "", "height": h, "width": w, "mode": mode, "patient_in_file": patient, "sha256": digest}


def scan_files(files: SiteFiles, site: SiteConfig, channels: int, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Read every file once, in parallel: one row per file (path, ok, reason, height, width, mode, patient_in_file, sha256)."""
    workers = min(8, os.cpu_count() or 1)
    rows, start, step = [], time.monotonic(), max(1, len(files) // 10)
    with ThreadPoolExecutor(workers) as pool:
        for i, row in enumerate(pool.map(lambda p: _inspect(p, site, channels), files.paths), start=1):
            rows.append(row)
            if progress is not None and (i % step == 0 or i == len(files)) and len(files) >= 200:
                eta = (time.monotonic() - start) / i * (len(files) - i)
                progress(f"{site.name}: read {i} of {len(files)} files, ETA {eta:.0f} s")
    return pd.DataFrame(rows, columns=["path", "ok", "reason", "height", "width", "mode", "patient_in_file", "sha256"])


SCAN_CACHE = "scan-cache.csv"


def _stamp(path: str) -> str:
    """A file's size and modification time, or '' when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def _scan_with_cache(files: SiteFiles, site: SiteConfig, channels: int, progress: Callable[[str], None] | None) -> pd.DataFrame:
    """scan_files, reading again only the files changed since the last scan (size or modification time) and kept in
    the site's report-dir: in deployment each message runs in a new process, and a large site must not be re-read each time."""
    cache = site.report_dir / SCAN_CACHE if site.report_dir is not None else None
    stamps = np.array([_stamp(p) for p in files.paths], dtype=object)
    key = f"{channels}:{site.dicom}"  # what the decoded result depends on besides the file
    known = pd.DataFrame()
    if cache is not None and cache.is_file():
        known = pd.read_csv(cache, dtype=str, keep_default_na=False)
        known = known[known["key"] == key].drop_duplicates("path", keep="last").set_index("path")
    reuse = np.array([p in known.index and s != "" and known.at[p, "stamp"] == s for p, s in zip(files.paths, stamps)], bool)
    fresh = scan_files(files.take(np.flatnonzero(~reuse)), site, channels, progress)
    table = fresh
    if reuse.any():
        old = known.loc[np.unique(files.paths[reuse])].reset_index()[fresh.columns]
        table = pd.concat([fresh, old.assign(ok=old["ok"] == "True")])  # the cache holds text: 'False' would read as true
    table = table.drop_duplicates("path").set_index("path").loc[files.paths].reset_index()
    table = table.astype({"ok": bool, "height": int, "width": int})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        table.assign(stamp=stamps, key=key).to_csv(cache, index=False)
    return table


def _unreadable_error(site: SiteConfig, bad: pd.DataFrame) -> DataError:
    """The refusal to start when files do not read and skip-unreadable is off, naming them."""
    listed = "; ".join(f"{p}: {r}" for p, r in zip(bad["path"][:MAX_LISTED], bad["reason"][:MAX_LISTED]))
    more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    return DataError(
        f"site {site.name!r}: {len(bad)} file(s) cannot be read: {listed}{more}. Fix or remove them, or set "
        f"'skip-unreadable: true' in {site.path.name} to train without them (they are then listed in the site's report)"
    )


def _readable(site: SiteConfig, files: SiteFiles, table: pd.DataFrame) -> tuple[SiteFiles, pd.DataFrame]:
    """The files that read, and the (path, reason) of those that did not; refuses unless the site skips unreadable files."""
    bad = table[~table["ok"]]
    if len(bad) and not site.skip_unreadable:
        raise _unreadable_error(site, bad)
    return files.take(np.flatnonzero(table["ok"].to_numpy())), bad[["path", "reason"]].reset_index(drop=True)


def _split(files: SiteFiles, site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: by patient where any patient ID is known, else stratified by label."""
    if (files.patients != "").any():
        return patient_split(files.labels, files.patients, site.val_fraction, site.seed)
    return stratified_split(files.labels, site.val_fraction, site.seed)


def _npz_site(site: SiteConfig, cfg: RunConfig) -> SiteData:
    """A site whose images sit in a MedMNIST-style .npz (train and val arrays), split by the site's own seed."""
    parts = [load_npz_split(site.npz, split, len(cfg.labels)) for split in ("train", "val")]
    images = to_model_input(np.concatenate([p[0] for p in parts]), cfg.image_size, cfg.channels)
    labels = np.concatenate([p[1] for p in parts])
    local = ImageSet(images, labels, np.full((len(labels), len(cfg.labels), 4), np.nan, np.float32), np.full(len(labels), -1, np.int16))
    train, val = stratified_split(labels, site.val_fraction, site.seed)
    return SiteData(site.name, local.take(train), local.take(val), pd.DataFrame(columns=["path", "reason"]))


def read_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> tuple[SiteFiles, pd.DataFrame]:
    """The site's indexed files and the scan of every one of them, with DICOM patient IDs filled in where the manifest has none."""
    files = index_site(site, cfg.labels)
    table = _scan_with_cache(files, site, cfg.channels, progress)
    from_files = table["patient_in_file"].to_numpy(object)
    patients = np.where(files.patients != "", files.patients, from_files)
    return SiteFiles(files.paths, files.labels, patients), table


def load_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> SiteData:
    """The site's (train, validation) data after reading every file once; refuses to start on unreadable files unless
    the site skips them, and on a site left without images."""
    if site.layout == "npz":
        return _npz_site(site, cfg)
    files, bad = _readable(site, *read_site(site, cfg, progress))
    if len(files) < 2:
        raise DataError(f"site {site.name!r}: {len(files)} readable image(s) under {site.data_root}: a site needs at least two to train and validate")
    train, val = _split(files, site)
    return SiteData(site.name, files.take(train), files.take(val), bad)


def _heldout_from_site(site: SiteConfig, cfg: RunConfig) -> ImageSet:
    """Every readable image of a site, in memory at the model's input size (no boxes, source unknown)."""
    if site.layout == "npz":
        data = _npz_site(site, cfg)
        return data.train.join(data.val)
    files, _ = _readable(site, *read_site(site, cfg))
    images = np.stack([to_model_input(read_image(p, cfg.channels, site.dicom)[0][None], cfg.image_size, cfg.channels)[0] for p in files.paths])
    n = len(files)
    return ImageSet(images, files.labels, np.full((n, len(cfg.labels), 4), np.nan, np.float32), np.full(n, -1, np.int16))


def server_heldout(cfg: RunConfig) -> ImageSet:
    """The server's held-out set: every image of the run's held-out site file, else the built-in or .npz test images."""
    return _heldout_from_site(load_site_config(cfg.heldout_site), cfg) if cfg.heldout_site else heldout_set(cfg)


def hospital_site(cfg: RunConfig, node_config: dict) -> tuple[SiteData, SiteConfig | None]:
    """This client's data and site file: the site file its node names ('site-config', in deployment), else the run's
    site file for its partition, else a simulated hospital's share of the run's data."""
    path = node_config.get("site-config") or (cfg.sites[int(node_config["partition-id"])] if cfg.sites else "")
    if path:
        site = load_site_config(path)
        return load_site(site, cfg, progress=lambda line: print(line, flush=True)), site
    hospital = int(node_config["partition-id"])
    train, val = hospital_data(cfg, hospital)
    return SiteData(f"hospital-{hospital}", train, val, pd.DataFrame(columns=["path", "reason"])), None


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


def _spread(table: pd.DataFrame) -> list[str]:
    """The spread of image sizes and modes among the readable files."""
    sizes = (table["width"].astype(str) + "x" + table["height"].astype(str)).value_counts()
    modes = table["mode"].value_counts()
    shown = ", ".join(f"{k} ({v})" for k, v in sizes.head(6).items()) + (f", and {len(sizes) - 6} other sizes" if len(sizes) > 6 else "")
    return [
        f"Image sizes (width x height): {shown}; widths {table['width'].min()}-{table['width'].max()}, heights {table['height'].min()}-{table['height'].max()}",
        f"Modes: {', '.join(f'{k} ({v})' for k, v in modes.items())}",
    ]


def _duplicates(files: SiteFiles, table: pd.DataFrame, val_rows: np.ndarray) -> tuple[list[str], list[str]]:
    """Report lines on exact duplicates (same bytes) and the warnings they raise: conflicting labels, copies on both
    sides of the split (val_rows: the validation files' rows of the table)."""
    ok = table[table["ok"]]
    groups = [rows.tolist() for _, rows in ok.groupby("sha256").groups.items() if len(rows) > 1]
    if not groups:
        return ["Exact duplicates: none"], []
    lines, warnings = [f"Exact duplicates: {len(groups)} group(s), {sum(map(len, groups))} files"], []
    for rows in groups[:MAX_LISTED]:
        lines.append("  " + " = ".join(files.paths[r] for r in rows))
    conflicting = [g for g in groups if len({files.labels[r].tobytes() for r in g}) > 1]
    if conflicting:
        warnings.append(f"{len(conflicting)} duplicate group(s) carry different labels for the same image, e.g. {files.paths[conflicting[0][0]]}")
    val = set(val_rows.tolist())
    if any(0 < len(set(g) & val) < len(g) for g in groups):
        warnings.append("exact duplicates fall on both sides of the train/validation split: validation figures will flatter the model")
    return lines, warnings


def check_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> CheckReport:
    """Read every file of a site as training would and report what was found; never stops at the first problem."""
    import tensorflow as tf  # only the model-input check needs TensorFlow

    from common.pipeline import dataset

    lines = [f"Data check: site {site.name!r} ({site.path})", f"Layout: {site.layout} under {site.data_root}",
             f"Run: labels {', '.join(cfg.labels)}; model input {cfg.image_size}x{cfg.image_size}x{cfg.channels}"]  # fmt: skip
    blocking: list[str] = []
    warnings: list[str] = []
    try:
        if site.layout == "npz":
            data, files = _npz_site(site, cfg), None
        else:
            files, table = read_site(site, cfg, progress)
    except (DataError, ConfigError) as exc:
        return CheckReport(lines + [f"ERROR: {exc}"], [str(exc)], [])
    if files is not None:
        bad = table[~table["ok"]]
        lines.append(f"Files: {len(table)} found, {len(table) - len(bad)} readable, {len(bad)} unreadable")
        for path, reason in zip(bad["path"], bad["reason"]):
            lines.append(f"  unreadable: {path}: {reason}")
        if len(bad):
            (warnings if site.skip_unreadable else blocking).append(
                f"{len(bad)} unreadable file(s)" + (" will be skipped (skip-unreadable: true)" if site.skip_unreadable else "; fix or remove them, or set skip-unreadable: true")
            )
        readable = np.flatnonzero(table["ok"].to_numpy())
        if len(readable) < 2:
            blocking.append(f"{len(readable)} readable image(s): a site needs at least two")
            return CheckReport(lines, blocking, warnings)
        kept = files.take(readable)
        try:
            train, val = _split(kept, site)
        except DataError as exc:
            blocking.append(str(exc))
            return CheckReport(lines + [f"ERROR: {exc}"], blocking, warnings)
        data = SiteData(site.name, kept.take(train), kept.take(val), bad[["path", "reason"]])
        lines += _spread(table[table["ok"]])
        known = kept.patients != ""
        source = f"column {site.patient_column!r}" if site.patient_column else "the DICOM files' PatientID"
        if known.any():
            both = set(kept.patients[train][known[train]]) & set(kept.patients[val][known[val]])
            lines.append(f"Patients: {len(set(kept.patients[known]))} (from {source}); {len(both)} in both splits; {int((~known).sum())} images without a patient ID")
            if both:
                blocking.append(f"{len(both)} patient(s) in both splits")
        else:
            lines.append("Patients: no patient IDs (no patient column, no DICOM PatientID): the split is per image")
        dup_lines, dup_warnings = _duplicates(files, table, readable[val])
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
    batch = next(iter(dataset(data.val, cfg, training=False, dicom=site.dicom).take(1)))[0]
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
