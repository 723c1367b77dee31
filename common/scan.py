"""Reading every file of a site once, in parallel, and remembering what was found (kept in the site's report-dir, so a
large site is not read again for every message): which files are images, which hold no image, which do not read."""

from __future__ import annotations

import hashlib
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from common.atomic import write_csv
from common.errors import DataError, NotAnImage
from common.images import pixel_digest, read_image
from common.site_file import SiteConfig
from common.site_index import SiteFiles

IMAGE, NOT_AN_IMAGE, UNREADABLE = "image", "not an image", "unreadable"  # what a scanned file turned out to be
COLUMNS = ["path", "kind", "reason", "height", "width", "mode", "patient_in_file", "sha256", "pixels", "warnings"]
SCAN_CACHE = "scan-cache.csv"
MAX_LISTED = 10  # files named in an error; the data check lists them all


def _inspect(path: str, site: SiteConfig, channels: int) -> dict:
    """Read one file: what it is (and why not an image), its size, mode, patient ID, decoder warnings, file and pixel hashes."""
    row = dict.fromkeys(COLUMNS, "") | {"path": path, "height": 0, "width": 0}
    try:
        pixels, mode, patient, warned = read_image(path, channels, site.dicom)
    except NotAnImage as exc:
        return row | {"kind": NOT_AN_IMAGE, "reason": str(exc).removeprefix(f"{path}: ")}
    except DataError as exc:
        return row | {"kind": UNREADABLE, "reason": str(exc).removeprefix(f"{path}: ")}
    h, w = pixels.shape[:2]
    sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
    return row | {"kind": IMAGE, "height": h, "width": w, "mode": mode, "patient_in_file": patient, "sha256": sha,
                  "pixels": pixel_digest(pixels), "warnings": " | ".join(warned)}  # fmt: skip


def scan_files(files: SiteFiles, site: SiteConfig, channels: int, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """Read every file once, in parallel: one row per file (COLUMNS)."""
    workers = min(8, os.cpu_count() or 1)
    rows, start, step = [], time.monotonic(), max(1, len(files) // 10)
    with ThreadPoolExecutor(workers) as pool:
        for i, row in enumerate(pool.map(lambda p: _inspect(p, site, channels), files.paths), start=1):
            rows.append(row)
            if progress is not None and (i % step == 0 or i == len(files)) and len(files) >= 200:
                eta = (time.monotonic() - start) / i * (len(files) - i)
                progress(f"{site.name}: read {i} of {len(files)} files, ETA {eta:.0f} s")
    return pd.DataFrame(rows, columns=COLUMNS)


def _stamp(path: str) -> str:
    """A file's size and modification time, or '' when it cannot be stat'ed."""
    try:
        st = os.stat(path)
    except OSError:
        return ""
    return f"{st.st_size}:{st.st_mtime_ns}"


def scan_site(files: SiteFiles, site: SiteConfig, channels: int, progress: Callable[[str], None] | None = None) -> pd.DataFrame:
    """scan_files, reading again only the files changed since the last scan (size or modification time) and kept in
    the site's report-dir: in deployment each message runs in a new process, and a large site must not be re-read each time."""
    cache = site.report_dir / SCAN_CACHE if site.report_dir is not None else None
    stamps = np.array([_stamp(p) for p in files.paths], dtype=object)
    key = f"{channels}:{site.dicom}"  # what the decoded result depends on besides the file
    known = pd.DataFrame()
    if cache is not None and cache.is_file():
        known = pd.read_csv(cache, dtype=str, keep_default_na=False)
        if set(COLUMNS) <= set(known.columns):  # a cache written by an older version is read afresh
            known = known[known["key"] == key].drop_duplicates("path", keep="last").set_index("path")
        else:
            known = pd.DataFrame()
    reuse = np.array([p in known.index and s != "" and known.at[p, "stamp"] == s for p, s in zip(files.paths, stamps)], bool)
    table = scan_files(files.take(np.flatnonzero(~reuse)), site, channels, progress)
    if reuse.any():
        table = pd.concat([table, known.loc[np.unique(files.paths[reuse])].reset_index()[COLUMNS]])
    table = table.drop_duplicates("path").set_index("path").loc[files.paths].reset_index()
    table = table.astype({"height": int, "width": int})
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_csv(cache, table.assign(stamp=stamps, key=key))
    return table


def with_scan(files: SiteFiles, table: pd.DataFrame) -> SiteFiles:
    """The files with what the scan found: DICOM patient IDs where the index had none, and pixel digests."""
    patients = np.where(files.patients != "", files.patients, table["patient_in_file"].to_numpy(object))
    return files.replace(patients=patients, digests=table["pixels"].to_numpy(object))


def listed(table: pd.DataFrame) -> str:
    """The first MAX_LISTED files of a scan table with their reasons, in one line."""
    shown = "; ".join(f"{p}: {r}" for p, r in zip(table["path"][:MAX_LISTED], table["reason"][:MAX_LISTED]))
    return shown + (f"; and {len(table) - MAX_LISTED} more" if len(table) > MAX_LISTED else "")


def images_only(site: SiteConfig, files: SiteFiles, table: pd.DataFrame) -> tuple[SiteFiles, pd.DataFrame]:
    """The files that are images, and the (path, kind, reason) of those left out: files holding no image always (they are
    counted and listed), unreadable files only when the site skips them; otherwise unreadable files stop the site."""
    bad = table[table["kind"] == UNREADABLE]
    if len(bad) and not site.skip_unreadable:
        raise DataError(
            f"site {site.name!r}: {len(bad)} file(s) cannot be read: {listed(bad)}. Fix or remove them, or set "
            f"'skip-unreadable: true' in {site.path.name} to train without them (they are then listed in the site's report)"
        )
    left_out = table[table["kind"] != IMAGE][["path", "kind", "reason"]].reset_index(drop=True)
    return files.take(np.flatnonzero((table["kind"] == IMAGE).to_numpy())), left_out
