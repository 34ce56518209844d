"""Build a folder mixing real X-rays (JPEG, PNG), DICOM and NIfTI, plus broken files: the formats issue's check.

    python bench/make_mixed_medical.py ../shared/data/kermany_fullres_200 /tmp/mixed_medical [--per-class 20]

- JPEG and PNG: real full-resolution Kermany X-rays (the first --per-class of each class; PNGs re-encoded).
- DICOM written from real X-rays: MONOCHROME2 12 bits in 16, MONOCHROME1 with a rescale, JPEG baseline, RLE and
  JPEG 2000 compressed; a signed CT slice in HU and a 9-frame CT volume (generated); pydicom's shipped CT, MR,
  JPEG 2000 and JPEG-LS files; an RT plan without pixel data (no extension) and a JPEG Extended file no plugin
  decodes; a truncated DICOM.
- NIfTI: nibabel's shipped anatomical.nii and example4d.nii.gz, and a generated CT-like volume.
Prints what it wrote. The source folder is only read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys

import numpy as np
from PIL import Image

from imgfeat.demo.samples import dicom_bytes, make_dicom, nifti_bytes


def _real_dicom(gray: np.ndarray, kind: str, patient: str):
    """A DICOM of a real X-ray (8-bit grey -> 12 bits) of ``kind``."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    from imgfeat.demo.samples import _dicom_dataset, jpeg_dicom

    twelve = (gray.astype(np.float32) / 255 * 4095).astype(np.uint16)
    if kind == "mono1":
        return _dicom_dataset((4095 - twelve).astype(np.uint16), "MONOCHROME1", 12, patient_id=patient,
                              RescaleSlope=1, RescaleIntercept=0)
    if kind == "jpeg":
        return jpeg_dicom(gray, patient)
    ds = _dicom_dataset(twelve, bits_stored=12, patient_id=patient)
    if kind in ("rle", "jpeg2000"):
        ds.compress(RLELossless if kind == "rle" else JPEG2000Lossless)
    return ds


def main() -> int:
    import nibabel.testing
    import pydicom

    parser = argparse.ArgumentParser()
    parser.add_argument("src")
    parser.add_argument("dst")
    parser.add_argument("--per-class", type=int, default=20)
    a = parser.parse_args()
    counts: dict[str, int] = {}

    def add(kind: str, n: int = 1) -> None:
        counts[kind] = counts.get(kind, 0) + n

    dicom_kinds = ["mono2", "mono1", "jpeg", "rle", "jpeg2000"]
    for cls in sorted(d for d in os.listdir(a.src) if os.path.isdir(os.path.join(a.src, d))):
        out = os.path.join(a.dst, cls)
        os.makedirs(out, exist_ok=True)
        for i, name in enumerate(sorted(os.listdir(os.path.join(a.src, cls)))[: a.per_class]):
            path = os.path.join(a.src, cls, name)
            stem = os.path.splitext(name)[0]
            if i % 3 == 0:
                shutil.copyfile(path, os.path.join(out, name))
                add("jpeg")
            elif i % 3 == 1:
                Image.open(path).convert("L").save(os.path.join(out, stem + ".png"))
                add("png")
            else:
                gray = np.asarray(Image.open(path).convert("L").resize((512, 512)))
                kind = dicom_kinds[(i // 3) % len(dicom_kinds)]
                with open(os.path.join(out, f"{stem}_{kind}.dcm"), "wb") as fh:
                    fh.write(dicom_bytes(_real_dicom(gray, kind, f"KER-{i:04d}")))
                add(f"dicom_{kind}")
    rng = np.random.default_rng(0)
    extra = os.path.join(a.dst, "OTHER")
    os.makedirs(extra, exist_ok=True)
    for kind in ("ct_hu", "ct_volume"):
        with open(os.path.join(extra, f"{kind}.dcm"), "wb") as fh:
            fh.write(dicom_bytes(make_dicom(kind, rng)))
        add(f"dicom_{kind}")
    shipped = os.path.join(os.path.dirname(pydicom.__file__), "data", "test_files")
    for name in ("CT_small.dcm", "MR_small.dcm", "JPEG2000.dcm", "MR_small_jpeg_ls_lossless.dcm"):
        shutil.copyfile(os.path.join(shipped, name), os.path.join(extra, name))
        add("dicom_shipped")
    shutil.copyfile(os.path.join(shipped, "rtplan.dcm"), os.path.join(extra, "rtplan_no_pixels"))
    shutil.copyfile(os.path.join(shipped, "JPEG-lossy.dcm"), os.path.join(extra, "jpeg_extended_undecodable.dcm"))
    data = dicom_bytes(make_dicom("mono2_16bit", rng))
    with open(os.path.join(extra, "truncated.dcm"), "wb") as fh:
        fh.write(data[: len(data) // 3])
    add("broken", 3)
    for name in ("anatomical.nii", "example4d.nii.gz"):
        shutil.copyfile(os.path.join(nibabel.testing.data_path, name), os.path.join(extra, name))
        add("nifti")
    volume = np.stack([np.full((64, 64), 40.0) + 900 * (rng.random((64, 64)) > 0.9) for _ in range(12)], axis=2)
    with open(os.path.join(extra, "ct_like.nii.gz"), "wb") as fh:
        fh.write(nifti_bytes(volume.astype(np.float32)))
    add("nifti")
    print(f"{a.dst}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
