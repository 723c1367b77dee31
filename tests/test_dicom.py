"""DICOM written by other software: the test files pydicom itself ships (offline, never downloaded), read or refused
one by one, and as a hospital's folder where the odd ones must not stop the site."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom.data import get_testdata_file

from common.config import parse_run_config
from common.data_check import check_site
from common.errors import DataError, NotAnImage
from common.images import read_image, sniff
from common.site_data import load_site
from common.site_file import load_site_config


def _shipped(name: str) -> Path:
    """One of pydicom's own test files, from the installed package only."""
    path = get_testdata_file(name, download=False)
    assert path is not None, f"pydicom no longer ships {name}"
    return Path(path)


@pytest.mark.parametrize(
    "name, shape, mode",
    [
        ("examples_palette.dcm", (350, 800), "DICOM PALETTE COLOR 8-bit"),  # palette indices through the file's colour table
        ("MR_small_jpeg_ls_lossless.dcm", (64, 64), "DICOM MONOCHROME2 16-bit"),  # JPEG-LS lossless
        ("JPEGLSNearLossless_16.dcm", (50, 10), "DICOM MONOCHROME2 16-bit"),  # JPEG-LS near-lossless
        ("SC_rgb_jpeg_gdcm.dcm", (100, 100), "DICOM RGB 8-bit"),  # JPEG Lossless, first-order prediction (SV1)
        ("JPGExtended.dcm", (1024, 256), "DICOM MONOCHROME2 12-bit"),  # 12-bit JPEG
        ("MR_small_jp2klossless.dcm", (64, 64), "DICOM MONOCHROME2 16-bit"),  # JPEG 2000 lossless
        ("JPEG2000.dcm", (1024, 256), "DICOM MONOCHROME2 16-bit"),  # JPEG 2000
        ("GDCMJ2K_TextGBR.dcm", (400, 400), "DICOM YBR_RCT 8-bit"),  # a JPEG 2000 Pillow cannot read
        ("MR_small_RLE.dcm", (64, 64), "DICOM MONOCHROME2 16-bit"),  # RLE
        ("image_dfl.dcm", (512, 512), "DICOM MONOCHROME2 8-bit"),  # deflated
        ("MR_small_bigendian.dcm", (64, 64), "DICOM MONOCHROME2 16-bit"),  # big endian
    ],
)
def test_compressed_and_colour_dicom_decode_to_the_runs_channels(name, shape, mode):
    pixels, got_mode, _, warned = read_image(_shipped(name), 1)
    assert pixels.shape == (*shape, 1) and pixels.dtype == np.float32 and got_mode == mode
    assert 0.0 <= pixels.min() and pixels.max() <= 1.0 and pixels.std() > 0.01, "an image, not a flat field"
    assert warned == []


def test_palette_colour_is_looked_up_not_read_as_grey_indices():
    path = _shipped("examples_palette.dcm")
    import pydicom

    indices = pydicom.dcmread(path).pixel_array.astype(np.float32)
    rgb = read_image(path, 3)[0]
    assert rgb.shape == (350, 800, 3) and not np.allclose(rgb.mean(axis=-1), indices / indices.max(), atol=0.05)


def test_the_12_bit_jpeg_decodes_as_the_gpl_decoder_would():
    """pydicom's GDCM plugin declines 12-bit JPEG; GDCM itself decodes it (largest difference from libjpeg: 1 of 4095)."""
    pixels = read_image(_shipped("JPGExtended.dcm"), 1, )[0]
    assert pixels.shape == (1024, 256, 1) and 0.2 < float((pixels > 0.05).mean()) < 1.0


def test_files_without_preamble_or_meta_header_are_recognised_by_content(tmp_path):
    whole = _shipped("CT_small.dcm").read_bytes()
    (tmp_path / "no-preamble").write_bytes(whole[132:])  # meta header, no preamble
    (tmp_path / "no-meta").write_bytes(whole[336:])  # the data set alone
    reference = read_image(_shipped("CT_small.dcm"), 1)[0]
    for name in ("no-preamble", "no-meta"):
        assert sniff(tmp_path / name) == "dicom"
        assert np.array_equal(read_image(tmp_path / name, 1)[0], reference)
    with pytest.raises(NotAnImage, match="RT Structure Set Storage"):
        read_image(_shipped("rtstruct.dcm"), 1)  # implicit VR, no meta header: an RT object


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n" + b"\0" * 100, b"\xff\xd8\xff\xe0" + b"\0" * 100, b"x,y\n1,2\n" * 20, b"\x08\x00" + b"\xff" * 200, b"", b"PK\x03\x04" + b"\0" * 200])
def test_other_files_are_not_taken_for_dicom(tmp_path, content):
    (tmp_path / "f").write_bytes(content)
    assert sniff(tmp_path / "f") != "dicom"


@pytest.mark.parametrize(
    "name, reason",
    [
        ("rtplan.dcm", "a DICOM RT Plan Storage object (Modality RTPLAN): not an image to classify"),
        ("rtdose_1frame.dcm", "a DICOM RT Dose Storage object (Modality RTDOSE)"),  # a dose grid: it has pixel data
        ("liver_1frame.dcm", "a DICOM Segmentation Storage object (Modality SEG)"),  # a segmentation: it has pixel data
        ("reportsi.dcm", "a DICOM Basic Text SR Storage object (Modality SR)"),
        ("waveform_ecg.dcm", "a DICOM 12-lead ECG Waveform Storage object"),
        ("ExplVR_LitEndNoMeta.dcm", "RT Ion Plan Storage"),
    ],
)
def test_objects_without_an_image_are_told_apart_from_images(name, reason):
    with pytest.raises(NotAnImage, match=re.escape(reason)):
        read_image(_shipped(name), 1)


def test_a_dicomdir_is_not_an_image():
    import pydicom.data

    dicomdir = Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "DICOMDIR"
    with pytest.raises(NotAnImage, match="a DICOMDIR"):
        read_image(dicomdir, 1)


@pytest.mark.parametrize(
    "name, reason",
    [
        ("examples_ybr_color.dcm", "a multi-frame Ultrasound Multi-frame Image Storage object \\(30 frames, JPEG Baseline"),
        ("JPEG2000-embedded-sequence-delimiter.dcm", "transfer syntax JPEG 2000 Image Compression \\(1.2.840.10008.1.2.4.91\\): the pixel data does not decode"),
        ("MR_truncated.dcm", "the pixel data does not decode \\(The number of bytes of pixel data is less than expected"),
    ],
)
def test_multi_frame_and_broken_files_are_refused_in_one_line_naming_what_they_are(name, reason):
    path = _shipped(name)
    with pytest.raises(DataError, match=reason) as caught:
        read_image(path, 1)
    assert "\n" not in str(caught.value) and str(caught.value).startswith(str(path))
    assert not isinstance(caught.value, NotAnImage)


def test_a_transfer_syntax_no_decoder_reads_is_said_in_one_line(tmp_path):
    import pydicom
    from pydicom.uid import MPEG2MPML

    ds = pydicom.dcmread(_shipped("JPEG2000.dcm"))  # encapsulated frames, now said to be MPEG-2 video
    ds.file_meta.TransferSyntaxUID = MPEG2MPML
    ds.save_as(tmp_path / "video.dcm")
    with pytest.raises(DataError, match="transfer syntax MPEG2 Main Profile / Main Level \\(1.2.840.10008.1.2.4.100\\): no installed decoder reads it$"):
        read_image(tmp_path / "video.dcm", 1)


def test_pydicoms_warnings_are_kept_with_the_file_they_are_about():
    for name, text in (("MR_small_padded.dcm", "128 bytes of excess padding"), ("SC_rgb_jpeg.dcm", "Expected explicit VR, but found implicit VR")):
        warned = read_image(_shipped(name), 1)[3]
        assert len(warned) == 1 and text in warned[0], warned


def test_a_hospital_folder_of_real_dicom_reads_its_images_and_lists_the_rest_without_stopping(tmp_path):
    """A PACS export as other software wrote it: images in many encodings, and a plan, a dose grid, a segmentation, a
    report and a DICOMDIR among them; one file broken. The odd objects are counted and listed, never a reason to stop."""
    import pydicom.data

    images = ["MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_gdcm.dcm", "MR_small_jp2klossless.dcm", "JPGExtended.dcm", "CT_small.dcm",
              "examples_palette.dcm", "MR_small_RLE.dcm", "image_dfl.dcm", "JPEG2000.dcm", "MR_small.dcm"]  # fmt: skip
    others = ["rtplan.dcm", "rtdose_1frame.dcm", "liver_1frame.dcm", "reportsi.dcm"]
    for i, name in enumerate(images):
        folder = tmp_path / "data" / ("TUMOUR" if i % 2 else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(_shipped(name), folder / f"{i:02d}")  # exported without extensions
    for name in others:
        shutil.copy(_shipped(name), tmp_path / "data" / "NORMAL" / name)
    shutil.copy(Path(pydicom.data.__file__).parent / "test_files" / "dicomdirtests" / "DICOMDIR", tmp_path / "data" / "TUMOUR" / "DICOMDIR")
    site_file = tmp_path / "site.yaml"
    site_file.write_text("name: archive\ndata-root: data\nlayout: folders\nlabels: {tumour: TUMOUR}\nnegative-folders: [NORMAL]\nval-fraction: 0.4\n")
    cfg = parse_run_config({"labels": "tumour", "image-size": 32})
    site = load_site_config(site_file)
    data = load_site(site, cfg)
    assert len(data.train) + len(data.val) == len(images)
    assert data.count("not an image") == len(others) + 1 and data.count("unreadable") == 0
    report = check_site(site, cfg)
    text = "\n".join(report.lines)
    assert report.blocking == [] and f"Files: {len(images) + len(others) + 1} found, {len(images)} images, 5 holding no image, 0 unreadable" in text
    assert "not an image: " in text and "DICOMDIR" in text and "RT Dose Storage" in text
    assert any("5 file(s) hold no image" in w for w in report.warnings)
    (tmp_path / "data" / "TUMOUR" / "broken").write_bytes(_shipped("MR_truncated.dcm").read_bytes())
    with pytest.raises(DataError, match="1 file\\(s\\) cannot be read: .*broken: transfer syntax Explicit VR Little Endian"):
        load_site(site, cfg)
