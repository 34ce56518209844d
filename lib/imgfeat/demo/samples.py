"""Generate labelled sample images (and broken files) for the demo and the tests.

Images look vaguely like chest X-rays: two dark lung fields in a bright body. Class PNEUMONIA adds
bright patchy opacities, so classes are learnable even from random-weight features. ``realistic=True``
(the demo) varies anatomy, exposure, ribs and noise in both classes and draws the opacities' extent and
density from wide ranges (some cases are faint; some normal lungs have vessel-like spots), so that the
classes overlap the way real ones do and heads score differently.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
from PIL import Image

CLASSES = ("NORMAL", "PNEUMONIA")

# Broken-file kinds, and the error class each must end in.
BAD_FILES = {
    "empty.jpg": "empty_file",
    "truncated.jpg": "truncated",
    "not_an_image.png": "not_an_image",
    "unsupported.png": "unsupported_format",
    "bomb.png": "too_large",
}


def realistic_xray_array(rng: np.random.Generator, size: tuple[int, int], sick: bool) -> np.ndarray:
    """A float image in 0..1 with patient-to-patient variation; pneumonia is a faint-to-dense consolidation."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    shift_x, shift_y = rng.normal(0, 0.03, 2)
    body = np.exp(-(((xx - 0.5 - shift_x) / rng.uniform(0.38, 0.5)) ** 6))
    img = (0.35 + 0.45 * body) * rng.uniform(0.8, 1.1) + 0.08 * rng.standard_normal() * (yy - 0.5)
    lung_w, lung_h = rng.uniform(0.12, 0.18), rng.uniform(0.25, 0.34)
    lungs = np.zeros_like(img)
    for side in (-1, 1):
        cx = 0.5 + side * rng.uniform(0.15, 0.2) + shift_x
        lungs = np.maximum(lungs, (((xx - cx) / lung_w) ** 2 + ((yy - 0.5 - shift_y) / lung_h) ** 2 < 1.0).astype(np.float32))
    darkness = rng.uniform(0.45, 0.65)
    img = img * (1 - darkness * lungs)
    ribs = 0.04 * rng.uniform(0.5, 1.5) * np.sin(2 * np.pi * (yy * rng.uniform(9, 13) + 0.3 * np.abs(xx - 0.5)))
    img = img + ribs * lungs
    # Vessel-like spots in every lung; pneumonia adds a consolidation of random extent and density.
    for _ in range(rng.integers(2, 8)):
        cx, cy, r = rng.uniform(0.3, 0.7), rng.uniform(0.3, 0.7), rng.uniform(0.01, 0.03)
        img = img + rng.uniform(0.05, 0.15) * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r))) * lungs
    if sick:
        density = rng.uniform(0.12, 0.5)
        for _ in range(rng.integers(2, 5)):
            cx = 0.5 + rng.choice([-1, 1]) * rng.uniform(0.1, 0.22) + shift_x
            cy, r = rng.uniform(0.35, 0.75), rng.uniform(0.04, 0.12)
            patch = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
            img = img + density * patch * (0.6 + 0.4 * rng.random((h, w))) * lungs
    img = img + rng.uniform(0.02, 0.06) * rng.standard_normal((h, w))
    return np.clip(img, 0.0, 1.0)


def xray_array(rng: np.random.Generator, size: tuple[int, int], sick: bool) -> np.ndarray:
    """A float image in 0..1 of the given (width, height)."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    img = 0.75 + 0.1 * rng.standard_normal() * xx
    for cx in (0.32, 0.68):
        lung = ((xx - cx) / 0.16) ** 2 + ((yy - 0.5) / 0.3) ** 2 < 1.0
        img = np.where(lung, 0.2 + 0.05 * rng.random(), img)
    if sick:
        for _ in range(rng.integers(3, 7)):
            cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.7), rng.uniform(0.04, 0.1)
            blob = np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
            img = img + 0.6 * blob
        img = img + 0.08 * rng.standard_normal((h, w))
    else:
        img = img + 0.02 * rng.standard_normal((h, w))
    return np.clip(img, 0.0, 1.0)


def encode(arr01: np.ndarray, kind: str) -> tuple[bytes, str]:
    """Encode a 0..1 image as one of the kinds users have; returns (bytes, extension)."""
    gray8 = (arr01 * 255).astype(np.uint8)
    buf = io.BytesIO()
    if kind == "gray_jpeg":
        Image.fromarray(gray8, "L").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpg"
    if kind == "rgb_jpeg":
        Image.fromarray(np.stack([gray8] * 3, -1), "RGB").save(buf, "JPEG", quality=90)
        return buf.getvalue(), "jpeg"
    if kind == "rgb_png":
        Image.fromarray(np.stack([gray8] * 3, -1), "RGB").save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "rgba_png":
        alpha = np.full_like(gray8, 255)
        Image.fromarray(np.stack([gray8] * 3 + [alpha], -1), "RGBA").save(buf, "PNG")
        return buf.getvalue(), "PNG"
    if kind == "gray16_png":
        # 12-bit data in a 16-bit container, as many detectors write it
        Image.fromarray((arr01 * 4095).astype(np.uint16)).save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "palette_png":
        Image.fromarray(gray8, "L").convert("P").save(buf, "PNG")
        return buf.getvalue(), "png"
    if kind == "cmyk_jpeg":
        Image.fromarray(np.stack([gray8] * 3, -1), "RGB").convert("CMYK").save(buf, "JPEG")
        return buf.getvalue(), "JPG"
    if kind == "png_named_jpg":  # mislabelled extension: detected from the bytes
        Image.fromarray(gray8, "L").save(buf, "PNG")
        return buf.getvalue(), "jpg"
    if kind == "exif_rotated_jpeg":
        img = Image.fromarray(gray8, "L")
        exif = Image.Exif()
        exif[0x0112] = 6
        img.save(buf, "JPEG", exif=exif.tobytes())
        return buf.getvalue(), "jpg"
    raise ValueError(f"unknown kind {kind!r}")


KINDS = (
    "gray_jpeg", "rgb_jpeg", "rgb_png", "rgba_png", "gray16_png",
    "palette_png", "cmyk_jpeg", "png_named_jpg", "exif_rotated_jpeg",
)


@dataclass
class SampleSet:
    root: str
    valid: int
    bad: dict[str, str]  # file path -> expected error class


def bad_file_bytes(name: str) -> bytes:
    buf = io.BytesIO()
    if name == "empty.jpg":
        return b""
    if name == "truncated.jpg":
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (256, 256), dtype=np.uint8), "L").save(buf, "JPEG")
        data = buf.getvalue()
        return data[: len(data) // 3]
    if name == "not_an_image.png":
        return b"this is a text file, not an image\n" * 20
    if name == "unsupported.png":
        Image.new("RGB", (32, 32), (128, 0, 0)).save(buf, "ICO")
        return buf.getvalue()
    if name == "bomb.png":
        Image.new("1", (12_000, 12_000), 0).save(buf, "PNG", optimize=True)  # 144 Mpx, a few kB
        return buf.getvalue()
    raise ValueError(name)


def make_samples(
    root: str,
    per_class: int = 12,
    sizes: tuple[tuple[int, int], ...] = ((256, 256), (320, 240), (200, 300), (512, 512)),
    with_bad: bool = True,
    seed: int = 0,
    classes: tuple[str, ...] = CLASSES,
    realistic: bool = False,
) -> SampleSet:
    """Write ``per_class`` images of mixed kinds per class under root/CLASS/, plus broken files."""
    draw = realistic_xray_array if realistic else xray_array
    rng = np.random.default_rng(seed)
    count = 0
    for c, cls in enumerate(classes):
        folder = os.path.join(root, cls)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            kind = KINDS[(i + c) % len(KINDS)]
            size = sizes[i % len(sizes)]
            data, ext = encode(draw(rng, size, sick=c % 2 == 1), kind)
            with open(os.path.join(folder, f"{cls.lower()}_{i:04d}_{kind}.{ext}"), "wb") as fh:
                fh.write(data)
            count += 1
    bad: dict[str, str] = {}
    if with_bad:
        folder = os.path.join(root, classes[0])
        for name, error_class in BAD_FILES.items():
            path = os.path.join(folder, f"bad_{name}")
            with open(path, "wb") as fh:
                fh.write(bad_file_bytes(name))
            bad[os.path.abspath(path)] = error_class
    # Not images / hidden: never listed as images.
    with open(os.path.join(root, "README.txt"), "w") as fh:
        fh.write("sample images generated by imgfeat.demo.samples\n")
    with open(os.path.join(root, classes[0], ".hidden.jpg"), "wb") as fh:
        fh.write(b"hidden files are skipped")
    return SampleSet(os.path.abspath(root), count, bad)


# ---------------------------------------------------------------------------------------------
# DICOM and NIfTI (written with pydicom and nibabel; the tests and the demo read them back)

DICOM_KINDS = ("mono2_16bit", "mono1_12bit_rescaled", "ct_hu", "jpeg_baseline", "rle", "jpeg2000")


def _dicom_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int = 16, signed: bool = False,
                   modality: str = "DX", patient_id: str = "PAT-0001", **attrs: object):
    """An uncompressed DICOM dataset (Secondary Capture / CT) holding ``pixels`` (rows x columns [x 3])."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage if modality == "CT" else SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientID, ds.PatientName, ds.PatientBirthDate = patient_id, "Doe^Jane", "19700101"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = modality
    ds.BodyPartExamined, ds.ViewPosition = ("CHEST", "PA") if modality != "CT" else ("CHEST", "")
    ds.PixelSpacing = [0.143, 0.143]
    frames = pixels.shape[0] if pixels.ndim == 3 and photometric != "RGB" else 1
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.Rows, ds.Columns = pixels.shape[-2:] if photometric != "RGB" else pixels.shape[:2]
    ds.SamplesPerPixel = 3 if photometric == "RGB" else 1
    if photometric == "RGB":
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype.itemsize == 1 else 16
    ds.BitsStored, ds.HighBit = bits_stored, bits_stored - 1
    ds.PixelRepresentation = 1 if signed else 0
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    return ds


def dicom_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def make_dicom(kind: str, rng: np.random.Generator, size: int = 96, sick: bool = False, patient_id: str = "PAT-0001"):
    """A DICOM dataset of ``kind`` (DICOM_KINDS, or ct_volume: 9 frames) with an X-ray-like (or CT-like) image."""
    from pydicom.uid import JPEG2000Lossless, RLELossless

    x = xray_array(rng, (size, size), sick)  # 0..1, bright bone, dark lungs
    if kind == "mono2_16bit":
        return _dicom_dataset((x * 4095).astype(np.uint16), bits_stored=12, patient_id=patient_id)
    if kind == "mono1_12bit_rescaled":
        # MONOCHROME1: high values are dark. Stored 12 bits in 16, with a rescale to the modality's units.
        stored = ((1 - x) * 4095).astype(np.uint16)
        return _dicom_dataset(stored, "MONOCHROME1", 12, patient_id=patient_id, RescaleSlope=0.5, RescaleIntercept=-100)
    if kind in ("ct_hu", "ct_volume"):
        # Signed CT: air -1000 HU, lung ~-800..-500, soft tissue ~40, bone ~700; stored = HU + 1024 via the rescale.
        hu = np.where(x < 0.3, -800 + 600 * x, -100 + 900 * (x - 0.3)).astype(np.float64)
        frames = 9 if kind == "ct_volume" else 1
        volume = np.stack([hu + 10 * k for k in range(frames)]) if frames > 1 else hu
        stored = np.round(volume + 1024).astype(np.int16)
        return _dicom_dataset(stored, bits_stored=12, signed=True, modality="CT", patient_id=patient_id,
                              RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=-600, WindowWidth=1500)
    if kind == "jpeg_baseline":
        return jpeg_dicom((x * 255).astype(np.uint8), patient_id)
    if kind in ("rle", "jpeg2000"):
        ds = _dicom_dataset((x * 4095).astype(np.uint16), bits_stored=12, patient_id=patient_id)
        ds.compress(RLELossless if kind == "rle" else JPEG2000Lossless)
        return ds
    raise ValueError(f"unknown DICOM kind {kind!r}; known: {', '.join(DICOM_KINDS)}, ct_volume")


def jpeg_dicom(gray8: np.ndarray, patient_id: str = "PAT-0001"):
    """An 8-bit grey image as a JPEG baseline (lossy) DICOM: Pillow's JPEG stream, encapsulated."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    buf = io.BytesIO()
    Image.fromarray(gray8, "L").save(buf, "JPEG", quality=92)
    ds = _dicom_dataset(gray8, bits_stored=8, patient_id=patient_id)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompression = "01"
    return ds


def nifti_bytes(volume: np.ndarray, affine: np.ndarray | None = None, gz: bool = True) -> bytes:
    """A NIfTI-1 file (gzip-compressed by default) of ``volume`` with ``affine`` (default: 1 mm RAS)."""
    import gzip

    import nibabel as nib

    image = nib.Nifti1Image(volume, np.eye(4) if affine is None else affine)
    raw = image.to_bytes()
    return gzip.compress(raw) if gz else raw


def make_medical_samples(root: str, per_kind: int = 2, seed: int = 0) -> dict[str, list[str]]:
    """DICOMs of every kind (NORMAL/PNEUMONIA alternate), a CT volume and a NIfTI volume; paths by kind."""
    rng = np.random.default_rng(seed)
    written: dict[str, list[str]] = {}
    for kind in (*DICOM_KINDS, "ct_volume"):
        for i in range(per_kind):
            cls = CLASSES[i % 2]
            folder = os.path.join(root, cls)
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, f"{kind}_{i:02d}.dcm")
            with open(path, "wb") as fh:
                fh.write(dicom_bytes(make_dicom(kind, rng, sick=cls == "PNEUMONIA", patient_id=f"PAT-{i:04d}")))
            written.setdefault(kind, []).append(path)
    for i in range(per_kind):
        cls = CLASSES[i % 2]
        volume = np.stack([xray_array(rng, (48, 40), cls == "PNEUMONIA") * 1000 for _ in range(7)], axis=2)
        path = os.path.join(root, cls, f"volume_{i:02d}.nii.gz")
        with open(path, "wb") as fh:
            fh.write(nifti_bytes(volume.astype(np.float32)))
        written.setdefault("nifti", []).append(path)
    return written


# ---------------------------------------------------------------------------------------------
# Radiology's label shapes (docs/labels.md): a MURA-shaped folder (the label in the study folder) and images named
# by rows of the NIH ChestX-ray14 manifest (multi-label findings, patient ids).

MURA_LABELS = ("negative", "positive")
# The MURA folder pattern: input.label.folder_pattern for the study folder's name (study1_negative -> negative).
MURA_FOLDER_PATTERN = r"^study\d+_(\w+)$"
# input.study.pattern for MURA: the image's folder (XR_ELBOW/patient00011/study1_negative) is its study.
MURA_STUDY_PATTERN = r"^(.*)/[^/]+$"
# input.split.group_pattern with input.split.group_source=path: the patient folder.
MURA_PATIENT_PATTERN = r"(patient\d+)/"


@dataclass
class MuraSampleSet:
    """What ``make_mura_samples`` wrote: by relative path, each image's study label, study folder and patient."""

    root: str
    labels: dict[str, str]  # rel_path -> negative | positive (its study's)
    studies: dict[str, str]  # rel_path -> the study folder, relative to root (XR_ELBOW/patient00011/study1_negative)
    patients: dict[str, str]  # rel_path -> patient00011

    @property
    def study_labels(self) -> dict[str, str]:
        """Study folder -> its label."""
        return {self.studies[p]: label for p, label in self.labels.items()}


def mura_array(rng: np.random.Generator, size: tuple[int, int], positive: bool) -> np.ndarray:
    """A bone-radiograph-like float image in 0..1: a bright shaft on dark soft tissue; an abnormal study's views are
    brighter and carry a dense blob (hardware, a callus), so that even random-weight features separate them."""
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy /= h
    xx /= w
    tilt = rng.uniform(-0.15, 0.15)
    shaft = np.exp(-(((xx - 0.5 - tilt * (yy - 0.5)) / rng.uniform(0.08, 0.12)) ** 2))
    img = 0.15 + 0.1 * rng.random() + 0.55 * shaft
    if positive:
        cx, cy, r = rng.uniform(0.4, 0.6), rng.uniform(0.3, 0.7), rng.uniform(0.06, 0.12)
        img = img + 0.2 + 0.6 * np.exp(-(((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * r * r)))
    img = img + 0.03 * rng.standard_normal((h, w))
    return np.clip(img, 0.0, 1.0)


def make_mura_samples(root: str, patients: int = 6, studies: tuple[int, int] = (1, 2), images: tuple[int, int] = (2, 3),
                      body_part: str = "XR_ELBOW", size: tuple[int, int] = (64, 64), seed: int = 0,
                      first_patient: int = 11) -> MuraSampleSet:
    """A MURA-shaped folder: ``root/XR_ELBOW/patient00011/study1_negative/image1.png``: ``patients`` patients with
    ``studies`` (min, max) studies each and ``images`` (min, max) views per study; studies alternate negative and
    positive in the order written, so both labels occur whatever the counts."""
    rng = np.random.default_rng(seed)
    out = MuraSampleSet(os.path.abspath(root), {}, {}, {})
    k = 0
    for p in range(patients):
        patient = f"patient{first_patient + p:05d}"
        for s in range(int(rng.integers(studies[0], studies[1] + 1))):
            label = MURA_LABELS[k % 2]
            k += 1
            study = f"{body_part}/{patient}/study{s + 1}_{label}"
            os.makedirs(os.path.join(root, study), exist_ok=True)
            for i in range(int(rng.integers(images[0], images[1] + 1))):
                rel = f"{study}/image{i + 1}.png"
                data, _ = encode(mura_array(rng, size, label == "positive"), "rgb_png")
                with open(os.path.join(root, rel), "wb") as fh:
                    fh.write(data)
                out.labels[rel], out.studies[rel], out.patients[rel] = label, study, patient
    return out


# The NIH ChestX-ray14 manifest's columns used here (the file has more: follow-up, age, sex, view, sizes, spacing).
NIH_IMAGE, NIH_FINDINGS, NIH_PATIENT = "Image Index", "Finding Labels", "Patient ID"


@dataclass
class NihSampleSet:
    """What ``make_nih_samples`` wrote: each manifest row's image (by its ``Image Index``) and the manifest."""

    root: str
    images: dict[str, str]  # Image Index (a bare file name) -> rel_path under root (images_001/00000001_000.png)
    rows: list[dict[str, str]]  # the manifest rows the images were made for, as given
    manifest: str | None = None  # the manifest written (a CSV, gzipped when its name ends in .gz), if asked for

    def findings(self) -> dict[str, list[str]]:
        """Image Index -> its sorted findings ([] for "No Finding")."""
        return {r[NIH_IMAGE]: sorted({f.strip() for f in r[NIH_FINDINGS].split("|")} - {"No Finding", ""})
                for r in self.rows}


def read_nih_rows(path: str, n: int, every: int = 1) -> list[dict[str, str]]:
    """``n`` rows of an NIH ChestX-ray14 manifest (``Data_Entry_2017*.csv``, gzipped or not): every ``every``-th
    from the top (the manifest lists a patient's follow-ups together: a stride spreads the sample over more
    patients), every column kept, as text."""
    import csv
    import gzip
    import itertools

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as fh:
        return list(itertools.islice(csv.DictReader(fh), 0, n * every, every))


def write_manifest(path: str, rows: list[dict[str, str]]) -> str:
    """Write ``rows`` (dicts with the same keys) as a CSV with a header, gzipped when ``path`` ends in .gz."""
    import csv
    import gzip

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return os.path.abspath(path)


def make_nih_samples(root: str, manifest_rows: list[dict[str, str]], folders: int = 3, size: tuple[int, int] = (64, 64),
                     seed: int = 0, manifest: str | None = None) -> NihSampleSet:
    """One generated X-ray per manifest row, named by its ``Image Index`` (a bare file name, as NIH's manifest has)
    and spread over ``folders`` sub-folders (images_001, images_002, ... as NIH ships them); an image with findings
    carries opacities. ``manifest``: also write the rows there (.csv or .csv.gz), to pass as input.label.manifest."""
    rng = np.random.default_rng(seed)
    out = NihSampleSet(os.path.abspath(root), {}, list(manifest_rows))
    for i, row in enumerate(manifest_rows):
        name = row[NIH_IMAGE]
        rel = f"images_{i % folders + 1:03d}/{name}"
        os.makedirs(os.path.join(root, os.path.dirname(rel)), exist_ok=True)
        sick = row.get(NIH_FINDINGS, "No Finding").strip() not in ("", "No Finding")
        data, _ = encode(xray_array(rng, size, sick), "rgb_png")
        with open(os.path.join(root, rel), "wb") as fh:
            fh.write(data)
        out.images[name] = rel
    if manifest:
        out.manifest = write_manifest(manifest, out.rows)
    return out
