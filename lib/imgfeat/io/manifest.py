"""The label manifest: read (CSV, gzipped CSV or Parquet, by extension), its columns checked, and its rows matched to
the listed images by path (absolute, or relative to the input folder) or by bare file name (NIH ChestX-ray14's
``Image Index``: ``00000001_000.png``), which must then be unique in the folder.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from imgfeat.io.root import InputError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.config.schema import InputConfig

PARQUET_EXTENSIONS = (".parquet", ".pq")
EXAMPLES = 5  # duplicated names shown in an error


def is_parquet(path: str) -> bool:
    """A Parquet manifest (file or folder) by its extension; anything else is read as CSV (.csv.gz decompressed)."""
    return path.rstrip("/").lower().endswith(PARQUET_EXTENSIONS)


def required_columns(inp: InputConfig) -> list[str]:
    """The manifest columns the ``input`` settings read: path, label (single-label) or the findings, group, study."""
    label = inp.label
    cols = [label.path_column]
    if not label.is_multi:
        cols.append("label")
    elif label.multi.column:
        cols.append(label.multi.column)
    else:
        cols.extend(label.findings)
    if inp.split.group == "manifest_column" and inp.split.group_column:
        cols.append(inp.split.group_column)
    if inp.study.column:
        cols.append(inp.study.column)
    return list(dict.fromkeys(cols))


def _missing_message(source: str, missing: list[str], present: list[str], inp: InputConfig) -> str:
    roles = {inp.label.path_column: "the image path: input.label.path_column", "label": "single-label manifests",
             inp.label.multi.column: "the findings: input.label.multi.column",
             inp.split.group_column: "the group: input.split.group_column", inp.study.column: "input.study.column"}
    named = ", ".join(f"{c!r} ({roles.get(c, 'a finding: input.label.findings')})" for c in missing)
    return (f"label manifest {source!r} lacks column(s) {named}; its columns are: {', '.join(present)}. Fix the "
            "manifest's header or the settings named")


def load_manifest(spark: SparkSession, inp: InputConfig) -> DataFrame:
    """The manifest's rows in file order (every column as read: text for a CSV), its needed columns checked."""
    source = inp.label.manifest
    if not source:
        raise InputError("input.label.mode=manifest needs input.label.manifest")
    local = source.removeprefix("file:")
    if "://" not in source and not os.path.exists(local):
        raise InputError(f"label manifest {source!r} does not exist")
    if is_parquet(source):
        raw = spark.read.parquet(source)
    else:  # header line; every value text; Spark decompresses .gz by the extension
        raw = spark.read.option("header", "true").csv(source)
    missing = [c for c in required_columns(inp) if c not in raw.columns]
    if missing:
        raise InputError(_missing_message(source, missing, raw.columns, inp))
    return raw


def with_keys(manifest: DataFrame, inp: InputConfig, root: str) -> DataFrame:
    """``manifest`` plus ``_key`` (its path relative to the input root, or the bare file name as written) and
    ``_bare`` (the path has no '/': matched by file name)."""
    from pyspark.sql import functions as F

    local_root = root.removeprefix("file:")
    written = F.trim(F.col(f"`{inp.label.path_column}`").cast("string"))
    # absolute paths (with or without scheme) become relative to the input root
    key = F.regexp_replace(F.regexp_replace(written, "^\\Q" + root + "/\\E", ""), "^\\Q" + local_root + "/\\E", "")
    return manifest.withColumn("_key", key).withColumn("_bare", ~written.contains("/"))


def _name_index(images: DataFrame) -> DataFrame:
    """Per file name of the listed images: ``n`` (files with it), ``where`` (up to 3 of their paths) and ``_rel``, the
    image a bare name matches: a file of that name at the root, else the only one, else null (ambiguous)."""
    from pyspark.sql import functions as F

    name = F.element_at(F.split(F.col("rel_path"), "/"), -1)
    return (images.select(name.alias("_name"), F.col("rel_path").alias("_p"))
            .groupBy("_name")
            .agg(F.count(F.lit(1)).alias("n"), F.slice(F.array_sort(F.collect_list("_p")), 1, 3).alias("where"),
                 F.max(F.when(F.col("_p") == F.col("_name"), F.col("_p"))).alias("_root"), F.max("_p").alias("_any"))
            .select("_name", "n", "where",
                    F.coalesce(F.col("_root"), F.when(F.col("n") == 1, F.col("_any"))).alias("_rel")))


def check_unique_names(manifest: DataFrame, images: DataFrame, source: str) -> None:
    """Raise InputError when a bare file name of the manifest (``with_keys``) names several listed images (none of
    them at the root of the input folder)."""
    from pyspark.sql import functions as F

    bare = manifest.filter(F.col("_bare")).select(F.col("_key").alias("_name")).distinct()
    found = (bare.join(_name_index(images).filter(F.col("_rel").isNull()), on="_name")
             .orderBy("_name").limit(EXAMPLES).collect())
    if found:
        listed = "; ".join(f"{r['_name']} ({r['n']} files: {', '.join(r['where'])}{', ...' if r['n'] > 3 else ''})"
                           for r in found)
        raise InputError(
            f"label manifest {source!r} names images by file name only, but these names are not unique under the "
            f"input folder: {listed}. Write those rows' paths relative to the input folder (e.g. sub/folder/name.png) "
            "or remove the duplicate files")


def resolve(manifest: DataFrame, images: DataFrame) -> DataFrame:
    """The manifest rows (``with_keys``) with the ``rel_path`` of the listed image each names: its relative path as
    written, or for a bare file name the image ``_name_index`` matches (null when none); never more rows."""
    from pyspark.sql import functions as F

    index = _name_index(images).select("_name", "_rel")
    by_path = manifest.filter(~F.col("_bare")).withColumn("rel_path", F.col("_key"))
    by_name = (manifest.filter(F.col("_bare")).join(index, index["_name"] == manifest["_key"], "left")
               .withColumn("rel_path", F.col("_rel")).drop("_name", "_rel"))
    return by_path.unionByName(by_name)


def unmatched_count(manifest: DataFrame, images: DataFrame) -> int:
    """Manifest rows (``with_keys``) that name no listed image."""

    return resolve(manifest, images).join(images.select("rel_path"), on="rel_path", how="left_anti").count()
