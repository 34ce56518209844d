"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) with nibabel -> one model input per selected axial slice.

Every volume is seen in nibabel's closest canonical orientation (RAS+), so that the third axis runs inferior ->
superior and "axial" means the same for every file; a slice is shown as radiologists view it (anterior up, the
patient's right on the image's left). 4D volumes use their first volume. Intensities: the window setting in the
volume's own units (HU for CT), else its 0.5-99.5 percentile range.

Under the decoding budget (``budget``): the header is parsed first (nibabel's header class on the first 348 /
540 bytes) and the volume's size checked against the bytes present (short: ``truncated``) and the budget
(``too_large``) before any array exists; a gzip stream is inflated only as far as the first volume's last byte.
Voxels stay in their stored type until a slice is chosen; only the chosen slices (or the projection) become
float64. NaN voxels (common outside a brain or body mask) become 0 and infinities the extreme values
(``numpy.nan_to_num``); a chosen slice without one finite voxel is ``decode_failed``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from imgfeat.io.decoders.base import (
    DECODE_FAILED,
    NIFTI,
    TOO_LARGE,
    TRUNCATED,
    DecodedImage,
    DecodeError,
    DecodeOptions,
)
from imgfeat.io.decoders.budget import HEADER_ALLOWANCE, Inflater, check_decoded_bytes, max_inflated_bytes
from imgfeat.io.decoders.volumes import apply_window, parse_window, rescale_range, select_slices, to_model_input

HEADER_BYTES = 540  # NIfTI-2's header; NIfTI-1's is 348


def _header_is_nifti(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00")


def is_nifti(data: bytes) -> bool:
    """A NIfTI-1/2 header, possibly gzip-compressed (a gzip stream that blows the budget before its first 352
    bytes counts as one too: gzip is only ever decoded as NIfTI, whose decoder then reports ``too_large``)."""
    if data[:2] == b"\x1f\x8b":
        try:
            return _header_is_nifti(bytes(Inflater(data, HEADER_BYTES).read(352)))
        except DecodeError as exc:
            return exc.error_class == TOO_LARGE
    return _header_is_nifti(data[:352])


def _header(head: bytes) -> Any:
    """nibabel's header object for the first bytes of a file (no voxels read)."""
    import nibabel as nib

    if len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00"):
        klass, size = nib.Nifti2Header, 540
    else:
        klass, size = nib.Nifti1Header, 348
    if len(head) < size:
        raise DecodeError(TRUNCATED, f"the NIfTI header is cut short ({len(head)} of {size} bytes)")
    try:
        header = klass(binaryblock=bytes(head[:size]), check=True)
    except Exception as exc:  # nibabel's HeaderDataError and friends
        raise DecodeError(DECODE_FAILED, f"nibabel could not read the NIfTI header: {type(exc).__name__}: "
                                         f"{str(exc)[:200]}") from None
    if bytes(header["magic"]).rstrip(b"\x00") in (b"ni1", b"ni2"):
        raise DecodeError(DECODE_FAILED, "a NIfTI .hdr header of a .hdr/.img pair: its voxels are in the .img file, "
                                         "which is not read; convert the pair to one .nii file")
    return header


def _layout(header: Any) -> tuple[tuple[int, int, int], np.dtype, int]:
    """(shape of the first volume, stored dtype, byte offset of the voxels)."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) < 3:
        raise DecodeError(DECODE_FAILED, f"the NIfTI image has {len(shape)} dimensions; a volume needs 3 or 4")
    dtype = header.get_data_dtype()
    if dtype.kind not in "biuf" or dtype.fields:
        raise DecodeError(DECODE_FAILED, f"NIfTI voxels of type {dtype} (RGB or complex) are not supported; "
                                         "convert the volume to a scalar type")
    volume = shape[:3]
    if min(volume) < 1:
        raise DecodeError(DECODE_FAILED, f"the NIfTI volume {'x'.join(map(str, shape))} has no voxels")
    return volume, dtype, int(header.get_data_offset())  # type: ignore[return-value]


def _open(data: bytes, options: DecodeOptions) -> tuple[Any, bytes | bytearray, Inflater | None]:
    """(nibabel header, the first bytes, the inflating stream after them or None for an uncompressed file)."""
    stream = Inflater(data, max_inflated_bytes(options)) if data[:2] == b"\x1f\x8b" else None
    head = stream.read(HEADER_BYTES) if stream else data[:HEADER_BYTES]
    return _header(head), head, stream


def _read_volume(data: bytes, head: bytes | bytearray, stream: Inflater | None, layout: tuple[Any, np.dtype, int],
                 options: DecodeOptions) -> np.ndarray:
    """The first volume as a read-only array in its stored type (Fortran order). An uncompressed file is checked
    against the bytes present first (``truncated``), a gzip one against the budget before inflating further."""
    shape, dtype, offset = layout
    nbytes = math.prod(shape) * dtype.itemsize
    what = f"a NIfTI volume of {'x'.join(map(str, shape))} {dtype}"
    if stream is None:
        body: Any = memoryview(data)[offset:offset + nbytes]
        if len(body) < nbytes:
            raise _short(what, nbytes, offset, len(body))
        check_decoded_bytes(nbytes, what, options)
    else:
        check_decoded_bytes(nbytes, what, options)
        if offset > HEADER_ALLOWANCE:
            raise DecodeError(TOO_LARGE, f"the NIfTI header puts the voxels at byte {offset} (over {HEADER_ALLOWANCE})")
        stream.skip(max(0, offset - len(head)))
        body = bytearray(nbytes)
        early = bytes(head[offset:offset + nbytes])  # voxels already read with the header
        body[:len(early)] = early
        present = len(early) + stream.readinto(memoryview(body)[len(early):])
        if present < nbytes:
            raise _short(what, nbytes, offset, present)
    return np.frombuffer(body, dtype=dtype, count=math.prod(shape)).reshape(shape, order="F")


def _short(what: str, nbytes: int, offset: int, present: int) -> DecodeError:
    return DecodeError(TRUNCATED, f"the NIfTI header promises {what} ({nbytes} bytes from byte {offset}); the file "
                                  f"holds {present} of them")


def _canonical(header: Any) -> tuple[list[int], list[bool]]:
    """For canonical axes x, y, z: the stored axis, and whether it runs reversed (nibabel's
    ``as_closest_canonical``; an affine without an orientation keeps the stored order)."""
    import nibabel as nib

    try:
        ornt = nib.io_orientation(header.get_best_affine())
    except Exception:  # a degenerate affine (NaN quaternion, ...)
        ornt = np.full((3, 2), np.nan)
    if np.isnan(ornt).any():
        return [0, 1, 2], [False, False, False]
    axes = [int(a) for a in np.argsort(ornt[:, 0])]
    return axes, [bool(ornt[a, 1] < 0) for a in axes]


def _plane(volume: np.ndarray, axes: list[int], flips: list[bool], k: int | None, brightest: Any) -> np.ndarray:
    """The canonical axial slice ``k`` as (x, y), stored type; ``k`` None: the projection of the voxels that are
    brightest after the scaling (``brightest``: np.fmax, or np.fmin for a negative slope; NaN voxels ignored)."""
    z = axes[2]
    if k is None:
        plane = brightest.reduce(volume, axis=z)
    else:
        plane = np.take(volume, volume.shape[z] - 1 - k if flips[2] else k, axis=z)
    rest = [a for a in range(3) if a != z]  # the plane's axes, as stored
    if axes[0] != rest[0]:
        plane = plane.T
    for i in range(2):
        if flips[i]:
            plane = np.flip(plane, axis=i)
    return plane


def _percentile_range(volume: np.ndarray) -> tuple[float, float] | None:
    """The 0.5 and 99.5 percentiles (numpy's linear method) of the finite voxels, from their order statistics
    (one copy in the stored type, never a float64 volume); None without a finite voxel."""
    flat = volume.ravel(order="K")  # a view of the stored bytes
    flat = flat[np.isfinite(flat)] if flat.dtype.kind == "f" else flat.copy()
    n = flat.size
    if n == 0:
        return None
    points = [(n - 1) * q for q in (0.005, 0.995)]
    ranks = sorted({min(int(math.floor(p)) + d, n - 1) for p in points for d in (0, 1)})
    flat.partition(ranks)
    out = []
    for p in points:
        lo = int(math.floor(p))
        a, b = float(flat[lo]), float(flat[min(lo + 1, n - 1)])
        t = p - lo
        out.append(a + (b - a) * t if t < 0.5 else b - (b - a) * (1 - t))
    return out[0], out[1]


def decode_nifti(data: bytes, options: DecodeOptions) -> list[DecodedImage]:
    try:
        header, head, stream = _open(data, options)
        layout = _layout(header)
        axes, flips = _canonical(header)
        width, height = layout[0][axes[0]], layout[0][axes[1]]
        if width * height > options.max_pixels:
            raise DecodeError(TOO_LARGE, f"{width}x{height} slices exceed preprocess.max_pixels={options.max_pixels}")
        volume = _read_volume(data, head, stream, layout, options)
    except DecodeError:
        raise
    except (OSError, EOFError, ValueError) as exc:
        raise DecodeError(TRUNCATED, f"the NIfTI data is truncated or corrupt: {type(exc).__name__}: {str(exc)[:200]}") from None
    slope, inter = header.get_slope_inter()
    slope, inter = (1.0 if slope is None else float(slope)), (0.0 if inter is None else float(inter))
    window = parse_window(options.dicom_window)
    low = high = 0.0
    if window is None:
        stored = _percentile_range(volume)
        if stored is None:
            raise DecodeError(DECODE_FAILED, f"the NIfTI volume has no finite voxel (all {volume.size} are NaN or "
                                             "infinite)")
        low, high = sorted(v * slope + inter for v in stored)
    picks = select_slices(volume.shape[axes[2]], options.volume)
    zooms = [float(z) for z in header.get_zooms()]
    meta = {"modality": None, "rows": int(height), "columns": int(width), "pixel_spacing": [zooms[axes[0]], zooms[axes[1]]],
            "photometric": None, "bits_stored": None}
    out = []
    for index in [None] if picks is None else picks:
        plane = _plane(volume, axes, flips, index, np.fmin if slope < 0 else np.fmax).astype(np.float64)
        if slope != 1.0 or inter != 0.0:
            with np.errstate(over="ignore", invalid="ignore"):
                plane *= slope
                plane += inter
        if not np.isfinite(plane).any():
            raise DecodeError(DECODE_FAILED, f"axial slice {'projection' if index is None else index} of the NIfTI "
                                             f"volume has no finite voxel (all {plane.size} are NaN or infinite)")
        plane = np.nan_to_num(plane, copy=False)
        # RAS: plane is (x: towards the patient's right, y: towards anterior); show anterior up and the patient's
        # right on the image's left (the radiological convention, as DICOM axial images are displayed).
        shown = plane.T[::-1, ::-1]
        values = apply_window(shown, *window) if window else rescale_range(shown, low, high)
        out.append(DecodedImage(to_model_input(values, options), int(shown.shape[1]), int(shown.shape[0]),
                                f"{header.get_data_dtype()}", NIFTI, slice_index=index, meta=meta))
    return out
