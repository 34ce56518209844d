"""Classifier heads by name: the MLlib estimator, its fixed hyperparameters and its small grid.

``lr``, ``rf`` and ``dt`` are multiclass natively; ``gbt`` and ``svc`` are binary in MLlib and are
wrapped in ``OneVsRest`` when there are more than two classes. ``keras`` is trained outside MLlib
(``imgfeat.train.keras_head``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from imgfeat.config import ConfigError, TrainConfig

if TYPE_CHECKING:
    from pyspark.ml import Estimator

HEADS = ("lr", "rf", "dt", "gbt", "svc", "keras")
HEAD_NAMES = {
    "lr": "LogisticRegression (multinomial)",
    "rf": "RandomForestClassifier",
    "dt": "DecisionTreeClassifier",
    "gbt": "GBTClassifier",
    "svc": "LinearSVC",
    "keras": "Keras softmax head (Petastorm)",
}



def check_heads(names: list[str]) -> None:
    """Raise a ConfigError naming ``train.heads`` unless every name is a known head."""
    unknown = [h for h in names if h not in HEADS]
    if unknown:
        raise ConfigError(f"train.heads: unknown head(s) {', '.join(unknown)}; available: {', '.join(HEADS)}")


FEATURES_COL = "features"
LABEL_COL = "label_index"
WEIGHT_COL = "class_weight"
PREDICTION_COL = "prediction_index"


@dataclass
class HeadSpec:
    name: str
    estimator: Estimator
    params: dict[str, Any]  # the hyperparameters logged to MLflow
    grid: list[tuple[str, list[Any]]]  # (param name on the base estimator, values)
    base: Any  # the estimator that owns the grid params (inside OneVsRest for gbt/svc multiclass)


def build_head(name: str, tc: TrainConfig, n_classes: int, weighted: bool) -> HeadSpec:
    """The estimator for head ``name``: features -> prediction_index (+ probability where it has one)."""
    from pyspark.ml.classification import (
        DecisionTreeClassifier,
        GBTClassifier,
        LinearSVC,
        LogisticRegression,
        OneVsRest,
        RandomForestClassifier,
    )

    p, g = tc.params, tc.grid
    common: dict[str, Any] = {"featuresCol": FEATURES_COL, "labelCol": LABEL_COL}
    if weighted:
        common["weightCol"] = WEIGHT_COL
    if name == "lr":
        params = {"maxIter": p.lr_max_iter, "regParam": p.lr_reg_param, "elasticNetParam": p.lr_elastic_net_param, "family": "multinomial"}
        base = LogisticRegression(predictionCol=PREDICTION_COL, **common, **params)
        grid = [("regParam", g.lr_reg_param), ("elasticNetParam", g.lr_elastic_net_param)]
    elif name == "rf":
        params = {"numTrees": p.rf_num_trees, "maxDepth": p.rf_max_depth, "seed": tc.seed}
        base = RandomForestClassifier(predictionCol=PREDICTION_COL, **common, **params)
        grid = [("numTrees", g.rf_num_trees), ("maxDepth", g.rf_max_depth)]
    elif name == "dt":
        params = {"maxDepth": p.dt_max_depth, "seed": tc.seed}
        base = DecisionTreeClassifier(predictionCol=PREDICTION_COL, **common, **params)
        grid = [("maxDepth", g.dt_max_depth)]
    elif name == "gbt":
        params = {"maxIter": p.gbt_max_iter, "maxDepth": p.gbt_max_depth, "seed": tc.seed}
        base = GBTClassifier(predictionCol=PREDICTION_COL, **common, **params)
        grid = [("maxDepth", g.gbt_max_depth)]
    elif name == "svc":
        params = {"maxIter": p.svc_max_iter, "regParam": p.svc_reg_param}
        base = LinearSVC(predictionCol=PREDICTION_COL, **common, **params)
        grid = [("regParam", g.svc_reg_param)]
    else:
        raise ValueError(f"head {name!r} is not an MLlib head; available: lr, rf, dt, gbt, svc")
    estimator: Any = base
    if name in ("gbt", "svc") and n_classes > 2:
        # The base classifier's own prediction column is internal to OneVsRest.
        base.setPredictionCol("prediction")
        estimator = OneVsRest(classifier=base, predictionCol=PREDICTION_COL, **common)
        params = {**params, "strategy": "one-vs-rest"}
    return HeadSpec(name, estimator, params, grid, base)
