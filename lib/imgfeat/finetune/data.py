"""The fine-tuning input: images listed, labelled and split as ``extract`` does, decoded once into a Parquet table.

Rows: path, rel_path, label, split (train | val | test), group_id, slice_index, image (uint8 bytes, size x size x 3,
RGB, after the same ``decode_file`` and resize as extract, rounded to integers). A multi-label input
(input.label.multi / input.label.findings; ``label`` null) adds ``targets`` and ``mask`` (array<float>, one entry per
finding in the findings' order: 1.0 = positive / known; a masked entry's target is 0.0 and means nothing), and the
table's description lists the ``findings``. Files that do not decode, are empty, too large or vanish go to
``<table>_errors`` with extract's error classes. Validation images are a seeded hash
share of the training ones, by group when the split is grouped. Training processes stream the table row group by
row group (``imgfeat.finetune.loop.epoch_rows``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
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
    labels: list[str]  # the classes; multi-label: the findings
    counts: dict[str, dict[str, int]]  # split -> label -> images; multi-label: split -> finding -> known positives
    listed: int
    failed: int
    findings: list[str] = field(default_factory=list)  # multi-label: the findings, in the targets' order; else []
    known: dict[str, dict[str, int]] = field(default_factory=dict)  # multi-label: split -> finding -> known images
    label_policy: str = ""  # multi-label: how the targets were read (io.multilabel.FindingsSpec.policy)

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
    findings, policy = _findings(images, inputs.path or "") if inputs.label.is_multi else ([], "")

    def run(batches: Iterator[pd.Series]) -> Iterator[pd.DataFrame]:
        for contents in batches:
            yield decode_to_uint8(contents, decode)

    udf = F.pandas_udf(run, DECODED_DDL)  # type: ignore[call-overload]
    contents = read_contents(spark, inputs, images, n, n)
    decoded = contents.select("path", F.sha2(F.col("content"), 256).alias("content_sha256"), udf(F.col("content")).alias("d"))
    decoded = decoded.join(images, on="path", how="inner").persist(StorageLevel.MEMORY_AND_DISK)
    check_labels(_with_audit_label(decoded.filter(F.col("d.error_class").isNull()), findings), allow_label_conflicts,
                 inputs.path or "", cached=(decoded, images))  # before any write
    labelled = F.col("labels").isNotNull() if findings else F.col("label").isNotNull()
    targets = _target_columns(findings)  # none for a single-label input: its table is as before
    good = decoded.filter(F.col("d.error_class").isNull() & labelled)
    good = good.select("path", "rel_path", "label", "split", "group_id", "image_id", *targets,
                       F.explode(F.arrays_zip(F.col("d.images").alias("image"), F.col("d.slice_index").alias("slice_index"))).alias("z"))
    good = good.select("path", "rel_path", "label", "group_id", "image_id", *[c for c in ("targets", "mask") if findings],
                       F.col("z.image").alias("image"), F.col("z.slice_index").alias("slice_index"),
                       _with_validation(finetune.seed, finetune.validation_fraction).alias("split"))
    rows_per_group = max(1, finetune.row_group_images)
    # Placed and ordered by image id (a hash of the relative path), so the same images give the same files and row
    # groups wherever the folder lies and however Spark read it: with the seeded epoch order, the same weights.
    parts = max(1, n // (4 * rows_per_group) + 1)
    laid_out = good.repartition(parts, "image_id").sortWithinPartitions("image_id", "slice_index")
    (laid_out.write.mode("overwrite").options(**parquet_write_options(laid_out.schema))
     .option("parquet.block.size", rows_per_group * size * size * 3).parquet(path))
    _errors(decoded, images, labelled, inputs.max_file_bytes, bool(findings)).write.mode("overwrite").parquet(
        path.rstrip("/") + "_errors")
    counts, known = _counts(spark.read.parquet(path), findings)
    n_failed = spark.read.parquet(path.rstrip("/") + "_errors").count()
    decoded.unpersist()
    images.unpersist()
    labels = list(findings) or sorted({lab for split in counts.values() for lab in split})
    return DecodedTable(path, path.rstrip("/") + "_errors", size, labels, counts, n, n_failed, list(findings), known,
                        policy)


def _findings(images: Any, source: str) -> tuple[list[str], str]:
    """A multi-label listing's findings (its ``findings`` column: the same list on every row) and how its targets
    were read (``label_policy``: the uncertain and blank policies)."""
    from pyspark.sql import functions as F

    row = images.filter(F.col("findings").isNotNull()).select("findings", "label_policy").first()
    if row is None or not row["findings"]:
        raise ValueError(f"the multi-label input {source!r} lists no findings: set input.label.findings (one manifest "
                         "column per finding) or input.label.multi.column (a delimited findings column)")
    return list(row["findings"]), row["label_policy"]


def _target_columns(findings: list[str]) -> list[Any]:
    """Multi-label: ``targets`` (1.0 where a finding is a known positive) and ``mask`` (1.0 where it is known), in
    the findings' order, from ``labels`` and ``label_mask``; [] for a single-label input."""
    from pyspark.sql import functions as F

    if not findings:
        return []

    def known(name: str) -> Any:
        return ~F.coalesce(F.array_contains(F.col("label_mask"), name), F.lit(False))

    return [F.array(*[(F.array_contains(F.col("labels"), n) & known(n)).cast("float") for n in findings]).alias("targets"),
            F.array(*[known(n).cast("float") for n in findings]).alias("mask")]


def _with_audit_label(decoded: Any, findings: list[str]) -> Any:
    """The rows as ``check_labels`` compares them: a multi-label row's ``label`` is its known positive findings joined
    by "|" ("(no finding)" when none), as ``train`` audits a multi-label table (``train.split.labelled_images``)."""
    from pyspark.sql import functions as F

    from imgfeat.train.split import known_positives

    if not findings:
        return decoded
    known = F.sort_array(known_positives())
    label = F.when(F.size(known) > 0, F.array_join(known, "|")).otherwise(F.lit("(no finding)"))
    return decoded.withColumn("label", F.when(F.col("labels").isNotNull(), label))


def _errors(decoded: Any, images: Any, labelled: Any, max_file_bytes: Any, multi: bool) -> Any:
    """The errors table: files that did not decode, decoded but unlabelled files, files that could not be read."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.job import unread_errors

    failed = decoded.filter(F.col("d.error_class").isNotNull()).select(
        "path", "rel_path", "label", F.col("d.error_class").alias("error_class"), F.col("d.error_message").alias("error_message"))
    what = "no row in the label manifest (findings)" if multi else "no label (folder, manifest or DICOM tag)"
    unlabelled = decoded.filter(F.col("d.error_class").isNull() & ~labelled).select(
        "path", "rel_path", "label", F.lit("unlabelled").alias("error_class"),
        F.lit(f"the image has {what}: it cannot be used for training").alias("error_message"))
    unread = unread_errors(images, decoded, max_file_bytes).select("path", "rel_path", "label", "error_class", "error_message")
    return failed.unionByName(unlabelled).unionByName(unread)


def _counts(written: Any, findings: list[str]) -> tuple[dict[str, dict[str, int]], dict[str, dict[str, int]]]:
    """(split -> label -> images, {}) of a single-label table; (split -> finding -> known positives, split -> finding
    -> known images) of a multi-label one."""
    from pyspark.sql import functions as F

    counts: dict[str, dict[str, int]] = {}
    if not findings:
        for r in written.groupBy("split", "label").count().collect():
            counts.setdefault(r["split"] or "none", {})[r["label"]] = r["count"]
        return counts, {}
    known: dict[str, dict[str, int]] = {}
    entries = written.select("split", F.posexplode(F.arrays_zip("targets", "mask")).alias("j", "v"))
    for r in entries.groupBy("split", "j").agg(F.sum(F.col("v.targets") * F.col("v.mask")).alias("positives"),
                                              F.sum("v.mask").alias("known")).collect():
        split, name = r["split"] or "none", findings[r["j"]]
        counts.setdefault(split, {})[name] = int(r["positives"])
        known.setdefault(split, {})[name] = int(r["known"])
    return counts, known


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
