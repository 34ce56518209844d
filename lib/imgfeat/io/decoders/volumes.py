"""From medical pixel values to model input: windowing, slice selection and the resize every decoder shares.

Values reaching ``apply_window`` / ``rescale_range`` must be finite (the decoders reject or replace NaN and
infinities first, each by its own policy); ``to_model_input`` refuses a non-finite result rather than pass on
a NaN image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from imgfeat.io.decoders.base import DECODE_FAILED, DecodeError, DecodeOptions, nonfinite_error

# CT presets in Hounsfield units: (centre, width).
WINDOW_PRESETS = {"lung": (-600.0, 1500.0), "mediastinum": (50.0, 350.0), "bone": (400.0, 1800.0)}


def parse_window(setting: str) -> tuple[float, float] | None:
    """(centre, width) for ``C,W`` or a preset; None for auto / none."""
    text = (setting or "auto").strip().lower()
    if text in ("auto", "none"):
        return None
    if text in WINDOW_PRESETS:
        return WINDOW_PRESETS[text]
    try:
        centre, width = (float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"preprocess.dicom.window={setting!r}: use auto, none, lung, mediastinum, bone or C,W "
                         "(centre and width, e.g. -600,1500)") from None
    if not (np.isfinite(centre) and np.isfinite(width) and width > 1):
        raise ValueError(f"preprocess.dicom.window={setting!r}: the centre must be a number and the width > 1")
    return centre, width


def _finite(values: np.ndarray) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)  # no copy of a float64 plane
    error = nonfinite_error(x, "the plane", "the decoder should have rejected or replaced them")
    if error:
        raise error
    return x


def apply_window(values: np.ndarray, centre: float, width: float) -> np.ndarray:
    """DICOM's linear VOI function (PS3.3 C.11.2.1.2) onto 0..255 (finite values; overflow clips)."""
    x = _finite(values)
    with np.errstate(over="ignore", invalid="ignore"):
        out = x - (centre - 0.5)  # then in place: one float64 plane, however large
        out /= width - 1
        out += 0.5
        out *= 255.0
    return np.clip(out, 0.0, 255.0, out=out).astype(np.float32)


def rescale_range(values: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """Linear onto 0..255 between ``low`` and ``high`` (default: the array's own minimum and maximum; finite
    values; a constant array is black)."""
    x = _finite(values)
    lo = float(np.min(x)) if low is None else low
    hi = float(np.max(x)) if high is None else high
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.float32)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        scale = 255.0 / (hi - lo)
        if np.isfinite(hi - lo) and np.isfinite(scale) and scale > 0:
            out = x - lo
            out *= scale
        else:  # a span too wide or too narrow for float64: halve everything first
            out = (x / 2 - lo / 2) / (hi / 2 - lo / 2) * 255.0
    return np.clip(out, 0.0, 255.0, out=out).astype(np.float32)


def select_slices(n: int, setting: str) -> list[int] | None:
    """Axial slice indices for ``preprocess.volume`` (None = a maximum intensity projection)."""
    text = (setting or "middle").strip().lower()
    if text == "middle":
        return [n // 2]
    if text == "mip":
        return None
    if text.startswith("slices:"):
        try:
            count = int(text.split(":", 1)[1])
        except ValueError:
            count = 0
        if count < 1:
            raise ValueError(f"preprocess.volume={setting!r}: slices:N needs N >= 1")
        return sorted({int(round(i)) for i in np.linspace(0, n - 1, min(count, n))})
    raise ValueError(f"preprocess.volume={setting!r}: use middle, mip or slices:N")


def to_model_input(plane: np.ndarray, options: DecodeOptions) -> np.ndarray:
    """A 2D (grey, 0..255) or (h, w, 3) RGB plane -> (size, size, 3) float32, resized like the Pillow path."""
    from imgfeat.io.decoders.pillow import RESAMPLE, resize

    try:
        if plane.ndim == 3:
            img = Image.fromarray(np.clip(plane, 0, 255).astype(np.uint8), "RGB")
        else:
            img = Image.fromarray(np.ascontiguousarray(plane, dtype=np.float32), "F")
        arr = np.asarray(resize(img, options.size, options.resize_mode, RESAMPLE[options.resample]), dtype=np.float32)
    except (ValueError, TypeError, MemoryError) as exc:
        raise DecodeError(DECODE_FAILED, f"could not prepare the image: {type(exc).__name__}: {exc}") from None
    error = nonfinite_error(arr, "the resized image", "never a NaN image: report this file")
    if error:
        raise error
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return arr
