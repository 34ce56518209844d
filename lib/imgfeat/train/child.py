"""One backbone's child runs of ``train``: each head fitted on its training rows, scored on its test rows, logged.

``train_backbone`` prepares a backbone's rows once (indexed labels, the shared split, class weights) and runs
every head on them; ``run_child`` is one MLflow child run: fit (optionally tuned with CrossValidator or
TrainValidationSplit), predict the test rows in path order, evaluate (metrics, bootstrap intervals, calibration;
with ``train.aggregate``, the same per study / series / patient: ``train.aggregate``), log params, metrics, plots
and the two models (``train.image_model``). Multi-label tables run ``train.multilabel`` instead.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.config import TrainConfig
from imgfeat.train.heads import FEATURES_COL, HEAD_NAMES, LABEL_COL, PREDICTION_COL, WEIGHT_COL

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.config.schema import ValidityConfig

log = logging.getLogger(__name__)


@dataclass
class ChildRun:
    backbone: str
    weights_id: str
    head: str
    run_id: str
    metrics: dict[str, float]
    params: dict[str, Any]
    seconds: float
    findings_table: str | None = None  # multi-label: the per-finding table (text), image level


@dataclass(frozen=True)
class Shared:
    """What every child run of one ``train`` call shares."""

    tc: TrainConfig
    labels: list[str]
    dataset: str
    params: dict[str, Any]  # logged with every child run
    class_weight: dict[int, float] | None
    multi: bool = False  # a multi-label table: labels are its findings


@dataclass(frozen=True)
class Backbone:
    """One backbone of the features table: (model, weights id), its name in run names, and its featurizer."""

    model_name: str
    weights_id: str
    name: str  # the model, or model:weights when one model comes with several weights
    featurizer: Any


@dataclass(frozen=True)
class Rows:
    """A backbone's training and test rows (indexed labels, feature vectors) and the feature width."""

    train: DataFrame
    test: DataFrame
    input_dim: int


def train_backbone(spark: SparkSession, backbone: Backbone, labelled: DataFrame, split: DataFrame, indexer: Any,
                   shared: Shared) -> list[tuple[ChildRun, dict[str, bool]]]:
    """Every head on one backbone: (child run, test item -> prediction was right) per head, in head order."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    rows = _backbone_rows(labelled, backbone, split, indexer, shared.class_weight, shared.tc.aggregate)
    # Few partitions: every MLlib iteration is a Spark job over all of them (not 200 shuffle partitions).
    rows = rows.repartition(max(1, spark.sparkContext.defaultParallelism)).persist(StorageLevel.MEMORY_AND_DISK)
    data = Rows(rows.filter(~F.col("is_test")), rows.filter(F.col("is_test")), len(rows.select(FEATURES_COL).first()[0]))
    runs = [run_child(spark, backbone, data, head, shared) for head in shared.tc.heads]
    rows.unpersist()
    return runs


def _backbone_rows(labelled: DataFrame, backbone: Backbone, split: DataFrame, indexer: Any,
                   class_weight: dict[int, float] | None, aggregate: str = "none") -> DataFrame:
    """The backbone's rows with a label index, a feature vector, the split (rows outside it dropped), weights,
    and (``aggregate``) the study / series / patient key ``agg_key``."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from imgfeat.train.aggregate import key_column
    from imgfeat.train.split import with_item

    rows = labelled.filter((F.col("model") == backbone.model_name) & (F.col("weights_id") == backbone.weights_id))
    keys = [key_column(aggregate).alias("agg_key")] if aggregate != "none" else []
    rows = with_item(rows).dropDuplicates(["item"]).select(
        "item", "label", array_to_vector(F.col("features")).alias(FEATURES_COL), *keys)
    rows = indexer.transform(rows).join(split.select("item", "is_test", "unit"), on="item", how="inner")
    rows = rows.filter(F.col("is_test").isNotNull())
    return rows.withColumn(WEIGHT_COL, _weight_column(class_weight)) if class_weight else rows


def _weight_column(class_weight: dict[int, float]) -> Any:
    """A column expression: each row's class weight by its label index."""
    from pyspark.sql import functions as F

    weight = F.lit(1.0)
    for i, w in class_weight.items():
        weight = F.when(F.col(LABEL_COL) == float(i), F.lit(float(w))).otherwise(weight)
    return weight


def run_child(spark: SparkSession, backbone: Backbone, data: Rows, head: str,
              shared: Shared) -> tuple[ChildRun, dict[str, bool]]:
    """One nested MLflow run: fit ``head``, evaluate it on the test rows, log; (the run, per test item: right?)."""
    import mlflow

    from imgfeat.train.image_model import log_image_model
    from imgfeat.train.privacy import check_metadata

    t0 = time.time()
    log.info("training %s on %s", head, backbone.name)
    tags = {"backbone": backbone.model_name, "head": head, "dataset": shared.dataset, "weights_id": backbone.weights_id}
    with mlflow.start_run(run_name=f"{backbone.name} {head}", nested=True, tags=tags) as child:
        fitted, head_params = fit_head(spark, head, data.train, shared.tc, len(shared.labels), data.input_dim,
                                       shared.class_weight)
        metrics, report, scored = _evaluate(fitted, data.test, shared)
        y, p, proba, items = scored
        level_report = report.pop("aggregated", None)
        child_params = {**shared.params, "backbone": backbone.model_name, "weights_id": backbone.weights_id,
                        "head": head, "feature_dim": data.input_dim, **{f"head_{k}": v for k, v in head_params.items()},
                        "preprocess": json.dumps(backbone.featurizer.decode_options().to_dict(), sort_keys=True)}
        check_metadata(child_params, tags)  # no image content or patient fields in run metadata
        mlflow.log_params(child_params)
        _log_child(metrics, report, y, proba, shared.labels, f"{backbone.name} / {head} on {shared.dataset}")
        if level_report:
            mlflow.log_dict(level_report, f"classification_report_{shared.tc.aggregate}.json")
        aggregation = shared.tc.aggregation if shared.tc.aggregate != "none" else None
        log_image_model(backbone.featurizer, fitted, shared.labels, head, child.info.run_id, aggregation=aggregation)
        run = ChildRun(backbone.model_name, backbone.weights_id, head, child.info.run_id, metrics, head_params,
                       round(time.time() - t0, 2))
    return run, dict(zip(items, (y == p), strict=True))


def _evaluate(fitted: Any, test: DataFrame, shared: Shared) -> tuple[dict[str, float], dict[str, Any], tuple]:
    """(metrics, report, (true, predicted, probabilities, test items)) of a fitted head on the test rows."""
    from imgfeat.train.metrics import evaluate, scores_to_proba

    tc = shared.tc
    y, p, scores, probabilistic, keys = _predictions(fitted, test)
    proba = None if scores is None else (scores if probabilistic else scores_to_proba(scores))
    metrics, report = evaluate(y, p, proba, shared.labels, keys["unit"].to_numpy(), tc.validity, tc.seed)
    extra, report["calibration"] = _calibration(y, proba, shared.labels, tc.validity, tc.positive_class)
    metrics.update(extra)
    report["scores"] = "probability" if probabilistic else "softmax of raw margins (no probabilities)"
    if tc.aggregate != "none":
        from imgfeat.train.aggregate import aggregated_single

        extra, report["aggregated"] = aggregated_single(
            keys["agg_key"].to_numpy(), keys["unit"].to_numpy(), y, proba, shared.labels, tc.aggregate,
            tc.aggregation, tc.validity, tc.seed)
        metrics.update(extra)
    return metrics, report, (y, p, proba, list(keys["item"]))


def fit_head(spark: SparkSession, head: str, train: DataFrame, tc: TrainConfig, n_classes: int, input_dim: int,
             class_weight: dict[int, float] | None) -> tuple[Any, dict[str, Any]]:
    """Fit one head; returns (fitted Spark model, params to log)."""
    from imgfeat.train.heads import build_head

    if head == "keras":
        from imgfeat.train.keras_head import train_keras_head

        return train_keras_head(spark, train, n_classes, input_dim, tc.keras, tc.seed, class_weight,
                                FEATURES_COL, LABEL_COL, PREDICTION_COL)
    spec = build_head(head, tc, n_classes, weighted=class_weight is not None)
    params: dict[str, Any] = {"estimator": HEAD_NAMES[head], **spec.params}
    if not (tc.cv_folds >= 2 or tc.validation_fraction > 0):
        return spec.estimator.fit(train), params
    return _tune(spec, train, tc, params)


def _tune(spec: Any, train: DataFrame, tc: TrainConfig, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """CrossValidator (``cv_folds`` >= 2) or TrainValidationSplit over ``spec.grid`` by macro F1; the best model."""
    from pyspark.ml.evaluation import MulticlassClassificationEvaluator
    from pyspark.ml.tuning import CrossValidator, ParamGridBuilder, TrainValidationSplit

    builder = ParamGridBuilder()
    for name, values in spec.grid:
        builder = builder.addGrid(spec.base.getParam(name), values)
    grid = builder.build()
    evaluator = MulticlassClassificationEvaluator(labelCol=LABEL_COL, predictionCol=PREDICTION_COL, metricName="f1")
    if tc.cv_folds >= 2:
        tuner: Any = CrossValidator(estimator=spec.estimator, estimatorParamMaps=grid, evaluator=evaluator,
                                    numFolds=tc.cv_folds, seed=tc.seed)
        params["tuning"] = f"CrossValidator(numFolds={tc.cv_folds})"
    else:
        tuner = TrainValidationSplit(estimator=spec.estimator, estimatorParamMaps=grid, evaluator=evaluator,
                                     trainRatio=1 - tc.validation_fraction, seed=tc.seed)
        params["tuning"] = f"TrainValidationSplit(trainRatio={1 - tc.validation_fraction:g})"
    fitted = tuner.fit(train)
    scores = fitted.avgMetrics if tc.cv_folds >= 2 else fitted.validationMetrics
    best = grid[int(np.argmax(scores))]
    for param, value in best.items():
        params[param.name] = value
    params["grid"] = json.dumps({name: values for name, values in spec.grid})
    params["tuning_best_f1"] = round(float(max(scores)), 6)
    return fitted.bestModel, params


def _predictions(model: Any, test: DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, bool, Any]:
    """(true index, predicted index, class scores, scores are probabilities, rows: path and unit) for the test
    rows, in path order (so that two runs' predictions pair up image by image)."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    scored = model.transform(test)
    key_cols = ["item", "unit", *(["agg_key"] if "agg_key" in test.columns else [])]
    cols = [*key_cols, F.col(LABEL_COL).alias("y"), F.col(PREDICTION_COL).alias("p")]
    score_col = next((c for c in ("probability", "rawPrediction") if c in scored.columns), None)
    if score_col is None:
        pdf = scored.select(*cols).orderBy("item").toPandas()
        return pdf["y"].to_numpy(), pdf["p"].to_numpy(), None, False, pdf[key_cols]
    cols.append(vector_to_array(F.col(score_col)).alias("s"))
    pdf = scored.select(*cols).orderBy("item").toPandas()
    scores = np.stack(pdf["s"].to_numpy()) if len(pdf) else None
    return pdf["y"].to_numpy(), pdf["p"].to_numpy(), scores, score_col == "probability", pdf[key_cols]


def _calibration(y: np.ndarray, proba: np.ndarray | None, labels: list[str], validity: ValidityConfig,
                 positive_class: str | None) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Calibration error and (binary) the operating point at the target sensitivity; (metrics, the bins)."""
    from imgfeat.train.uncertainty import calibration, operating_point

    if proba is None or not len(y):
        return {}, None
    cal = calibration(y, proba, validity.calibration_bins)
    out = {"test_ece": cal["ece"]}
    if len(labels) == 2:
        positive = labels.index(positive_class) if positive_class in labels else 1
        point = operating_point(y == positive, np.asarray(proba)[:, positive], validity.target_sensitivity)
        if point:
            out["test_threshold_at_target_sensitivity"] = point["threshold"]
            out["test_sensitivity_at_target"] = point["sensitivity"]
            out["test_specificity_at_target_sensitivity"] = point["specificity"]
    return out, cal


def _log_child(child_metrics: dict[str, float], report: dict[str, Any], y: np.ndarray, proba: np.ndarray | None,
               labels: list[str], title: str) -> None:
    """Metrics (NaN ones are undefined: not logged), the report and the plots of one child run."""
    import matplotlib.pyplot as plt
    import mlflow

    from imgfeat.train.metrics import defined, plot_confusion_matrix, plot_roc
    from imgfeat.train.uncertainty import plot_reliability

    mlflow.log_metrics(defined(child_metrics))
    mlflow.log_dict(report, "classification_report.json")
    plots = [("confusion_matrix.png", lambda: plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, title))]
    if proba is not None:
        plots.append(("roc_curve.png", lambda: plot_roc(y, proba, labels, title)))
    if report.get("calibration"):
        plots.append(("reliability_diagram.png", lambda: plot_reliability(report["calibration"], title)))
    for name, draw in plots:  # one figure open at a time
        fig = draw()
        mlflow.log_figure(fig, name)
        plt.close(fig)
