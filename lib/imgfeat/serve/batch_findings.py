"""Batch prediction with a multi-label model: per-finding probabilities and calls per image (and per study).

A multi-label model (``classifier.json`` task ``multi``) is scored from its pyfunc model's classifier folder, which
every ``train`` run logs: the scan skeleton (``imgfeat.featurize.job``) lists, reads and featurizes exactly as for a
single-label model, with the backbone, weights, decode settings and precision recorded with the model (so bad files
get extract's error classes), and the head's arrays (``HeadArrays``, broadcast once) score the features in a
pandas UDF on the workers, NumPy only, the same computation as ``imgfeat serve``. Each image's row holds
``findings`` (the names, in order), ``finding_probability`` (array<double>), ``findings_positive`` (the findings
at or above their thresholds), ``prediction`` (those joined by "|") and, with ``predict.probability_columns``, one
``probability_<finding>`` column each. With ``predict.aggregate`` the run also writes ``<output>_studies``
(``imgfeat.serve.studies``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd  # at module level: the pandas UDF's type hints are read from this module's names

from imgfeat.config import Config

if TYPE_CHECKING:
    from pyspark.sql import Column, DataFrame, SparkSession

    from imgfeat.featurize.job import Featurized, ScanPlan, ScanRun, Written
    from imgfeat.featurize.spec import FeaturizeSpec
    from imgfeat.serve.model_ref import ModelRef, PredictResult

log = logging.getLogger(__name__)

# Columns of the listing (and the featurized rows) carried into the predictions table when present: known labels,
# the split, and the keys a study, series or patient is found by.
CARRIED = ("labels", "label_mask", "split", "study_id", "group_id", "study_key", "series_key")


def pyfunc_uri_of(uri: str) -> str:
    """The pyfunc model of what a predict URI names: ``runs:/RUN_ID[/model|/pyfunc_model]`` -> that run's
    ``pyfunc_model``; ``models:/NAME/VERSION`` (or latest, or an alias) -> the registered run's; ``models:/m-ID``
    -> its run's; anything else (a pyfunc model's path or URI) as it is."""
    from imgfeat.scoring.flavor import PYFUNC_MODEL, SPARK_MODEL
    from imgfeat.scoring.pyfunc import resolve_uri

    if uri.startswith("runs:/"):
        run_id, _, path = uri.removeprefix("runs:/").strip("/").partition("/")
        return f"runs:/{run_id}/{PYFUNC_MODEL}" if path in ("", SPARK_MODEL, PYFUNC_MODEL) else uri
    if uri.startswith("models:/m-"):
        from mlflow.models import get_model_info

        run_id = get_model_info(uri).run_id
        return f"runs:/{run_id}/{PYFUNC_MODEL}" if run_id else uri
    return resolve_uri(uri)


def classifier_task(pyfunc_uri: str) -> str | None:
    """The ``task`` in the pyfunc model's ``classifier.json`` (two small files read, nothing else); None when
    ``pyfunc_uri`` is no imgfeat pyfunc model (or cannot be read)."""
    import json

    import yaml

    from imgfeat.scoring.flavor import CLASSIFIER_ARTIFACT, CLASSIFIER_FILE

    try:
        with open(_fetch(pyfunc_uri, "MLmodel"), encoding="utf-8") as fh:
            flavor = (yaml.safe_load(fh).get("flavors") or {}).get("python_function") or {}
        path = ((flavor.get("artifacts") or {}).get(CLASSIFIER_ARTIFACT) or {}).get("path")
        if not isinstance(path, str) or ".." in path.replace("\\", "/").split("/"):
            return None
        with open(_fetch(pyfunc_uri, f"{path.strip('/')}/{CLASSIFIER_FILE}"), encoding="utf-8") as fh:
            return str(json.load(fh).get("task", "single"))
    except Exception as exc:  # not an imgfeat pyfunc model: the single-label path says what is wrong
        log.debug("no imgfeat classifier at %s: %s", pyfunc_uri, exc)
        return None


def _fetch(model_uri: str, relative: str) -> str:
    """A local path of one file of a model (a local folder's own file, else downloaded)."""
    if os.path.isdir(model_uri):
        from imgfeat.scoring.flavor import inside

        return inside(model_uri, os.path.join(model_uri, relative), relative)
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=f"{model_uri.rstrip('/')}/{relative}")


def open_multi_label(cfg: Config) -> tuple[Any, str] | None:
    """(classifier, its pyfunc URI) when ``predict.model_uri`` is a multi-label model, else None."""
    uri = cfg.predict.model_uri
    if not uri:
        return None
    from imgfeat.scoring.pyfunc import load_classifier  # imgfeat's model folder: arrays and JSON, no pickle
    from imgfeat.train.tracking import use_tracking

    use_tracking(cfg.mlflow)
    try:
        pyfunc = pyfunc_uri_of(uri)
    except Exception as exc:  # e.g. a registry name that does not exist: the single-label path reports it
        log.debug("%s names no pyfunc model: %s", uri, exc)
        return None
    if classifier_task(pyfunc) != "multi":
        return None
    return load_classifier(pyfunc), pyfunc


@dataclass(frozen=True)
class _Scoring:
    """What a multi-label predict run scores with, fixed before it reads the tables."""

    ref: ModelRef
    classifier: Any  # ImageClassifier (task multi)
    spec: FeaturizeSpec
    weights_broadcast: Any
    head_broadcast: Any  # the HeadArrays

    @property
    def findings(self) -> list[str]:
        return list(self.classifier.findings)


def model_ref(uri: str, pyfunc: str) -> ModelRef:
    """Rows are keyed by the pyfunc model ``uri`` resolves to (the same for runs:/ID, runs:/ID/model and a
    registered version of that run); the version is the registry's for a models:/NAME URI."""
    from imgfeat.serve.model_ref import ModelRef, registry_version, resolve_model

    target = resolve_model(pyfunc)
    return ModelRef(uri=uri, key=target.key, run_id=target.run_id, version=registry_version(uri))


def classifier_spec(spark: SparkSession, cfg: Config, classifier: Any, source: Any) -> FeaturizeSpec:
    """The workers' spec for the classifier's backbone: its recorded decoding (with this run's decode time limit)
    and precision, run by this run's ``inference`` settings (as ``batch.scoring_spec`` for a Spark model)."""
    from imgfeat.featurize.spec import dicom_label_tag, featurize_spec
    from imgfeat.io.groups import id_salt
    from imgfeat.session import threads_for

    decode = dataclasses.replace(classifier.decode, decode_timeout_s=cfg.preprocess.decode_timeout_s)
    inference = dataclasses.replace(cfg.inference, precision=classifier.info.precision)
    return featurize_spec(classifier.backbone, source, decode, inference, threads_for(spark, inference.threads),
                          id_salt(cfg.privacy.id_salt), dicom_label_tag(cfg.input.label))


def _weights(cfg: Config, classifier: Any) -> Any:
    """The model's weights: ``predict.weights`` (a local copy of its weights file) or the copy in the model."""
    given = os.path.abspath(os.path.expanduser(cfg.predict.weights)) if cfg.predict.weights else None
    source = classifier.weights_source(given)
    if source.weights_id != classifier.info.weights_id:
        raise ValueError(f"the backbone's weights resolved to {source.weights_id}, but the model was trained on "
                         f"{classifier.info.weights_id}")
    return source


def run_predict_findings(spark: SparkSession, cfg: Config, classifier: Any, pyfunc: str, started: float
                         ) -> PredictResult:
    """``run_predict`` for a multi-label model: every image under ``input.path`` scored per finding; errors as
    for any model; ``predict.aggregate``: the studies table too. Writer leases on the tables throughout."""
    from imgfeat.featurize.job import Tables, broadcast_weights, scan_run
    from imgfeat.serve.studies import check_study_settings

    check_study_settings(cfg.predict)
    ref = model_ref(cfg.predict.model_uri or pyfunc, pyfunc)
    source = _weights(cfg, classifier)
    spec = classifier_spec(spark, cfg, classifier, source)
    scoring = _Scoring(ref, classifier, spec, broadcast_weights(spark, source),
                       spark.sparkContext.broadcast(classifier.head))
    tables = Tables.of(spark, cfg.output, cfg.errors_path)
    with scan_run(spark, tables, "predict", ref.key, source.weights_id) as run:
        return _predict(spark, cfg, run, scoring, started)


def _predict(spark: SparkSession, cfg: Config, run: ScanRun, s: _Scoring, started: float) -> PredictResult:
    from imgfeat.featurize.job import Written, existing_keys, featurize_todo, finish_scan, plan_scan, write_rows
    from imgfeat.serve.studies import check_study_keys, write_studies

    existing = existing_keys(spark, run)  # repairs the tables first
    plan = plan_scan(spark, cfg.input, run, existing)
    check_study_keys(cfg.predict.aggregate, plan.images.columns, cfg.input.split.group != "none")  # before featurizing
    written, counts = Written(), {}
    if plan.n_todo:
        featurized = featurize_todo(spark, cfg.input, cfg.inference, plan, s.spec, s.weights_broadcast)
        rows, errors = output_rows(cfg.predict, run, s, featurized)
        written = write_rows(spark, run, plan, featurized, rows, errors, ("predictions", "predicted"))
        counts = finding_counts(spark, run, written, s.findings)
    studies = None
    if cfg.predict.aggregate != "none":
        how = cfg.predict.aggregation or s.classifier.info.aggregation or "mean"
        studies = write_studies(spark, run, cfg.predict, how, s.findings, s.classifier.thresholds, _meta(run, s))
    finish_scan(spark, run, plan)
    return _result(run, s, plan, written, counts, studies, started)


def _result(run: ScanRun, s: _Scoring, plan: ScanPlan, written: Written, counts: dict[str, int],
            studies: Any, started: float) -> PredictResult:
    import time

    from imgfeat.serve.model_ref import PredictResult

    return PredictResult(
        model_uri=s.ref.uri, model_key=s.ref.key, model_version=s.ref.version, listed=plan.n_listed,
        already_done=plan.already_done, processed=plan.n_todo, predicted=written.ok, failed=written.failed,
        replaced=plan.n_replaced, predictions_path=run.tables.output, errors_path=run.tables.errors,
        format=run.tables.fmt, labels=s.findings, predicted_counts=counts, seconds=round(time.time() - started, 2),
        task="multi", studies_path=studies.path if studies else None, studies=studies.rows if studies else 0,
        unkeyed=studies.unkeyed if studies else 0,
    )


def _meta(run: ScanRun, s: _Scoring) -> list[Column]:
    from pyspark.sql import functions as F

    return [F.lit(run.model).alias("model"), F.lit(s.ref.uri).alias("model_uri"),
            F.lit(s.ref.version).cast("string").alias("model_version"), F.lit(s.ref.run_id).cast("string").alias("model_run_id"),
            F.lit(run.weights_id).alias("weights_id"), F.lit(run.run_id).alias("run_id"),
            F.current_timestamp().alias("predicted_at")]


def findings_udf(head_broadcast: Any, findings: list[str], thresholds: list[float]) -> Any:
    """A pandas UDF: features (array<float>) -> struct(finding_probability array<double>, findings_positive
    array<string>); an image whose probabilities are not all finite gets findings_positive null (no calls)."""
    from pyspark.sql.functions import pandas_udf

    limits = np.asarray(thresholds, dtype=np.float64)

    @pandas_udf("finding_probability array<double>, findings_positive array<string>")
    def score(features: pd.Series) -> pd.DataFrame:
        if not len(features):
            return pd.DataFrame({"finding_probability": [], "findings_positive": []})
        x = np.stack([np.asarray(f, dtype=np.float64) for f in features])
        with np.errstate(invalid="ignore", over="ignore"):
            p = head_broadcast.value.finding_probabilities(x)
        finite = np.isfinite(p).all(axis=1)
        called = [[n for n, hit in zip(findings, row >= limits, strict=True) if hit] if ok else None
                  for row, ok in zip(p, finite, strict=True)]
        return pd.DataFrame({"finding_probability": list(p), "findings_positive": called})

    return score


def output_rows(predict: Any, run: ScanRun, s: _Scoring, featurized: Featurized) -> tuple[DataFrame, DataFrame]:
    """(predictions table rows, errors table rows): the decoded rows scored per finding, and the failures."""
    from pyspark.sql import functions as F

    from imgfeat.featurize.job import FINGERPRINT, error_rows
    from imgfeat.scoring.classifier import probability_columns

    meta = _meta(run, s)
    rows = featurized.rows
    udf = findings_udf(s.head_broadcast, s.findings, s.classifier.thresholds)
    scored = rows.filter(F.col("error_class").isNull()).withColumn("_s", udf(F.col("features")))
    carried = [c for c in CARRIED if c in rows.columns]
    prob_cols = []
    if predict.probability_columns:
        prob_cols = [F.col("_s.finding_probability")[i].alias(c)
                     for i, c in enumerate(probability_columns(s.findings))]
    prediction_rows = scored.select(
        "image_id", "path", "rel_path", "label", *carried, "slice_index",
        F.array_join(F.col("_s.findings_positive"), "|").alias("prediction"),
        F.array(*[F.lit(f) for f in s.findings]).alias("findings"),
        F.col("_s.finding_probability").alias("finding_probability"),
        F.col("_s.findings_positive").alias("findings_positive"), *prob_cols, *meta, *FINGERPRINT,
    )
    keys = ["image_id", "path", "rel_path", "label", "split"]
    if "study_id" in rows.columns and "study_id" in featurized.unread.columns:
        keys.append("study_id")  # a study's images that failed, found by their study
    return prediction_rows, error_rows(featurized, keys, meta)


def finding_counts(spark: SparkSession, run: ScanRun, written: Written, findings: list[str]) -> dict[str, int]:
    """Images each finding is called in, counted in what was written; every decoded image must have its row (read
    under the commit lock: no other run swaps the table while it is read)."""
    from pyspark.sql import functions as F

    from imgfeat.store.tables import read_table, table_locks

    output, fmt = run.tables.output, run.tables.fmt
    with table_locks(spark, [output], fmt, run.leases):
        out = read_table(spark, output, fmt).filter((F.col("model") == run.model) & (F.col("run_id") == run.run_id))
        n = out.count()
        called = {r["f"]: r["n"] for r in out.select(F.explode("findings_positive").alias("f"))
                  .groupBy("f").agg(F.count("*").alias("n")).collect()}
    if n != written.ok_rows:
        raise RuntimeError(f"accounting mismatch: {written.ok_rows} images decoded but {n} predictions written")
    return {f: int(called.get(f, 0)) for f in findings}
