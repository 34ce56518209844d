"""Results above the image: a volume's slices pooled before the head, and predictions combined per study, series
or patient after it (``train.pool_slices``, ``train.aggregate``, ``train.aggregation``).

- ``pool_slices``: the rows of one volume (same path and backbone, several ``slice_index``) become one row whose
  features are the mean (or maximum) of the slices' (the 2-D vs 3-D question of the CT study): training and
  evaluation then see one row per volume.
- ``train.aggregate``: study (``study_id``), series (``series_key``) or patient (``group_id``). An image without a
  key stands alone (its own study). Splits keep a study (series) on one side (``split_links``), and the test
  predictions are combined per key (``imgfeat.train.findings.aggregate``: mean, max, noisy-OR) and scored again:
  ``aggregated_single`` (one class per study, as MURA's study-level kappa and AUC) and, for multi-label tasks,
  ``imgfeat.train.multilabel``. Metric names carry the level: ``study_test_kappa``, ``study_test_auc_macro``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame

    from imgfeat.config.schema import ValidityConfig

log = logging.getLogger(__name__)

AGGREGATE_KEYS = {"study": "study_id", "series": "series_key", "patient": "group_id"}
WHERE_KEYS_COME_FROM = {
    "study": "input.study (a manifest column or a path pattern) or DICOM studies",
    "series": "DICOM files (series_key)",
    "patient": "input.split.group (a patient per image)",
}


def split_links(aggregate: str) -> tuple[str, ...]:
    """Columns whose equal values must share a side of the split: the study for study and series results (and
    the series for series), nothing else (a patient is already the split unit)."""
    return {"study": ("study_id",), "series": ("study_id", "series_key")}.get(aggregate, ())


def check_aggregate_keys(table: DataFrame, aggregate: str, location: str) -> None:
    """Refuse ``train.aggregate`` when the table has no key to aggregate by; warn about images without one."""
    from pyspark.sql import functions as F

    if aggregate == "none":
        return
    column = AGGREGATE_KEYS[aggregate]
    if column not in table.columns:
        raise ValueError(f"train.aggregate={aggregate} needs a {column} column, and {location!r} has none; re-extract "
                         f"with keys from {WHERE_KEYS_COME_FROM[aggregate]}, or set train.aggregate=none")
    counts = table.agg(F.count("*").alias("n"), F.count(column).alias("keyed")).first()
    if not counts["keyed"]:
        raise ValueError(f"train.aggregate={aggregate}: no row of {location!r} has a {column}; re-extract with keys "
                         f"from {WHERE_KEYS_COME_FROM[aggregate]}, or set train.aggregate=none")
    if counts["keyed"] < counts["n"]:
        log.warning("train.aggregate=%s: %d of %d rows have no %s; each of those images counts as its own %s",
                    aggregate, counts["n"] - counts["keyed"], counts["n"], column, aggregate)


def key_column(aggregate: str) -> Column:
    """Each row's aggregation key (``item`` needed): its study / series / patient, else the image itself."""
    from pyspark.sql import functions as F

    return F.coalesce(F.col(AGGREGATE_KEYS[aggregate]).cast("string"), F.concat(F.lit("image:"), F.col("item")))


def pool_slices(table: DataFrame, how: str) -> DataFrame:
    """One row per (path, model, weights id): the features of its slices pooled by ``how`` (mean | max), the
    other columns of its first slice, ``slice_index`` null and ``pooled_slices`` = how many were pooled."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.ml.stat import Summarizer
    from pyspark.sql import functions as F

    if how not in ("mean", "max"):
        raise ValueError(f"train.pool_slices={how!r}: use none, mean or max")
    keys = ["path", "model", "weights_id"]
    ordered = table.withColumn("_slice", F.coalesce(F.col("slice_index"), F.lit(-1))) \
        if "slice_index" in table.columns else table.withColumn("_slice", F.lit(-1))
    skip = {*keys, "features", "features_f16", "slice_index", "_slice"}
    others = [c for c in table.columns if c not in skip]
    summary = Summarizer.mean if how == "mean" else Summarizer.max
    first = F.min_by(F.struct(*others), F.col("_slice")) if others else None
    aggs = [summary(array_to_vector(F.col("features"))).alias("_v"), F.count("*").alias("pooled_slices")]
    pooled = ordered.groupBy(*keys).agg(*aggs, *([first.alias("_first")] if first is not None else []))
    columns = [*keys, *[F.col(f"_first.{c}").alias(c) for c in others],
               vector_to_array(F.col("_v"), "float32").alias("features"), F.lit(None).cast("int").alias("slice_index"),
               "pooled_slices"]
    return pooled.select(*columns)


def first_per_key(keys: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Per distinct key (in ``np.unique`` order): the value of its first row."""
    uniq, first = np.unique(np.asarray(keys), return_index=True)
    return np.asarray(values)[first]


def single_label_per_key(keys: np.ndarray, y: np.ndarray, labels: list[str], level: str) -> np.ndarray:
    """Per distinct key: its images' one class index; ValueError naming the first key whose images disagree."""
    uniq, inverse = np.unique(np.asarray(keys), return_inverse=True)
    low = np.full(len(uniq), np.iinfo(np.int64).max)
    high = np.full(len(uniq), -1)
    np.minimum.at(low, inverse, y.astype(np.int64))
    np.maximum.at(high, inverse, y.astype(np.int64))
    bad = np.nonzero(low != high)[0]
    if len(bad):
        k = bad[0]
        raise ValueError(f"train.aggregate={level}: the images of {level} {uniq[k]!r} carry different labels "
                         f"({labels[low[k]]} and {labels[high[k]]}), and {len(bad)} {level} key(s) in all do; a "
                         f"{level}-level result needs one label per {level}: fix the labels or set train.aggregate=none")
    return low


def aggregated_single(keys: np.ndarray, units: np.ndarray, y: np.ndarray, proba: np.ndarray | None,
                      labels: list[str], level: str, how: str, validity: ValidityConfig,
                      seed: int) -> tuple[dict[str, float], dict[str, Any] | None]:
    """(metrics named ``<level>_test_*``, report) of a single-label head's test predictions combined per key:
    the class probabilities by ``how`` (renormalised), the class = argmax, bootstrap over the keys' units."""
    from imgfeat.train.findings import aggregate
    from imgfeat.train.metrics import evaluate

    if proba is None or not len(y):
        log.warning("no class probabilities to combine per %s: no %s-level metrics", level, level)
        return {}, None
    uniq, combined = aggregate(keys, proba, how)
    combined = combined / np.maximum(combined.sum(axis=1, keepdims=True), 1e-300)
    y_key = single_label_per_key(keys, y, labels, level)
    metrics, report = evaluate(y_key, combined.argmax(axis=1), combined, labels, first_per_key(keys, units),
                               validity, seed)
    out = {f"{level}_{k}": v for k, v in metrics.items()}
    out[f"{level}_n_test"] = float(len(uniq))
    report.update(level=level, aggregation=how)
    return out, report
