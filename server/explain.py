"""Grad-CAM overlays and predictions for any saved global model and any folder of PNG/JPEG images.

    .venv/bin/python -m server.explain runs/<run-id>/model_best.keras path/to/images --out explained/ [--sanity]

Writes one overlay per image and label (<image>__<label>.png) and predictions.csv (one row per image: its
probability for each label, or why it could not be read). The label names come from the config.json beside the model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from common.gradcam import gradcam, randomisation_test
from common.metrics import to_probability
from server.plots import overlay

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}


def read_image(path: Path, size: tuple[int, int], channels: int) -> np.ndarray:
    """A PNG/JPEG of any mode (L, RGB, RGBA, P, 16-bit) as float32 (h, w, channels) in [0, 1] at the model's size."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I"):
            values = np.asarray(img, np.float32) / (65535.0 if img.mode != "I" else max(float(np.asarray(img).max()), 1.0))
            img = Image.fromarray((np.clip(values, 0, 1) * 255).astype(np.uint8))
        img = img.convert("L" if channels == 1 else "RGB").resize((size[1], size[0]), Image.BILINEAR)
        array = np.asarray(img, np.float32) / 255.0
    return array[..., None] if channels == 1 else array


def label_names(model_path: Path, n_labels: int) -> list[str]:
    """The run's label names from the config.json beside the model, else label_0, label_1, ..."""
    config = model_path.parent / "config.json"
    if config.is_file():
        names = json.loads(config.read_text()).get("labels", "").split(",")
        if len(names) == n_labels:
            return names
    return [f"label_{j}" for j in range(n_labels)]


def explain(model_path: Path, folder: Path, out: Path, sanity: bool) -> pd.DataFrame:
    """Overlays and predictions for every image in the folder; unreadable files are listed with the reason, not dropped."""
    model = keras.models.load_model(model_path, compile=False)
    height, width, channels = model.input_shape[1:]
    names = label_names(model_path, model.output_shape[-1])
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"{folder}: no .png, .jpg or .jpeg files")
    out.mkdir(parents=True, exist_ok=True)
    rows, images, readable = [], [], []
    for path in files:
        try:
            images.append(read_image(path, (height, width), channels))
            readable.append(path)
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            rows.append({"file": path.name, "error": f"unreadable: {exc}"})
    if images:
        batch = np.stack(images)  # (n, h, w, c)
        probabilities = to_probability(model.predict(batch, verbose=0))  # (n, n_labels)
        for j, name in enumerate(names):
            heat = gradcam(model, batch, j)  # (n, h, w)
            for i, path in enumerate(readable):
                overlay(batch[i], heat[i], None).save(out / f"{path.stem}__{name}.png")
        rows += [{"file": p.name, **{f"p_{n}": float(v) for n, v in zip(names, probabilities[i])}, "error": ""} for i, p in enumerate(readable)]
        if sanity:
            for j, name in enumerate(names):
                for stage, r in randomisation_test(model, batch, j):
                    print(f"randomisation test {name}: randomised down to {stage:<16} Spearman {r:+.2f}")
    table = pd.DataFrame(rows)
    table.to_csv(out / "predictions.csv", index=False, float_format="%.4f")
    return table


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 when every image was explained, 1 when some could not be read, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog="python -m server.explain", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a saved global model (.keras)")
    parser.add_argument("images", type=Path, help="a folder of PNG/JPEG images")
    parser.add_argument("--out", type=Path, default=Path("explained"), help="where overlays and predictions.csv go")
    parser.add_argument("--sanity", action="store_true", help="also run the randomisation sanity test on these images")
    args = parser.parse_args(argv)
    try:
        table = explain(args.model, args.images, args.out, args.sanity)
    except (ValueError, OSError) as exc:
        print(f"explain: error: {exc}", file=sys.stderr)
        return 2
    failed = table[table["error"].astype(bool)]
    for _, row in failed.iterrows():
        print(f"explain: {row['file']}: {row['error']}", file=sys.stderr)
    print(f"explain: {len(table) - len(failed)} image(s) explained, {len(failed)} unreadable; results in {args.out}")
    return 1 if len(failed) else 0


if __name__ == "__main__":
    sys.exit(main())
