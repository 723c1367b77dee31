"""Images per second of a hospital's local training (client/training.py, as the ClientApp runs it) against a plain
Keras `fit` on the same images and device: on the CPU, and on the GPU where TensorFlow sees one.

    .venv/bin/python benchmarks/throughput.py                  # 2,000 images at 64x64, 3 epochs, batch 16 and 64
    .venv/bin/python benchmarks/throughput.py --images 200 --epochs 2 --batch-size 16

Each device runs in its own process (the CPU one with CUDA_VISIBLE_DEVICES=-1). The first epoch (graph tracing,
the pipeline's cache filling) is left out; the figures are the later epochs. Writes
benchmarks/results/throughput.csv and throughput.png; prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

PROJECT = Path(__file__).resolve().parent.parent
RESULTS = PROJECT / "benchmarks" / "results"


def measure_device(images: int, size: int, epochs: int, batch_size: int, gpu: bool) -> dict:
    """In this process: our local training's and plain fit's images per second on the device TensorFlow uses; for
    `gpu`, nothing when TensorFlow sees none."""
    sys.path.insert(0, str(PROJECT))
    import keras
    import numpy as np
    import tensorflow as tf

    if gpu and not tf.config.list_physical_devices("GPU"):
        return {"device": ""}

    from client import training
    from common.config import config_to_dict, parse_run_config, project_settings
    from common.model import build_model
    from common.partition import hospital_data

    settings = {**project_settings(), "num-hospitals": 1, "min-hospitals": 1, "images-per-hospital": images, "image-size": size,
                "batch-size": batch_size, "local-epochs": 1, "threads-per-client": os.cpu_count() or 1, "gradcam-images": 0}  # fmt: skip
    cfg = parse_run_config(settings, base_dir=PROJECT)
    run_config, node = config_to_dict(cfg), {"partition-id": 0}
    weights = build_model(cfg.model, (size, size, 1), 1, cfg.learning_rate).get_weights()
    n = training.train(run_config, node, weights).num_examples  # loads the site, traces the graph, fills the cache
    started = time.perf_counter()
    for _ in range(epochs - 1):
        weights = training.train(run_config, node, weights).weights  # one local epoch per call, as one round runs it
    ours = n * (epochs - 1) / (time.perf_counter() - started)

    train, _ = hospital_data(cfg, 0)
    keras.utils.set_random_seed(cfg.seed)
    plain = build_model(cfg.model, (size, size, 1), 1, cfg.learning_rate)
    plain.fit(train.images, train.labels.astype(np.float32), batch_size=batch_size, epochs=1, verbose=0)
    started = time.perf_counter()
    plain.fit(train.images, train.labels.astype(np.float32), batch_size=batch_size, epochs=epochs - 1, verbose=0)
    plain_rate = n * (epochs - 1) / (time.perf_counter() - started)
    gpus = tf.config.list_physical_devices("GPU")
    device = tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU") if gpus else f"CPU ({os.cpu_count()} cores)"
    return {"device": device, "batch_size": batch_size, "images": n, "ours_images_per_s": ours, "plain_fit_images_per_s": plain_rate}


def main(argv: list[str] | None = None) -> int:
    """Measure on each device in its own process; print the table, write the CSV and plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="images of the hospital (80 %% of them train)")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, action="append", help="batch sizes (default: 16 and 64)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--device-run", help=argparse.SUPPRESS)  # internal: measure in this process with these JSON arguments
    args = parser.parse_args(argv)
    if args.device_run:
        print(json.dumps(measure_device(**json.loads(args.device_run))))
        return 0
    rows = []
    for batch_size in args.batch_size or [16, 64]:
        for device, env in (("cpu", {"CUDA_VISIBLE_DEVICES": "-1"}), ("gpu", {})):
            spec = json.dumps({"images": args.images, "size": args.image_size, "epochs": args.epochs, "batch_size": batch_size, "gpu": device == "gpu"})
            done = subprocess.run([sys.executable, __file__, "--device-run", spec], cwd=PROJECT, capture_output=True, text=True,
                                  env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **env})  # fmt: skip
            if done.returncode != 0:
                raise RuntimeError(f"{device}, batch {batch_size}: the measurement failed:\n{done.stderr[-3000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            if not row["device"]:
                print(f"no GPU visible to TensorFlow: batch {batch_size} measured on the CPU only", flush=True)
                continue
            rows.append(row | {"ours_vs_plain": row["ours_images_per_s"] / row["plain_fit_images_per_s"]})
    table = pd.DataFrame(rows)
    args.results.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.results / "throughput.csv", index=False, float_format="%.3f")
    plot(table, args.results / "throughput.png")
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


def plot(table: pd.DataFrame, path: Path) -> None:
    """Grouped bars: images per second, ours and plain fit, per device and batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [f"{d}\nbatch {b}" for d, b in zip(table["device"], table["batch_size"])]
    x = range(len(table))
    fig, ax = plt.subplots(figsize=(max(5, 2.2 * len(table)), 4))
    ax.bar([i - 0.2 for i in x], table["ours_images_per_s"], width=0.4, label="local training (client/training.py)")
    ax.bar([i + 0.2 for i in x], table["plain_fit_images_per_s"], width=0.4, label="plain Keras fit")
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set(ylabel="training images per second", title="A hospital's local training throughput")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
