"""A hospital's own data on disk: readers for every mode, site files, labels from folders and manifests, patient-level
splits, augmentation rules, bad input, and the data check."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import tensorflow as tf
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from client.check_data import main as check_data
from common.config import parse_run_config
from common.data_check import _duplicates, check_site
from common.errors import ConfigError, DataError
from common.images import read_image, sniff
from common.pipeline import augmenter, dataset
from common.site_data import load_site
from common.site_file import Augmentation, DicomSettings, load_site_config
from common.site_index import SiteFiles, index_site


def _dicom(path, pixels: np.ndarray, photometric="MONOCHROME2", patient="P1", slope=1.0, intercept=0.0, window=None, pixel_data=True):
    """Write a 12-bit grey DICOM file with pydicom; returns its path."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.PatientID, ds.Modality = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID, patient, "DX"
    if pixel_data:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
        if window is not None:
            ds.WindowCenter, ds.WindowWidth = window
        ds.PixelData = pixels.astype(np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def _ramp(size: int = 8) -> np.ndarray:
    """A left-to-right ramp (size, size) in [0, 1]."""
    return np.tile(np.linspace(0, 1, size, dtype=np.float32), (size, 1))


# --- readers -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "LA", "I;16", "JPEG"])
def test_every_picture_mode_reads_as_the_runs_channels_in_unit_range(tmp_path, mode):
    grey = Image.fromarray(np.round(_ramp(16) * 255).astype(np.uint8), "L")
    if mode == "I;16":
        path = tmp_path / "x.png"
        Image.fromarray((np.asarray(grey, np.uint16) * 16)).save(path)  # 12-bit values in a 16-bit file
    elif mode == "JPEG":
        path = tmp_path / "x.dat"  # found by content, whatever the name
        grey.convert("RGB").save(path, format="JPEG", quality=100)
    else:
        path = tmp_path / "x.png"
        grey.convert(mode).save(path)
    for channels in (1, 3):
        pixels, described, patient, _ = read_image(path, channels)
        assert pixels.shape == (16, 16, channels) and pixels.dtype == np.float32 and patient == ""
        assert 0.0 <= pixels.min() <= 0.02 and 0.98 <= pixels.max() <= 1.0, described
        assert np.all(np.diff(pixels[8, :, 0]) >= -0.02)  # still a left-to-right ramp
    assert sniff(path) == ("jpeg" if mode == "JPEG" else "png")


def test_transparent_pixels_are_flattened_onto_black(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[:2, ..., 3], rgba[2:, ..., 3] = 255, 255, 0  # white; top half opaque, bottom transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    pixels = read_image(tmp_path / "a.png", 1)[0][..., 0]
    assert np.allclose(pixels[:2], 1.0) and np.allclose(pixels[2:], 0.0)


def test_dicom_applies_rescale_and_the_files_window_and_inverts_monochrome1(tmp_path):
    stored = np.tile(np.arange(0, 4096, 512, dtype=np.uint16), (8, 1))  # (8, 8): 0 .. 3584
    # Rescale 2x - 1000 gives -1000 .. 6168; a window centred at 1000, 2000 wide maps 0 .. 2000 to 0 .. 1.
    path = _dicom(tmp_path / "a.dcm", stored, slope=2.0, intercept=-1000.0, window=(1000, 2000), patient="PAT-7")
    pixels, mode, patient, _ = read_image(path, 1)
    expected = np.clip((stored * 2.0 - 1000.0) / 2000.0, 0, 1)
    assert np.allclose(pixels[..., 0], expected, atol=1e-6) and patient == "PAT-7" and "MONOCHROME2 12-bit" in mode
    inverted = read_image(_dicom(tmp_path / "b.dcm", stored, photometric="MONOCHROME1", window=(2048, 4096)), 1)[0]
    assert inverted[0, 0, 0] == pytest.approx(1.0) and inverted[0, -1, 0] < inverted[0, 0, 0]  # low stored value = bright
    own = read_image(path, 1, DicomSettings(window=(0.0, 1000.0)))[0]  # the site's own window wins over the file's
    assert np.allclose(own[..., 0], np.clip((stored * 2.0 - 1000.0 + 500.0) / 1000.0, 0, 1), atol=1e-6)  # -500 .. 500
    plain = read_image(path, 3, DicomSettings(window="none", rescale=False))[0]
    assert plain.shape == (8, 8, 3) and np.allclose(plain[..., 0], stored / 3584.0, atol=1e-6)  # min-max of the stored values


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("notes.txt", lambda p: p.write_text("not an image"), "not a PNG, JPEG or DICOM file"),
        ("cut.png", lambda p: p.write_bytes(_png_bytes(p)[:60]), "does not decode"),
        ("report.dcm", lambda p: _dicom(p, np.zeros((2, 2)), pixel_data=False), "no pixel data"),
        ("gone.png", None, "file not found"),
    ],
)
def test_a_bad_file_is_a_data_error_naming_the_file_and_the_reason(tmp_path, name, write, reason):
    path = tmp_path / name
    if write is not None:
        write(path)
    with pytest.raises(DataError, match=reason) as caught:
        read_image(path, 1)
    assert str(path) in str(caught.value)


def _png_bytes(path) -> bytes:
    """The bytes of a small noisy PNG (written next to path, then read back)."""
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32), np.uint8), "L").save(path.with_suffix(".full.png"))
    return path.with_suffix(".full.png").read_bytes()


# --- site files and layouts ----------------------------------------------------------------------------------------


def _run(**settings):
    return parse_run_config({"image-size": 16, "labels": "pneumonia", **settings})


def _png(path, value: int, size: int = 16, mode: str = "L"):
    """A flat grey PNG with a bright square whose place depends on value (so files differ); returns its path."""
    pixels = np.full((size, size), 40, np.uint8)
    pixels[value % (size - 4) : value % (size - 4) + 4, 2:6] = 200 + value % 50
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "L").convert(mode).save(path)
    return path


def _site_yaml(folder, text: str):
    path = folder / "site.yaml"
    path.write_text(text)
    return path


def _folders_site(tmp_path, n: int = 10, extra: str = ""):
    """A class-folder site: PNEUMONIA/ and NORMAL/ with n mixed-mode, mixed-size files each."""
    modes = ["L", "RGB", "RGBA", "P"]
    for i in range(n):
        _png(tmp_path / "data" / "PNEUMONIA" / f"p{i}.png", i, 16 + 8 * (i % 3), modes[i % 4])
        _png(tmp_path / "data" / "NORMAL" / f"n{i}.png", 100 + i, 16 + 8 * (i % 2), modes[(i + 1) % 4])
    (tmp_path / "data" / "NORMAL" / ".DS_Store").write_bytes(b"\0")  # clutter is ignored
    return _site_yaml(tmp_path, f"name: st-elsewhere\ndata-root: data\nlayout: folders\nlabels: {{pneumonia: PNEUMONIA}}\nnegative-folders: [NORMAL]\n{extra}")


def test_class_folders_map_onto_the_runs_labels_and_split_reproducibly(tmp_path):
    site = load_site_config(_folders_site(tmp_path))
    files = index_site(site, ("pneumonia",))
    assert len(files) == 20 and files.labels.sum() == 10
    assert all(("PNEUMONIA" in p) == bool(y) for p, y in zip(files.paths, files.labels[:, 0]))
    data = load_site(site, _run())
    again = load_site(site, _run())
    assert len(data.train) + len(data.val) == 20 and len(data.val) == 4 and data.val.labels.sum() == 2  # stratified
    assert data.val.paths.tolist() == again.val.paths.tolist() and data.left_out.empty


def test_folders_that_do_not_match_the_site_file_are_named(tmp_path):
    path = _folders_site(tmp_path)
    (tmp_path / "data" / "EXTRA").mkdir()
    with pytest.raises(DataError, match="folder\\(s\\) EXTRA are not mapped to a label"):
        index_site(load_site_config(path), ("pneumonia",))
    (tmp_path / "data" / "EXTRA").rmdir()
    for f in (tmp_path / "data" / "PNEUMONIA").iterdir():
        f.unlink()
    with pytest.raises(DataError, match="PNEUMONIA: empty class folder"):
        index_site(load_site_config(path), ("pneumonia",))
    second = tmp_path / "second"
    _png(second / "data" / "NORMAL" / "n.png", 1)
    site = load_site_config(_site_yaml(second, "name: a\ndata-root: data\nlayout: folders\nlabels: {other: NORMAL}\n"))
    with pytest.raises(DataError, match="no folder 'pneumonia'"):  # the run's label, unmapped, is looked for by its own name
        index_site(site, ("pneumonia", "other"))


def test_a_site_file_that_maps_a_label_the_run_lacks_says_so(tmp_path):
    site = load_site_config(_folders_site(tmp_path))
    with pytest.raises(ConfigError, match="maps 'pneumonia', which the run does not have; the run's labels: lesion"):
        index_site(site, ("lesion",))


def _manifest_site(tmp_path, rows: list[tuple], columns=("file", "Pneumonia", "patient"), extra: str = ""):
    """A manifest site: images/ and labels.csv with the given rows."""
    for row in rows:
        if not str(row[0]).startswith("missing"):
            _png(tmp_path / row[0], sum(map(ord, row[0])) % 97)
    pd.DataFrame(rows, columns=columns).to_csv(tmp_path / "labels.csv", index=False)
    return _site_yaml(
        tmp_path,
        "name: manifest-site\ndata-root: .\nlayout: manifest\nmanifest: labels.csv\nimage-column: file\n"
        f"patient-column: patient\nlabels:\n  pneumonia: Pneumonia\n{extra}",
    )


def _patients_rows(n_patients: int = 12) -> list[tuple]:
    """Two images per patient; half the patients have pneumonia."""
    return [(f"images/p{p}_{k}.png", int(p % 2 == 0), f"P{p:03d}") for p in range(n_patients) for k in range(2)]


def test_a_manifest_with_patients_splits_by_patient(tmp_path):
    site = load_site_config(_manifest_site(tmp_path, _patients_rows(20)))
    data = load_site(site, _run())
    assert set(data.train.patients) & set(data.val.patients) == set()
    assert len(data.train) + len(data.val) == 40 and 0 < data.val.labels.sum() < len(data.val)
    assert load_site(site, _run()).val.paths.tolist() == data.val.paths.tolist()


def test_dicom_patient_ids_keep_a_patient_on_one_side_when_the_manifest_has_none(tmp_path):
    (tmp_path / "dcm").mkdir()
    rows = []
    for p in range(10):
        for k in range(3):
            name = f"dcm/{p}_{k}"  # no extension: found by content
            _dicom(tmp_path / name, np.full((8, 8), 100 * p + k, np.uint16), patient=f"PAT{p}")
            rows.append((name, p % 2))
    pd.DataFrame(rows, columns=["path", "finding"]).to_csv(tmp_path / "m.csv", index=False)
    site = load_site_config(_site_yaml(tmp_path, "name: dicom-site\ndata-root: .\nlayout: manifest\nmanifest: m.csv\nlabels: {pneumonia: finding}\n"))
    data = load_site(site, _run())
    assert set(data.train.patients) & set(data.val.patients) == set() and len(set(data.val.patients)) == 2


@pytest.mark.parametrize(
    "rows, columns, message",
    [
        ([("images/a.png", 1, "P1")], ("file", "Pneu", "patient"), "missing column\\(s\\) 'Pneumonia'; columns found: 'file', 'Pneu', 'patient'"),
        ([("images/a.png", 1, "P1"), ("images/b.png", "yes", "P2")], ("file", "Pneumonia", "patient"), "column 'Pneumonia' holds 'yes' on line 3"),
    ],
)
def test_a_bad_manifest_names_the_column_and_line(tmp_path, rows, columns, message):
    site = load_site_config(_manifest_site(tmp_path, rows, columns))
    with pytest.raises(DataError, match=message):
        load_site(site, _run())


def test_unreadable_files_stop_the_site_unless_it_skips_them_and_then_they_are_listed_and_counted(tmp_path):
    rows = _patients_rows(12) + [("missing/gone.png", 1, "P900"), ("images/broken.png", 0, "P901")]
    path = _manifest_site(tmp_path, rows)
    (tmp_path / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 20)  # a PNG signature, then nothing
    with pytest.raises(DataError, match="2 file\\(s\\) cannot be read: .*gone.png: file not found; .*broken.png: does not decode"):
        load_site(load_site_config(path), _run())
    (tmp_path / "site.yaml").write_text(path.read_text() + "skip-unreadable: true\n")
    skipping = load_site(load_site_config(path), _run())
    assert len(skipping.train) + len(skipping.val) == 24
    assert sorted(p.rsplit("/", 1)[1] for p in skipping.left_out["path"]) == ["broken.png", "gone.png"]
    assert set(skipping.left_out["kind"]) == {"unreadable"} and skipping.count("unreadable") == 2


@pytest.mark.parametrize(
    "text, message",
    [
        ("name: a\ndata-root: .\nlayout: folders\nlabels: {x: y}\ncolour: blue\n", "unknown key\\(s\\) colour"),
        ("name: a\ndata-root: .\nlayout: tiles\n", "'layout': 'tiles': expected one of folders, manifest, npz"),
        ("name: a\ndata-root: nowhere\nlayout: folders\n", "'data-root': folder not found"),
        ("name: a\ndata-root: .\nlayout: manifest\n", "'manifest': missing"),
        ("name: a\ndata-root: .\nlayout: folders\nlabels: {x: y}\nval-fraction: 1.5\n", "'val-fraction': 1.5 is out of range"),
        ("name: a\ndata-root: .\nlayout: folders\nlabels: {x: y}\nskip-unreadable: 'yes'\n", "'skip-unreadable': expected bool"),
        ("name: a\ndata-root: .\nlayout: folders\nlabels: {x: y}\ndicom: {window: wide}\n", "'dicom.window': expected 'file', 'none'"),
        ("name: a\ndata-root: .\nlayout: folders\nlabels: {x: y}\naugmentation: {flip: true}\n", "'augmentation': unknown key\\(s\\) flip"),
        ("name: [a\n", "not valid YAML"),
        ("- a\n- b\n", "expected a mapping of settings"),
    ],
)
def test_a_bad_site_file_names_the_file_and_the_key(tmp_path, text, message):
    path = _site_yaml(tmp_path, text)
    with pytest.raises(ConfigError, match=message) as caught:
        load_site_config(path)
    assert str(path) in str(caught.value)


# --- pipeline and augmentation -------------------------------------------------------------------------------------


def test_the_streamed_pipeline_resizes_every_file_to_the_run_input_and_keeps_order(tmp_path):
    site = load_site_config(_folders_site(tmp_path))
    data = load_site(site, _run(**{"channels": 3}))
    batches = list(dataset(data.val, _run(**{"channels": 3}), training=False))
    images = np.concatenate([b[0].numpy() for b in batches])
    assert images.shape == (len(data.val), 16, 16, 3) and 0.0 <= images.min() and images.max() <= 1.0
    for image, path in zip(images, data.val.paths):
        expected = tf.image.resize(read_image(path, 3)[0], (16, 16), antialias=True).numpy()
        assert np.allclose(image, np.clip(expected, 0, 1), atol=1e-5)


def test_horizontal_flips_are_off_unless_the_site_asks_and_augmentation_runs_in_training_only(tmp_path):
    assert augmenter(Augmentation(), seed=0) is None
    rotation = augmenter(Augmentation(rotation_degrees=10, zoom=0.1, shift=0.05, contrast=0.1, noise=0.01), seed=0)
    assert "RandomFlip" not in [type(layer).__name__ for layer in rotation.layers]
    assert "RandomFlip" in [type(layer).__name__ for layer in augmenter(Augmentation(horizontal_flip=True), seed=0).layers]
    site = load_site_config(_folders_site(tmp_path, extra="augmentation: {rotation-degrees: 15, noise: 0.05}\n"))
    assert site.augmentation.rotation_degrees == 15 and not site.augmentation.horizontal_flip
    data = load_site(site, _run())
    cfg = _run(**{"batch-size": 64})
    plain = next(iter(dataset(data.train, cfg, training=True, seed=1)))[0].numpy()
    augmented = next(iter(dataset(data.train, cfg, training=True, seed=1, augmentation=site.augmentation)))[0].numpy()
    assert plain.shape == augmented.shape and not np.allclose(plain, augmented) and augmented.min() >= 0 and augmented.max() <= 1
    evaluation = [next(iter(dataset(data.val, cfg, training=False)))[0].numpy() for _ in range(2)]
    assert np.array_equal(*evaluation)  # validation images are never augmented nor shuffled


# --- the data check ------------------------------------------------------------------------------------------------


def test_the_data_check_reports_counts_modes_sizes_duplicates_and_bad_files_and_fails_on_them(tmp_path, capsys):
    path = _folders_site(tmp_path)
    (tmp_path / "data" / "NORMAL" / "copy.png").write_bytes((tmp_path / "data" / "NORMAL" / "n0.png").read_bytes())
    (tmp_path / "data" / "NORMAL" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nbroken")
    report = check_site(load_site_config(path), _run())
    text = "\n".join(report.lines)
    assert "Files: 22 found, 21 images, 0 holding no image, 1 unreadable" in text and "bad.png: does not decode" in text
    assert "Exact duplicates: 1 group(s), 2 files" in text and "copy.png" in text
    assert "PNG RGBA" in text and "Image sizes (width x height): " in text and "widths 16-32" in text
    assert "pneumonia" in text and "Model input: batches of (16, 16, 1) float32, values 0." in text
    assert report.blocking == ["1 unreadable file(s); fix or remove them, or set skip-unreadable: true"]
    assert check_data([str(path), "-c", "image-size=16 labels=pneumonia"]) == 1
    assert "NOT READY: 1 unreadable file(s)" in capsys.readouterr().out
    (tmp_path / "data" / "NORMAL" / "bad.png").unlink()
    assert check_data([str(path), "-c", "image-size=16 labels=pneumonia"]) == 0
    assert "READY: site 'st-elsewhere'" in capsys.readouterr().out
    assert check_data([str(path), "-c", "image-size=16 labels=lesion"]) == 1  # the site does not cover the run's labels
    assert "the run does not have; the run's labels: lesion" in capsys.readouterr().out


@pytest.mark.parametrize("example", ["class-folders.yaml", "csv-manifest.yaml", "dicom.yaml", "npz.yaml", "heldout.yaml"])
def test_the_documented_example_site_files_parse(tmp_path, example):
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parent.parent / "deploy" / "sites" / example).read_text()
    text = re.sub(r"^data-root: .*$", f"data-root: {tmp_path}", text, flags=re.M)
    for name in ("labels.csv", "findings.csv", "pneumoniamnist.npz"):
        (tmp_path / name).write_text("")
    site = load_site_config(_site_yaml(tmp_path, text))
    assert site.data_root == tmp_path and site.name and not site.augmentation.horizontal_flip


def test_a_second_start_reads_only_the_files_that_changed(tmp_path):
    """In deployment every message runs in a new process: the scan is kept in the site's report-dir, keyed by each
    file's size and modification time, so an unchanged file is not decoded again and a changed one is."""
    import os

    site = load_site_config(_folders_site(tmp_path))
    first = load_site(site, _run())
    cache = pd.read_csv(site.report_dir / "scan-cache.csv", keep_default_na=False)
    assert len(cache) == 20 and (cache["kind"] == "image").all()
    assert load_site(site, _run()).val.paths.tolist() == first.val.paths.tolist()  # from the cache, the same split
    victim = tmp_path / "data" / "NORMAL" / "n3.png"
    victim.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 30)  # changed: new size and time
    with pytest.raises(DataError, match="1 file\\(s\\) cannot be read: .*n3.png: does not decode"):
        load_site(site, _run())
    _png(victim, 3)
    os.utime(victim, ns=(1, 1))  # an old time but a new size: still read again
    assert len(load_site(site, _run()).left_out) == 0


def test_duplicates_with_other_labels_or_across_the_split_are_warned_about():
    files = SiteFiles(np.array(["a.png", "b.png", "c.png", "d.png"]), np.array([[1], [0], [1], [1]], np.uint8))
    table = pd.DataFrame({"kind": ["image"] * 4, "sha256": ["x", "x", "y", "z"]})  # a and b: the same bytes, different labels
    lines, warnings = _duplicates(files, table, val_rows=np.array([1]))
    assert lines == ["Exact duplicates: 1 group(s), 2 files", "  a.png = b.png"]
    assert "different labels for the same image, e.g. a.png" in warnings[0] and "both sides of the train/validation split" in warnings[1]
    assert _duplicates(files, table, val_rows=np.array([0, 1]))[1][1:] == []  # both copies in validation: no leak
