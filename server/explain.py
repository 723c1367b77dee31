"""Grad-CAM pictures and predictions for any saved global model and any folder of image files (PNG, JPEG or DICOM,
recognised by content; sub-folders included).

    .venv/bin/python -m server.explain runs/<run-id>/model_best.keras path/to/images --out explained/ [--sanity]

Writes one picture per image and label (<image>__<label>.png: the heatmap over the image, its colour scale, the
probability and the call at the threshold) and predictions.csv: one row per file found, hidden and operating-system
files (passed over) included, in the same columns every time (file, status, the probability of each label, the call at
the threshold, and why a file was not explained).
The label names and the threshold come from the config.json beside the model (the run's `threshold`), or --threshold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from common.cli import program
from common.errors import DataError, NotAnImage
from common.gradcam import gradcam, randomisation_test
from common.images import read_image, to_model_input
from common.metrics import to_probability
from common.site_index import visible_files
from server.plots import describe_call, explained_picture
from server.recorders.progress import sanity_verdict

EXPLAINED, NOT_AN_IMAGE, UNREADABLE, PASSED_OVER = "explained", "not an image", "unreadable", "passed over"


def run_settings(model_path: Path, n_labels: int) -> tuple[list[str], float, str]:
    """The run's label names, threshold and image fit from the config.json beside the model, else label_0, ..., 0.5, pad."""
    config = model_path.parent / "config.json"
    settings = json.loads(config.read_text()) if config.is_file() else {}
    names = str(settings.get("labels", "")).split(",")
    if len(names) != n_labels:
        names = [f"label_{j}" for j in range(n_labels)]
    return names, float(settings.get("threshold", 0.5)), str(settings.get("image-fit", "pad"))


def explain(model_path: Path, folder: Path, out: Path, sanity: bool, threshold: float | None = None) -> pd.DataFrame:
    """Pictures and predictions for every file under the folder; a file that is not an image or does not read is
    listed with the reason, never dropped."""
    model = keras.models.load_model(model_path, compile=False)
    size, channels = model.input_shape[1], model.input_shape[3]
    names, run_threshold, fit = run_settings(model_path, model.output_shape[-1])
    threshold = run_threshold if threshold is None else threshold
    hidden: list[Path] = []
    files = visible_files(folder, hidden)
    if not files:
        raise ValueError(f"{folder}: no files" + (f" other than {len(hidden)} hidden or system file(s)" if hidden else ""))
    columns = ["file", "status"] + [f"p_{n}" for n in names] + [f"called_{n}" for n in names] + ["reason"]
    rows, images, readable = [], [], []
    for path in hidden:  # listed, never silently dropped: a hidden file may be an image someone exported oddly
        why = "a hidden folder (its name starts with '.'), not looked into" if path.is_dir() else "a hidden or operating-system file, by its name"
        rows.append({"file": str(path.relative_to(folder)), "status": PASSED_OVER, "reason": why})
    for path in files:
        name = str(path.relative_to(folder))
        try:
            pixels = read_image(path, channels)[0]
        except NotAnImage as exc:
            rows.append({"file": name, "status": NOT_AN_IMAGE, "reason": str(exc).removeprefix(f"{path}: ")})
            continue
        except DataError as exc:
            rows.append({"file": name, "status": UNREADABLE, "reason": str(exc).removeprefix(f"{path}: ")})
            continue
        images.append(to_model_input(pixels[None], size, channels, fit)[0])
        readable.append(name)
    if images:
        out.mkdir(parents=True, exist_ok=True)
        batch = np.stack(images)  # (n, h, w, c)
        probabilities = to_probability(model.predict(batch, verbose=0))  # (n, n_labels)
        for j, label in enumerate(names):
            heat = gradcam(model, batch, j)  # (n, h, w)
            for i, name in enumerate(readable):
                call = "called positive" if probabilities[i, j] >= threshold else "called negative"
                caption = f"{name}\n{label}: {describe_call(probabilities[i, j], threshold)}: {call}"
                explained_picture(out / f"{Path(name).with_suffix('').as_posix().replace('/', '__')}__{label}.png", batch[i], heat[i], caption)
        for i, name in enumerate(readable):
            calls = {f"called_{n}": bool(probabilities[i, j] >= threshold) for j, n in enumerate(names)}
            rows.append({"file": name, "status": EXPLAINED, **{f"p_{n}": float(v) for n, v in zip(names, probabilities[i])}, **calls, "reason": ""})
        if sanity:
            for j, label in enumerate(names):
                stages = randomisation_test(model, batch, j)
                for stage, r in stages:
                    print(f"randomisation test {label}: randomised down to {stage:<16} Spearman {r:+.2f}")
                print(sanity_verdict(label, stages[-1][1]))
    out.mkdir(parents=True, exist_ok=True)
    table = pd.DataFrame(rows, columns=columns).sort_values("file", kind="stable")
    table.to_csv(out / "predictions.csv", index=False, float_format="%.4f")
    return table


def main(argv: list[str] | None = None) -> int:
    """Command line: exit 0 when every file but hidden and system ones was explained, 1 when some were left out, 2 on bad arguments."""
    parser = argparse.ArgumentParser(prog=program("python -m server.explain"), description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path, help="a saved global model (.keras)")
    parser.add_argument("images", type=Path, help="a folder of image files (PNG, JPEG, DICOM; sub-folders too)")
    parser.add_argument("--out", type=Path, default=Path("explained"), help="where pictures and predictions.csv go")
    parser.add_argument("--threshold", type=float, help="the probability at which an image is called positive (default: the run's)")
    parser.add_argument("--sanity", action="store_true", help="also run the randomisation sanity test on these images")
    args = parser.parse_args(argv)
    if args.threshold is not None and not 0 < args.threshold < 1:
        parser.error(f"--threshold {args.threshold}: expected a probability in (0, 1)")
    try:
        table = explain(args.model, args.images, args.out, args.sanity, args.threshold)
    except (ValueError, OSError) as exc:
        print(f"explain: error: {exc}", file=sys.stderr)
        return 2
    left = table[table["status"].isin([NOT_AN_IMAGE, UNREADABLE])]
    passed = table[table["status"] == PASSED_OVER]
    for _, row in pd.concat([left, passed]).iterrows():
        print(f"explain: {row['file']}: {row['status']}: {row['reason']}", file=sys.stderr)
    print(
        f"explain: {len(table) - len(left) - len(passed)} image(s) explained, {len(left)} file(s) left out, "
        f"{len(passed)} hidden or system file(s) passed over (each listed above and in predictions.csv); results in {args.out}"
    )
    return 1 if len(left) else 0


if __name__ == "__main__":
    sys.exit(main())
