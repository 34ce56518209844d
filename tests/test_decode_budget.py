"""Decoding under a budget: bombs, lying headers and NaN pixels end as error rows, in bounded memory and work.

Every fixture is generated here. Peak memory is measured in a fresh subprocess per file: the child imports and
warms the decoders up, resets its peak RSS (``/proc/self/clear_refs``), decodes the file once and reports
VmHWM - VmRSS. Linear time is shown by counting the decompressor's work, never by timing.
"""

from __future__ import annotations

import functools
import gzip
import io
import json
import os
import struct
import subprocess
import sys
import threading
import zlib

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgfeat.demo.samples import dicom_bytes
from imgfeat.io.decoders import ERROR_CLASSES, DecodedImage, DecodeError, DecodeOptions, decode_file, decode_or_error
from imgfeat.io.decoders.budget import Inflater

PEAK_LIMIT_MB = 200
OPTS_16 = DecodeOptions(size=16)


# ---------------------------------------------------------------------------------------------
# Fixtures: bombs, lying headers, NaN pixels, malformed attributes


def nifti_header(shape: tuple[int, ...], dtype: str = "uint8") -> bytes:
    """A single-file NIfTI-1 header (348 bytes + the 4-byte extension flag) claiming ``shape`` of ``dtype``."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.dtype(dtype))
    header["vox_offset"] = 352
    header.set_qform(np.eye(4), code=1)
    header.set_sform(np.eye(4), code=1)
    return header.binaryblock + b"\x00" * 4


def gzip_stream(parts: list[bytes] | bytes, level: int = 9) -> bytes:
    """One gzip member of ``parts`` (written piece by piece: the inflated bytes never exist at once)."""
    out = io.BytesIO()
    with gzip.GzipFile(fileobj=out, mode="wb", compresslevel=level, mtime=0) as fh:
        for part in [parts] if isinstance(parts, bytes) else parts:
            fh.write(part)
    return out.getvalue()


def zeros_mb(mb: int) -> list[bytes]:
    return [b"\x00" * (1 << 20)] * mb


def nii_gz_inflating_bomb() -> bytes:
    """~26 kB of gzip inflating to a 26 MB all-zero uint8 volume with an honest header."""
    shape = (300, 300, 290)
    body = int(np.prod(shape))
    return gzip_stream([nifti_header(shape), *zeros_mb(body >> 20), b"\x00" * (body - (body >> 20 << 20))])


def nii_gz_lying_bomb() -> bytes:
    """The same 26 MB of zeros behind a header claiming 1000x1000x800 int16 (1.6 GB)."""
    return gzip_stream([nifti_header((1000, 1000, 800), "int16"), *zeros_mb(26)])


def small_nifti(gz: bool = True, shape: tuple[int, ...] = (12, 10, 7), seed: int = 0) -> bytes:
    from imgfeat.demo.samples import nifti_bytes

    volume = np.random.default_rng(seed).uniform(0, 1000, shape).astype(np.float32)
    return nifti_bytes(volume, np.diag([2.0, 2.0, 3.0, 1.0]), gz=gz)


def many_empty_members(n: int = 20_000) -> bytes:
    """``n`` empty gzip members, then a member holding a small valid NIfTI (quadratic for ``gzip.decompress``)."""
    return gzip.compress(b"", mtime=0) * n + small_nifti()


def lying_nifti_header() -> bytes:
    """A 352-byte ``.nii``: a header claiming 1000x1000x800 uint8 voxels, and no voxels."""
    return nifti_header((1000, 1000, 800))


def _dicom_dataset(pixels: np.ndarray, **attrs: object):
    """A Secondary Capture dataset holding ``pixels`` ((frames,) rows, columns), uncompressed."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.PatientID, ds.Modality = "PAT-0001", "OT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5", "1.2.3.4.5.6"
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8 * pixels.dtype.itemsize
    ds.HighBit, ds.PixelRepresentation = ds.BitsStored - 1, 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def rle_frames_bomb(frames: int = 8, side: int = 2048) -> bytes:
    """``frames`` frames of ``side`` x ``side`` 8-bit pixels as RLE Lossless: ~0.5 MB holding 32 MB of pixels."""
    from pydicom.uid import RLELossless

    ramp = (np.arange(side)[None, :] // 128 * 8).repeat(side, axis=0).astype(np.uint8)  # runs of 128: RLE's longest
    volume = np.stack([ramp + k for k in range(frames)])
    ds = _dicom_dataset(volume)
    ds.compress(RLELossless, volume)
    return dicom_bytes(ds)


def small_dicom(rows: int = 24, seed: int = 0, **attrs: object) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 4096, (rows, rows + 8)).astype(np.uint16)
    return dicom_bytes(_dicom_dataset(pixels, BitsStored=12, HighBit=11, **attrs))


def float_dicom_with_nan(rows: int = 32) -> bytes:
    """Float Pixel Data (a parametric map's) with one NaN."""
    from pydicom.uid import ParametricMapStorage

    values = np.linspace(0, 1, rows * rows, dtype=np.float32).reshape(rows, rows)
    values[5, 7] = np.nan
    ds = _dicom_dataset(values.view(np.uint32))
    del ds.PixelData, ds.PixelRepresentation, ds.BitsStored, ds.HighBit
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = ParametricMapStorage
    ds.FloatPixelData = values.tobytes()
    return dicom_bytes(ds)


def overflowing_rescale_dicom() -> bytes:
    """Integer pixels whose Rescale Slope sends them to infinity."""
    return small_dicom(RescaleSlope="1e308", RescaleIntercept="0")


def malformed_pixel_spacing_dicom(**attrs: object) -> bytes:
    """A good image whose PixelSpacing reads '0.1\\0,1' (a comma for the decimal point) and WindowCenter '12x4.5'."""
    data = small_dicom(PixelSpacing="0.1\\0.2", WindowCenter="1234.5", WindowWidth="400", **attrs)
    assert data.count(b"0.1\\0.2") == 1 and data.count(b"1234.5") == 1
    return data.replace(b"0.1\\0.2", b"0.1\\0,1").replace(b"1234.5", b"12x4.5")


def deflated_dicom_bomb(frames: int = 6, side: int = 4096) -> bytes:
    """A Deflated Explicit VR Little Endian object of ``frames`` x ``side``^2 16-bit zeros (201 MB) in ~200 kB:
    pydicom inflates such a dataset whole while reading it."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info
    from pydicom.uid import DeflatedExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    head = DicomBytesIO()
    head.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(head, meta, enforce_standard=True)
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID, "OT"
    ds.NumberOfFrames, ds.Rows, ds.Columns, ds.SamplesPerPixel = frames, side, side, 1
    ds.PhotometricInterpretation, ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        "MONOCHROME2", 16, 16, 15, 0)
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    nbytes = frames * side * side * 2
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    parts = [deflate.compress(body.getvalue() + b"\xe0\x7f\x10\x00OW\x00\x00" + struct.pack("<I", nbytes))]
    zeros = b"\x00" * (1 << 20)
    parts += [deflate.compress(zeros) for _ in range(nbytes >> 20)]
    return head.getvalue() + b"".join(parts) + deflate.flush()


def float_tiff_with_nan(side: int = 48) -> bytes:
    from PIL import Image

    values = np.linspace(0, 1000, side * side, dtype=np.float32).reshape(side, side)
    values[3, 4] = np.nan
    buf = io.BytesIO()
    Image.fromarray(values, "F").save(buf, "TIFF")
    return buf.getvalue()


BOMBS = {
    # name: (bytes builder, expected error class or None for a good image, options)
    "nii_gz_inflating": (nii_gz_inflating_bomb, None, {}),
    "nii_gz_lying": (nii_gz_lying_bomb, "too_large", {}),
    "gzip_many_empty_members": (many_empty_members, "too_large", {}),
    "nii_lying_header_352_bytes": (lying_nifti_header, "truncated", {}),
    "rle_8_frames_2048": (rle_frames_bomb, None, {}),
    "rle_8_frames_2048_small_budget": (rle_frames_bomb, "too_large", {"max_pixels": 5_000_000}),
    "float_tiff_one_nan": (float_tiff_with_nan, "decode_failed", {}),
    "float_dicom_one_nan": (float_dicom_with_nan, "decode_failed", {}),
    "dicom_rescale_to_infinity": (overflowing_rescale_dicom, "decode_failed", {}),
    "dicom_malformed_pixel_spacing": (malformed_pixel_spacing_dicom, None, {}),
    "dicom_deflated_201_mb": (deflated_dicom_bomb, "too_large", {"max_pixels": 20_000_000}),
}


# ---------------------------------------------------------------------------------------------
# Peak memory of one decode, in a fresh process

_CHILD = r"""
import io, json, sys
import numpy as np
from PIL import Image
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_or_error

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1])

path, options = sys.argv[1], DecodeOptions(size=32, **json.loads(sys.argv[2]))
warm = [sys.argv[3], sys.argv[4], sys.argv[5]]  # a small DICOM (RLE), NIfTI and TIFF: imports and plugins load here
for name in warm:
    decode_or_error(open(name, "rb").read(), options)
data = open(path, "rb").read()
try:
    open("/proc/self/clear_refs", "w").write("5")  # reset VmHWM to the current RSS
except OSError:
    pass  # without the reset VmHWM may be the warm-up's peak: the delta only overstates
before = status("VmRSS:")
result = decode_or_error(data, options)
peak = status("VmHWM:")
out = {"delta_mb": (peak - before) / 1024}
if isinstance(result, DecodeError):
    out.update(error_class=result.error_class, message=result.message)
else:
    out.update(shapes=[list(i.array.shape) for i in result], finite=all(bool(np.isfinite(i.array).all()) for i in result),
               meta=result[0].meta)
print(json.dumps(out, default=str))
"""


def _warm_files(tmp_path) -> list[str]:
    from PIL import Image
    from pydicom.uid import RLELossless

    ds = _dicom_dataset(np.arange(64 * 64, dtype=np.uint16).reshape(64, 64))
    ds.compress(RLELossless)
    buf = io.BytesIO()
    Image.fromarray(np.ones((8, 8), np.float32), "F").save(buf, "TIFF")
    paths = []
    for name, data in (("warm.dcm", dicom_bytes(ds)), ("warm.nii.gz", small_nifti()), ("warm.tif", buf.getvalue())):
        (tmp_path / name).write_bytes(data)
        paths.append(str(tmp_path / name))
    return paths


def decode_in_child(data: bytes, options: dict, tmp_path) -> dict:
    """Decode ``data`` in a fresh interpreter; its outcome and the peak RSS growth (MB) of the decode."""
    path = tmp_path / "input.bin"
    path.write_bytes(data)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(os.path.dirname(__file__), "..", "lib"),
                                                        os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(path), json.dumps(options), *_warm_files(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Every bomb: its error class (or a good image), in bounded memory


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_each_bomb_ends_in_its_error_class_within_the_memory_limit(name, tmp_path):
    build, expected, options = BOMBS[name]
    result = decode_in_child(build(), options, tmp_path)
    assert result.get("error_class") == expected, result
    if expected is None:
        assert result["finite"] and all(shape == [32, 32, 3] for shape in result["shapes"]), result
    assert result["delta_mb"] < PEAK_LIMIT_MB, f"{name}: decoding raised the peak RSS by {result['delta_mb']:.0f} MB"
    if name == "float_tiff_one_nan":
        assert "1 of 2304" in result["message"] and "row 3, column 4" in result["message"]
    if name == "dicom_malformed_pixel_spacing":
        assert result["meta"]["pixel_spacing"] is None and result["meta"]["rows"] == 24


# ---------------------------------------------------------------------------------------------
# The streamed gunzip: exact, capped, linear in the members


def _members(n: int, seed: int = 0) -> bytes:
    """``n`` gzip members of 2 KiB each (compressible), one after the other."""
    rng = np.random.default_rng(seed)
    return b"".join(gzip.compress(rng.integers(0, 8, 2048, dtype=np.uint8).tobytes(), mtime=0) for _ in range(n))


def test_the_gunzip_is_exact_over_many_members_and_linear_in_their_number():
    data = _members(300, seed=1) + gzip.compress(b"", mtime=0) * 10 + gzip.compress(b"x", mtime=0)
    stream = Inflater(data, cap=1 << 30)
    assert bytes(stream.read(len(data) * 100)) == gzip.decompress(data)
    work = {}
    for n in (400, 800):
        data = _members(n)
        stream = Inflater(data, cap=1 << 30)
        assert stream.skip(1 << 30) == n * 2048 and stream.members == n
        work[n] = stream.fed
        assert stream.fed < 3 * len(data)  # bytes handed to zlib: proportional to the stream
    assert work[800] < 2.2 * work[400]  # twice the members, twice the work (gzip.decompress: four times)


def test_the_gunzip_stops_at_its_cap_and_at_a_swarm_of_empty_members():
    stream = Inflater(gzip_stream(zeros_mb(64)), cap=5 << 20)
    with pytest.raises(DecodeError) as capped:
        stream.skip(64 << 20)
    assert capped.value.error_class == "too_large" and stream.produced <= (5 << 20) + Inflater.OUT_CHUNK
    stream = Inflater(many_empty_members(20_000), cap=1 << 30)
    with pytest.raises(DecodeError) as swarm:
        stream.read(352)
    assert swarm.value.error_class == "too_large" and stream.members <= 70 and stream.fed < 70 * Inflater.FEED_MIN
    with pytest.raises(DecodeError) as cut:
        Inflater(_members(8)[:3000], cap=1 << 30).skip(1 << 20)
    assert cut.value.error_class == "truncated"


# ---------------------------------------------------------------------------------------------
# NIfTI: header first, only the first volume's bytes, lazily oriented slices


def _spy_inflaters(monkeypatch) -> list[Inflater]:
    from imgfeat.io.decoders import nifti

    made: list[Inflater] = []

    class Spy(Inflater):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(nifti, "Inflater", Spy)
    return made


def test_nifti_inflates_no_further_than_the_first_volume(monkeypatch):
    made = _spy_inflaters(monkeypatch)
    shape = (12, 10, 7)
    trailing = gzip_stream([nifti_header(shape), b"\x01" * int(np.prod(shape)), *zeros_mb(26)])
    (img,) = decode_file(trailing, DecodeOptions(size=16))
    assert img.format == "NIFTI" and max(s.produced for s in made) <= 352 + int(np.prod(shape)) + 540
    made.clear()
    four_d = small_nifti(shape=(8, 6, 5, 40))  # float32: 38 kB in all, 960 bytes per volume
    assert len(decode_file(four_d, DecodeOptions(size=16, volume="slices:2"))) == 2
    assert max(s.produced for s in made) <= 352 + 8 * 6 * 5 * 4 + 540


def _reference_slices(data: bytes, options: DecodeOptions) -> list[np.ndarray]:
    """The slices as the whole-volume code made them: nibabel's canonical float64 volume, then the same steps."""
    import nibabel as nib

    from imgfeat.io.decoders.volumes import rescale_range, select_slices, to_model_input

    image = nib.as_closest_canonical(nib.Nifti1Image.from_bytes(data))
    volume = np.asarray(image.dataobj, dtype=np.float64)
    low, high = np.percentile(volume[np.isfinite(volume)], [0.5, 99.5])
    picks = select_slices(volume.shape[2], options.volume)
    planes = [volume.max(axis=2)] if picks is None else [volume[:, :, k] for k in picks]
    return [to_model_input(rescale_range(np.nan_to_num(p).T[::-1, ::-1], low, high), options) for p in planes]


@pytest.mark.parametrize("affine", [
    [[0, 0, 3.0, 0], [2.0, 0, 0, 0], [0, -2.0, 0, 0], [0, 0, 0, 1]],  # axial stored first, y reversed
    [[1.9, 0.3, 0, 0], [-0.3, 1.9, 0.2, 0], [0, -0.2, -2.9, 0], [0, 0, 0, 1]],  # oblique, z reversed
])
def test_nifti_slices_match_the_whole_volume_canonical_reference(affine):
    import nibabel as nib

    stored = np.round(np.random.default_rng(3).uniform(-500, 900, (9, 11, 13))).astype(np.int16)
    image = nib.Nifti1Image(stored, np.array(affine))
    image.header.set_slope_inter(-0.5, 10.0)  # a negative slope: the projection takes the stored minimum
    data = image.to_bytes()
    for setting in ("slices:3", "mip"):
        options = DecodeOptions(size=16, volume=setting)
        ours = decode_file(data, options)
        for a, b in zip(ours, _reference_slices(data, options), strict=True):
            np.testing.assert_allclose(a.array, b, atol=1e-4, err_msg=setting)


def test_nifti_nan_outside_a_mask_is_zero_but_an_all_nan_slice_is_an_error():
    from imgfeat.demo.samples import nifti_bytes

    volume = np.random.default_rng(4).uniform(10, 100, (10, 10, 5)).astype(np.float32)
    volume[:3] = np.nan  # outside the "body"
    volume[5, 5, 1] = np.nan  # one hole inside: the projection takes the other slices' maximum
    (middle,) = decode_file(nifti_bytes(volume), DecodeOptions(size=10))
    assert np.isfinite(middle.array).all() and middle.array.max() > 200
    (mip,) = decode_file(nifti_bytes(volume), DecodeOptions(size=10, volume="mip"))
    assert np.isfinite(mip.array).all() and (mip.array[..., 0] == 0).sum() == 3 * 10  # the hole is filled
    volume[:, :, 2] = np.nan
    with pytest.raises(DecodeError) as empty:
        decode_file(nifti_bytes(volume), DecodeOptions(size=10))
    assert empty.value.error_class == "decode_failed" and "slice 2" in empty.value.message


# ---------------------------------------------------------------------------------------------
# DICOM: frames counted, only the chosen ones decoded, malformed optional attributes harmless


def test_dicom_decodes_only_the_chosen_frames_after_the_budget(monkeypatch):
    import pydicom.pixels

    decoded: list[int | None] = []
    original = pydicom.pixels.pixel_array

    def spy(src, **kwargs):
        decoded.append(kwargs.get("index"))
        return original(src, **kwargs)

    monkeypatch.setattr(pydicom.pixels, "pixel_array", spy)
    volume = np.stack([np.full((16, 24), 100 * k, np.uint16) for k in range(9)])
    data = dicom_bytes(_dicom_dataset(volume))
    assert [i.slice_index for i in decode_file(data, DecodeOptions(size=8, volume="slices:3"))] == [0, 4, 8]
    assert decoded == [0, 4, 8]
    decoded.clear()
    with pytest.raises(DecodeError) as info:  # 9 x 16 x 24 x 2 bytes = 6912 > 4 x 1000
        decode_file(data, DecodeOptions(size=8, max_pixels=1000))
    assert info.value.error_class == "too_large" and "9 frame(s)" in info.value.message and decoded == []


def test_a_codec_plugins_panic_is_a_decode_error(monkeypatch):
    import pydicom.pixels

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic (pylibjpeg-rle on mangled RLE data)
        pass

    def panic(src, **kwargs):
        raise PanicException("index out of bounds: the len is 960 but the index is 960")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", panic)
    result = decode_or_error(small_dicom(), OPTS_16)
    assert isinstance(result, DecodeError) and result.error_class == "decode_failed" and "PanicException" in result.message


def test_malformed_optional_dicom_attributes_fall_back_and_a_malformed_rescale_is_named():
    malformed = decode_file(malformed_pixel_spacing_dicom(), DecodeOptions(size=16))[0]
    plain = decode_file(small_dicom(), DecodeOptions(size=16))[0]  # the same pixels, no window, no spacing
    np.testing.assert_array_equal(malformed.array, plain.array)  # the window that cannot be read: the value range
    assert malformed.meta["pixel_spacing"] is None
    with pytest.raises(DecodeError) as info:
        decode_file(small_dicom(RescaleSlope="1.2345", RescaleIntercept="0").replace(b"1.2345", b"1.2x45"), OPTS_16)
    assert info.value.error_class == "decode_failed" and "Rescale" in info.value.message


def test_study_and_series_uids_are_keyed_like_the_patient():
    data = small_dicom()
    (img,) = decode_file(data, OPTS_16, secret="s3cret")
    assert "study_uid" not in img.meta and "series_uid" not in img.meta
    assert len(img.meta["study_key"]) == 24 and img.meta["study_key"] != img.meta["series_key"]
    assert "1.2.3.4.5" not in " ".join(str(v) for v in img.meta.values())
    (unkeyed,) = decode_file(data, OPTS_16)
    assert unkeyed.meta["study_key"] is None and unkeyed.meta["series_key"] is None


# ---------------------------------------------------------------------------------------------
# The per-file wall-clock limit


def test_the_timeout_is_a_runtime_setting_never_recorded():
    from imgfeat.featurize.settings import decode_from_settings

    quick, slow = DecodeOptions(decode_timeout_s=5), DecodeOptions()
    assert "decode_timeout_s" not in slow.to_dict() and quick.to_dict() == slow.to_dict() and quick == slow
    assert decode_from_settings(json.dumps({"decode": quick.to_dict()})) == slow


def _spec(timeout_s: float):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.featurize.udf import FeaturizeSpec

    return FeaturizeSpec(backbone=get_backbone("tiny"), weights=None, decode=DecodeOptions(size=16, decode_timeout_s=timeout_s))


def test_a_decode_past_the_limit_is_a_timed_out_row_and_stuck_decodes_are_bounded(monkeypatch):
    from imgfeat.featurize import udf
    from imgfeat.io.decoders import deadline

    release = threading.Event()
    real = udf._decode_one

    def decode_one(data, spec):
        if bytes(data) == b"hang":
            release.wait(60)  # a decode that never ends by itself (until the test lets it)
        return real(data, spec)

    monkeypatch.setattr(udf, "_decode_one", decode_one)
    good = small_dicom()
    try:
        rows = udf.decode_rows(pd.Series([good, b"hang", good]), _spec(0.2))
        assert rows.out["error_class"] == [None, "timed_out", None]
        assert "preprocess.decode_timeout_s=0.2" in rows.out["error_message"][1] and len(rows.host) == 2
        udf.decode_rows(pd.Series([b"hang", b"hang"]), _spec(0.2))
        assert deadline.stuck_decodes() == deadline.MAX_ABANDONED
        with pytest.raises(deadline.StuckDecodes, match="still running"):  # the task fails, clearly
            udf.decode_rows(pd.Series([good]), _spec(0.2))
    finally:
        release.set()
    for thread in list(deadline._ABANDONED):
        thread.join(10)
    assert deadline.stuck_decodes() == 0
    assert udf.decode_rows(pd.Series([good]), _spec(0.2)).out["error_class"] == [None]
    assert udf.decode_rows(pd.Series([b"hang"]), _spec(0)).out["error_class"] == ["not_an_image"]  # 0: no limit


# ---------------------------------------------------------------------------------------------
# Property: random and mutated bytes never raise, never give a non-finite or misshapen image


@functools.cache
def _seeds() -> list[bytes]:
    """Valid files of every decoder: PNG (8 and 16 bits), JPEG, float TIFF, DICOM (plain, RLE 3 frames), NIfTI."""
    from PIL import Image
    from pydicom.uid import RLELossless

    gray = (np.arange(24 * 20) % 251).astype(np.uint8).reshape(24, 20)
    out = []
    for dtype, fmt in ((np.uint8, "PNG"), (np.uint8, "JPEG"), (np.uint16, "PNG"), (np.float32, "TIFF")):
        buf = io.BytesIO()
        Image.fromarray(gray.astype(dtype)).save(buf, fmt)
        out.append(buf.getvalue())
    rle = _dicom_dataset(np.stack([gray.astype(np.uint16) * k for k in range(1, 4)]))
    rle.compress(RLELossless)
    return [*out, small_dicom(), dicom_bytes(rle), small_nifti(gz=True), small_nifti(gz=False)]


@st.composite
def mutated(draw) -> bytes:
    seeds = _seeds()
    data = bytearray(seeds[draw(st.integers(0, len(seeds) - 1))])
    for _ in range(draw(st.integers(0, 8))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        del data[draw(st.integers(1, len(data))):]
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=64))
    return bytes(data)


@pytest.mark.filterwarnings("ignore")  # pydicom's warnings about mangled values
@settings(max_examples=400, deadline=None, database=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(mutated(), st.binary(max_size=600)), volume=st.sampled_from(["middle", "mip", "slices:2"]),
       max_pixels=st.sampled_from([300, 5000, 120_000_000]))
def test_any_bytes_give_finite_images_of_the_right_shape_or_a_classified_error(data, volume, max_pixels):
    result = decode_or_error(data, DecodeOptions(size=12, volume=volume, max_pixels=max_pixels))
    if isinstance(result, DecodeError):
        assert result.error_class in ERROR_CLASSES and result.message
    else:
        assert result and all(isinstance(i, DecodedImage) for i in result)
        for image in result:
            assert image.array.shape == (12, 12, 3) and np.isfinite(image.array).all()
