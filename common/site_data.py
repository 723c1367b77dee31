"""A hospital's data as training sees it: its site file indexed, every file read once, split by patient; or a
simulated hospital's share of the run's data. Also the server's held-out set.

The data path flows one way: site file (common/site_file.py) -> index (common/site_index.py) -> read
(common/images.py, common/dicom.py, common/scan.py) -> split (common/splits.py) -> here -> pipeline (common/pipeline.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from common.config import RunConfig
from common.errors import DataError
from common.image_set import ImageSet, load_npz_split, no_boxes, unknown_sources
from common.images import read_image, to_model_input
from common.partition import heldout_set, hospital_data, hospital_name
from common.scan import images_only, scan_site, with_scan
from common.site_file import SiteConfig, load_site_config
from common.site_index import SiteFiles, index_site
from common.splits import patient_split, stratified_split

LEFT_OUT_COLUMNS = ["path", "kind", "reason"]


@dataclass(frozen=True)
class SiteData:
    """A site's training and validation data, ready for the pipeline, with the files left out and why."""

    name: str
    train: SiteFiles | ImageSet
    val: SiteFiles | ImageSet
    left_out: pd.DataFrame  # LEFT_OUT_COLUMNS: files holding no image, and unreadable files skipped under skip-unreadable
    fit: str = "pad"  # how images that are not square become the model's input (the site's, else the run's image-fit)

    @property
    def digests(self) -> np.ndarray:
        """(n_train + n_val,) pixel digests of every image the site trains or validates on."""
        return np.concatenate([self.train.digests if isinstance(self.train, SiteFiles) else self.train.digest,
                               self.val.digests if isinstance(self.val, SiteFiles) else self.val.digest])  # fmt: skip

    def count(self, kind: str) -> int:
        """How many files were left out as this kind ('unreadable' or 'not an image')."""
        return int((self.left_out["kind"] == kind).sum())


def read_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> tuple[SiteFiles, pd.DataFrame]:
    """The site's indexed files (with what the scan learnt of each) and the scan of every one of them."""
    files = index_site(site, cfg.labels)
    table = scan_site(files, site, cfg.channels, progress)
    return with_scan(files, table), table


def split_files(files: SiteFiles, site: SiteConfig) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) rows: by patient where any patient ID is known, else stratified by label."""
    if (files.patients != "").any():
        return patient_split(files.labels, files.patients, site.val_fraction, site.seed)
    return stratified_split(files.labels, site.val_fraction, site.seed)


def npz_site(site: SiteConfig, cfg: RunConfig) -> SiteData:
    """A site whose images sit in a MedMNIST-style .npz (train and val arrays), split by the site's own seed."""
    parts = [load_npz_split(site.npz, split, len(cfg.labels)) for split in ("train", "val")]
    fit = site.image_fit or cfg.image_fit
    images = to_model_input(np.concatenate([p[0] for p in parts]), cfg.image_size, cfg.channels, fit)
    labels = np.concatenate([p[1] for p in parts])
    local = ImageSet(images, labels, no_boxes(len(labels), len(cfg.labels)), unknown_sources(len(labels)))
    train, val = stratified_split(labels, site.val_fraction, site.seed)
    return SiteData(site.name, local.take(train), local.take(val), pd.DataFrame(columns=LEFT_OUT_COLUMNS), fit)


def load_site(site: SiteConfig, cfg: RunConfig, progress: Callable[[str], None] | None = None) -> SiteData:
    """The site's (train, validation) data after reading every file once; refuses to start on unreadable files unless
    the site skips them, and on a site left without images."""
    if site.layout == "npz":
        return npz_site(site, cfg)
    files, left_out = images_only(site, *read_site(site, cfg, progress))
    if len(files) < 2:
        raise DataError(f"site {site.name!r}: {len(files)} readable image(s) under {site.data_root}: a site needs at least two to train and validate")
    train, val = split_files(files, site)
    return SiteData(site.name, files.take(train), files.take(val), left_out, site.image_fit or cfg.image_fit)


def heldout_from_site(site: SiteConfig, cfg: RunConfig) -> ImageSet:
    """Every image of a site, in memory at the model's input size (no boxes; sources where the site file names them)."""
    if site.layout == "npz":
        data = npz_site(site, cfg)
        return data.train.join(data.val)
    files, _ = images_only(site, *read_site(site, cfg))
    fit = site.image_fit or cfg.image_fit
    images = np.stack([to_model_input(read_image(p, cfg.channels, site.dicom)[0][None], cfg.image_size, cfg.channels, fit)[0] for p in files.paths])
    return ImageSet(images, files.labels, no_boxes(len(files), len(cfg.labels)), files.sources, files.digests)


def server_heldout(cfg: RunConfig) -> ImageSet:
    """The server's held-out set: every image of the run's held-out site file, else the built-in or .npz test images."""
    return heldout_from_site(load_site_config(cfg.heldout_site), cfg) if cfg.heldout_site else heldout_set(cfg)


def node_site_file(cfg: RunConfig, node_config: dict) -> str:
    """The site file a node reads: the one its node config names ('site-config', in deployment), else the run's site
    file for its partition (a simulation of sites); '' for a simulated hospital."""
    return node_config.get("site-config") or (cfg.sites[int(node_config["partition-id"])] if cfg.sites else "")


def node_site_name(cfg: RunConfig, node_config: dict) -> str:
    """The name a node's replies and errors carry, found without reading any image: its site file's name (else the
    file's stem, when the file itself is broken), or 'hospital-<k>' for a simulated hospital."""
    path = node_site_file(cfg, node_config)
    if not path:
        return hospital_name(node_config.get("partition-id", "?"))
    try:
        return load_site_config(path).name
    except (ValueError, OSError):
        return Path(path).stem


def hospital_site(cfg: RunConfig, node_config: dict) -> tuple[SiteData, SiteConfig | None]:
    """This client's data and site file: the site file its node reads (node_site_file), else a simulated hospital's
    share of the run's data."""
    path = node_site_file(cfg, node_config)
    if path:
        site = load_site_config(path)
        return load_site(site, cfg, progress=lambda line: print(line, flush=True)), site
    hospital = int(node_config["partition-id"])
    train, val = hospital_data(cfg, hospital)
    return SiteData(hospital_name(hospital), train, val, pd.DataFrame(columns=LEFT_OUT_COLUMNS), cfg.image_fit), None
