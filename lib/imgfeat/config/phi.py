"""Patient and study identifying DICOM attributes (PHI): the one list, for config checks and the privacy checks.

Config refuses them as label sources (``input.label.dicom_tag``): labels become MLflow params and artifact
values. ``imgfeat.train.privacy`` keeps them out of run metadata.
"""

from __future__ import annotations

import re

# Keyword -> (group, element) of the DICOM attributes that identify a patient, a study or an institution.
PATIENT_ATTRIBUTES = {
    "PatientName": (0x0010, 0x0010), "PatientID": (0x0010, 0x0020), "PatientBirthDate": (0x0010, 0x0030),
    "PatientBirthTime": (0x0010, 0x0032), "PatientSex": (0x0010, 0x0040), "PatientAge": (0x0010, 0x1010),
    "PatientAddress": (0x0010, 0x1040), "PatientWeight": (0x0010, 0x1030), "PatientSize": (0x0010, 0x1020),
    "PatientTelephoneNumbers": (0x0010, 0x2154), "OtherPatientIDs": (0x0010, 0x1000),
    "OtherPatientNames": (0x0010, 0x1001), "PatientMotherBirthName": (0x0010, 0x1060),
    "MedicalRecordLocator": (0x0010, 0x1090), "AccessionNumber": (0x0008, 0x0050),
    "InstitutionName": (0x0008, 0x0080), "InstitutionAddress": (0x0008, 0x0081),
    "ReferringPhysicianName": (0x0008, 0x0090), "PerformingPhysicianName": (0x0008, 0x1050),
    "StudyInstanceUID": (0x0020, 0x000D), "SeriesInstanceUID": (0x0020, 0x000E), "SOPInstanceUID": (0x0008, 0x0018),
    "StudyID": (0x0020, 0x0010), "StudyDate": (0x0008, 0x0020),
}
# The keywords lower-cased without separators (how the privacy checks compare names), and a common misspelling.
PATIENT_FIELDS = (*(k.lower() for k in PATIENT_ATTRIBUTES), "patientmothersbirthname")
_BY_TAG = {tag: keyword for keyword, tag in PATIENT_ATTRIBUTES.items()}
_TAG = re.compile(r"^\(?\s*(?:0x)?([0-9a-f]{4})\s*,?\s*(?:0x)?([0-9a-f]{4})\s*\)?$", re.IGNORECASE)


def squash(text: str) -> str:
    """Lower case, letters and digits only: ``Patient Name`` -> ``patientname``."""
    return re.sub(r"[^a-z0-9]", "", text.lower())


def patient_attribute(name: str) -> str | None:
    """The patient/study attribute ``name`` refers to (a keyword in any case, or a tag such as ``(0010,0010)``,
    ``0010,0010``, ``00100010``), or None when it names none of them."""
    match = _TAG.match(name.strip())
    if match:
        tag = (int(match.group(1), 16), int(match.group(2), 16))
        return _BY_TAG.get(tag) or ("a Patient-group attribute" if tag[0] == 0x0010 else None)
    squashed = squash(name)
    return next((k for k in PATIENT_ATTRIBUTES if k.lower() == squashed), None)
