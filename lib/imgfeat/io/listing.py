"""The file index: every file under the input folder as a DataFrame (path, fingerprint, image id), split into images
and other files by extension, with each image's label, group and split (``imgfeat.io.labels``, ``.groups``, ``.splits``).

Listing never reads file contents (Spark prunes binaryFile's content column), so it is cheap even
for millions of files; contents are read later, only for the files that need processing (``imgfeat.io.reading``).
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from imgfeat.io.root import InputError, input_root, qualify

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.config.schema import InputConfig

__all__ = ["FILES_PER_LISTING_TASK", "InputError", "input_root", "list_files", "listing_settings", "other_file_lengths",
           "qualify"]

log = logging.getLogger(__name__)

# At most about this many files per task of a listing scan (see listing_settings).
FILES_PER_LISTING_TASK = 100_000


def _extension_filter(extensions: list[str], extensionless: str = "include") -> Column:
    """Image files: the name ends with one of ``extensions`` (any case; multi-part ones like nii.gz too), or has
    no extension at all when ``extensionless`` is include (DICOM from archives often has none).

    A case-insensitive regular expression, not ``lower()``: Spark 4's ``lower`` goes through ICU, whose first use
    in a JVM initialises case-mapping tables for seconds of one core, on the critical path of every job's listing
    (docs/benchmarks.md).
    """
    from pyspark.sql import functions as F

    name = F.element_at(F.split(F.col("path"), "/"), -1)
    exts = sorted({e.lower().lstrip(".") for e in extensions if e.strip(". ")})
    matches = name.rlike("(?i)\\.(" + "|".join(re.escape(e) for e in exts) + ")$") if exts else F.lit(False)
    if extensionless == "include":
        matches = matches | ~name.contains(".")
    return matches


def list_files(spark: SparkSession, inp: InputConfig) -> tuple[DataFrame, DataFrame]:
    """(images, others): every visible file under ``inp.path`` (the ``input`` settings), split by extension.

    ``images`` has path, rel_path, file_length, file_modification_time, image_id, label, group_id, split; and
    study_id (input.study set, or multi-label) and labels, label_mask, findings (multi-label).
    Hidden files and folders (names starting with '.' or '_') are skipped by Spark's listing.
    """
    from pyspark.sql import functions as F

    from imgfeat.io.groups import with_group
    from imgfeat.io.labels import with_label
    from imgfeat.io.splits import with_split
    from imgfeat.io.studies import check_study_patients, with_study
    from imgfeat.session import sql_conf

    root = input_root(spark, inp.path)
    raw = spark.read.format("binaryFile").option("recursiveFileLookup", "true").load(root)
    listing = raw.select(
        F.col("path"),
        F.col("length").alias("file_length"),
        F.col("modificationTime").alias("file_modification_time"),
    )
    # Spark's file scans skip zero-byte files; take them from the file index so they are not lost.
    empties = (
        _input_files(spark, raw)
        .join(listing.select("path"), on="path", how="left_anti")
        .select(
            "path",
            F.lit(0).cast("long").alias("file_length"),
            F.lit(0).cast("timestamp").alias("file_modification_time"),
        )
    )
    # Not cached here: the caller persists what it reuses (and unpersists it), so a long-lived session
    # (a notebook) does not accumulate one cached listing per run. The file index behind ``raw`` is
    # built once, so a second scan of it does not list the folder again.
    listing = listing.unionByName(empties)
    is_image = _extension_filter(inp.extensions, inp.extensionless)
    others = listing.filter(~is_image)
    images = listing.filter(is_image).withColumn(
        "rel_path", F.regexp_replace(F.col("path"), "^\\Q" + root + "/\\E", "")
    )
    images = images.withColumn("image_id", F.substring(F.sha2(F.col("rel_path"), 256), 1, 24))
    with sql_conf(spark, listing_settings(spark)):  # the checks of a manifest and of studies run here
        images = with_label(spark, images, inp, root)
        images = with_study(with_group(images, inp.split), inp)
        if inp.study.configured and inp.split.group not in ("none", "patient_key"):
            check_study_patients(images)
    images = with_split(images, inp.split)
    return images, others


def listing_settings(spark: SparkSession) -> dict[str, str]:
    """SQL settings (for ``session.sql_conf``) for the actions over :func:`list_files`' DataFrames: their scans
    in one task per core, of at most about ``FILES_PER_LISTING_TASK`` files each.

    Listing reads no contents, yet Spark packs its scan by bytes as if it did, each file counted as at least
    ``spark.sql.files.openCostInBytes``: dozens of tasks for a few thousand small files, hundreds of thousands for
    millions at a cluster's 4 MB default, in every listing scan (docs/benchmarks.md). Empty where the session's
    settings are out of reach (Spark Connect): an optimisation only, the scans list the same files.
    """
    try:
        open_cost = int(spark._jsparkSession.sessionState().conf().filesOpenCostInBytes())  # type: ignore[union-attr]
    except Exception as exc:
        log.debug("listing scans left to Spark's packing (%s)", str(exc)[:120])
        return {}
    return {"spark.sql.files.maxPartitionBytes": str(max(1, open_cost) * FILES_PER_LISTING_TASK)}


def _input_files(spark: SparkSession, raw: DataFrame) -> DataFrame:
    """Every file Spark's index listed (zero-byte ones included) as a one-column DataFrame.

    On a classic session the list stays in the JVM: the paths are never copied into the Python driver (millions
    of strings), and the DataFrame is a local relation, not a Python RDD (whose first task would start another
    Python daemon, docs/benchmarks.md). Spark Connect has no JVM handle and goes through Python.
    """
    from pyspark.sql import DataFrame as PyDataFrame
    from pyspark.sql import functions as F

    jvm = _jvm(spark)
    files_df = None
    if jvm is not None:
        try:
            paths = _scala_seq(jvm, raw._jdf.inputFiles())
            jds = spark._jsparkSession.createDataset(paths, jvm.org.apache.spark.sql.Encoders.STRING())
            files_df = PyDataFrame(jds.toDF(), spark).withColumnRenamed("value", "path")
        except Exception as exc:  # an unknown Scala or Spark version: correct, only slower
            log.warning("listing the file index in the JVM failed (%s); copying its paths through Python instead",
                        str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__)
    if files_df is None:
        files_df = spark.createDataFrame([(p,) for p in raw.inputFiles()], "path string")
    # The index gives URIs (file:///a%20b.jpg); scans give decoded paths (file:/a b.jpg).
    decoded = F.url_decode(F.regexp_replace(F.col("path"), r"\+", "%2B"))
    return files_df.select(F.regexp_replace(decoded, "^file:///", "file:/").alias("path"))


def _scala_seq(jvm, array):
    """A Scala Seq wrapping a Java array without copying it (py4j cannot call varargs such as Arrays.asList)."""
    try:
        return jvm.scala.collection.immutable.ArraySeq.unsafeWrapArray(array)  # Scala 2.13 (Spark 4)
    except Exception:
        return jvm.scala.collection.mutable.WrappedArray.make(array)  # Scala 2.12 (Spark 3.5, Databricks 15.4)


def _jvm(spark: SparkSession):
    """The session's py4j JVM view, or None on Spark Connect (no JVM handle)."""
    try:
        return spark.sparkContext._jvm  # type: ignore[union-attr]
    except Exception:
        return None


def other_file_lengths(others: DataFrame) -> list[int] | None:
    """The lengths of the listed non-image files (None when there are more than read_tasks.MAX_FILES): taken while
    listing, since a scan of them later would fail on a file deleted meanwhile."""
    from imgfeat.io.read_tasks import MAX_FILES
    from imgfeat.session import sql_conf

    # A limit scans one partition, then more in jobs of growing size (several more jobs for a few thousand listed
    # files, most folders holding no other file at all): here every partition in one job.
    with sql_conf(others.sparkSession, {"spark.sql.limit.initialNumPartitions": str(2**31 - 1)}):
        rows = others.select("file_length").limit(MAX_FILES + 1).collect()
    return None if len(rows) > MAX_FILES else [int(r["file_length"]) for r in rows]
