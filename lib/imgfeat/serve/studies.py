"""``<output>_studies``: one row per study (series, patient) of a multi-label model's predictions.

With ``predict.aggregate`` (study | series | patient) a predict run groups the model's rows in the predictions
table by their key (``study_id``, ``series_key``, ``group_id``) and combines each group's per-finding
probabilities (``imgfeat.scoring.aggregate``: mean, max or noisy-OR; the same function as ``train`` and ``imgfeat
serve``), one ``applyInPandas`` call per group. It reads the whole table for the model, not only this run's rows,
so that a study whose images arrive over several incremental runs is combined from all of them; each run rewrites
the model's rows of that level. Rows without a key belong to no study: they are counted (``unkeyed``) and named
in the summary. Rows whose probabilities are not finite are left out of their study's numbers and counted in its
``failed``; images that did not decode are in the errors table (with their ``study_id``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.scoring.aggregate import aggregate_one

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.featurize.job import ScanRun

log = logging.getLogger(__name__)

LEVELS = {"study": "study_id", "series": "series_key", "patient": "group_id"}  # predict.aggregate -> key column
AGGREGATED_DDL = ("key string, images long, files long, failed long, finding_probability array<double>, "
                  "findings_positive array<string>")


@dataclass(frozen=True)
class Studies:
    """What ``write_studies`` wrote."""

    path: str  # the studies table
    rows: int  # studies of this model at this level
    unkeyed: int  # the model's predicted rows without a key


def studies_location(output: str) -> str:
    """The studies table beside the predictions table ``output`` (a path or a catalog table name)."""
    return output.rstrip("/") + "_studies"


def check_study_settings(predict: Any) -> None:
    """``predict.aggregate`` and ``predict.aggregation`` are known values (the config loader checks them too)."""
    from imgfeat.scoring.aggregate import check_aggregation

    if predict.aggregate != "none" and predict.aggregate not in LEVELS:
        raise ValueError(f"predict.aggregate={predict.aggregate!r}: use none, {', '.join(LEVELS)}")
    if predict.aggregation is not None:
        check_aggregation(predict.aggregation)


def check_study_keys(level: str, listing_columns: list[str], grouped: bool = True) -> None:
    """ValueError when the input cannot give ``level``'s key (study_id and group_id come with the listing, group_id
    only when ``grouped``: input.split.group is set; series_key from each DICOM file)."""
    if level in ("none", "series"):
        return
    column = LEVELS[level]
    if column not in listing_columns or (level == "patient" and not grouped):
        how = ("set input.study.column (a manifest column) or input.study.pattern (a regex on the relative path)"
               if level == "study" else "set input.split.group (regex, manifest_column or patient_key)")
        raise ValueError(f"predict.aggregate={level} needs each image's {column}, which this input has none of: {how}")


def _aggregator(how: str, thresholds: list[float], findings: list[str]) -> Any:
    """The applyInPandas function: one key's rows -> its study row."""
    import pandas as pd

    limits = np.asarray(thresholds, dtype=np.float64)

    def combine(key: tuple, pdf: pd.DataFrame) -> pd.DataFrame:
        p = np.array([np.asarray(v, dtype=np.float64) if v is not None else np.full(len(findings), np.nan)
                      for v in pdf["finding_probability"]]).reshape(len(pdf), len(findings))
        finite = np.isfinite(p).all(axis=1)
        combined = aggregate_one(p[finite], how) if finite.any() else None
        called = [f for f, hit in zip(findings, combined >= limits, strict=True) if hit] if combined is not None else None
        return pd.DataFrame({"key": [key[0]], "images": [int(finite.sum())], "files": [int(pdf["path"].nunique())],
                             "failed": [int((~finite).sum())],
                             "finding_probability": [list(combined) if combined is not None else None],
                             "findings_positive": [called]})

    return combine


def study_rows(predictions: DataFrame, level: str, how: str, findings: list[str], thresholds: list[float],
               probability_columns: bool, meta: list[Column]) -> DataFrame:
    """One row per key of ``predictions`` (the model's rows with a key): path (``<level>:<key>``, the row's key in
    the table), level, key, aggregation, images, files, failed, findings, finding_probability, findings_positive,
    the probability columns, and the run's ``meta``."""
    from pyspark.sql import functions as F

    from imgfeat.scoring.classifier import probability_columns as column_names

    keyed = predictions.select(F.col(LEVELS[level]).alias("key"), "path", "finding_probability")
    combined = keyed.groupBy("key").applyInPandas(_aggregator(how, thresholds, findings), AGGREGATED_DDL)
    prob_cols = [F.col("finding_probability")[i].alias(c) for i, c in enumerate(column_names(findings))] \
        if probability_columns else []
    return combined.select(
        F.concat(F.lit(f"{level}:"), F.col("key")).alias("path"), F.lit(level).alias("level"), "key",
        F.lit(how).alias("aggregation"), "images", "files", "failed",
        F.array(*[F.lit(f) for f in findings]).alias("findings"), "finding_probability", "findings_positive",
        *prob_cols, *meta)


def write_studies(spark: SparkSession, run: ScanRun, predict: Any, how: str, findings: list[str],
                  thresholds: list[float], meta: list[Column]) -> Studies | None:
    """Rewrite the model's ``predict.aggregate`` rows of the studies table from the predictions table (under a
    writer lease of this run on it); None when the predictions table does not exist yet."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.store.lease import Owner, open_leases
    from imgfeat.store.tables import append_rows, read_table, repair, table_exists, table_locks

    level, output, fmt = predict.aggregate, run.tables.output, run.tables.fmt
    location = studies_location(output)
    with table_locks(spark, [output], fmt, run.leases):
        if not table_exists(spark, output, fmt):
            return None
        mine = read_table(spark, output, fmt).filter(F.col("model") == run.model)
        unkeyed = mine.filter(F.col(LEVELS[level]).isNull()).count()
        rows = study_rows(mine.filter(F.col(LEVELS[level]).isNotNull()), level, how, findings, thresholds,
                          predict.probability_columns, meta).persist(StorageLevel.MEMORY_AND_DISK)
        n = rows.count()  # computed while the table cannot be swapped
    if unkeyed:
        log.warning("%d predicted images have no %s: they are in no row of %s", unkeyed, LEVELS[level], location)
    owner = Owner(run.run_id, run.model, run.weights_id, job="predict")
    try:
        with open_leases(spark, [location], fmt, owner, run.tables.lease_timeout_s, run.tables.lease_dir) as leases:
            repair(spark, location, fmt, leases[location])
            keys = rows.select("path", "model", "weights_id")
            if table_exists(spark, location, fmt):
                old = read_table(spark, location, fmt).filter((F.col("model") == run.model) & (F.col("level") == level))
                keys = keys.unionByName(old.select("path", "model", "weights_id"))
            # collected: the rewrite must not read the table it replaces lazily (one short row per study)
            replace = spark.createDataFrame([tuple(r) for r in keys.distinct().collect()],
                                            "path string, model string, weights_id string")
            append_rows(spark, rows, location, fmt, replace=replace, lease=leases[location])
    finally:
        rows.unpersist()
    return Studies(location, n, unkeyed)
