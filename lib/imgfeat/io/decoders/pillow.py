"""Photographic formats with Pillow: bytes -> HxWx3 array in 0..255 (uint8 from 8-bit images, float32 from
high-bit-depth ones), or a classified DecodeError.

Pure Pillow + NumPy (no Spark, no TensorFlow) so it runs the same in a UDF, a test or a script.
"""

from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from imgfeat.io.decoders.base import (
    DECODE_FAILED,
    EMPTY_FILE,
    NOT_AN_IMAGE,
    TOO_LARGE,
    TRUNCATED,
    UNSUPPORTED_FORMAT,
    DecodedImage,
    DecodeError,
    DecodeOptions,
    nonfinite_error,
)

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}
_HIGH_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")

# Never decode a partial image as if it were whole.
ImageFile.LOAD_TRUNCATED_IMAGES = False


def _to_rgb_or_float(img: Image.Image, high_bit_depth: str) -> Image.Image:
    """Return an 'RGB', 'L' (8-bit) or 'F' (float 0..255) image; alpha composited over black. A float image
    with a NaN or infinite pixel is ``decode_failed``."""
    mode = img.mode
    if mode in ("RGB", "L"):
        return img
    if mode == "1":
        return img.convert("L")
    if mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
        mode = img.mode
    if mode == "PA":
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La"):
        base = "RGB" if mode.startswith("RGB") else "L"
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        return Image.alpha_composite(background, rgba).convert(base)
    if mode in _HIGH_BIT_MODES:
        arr = np.asarray(img).astype(np.float32)
        error = nonfinite_error(arr, f"this {mode} image", "a float image with missing values: replace them in the "
                                                            "source (e.g. with 0) or leave the file out")
        if error:  # never a silent black (minmax over NaN) or all-NaN input
            raise error
        if high_bit_depth == "minmax":
            lo, hi = float(arr.min()), float(arr.max())
            scaled = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        else:
            full = 65535.0 if mode.startswith("I;16") else (255.0 if mode == "F" else 4294967295.0)
            scaled = np.clip(arr, 0, full) * (255.0 / full)
        return Image.fromarray(scaled.astype(np.float32), mode="F")
    # CMYK, YCbCr, LAB, HSV, I;16 variants Pillow knows how to convert, ...
    return img.convert("RGB")


def resize(img: Image.Image, size: int, mode: str, resample: int) -> Image.Image:
    """stretch: to a square ignoring aspect; crop: Pillow's ``ImageOps.fit`` (centre crop to the aspect, then
    resize); pad: ``ImageOps.pad`` (resize within the square, letterboxed on black)."""
    if img.size == (size, size):
        return img
    if mode == "crop":
        return ImageOps.fit(img, (size, size), method=resample, centering=(0.5, 0.5))
    if mode == "pad":
        return ImageOps.pad(img, (size, size), method=resample, color=0, centering=(0.5, 0.5))
    return img.resize((size, size), resample=resample)


def decode_image(data: bytes | None, options: DecodeOptions) -> DecodedImage:
    """Decode ``data`` into a (size, size, 3) array in 0..255 (``model_array``); raise DecodeError otherwise."""
    if data is None or len(data) == 0:
        raise DecodeError(EMPTY_FILE, "the file is empty (0 bytes)")
    # Pillow's own bomb guard uses this limit (warning above it, error above twice it).
    Image.MAX_IMAGE_PIXELS = options.max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in options.formats:
                raise DecodeError(
                    UNSUPPORTED_FORMAT,
                    f"format {fmt} is not enabled; supported: {', '.join(options.formats)} "
                    "(setting preprocess.formats)",
                )
            width, height = img.size
            if width * height > options.max_pixels:
                raise DecodeError(
                    TOO_LARGE,
                    f"{width}x{height} = {width * height} pixels exceeds preprocess.max_pixels="
                    f"{options.max_pixels} (decompression-bomb guard)",
                )
            source_mode = img.mode
            if fmt in ("JPEG", "MPO") and options.jpeg_draft and img.mode in ("RGB", "L", "CMYK", "YCbCr"):
                # DCT-domain downscale: the result stays >= the requested size on both sides.
                img.draft(img.mode, (options.size, options.size))
            orientation = img.getexif().get(0x0112, 1)
            img.load()
            img = ImageOps.exif_transpose(img)
            if orientation in (5, 6, 7, 8):  # rotated by 90 or 270 degrees
                width, height = height, width
            arr = model_array(img, options)
    except DecodeError:
        raise
    except UnidentifiedImageError:
        raise DecodeError(NOT_AN_IMAGE, "the bytes are not an image Pillow can identify") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeError(TOO_LARGE, f"decompression-bomb guard: {exc}") from None
    except OSError as exc:
        text = str(exc)
        if "truncated" in text.lower() or "broken data stream" in text.lower() or "unexpected end" in text.lower():
            raise DecodeError(TRUNCATED, f"the image data is truncated or corrupt: {text}") from None
        raise DecodeError(DECODE_FAILED, f"decoding failed: {text}") from None
    except (ValueError, SyntaxError, EOFError, MemoryError, IndexError, TypeError, KeyError) as exc:
        raise DecodeError(DECODE_FAILED, f"decoding failed: {type(exc).__name__}: {exc}") from None
    return DecodedImage(arr, int(width), int(height), source_mode, fmt)


def model_array(img: Image.Image, options: DecodeOptions) -> np.ndarray:
    """A decoded Pillow image -> (size, size, 3) in 0..255: modes to RGB/L/F, then the one resize.

    8-bit images stay uint8 (a quarter of float32's bytes on their way to the model, and to a GPU); high-bit-depth
    ones (mode F after scaling) are float32.
    """
    img = _to_rgb_or_float(img, options.high_bit_depth)
    resized = resize(img, options.size, options.resize_mode, RESAMPLE[options.resample])
    arr = np.asarray(resized, dtype=np.float32 if resized.mode == "F" else np.uint8)
    return np.repeat(arr[:, :, None], 3, axis=2) if arr.ndim == 2 else arr

