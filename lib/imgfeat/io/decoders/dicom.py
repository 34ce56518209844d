"""DICOM with pydicom: bytes -> one model input per image (or per selected slice of a multi-frame object).

Pixel values go through the DICOM chain: stored values -> Rescale Slope/Intercept (modality values, HU for
CT) -> the VOI LUT or Window Centre/Width (``preprocess.dicom.window``) -> 0..255, MONOCHROME1 inverted; colour
(RGB, YBR_*) arrives as RGB from pydicom. Compressed transfer syntaxes decode through the pylibjpeg plugins
(JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE); a syntax no installed plugin decodes, and objects
without pixel data, are errors with a message naming the syntax and what would decode it. The metadata columns
carry no identifier: ``patient_key``, ``study_key`` and ``series_key`` are HMACs of PatientID and the study and
series instance UIDs (which lead back to the hospital's archive) with the configured secret.

Under the decoding budget (``budget``): rows x columns x frames x samples x bytes per sample is checked before any
pixel is decoded (a deflated dataset's inflated size too), only the chosen frames are decoded (``index=``; the
projection iterates frame by frame), in their stored type until chosen. Modality values that are NaN or infinite
(float pixel data, or a rescale that overflows) are ``decode_failed``; a malformed optional attribute (Pixel
Spacing, Window Center/Width, a VOI LUT) becomes a null column or falls back to the value range.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import math
import struct
from collections.abc import Iterator
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
    nonfinite_error,
)
from imgfeat.io.decoders.budget import Inflater, check_decoded_bytes, max_inflated_bytes
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


def keyed_id(value: str | None, secret: str | None) -> str | None:
    """HMAC-SHA256(secret, value), 24 hex characters; None without a value or without a secret."""
    if not value or not secret:
        return None
    return hmac.new(secret.encode("utf-8"), str(value).encode("utf-8"), hashlib.sha256).hexdigest()[:24]


def _text(ds: Any, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
        return None if value is None or value == "" else (str(value).strip() or None)
    except Exception:  # a value pydicom cannot convert: as if absent
        return None


def _int(ds: Any, keyword: str) -> int | None:
    try:
        return int(ds[keyword].value) if keyword in ds else None
    except Exception:
        return None


def _spacing(ds: Any) -> list[float] | None:
    """Pixel Spacing (else Imager Pixel Spacing) in mm; None when absent or malformed (e.g. '0.1\\0,1')."""
    try:
        spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
        values = [float(v) for v in spacing] if spacing else None
    except Exception:
        return None
    return values if values and all(math.isfinite(v) for v in values) else None


def metadata(ds: Any, secret: str | None, label_tag: str | None = None) -> dict[str, Any]:
    """The metadata columns: no names, IDs, UIDs or dates, only keyed hashes; malformed values are null."""
    return {
        "modality": _text(ds, "Modality"),
        "study_key": keyed_id(_text(ds, "StudyInstanceUID"), secret),
        "series_key": keyed_id(_text(ds, "SeriesInstanceUID"), secret),
        "body_part": _text(ds, "BodyPartExamined"),
        "view_position": _text(ds, "ViewPosition"),
        "pixel_spacing": _spacing(ds),
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "bits_stored": _int(ds, "BitsStored"),
        "photometric": _text(ds, "PhotometricInterpretation"),
        "patient_key": keyed_id(_text(ds, "PatientID"), secret),
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


def _first_float(value: Any) -> float:
    return float(value[0] if hasattr(value, "__len__") and not isinstance(value, str) else value)


def _file_window(ds: Any) -> tuple[float, float] | None:
    """The file's first Window Center / Width; None when absent, malformed or unusable (width <= 1)."""
    try:
        centre, width = _first_float(ds.WindowCenter), _first_float(ds.WindowWidth)
    except Exception:
        return None
    return (centre, width) if math.isfinite(centre) and math.isfinite(width) and width > 1 else None


def _intensities(values: np.ndarray, ds: Any, options: DecodeOptions) -> np.ndarray:
    """Modality values (one frame or a projection) -> 0..255 by the window setting; MONOCHROME1 inverted. A VOI
    LUT or window that cannot be read falls back to the value range."""
    from pydicom.pixels import apply_voi_lut

    setting = (options.dicom_window or "auto").strip().lower()
    window = parse_window(setting)
    out = None
    if window is not None:
        out = apply_window(values, *window)
    elif setting == "auto" and "VOILUTSequence" in ds:
        try:
            lut = np.asarray(apply_voi_lut(values, ds, prefer_lut=True), dtype=np.float64)
            out = rescale_range(lut) if np.isfinite(lut).all() else None
        except Exception:
            out = None
    elif setting == "auto" and "WindowCenter" in ds:
        file_window = _file_window(ds)
        out = apply_window(values, *file_window) if file_window else None
    if out is None:
        out = rescale_range(values)
    if _text(ds, "PhotometricInterpretation") == "MONOCHROME1":
        out = 255.0 - out
    return out


# Value representations whose explicit-VR length field is 4 bytes (after 2 reserved ones).
_LONG_VRS = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_DEFLATED = b"1.2.840.10008.1.2.1.99"


def _deflated_body(data: bytes) -> int | None:
    """Where the deflated dataset starts when the file meta group names the Deflated transfer syntax, else None."""
    pos, syntax = (132 if data[128:132] == b"DICM" else 0), b""
    while pos + 8 <= len(data) and data[pos:pos + 2] == b"\x02\x00":
        element, vr = struct.unpack_from("<H", data, pos + 2)[0], data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            length, start = (struct.unpack_from("<I", data, pos + 8)[0] if pos + 12 <= len(data) else 0), pos + 12
        else:
            length, start = struct.unpack_from("<H", data, pos + 6)[0], pos + 8
        if element == 0x0010:
            syntax = data[start:start + length].rstrip(b"\x00 ")
        pos = start + length
    return pos if syntax == _DEFLATED else None


def _check_deflated(data: bytes, options: DecodeOptions) -> None:
    """A Deflated Explicit VR dataset (which pydicom inflates whole on reading) must inflate within the budget."""
    start = _deflated_body(data)
    if start is not None:
        Inflater(data[start:], max_inflated_bytes(options), wbits=-15).skip(max_inflated_bytes(options) + 1)


def decode_dicom(data: bytes, options: DecodeOptions, secret: str | None = None,
                 label_tag: str | None = None) -> list[DecodedImage]:
    """The images of one DICOM stream; a DecodeError carries the metadata read before the failure."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    _check_deflated(data, options)
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


def _frame_count(ds: Any, meta: dict[str, Any], options: DecodeOptions) -> int:
    """Number of frames, once rows x columns x frames x samples x bytes per sample pass the budget."""
    rows, columns = meta["rows"] or 0, meta["columns"] or 0
    if rows * columns > options.max_pixels:
        raise DecodeError(TOO_LARGE, f"{columns}x{rows} = {rows * columns} pixels exceeds preprocess.max_pixels="
                                     f"{options.max_pixels} (decompression-bomb guard)")
    raw = ds.get("NumberOfFrames")
    try:
        frames = max(1, int(raw)) if raw not in (None, "") else 1
    except (TypeError, ValueError):
        raise DecodeError(DECODE_FAILED, f"Number of Frames {raw!r} is not a number") from None
    samples, bits = _int(ds, "SamplesPerPixel") or 1, _int(ds, "BitsAllocated") or 8
    check_decoded_bytes(rows * columns * frames * samples * max(1, -(-bits // 8)),
                        f"{frames} frame(s) of {columns}x{rows}x{samples} samples at {bits} bits", options)
    return frames


def _decoded_frames(ds: Any, indices: list[int] | None) -> Iterator[np.ndarray]:
    """The frames at ``indices`` (None: every frame, one at a time), as pydicom decodes them, stored type."""
    from pydicom.pixels import iter_pixels, pixel_array

    try:
        if indices is None:
            yield from iter_pixels(ds)
        else:
            for k in indices:
                yield pixel_array(ds, index=k)
    except (NotImplementedError, RuntimeError) as exc:
        raise _syntax_error(ds, exc) from None
    except (ValueError, EOFError, OSError, IndexError) as exc:
        text = str(exc)
        error = TRUNCATED if any(w in text.lower() for w in ("truncat", "shorter", "less than", "missing", "end of")) else DECODE_FAILED
        raise DecodeError(error, f"the DICOM pixel data could not be read: {type(exc).__name__}: {text[:200]}") from None


def _modality_values(frame: np.ndarray, ds: Any, where: str) -> np.ndarray:
    """Stored values -> modality values (Rescale Slope / Intercept, or the Modality LUT), float64, all finite."""
    from pydicom.pixels import apply_rescale

    values = frame.astype(np.float64)
    rescaled = "RescaleSlope" in ds or "RescaleIntercept" in ds
    if rescaled:
        try:
            if ds.get("ModalityLUTSequence"):
                values = np.asarray(apply_rescale(values, ds), dtype=np.float64)
            elif "RescaleSlope" in ds and "RescaleIntercept" in ds:  # as pydicom's apply_rescale, in place
                with np.errstate(over="ignore", invalid="ignore"):
                    values *= float(ds.RescaleSlope)
                    values += float(ds.RescaleIntercept)
        except Exception as exc:
            raise DecodeError(DECODE_FAILED, f"Rescale Slope {_text(ds, 'RescaleSlope')!r} / Intercept "
                                             f"{_text(ds, 'RescaleIntercept')!r} cannot be applied ({type(exc).__name__}: "
                                             f"{str(exc)[:120]}): the modality values (e.g. HU) are unknown") from None
    if frame.dtype.kind not in "fc" and not rescaled:
        return values  # integers are finite
    hint = ("the file's float pixel data holds missing values: replace them in the source" if frame.dtype.kind == "f"
            else f"Rescale Slope {_text(ds, 'RescaleSlope')} / Intercept {_text(ds, 'RescaleIntercept')} send them out "
                 "of range: check those attributes")
    error = nonfinite_error(values, where, hint)
    if error:
        raise error
    return values


def _planes(ds: Any, frames: int, options: DecodeOptions) -> Iterator[tuple[int | None, np.ndarray, bool]]:
    """(slice index or None, plane, colour): grey planes in modality values, colour ones as decoded."""
    picks = select_slices(frames, options.volume) if frames > 1 else [0]
    if picks is not None:
        for k, frame in zip(picks, _decoded_frames(ds, picks), strict=True):
            colour = frame.ndim == 3
            where = f"frame {k}" if frames > 1 else "the image"
            yield (k if frames > 1 else None), (frame if colour else _modality_values(frame, ds, where)), colour
        return
    projection, colour = None, False
    for k, frame in enumerate(_decoded_frames(ds, None)):  # maximum intensity projection, frame by frame
        colour = frame.ndim == 3
        plane = frame if colour else _modality_values(frame, ds, f"frame {k}")
        projection = plane if projection is None else np.maximum(projection, plane)
    yield None, projection, colour


def _images(ds: Any, meta: dict[str, Any], options: DecodeOptions) -> list[DecodedImage]:
    import pydicom

    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = _text(ds, "SOPClassUID")
        name = getattr(ds.get("SOPClassUID"), "name", sop)
        raise DecodeError(NO_PIXEL_DATA, f"the DICOM object has no pixel data (SOP class {name}; modality "
                                         f"{meta['modality'] or 'unknown'})")
    frames = _frame_count(ds, meta, options)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian  # preamble-less streams
    out = []
    for index, plane, colour in _planes(ds, frames, options):
        if colour:
            top = float(np.iinfo(plane.dtype).max) if plane.dtype.kind == "u" else None
            prepared = rescale_range(plane, 0, top)
        else:
            prepared = _intensities(plane, ds, options)
        out.append(DecodedImage(to_model_input(prepared, options), int(meta["columns"] or plane.shape[1]),
                                int(meta["rows"] or plane.shape[0]), meta["photometric"] or "", DICOM,
                                slice_index=index, meta=meta))
    return out
