"""Train heads on a features table, one MLflow child run per backbone x head.

Reads the table written by ``extract``; indexes labels once (alphabetical order); splits images into
train/test once (``train.split``: the table's split column, or a grouped, stratified hash split) so every
backbone and head is tested on the same images; audits the split for leaks (``train.audit``); fits each head
(optionally with CrossValidator or TrainValidationSplit); logs params, metrics with bootstrap intervals,
calibration, plots and a ``PipelineModel`` of ``ImageFeaturizer`` + head + label converter that scores raw image
bytes; and a paired test between the best two runs.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.config import Config
from imgfeat.train.heads import FEATURES_COL, HEAD_NAMES, LABEL_COL, PREDICTION_COL, WEIGHT_COL

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

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


@dataclass
class TrainResult:
    parent_run_id: str
    experiment_id: str
    experiment: str
    tracking_uri: str
    features: str
    labels: list[str]
    split_mode: str
    n_train: int
    n_test: int
    excluded_unlabelled: int
    excluded_split: int
    runs: list[ChildRun] = field(default_factory=list)
    best_run_id: str | None = None
    registered: dict[str, str] | None = None
    seconds: float = 0.0
    audit: dict[str, Any] | None = None  # the leakage report (train.audit.AuditReport)
    paired_test: dict[str, Any] | None = None  # McNemar between the best two runs
    dataset: str = ""  # the runs' "dataset" tag: train.dataset, else a keyed hash of the table's location

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        lines = [
            f"[imgfeat] train: {len(self.runs)} runs in experiment {self.experiment!r} (parent run {self.parent_run_id}, "
            f"dataset {self.dataset}) in {self.seconds:.1f}s; split {self.split_mode}: {self.n_train} train / {self.n_test} test images; "
            f"labels {self.labels}",
        ]
        if self.excluded_unlabelled or self.excluded_split:
            lines.append(
                f"[imgfeat]   excluded: {self.excluded_unlabelled} rows without a label, "
                f"{self.excluded_split} rows whose split is neither train nor test"
            )
        if self.audit:
            a = self.audit
            lines.append(
                f"[imgfeat]   audit: {a['exact_duplicate_sets']} duplicate contents ({a['exact_cross_split_count']} across "
                f"train/test), {a['near_duplicate_pairs']} near-duplicate pairs ({a['near_cross_split_count']} across), "
                f"{a['groups']} groups ({a['groups_across_splits_count']} on both sides)")

        def interval(r: ChildRun, name: str) -> str:
            value = r.metrics.get(f"test_{name}", float("nan"))
            low, high = r.metrics.get(f"test_{name}_ci_low"), r.metrics.get(f"test_{name}_ci_high")
            return f"{value:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

        for r in self.runs:
            lines.append(
                f"[imgfeat]   {r.backbone:<14} {r.head:<5} accuracy {interval(r, 'accuracy')}  "
                f"macro F1 {interval(r, 'f1_macro')}  AUC {interval(r, 'roc_auc')}  ({r.seconds:.1f}s)  run {r.run_id}"
            )
        if self.paired_test:
            t = self.paired_test
            lines.append(f"[imgfeat]   best two: {t['a']} vs {t['b']} on {t['images']} test images: McNemar p = "
                         f"{t['p_value']:.4g} ({t['only_a_correct']} vs {t['only_b_correct']} images only one got right)")
        if self.registered:
            lines.append(f"[imgfeat]   registered {self.registered['name']} version {self.registered['version']} (run {self.best_run_id})")
        lines.append(f"[imgfeat]   tracking: {self.tracking_uri}  (compare: imgfeat compare --experiment {self.experiment})")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# reading and splitting


def recorded_settings(rows: DataFrame, model: str, weights_id: str, location: str) -> str | None:
    """The one preprocessing the table recorded for (model, weights_id); refuses a table that mixes several.

    None when the rows predate recorded settings (then train's own ``preprocess`` settings apply, with a warning).
    """

    from imgfeat.featurize.settings import COLUMN, SettingsError, describe_difference

    if COLUMN not in rows.columns:
        return None
    values = sorted({r[COLUMN] for r in rows.select(COLUMN).distinct().limit(10).collect()}, key=lambda v: v or "")
    known = [v for v in values if v is not None]
    if len(known) > 1:
        raise SettingsError(
            f"{location} holds {model} features (weights {weights_id[:40]}) made with {len(known)} different "
            f"preprocessing settings ({describe_difference(known[0], known[1])}); no single model can reproduce them. "
            "Re-extract them with one setting (--mode overwrite) or into separate tables."
        )
    if known and None in values:
        log.warning("some %s rows of %s predate recorded preprocessing settings; using the recorded ones", model, location)
    return known[0] if known else None


def featurizer_for(model: str, weights_id: str, cfg: Config, settings: str | None = None) -> Any:
    """An ``ImageFeaturizer`` that reproduces the features of (model, weights_id) from image bytes.

    ``settings``: the preprocessing recorded with the features (``imgfeat.featurize.settings``); it, not this
    run's ``preprocess`` settings, decides how the logged model prepares images.
    """
    from imgfeat.featurize.settings import decode_from_settings, precision_from_settings
    from imgfeat.featurize.transformer import ImageFeaturizer

    if weights_id.startswith("none-seed"):
        weights, seed, sha = "none", int(weights_id.removeprefix("none-seed")), ""
    elif weights_id.startswith("imagenet:sha256:"):
        weights, seed, sha = "imagenet", cfg.model.seed, weights_id.removeprefix("imagenet:sha256:")
    elif weights_id.startswith("sha256:"):
        weights, seed, sha = cfg.model.weights, cfg.model.seed, weights_id.removeprefix("sha256:")
        if weights in ("imagenet", "none") or not os.path.isfile(os.path.expanduser(weights)):
            raise ValueError(
                f"the {model} features were extracted with a weights file ({weights_id}); pass the same file with "
                "--set model.weights=/path/to/the/file (.h5 or .pth) so the logged model can featurize raw images"
            )
    else:
        raise ValueError(f"unrecognised weights id {weights_id!r} for {model} in the features table")
    precision = cfg.inference.precision
    if settings is not None:
        decode, precision = decode_from_settings(settings), precision_from_settings(settings)
    else:
        from imgfeat.featurize.extract import decode_options

        log.warning("the %s features do not record their preprocessing (an older table): the logged model uses this "
                    "run's preprocess settings; they must be the ones extract used", model)
        with_model = copy.deepcopy(cfg)
        with_model.model.name = model
        decode = decode_options(with_model)
    return ImageFeaturizer.from_decode_options(
        decode, inputCol="content", outputCol=FEATURES_COL, modelName=model, weights=weights, weightsSha256=sha,
        seed=seed, batchSize=cfg.inference.batch_size, outputType="vector", precision=precision,
    )


# ---------------------------------------------------------------------------------------------
# fitting and evaluating


def _fit(spark: SparkSession, head: str, train: DataFrame, cfg: Config, labels: list[str], input_dim: int,
         class_weight: dict[int, float] | None) -> tuple[Any, dict[str, Any]]:
    """Fit one head; returns (fitted Spark model, params to log)."""
    from imgfeat.train.heads import build_head

    tc = cfg.train
    if head == "keras":
        from imgfeat.train.keras_head import train_keras_head

        return train_keras_head(spark, train, len(labels), input_dim, tc.keras, tc.seed, class_weight,
                                FEATURES_COL, LABEL_COL, PREDICTION_COL)
    spec = build_head(head, tc, len(labels), weighted=class_weight is not None)
    params: dict[str, Any] = {"estimator": HEAD_NAMES[head], **spec.params}
    if not (tc.cv_folds >= 2 or tc.validation_fraction > 0):
        return spec.estimator.fit(train), params
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
    cols = ["item", "unit", F.col(LABEL_COL).alias("y"), F.col(PREDICTION_COL).alias("p")]
    if "probability" in scored.columns:
        cols.append(vector_to_array(F.col("probability")).alias("s"))
        probabilistic = True
    elif "rawPrediction" in scored.columns:
        cols.append(vector_to_array(F.col("rawPrediction")).alias("s"))
        probabilistic = False
    else:
        pdf = scored.select(*cols).orderBy("item").toPandas()
        return pdf["y"].to_numpy(), pdf["p"].to_numpy(), None, False, pdf[["item", "unit"]]
    pdf = scored.select(*cols).orderBy("item").toPandas()
    scores = np.stack(pdf["s"].to_numpy()) if len(pdf) else None
    return pdf["y"].to_numpy(), pdf["p"].to_numpy(), scores, probabilistic, pdf[["item", "unit"]]


def _log_child(child_metrics: dict[str, float], report: dict[str, Any], y: np.ndarray, proba: np.ndarray | None,
               labels: list[str], title: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    from imgfeat.train.metrics import plot_confusion_matrix, plot_roc

    mlflow.log_metrics({k: v for k, v in child_metrics.items() if v == v})  # NaN (undefined) is not logged
    mlflow.log_dict(report, "classification_report.json")
    fig = plot_confusion_matrix(np.array(report["confusion_matrix"]), labels, title)
    mlflow.log_figure(fig, "confusion_matrix.png")
    plt.close(fig)
    if proba is not None:
        fig = plot_roc(y, proba, labels, title)
        mlflow.log_figure(fig, "roc_curve.png")
        plt.close(fig)


def run_train(spark: SparkSession, cfg: Config) -> TrainResult:
    """Fit every head on every backbone of ``train.features``; log to MLflow; return the runs."""
    import mlflow
    from pyspark import StorageLevel
    from pyspark.ml import PipelineModel
    from pyspark.ml.feature import IndexToString, StringIndexerModel
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from imgfeat.train.audit import check_label_conflicts, check_leakage, run_audit
    from imgfeat.train.heads import check_heads
    from imgfeat.train.metrics import classification_metrics, metric_key, scores_to_proba
    from imgfeat.train.privacy import (
        artifact_ids,
        check_artifact_table,
        check_metadata,
        configured_salt,
        dataset_name,
        keyed_id,
        run_salt,
        set_digest,
    )
    from imgfeat.train.split import assign_split, audit_images, labelled_images, read_features, with_item
    from imgfeat.train.tracking import model_signature, pip_requirements, tracking_uri, use_experiment
    from imgfeat.train.uncertainty import plot_reliability

    started = time.time()
    tc = cfg.train
    check_heads(tc.heads)
    experiment_id = use_experiment(cfg)
    table = read_features(spark, cfg)
    salt = run_salt(cfg.privacy.id_salt)  # keys every id this run logs; a random one is never stored
    dataset = dataset_name(tc.dataset, tc.features, salt)

    n_unlabelled = table.filter(F.col("label").isNull()).count()
    if n_unlabelled:
        log.warning("%d rows of %s have no label; they are not used for training or testing", n_unlabelled, tc.features)
    labelled = table.filter(F.col("label").isNotNull())
    labels = sorted(r["label"] for r in labelled.select("label").distinct().collect())
    if len(labels) < 2:
        raise ValueError(f"{tc.features!r} has {len(labels)} class(es) {labels}; training needs at least 2 labelled classes")
    if tc.positive_class is not None and tc.positive_class not in labels:
        raise ValueError(f"train.positive_class={tc.positive_class!r} is not a label of {tc.features!r}; labels: {labels}")

    split, split_mode = assign_split(labelled_images(table), cfg)
    split = split.persist(StorageLevel.MEMORY_AND_DISK)
    n_excluded_split = split.filter(F.col("is_test").isNull()).count()
    split_counts = {(r["label"], r["is_test"]): r["n"] for r in split.groupBy("label", "is_test").agg(F.count("*").alias("n")).collect()}
    train_counts = {lab: split_counts.get((lab, False), 0) for lab in labels}
    test_counts = {lab: split_counts.get((lab, True), 0) for lab in labels}
    if not sum(test_counts.values()) or not sum(train_counts.values()):
        raise ValueError(f"the {split_mode} split left {sum(train_counts.values())} train and {sum(test_counts.values())} "
                         "test images; check train.test_fraction or the split column")
    indexer = StringIndexerModel.from_labels(labels, inputCol="label", outputCol=LABEL_COL)
    n_total = sum(train_counts.values())
    class_weight = ({i: n_total / (len(labels) * max(1, train_counts[lab])) for i, lab in enumerate(labels)}
                    if tc.class_weighting else None)

    backbones = [(r["model"], r["weights_id"]) for r in labelled.select("model", "weights_id").distinct().orderBy("model", "weights_id").collect()]
    if tc.backbones:
        unknown = set(tc.backbones) - {m for m, _ in backbones}
        if unknown:
            raise ValueError(f"train.backbones {sorted(unknown)} are not in {tc.features!r}; it has {sorted({m for m, _ in backbones})}")
        backbones = [(m, w) for m, w in backbones if m in tc.backbones]
    multi_weights = len({m for m, _ in backbones}) < len(backbones)
    # Before any run starts: one recorded preprocessing per backbone, or a clear refusal.
    settings = {
        (m, w): recorded_settings(labelled.filter((F.col("model") == m) & (F.col("weights_id") == w)), m, w, tc.features)
        for m, w in backbones
    }
    featurizers = {(m, w): featurizer_for(m, w, cfg, settings[(m, w)]) for m, w in backbones}

    result = TrainResult(
        parent_run_id="", experiment_id=experiment_id, experiment=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg),
        features=tc.features, labels=labels, split_mode=split_mode, n_train=sum(train_counts.values()),
        n_test=sum(test_counts.values()), excluded_unlabelled=n_unlabelled, excluded_split=n_excluded_split,
        dataset=dataset,
    )
    common_params = {
        # The table's location may name people or places: a keyed digest identifies it without saying it.
        "features_table_sha256": keyed_id(tc.features, salt, 16), "dataset": dataset, "labels": json.dumps(labels), "split_mode": split_mode,
        "split_seed": tc.seed, "test_fraction": tc.test_fraction if split_mode == "hash" else "split column",
        "class_weighting": tc.class_weighting, "n_train": result.n_train, "n_test": result.n_test,
        **{f"train_count_{metric_key(k)}": v for k, v in train_counts.items()},
        **{f"test_count_{metric_key(k)}": v for k, v in test_counts.items()},
    }
    with mlflow.start_run(run_name=f"train {dataset}", tags={"dataset": dataset, "imgfeat.kind": "train"}) as parent:
        result.parent_run_id = parent.info.run_id
        parent_params = {**common_params, "heads": ",".join(tc.heads),
                         "backbones": json.dumps([f"{m} ({w[:40]})" for m, w in backbones]),
                         "excluded_unlabelled": n_unlabelled, "excluded_split": n_excluded_split}
        check_metadata(parent_params, {"dataset": dataset})
        mlflow.log_params(parent_params)
        for (model_name, weights_id), featurizer_weights in _weights_files(backbones, cfg).items():
            # A model trained on a weights file must work on other machines: the file travels with the runs.
            mlflow.log_artifact(featurizer_weights, artifact_path=f"weights/{weights_id.removeprefix('sha256:')[:16]}")
            log.info("logged the %s weights file %s with the parent run", model_name, featurizer_weights)
        audit = run_audit(audit_images(split, labelled), tc.validity.near_duplicate_bits)
        result.audit = audit.to_dict()
        log.info("%s", audit.summary())
        _log_audit(audit, salt)
        # A leaking split, or one file under two labels, ends here with the report logged and the parent run
        # marked FAILED; the messages name files for the console only.
        check_leakage(audit, tc.validity.allow_duplicates, tc.validity.allow_group_overlap)
        check_label_conflicts(audit.exact_cross_label_count, audit.exact_cross_label, tc.validity.allow_label_conflicts,
                              f"the features table {tc.features!r}")
        test_ids = split.filter(F.col("is_test")).select("image_id", "label").orderBy("image_id").toPandas()
        mlflow.log_param("test_set_sha256", set_digest(list(test_ids["image_id"])))
        if configured_salt(cfg.privacy.id_salt):  # held-out images by keyed id: the secret's owner maps them back
            listed = test_ids.assign(test_id=artifact_ids(list(test_ids["image_id"]), salt))[["test_id", "label"]]
            check_artifact_table(listed, "test_images.csv")
            with tempfile.TemporaryDirectory() as tmp:
                listed.sort_values("test_id").to_csv(os.path.join(tmp, "test_images.csv"), index=False)
                mlflow.log_artifact(os.path.join(tmp, "test_images.csv"))

        correct: dict[str, dict[str, bool]] = {}  # run id -> test item -> prediction was right
        for model_name, weights_id in backbones:
            backbone = f"{model_name}:{weights_id[:20]}" if multi_weights else model_name
            rows = labelled.filter((F.col("model") == model_name) & (F.col("weights_id") == weights_id))
            rows = with_item(rows).dropDuplicates(["item"]).select(
                "item", "label", array_to_vector(F.col("features")).alias(FEATURES_COL))
            rows = indexer.transform(rows).join(split.select("item", "is_test", "unit"), on="item", how="inner")
            rows = rows.filter(F.col("is_test").isNotNull())
            if class_weight:
                weight = F.lit(1.0)
                for i, w in class_weight.items():
                    weight = F.when(F.col(LABEL_COL) == float(i), F.lit(float(w))).otherwise(weight)
                rows = rows.withColumn(WEIGHT_COL, weight)
            # Few partitions: every MLlib iteration is a Spark job over all of them (not 200 shuffle partitions).
            rows = rows.repartition(max(1, spark.sparkContext.defaultParallelism)).persist(StorageLevel.MEMORY_AND_DISK)
            train = rows.filter(~F.col("is_test"))
            test = rows.filter(F.col("is_test"))
            input_dim = len(rows.select(FEATURES_COL).first()[0])
            featurizer = featurizers[(model_name, weights_id)]
            converter = IndexToString(inputCol=PREDICTION_COL, outputCol="prediction", labels=labels)
            for head in tc.heads:
                t0 = time.time()
                log.info("training %s on %s", head, backbone)
                tags = {"backbone": model_name, "head": head, "dataset": dataset, "weights_id": weights_id}
                with mlflow.start_run(run_name=f"{backbone} {head}", nested=True, tags=tags) as child:
                    fitted, head_params = _fit(spark, head, train, cfg, labels, input_dim, class_weight)
                    y, p, scores, probabilistic, keys = _predictions(fitted, test)
                    proba = None if scores is None else (scores if probabilistic else scores_to_proba(scores))
                    metrics, report = classification_metrics(y, p, proba, labels)
                    extra, calibration = _uncertainty(y, p, proba, labels, keys["unit"].to_numpy(), cfg)
                    metrics.update(extra)
                    report["calibration"] = calibration
                    correct[child.info.run_id] = dict(zip(keys["item"], (y == p), strict=True))
                    report["scores"] = "probability" if probabilistic else "softmax of raw margins (no probabilities)"
                    child_params = {**common_params, "backbone": model_name, "weights_id": weights_id, "head": head,
                                    "feature_dim": input_dim, **{f"head_{k}": v for k, v in head_params.items()},
                                    "preprocess": json.dumps(featurizer.decode_options().to_dict(), sort_keys=True)}
                    check_metadata(child_params, tags)  # no image content or patient fields in run metadata
                    mlflow.log_params(child_params)
                    _log_child(metrics, report, y, proba, labels, f"{backbone} / {head} on {dataset}")
                    if calibration:
                        import matplotlib.pyplot as plt

                        fig = plot_reliability(calibration, f"{backbone} / {head} on {dataset}")
                        mlflow.log_figure(fig, "reliability_diagram.png")
                        plt.close(fig)
                    pipeline = PipelineModel(stages=[featurizer, fitted, converter])
                    mlflow.spark.log_model(pipeline, artifact_path="model", pip_requirements=pip_requirements(),
                                           signature=model_signature())
                    _log_pyfunc(featurizer, fitted, labels, head, child.info.run_id)
                    result.runs.append(ChildRun(model_name, weights_id, head, child.info.run_id, metrics,
                                                head_params, round(time.time() - t0, 2)))
            rows.unpersist()

        best = _best(result.runs, tc.select_metric)
        if best is not None:
            result.best_run_id = best.run_id
            mlflow.set_tag("best_run_id", best.run_id)
            mlflow.log_metric(f"best_{tc.select_metric}", best.metrics.get(tc.select_metric, float("nan")))
        result.paired_test = _paired_test(result.runs, correct, tc.select_metric)
        if result.paired_test:
            mlflow.log_dict(result.paired_test, "paired_test.json")
            mlflow.log_metric("paired_test_p_value", result.paired_test["p_value"])
            mlflow.set_tag("paired_test", f"{result.paired_test['a']} vs {result.paired_test['b']}: McNemar "
                                          f"p={result.paired_test['p_value']:.4g}")
    split.unpersist()
    if tc.register and result.best_run_id:
        version = mlflow.register_model(f"runs:/{result.best_run_id}/model", tc.register)
        result.registered = {"name": tc.register, "version": str(version.version), "uri": f"models:/{tc.register}/{version.version}"}
    result.seconds = round(time.time() - started, 2)
    return result


def _log_pyfunc(featurizer: Any, fitted: Any, labels: list[str], head: str, run_id: str) -> None:
    """The Spark-free model of this run (``pyfunc_model``): the featurizer's settings and the head as arrays."""
    from imgfeat.scoring.pyfunc import log_classifier
    from imgfeat.train.export import export_head

    source = featurizer.weights_source()
    get = featurizer.getOrDefault
    log_classifier(model_name=get("modelName"), weights=get("weights"), weights_sha256=get("weightsSha256"),
                   seed=get("seed"), weights_id=source.weights_id,
                   weights_file=source.path if source.is_user_file else None, decode=featurizer.decode_options(),
                   precision=get("precision"), labels=labels, head_name=head, head=export_head(fitted), run_id=run_id)


def _log_audit(audit: Any, salt: str) -> None:
    """audit.json and audit.md on the parent run: files and groups only by ids keyed with the run's secret."""
    import mlflow

    from imgfeat.train.audit import redact
    from imgfeat.train.privacy import keyed_id

    data = redact(audit, lambda text: keyed_id(text, salt))
    mlflow.log_dict(data, "audit.json")
    mlflow.log_text(_redacted_summary(data), "audit.md")
    mlflow.log_metrics({"audit_exact_cross_split": audit.exact_cross_split_count,
                        "audit_near_cross_split": audit.near_cross_split_count,
                        "audit_groups_across_splits": audit.groups_across_splits_count,
                        "audit_exact_duplicate_images": audit.exact_duplicate_images})


def _redacted_summary(data: dict[str, Any]) -> str:
    lines = ["# Leakage audit", "", f"images: {data['images']}", "", "| side | label | images |", "|---|---|---|"]
    for side, labels in sorted(data["class_balance"].items()):
        lines += [f"| {side} | {label} | {n} |" for label, n in sorted(labels.items())]
    lines += ["", f"- exact duplicate contents: {data['exact_duplicate_sets']} ({data['exact_duplicate_images']} images); "
              f"across train/test: {data['exact_cross_split_count']}; with differing labels: {data['exact_cross_label_count']}",
              f"- near duplicate pairs (<= {data['near_duplicate_bits']} bits): {data['near_duplicate_pairs']}; across "
              f"train/test: {data['near_cross_split_count']}; with differing labels: {data['near_cross_label_count']}",
              f"- groups: {data['groups']}; on both sides: {data['groups_across_splits_count']}",
              "", "Files and groups are named by keyed ids (HMAC-SHA256 with privacy.id_salt when set, else with a "
              "secret of this run only): `imgfeat audit` prints their paths to whoever has the table."]
    return "\n".join(lines) + "\n"


def _uncertainty(y: np.ndarray, p: np.ndarray, proba: np.ndarray | None, labels: list[str], units: np.ndarray,
                 cfg: Config) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Bootstrap intervals, calibration error and (binary) the operating point at the target sensitivity."""
    from imgfeat.train.metrics import metric_key
    from imgfeat.train.uncertainty import bootstrap_intervals, calibration, operating_point

    v = cfg.train.validity
    out: dict[str, float] = {}
    if v.bootstrap_resamples and len(y):
        out.update(bootstrap_intervals(y, p, proba, labels, units, v.bootstrap_resamples, v.confidence, cfg.train.seed,
                                       metric_key=metric_key))
    if proba is None or not len(y):
        return out, None
    cal = calibration(y, proba, v.calibration_bins)
    out["test_ece"] = cal["ece"]
    if len(labels) == 2:
        positive = labels.index(cfg.train.positive_class) if cfg.train.positive_class in labels else 1
        point = operating_point(y == positive, np.asarray(proba)[:, positive], v.target_sensitivity)
        if point:
            out["test_threshold_at_target_sensitivity"] = point["threshold"]
            out["test_sensitivity_at_target"] = point["sensitivity"]
            out["test_specificity_at_target_sensitivity"] = point["specificity"]
    return out, cal


def _paired_test(runs: list[ChildRun], correct: dict[str, dict[str, bool]], metric: str) -> dict[str, Any] | None:
    """McNemar between the best two runs on the test images they share."""
    from imgfeat.train.uncertainty import mcnemar

    ranked = sorted((r for r in runs if metric in r.metrics and r.metrics[metric] == r.metrics[metric]),
                    key=lambda r: (r.metrics[metric], r.metrics.get("test_accuracy", 0.0)), reverse=True)
    if len(ranked) < 2:
        return None
    a, b = ranked[0], ranked[1]
    shared = sorted(set(correct.get(a.run_id, {})) & set(correct.get(b.run_id, {})))
    if not shared:
        return None
    test = mcnemar(np.array([correct[a.run_id][k] for k in shared]), np.array([correct[b.run_id][k] for k in shared]))
    return {"a": f"{a.backbone}/{a.head}", "b": f"{b.backbone}/{b.head}", "a_run_id": a.run_id, "b_run_id": b.run_id,
            "images": len(shared), "test": "exact McNemar on paired correctness", **test}


def _weights_files(backbones: list[tuple[str, str]], cfg: Config) -> dict[tuple[str, str], str]:
    """(model, weights id) -> the local weights file, for the backbones whose features came from a user's file."""
    from imgfeat.backbones.weights import WeightsError, sha256_file

    files = {}
    for m, w in backbones:
        if w.startswith("sha256:"):
            path = os.path.abspath(os.path.expanduser(cfg.model.weights))
            if sha256_file(path) != w.removeprefix("sha256:"):
                raise WeightsError(f"model.weights={path} is not the file the {m} features were made with ({w}); "
                                   "pass that file so the logged model reproduces them")
            files[(m, w)] = path
    return files


def _best(runs: list[ChildRun], metric: str) -> ChildRun | None:
    scored = [r for r in runs if r.metrics.get(metric) == r.metrics.get(metric) and metric in r.metrics]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.metrics[metric], r.metrics.get("test_accuracy", 0.0)))
