"""DICOM and NIfTI: real shipped test files and files written here with pydicom and nibabel."""

from __future__ import annotations

import hashlib
import hmac
import os
import shutil

import numpy as np
import pytest

from imgfeat.demo.samples import dicom_bytes, make_dicom, make_medical_samples, make_samples, nifti_bytes
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_file
from imgfeat.io.decoders.volumes import apply_window

from conftest import tiny_config

OPTS = DecodeOptions(size=64)


def _pydicom_file(name: str) -> str:
    """A test file shipped inside the pydicom package (never downloaded)."""
    import pydicom

    path = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files", name)
    assert os.path.isfile(path), path
    return path


def _resized(plane: np.ndarray, size: int = 64) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.fromarray(plane.astype(np.float32), "F").resize((size, size), Image.Resampling.BILINEAR))


def test_monochrome1_is_inverted_and_the_rescale_applies():
    rng = np.random.default_rng(0)
    ds1 = make_dicom("mono1_12bit_rescaled", rng)
    stored = ds1.pixel_array.astype(np.float64)
    modality = stored * 0.5 - 100  # RescaleSlope 0.5, RescaleIntercept -100
    expected = 255 - (modality - modality.min()) * 255 / (modality.max() - modality.min())  # MONOCHROME1: invert
    (img,) = decode_file(dicom_bytes(ds1), OPTS)
    np.testing.assert_allclose(img.array[..., 0], _resized(expected), atol=0.05)
    assert img.meta["photometric"] == "MONOCHROME1" and img.meta["bits_stored"] == 12


def test_signed_ct_in_hounsfield_units_with_windows():
    rng = np.random.default_rng(1)
    ds = make_dicom("ct_hu", rng)
    hu = ds.pixel_array.astype(np.float64) - 1024  # signed stored values + intercept -1024
    for setting, (centre, width) in (("lung", (-600, 1500)), ("40,400", (40, 400)), ("auto", (-600, 1500))):
        (img,) = decode_file(dicom_bytes(ds), DecodeOptions(size=64, dicom_window=setting))
        np.testing.assert_allclose(img.array[..., 0], _resized(apply_window(hu, centre, width)), atol=0.05, err_msg=setting)
    # The window is the DICOM linear function: the centre maps to mid-grey, the window's ends to 0 and 255.
    assert apply_window(np.array([-600.0]), -600, 1500)[0] == pytest.approx(127.6, abs=0.2)
    assert apply_window(np.array([-1350.0, 150.0]), -600, 1500).tolist() == [0.0, 255.0]


def test_compressed_transfer_syntaxes_decode_like_the_uncompressed_pixels():
    rng = np.random.default_rng(2)
    for kind in ("rle", "jpeg2000"):  # lossless: identical to the stored values
        ds = make_dicom(kind, np.random.default_rng(5))
        raw = make_dicom("mono2_16bit", np.random.default_rng(5))
        (a,) = decode_file(dicom_bytes(ds), OPTS)
        (b,) = decode_file(dicom_bytes(raw), OPTS)
        np.testing.assert_allclose(a.array, b.array, atol=1e-3, err_msg=kind)
    ds = make_dicom("jpeg_baseline", rng)  # lossy JPEG: pixels as Pillow decodes the same JPEG stream
    (img,) = decode_file(dicom_bytes(ds), OPTS)
    pixels = ds.pixel_array.astype(np.float64)
    np.testing.assert_allclose(img.array[..., 0], _resized((pixels - pixels.min()) * 255 / (pixels.max() - pixels.min())), atol=0.05)
    # Real shipped files: JPEG 2000, JPEG baseline YBR (as RGB), RLE, JPEG-LS.
    for name in ("JPEG2000.dcm", "SC_rgb_jpeg_dcmtk.dcm", "MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        (img,) = decode_file(open(_pydicom_file(name), "rb").read(), OPTS)
        assert img.array.shape == (64, 64, 3) and img.array.max() > 100, name
    (rgb,) = decode_file(open(_pydicom_file("SC_rgb_jpeg_dcmtk.dcm"), "rb").read(), OPTS)
    assert np.abs(rgb.array[..., 0] - rgb.array[..., 2]).max() > 50  # colour kept (not collapsed to grey)


def test_broken_dicoms_are_classified_with_the_reason():
    with pytest.raises(DecodeError) as no_pixels:
        decode_file(open(_pydicom_file("rtplan.dcm"), "rb").read(), OPTS)
    assert no_pixels.value.error_class == "no_pixel_data" and "RT Plan" in no_pixels.value.message
    with pytest.raises(DecodeError) as undecodable:
        decode_file(open(_pydicom_file("JPEG-lossy.dcm"), "rb").read(), OPTS)
    assert undecodable.value.error_class == "unsupported_compression"
    assert "JPEG Extended" in undecodable.value.message and "1.2.840.10008.1.2.4.51" in undecodable.value.message
    assert "python-gdcm" in undecodable.value.message
    data = dicom_bytes(make_dicom("mono2_16bit", np.random.default_rng(3)))
    with pytest.raises(DecodeError) as truncated:
        decode_file(data[: len(data) - 5000], OPTS)
    assert truncated.value.error_class == "truncated"


def test_a_dicom_without_preamble_is_recognised_from_its_bytes():
    data = dicom_bytes(make_dicom("mono2_16bit", np.random.default_rng(4)))
    body = data[132:]  # drop the preamble and 'DICM'; the file meta group (0002) starts the stream
    assert body[:2] == b"\x02\x00"
    (img,) = decode_file(body, OPTS)
    assert img.format == "DICOM"


def test_volumes_middle_projection_and_slices():
    ds = make_dicom("ct_volume", np.random.default_rng(6))
    data = dicom_bytes(ds)
    assert [i.slice_index for i in decode_file(data, DecodeOptions(size=64, volume="middle"))] == [4]
    assert [i.slice_index for i in decode_file(data, DecodeOptions(size=64, volume="slices:3"))] == [0, 4, 8]
    (mip,) = decode_file(data, DecodeOptions(size=64, volume="mip", dicom_window="lung"))
    hu = ds.pixel_array.astype(np.float64) - 1024
    np.testing.assert_allclose(mip.array[..., 0], _resized(apply_window(hu.max(axis=0), -600, 1500)), atol=0.05)
    assert mip.slice_index is None


def test_nifti_axial_means_the_same_whatever_the_stored_orientation():
    import nibabel as nib
    from nibabel.testing import data_path

    rng = np.random.default_rng(7)
    volume = rng.uniform(0, 1000, (20, 16, 9)).astype(np.float32)  # x, y, z in RAS
    ras = nifti_bytes(volume, np.diag([2.0, 2.0, 3.0, 1.0]))
    # The same anatomy stored left-right and anterior-posterior flipped (an LPS affine) and with z reversed.
    flipped = volume[::-1, ::-1, ::-1].copy()
    lps = nifti_bytes(flipped, np.array([[-2.0, 0, 0, 38], [0, -2.0, 0, 30], [0, 0, -3.0, 24], [0, 0, 0, 1]]), gz=False)
    options = DecodeOptions(size=32, volume="slices:3")
    a, b = decode_file(ras, options), decode_file(lps, options)
    assert [i.slice_index for i in a] == [i.slice_index for i in b] == [0, 4, 8]
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.array, y.array, atol=1e-3)
    assert a[0].meta["pixel_spacing"] == [2.0, 2.0]
    # nibabel's own shipped files (NIfTI-1, gzip, 4D, NIfTI-2)
    for name in ("anatomical.nii", "example4d.nii.gz", "example_nifti2.nii.gz"):
        images = decode_file(open(os.path.join(data_path, name), "rb").read(), options)
        assert len(images) == 3 and all(i.format == "NIFTI" for i in images), name
    assert nib.__version__


def test_metadata_columns_and_a_keyed_patient_key():
    ds = make_dicom("mono2_16bit", np.random.default_rng(8), patient_id="PAT-0042")
    (img,) = decode_file(dicom_bytes(ds), OPTS, secret="s3cret", label_tag="BodyPartExamined")
    m = img.meta
    assert (m["modality"], m["body_part"], m["view_position"], m["rows"], m["columns"], m["bits_stored"]) == (
        "DX", "CHEST", "PA", 96, 96, 12)
    def key(value: str) -> str:
        return hmac.new(b"s3cret", value.encode(), hashlib.sha256).hexdigest()[:24]

    assert m["study_key"] == key(ds.StudyInstanceUID) and m["series_key"] == key(ds.SeriesInstanceUID)
    assert m["pixel_spacing"] == [0.143, 0.143] and m["label_value"] == "CHEST"
    assert m["patient_key"] == hmac.new(b"s3cret", b"PAT-0042", hashlib.sha256).hexdigest()[:24]
    values = " ".join(str(v) for v in m.values())
    assert "PAT-0042" not in values and "Doe" not in values and "19700101" not in values
    assert ds.StudyInstanceUID not in values and ds.SeriesInstanceUID not in values  # UIDs lead to the PACS
    (no_secret,) = decode_file(dicom_bytes(ds), OPTS)
    assert no_secret.meta["patient_key"] is None and no_secret.meta["study_key"] is None


def test_a_mixed_folder_gives_one_row_per_image_or_slice_with_metadata_and_nothing_twice(spark, tmp_path):
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.engines import engine_of, resolve_weights
    from imgfeat.featurize.extract import run_extract

    root = str(tmp_path / "mixed")
    photos = make_samples(root, per_class=2, with_bad=True)
    written = make_medical_samples(root, per_kind=2)
    broken = os.path.join(root, "NORMAL", "broken.dcm")
    data = open(written["mono2_16bit"][0], "rb").read()
    open(broken, "wb").write(data[: len(data) // 3])
    shutil.copy(_pydicom_file("rtplan.dcm"), os.path.join(root, "NORMAL", "plan_no_pixels"))  # no extension
    cfg = tiny_config(root, str(tmp_path / "features"), "preprocess.volume=slices:3", "privacy.id_salt=s3cret",
                      "input.split.group=patient_key", "input.split.mode=hash")
    first = run_extract(spark, cfg)
    n_dicom_2d = 2 * 6
    expected_rows = photos.valid + n_dicom_2d + 2 * 3 + 2 * 3  # + 2 CT volumes and 2 NIfTI volumes, 3 slices each
    feats = spark.read.parquet(cfg.output.path).toPandas()
    errors = spark.read.parquet(cfg.errors_path).toPandas()
    assert len(feats) == expected_rows and first.failed == len(photos.bad) + 2
    classes = dict(zip(errors["path"].str.rsplit("/", n=1).str[-1], errors["error_class"]))
    assert classes["broken.dcm"] == "truncated" and classes["plan_no_pixels"] == "no_pixel_data"
    plan = errors[errors["path"].str.endswith("plan_no_pixels")].iloc[0]
    assert plan["modality"] == "RTPLAN" and plan["study_key"]  # errors keep what was read before the failure
    dicom = feats[feats["format"] == "DICOM"]
    assert set(dicom["modality"]) == {"DX", "CT"} and dicom["patient_key"].notna().all()
    assert set(dicom["photometric"]) == {"MONOCHROME1", "MONOCHROME2"} and (dicom["rows"] == 96).all()
    assert (dicom.groupby("group_id")["split"].nunique() == 1).all()  # one patient, one side
    volumes = feats[feats["slice_index"].notna()]
    assert sorted(volumes.groupby("path")["slice_index"].apply(sorted).tolist()) == [[0, 3, 6]] * 2 + [[0, 4, 8]] * 2
    # train.pool_slices: one row per CT series and NIfTI volume, its slices' features pooled (issue 35).
    from imgfeat.train.aggregate import pool_slices

    pooled = pool_slices(spark.read.parquet(cfg.output.path), "mean").toPandas().set_index("path")
    assert len(pooled) == len(feats) - len(volumes) + 4 and pooled["slice_index"].isna().all()
    for path, slices in volumes.groupby("path"):
        assert pooled.loc[path, "pooled_slices"] == 3 and pooled.loc[path, "format"] == slices["format"].iloc[0]
        np.testing.assert_allclose(pooled.loc[path, "features"], np.mean(np.stack(slices["features"]), axis=0),
                                   rtol=1e-5, atol=1e-6)
    assert feats[feats["format"] == "JPEG"]["modality"].isna().all()
    for column in feats.columns:  # no raw patient identifier anywhere in the table
        if feats[column].dtype == object:
            text = " ".join(map(str, feats[column].tolist()))
            assert "PAT-0001" not in text and "Doe^Jane" not in text, column
    # The features are the model's on the windowed, resized array.
    backbone = get_backbone("tiny")
    engine = engine_of(backbone)
    model = engine.build_model(backbone, resolve_weights(backbone, "none", 42))
    ct = feats[feats["path"].str.endswith("ct_hu_00.dcm")].iloc[0]
    ds = make_dicom("ct_hu", np.random.default_rng(0))
    (img,) = decode_file(open(ct["path"].removeprefix("file:"), "rb").read(), DecodeOptions(size=32))
    expected = engine.forward(model, engine.preprocess(backbone, img.array[None]))[0]
    np.testing.assert_allclose(ct["features"], expected, rtol=1e-4, atol=1e-5)
    assert ds.Modality == "CT"
    again = run_extract(spark, cfg)
    assert again.processed == 0 and again.already_done == first.listed


def test_labels_from_a_dicom_attribute(spark, tmp_path):
    from imgfeat.featurize.extract import run_extract

    rng = np.random.default_rng(9)
    root = tmp_path / "archive"
    root.mkdir()
    for i in range(4):
        ds = make_dicom("mono2_16bit", rng)
        ds.StudyDescription = "CHEST PA" if i % 2 else "CHEST AP"
        (root / f"{i:08d}").write_bytes(dicom_bytes(ds))  # archive-style names without an extension
    cfg = tiny_config(str(root), str(tmp_path / "features"), "input.label.mode=dicom_tag",
                      "input.label.dicom_tag=StudyDescription")
    assert run_extract(spark, cfg).featurized == 4
    feats = spark.read.parquet(cfg.output.path).toPandas()
    assert sorted(feats["label"]) == ["CHEST AP", "CHEST AP", "CHEST PA", "CHEST PA"]
