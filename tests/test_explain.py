"""The on-demand Grad-CAM command on a saved model and a folder of mixed files: images of other modes and sizes, a
DICOM file, a corrupt file, a note and a DICOM object that holds no image; every one is listed."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from PIL import Image
from pydicom.data import get_testdata_file

from common.model import build_model
from server import explain


def test_explain_writes_pictures_and_predictions_and_lists_every_file_it_left_out(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    build_model("lightcnn", (32, 32, 1), 2, 1e-3).save(run / "model_best.keras")
    (run / "config.json").write_text(json.dumps({"labels": "nodule,cardiomegaly", "threshold": 0.3}))
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(images / "colour.png")  # RGB, another shape
    Image.fromarray(rng.integers(0, 65535, (32, 32), dtype=np.uint16)).save(images / "deep.png")  # 16-bit
    Image.fromarray(rng.integers(0, 256, (64, 64), dtype=np.uint8)).save(images / "sub" / "plain.jpg")
    (images / "ct").write_bytes(open(get_testdata_file("CT_small.dcm", download=False), "rb").read())  # DICOM, no extension
    (images / "plan.dcm").write_bytes(open(get_testdata_file("rtplan.dcm", download=False), "rb").read())
    (images / "broken.png").write_bytes(b"not an image")
    (images / "notes.txt").write_text("not an image file")
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")  # what a Mac leaves in an exported folder
    (images / ".thumbnails").mkdir()
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(images / ".thumbnails" / "t.png")

    code = explain.main([str(run / "model_best.keras"), str(images), "--out", str(tmp_path / "out"), "--sanity"])
    out = capsys.readouterr()
    assert code == 1 and "randomisation test nodule" in out.out and "|rho|" in out.out
    assert "broken.png: unreadable: not a PNG, JPEG or DICOM file" in out.err and "notes.txt: unreadable" in out.err
    assert "plan.dcm: not an image: a DICOM RT Plan Storage object" in out.err
    assert ".DS_Store: passed over: a hidden or operating-system file" in out.err and ".thumbnails: passed over: a hidden folder" in out.err
    assert "4 image(s) explained, 3 file(s) left out, 2 hidden or system file(s) passed over" in out.out
    table = pd.read_csv(tmp_path / "out" / "predictions.csv")
    assert list(table.columns) == ["file", "status", "p_nodule", "p_cardiomegaly", "called_nodule", "called_cardiomegaly", "reason"]
    table = table.set_index("file")
    assert sorted(table.index) == [".DS_Store", ".thumbnails", "broken.png", "colour.png", "ct", "deep.png", "notes.txt", "plan.dcm", "sub/plain.jpg"]
    explained = ["colour.png", "ct", "deep.png", "sub/plain.jpg"]
    assert (table.loc[explained, "status"] == "explained").all()
    assert table.loc[explained, ["p_nodule", "p_cardiomegaly"]].stack().between(0, 1).all()
    assert (table.loc[explained, "called_nodule"] == (table.loc[explained, "p_nodule"] >= 0.3)).all()  # the run's threshold
    for stem in ("colour", "deep", "sub__plain", "ct"):
        for label in ("nodule", "cardiomegaly"):
            assert (tmp_path / "out" / f"{stem}__{label}.png").is_file()


def test_explain_says_when_a_folder_has_no_files(tmp_path, capsys):
    build_model("lightcnn", (32, 32, 1), 1, 1e-3).save(tmp_path / "m.keras")
    (tmp_path / "empty").mkdir()
    assert explain.main([str(tmp_path / "m.keras"), str(tmp_path / "empty"), "--out", str(tmp_path / "out")]) == 2
    assert "no files" in capsys.readouterr().err
