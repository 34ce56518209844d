"""What every decoder shares: the options, the decoded image, and errors as data (an error class + a message)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from imgfeat.config.schema import PreprocessConfig

# Error classes, as written to the errors table.
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
NOT_AN_IMAGE = "not_an_image"
UNSUPPORTED_FORMAT = "unsupported_format"
TOO_LARGE = "too_large"
UNREADABLE = "unreadable"
DECODE_FAILED = "decode_failed"
NO_PIXEL_DATA = "no_pixel_data"  # a DICOM object without an image (a structured report, an RT plan, ...)
UNSUPPORTED_COMPRESSION = "unsupported_compression"  # a DICOM transfer syntax no installed plugin decodes
TIMED_OUT = "timed_out"  # decoding ran past preprocess.decode_timeout_s (imgfeat.io.decoders.deadline)
ERROR_CLASSES = (EMPTY_FILE, TRUNCATED, NOT_AN_IMAGE, UNSUPPORTED_FORMAT, TOO_LARGE, UNREADABLE, DECODE_FAILED,
                 NO_PIXEL_DATA, UNSUPPORTED_COMPRESSION, TIMED_OUT)

# Formats that are not Pillow's.
DICOM = "DICOM"
NIFTI = "NIFTI"


class DecodeError(Exception):
    """An image could not be turned into model input; ``error_class`` is one of ERROR_CLASSES."""

    def __init__(self, error_class: str, message: str, meta: dict[str, Any] | None = None):
        super().__init__(message)
        self.error_class = error_class
        self.message = message
        self.meta = meta or {}  # what was read before the failure (DICOM attributes), for the errors table


# DecodeOptions fields that decide how decoding runs, not what it produces: left out of the recorded settings.
RUNTIME_ONLY = ("decode_timeout_s",)


@dataclass(frozen=True)
class DecodeOptions:
    size: int = 224
    resize_mode: str = "stretch"
    resample: str = "bilinear"
    high_bit_depth: str = "minmax"
    max_pixels: int = 120_000_000
    jpeg_draft: bool = True
    formats: tuple[str, ...] = ("JPEG", "PNG", "BMP", "TIFF", "GIF", "WEBP", "MPO", "DICOM", "NIFTI")
    # DICOM intensities: auto (the file's VOI LUT or window, else its value range) | none (value range) | C,W
    # (centre, width in modality units, e.g. HU) | lung | mediastinum | bone (CT presets in HU).
    dicom_window: str = "auto"
    # Volumes (multi-frame DICOM, NIfTI): middle (the middle axial slice) | mip (maximum intensity projection
    # along the axial axis) | slices:N (N evenly spaced axial slices, one row each).
    volume: str = "middle"
    # Wall-clock seconds one file may take to decode (0 = no limit). It never changes a pixel, so it is not
    # recorded with the rows (``to_dict``) and options that differ only in it compare equal.
    decode_timeout_s: float = dataclasses.field(default=60.0, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The recorded options: those that decide the pixels (never ``RUNTIME_ONLY``)."""
        return {**{k: v for k, v in dataclasses.asdict(self).items() if k not in RUNTIME_ONLY},
                "formats": list(self.formats)}

    @classmethod
    def from_config(cls, preprocess: PreprocessConfig, backbone_input_size: int) -> DecodeOptions:
        """The options of the ``preprocess`` settings; ``preprocess.image_size`` 0 means ``backbone_input_size``."""
        return cls(
            size=preprocess.image_size or backbone_input_size,
            resize_mode=preprocess.resize_mode,
            resample=preprocess.resample,
            high_bit_depth=preprocess.high_bit_depth,
            max_pixels=preprocess.max_pixels,
            jpeg_draft=preprocess.jpeg_draft,
            formats=tuple(f.upper() for f in preprocess.formats),
            dicom_window=preprocess.dicom.window,
            volume=preprocess.volume,
            decode_timeout_s=preprocess.decode_timeout_s,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecodeOptions:
        """The options recorded by ``to_dict`` (unknown keys are an error: they would be silently dropped)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown decode settings {sorted(unknown)}; known: {sorted(names)}")
        return cls(**{**data, "formats": tuple(data.get("formats", cls.formats))})


@dataclass
class DecodedImage:
    array: np.ndarray  # (size, size, 3), values 0..255: uint8 from 8-bit images, float32 otherwise
    width: int  # original width, after EXIF orientation
    height: int
    source_mode: str  # Pillow mode of the file, e.g. L, RGB, RGBA, P, I;16 (DICOM: its photometric interpretation)
    format: str  # detected from the bytes, e.g. JPEG, PNG, DICOM, NIFTI
    slice_index: int | None = None  # volumes: the axial slice (or None for a projection / a 2D image)
    meta: dict[str, Any] = dataclasses.field(default_factory=dict)  # DICOM / NIfTI metadata columns


def nonfinite_error(values: np.ndarray, where: str, hint: str) -> DecodeError | None:
    """A ``decode_failed`` error naming how many values of ``values`` are NaN or infinite and the first one's
    position (row, column[, ...]); None when all are finite (integer arrays always are)."""
    if values.dtype.kind not in "fc":
        return None
    bad = ~np.isfinite(values)
    count = int(np.count_nonzero(bad))
    if not count:
        return None
    first = [int(i) for i in np.unravel_index(int(np.argmax(bad)), values.shape)] + [0, 0]
    return DecodeError(DECODE_FAILED, f"{count} of {values.size} pixel values of {where} are NaN or infinite (the "
                                      f"first at row {first[0]}, column {first[1]}); {hint}")
