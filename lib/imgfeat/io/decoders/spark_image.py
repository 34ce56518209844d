"""Rows of Spark's image data source (``spark.read.format("image")``): already decoded pixels, no file bytes.

The struct holds ``origin``, ``height``, ``width``, ``nChannels``, ``mode`` (an OpenCV type) and ``data``: raw
row-major bytes in OpenCV's channel order (grey, BGR or BGRA, 8 bits). They are turned into a Pillow image once
(BGR -> RGB exactly here, no re-encoding) and then prepared exactly as decoded files are (modes, alpha over
black, the one resize). Rows the source marked invalid (``dropInvalid=false``: height -1, empty data) are errors.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

from imgfeat.io.decoders.base import DECODE_FAILED, NOT_AN_IMAGE, TOO_LARGE, DecodedImage, DecodeError, DecodeOptions

IMAGE_FIELDS = ("origin", "height", "width", "nChannels", "mode", "data")
SPARK_IMAGE = "SPARK_IMAGE"  # the ``format`` of such rows


def is_image_struct(fields: list[str]) -> bool:
    return set(IMAGE_FIELDS) <= set(fields)


def decode_spark_image(row: Any, options: DecodeOptions) -> DecodedImage:
    """One image-source row (a mapping or pandas row with IMAGE_FIELDS) -> model input; DecodeError when invalid."""
    origin = row["origin"]
    height, width, channels, data = row["height"], row["width"], row["nChannels"], row["data"]
    if data is None or len(data) == 0 or height is None or height <= 0 or width <= 0:
        raise DecodeError(NOT_AN_IMAGE, f"Spark's image data source could not decode {origin} (an invalid row: "
                                        f"height {height}, width {width}, {0 if data is None else len(data)} bytes)")
    if height * width > options.max_pixels:
        raise DecodeError(TOO_LARGE, f"{width}x{height} = {width * height} pixels exceeds preprocess.max_pixels="
                                     f"{options.max_pixels} (decompression-bomb guard)")
    if channels not in (1, 3, 4) or len(data) != height * width * channels:
        raise DecodeError(DECODE_FAILED, f"{origin}: {len(data)} bytes do not hold {height}x{width}x{channels} "
                                         "8-bit pixels (only 8-bit grey, BGR and BGRA rows are supported)")
    pixels = np.frombuffer(bytes(data), dtype=np.uint8).reshape(height, width, channels)
    if channels == 1:
        img, mode = Image.fromarray(pixels[:, :, 0], "L"), "L"
    elif channels == 3:
        img, mode = Image.fromarray(np.ascontiguousarray(pixels[:, :, ::-1]), "RGB"), "RGB"  # BGR -> RGB
    else:
        img, mode = Image.fromarray(np.ascontiguousarray(pixels[:, :, [2, 1, 0, 3]]), "RGBA"), "RGBA"  # BGRA -> RGBA
    from imgfeat.io.decoders.pillow import model_array

    return DecodedImage(model_array(img, options), int(width), int(height), mode, SPARK_IMAGE)
