"""The on-demand Grad-CAM command on a saved model and a folder of images of mixed modes, one of them corrupt."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image

from common.model import build_model
from server import explain


def test_explain_writes_overlays_and_predictions_and_lists_unreadable_files(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    build_model("lightcnn", (32, 32, 1), 2, 1e-3).save(run / "model_best.keras")
    (run / "config.json").write_text(json.dumps({"labels": "nodule,cardiomegaly"}))
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / "colour.png")  # RGB, other size
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(images / "deep.png")  # 16-bit
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(images / "plain.jpg")
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("ignored: not an image file")

    code = explain.main([str(run / "model_best.keras"), str(images), "--out", str(tmp_path / "out"), "--sanity"])
    out = capsys.readouterr()
    assert code == 1 and "broken.png: unreadable" in out.err and "randomisation test nodule" in out.out
    table = pd.read_csv(tmp_path / "out" / "predictions.csv").set_index("file")
    assert sorted(table.index) == ["broken.png", "colour.png", "deep.png", "plain.jpg"]
    assert table.loc[["colour.png", "deep.png", "plain.jpg"], ["p_nodule", "p_cardiomegaly"]].stack().between(0, 1).all()
    for stem in ("colour", "deep", "plain"):
        for label in ("nodule", "cardiomegaly"):
            assert (tmp_path / "out" / f"{stem}__{label}.png").is_file()


def test_explain_says_when_a_folder_has_no_images(tmp_path, capsys):
    build_model("lightcnn", (32, 32, 1), 1, 1e-3).save(tmp_path / "m.keras")
    assert explain.main([str(tmp_path / "m.keras"), str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "no .png, .jpg or .jpeg files" in capsys.readouterr().err
