"""Which images belong together (one patient): a group id per image, from its file name or path, or the label
manifest.

A grouped split keeps every image of a group on one side; two X-rays of one patient in train and test is the
most common leak in published chest X-ray models (docs/validity.md).
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING

from imgfeat.config import ConfigError

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from imgfeat.config.schema import SplitConfig

# Naming conventions of public chest X-ray sets: one capture group = the patient.
GROUP_PRESETS = {
    # Kermany et al.: PNEUMONIA person1234_bacteria_5678.jpeg / person1234_virus_12.jpeg; NORMAL IM-0123-0001.jpeg
    # and NORMAL2-IM-0123-0001.jpeg (a second batch: its numbers are a separate series).
    "kermany": r"^((?:NORMAL2-)?IM-\d+|person\d+)[-_]",
    # NIH ChestX-ray14: 00001280_004.png, patient 00001280.
    "nih": r"^(\d{8})_",
}


def group_regex(pattern: str) -> str:
    """The regex for ``input.split.group_pattern`` (a preset name or a regex with exactly one capture group)."""
    regex = GROUP_PRESETS.get(pattern, pattern)
    try:
        groups = re.compile(regex).groups
    except re.error as exc:
        raise ConfigError(f"input.split.group_pattern {pattern!r} is not a valid regex: {exc}") from None
    if groups != 1:
        raise ConfigError(
            f"input.split.group_pattern {pattern!r} has {groups} capture groups; it needs exactly one (the group id), "
            f"or a preset: {', '.join(GROUP_PRESETS)}"
        )
    return regex


def group_from_name(pattern: str, source: str = "name") -> Column:
    """group_id by ``pattern`` (input.split.group_pattern) from the file name of ``rel_path`` (``source`` name) or
    the whole relative path (``source`` path: a patient folder, as MURA's patient00011/); null when it does not
    match."""
    from pyspark.sql import functions as F

    text = F.col("rel_path") if source == "path" else F.element_at(F.split(F.col("rel_path"), "/"), -1)
    found = F.regexp_extract(text, group_regex(pattern), 1)
    return F.when(found != "", found)


def with_group(images: DataFrame, split: SplitConfig) -> DataFrame:
    """``group_id`` by input.split.group (null = the image is its own group)."""
    from pyspark.sql import functions as F

    if split.group == "regex":
        return images.withColumn("group_id", group_from_name(split.group_pattern or "", split.group_source))
    if split.group == "manifest_column":
        return images.withColumnRenamed("manifest_group", "group_id")
    # none, or patient_key (known once each DICOM file is read: extract fills it in and recomputes the split)
    return images.withColumn("group_id", F.lit(None).cast("string"))


def id_salt(configured: str | None) -> str | None:
    """The secret that keys identifiers (DICOM patient keys, image ids in MLflow artifacts): the setting
    ``privacy.id_salt``, else $IMGFEAT_ID_SALT, else None."""
    return configured or os.environ.get("IMGFEAT_ID_SALT") or None
