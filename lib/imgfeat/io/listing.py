"""List image files into a DataFrame: path, fingerprint, label, split and a stable image id.

Listing never reads file contents (Spark prunes binaryFile's content column), so it is cheap even
for millions of files; contents are read later, only for the files that need processing.
"""

from __future__ import annotations

import logging
import os
import re
from typing import TYPE_CHECKING

from imgfeat.config import Config

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

# Above this many files to read, read the whole root and semi-join instead of listing paths.
MAX_EXPLICIT_PATHS = 20_000
# Up to this many rows, per-file attributes are broadcast to the content read (no shuffle).
MAX_BROADCAST_ROWS = 2_000_000
# At most about this many files per task of a listing scan (see listing_settings).
FILES_PER_LISTING_TASK = 100_000


class InputError(ValueError):
    """The input folder or manifest is missing or unusable."""


def qualify(spark: SparkSession, path: str) -> str:
    """The fully qualified form Spark uses in its ``path`` column (e.g. file:/abs/dir)."""
    if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", path) and not re.match(r"^[a-zA-Z]:\\", path):
        qualified = path
    else:
        qualified = "file:" + os.path.abspath(path)
    try:
        jvm = spark.sparkContext._jvm  # type: ignore[union-attr]
        jpath = jvm.org.apache.hadoop.fs.Path(qualified)
        fs = jpath.getFileSystem(spark.sparkContext._jsc.hadoopConfiguration())  # type: ignore[union-attr]
        if not fs.exists(jpath):
            raise InputError(f"input folder {path!r} does not exist (looked for {qualified})")
        qualified = fs.makeQualified(jpath).toString()
    except InputError:
        raise
    except Exception:  # Spark Connect / no JVM access: trust the string
        pass
    return qualified.rstrip("/")


def _extension_filter(extensions: list[str], extensionless: str = "include"):
    """Image files: the name ends with one of ``extensions`` (any case; multi-part ones like nii.gz too), or has
    no extension at all when ``extensionless`` is include (DICOM from archives often has none).

    A case-insensitive regular expression, not ``lower()``: Spark 4's ``lower`` goes through ICU, whose first use
    in a JVM initialises case-mapping tables for ~3.5 s of one core (measured), on the critical path of every
    job's listing.
    """
    from pyspark.sql import functions as F

    name = F.element_at(F.split(F.col("path"), "/"), -1)
    exts = sorted({e.lower().lstrip(".") for e in extensions if e.strip(". ")})
    matches = name.rlike("(?i)\\.(" + "|".join(re.escape(e) for e in exts) + ")$") if exts else F.lit(False)
    if extensionless == "include":
        matches = matches | ~name.contains(".")
    return matches


def list_files(spark: SparkSession, cfg: Config) -> tuple[DataFrame, DataFrame]:
    """(images, others): every visible file under input.path, split by extension.

    ``images`` has path, rel_path, file_length, file_modification_time, image_id, label, split.
    Hidden files and folders (names starting with '.' or '_') are skipped by Spark's listing.
    """
    from pyspark.sql import functions as F

    if not cfg.input.path:
        raise InputError("no input folder: pass --input DIR (or set input.path)")
    root = qualify(spark, cfg.input.path)
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
    is_image = _extension_filter(cfg.input.extensions, cfg.input.extensionless)
    others = listing.filter(~is_image)
    images = listing.filter(is_image).withColumn(
        "rel_path", F.regexp_replace(F.col("path"), "^\\Q" + root + "/\\E", "")
    )
    images = images.withColumn("image_id", F.substring(F.sha2(F.col("rel_path"), 256), 1, 24))
    images = _with_label(spark, images, cfg, root)
    images = _with_group(images, cfg)
    images = _with_split(images, cfg)
    return images, others


def listing_settings(spark: SparkSession) -> dict[str, str]:
    """SQL settings (for ``session.sql_conf``) for the actions over :func:`list_files`' DataFrames: their scans
    in one task per core, of at most about ``FILES_PER_LISTING_TASK`` files each.

    Listing reads no contents, yet Spark packs its scan by bytes as if it did, each file counted as at least
    ``spark.sql.files.openCostInBytes``: 41 tasks for 5,216 small files here (1 MB), 32 files per task at a
    cluster's 4 MB default (312,500 tasks for 10 M files), in every listing scan. Empty where the session's
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
    Python daemon: 0.9 s of the label report here). Spark Connect has no JVM handle and goes through Python.
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


def _folder_at(level: int):
    """The folder ``level`` steps above the file (1 = its parent), or null when the path is shallower."""
    from pyspark.sql import functions as F

    parts = F.split(F.col("rel_path"), "/")
    return F.when(F.size(parts) > level, F.element_at(parts, -1 - level)).otherwise(F.lit(None))


def read_manifest(spark: SparkSession, cfg: Config, root: str) -> DataFrame:
    """The label manifest as (rel_path, manifest_label[, manifest_group]), one row per relative path."""
    from pyspark.sql import functions as F

    manifest_path = cfg.input.label.manifest
    if not manifest_path:
        raise InputError("input.label.mode=manifest needs input.label.manifest")
    local = manifest_path.removeprefix("file:")
    if "://" not in manifest_path and not os.path.exists(local):
        raise InputError(f"label manifest {manifest_path!r} does not exist")
    manifest = spark.read.option("header", "true").csv(manifest_path)
    group_column = cfg.input.split.group_column if cfg.input.split.group == "manifest_column" else None
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


def label_report(spark: SparkSession, cfg: Config, images: DataFrame) -> dict[str, int]:
    """How listing and labelling went, in one pass over ``images``: the images listed, those without a label,
    (with a grouped split) those whose group could not be found (each is then its own group), and label-manifest
    rows that match no listed image (a second job, manifest labels only)."""
    from pyspark.sql import functions as F

    mode = cfg.input.label.effective_mode
    counts = [F.count(F.lit(1)).alias("listed")]
    if mode != "none":
        counts.append(F.count_if(F.col("label").isNull()).alias("unlabelled"))
    if cfg.input.split.group != "none":
        counts.append(F.count_if(F.col("group_id").isNull()).alias("ungrouped"))
    row = images.agg(*counts).first().asDict()
    report = {"listed": row["listed"], "unlabelled": row.get("unlabelled") or 0, "manifest_unmatched": 0,
              "ungrouped": row.get("ungrouped") or 0}
    if mode == "manifest":
        manifest = read_manifest(spark, cfg, qualify(spark, cfg.input.path))
        report["manifest_unmatched"] = manifest.join(images.select("rel_path"), on="rel_path", how="left_anti").count()
    return report


def _with_label(spark: SparkSession, images: DataFrame, cfg: Config, root: str) -> DataFrame:
    from pyspark.sql import functions as F

    label_cfg = cfg.input.label
    mode = label_cfg.effective_mode
    if mode in ("none", "dicom_tag"):  # dicom_tag: set from each file's attribute when it is decoded
        return images.withColumn("label", F.lit(None).cast("string"))
    if mode == "folder":
        return images.withColumn("label", _folder_at(label_cfg.folder_level))
    manifest = read_manifest(spark, cfg, root)
    return (
        images.join(manifest, on="rel_path", how="left")
        .withColumnRenamed("manifest_label", "label")
    )


def _with_group(images: DataFrame, cfg: Config) -> DataFrame:
    """group_id (null = the image is its own group)."""
    from pyspark.sql import functions as F

    from imgfeat.io.groups import group_from_name

    mode = cfg.input.split.group
    if mode == "regex":
        return images.withColumn("group_id", group_from_name(cfg))
    if mode == "manifest_column":
        return images.withColumnRenamed("manifest_group", "group_id")
    # none, or patient_key (known once each DICOM file is read: extract fills it in and recomputes the split)
    return images.withColumn("group_id", F.lit(None).cast("string"))


def _with_split(images: DataFrame, cfg: Config) -> DataFrame:
    from pyspark.sql import functions as F

    split = cfg.input.split
    if split.mode == "none":
        return images.withColumn("split", F.lit(None).cast("string"))
    if split.mode == "folder":
        return images.withColumn("split", _folder_at(split.folder_level))
    return images.withColumn("split", hash_split(cfg))


def hash_split(cfg: Config):
    """Each image's split depends only on (seed, its group, or image_id when ungrouped): stable when files are
    added or removed, every image of a group on one side, and stratified in expectation."""
    from pyspark.sql import functions as F

    split = cfg.input.split
    unit = F.coalesce(F.concat(F.lit("group:"), F.col("group_id")), F.col("image_id"))
    bucket = F.pmod(F.xxhash64(F.lit(split.seed), unit), F.lit(1_000_000)) / F.lit(1_000_000.0)
    return F.when(bucket < split.test_fraction, "test").otherwise("train")


def _escape_glob(path: str) -> str:
    return re.sub(r"([\\*?\[\]{}])", r"\\\1", path)


def read_contents(spark: SparkSession, cfg: Config, todo: DataFrame, n_todo: int, n_listed: int) -> DataFrame:
    """path, content, length, modificationTime for the files in ``todo`` that can still be read.

    Files that vanished since listing are skipped here (ignoreMissingFiles) and accounted for by the
    caller, which compares against ``todo``.
    """
    from pyspark.sql import functions as F

    root = qualify(spark, cfg.input.path)
    reader = (
        spark.read.format("binaryFile")
        .option("ignoreMissingFiles", "true")
        .option("recursiveFileLookup", "true")
    )
    if n_todo <= MAX_EXPLICIT_PATHS and n_todo < n_listed:
        paths = [_escape_glob(r["path"]) for r in todo.select("path").collect()]
        try:
            contents = reader.load(paths)
        except Exception as exc:  # a path vanished before Spark could check it: fall back
            log.info("explicit path read failed (%s); reading the whole folder instead", str(exc)[:120])
            contents = reader.load(root)
    else:
        contents = reader.load(root)
    contents = contents.filter(F.col("length") <= F.lit(cfg.input.max_file_bytes))
    return contents.join(broadcast_if_small(todo.select("path"), n_todo), on="path", how="left_semi")


def other_file_lengths(others: DataFrame) -> list[int] | None:
    """The lengths of the listed non-image files (None when there are more than read_tasks.MAX_FILES): taken while
    listing, since a scan of them later would fail on a file deleted meanwhile."""
    from imgfeat.io.read_tasks import MAX_FILES
    from imgfeat.session import sql_conf

    # A limit scans one partition, then more in jobs of growing size (4 more jobs for 5,216 listed files, most
    # folders holding no other file at all): here every partition in one job.
    with sql_conf(others.sparkSession, {"spark.sql.limit.initialNumPartitions": str(2**31 - 1)}):
        rows = others.select("file_length").limit(MAX_FILES + 1).collect()
    return None if len(rows) > MAX_FILES else [int(r["file_length"]) for r in rows]


def read_task_settings(spark: SparkSession, cfg: Config, todo: DataFrame, n_todo: int, n_listed: int,
                       other_lengths: list[int] | None) -> dict[str, str]:
    """Settings (for ``session.sql_conf`` around the action) that give :func:`read_contents`' scan of ``todo`` read
    tasks of ``inference.images_per_task`` images finishing together (:mod:`imgfeat.io.read_tasks`); empty where
    that scan also lists files already done, or other files whose lengths are unknown (``other_lengths`` None).
    ``todo`` must be persisted or materialised: its lengths are collected again."""
    from imgfeat.io.read_tasks import images_per_task, read_settings

    per_task = images_per_task(spark, cfg.inference)
    if n_todo <= MAX_EXPLICIT_PATHS and n_todo < n_listed:
        return read_settings(spark, todo, per_task)  # the scan reads these paths
    if n_todo == n_listed and other_lengths is not None:  # the scan reads the whole folder
        return read_settings(spark, todo, per_task, other_lengths)
    return {}


def broadcast_if_small(df: DataFrame, rows: int) -> DataFrame:
    """Broadcast a path list that fits comfortably in memory, so image bytes are never shuffled."""
    from pyspark.sql import functions as F

    return F.broadcast(df) if rows <= MAX_BROADCAST_ROWS else df
