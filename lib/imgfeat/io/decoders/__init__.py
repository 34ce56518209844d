"""Decoding image bytes into model input: one module per format behind one entry, ``decode_file``.

The format is found from the bytes (never the file name): DICOM (``dicom``: the DICM magic, or a preamble-less
stream), NIfTI (``nifti``: its header, gzip or not), else the photographic formats Pillow knows (``pillow``:
JPEG, PNG, TIFF, ...; ``decode_image`` decodes one such image). ``base`` holds what all decoders share
(options, the decoded image, error classes); ``volumes`` windowing, slice selection and the shared resize;
``budget`` the decoding budget (bytes a file may inflate to) and a linear-time streamed gunzip; ``deadline`` the
per-file wall-clock limit (``DecodeWatchdog``, used by the Spark UDF's decode threads).
A new format: a module with ``is_<format>(bytes)`` and ``decode_<format>(bytes, options)``, and a line below.
"""

from __future__ import annotations

from imgfeat.io.decoders.base import (
    DECODE_FAILED,
    DICOM,
    EMPTY_FILE,
    ERROR_CLASSES,
    NIFTI,
    NO_PIXEL_DATA,
    NOT_AN_IMAGE,
    TIMED_OUT,
    TOO_LARGE,
    TRUNCATED,
    UNREADABLE,
    UNSUPPORTED_COMPRESSION,
    UNSUPPORTED_FORMAT,
    DecodedImage,
    DecodeError,
    DecodeOptions,
)
from imgfeat.io.decoders.dicom import decode_dicom, is_dicom
from imgfeat.io.decoders.nifti import decode_nifti, is_nifti
from imgfeat.io.decoders.pillow import decode_image


def decode_file(data: bytes | None, options: DecodeOptions, secret: str | None = None,
                label_tag: str | None = None) -> list[DecodedImage]:
    """Every model input in ``data``: one for a 2D image, one per selected slice of a volume; DecodeError else.

    ``secret`` keys DICOM patient ids (``patient_key``); it is never part of ``options``, which are recorded.
    ``label_tag``: a DICOM attribute keyword whose value goes to ``meta["label_value"]`` (dicom_tag labels).
    """
    if data is None or len(data) == 0:
        raise DecodeError(EMPTY_FILE, "the file is empty (0 bytes)")
    for name, sniff, decode in ((DICOM, is_dicom, lambda: decode_dicom(data, options, secret, label_tag)),
                                (NIFTI, is_nifti, lambda: decode_nifti(data, options))):
        if sniff(data):
            if name not in options.formats:
                raise DecodeError(UNSUPPORTED_FORMAT, f"format {name} is not enabled; supported: "
                                                      f"{', '.join(options.formats)} (setting preprocess.formats)")
            try:
                return decode()
            except DecodeError:
                raise
            except ValueError as exc:  # a setting that cannot apply (window, volume)
                raise DecodeError(DECODE_FAILED, str(exc)) from None
            except ImportError as exc:
                raise DecodeError(UNSUPPORTED_FORMAT, f"{name} files need {exc.name}, which is not installed here: "
                                                      "pip install 'imgfeat[medical]'") from None
            except Exception as exc:  # a reader's own error: never fail the batch
                raise DecodeError(DECODE_FAILED, f"{name} decoding failed: {type(exc).__name__}: {str(exc)[:200]}") from None
            except BaseException as exc:  # a codec plugin's Rust panic (pyo3's PanicException is a BaseException)
                if isinstance(exc, (KeyboardInterrupt, SystemExit)):
                    raise
                raise DecodeError(DECODE_FAILED, f"{name} decoding failed in a codec plugin: {type(exc).__name__}: "
                                                 f"{str(exc)[:200]}") from None
    return [decode_image(data, options)]

def decode_or_error(data: bytes | None, options: DecodeOptions, secret: str | None = None,
                    label_tag: str | None = None) -> list[DecodedImage] | DecodeError:
    """``decode_file``, with any failure returned as this input's DecodeError (one file never fails a batch)."""
    try:
        return decode_file(data, options, secret, label_tag)
    except DecodeError as exc:
        return exc
    except Exception as exc:
        return DecodeError(DECODE_FAILED, f"unexpected {type(exc).__name__}: {exc}")


__all__ = [
    "DECODE_FAILED", "DICOM", "EMPTY_FILE", "ERROR_CLASSES", "NIFTI", "NOT_AN_IMAGE", "NO_PIXEL_DATA", "TIMED_OUT", "TOO_LARGE",
    "TRUNCATED", "UNREADABLE", "UNSUPPORTED_COMPRESSION", "UNSUPPORTED_FORMAT", "DecodeError", "DecodeOptions",
    "DecodedImage", "decode_file", "decode_image", "decode_or_error",
]
