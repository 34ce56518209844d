"""Reading a features table and splitting its images into train and test (grouped, duplicates kept together).

The split is made once per ``train`` call and shared by every backbone and head, so their results compare;
``audit_table`` runs the leakage report on exactly the split ``train`` would use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from imgfeat.config import Config
from imgfeat.config.schema import TrainConfig

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

REQUIRED_COLUMNS = ("image_id", "path", "label", "features", "model", "weights_id")
# Columns that help the split and the audit when the table has them (study_id, series_key: train.aggregate).
OPTIONAL_COLUMNS = ("split", "group_id", "content_sha256", "study_id", "series_key")


def table_format(spark: SparkSession, location: str, requested: str) -> str:
    """``auto``: delta when the location is a Delta table (or a table name), else parquet."""
    from imgfeat.store.tables import _hadoop_fs, is_table_name

    if requested != "auto":
        return requested
    if is_table_name(location):
        return "delta"
    fs, jpath = _hadoop_fs(spark, location)
    return "delta" if fs.exists(jpath.suffix("/_delta_log")) else "parquet"


def read_features(spark: SparkSession, location: str | None, requested_format: str = "auto") -> DataFrame:
    """The features table at ``location`` (train.features), checked for the columns training needs."""
    from imgfeat.store.tables import read_table, table_exists

    if not location:
        raise ValueError("no features table: pass --features PATH (or set train.features), the --output of extract")
    fmt = table_format(spark, location, requested_format)
    if not table_exists(spark, location, fmt):
        raise FileNotFoundError(f"features table {location!r} ({fmt}) does not exist or is empty; run `imgfeat extract` first")
    df = read_table(spark, location, fmt)
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"{location!r} is not an imgfeat features table: missing columns {', '.join(missing)}")
    return df


def split_units(images: DataFrame, links: tuple[str, ...] = ()) -> DataFrame:
    """``unit``: what must stay on one side of a split. An image's group (patient) when it has one, else itself;
    then images with the same content, and images with the same value of a ``links`` column (a study:
    ``train.aggregate``), are merged into one unit, and their units with them (two passes of min-propagation:
    exact duplicates, studies and the groups they link end up together)."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from imgfeat.io.splits import split_unit

    if "item" not in images.columns:
        images = images.withColumn("item", F.col("path"))
    has_group = "group_id" in images.columns
    unit = split_unit() if has_group else F.col("image_id")
    images = images.withColumn("unit", unit)
    same = [Window.partitionBy(F.coalesce(F.col("content_sha256"), F.col("path")))] if "content_sha256" in images.columns else []
    # A row without a key links nothing (its own item stands in).
    same += [Window.partitionBy(F.coalesce(F.col(c).cast("string"), F.concat(F.lit("item:"), F.col("item"))))
             for c in links if c in images.columns]
    if same:
        for _ in range(2):
            for window in same:
                images = images.withColumn("unit", F.min("unit").over(window))
            images = images.withColumn("unit", F.min("unit").over(Window.partitionBy(unit)))
    return images


def assign_split(images: DataFrame, tc: TrainConfig) -> tuple[DataFrame, str]:
    """path, image_id, label[, split, group_id, content_sha256] -> path, image_id, label, split, is_test, unit, by
    ``tc.split_mode`` (the train settings); returns (frame, mode used).

    Keyed by ``path``: image ids are relative-path hashes, so two input folders may share one (root_a/NORMAL/1.png
    and root_b/NORMAL/1.png); both images stay.

    ``hash``: split units (``split_units``: groups, merged with exact duplicates, and with studies when
    ``tc.aggregate`` is study or series) are ordered by a seeded hash within their class, and units go to the
    test set until it holds round(test_fraction x class size) images: exactly stratified without groups, as nearly
    as the groups allow with them, every unit on one side, and independent of backbone and head. The class is
    ``stratum`` when the images have one (multi-label: whether the image has a known positive finding), else
    ``label``.
    """
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    from imgfeat.io.splits import hash_bucket

    mode = tc.split_mode
    values: set[str] = set()
    if "split" in images.columns and mode in ("auto", "column"):
        values = {r["split"] for r in images.select("split").distinct().collect()}
    if mode == "column" and not {"train", "test"} <= values:
        raise ValueError(
            f"train.split_mode=column, but the features table's split column has {sorted(v for v in values if v) or 'no values'}; "
            "extract with --split-mode folder/hash, or use train.split_mode=hash"
        )
    from imgfeat.train.aggregate import split_links

    images = split_units(images, split_links(tc.aggregate))
    if mode in ("auto", "column") and {"train", "test"} <= values:
        return images.select("item", "path", "image_id", "label", "split", "unit").withColumn(
            "is_test", F.when(F.col("split") == "test", True).when(F.col("split") == "train", False)
        ), "column"
    # One class per unit (its most frequent label) so that a unit is never split between classes' quotas.
    stratum = "stratum" if "stratum" in images.columns else "label"
    per_unit = images.groupBy("unit", stratum).agg(F.count("*").alias("_k"))
    unit_class = per_unit.withColumn(
        "_r", F.row_number().over(Window.partitionBy("unit").orderBy(F.desc("_k"), stratum))
    ).filter(F.col("_r") == 1).select("unit", F.col(stratum).alias("_class"))
    sizes = images.groupBy("unit").agg(F.count("*").alias("_size"))
    units = unit_class.join(sizes, on="unit", how="inner").withColumn("_h", hash_bucket(tc.seed, F.col("unit"), buckets=None))
    by_class = Window.partitionBy("_class")
    ordered = by_class.orderBy("_h", "unit").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    units = units.withColumn("_before", F.sum("_size").over(ordered) - F.col("_size")).withColumn(
        "_n", F.sum("_size").over(by_class))
    units = units.withColumn("is_test", F.col("_before") < F.round(F.col("_n") * F.lit(tc.test_fraction)))
    split = images.select("item", "path", "image_id", "label", "unit").join(units.select("unit", "is_test"), on="unit", how="inner")
    return split.select("item", "path", "image_id", "label", F.lit(None).cast("string").alias("split"), "is_test", "unit"), "hash"


def with_item(table: DataFrame) -> DataFrame:
    """``item``: what one model input is, the file's path, plus ``#<slice>`` for a slice of a volume."""
    from pyspark.sql import functions as F

    if "slice_index" not in table.columns:
        return table.withColumn("item", F.col("path"))
    return table.withColumn("item", F.when(F.col("slice_index").isNull(), F.col("path")).otherwise(
        F.concat(F.col("path"), F.lit("#"), F.col("slice_index").cast("string"))))


def is_multilabel(table: DataFrame) -> bool:
    """Whether ``table`` holds multi-label findings: a ``findings`` column with a value."""
    from pyspark.sql import functions as F

    return "findings" in table.columns and bool(table.filter(F.col("findings").isNotNull()).limit(1).count())


def known_positives() -> Column:
    """A multi-label row's positive findings that are not masked (``labels`` less ``label_mask``)."""
    from pyspark.sql import functions as F

    return F.array_except(F.col("labels"), F.coalesce(F.col("label_mask"), F.array().cast("array<string>")))


def labelled_images(table: DataFrame, multi: bool | None = None) -> DataFrame:
    """One row per labelled image or slice (``item``), with the columns the split uses. Multi-label tables
    (``multi``; None: ``is_multilabel``): the rows with ``labels``; ``label`` = their known positive findings
    joined by "|" ("(no finding)" when none: what the audit compares), ``stratum`` = whether there is one (what
    the hash split stratifies by). Masked findings count for neither."""
    from pyspark.sql import functions as F

    optional = [c for c in OPTIONAL_COLUMNS if c in table.columns]
    if multi is None:
        multi = is_multilabel(table)
    if not multi:
        return (with_item(table).filter(F.col("label").isNotNull())
                .select("item", "path", "image_id", "label", *optional).dropDuplicates(["item"]))
    known = F.sort_array(known_positives())
    rows = with_item(table).filter(F.col("labels").isNotNull()).select(
        "item", "path", "image_id",
        F.when(F.size(known) > 0, F.array_join(known, "|")).otherwise(F.lit("(no finding)")).alias("label"),
        F.when(F.size(known) > 0, F.lit("finding")).otherwise(F.lit("no finding")).alias("stratum"), *optional)
    return rows.dropDuplicates(["item"])


def audit_images(split: DataFrame, table: DataFrame) -> DataFrame:
    """The audit's input: one row per image with its side of ``split`` and its fingerprints and group."""
    from pyspark.sql import functions as F

    extra = [c for c in ("rel_path", "group_id", "content_sha256", "phash") if c in table.columns]
    info = with_item(table).select("item", *extra).dropDuplicates(["item"])
    side = F.when(F.col("is_test"), "test").when(~F.col("is_test"), "train")
    images = split.select("item", "path", "label", side.alias("side")).join(info, on="item", how="left")
    return images if "rel_path" in images.columns else images.withColumn("rel_path", F.col("path"))


def audit_table(spark: SparkSession, cfg: Config) -> Any:
    """``imgfeat audit``: the leakage report of ``train.features`` on the split ``train`` would make."""
    from imgfeat.train.audit import run_audit

    table = read_features(spark, cfg.train.features, cfg.output.format)
    split, mode = assign_split(labelled_images(table), cfg.train)
    report = run_audit(audit_images(split, table), cfg.train.validity.near_duplicate_bits)
    report.split_mode = mode
    return report
