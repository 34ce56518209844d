"""One backbone's multi-label child runs of ``train``: per-finding heads, thresholds, per-finding results, logged.

``train_backbone_multi`` prepares a backbone's rows once (feature vectors, ``labels``, ``label_mask``, the shared
split) and holds out ``train.threshold_fraction`` of the training units (seeded hash of the unit, a patient's
images together) to choose each finding's threshold. Per head, ``run_multi_child``:

- fits on the remaining training rows: ``lr``/``rf``/``gbt``/``dt`` one binary MLlib head per finding, each on the
  rows where its finding is known (``finding_heads.fit_per_finding``); ``keras`` the multi-output network with a
  masked binary cross-entropy (``finding_heads.fit_masked_bce``, ``train.keras`` settings; its training rows are
  collected to the driver: rows x feature width doubles). The head is NOT refit
  on all training rows afterwards: the thresholds belong to the model that is evaluated and logged (a refit
  model's scores would move under them). ``svc`` has no probabilities and is refused.
- scores the held-out and test rows with the logged Spark stage (``FindingsHeadModel``), chooses the thresholds
  (``findings.choose_threshold``: youden or a target sensitivity, known rows only), evaluates the test rows per
  finding (``findings.evaluate_findings``: bootstrap over units) at the image (or pooled volume) level and, with
  ``train.aggregate``, per study / series / patient (``<level>_test_*``);
- logs the metrics (``test_auc_<finding>``, ..., ``test_auc_macro``, ``test_auc_micro``), findings.csv/.md,
  roc_findings.png, findings_report.json and the models (``image_model.log_findings_model``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from imgfeat.train.child import Backbone, ChildRun, Shared
from imgfeat.train.heads import FEATURES_COL
from imgfeat.train.metrics import finding_key

if TYPE_CHECKING:
    import pandas as pd
    from pyspark.sql import DataFrame, SparkSession

    from imgfeat.config import TrainConfig
    from imgfeat.train.findings import FindingsReport, Targets

log = logging.getLogger(__name__)

MULTI_HEADS = ("lr", "rf", "gbt", "dt", "keras")
MULTI_METRICS = ("auc", "ap", "sensitivity", "specificity", "prevalence")


def check_multi_heads(heads: list[str]) -> None:
    """Refuse heads that cannot give a probability per finding."""
    bad = [h for h in heads if h not in MULTI_HEADS]
    if bad:
        raise ValueError(f"train.heads {bad}: a multi-label table needs a probability per finding, which "
                         f"{', '.join(bad)} cannot give (LinearSVC has margins only); use {', '.join(MULTI_HEADS)}")


def check_finding_keys(names: list[str]) -> None:
    keys = [finding_key(n) for n in names]
    clash = sorted({k for k in keys if keys.count(k) > 1})
    if clash:
        raise ValueError(f"findings {[n for n in names if finding_key(n) in clash]} share the metric name(s) {clash}; "
                         "rename one of them in the manifest (input.label.findings)")


def load_multilabel(table: DataFrame, location: str) -> tuple[DataFrame, DataFrame, list[str], int]:
    """(table, labelled rows, findings, rows without labels) of a multi-label table; refuses a table whose rows
    list different findings or name findings outside the list."""
    from pyspark.sql import functions as F

    missing = [c for c in ("labels", "label_mask") if c not in table.columns]
    if missing:
        raise ValueError(f"{location!r} has a findings column but no {', '.join(missing)}: re-extract it with this "
                         "imgfeat (input.label.multi or input.label.findings)")
    lists = [list(r["findings"]) for r in table.filter(F.col("findings").isNotNull()).select("findings").distinct()
             .limit(3).collect()]
    if len(lists) > 1:
        raise ValueError(f"{location!r} mixes finding lists ({lists[0]} and {lists[1]}): one table, one task; "
                         "re-extract it into one table per finding list")
    names = lists[0]
    if not names:
        raise ValueError(f"{location!r} lists no findings; set input.label.findings (or input.label.multi) and re-extract")
    check_finding_keys(names)
    unlabelled = table.filter(F.col("labels").isNull()).count()
    if unlabelled:
        log.warning("%d rows of %s have no labels; they are not used for training or testing", unlabelled, location)
    labelled = table.filter(F.col("labels").isNotNull())
    listed = F.array(*[F.lit(n) for n in names])
    named = F.array_union(F.col("labels"), F.coalesce(F.col("label_mask"), F.array().cast("array<string>")))
    strays = labelled.filter(F.size(F.array_except(named, listed)) > 0)
    first = strays.select("path", F.array_except(named, listed).alias("x")).first()
    if first is not None:
        raise ValueError(f"{strays.count()} rows of {location!r} name findings outside its list {names}, e.g. "
                         f"{list(first['x'])} for {first['path']}; re-extract with those findings listed")
    return table, labelled, names, unlabelled


def recorded_policy(table: DataFrame, location: str) -> str:
    """How the table's targets were read (its ``label_policy``: the uncertain and blank policies), logged with the
    runs; one table, one policy."""

    if "label_policy" not in table.columns:  # extracted before imgfeat recorded it
        return "not recorded (re-extract to record it)"
    policies = [r["label_policy"] for r in table.select("label_policy").distinct().limit(3).collect()]
    if len(policies) > 1:
        raise ValueError(f"{location!r} mixes label policies ({policies[0]!r} and {policies[1]!r}): one table, one "
                         "reading of the manifest; re-extract it with one input.label.uncertain / blank")
    return policies[0] if policies and policies[0] else "not recorded"


def positives_per_side(split: DataFrame, labelled: DataFrame, names: list[str]) -> tuple[dict[str, int], dict[str, int]]:
    """Known positive images per finding in train and in test (a finding without any: 0)."""
    from pyspark.sql import functions as F

    from imgfeat.train.split import known_positives, with_item

    known = with_item(labelled).dropDuplicates(["item"]).select("item", F.explode(known_positives()).alias("f"))
    counts = {(r["f"], r["is_test"]): r["n"] for r in split.select("item", "is_test").join(known, on="item")
              .groupBy("f", "is_test").agg(F.count("*").alias("n")).collect()}
    return ({n: counts.get((n, False), 0) for n in names}, {n: counts.get((n, True), 0) for n in names})


@dataclass(frozen=True)
class MultiRows:
    """A backbone's rows: ``fit`` (training less the threshold share) and ``scored`` (threshold share + test)."""

    fit: DataFrame
    scored: DataFrame
    input_dim: int


def train_backbone_multi(spark: SparkSession, backbone: Backbone, labelled: DataFrame, split: DataFrame,
                         shared: Shared) -> list[tuple[ChildRun, dict[str, bool]]]:
    """Every head on one backbone: (child run, {}) per head (no per-image correctness: no McNemar test)."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    rows = _rows(labelled, backbone, split, shared.tc)
    rows = rows.repartition(max(1, spark.sparkContext.defaultParallelism)).persist(StorageLevel.MEMORY_AND_DISK)
    fit = rows.filter(~F.col("is_test") & ~F.col("hold"))
    if not fit.limit(1).count():
        raise ValueError(f"no training rows left for {backbone.name} after holding out train.threshold_fraction="
                         f"{shared.tc.threshold_fraction} of the training units; lower it")
    data = MultiRows(fit, rows.filter(F.col("is_test") | F.col("hold")), len(rows.select(FEATURES_COL).first()[0]))
    runs = [(run_multi_child(backbone, data, head, shared), {}) for head in shared.tc.heads]
    rows.unpersist()
    return runs


def _rows(labelled: DataFrame, backbone: Backbone, split: DataFrame, tc: TrainConfig) -> DataFrame:
    """item, feature vector, labels, label_mask, is_test, unit, hold (threshold share), agg_key (aggregate)."""
    from pyspark.ml.functions import array_to_vector
    from pyspark.sql import functions as F

    from imgfeat.io.splits import hash_bucket
    from imgfeat.train.aggregate import key_column
    from imgfeat.train.split import with_item

    rows = labelled.filter((F.col("model") == backbone.model_name) & (F.col("weights_id") == backbone.weights_id))
    keys = [key_column(tc.aggregate).alias("agg_key")] if tc.aggregate != "none" else [F.lit(None).cast("string").alias("agg_key")]
    rows = with_item(rows).dropDuplicates(["item"]).select(
        "item", array_to_vector(F.col("features")).alias(FEATURES_COL), "labels", "label_mask", *keys)
    rows = rows.join(split.select("item", "is_test", "unit"), on="item", how="inner").filter(F.col("is_test").isNotNull())
    # A seed other than the test split's, so that the threshold share is not the units next in line for test.
    hold = ~F.col("is_test") & (hash_bucket(tc.seed + 1, F.col("unit")) < F.lit(float(tc.threshold_fraction)))
    return rows.withColumn("hold", hold)


def run_multi_child(backbone: Backbone, data: MultiRows, head: str, shared: Shared) -> ChildRun:
    """One nested MLflow run: fit ``head`` per finding, choose thresholds, evaluate the test rows, log."""
    import mlflow

    from imgfeat.train.findings_model import FindingsHeadModel
    from imgfeat.train.image_model import log_findings_model
    from imgfeat.train.privacy import check_metadata

    t0, tc, names = time.time(), shared.tc, shared.labels
    log.info("training %s per finding on %s", head, backbone.name)
    tags = {"backbone": backbone.model_name, "head": head, "dataset": shared.dataset, "weights_id": backbone.weights_id}
    with mlflow.start_run(run_name=f"{backbone.name} {head}", nested=True, tags=tags) as child:
        arrays, head_params, one_class = fit_findings_head(head, data.fit, names, tc)
        aggregation = tc.aggregation if tc.aggregate != "none" else None
        stage = FindingsHeadModel.of(arrays, aggregation=aggregation)
        scored = _score(stage, data.scored)
        thresholds, threshold_params = choose_thresholds(scored[scored["hold"]], names, tc)
        stage.set(stage.thresholds, thresholds)
        test = scored[scored["is_test"]].sort_values("item")
        results = evaluate_multi(test, names, thresholds, tc, one_class)
        child_params = {**shared.params, "backbone": backbone.model_name, "weights_id": backbone.weights_id,
                        "head": head, "feature_dim": data.input_dim, **threshold_params,
                        **{f"head_{k}": v for k, v in head_params.items()},
                        "preprocess": json.dumps(backbone.featurizer.decode_options().to_dict(), sort_keys=True)}
        check_metadata(child_params, tags)
        mlflow.log_params(child_params)
        metrics = log_results(results, names, thresholds, f"{backbone.name} / {head} on {shared.dataset}")
        log_findings_model(backbone.featurizer, stage, head, child.info.run_id)
        table = findings_text(results[0][1])
    return ChildRun(backbone.model_name, backbone.weights_id, head, child.info.run_id, metrics, head_params,
                    round(time.time() - t0, 2), table)


def fit_findings_head(head: str, fit: DataFrame, names: list[str],
                      tc: TrainConfig) -> tuple[Any, dict[str, Any], list[str]]:
    """(the fitted head as a ``findings`` HeadArrays, params to log, the findings training saw with one class)."""
    from imgfeat.train.export import export_findings, export_masked_head
    from imgfeat.train.finding_heads import ConstantFinding, fit_masked_bce, fit_per_finding
    from imgfeat.train.heads import HEAD_NAMES

    if head != "keras":
        models = fit_per_finding(fit, names, head, tc.params, tc.seed)
        constant = [n for n, m in zip(names, models, strict=True) if isinstance(m, ConstantFinding)]
        if constant:
            log.warning("findings %s have one class only in training: scored as their training rate", constant)
        return export_findings(models, names, head), {
            "estimator": f"{HEAD_NAMES[head].split(' (')[0]} per finding (binary, known rows only)",
            "constant_findings": json.dumps(constant)}, constant
    x, targets = _collect(fit, names)
    one_class = targets.one_class()
    if one_class:
        log.warning("findings %s have one class only in training: reported as such, not scored", one_class)
    k = tc.keras
    masked = fit_masked_bce(x, targets.y, targets.mask.astype(float), hidden=k.hidden_units, epochs=k.epochs,
                            batch_size=k.batch_size, learning_rate=k.learning_rate, seed=tc.seed)
    return export_masked_head(masked, names), {
        "estimator": "multi-output network, masked binary cross-entropy (torch)", "hidden_units": k.hidden_units,
        "epochs": k.epochs, "batch_size": k.batch_size, "learning_rate": k.learning_rate,
        "positive_weights": "known negatives / known positives per finding",
        "constant_findings": json.dumps(one_class)}, one_class


def _collect(fit: DataFrame, names: list[str]) -> tuple[np.ndarray, Targets]:
    """The training rows on the driver: (features (n, d), targets with masks), in item order."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    from imgfeat.train.findings import Targets

    pdf = fit.select("item", vector_to_array(F.col(FEATURES_COL)).alias("x"), "labels", "label_mask") \
        .orderBy("item").toPandas()
    x = np.stack(pdf["x"].to_numpy()) if len(pdf) else np.zeros((0, 0))
    return x, Targets.from_rows(names, _lists(pdf["labels"]), _lists(pdf["label_mask"]))


def _lists(column: Any) -> list[list[str] | None]:
    """A pandas column of arrays (numpy arrays from Arrow) as Python lists."""
    return [None if v is None else list(v) for v in column]


def _score(stage: Any, rows: DataFrame) -> pd.DataFrame:
    """The held-out and test rows scored by the logged stage, on the driver."""
    scored = stage.transform(rows).select("item", "unit", "agg_key", "is_test", "hold", "labels", "label_mask",
                                          stage.getProbabilityCol())
    return scored.toPandas().rename(columns={stage.getProbabilityCol(): "p"})


def _targets_scores(frame: pd.DataFrame, names: list[str]) -> tuple[Targets, np.ndarray]:
    from imgfeat.train.findings import Targets

    targets = Targets.from_rows(names, _lists(frame["labels"]), _lists(frame["label_mask"]))
    scores = np.stack(frame["p"].to_numpy()) if len(frame) else np.zeros((0, len(names)))
    return targets, scores


def choose_thresholds(held: pd.DataFrame, names: list[str], tc: TrainConfig) -> tuple[list[float], dict[str, Any]]:
    """Each finding's threshold on the held-out training rows where it is known (0.5 where they lack a class)."""
    from imgfeat.train.findings import choose_threshold

    targets, scores = _targets_scores(held, names)
    out, fallback = [], []
    for j, name in enumerate(names):
        known = targets.mask[:, j]
        positive = targets.y[known, j] > 0.5
        if not positive.any() or positive.all():
            fallback.append(name)
        out.append(choose_threshold(positive, scores[known, j], tc.threshold, tc.validity.target_sensitivity))
    if fallback and tc.threshold_fraction > 0:
        log.warning("%d held-out images lack a class of %s: threshold 0.5 for those findings", len(held), fallback)
    params = {"threshold_method": tc.threshold if tc.threshold == "youden" else
              f"sensitivity >= {tc.validity.target_sensitivity}", "threshold_fraction": tc.threshold_fraction,
              "threshold_images": len(held), "threshold_refit": False, "threshold_fallback_0.5": json.dumps(fallback)}
    return out, params


def evaluate_multi(test: pd.DataFrame, names: list[str], thresholds: list[float], tc: TrainConfig,
                   one_class: list[str] | None = None) -> list[tuple[str, FindingsReport, Targets, np.ndarray]]:
    """(metric prefix, report, targets, scores) at the image (volume) level, then at ``train.aggregate``'s; the
    findings ``one_class`` (one class in training) reported as such."""
    from imgfeat.train.findings import aggregate, aggregate_targets, evaluate_findings

    v = tc.validity
    targets, scores = _targets_scores(test, names)
    units = test["unit"].to_numpy()
    level = "volume" if tc.pool_slices != "none" else "image"
    skip = one_class or []
    out = [("test_", evaluate_findings(targets, scores, thresholds, units, v.bootstrap_resamples, v.confidence,
                                       tc.seed, level, skip), targets, scores)]
    if tc.aggregate != "none" and len(test):
        keys = test["agg_key"].to_numpy().astype(str)
        uniq, combined = aggregate(keys, scores, tc.aggregation)
        _, per_key, disagree = aggregate_targets(keys, targets)
        if disagree:
            log.warning("%d of %d %s keys have images that disagree on a known finding (a finding is positive for "
                        "the %s when any known image is)", len(disagree), len(uniq), tc.aggregate, tc.aggregate)
        from imgfeat.train.aggregate import first_per_key

        report = evaluate_findings(per_key, combined, thresholds, first_per_key(keys, units), v.bootstrap_resamples,
                                   v.confidence, tc.seed, tc.aggregate, skip)
        out.append((f"{tc.aggregate}_test_", report, per_key, combined))
    return out


def findings_metrics(report: FindingsReport, prefix: str) -> dict[str, float]:
    """MLflow metrics of a report: per finding ``<prefix><metric>_<finding>`` (+ _ci_low/_ci_high), counts and
    threshold, and ``<prefix>auc_macro`` / ``<prefix>auc_micro``; undefined values are left out (never NaN)."""
    out: dict[str, float] = {}

    def put(name: str, value: float | None, interval: list[float | None] | None = None) -> None:
        if value is None:
            return
        out[name] = float(value)
        if interval and interval[0] is not None:
            out[f"{name}_ci_low"], out[f"{name}_ci_high"] = float(interval[0]), float(interval[1])

    for f in report.findings:
        key = finding_key(f.name)
        for m in MULTI_METRICS:
            put(f"{prefix}{m}_{key}", f.metrics.get(m), f.intervals.get(m))
        put(f"{prefix}positives_{key}", f.positives)
        put(f"{prefix}negatives_{key}", f.negatives)
        put(f"{prefix}masked_{key}", f.masked)
        put(f"{prefix}threshold_{key}", f.threshold)
    put(f"{prefix}auc_macro", report.macro_auc, report.intervals["macro_auc"])
    put(f"{prefix}auc_micro", report.micro_auc, report.intervals["micro_auc"])
    put(f"{prefix}findings_without_both_classes", sum(f.status != "ok" for f in report.findings))
    if prefix != "test_" and report.findings:  # how many studies (series, patients) were scored
        f = report.findings[0]
        put(f"{prefix.removesuffix('test_')}n_test", f.positives + f.negatives + f.masked)
    return out


def findings_text(report: FindingsReport) -> str:
    """The CheXNet-style table as console text, with its level."""
    from imgfeat.train.findings import findings_table

    table = findings_table(report)
    return f"{report.level} level ({report.confidence:.0%} intervals)\n" + table.to_string(index=False)


def log_results(results: list[tuple[str, FindingsReport, Targets, np.ndarray]], names: list[str],
                thresholds: list[float], title: str) -> dict[str, float]:
    """Log every level's metrics, tables and ROC picture; returns the metrics."""
    import mlflow

    metrics: dict[str, float] = {}
    for prefix, report, _, _ in results:
        metrics.update(findings_metrics(report, prefix))
    mlflow.log_metrics(metrics)
    mlflow.log_dict({"findings": names, "thresholds": thresholds}, "thresholds.json")
    for prefix, report, targets, scores in results:
        suffix = "" if prefix == "test_" else f"_{prefix.removesuffix('_test_')}"
        mlflow.log_dict(report.to_dict(), f"findings_report{suffix}.json")
        _log_table(report, f"findings{suffix}", title)
        _log_roc(targets, scores, report, f"roc_findings{suffix}.png", title)
    return metrics


def _log_table(report: FindingsReport, name: str, title: str) -> None:
    import mlflow

    from imgfeat.train.compare import to_markdown
    from imgfeat.train.findings import findings_table
    from imgfeat.train.privacy import check_artifact_table

    table = findings_table(report)
    check_artifact_table(table.replace("n/a", ""), f"{name}.csv")  # "n/a" (undefined) is no path
    with tempfile.TemporaryDirectory() as tmp:
        table.to_csv(os.path.join(tmp, f"{name}.csv"), index=False)
        with open(os.path.join(tmp, f"{name}.md"), "w", encoding="utf-8") as fh:
            fh.write(f"# {title}: per finding, {report.level} level\n\n{to_markdown(table)}\n\n"
                     f"Values with {report.confidence:.0%} bootstrap intervals ({report.resamples} resamples of "
                     "patients); sensitivity and specificity at each finding's threshold; masked: test images whose "
                     "finding is unknown (in no count and no metric).\n")
        for ext in ("csv", "md"):
            mlflow.log_artifact(os.path.join(tmp, f"{name}.{ext}"))


def _log_roc(targets: Targets, scores: np.ndarray, report: FindingsReport, name: str, title: str) -> None:
    import matplotlib.pyplot as plt
    import mlflow

    from imgfeat.train.findings import plot_finding_rocs

    fig = plot_finding_rocs(targets, scores, report, title)
    mlflow.log_figure(fig, name)
    plt.close(fig)
