"""Checks that run metadata and artifacts hold no image content, no file names and no patient fields.

Call ``check_metadata(params, tags)`` before logging params, ``check_artifact_table(frame, name)`` before logging
a table, or ``check_mlflow_run(run)`` on a finished run. Image ids in artifacts are keyed with a secret
(``artifact_ids``): an id that is a plain hash of a relative path can be reversed by hashing guessed names.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from typing import Any

# DICOM-style patient and study identifiers (attribute keywords, compared without case or separators).
PATIENT_FIELDS = (
    "patientname", "patientid", "patientbirthdate", "patientbirthtime", "patientsex", "patientage",
    "patientaddress", "patientweight", "patientsize", "patienttelephonenumbers", "otherpatientids",
    "otherpatientnames", "patientmothersbirthname", "medicalrecordlocator", "accessionnumber",
    "institutionname", "institutionaddress", "referringphysicianname", "performingphysicianname",
    "studyinstanceuid", "seriesinstanceuid", "sopinstanceuid", "studyid", "studydate",
)
MAX_VALUE_CHARS = 500  # longer values could smuggle image bytes (base64) or feature dumps


class PrivacyError(ValueError):
    """Run metadata would leak image content or patient fields."""


def _squash(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def metadata_problems(values: Mapping[str, Any], kind: str = "param") -> list[str]:
    """Human-readable problems with ``values`` (empty when it is safe to log)."""
    problems = []
    for key, value in values.items():
        squashed_key = _squash(str(key))
        if any(field in squashed_key for field in PATIENT_FIELDS):
            problems.append(f"{kind} {key!r} names a patient/study field")
        if isinstance(value, bytes | bytearray | memoryview):
            problems.append(f"{kind} {key!r} holds raw bytes")
            continue
        text = str(value)
        if len(text) > MAX_VALUE_CHARS and not str(key).startswith("mlflow."):
            problems.append(f"{kind} {key!r} is {len(text)} characters long (over {MAX_VALUE_CHARS}): no content in metadata")
        for field in PATIENT_FIELDS:
            if re.search(rf"{field}\s*[:=]", _squash_keep_separators(text)):
                problems.append(f"{kind} {key!r} contains a {field} value")
                break
    return problems


def _squash_keep_separators(text: str) -> str:
    return re.sub(r"[^a-z0-9:=]", "", text.lower())


def check_metadata(params: Mapping[str, Any], tags: Mapping[str, Any] | None = None) -> None:
    """Raise PrivacyError naming every param or tag that must not be logged."""
    problems = metadata_problems(params, "param") + metadata_problems(tags or {}, "tag")
    if problems:
        raise PrivacyError("refusing to log run metadata: " + "; ".join(problems))


def check_mlflow_run(run: Any) -> None:
    """Check a logged MLflow run (``mlflow.get_run(run_id)``): its params and tags."""
    check_metadata(run.data.params, run.data.tags)


# Columns an artifact table must not have: they name files (and so, often, patients).
FILE_COLUMNS = ("path", "relpath", "filename", "file", "origin", "uri", "imageid")
_FILE_LIKE = re.compile(r"[/\\]|\.(jpe?g|png|dcm|dicom|nii|gz|tiff?|bmp|webp)$", re.IGNORECASE)


def artifact_ids(image_ids: list[str], salt: str) -> list[str]:
    """HMAC-SHA256(salt, image_id), 24 hex characters: stable for one secret, unlinkable without it."""
    key = salt.encode("utf-8")
    return [hmac.new(key, i.encode("utf-8"), hashlib.sha256).hexdigest()[:24] for i in image_ids]


def set_digest(image_ids: list[str]) -> str:
    """A digest of a set of image ids (which images were held out), comparable between runs, not reversible."""
    return hashlib.sha256("\n".join(sorted(image_ids)).encode("utf-8")).hexdigest()


def artifact_problems(frame: Any, name: str) -> list[str]:
    """Problems with logging ``frame`` (a pandas DataFrame) as artifact ``name``."""
    problems = []
    for column in frame.columns:
        squashed = _squash(str(column))
        if squashed in FILE_COLUMNS or any(field in squashed for field in PATIENT_FIELDS):
            problems.append(f"{name}: column {column!r} names files or patients")
    for column in frame.columns:
        values = frame[column]
        if values.dtype == object:
            hits = [v for v in values.astype(str) if _FILE_LIKE.search(v)]
            if hits:
                problems.append(f"{name}: column {column!r} holds file names or paths (e.g. {hits[0][:60]!r})")
    return problems


def check_artifact_table(frame: Any, name: str) -> None:
    problems = artifact_problems(frame, name)
    if problems:
        raise PrivacyError("refusing to log artifact: " + "; ".join(problems))
