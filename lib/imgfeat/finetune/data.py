"""The fine-tuning input: images listed, labelled and split as ``extract`` does, decoded once into a Parquet table.

Rows: path, rel_path, label, split (train | val | test), group_id, slice_index, image (uint8 bytes, size x size x 3,
RGB, after the same ``decode_file`` and resize as extract, rounded to integers). Files that do not decode, are empty,
too large or vanish go to ``<table>_errors`` with extract's error classes. Validation images are a seeded hash
share of the training ones, by group when the split is grouped. Training processes stream the table row group by
row group (``imgfeat.finetune.loop.epoch_rows``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from imgfeat.config.schema import FinetuneConfig, InputConfig, PreprocessConfig
from imgfeat.io.decoders import DecodeError, DecodeOptions, decode_or_error
from imgfeat.io.decoders.deadline import DecodeWatchdog

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

DECODED_DDL = "images array<binary>, slice_index array<int>, error_class string, error_message string"


@dataclass
class DecodedTable:
    path: str
    errors_path: str
    size: int
    labels: list[str]
    counts: dict[str, dict[str, int]]  # split -> label -> images
    listed: int
    failed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def decode_to_uint8(contents: pd.Series, decode: DecodeOptions) -> pd.DataFrame:
    """File bytes -> per file: the decoded images (uint8 bytes) and slice indices, or the error."""
    out: dict[str, list[Any]] = {"images": [], "slice_index": [], "error_class": [], "error_message": []}
    watchdog = DecodeWatchdog(decode.decode_timeout_s)  # a file past the limit: a timed_out row
    for data in contents:
        decoded = watchdog.call(decode_or_error, None if data is None else bytes(data), decode)
        if isinstance(decoded, DecodeError):
            out["images"].append(None)
            out["slice_index"].append(None)
            out["error_class"].append(decoded.error_class)
            out["error_message"].append(decoded.message)
        else:
            out["images"].append([np.clip(np.rint(d.array), 0, 255).astype(np.uint8).tobytes() for d in decoded])
            out["slice_index"].append([d.slice_index for d in decoded])
            out["error_class"].append(None)
            out["error_message"].append(None)
    watchdog.close()
    return pd.DataFrame(out)


def build_decoded_table(spark: SparkSession, inputs: InputConfig, preprocess: PreprocessConfig,
                        finetune: FinetuneConfig, allow_label_conflicts: bool, size: int, path: str) -> DecodedTable:
    """List, label, split and decode ``input.path`` into ``path`` (overwritten) and ``path + '_errors'``."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.featurize.job import unread_errors
    from imgfeat.io.listing import list_files, listing_settings
    from imgfeat.io.reading import read_contents
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import parquet_write_options

    decode = DecodeOptions.from_config(preprocess, size)
    images, _ = list_files(spark, inputs)
    images = images.persist(StorageLevel.MEMORY_AND_DISK)
    with sql_conf(spark, listing_settings(spark)):  # the scans that list, in one task per core
        n = images.count()
    if not n:
        raise ValueError(f"no images under {inputs.path}")

    def run(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for contents in batches:
            yield decode_to_uint8(contents, decode)

    udf = F.pandas_udf(run, DECODED_DDL)  # type: ignore[call-overload]
    contents = read_contents(spark, inputs, images, n, n)
    decoded = contents.select("path", F.sha2(F.col("content"), 256).alias("content_sha256"), udf(F.col("content")).alias("d"))
    decoded = decoded.join(images, on="path", how="inner").persist(StorageLevel.MEMORY_AND_DISK)
    check_labels(decoded.filter(F.col("d.error_class").isNull()), allow_label_conflicts, inputs.path or "",
                 cached=(decoded, images))  # before any write
    good = decoded.filter(F.col("d.error_class").isNull() & F.col("label").isNotNull())
    good = good.select("path", "rel_path", "label", "split", "group_id", "image_id",
                       F.explode(F.arrays_zip(F.col("d.images").alias("image"), F.col("d.slice_index").alias("slice_index"))).alias("z"))
    good = good.select("path", "rel_path", "label", "group_id", "image_id", F.col("z.image").alias("image"),
                       F.col("z.slice_index").alias("slice_index"), _with_validation(finetune.seed, finetune.validation_fraction).alias("split"))
    rows_per_group = max(1, finetune.row_group_images)
    # Placed and ordered by image id (a hash of the relative path), so the same images give the same files and row
    # groups wherever the folder lies and however Spark read it: with the seeded epoch order, the same weights.
    parts = max(1, n // (4 * rows_per_group) + 1)
    laid_out = good.repartition(parts, "image_id").sortWithinPartitions("image_id", "slice_index")
    (laid_out.write.mode("overwrite").options(**parquet_write_options(laid_out.schema))
     .option("parquet.block.size", rows_per_group * size * size * 3).parquet(path))
    failed = decoded.filter(F.col("d.error_class").isNotNull()).select(
        "path", "rel_path", "label", F.col("d.error_class").alias("error_class"), F.col("d.error_message").alias("error_message"))
    unlabelled = decoded.filter(F.col("d.error_class").isNull() & F.col("label").isNull()).select(
        "path", "rel_path", "label", F.lit("unlabelled").alias("error_class"),
        F.lit("the image has no label (folder, manifest or DICOM tag): it cannot be used for training").alias("error_message"))
    unread = unread_errors(images, decoded, inputs.max_file_bytes).select("path", "rel_path", "label", "error_class", "error_message")
    errors = failed.unionByName(unlabelled).unionByName(unread)
    errors.write.mode("overwrite").parquet(path.rstrip("/") + "_errors")
    written = spark.read.parquet(path)
    counts: dict[str, dict[str, int]] = {}
    for r in written.groupBy("split", "label").count().collect():
        counts.setdefault(r["split"] or "none", {})[r["label"]] = r["count"]
    n_failed = spark.read.parquet(path.rstrip("/") + "_errors").count()
    decoded.unpersist()
    images.unpersist()
    labels = sorted({lab for split in counts.values() for lab in split})
    return DecodedTable(path, path.rstrip("/") + "_errors", size, labels, counts, n, n_failed)


def check_labels(decoded: Any, allow_conflicts: bool, source: str, cached: tuple[Any, ...] = ()) -> None:
    """Stop (LabelConflictError, naming the files and labels on the console) when identical files carry different
    labels, as ``train`` does, unless ``allow_conflicts`` (train.validity.allow_label_conflicts); ``source``: the input
    folder, for the message. ``decoded``: the files that decoded
    (path, rel_path, label, split, content_sha256); ``cached``: frames to unpersist when stopping."""
    from pyspark.sql import functions as F

    from imgfeat.train.audit import LabelConflictError, check_label_conflicts, label_conflicts

    files = decoded.filter(F.col("label").isNotNull()).select(
        "path", "rel_path", "label", F.col("split").alias("side"), "content_sha256")
    count, conflicts = label_conflicts(files)
    try:
        check_label_conflicts(count, conflicts, allow_conflicts, f"the input {source!r}")
    except LabelConflictError:
        for frame in cached:
            frame.unpersist()
        raise


def _with_validation(seed: int, fraction: float) -> Any:
    """train -> val for a seeded hash share of the training units (groups when grouped, else images)."""
    from pyspark.sql import functions as F

    from imgfeat.finetune.loop import SeedPurpose, derived_seed
    from imgfeat.io.splits import hash_bucket, split_unit

    bucket = hash_bucket(derived_seed(seed, SeedPurpose.VALIDATION), split_unit())
    split = F.coalesce(F.col("split"), F.lit("train"))
    return F.when((split == "train") & (bucket < fraction), F.lit("val")).otherwise(split)


def table_files(path: str) -> list[str]:
    """The Parquet part files of a table on a local or mounted path, in name order."""
    local = path.removeprefix("file:")
    return sorted(os.path.join(local, f) for f in os.listdir(local) if f.endswith(".parquet"))
