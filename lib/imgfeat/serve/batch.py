"""Batch prediction with a model logged by ``train``: image folder -> predictions table + errors table.

The same scan as extract (``imgfeat.featurize.job``: listing, incremental planning, the featurizing UDF, so bad
images get exactly extract's error classes, and both appends under writer leases). The model's first stage
(``ImageFeaturizer``) says how to featurize; its remaining stages (head + label converter) score the images that
decoded. Rows are keyed by (path, model = what the model URI resolves to, weights_id). A multi-label model is
scored from its pyfunc model's arrays instead (``imgfeat.serve.batch_findings``: per-finding probabilities and
calls, and with ``predict.aggregate`` one row per study in ``<output>_studies``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgfeat.config import Config
from imgfeat.serve.model_ref import ModelRef, PredictResult, registry_version, resolve_model

__all__ = ["ModelRef", "PredictResult", "load_scoring_model", "registry_version", "resolve_model", "run_predict"]

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.backbones.weights import WeightsSource
    from imgfeat.config.schema import PredictConfig
    from imgfeat.featurize.job import Featurized, ScanPlan, ScanRun, Written
    from imgfeat.featurize.spec import FeaturizeSpec

log = logging.getLogger(__name__)


def load_scoring_model(cfg: Config) -> tuple[Any, Any, list[str]]:
    """(ImageFeaturizer, PipelineModel of the remaining stages, labels) of ``predict.model_uri``."""
    import mlflow.spark
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString

    from imgfeat.featurize.transformer import ImageFeaturizer
    from imgfeat.train.tracking import use_tracking

    uri = cfg.predict.model_uri
    if not uri:
        raise ValueError("no model: pass --model-uri runs:/RUN_ID/model or models:/NAME/VERSION (see `imgfeat compare`)")
    use_tracking(cfg.mlflow)
    model = mlflow.spark.load_model(uri)
    stages = list(model.stages)
    if not stages or not isinstance(stages[0], ImageFeaturizer):
        raise ValueError(f"{uri} is not an imgfeat model (its first stage is not an ImageFeaturizer); use a model logged by `imgfeat train`")
    converters = [s for s in stages if isinstance(s, IndexToString)]
    labels = list(converters[-1].getLabels()) if converters else []
    _locate_weights(stages[0], cfg, uri)
    return stages[0], PipelineModel(stages=stages[1:]), labels


def _locate_weights(featurizer: Any, cfg: Config, uri: str) -> None:
    """Point a featurizer trained on a weights file at a local copy: ``predict.weights``, else the recorded path
    when it exists here, else the copy ``train`` logged with the runs. The recorded sha256 pin always applies."""
    weights = featurizer.getOrDefault("weights")
    if weights.lower() in ("imagenet", "none"):
        return
    if cfg.predict.weights:
        featurizer.set(featurizer.weights, os.path.abspath(os.path.expanduser(cfg.predict.weights)))
        return
    if os.path.isfile(weights):
        return
    import mlflow

    sha = featurizer.getOrDefault("weightsSha256")
    ref = resolve_model(uri)
    client = mlflow.MlflowClient()
    run_ids = [ref.run_id] if ref.run_id else []
    if ref.run_id:
        parent = client.get_run(ref.run_id).data.tags.get("mlflow.parentRunId")
        run_ids += [parent] if parent else []
    for run_id in run_ids:
        try:
            folder = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=f"weights/{sha[:16]}")
        except Exception:  # not logged with this run
            continue
        files = [os.path.join(folder, f) for f in sorted(os.listdir(folder))]
        if files:
            log.info("using the weights file logged with run %s: %s", run_id, files[0])
            featurizer.set(featurizer.weights, files[0])
            return
    raise FileNotFoundError(
        f"the model {uri} was trained on the weights file {weights} (sha256 {sha}), which is not on this machine and "
        "was not logged with its runs; pass a copy with --weights FILE (or --set predict.weights=FILE)"
    )


def _column_name(label: str) -> str:
    import re

    return "probability_" + re.sub(r"\W", "_", label)


@dataclass(frozen=True)
class _Scoring:
    """What a predict run scores with, fixed before it reads the tables."""

    ref: ModelRef
    head: Any  # PipelineModel: the head and the label converter
    labels: list[str]
    spec: FeaturizeSpec
    weights_broadcast: Any


def scoring_spec(spark: SparkSession, cfg: Config, featurizer: Any, source: WeightsSource) -> FeaturizeSpec:
    """The workers' spec for ``featurizer``'s model: its backbone, its recorded decoding (with this run's decode
    time limit) and precision, run by this run's ``inference`` settings; no float16 copy of the features."""
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.featurize.spec import dicom_label_tag, featurize_spec
    from imgfeat.io.groups import id_salt
    from imgfeat.session import threads_for

    decode = dataclasses.replace(featurizer.decode_options(), decode_timeout_s=cfg.preprocess.decode_timeout_s)
    inference = dataclasses.replace(cfg.inference, precision=featurizer.getOrDefault("precision"))
    return featurize_spec(get_backbone(featurizer.getOrDefault("modelName")), source, decode, inference,
                          threads_for(spark, inference.threads), id_salt(cfg.privacy.id_salt),
                          dicom_label_tag(cfg.input.label))


def run_predict(spark: SparkSession, cfg: Config) -> PredictResult:
    """Score every image under ``input.path`` with ``predict.model_uri``; write predictions and errors.

    The run holds writer leases on both tables throughout: a second run of the same model on them is refused."""
    from imgfeat.featurize.job import Tables, broadcast_weights, scan_run

    if not cfg.output.path:
        raise ValueError("no output location: pass --output PATH (or set output.path) for the predictions table")
    started = time.time()
    from imgfeat.serve.batch_findings import open_multi_label, run_predict_findings

    multi = open_multi_label(cfg)
    if multi is not None:
        return run_predict_findings(spark, cfg, *multi, started)
    if cfg.predict.aggregate != "none":
        raise ValueError(f"predict.aggregate={cfg.predict.aggregate}: study rows are written for multi-label models; "
                         f"{cfg.predict.model_uri} is single-label (score a study with `imgfeat serve` ?study=true, "
                         "or ImageClassifier.predict_study)")
    featurizer, head, labels = load_scoring_model(cfg)
    ref = resolve_model(cfg.predict.model_uri or "")
    source = featurizer.weights_source()
    spec = scoring_spec(spark, cfg, featurizer, source)
    scoring = _Scoring(ref, head, labels, spec, broadcast_weights(spark, source))
    tables = Tables.of(spark, cfg.output, cfg.errors_path)
    # rows are keyed by what the URI resolves to now (ref.key)
    with scan_run(spark, tables, "predict", ref.key, source.weights_id) as run:
        return _predict(spark, cfg, run, scoring, started)


def _predict(spark: SparkSession, cfg: Config, run: ScanRun, s: _Scoring, started: float) -> PredictResult:
    from imgfeat.featurize.job import Written, existing_keys, featurize_todo, finish_scan, plan_scan, write_rows

    existing = existing_keys(spark, run)  # repairs the tables first
    plan = plan_scan(spark, cfg.input, run, existing)
    written, counts = Written(), {}
    if plan.n_todo:
        featurized = featurize_todo(spark, cfg.input, cfg.inference, plan, s.spec, s.weights_broadcast)
        rows, errors = _output_rows(cfg.predict, run, s, featurized)
        written = write_rows(spark, run, plan, featurized, rows, errors, ("predictions", "predicted"))
        counts = _predicted_counts(spark, run, written)
    finish_scan(spark, run, plan)
    return _result(run, s, plan, written, counts, started)


def _predicted_counts(spark: SparkSession, run: ScanRun, written: Written) -> dict[str, int]:
    """Predictions per class, counted in what was written (not what was planned): every decoded image must have
    its prediction row. Read under the commit lock: no other run swaps the table while it is read."""
    from pyspark.sql import functions as F

    from imgfeat.store.tables import read_table, table_locks

    output, fmt = run.tables.output, run.tables.fmt
    with table_locks(spark, [output], fmt, run.leases):
        out = read_table(spark, output, fmt).filter((F.col("model") == run.model) & (F.col("run_id") == run.run_id))
        counts = {r["prediction"]: r["n"] for r in out.groupBy("prediction").agg(F.count("*").alias("n")).collect()}
    if sum(counts.values()) != written.ok_rows:
        raise RuntimeError(f"accounting mismatch: {written.ok_rows} images decoded but {sum(counts.values())} "
                           "predictions written")
    return counts


def _result(run: ScanRun, s: _Scoring, plan: ScanPlan, written: Written, counts: dict[str, int],
            started: float) -> PredictResult:
    return PredictResult(
        model_uri=s.ref.uri, model_key=s.ref.key, model_version=s.ref.version, listed=plan.n_listed,
        already_done=plan.already_done, processed=plan.n_todo, predicted=written.ok, failed=written.failed,
        replaced=plan.n_replaced, predictions_path=run.tables.output, errors_path=run.tables.errors,
        format=run.tables.fmt, labels=s.labels, predicted_counts=counts, seconds=round(time.time() - started, 2),
    )


def _output_rows(predict: PredictConfig, run: ScanRun, s: _Scoring, featurized: Featurized
                 ) -> tuple[DataFrame, DataFrame]:
    """(predictions table rows, errors table rows): the decoded rows scored by the head, and the failures."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    from imgfeat.featurize.job import FINGERPRINT, error_rows

    meta = [F.lit(run.model).alias("model"), F.lit(s.ref.uri).alias("model_uri"),
            F.lit(s.ref.version).cast("string").alias("model_version"), F.lit(s.ref.run_id).alias("model_run_id"),
            F.lit(run.weights_id).alias("weights_id"), F.lit(run.run_id).alias("run_id"),
            F.current_timestamp().alias("predicted_at")]
    rows = featurized.rows
    ok = rows.filter(F.col("error_class").isNull()).withColumn("features", array_to_vector(F.col("features")))
    scored = s.head.transform(ok)
    prob_cols = []
    if "probability" in scored.columns:
        scored = scored.withColumn("probability", vector_to_array(F.col("probability")))
        if predict.probability_columns:
            prob_cols = [F.col("probability")[i].alias(_column_name(lab)) for i, lab in enumerate(s.labels)]
    else:
        scored = scored.withColumn("probability", F.lit(None).cast("array<double>"))
    prediction_rows = scored.select(
        "image_id", "path", "rel_path", "label", "slice_index", "prediction", "probability", *prob_cols, *meta,
        *FINGERPRINT
    )
    return prediction_rows, error_rows(featurized, ["image_id", "path", "rel_path", "label", "split"], meta)
