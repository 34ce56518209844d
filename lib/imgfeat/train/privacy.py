"""Checks that run metadata and artifacts hold no image content, no file names and no patient fields, and the
keying of every id that leaves the machine.

Call ``check_metadata(params, tags)`` before logging params, ``check_artifact_table(frame, name)`` before logging
a table, or ``check_mlflow_run(run)`` on a finished run. Every id in an MLflow artifact or tag (image ids, audit
files and groups, the dataset name) is ``keyed_id(text, salt)``: HMAC-SHA256 with the run's secret
(``run_salt``), because a plain hash of a file or patient name is reversed by hashing guessed names.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping
from typing import Any

from imgfeat.config.phi import PATIENT_FIELDS  # patient/study attribute keywords, lower case, no separators

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


def configured_salt(configured: str | None) -> str | None:
    """The user's secret: ``privacy.id_salt``, else $IMGFEAT_ID_SALT, else None."""
    from imgfeat.io.groups import id_salt

    return id_salt(configured)


def run_salt(configured: str | None) -> str:
    """The secret that keys this run's ids: the user's (ids then compare across runs and map back for its
    owner), else a random one for this run only, never logged or stored (ids then link within the run only)."""
    return configured_salt(configured) or secrets.token_hex(32)


def keyed_id(text: str, salt: str, chars: int = 24) -> str:
    """HMAC-SHA256(salt, text), the first ``chars`` hex characters: stable for one secret, unlinkable without it."""
    return hmac.new(salt.encode("utf-8"), text.encode("utf-8"), hashlib.sha256).hexdigest()[:chars]


def artifact_ids(image_ids: list[str], salt: str) -> list[str]:
    """``keyed_id`` of each image id (24 hex characters)."""
    return [keyed_id(i, salt) for i in image_ids]


def dataset_name(configured: str | None, location: str, salt: str) -> str:
    """The runs' "dataset" tag and name: ``train.dataset`` when the user gave one, else ``features-`` and a keyed
    hash of the table's location (a folder name may name a patient, a ward or a hospital)."""
    return configured or f"features-{keyed_id(location.rstrip('/'), salt, 12)}"


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
