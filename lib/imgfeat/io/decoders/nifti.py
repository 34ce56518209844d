"""NIfTI-1/2 volumes (``.nii``, ``.nii.gz``) with nibabel -> one model input per selected axial slice.

Every volume is first turned to nibabel's closest canonical orientation (RAS+), so that the third axis runs
inferior -> superior and "axial" means the same for every file; a slice is shown as radiologists view it
(anterior up, the patient's right on the image's left). 4D volumes use their first volume. Intensities: the
window setting in the volume's own units (HU for CT), else its 0.5-99.5 percentile range.
"""

from __future__ import annotations

import gzip
import io

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
from imgfeat.io.decoders.volumes import apply_window, parse_window, rescale_range, select_slices, to_model_input


def _header_is_nifti(head: bytes) -> bool:
    if len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        return True
    return len(head) >= 8 and head[4:8] in (b"n+2\x00", b"ni2\x00")


def is_nifti(data: bytes) -> bool:
    """A NIfTI-1/2 header, possibly gzip-compressed."""
    if data[:2] == b"\x1f\x8b":
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as fh:
                return _header_is_nifti(fh.read(352))
        except (OSError, EOFError):
            return False
    return _header_is_nifti(data[:352])


def decode_nifti(data: bytes, options: DecodeOptions) -> list[DecodedImage]:
    import nibabel as nib

    try:
        raw = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        image = (nib.Nifti2Image if raw[4:8] in (b"n+2\x00", b"ni2\x00") else nib.Nifti1Image).from_bytes(raw)
        image = nib.as_closest_canonical(image)
        shape = image.shape
        if len(shape) < 3:
            raise DecodeError(DECODE_FAILED, f"the NIfTI image has {len(shape)} dimensions; a volume needs 3 or 4")
        if shape[0] * shape[1] > options.max_pixels:
            raise DecodeError(TOO_LARGE, f"{shape[0]}x{shape[1]} slices exceed preprocess.max_pixels={options.max_pixels}")
        volume = np.asarray(image.dataobj[..., 0] if len(shape) > 3 else image.dataobj, dtype=np.float64)
        while volume.ndim > 3:
            volume = volume[..., 0]
    except DecodeError:
        raise
    except (OSError, EOFError, ValueError, gzip.BadGzipFile) as exc:
        raise DecodeError(TRUNCATED, f"the NIfTI data is truncated or corrupt: {type(exc).__name__}: {str(exc)[:200]}") from None
    except Exception as exc:  # nibabel's own header errors
        raise DecodeError(DECODE_FAILED, f"nibabel could not read the NIfTI file: {type(exc).__name__}: {str(exc)[:200]}") from None
    window = parse_window(options.dicom_window)
    finite = volume[np.isfinite(volume)]
    low, high = (np.percentile(finite, [0.5, 99.5]) if finite.size else (0.0, 0.0))
    picks = select_slices(volume.shape[2], options.volume)
    planes = [(None, volume.max(axis=2))] if picks is None else [(k, volume[:, :, k]) for k in picks]
    zooms = [float(z) for z in image.header.get_zooms()[:2]]
    meta = {"modality": None, "rows": int(volume.shape[1]), "columns": int(volume.shape[0]), "pixel_spacing": zooms,
            "photometric": None, "bits_stored": None}
    out = []
    for index, plane in planes:
        plane = np.nan_to_num(plane)
        # RAS: plane is (x: towards the patient's right, y: towards anterior); show anterior up and the patient's
        # right on the image's left (the radiological convention, as DICOM axial images are displayed).
        shown = plane.T[::-1, ::-1]
        values = apply_window(shown, *window) if window else rescale_range(shown, float(low), float(high))
        out.append(DecodedImage(to_model_input(values, options), int(shown.shape[1]), int(shown.shape[0]),
                                f"{image.get_data_dtype()}", NIFTI, slice_index=index, meta=meta))
    return out
