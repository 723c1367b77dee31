"""Write the built-in hospitals to disk as real sites: class folders of PNG/JPEG files and a site YAML file each, for
rehearsing a deployment (or a site-file simulation) on one machine.

    python -m common.demo_sites demo-sites [--mixed] [-c "num-hospitals=3 images-per-hospital=200"]

writes demo-sites/hospital-K/{lesion,no_finding}/*.png and demo-sites/hospital-K.yaml for each hospital, and
demo-sites/heldout/{lesion,no_finding}/hospital-K/*.png with demo-sites/heldout.yaml for the server (each held-out
image in a sub-folder named for the hospital it represents: `source-subfolders: true`). With --mixed the files come
in the modes and sizes a PACS export mixes (8- and 16-bit grey, RGB, RGBA, palette, JPEG; 64 to 160 pixels wide).
Run settings such as `shortcut-hospital=2` shape the images as they shape a simulation's.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from common.config import RunConfig, parse_overrides, parse_run_config, project_settings
from common.errors import ConfigError
from common.image_set import ImageSet
from common.partition import heldout_set, hospital_data

NEGATIVE_FOLDER = "no_finding"
MIXED_FORMS = ("L", "RGB", "RGBA", "P", "I;16", "JPEG")


def _save(image: np.ndarray, path: Path, form: str, width: int) -> Path:
    """One image (h, w, 1) in [0, 1] saved in the given form at the given width; returns the file's path."""
    grey = Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8), "L").resize((width, width), Image.BILINEAR)
    if form == "I;16":
        pixels = np.asarray(grey, np.uint16) * 257  # the full 16-bit range
        path = path.with_suffix(".png")
        Image.fromarray(pixels).save(path)  # Pillow keeps uint16 arrays 16-bit
        return path
    if form == "JPEG":
        path = path.with_suffix(".jpg")
        grey.convert("RGB").save(path, quality=95)
        return path
    converted = {"L": grey, "RGB": grey.convert("RGB"), "RGBA": grey.convert("RGBA"), "P": grey.convert("P")}[form]
    path = path.with_suffix(".png")
    converted.save(path)
    return path


def write_class_folders(images: ImageSet, folder: Path, label: str, mixed: bool = False, by_source: bool = False) -> int:
    """Save an image set as class folders (folder/label/, folder/no_finding/), in a sub-folder per source hospital if
    asked; returns the number of files written."""
    for i, (image, positive, source) in enumerate(zip(images.images, images.labels[:, 0], images.source)):
        form = MIXED_FORMS[i % len(MIXED_FORMS)] if mixed else "L"
        width = image.shape[0] + (32 * (i % 4) if mixed else 0)
        where = folder / (label if positive else NEGATIVE_FOLDER) / (source if by_source else "")
        where.mkdir(parents=True, exist_ok=True)
        _save(image, where / f"image_{i:05d}", form, width)
    return len(images)


def write_site_yaml(path: Path, name: str, data_root: str, label: str, seed: int, by_source: bool = False) -> Path:
    """A class-folder site file for a demo site; returns its path."""
    path.write_text(
        f"# A demo site written by common.demo_sites: class folders of built-in images.\n"
        f"name: {name}\ndata-root: {data_root}\nlayout: folders\nlabels:\n  {label}: {label}\n"
        f"negative-folders: [{NEGATIVE_FOLDER}]\nval-fraction: 0.2\nseed: {seed}\n" + ("source-subfolders: true\n" if by_source else "")
    )
    return path


def write_demo_sites(cfg: RunConfig, out: Path, mixed: bool = False) -> list[Path]:
    """Every built-in hospital and the held-out set as a site on disk; returns the hospitals' site files, then the held-out one."""
    if len(cfg.labels) != 1 or cfg.data_path is not None:
        raise ConfigError("demo sites are written from the built-in data with one label (run settings 'data' and 'labels')")
    label, files = cfg.labels[0], []
    for hospital in range(cfg.num_hospitals):
        train, val = hospital_data(cfg, hospital)
        write_class_folders(train.join(val), out / f"hospital-{hospital}", label, mixed)
        files.append(write_site_yaml(out / f"hospital-{hospital}.yaml", f"hospital-{hospital}", f"hospital-{hospital}", label, cfg.seed + hospital))
    write_class_folders(heldout_set(cfg), out / "heldout", label, mixed, by_source=True)
    files.append(write_site_yaml(out / "heldout.yaml", "heldout", "heldout", label, cfg.seed, by_source=True))
    return files


def main(argv: list[str] | None = None) -> int:
    """Command line: write the demo sites and print their site files."""
    parser = argparse.ArgumentParser(prog="python -m common.demo_sites", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the folder to write the sites into")
    parser.add_argument("--mixed", action="store_true", help="mix file modes and sizes, as a PACS export does")
    parser.add_argument("--run-config", "-c", action="append", default=[], help="space-separated key=value run settings")
    args = parser.parse_args(argv)
    try:
        cfg = parse_run_config({**project_settings(), **parse_overrides(args.run_config)})
        files = write_demo_sites(cfg, args.out.resolve(), args.mixed)
    except ConfigError as exc:
        print(f"fedimaging: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(str(f) for f in files))
    return 0


if __name__ == "__main__":
    sys.exit(main())
