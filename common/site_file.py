"""A hospital's site file: where its images are and how to read them, as its IT staff write it in YAML (deploy/sites/).

The first step of a site's data path: site file -> index (common/site_index.py) -> read (common/images.py,
common/scan.py) -> split (common/splits.py) -> pipeline (common/pipeline.py).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.errors import ConfigError
from common.yaml_file import read_yaml

LAYOUTS = ("folders", "manifest", "npz")
FITS = ("pad", "crop", "stretch")  # how an image that is not square becomes the model's square input


@dataclass(frozen=True)
class DicomSettings:
    """How a site's DICOM pixel values become intensities in [0, 1]."""

    rescale: bool = True  # apply Rescale Slope/Intercept (the modality LUT)
    window: str | tuple[float, float] = "file"  # 'file' (the file's window centre/width), 'none' (min-max), or (centre, width)
    invert_monochrome1: bool = True  # MONOCHROME1 stores bright as low values: invert, so bone is bright everywhere


@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation; every option off (0 / false) unless the site file turns it on."""

    rotation_degrees: float = 0.0  # up to +- this many degrees
    zoom: float = 0.0  # up to +- this share
    shift: float = 0.0  # up to +- this share of the width and height
    contrast: float = 0.0  # contrast factor drawn from [1 - c, 1 + c]
    noise: float = 0.0  # standard deviation of added Gaussian noise, in [0, 1] intensity units
    horizontal_flip: bool = False  # off for chest X-rays: the heart is on the left (dextrocardia is a finding)

    @property
    def active(self) -> bool:
        """True when any option is on."""
        return any(getattr(self, f.name) for f in dataclasses.fields(self))


@dataclass(frozen=True)
class Policy:
    """What a hospital accepts, enforced by its own worker before any work (a refusal reaches the server as its failure)."""

    run_settings: dict[str, tuple] = dataclasses.field(default_factory=dict)  # run setting -> the values accepted
    min_bin_images: int = 0  # the hospital's own histogram floor; the higher of it and the run's applies
    max_rounds_per_day: int = 0  # training requests answered in any 24 hours; 0: no limit


@dataclass(frozen=True)
class SiteConfig:
    """One hospital's data, described by its IT staff in a YAML file (see deploy/sites/); paths are absolute."""

    name: str
    path: Path  # the YAML file itself, for messages
    data_root: Path
    layout: str  # one of LAYOUTS
    labels: dict[str, str]  # run label -> the site's folder or column name
    negative_folders: tuple[str, ...] = ()  # folders layout: folders whose images have no finding
    manifest: Path | None = None  # manifest layout: the CSV file
    image_column: str = "path"
    patient_column: str = ""  # empty: no patient IDs (DICOM files still give theirs)
    source_column: str = ""  # manifest layout: the column naming the hospital each image came from (a held-out set)
    source_subfolders: bool = False  # folders layout: <class folder>/<source hospital>/... names each image's source
    npz: Path | None = None  # npz layout: a MedMNIST-style file; its train and val arrays are the site's images
    val_fraction: float = 0.2
    seed: int = 0
    image_fit: str = ""  # one of FITS; empty: the run's image-fit
    dicom: DicomSettings = DicomSettings()
    augmentation: Augmentation = Augmentation()
    skip_unreadable: bool = False
    gpu: int = 0  # which GPU to use where TensorFlow sees one
    report_dir: Path | None = None  # where the site keeps its own report, skipped-file list and audit log
    policy: Policy = Policy()


_SITE_KEYS = {
    "name", "data-root", "layout", "labels", "negative-folders", "manifest", "image-column", "patient-column",
    "source-column", "source-subfolders", "npz", "val-fraction", "seed", "image-fit", "dicom", "augmentation",
    "skip-unreadable", "gpu", "report-dir", "policy",
}  # fmt: skip


def _site_error(path: Path, key: str, problem: str) -> ConfigError:
    """A ConfigError naming the site file and key."""
    return ConfigError(f"site file {path}: '{key}': {problem}")


def _unquoted(value: Any) -> str:
    """What YAML made of an unquoted word meant as a name, and how to keep it a name; '' for a string."""
    if isinstance(value, bool):
        word = "yes" if value else "no"
        return (
            f"got the YAML boolean {value} (YAML reads unquoted yes/no, on/off and true/false as booleans): "
            f"quote the name, e.g. '{word}'"
        )
    if isinstance(value, (int, float)) or value is None:
        return f"got the YAML {'number' if value is not None else 'null'} {value!r}: quote the name, e.g. '{value}'"
    return ""


def _name(path: Path, key: str, value: Any) -> str:
    """A folder, column or label name: a string, or an error that says how to quote it."""
    if isinstance(value, str) and value:
        return value
    hint = _unquoted(value) or f"expected a name, got {value!r}"
    raise _site_error(path, key, hint)


def _typed(path: Path, section: dict, key: str, kind: type | tuple[type, ...], default: Any, prefix: str = "") -> Any:
    """section[key] checked against kind (bools are not numbers), or default when absent."""
    value = section.get(key, default)
    numeric = kind in (int, float) or kind == (int, float)
    if value is not default and (not isinstance(value, kind) or (numeric and isinstance(value, bool))):
        if kind is str and _unquoted(value):
            raise _site_error(path, prefix + key, _unquoted(value))
        raise _site_error(path, prefix + key, f"expected {getattr(kind, '__name__', 'a number')}, got {value!r}")
    return value


def _section(path: Path, raw: dict, key: str, cls: type) -> Any:
    """A nested section (dicom, augmentation) as its dataclass, dashed keys checked."""
    section = raw.get(key) or {}
    if not isinstance(section, dict):
        raise _site_error(path, key, f"expected a mapping, got {section!r}")
    fields = {f.name.replace("_", "-"): f for f in dataclasses.fields(cls)}
    unknown = sorted(set(map(str, section)) - set(fields))
    if unknown:
        raise _site_error(path, key, f"unknown key(s) {', '.join(unknown)}; known: {', '.join(fields)}")
    values = {}
    for name, f in fields.items():
        if name == "window":
            window = section.get("window", "file")
            if window in ("file", "none"):
                values[f.name] = window
            elif isinstance(window, list) and len(window) == 2 and all(isinstance(v, (int, float)) for v in window) and window[1] > 0:
                values[f.name] = (float(window[0]), float(window[1]))
            else:
                raise _site_error(path, "dicom.window", f"expected 'file', 'none' or [centre, width > 0], got {window!r}")
            continue
        kind = bool if f.type in ("bool", bool) else (int, float)
        value = _typed(path, section, name, kind, f.default, f"{key}.")
        if kind != bool and not 0 <= value <= (180 if name == "rotation-degrees" else 1):
            raise _site_error(path, f"{key}.{name}", f"{value!r} is out of range: expected 0 to {180 if name == 'rotation-degrees' else 1}")
        values[f.name] = value
    return cls(**values)


def _policy(path: Path, raw: dict) -> Policy:
    """The 'policy' section: run-settings (setting -> accepted values), min-bin-images, max-rounds-per-day."""
    section = raw.get("policy") or {}
    if not isinstance(section, dict):
        raise _site_error(path, "policy", f"expected a mapping, got {section!r}")
    unknown = sorted(set(map(str, section)) - {"run-settings", "min-bin-images", "max-rounds-per-day"})
    if unknown:
        raise _site_error(path, "policy", f"unknown key(s) {', '.join(unknown)}; known: run-settings, min-bin-images, max-rounds-per-day")
    accepted = section.get("run-settings") or {}
    if not isinstance(accepted, dict) or not all(isinstance(v, list) and v for v in accepted.values()):
        raise _site_error(path, "policy.run-settings", f"expected a mapping from run settings to lists of accepted values, got {accepted!r}")
    counts = {}
    for key in ("min-bin-images", "max-rounds-per-day"):
        counts[key] = _typed(path, section, key, int, 0, "policy.")
        if counts[key] < 0:
            raise _site_error(path, f"policy.{key}", f"{counts[key]} is out of range: expected an integer >= 0")
    return Policy({str(k): tuple(v) for k, v in accepted.items()}, counts["min-bin-images"], counts["max-rounds-per-day"])


def _labels(path: Path, raw: dict) -> dict[str, str]:
    """The 'labels' mapping (run label -> this site's folder or column); names YAML turned into booleans are refused."""
    labels = raw.get("labels") or {}
    if not isinstance(labels, dict):
        raise _site_error(path, "labels", f"expected a mapping from the run's label names to this site's folder or column names, got {labels!r}")
    checked = {}
    for label, source in labels.items():
        if not isinstance(label, str):
            raise _site_error(path, "labels", f"label {label!r}: " + (_unquoted(label) or "expected a name"))
        checked[label] = str(source) if isinstance(source, int) and not isinstance(source, bool) else _name(path, f"labels.{label}", source)
    return checked


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and check a site YAML file; relative paths resolve against the file's folder."""
    path = Path(path).resolve()
    raw = read_yaml(path, "site file")
    if not isinstance(raw, dict):
        raise ConfigError(f"site file {path}: expected a mapping of settings, got {type(raw).__name__}")
    unknown = sorted(set(map(str, raw)) - _SITE_KEYS)
    if unknown:
        raise ConfigError(f"site file {path}: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(_SITE_KEYS))}")
    for key in ("name", "data-root", "layout"):
        if raw.get(key) in (None, ""):
            raise _site_error(path, key, "missing; every site file names its site, its data root and its layout")
    name = _typed(path, raw, "name", str, None)
    if not name.replace("-", "").replace("_", "").isalnum():
        raise _site_error(path, "name", f"{name!r}: use letters, digits, '-' and '_' only (it names folders)")
    layout = raw["layout"]
    if layout not in LAYOUTS:
        raise _site_error(path, "layout", f"{layout!r}: expected one of {', '.join(LAYOUTS)}")
    root = (path.parent / _typed(path, raw, "data-root", str, None)).resolve()
    if not root.is_dir():
        raise _site_error(path, "data-root", f"folder not found: {root}")
    labels = _labels(path, raw)
    negatives = raw.get("negative-folders") or []
    if not isinstance(negatives, list):
        raise _site_error(path, "negative-folders", f"expected a list of folder names, got {negatives!r}")
    negatives = [str(v) if isinstance(v, int) and not isinstance(v, bool) else _name(path, "negative-folders", v) for v in negatives]
    files = {}
    for key, wanted in (("manifest", "manifest"), ("npz", "npz")):
        if layout == wanted:
            value = _typed(path, raw, key, str, "")
            if not value:
                raise _site_error(path, key, f"missing; layout '{layout}' reads its labels from this file")
            files[key] = (root / value).resolve()
            if not files[key].is_file():
                raise _site_error(path, key, f"file not found: {files[key]}")
    if layout == "folders" and not labels:
        raise _site_error(path, "labels", "missing; the folders layout maps each run label to the folder of its images")
    source_column = _typed(path, raw, "source-column", str, "")
    source_subfolders = _typed(path, raw, "source-subfolders", bool, False)
    if source_column and layout != "manifest":
        raise _site_error(path, "source-column", f"only the manifest layout has columns (this site's layout: {layout}); use source-subfolders with folders")
    if source_subfolders and layout != "folders":
        raise _site_error(path, "source-subfolders", f"only the folders layout has sub-folders (this site's layout: {layout}); use source-column with a manifest")
    val_fraction = _typed(path, raw, "val-fraction", (int, float), 0.2)
    if not 0 < val_fraction < 1:
        raise _site_error(path, "val-fraction", f"{val_fraction!r} is out of range: expected a number in (0, 1)")
    image_fit = _typed(path, raw, "image-fit", str, "")
    if image_fit and image_fit not in FITS:
        raise _site_error(path, "image-fit", f"{image_fit!r}: expected one of {', '.join(FITS)}")
    seed, gpu = _typed(path, raw, "seed", int, 0), _typed(path, raw, "gpu", int, 0)
    report_dir = (path.parent / _typed(path, raw, "report-dir", str, f"reports/{name}")).resolve()
    return SiteConfig(
        name=name, path=path, data_root=root, layout=layout, labels=labels,
        negative_folders=tuple(negatives), manifest=files.get("manifest"), npz=files.get("npz"),
        image_column=_name(path, "image-column", raw.get("image-column", "path")),
        patient_column=_typed(path, raw, "patient-column", str, ""), source_column=source_column,
        source_subfolders=source_subfolders, val_fraction=float(val_fraction), seed=seed, image_fit=image_fit,
        dicom=_section(path, raw, "dicom", DicomSettings), augmentation=_section(path, raw, "augmentation", Augmentation),
        skip_unreadable=_typed(path, raw, "skip-unreadable", bool, False), gpu=gpu, report_dir=report_dir,
        policy=_policy(path, raw),
    )  # fmt: skip


def site_label_sources(site: SiteConfig, run_labels: tuple[str, ...]) -> dict[str, str]:
    """Each run label's folder or column name at this site (the same name unless the site file maps it)."""
    unknown = sorted(set(site.labels) - set(run_labels))
    if unknown:
        raise ConfigError(f"site file {site.path}: 'labels' maps {', '.join(map(repr, unknown))}, which the run does not have; the run's labels: {', '.join(run_labels)}")
    return {label: site.labels.get(label, label) for label in run_labels}
