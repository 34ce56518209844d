"""Each listed image's label (its folder, a row of the label manifest, or later a DICOM attribute), and how
labelling went (``label_report``)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgfeat.io.root import InputError, input_root

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.config.schema import InputConfig


def folder_at(level: int) -> Column:
    """The folder ``level`` steps above the file (1 = its parent), or null when the path is shallower."""
    from pyspark.sql import functions as F

    parts = F.split(F.col("rel_path"), "/")
    return F.when(F.size(parts) > level, F.element_at(parts, -1 - level)).otherwise(F.lit(None))


def read_manifest(spark: SparkSession, inp: InputConfig, root: str) -> DataFrame:
    """The label manifest as (rel_path, manifest_label[, manifest_group]), one row per relative path."""
    from pyspark.sql import functions as F

    manifest_path = inp.label.manifest
    if not manifest_path:
        raise InputError("input.label.mode=manifest needs input.label.manifest")
    local = manifest_path.removeprefix("file:")
    if "://" not in manifest_path and not os.path.exists(local):
        raise InputError(f"label manifest {manifest_path!r} does not exist")
    manifest = spark.read.option("header", "true").csv(manifest_path)
    group_column = inp.split.group_column if inp.split.group == "manifest_column" else None
    missing = {"path", "label", *([group_column] if group_column else [])} - set(manifest.columns)
    if missing:
        raise InputError(
            f"label manifest {manifest_path!r} must have a header with columns path,label"
            f"{',' + group_column if group_column else ''} (input.split.group_column); "
            f"missing: {', '.join(sorted(missing))}"
        )
    local_root = root.removeprefix("file:")
    return manifest.select(
        # absolute paths (with or without scheme) become relative to the input root
        F.regexp_replace(
            F.regexp_replace(F.col("path"), "^\\Q" + root + "/\\E", ""), "^\\Q" + local_root + "/\\E", ""
        ).alias("rel_path"),
        F.col("label").alias("manifest_label"),
        *([F.col(group_column).alias("manifest_group")] if group_column else []),
    ).dropDuplicates(["rel_path"])


def with_label(spark: SparkSession, images: DataFrame, inp: InputConfig, root: str) -> DataFrame:
    """``label`` by input.label's mode (null for none and dicom_tag: extract sets those from each decoded file);
    manifest labels bring the manifest's group column along (``manifest_group``) for ``groups.with_group``."""
    from pyspark.sql import functions as F

    mode = inp.label.effective_mode
    if mode in ("none", "dicom_tag"):  # dicom_tag: set from each file's attribute when it is decoded
        return images.withColumn("label", F.lit(None).cast("string"))
    if mode == "folder":
        return images.withColumn("label", folder_at(inp.label.folder_level))
    manifest = read_manifest(spark, inp, root)
    return (
        images.join(manifest, on="rel_path", how="left")
        .withColumnRenamed("manifest_label", "label")
    )


def label_report(spark: SparkSession, inp: InputConfig, images: DataFrame) -> dict[str, int]:
    """How listing and labelling went, in one pass over ``images``: the images listed, those without a label,
    (with a grouped split) those whose group could not be found (each is then its own group), and label-manifest
    rows that match no listed image (a second job, manifest labels only)."""
    from pyspark.sql import functions as F

    mode = inp.label.effective_mode
    counts = [F.count(F.lit(1)).alias("listed")]
    if mode != "none":
        counts.append(F.count_if(F.col("label").isNull()).alias("unlabelled"))
    if inp.split.group != "none":
        counts.append(F.count_if(F.col("group_id").isNull()).alias("ungrouped"))
    row = images.agg(*counts).first().asDict()
    report = {"listed": row["listed"], "unlabelled": row.get("unlabelled") or 0, "manifest_unmatched": 0,
              "ungrouped": row.get("ungrouped") or 0}
    if mode == "manifest":
        manifest = read_manifest(spark, inp, input_root(spark, inp.path))
        report["manifest_unmatched"] = manifest.join(images.select("rel_path"), on="rel_path", how="left_anti").count()
    return report
