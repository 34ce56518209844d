"""Batch prediction with a model logged by ``train``: image folder -> predictions table + errors table.

Reuses extract's machinery: listing (``imgfeat.io.listing``), incremental planning, the featurizing UDF
(so bad images get exactly extract's error classes), and ``imgfeat.store.tables.append_rows`` under writer leases. The
model's first stage (``ImageFeaturizer``) featurizes; its remaining stages (head + label converter)
score the images that decoded. Rows are keyed by (path, model = what the model URI resolves to, weights_id).
"""

from __future__ import annotations

import copy
import logging
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from imgfeat.config import Config

if TYPE_CHECKING:
    from pyspark.sql import SparkSession

log = logging.getLogger(__name__)


@dataclass
class PredictResult:
    model_uri: str
    model_key: str
    model_version: str | None
    listed: int
    already_done: int
    processed: int  # = predicted + failed
    predicted: int
    failed: int
    replaced: int
    predictions_path: str
    errors_path: str
    format: str
    labels: list[str]
    predicted_counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        return (
            f"[imgfeat] predict {self.model_uri}"
            f"{f' (version {self.model_version})' if self.model_version else ''} = {self.model_key}: listed {self.listed} image files; {self.already_done} already done; "
            f"processed {self.processed} = predicted {self.predicted} + failed {self.failed} in {self.seconds:.1f}s\n"
            f"[imgfeat]   predicted classes: {self.predicted_counts}\n"
            f"[imgfeat]   predictions ({self.format}): {self.predictions_path}\n"
            f"[imgfeat]   errors      ({self.format}): {self.errors_path}"
        )


@dataclass(frozen=True)
class ModelRef:
    """What a model URI points to now: the predictions table is keyed by ``key``, not by the URI's text, so
    ``models:/NAME/latest`` after a new version re-scores, and the same model by two URIs never writes twice."""

    uri: str  # as the user gave it
    key: str  # models:/<logged model id> (MLflow 3), else runs:/<run id>/<artifact path>, else the URI
    run_id: str | None
    version: str | None  # the registry version for models:/NAME/... URIs


def resolve_model(uri: str) -> ModelRef:
    import mlflow
    from mlflow.models import get_model_info

    info = get_model_info(uri)
    model_id = getattr(info, "model_id", None)
    key = f"models:/{model_id}" if model_id else (f"runs:/{info.run_id}/{info.artifact_path}" if info.run_id else uri)
    version = None
    if uri.startswith("models:/") and not uri.startswith("models:/m-"):
        from mlflow.store.artifact.utils.models import get_model_name_and_version

        version = str(get_model_name_and_version(mlflow.MlflowClient(), uri)[1])
    return ModelRef(uri=uri, key=key, run_id=info.run_id, version=version)


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
    use_tracking(cfg)
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


def _featurize_config(cfg: Config, featurizer: Any) -> Config:
    """The extract settings equivalent to the model's featurizer (so decoding and errors are identical)."""
    fcfg = copy.deepcopy(cfg)
    decode = featurizer.decode_options()
    fcfg.model.name = featurizer.getOrDefault("modelName")
    fcfg.preprocess.image_size = decode.size
    fcfg.preprocess.resize_mode = decode.resize_mode
    fcfg.preprocess.resample = decode.resample
    fcfg.preprocess.high_bit_depth = decode.high_bit_depth
    fcfg.preprocess.max_pixels = decode.max_pixels
    fcfg.preprocess.jpeg_draft = decode.jpeg_draft
    fcfg.preprocess.formats = list(decode.formats)
    fcfg.preprocess.dicom.window = decode.dicom_window
    fcfg.preprocess.volume = decode.volume
    fcfg.inference.precision = featurizer.getOrDefault("precision")
    fcfg.output.float16_column = False
    return fcfg


def _column_name(label: str) -> str:
    import re

    return "probability_" + re.sub(r"\W", "_", label)


@dataclass
class _Scoring:
    """What a predict run fixes before it reads the tables."""

    ref: ModelRef
    featurizer: Any
    head: Any
    labels: list[str]
    spec: Any
    weights_id: str
    weights_broadcast: Any
    fmt: str
    run_id: str
    leases: Any  # RunLeases


def run_predict(spark: SparkSession, cfg: Config) -> PredictResult:
    """Score every image under ``input.path`` with ``predict.model_uri``; write predictions and errors.

    The run holds writer leases on both tables throughout: a second run of the same model on them is refused."""
    from imgfeat.featurize.extract import broadcast_weights, featurize_spec, run_leases
    from imgfeat.store.tables import resolve_format

    if not cfg.output.path:
        raise ValueError("no output location: pass --output PATH (or set output.path) for the predictions table")
    started = time.time()
    featurizer, head, labels = load_scoring_model(cfg)
    ref = resolve_model(cfg.predict.model_uri or "")
    source = featurizer.weights_source()
    spec = featurize_spec(spark, _featurize_config(cfg, featurizer), source)
    weights_broadcast = broadcast_weights(spark, source)
    fmt = resolve_format(spark, cfg.output.format)
    run_id = uuid.uuid4().hex[:12]
    # rows are keyed by what the URI resolves to now (ref.key)
    with run_leases(spark, cfg, fmt, run_id, ref.key, source.weights_id, "predict") as leases:
        scoring = _Scoring(ref, featurizer, head, labels, spec, source.weights_id, weights_broadcast, fmt, run_id, leases)
        return _predict(spark, cfg, scoring, started)


def _predict(spark: SparkSession, cfg: Config, s: _Scoring, started: float) -> PredictResult:
    from pyspark import StorageLevel

    from imgfeat.featurize.extract import existing_keys, plan_work
    from imgfeat.io.listing import list_files, listing_settings
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import check_replace_supported, drop_scratch, table_locks

    images, others = list_files(spark, cfg)
    images = images.persist(StorageLevel.MEMORY_AND_DISK)
    with sql_conf(spark, listing_settings(spark)):  # the scans that list, in one task per core
        n_listed = images.count()
    existing = existing_keys(spark, cfg, s.fmt, s.weights_id, model=s.ref.key, leases=s.leases)
    tables = [cfg.output.path or "", cfg.errors_path or ""]
    with table_locks(spark, tables, s.fmt, s.leases):  # no other run swaps a table while the plan reads it
        todo, n_todo, replace, n_replaced = plan_work(spark, images, existing, cfg.output.mode, tables[0], s.run_id,
                                                        n_listed)
    if replace is not None:
        for location in tables:
            check_replace_supported(spark, location, s.fmt)
    predicted = failed = 0
    counts: dict[str, int] = {}
    if n_todo:
        predicted, failed, counts = _score_and_write(spark, cfg, s, todo, n_todo, n_listed, others, replace)
    images.unpersist()
    drop_scratch(spark, cfg.output.path, s.run_id)
    if predicted + failed != n_todo:
        raise RuntimeError(f"accounting mismatch: {n_todo} files to process but {predicted} predicted + {failed} failed")
    return PredictResult(
        model_uri=s.ref.uri, model_key=s.ref.key, model_version=s.ref.version, listed=n_listed,
        already_done=n_listed - n_todo, processed=n_todo, predicted=predicted, failed=failed, replaced=n_replaced,
        predictions_path=cfg.output.path or "", errors_path=cfg.errors_path or "", format=s.fmt, labels=s.labels,
        predicted_counts=counts, seconds=round(time.time() - started, 2),
    )


def _score_and_write(spark: SparkSession, cfg: Config, s: _Scoring, todo: Any, n_todo: int, n_listed: int,
                     others: Any, replace: Any) -> tuple[int, int, dict[str, int]]:
    """Featurize and score the planned files, append predictions and errors: (predicted, failed, class counts)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.featurize.extract import featurize_contents, replace_keys, unread_errors
    from imgfeat.io.listing import (
        broadcast_if_small,
        listing_settings,
        other_file_lengths,
        read_contents,
        read_task_settings,
    )
    from imgfeat.session import sql_conf
    from imgfeat.store.tables import append_rows, read_table, table_locks

    fingerprint = ["file_length", "file_modification_time"]
    # Only a scan of the whole folder needs the other files' lengths; taken before the read starts, since a scan
    # of them later would fail on a file deleted meanwhile.
    with sql_conf(spark, listing_settings(spark)):
        other_lengths = other_file_lengths(others) if n_todo == n_listed else None
    contents = read_contents(spark, cfg, todo, n_todo, n_listed)
    read_settings = read_task_settings(spark, cfg, todo, n_todo, n_listed, other_lengths)
    rows = featurize_contents(
        contents.select("path", "content", F.col("length").alias("file_length"),
                        F.col("modificationTime").alias("file_modification_time"))
        .join(broadcast_if_small(todo.drop(*fingerprint), n_todo), on="path", how="inner"),
        s.spec,
        s.weights_broadcast,
    )
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    unread = unread_errors(todo, rows, cfg.input.max_file_bytes)  # the persisted rows: no second scan
    prediction_rows, error_rows = _output_rows(cfg, s, rows, unread)
    keys = replace_keys(replace, s.ref.key, s.weights_id)
    # One pass, in read tasks that finish together: as extract's features write.
    with sql_conf(spark, {"spark.sql.adaptive.enabled": "false", **read_settings}):
        append_rows(spark, prediction_rows, cfg.output.path, s.fmt, replace=keys, lease=s.leases[cfg.output.path])
    append_rows(spark, error_rows, cfg.errors_path, s.fmt, replace=keys, lease=s.leases[cfg.errors_path])
    failed = rows.filter(F.col("error_class").isNotNull()).select("path").distinct().count() + unread.count()
    decoded = rows.filter(F.col("error_class").isNull())
    predicted = decoded.select("path").distinct().count()  # files; a volume gives one row per slice
    n_prediction_rows = decoded.count()
    # Count what was written (not what was planned): every decoded image must have its prediction row. Under the
    # commit lock: no other run swaps the table while it is read.
    with table_locks(spark, [cfg.output.path or ""], s.fmt, s.leases):
        out = read_table(spark, cfg.output.path, s.fmt).filter((F.col("model") == s.ref.key) & (F.col("run_id") == s.run_id))
        counts = {r["prediction"]: r["n"] for r in out.groupBy("prediction").agg(F.count("*").alias("n")).collect()}
    if sum(counts.values()) != n_prediction_rows:
        raise RuntimeError(f"accounting mismatch: {n_prediction_rows} images decoded but {sum(counts.values())} predictions written")
    rows.unpersist()
    return predicted, failed, counts


def _output_rows(cfg: Config, s: _Scoring, rows: Any, unread: Any) -> tuple[Any, Any]:
    """(predictions table rows, errors table rows): the decoded rows scored by the head, and the failures."""
    from pyspark.ml.functions import array_to_vector, vector_to_array
    from pyspark.sql import functions as F

    fingerprint = ["file_length", "file_modification_time"]
    meta = [F.lit(s.ref.key).alias("model"), F.lit(s.ref.uri).alias("model_uri"),
            F.lit(s.ref.version).cast("string").alias("model_version"), F.lit(s.ref.run_id).alias("model_run_id"),
            F.lit(s.weights_id).alias("weights_id"), F.lit(s.run_id).alias("run_id"),
            F.current_timestamp().alias("predicted_at")]
    ok = rows.filter(F.col("error_class").isNull()).withColumn("features", array_to_vector(F.col("features")))
    scored = s.head.transform(ok)
    prob_cols = []
    if "probability" in scored.columns:
        scored = scored.withColumn("probability", vector_to_array(F.col("probability")))
        if cfg.predict.probability_columns:
            prob_cols = [F.col("probability")[i].alias(_column_name(lab)) for i, lab in enumerate(s.labels)]
    else:
        scored = scored.withColumn("probability", F.lit(None).cast("array<double>"))
    prediction_rows = scored.select(
        "image_id", "path", "rel_path", "label", "slice_index", "prediction", "probability", *prob_cols, *meta,
        *fingerprint
    )
    error_cols = ["image_id", "path", "rel_path", "label", "split", "error_class", "error_message", *fingerprint]
    error_rows = (
        rows.filter(F.col("error_class").isNotNull()).select(*error_cols)
        .unionByName(unread.select(*error_cols))
        .select(*error_cols[:5], *meta, *error_cols[5:])
    )
    return prediction_rows, error_rows
