"""Heads for multi-label findings: one binary MLlib head per finding, or one multi-output network with a masked loss.

- ``fit_per_finding``: one-vs-rest over findings (lr, rf, gbt, dt), each fitted on the rows where its finding is
  known (``label_mask`` does not name it): an image whose Edema is uncertain under the ``ignore`` policy is simply
  not a training row of the Edema head. ``score_per_finding`` adds ``finding_probability`` (P(positive) per
  finding, in the findings' order).
- ``fit_masked_bce``: a multi-output head (softmax-free: one sigmoid per finding; linear, or one hidden ReLU layer)
  trained with a binary cross-entropy whose masked entries weigh nothing and whose positives weigh
  ``negatives / positives`` per finding (rare findings count); features standardised inside, folded back into
  the first layer, so the result is plain arrays (``MaskedHead``) scored with NumPy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pyspark.sql import DataFrame

MLLIB_HEADS = ("lr", "rf", "gbt", "dt")


def _estimator(head: str, params: Any, seed: int) -> Any:
    from pyspark.ml.classification import (
        DecisionTreeClassifier,
        GBTClassifier,
        LogisticRegression,
        RandomForestClassifier,
    )

    common = {"featuresCol": "features", "labelCol": "y"}
    if head == "lr":
        return LogisticRegression(maxIter=params.lr_max_iter, regParam=params.lr_reg_param,
                                  elasticNetParam=params.lr_elastic_net_param, family="binomial", **common)
    if head == "rf":
        return RandomForestClassifier(numTrees=params.rf_num_trees, maxDepth=params.rf_max_depth, seed=seed, **common)
    if head == "gbt":
        return GBTClassifier(maxIter=params.gbt_max_iter, maxDepth=params.gbt_max_depth, seed=seed, **common)
    if head == "dt":
        return DecisionTreeClassifier(maxDepth=params.dt_max_depth, seed=seed, **common)
    raise ValueError(f"head {head!r} cannot be fitted per finding; use one of {', '.join(MLLIB_HEADS)} (or keras)")


def finding_rows(df: DataFrame, name: str) -> DataFrame:
    """The rows where ``name`` is known, with ``y`` = 1.0 when it is positive."""
    from pyspark.sql import functions as F

    known = ~F.coalesce(F.array_contains(F.col("label_mask"), name), F.lit(False))
    return df.filter(known).withColumn("y", F.array_contains(F.col("labels"), name).cast("double"))


def fit_per_finding(df: DataFrame, names: list[str], head: str, params: Any, seed: int = 42) -> list[Any]:
    """One fitted binary MLlib model per finding (``df``: ``features`` vector, ``labels``, ``label_mask``); a
    finding with a single known class in training gets None (nothing to learn; scored as its training rate)."""
    from pyspark.sql import functions as F

    models = []
    for name in names:
        rows = finding_rows(df, name)
        classes = {r["y"] for r in rows.select("y").distinct().collect()}
        if len(classes) < 2:
            rate = rows.agg(F.avg("y")).first()[0]
            models.append(ConstantFinding(float(rate) if rate is not None else 0.0))
            continue
        models.append(_estimator(head, params, seed).fit(rows))
    return models


@dataclass(frozen=True)
class ConstantFinding:
    """A finding that training saw with one class only: its training rate, for every image."""

    rate: float


def score_per_finding(models: list[Any], df: DataFrame) -> DataFrame:
    """``df`` plus ``finding_probability`` (array<double>): each model's P(positive), in the models' order."""
    from pyspark.ml.functions import vector_to_array
    from pyspark.sql import functions as F

    columns = []
    for j, model in enumerate(models):
        if isinstance(model, ConstantFinding):
            columns.append(F.lit(model.rate))
            continue
        out = {"probabilityCol": f"_p{j}", "predictionCol": f"_y{j}", "rawPredictionCol": f"_r{j}"}
        df = _with_outputs(model, out).transform(df)
        columns.append(vector_to_array(F.col(f"_p{j}"))[1])
    scored = df.withColumn("finding_probability", F.array(*columns))
    return scored.drop(*[c for c in scored.columns if c[:2] in ("_p", "_y", "_r") and c[2:].isdigit()])


def _with_outputs(model: Any, out: dict[str, str]) -> Any:
    copy = model.copy()
    copy.setProbabilityCol(out["probabilityCol"]).setPredictionCol(out["predictionCol"])
    copy.setRawPredictionCol(out["rawPredictionCol"])
    return copy


@dataclass
class MaskedHead:
    """A multi-output head as arrays: logits = relu(x W0 + b0) W1 + b1 (or x W0 + b0 without a hidden layer)."""

    kernels: list[np.ndarray]
    biases: list[np.ndarray]

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        h = np.asarray(x, dtype=np.float64)
        for i, (w, b) in enumerate(zip(self.kernels, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.kernels) - 1:
                h = np.maximum(h, 0.0)
        return 1.0 / (1.0 + np.exp(-h))


def positive_weights(y: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per finding: known negatives / known positives (1 where a finding has no known positive)."""
    pos = (y * mask).sum(axis=0)
    neg = ((1 - y) * mask).sum(axis=0)
    return np.where(pos > 0, neg / np.maximum(pos, 1), 1.0)


def masked_bce(logits: Any, y: Any, mask: Any, pos_weight: Any) -> Any:
    """Mean binary cross-entropy over the known entries only (torch tensors); masked entries weigh nothing."""
    import torch

    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight, reduction="none")
    return (loss * mask).sum() / mask.sum().clamp(min=1.0)


def fit_masked_bce(x: np.ndarray, y: np.ndarray, mask: np.ndarray, hidden: int = 0, epochs: int = 30,
                   batch_size: int = 64, learning_rate: float = 0.01, seed: int = 42,
                   weight_positives: bool = True) -> MaskedHead:
    """Fit the multi-output head on (n, d) features, (n, k) targets and (n, k) masks (1 = known)."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mean, std = x.mean(axis=0), x.std(axis=0) + 1e-6
    xt = torch.tensor((x - mean) / std, dtype=torch.float32)
    yt, mt = torch.tensor(y, dtype=torch.float32), torch.tensor(mask, dtype=torch.float32)
    pw = torch.tensor(positive_weights(y, mask) if weight_positives else np.ones(y.shape[1]), dtype=torch.float32)
    layers: list[Any] = [torch.nn.Linear(x.shape[1], hidden or y.shape[1])]
    if hidden:
        layers += [torch.nn.ReLU(), torch.nn.Linear(hidden, y.shape[1])]
    net = torch.nn.Sequential(*layers)
    optimiser = torch.optim.Adam(net.parameters(), lr=learning_rate)
    for _ in range(epochs):
        order = torch.randperm(len(xt), generator=gen)
        for start in range(0, len(xt), batch_size):
            idx = order[start:start + batch_size]
            optimiser.zero_grad()
            masked_bce(net(xt[idx]), yt[idx], mt[idx], pw).backward()
            optimiser.step()
    linears = [m for m in net if isinstance(m, torch.nn.Linear)]
    kernels = [m.weight.detach().double().numpy().T for m in linears]
    biases = [m.bias.detach().double().numpy() for m in linears]
    # Fold the standardisation into the first layer: ((x - mean) / std) W + b = x (W / std) + (b - (mean / std) W).
    biases[0] = biases[0] - (mean / std) @ kernels[0]
    kernels[0] = kernels[0] / std[:, None]
    return MaskedHead(kernels, biases)
