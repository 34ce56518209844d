"""DICOM with pydicom: bytes -> one model input per image (or per selected slice of a multi-frame object).

Pixel values go through the DICOM chain: stored values -> Rescale Slope/Intercept (modality values, HU for
CT) -> the VOI LUT or Window Centre/Width (``preprocess.dicom.window``) -> 0..255, MONOCHROME1 inverted; colour
(RGB, YBR_*) arrives as RGB from pydicom. Compressed transfer syntaxes decode through the pylibjpeg plugins
(JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE); a syntax no installed plugin decodes, and objects
without pixel data, are errors with a message naming the syntax and what would decode it. The metadata columns
carry no patient identifier: ``patient_key`` is an HMAC of PatientID with the configured secret.
"""

from __future__ import annotations

import hashlib
import hmac
import io
from typing import Any

import numpy as np

from imgfeat.io.decoders.base import (
    DECODE_FAILED,
    DICOM,
    NO_PIXEL_DATA,
    TOO_LARGE,
    TRUNCATED,
    UNSUPPORTED_COMPRESSION,
    DecodedImage,
    DecodeError,
    DecodeOptions,
)
from imgfeat.io.decoders.volumes import apply_window, parse_window, rescale_range, select_slices, to_model_input

# Packages that decode each family of transfer syntaxes (for error messages).
PLUGINS = {
    "JPEG 2000": "pylibjpeg-openjpeg (or python-gdcm)",
    "JPEG-LS": "pylibjpeg-libjpeg (or python-gdcm)",
    "JPEG": "pylibjpeg-libjpeg (or python-gdcm)",
    "RLE": "pylibjpeg-rle",
    "Deflate": "pydicom itself (zlib)",
}


def is_dicom(data: bytes) -> bool:
    """The 'DICM' magic after the 128-byte preamble, or a preamble-less stream starting with a group 0002/0008 tag."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    return len(data) >= 8 and data[:2] in (b"\x02\x00", b"\x08\x00") and data[2:4] in (b"\x00\x00", b"\x01\x00", b"\x05\x00",
                                                                                          b"\x10\x00", b"\x16\x00", b"\x18\x00")


def patient_key(patient_id: str | None, secret: str | None) -> str | None:
    """HMAC-SHA256(secret, PatientID), 24 hex characters; None without an ID or without a secret."""
    if not patient_id or not secret:
        return None
    return hmac.new(secret.encode("utf-8"), str(patient_id).encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def _text(ds: Any, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip() or None


def metadata(ds: Any, secret: str | None, label_tag: str | None = None) -> dict[str, Any]:
    """The metadata columns (no names, IDs or dates of the patient: only the keyed ``patient_key``)."""
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    return {
        "modality": _text(ds, "Modality"),
        "study_uid": _text(ds, "StudyInstanceUID"),
        "series_uid": _text(ds, "SeriesInstanceUID"),
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "pixel_spacing": [float(v) for v in spacing] if spacing else None,
        "rows": int(ds.Rows) if "Rows" in ds else None,
        "columns": int(ds.Columns) if "Columns" in ds else None,
        "bits_stored": int(ds.BitsStored) if "BitsStored" in ds else None,
        "photometric": _text(ds, "PhotometricInterpretation"),
        "patient_key": patient_key(_text(ds, "PatientID"), secret),
        "label_value": _text(ds, label_tag) if label_tag else None,
    }


def _syntax_error(ds: Any, exc: Exception) -> DecodeError:
    syntax = ds.file_meta.TransferSyntaxUID
    family = next((k for k in PLUGINS if k in syntax.name), None)
    try:
        from pydicom.pixels import get_decoder

        installed = ", ".join(sorted(get_decoder(syntax).available_plugins)) or "none"
    except Exception:
        installed = "none"
    hint = f"; decoders for it: {PLUGINS[family]}" if family else ""
    return DecodeError(UNSUPPORTED_COMPRESSION,
                       f"transfer syntax {syntax.name} ({syntax}) could not be decoded (installed pydicom plugins for it: "
                       f"{installed}){hint}; error: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")


def _intensities(values: np.ndarray, ds: Any, options: DecodeOptions) -> np.ndarray:
    """Modality values (one frame or a projection) -> 0..255 by the window setting; MONOCHROME1 inverted."""
    from pydicom.pixels import apply_voi_lut

    setting = (options.dicom_window or "auto").strip().lower()
    window = parse_window(setting)
    if window is not None:
        out = apply_window(values, *window)
    elif setting == "auto" and ("VOILUTSequence" in ds or "WindowCenter" in ds):
        if "VOILUTSequence" in ds:
            out = rescale_range(apply_voi_lut(values, ds, prefer_lut=True))
        else:
            centre, width = ds.WindowCenter, ds.WindowWidth
            centre = float(centre[0] if hasattr(centre, "__len__") and not isinstance(centre, str) else centre)
            width = float(width[0] if hasattr(width, "__len__") and not isinstance(width, str) else width)
            out = apply_window(values, centre, width) if width > 1 else rescale_range(values)
    else:
        out = rescale_range(values)
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        out = 255.0 - out
    return out


def decode_dicom(data: bytes, options: DecodeOptions, secret: str | None = None,
                 label_tag: str | None = None) -> list[DecodedImage]:
    """The images of one DICOM stream; a DecodeError carries the metadata read before the failure."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError) as exc:
        raise DecodeError(TRUNCATED, f"not a readable DICOM stream: {type(exc).__name__}: {str(exc)[:200]}") from None
    meta = metadata(ds, secret, label_tag)
    try:
        return _images(ds, meta, options)
    except DecodeError as exc:
        exc.meta = meta
        raise


def _images(ds: Any, meta: dict[str, Any], options: DecodeOptions) -> list[DecodedImage]:
    import pydicom
    from pydicom.pixels import apply_rescale

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = _text(ds, "SOPClassUID")
        name = getattr(ds.get("SOPClassUID"), "name", sop)
        raise DecodeError(NO_PIXEL_DATA, f"the DICOM object has no pixel data (SOP class {name}; modality "
                                         f"{meta['modality'] or 'unknown'})")
    rows, columns = meta["rows"] or 0, meta["columns"] or 0
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * columns > options.max_pixels:
        raise DecodeError(TOO_LARGE, f"{columns}x{rows} = {rows * columns} pixels exceeds preprocess.max_pixels="
                                     f"{options.max_pixels} (decompression-bomb guard)")
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # preamble-less streams
    try:
        pixels = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        raise _syntax_error(ds, exc) from None
    except (ValueError, EOFError, OSError, IndexError) as exc:
        text = str(exc)
        error = TRUNCATED if any(w in text.lower() for w in ("truncat", "shorter", "less than", "missing", "end of")) else DECODE_FAILED
        raise DecodeError(error, f"the DICOM pixel data could not be read: {type(exc).__name__}: {text[:200]}") from None
    colour = pixels.ndim == (4 if frames > 1 else 3)
    volume = pixels if frames > 1 else pixels[None]
    if not colour:
        volume = apply_rescale(volume.astype(np.float64), ds) if "RescaleSlope" in ds or "RescaleIntercept" in ds \
            else volume.astype(np.float64)
    picks = select_slices(volume.shape[0], options.volume) if frames > 1 else [0]
    planes = [(None, volume.max(axis=0))] if picks is None else [(i if frames > 1 else None, volume[i]) for i in picks]
    out = []
    for index, plane in planes:
        prepared = rescale_range(plane, 0, float(np.iinfo(pixels.dtype).max) if pixels.dtype.kind == "u" else None) \
            if colour else _intensities(plane, ds, options)
        out.append(DecodedImage(to_model_input(prepared, options), int(columns), int(rows), meta["photometric"] or "",
                                DICOM, slice_index=index, meta=meta))
    return out
