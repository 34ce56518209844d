"""The train job: heads on a features table, one MLflow child run per backbone x head.

Steps (each a function below): read the table and check its labels (``_load_table``); split images into
train/test once (``_split``: the table's split column, or a grouped, stratified hash split, ``train.split``) so
every backbone and head is tested on the same images; pick the backbones and rebuild their featurizers from the
recorded preprocessing (``_backbones``); in one parent run: log the shared params, audit the split for leaks and
stop on one (``_audit``, ``train.audit``), record the held-out images (``_log_test_set``), run every head on every
backbone (``train.child``: fit, predict, evaluate, log the child run and its models), pick the best and test it
against the runner-up (``_pick_best``); register the best model (``_register``).

Multi-label tables (a ``findings`` column: ``labels``, ``label_mask``) take the same steps with per-finding heads
and results (``train.multilabel``); ``train.pool_slices`` pools a volume's slices into one row when the table is
read, ``train.aggregate`` adds study / series / patient results (``train.aggregate``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.config import Config, InferenceConfig, ModelConfig, PreprocessConfig, TrainConfig
from imgfeat.train.child import Backbone, ChildRun, Shared
from imgfeat.train.heads import FEATURES_COL, LABEL_COL

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

__all__ = ["ChildRun", "TrainResult", "featurizer_for", "recorded_settings", "run_train"]

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
    task: str = "single"  # single | multi (labels are then the findings)
    select_metric: str = ""  # the metric that picked the best run
    aggregate: str = "none"  # the level of the aggregated results (train.aggregate)

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

        def interval(r: ChildRun, name: str, prefix: str = "test_") -> str:
            value = r.metrics.get(f"{prefix}{name}", float("nan"))
            low, high = r.metrics.get(f"{prefix}{name}_ci_low"), r.metrics.get(f"{prefix}{name}_ci_high")
            return f"{value:.4f}" + (f" [{low:.3f}, {high:.3f}]" if low is not None and high is not None else "")

        level = self.aggregate
        for r in self.runs:
            keys = int(r.metrics.get(f"{level}_n_test", 0))
            if self.task == "multi":
                line = f"macro AUC {interval(r, 'auc_macro')}  micro AUC {interval(r, 'auc_micro')}"
                extra = (f"  {level} ({keys} in test): macro AUC {interval(r, f'{level}_test_auc_macro', '')}"
                         if level != "none" else "")
            else:
                line = (f"accuracy {interval(r, 'accuracy')}  macro F1 {interval(r, 'f1_macro')}  "
                        f"AUC {interval(r, 'roc_auc')}")
                extra = (f"  {level} ({keys} in test): kappa {interval(r, f'{level}_test_kappa', '')}  AUC "
                         f"{interval(r, f'{level}_test_roc_auc', '')}") if level != "none" else ""
            lines.append(f"[imgfeat]   {r.backbone:<14} {r.head:<5} {line}{extra}  ({r.seconds:.1f}s)  run {r.run_id}")
        best = next((r for r in self.runs if r.run_id == self.best_run_id), None)
        if best is not None and best.findings_table:
            lines.append(f"[imgfeat]   per finding, best run ({best.backbone} / {best.head}, by {self.select_metric}), "
                         + best.findings_table.replace("\n", "\n    "))
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


def featurizer_for(model: str, weights_id: str, model_cfg: ModelConfig, inference: InferenceConfig,
                   preprocess: PreprocessConfig, settings: str | None = None) -> Any:
    """An ``ImageFeaturizer`` that reproduces the features of (model, weights_id) from image bytes.

    ``settings``: the preprocessing recorded with the features (``imgfeat.featurize.settings``); it, not this
    run's ``preprocess`` settings, decides how the logged model prepares images.
    """
    from imgfeat.backbones.registry import get_backbone
    from imgfeat.featurize.settings import decode_from_settings, precision_from_settings
    from imgfeat.featurize.transformer import ImageFeaturizer
    from imgfeat.io.decoders import DecodeOptions

    weights, seed, sha = _weights_of(model, weights_id, model_cfg)
    precision = inference.precision
    if settings is not None:
        decode, precision = decode_from_settings(settings), precision_from_settings(settings)
    else:
        log.warning("the %s features do not record their preprocessing (an older table): the logged model uses this "
                    "run's preprocess settings; they must be the ones extract used", model)
        decode = DecodeOptions.from_config(preprocess, get_backbone(model).input_size)
    return ImageFeaturizer.from_decode_options(
        decode, inputCol="content", outputCol=FEATURES_COL, modelName=model, weights=weights, weightsSha256=sha,
        seed=seed, batchSize=inference.batch_size, outputType="vector", precision=precision,
    )


def _weights_of(model: str, weights_id: str, model_cfg: ModelConfig) -> tuple[str, int, str]:
    """(weights setting, seed, pinned sha256) that resolve to ``weights_id`` again; a weights file must be
    ``model.weights``."""
    if weights_id.startswith("none-seed"):
        return "none", int(weights_id.removeprefix("none-seed")), ""
    if weights_id.startswith("imagenet:sha256:"):
        return "imagenet", model_cfg.seed, weights_id.removeprefix("imagenet:sha256:")
    if not weights_id.startswith("sha256:"):
        raise ValueError(f"unrecognised weights id {weights_id!r} for {model} in the features table")
    weights = model_cfg.weights
    if weights in ("imagenet", "none") or not os.path.isfile(os.path.expanduser(weights)):
        raise ValueError(
            f"the {model} features were extracted with a weights file ({weights_id}); pass the same file with "
            "--set model.weights=/path/to/the/file (.h5 or .pth) so the logged model can featurize raw images"
        )
    return weights, model_cfg.seed, weights_id.removeprefix("sha256:")


# ---------------------------------------------------------------------------------------------
# the job


@dataclass(frozen=True)
class _Table:
    """The features table, its labelled rows, their labels (alphabetical; multi-label: the findings in the
    table's order) and how many rows had no label."""

    table: DataFrame
    labelled: DataFrame
    labels: list[str]
    unlabelled: int
    multi: bool = False
    policy: str = ""  # multi-label: how the targets were read (the table's label_policy)


@dataclass(frozen=True)
class _Split:
    """The one train/test split (persisted), how it was made, per-label counts, rows in neither side."""

    frame: DataFrame
    mode: str
    train_counts: dict[str, int]  # per label; multi-label: known positives per finding
    test_counts: dict[str, int]
    excluded: int
    n_train: int = 0
    n_test: int = 0


def run_train(spark: SparkSession, cfg: Config) -> TrainResult:
    """Fit every head on every backbone of ``train.features``; log to MLflow; return the runs."""
    import mlflow

    from imgfeat.train.heads import check_heads
    from imgfeat.train.metrics import class_weights
    from imgfeat.train.privacy import dataset_name, run_salt
    from imgfeat.train.tracking import tracking_uri, use_experiment

    started = time.time()
    tc = cfg.train
    check_heads(tc.heads)
    experiment_id = use_experiment(cfg.mlflow)
    data = _load_table(spark, cfg)
    metric = _task_settings(tc, data.multi)
    salt = run_salt(cfg.privacy.id_salt)  # keys every id this run logs; a random one is never stored
    dataset = dataset_name(tc.dataset, tc.features, salt)
    split = _split(data, cfg)
    weights = dict(enumerate(class_weights(split.train_counts, data.labels))) if tc.class_weighting and not data.multi else None
    backbones = _backbones(data.labelled, tc, cfg.model, cfg.inference, cfg.preprocess)
    result = TrainResult(
        parent_run_id="", experiment_id=experiment_id, experiment=cfg.mlflow.experiment, tracking_uri=tracking_uri(cfg.mlflow),
        features=tc.features, labels=data.labels, split_mode=split.mode, n_train=split.n_train,
        n_test=split.n_test, excluded_unlabelled=data.unlabelled, excluded_split=split.excluded,
        dataset=dataset, task="multi" if data.multi else "single", select_metric=metric, aggregate=tc.aggregate,
    )
    params = _common_params(tc, dataset, salt, data.labels, split, data.policy if data.multi else None)
    shared = Shared(tc, data.labels, dataset, params, weights, data.multi)
    with mlflow.start_run(run_name=f"train {dataset}", tags={"dataset": dataset, "imgfeat.kind": "train"}) as parent:
        result.parent_run_id = parent.info.run_id
        _log_parent(shared, backbones, data.unlabelled, split.excluded, cfg.model.weights)
        result.audit = _audit(split.frame, data.labelled, tc, salt)
        _log_test_set(split.frame, cfg.privacy.id_salt, salt)
        correct = _train_all(spark, backbones, data.labelled, split.frame, shared, result)
        _pick_best(result, correct, metric)
    split.frame.unpersist()
    if tc.register and result.best_run_id:
        result.registered = _register(result.best_run_id, tc.register)
    result.seconds = round(time.time() - started, 2)
    return result


def _task_settings(tc: TrainConfig, multi: bool) -> str:
    """The metric that picks the best run (multi-label: test_auc_macro instead of the default test_f1_macro);
    refuses heads and settings a multi-label table cannot use, and says which it ignores."""
    if not multi:
        return tc.select_metric
    from imgfeat.train.multilabel import check_multi_heads

    check_multi_heads(tc.heads)
    ignored = [name for name, used in (("train.cv_folds", tc.cv_folds), ("train.validation_fraction", tc.validation_fraction),
                                       ("train.positive_class", tc.positive_class)) if used]
    if tc.class_weighting:
        ignored.append("train.class_weighting (the keras head weighs each finding's positives; MLlib heads are unweighted)")
    if ignored:
        log.warning("multi-label table: %s not used (fixed train.params per finding)", ", ".join(ignored))
    if tc.select_metric != "test_f1_macro":
        return tc.select_metric
    print("[imgfeat] multi-label table: runs are ranked by test_auc_macro (train.select_metric was the single-label "
          "default test_f1_macro)", flush=True)
    return "test_auc_macro"


def _load_table(spark: SparkSession, cfg: Config) -> _Table:
    """The features table and its labelled rows; refuses fewer than 2 labels or an unknown positive class."""
    from pyspark.sql import functions as F

    from imgfeat.train.aggregate import check_aggregate_keys, pool_slices
    from imgfeat.train.split import is_multilabel, read_features

    tc = cfg.train
    table = read_features(spark, cfg.train.features, cfg.output.format)
    check_aggregate_keys(table, tc.aggregate, tc.features)
    if tc.pool_slices != "none":
        table = pool_slices(table, tc.pool_slices)
    if is_multilabel(table):
        from imgfeat.train.multilabel import load_multilabel, recorded_policy

        return _Table(*load_multilabel(table, tc.features), multi=True, policy=recorded_policy(table, tc.features))
    unlabelled = table.filter(F.col("label").isNull()).count()
    if unlabelled:
        log.warning("%d rows of %s have no label; they are not used for training or testing", unlabelled, tc.features)
    labelled = table.filter(F.col("label").isNotNull())
    labels = sorted(r["label"] for r in labelled.select("label").distinct().collect())
    if len(labels) < 2:
        raise ValueError(f"{tc.features!r} has {len(labels)} class(es) {labels}; training needs at least 2 labelled classes")
    if tc.positive_class is not None and tc.positive_class not in labels:
        raise ValueError(f"train.positive_class={tc.positive_class!r} is not a label of {tc.features!r}; labels: {labels}")
    return _Table(table, labelled, labels, unlabelled)


def _split(data: _Table, cfg: Config) -> _Split:
    """The images' train/test split, persisted for every backbone; refuses a split with an empty side."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    from imgfeat.train.split import assign_split, labelled_images

    split, mode = assign_split(labelled_images(data.table, data.multi), cfg.train)
    split = split.persist(StorageLevel.MEMORY_AND_DISK)
    sides = {r["is_test"]: r["n"] for r in split.groupBy("is_test").agg(F.count("*").alias("n")).collect()}
    if data.multi:
        from imgfeat.train.multilabel import positives_per_side

        train_counts, test_counts = positives_per_side(split, data.labelled, data.labels)
    else:
        counts = {(r["label"], r["is_test"]): r["n"]
                  for r in split.groupBy("label", "is_test").agg(F.count("*").alias("n")).collect()}
        train_counts = {lab: counts.get((lab, False), 0) for lab in data.labels}
        test_counts = {lab: counts.get((lab, True), 0) for lab in data.labels}
    n_train, n_test = sides.get(False, 0), sides.get(True, 0)
    if not n_test or not n_train:
        raise ValueError(f"the {mode} split left {n_train} train and {n_test} test images; check train.test_fraction "
                         "or the split column")
    return _Split(split, mode, train_counts, test_counts, sides.get(None, 0), n_train, n_test)


def _backbones(labelled: DataFrame, tc: TrainConfig, model_cfg: ModelConfig, inference: InferenceConfig,
               preprocess: PreprocessConfig) -> list[Backbone]:
    """The (model, weights id) pairs to train on, each with the featurizer that reproduces its features."""
    from pyspark.sql import functions as F

    pairs = [(r["model"], r["weights_id"])
             for r in labelled.select("model", "weights_id").distinct().orderBy("model", "weights_id").collect()]
    if tc.backbones:
        unknown = set(tc.backbones) - {m for m, _ in pairs}
        if unknown:
            raise ValueError(f"train.backbones {sorted(unknown)} are not in {tc.features!r}; it has {sorted({m for m, _ in pairs})}")
        pairs = [(m, w) for m, w in pairs if m in tc.backbones]
    multi_weights = len({m for m, _ in pairs}) < len(pairs)
    # Before any run starts: one recorded preprocessing per backbone, or a clear refusal.
    settings = {
        (m, w): recorded_settings(labelled.filter((F.col("model") == m) & (F.col("weights_id") == w)), m, w, tc.features)
        for m, w in pairs
    }
    return [Backbone(m, w, f"{m}:{w[:20]}" if multi_weights else m,
                     featurizer_for(m, w, model_cfg, inference, preprocess, settings[(m, w)]))
            for m, w in pairs]


def _common_params(tc: TrainConfig, dataset: str, salt: str, labels: list[str], split: _Split,
                   policy: str | None = None) -> dict[str, Any]:
    """The params the parent run and every child run log (multi-label, ``policy`` set: known positives per
    finding, the task and how the targets were read; aggregation and pooling when used)."""
    from imgfeat.train.metrics import finding_key, metric_key
    from imgfeat.train.privacy import keyed_id

    multi = policy is not None
    count = "positives" if multi else "count"
    key = finding_key if multi else metric_key
    extra: dict[str, Any] = {"task": "multi", "label_policy": policy} if multi else {}
    if tc.aggregate != "none":
        extra.update(aggregate=tc.aggregate, aggregation=tc.aggregation)
    if tc.pool_slices != "none":
        extra["pool_slices"] = tc.pool_slices
    return {
        # The table's location may name people or places: a keyed digest identifies it without saying it.
        "features_table_sha256": keyed_id(tc.features, salt, 16), "dataset": dataset, "labels": json.dumps(labels),
        "split_mode": split.mode, "split_seed": tc.seed,
        "test_fraction": tc.test_fraction if split.mode == "hash" else "split column",
        "class_weighting": tc.class_weighting and not multi, "n_train": split.n_train, "n_test": split.n_test,
        **{f"train_{count}_{key(k)}": v for k, v in split.train_counts.items()},
        **{f"test_{count}_{key(k)}": v for k, v in split.test_counts.items()},
        **extra,
    }


def _log_parent(shared: Shared, backbones: list[Backbone], unlabelled: int, excluded: int, weights: str) -> None:
    """The parent run's params, and the weights file of every backbone whose features came from a user's file."""
    import mlflow

    from imgfeat.train.privacy import check_metadata

    tc = shared.tc
    params = {**shared.params, "heads": ",".join(tc.heads),
              "backbones": json.dumps([f"{b.model_name} ({b.weights_id[:40]})" for b in backbones]),
              "excluded_unlabelled": unlabelled, "excluded_split": excluded}
    check_metadata(params, {"dataset": shared.dataset})
    mlflow.log_params(params)
    for (model_name, weights_id), path in _weights_files([(b.model_name, b.weights_id) for b in backbones], weights).items():
        # A model trained on a weights file must work on other machines: the file travels with the runs.
        mlflow.log_artifact(path, artifact_path=f"weights/{weights_id.removeprefix('sha256:')[:16]}")
        log.info("logged the %s weights file %s with the parent run", model_name, path)


def _audit(split: DataFrame, labelled: DataFrame, tc: TrainConfig, salt: str) -> dict[str, Any]:
    """The leakage report, logged; a leaking split, or one file under two labels, ends the job here (the parent
    run FAILED, the report logged; the messages name files for the console only)."""
    from imgfeat.train.audit import check_label_conflicts, check_leakage, run_audit
    from imgfeat.train.split import audit_images

    v = tc.validity
    audit = run_audit(audit_images(split, labelled), v.near_duplicate_bits)
    log.info("%s", audit.summary())
    _log_audit(audit, salt)
    check_leakage(audit, v.allow_duplicates, v.allow_group_overlap)
    check_label_conflicts(audit.exact_cross_label_count, audit.exact_cross_label, v.allow_label_conflicts,
                          f"the features table {tc.features!r}")
    return audit.to_dict()


def _log_test_set(split: DataFrame, id_salt: str | None, salt: str) -> None:
    """A digest of the held-out images; with a configured secret, also their keyed ids (the secret's owner maps
    them back)."""
    import mlflow
    from pyspark.sql import functions as F

    from imgfeat.train.privacy import artifact_ids, check_artifact_table, configured_salt, set_digest

    test_ids = split.filter(F.col("is_test")).select("image_id", "label").orderBy("image_id").toPandas()
    mlflow.log_param("test_set_sha256", set_digest(list(test_ids["image_id"])))
    if not configured_salt(id_salt):
        return
    listed = test_ids.assign(test_id=artifact_ids(list(test_ids["image_id"]), salt))[["test_id", "label"]]
    check_artifact_table(listed, "test_images.csv")
    with tempfile.TemporaryDirectory() as tmp:
        listed.sort_values("test_id").to_csv(os.path.join(tmp, "test_images.csv"), index=False)
        mlflow.log_artifact(os.path.join(tmp, "test_images.csv"))


def _train_all(spark: SparkSession, backbones: list[Backbone], labelled: DataFrame, split: DataFrame, shared: Shared,
               result: TrainResult) -> dict[str, dict[str, bool]]:
    """Every head on every backbone (``result.runs``); returns run id -> test item -> prediction was right."""
    from pyspark.ml.feature import StringIndexerModel

    from imgfeat.train.child import train_backbone

    indexer = StringIndexerModel.from_labels(shared.labels, inputCol="label", outputCol=LABEL_COL)
    correct: dict[str, dict[str, bool]] = {}
    for backbone in backbones:
        if shared.multi:
            from imgfeat.train.multilabel import train_backbone_multi

            runs = train_backbone_multi(spark, backbone, labelled, split, shared)
        else:
            runs = train_backbone(spark, backbone, labelled, split, indexer, shared)
        for run, right in runs:
            result.runs.append(run)
            correct[run.run_id] = right
    return correct


def _pick_best(result: TrainResult, correct: dict[str, dict[str, bool]], metric: str) -> None:
    """The best run by ``metric`` (tagged on the parent) and the paired test between the best two."""
    import mlflow

    best = _best(result.runs, metric)
    if best is not None:
        result.best_run_id = best.run_id
        mlflow.set_tag("best_run_id", best.run_id)
        mlflow.log_metric(f"best_{metric}", best.metrics.get(metric, float("nan")))
    result.paired_test = test = _paired_test(result.runs, correct, metric)
    if test:
        mlflow.log_dict(test, "paired_test.json")
        mlflow.log_metric("paired_test_p_value", test["p_value"])
        mlflow.set_tag("paired_test", f"{test['a']} vs {test['b']}: McNemar p={test['p_value']:.4g}")


def _register(run_id: str, name: str) -> dict[str, str]:
    """Register the run's Spark model in the Model Registry under ``name``."""
    import mlflow

    from imgfeat.scoring.flavor import SPARK_MODEL

    version = mlflow.register_model(f"runs:/{run_id}/{SPARK_MODEL}", name)
    return {"name": name, "version": str(version.version), "uri": f"models:/{name}/{version.version}"}


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


def _paired_test(runs: list[ChildRun], correct: dict[str, dict[str, bool]], metric: str) -> dict[str, Any] | None:
    """McNemar between the best two runs on the test images they share."""
    from imgfeat.train.uncertainty import mcnemar

    ranked = sorted((r for r in runs if _scored(r, metric)),
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


def _weights_files(backbones: list[tuple[str, str]], weights: str) -> dict[tuple[str, str], str]:
    """(model, weights id) -> the local weights file (``model.weights``), for the backbones whose features came
    from a user's file."""
    from imgfeat.backbones.weights import WeightsError, sha256_file

    files = {}
    for m, w in backbones:
        if w.startswith("sha256:"):
            path = os.path.abspath(os.path.expanduser(weights))
            if sha256_file(path) != w.removeprefix("sha256:"):
                raise WeightsError(f"model.weights={path} is not the file the {m} features were made with ({w}); "
                                   "pass that file so the logged model reproduces them")
            files[(m, w)] = path
    return files


def _scored(run: ChildRun, metric: str) -> bool:
    """Whether ``run`` has a defined (not NaN) value of ``metric``."""
    return metric in run.metrics and not math.isnan(run.metrics[metric])


def _best(runs: list[ChildRun], metric: str) -> ChildRun | None:
    """The run with the highest ``metric`` (ties: the higher test accuracy); None when no run has it."""
    scored = [r for r in runs if _scored(r, metric)]
    if not scored:
        return None
    return max(scored, key=lambda r: (r.metrics[metric], r.metrics.get("test_accuracy", 0.0)))
