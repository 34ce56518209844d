"""Which side of a split each image is on: a folder name, or a seeded hash of its split unit (its group, else
itself), stable when files are added or removed and the same wherever the folder lies.

``hash_bucket`` is the one hash every split uses: extract's (``hash_split``), train's ordering of units
(``imgfeat.train.split``) and fine-tuning's validation share (``imgfeat.finetune.data``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from imgfeat.config.schema import SplitConfig

BUCKETS = 1_000_000  # the resolution of a hash share: fractions are compared in steps of 1e-6


def hash_bucket(seed: int, unit: Column, buckets: int | None = BUCKETS) -> Column:
    """``unit``'s seeded 64-bit hash (xxhash64 of seed and unit) as its share in [0, 1), in steps of 1/``buckets``;
    ``buckets=None``: the hash itself (a stable, seeded order of the units)."""
    from pyspark.sql import functions as F

    hashed = F.xxhash64(F.lit(seed), unit)
    if buckets is None:
        return hashed
    return F.pmod(hashed, F.lit(buckets)) / F.lit(float(buckets))


def split_unit(study: bool = False) -> Column:
    """What stays on one side of a split: the image's group (``group:<group_id>``) when it has one, else (``study``:
    rows with a ``study_id`` column) its study (``study:<study_id>``), else its id. A study holds one patient
    (``io.studies.check_study_patients``), so a grouped split never cuts a study either."""
    from pyspark.sql import functions as F

    units = [F.concat(F.lit("group:"), F.col("group_id"))]
    if study:
        units.append(F.concat(F.lit("study:"), F.col("study_id")))
    return F.coalesce(*units, F.col("image_id"))


def hash_split(split: SplitConfig, study: bool = False) -> Column:
    """Each image's split depends only on (seed, its group, else its study (``study``), else image_id): stable when
    files are added or removed, every image of a group (and of a study) on one side, stratified in expectation."""
    from pyspark.sql import functions as F

    return F.when(hash_bucket(split.seed, split_unit(study)) < split.test_fraction, "test").otherwise("train")


def with_split(images: DataFrame, split: SplitConfig) -> DataFrame:
    """``split`` by input.split.mode: none (null), folder (the folder at split.folder_level), hash (by study too
    when the rows have a ``study_id``)."""
    from pyspark.sql import functions as F

    from imgfeat.io.labels import folder_at

    if split.mode == "none":
        return images.withColumn("split", F.lit(None).cast("string"))
    if split.mode == "folder":
        return images.withColumn("split", folder_at(split.folder_level))
    return images.withColumn("split", hash_split(split, "study_id" in images.columns))
