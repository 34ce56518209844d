"""JPEGs decoded on the GPU in batches (nvJPEG, through ``torchvision.io.decode_jpeg``) and resized there.

``inference.jpeg_decoder: nvjpeg`` (torch engine, CUDA device). Only the JPEGs whose GPU decode means what the
Pillow path means go to the device: 8-bit greyscale or RGB, no EXIF rotation, within ``max_pixels``, and a
resampling the device has (nearest, bilinear, bicubic; with antialiasing, which is Pillow's downscaling filter).
Everything else (other formats, CMYK, rotated files) and every JPEG that nvJPEG refuses is handed back as None:
the caller decodes it with Pillow, so error classes are exactly those of the CPU path and nothing is lost.

The device code (``DeviceJpegDecoder`` with any ``decode_jpeg``) runs on the CPU too: the tests drive it there
with a Pillow stand-in for nvJPEG.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from imgfeat.io.decoders import DecodeOptions

# Resampling filters the device resize has, as torch.nn.functional.interpolate modes.
DEVICE_RESAMPLE = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}
JPEG_MAGIC = b"\xff\xd8\xff"

# decode_jpeg(list of 1-D uint8 CPU tensors) -> list of (3, h, w) uint8 tensors on the device; raises if any fails.
JpegBatchDecode = Callable[[list[Any]], list[Any]]


@dataclass(frozen=True)
class JpegHeader:
    width: int
    height: int
    mode: str  # L | RGB


def device_header(data: bytes | None, options: DecodeOptions) -> JpegHeader | None:
    """The header of a JPEG the device may decode (read lazily by Pillow: no pixels), else None."""
    if not data or data[:3] != JPEG_MAGIC or "JPEG" not in options.formats or options.resample not in DEVICE_RESAMPLE:
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format != "JPEG" or img.mode not in ("L", "RGB"):
                return None
            width, height = img.size
            if width * height > options.max_pixels or img.getexif().get(0x0112, 1) != 1:
                return None
            return JpegHeader(int(width), int(height), img.mode)
    except Exception:
        return None  # Pillow's own decode will classify it


def nvjpeg_decode(device: Any) -> JpegBatchDecode:
    """torchvision's batched nvJPEG decode onto ``device`` (RGB output, greyscale expanded)."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception as exc:
        raise RuntimeError(
            "inference.jpeg_decoder=nvjpeg needs torchvision (its nvJPEG binding) importable next to torch in every "
            f"Python worker: pip install the torchvision that matches this torch ({type(exc).__name__}: {exc}); "
            "or set inference.jpeg_decoder=pillow") from None

    def decode(tensors: list[Any]) -> list[Any]:
        return list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))

    return decode


def pillow_decode(tensors: list[Any]) -> list[Any]:
    """A CPU stand-in for nvJPEG with its contract (full-resolution RGB, raises on a bad file): for tests."""
    import numpy as np
    import torch
    from PIL import Image

    out = []
    for t in tensors:
        with Image.open(io.BytesIO(t.numpy().tobytes())) as img:
            img.load()
            out.append(torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1).contiguous())
    return out


class DeviceJpegDecoder:
    """JPEG bytes -> (3, size, size) uint8 tensors on the device, resized as ``DecodeOptions`` say."""

    def __init__(self, options: DecodeOptions, device: Any, decode_jpeg: JpegBatchDecode | None = None):
        self.options, self.device = options, device
        self._decode = decode_jpeg or nvjpeg_decode(device)

    def header(self, data: bytes | None) -> JpegHeader | None:
        return device_header(data, self.options)

    def decode(self, blobs: Sequence[bytes]) -> list[Any]:
        """One tensor per blob, or None where the device refused it (the caller decodes that one with Pillow)."""
        import torch

        tensors = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in blobs]
        try:
            images: list[Any] = list(self._decode(tensors))
        except Exception:  # one bad file fails nvJPEG's whole batch: find it one by one
            images = []
            for t in tensors:
                try:
                    images.append(self._decode([t])[0])
                except Exception:
                    images.append(None)
        return [None if img is None else self.resize(img.to(self.device)) for img in images]

    def resize(self, img: Any) -> Any:
        """(c, h, w) uint8 -> (3, size, size) uint8 on the device: stretch, crop (centre, to the square) or pad
        (letterboxed on black), as ``imgfeat.io.decoders.pillow.resize`` does."""
        import torch
        import torch.nn.functional as F

        if img.shape[0] == 1:
            img = img.expand(3, -1, -1)
        size, mode = self.options.size, self.options.resize_mode
        _, h, w = img.shape
        if mode == "crop" and h != w:
            side = min(h, w)
            top, left = (h - side) // 2, (w - side) // 2
            img = img[:, top:top + side, left:left + side]
            h = w = side
        target = (size, size)  # (height, width) of the resized image
        if mode == "pad" and h != w:
            target = (max(1, round(h / w * size)), size) if w > h else (size, max(1, round(w / h * size)))
        if (h, w) != target:
            how = DEVICE_RESAMPLE[self.options.resample]
            kwargs = {} if how == "nearest-exact" else {"antialias": True, "align_corners": False}
            img = F.interpolate(img[None].float(), size=target, mode=how, **kwargs)[0].round_().clamp_(0, 255)
            img = img.to(torch.uint8)
        if target != (size, size):
            canvas = torch.zeros((3, size, size), dtype=torch.uint8, device=img.device)
            top, left = round((size - target[0]) / 2), round((size - target[1]) / 2)  # as ImageOps.pad
            canvas[:, top:top + target[0], left:left + target[1]] = img
            img = canvas
        return img.contiguous()
