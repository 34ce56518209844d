"""Checks that run metadata (MLflow params and tags) holds no image content and no patient fields.

Call ``check_metadata(params, tags)`` before logging, or ``check_mlflow_run(run)`` on a finished run.
"""

from __future__ import annotations

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
