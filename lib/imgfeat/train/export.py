"""Fitted heads -> plain arrays (``imgfeat.scoring.heads.HeadArrays``), for the Spark-free served model.

Linear models give their coefficient matrices; trees are read from the model's own saved node table
(``model.save`` writes Parquet with every node's split, children and impurity statistics: a stable, documented
format that needs no JVM walk); the Keras head gives its weights.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from imgfeat.scoring.heads import HeadArrays


def export_head(model: Any) -> HeadArrays:
    """The arrays of a fitted head: LogisticRegression, LinearSVC, DecisionTree, RandomForest, GBT, OneVsRest
    (of LinearSVC or GBT) or imgfeat's KerasHeadModel."""
    name = type(model).__name__
    if name == "LogisticRegressionModel":
        if model.getFamily() != "multinomial" and model.numClasses == 2:
            w = model.coefficients.toArray()
            weights, bias = np.stack([np.zeros_like(w), w]), np.array([0.0, model.intercept])
        else:
            weights, bias = model.coefficientMatrix.toArray(), model.interceptVector.toArray()
        return HeadArrays("linear", {"weights": weights, "bias": bias}, {"probabilistic": True, "mode": "lr"})
    if name == "LinearSVCModel":
        w = model.coefficients.toArray()
        if model.getThreshold() != 0.0:
            raise ValueError(f"LinearSVC with threshold {model.getThreshold()} cannot be exported; imgfeat trains it at 0")
        return HeadArrays("linear", {"weights": np.stack([-w, w]), "bias": np.array([-model.intercept, model.intercept])},
                          {"probabilistic": False, "mode": "svc"})
    if name in ("DecisionTreeClassificationModel", "RandomForestClassificationModel", "GBTClassificationModel"):
        return _export_trees(model, {"DecisionTreeClassificationModel": "dt", "RandomForestClassificationModel": "rf",
                                     "GBTClassificationModel": "gbt"}[name])
    if name == "OneVsRestModel":
        parts = [export_head(m) for m in model.models]
        return HeadArrays("ovr", {}, {"probabilistic": False, "mode": "ovr"}, parts)
    if name == "KerasHeadModel":
        from imgfeat.train.keras_head import weights_from_b64

        w = weights_from_b64(model.getOrDefault("weightsB64"))
        arrays = {}
        for i in range(len(w) // 2):
            arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = w[2 * i], w[2 * i + 1]
        return HeadArrays("mlp", arrays, {"probabilistic": True, "mode": "keras", "layers": len(w) // 2})
    raise ValueError(f"cannot export a {name} head to arrays")


def export_findings(models: list[Any], names: list[str], head: str) -> HeadArrays:
    """A ``findings`` head from ``fit_per_finding``'s models (one binary MLlib model per finding, in ``names``
    order; a ``ConstantFinding`` becomes a ``constant`` part)."""
    from imgfeat.train.finding_heads import ConstantFinding

    if len(models) != len(names):
        raise ValueError(f"{len(models)} fitted models for {len(names)} findings")
    parts = []
    for name, model in zip(names, models, strict=True):
        if isinstance(model, ConstantFinding):
            parts.append(HeadArrays("constant", {"rate": np.array([model.rate])}, {"probabilistic": True, "mode": "constant"}))
            continue
        part = export_head(model)
        if not part.probabilistic or part.kind not in ("linear", "trees"):
            raise ValueError(f"the {name} head ({type(model).__name__}) is not a binary probabilistic model")
        parts.append(part)
    return HeadArrays("findings", {}, {"probabilistic": True, "mode": "per_finding", "head": head,
                                       "findings": list(names)}, parts)


def export_masked_head(head: Any, names: list[str]) -> HeadArrays:
    """A ``findings`` head from ``fit_masked_bce``'s ``MaskedHead`` (its layers' kernels and biases)."""
    arrays = {}
    for i, (w, b) in enumerate(zip(head.kernels, head.biases, strict=True)):
        arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = np.asarray(w, np.float64), np.asarray(b, np.float64)
    return HeadArrays("findings", arrays, {"probabilistic": True, "mode": "masked_bce", "head": "keras",
                                           "layers": len(head.kernels), "findings": list(names)})


def _export_trees(model: Any, mode: str) -> HeadArrays:
    import pyarrow.parquet as pq

    with tempfile.TemporaryDirectory(prefix="imgfeat-trees-") as tmp:
        path = os.path.join(tmp, "model")
        model.save("file://" + path)
        table = pq.read_table(os.path.join(path, "data")).to_pylist()
        tree_weights = (np.array(model.treeWeights, dtype=np.float64) if mode != "dt" else np.ones(1))
    if mode == "dt":
        trees = {0: table}
    else:
        trees = {}
        for row in table:
            trees.setdefault(int(row["treeID"]), []).append(row["nodeData"])
    feature, threshold, left, right, value, roots = [], [], [], [], [], []
    for tree_id in sorted(trees):
        nodes = sorted(trees[tree_id], key=lambda n: n["id"])
        offset = len(feature)
        by_id = {n["id"]: offset + i for i, n in enumerate(nodes)}
        roots.append(by_id[0])
        for n in nodes:
            leaf = n["leftChild"] < 0
            split = n["split"]
            if not leaf and split["numCategories"] != -1:
                raise ValueError("categorical tree splits cannot be exported: imgfeat's features are continuous")
            feature.append(-1 if leaf else int(split["featureIndex"]))
            threshold.append(0.0 if leaf else float(split["leftCategoriesOrThreshold"][0]))
            left.append(-1 if leaf else by_id[n["leftChild"]])
            right.append(-1 if leaf else by_id[n["rightChild"]])
            if mode == "gbt":
                value.append([float(n["prediction"])])
            else:
                stats = np.asarray(n["impurityStats"], dtype=np.float64)
                value.append((stats / stats.sum()).tolist() if stats.sum() > 0 else stats.tolist())
    arrays = {"feature": np.array(feature, np.int64), "threshold": np.array(threshold, np.float64),
              "left": np.array(left, np.int64), "right": np.array(right, np.int64),
              "value": np.array(value, np.float64), "roots": np.array(roots, np.int64), "tree_weights": tree_weights}
    return HeadArrays("trees", arrays, {"probabilistic": True, "mode": mode})
