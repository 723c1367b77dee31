"""A site's files with their labels, found from its site file: class folders or a CSV manifest (nothing read yet)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import ConfigError, DataError
from common.site_file import SiteConfig, site_label_sources

IGNORED_FILES = ("Thumbs.db", "desktop.ini")  # operating-system clutter in exported folders; hidden files are ignored too


def _blank(n: int) -> np.ndarray:
    """(n,) object array of empty strings: unknown patients, sources or digests."""
    return np.full(n, "", dtype=object)


@dataclass(frozen=True)
class SiteFiles:
    """A site's image files with their labels, and what is known of each: patient, source hospital, pixel digest."""

    paths: np.ndarray  # (n,) str, absolute
    labels: np.ndarray  # (n, n_labels) uint8, 0/1
    patients: np.ndarray = field(default=None)  # (n,) str; '' where unknown
    sources: np.ndarray = field(default=None)  # (n,) str: the hospital an image came from; '' where unknown
    digests: np.ndarray = field(default=None)  # (n,) str: SHA-256 of the decoded pixels (common/images.py); '' before reading

    def __post_init__(self) -> None:
        """Unknown patients, sources and digests default to ''."""
        for name in ("patients", "sources", "digests"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, _blank(len(self.paths)))

    def __len__(self) -> int:
        """Number of files."""
        return len(self.paths)

    def take(self, rows: np.ndarray) -> SiteFiles:
        """The subset at the given row indices."""
        return SiteFiles(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))

    def replace(self, **columns: np.ndarray) -> SiteFiles:
        """The same files with some columns replaced."""
        return dataclasses.replace(self, **columns)


def _refuse_unlistable(exc: OSError) -> None:
    """os.walk's error hook: a folder that cannot be listed stops the index (Path.rglob would skip it without a word)."""
    reason = "permission denied: this user cannot list the folder" if isinstance(exc, PermissionError) else exc.strerror
    raise DataError(f"{exc.filename}: {reason}")


def visible_files(folder: Path, passed_over: list[Path] | None = None) -> list[Path]:
    """Every file under a folder, recursively, sorted, without hidden files and folders and operating-system clutter
    (those are added to passed_over, where given, for the caller to list)."""
    found, hidden = [], []
    for top, folders, files in os.walk(folder, onerror=_refuse_unlistable, followlinks=True):
        hidden += [Path(top) / f for f in folders if f.startswith(".")]
        folders[:] = [f for f in folders if not f.startswith(".")]
        found += [Path(top) / f for f in files if not f.startswith(".") and f not in IGNORED_FILES]
        hidden += [Path(top) / f for f in files if f.startswith(".") or f in IGNORED_FILES]
    if passed_over is not None:
        passed_over += sorted(hidden)
    return sorted(found)


def _subfolders(root: Path) -> list[str]:
    """The visible sub-folders of the data root, or a DataError naming the root when it cannot be listed."""
    try:
        return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except PermissionError as exc:
        raise DataError(f"{root}: permission denied: this user cannot list the data root") from exc


def _folder_index(site: SiteConfig, sources: dict[str, str]) -> SiteFiles:
    """Class folders: a folder per label (its images have that label only) and folders of images without a finding;
    with source-subfolders, the first sub-folder under a class folder names the hospital an image came from."""
    found = _subfolders(site.data_root)
    mapped = list(sources.values()) + list(site.negative_folders)
    unmapped = sorted(set(found) - set(mapped))
    if unmapped:
        raise DataError(
            f"{site.data_root}: folder(s) {', '.join(unmapped)} are not mapped to a label; name them under 'labels' or "
            f"'negative-folders' in {site.path.name}, or move them out of the data root"
        )
    paths, labels, origin = [], [], []
    for folder in mapped:
        if folder not in found:
            raise DataError(f"{site.data_root}: no folder {folder!r} (named in {site.path.name}); folders found: {', '.join(found) or 'none'}")
        files = visible_files(site.data_root / folder)
        if not files:
            raise DataError(f"{site.data_root / folder}: empty class folder: no image files")
        if site.source_subfolders:
            loose = [p for p in files if len(p.relative_to(site.data_root / folder).parts) < 2]
            if loose:
                raise DataError(
                    f"{loose[0]}: not inside a source sub-folder ({len(loose)} such file(s) in {folder!r}); with "
                    f"'source-subfolders: true' every image sits in <class folder>/<source hospital>/"
                )
            origin += [p.relative_to(site.data_root / folder).parts[0] for p in files]
        row = np.array([int(sources[label] == folder) for label in sources], np.uint8)
        paths += [str(p) for p in files]
        labels += [row] * len(files)
    n = len(paths)
    return SiteFiles(np.array(paths), np.array(labels, np.uint8).reshape(-1, len(sources)), sources=np.array(origin, object) if origin else _blank(n))


def _manifest_index(site: SiteConfig, sources: dict[str, str]) -> SiteFiles:
    """A CSV manifest: an image-path column, one 0/1 column per label, optionally patient-ID and source columns."""
    try:
        table = pd.read_csv(site.manifest, dtype=str, keep_default_na=False)
    except PermissionError as exc:
        raise DataError(f"{site.manifest}: permission denied: this user cannot read the manifest") from exc
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{site.manifest}: not a readable CSV file ({exc})") from exc
    optional = [c for c in (site.patient_column, site.source_column) if c]
    wanted = [site.image_column, *sources.values(), *optional]
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

    def column(name: str) -> np.ndarray:
        return table[name].str.strip().to_numpy(object) if name else _blank(len(table))

    return SiteFiles(paths, labels, column(site.patient_column), column(site.source_column))


def index_site(site: SiteConfig, run_labels: tuple[str, ...]) -> SiteFiles:
    """The site's files with their labels, from class folders or a manifest; DataError or ConfigError says what is wrong."""
    sources = site_label_sources(site, run_labels)
    if site.layout == "folders":
        return _folder_index(site, sources)
    if site.layout == "manifest":
        return _manifest_index(site, sources)
    raise ConfigError(f"site file {site.path}: layout {site.layout!r} has no files to index")
