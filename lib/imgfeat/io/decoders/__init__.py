"""Decoding image bytes into model input: one module per format behind one entry, ``decode_image``.

``base`` holds what all decoders share (options, the decoded image, error classes); ``pillow`` decodes the
photographic formats (JPEG, PNG, TIFF, ...).
"""

from imgfeat.io.decoders.base import (
    DECODE_FAILED,
    EMPTY_FILE,
    ERROR_CLASSES,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    UNREADABLE,
    UNSUPPORTED_FORMAT,
    DecodedImage,
    DecodeError,
    DecodeOptions,
)
from imgfeat.io.decoders.pillow import decode_image

__all__ = [
    "DECODE_FAILED", "EMPTY_FILE", "ERROR_CLASSES", "NOT_AN_IMAGE", "TOO_LARGE", "TRUNCATED", "UNREADABLE",
    "UNSUPPORTED_FORMAT", "DecodeError", "DecodeOptions", "DecodedImage", "decode_image",
]
