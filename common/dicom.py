"""DICOM files as other software writes them: recognised with or without the 128-byte preamble, decoded through
pydicom's plugins (compressed transfer syntaxes through the decoder packages this project installs), palette colour
applied, objects that hold no image told apart from images, and pydicom's own warnings kept with the file's name."""

from __future__ import annotations

import logging
import struct
import threading
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from common.errors import DataError, NotAnImage
from common.site_file import DicomSettings

# Objects that carry no picture of a patient to classify, by the words of their SOP class's name (pydicom's UID
# dictionary) or their Modality: directories, segmentations, RT plans, structures and dose grids, reports, states.
NOT_IMAGE_CLASS_WORDS = (
    "Directory", "Segmentation", "RT Dose", "RT Structure", "RT Plan", "RT Ion Plan", "RT Beams", "RT Brachy", "RT Treatment",
    "RT Physician", "RT Segment", "RT Radiation", "SR Storage", "Presentation State", "Key Object", "Raw Data", "Encapsulated",
    "Waveform", "Spectroscopy", "Registration", "Fiducials", "Surface", "Measurement", "Parametric Map", "Real World Value",
    "Color Palette", "Hanging Protocol", "Template", "Annotation", "Structured Display", "Protocol", "Inventory",
)  # fmt: skip
NOT_IMAGE_MODALITIES = {"SEG", "RTDOSE", "RTSTRUCT", "RTPLAN", "RTRECORD", "SR", "PR", "KO", "REG", "RWV", "DOC", "PLAN", "FID", "ECG"}
MEDIA_DIRECTORY = "1.2.840.10008.1.3.10"  # DICOMDIR
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"  # 12-bit lossy JPEG: pydicom's GDCM plugin declines it, GDCM itself decodes it
_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD", b"OF", b"OL", b"OV", b"OW",
    b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI", b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
}  # fmt: skip
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"UC", b"UN", b"UR", b"UT", b"SV", b"UV"}


def _elements_in_order(head: bytes, explicit: bool, wanted: int = 3) -> bool:
    """True when head starts with `wanted` plausible data elements in little endian (explicit or implicit VR): the
    first in group 0002 or 0008, tags ascending, even lengths that fit."""
    offset, previous, seen = 0, None, 0
    while seen < wanted and offset + 8 <= len(head):
        group, element = struct.unpack_from("<HH", head, offset)
        if seen == 0 and group not in (0x0002, 0x0008):
            return False
        if group not in (0x0002, 0x0008):
            return group % 2 == 0 and (group, element) > previous
        if previous is not None and (group, element) <= previous:
            return False
        vr = head[offset + 4 : offset + 6]
        if explicit:
            if vr not in _VRS:
                return False
            if vr in _LONG_VRS:
                if offset + 12 > len(head) or head[offset + 6 : offset + 8] != b"\0\0":
                    return False
                length, offset = struct.unpack_from("<I", head, offset + 8)[0], offset + 12
            else:
                length, offset = struct.unpack_from("<H", head, offset + 6)[0], offset + 8
        else:
            length, offset = struct.unpack_from("<I", head, offset + 4)[0], offset + 8
        if length == 0xFFFFFFFF:  # a sequence of undefined length (never the first element): the walk stops here
            return seen >= 1
        if length % 2 or length > 0x10000:
            return False
        offset, previous, seen = offset + length, (group, element), seen + 1
    return seen >= 1


def looks_like_dicom(head: bytes) -> bool:
    """True for the first bytes (1 KiB or more) of a DICOM file: 'DICM' after the 128-byte preamble, or, written
    without the preamble (and perhaps without meta header), data elements in little endian from group 0002 or 0008."""
    if head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[1] != 0 or head[0] not in (0x02, 0x08):
        return False
    return _elements_in_order(head, explicit=True) or _elements_in_order(head, explicit=False)


_capture = threading.local()


def _show_or_keep(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning: kept for the file being read in this thread, if any; shown as usual otherwise."""
    sink = getattr(_capture, "sink", None)
    if sink is not None:
        sink.append(str(message).strip().splitlines()[0])
    else:
        _SHOW(message, category, filename, lineno, file, line)


class _KeepHandler(logging.Handler):
    """The 'pydicom' logger's handler (warnings, and the decoder plugins' errors): kept for the file being read in this
    thread, else shown as usual."""

    def emit(self, record: logging.LogRecord) -> None:
        sink = getattr(_capture, "sink", None)
        if sink is not None:
            sink.append(record.getMessage().strip().splitlines()[0])
        else:
            logging.lastResort.handle(record)


_SHOW = warnings.showwarning
warnings.showwarning = _show_or_keep
warnings.filterwarnings("always", module=r"pydicom(\.|$)")  # each file's warnings, not only the first file's
_pydicom_log = logging.getLogger("pydicom")
_pydicom_log.addHandler(_KeepHandler(logging.WARNING))
_pydicom_log.propagate = False


@contextmanager
def _kept_warnings():
    """Collect, in this thread, pydicom's warnings and log records while a file is read; yields the list."""
    sink: list[str] = []
    _capture.sink = sink
    try:
        yield sink
    finally:
        _capture.sink = None


def _class_name(ds) -> str:
    """The object's SOP class, in words where pydicom knows it."""
    from pydicom.uid import UID

    uid = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or ""
    return UID(str(uid)).name if uid else "unknown SOP class"


def _not_an_image(ds) -> str:
    """Why a dataset holds no image to train on, or '' when it is an image."""
    meta_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "") or "")
    if meta_class == MEDIA_DIRECTORY or "DirectoryRecordSequence" in ds:
        return "a DICOMDIR (a media directory listing other files): no image"
    name, modality = _class_name(ds), str(ds.get("Modality", "") or "")
    if modality in NOT_IMAGE_MODALITIES or any(word in f" {name} " for word in NOT_IMAGE_CLASS_WORDS):
        return f"a DICOM {name} object (Modality {modality or 'not given'}): not an image to classify"
    if not any(key in ds for key in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        return f"no pixel data (a DICOM {name} object without an image, such as a structured report)"
    return ""


def _syntax(ds) -> str:
    """The file's transfer syntax, in words with its UID."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    return f"{uid.name} ({uid})" if uid else "no transfer syntax given (implicit VR little endian assumed)"


def _with_gdcm(path: Path) -> np.ndarray:
    """Stored pixel values (rows, columns[, samples]) as GDCM itself decodes them (for 12-bit JPEG, which pydicom's
    GDCM plugin declines)."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(path))
    if not reader.Read():
        raise ValueError("GDCM could not read the file")
    image = reader.GetImage()
    form = image.GetPixelFormat()
    dtype = {"UINT8": "u1", "INT8": "i1", "UINT16": "<u2", "INT16": "<i2", "UINT32": "<u4", "INT32": "<i4"}[form.GetScalarTypeAsString()]
    columns, rows = image.GetDimension(0), image.GetDimension(1)
    samples = form.GetSamplesPerPixel()
    data = np.frombuffer(image.GetBuffer().encode("utf-8", "surrogateescape"), dtype=dtype)  # python-gdcm hands bytes as str
    return data.reshape((rows, columns) + ((samples,) if samples > 1 else ()))


def _decode(ds, path: Path) -> np.ndarray:
    """The stored pixel array; a transfer syntax nothing installed decodes, or data that does not decode, becomes one
    line naming the transfer syntax."""
    said = len(_capture.sink)
    try:
        return ds.pixel_array
    except (RuntimeError, ValueError, AttributeError) as exc:  # NotImplementedError is a RuntimeError
        text = "; ".join(line.strip() for line in str(exc).strip().splitlines()) or type(exc).__name__
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        if syntax == JPEG_EXTENDED:
            try:
                pixels = _with_gdcm(path)
                del _capture.sink[said:]  # the plugins' refusals: GDCM read it after all
                return pixels
            except (ImportError, ValueError, KeyError) as fallback:
                text = f"{text}; GDCM: {fallback}"
        if isinstance(exc, NotImplementedError) or "missing dependencies" in str(exc):
            raise DataError(f"transfer syntax {_syntax(ds)}: no installed decoder reads it") from exc
        raise DataError(f"transfer syntax {_syntax(ds)}: the pixel data does not decode ({text.replace(':;', ':')})") from exc


def _first(value) -> float:
    """The first of a DICOM multi-value, or the value."""
    return float(value[0]) if hasattr(value, "__len__") and not isinstance(value, str) else float(value)


def _grey(ds, pixels: np.ndarray, settings: DicomSettings) -> np.ndarray:
    """A monochrome image (h, w) in [0, 1]: modality LUT, the window, MONOCHROME1 inverted."""
    from pydicom.pixels import apply_modality_lut

    pixels = pixels.astype(np.float32)
    if settings.rescale:
        pixels = apply_modality_lut(pixels, ds).astype(np.float32)
    window = settings.window
    if window == "file" and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if isinstance(window, tuple) and window[1] > 0:
        centre, width = window
        pixels = np.clip((pixels - (centre - width / 2)) / width, 0.0, 1.0)
    else:
        pixels = (pixels - pixels.min()) / (pixels.max() - pixels.min()) if pixels.max() > pixels.min() else np.zeros_like(pixels)
    if str(ds.get("PhotometricInterpretation", "")) == "MONOCHROME1" and settings.invert_monochrome1:
        pixels = 1.0 - pixels
    return pixels


def _colour(ds, pixels: np.ndarray) -> np.ndarray:
    """A colour image (h, w, 3) in [0, 1]: palette entries looked up in the file's colour table, RGB scaled by its bits."""
    from pydicom.pixels import apply_color_lut

    if str(ds.get("PhotometricInterpretation", "")) == "PALETTE COLOR":
        rgb = apply_color_lut(pixels, ds)  # (h, w, 3) at the table's bit depth
        bits = int(ds.get("RedPaletteColorLookupTableDescriptor", [0, 0, 16])[2]) or 16
        return rgb.astype(np.float32) / float(2**bits - 1)
    bits = int(ds.get("BitsStored", 8) or 8)
    return np.clip(pixels.astype(np.float32) / float(2**bits - 1), 0.0, 1.0)


def read_dicom(path: Path, settings: DicomSettings) -> tuple[np.ndarray, str, str, list[str]]:
    """A DICOM image as (h, w) grey or (h, w, 3) colour float32 in [0, 1], its mode, its patient ID and pydicom's
    warnings about it.

    Raises NotAnImage for a directory, segmentation, RT object, report or other object without an image to classify,
    DataError for a multi-frame or undecodable image (the message names the transfer syntax or the object's type)."""
    import pydicom

    with _kept_warnings() as warned:
        ds = pydicom.dcmread(path, force=True)  # the caller sniffed it: a file without preamble or meta header is read too
        if "TransferSyntaxUID" not in ds.file_meta:  # no meta header: the encoding the reader found
            implicit, little = ds.original_encoding
            ds.file_meta.TransferSyntaxUID = {(True, True): pydicom.uid.ImplicitVRLittleEndian, (False, True): pydicom.uid.ExplicitVRLittleEndian}.get(
                (implicit, little), pydicom.uid.ExplicitVRBigEndian
            )
        reason = _not_an_image(ds)
        if reason:
            raise NotAnImage(reason)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if frames > 1:
            raise DataError(f"a multi-frame {_class_name(ds)} object ({frames} frames, {_syntax(ds)}): expected a single image per file")
        photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
        pixels = _decode(ds, path)
        if photometric.startswith("MONOCHROME"):
            image = _grey(ds, pixels, settings)
        elif pixels.ndim == 3 or photometric == "PALETTE COLOR":
            image = _colour(ds, pixels)
        else:
            raise DataError(f"photometric interpretation {photometric!r} ({_syntax(ds)}) is not supported")
        mode = f"DICOM {photometric} {ds.get('BitsStored', '?')}-bit"
        patient = str(ds.get("PatientID", "") or "")
    return image.astype(np.float32), mode, patient, list(dict.fromkeys(warned))  # pydicom both warns and logs: once each
